"""Dataset bias: class balance of a label set, and per-class recall, precision and confusion (through torchmetrics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_precision,
    multiclass_recall,
)

__all__ = ["ClassBalance", "PerClassMetrics", "class_balance", "per_class_metrics"]


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


def per_class_metrics(predictions: Tensor, labels: Tensor, num_classes: int) -> PerClassMetrics:
    """Recall, precision and the confusion matrix per class, by torchmetrics.

    Args:
        predictions: (N,) predicted class indices.
        labels: (N,) true class indices.
        num_classes: number of classes K.

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
    confusion = multiclass_confusion_matrix(predictions, labels, num_classes=num_classes).long().cpu()
    present = confusion.sum(dim=1) > 0
    predicted = confusion.sum(dim=0) > 0
    recall = multiclass_recall(predictions, labels, num_classes=num_classes, average=None).double().cpu()
    precision = multiclass_precision(predictions, labels, num_classes=num_classes, average=None).double().cpu()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return PerClassMetrics(
        recall=torch.where(present, recall, nan),  # torchmetrics gives 0 where a class is absent: undefined, not 0
        precision=torch.where(predicted, precision, nan),
        confusion=confusion,
    )
