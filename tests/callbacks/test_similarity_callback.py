"""RepresentationSimilarityCallback's host syncs, its warnings after the one transfer, and what it draws."""

from __future__ import annotations

import math
import pathlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_interp.callbacks.similarity as similarity_module
from lightning_interp import ProbeSet, RepresentationSimilarityCallback
from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.methods import capture_features, rdm
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _counted(callback):
    """benchmarks/bench_cost.py's wrapper: a Census (aten ops, host syncs) around each validation hook."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_cost import _Counted
    finally:
        sys.path.remove(str(BENCHMARKS))
    return _Counted(callback)


def _float_labels() -> ProbeSet:
    g = torch.Generator().manual_seed(3)
    return ProbeSet(torch.randn(16, 3, 16, 16, generator=g), labels=torch.rand(16, generator=g))


OPTIONS = {
    "defaults": dict,
    "tau_a and a reference model": lambda: {
        "rsa_method": "tau_a",
        "reference_model": shapes_cnn(num_classes=4, width=3),
        "rdm_metric": "euclidean",
    },
    "real-valued labels": lambda: {"probe": _float_labels()},  # their kind is read once per probe set, not per run
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_validation_waits_for_the_device_as_often_with_2_as_with_4_layers(tmp_path, options):
    counts = []
    for layers in (["net.0", "net.10"], ["net.0", "net.3", "net.6", "net.10"]):
        callback = RepresentationSimilarityCallback(layers=layers, num_samples=16, **options())
        counted = _counted(callback)
        torch.manual_seed(0)
        trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback], logger=False)
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
        assert f"interp_similarity/{layers[0]}/cka_vs_previous" in trainer.callback_metrics
        assert counted.last is not None
        counts.append(dict(counted.last.syncs))
    assert counts[0] == counts[1], "a host sync per layer (or per pair of layers) came back"
    # the one transfer of the run: a copy of everything packed into one tensor, then its numbers read as floats
    assert sum(counts[0].values()) <= 6, counts[0]
    assert not {"bool", "boolean index", "_local_scalar_dense", "nonzero", "item"} & counts[0].keys(), counts[0]


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


class _WithDeadLayers(nn.Module):
    """shapes_cnn, and beside its output a constant layer and a one-value layer (their outputs are unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = shapes_cnn(num_classes=4, width=4)
        self.zero = _Zero()
        self.single = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        self.zero(logits)
        self.single(logits)
        return logits


def _fit_recording_warnings(tmp_path, callback, model) -> tuple[dict[str, float], list[tuple[type, str]]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
        trainer.fit(model, datamodule=tiny_datamodule())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("interp_similarity/")}
    return metrics, [(w.category, str(w.message)) for w in caught]


def test_a_constant_layer_is_warned_about_as_the_methods_would_and_logged_nan(tmp_path):
    layers = ["net.body.0", "net.zero", "net.body.6", "net.single"]
    callback = RepresentationSimilarityCallback(layers=layers, num_samples=32)
    torch.manual_seed(0)
    metrics, caught = _fit_recording_warnings(tmp_path, callback, ImageClassifier(_WithDeadLayers()))
    expected = [
        (RuntimeWarning, "Layer(s) net.zero has zero self-similarity (a constant layer, with zero variance across "
         "samples); its CKA is undefined and returned as NaN."),
        (RuntimeWarning, "32 pattern(s) are constant across features; their correlation distance is NaN."),
        (UserWarning, "RepresentationSimilarityCallback: non-finite RDMs for ['net.zero']; their RSA is NaN."),
        (UserWarning, "RepresentationSimilarityCallback: ['net.single'] give one value per sample, where the "
         "correlation distance between two samples is undefined; their RDMs use the Euclidean distance (|a - b|) "
         "instead (said once per run)."),
    ]  # fmt: skip
    for warning in expected:
        assert warning in caught, warning
    assert not [message for _, message in caught if "RDM(s)" in message], "the finite RDMs' RSA is defined"
    undefined = {
        "interp_similarity/net.zero/cka_vs_start",
        "interp_similarity/net.zero/rsa_vs_labels",
        "interp_similarity/net.zero/rsa_vs_next",
        "interp_similarity/net.body.0/rsa_vs_next",  # its next layer is net.zero
    }
    assert undefined < metrics.keys()
    assert {name for name, value in metrics.items() if math.isnan(value)} == undefined


def test_labels_of_one_class_give_the_rsa_matrix_warning_with_its_numbering(tmp_path):
    g = torch.Generator().manual_seed(3)
    probe = ProbeSet(torch.randn(16, 3, 16, 16, generator=g), labels=torch.zeros(16, dtype=torch.long))
    callback = RepresentationSimilarityCallback(num_samples=16, probe=probe, metrics=("rsa",))
    torch.manual_seed(0)
    metrics, caught = _fit_recording_warnings(tmp_path, callback, tiny_classifier())
    # the label RDM comes after the four layers' RDMs: number 4, as rsa_matrix numbers them
    message = "The upper triangle of RDM(s) 4 is constant; their correlation is NaN."
    assert (RuntimeWarning, message) in caught
    assert all(math.isnan(v) for k, v in metrics.items() if k.endswith("rsa_vs_labels"))
    assert not any(math.isnan(v) for k, v in metrics.items() if k.endswith("rsa_vs_next"))


def test_the_rdm_pictures_are_each_layers_rdm_pooled(tmp_path, monkeypatch):
    # pooled in one batch on the device and brought over with the scalars: each still the layer's own RDM, pooled
    monkeypatch.setattr(similarity_module, "RDM_TILE", 8)
    drawn: list[torch.Tensor] = []
    grouped: list[list[int]] = []
    draw = similarity_module.rdm_image

    def spy(rdms, names, **options):
        drawn.extend(r.clone() for r in rdms)
        grouped.append(list(options["groups"]))
        return draw(rdms, names, **options)

    monkeypatch.setattr(similarity_module, "rdm_image", spy)
    callback = RepresentationSimilarityCallback(num_samples=20, metrics=("rsa",))
    model = tiny_classifier()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(model, datamodule=tiny_datamodule())
    assert callback._layout is not None and callback._layout[0] is callback.probe  # made once for the probe set
    features = capture_features(model, callback.probe.inputs, callback.layers, max_features=callback.max_features)
    order = torch.argsort(callback.probe.labels, stable=True)
    assert len(drawn) == len(callback.layers)
    for picture, name in zip(drawn, callback.layers, strict=True):
        expected = F.adaptive_avg_pool2d(rdm(features[name][order]).float()[None, None], 8)[0, 0]
        assert picture.dtype == torch.float32 and picture.shape == (8, 8)
        torch.testing.assert_close(picture, expected, rtol=0, atol=1e-6)
    # the class of each sample in the RDMs' order: the figure's class boundaries lie where the sorted labels change
    assert grouped == [sorted(callback.probe.labels.tolist())]
    callback._reset_run_state()
    assert callback._layout is None
