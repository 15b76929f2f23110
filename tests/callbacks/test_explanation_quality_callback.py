"""ExplanationQualityCallback in a real Trainer: the scores it logs are the quality metrics of the maps of the model
at that validation, each metric with its own options, the sanity score is exactly 1 for a network that did not change
and below 1 after training, the untrained network's maps survive a resume, the comparison table is logged, bad
options fail before training; ``metrics=`` takes the three spellings of ``methods=``, from Python and from YAML."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import ExplanationQualityCallback
from lightning_interp.callbacks.explanation_quality import DEFAULT_METRICS, QUALITY_METRICS
from lightning_interp.methods import (
    attribute,
    attribution_to_map,
    average_drop,
    curve_auc,
    masked_confidence,
    perturbation_curve,
    rank_methods,
    sparseness,
    top_fraction_drop,
)
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule

METRICS = ("deletion_auc", "insertion_auc", "top_drop", "random_drop", "top_drop_gain", "sparseness", "localization")


def fast(steps: int) -> dict[str, dict[str, int] | None]:
    """The default metrics, both curves in ``steps`` parts."""
    return {**dict.fromkeys(DEFAULT_METRICS), "deletion": {"steps": steps}, "insertion": {"steps": steps}}


def test_scores_are_those_of_the_final_model_and_every_metric_is_logged(tmp_path):
    metrics = [  # each metric with its own options: none of them reaches another
        ("deletion", {"steps": 8}),
        ("insertion", {"steps": 4, "baseline": "zero"}),
        ("top_drop", {"fraction": 0.3, "baseline": "mean"}),
        "sanity",
        "sparseness",
        "localization",
    ]
    callback = ExplanationQualityCallback(
        ["gradient", ("grad_cam", {"layer": "net.4"})], num_samples=16, metrics=metrics
    )
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=2)
    model, datamodule = tiny_classifier(), tiny_datamodule()
    trainer.fit(model, datamodule=datamodule)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    for key in ("gradient", "grad_cam@net.4", "random"):
        for metric in METRICS:
            value = metrics[f"interp_quality/{key}/{metric}"]
            assert math.isfinite(value), (key, metric)
        assert 0 <= metrics[f"interp_quality/{key}/deletion_auc"] <= 1
        assert 0 <= metrics[f"interp_quality/{key}/sparseness"] <= 1
    assert "interp_quality/random/sanity_rank_correlation" not in metrics  # random maps learn nothing
    assert metrics["interp_quality/gradient/sanity_rank_correlation"] < 1.0

    # the last validation ran on the weights the fit ends with: the same numbers from the functions directly
    probe = callback.probe
    model.eval()
    with torch.no_grad():
        target = model(probe.inputs).argmax(dim=1)
    maps = attribution_to_map(attribute("gradient", model, probe.inputs, target))
    deletion = curve_auc(perturbation_curve(model, probe.inputs, maps, target, steps=8)).mean()
    assert metrics["interp_quality/gradient/deletion_auc"] == pytest.approx(float(deletion), abs=1e-5)
    insertion = perturbation_curve(model, probe.inputs, maps, target, mode="insertion", steps=4, baseline="zero")
    assert metrics["interp_quality/gradient/insertion_auc"] == pytest.approx(
        float(curve_auc(insertion).mean()), abs=1e-5
    )
    generator = torch.Generator().manual_seed(callback.seed + 1)
    top, random = top_fraction_drop(
        model, probe.inputs, maps, target, fraction=0.3, baseline="mean", generator=generator
    )
    assert metrics["interp_quality/gradient/top_drop"] == pytest.approx(float(top.mean()), abs=1e-5)
    assert metrics["interp_quality/gradient/random_drop"] == pytest.approx(float(random.mean()), abs=1e-5)
    assert metrics["interp_quality/gradient/sparseness"] == pytest.approx(float(sparseness(maps).mean()), abs=1e-6)
    events = read_events(logger.log_dir)
    assert events.image_steps("interp_quality/comparison") == [3, 7]


def test_the_sanity_score_is_exactly_one_for_a_network_that_did_not_change(tmp_path):
    callback = ExplanationQualityCallback(["gradient", "guided_backprop"], num_samples=16, metrics=fast(4))
    model = tiny_classifier()
    model.lr = 0.0  # Adam with a zero step: the weights stay those of the untrained network (no BatchNorm here)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=2)
    trainer.fit(model, datamodule=tiny_datamodule())
    metrics = trainer.callback_metrics
    for key in ("gradient", "guided_backprop"):
        assert float(metrics[f"interp_quality/{key}/sanity_rank_correlation"]) == pytest.approx(1.0, abs=1e-9)


def test_the_untrained_networks_maps_come_back_with_a_resumed_fit(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = ExplanationQualityCallback(["gradient"], num_samples=16, metrics=fast(4), random_reference=False)
    trainer = quiet_trainer(tmp_path, callbacks=[first, checkpoint], logger=False, max_epochs=1,
                            enable_checkpointing=True)  # fmt: skip
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    saved = first._start_maps["gradient"].clone()
    resumed = ExplanationQualityCallback(["gradient"], num_samples=16, metrics=fast(4), random_reference=False)
    trainer = quiet_trainer(tmp_path, callbacks=[resumed, checkpoint], logger=False, max_epochs=2,
                            enable_checkpointing=True)  # fmt: skip
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.allclose(resumed._start_maps["gradient"], saved, rtol=1e-3, atol=1e-6)  # kept as float16
    assert "interp_quality/gradient/sanity_rank_correlation" in trainer.callback_metrics


def test_bad_options_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown attribution method 'no_such_method'"):
        ExplanationQualityCallback(["no_such_method"])
    with pytest.raises(TypeError, match="takes no option"):
        ExplanationQualityCallback([("gradient", {"layer": "net.4"})])
    with pytest.raises(ValueError, match="Unknown quality metric 'beauty'"):
        ExplanationQualityCallback(metrics=["deletion", "beauty"])
    with pytest.raises(ValueError, match="deletion's baseline must be one of"):
        ExplanationQualityCallback(metrics={"deletion": {"baseline": "noise"}})
    callback = ExplanationQualityCallback([("grad_cam", {"layer": "net.99"})])
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.raises(Exception, match=r"net\.99"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())


def test_methods_are_ranked_by_their_mean_rank_with_the_right_direction_per_metric():
    table = {
        "good": {"deletion_auc": 0.1, "insertion_auc": 0.9, "sparseness": 0.1},
        "bad": {"deletion_auc": 0.5, "insertion_auc": 0.4, "sparseness": 0.9},
        "mixed": {"deletion_auc": 0.05, "insertion_auc": 0.3, "sanity_rank_correlation": float("nan")},
    }
    ranks = rank_methods(table)
    # deletion: lower is better (mixed 1, good 2, bad 3); insertion: higher is better (good 1, bad 2, mixed 3);
    # sparseness is shown but not ranked; NaN is left out
    assert ranks == {"good": 1.5, "bad": 2.5, "mixed": 2.0}


def test_the_cascading_randomisation_is_logged_per_randomised_layer(tmp_path):
    callback = ExplanationQualityCallback(
        ["gradient"], num_samples=8, metrics={"deletion": {"steps": 4}, "cascading": {"depth": 2}}
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    model = tiny_classifier()
    trainer.fit(model, datamodule=tiny_datamodule())
    metrics = trainer.callback_metrics
    cascade = {key: float(value) for key, value in metrics.items() if "/cascade/" in key}
    # the two last parametrised layers of the quickstart network, named as the user names them
    assert set(cascade) == {"interp_quality/gradient/cascade/net.10", "interp_quality/gradient/cascade/net.6"}
    assert all(-1.0 <= value <= 1.0 for value in cascade.values())


def test_the_confidence_metric_logs_average_drop_and_increase_in_confidence_of_the_new_methods(tmp_path):
    # the issue-30 methods by name (an input attribution with its CAM layer, a stochastic CAM) and the paper's pair
    methods = {
        "full_grad": None,
        "guided_grad_cam": {"cam_layer": "net.4"},
        "ablation_cam": {"layer": "net.4"},
        "smooth_grad_cam_plus_plus": {"layer": "net.4", "n_samples": 2},
    }
    callback = ExplanationQualityCallback(methods, num_samples=8, metrics=["confidence"], random_reference=False)
    assert "confidence" in QUALITY_METRICS and "confidence" not in DEFAULT_METRICS
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    model = tiny_classifier()
    trainer.fit(model, datamodule=tiny_datamodule())
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    for key in ("full_grad", "guided_grad_cam", "ablation_cam@net.4", "smooth_grad_cam_plus_plus@net.4"):
        assert 0.0 <= metrics[f"interp_quality/{key}/average_drop"] <= 1.0, key
        assert 0.0 <= metrics[f"interp_quality/{key}/increase_in_confidence"] <= 1.0, key
    # the logged numbers are those of the functions on the final model
    probe = callback.probe
    model.eval()
    with torch.no_grad():
        target = model(probe.inputs).argmax(dim=1)
    maps = attribute("ablation_cam", model, probe.inputs, target, layer="net.4")
    before, after = masked_confidence(model, probe.inputs, maps, target)
    assert metrics["interp_quality/ablation_cam@net.4/average_drop"] == pytest.approx(
        float(average_drop(model, probe.inputs, maps, target).mean()), abs=1e-5
    )
    assert metrics["interp_quality/ablation_cam@net.4/increase_in_confidence"] == pytest.approx(
        float((after > before).float().mean()), abs=1e-6
    )


# ------------------------------------------------------------------ metrics=: the spelling of methods=, options checked
def test_metrics_take_the_three_spellings_of_methods_and_each_metric_gets_its_own_defaults():
    defaults = {
        "deletion": {"steps": 16, "baseline": "blur"},
        "insertion": {"steps": 16, "baseline": "blur"},
        "top_drop": {"fraction": 0.2, "baseline": "blur"},
        "sanity": {},
        "sparseness": {},
        "localization": {},
    }
    callback = ExplanationQualityCallback()  # the numbers of 0.1's defaults; robustness and cascading off
    assert callback.metrics == DEFAULT_METRICS == tuple(defaults)
    assert callback.metric_options == defaults
    assert set(ExplanationQualityCallback.METRIC_OPTIONS) == set(QUALITY_METRICS)
    assert ExplanationQualityCallback(metrics="robustness").metric_options == {
        "robustness": {"radius": 0.02, "samples": 4}
    }
    listed = ExplanationQualityCallback(metrics=["sparseness", ("deletion", {"steps": 4}), ["cascading", None]])
    mapping = ExplanationQualityCallback(metrics={"sparseness": None, "deletion": {"steps": 4}, "cascading": {}})
    for callback in (listed, mapping):  # in the order given; a given option leaves the others at their defaults
        assert callback.metrics == ("sparseness", "deletion", "cascading")
        assert callback.metric_options == {
            "sparseness": {},
            "deletion": {"steps": 4, "baseline": "blur"},
            "cascading": {"depth": 3},
        }
    # the example of the issue: every metric, each with its own options
    every = ExplanationQualityCallback(
        metrics={
            "deletion": {"steps": 16, "baseline": "blur"},
            "insertion": None,
            "top_drop": {"fraction": 0.2},
            "sanity": None,
            "sparseness": None,
            "localization": None,
            "robustness": {"radius": 0.02, "samples": 4},
            "cascading": {"depth": 2},
            "confidence": None,
        }
    )
    assert every.metrics == QUALITY_METRICS
    assert every.metric_options["insertion"] == {"steps": 16, "baseline": "blur"}  # not deletion's: its own
    assert every.metric_options["cascading"] == {"depth": 2}
    # a deletion option does not reach insertion or top_drop
    alone = ExplanationQualityCallback(
        metrics={"deletion": {"steps": 4, "baseline": "mean"}, "insertion": None, "top_drop": None}
    )
    assert alone.metric_options["insertion"] == {"steps": 16, "baseline": "blur"}
    assert alone.metric_options["top_drop"]["baseline"] == "blur"
    assert isinstance(
        ExplanationQualityCallback(metrics={"robustness": {"radius": 1}}).metric_options["robustness"]["radius"], float
    )


@pytest.mark.parametrize(
    ("metrics", "error", "message"),
    [
        # an option the metric does not take: the message lists the ones it does
        (
            {"deletion": {"fraction": 0.1}},
            TypeError,
            r"deletion takes no option\(s\) \['fraction'\]; its options are: steps, baseline",
        ),
        (
            {"top_drop": {"steps": 4}},
            TypeError,
            r"top_drop takes no option\(s\) \['steps'\]; its options are: fraction, baseline",
        ),
        ({"robustness": {"robustness_radius": 0.1}}, TypeError, r"its options are: radius, samples"),
        (
            {"cascading": {"layers": 2}},
            TypeError,
            r"cascading takes no option\(s\) \['layers'\]; its options are: depth",
        ),
        ({"sanity": {"depth": 2}}, TypeError, r"sanity takes no option\(s\) \['depth'\]; it takes none"),
        # option values
        ({"deletion": {"steps": 1}}, ValueError, r"deletion's steps must be an int >= 2, got 1"),
        ({"insertion": {"steps": 4.0}}, ValueError, r"insertion's steps must be an int >= 2, got 4.0"),
        ({"insertion": {"steps": True}}, ValueError, r"insertion's steps must be an int >= 2"),
        (
            {"insertion": {"baseline": "noise"}},
            ValueError,
            r"insertion's baseline must be one of \('blur', 'mean', 'zero'\)",
        ),
        ({"top_drop": {"baseline": "noise"}}, ValueError, r"top_drop's baseline must be one of"),
        ({"top_drop": {"fraction": 1.0}}, ValueError, r"top_drop's fraction must be a number in \(0, 1\), got 1.0"),
        ({"top_drop": {"fraction": 0}}, ValueError, r"top_drop's fraction must be a number in \(0, 1\)"),
        ({"robustness": {"radius": 0.0}}, ValueError, r"robustness's radius must be a number > 0"),
        ({"robustness": {"radius": float("nan")}}, ValueError, r"robustness's radius must be a number > 0"),
        ({"robustness": {"samples": 0}}, ValueError, r"robustness's samples must be an int >= 1, got 0"),
        ({"cascading": {"depth": 0}}, ValueError, r"cascading's depth must be an int >= 1, got 0"),
        ({"cascading": {"depth": True}}, ValueError, r"cascading's depth must be an int >= 1"),
        # names and forms
        (
            "beauty",
            ValueError,
            r"Unknown quality metric 'beauty'.*choose from: deletion, insertion, top_drop, sanity, "
            r"sparseness, localization, robustness, cascading",
        ),
        (["deletion", ("deletion", {"steps": 4})], ValueError, r"lists 'deletion' twice"),
        ([], ValueError, r"names no metric"),
        ({}, ValueError, r"names no metric"),
        ([3], TypeError, r"takes a metric name, a list of names or \(name, \{option: value\}\) pairs"),
        ([("deletion",)], TypeError, r"takes a metric name"),
        ([("deletion", 4)], TypeError, r"the options of 'deletion' must be a mapping, got 4"),
    ],
)
def test_metric_names_and_options_are_checked_at_construction(metrics, error, message):
    with pytest.raises(error, match=r"ExplanationQualityCallback\(metrics=\.\.\.\)") as raised:
        ExplanationQualityCallback(metrics=metrics)
    assert raised.type is error
    assert raised.match(message)


@pytest.mark.parametrize(
    "removed",
    [
        {"steps": 4},
        {"baseline": "mean"},
        {"fraction": 0.1},
        {"robustness_radius": 0.1},
        {"robustness_samples": 2},
        {"cascading": 2},
    ],
)
def test_the_metric_options_are_no_longer_arguments(removed):
    name = next(iter(removed))
    with pytest.raises(
        TypeError, match=rf"ExplanationQualityCallback\({name}=\.\.\.\) moved in lightning-interp 0\.2: write metrics="
    ):
        ExplanationQualityCallback(**removed)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        ExplanationQualityCallback(stepz=4)


QUALITY_YAML = """
trainer:
  logger: false
  callbacks:
    - class_path: lightning_interp.ExplanationQualityCallback
      init_args:
        methods: gradient
        num_samples: 8
        metrics: {metrics}
"""


def _built_from_yaml(tmp_path, metrics: str) -> ExplanationQualityCallback:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from lightning_interp.demo import ImageClassifier, shapes_cnn
    from lightning_interp.synthetic import SyntheticShapesDataModule

    class Small(ImageClassifier):
        def __init__(self) -> None:
            super().__init__(shapes_cnn(num_classes=4, width=4))

    config = tmp_path / "quality.yaml"
    config.write_text(QUALITY_YAML.format(metrics=metrics))
    cli = LightningCLI(
        Small, SyntheticShapesDataModule, run=False,
        args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)],
    )  # fmt: skip
    (built,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationQualityCallback)]
    return built


def test_a_lightning_cli_yaml_gives_each_metric_its_options(tmp_path):
    built = _built_from_yaml(tmp_path, "{deletion: {steps: 4}, robustness: {radius: 0.05}}")
    assert built.methods == ("gradient",) and built.num_samples == 8
    assert built.metrics == ("deletion", "robustness")
    assert built.metric_options == {
        "deletion": {"steps": 4, "baseline": "blur"},
        "robustness": {"radius": 0.05, "samples": 4},
    }
    listed = _built_from_yaml(tmp_path, "[sparseness, [top_drop, {fraction: 0.1}]]")
    assert listed.metric_options == {"sparseness": {}, "top_drop": {"fraction": 0.1, "baseline": "blur"}}


def test_a_lightning_cli_yaml_with_a_bad_metric_or_option_fails_before_training(tmp_path):
    """The callback's own message comes through the parser's (a ValueError naming every Union subtype it tried)."""
    accepted = r"deletion takes no option\(s\) \['stepz'\]; its options are: steps, baseline"
    with pytest.raises(ValueError, match=accepted):
        _built_from_yaml(tmp_path, "{deletion: {stepz: 4}}")
    with pytest.raises(ValueError, match=r"robustness's radius must be a number > 0, got -0.05"):
        _built_from_yaml(tmp_path, "{robustness: {radius: -0.05}}")
    with pytest.raises(ValueError, match=r"Unknown quality metric 'beauty'"):
        _built_from_yaml(tmp_path, "{beauty: null}")
    with pytest.raises(SystemExit):  # a lone name is checked by the parser itself against the Literal of the names
        _built_from_yaml(tmp_path, "beauty")
