"""Ablation-CAM, FullGrad, Smooth Grad-CAM++, Guided Grad-CAM, Average Drop and Increase in Confidence (issue 30),
each side by side with its peer on the same model and inputs, and on cases computed by hand.

Tolerances: the pytorch-grad-cam comparisons go through its numpy / OpenCV post-processing (float32 min-max and a
cv2 bilinear resize) and agree to a few 1e-7 (5e-7 Ablation-CAM, 3e-6 FullGrad on a BatchNorm VGG, measured); the
bound is 2e-5 on maps that span [0, 1]. Captum's Guided Grad-CAM runs the same float32 operations (agreement 0.0
measured); the bound is 1e-5 of the largest value. torchcam's Smooth Grad-CAM++ is given our epsilon (1e-6 in the alpha
denominator; its default is 1e-8) and then runs the same float32 formula: bound 1e-5 relative.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    METHODS,
    ablation_cam,
    attribute,
    average_drop,
    full_grad,
    full_grad_biases,
    grad_cam,
    grad_cam_plus_plus,
    guided_grad_cam,
    increase_in_confidence,
    masked_confidence,
    plus_plus_weights,
    smooth_grad_cam_plus_plus,
)
from lightning_interp.methods.cams.perturbed import _plus_plus_weights
from lightning_interp.methods.model.core import attribution_pass, captured_outputs

torchvision = pytest.importorskip("torchvision")


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (1e-7 + flat.max(dim=1, keepdim=True).values)).reshape(maps.shape)


def _network(name: str) -> nn.Module:
    """A torchvision network with random weights and BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    model = (
        torchvision.models.resnet18(num_classes=5) if name == "resnet18" else torchvision.models.vgg11_bn(num_classes=5)
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32), torch.tensor([1, 3])


# --------------------------------------------------------------------------------------------- Ablation-CAM


@pytest.mark.parametrize(("network", "layer"), [("resnet18", "layer1"), ("vgg11_bn", "features.6")])
def test_ablation_cam_matches_pytorch_grad_cam(network, layer):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _network(network)
    x, target = _images()
    ours = ablation_cam(model, x, target, layer, relu=False, upsample=False)
    module = dict(model.named_modules())[layer]  # after a ReLU: pytorch-grad-cam zeroes the channel, as we do
    with pgc.AblationCAM(model=model, target_layers=[module]) as method, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.from_numpy(method(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target]))
    # its post-processing: ReLU, min-max, bilinear resize to the input, min-max again
    shown = nn.functional.interpolate(
        _minmax(ours.clamp_min(0))[:, None], size=(32, 32), mode="bilinear", align_corners=False
    )[:, 0]
    torch.testing.assert_close(_minmax(shown), theirs.float(), atol=2e-5, rtol=0)


def test_ablation_cam_weights_are_the_relative_score_drop_by_hand():
    # a linear head on the pooled layer: without channel k the score falls by W[c, k] * mean(A_k)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    x = torch.randn(2, 3, 6, 6)
    target = torch.tensor([0, 2])
    with torch.no_grad():
        activation = model[0](x)
        score = model(x).gather(1, target[:, None])[:, 0]
        weights = model[3].weight[target] * activation.mean(dim=(2, 3)) / score[:, None]
        expected = (weights[:, :, None, None] * activation).sum(dim=1)
    ours = ablation_cam(model, x, target, "0", relu=False, internal_batch_size=2)  # 3 forwards per sample
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


class _RowsSeen(nn.Module):
    """A convolution that records the rows of every input it gets and, with ``refuse_one``, refuses one row alone
    (as a layer built for a fixed batch size would)."""

    def __init__(self, refuse_one: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.refuse_one = refuse_one
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        if self.refuse_one and x.shape[0] == 1:
            raise RuntimeError("this layer needs the whole batch")
        return self.conv(x)


@pytest.mark.parametrize(
    ("refuse_one", "internal_batch_size", "rows"),
    [
        # the clean forward (2 samples), then per sample passes of 2, 2 and 1 copies, the layer on one row of each
        pytest.param(False, 2, [2, 1, 1, 1, 1, 1, 1], id="layer-on-one-row"),
        # one pass of 5 copies per sample: the layer refuses one row in the first, then runs on every copy
        pytest.param(True, 5, [2, 1, 5, 5], id="layer-on-every-copy"),
    ],
)
def test_ablation_cam_runs_the_layer_once_per_pass_on_one_row_and_touches_no_module(
    refuse_one, internal_batch_size, rows
):
    # the copies of a pass differ only at the layer's output: the layer runs on one row of them (or, when it
    # refuses, on all), the weights are the hand-computed relative score drops either way, and no hook is left
    torch.manual_seed(2)
    layer = _RowsSeen(refuse_one)
    model = nn.Sequential(layer, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    target = torch.tensor([0, 2])
    with torch.no_grad():
        activation = layer.conv(x)
        score = model(x).gather(1, target[:, None])[:, 0]
        weights = model[3].weight[target] * activation.mean(dim=(2, 3)) / score[:, None]
        expected = (weights[:, :, None, None] * activation).sum(dim=1)
    layer.rows.clear()
    ours = ablation_cam(model, x, target, "0", relu=False, internal_batch_size=internal_batch_size)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert layer.rows == rows
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# --------------------------------------------------------------------------------------------- FullGrad


@pytest.mark.parametrize("network", ["resnet18", "vgg11_bn"])
def test_full_grad_matches_pytorch_grad_cam(network):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _network(network)
    x, target = _images()
    ours = full_grad(model, x, target)
    with pgc.FullGrad(model=model, target_layers=[]) as method:
        theirs = torch.from_numpy(method(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target]))
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills param.grad
    assert ours.shape == x.shape
    torch.testing.assert_close(ours[:, 0], ours[:, 2])  # the map shared equally by the channels
    torch.testing.assert_close(ours.sum(dim=1), theirs.float(), atol=2e-5, rtol=0)
    assert float(theirs.amax()) == pytest.approx(1.0, abs=1e-6)


def test_full_grad_without_biases_is_the_rescaled_input_times_gradient_by_hand():
    # a linear model: the gradient is the weight, and there is no convolution or BatchNorm bias
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3, bias=False))
    x = torch.randn(2, 2, 4, 4)
    assert full_grad_biases(model) == []
    term = (x * model[1].weight[1].reshape(2, 4, 4)).abs()

    def rescale(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        shifted = values - values.amin(dim=dims, keepdim=True)
        return shifted / (1e-7 + shifted.amax(dim=dims, keepdim=True))

    for scaling, dims in (("channel", (2, 3)), ("layer", (1, 2, 3))):
        expected = _minmax(rescale(term, dims).sum(dim=1))
        ours = full_grad(model, x, 1, scaling=scaling).sum(dim=1)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(full_grad(model, x, 1, scaling="layer"), full_grad(model, x, 1, scaling="channel"))


def test_full_grad_counts_batchnorm_by_its_eval_bias():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
        bn.weight.copy_(torch.tensor([2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    (name, bias), = full_grad_biases(nn.Sequential(bn))  # fmt: skip
    expected = torch.tensor([0.5 - 1.0 * 2.0 / (4.0 + 1e-5) ** 0.5, 0.0 + 2.0 * 3.0 / (1.0 + 1e-5) ** 0.5])
    assert name == "0"
    torch.testing.assert_close(bias, expected)
    with pytest.raises(ValueError, match="running statistics"):
        full_grad_biases(nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match="images"):
        full_grad(nn.Linear(3, 2), torch.randn(2, 3))


# --------------------------------------------------------------------------------------------- Guided Grad-CAM


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_guided_grad_cam_matches_captum(mode):
    captum_attr = pytest.importorskip("captum.attr")
    model = _network("vgg11_bn")
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # Captum's guided backprop hooks the ReLUs' outputs
    x, target = _images()
    ours = guided_grad_cam(model, x, target, cam_layer="features.14", interpolate_mode=mode)
    theirs = captum_attr.GuidedGradCam(model, model.features[14]).attribute(x, target, interpolate_mode=mode)
    assert float(theirs.abs().amax()) > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().amax()))


def test_guided_grad_cam_is_guided_backprop_times_the_upsampled_grad_cam():
    model = _network("resnet18")
    x, target = _images()
    cam = grad_cam(model, x, target, "layer3")  # bilinear, align_corners=False
    guided = attribute("guided_backprop", model, x, target)
    torch.testing.assert_close(guided_grad_cam(model, x, target, cam_layer="layer3"), guided * cam[:, None])
    spec = METHODS["guided_grad_cam"]
    assert not spec.needs_layer and "cam_layer" in spec.options  # an input attribution: SaliencyCallback's
    with pytest.raises(ValueError, match="images"):
        guided_grad_cam(nn.Linear(3, 2), torch.randn(2, 3))


# --------------------------------------------------------------------------------------------- Smooth Grad-CAM++


class _RoundedNet(nn.Module):
    """The explained layer (``relu``) sees the rounded input, so small noise leaves its activation as it is, while
    the head's gain comes from the raw, noisy input: the layer's gradient changes with the noise but is constant over
    the layer's positions (a pooled head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.gate = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.head.weight.mul_(64.0)  # gradients of order 0.1 at the layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.relu(self.conv(x.round())).mean(dim=(2, 3))
        gain = 1 + torch.tanh(self.gate(x).mean(dim=(2, 3)))
        return self.head(pooled * gain)


def _our_noise(shape: torch.Size, n_samples: int, std: float, seed: int) -> torch.Tensor:
    """Our draws: one (n_samples, *shape) standard normal block from the generator (internal_batch_size=None)."""
    return torch.randn((n_samples, *shape), generator=torch.Generator().manual_seed(seed)) * std


def test_smooth_grad_cam_plus_plus_matches_torchcam_on_the_same_noise():
    torchcam = pytest.importorskip("torchcam.methods")
    torch.manual_seed(4)
    model = _RoundedNet().eval()
    x = torch.randint(-2, 3, (2, 3, 8, 8)).float()
    target = torch.tensor([0, 2])
    std = 0.1
    noise = _our_noise(x.shape, 1, std, seed=7)
    assert torch.equal((x + noise[0]).round(), x)  # the layer sees the same activation on every copy
    generator = torch.Generator().manual_seed(7)
    ours = smooth_grad_cam_plus_plus(
        model, x, target, "relu", n_samples=1, stdevs=std, generator=generator, upsample=False
    )
    # one copy: torchcam's last copy's gradient is the average; with a rounded input, its last copy's activation is
    # the clean one; with a pooled head, its sum_ab A G3 is sum_ab(A) G3
    with torchcam.SmoothGradCAMpp(model, "relu", num_samples=1, std=std, input_shape=(3, 8, 8)) as extractor:
        extractor._distrib = SimpleNamespace(sample=lambda size: noise[0])
        scores = model(x)
        theirs = extractor(class_idx=target.tolist(), scores=scores, normalized=False, eps=1e-6)[0]  # our eps
    assert float(theirs.amax()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.amax()))


@pytest.mark.parametrize(
    ("batch", "internal_batch_size"),
    [
        pytest.param(2, None, id="one-pass-of-4-copies"),
        pytest.param(40, None, id="4-passes-of-one-copy"),  # 64 // 40: one copy of the batch per pass
        pytest.param(2, 4, id="2-passes-of-2-copies"),
    ],
)
def test_smooth_grad_cam_plus_plus_is_grad_cam_plus_plus_of_the_averaged_gradient_powers(batch, internal_batch_size):
    # the paper's definition, by hand: gradients of each noisy copy from autograd, their powers averaged; however
    # the copies are split into passes (the sums are accumulated in place across passes)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    model.append(nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))
    model.eval()
    x = torch.randn(batch, 3, 6, 6)
    target = torch.arange(batch) % 3
    n, std = 4, 0.2
    noise = _our_noise(x.shape, n, std, seed=11)
    with torch.no_grad():
        activation = model[:2](x)
    grads = []
    for copy in range(n):
        hidden = model[:2](x + noise[copy]).detach().requires_grad_(True)
        score = model[2:](hidden).gather(1, target[:, None]).sum()
        grads.append(torch.autograd.grad(score, hidden)[0])
    stack = torch.stack(grads)
    g1, g2, g3 = stack.mean(0), stack.pow(2).mean(0), stack.pow(3).mean(0)
    alpha = g2 / (2 * g2 + activation.sum(dim=(2, 3), keepdim=True) * g3 + 1e-6)
    weights = (g1.clamp_min(0) * torch.where(g2 != 0, alpha, 0)).sum(dim=(2, 3), keepdim=True)
    expected = (weights * activation).sum(dim=1).clamp_min(0)
    generator = torch.Generator().manual_seed(11)
    ours = smooth_grad_cam_plus_plus(
        model, x, target, "1", n_samples=n, stdevs=std, generator=generator, internal_batch_size=internal_batch_size
    )
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plus_plus_weights(activation, g1, g2, g3), weights)


def _in_place_after_the_layer() -> nn.Module:
    torch.manual_seed(7)
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), head)


@pytest.mark.parametrize("layer", ["0", "1"], ids=["written-in-place-after", "not-written"])
def test_attribution_pass_without_copies_is_the_pass_with_copies(layer):
    # the layer's output handed on uncopied: where the in-place ReLU after it writes into it, the pass runs again
    # with copies; either way the gradient is the one with respect to the layer's own output
    model = _in_place_after_the_layer().eval()
    x, target = torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 2])
    module = model.get_submodule(layer)
    with torch.no_grad(), captured_outputs([module], copy=False) as outputs:
        model(x)
    assert outputs.overwritten() == (layer == "0")
    copied = attribution_pass(model, x, target, layers=[layer])
    uncopied = attribution_pass(model, x, target, layers=[layer], copy_outputs=False)
    assert torch.equal(copied.activations[0], uncopied.activations[0])
    assert torch.equal(copied.activation_grads[0], uncopied.activation_grads[0])
    assert torch.equal(copied.input_grad, uncopied.input_grad)
    if layer == "0":  # the gradient at the convolution's output, before the ReLU: zero where the ReLU cut
        assert bool((copied.activation_grads[0][copied.activations[0] < 0] == 0).all())
        assert bool((copied.activation_grads[0][copied.activations[0] > 0] != 0).any())


def test_smooth_grad_cam_plus_plus_of_a_layer_written_in_place_after_it_by_hand():
    # the convolution's output is overwritten by the in-place ReLU after it: the map weights the convolution's own
    # output by the gradients with respect to it (by hand: the ReLU applied out of place)
    model = _in_place_after_the_layer().eval()
    x, target = torch.randn(2, 3, 6, 6), torch.tensor([1, 2])
    n, std = 3, 0.2
    noise = _our_noise(x.shape, n, std, seed=13)
    with torch.no_grad():
        activation = model[0](x)
    grads = []
    for copy in range(n):
        hidden = model[0](x + noise[copy]).detach().requires_grad_(True)
        score = model[3](model[2](torch.relu(hidden))).gather(1, target[:, None]).sum()
        grads.append(torch.autograd.grad(score, hidden)[0])
    stack = torch.stack(grads)
    g1, g2, g3 = stack.mean(0), stack.pow(2).mean(0), stack.pow(3).mean(0)
    alpha = torch.where(g2 != 0, g2 / (2 * g2 + activation.sum(dim=(2, 3), keepdim=True) * g3 + 1e-6), 0)
    expected = ((g1.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True) * activation).sum(dim=1).clamp_min(0)
    assert float(expected.amax()) > 0 and bool((activation < 0).any())
    generator = torch.Generator().manual_seed(13)
    ours = smooth_grad_cam_plus_plus(model, x, target, "0", n_samples=n, stdevs=std, generator=generator)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_plus_plus_weights_in_place_are_the_formula_bitwise_with_zero_gradients_and_non_finite_sums():
    # the weights of Smooth Grad-CAM++'s own buffers (computed in place, the mask skipped where it cannot matter)
    # against the formula written out; zero gradients give a = 0 by definition, an inf or NaN activation sum is
    # where the mask matters
    torch.manual_seed(6)
    activation = torch.rand(2, 3, 4, 4)
    activation[1, 2, 0, 0] = float("inf")
    grads = torch.randn(3, 2, 3, 4, 4)
    grads[:, 0, 1] = 0  # a channel with no gradient in any copy
    grads[:, 1, :, 2:] = 0  # and half of every channel of the second sample
    g1, g2, g3 = grads.mean(0), grads.pow(2).mean(0), grads.pow(3).mean(0)
    for finite in (True, False):
        act = activation if not finite else activation.nan_to_num(posinf=5.0)
        total = act.sum(dim=(2, 3), keepdim=True)
        alpha = torch.where(g2 != 0, g2 / (2 * g2 + total * g3 + 1e-6), 0)
        expected = (g1.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)
        assert expected.isfinite().all()  # the inf sum's zero-gradient positions are masked, not NaN
        own = _plus_plus_weights(act, g1.clone(), g2.clone(), g3.clone(), own=True)
        torch.testing.assert_close(own, expected, rtol=0, atol=0)
        torch.testing.assert_close(plus_plus_weights(act, g1, g2, g3), expected, rtol=0, atol=0)


def test_smooth_grad_cam_plus_plus_without_noise_is_grad_cam_plus_plus():
    model = _network("resnet18")
    x, target = _images()
    generator = torch.Generator().manual_seed(0)
    smooth = smooth_grad_cam_plus_plus(model, x, target, "layer3", n_samples=3, stdevs=0.0, generator=generator)
    torch.testing.assert_close(smooth, grad_cam_plus_plus(model, x, target, "layer3"), rtol=1e-5, atol=1e-6)
    assert METHODS["smooth_grad_cam_plus_plus"].stochastic and METHODS["smooth_grad_cam_plus_plus"].needs_layer


# --------------------------------------------------------------------------------------------- Average Drop, Increase


def _two_logit_net(first: tuple[float, float], second: tuple[float, float]) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([first, second]))
    return net


def test_average_drop_and_increase_in_confidence_by_hand():
    # two pixels of value 1; the maps rescale to [0, 1] per sample: [2, 1] -> [1, 0] and [0, 4] -> [0, 1]
    x = torch.ones(2, 1, 1, 2)
    maps = torch.tensor([[[2.0, 1.0]], [[0.0, 4.0]]])
    net = _two_logit_net((1.0, 0.0), (0.0, 1.0))  # logits = the two pixels

    def softmax(a: float, b: float) -> torch.Tensor:  # probability of the first of two logits
        return torch.tensor(a).exp() / (torch.tensor(a).exp() + torch.tensor(b).exp())

    # class 0 starts at 1/2; sample 0 keeps (1, 0): it rises to softmax(1, 0); sample 1 keeps (0, 1): it falls
    before, after = masked_confidence(net, x, maps, 0)
    torch.testing.assert_close(before, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(after, torch.stack([softmax(1.0, 0.0), softmax(0.0, 1.0)]))
    drop = average_drop(net, x, maps, 0)
    torch.testing.assert_close(drop, torch.stack([torch.tensor(0.0), (0.5 - softmax(0.0, 1.0)) / 0.5]))
    torch.testing.assert_close(increase_in_confidence(net, x, maps, 0), torch.tensor([1.0, 0.0]))


def test_confidence_metrics_match_pytorch_grad_cam():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = _network("resnet18")
    torch.manual_seed(6)
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cams = _minmax(grad_cam(model, x, target, "layer2"))  # pytorch-grad-cam's metrics take maps in [0, 1]
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target]
    before, _ = masked_confidence(model, x, cams, target)
    their_drop = torch.from_numpy(DropInConfidence()(x, cams.numpy(), targets, model)).float()  # Y - O, not / Y
    their_increase = torch.from_numpy(IncreaseInConfidence()(x, cams.numpy(), targets, model)).float()
    torch.testing.assert_close(average_drop(model, x, cams, target) * before, their_drop, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(increase_in_confidence(model, x, cams, target), their_increase)
