"""SaliencyCallback with a NeuronTarget: what drives a unit of a layer, logged over training."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import GradCAMCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier
from lightning_interp.methods import NeuronTarget, attribution_to_map, deconvnet, gradient, integrated_gradients
from tests.conftest import (
    BatchNormDropoutNet,
    assert_training_identical,
    quiet_trainer,
    read_events,
    tiny_datamodule,
    train_with,
)

UNIT = NeuronTarget(layer="net.features.4", index=(2,))  # channel 2 of the second conv, summed


def test_maps_and_scalars_of_a_neuron_target_are_logged_and_equal_the_functional_api(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)
    callback = SaliencyCallback(
        methods=("gradient", ("integrated_gradients", {"n_steps": 4})), target=UNIT, num_samples=4
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=TensorBoardLogger(str(tmp_path)), max_epochs=2)
    trainer.fit(model, datamodule=tiny_datamodule())
    events = read_events(str(tmp_path))
    assert events.image_steps("interp_saliency/maps/rows_1-2"), sorted(events.images)
    for key in ("gradient", "integrated_gradients"):
        values = [value for _, value in events.scalars[f"interp_saliency/{key}/concentration"]]
        assert len(values) == 2 and all(0 < v <= 1 for v in values)
    assert len(events.scalars["interp_saliency/gradient/stability"]) == 1
    # the IG completeness is the unit's: its attributions add up to its activation minus the baseline's
    completeness = events.scalars["interp_saliency/integrated_gradients/completeness_error"]
    assert all(value == value for _, value in completeness)  # finite, not NaN
    inputs = callback.probe.inputs
    expected = attribution_to_map(gradient(model, inputs, UNIT))
    torch.testing.assert_close(callback.last_maps["gradient"], expected)
    expected = attribution_to_map(integrated_gradients(model, inputs, UNIT, n_steps=4, internal_batch_size=512))
    torch.testing.assert_close(callback.last_maps["integrated_gradients"], expected, rtol=1e-5, atol=1e-7)
    # the explained score is the unit, not a class: a different unit gives different maps
    other = attribution_to_map(gradient(model, inputs, NeuronTarget("net.features.4", (5,))))
    assert not torch.allclose(callback.last_maps["gradient"], other)


def test_deconvnet_with_a_neuron_target_logs_the_reconstruction_of_the_feature_map(tmp_path):
    """SaliencyCallback(target=NeuronTarget(...), methods="deconvnet"): Zeiler and Fergus's reconstruction from the
    channel's strongest activation (the default) or from the whole map (keep="map"), as the functional API."""
    torch.manual_seed(0)
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)
    channel = NeuronTarget("net.features.4", (2,))  # channel 2 of the second convolution
    top = SaliencyCallback(methods="deconvnet", target=channel, num_samples=4, name="top")
    whole = SaliencyCallback(methods={"deconvnet": {"keep": "map"}}, target=channel, num_samples=4, name="whole")
    trainer = quiet_trainer(tmp_path, callbacks=[top, whole], logger=TensorBoardLogger(str(tmp_path)), max_epochs=1)
    trainer.fit(model, datamodule=tiny_datamodule())
    assert read_events(str(tmp_path)).image_steps("interp_top/maps/rows_1-2")  # the default grid comes in two-row parts
    inputs = top.probe.inputs
    for callback, keep in ((top, "top"), (whole, "map")):
        expected = attribution_to_map(deconvnet(model, inputs, channel, keep=keep))
        assert expected.abs().max() > 0
        torch.testing.assert_close(callback.last_maps["deconvnet"], expected)
    assert not torch.allclose(top.last_maps["deconvnet"], whole.last_maps["deconvnet"])


def test_training_is_unchanged_by_a_neuron_target(tmp_path):
    plain = train_with(tmp_path / "plain", [])
    callback = SaliencyCallback(
        methods=("gradient", ("smoothgrad", {"n_samples": 3})), target=NeuronTarget("net.features.1", (1, 3, 3))
    )
    assert_training_identical(plain, train_with(tmp_path / "with", [callback]))


def test_a_wrong_layer_name_is_refused_before_training_with_the_closest_names(tmp_path):
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)
    callback = SaliencyCallback(methods="gradient", target=NeuronTarget("net.feature.4", 0), num_samples=2)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.raises(ValueError, match=r"Closest names: 'net\.features\.4'"):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert trainer.global_step == 0


def test_an_index_outside_the_layer_is_refused_before_training(tmp_path):
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)
    callback = SaliencyCallback(methods="gradient", target=NeuronTarget("net.features.4", (8,)), num_samples=2)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.raises(ValueError, match=r"SaliencyCallback: NeuronTarget index \(8,\) does not fit"):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert trainer.global_step == 0


def test_callbacks_that_explain_outputs_refuse_a_neuron_target():
    with pytest.raises(ValueError, match="takes no NeuronTarget"):
        GradCAMCallback(target=UNIT)
