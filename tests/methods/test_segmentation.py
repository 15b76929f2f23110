"""Segmentation targets: class c's scores summed (or averaged) over a region, against autograd and pytorch-grad-cam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    RegionScores,
    SegmentationTarget,
    attribute,
    class_regions,
    dense_output,
    dominant_class,
    grad_cam,
    gradient,
    integrated_gradients,
    present_classes,
    reduce_regions,
    scores_from_output,
    segmentation_target,
    smoothgrad,
)
from lightning_interp.probe import ParsedBatch, ProbeSet, parse_batch

torchvision = pytest.importorskip("torchvision")
segmentation = torchvision.models.segmentation


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False).eval()


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    return segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()


def _inputs(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hand_gradient(model, x, target, regions, reduce="sum"):
    """d/dx of sum_b (sum or mean of model(x)['out'][b, target[b]] over regions[b]), by autograd."""
    x = x.clone().requires_grad_(True)
    out = model(x)["out"]
    total = 0.0
    for b in range(x.shape[0]):
        values = out[b, int(target[b])][regions[b]]
        total = total + (values.sum() if reduce == "sum" else values.sum() / max(int(regions[b].sum()), 1))
    (grad,) = torch.autograd.grad(total, x)
    return grad


def test_torchvision_dict_outputs_are_read_and_dense_scores_get_a_segmentation_hint(fcn):
    out = fcn(_inputs())
    assert dense_output(out) is out["out"]
    with pytest.raises(ValueError, match="segmentation_target"):
        scores_from_output(out, None)
    assert dense_output(torch.zeros(2, 3)) is None


def test_gradient_over_a_given_region_is_autograd_of_the_summed_class_logits(fcn):
    x = _inputs()
    region = torch.zeros(2, 32, 32, dtype=torch.bool)
    region[0, 4:12, 4:20] = True
    region[1, 16:30, 10:14] = True
    target, transform = segmentation_target(fcn, x, torch.tensor([1, 2]), region=region)
    ours = gradient(fcn, x, target, output_transform=transform)
    expected = _hand_gradient(fcn, x, target, region)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_predicted_region_and_mean_reduction_match_autograd(deeplab):
    x = _inputs(3)
    with torch.no_grad():
        predicted = deeplab(x)["out"].argmax(dim=1)
    target, transform = segmentation_target(deeplab, x, "pred", region="predicted", reduce="mean", background=None)
    # "pred" with no background: the class with the largest predicted area, counted independently here
    counts = torch.stack([(predicted == c).sum(dim=(1, 2)) for c in range(3)], dim=1)
    assert target.tolist() == counts.argmax(dim=1).tolist()
    regions = predicted == target[:, None, None]
    assert torch.equal(transform.region_of(target), regions)
    ours = gradient(deeplab, x, target, output_transform=transform)
    torch.testing.assert_close(ours, _hand_gradient(deeplab, x, target, regions, "mean"), rtol=1e-4, atol=1e-7)


def test_label_region_leaves_the_ignore_index_out():
    dense = torch.randn(1, 3, 4, 4)
    class_map = torch.tensor([[[0, 1, 1, 255], [1, 1, 2, 2], [0, 0, 0, 0], [255, 255, 1, 1]]])
    regions = class_regions("label", dense, class_map)
    scores = reduce_regions(dense, regions)
    for c in range(3):
        inside = class_map[0] == c
        assert float(scores[0, c]) == pytest.approx(float(dense[0, c][inside].sum()), rel=1e-6)


def test_copies_share_their_sample_region_and_other_batch_sizes_are_refused():
    dense = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    regions = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    copies = reduce_regions(dense.repeat(3, 1, 1, 1), regions)
    assert torch.equal(copies, reduce_regions(dense, regions).repeat(3, 1))
    assert copies[:2, 0].tolist() == [0.0, 11.0]  # sample 0: pixel (0, 0); sample 1: pixel (1, 1) of class 0
    with pytest.raises(ValueError, match="whole copies"):
        reduce_regions(dense[:1].repeat(3, 1, 1, 1), regions)


def test_smoothgrad_and_integrated_gradients_explain_the_region_of_each_copy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 3, 3, padding=1)).eval()
    x = _inputs(2, 16)
    target, transform = segmentation_target(net, x, 1, region="predicted", background=None)
    regions = transform.region_of(target)
    assert bool(regions.any())
    sg = smoothgrad(net, x, target, n_samples=3, output_transform=transform, generator=torch.Generator())
    assert sg.shape == x.shape and bool(torch.isfinite(sg).all())
    ig = integrated_gradients(net, x, target, n_steps=64, output_transform=transform)
    # completeness: the attributions add up to f(x) - f(0), f = class 1's scores summed over the clean region
    with torch.no_grad():
        f = [(net(x)[b, 1] - net(torch.zeros_like(x))[b, 1])[regions[b]].sum() for b in range(2)]
    total = ig.reshape(2, -1).sum(dim=1)
    expected = torch.stack(f)
    assert float(expected.abs().min()) > 0.1
    torch.testing.assert_close(total, expected, rtol=1e-2, atol=1e-3)


def test_occlusion_drops_are_region_score_differences():
    net = nn.Conv2d(1, 2, 1, bias=False)  # per-pixel logits: the drop of a window is what it removes from the region
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[[[1.0]]], [[[-1.0]]]]))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, :2, :2] = True
    target, transform = segmentation_target(net, x, 0, region=region)
    maps = attribute("occlusion", net, x, target, output_transform=transform, window=1, stride=1)
    expected = torch.where(region[:, None], x, torch.zeros_like(x))  # occluding a pixel removes x from the sum
    torch.testing.assert_close(maps, expected)


def test_grad_cam_matches_pytorch_grad_cam_semantic_segmentation_target(deeplab):
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    class OutOnly(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    x = _inputs(1, 64)
    with torch.no_grad():
        predicted = deeplab(x)["out"].argmax(dim=1)
    category = int(torch.bincount(predicted.flatten(), minlength=3).argmax())
    mask = predicted[0] == category
    wrapped = OutOnly(deeplab).eval()
    layer = wrapped.model.backbone["16"]
    theirs = cams.GradCAM(model=wrapped, target_layers=[layer])(
        input_tensor=x, targets=[SemanticSegmentationTarget(category, mask.float().numpy())]
    )[0]
    target, transform = segmentation_target(deeplab, x, category, region="predicted")
    ours = grad_cam(deeplab, x, target, layer="backbone.16", output_transform=transform)[0]
    ours = (ours - ours.min()) / (ours.max() - ours.min()).clamp_min(1e-12)  # they scale each map to [0, 1]
    assert float(torch.as_tensor(theirs).max()) > 0
    torch.testing.assert_close(ours, torch.as_tensor(theirs, dtype=ours.dtype), atol=2e-2, rtol=0)


def test_dominant_and_present_classes():
    maps = torch.tensor([[[0, 0, 2], [1, 2, 2]], [[0, 0, 0], [0, 0, 255]], [[1, 1, 2], [255, 0, 0]]])
    assert dominant_class(maps, 3).tolist() == [2, 0, 1]
    assert dominant_class(maps, 3, background=None).tolist() == [2, 0, 0]
    assert present_classes(maps, 3, background=0).tolist() == [[0, 1, 1], [0, 0, 0], [0, 1, 1]]


def test_segmentation_target_options_are_checked():
    with pytest.raises(ValueError, match="region must be"):
        SegmentationTarget(region="box")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_index"):
        SegmentationTarget(class_index=-1)
    with pytest.raises(ValueError, match="class map"):
        class_regions("label", torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"class_map=\.\.\."):
        class_regions(torch.full((1, 2, 2), 3), torch.zeros(1, 4, 2, 2))
    assert (
        repr(RegionScores(torch.ones(1, 2, 2, dtype=torch.bool))) == "RegionScores(regions=(1, 1, 2, 2), reduce='sum')"
    )


def test_segmentation_batches_keep_their_class_maps():
    images, class_map = torch.rand(2, 3, 4, 4), torch.randint(0, 4, (2, 4, 4))
    class_map[0, 0, 0] = 255
    parsed = parse_batch((images, class_map))
    assert parsed.labels is None and parsed.masks is None and torch.equal(parsed.class_maps, class_map)
    from_dict = parse_batch({"image": images, "mask": class_map})
    assert torch.equal(from_dict.class_maps, class_map) and from_dict.masks is None and not from_dict.extras
    binary = parse_batch({"image": images, "mask": class_map.clamp(0, 1)})  # 0/1 under a mask key: an object mask
    assert binary.class_maps is None and binary.masks.dtype == torch.bool
    probe = ProbeSet.from_batches([(images, class_map)], 2, stratify=False)
    assert torch.equal(probe.class_maps, class_map) and probe.has_class_maps
    assert torch.equal(probe.take([1]).class_maps, class_map[1:])
    assert torch.equal(ProbeSet.from_state_dict(probe.state_dict()).class_maps, class_map)
    assert isinstance(parse_batch(ParsedBatch(images, class_maps=class_map)).class_maps, torch.Tensor)
    with pytest.raises(ValueError, match="class_maps must be"):
        ProbeSet(images, class_maps=class_map.bool())
