"""End to end: the quickstart trains, and Grad-CAM then points at the objects, not the clutter."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from lightning_interp.synthetic import SHAPE_CLASSES, SyntheticShapes
from tests.conftest import read_events

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart_learns_and_gradcam_localizes_the_objects(tmp_path, capsys):
    # --inside adds three callbacks and --quality one; by the non-interference contract the training, and so every
    # figure below, is the same as without them
    metrics = _load_quickstart().main(["--log-dir", str(tmp_path), "--inside", "--quality"])
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in printed
    # the HTML report of the run: every section, the quality comparison, nothing from the network
    (report,) = list(tmp_path.rglob("report.html"))
    assert str(report) in printed
    text = report.read_text(encoding="utf-8")
    for section in ("configuration", "summary", "curves", "pictures", "comparison"):
        assert f'id="{section}"' in text, section
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "interp_quality/comparison" in text and "Grad-CAM at net.7: localization rose" in text

    assert metrics["val_acc"] > 0.9
    # A uniform map puts on the object exactly the object's share of the image.
    validation = SyntheticShapes(512, seed=1)
    uniform = float(validation.masks.float().mean())
    assert uniform < 0.2
    deep = metrics["interp_gradcam/net.7/localization"]
    assert deep > 1.5 * uniform, (deep, uniform)
    assert metrics["interp_gradcam/net.7/pointing_game"] >= 0.75

    events = read_events(str(tmp_path))
    localization = [value for _, value in events.scalars["interp_gradcam/net.7/localization"]]
    assert localization[-1] > localization[0], "localization should improve with training"
    stability = [value for _, value in events.scalars["interp_saliency/gradient/stability"]]
    assert stability[-1] > stability[0], "maps should settle as training converges"

    # Linear probes: the deepest layers become linearly decodable as training goes on, and more so than the first.
    first, last = "interp_probe/net.0/accuracy", "interp_probe/net.10/accuracy"
    deep_probe = [value for _, value in events.scalars[last]]
    assert deep_probe[-1] > deep_probe[0] + 0.2 and deep_probe[-1] > 0.9
    assert events.scalars[last][-1][1] > events.scalars[first][-1][1] + 0.3
    # CKA to the previous epoch approaches 1 as training settles.
    settle = [value for _, value in events.scalars["interp_similarity/net.10/cka_vs_previous"]]
    assert settle[-1] > 0.97 and settle[-1] > settle[0]
    # The deepest layer's geometry follows the labels more than the first layer's does.
    assert metrics["interp_similarity/net.10/rsa_vs_labels"] > metrics["interp_similarity/net.0/rsa_vs_labels"] + 0.3

    # Inside the network (--inside): the feature visualisation of every class reaches a higher logit on the trained
    # model than on the first epoch's, the strip shows them all at fit end; stripes are a texture a layer separates
    # from the data almost perfectly, discs at random positions are not, and the callback says so by not scoring them
    for name in SHAPE_CLASSES:  # tags name the classes (class_names)
        objective = [value for _, value in events.scalars[f"interp_featvis/class:{name}/objective"]]
        assert len(objective) == 4 and objective[-1] > objective[0], (name, objective)
    assert events.image_steps("interp_featvis/evolution") == [events.image_steps("interp_featvis/features")[-1]]
    assert metrics["interp_tcav/stripes/net.4/cav_accuracy"] > 0.9
    assert metrics["interp_tcav/disc/net.4/cav_accuracy"] < metrics["interp_tcav/stripes/net.4/cav_accuracy"]
    assert all(0.0 <= metrics[f"interp_tcav/stripes/net.4/{name}/tcav"] <= 1.0 for name in SHAPE_CLASSES)
    assert 0.0 < metrics["interp_activations/net.4/dead_fraction"] < 0.5
    assert "TCAV of 'stripes' at net.4" in printed

    # Explanation quality (--quality): Grad-CAM at the deeper layer removes the evidence far faster than random maps
    # do, and the randomisation sanity score separates the methods (gradient 0.23 ... Grad-CAM 0.55 when measured)
    random_deletion = metrics["interp_quality/random/deletion_auc"]
    assert metrics["interp_quality/grad_cam@net.7/deletion_auc"] < 0.75 * random_deletion
    assert metrics["interp_quality/grad_cam@net.7/insertion_auc"] > metrics["interp_quality/random/insertion_auc"]
    keys = ("gradient", "integrated_gradients", "guided_backprop", "grad_cam@net.7")
    sanity = [metrics[f"interp_quality/{key}/sanity_rank_correlation"] for key in keys]
    assert max(sanity) - min(sanity) > 0.2 and all(value < 0.9 for value in sanity), sanity
    assert len(events.image_steps("interp_quality/comparison")) == 8


@pytest.mark.slow
def test_quickstart_biased_the_bias_callback_finds_the_rare_class_and_the_background_cue(tmp_path, capsys):
    # --biased: triangles are 12 times rarer, crosses always come on a red background; the callback knows neither
    with pytest.warns(UserWarning) as caught:
        metrics = _load_quickstart().main(["--log-dir", str(tmp_path), "--biased"])
    messages = [str(warning.message) for warning in caught]
    assert any("the train set is imbalanced: class 'triangle'" in message for message in messages)
    background = [message for message in messages if "put no more of their mass on the object" in message]
    assert len(background) == 1 and "class 'cross'" in background[0], background
    printed = capsys.readouterr().out
    assert "rarest class 'triangle'" in printed

    recalls = {name: metrics[f"interp_bias/{name}/recall"] for name in ("disc", "square", "triangle", "cross")}
    assert min(recalls, key=recalls.get) == "triangle" and metrics["interp_bias/worst_recall"] < 0.5
    # the red background gives crosses away: the model recognises them all, and its Grad-CAM maps of crosses lie
    # off the crosses (below a uniform map's share), while every other class's maps favour its object
    assert recalls["cross"] > 0.95
    lifts = {name: metrics[f"interp_bias/{name}/localization_lift"] for name in recalls}
    assert lifts["cross"] < 1.0, lifts
    assert all(lifts[name] > 1.4 for name in ("disc", "square", "triangle")), lifts
    events = read_events(str(tmp_path))
    assert len(events.image_steps("interp_bias/attribution_by_class")) == 8
