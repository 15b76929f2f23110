"""Dataset bias: class balance of a label set, per-class recall, precision and confusion (through torchmetrics), and
where each class's explanations put their mass (a spurious-correlation signal)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_precision,
    multiclass_recall,
)

from lightning_interp.methods.evaluation.map_metrics import localization

__all__ = [
    "ClassAttribution",
    "ClassBalance",
    "PerClassMetrics",
    "border_band",
    "border_share",
    "class_attribution",
    "class_balance",
    "per_class_metrics",
]


@dataclass(frozen=True)
class ClassBalance:
    """How the samples of a label set spread over the classes.

    Attributes:
        counts: (K,) int64 samples per class.
        shares: (K,) float64 share of each class.
        imbalance_ratio: largest count over the smallest (inf when a class has no sample).
        rarest: index of the class with the fewest samples (the first of ties).
        commonest: index of the class with the most samples (the first of ties).
    """

    counts: Tensor
    shares: Tensor
    imbalance_ratio: float
    rarest: int
    commonest: int


def class_balance(labels: Tensor, num_classes: int | None = None) -> ClassBalance:
    """Count the samples of each class in (N,) integer labels.

    Args:
        labels: (N,) class indices >= 0.
        num_classes: number of classes K (classes with no sample count 0); None for ``max(labels) + 1``.

    Returns:
        :class:`ClassBalance`.

    Example:
        >>> balance = class_balance(torch.tensor([0, 0, 0, 1, 2, 2]))
        >>> balance.counts.tolist(), balance.imbalance_ratio, balance.rarest
        ([3, 1, 2], 3.0, 1)
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("class_balance needs (N,) integer class labels.")
    if labels.numel() == 0:
        raise ValueError("class_balance needs at least one label.")
    if int(labels.min()) < 0:
        raise ValueError(f"Class labels must be >= 0, got {int(labels.min())}.")
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if classes <= int(labels.max()):
        raise ValueError(f"num_classes={num_classes} but the labels go up to {int(labels.max())}.")
    counts = torch.bincount(labels.long().cpu(), minlength=classes)
    smallest, largest = int(counts.min()), int(counts.max())
    return ClassBalance(
        counts=counts,
        shares=counts.double() / counts.sum(),
        imbalance_ratio=float("inf") if smallest == 0 else largest / smallest,
        rarest=int(torch.argmin(counts)),
        commonest=int(torch.argmax(counts)),
    )


@dataclass(frozen=True)
class PerClassMetrics:
    """Per-class quality of predictions.

    Attributes:
        recall: (K,) share of each class's samples predicted as that class (NaN for a class with no sample).
        precision: (K,) share of each class's predictions that are right (NaN for a class never predicted).
        confusion: (K, K) int64 counts, rows = true class, columns = predicted class.
    """

    recall: Tensor
    precision: Tensor
    confusion: Tensor


def per_class_metrics(
    predictions: Tensor, labels: Tensor, num_classes: int, *, validate: bool = True
) -> PerClassMetrics:
    """Recall, precision and the confusion matrix per class, by torchmetrics, brought to the host in one transfer.

    Args:
        predictions: (N,) predicted class indices.
        labels: (N,) true class indices.
        num_classes: number of classes K.
        validate: let torchmetrics check that the indices lie in ``[0, num_classes)`` (a ``unique`` of each, which
            waits for the device); False where the caller has checked them already.

    Returns:
        :class:`PerClassMetrics` on the CPU (float64 recall and precision).

    Example:
        >>> metrics = per_class_metrics(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 2)
        >>> metrics.recall.tolist(), metrics.precision.tolist()
        ([0.5, 1.0], [1.0, 0.6666666865348816])
    """
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(
            f"predictions and labels must both be (N,), got {tuple(predictions.shape)} and {tuple(labels.shape)}."
        )
    predictions, labels = predictions.long(), labels.long().to(predictions.device)
    options = {"num_classes": num_classes, "validate_args": validate}
    confusion = multiclass_confusion_matrix(predictions, labels, **options).long()
    recall = multiclass_recall(predictions, labels, average=None, **options).double()
    precision = multiclass_precision(predictions, labels, average=None, **options).double()
    # one transfer: the counts are exact in float64 (below 2**53)
    host = torch.cat([confusion.double().flatten(), recall, precision]).cpu()
    confusion = host[: num_classes * num_classes].long().reshape(num_classes, num_classes)
    recall, precision = host[num_classes * num_classes :].reshape(2, num_classes)
    present = confusion.sum(dim=1) > 0
    predicted = confusion.sum(dim=0) > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return PerClassMetrics(
        recall=torch.where(present, recall, nan),  # torchmetrics gives 0 where a class is absent: undefined, not 0
        precision=torch.where(predicted, precision, nan),
        confusion=confusion,
    )


def border_band(height: int, width: int, fraction: float = 0.15, *, device: torch.device | str | None = None) -> Tensor:
    """The (H, W) bool mask of an image's outer band: ``fraction`` of each side's length (at least one pixel) from
    every edge.

    Example:
        >>> border_band(4, 4, 0.25).int().tolist()
        [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    """
    if not 0 < fraction < 0.5:
        raise ValueError(f"The border fraction must lie in (0, 0.5), got {fraction!r}.")
    rows, columns = max(1, round(fraction * height)), max(1, round(fraction * width))
    band = torch.ones(height, width, dtype=torch.bool, device=device)
    band[rows : height - rows, columns : width - columns] = False
    return band


def border_share(maps: Tensor, fraction: float = 0.15) -> Tensor:
    """Share of each (B, H, W) map's magnitude that lies in the image's outer band (see :func:`border_band`).

    A uniform map scores the band's area share; a map on the centre scores near 0. NaN for an all-zero map.

    Example:
        >>> heat = torch.zeros(1, 10, 10); heat[0, 4:6, 4:6] = 1.0
        >>> border_share(heat).item(), border_share(torch.ones(1, 10, 10), fraction=0.1).item()
        (0.0, 0.36)
    """
    if maps.ndim != 3:
        raise ValueError(f"border_share needs (B, H, W) maps, got {tuple(maps.shape)}.")
    magnitude = maps.detach().double().abs()
    band = border_band(maps.shape[1], maps.shape[2], fraction, device=maps.device)
    return (magnitude * band).sum(dim=(1, 2)) / magnitude.sum(dim=(1, 2))


@dataclass(frozen=True)
class ClassAttribution:
    """Where the explanations of each class put their mass.

    Attributes:
        measure: ``"localization"`` (share of the positive mass inside the object masks) or ``"border_share"``
            (share of the magnitude in the image's outer band), averaged over the class's samples.
        scores: (K,) float64 per class (NaN for a class without a sample whose map has mass).
        uniform: (K,) float64 what a uniform map scores for the same samples (their mean mask area share, or the
            band's area share).
        counts: (K,) int64 samples per class that entered the mean.
    """

    measure: str
    scores: Tensor
    uniform: Tensor
    counts: Tensor

    @property
    def lift(self) -> Tensor:
        """(K,) ``scores / uniform``: 1 for no preference; for localization, > 1 means the object is favoured."""
        return self.scores / self.uniform


def class_attribution(
    maps: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    masks: Tensor | None = None,
    border_fraction: float = 0.15,
) -> ClassAttribution:
    """Per class, how much of its explanations falls on its objects (with masks) or on the image border (without).

    A class whose maps spread over the background as much as a uniform map does
    (localization lift near 1, while the other classes' lifts are well above)
    is recognised by something other than the object: often a spurious
    correlation such as a background colour. Without masks, a high border share
    is a cheap proxy for the same, valid only where objects sit near the centre
    (object-centred photos); it cannot tell background from an object that
    fills the frame, nor a centred background cue from the object.

    Args:
        maps: (N, H, W) non-negative maps (e.g. Grad-CAM, or ``attribution_to_map`` of input attributions).
        labels: (N,) class indices, the classes the maps explain.
        num_classes: number of classes K.
        masks: (N, H, W) object masks, or None for the border measure.
        border_fraction: width of the border band as a fraction of each side.

    Returns:
        :class:`ClassAttribution` on the CPU.

    Example:
        >>> maps = torch.zeros(2, 8, 8); maps[0, 3:5, 3:5] = 1.0; maps[1] = 1.0
        >>> masks = torch.zeros(2, 8, 8, dtype=torch.bool); masks[:, 2:6, 2:6] = True
        >>> found = class_attribution(maps, torch.tensor([0, 1]), 2, masks=masks)
        >>> found.scores.tolist(), found.lift.tolist()
        ([1.0, 0.25], [4.0, 1.0])
    """
    if maps.ndim != 3 or labels.shape != maps.shape[:1]:
        raise ValueError(
            "class_attribution needs (N, H, W) maps and (N,) labels, got "
            f"{tuple(maps.shape)} and {tuple(labels.shape)}."
        )
    labels = labels.to(maps.device).long()
    if masks is not None:
        masks = masks.to(maps.device).reshape(maps.shape).bool()
        measure, values = "localization", localization(maps, masks)
        uniform = masks.flatten(1).double().mean(dim=1)
    else:
        measure, values = "border_share", border_share(maps, border_fraction)
        band = border_band(maps.shape[1], maps.shape[2], border_fraction, device=maps.device)
        uniform = band.double().mean().expand(maps.shape[0])
    # the samples with a non-finite value add nothing (zero weight, to class 0) rather than being selected out, which
    # would wait for the device to count them
    valid = values.isfinite()
    index = torch.where(valid, labels, torch.zeros_like(labels))
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=maps.device).index_add_(0, index, valid.double())
    sums = torch.zeros_like(counts).index_add_(0, index, torch.where(valid, values, zero))
    uniform_sums = torch.zeros_like(counts).index_add_(0, index, torch.where(valid, uniform, zero))
    nan = torch.full_like(counts, float("nan"))
    present = counts > 0
    scores = torch.where(present, sums / counts.clamp_min(1), nan)
    uniform_means = torch.where(present, uniform_sums / counts.clamp_min(1), nan)
    host = torch.stack([scores, uniform_means, counts]).cpu()  # one transfer
    return ClassAttribution(measure=measure, scores=host[0], uniform=host[1], counts=host[2].long())
