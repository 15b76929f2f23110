"""UncertaintyCallback in a real Trainer: MC-dropout scalars and figure read back from TensorBoard, analytic cases,
errors before training, non-interference."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_interp import DataDescription, Display, UncertaintyCallback
from lightning_interp.demo import ImageClassifier
from lightning_interp.probe import ProbeSet
from tests.conftest import (
    assert_training_identical,
    quiet_trainer,
    read_events,
    tiny_classifier,
    tiny_datamodule,
    train_with,
)


class WideDropoutNet(nn.Module):
    """A conv net whose head has strong dropout (p=0.5) on many features: the MC passes clearly disagree."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(p), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(20 * self.features(x))  # logits large enough for dropped features to matter


def test_scalars_per_class_and_the_figure_are_logged_at_each_validation(tmp_path):
    callback = UncertaintyCallback(
        num_samples=32, data=DataDescription(class_names=["disc", "square", "triangle", "cross"])
    )
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger)
    pl.seed_everything(0, verbose=False)
    trainer.fit(ImageClassifier(WideDropoutNet(), lr=1e-2), datamodule=tiny_datamodule())
    events = read_events(logger.log_dir)
    steps = [3, 7]  # 4 steps per epoch; at the step of val_loss of the same validation
    for what in ("predictive_entropy", "expected_entropy", "mutual_information"):
        assert events.scalar_steps(f"interp_uncertainty/{what}") == steps
    for name in ("disc", "square", "triangle", "cross"):
        assert events.scalar_steps(f"interp_uncertainty/{name}/mutual_information") == steps
    assert events.image_steps("interp_uncertainty/most_uncertain") == steps
    total = [v for _, v in events.scalars["interp_uncertainty/predictive_entropy"]]
    aleatoric = [v for _, v in events.scalars["interp_uncertainty/expected_entropy"]]
    epistemic = [v for _, v in events.scalars["interp_uncertainty/mutual_information"]]
    for t, a, e in zip(total, aleatoric, epistemic, strict=True):
        assert 0 < t <= math.log(4) + 1e-6  # at most log K nats for four classes
        assert e > 1e-4, "dropout p=0.5 over 64 features: the passes must disagree"
        assert abs(t - (a + e)) < 1e-5  # the decomposition, on the means as on every sample


def test_the_numbers_equal_a_hand_computation_from_the_same_dropout_masks(tmp_path):
    """Two validate() calls on an unchanged model agree (the callback's generator is seeded afresh each run) and the
    logged mean MI equals the one computed by hand from passes with the same seed."""
    from lightning_interp.methods.evaluation.uncertainty import mc_dropout_predictions

    model = ImageClassifier(WideDropoutNet(), lr=1e-2)
    inputs = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    probe = ProbeSet(inputs, torch.arange(12) % 4)
    callback = UncertaintyCallback(passes=8, probe=probe, seed=5, display=Display(background_drawing=False))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    datamodule = tiny_datamodule()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    first = float(trainer.callback_metrics["interp_uncertainty/mutual_information"])
    trainer.validate(model, datamodule=datamodule, verbose=False)
    assert float(trainer.callback_metrics["interp_uncertainty/mutual_information"]) == pytest.approx(first, abs=0)

    probs = mc_dropout_predictions(model, inputs, 8, generator=torch.Generator().manual_seed(5))
    mean = probs.mean(dim=0)
    by_hand = (-(mean * mean.log()).sum(-1) + (probs * probs.log()).sum(-1).mean(0)).clamp_min(0).mean()
    assert first == pytest.approx(float(by_hand), rel=1e-4)


def test_dropout_with_p_zero_gives_zero_epistemic_uncertainty_and_says_why(tmp_path):
    callback = UncertaintyCallback(num_samples=16, display=Display(background_drawing=False))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match="every dropout layer has p=0"):
        trainer.fit(ImageClassifier(WideDropoutNet(p=0.0)), datamodule=tiny_datamodule())
    assert abs(float(trainer.callback_metrics["interp_uncertainty/mutual_information"])) < 1e-6  # float rounding


def test_a_model_without_dropout_is_refused_before_training(tmp_path):
    model = tiny_classifier()
    steps = []
    model.on_train_batch_start = lambda *args: steps.append(1)
    trainer = quiet_trainer(tmp_path, callbacks=[UncertaintyCallback(num_samples=8)], logger=False)
    with pytest.raises(ValueError, match="has no dropout module"):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert not steps


@pytest.mark.parametrize(
    ("options", "message"),
    [({"passes": 1}, "passes must be an int >= 2"), ({"explain_samples": 0}, "explain_samples must be a positive int")],
)
def test_bad_arguments_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        UncertaintyCallback(**options)


def test_training_is_bit_identical_with_the_callback(tmp_path):
    plain = train_with(tmp_path / "plain", [], max_epochs=2)
    callback = UncertaintyCallback(num_samples=16)
    other = train_with(tmp_path / "with", [callback], max_epochs=2)
    assert callback._runs == 2
    assert_training_identical(plain, other)  # BatchNorm statistics too


@pytest.mark.parametrize("run", ["fit", "validate"])
def test_explanation_uncertainty_of_a_method_under_mc_dropout(tmp_path, run):
    """Gradient maps under dropout p=0.5 disagree between passes; under validate() (inference mode) it works too."""
    callback = UncertaintyCallback(passes=4, num_samples=16, methods="gradient", explain_samples=3)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=1)
    model = ImageClassifier(WideDropoutNet(), lr=1e-2)
    if run == "fit":
        trainer.fit(model, datamodule=tiny_datamodule())
    else:
        trainer.validate(model, datamodule=tiny_datamodule(), verbose=False)
    agreement = float(trainer.callback_metrics["interp_uncertainty/gradient/map_agreement"])
    spread = float(trainer.callback_metrics["interp_uncertainty/gradient/map_relative_std"])
    assert -1.0 <= agreement < 0.99 and spread > 0.01
    events = read_events(logger.log_dir)
    assert len(events.image_steps("interp_uncertainty/gradient/maps")) == 1


def test_explanation_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="Unknown attribution method 'gradinet'"):
        UncertaintyCallback(methods="gradinet")
    with pytest.raises(TypeError, match=r"gradient takes no option\(s\) \['n_steps'\]"):
        UncertaintyCallback(methods={"gradient": {"n_steps": 3}})


class EvidentialNet(nn.Module):
    """A head that outputs Dirichlet evidence (softplus >= 0); no dropout anywhere."""

    def __init__(self, negative: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)
        self.negative = negative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.head(self.body(x))
        return scores if self.negative else nn.functional.softplus(scores)


def test_evidential_outputs_give_the_vacuity_of_a_hand_computation_without_dropout(tmp_path):
    inputs = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(12) % 4
    callback = UncertaintyCallback(
        output_kind="evidential", probe=ProbeSet(inputs, labels), display=Display(background_drawing=False)
    )
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=1)
    model = ImageClassifier(EvidentialNet(), lr=1e-2)
    trainer.fit(model, datamodule=tiny_datamodule())
    model.eval()
    with torch.no_grad():
        alpha = model(inputs) + 1
    vacuity = 4 / alpha.sum(dim=1)
    expected = alpha / alpha.sum(dim=1, keepdim=True)
    entropy = -(expected * expected.log()).sum(dim=1)
    metrics = trainer.callback_metrics
    assert float(metrics["interp_uncertainty/vacuity"]) == pytest.approx(float(vacuity.mean()), rel=1e-5)
    assert float(metrics["interp_uncertainty/predictive_entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert float(metrics["interp_uncertainty/1/vacuity"]) == pytest.approx(float(vacuity[labels == 1].mean()), rel=1e-5)
    assert "interp_uncertainty/mutual_information" not in metrics  # no MC dropout in this mode
    assert read_events(logger.log_dir).image_steps("interp_uncertainty/most_uncertain") == [3]


def test_an_evidential_head_with_negative_outputs_is_refused_before_training(tmp_path):
    model = ImageClassifier(EvidentialNet(negative=True))
    steps = []
    model.on_train_batch_start = lambda *args: steps.append(1)
    callback = UncertaintyCallback(output_kind="evidential", num_samples=8)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match="must be >= 0, but it has values down to"):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert not steps
    with pytest.raises(ValueError, match="output_kind must be one of"):
        UncertaintyCallback(output_kind="dirichlet")


class DictOutput(nn.Module):
    """A network whose forward returns a dict, as Hugging Face models do: read through output_transform."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = WideDropoutNet()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x)}


class DictClassifier(ImageClassifier):
    """Trains on the dict's logits; the callbacks call the network through forward_fn."""

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return torch.nn.functional.cross_entropy(self.net(x)["logits"], y)

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x)["logits"], y))


def test_explanation_uncertainty_reads_the_output_through_output_transform(tmp_path):
    callback = UncertaintyCallback(
        passes=3,
        num_samples=8,
        methods={"smoothgrad": {"n_samples": 2}, "grad_cam": None},  # the automatic layer, chosen once per fit
        output_transform=lambda output: output["logits"] if isinstance(output, dict) else output,
        forward_fn=lambda model, x: model.net(x),
        display=Display(background_drawing=False),
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    trainer.fit(DictClassifier(DictOutput(), lr=1e-2), datamodule=tiny_datamodule())
    for method in ("smoothgrad", "grad_cam"):
        agreement = float(trainer.callback_metrics[f"interp_uncertainty/{method}/map_agreement"])
        assert -1.0 <= agreement <= 1.0
    assert callback._layers["grad_cam"].startswith("net.inner")
