"""CalibrationCallback: expected calibration error, reliability diagram and temperature, from the validation pass
the trainer already runs (no extra forward)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._outputs import ValidationOutputsCallback
from lightning_interp.methods._core import OutputTransform
from lightning_interp.methods.uncertainty import expected_calibration_error, fit_temperature, reliability_curve
from lightning_interp.visualize import _figure_to_array

__all__ = ["CalibrationCallback"]


class CalibrationCallback(ValidationOutputsCallback):
    """Log how well the model's confidence matches its accuracy on the whole validation set, every validation epoch.

    Nothing extra is run: the logits come from the validation pass the trainer
    already makes. During each due validation epoch a forward hook on the
    LightningModule keeps (detached, on its device) what each
    ``validation_step`` gets from ``self(x)``; a ``validation_step`` that
    returns a dict with ``"logits"`` (or ``"scores"``, ``"preds"``,
    ``"y_hat"``) is read from that instead. The labels come from the batch (see
    ``batch_parser``). At the epoch's end, from the first validation dataloader:

    - ``interp_<name>/ece``: expected calibration error (top label,
      ``n_bins`` equal-width bins, through torchmetrics; see
      :func:`~lightning_interp.methods.uncertainty.expected_calibration_error`);
    - ``mean_confidence`` and ``accuracy``, and ``overconfidence`` = their
      difference (positive: the model claims more than it achieves);
    - ``temperature``: the one temperature ``T`` that minimises the NLL of
      ``softmax(logits / T)`` on these logits (temperature scaling, Guo et al.
      2017), and ``ece_after_temperature``: what that post-hoc fix would leave.
      Fitted on the validation set itself, so it is an optimistic bound of what
      a held-out fit recovers;
    - ``reliability``: the reliability diagram (accuracy per confidence bin
      against the diagonal, the gap hatched, the share of samples per bin below).

    Multi-class (C logits) and binary (one logit) models with class-index or
    one-hot labels are supported. A ``validation_step`` that neither calls
    ``self(...)`` nor returns logits is warned about once (nothing to read);
    so is a captured output whose batch size differs from the labels'. Under
    DDP the numbers are those of rank zero's share of the validation set.

    Cost per run: the kept logits (N x C values on the model's device), one
    L-BFGS fit of one parameter, two ECEs; no forward pass.

    Args:
        n_bins: equal-width confidence bins.
        output_transform: picks the (B, C) logits out of the model's output.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``data``, ``display``
            (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> CalibrationCallback(n_bins=10).n_bins
        10
    """

    def __init__(
        self,
        n_bins: int = 15,
        *,
        output_transform: OutputTransform | None = None,
        name: str = "calibration",
        **kwargs: Any,
    ) -> None:
        if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 2:
            raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}.")
        super().__init__(name=name, output_transform=output_transform, **kwargs)
        self.n_bins = n_bins

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        collected = self._collected()
        if collected is None:
            return {}
        logits, labels = collected
        binary = logits.shape[1] == 1
        probs = torch.sigmoid(logits[:, 0]) if binary else torch.softmax(logits, dim=1)
        ece = expected_calibration_error(probs, labels, n_bins=self.n_bins)
        confidence = torch.maximum(probs, 1 - probs) if binary else probs.max(dim=1).values
        predicted = (probs > 0.5).long() if binary else probs.argmax(dim=1)
        accuracy = (predicted == labels).double().mean()
        curve = reliability_curve(probs, labels, n_bins=self.n_bins)
        with torch.inference_mode(False):
            temperature = fit_temperature(logits.double().clone(), labels.clone())
        scaled = torch.sigmoid(logits[:, 0] / temperature) if binary else torch.softmax(logits / temperature, dim=1)
        after = expected_calibration_error(scaled, labels, n_bins=self.n_bins)
        numbers = torch.stack([ece.double(), confidence.double().mean(), accuracy, after.double()]).cpu().tolist()
        ece_value, mean_confidence, accuracy_value, after_value = numbers
        scalars = {
            f"interp_{self.name}/ece": ece_value,
            f"interp_{self.name}/mean_confidence": mean_confidence,
            f"interp_{self.name}/accuracy": accuracy_value,
            f"interp_{self.name}/overconfidence": mean_confidence - accuracy_value,
            f"interp_{self.name}/temperature": float(temperature),
            f"interp_{self.name}/ece_after_temperature": after_value,
        }
        bins = tuple(part.cpu() for part in curve)
        step, epoch, count = logging_step(trainer), trainer.current_epoch, int(labels.numel())

        def draw() -> None:
            image = reliability_image(*bins, ece=ece_value, title=f"reliability (epoch {epoch}, {count} samples)")
            log_image(trainer, f"interp_{self.name}/reliability", image, step)

        self._submit(trainer, draw)
        return scalars


def reliability_image(
    confidence: Tensor, accuracy: Tensor, counts: Tensor, *, ece: float, title: str = ""
) -> np.ndarray:
    """A reliability diagram: accuracy per equal-width confidence bin against the diagonal, the gap to the bin's
    mean confidence hatched (above a bar: over-confident there; inside it: under-confident), and the
    share of samples per bin below it. Returns uint8 (H, W, 3).

    Example:
        >>> conf, acc, counts = torch.tensor([0.3, 0.8]), torch.tensor([0.5, 0.6]), torch.tensor([4, 6])
        >>> reliability_image(conf, acc, counts, ece=0.2).dtype
        dtype('uint8')
    """
    bins = confidence.numel()
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    filled = counts.numpy() > 0
    figure = Figure(figsize=(4.2, 4.8), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], accuracy.numpy()[filled], width, color="C0", edgecolor="white", label="accuracy")
    gap = confidence.numpy()[filled] - accuracy.numpy()[filled]  # > 0: over-confident in that bin
    top.bar(
        centres[filled],
        gap,
        width,
        bottom=accuracy.numpy()[filled],
        fill=False,
        hatch="///",
        edgecolor="C3",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy", fontsize=8)
    top.legend(loc="upper left", fontsize=7, frameon=False)
    top.set_title(f"{title}\nECE {ece:.3f}" if title else f"ECE {ece:.3f}", fontsize=9)
    share = counts.numpy() / max(int(counts.sum()), 1)
    bottom.bar(centres, share, width, color="grey", edgecolor="white")
    bottom.set_xlabel("confidence", fontsize=8)
    bottom.set_ylabel("share", fontsize=8)
    for axes in (top, bottom):
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    return _figure_to_array(figure, canvas)
