"""The grouped options: DataDescription (given once, shared by the run's callbacks) and Display."""

from __future__ import annotations

import warnings

import pytest

from lightning_interp import DataDescription, DatasetBiasCallback, Display, GradCAMCallback, SaliencyCallback
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

NAMES = ["disc", "square", "triangle", "cross"]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"vocabulary": ["a"], "decode": str}, ValueError, "not both"),
        ({"pad_id": -1}, ValueError, "pad_id must be"),
        ({"pad_id": True}, ValueError, "pad_id must be"),
        ({"class_names": "abcd"}, ValueError, "list of strings"),
        ({"feature_names": [1, 2]}, ValueError, "list of strings"),
        ({"batch_parser": "first"}, TypeError, "batch_parser must be callable"),
    ],
)
def test_a_data_description_refuses_what_cannot_work(options, error, message):
    with pytest.raises(error, match=message):
        DataDescription(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cmap": "no-such-map"}, "colormap"),
        ({"evolution_samples": -1}, "evolution_samples must be"),
        ({"rows_per_image": 0}, "rows_per_image must be"),
    ],
)
def test_a_display_refuses_what_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        Display(**options)


def test_callbacks_refuse_other_objects_in_their_place():
    with pytest.raises(TypeError, match="data must be a DataDescription"):
        SaliencyCallback(data={"class_names": NAMES})
    with pytest.raises(TypeError, match="display must be a Display"):
        SaliencyCallback(display={"cmap": "magma"})


def test_a_description_given_to_one_callback_serves_the_others(tmp_path):
    described = SaliencyCallback(num_samples=4, data=DataDescription(class_names=NAMES))
    bias, cam = DatasetBiasCallback(), GradCAMCallback(num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[described, bias, cam], logger=False, max_epochs=1)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert bias.class_names == cam.class_names == tuple(NAMES)
    recalls = {key for key in trainer.callback_metrics if key.endswith("/recall")}
    assert recalls and all(key.split("/")[1] in NAMES for key in recalls)  # tags by name, not index


def test_different_descriptions_are_kept_apart_and_one_without_is_told(tmp_path):
    first = SaliencyCallback(num_samples=4, data=DataDescription(class_names=NAMES))
    second = GradCAMCallback(num_samples=4, data=DataDescription(class_names=list("abcd")))
    bare = DatasetBiasCallback()
    trainer = quiet_trainer(tmp_path, callbacks=[first, second, bare], logger=False, max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert first.class_names == tuple(NAMES) and second.class_names == tuple("abcd")
    assert bare.class_names is None
    assert any("were given different ones" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("make", "hint"),
    [
        (lambda: SaliencyCallback(class_names=NAMES), r"data=DataDescription\(class_names=\.\.\.\)"),
        (lambda: GradCAMCallback(rows_per_image=2), r"display=Display\(rows_per_image=\.\.\.\)"),
        (lambda: SaliencyCallback(ig_steps=8), r'methods=\{\.\.\., "integrated_gradients": \{"n_steps": \.\.\.\}\}'),
        (lambda: DatasetBiasCallback(attribution="grad_cam"), r"methods=<the method's name>"),
        (lambda: _callback("UncertaintyCallback", n_samples=8), r"passes=\.\.\."),
        (lambda: _callback("ExplanationQualityCallback", steps=4), r'metrics=\{"deletion": \{"steps"'),
        (lambda: _callback("ConceptCallback", {"c": None}, "net.4", n_random=2), r"test=TCAVTest\(n_random=\.\.\.\)"),
        (lambda: _callback("FeatureVisualizationCallback", octaves=2), r"image=ImageOptions\(octaves=\.\.\.\)"),
    ],
)
def test_an_argument_of_0_1_says_what_to_write_instead(make, hint):
    with pytest.raises(TypeError, match=r"moved in lightning-interp 0\.2: write " + hint):
        make()


def _callback(name: str, *args, **kwargs):
    import lightning_interp

    return getattr(lightning_interp, name)(*args, **kwargs)


def test_a_callback_still_taking_a_name_is_not_refused():
    from lightning_interp import FeatureVisualizationCallback, LinearProbeCallback

    assert FeatureVisualizationCallback(steps=4).steps == 4  # steps moved only for ExplanationQualityCallback
    assert LinearProbeCallback(l2=0.5, test_fraction=0.25).l2 == 0.5  # l2 moved only for ConceptCallback


def test_display_fields_a_callback_does_not_use_are_warned_about():
    from lightning_interp import LinearProbeCallback

    with pytest.warns(UserWarning, match=r"LinearProbeCallback does not use Display\(cmap=\.\.\., rows_per_image"):
        LinearProbeCallback(display=Display(cmap="magma", rows_per_image=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SaliencyCallback(display=Display(cmap="magma", rows_per_image=2, evolution_samples=1))
        LinearProbeCallback(display=Display(background_drawing=False))


def test_seeds_are_checked_at_construction():
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        SaliencyCallback(seed=1.5)
