"""Grad-CAM against hand-computed maps, and the automatic choice of its target layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import cam_from_activation, find_target_layer, grad_cam, spatial_layers

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def _gap_net(seed: int = 0, relu_after_conv: bool = False) -> nn.Sequential:
    """conv(2->3, stride 2) [-> ReLU] -> global average pool -> linear(3->4), fixed random weights."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    head = nn.Linear(3, 4)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
        head.weight.normal_()
    middle = [nn.ReLU()] if relu_after_conv else []
    return nn.Sequential(conv, *middle, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _conv_activation64(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv = net[0]
    return F.conv2d(x.double(), conv.weight.detach().double(), conv.bias.detach().double(), stride=2, padding=1)


def test_grad_cam_of_conv_gap_linear_net_matches_hand_computation():
    net = _gap_net()
    torch.manual_seed(1)
    x = torch.randn(3, 2, 8, 8)
    target = torch.tensor([0, 3, 1])
    activation = _conv_activation64(net, x)  # (B, K, 4, 4)
    h, w = activation.shape[-2:]
    # score_c = sum_k W[c, k] * mean_ij A_kij + b_c, so d score_c / d A_kij = W[c, k] / (h w) for every (i, j)
    channel_weights = net[-1].weight.detach().double()[target] / (h * w)  # (B, K)
    expected = (channel_weights[:, :, None, None] * activation).sum(dim=1)

    signed = grad_cam(net, x, target, "0", relu=False, upsample=False)
    assert signed.shape == (3, 4, 4) and signed.dtype == torch.float32
    torch.testing.assert_close(signed.double(), expected, rtol=1e-5, atol=1e-6)
    assert (signed < 0).any(), "with relu=False negative evidence is kept"

    cam = grad_cam(net, x, target, "0", upsample=False)
    torch.testing.assert_close(cam.double(), expected.clamp_min(0), rtol=1e-5, atol=1e-6)
    assert (cam >= 0).all()


def test_grad_cam_channel_weights_are_mean_gradients_through_a_relu():
    # layer = conv, followed by ReLU: d score_c / d A_kij = W[c, k] / (h w) * [A_kij > 0]
    net = _gap_net(seed=2, relu_after_conv=True)
    torch.manual_seed(3)
    x = torch.randn(2, 2, 8, 8)
    activation = _conv_activation64(net, x)
    h, w = activation.shape[-2:]
    positive_share = (activation > 0).double().mean(dim=(2, 3))  # (B, K)
    channel_weights = net[-1].weight.detach().double()[2] / (h * w) * positive_share
    expected = (channel_weights[:, :, None, None] * activation).sum(dim=1)
    assert ((positive_share > 0) & (positive_share < 1)).any(), "precondition: the ReLU gate matters"

    result = grad_cam(net, x, 2, "0", relu=False, upsample=False)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


def test_grad_cam_upsampling_is_bilinear_without_aligned_corners():
    net = _gap_net()
    x = torch.randn(2, 2, 8, 8)
    small = grad_cam(net, x, 1, "0", upsample=False)
    big = grad_cam(net, x, 1, "0", upsample=True)
    assert big.shape == (2, 8, 8)
    expected = F.interpolate(small[:, None].double(), size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(big.double(), expected, rtol=1e-5, atol=1e-6)


def test_grad_cam_upsamples_to_non_square_inputs():
    net = _gap_net()
    x = torch.randn(1, 2, 6, 10)
    assert grad_cam(net, x, 0, "0").shape == (1, 6, 10)
    assert grad_cam(net, x, 0, "0", upsample=False).shape == (1, 3, 5)


def test_grad_cam_none_target_uses_predicted_class():
    net = _gap_net()
    torch.manual_seed(4)
    x = 3 * torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        predicted = net(x).argmax(dim=1)
    torch.testing.assert_close(grad_cam(net, x, None, "0", relu=False), grad_cam(net, x, predicted, "0", relu=False))


def test_layer_as_module_or_dotted_name_gives_the_same_map():
    net = nn.Sequential(_gap_net())  # nested, so the name is dotted
    x = torch.randn(2, 2, 8, 8)
    by_name = grad_cam(net, x, 1, "0.0", relu=False)
    by_module = grad_cam(net, x, 1, net[0][0], relu=False)
    torch.testing.assert_close(by_name, by_module, rtol=0, atol=0)


def test_cam_from_activation_with_constant_gradients():
    activation = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3) - 10
    grad = torch.stack([torch.full((3, 3), 0.25), torch.full((3, 3), -1.0)])[None]
    expected = 0.25 * activation[:, 0] - 1.0 * activation[:, 1]
    torch.testing.assert_close(cam_from_activation(activation, grad, relu=False), expected)
    torch.testing.assert_close(cam_from_activation(activation, grad), expected.clamp_min(0))


def test_cam_from_activation_rejects_non_spatial_activation_with_hint():
    with pytest.raises(ValueError, match="reshape"):
        cam_from_activation(torch.randn(2, 5, 8), torch.randn(2, 5, 8))


# --------------------------------------------------------------------------- automatic target layer


def test_find_target_layer_resnet18_is_layer4(resnet18):
    assert find_target_layer(resnet18, torch.randn(1, 3, 64, 64)) == "layer4"


def test_find_target_layer_mobilenet_v3_small_is_features():
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    assert find_target_layer(model, torch.randn(1, 3, 64, 64)) == "features"


def test_find_target_layer_restores_modes_hooks_and_batchnorm_stats(resnet18):
    model = resnet18.train()
    bn = model.bn1
    stats = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    find_target_layer(model, torch.randn(5, 3, 64, 64))
    assert all(module.training for module in model.modules())
    assert all(not module._forward_hooks for module in model.modules())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])


def test_spatial_layers_reports_shapes_in_completion_order_from_one_sample():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append((x.shape[0], torch.is_grad_enabled()))
            return x * 1.0

    net = nn.Sequential(
        Recorder(),
        nn.Conv2d(1, 2, 3),
        nn.Identity(),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    found = spatial_layers(net, torch.randn(3, 1, 10, 10))
    # Identity and Dropout only repeat their input: not candidates; an in-place ReLU is one
    expected = [("0", (1, 1, 10, 10)), ("1", (1, 2, 8, 8)), ("3", (1, 2, 8, 8)), ("5", (1, 2, 4, 4))]
    assert found == expected
    assert seen == [(1, False)], "one dry forward of the first sample, without autograd"


def test_find_target_layer_skips_trailing_pass_through_modules():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Identity(), nn.Dropout(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    assert find_target_layer(net.train(), torch.randn(1, 1, 6, 6)) == "1"


def test_spatial_layers_skips_modules_called_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.last = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.last(self.conv(self.conv(x))).mean(dim=(2, 3))

    names = [name for name, _ in spatial_layers(Twice(), torch.randn(1, 2, 6, 6))]
    assert names == ["last"]


def test_find_target_layer_without_spatial_layer_raises_with_fix():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ValueError) as info:
        find_target_layer(mlp, torch.randn(2, 8))
    message = str(info.value)
    assert "layer" in message and "reshape=" in message
    with pytest.raises(ValueError, match="spatial"):
        grad_cam(mlp, torch.randn(2, 8), 0)


class _TinyViT(nn.Module):
    """Patch embedding -> class token + 16 patch tokens -> MLP block -> LayerNorm -> head on the class token."""

    grid = 4

    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.norm(tokens + self.block(tokens))
        mixed = tokens[:, 0] + tokens[:, 1:].mean(dim=1)
        return self.head(mixed)


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    batch, count, dim = tokens.shape
    side = _TinyViT.grid
    if count != side * side + 1:
        raise ValueError("not a token grid")
    return tokens[:, 1:].transpose(1, 2).reshape(batch, dim, side, side)


def test_token_model_with_reshape_is_accepted_and_matches_manual_cam():
    torch.manual_seed(0)
    vit = _TinyViT()
    x = torch.randn(2, 3, 16, 16)
    # the token layout (one class token before a 4 x 4 patch grid) is read from the model; a reshape gives the same
    assert find_target_layer(vit, x) == "norm"
    assert find_target_layer(vit, x, reshape=_tokens_to_grid) == "norm"
    torch.testing.assert_close(grad_cam(vit, x, 1, "norm"), grad_cam(vit, x, 1, "norm", reshape=_tokens_to_grid))

    cam = grad_cam(vit, x, 1, None, reshape=_tokens_to_grid, relu=False, upsample=False)
    assert cam.shape == (2, 4, 4)

    # manual reference: capture the norm output, differentiate the class-1 score with respect to it
    captured = {}
    handle = vit.norm.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
    try:
        score = vit(x)[:, 1].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, captured["out"])
    activation, grad = _tokens_to_grid(captured["out"].detach()), _tokens_to_grid(grad)
    expected = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-6)
    assert grad_cam(vit, x, 1, None, reshape=_tokens_to_grid).shape == (2, 16, 16)


def test_unknown_layer_name_suggests_close_real_name(resnet18):
    with pytest.raises(ValueError, match="'layer4'") as info:
        grad_cam(resnet18, torch.randn(1, 3, 64, 64), 0, "layer5")
    assert "layer5" in str(info.value)


def test_layer_of_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match="dotted name"):
        grad_cam(_gap_net(), torch.randn(1, 2, 8, 8), 0, 3)


def test_layer_not_called_in_forward_raises():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _gap_net()
            self.unused = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    with pytest.raises(RuntimeError, match="no tensor output"):
        grad_cam(model, torch.randn(1, 2, 8, 8), 0, "unused")
    assert not model.unused._forward_hooks


def test_grad_cam_works_with_frozen_backbone():
    net = _gap_net()
    x = torch.randn(2, 2, 8, 8)
    expected = grad_cam(net, x, 1, "0")
    for parameter in net[0].parameters():
        parameter.requires_grad_(False)
    torch.testing.assert_close(grad_cam(net, x, 1, "0"), expected)


def test_grad_cam_works_with_fully_frozen_model():
    net = _gap_net()
    x = torch.randn(2, 2, 8, 8)
    expected = grad_cam(net, x, 1, "0")
    net.requires_grad_(False)
    torch.testing.assert_close(grad_cam(net, x, 1, "0"), expected)


def test_an_in_place_relu_after_the_layer_does_not_change_its_map():
    # the captured activation and its gradient must be the layer's own output, not what a later in-place op made of it
    torch.manual_seed(0)

    def net(inplace: bool) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )

    out_of_place, in_place = net(False), net(True)
    in_place.load_state_dict(out_of_place.state_dict())
    x = torch.randn(4, 3, 8, 8)
    expected = grad_cam(out_of_place, x, 1, "1", relu=False)
    found = grad_cam(in_place, x, 1, "1", relu=False)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        activation = out_of_place[1](out_of_place[0](x))
    assert (activation < 0).float().mean() > 0.2, "the ReLU changes the activation a lot, so a wrong capture shows"


def _vit(**options):
    from torchvision.models import VisionTransformer

    settings = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
    settings.update(options)
    return VisionTransformer(num_classes=4, **settings).eval()


def _normalise_like_pytorch_grad_cam(cam: torch.Tensor, size) -> torch.Tensor:
    """pytorch-grad-cam's (c - min) / (1e-7 + max) per map, before and after its bilinear resize."""

    def minmax(c):
        flat = c.reshape(c.shape[0], -1)
        flat = flat - flat.min(dim=1, keepdim=True).values
        return (flat / (1e-7 + flat.max(dim=1, keepdim=True).values)).reshape(c.shape)

    resized = torch.nn.functional.interpolate(minmax(cam)[:, None], size=size, mode="bilinear", align_corners=False)
    return minmax(resized[:, 0])


def test_torchvision_vit_auto_layer_is_the_last_blocks_first_norm_even_with_its_zero_head():
    torch.manual_seed(0)
    vit = _vit(num_layers=3)
    assert float(vit.heads.head.weight.abs().sum()) == 0  # torchvision initialises the head to zero
    x = torch.randn(2, 3, 32, 32)
    assert find_target_layer(vit, x) == "encoder.layers.encoder_layer_2.ln_1"
    with torch.no_grad():
        vit.heads.head.weight.normal_()
    assert find_target_layer(vit, x) == "encoder.layers.encoder_layer_2.ln_1"
    # after the last block's attention, patch tokens reach nothing: exactly zero maps, the reason 'auto' avoids them
    for late in ("encoder.layers.encoder_layer_2", "encoder.ln"):
        assert float(grad_cam(vit, x, 0, late, relu=False).abs().max()) == 0.0
    assert float(grad_cam(vit, x, 0).abs().max()) > 0


def test_torchvision_vit_grad_cam_matches_pytorch_grad_cam_with_its_reshape_transform():
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    torch.manual_seed(1)
    vit = _vit(image_size=48, patch_size=8)
    with torch.no_grad():
        vit.heads.head.weight.normal_()
    x = torch.randn(3, 3, 48, 48)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    target = torch.tensor([0, 2, 3])

    def reshape_transform(tokens):  # pytorch-grad-cam's documented ViT recipe: drop the class token, 6 x 6 grid
        return tokens[:, 1:, :].reshape(tokens.shape[0], 6, 6, tokens.shape[2]).permute(0, 3, 1, 2)

    ours = _normalise_like_pytorch_grad_cam(grad_cam(vit, x, target, layer, upsample=False), (48, 48))
    module = dict(vit.named_modules())[layer]
    with pgc.GradCAM(model=vit, target_layers=[module], reshape_transform=reshape_transform) as cam:
        theirs = cam(input_tensor=x, targets=[targets_module.ClassifierOutputTarget(int(t)) for t in target])
    torch.testing.assert_close(ours, torch.from_numpy(theirs).float(), atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    ("options", "prefix", "layer"),
    [
        ({}, 1, "blocks.1.norm1"),
        ({"reg_tokens": 4}, 5, "blocks.1.norm1"),
        ({"class_token": False, "global_pool": "avg"}, 0, "blocks"),
        ({"global_pool": "avg"}, 1, "blocks"),
        ({"img_size": (32, 48)}, 1, "blocks.1.norm1"),
    ],
    ids=["class-token", "registers", "no-class-token", "avg-pool", "non-square"],
)
def test_timm_vit_token_layouts_and_auto_layer(options, prefix, layer):
    timm = pytest.importorskip("timm")
    from lightning_interp.methods.model.tokens import TokenGrid, token_grids
    from lightning_interp.methods.model.trace import trace_model

    settings = {"pretrained": False, "img_size": 32, "patch_size": 8, "num_classes": 4, "depth": 2}
    settings.update(options)
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", **settings).eval()
    height, width = (settings["img_size"],) * 2 if isinstance(settings["img_size"], int) else settings["img_size"]
    x = torch.randn(2, 3, height, width)
    grids = token_grids(trace_model(model, x))
    assert grids["blocks.0"] == TokenGrid(prefix, height // 8, width // 8)
    assert find_target_layer(model, x) == layer
    cam = grad_cam(model, x, None, layer, relu=False, upsample=False)
    # reference: the patch tokens of the captured output and its gradient, reshaped by hand
    captured = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
    try:
        scores = model(x)
    finally:
        handle.remove()
    target = scores.argmax(dim=1)
    (grad,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), captured["out"])

    def by_hand(tokens):
        return tokens[:, prefix:].reshape(2, height // 8, width // 8, -1).permute(0, 3, 1, 2)

    activation, grad = by_hand(captured["out"].detach()), by_hand(grad)
    expected = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
    assert float(cam.abs().max()) > 0


def test_a_cnn_with_an_attention_block_in_the_middle_keeps_its_later_conv_layers():
    class Attention(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(channels)
            self.mix = nn.MultiheadAttention(channels, 2, batch_first=True)

        def forward(self, x):
            b, c, h, w = x.shape
            tokens = self.norm(x.flatten(2).transpose(1, 2))
            return x + self.mix(tokens, tokens, tokens)[0].transpose(1, 2).reshape(b, c, h, w)

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Attention(8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    names = [name for name, _ in spatial_layers(net, x)]
    assert names[-2:] == ["3", "4"] and find_target_layer(net, x) == "4"


def test_timm_vit_with_nine_leading_tokens_and_a_two_output_regression():
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    many = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4, depth=2, reg_tokens=8
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    assert find_target_layer(many, x) == "blocks.1.norm1"  # 1 class + 8 register tokens before the 4 x 4 grid
    two_outputs = _vit(num_layers=1)
    two_outputs.heads.head = nn.Linear(32, 2)
    cam = grad_cam(two_outputs, x, 1, None, task="regression")  # the given output, also for the automatic layer
    assert cam.shape == (2, 32, 32)


def test_timm_vit_with_a_channels_last_patch_embedding():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    net = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=2, dynamic_img_size=True
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    names = [name for name, _ in spatial_layers(net, x)]
    assert "patch_embed" not in names  # (B, h, w, C): its channels must not become the map's width
    assert find_target_layer(net, x) == "blocks.1.norm1"
    assert grad_cam(net, x, None, None, upsample=False).shape == (2, 4, 4)
    del timm
