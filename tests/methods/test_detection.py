"""Detection targets: one detection's score of torchvision-style detectors (lists of per-image dicts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_interp.methods import (
    DetectionScores,
    DetectionTarget,
    attribute,
    box_iou,
    box_masks,
    detection_outputs,
    detection_target,
    grad_cam,
    gradient,
    smoothgrad,
)

detection = pytest.importorskip("torchvision.models.detection")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def make_detector(seed: int = 0) -> nn.Module:
    """A Faster R-CNN with random weights on 64 px images, its BatchNorm statistics estimated on random images (the
    initial ones give every proposal the same score), in eval mode."""
    torch.manual_seed(seed)
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=64,
        box_score_thresh=0.0,
        box_detections_per_img=6,
        rpn_pre_nms_top_n_test=60,
        rpn_post_nms_top_n_test=30,
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # a cumulative average over the estimation pass
                module.reset_running_stats()
        model.backbone.train()
        model.backbone(model.transform(list(torch.rand(8, 3, 64, 64)))[0].tensors)
    return model.eval()


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    return make_detector()


def images(count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def dicts(boxes, labels, scores) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


class Fixed(nn.Module):
    """A detector whose detections are given, each score multiplied by the image's mean (so it has a gradient)."""

    def __init__(self, *outputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [
            {**out, "scores": out["scores"] * image.mean()}
            for image, out in zip(images, self.outputs * (len(images) // len(self.outputs)), strict=True)
        ]


def test_target_picks_the_top_the_kth_and_the_top_of_a_label():
    model = Fixed(dicts([[0, 0, 4, 4], [1, 1, 3, 3], [2, 2, 6, 6]], [1, 2, 2], [0.2, 0.9, 0.5]))
    x = torch.ones(1, 3, 8, 8)
    _, top = detection_target(model, x)
    assert (
        top.labels.tolist() == [2]
        and top.boxes.tolist() == [[1, 1, 3, 3]]
        and top.scores.tolist() == [pytest.approx(0.9)]
    )
    _, second = DetectionTarget(index=1).resolve(model, x)
    assert second.boxes.tolist() == [[2, 2, 6, 6]]
    target, of_label = detection_target(model, x, label=1)
    assert of_label.boxes.tolist() == [[0, 0, 4, 4]] and of_label.found.tolist() == [True]
    assert target.tolist() == [0]


def test_scores_follow_the_matching_rules():
    transform = DetectionScores(
        torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]]),
        torch.tensor([1, 2]),
        torch.tensor([0.9, 0.8]),
        torch.tensor([True, True]),
        iou_threshold=0.5,
    )
    first = dicts([[0, 0, 4, 4], [0, 0, 4, 3], [0, 0, 4, 2]], [2, 1, 1], [0.9, 0.6, 0.7])  # label 1: IoU 0.75, 0.5
    second = dicts([[0, 0, 2, 1]], [2], [0.4])  # IoU 0.5: not above the threshold
    assert transform([first, second]).tolist() == [[pytest.approx(0.6)], [0.0]]
    assert transform([first, second, first, second]).shape == (4, 1)  # copies, copy after copy
    boxed = DetectionScores(
        transform.boxes, transform.labels, transform.scores, transform.found, iou_threshold=0.2, include_box=True
    )
    assert boxed([first, second]).tolist() == [[pytest.approx(0.6 + 0.75)], [pytest.approx(0.4 + 0.5)]]
    with pytest.raises(ValueError, match="whole copies"):
        transform([first, second, first])
    empty = dicts([], [], [])
    assert transform([empty, empty]).tolist() == [[0.0], [0.0]]


class HostReads(TorchFunctionMode):
    """Counts Python's reads of tensor values: each is a wait for the device on a GPU."""

    READS = frozenset({torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.__bool__})
    READS |= frozenset({torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy})

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


def test_scoring_copies_of_the_detections_reads_no_device_value():
    transform = DetectionScores(
        torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]]),
        torch.tensor([1, 2]),
        torch.tensor([0.9, 0.8]),
        torch.tensor([True, False]),
    )
    first = dicts([[0, 0, 4, 4], [0, 0, 4, 3]], [2, 1], [0.9, 0.6])
    second = dicts([[0, 0, 2, 1]], [2], [0.4])
    with HostReads() as counter:
        scores = transform([first, second] * 16)  # 32 rows: a read per row would be 32 waits
    assert counter.reads == 0
    assert scores[::2].flatten().tolist() == [pytest.approx(0.6)] * 16 and not scores[1::2].any()


def test_box_iou_and_masks_by_hand():
    iou = box_iou(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 4.0, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([[4.0 / 28.0, 1.0]]))
    masks = box_masks(torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.0, 0.0, 8.0, 8.0]]), (6, 4), torch.tensor([True, False]))
    expected = torch.zeros(2, 6, 4, dtype=torch.bool)
    expected[0, 2:5, 1:3] = True  # pixel centres 2.5 .. 4.5 by 1.5 .. 2.5
    assert torch.equal(masks, expected)


def test_outputs_of_another_form_are_refused():
    assert detection_outputs(torch.zeros(2, 3)) is None

    class Losses(nn.Module):  # a detector forced into train mode
        def forward(self, x):
            return {"loss_classifier": x.sum(), "loss_box_reg": x.mean()}

    with pytest.raises(ValueError, match="dict of losses"):
        detection_target(Losses(), torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="'boxes'"):
        detection_target(nn.Conv2d(3, 2, 1), torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="index"):
        DetectionTarget(index=-1)
    with pytest.raises(ValueError, match="different sizes"):
        detection_target(Fixed(dicts([], [], [])), [torch.ones(3, 4, 4), torch.ones(3, 5, 4)])


def test_a_sample_without_a_detection_is_reported_and_explained_as_zero():
    model = Fixed(dicts([[0, 0, 4, 4]], [1], [0.5]), dicts([], [], []))
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"Sample\(s\) \[1\]"):
        target, transform = detection_target(model, x)
    assert transform.found.tolist() == [True, False]
    grads = gradient(model, x, target, output_transform=transform)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_the_detection_score_agrees_with_pytorch_grad_cam_box_score_target(detector):
    targets = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    x = images(3)
    _, transform = detection_target(detector, x, include_box=True)
    noisy = x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for batch in (x, noisy):
        with torch.no_grad():
            outputs = detector(batch)
            ours = transform(outputs)[:, 0]
        for b, output in enumerate(outputs):
            theirs = targets.FasterRCNNBoxScoreTarget([transform.labels[b]], [transform.boxes[b]], 0.5)(output)
            # they take the box of largest IoU whatever its label (then check the label); we take the largest IoU
            # among the boxes of the label: the same whenever their box has the label
            nearest = int(box_iou(transform.boxes[b : b + 1], output["boxes"])[0].argmax())
            if int(output["labels"][nearest]) == int(transform.labels[b]):
                torch.testing.assert_close(ours[b : b + 1], theirs.reshape(1))
    with torch.no_grad():
        clean = transform(detector(x))[:, 0]
    torch.testing.assert_close(clean, transform.scores + 1.0)  # on the clean images: the detection itself, IoU 1


def test_gradient_is_autograd_of_the_explained_score(detector):
    x = images(2)
    target, transform = detection_target(detector, x)
    ours = attribute("gradient", detector, x, target, output_transform=transform)
    leaf = x.clone().requires_grad_(True)
    outputs = detector(leaf)
    top = [int(out["scores"].detach().argmax()) for out in outputs]
    (expected,) = torch.autograd.grad(sum(out["scores"][k] for out, k in zip(outputs, top, strict=True)), leaf)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(ours, expected)
    # copies: SmoothGrad without noise averages the gradient of identical copies
    still = smoothgrad(detector, x, target, noise_level=0.0, n_samples=3, output_transform=transform)
    torch.testing.assert_close(still, expected, rtol=1e-4, atol=1e-7)


def test_grad_cam_agrees_with_pytorch_grad_cam(detector):
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    x = images(1, seed=3)
    target, transform = detection_target(detector, x)
    layer = "backbone.body.12"
    theirs = cams.GradCAM(model=detector, target_layers=[detector.get_submodule(layer)])(
        input_tensor=x,
        targets=[FasterRCNNBoxScoreTarget([transform.labels[0]], [transform.boxes[0]], 0.5)],
    )[0]
    ours = grad_cam(detector, x, target, layer=layer, output_transform=transform)[0]
    ours = (ours - ours.min()) / (ours.max() - ours.min()).clamp_min(1e-12)  # they scale each map to [0, 1]
    assert float(torch.as_tensor(theirs).max()) > 0
    torch.testing.assert_close(ours, torch.as_tensor(theirs, dtype=ours.dtype), atol=2e-2, rtol=0)


def test_modes_and_batchnorm_statistics_are_left_as_they_are():
    model = make_detector(seed=4).train()
    model.backbone.body.eval()  # a frozen part, as fine-tuning often has
    flags = {name: module.training for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    x = images(2)
    target, transform = detection_target(model, x)
    for name in ("gradient", "smoothgrad"):
        options = {"n_samples": 2} if name == "smoothgrad" else {}
        maps = attribute(name, model, x, target, output_transform=transform, **options)
        assert maps.shape == x.shape and torch.isfinite(maps).all()
    grad_cam(model, x, target, layer="backbone.fpn.layer_blocks.1", output_transform=transform)
    assert {name: module.training for name, module in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(state[key], after[key]) for key in state)
