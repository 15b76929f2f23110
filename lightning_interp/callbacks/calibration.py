"""CalibrationCallback: expected calibration error, reliability diagram and temperature, from the validation pass
the trainer already runs (no extra forward)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_interp._logging import log_image
from lightning_interp.callbacks._base import InterpCallback
from lightning_interp.methods._core import OutputTransform, scores_from_output
from lightning_interp.methods.tasks import class_labels, label_kind
from lightning_interp.methods.uncertainty import expected_calibration_error, fit_temperature, reliability_curve
from lightning_interp.probe import ProbeSet, parse_batch
from lightning_interp.visualize import _figure_to_array

__all__ = ["CalibrationCallback"]

LOGIT_KEYS = ("logits", "scores", "preds", "y_hat")
"""Keys of a ``validation_step`` output dict read as the batch's logits, before the forward hook's capture."""


class CalibrationCallback(InterpCallback):
    """Log how well the model's confidence matches its accuracy on the whole validation set, every validation epoch.

    Nothing extra is run: the logits come from the validation pass the trainer
    already makes. During each due validation epoch a forward hook on the
    LightningModule keeps (detached, on its device) what each
    ``validation_step`` gets from ``self(x)``; a ``validation_step`` that
    returns a dict with ``"logits"`` (or ``"scores"``, ``"preds"``,
    ``"y_hat"``) is read from that instead. The labels come from the batch (see
    ``batch_parser``). At the epoch's end, from the first validation dataloader:

    - ``interp/<name>/ece``: expected calibration error (top label,
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
      against the diagonal, the gap shaded, the share of samples per bin below).

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
        **kwargs: ``every_n_epochs``, ``batch_parser``, ``background_drawing``
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
        if output_transform is not None and not callable(output_transform):
            raise TypeError(f"output_transform must be callable or None, got {type(output_transform).__name__}.")
        for unused in ("num_samples", "probe", "forward_fn"):
            if unused in kwargs:
                raise TypeError(
                    f"CalibrationCallback reads the whole validation pass, not a probe set: it takes no {unused}."
                )
        super().__init__(name=name, num_samples=2, **kwargs)  # the base's probe only marks the run as ready
        self.n_bins = n_bins
        self.output_transform = output_transform
        self._handle: RemovableHandle | None = None
        self._captured: list[Any] = []
        self._logits: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._warned: set[str] = set()

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._warned = set()
        self._release()

    # ------------------------------------------------------------------ collecting, during validation
    def _collecting(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.is_global_zero and self._is_due(trainer)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        if self._collecting(trainer):

            def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
                self._captured.append(output)

            self._handle = pl_module.register_forward_hook(keep)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._captured = []

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        captured, self._captured = self._captured, []
        if self._handle is None or dataloader_idx != 0:
            return
        output = _logits_in(outputs)
        if output is None:
            if not captured:
                self._warn_once(
                    "no output",
                    "CalibrationCallback: validation_step neither called the LightningModule (self(x)) nor returned "
                    f"logits (a dict with one of {LOGIT_KEYS}), so there are no logits to read; nothing is logged.",
                )
                return
            output = captured[-1]
        labels = parse_batch(batch, self.batch_parser).labels
        if labels is None:
            self._warn_once("no labels", "CalibrationCallback needs labels in the validation batches; none found.")
            return
        with torch.no_grad():
            logits = scores_from_output(output, self.output_transform).detach().float()
        if logits.shape[0] != labels.shape[0]:
            self._warn_once(
                "size",
                f"CalibrationCallback: the model output read for a validation batch has {logits.shape[0]} rows but "
                f"the batch has {labels.shape[0]} labels (validation_step called the model on something else, or "
                "several times); pass output_transform=..., or return {'logits': ...} from validation_step.",
            )
            return
        self._logits.append(logits)
        self._labels.append(labels.detach())

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured, self._logits, self._labels = [], [], []

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:  # before any other work: our own computations must not be captured
            self._handle.remove()
            self._handle = None
        try:
            super().on_validation_epoch_end(trainer, pl_module)
        finally:
            self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        super().teardown(trainer, pl_module, stage)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ the run
    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Nothing to check on the model: the logits are read at the first validation batch."""

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if not self._logits:
            return {}
        logits = torch.cat([part.to(self._logits[0].device) for part in self._logits])
        raw_labels = torch.cat([part.to(logits.device) for part in self._labels])
        kind = label_kind(raw_labels)
        if kind not in ("class", "one_hot"):
            self._warn_once(
                "kind",
                "CalibrationCallback needs class labels ((N,) indices or (N, C) one-hot rows); the validation labels "
                f"look like {kind} targets, so nothing is logged.",
            )
            return {}
        labels = class_labels(raw_labels, "multiclass").to(logits.device)
        binary = logits.shape[1] == 1
        probs = torch.sigmoid(logits[:, 0]) if binary else torch.softmax(logits, dim=1)
        classes = 2 if binary else logits.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            self._warn_once(
                "range",
                f"CalibrationCallback: the labels range over {int(labels.min())}..{int(labels.max())} but the model "
                f"gives {logits.shape[1]} score(s) per sample; nothing is logged.",
            )
            return {}
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
            f"interp/{self.name}/ece": ece_value,
            f"interp/{self.name}/mean_confidence": mean_confidence,
            f"interp/{self.name}/accuracy": accuracy_value,
            f"interp/{self.name}/overconfidence": mean_confidence - accuracy_value,
            f"interp/{self.name}/temperature": float(temperature),
            f"interp/{self.name}/ece_after_temperature": after_value,
        }
        bins = tuple(part.cpu() for part in curve)
        step, epoch, count = trainer.global_step, trainer.current_epoch, int(labels.numel())

        def draw() -> None:
            image = reliability_image(*bins, ece=ece_value, title=f"reliability (epoch {epoch}, {count} samples)")
            log_image(trainer, f"interp/{self.name}/reliability", image, step)

        self._submit(trainer, draw)
        return scalars


def _logits_in(outputs: Any) -> Any:
    """The logits a ``validation_step`` returned in a dict, if it did."""
    if isinstance(outputs, Mapping):
        for key in LOGIT_KEYS:
            if isinstance(outputs.get(key), Tensor):
                return outputs[key]
    return None


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
