"""GradCAMCallback(methods=...): every CAM method of the registry x every layer in one grid, equal to the functions."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import Display, GradCAMCallback, SaliencyCallback
from lightning_interp.methods import METHODS, attribute, available_methods
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def test_every_cam_method_on_two_layers_in_one_grid(tmp_path):
    methods = [m for m in available_methods("cam") if m != "cam"]  # CAM needs the pooled layer: its own callback
    pooled = GradCAMCallback(layer="net.7", methods=["grad_cam", "cam"], num_samples=4, relu=False, name="pooled")
    callback = GradCAMCallback(
        layer=["net.4", "net.7"],
        methods=[m if m != "score_cam" else ("score_cam", {"internal_batch_size": 16}) for m in methods],
        num_samples=4,
        relu=False,
        display=Display(evolution_samples=0),
    )
    torch.manual_seed(0)
    model = tiny_classifier()
    logger = TensorBoardLogger(str(tmp_path), name="cams")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback, pooled], logger=logger)
    trainer.fit(model, datamodule=tiny_datamodule())
    expected_keys = {layer if m == "grad_cam" else f"{layer}/{m}" for m in methods for layer in ("net.4", "net.7")}
    assert set(callback._previous) == expected_keys
    inputs = callback.probe.inputs
    target = model(inputs).argmax(dim=1)
    for method in methods:
        for layer in ("net.4", "net.7"):
            key = layer if method == "grad_cam" else f"{layer}/{method}"
            if METHODS[method].stochastic:  # its noise comes from the callback's generator: not the reference's draw
                assert callback._previous[key].shape == inputs[:, 0].shape, key
                assert torch.isfinite(callback._previous[key]).all() and callback._previous[key].abs().max() > 0, key
                continue
            reference = attribute(method, model, inputs, target, layer=layer, relu=False)
            torch.testing.assert_close(callback._previous[key], reference, rtol=1e-4, atol=1e-5, msg=key)
    # CAM is Grad-CAM up to the positive factor 1 / (h w) on a pooled-linear head: the same map, scaled
    cam_map, grad_cam_map = pooled._previous["net.7/cam"], pooled._previous["net.7"]
    torch.testing.assert_close(
        cam_map / cam_map.abs().amax(), grad_cam_map / grad_cam_map.abs().amax(), atol=1e-5, rtol=0
    )
    scalars = read_events(logger.log_dir).scalars
    tag = "interp_gradcam/net.7/score_cam/concentration"
    assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag])


def test_cam_needs_a_pooled_layer_and_says_so_before_training(tmp_path):
    callback = GradCAMCallback(layer="net.4", methods=["cam"], num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match="not global average pooling"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert trainer.global_step == 0


def test_method_lists_are_checked_at_construction():
    with pytest.raises(ValueError, match="'smoothgrad' is for SaliencyCallback"):
        GradCAMCallback(methods=["smoothgrad"])
    with pytest.raises(ValueError, match="'grad_cam' is for GradCAMCallback"):
        SaliencyCallback(methods=["grad_cam"])
