"""forward_fn: models whose forward does not take the inputs tensor alone (here: the whole batch)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.methods import grad_cam, gradient
from tests.conftest import quiet_trainer


class BatchForward(pl.LightningModule):
    """forward(batch) -> logits, as some LightningModules are written."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)
        )

    def forward(self, batch):
        x, _ = batch
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(32, 3, 8, 8, generator=generator), torch.arange(32) % 4), batch_size=8)


def test_without_forward_fn_the_failure_says_how_to_call_the_model(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[SaliencyCallback(num_samples=4)], logger=False)
    with pytest.raises(Exception) as caught:
        trainer.fit(BatchForward(), _loader(), _loader())
    assert trainer.global_step == 0
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "called the model as model(inputs)" in notes and "forward_fn=" in notes


def test_forward_fn_runs_every_callback_with_the_models_own_layer_names(tmp_path):
    call = lambda model, inputs: model((inputs, None))  # noqa: E731 (the batch form its forward takes)
    callbacks = [
        SaliencyCallback(methods=("gradient",), num_samples=4, forward_fn=call),
        GradCAMCallback(layer="net.0", num_samples=4, forward_fn=call),
        LinearProbeCallback(layers=["net.0", "net.1"], num_samples=16, forward_fn=call),
        RepresentationSimilarityCallback(layers=["net.0", "net.1"], num_samples=16, forward_fn=call),
    ]
    model = BatchForward()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=False)
    trainer.fit(model, _loader(), _loader())
    assert all(callback._runs == 1 for callback in callbacks)
    inputs = callbacks[0].probe.inputs
    torch.testing.assert_close(callbacks[0]._previous["gradient"], gradient(model.net, inputs).abs().sum(dim=1))
    torch.testing.assert_close(callbacks[1]._previous["net.0"], grad_cam(model.net, inputs, None, "0"))
