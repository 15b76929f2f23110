"""torch.compile'd models: explained through the same modules and weights, run eagerly, with the names users know.

Forward hooks added after a module's first compiled call never fire in its compiled graph, so Grad-CAM and
``layers="auto"`` used to fail with "found no sub-module ... spatial extent" on a plain CNN.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_interp.callbacks._base as base_module
from lightning_interp import GradCAMCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.methods import grad_cam
from tests.conftest import NetClassifier, quiet_trainer

pytestmark = pytest.mark.slow  # compiling takes about 20 s on a CPU


def _compiled_classifier() -> NetClassifier:
    """A LightningModule holding a compiled network, a common way to use torch.compile with Lightning."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip
    return NetClassifier(torch.compile(plain), lr=0.05)


def test_compiled_network_is_explained_eagerly_with_the_same_weights(tmp_path, monkeypatch):
    notes: list[str] = []
    monkeypatch.setattr(base_module, "rank_zero_info", notes.append)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 3, 8, 8, generator=generator), torch.arange(32) % 4)
    named = GradCAMCallback(layer="net.2", num_samples=4, name="named")  # the name without '_orig_mod'
    automatic = GradCAMCallback(num_samples=4)
    callbacks = [named, automatic, SaliencyCallback(num_samples=4), RepresentationSimilarityCallback(num_samples=16)]
    model = _compiled_classifier()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=False)
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert sum("compiled with torch.compile" in note for note in notes) == 1  # said once, not once per callback
    assert automatic.layers == ["net.3"]  # named as for the eager network
    # the same weights through the original modules: the map equals Grad-CAM of the uncompiled network
    original = model.net._orig_mod
    expected = grad_cam(original, named.probe.inputs, None, "2")
    torch.testing.assert_close(named._previous["net.2"], expected, rtol=1e-4, atol=1e-6)
    assert float(expected.abs().max()) > 0
    assert callbacks[3]._runs == 1 and callbacks[2]._runs == 1
