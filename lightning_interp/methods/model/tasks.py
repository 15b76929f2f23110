"""Output kinds: what a model's scores mean, what it predicts, and which number an explanation differentiates.

Four kinds, each with its own meaning of "predicted", "confidence" and "the
explained score" of a sample for target ``t``:

- ``multiclass``: scores (B, C), C >= 2; prediction: the argmax; confidence:
  the softmax of the predicted class; explained score: score ``t``.
- ``binary``: one logit, (B, 1) or (B,); prediction: 1 if the logit > 0, else
  0; confidence: the sigmoid of the predicted side; explained score: the logit
  for ``t = 1``, minus the logit for ``t = 0``.
- ``multilabel``: scores (B, C), one sigmoid each, multi-hot labels;
  prediction: the top label (argmax); confidence: its sigmoid; explained
  score: score ``t``.
- ``regression``: outputs (B, D); prediction: the output itself; no
  confidence; explained score: output ``t``.

So ``target=None`` ("pred") explains the side a binary model predicted (for a
negative prediction, what makes the logit more negative), the top label of a
multi-label model, and the output of a one-output regression.

Everything here is pure torch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "TaskOption",
    "class_labels",
    "infer_task",
    "label_kind",
    "prediction_and_confidence",
    "target_scores",
]

TASKS = ("multiclass", "binary", "multilabel", "regression")
TaskOption = Literal["auto", "multiclass", "binary", "multilabel", "regression"]
"""A ``task=`` option: one of :data:`TASKS`, or ``"auto"`` to infer it from the output and the labels."""


def _is_binary(values: Tensor) -> bool:
    return bool(((values == 0) | (values == 1)).all())


def label_kind(labels: Tensor) -> str:
    """What a label tensor holds: ``"class"``, ``"one_hot"``, ``"soft"``, ``"multi_hot"`` or ``"continuous"``.

    ``"class"``: (N,) integer values (integer dtype, or floats that are all
    whole numbers). ``"one_hot"``: (N, K) 0/1 rows with exactly one 1 each.
    ``"soft"``: (N, K) non-negative rows summing to 1 (label smoothing, mixup).
    ``"multi_hot"``: other (N, K) 0/1 rows. ``"continuous"``: anything else.

    Example:
        >>> label_kind(torch.tensor([0, 2, 1])), label_kind(torch.tensor([[1, 0], [1, 1]]))
        ('class', 'multi_hot')
        >>> label_kind(torch.tensor([0.5, 1.7]))
        'continuous'
    """
    whole = not labels.is_floating_point() or bool((labels == labels.round()).all())
    if labels.ndim == 1:
        return "class" if whole else "continuous"
    if labels.ndim == 2 and _is_binary(labels):
        return "one_hot" if bool((labels.sum(dim=1) == 1).all()) else "multi_hot"
    if labels.ndim == 2 and bool((labels >= 0).all()) and bool(((labels.sum(dim=1) - 1).abs() < 1e-4).all()):
        return "soft"
    return "continuous"


def infer_task(num_outputs: int, labels: Tensor | None = None, task: str = "auto") -> str:
    """The output kind of a model with ``num_outputs`` scores per sample, given the labels it is trained on.

    With ``task="auto"``: one output is ``"binary"`` when the labels are 0/1
    and ``"regression"`` when they are fractional numbers (whole numbers other
    than 0/1 are ambiguous and need ``task``); several outputs are
    ``"multiclass"`` with class-index, one-hot or soft (probability) labels
    (or no labels), ``"multilabel"`` with multi-hot (N, C) labels and
    ``"regression"`` with (N, C) real-valued targets. A given ``task`` is
    checked against the output and labels.

    Args:
        num_outputs: scores per sample (the model output's second dimension).
        labels: the probe labels, (N,) or (N, K), or None.
        task: ``"auto"`` or one of :data:`TASKS`.

    Raises:
        ValueError: the kind cannot be told from the output and the labels (one
            output and no labels), or the output, labels and ``task`` disagree;
            the message says what was found and what to pass.

    Example:
        >>> infer_task(1, torch.tensor([0, 1, 1])), infer_task(10, torch.tensor([3, 7]))
        ('binary', 'multiclass')
        >>> infer_task(3, torch.tensor([[1, 0, 1], [0, 1, 0]])), infer_task(1, torch.tensor([2.5, 0.3]))
        ('multilabel', 'regression')
    """
    if task != "auto" and task not in TASKS:
        raise ValueError(f"task must be 'auto' or one of {TASKS}, got {task!r}.")
    kind = None if labels is None else label_kind(labels)
    found = f"the model gives {num_outputs} score(s) per sample"
    if labels is not None:
        found += f" and the labels have shape {tuple(labels.shape)} ({kind.replace('_', '-')})"  # type: ignore[union-attr]
    if task == "auto":
        task = _guess(num_outputs, labels, kind, found)
    _check(task, num_outputs, labels, kind, found)
    return task


def _guess(num_outputs: int, labels: Tensor | None, kind: str | None, found: str) -> str:
    if labels is None:
        if num_outputs == 1:
            raise ValueError(
                "One score per sample and no labels: it cannot be told whether the model is a binary classifier "
                "(one logit) or a regression. Pass task='binary' or task='regression'."
            )
        return "multiclass"
    assert kind is not None
    if num_outputs == 1:
        if labels.ndim == 2:
            raise ValueError(
                f"{found.capitalize()}: {labels.shape[1]} label columns for one output. Pass task=... to say what "
                "the output is, or data=DataDescription(batch_parser=...) that returns matching labels."
            )
        if _is_binary(labels):
            return "binary"
        if kind == "class":
            raise ValueError(
                f"{found.capitalize()}, whole numbers from {int(labels.min())} to {int(labels.max())}: a regression "
                "on whole numbers, or a classifier with one output where it needs one score per class? For a "
                "regression pass task='regression'; for a classifier, give the model one output per class (or "
                "output_transform=... that returns them)."
            )
        return "regression"
    if kind == "class":
        if int(labels.max()) < num_outputs and int(labels.min()) >= 0:
            return "multiclass"
        raise ValueError(
            f"{found.capitalize()}: the labels go from {int(labels.min())} to {int(labels.max())}, so they are not "
            f"class indices of this output. If the output is not class scores (an embedding, a regression), pass "
            "task='regression' and a fixed target index, or output_transform=... that returns one score per class."
        )
    if labels.ndim == 1:  # fractional values, one per sample, for several outputs: per-sample weights?
        raise ValueError(
            f"{found.capitalize()}: one fractional value per sample for {num_outputs} scores fits no output kind "
            "(per-sample weights, or a regression target?). Pass task=... to say what the output is, or "
            "data=DataDescription(batch_parser=...) that returns the labels."
        )
    if labels.shape[1] != num_outputs:
        raise ValueError(
            f"{found.capitalize()}: {labels.shape[1]} label columns for {num_outputs} scores. Pass "
            "output_transform=... that returns one score per label, or data=DataDescription(batch_parser=...) "
            "giving matching labels."
        )
    if kind == "multi_hot" and float(labels.sum(dim=1).max()) <= 1:
        raise ValueError(
            f"{found.capitalize()}: rows of 0 and 1 with at most one 1, some with none: one-hot class labels with "
            "an empty row, or multi-label labels? Pass task='multiclass' or task='multilabel'."
        )
    return {"one_hot": "multiclass", "soft": "multiclass", "multi_hot": "multilabel"}.get(kind, "regression")


def _check(task: str, num_outputs: int, labels: Tensor | None, kind: str | None, found: str) -> None:
    problem = None
    if task == "binary" and num_outputs != 1:
        problem = "task='binary' means one logit per sample (B, 1) or (B,); a two-column output is task='multiclass'"
    elif task == "binary" and labels is not None and not (labels.ndim == 1 and _is_binary(labels)):
        problem = "task='binary' needs 0/1 labels"
    elif task == "multiclass" and num_outputs < 2:
        problem = "task='multiclass' needs at least two class scores per sample (one logit is task='binary')"
    elif task == "multiclass" and kind not in (None, "class", "one_hot", "soft"):
        problem = "task='multiclass' needs class-index, one-hot or soft labels"
    elif task == "multiclass" and labels is not None and int(class_labels(labels, task).max()) >= num_outputs:
        problem = "task='multiclass' needs labels below the number of class scores"
    elif task == "multilabel" and kind not in (None, "one_hot", "multi_hot"):
        problem = "task='multilabel' needs multi-hot (N, C) labels of 0 and 1"
    elif task == "multilabel" and labels is not None and labels.shape[1] != num_outputs:
        problem = "task='multilabel' needs one label column per score"
    if problem is not None:
        raise ValueError(f"{problem}, but {found}.")


def class_labels(labels: Tensor, task: str) -> Tensor:
    """The labels as the index of the class they name: (N,) long for multiclass and binary.

    One-hot and soft rows become their (most likely) class index; whole-number
    floats become integers. Multi-label and regression labels are returned
    unchanged.

    Example:
        >>> class_labels(torch.tensor([[0, 1], [1, 0]]), "multiclass").tolist()
        [1, 0]
    """
    if task in ("multiclass", "binary"):
        return labels.argmax(dim=1) if labels.ndim == 2 else labels.round().long()
    return labels


def target_scores(scores: Tensor, index: Tensor, task: str = "multiclass") -> Tensor:
    """The (B,) score each sample's explanation differentiates: column ``index`` of ``scores``, except for a
    binary model, where target 1 is the logit and target 0 its negative (evidence for the negative side).

    Example:
        >>> target_scores(torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 0]), "binary").tolist()
        [2.0, 1.0]
    """
    if task == "binary":
        logit = scores[:, 0]
        return torch.where(index == 1, logit, -logit)
    return scores.gather(1, index[:, None])[:, 0]


def prediction_and_confidence(scores: Tensor, task: str = "multiclass") -> tuple[Tensor, Tensor | None]:
    """Per sample: the prediction (class index; for regression the first output) and its confidence.

    Confidence is the softmax of the predicted class (multiclass), the sigmoid
    of the predicted side (binary), the sigmoid of the top label (multi-label),
    and None for regression.

    Example:
        >>> pred, confidence = prediction_and_confidence(torch.tensor([[2.0], [-2.0]]), "binary")
        >>> pred.tolist(), [round(c, 3) for c in confidence.tolist()]
        ([1, 0], [0.881, 0.881])
    """
    scores = scores.float()
    if task == "regression":
        return scores[:, 0], None
    if task == "binary":
        logit = scores[:, 0]
        predicted = (logit > 0).long()
        return predicted, torch.sigmoid(torch.where(predicted == 1, logit, -logit))
    predicted = scores.argmax(dim=1)
    top = scores.gather(1, predicted[:, None])[:, 0]
    if task == "multilabel":
        return predicted, torch.sigmoid(top)
    return predicted, scores.softmax(dim=1).gather(1, predicted[:, None])[:, 0]
