"""The CAM family on one seam, each against its reference: pytorch-grad-cam (Grad-CAM++, XGrad-CAM, Layer-CAM,
HiRes-CAM, Eigen-CAM, Score-CAM) and torchcam (CAM), on torchvision networks with random weights.

pytorch-grad-cam min-max normalises each map before and after its bilinear resize; ours is compared after the same.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    cam,
    eigen_cam,
    grad_cam,
    grad_cam_plus_plus,
    hires_cam,
    layer_cam,
    score_cam,
    xgrad_cam,
)

torchvision = pytest.importorskip("torchvision")
pgc = pytest.importorskip("pytorch_grad_cam")
targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

OURS = {
    "GradCAM": grad_cam,
    "GradCAMPlusPlus": grad_cam_plus_plus,
    "XGradCAM": xgrad_cam,
    "LayerCAM": layer_cam,
    "HiResCAM": hires_cam,
    "EigenCAM": eigen_cam,
    "ScoreCAM": score_cam,
}


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (1e-7 + flat.max(dim=1, keepdim=True).values)).reshape(maps.shape)


def _as_pytorch_grad_cam_shows(grid_maps: torch.Tensor, size) -> torch.Tensor:
    """Its post-processing: ReLU, min-max, bilinear resize to the input, min-max again."""
    resized = torch.nn.functional.interpolate(
        _minmax(grid_maps.clamp_min(0))[:, None], size=size, mode="bilinear", align_corners=False
    )
    return _minmax(resized[:, 0])


def _network(name: str, few_channels: bool = False) -> tuple[nn.Module, str]:
    """A network with random weights and the layer to explain (Score-CAM: one with few channels, as it runs one
    forward per channel)."""
    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=5).eval(), "layer1" if few_channels else "layer3"
    return torchvision.models.vgg11(num_classes=5).eval(), "features.4" if few_channels else "features.12"


@pytest.mark.parametrize("network", ["resnet18", "vgg11"])
@pytest.mark.parametrize("reference", sorted(OURS))
def test_cam_methods_match_pytorch_grad_cam(network, reference):
    model, layer = _network(network, few_channels=reference == "ScoreCAM")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 3])
    module = dict(model.named_modules())[layer]
    ours = OURS[reference](model, x, target, layer, relu=False, upsample=False)
    with getattr(pgc, reference)(model=model, target_layers=[module]) as method:
        theirs = torch.from_numpy(
            method(input_tensor=x, targets=[targets_module.ClassifierOutputTarget(int(t)) for t in target])
        ).float()
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills param.grad
    shown = _as_pytorch_grad_cam_shows(ours, (32, 32))
    if reference == "EigenCAM":  # an SVD's sign is arbitrary: ours is fixed to agree with the mean activation
        flipped = _as_pytorch_grad_cam_shows(-ours, (32, 32))
        for i in range(2):
            assert min(float((shown[i] - theirs[i]).abs().max()), float((flipped[i] - theirs[i]).abs().max())) < 2e-4
        return
    torch.testing.assert_close(shown, theirs, atol=2e-4, rtol=0)


def test_eigen_cam_sign_follows_the_mean_activation():
    activation = torch.zeros(1, 3, 4, 4)
    activation[0, :, 1, 1] = torch.tensor([5.0, 4.0, 6.0])  # one strongly active pixel
    model = nn.Sequential(nn.Identity())
    model.add_module("probe", nn.Identity())
    from lightning_interp.methods.cams.gradcam import cam_from_activation

    result = cam_from_activation(activation, torch.zeros_like(activation), method="eigen_cam", relu=False)
    assert result[0, 1, 1] == result[0].max() > 0  # the active pixel is the peak, never a trough


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cam_matches_torchcam(dtype):
    torchcam = pytest.importorskip("torchcam.methods")
    model, _ = _network("resnet18")
    model = model.to(dtype)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 48, 48, dtype=dtype)
    target = torch.tensor([0, 4, 2])
    ours = cam(model, x, target, "layer4", relu=False, upsample=False)
    with torchcam.CAM(model, target_layer="layer4", fc_layer="fc") as extractor:
        scores = model(x)
        theirs = extractor(class_idx=target.tolist(), scores=scores, normalized=False)[0]
    torch.testing.assert_close(ours.to(dtype), theirs.detach(), rtol=1e-5, atol=1e-5)
    # for a pooled-linear head CAM equals Grad-CAM up to a positive factor (1 / (h w)): the same map
    torch.testing.assert_close(
        _minmax(ours.float()), _minmax(grad_cam(model, x, target, "layer4", relu=False, upsample=False).float()),
        atol=1e-4, rtol=0,
    )  # fmt: skip


def test_cam_refuses_a_head_that_does_not_pool_the_layer():
    model, _ = _network("vgg11")  # vgg's classifier reads 7 x 7 x 512 values, not one per channel
    with pytest.raises(ValueError, match="not global average pooling"):
        cam(model, torch.randn(1, 3, 48, 48), 0, "features.18")


def test_score_cam_weights_are_a_softmax_of_masked_scores_by_hand():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)
    )
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        activation = net[1](net[0](x))
        masks = torch.nn.functional.interpolate(activation, size=(6, 6), mode="bilinear", align_corners=True)
        low, high = masks.amin(dim=(2, 3), keepdim=True), masks.amax(dim=(2, 3), keepdim=True)
        masks = (masks - low) / (high - low + 1e-8)
        scores = torch.stack([net(x * masks[:, k : k + 1])[0, 2] for k in range(2)])
        expected = (scores.softmax(dim=0)[:, None, None] * activation[0]).sum(dim=0).clamp_min(0)
    torch.testing.assert_close(score_cam(net, x, 2, "1", upsample=False, internal_batch_size=1)[0], expected)
