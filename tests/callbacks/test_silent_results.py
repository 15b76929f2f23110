"""Results that were silently of something else, in real Trainers: the weights a weight-averaging callback swaps in
for validation, the prediction a test-time-augmented ``validation_step`` reports, and ``cka_vs_start`` on a stream.

Every reference is computed here, independently of the callbacks: a hand gradient on a copy of the model loaded with
the averaged weights, torchmetrics' calibration error on logits computed here, CKA from the start and final weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_interp import CalibrationCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.callbacks._base import _run_before_weight_averaging
from lightning_interp.demo import ImageClassifier
from lightning_interp.methods import capture_features, normalized_grams
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


@contextlib.contextmanager
def lightning_info():
    """The messages Lightning's ``rank_zero_info`` logs inside the block (its logger does not propagate to pytest's)."""
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- weight averaging
class AveragedWeights(Callback):
    """After each epoch's validation, before the next optimisation step: the trained and the averaged weights."""

    def __init__(self, averaging: EMAWeightAveraging) -> None:
        self.averaging = averaging
        self.trained: list[dict[str, torch.Tensor]] = []
        self.averaged: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.trained.append(copy.deepcopy(pl_module.state_dict()))
        self.averaged.append(copy.deepcopy(self.averaging._average_model.module.state_dict()))


def _fit_with_ema(tmp_path, order: str):
    """Two epochs of the tiny classifier with an EMA of its weights, the interp callbacks placed by ``order``."""
    pl.seed_everything(5, verbose=False)
    model = tiny_classifier()
    averaging = EMAWeightAveraging(decay=0.8)
    spy = AveragedWeights(averaging)
    saliency = SaliencyCallback(methods="gradient", num_samples=8, target=0)
    calibration = CalibrationCallback(n_bins=10)
    interp = [saliency, calibration] if order != "none" else []
    callbacks = {"after": [averaging, spy, *interp], "before": [*interp, averaging, spy], "none": [averaging, spy]}
    trainer = quiet_trainer(tmp_path, callbacks=callbacks[order], logger=False, deterministic=True)
    trainer.fit(model, datamodule=tiny_datamodule())
    return trainer, model, spy, saliency


def _loaded(state: dict[str, torch.Tensor]) -> ImageClassifier:
    """A fresh tiny classifier holding ``state``, in eval mode."""
    model = tiny_classifier()
    model.load_state_dict(state)
    return model.eval()


def _hand_gradient_map(state: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """|d score_0 / d input| summed over channels, on a fresh copy of the model loaded with ``state``."""
    model = _loaded(state)
    inputs = inputs.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)
    return gradient.abs().sum(dim=1)


def _validation_logits(model: pl.LightningModule, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (``transform(model, x)``, default ``model(x)``) and labels of the validation set, in eval mode."""
    model.eval()
    datamodule = tiny_datamodule()
    datamodule.setup("fit")
    logits, labels = [], []
    with torch.no_grad():
        for x, y, *_ in datamodule.val_dataloader():
            logits.append(model(x) if transform is None else transform(model, x))
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@pytest.mark.filterwarnings("ignore:interp_calibration/temperature")  # two epochs: no interior NLL minimum yet
def test_ema_weights_are_explained_whatever_the_callback_order_and_training_is_unchanged(tmp_path):
    with lightning_info() as said:
        trainer, model, spy, saliency = _fit_with_ema(tmp_path / "after", "after")
    reordered = [message for message in said if "now run before EMAWeightAveraging" in message]
    assert len(reordered) == 1, "said once, though every interp callback's setup checks the order"
    kinds = [type(callback).__name__ for callback in trainer.callbacks]
    assert kinds.index("SaliencyCallback") < kinds.index("CalibrationCallback") < kinds.index("EMAWeightAveraging")
    assert kinds.index("EMAWeightAveraging") < kinds.index("AveragedWeights"), "the other callbacks keep their order"
    after = (trainer.callback_metrics, saliency.last_maps["gradient"], saliency.probe.inputs)
    trainer, before_model, before_spy, before_saliency = _fit_with_ema(tmp_path / "before", "before")
    before = (trainer.callback_metrics, before_saliency.last_maps["gradient"], before_saliency.probe.inputs)
    _, plain_model, plain_spy, _ = _fit_with_ema(tmp_path / "none", "none")

    # training is the same with the interp callbacks after the averaging, before it, or absent
    for state in (model.state_dict(), before_model.state_dict()):
        for name, value in plain_model.state_dict().items():
            assert torch.equal(state[name], value), name
    for name, value in plain_spy.trained[-1].items():
        assert torch.equal(spy.trained[-1][name], value) and torch.equal(before_spy.trained[-1][name], value), name

    # the maps are those of the averaged weights, in both orders; the trained weights' differ
    assert torch.equal(after[2], before[2])
    expected = _hand_gradient_map(spy.averaged[-1], after[2])
    trained = _hand_gradient_map(spy.trained[-1], after[2])
    assert (expected - trained).abs().max() > 0.05 * expected.abs().max(), "the two sets of weights are apart"
    torch.testing.assert_close(after[1], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(before[1], expected, rtol=1e-4, atol=1e-6)

    # the scalars too: identical between the orders, and the calibration that of the averaged weights' logits
    tags = [tag for tag in after[0] if tag.startswith("interp_")]
    assert "interp_calibration/ece" in tags and any(tag.startswith("interp_saliency/") for tag in tags)
    for tag in tags:
        assert float(after[0][tag]) == pytest.approx(float(before[0][tag]), abs=1e-6), tag
    logits, labels = _validation_logits(_loaded(spy.averaged[-1]))
    ece = float(multiclass_calibration_error(logits.softmax(dim=1), labels, num_classes=4, n_bins=10))
    assert float(after[0]["interp_calibration/ece"]) == pytest.approx(ece, abs=1e-5)
    confidence = float(logits.softmax(dim=1).amax(dim=1).mean())
    assert float(after[0]["interp_calibration/mean_confidence"]) == pytest.approx(confidence, abs=1e-6)
    trained_logits, _ = _validation_logits(_loaded(spy.trained[-1]))
    trained_confidence = float(trained_logits.softmax(dim=1).amax(dim=1).mean())
    assert abs(trained_confidence - confidence) > 1e-3, "the trained weights' differs (0.39 vs 0.31)"


def test_the_reordering_moves_only_interp_callbacks_before_the_first_weight_averaging_and_is_idempotent(tmp_path):
    saliency, calibration = SaliencyCallback(methods="gradient"), CalibrationCallback()
    averaging, monitor = EMAWeightAveraging(), LearningRateMonitor()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path))
    trainer = quiet_trainer(
        tmp_path, callbacks=[monitor, averaging, saliency, checkpoint, calibration], enable_checkpointing=True
    )
    assert trainer.callbacks[-1] is checkpoint, "Lightning puts checkpoints last"
    _run_before_weight_averaging(trainer)
    expected = [monitor, saliency, calibration, averaging]
    assert [c for c in trainer.callbacks if c in expected] == expected and trainer.callbacks[-1] is checkpoint
    listed = trainer.callbacks
    _run_before_weight_averaging(trainer)
    assert trainer.callbacks is listed, "a second call changes nothing"

    # StochasticWeightAveraging swaps nothing at validation: nothing to reorder
    swa = StochasticWeightAveraging(swa_lrs=0.01)
    trainer = quiet_trainer(tmp_path, callbacks=[swa, saliency])
    listed = list(trainer.callbacks)
    _run_before_weight_averaging(trainer)
    assert trainer.callbacks == listed


# ---------------------------------------------------------------------------------------------- test-time augmentation
class MirrorAveraged(ImageClassifier):
    """A linear classifier whose validation_step averages the logits of the image and of its mirror (two calls of
    self): the shapes are nearly symmetric, the linear weights are not, so the two predictions calibrate differently."""

    def __init__(self, returns_logits: bool) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)), lr=3e-3)
        self.returns_logits = returns_logits

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = (self(x) + self(x.flip(-1))) / 2
        self.log("val_loss", F.cross_entropy(logits, y))
        return {"logits": logits} if self.returns_logits else None


def _fit_augmented(tmp_path, returns_logits: bool):
    pl.seed_everything(3, verbose=False)
    model = MirrorAveraged(returns_logits)
    trainer = quiet_trainer(tmp_path, callbacks=[CalibrationCallback(n_bins=10)], logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=tiny_datamodule())
    said = [str(w.message) for w in caught if "times on one batch" in str(w.message)]
    return trainer, model, said


def _ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(multiclass_calibration_error(logits.softmax(dim=1), labels, num_classes=4, n_bins=10))


def test_test_time_augmentation_is_warned_once_and_returned_logits_are_calibrated_without_warning(tmp_path):
    trainer, model, said = _fit_augmented(tmp_path, returns_logits=False)
    assert len(said) == 1, "once per fit, though every batch of both epochs calls the model twice"
    assert "called the LightningModule 2 times" in said[0] and "return {'logits'" in said[0]
    mirrored, labels = _validation_logits(model, lambda m, x: m(x.flip(-1)))
    averaged, _ = _validation_logits(model, lambda m, x: (m(x) + m(x.flip(-1))) / 2)
    assert abs(_ece(mirrored, labels) - _ece(averaged, labels)) > 0.01, "the two predictions calibrate differently"
    logged = float(trainer.callback_metrics["interp_calibration/ece"])
    assert logged == pytest.approx(_ece(mirrored, labels), abs=1e-5), "what the warning says: the last call"

    trainer, model, said = _fit_augmented(tmp_path, returns_logits=True)
    assert said == []
    averaged, labels = _validation_logits(model, lambda m, x: (m(x) + m(x.flip(-1))) / 2)
    assert float(trainer.callback_metrics["interp_calibration/ece"]) == pytest.approx(_ece(averaged, labels), abs=1e-5)
    accuracy = float((averaged.argmax(dim=1) == labels).float().mean())
    assert float(trainer.callback_metrics["interp_calibration/accuracy"]) == pytest.approx(accuracy, abs=1e-6)


# ---------------------------------------------------------------------------------------------- a validation stream
class LabelledStream(IterableDataset):
    def __init__(self, count: int = 64) -> None:
        self.images = torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        self.labels = torch.arange(count) % 4

    def __iter__(self):
        return iter(zip(self.images, self.labels, strict=True))


def _fit_on_stream(tmp_path, callbacks, logger=False):
    pl.seed_everything(11, verbose=False)
    model = tiny_classifier()
    start = copy.deepcopy(model.state_dict())
    datamodule = tiny_datamodule()
    datamodule.setup("fit")
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=logger, deterministic=True)
    # the sanity check sees 2 batches of 8 samples, too few to draw 8 probe samples from (the pool is 8 times that):
    # the probe comes at the end of the first validation, after training began
    trainer.fit(model, datamodule.train_dataloader(), DataLoader(LabelledStream(), batch_size=8))
    return model, start, torch.get_rng_state()


def _cka_reference(similarity: RepresentationSimilarityCallback, start: dict, now: dict) -> list[float]:
    """Per layer, the debiased linear CKA of the probe's features under the ``start`` and ``now`` weights."""

    def grams(state: dict) -> torch.Tensor:
        features = capture_features(
            _loaded(state), similarity.probe.inputs, similarity.layers, max_features=similarity.max_features
        )
        return normalized_grams(features, debiased=True)

    return (grams(now) * grams(start)).sum(dim=1).tolist()


def test_cka_vs_start_is_logged_with_a_stream_probe_drawn_after_training_began(tmp_path):
    similarity = RepresentationSimilarityCallback(num_samples=8, metrics=("cka",))
    logger = TensorBoardLogger(str(tmp_path), name="run")
    with lightning_info() as said:
        model, start, rng = _fit_on_stream(tmp_path, [similarity], logger)
    assert any("a CPU copy of the start weights" in message for message in said)
    assert similarity._start_weights is None, "the copy is dropped once the start features are taken"
    events = read_events(logger.log_dir)
    expected = _cka_reference(similarity, start, model.state_dict())
    assert min(expected) < 0.999, "training moved some layer: the value tells the start weights from the final ones"
    for layer, value in zip(similarity.layers, expected, strict=True):
        logged = events.scalars[f"interp_similarity/{layer}/cka_vs_start"]
        assert [step for step, _ in logged] == [3, 7], "from the first validation on, as with an indexable dataset"
        assert logged[-1][1] == pytest.approx(value, abs=1e-4), layer

    # and training is unchanged: the same weights and random state as without the callback
    plain, _, plain_rng = _fit_on_stream(tmp_path / "plain", [])
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(rng, plain_rng)


class StartKept(Callback):
    """Whether the similarity callback still holds the start weights copy, and has its start Gram matrices, at each
    train epoch end (after that epoch's validation)."""

    def __init__(self, similarity: RepresentationSimilarityCallback) -> None:
        self.similarity = similarity
        self.seen: list[tuple[bool, bool]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seen.append((self.similarity._start_weights is not None, self.similarity._start_grams is not None))


def test_a_stream_probe_drawn_at_an_epoch_not_due_takes_the_start_features_then_and_drops_the_copy(tmp_path):
    similarity = RepresentationSimilarityCallback(num_samples=8, metrics=("cka",), every_n_epochs=2)
    spy = StartKept(similarity)
    model, start, _ = _fit_on_stream(tmp_path, [similarity, spy])
    assert spy.seen == [(False, True), (False, True)], "taken at the first validation, not kept until the second"
    expected = _cka_reference(similarity, start, model.state_dict())
    for layer, value in zip(similarity.layers, expected, strict=True):
        logged = float(model.trainer.callback_metrics[f"interp_similarity/{layer}/cka_vs_start"])
        assert logged == pytest.approx(value, abs=1e-4), layer
