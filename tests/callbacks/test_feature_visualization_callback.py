"""FeatureVisualizationCallback in a real Trainer: what it logs, when, errors before training, non-interference."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import DataDescription, Display
from lightning_interp.callbacks.feature_visualization import VALUE_RANGES, FeatureVisualizationCallback, ImageOptions
from lightning_interp.methods.representation.feature_visualization import GeneratorCode, feature_visualization
from tests.conftest import (
    assert_training_identical,
    quiet_trainer,
    read_events,
    tiny_classifier,
    tiny_datamodule,
    train_with,
)

TAG = "interp_featvis/features"


def _callback(**options) -> FeatureVisualizationCallback:
    options = {"steps": 4, "every_n_epochs": 1, "num_samples": 8, **options}
    return FeatureVisualizationCallback(**options)


def test_logs_the_grid_and_objectives_at_each_validation_epoch(tmp_path):
    callback = _callback(targets=[("class", 0), "net.3:1", "net.3:1:2:2", "net.4"], num_images=2)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=TensorBoardLogger(str(tmp_path), name="tb"))
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())  # 64 samples / 16 per batch: 4 steps an epoch
    events = read_events(str(tmp_path))
    assert events.image_steps(TAG) == [3, 7]
    sizes = {size for _, size in events.images[TAG]}
    assert len(sizes) == 1, "the grid keeps one size from epoch to epoch"
    for label in ("class:0", "net.3:1", "net.3:1:2:2", "net.4"):
        assert events.scalar_steps(f"interp_featvis/{label}/objective") == [3, 7]
    assert "interp_featvis/class:0/objective" in trainer.callback_metrics


def test_classes_by_default_and_dream_mode_under_validate(tmp_path):
    model = tiny_classifier()
    trainer = quiet_trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path), name="tb"))
    optimize = _callback()  # targets="classes": every output logit
    dream = _callback(targets=["net.4", "net.3:0"], mode="dream", num_images=2, name="dream")
    trainer.callbacks.extend([optimize, dream])
    trainer.validate(model, datamodule=tiny_datamodule(), verbose=False)  # runs under torch.inference_mode()
    assert [target.label for target in optimize.targets] == [f"class:{k}" for k in range(4)]
    events = read_events(str(tmp_path))
    assert events.image_steps(TAG) == [0] and events.image_steps("interp_dream/dream") == [0]
    for k in range(4):
        assert events.scalar_steps(f"interp_featvis/class:{k}/objective") == [0]
    assert events.scalar_steps("interp_dream/net.4/objective") == [0]


def test_the_same_images_every_run_of_an_unchanged_model(tmp_path):
    model = tiny_classifier()
    callback = _callback(targets=[("class", 1)], display=Display(background_drawing=False))
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[callback])
    datamodule = tiny_datamodule()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    first = float(trainer.callback_metrics["interp_featvis/class:1/objective"])
    trainer.validate(model, datamodule=datamodule, verbose=False)
    assert float(trainer.callback_metrics["interp_featvis/class:1/objective"]) == first


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("net.99:0", "net.99"),
        ("net.0:4", "channel 4 is out of range"),  # tiny_classifier's first conv has 4 channels
        ("net.0:1:16:0", "y < H"),
        (("class", 4), "class index 4 is out of range, the model has 4 outputs"),
    ],
)
def test_bad_targets_raise_before_training(tmp_path, target, message):
    model = tiny_classifier()
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[_callback(targets=[target])])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targets": ["net.3:-1"]}, "must be >= 0"),
        ({"targets": ["net.3:x"]}, "must be an integer"),
        ({"targets": [("klass", 2)]}, "tuple target must be"),
        ({"targets": []}, "targets is empty"),
        ({"targets": ["net.3:1", "net.3:1"]}, "twice"),
        ({"mode": "dreams"}, "mode must be one of"),
        ({"steps": 0}, "steps must be a positive int"),
    ],
)
def test_arguments_checked_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        FeatureVisualizationCallback(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"value_range": "minmax"}, r"ImageOptions\(value_range=...\) must be one of \('probe', 'probe_std'\)"),
        ({"parameterization": "fft"}, r"ImageOptions\(parameterization=...\) must be one of \('fourier', 'pixel'\)"),
        ({"octaves": 0}, r"ImageOptions\(octaves=...\) must be a positive int .* 1 for models"),
        ({"octaves": 2.0}, r"octaves=...\) must be a positive int"),
        ({"octave_scale": 0.5}, r"ImageOptions\(octave_scale=...\) .* finite number >= 1"),
        ({"octave_scale": float("inf")}, r"octave_scale"),
        ({"decorrelate": "yes"}, r"ImageOptions\(decorrelate=...\) must be True or False"),
        ({"transforms": 1}, r"ImageOptions\(transforms=...\) must be True or False"),
        ({"value_range": (0.0, 1.0, 2.0)}, r"a \(low, high\) pair, each .* e\.g\. \(0\.0, 1\.0\)"),
    ],
)
def test_image_options_checked_at_construction_saying_what_to_give(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ImageOptions(**options)


def test_image_options_defaults_and_yaml_lists_become_tuples():
    callback = FeatureVisualizationCallback(targets="net.3:1")
    assert callback.image == ImageOptions(
        parameterization="fourier", decorrelate=True, value_range="probe", transforms=True, octaves=3, octave_scale=1.4
    )
    options = ImageOptions(value_range=[0.0, [1.0, 1.0, 1.0]])  # as jsonargparse gives a YAML list
    assert options.value_range == (0.0, (1.0, 1.0, 1.0))
    assert hash(options) == hash(ImageOptions(value_range=(0.0, (1.0, 1.0, 1.0))))
    with pytest.raises(AttributeError):
        options.octaves = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"image must be an ImageOptions .* image=ImageOptions\("):
        FeatureVisualizationCallback(image={"octaves": 1})


def test_image_option_literals_list_what_the_checks_accept():
    """LightningCLI checks a Literal before training: each must list exactly the values the code accepts."""
    import typing

    from lightning_interp.methods.representation.feature_visualization import PARAMETERIZATIONS

    hints = typing.get_type_hints(ImageOptions)
    (literal,) = [
        part for part in typing.get_args(hints["parameterization"]) if typing.get_origin(part) is typing.Literal
    ]
    assert typing.get_args(literal) == PARAMETERIZATIONS  # or a GeneratorCode
    (literal,) = [part for part in typing.get_args(hints["value_range"]) if typing.get_origin(part) is typing.Literal]
    assert typing.get_args(literal) == VALUE_RANGES


def test_defaults_and_state():
    callback = FeatureVisualizationCallback(targets="net.3:1")
    assert callback.every_n_epochs == 5 and callback.steps == 128 and callback.num_images == 1
    state = callback.state_dict()
    other = FeatureVisualizationCallback(targets="net.3:1", seed=7)
    other.load_state_dict({})  # keys added later or missing: tolerated
    assert other.seed == 7
    other.load_state_dict(state)
    assert other.seed == 7  # the seed is configuration: a resume with a new seed uses it


def test_training_is_bit_identical_with_the_callback(tmp_path):
    plain = train_with(tmp_path / "plain", [])
    callbacks = [
        _callback(targets=["net.features.4:2", "net.features.1", ("class", 1)], num_images=2),
        _callback(targets=["net.features.4"], mode="dream", name="dream"),
    ]
    other = train_with(tmp_path / "with", callbacks)
    assert all(callback._runs == 2 for callback in callbacks), "the callbacks must actually have run"
    assert_training_identical(plain, other)


def test_bf16_mixed_precision(tmp_path):
    callback = _callback(targets=[("class", 0), "net.3:1"])
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[callback], precision="bf16-mixed", max_epochs=1)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    value = trainer.callback_metrics["interp_featvis/net.3:1/objective"]
    assert torch.isfinite(value)


def test_evolution_strip_at_fit_end_shows_each_target_over_the_runs_and_is_bounded(tmp_path):
    def fit(columns: int, epochs: int, directory: str) -> tuple[FeatureVisualizationCallback, object]:
        callback = _callback(
            targets=["class:0", "class:2"],
            data=DataDescription(class_names=list("abcd")),
            display=Display(evolution_columns=columns),
        )
        logger = TensorBoardLogger(str(tmp_path), name=directory)
        trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=epochs)
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
        return callback, read_events(logger.log_dir)

    _, wide_events = fit(columns=10, epochs=3, directory="wide")
    narrow, narrow_events = fit(columns=2, epochs=5, directory="narrow")
    # one strip, logged once, at the last run's step; 3 runs shown in the first, 2 (of 5) in the second
    assert wide_events.image_steps("interp_featvis/evolution") == [11]
    assert narrow_events.image_steps("interp_featvis/evolution") == [19]
    ((_, (_, wide_w)),) = wide_events.images["interp_featvis/evolution"]
    ((_, (_, narrow_w)),) = narrow_events.images["interp_featvis/evolution"]
    assert wide_w > narrow_w  # fewer columns
    assert len(narrow._history) <= 4 and narrow._history[-1][0] == 4  # bounded, the last run kept
    assert [narrow._row_name(t) for t in narrow.targets] == ["a", "c"]  # class names in the rows, not class:k
    objectives = sorted(tag for tag in wide_events.scalars if tag.endswith("/objective"))
    assert objectives == ["interp_featvis/class:a/objective", "interp_featvis/class:c/objective"]  # and in the tags
    assert narrow_events.scalar_steps("interp_featvis/class:c/objective")  # the name, not class:2

    state = narrow.state_dict()
    resumed = _callback(targets=["class:0", "class:2"])
    resumed.load_state_dict(state)
    assert [epoch for epoch, _ in resumed._history] == [epoch for epoch, _ in narrow._history]
    assert torch.equal(resumed._history[-1][1], narrow._history[-1][1])


@pytest.mark.parametrize(
    ("value_range", "message"),
    [
        (([0, 0], [1, 1]), "2 values; give one float or one value per channel"),
        (("a", "b"), "each a number or one number per channel"),
        ((0.5,), "a \\(low, high\\) pair"),
    ],
)
def test_explicit_value_ranges_are_checked_with_a_clear_message(tmp_path, value_range, message):
    def fit() -> None:
        callback = _callback(targets=["class:0"], image=ImageOptions(value_range=value_range))
        trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())

    with pytest.raises(ValueError, match=message):
        fit()


def test_a_dead_channel_is_warned_about_not_drawn_as_if_it_were_its_picture():
    """Channel 1 of a ReLU after a convolution with weight 0 and bias -1 is 0 on every image: no gradient."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        net[0].weight[1].zero_()
        net[0].bias[1] = -1.0
    with pytest.warns(UserWarning, match=r"\['1:1'\] got no gradient at any step"):
        dead = feature_visualization(net, ["1:1"], image_shape=(3, 16, 16), steps=8)
    assert dead.history.abs().max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a live channel: no warning
        live = feature_visualization(net, ["1:0"], image_shape=(3, 16, 16), steps=8)
    assert live.history[-1].mean() > live.history[0].mean()


def _image_generator() -> torch.nn.Module:
    """A small generator of the tiny data's (3, 16, 16) images in [0, 1], with a Dropout and a BatchNorm."""
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 3 * 16 * 16), torch.nn.Sigmoid(), torch.nn.Unflatten(1, (3, 16, 16)),
    ).train()  # fmt: skip


def test_a_generators_code_space_leaves_training_and_the_generator_untouched(tmp_path):
    generator = _image_generator()
    before = {name: value.clone() for name, value in generator.state_dict().items()}
    plain = train_with(tmp_path / "plain", [])
    code = GeneratorCode(generator, code_shape=8, l2=0.01, clip=(-3.0, 3.0))
    callback = _callback(
        targets=["net.features.4:2", ("class", 1)], num_images=2, image=ImageOptions(parameterization=code)
    )
    other = train_with(tmp_path / "with", [callback])
    assert callback._runs == 2, "the callback must actually have run"
    assert_training_identical(plain, other)
    for name, value in generator.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None and p.requires_grad for p in generator.parameters())
    assert all(module.training for module in generator.modules())
    assert callback._history and callback._history[-1][1].shape == (2, 3, 16, 16)


def test_code_space_images_equal_the_functional_api_and_dream_mode_is_refused(tmp_path):
    code = GeneratorCode(_image_generator(), code_shape=8)
    callback = _callback(targets=["class:0"], num_images=2, image=ImageOptions(parameterization=code))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=TensorBoardLogger(str(tmp_path), name="tb"))
    model = tiny_classifier()
    trainer.fit(model, datamodule=tiny_datamodule())
    assert read_events(str(tmp_path)).image_steps(TAG) == [3, 7]
    low, high = callback._range
    expected = feature_visualization(
        model, ["class:0"], image_shape=(3, 16, 16), steps=4, num_images=2, parameterization=code,
        value_range=(low, high), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.testing.assert_close(callback._history[-1][1], expected.rgb[:, 0])
    with pytest.raises(ValueError, match="mode='optimize' with image=ImageOptions"):
        FeatureVisualizationCallback(mode="dream", image=ImageOptions(parameterization=code))


def test_a_generator_of_the_wrong_image_shape_is_refused_before_training(tmp_path):
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 3 * 8 * 8), torch.nn.Unflatten(1, (3, 8, 8)))
    callback = _callback(targets=["class:0"], image=ImageOptions(parameterization=GeneratorCode(wrong, 4)))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match=r"returns \(1, 3, 8, 8\) .* input shape \(1, 3, 16, 16\)"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert trainer.global_step == 0
