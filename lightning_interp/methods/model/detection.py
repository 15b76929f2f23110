"""Detection targets: explain one detection of an object detector (its class score, optionally its box).

A torchvision-style detector (Faster R-CNN, RetinaNet, FCOS, SSD, ...) takes a batch of images and, in eval mode,
returns one dict per image: ``{"boxes": (K, 4) xyxy, "labels": (K,), "scores": (K,)}``. Every attribution method
explains one number per sample; for a detector that number is the score of one detection, as pytorch-grad-cam's
``FasterRCNNBoxScoreTarget`` defines it: the explained detection (its label and box) is fixed on the clean inputs,
and in any later forward (a noisy copy, a path point, a perturbed copy) the explained number is the score of the
detection *of the same label* whose box overlaps the reference box most, when that overlap (IoU) exceeds a
threshold, else 0; optionally plus that IoU (``include_box``: how well the box is kept, which brings the box
regression into the gradient). :class:`DetectionScores` is that ``output_transform``: it turns a list of
detection dicts into (M, 1) scores, so every registered method explains "this detection" unchanged.

Copies follow the methods' convention: row ``r`` of a batch of ``M = k * B`` images is a copy of sample
``r % B``; any other batch size is refused. :func:`detection_target` runs the clean forward (eval mode, every
module's ``training`` flag saved and restored, so BatchNorm statistics are neither used from the batch nor
updated) and returns the target column with the transform. Everything here is pure torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import eager_forward, gradients_enabled, modes_preserved

__all__ = [
    "DETECTION_KEYS",
    "DetectionScores",
    "DetectionTarget",
    "box_iou",
    "box_masks",
    "detection_outputs",
    "detection_target",
]

DETECTION_KEYS: tuple[str, ...] = ("boxes", "labels", "scores")
"""What each per-image dict of a detector's output holds (torchvision's eval-mode form)."""

DetectionTransform = Callable[[object], object]
"""Picks the list of per-image detection dicts out of what a detector returns."""


@dataclass(frozen=True)
class DetectionTarget:
    """Which detection of each image an explanation explains, and how its score is read in later forwards.

    Give it as a map callback's ``target`` (``SaliencyCallback(target=DetectionTarget(label=2))``), or call
    :meth:`resolve` (:func:`detection_target`) outside Lightning.

    Attributes:
        index: ``"top"`` (the highest-scoring detection) or ``k`` (the detection ranked ``k`` by score, 0 = top).
        label: only the detections of this class are ranked (None: every class).
        iou_threshold: in a later forward, the detection of the same label with the largest IoU with the reference
            box counts only above this IoU (pytorch-grad-cam's default, 0.5).
        include_box: add that IoU to the score (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does): the
            explanation then also covers how the box is placed.

    Example:
        >>> DetectionTarget(index=1, label=2)
        DetectionTarget(index=1, label=2, iou_threshold=0.5, include_box=False)
    """

    index: int | Literal["top"] = "top"
    label: int | None = None
    iou_threshold: float = 0.5
    include_box: bool = False

    def __post_init__(self) -> None:
        index = self.index
        if not (index == "top" or (isinstance(index, int) and not isinstance(index, bool) and index >= 0)):
            raise ValueError(f"index must be 'top' or a rank >= 0 (0 = the top detection), got {index!r}.")
        label = self.label
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise ValueError(f"label must be a class index >= 0 or None (every class), got {label!r}.")
        if isinstance(self.iou_threshold, bool) or not 0.0 <= float(self.iou_threshold) < 1.0:
            raise ValueError(f"iou_threshold must lie in [0, 1), got {self.iou_threshold!r}.")
        if not isinstance(self.include_box, bool):
            raise ValueError(f"include_box must be True or False, got {self.include_box!r}.")

    @property
    def rank(self) -> int:
        """The explained detection's rank by score among those considered (0 for ``"top"``)."""
        return 0 if self.index == "top" else int(self.index)

    def resolve(
        self, model: nn.Module, inputs: Tensor, *, output_transform: DetectionTransform | None = None
    ) -> tuple[Tensor, DetectionScores]:
        """:func:`detection_target` with these settings: the (B,) target column (zeros) and the transform."""
        return detection_target(
            model,
            inputs,
            self.index,
            label=self.label,
            iou_threshold=self.iou_threshold,
            include_box=self.include_box,
            output_transform=output_transform,
        )


def detection_outputs(output: object) -> list[Mapping[str, Tensor]] | None:
    """The per-image detection dicts of a detector's output: a list (or tuple) of mappings holding ``boxes``,
    ``labels`` and ``scores`` tensors (torchvision in eval mode), or the second item of a ``(losses, detections)``
    pair (a scripted torchvision detector); None for any other output (a dict of losses included).

    Example:
        >>> one = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
        >>> len(detection_outputs([one, one])), detection_outputs({"loss_classifier": torch.tensor(1.0)})
        (2, None)
    """

    def is_detections(value: object) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(
                isinstance(item, Mapping) and all(isinstance(item.get(key), Tensor) for key in DETECTION_KEYS)
                for item in value
            )
        )

    if is_detections(output):
        return list(output)  # type: ignore[arg-type]
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], Mapping) and is_detections(output[1]):
        return list(output[1])
    return None


def _detections(output: object, output_transform: DetectionTransform | None) -> list[Mapping[str, Tensor]]:
    picked = output_transform(output) if output_transform is not None else output
    found = detection_outputs(picked)
    if found is None:
        if isinstance(picked, Mapping) and any(str(key).startswith("loss") for key in picked):
            what = f"a dict of losses ({', '.join(repr(k) for k in picked)})"
            hint = (
                " A torchvision detector returns losses in train mode; the explanations run it in eval mode, so "
                "the model's forward must not force training (call the detector as model(images), without targets)."
            )
        else:
            what, hint = type(picked).__name__, ""
        raise ValueError(
            f"Detection targets need a detector's output: one dict per image with 'boxes' (K, 4), 'labels' (K,) and "
            f"'scores' (K,) (torchvision's eval-mode form); got {what}.{hint} Pass output_transform=... that returns "
            "that list."
        )
    return found


def box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """(N, K) intersection over union of (N, 4) and (K, 4) ``x1, y1, x2, y2`` boxes (differentiable).

    Example:
        >>> box_iou(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0, 2.0], [5.0, 5, 6, 6]]))
        tensor([[0.3333, 0.0000]])
    """
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    area_other = (others[:, 2] - others[:, 0]).clamp_min(0) * (others[:, 3] - others[:, 1]).clamp_min(0)
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    sides = (bottom_right - top_left).clamp_min(0)
    inter = sides[..., 0] * sides[..., 1]
    union = area[:, None] + area_other[None, :] - inter
    return inter / union.clamp_min(torch.finfo(union.dtype).tiny)


def box_masks(boxes: Tensor, size: tuple[int, int], found: Tensor | None = None) -> Tensor:
    """(B, H, W) bool: the pixels whose centre lies in each (B, 4) ``x1, y1, x2, y2`` box (in pixels of an
    (H, W) image); all False where ``found`` (B,) is False. A box as a mask: to outline it, or to score a map
    against it.

    Example:
        >>> box_masks(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), (3, 4))[0].int().tolist()
        [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    height, width = size
    boxes = boxes.detach().float()
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])
    inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])
    masks = inside_y[:, :, None] & inside_x[:, None, :]
    if found is not None:
        masks &= found.to(masks.device)[:, None, None]
    return masks


class DetectionScores:
    """An ``output_transform`` that turns a detector's output (a list of M = k * B per-image dicts, copies of B
    samples copy after copy) into (M, 1) scores of the explained detections: for row ``r``, the score of the
    detection with label ``labels[r % B]`` whose box overlaps ``boxes[r % B]`` most, if that IoU exceeds
    ``iou_threshold`` (plus the IoU with ``include_box``); 0 (with a zero gradient) otherwise, and for samples
    without a reference detection (``found`` False).

    Args:
        boxes: (B, 4) reference boxes, ``x1, y1, x2, y2`` in input pixels.
        labels: (B,) reference labels.
        scores: (B,) reference scores (on the clean inputs; shown, not used to match).
        found: (B,) bool: whether the sample has a reference detection.
        iou_threshold: the smallest IoU (exclusive) a match needs.
        include_box: add the matched box's IoU to its score.
        output_transform: picks the list of dicts out of the model's output (default: the output itself).

    Example:
        >>> transform = DetectionScores(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([1]), torch.tensor([0.9]),
        ...                             torch.tensor([True]))
        >>> detections = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 3.0], [0.0, 0.0, 4.0, 4.0]]),
        ...               "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.7, 0.8])}
        >>> transform([detections, detections]).tolist()  # two copies: the label-1 box (IoU 0.75), not the label-2 one
        [[0.699999988079071], [0.699999988079071]]
    """

    def __init__(
        self,
        boxes: Tensor,
        labels: Tensor,
        scores: Tensor,
        found: Tensor,
        *,
        iou_threshold: float = 0.5,
        include_box: bool = False,
        output_transform: DetectionTransform | None = None,
    ) -> None:
        count = found.shape[0]
        if boxes.shape != (count, 4) or labels.shape != (count,) or scores.shape != (count,):
            raise ValueError(
                f"boxes, labels and scores must be ({count}, 4), ({count},) and ({count},), got "
                f"{tuple(boxes.shape)}, {tuple(labels.shape)} and {tuple(scores.shape)}."
            )
        self.boxes = boxes.detach()
        self.labels = labels.detach().long()
        self.scores = scores.detach()
        self.found = found.detach().bool()
        self._found_on_host = self.found.tolist()  # read once here, not once per row of every batch
        self.iou_threshold = float(iou_threshold)
        self.include_box = bool(include_box)
        self.output_transform = output_transform

    def __len__(self) -> int:
        return int(self.found.shape[0])

    def __call__(self, output: object) -> Tensor:
        detections = _detections(output, self.output_transform)
        rows, samples = len(detections), len(self)
        if rows != samples and (samples == 0 or rows % samples):
            raise ValueError(
                f"A batch of {rows} images cannot be paired with the explained detections of {samples} samples: the "
                "images must be whole copies of the samples, copy after copy. Explain the samples the detections "
                "were fixed on (or, for a perturbation method, pass internal_batch_size=<a multiple of the batch "
                "size>)."
            )
        return torch.stack([self._row(detections[r], r % samples) for r in range(rows)])[:, None]

    def _row(self, detection: Mapping[str, Tensor], sample: int) -> Tensor:
        """The score of row's match, without a read of a device value (the match is chosen by ``torch.where``)."""
        boxes, labels, scores = (detection[key] for key in DETECTION_KEYS)
        zero = scores.sum() * 0  # no match: 0, joined to the graph (a zero gradient, not a missing one)
        if not self._found_on_host[sample] or boxes.shape[0] == 0:
            return zero
        reference = self.boxes[sample].to(device=boxes.device, dtype=boxes.dtype)[None]
        overlap = box_iou(reference, boxes)[0]
        same = labels == self.labels[sample].to(labels.device)
        masked = torch.where(same.to(overlap.device), overlap.detach(), torch.full_like(overlap, -1.0))
        best = masked.argmax()
        value = scores[best] + overlap[best] if self.include_box else scores[best]
        return torch.where(masked[best] > self.iou_threshold, value, zero)

    def masks(self, size: tuple[int, int]) -> Tensor:
        """(B, H, W) bool: each sample's explained box as a mask on an (H, W) input (all False when not found)."""
        return box_masks(self.boxes, size, self.found)

    def __repr__(self) -> str:
        return (
            f"DetectionScores(samples={len(self)}, found={int(self.found.sum())}, "
            f"iou_threshold={self.iou_threshold}, include_box={self.include_box})"
        )


def detection_target(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    index: int | Literal["top"] = "top",
    *,
    label: int | None = None,
    iou_threshold: float = 0.5,
    include_box: bool = False,
    output_transform: DetectionTransform | None = None,
) -> tuple[Tensor, DetectionScores]:
    """The target column and the ``output_transform`` that explain one detection of each image.

    One forward of ``model`` on the clean ``inputs`` (eval mode with every module's flag restored, no gradient)
    fixes each sample's explained detection: the one ranked ``index`` by score (among those of class ``label``
    when given). Pass both results to any method: ``attribute(name, model, inputs, target,
    output_transform=transform)``; the explained number of sample ``b`` is then that detection's score (see
    :class:`DetectionScores`). A sample without such a detection gets a zero explanation; ``transform.found``
    says which, and a warning names them.

    Args:
        model: the detector, called as ``model(inputs)`` (a (B, 3, H, W) batch, or a list of (3, H, W) images of
            one size).
        inputs: the images.
        index: ``"top"`` or a rank ``k`` by score (0 = top).
        label: rank only the detections of this class (None: every class).
        iou_threshold: the IoU a later detection needs with the reference box to count.
        include_box: add the matched box's IoU with the reference box to its score.
        output_transform: picks the list of per-image dicts out of the model's output (default: the output).

    Returns:
        ``(target, transform)``: (B,) zeros (the one column of the transform's scores) on the inputs' device, and
        a :class:`DetectionScores`.

    Example:
        >>> class Boxes(nn.Module):  # a detector of one box per image, scored by the image's mean
        ...     def forward(self, images):
        ...         return [{"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([1]),
        ...                  "scores": image.mean()[None]} for image in images]
        >>> target, transform = detection_target(Boxes(), torch.ones(2, 3, 4, 4))
        >>> target.tolist(), transform.labels.tolist(), transform(Boxes()(torch.ones(4, 3, 4, 4))).shape
        ([0, 0], [1, 1], torch.Size([4, 1]))
    """
    settings = DetectionTarget(index, label, iou_threshold, include_box)  # checks the settings
    if not isinstance(inputs, Tensor):
        images = list(inputs)
        if not images or any(not isinstance(image, Tensor) or image.ndim != 3 for image in images):
            raise ValueError("inputs must be a (B, C, H, W) tensor or a list of (C, H, W) image tensors.")
        if len({tuple(image.shape) for image in images}) > 1:
            raise ValueError(
                f"The images have different sizes ({sorted({tuple(i.shape) for i in images})[:4]}); the methods "
                "batch copies of one (B, C, H, W) tensor. Resize them to one size, or explain them one at a time."
            )
        inputs = torch.stack(images)
    with modes_preserved(model), eager_forward(), gradients_enabled(), torch.no_grad():
        detections = _detections(model(inputs.detach().clone()), output_transform)
    if len(detections) != inputs.shape[0]:
        raise ValueError(f"The detector returned {len(detections)} results for {inputs.shape[0]} images.")
    boxes, labels, scores, found = [], [], [], []
    for detection in detections:
        box, kind, score = (detection[key].detach() for key in DETECTION_KEYS)
        considered = torch.nonzero(kind == settings.label).flatten() if settings.label is not None else None
        ranked_scores = score if considered is None else score[considered]
        order = torch.argsort(ranked_scores.float(), descending=True, stable=True)
        present = order.numel() > settings.rank
        pick = order[settings.rank] if present else None
        if pick is not None and considered is not None:
            pick = considered[pick]
        found.append(present)
        boxes.append(box[pick].float() if pick is not None else box.new_zeros(4, dtype=torch.float32))
        labels.append(kind[pick].long() if pick is not None else kind.new_full((), -1, dtype=torch.long))
        scores.append(score[pick].float() if pick is not None else score.new_zeros((), dtype=torch.float32))
    missing = [i for i, present in enumerate(found) if not present]
    if missing:
        what = f"a detection of class {settings.label}" if settings.label is not None else "a detection"
        warnings.warn(
            f"Sample(s) {missing[:8]} have no {what} at rank {settings.rank} (the detector found "
            f"{[len(detections[i]['scores']) for i in missing[:8]]}); their explanations are zero. Lower the "
            "detector's score threshold (torchvision: box_score_thresh), or explain a lower rank or another label.",
            stacklevel=2,
        )
    device = detections[0]["scores"].device
    transform = DetectionScores(
        torch.stack(boxes).to(device),
        torch.stack(labels).to(device),
        torch.stack(scores).to(device),
        torch.tensor(found, dtype=torch.bool, device=device),
        iou_threshold=settings.iou_threshold,
        include_box=settings.include_box,
        output_transform=output_transform,
    )
    return torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device), transform
