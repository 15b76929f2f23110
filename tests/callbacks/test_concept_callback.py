"""ConceptCallback in a real Trainer: TensorBoard scalars and figure, concept forms, checkpoint state, errors,
non-interference."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_interp import DataDescription, Display
from lightning_interp.callbacks.concept import CAVOptions, ConceptCallback, TCAVTest
from lightning_interp.synthetic import make_shapes
from tests.conftest import (
    assert_training_identical,
    quiet_trainer,
    read_events,
    tiny_classifier,
    tiny_datamodule,
    train_with,
)

LAYER = "net.7"  # the last ReLU of shapes_cnn (before global pooling)


def _concept_images(label: int, count: int = 12, seed: int = 5) -> torch.Tensor:
    images, labels, _ = make_shapes(8 * count, image_size=16, seed=seed)
    return images[labels == label][:count]


class _ImagesOnly(Dataset):
    """Items are bare tensors (no label)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _callback(**overrides) -> ConceptCallback:
    options = {
        "concepts": {
            "disc": _concept_images(0),  # a tensor
            "square": _ImagesOnly(_concept_images(1)),  # a Dataset of bare tensors
            "cross": DataLoader(TensorDataset(_concept_images(3), torch.zeros(12)), batch_size=5),  # (x, y) batches
        },
        "layers": [LAYER],
        "num_samples": 32,
        "test": TCAVTest(n_random=3),
        "cav": CAVOptions(min_accuracy=0.0),  # a barely trained network: score every concept, so every tag appears
        "display": Display(background_drawing=False),
    }
    options.update(overrides)
    return ConceptCallback(**options)


def test_scalars_and_figure_logged_at_each_validation_with_tensor_dataset_and_loader_concepts(tmp_path):
    callback = _callback()
    assert {name: tuple(x.shape) for name, x in callback.concepts.items()} == {
        "disc": (12, 3, 16, 16),
        "square": (12, 3, 16, 16),
        "cross": (12, 3, 16, 16),
    }
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, logger=logger, callbacks=[callback])
    pl.seed_everything(0, verbose=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    events = read_events(logger.log_dir)
    expected_steps = [3, 7]  # 4 steps per epoch; at the step of val_loss of the same validation
    classes = sorted({int(k) for k in callback.probe.labels.tolist()})
    assert classes == [0, 1, 2, 3]
    for concept in ("disc", "square", "cross"):
        base = f"interp_tcav/{concept}/{LAYER}"
        assert events.scalar_steps(f"{base}/cav_accuracy") == expected_steps
        for k in classes:
            assert events.scalar_steps(f"{base}/{k}/tcav") == expected_steps
            assert events.scalar_steps(f"{base}/{k}/p_value") == expected_steps
            assert all(0.0 <= value <= 1.0 for _, value in events.scalars[f"{base}/{k}/tcav"])
            assert all(0.0 <= value <= 1.0 for _, value in events.scalars[f"{base}/{k}/p_value"])
    assert events.image_steps("interp_tcav/scores") == expected_steps
    (height, width) = {size for _, size in events.images["interp_tcav/scores"]}.pop()
    assert height >= 200 and width >= 300
    assert not any(math.isnan(value) for values in events.scalars.values() for _, value in values)

    # trainer.validate() runs under inference_mode: the gradients are still there
    trainer.validate(trainer.lightning_module, datamodule=tiny_datamodule(), verbose=False)
    assert f"interp_tcav/disc/{LAYER}/0/tcav" in trainer.callback_metrics


def test_class_names_replace_the_class_indices_in_the_tags(tmp_path):
    names = ["disc", "square", "triangle", "cross"]
    callback = _callback(concepts={"stripes": _concept_images(1)}, data=DataDescription(class_names=names))
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, logger=logger, callbacks=[callback], max_epochs=1)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    tags = {tag for tag in read_events(logger.log_dir).scalars if tag.endswith(("/tcav", "/p_value"))}
    assert tags == {f"interp_tcav/stripes/{LAYER}/{name}/{kind}" for name in names for kind in ("tcav", "p_value")}


def test_a_concept_no_better_than_chance_logs_only_its_accuracy_and_warns(tmp_path):
    mixed = make_shapes(12, image_size=16, seed=21)[0]  # like the random examples: the CAV cannot be perfect
    callback = _callback(cav=CAVOptions(min_accuracy=1.0), concepts={"disc": mixed})
    trainer = quiet_trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=[callback])
    with pytest.warns(UserWarning, match="no better than chance"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    events = read_events(trainer.logger.log_dir)
    assert events.scalar_steps(f"interp_tcav/disc/{LAYER}/cav_accuracy") == [3, 7]
    assert not [tag for tag in events.scalars if tag.endswith(("/tcav", "/p_value"))]
    assert events.image_steps("interp_tcav/scores") == [3, 7]


@pytest.mark.parametrize(("layer", "warns"), [("net.7", True), ("net.4", False)])
def test_a_layer_followed_only_by_linear_operations_is_warned_about(tmp_path, layer, warns):
    """After net.7 (the last ReLU) come average pooling and a linear head: the class gradient is one vector for all
    samples, so TCAV can only score 0 or 1; net.4 has a convolution and a ReLU after it."""
    callback = _callback(layers=[layer])
    trainer = quiet_trainer(tmp_path, callbacks=[callback], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    messages = [str(w.message) for w in caught if "linear operations alone" in str(w.message)]
    assert len(messages) == (1 if warns else 0), messages
    if warns:
        assert repr(layer) in messages[0]
        scores = [v for k, v in trainer.callback_metrics.items() if k.endswith("/tcav")]
        assert scores and all(
            abs(3 * float(v) - round(3 * float(v))) < 1e-4 for v in scores
        )  # means of n_random=3 zeros/ones


def test_concept_examples_and_random_sets_survive_a_checkpoint_resume(tmp_path):
    first = _callback(concepts={"disc": _concept_images(0)})
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = quiet_trainer(
        tmp_path, logger=False, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    saved_sets = first._random_sets.clone()
    # 2 * n_random sets; 12 concept examples, but a 32-sample pool holds only 6 disjoint sets of 5
    assert saved_sets.shape == (6, 5)
    assert saved_sets.unique().numel() == 30, "the random sets must not overlap"

    # a new callback given other examples under the same name: the checkpoint's examples win
    second = _callback(concepts={"disc": _concept_images(0, seed=11)})
    assert not torch.equal(second.concepts["disc"], first.concepts["disc"])
    trainer = quiet_trainer(tmp_path, logger=False, max_epochs=2, callbacks=[second], enable_checkpointing=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(), ckpt_path=checkpoint.last_model_path)
    assert torch.equal(second.concepts["disc"], first.concepts["disc"])
    assert torch.equal(second._random_sets, saved_sets)
    assert second._runs == 2

    # the state dict alone, through torch.save / torch.load, with keys missing
    state = torch.load(checkpoint.last_model_path, weights_only=False)["callbacks"]
    (key,) = [k for k in state if k.startswith("ConceptCallback")]
    third = _callback(concepts={"disc": _concept_images(0, seed=12)})
    third.load_state_dict({"concepts": state[key]["concepts"]})  # no probe, runs or random sets: tolerated
    assert torch.equal(third.concepts["disc"], first.concepts["disc"])
    assert third._random_sets is None and third._runs == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"layers": ["net.77"]}, "not a sub-module", id="unknown-layer"),
        pytest.param({"concepts": {"disc": torch.rand(12, 3, 8, 8)}}, r"shape \(3, 8, 8\)", id="concept-shape"),
        pytest.param({"random_examples": torch.rand(12, 1, 16, 16)}, "random_examples", id="random-shape"),
        pytest.param({"targets": [1, 9]}, r"target\(s\) \[9\] out of range", id="target-out-of-range"),
        pytest.param(
            {"test": TCAVTest(n_random=4)}, r"8 disjoint random sets .* holds 32: it needs 40", id="pool-too-small"
        ),
        pytest.param(
            {"test": TCAVTest(n_random=3, random_set_size=6)},
            r"of 6 examples .* holds 32: it needs 36",
            id="sets-too-large",
        ),
        pytest.param(
            {"concepts": {"disc": (255 * _concept_images(0)).to(torch.uint8)}}, "are torch.uint8", id="uint8-concept"
        ),
    ],
)
def test_bad_inputs_are_refused_before_training(tmp_path, options, message):
    callback = _callback(**options)
    model = tiny_classifier()
    steps = []
    model.on_train_batch_start = lambda *args: steps.append(1)
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[callback])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert not steps


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"concepts": {}}, "at least one concept", id="empty"),
        pytest.param({"concepts": {"a": torch.rand(1, 3, 16, 16)}}, "at least 2 examples", id="one-example"),
        pytest.param({"concepts": {"a/b": torch.rand(4, 3, 16, 16)}}, "without '/'", id="bad-name"),
        pytest.param({"concepts": {"a": [1, 2]}}, "must be an", id="not-examples"),
        pytest.param({"layers": "auto"}, "explicit layer names", id="auto"),
        pytest.param({"targets": [-1]}, "targets", id="negative-target"),
        pytest.param({"max_examples": 1}, "max_examples must be an int >= 2", id="max-examples"),
        pytest.param({"test": {"n_random": 3}}, r"test must be a TCAVTest .* test=TCAVTest\(", id="test-a-dict"),
        pytest.param({"cav": 0.6}, r"cav must be a CAVOptions .* cav=CAVOptions\(", id="cav-a-number"),
    ],
)
def test_bad_arguments_are_refused_at_construction(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _callback(**options)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda: TCAVTest(n_random=1), r"TCAVTest\(n_random=...\) must be an int >= 2", id="n-random"),
        pytest.param(lambda: TCAVTest(n_random=True), r"n_random=...\) must be an int", id="n-random-bool"),
        pytest.param(lambda: TCAVTest(random_set_size=4), r"random_set_size=...\) must be None .* int >= 5", id="size"),
        pytest.param(lambda: TCAVTest(random_set_size=8.0), r"random_set_size", id="size-float"),
        pytest.param(lambda: TCAVTest(alpha=0.0), r"TCAVTest\(alpha=...\) .* strictly between 0 and 1", id="alpha-0"),
        pytest.param(lambda: TCAVTest(alpha=1.5), r"alpha", id="alpha-above-1"),
        pytest.param(lambda: TCAVTest(alpha="0.05"), r"alpha", id="alpha-a-string"),
        pytest.param(lambda: TCAVTest(equal_var="welch"), r"True \(Student's t-test\) or False", id="equal-var"),
        pytest.param(lambda: CAVOptions(test_fraction=1.0), r"CAVOptions\(test_fraction=...\)", id="fraction-1"),
        pytest.param(lambda: CAVOptions(test_fraction=0), r"strictly between 0 and 1", id="fraction-0"),
        pytest.param(lambda: CAVOptions(l2=-1.0), r"CAVOptions\(l2=...\) .* finite number >= 0", id="l2-negative"),
        pytest.param(lambda: CAVOptions(l2=float("inf")), r"l2", id="l2-inf"),
        pytest.param(lambda: CAVOptions(min_accuracy=1.2), r"min_accuracy=...\) .* in \[0, 1\]", id="min-accuracy"),
        pytest.param(lambda: CAVOptions(min_accuracy=float("nan")), r"min_accuracy", id="min-accuracy-nan"),
    ],
)
def test_the_option_groups_refuse_bad_values_saying_what_to_give(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_the_option_groups_default_to_the_documented_values_and_are_frozen():
    callback = ConceptCallback({"disc": _concept_images(0)}, layers=[LAYER])
    assert callback.cav == CAVOptions(test_fraction=1 / 3, l2=1e-2, min_accuracy=0.6)
    assert callback.test == TCAVTest(n_random=10, random_set_size=None, alpha=0.05, equal_var=True)
    assert _callback().test.n_random == 3 and _callback().cav.min_accuracy == 0.0
    with pytest.raises(AttributeError):
        callback.test.n_random = 2  # type: ignore[misc]


def test_the_forward_chunk_is_chosen_for_the_model_and_device(tmp_path):
    """No batch_size option: the forward passes take forward_chunk_size samples, the gradient pass a quarter."""
    callback = _callback(concepts={"disc": _concept_images(0)})
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert callback._chunk == 256 and callback._gradient_chunk == 64  # tiny_classifier, 16 x 16, on the CPU


def test_bf16_autocast_run_logs_finite_scores(tmp_path):
    callback = _callback(concepts={"disc": _concept_images(0)})
    trainer = quiet_trainer(
        tmp_path, logger=TensorBoardLogger(str(tmp_path), name="run"), precision="bf16-mixed", max_epochs=1
    )
    trainer.callbacks.append(callback)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    values = read_events(trainer.logger.log_dir).scalars
    tcav = [value for tag, series in values.items() if tag.endswith("/tcav") for _, value in series]
    assert len(tcav) == 4 and all(0 <= value <= 1 for value in tcav)


# ---------------------------------------------------------------------------------------------------- non-interference
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain = train_with(tmp_path / "plain", [])
    callback = ConceptCallback(
        {"disc": _concept_images(0), "cross": DataLoader(_ImagesOnly(_concept_images(3)), batch_size=4, shuffle=True)},
        layers=["net.features.2", "net.features.5"],  # an in-place ReLU after BatchNorm, and the last conv block
        num_samples=32,
        test=TCAVTest(n_random=2),
        cav=CAVOptions(min_accuracy=0.0),
    )
    other = train_with(tmp_path / "with", [callback])
    assert callback._runs == 2
    assert_training_identical(plain, other)


class _AugmentedImages(Dataset):
    """Items drawn with the global RNG, as random augmentations are."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3, 16, 16)


def test_reading_a_dataset_concept_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    callback = _callback(concepts={"augmented": _AugmentedImages()})
    assert callback.concepts["augmented"].shape == (12, 3, 16, 16)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_layer_with_zero_gradient_is_warned_about(tmp_path):
    """A head that ignores its input (weights 0): every class gradient at net.4 is zero."""
    model = tiny_classifier()
    with torch.no_grad():
        model.net[-1].weight.zero_()
    model.net[-1].weight.requires_grad_(False)
    callback = _callback(layers=["net.4"])
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match="is zero for every probe sample"):
        trainer.fit(model, datamodule=tiny_datamodule())
