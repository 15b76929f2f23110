"""CalibrationCallback in a real Trainer: its numbers equal torchmetrics' on logits computed independently, no extra
forward pass, the validation_step forms it reads, binary models, hooks removed, non-interference."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from lightning_interp import CalibrationCallback, DataDescription, DatasetBiasCallback
from lightning_interp.demo import ImageClassifier
from tests.conftest import (
    BatchNormDropoutNet,
    NetClassifier,
    quiet_trainer,
    read_events,
    tiny_classifier,
    tiny_datamodule,
)


def _validation_logits(model: pl.LightningModule, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """The final model's logits and labels over the whole validation loader, computed here, not by the callback."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits.append(model(batch[0]))
            labels.append(batch[1])
    return torch.cat(logits), torch.cat(labels)


def test_ece_accuracy_and_confidence_equal_torchmetrics_on_independently_computed_logits(tmp_path):
    callback = CalibrationCallback(n_bins=10)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=3)
    pl.seed_everything(0, verbose=False)
    model = tiny_classifier()
    datamodule = tiny_datamodule()
    trainer.fit(model, datamodule=datamodule)
    logits, labels = _validation_logits(model, datamodule)  # the last validation ran on this final model
    metrics = trainer.callback_metrics
    probs = logits.softmax(dim=1)
    expected = multiclass_calibration_error(probs, labels, num_classes=4, n_bins=10)
    assert float(metrics["interp_calibration/ece"]) == pytest.approx(float(expected), abs=1e-5)
    assert float(metrics["interp_calibration/accuracy"]) == pytest.approx(float(metrics["val_acc"]), abs=1e-6)
    confidence = float(probs.max(dim=1).values.mean())
    assert float(metrics["interp_calibration/mean_confidence"]) == pytest.approx(confidence, abs=1e-5)
    # the temperature minimises the validation NLL: no other temperature does better
    temperature = float(metrics["interp_calibration/temperature"])
    best = F.cross_entropy(logits / temperature, labels)
    for other in (0.5 * temperature, 0.9 * temperature, 1.1 * temperature, 2 * temperature, 1.0):
        assert best <= F.cross_entropy(logits / other, labels) + 1e-6
    events = read_events(logger.log_dir)
    for tag in ("ece", "ece_after_temperature", "temperature", "overconfidence"):
        assert events.scalar_steps(f"interp_calibration/{tag}") == [3, 7, 11]
    assert events.image_steps("interp_calibration/reliability") == [3, 7, 11]
    assert not model._forward_hooks, "the capturing hook is removed after each validation"


class CountingClassifier(ImageClassifier):
    """Counts its forward calls."""

    def __init__(self) -> None:
        super().__init__(BatchNormDropoutNet(), lr=5e-3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_no_forward_pass_is_added(tmp_path):
    def fit(callbacks) -> int:
        pl.seed_everything(1, verbose=False)
        model = CountingClassifier()
        quiet_trainer(tmp_path, callbacks=callbacks, logger=False).fit(model, datamodule=tiny_datamodule())
        return model.calls

    callback = CalibrationCallback()
    assert fit([callback]) == fit([])
    assert callback._runs == 2


class ReturnsLogits(NetClassifier):
    """A validation_step that calls the inner network (not self(x)) and returns its logits in a dict."""

    def validation_step(self, batch, batch_idx):
        logits = self.net(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        return {"logits": logits}


class ReturnsNothing(NetClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))


def test_validation_step_outputs_are_read_and_a_step_without_logits_is_warned_about(tmp_path):
    reading = CalibrationCallback()
    trainer = quiet_trainer(tmp_path, callbacks=[reading], logger=False, max_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CalibrationCallback")
        trainer.fit(ReturnsLogits(BatchNormDropoutNet()), datamodule=tiny_datamodule())
    assert "interp_calibration/ece" in trainer.callback_metrics

    blind = CalibrationCallback()
    trainer = quiet_trainer(tmp_path, callbacks=[blind], logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match=r"neither called the LightningModule \(self\(x\)\) nor returned"):
        trainer.fit(ReturnsNothing(BatchNormDropoutNet()), datamodule=tiny_datamodule())
    assert "interp_calibration/ece" not in trainer.callback_metrics


class OneLogit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BinaryClassifier(pl.LightningModule):
    """Disc (class 0) against the rest, one logit."""

    def __init__(self) -> None:
        super().__init__()
        self.model = OneLogit()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.binary_cross_entropy_with_logits(self(batch[0])[:, 0], (batch[1] == 0).float())

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_binary_model_matches_torchmetrics_binary_ece(tmp_path):
    def binary_labels(batch):
        return batch[0], (batch[1] == 0).long(), None

    callback = CalibrationCallback(n_bins=5, data=DataDescription(batch_parser=binary_labels))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    model = BinaryClassifier()
    datamodule = tiny_datamodule()
    trainer.fit(model, datamodule=datamodule)
    logits, labels = _validation_logits(model, datamodule)
    expected = binary_calibration_error(torch.sigmoid(logits[:, 0]), (labels == 0).long(), n_bins=5)
    assert float(trainer.callback_metrics["interp_calibration/ece"]) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"n_bins": 1}, "n_bins must be an int >= 2"), ({"num_samples": 8}, "unexpected keyword argument 'num_samples'")],
)
def test_bad_arguments_are_refused(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CalibrationCallback(**options)


def test_validate_under_inference_mode_logs_the_same_ece_as_torchmetrics(tmp_path):
    callback = CalibrationCallback(n_bins=10)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    model, datamodule = tiny_classifier(), tiny_datamodule()
    trainer.validate(model, datamodule=datamodule, verbose=False)  # validation under torch.inference_mode()
    logits, labels = _validation_logits(model, datamodule)
    expected = multiclass_calibration_error(logits.softmax(dim=1), labels, num_classes=4, n_bins=10)
    assert float(trainer.callback_metrics["interp_calibration/ece"]) == pytest.approx(float(expected), abs=1e-5)
    assert not model._forward_hooks


class NaNOutputs(ImageClassifier):
    """Validation outputs that are NaN (a diverged model): the loss is computed on the real logits."""

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        return {"logits": torch.full_like(logits, float("nan"))}


@pytest.mark.parametrize("make", [CalibrationCallback, DatasetBiasCallback])
def test_nan_validation_outputs_are_warned_about_and_nothing_is_logged(tmp_path, make):
    callback = make()
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match="validation outputs contain NaN or inf"):
        trainer.fit(NaNOutputs(BatchNormDropoutNet()), datamodule=tiny_datamodule())
    assert not [key for key in trainer.callback_metrics if key.startswith(f"interp_{callback.name}/")]
