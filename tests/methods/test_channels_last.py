"""Channels-last (B, h, w, C) layers: detected from the model, read permuted, or refused; never read as (B, C, h, w).

Every map is checked against a Grad-CAM written out here by hand (hook, ``torch.autograd.grad``, channel weights =
mean gradient over h and w, map = ReLU(sum_c w_c A_c)), permuting the layer's tensor by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import find_target_layer, get_module, grad_cam, spatial_layers, trace_model
from lightning_interp.methods.model.tokens import channels_last_layers, channels_last_to_first, layer_layouts

timm = pytest.importorskip("timm")


def hand_grad_cam(net: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor, layout: str) -> torch.Tensor:
    """Grad-CAM of ``layer`` written out: ``layout`` is how the hooked tensor is laid out ("nhwc" or "nchw")."""
    return hand_grad_cams(net, layer, x, target, (layout,))[0]


def hand_grad_cams(
    net: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor, layouts: tuple[str, ...]
) -> list[torch.Tensor]:
    """Grad-CAMs of ``layer`` from one forward and backward, reading the hooked tensor in each of ``layouts``."""
    captured = []
    handle = get_module(net, layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        scores = net(x)
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), captured[0])
    cams = []
    for layout in layouts:
        activation, grad = captured[0].detach(), gradient
        if layout == "nhwc":
            activation, grad = activation.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = (weights * activation).sum(dim=1).relu()
        cams.append(F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return cams


def correlations(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Pearson correlation per sample."""
    a = a.flatten(1) - a.flatten(1).mean(dim=1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))).tolist()


def _small_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4, num_classes=4
    ).eval()


def _small_convnext(conv_mlp: bool) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=4, conv_mlp=conv_mlp).eval()


class _PermutingConv(nn.Module):
    """A convolution that returns (B, h, w, C) from its own forward: neither its class nor its input tells."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 3, 4, 4) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=4).permute(0, 2, 3, 1)


@pytest.mark.parametrize("which", ["small", "swin_t"])
def test_timm_swin_auto_layer_is_read_channels_last_like_a_hand_grad_cam(which):
    torch.manual_seed(0)
    if which == "small":
        net, size = _small_swin(), 32
    else:  # the real Swin-T layout at 64 px
        net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, num_classes=4).eval()
        size = 64
    x = torch.randn(2, 3, size, size)
    trace = trace_model(net, x)
    layer = find_target_layer(net, x, trace=trace, channels_last=True)
    assert layer == "norm"
    layouts = layer_layouts(net, trace)
    assert layouts["norm"] == "channels_last" and layouts["patch_embed.proj"] == "channels_first"
    target = trace.output.argmax(dim=1).expand(2)  # one class for both samples
    ours = grad_cam(net, x, target, layer, reshape=channels_last_to_first)
    right, wrong = hand_grad_cams(net, layer, x, target, ("nhwc", "nchw"))  # wrong: the misreading of the issue
    assert all(r > 0.99 for r in correlations(ours, right))
    assert all(abs(r) < 0.5 for r in correlations(right, wrong))  # the check above can tell the two apart


def test_without_channels_last_no_channels_last_layer_and_no_attention_matrix_is_chosen():
    torch.manual_seed(0)
    net = _small_swin()
    x = torch.randn(2, 3, 32, 32)
    trace = trace_model(net, x)
    last = channels_last_layers(net, trace)
    assert {"norm", "layers.1", "layers.1.downsample", "layers.1.blocks.0.norm1", "patch_embed"} <= last
    plain = [name for name, _ in spatial_layers(net, None, trace=trace)]
    assert not set(plain) & last
    assert not any("softmax" in name for name in plain)  # the (1, heads, N, N) window attention is no grid
    assert find_target_layer(net, x) == "patch_embed.proj"  # the one channels-first grid
    with_last = dict(spatial_layers(net, None, trace=trace, channels_last=True))
    assert with_last["norm"] == (1, 32, 4, 4)  # listed as (B, C, h, w)


def test_torchvision_swin_layouts_and_a_named_stage_against_a_hand_grad_cam():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    net = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=4
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    layouts = layer_layouts(net, trace_model(net, x))
    assert layouts["features.0.0"] == "channels_first"  # the patch convolution
    assert layouts["features.0.1"] == "channels_last"  # torchvision's Permute([0, 2, 3, 1])
    assert all(layouts[name] == "channels_last" for name in ("features.1.0.attn", "features.3", "norm"))
    assert layouts["permute"] == "channels_first"  # Permute([0, 3, 1, 2]) before the pooling
    assert find_target_layer(net, x, channels_last=True) == "permute"  # as before: the permuted output
    target = net(x).argmax(dim=1)
    ours = grad_cam(net, x, target, "features.3", reshape=channels_last_to_first)
    assert all(r > 0.99 for r in correlations(ours, hand_grad_cam(net, "features.3", x, target, "nhwc")))


def test_timm_convnext_norms_keep_their_own_layouts():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    permuting = _small_convnext(conv_mlp=False)  # blocks permute to (B, h, w, C) around norm and MLP
    layouts = layer_layouts(permuting, trace_model(permuting, x))
    for name in ("stem.1", "stages.1.downsample.0", "stages.1.blocks.0.conv_dw", "stages.1.blocks.0", "stages.1"):
        assert layouts[name] == "channels_first", name  # LayerNorm2d is an nn.LayerNorm subclass: by its class
    for name in ("stages.1.blocks.0.norm", "stages.1.blocks.0.mlp.fc1", "stages.1.blocks.0.mlp.act"):
        assert layouts[name] == "channels_last", name  # timm's LayerNorm and the MLP's Linears over (B, h, w, C)
    assert layouts["stages.1.blocks.0.drop_path"] == "channels_first"  # permuted back: its grid was seen
    convolutional = _small_convnext(conv_mlp=True)
    layouts = layer_layouts(convolutional, trace_model(convolutional, x))
    assert layouts["stages.1.blocks.0.norm"] == "channels_first"  # LayerNorm2d
    assert "channels_last" not in layouts.values()
    target = permuting(x).argmax(dim=1)
    layer = "stages.1.blocks.0.norm"
    ours = grad_cam(permuting, x, target, layer, reshape=channels_last_to_first)
    assert all(r > 0.99 for r in correlations(ours, hand_grad_cam(permuting, layer, x, target, "nhwc")))


def test_hf_swin_gives_tokens_and_its_auto_layer_matches_a_hand_grad_cam():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=4
    )
    hf = transformers.SwinForImageClassification(config).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, x):
            return self.model(x).logits

    net = Logits().eval()
    x = torch.randn(3, 3, 32, 32)
    trace = trace_model(net, x)
    assert not channels_last_layers(net, trace)  # its layers return tuples and (B, N, C) tokens, no (B, h, w, C)
    layer = find_target_layer(net, x, channels_last=True)
    assert "relative_position_bias" not in layer  # one bias for the whole batch: no per-sample map
    assert len(trace.shapes[layer]) == 3 and trace.shapes[layer][1] == 64  # tokens of the first stage's 8 x 8 grid
    target = net(x).argmax(dim=1)
    captured = []
    handle = get_module(net, layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    scores = net(x)
    handle.remove()
    (gradient,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), captured[0])
    grid = captured[0].reshape(3, 8, 8, -1).permute(0, 3, 1, 2)  # row-major patch tokens, by hand
    weights = gradient.reshape(3, 8, 8, -1).permute(0, 3, 1, 2).mean(dim=(2, 3), keepdim=True)
    hand = F.interpolate((weights * grid).sum(1, keepdim=True).relu().detach(), size=(32, 32), mode="bilinear")[:, 0]
    assert all(r > 0.99 for r in correlations(grad_cam(net, x, target, None), hand))


def test_a_layer_whose_layout_cannot_be_told_is_never_a_spatial_layer():
    torch.manual_seed(4)
    net = nn.Sequential(_PermutingConv(), nn.Flatten(1), nn.Linear(8 * 8 * 12, 3))  # "0": (B, 8, 8, 12)
    cube = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(4), _Shuffle(), nn.Flatten(1), nn.Linear(512, 2))
    x = torch.randn(2, 3, 32, 32)
    trace = trace_model(net, x)
    assert layer_layouts(net, trace)["0"] is None  # only its channels-last reading has the image's aspect
    assert spatial_layers(net, None, trace=trace, channels_last=True) == []
    assert spatial_layers(net, None, trace=trace) == []
    cube_trace = trace_model(cube, x)
    layouts = layer_layouts(cube, cube_trace)
    assert layouts["1"] == "channels_first" and layouts["2"] is None  # (8, 8, 8): both readings alike
    assert [name for name, _ in spatial_layers(cube, None, trace=cube_trace, channels_last=True)] == ["0", "1"]


class _Shuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous()


def test_layouts_follow_the_input_and_the_sub_modules():
    class Block(nn.Module):  # no class evidence of its own: its sub-modules say
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(12)
            self.fc = nn.Linear(12, 12)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    net = nn.Sequential(_PermutingConv(), Block(), nn.GELU(), nn.Dropout(), nn.Flatten(1), nn.Linear(768, 2))
    trace = trace_model(net, torch.randn(1, 3, 32, 32))
    assert trace.sources["0"] == "" and trace.sources["2"] == "1" and trace.input_shapes["2"] == (1, 8, 8, 12)
    layouts = layer_layouts(net, trace)
    assert layouts["1.norm"] == layouts["1"] == layouts["2"] == layouts["3"] == "channels_last"
    assert layouts["0"] == "channels_last"  # no evidence of its own: the LayerNorm(12) that reads it says


def test_the_functional_grad_cam_reads_a_channels_last_layer_without_being_told():
    """``grad_cam(model, x)`` with no layer finds the channels-last ``norm`` of timm's Swin and reads it so; named,
    the LayerNorm over the last dimension says the layout: both equal the hand Grad-CAM read channels-last."""
    torch.manual_seed(0)
    net = _small_swin()
    x = torch.randn(2, 3, 32, 32)
    target = net(x).argmax(dim=1)
    right = hand_grad_cam(net, "norm", x, target, "nhwc")
    for layer in (None, "norm"):
        ours = grad_cam(net, x, target, layer)
        assert all(r > 0.99 for r in correlations(ours, right)), layer
