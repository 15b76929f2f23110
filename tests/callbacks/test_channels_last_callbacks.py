"""GradCAMCallback and ActivationMapsCallback on channels-last (B, h, w, C) layers, with the real Trainer.

The Grad-CAM maps the callback logs are checked against a Grad-CAM written out by hand on the same (trained) model
and probe samples, permuting the layer's (B, h, w, C) tensor by hand; the activation maps against the captured
activation, permuted by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import ActivationMapsCallback, GradCAMCallback
from lightning_interp.methods import get_module
from tests.conftest import NetClassifier, quiet_trainer
from tests.methods.test_channels_last import _PermutingConv, _small_swin, correlations, hand_grad_cams

timm = pytest.importorskip("timm")


def _loader(size: int = 32, count: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(count, 3, size, size, generator=generator), torch.arange(count) % 4)
    return DataLoader(data, batch_size=min(count, 8))


def _fit(tmp_path, net: nn.Module, callbacks: list, size: int = 32) -> NetClassifier:
    module = NetClassifier(net, lr=0.05)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=callbacks, logger=False
    )
    trainer.fit(module, _loader(size), _loader(size))
    return module


def _check_against_hand(callback: GradCAMCallback, net: nn.Module, layer: str, layout: str) -> list[float]:
    """Per-sample correlations of the callback's last maps of ``layer`` with a hand Grad-CAM of the fitted net."""
    inputs = callback.probe.inputs
    net.eval()
    target = net(inputs).argmax(dim=1)  # target="pred", the default
    (hand,) = hand_grad_cams(net, layer, inputs, target, (layout,))
    return correlations(callback._previous[f"net.{layer}"], hand)


def test_grad_cam_auto_on_timm_swin_picks_the_final_norm_and_reads_it_channels_last(tmp_path):
    torch.manual_seed(0)
    net = _small_swin().train()
    callback = GradCAMCallback(layer="auto", num_samples=4)
    _fit(tmp_path, net, [callback])
    assert callback.layers == ["net.norm"]  # (B, 4, 4, 32): read as (B, 32, 4, 4)
    right = _check_against_hand(callback, net, "norm", "nhwc")
    wrong = _check_against_hand(callback, net, "norm", "nchw")  # the misreading the issue reports
    assert all(r > 0.99 for r in right), right
    assert all(r < 0.9 for r in wrong), wrong


def test_grad_cam_auto_on_swin_t_at_64_px(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, num_classes=4)
    callback = GradCAMCallback(layer="auto", num_samples=2)
    module = NetClassifier(net, lr=0.0)  # one validation pass is enough: the layout is what is checked
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[callback], logger=False
    )
    trainer.fit(module, _loader(64, count=4), _loader(64, count=4))
    assert callback.layers == ["net.norm"]
    right = _check_against_hand(callback, net, "norm", "nhwc")
    assert all(r > 0.99 for r in right), right


def test_grad_cam_named_channels_last_layers_of_torchvision_swin_and_timm_convnext(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(1)
    swin = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=4
    )
    callback = GradCAMCallback(layer=["net.features.3", "net.permute"], num_samples=4, relu=True)
    _fit(tmp_path, swin, [callback])
    assert all(r > 0.99 for r in _check_against_hand(callback, swin, "features.3", "nhwc"))
    assert all(r > 0.99 for r in _check_against_hand(callback, swin, "permute", "nchw"))

    convnext = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=4, conv_mlp=False)
    layers = ["net.stages.2.blocks.0.norm", "net.stages.2.downsample.0"]  # timm LayerNorm (NHWC), LayerNorm2d (NCHW)
    callback = GradCAMCallback(layer=layers, num_samples=4)
    _fit(tmp_path, convnext, [callback], size=64)
    assert all(r > 0.99 for r in _check_against_hand(callback, convnext, "stages.2.blocks.0.norm", "nhwc"))
    assert all(r > 0.99 for r in _check_against_hand(callback, convnext, "stages.2.downsample.0", "nchw"))


def test_activation_maps_of_a_channels_last_stage_show_its_channels(tmp_path):
    torch.manual_seed(2)
    net = _small_swin().train()
    callback = ActivationMapsCallback(layers=["net.layers.1", "net.norm"], channels=[0, 31], num_samples=4)
    module = _fit(tmp_path, net, [callback])  # channel 31 exists only when the 32 channels are read as channels
    inputs = callback.probe.inputs
    maps = callback._maps(module, inputs)
    captured = {}
    handles = [
        get_module(net, name).register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in ("layers.1", "norm")
    ]
    with torch.no_grad():
        net.eval()(inputs)
    for handle in handles:
        handle.remove()
    for name in ("layers.1", "norm"):
        expected = captured[name].permute(0, 3, 1, 2)  # (B, 4, 4, 32) -> (B, 32, 4, 4), by hand
        assert maps[f"net.{name}"].shape == (4, 32, 4, 4)
        torch.testing.assert_close(maps[f"net.{name}"], expected)


class _NHWCNet(nn.Module):
    """A body whose (B, 8, 8, 12) output nothing in the model explains, then a channels-last Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _PermutingConv()
        self.proj = nn.Linear(12, 16)  # over the last dimension: (B, 8, 8, 16) is channels-last by its class
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.proj(self.body(x)).mean(dim=(1, 2)))


def test_a_channels_last_layer_without_evidence_is_refused_until_its_layout_is_given(tmp_path):
    torch.manual_seed(3)
    for callback in (GradCAMCallback(layer="net.body"), ActivationMapsCallback(layers="net.body")):
        trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[callback], logger=False)
        with pytest.raises(ValueError, match=r"cannot tell whether layer 'net.body'.*layer_layout='channels_last'"):
            trainer.fit(NetClassifier(_NHWCNet()), _loader(), _loader())
        assert trainer.global_step == 0  # refused before training

    net = _NHWCNet()
    auto = GradCAMCallback(num_samples=4)  # 'auto' passes the unknown body over and takes the detected Linear
    named = GradCAMCallback(layer="net.body", layer_layout="channels_last", num_samples=4, name="named")
    mapped = ActivationMapsCallback(layers="net.body", layer_layout={"net.body": "channels_last"}, channels=[11])
    module = _fit(tmp_path, net, [auto, named, mapped])
    assert auto.layers == ["net.proj"]
    assert all(r > 0.99 for r in _check_against_hand(auto, net, "proj", "nhwc"))
    assert all(r > 0.99 for r in _check_against_hand(named, net, "body", "nhwc"))
    maps = mapped._maps(module, mapped.probe.inputs)["net.body"]
    with torch.no_grad():
        torch.testing.assert_close(maps, net.body(mapped.probe.inputs).permute(0, 3, 1, 2))


def test_layer_layout_is_checked_at_construction():
    with pytest.raises(ValueError, match="layer_layout must be one of"):
        GradCAMCallback(layer="net.3", layer_layout="nhwc")
    with pytest.raises(ValueError, match="chosen automatically"):
        GradCAMCallback(layer_layout="channels_last")
    with pytest.raises(ValueError, match=r"not among the named layers"):
        ActivationMapsCallback(layers=["net.3"], layer_layout={"net.4": "channels_last"})
    with pytest.raises(ValueError, match="maps layer names to one of"):
        ActivationMapsCallback(layers=["net.3"], layer_layout={"net.3": "NHWC"})
    with pytest.raises(TypeError, match="layer_layout must be"):
        GradCAMCallback(layer="net.3", layer_layout=3)  # type: ignore[arg-type]
    assert GradCAMCallback(layer="net.3", layer_layout="channels_last").layer_layout == "channels_last"


def test_a_layout_named_for_a_token_layer_is_refused(tmp_path):
    torch.manual_seed(4)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4, depth=1)
    callback = GradCAMCallback(layer="net.blocks.0.norm1", layer_layout="channels_last")
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match=r"not a 4-D"):
        trainer.fit(NetClassifier(net), _loader(), _loader())
