"""ExplanationQualityCallback in a real Trainer: the scores it logs are the quality metrics of the maps of the model
at that validation, the sanity score is exactly 1 for a network that did not change and below 1 after training, the
untrained network's maps survive a resume, the comparison table is logged, bad options fail before training."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import ExplanationQualityCallback
from lightning_interp.callbacks.explanation_quality import rank_methods
from lightning_interp.methods import attribute, attribution_to_map, curve_auc, perturbation_curve, sparseness
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule

METRICS = ("deletion_auc", "insertion_auc", "top_drop", "random_drop", "top_drop_gain", "sparseness", "localization")


def test_scores_are_those_of_the_final_model_and_every_metric_is_logged(tmp_path):
    callback = ExplanationQualityCallback(["gradient", ("grad_cam", {"layer": "net.4"})], num_samples=16, steps=8)
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
    assert metrics["interp_quality/gradient/sparseness"] == pytest.approx(float(sparseness(maps).mean()), abs=1e-6)
    events = read_events(logger.log_dir)
    assert events.image_steps("interp_quality/comparison") == [3, 7]


def test_the_sanity_score_is_exactly_one_for_a_network_that_did_not_change(tmp_path):
    callback = ExplanationQualityCallback(["gradient", "guided_backprop"], num_samples=16, steps=4)
    model = tiny_classifier()
    model.lr = 0.0  # Adam with a zero step: the weights stay those of the untrained network (no BatchNorm here)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=2)
    trainer.fit(model, datamodule=tiny_datamodule())
    metrics = trainer.callback_metrics
    for key in ("gradient", "guided_backprop"):
        assert float(metrics[f"interp_quality/{key}/sanity_rank_correlation"]) == pytest.approx(1.0, abs=1e-9)


def test_the_untrained_networks_maps_come_back_with_a_resumed_fit(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = ExplanationQualityCallback(["gradient"], num_samples=16, steps=4, random_reference=False)
    trainer = quiet_trainer(tmp_path, callbacks=[first, checkpoint], logger=False, max_epochs=1,
                            enable_checkpointing=True)  # fmt: skip
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    saved = first._start_maps["gradient"].clone()
    resumed = ExplanationQualityCallback(["gradient"], num_samples=16, steps=4, random_reference=False)
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
    with pytest.raises(ValueError, match="metrics must be"):
        ExplanationQualityCallback(metrics=["deletion", "beauty"])
    with pytest.raises(ValueError, match="baseline must be"):
        ExplanationQualityCallback(baseline="noise")
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
    callback = ExplanationQualityCallback(["gradient"], num_samples=8, steps=4, metrics=("deletion",), cascading=2)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    model = tiny_classifier()
    trainer.fit(model, datamodule=tiny_datamodule())
    metrics = trainer.callback_metrics
    cascade = {key: float(value) for key, value in metrics.items() if "/cascade/" in key}
    # the two last parametrised layers of the quickstart network, named as the user names them
    assert set(cascade) == {"interp_quality/gradient/cascade/net.10", "interp_quality/gradient/cascade/net.6"}
    assert all(-1.0 <= value <= 1.0 for value in cascade.values())
