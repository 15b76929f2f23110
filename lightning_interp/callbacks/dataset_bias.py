"""DatasetBiasCallback: class balance of the training and validation data, and which classes the model neglects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from lightning_interp._logging import log_image, log_scalars
from lightning_interp.callbacks._base import _first_loader, class_name, parse_class_names
from lightning_interp.callbacks._outputs import ValidationOutputsCallback
from lightning_interp.methods._core import OutputTransform
from lightning_interp.methods.bias import ClassBalance, class_balance, per_class_metrics
from lightning_interp.probe import dataset_labels, sampled_indices, scannable
from lightning_interp.visualize import _figure_to_array

__all__ = ["DatasetBiasCallback"]


class DatasetBiasCallback(ValidationOutputsCallback):
    """Log how the classes are balanced in the data, and which classes the model gets wrong, while it trains.

    At the start of training, from the datasets' own label lists (the
    ``targets`` / ``labels`` attribute of torchvision datasets and
    ``ImageFolder``, a ``TensorDataset``'s second tensor, through ``Subset``
    and ``ConcatDataset``; no image is loaded and no random state is used),
    restricted to the samples the loaders' samplers yield (a sampler-based
    split and ``limit_val_batches`` are honoured):

    - ``interp/<name>/train/imbalance_ratio`` and ``val/imbalance_ratio``:
      the largest class count over the smallest;
    - ``class_counts``: a bar chart of both sets' class counts;
    - a warning when a set's ratio exceeds ``imbalance_warning`` (default 10),
      naming its rarest class. A dataset that lists no labels is skipped with
      a warning (counting would mean loading every sample).

    At each due validation epoch, from the logits of the validation pass the
    trainer already runs (no extra forward; see
    :class:`~lightning_interp.callbacks.CalibrationCallback` for how they are
    read), per class (torchmetrics):

    - ``<class>/recall`` and ``<class>/precision``;
    - ``recall_gap``: best minus worst class recall, and ``worst_recall``;
    - ``confusion``: the confusion matrix, rows normalised to the true class.

    Multi-class (C logits) and binary (one logit) models with class-index or
    one-hot labels are supported. Under DDP the per-epoch numbers are those of
    rank zero's share of the validation set.

    Args:
        imbalance_warning: the class-count ratio above which a set is warned about.
        class_names: names for the tags and figures instead of class indices.
        output_transform: picks the (B, C) logits out of the model's output.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``batch_parser``, ``background_drawing``
            (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> DatasetBiasCallback(imbalance_warning=5.0).imbalance_warning
        5.0
    """

    def __init__(
        self,
        imbalance_warning: float = 10.0,
        *,
        class_names: Sequence[str] | None = None,
        output_transform: OutputTransform | None = None,
        name: str = "bias",
        **kwargs: Any,
    ) -> None:
        if not imbalance_warning >= 1:
            raise ValueError(f"imbalance_warning must be a ratio >= 1, got {imbalance_warning!r}.")
        super().__init__(name=name, output_transform=output_transform, **kwargs)
        self.imbalance_warning = float(imbalance_warning)
        self.class_names = parse_class_names(class_names)
        self.balances: dict[str, ClassBalance] = {}

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.balances = {}

    def _class_name(self, k: int) -> str:
        return class_name(self.class_names, k)

    # ------------------------------------------------------------------ class counts, at the start of training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        loaders = {
            "train": (_first_loader(trainer.train_dataloader), trainer.limit_train_batches),
            "val": (self._current_loader(trainer), trainer.limit_val_batches),
        }
        for split, (loader, limit) in loaders.items():
            labels = _loader_labels(loader, limit)
            if labels is None:
                rank_zero_warn(
                    f"DatasetBiasCallback: the {split} data is not a map-style dataset that lists its labels (a "
                    "`targets` or `labels` attribute, or a TensorDataset), so its class counts are skipped: counting "
                    "them would load every sample (or consume a stream)."
                )
                continue
            self.balances[split] = class_balance(labels)
        if not self.balances:
            return
        classes = max(balance.counts.numel() for balance in self.balances.values())
        self.balances = {split: class_balance(_labels_of(b), classes) for split, b in self.balances.items()}
        scalars = {
            f"interp/{self.name}/{split}/imbalance_ratio": b.imbalance_ratio for split, b in self.balances.items()
        }
        for split, balance in self.balances.items():
            if balance.imbalance_ratio > self.imbalance_warning:
                rank_zero_warn(
                    f"DatasetBiasCallback: the {split} set is imbalanced: class {self._class_name(balance.rarest)!r} "
                    f"has {int(balance.counts[balance.rarest])} samples, class "
                    f"{self._class_name(balance.commonest)!r} {int(balance.counts[balance.commonest])} (ratio "
                    f"{balance.imbalance_ratio:.3g} > imbalance_warning={self.imbalance_warning:g}). Expect its "
                    "recall to lag; consider class weights or a balanced sampler."
                )
        log_scalars(trainer, scalars, trainer.global_step)
        counts = {split: b.counts.clone() for split, b in self.balances.items()}
        names = [self._class_name(k) for k in range(classes)]
        step = trainer.global_step

        def draw() -> None:
            log_image(trainer, f"interp/{self.name}/class_counts", class_counts_image(counts, names), step)

        self._submit(trainer, draw)

    # ------------------------------------------------------------------ per-class quality, every validation
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        collected = self._collected()
        if collected is None:
            return {}
        logits, labels = collected
        binary = logits.shape[1] == 1
        predictions = (logits[:, 0] > 0).long() if binary else logits.argmax(dim=1)
        classes = 2 if binary else logits.shape[1]
        metrics = per_class_metrics(predictions, labels, classes)
        scalars: dict[str, float] = {}
        for k in range(classes):
            for what, values in (("recall", metrics.recall), ("precision", metrics.precision)):
                value = float(values[k])
                if value == value:  # NaN: the class has no sample / no prediction, nothing to log
                    scalars[f"interp/{self.name}/{self._class_name(k)}/{what}"] = value
        recalls = metrics.recall[~metrics.recall.isnan()]
        if recalls.numel():
            scalars[f"interp/{self.name}/recall_gap"] = float(recalls.max() - recalls.min())
            scalars[f"interp/{self.name}/worst_recall"] = float(recalls.min())
        confusion, names = metrics.confusion, [self._class_name(k) for k in range(classes)]
        step, epoch = trainer.global_step, trainer.current_epoch

        def draw() -> None:
            image = confusion_image(confusion, names, title=f"confusion (epoch {epoch}), rows: true class")
            log_image(trainer, f"interp/{self.name}/confusion", image, step)

        self._submit(trainer, draw)
        return scalars


def _loader_labels(loader: Any, limit: int | float | None) -> Tensor | None:
    """The labels of the samples ``loader`` yields (within ``limit`` batches), from the dataset's label list."""
    if loader is None or not scannable(loader):
        return None
    labels = dataset_labels(loader.dataset)
    if labels is None or labels.numel() == 0:
        return None
    return labels[sampled_indices(loader, limit)]


def _labels_of(balance: ClassBalance) -> Tensor:
    """Labels with the same counts as ``balance`` (to recount them over more classes)."""
    return torch.repeat_interleave(torch.arange(balance.counts.numel()), balance.counts)


def class_counts_image(counts: dict[str, Tensor], names: Sequence[str]) -> np.ndarray:
    """Grouped bars of class counts, one colour per split. Returns uint8 (H, W, 3).

    Example:
        >>> class_counts_image({"train": torch.tensor([5, 1]), "val": torch.tensor([2, 2])}, ["a", "b"]).dtype
        dtype('uint8')
    """
    classes = len(names)
    figure = Figure(figsize=(max(4.0, 0.5 * classes + 2), 3.2), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(counts), 1)
    for slot, (split, values) in enumerate(counts.items()):
        positions = np.arange(classes) - 0.4 + width * (slot + 0.5)
        axes.bar(positions, values.numpy(), width, label=f"{split} ({int(values.sum())})")
    axes.set_xticks(np.arange(classes), list(names), fontsize=7, rotation=45 if classes > 8 else 0)
    axes.set_ylabel("samples", fontsize=8)
    axes.set_title("class counts", fontsize=9)
    axes.legend(fontsize=7, frameon=False)
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    return _figure_to_array(figure, canvas)


def confusion_image(confusion: Tensor, names: Sequence[str], *, title: str = "") -> np.ndarray:
    """The confusion matrix with each row normalised to its true class (the diagonal is the recall), counts in the
    cells. Returns uint8 (H, W, 3).

    Example:
        >>> confusion_image(torch.tensor([[3, 1], [0, 4]]), ["a", "b"]).dtype
        dtype('uint8')
    """
    counts = confusion.double()
    rows = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    classes = len(names)
    side = max(3.2, 0.45 * classes + 1.6)
    figure = Figure(figsize=(side + 0.6, side), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    shown = axes.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if classes <= 20:
        for i in range(classes):
            for j in range(classes):
                colour = "white" if rows[i, j] > 0.6 else "black"
                axes.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=colour)
    axes.set_xticks(range(classes), list(names), fontsize=7, rotation=45 if classes > 8 else 0)
    axes.set_yticks(range(classes), list(names), fontsize=7)
    axes.set_xlabel("predicted", fontsize=8)
    axes.set_ylabel("true", fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    figure.tight_layout()
    return _figure_to_array(figure, canvas)
