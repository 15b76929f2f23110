"""CalibrationCallback in a real Trainer: its numbers equal torchmetrics' on logits computed independently, no extra
forward pass, the validation_step forms it reads, binary models, hooks removed, non-interference."""

from __future__ import annotations

import pathlib
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

import lightning_interp.callbacks.calibration as calibration_module
from lightning_interp import CalibrationCallback, DataDescription, DatasetBiasCallback
from lightning_interp.demo import ImageClassifier
from lightning_interp.methods import expected_calibration_error, fit_temperature, reliability_curve
from tests.conftest import (
    BatchNormDropoutNet,
    NetClassifier,
    quiet_trainer,
    read_events,
    tiny_classifier,
    tiny_datamodule,
)

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


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


def _drawn_bins(monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """The (confidence, accuracy, counts) each reliability diagram is drawn from, recorded as it is drawn."""
    drawn: list[tuple[torch.Tensor, ...]] = []
    original = calibration_module.reliability_image

    def record(*bins, **options):
        drawn.append(bins)
        return original(*bins, **options)

    monkeypatch.setattr(calibration_module, "reliability_image", record)
    return drawn


def test_temperature_ece_after_it_and_the_diagram_equal_the_public_functions(tmp_path, monkeypatch):
    drawn = _drawn_bins(monkeypatch)
    callback = CalibrationCallback(n_bins=10)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=3)
    pl.seed_everything(0, verbose=False)
    model, datamodule = tiny_classifier(), tiny_datamodule()
    trainer.fit(model, datamodule=datamodule)
    logits, labels = _validation_logits(model, datamodule)
    metrics = trainer.callback_metrics
    temperature = fit_temperature(logits, labels)
    assert 1e-3 < temperature < 1e3, "an interior minimum, so the comparison is with the exact minimiser"
    assert float(metrics["interp_calibration/temperature"]) == pytest.approx(temperature, rel=1e-5)
    after = expected_calibration_error(logits / temperature, labels, n_bins=10, from_logits=True)
    assert float(metrics["interp_calibration/ece_after_temperature"]) == pytest.approx(float(after), abs=1e-5)
    confidence, accuracy, counts = drawn[-1]
    expected = reliability_curve(logits.softmax(dim=1), labels, n_bins=10)
    assert torch.equal(counts, expected[2]) and counts.dtype == torch.long
    assert torch.allclose(confidence, expected[0], atol=1e-6) and torch.allclose(accuracy, expected[1], atol=1e-6)


def test_a_binary_model_fits_the_sigmoid_temperature(tmp_path):
    def binary_labels(batch):
        return batch[0], (batch[1] == 0).long(), None

    callback = CalibrationCallback(n_bins=5, data=DataDescription(batch_parser=binary_labels))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=2)
    pl.seed_everything(0, verbose=False)
    model, datamodule = BinaryClassifier(), tiny_datamodule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model's temperature may have no interior minimum: not tested here
        trainer.fit(model, datamodule=datamodule)
        logits, labels = _validation_logits(model, datamodule)
        temperature = fit_temperature(logits, (labels == 0).long(), max_iter=calibration_module.TEMPERATURE_STEPS)
    metrics = trainer.callback_metrics
    assert float(metrics["interp_calibration/temperature"]) == pytest.approx(temperature, rel=1e-5)
    after = binary_calibration_error(torch.sigmoid(logits[:, 0] / temperature), (labels == 0).long(), n_bins=5)
    assert float(metrics["interp_calibration/ece_after_temperature"]) == pytest.approx(float(after), abs=1e-5)
    accuracy = float(((logits[:, 0] > 0).long() == (labels == 0).long()).double().mean())
    assert float(metrics["interp_calibration/accuracy"]) == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.parametrize("binary", [False, True])
def test_the_bin_sums_give_torchmetrics_ece_and_the_reliability_curve_with_confidences_of_one(binary):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 1 if binary else 4, generator=gen) * 4
    logits[:20] = torch.tensor([40.0] if binary else [40.0, -40.0, -40.0, -40.0])  # probability exactly 1.0
    labels = torch.randint(0, 2 if binary else 4, (300,), generator=gen)
    probs = torch.sigmoid(logits[:, 0]) if binary else logits.softmax(dim=1)
    assert bool((probs == 1).any())
    sums = calibration_module._bin_sums(probs, labels, binary, 7)
    assert sums.shape == (3, 8) and float(sums[0].sum()) == 300
    ece = float((sums[2] - sums[1]).abs().sum() / 300)
    assert ece == pytest.approx(float(expected_calibration_error(probs, labels, n_bins=7)), abs=1e-6)
    confidence, accuracy, counts = reliability_curve(probs, labels, n_bins=7)
    merged = torch.cat([sums[:, :-2], sums[:, -2:].sum(dim=1, keepdim=True)], dim=1)
    assert torch.equal(merged[0].long(), counts)
    assert torch.allclose(merged[1] / counts.clamp(min=1), confidence, atol=1e-6)
    assert torch.allclose(merged[2] / counts.clamp(min=1), accuracy, atol=1e-6)


def _census(tmp_path, val_size: int) -> dict[str, int]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_cost import _Counted  # a Census (aten ops, host syncs) around each validation hook
    finally:
        sys.path.remove(str(BENCHMARKS))
    callback = CalibrationCallback()
    counted = _Counted(callback)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(val_size=val_size))
    assert "interp_calibration/temperature" in trainer.callback_metrics and counted.last is not None
    return {"ops": counted.last.ops, **counted.last.syncs}


def test_a_validation_waits_for_the_device_as_often_with_2_as_with_6_batches_and_with_few_or_many_steps(
    tmp_path, monkeypatch
):
    few = _census(tmp_path, val_size=32)  # two validation batches of 16
    many = _census(tmp_path, val_size=96)  # six
    ops = few.pop("ops")
    assert many.pop("ops") - ops <= 4 * 4, "more than the capture's few ops per batch"
    assert few == many, "a host sync per batch came back"
    monkeypatch.setattr(calibration_module, "TEMPERATURE_STEPS", 4)
    fewer_steps = _census(tmp_path, val_size=32)
    assert fewer_steps.pop("ops") < ops and fewer_steps == few, "a host sync per Newton step came back"
    # the labels' checks in _collected, and the one transfer of every number the run logs and draws
    assert sum(few.values()) <= 4, few
    assert not {"item", "_local_scalar_dense", "cpu", "nonzero", "boolean index"} & few.keys(), few
    assert ops < 1500
