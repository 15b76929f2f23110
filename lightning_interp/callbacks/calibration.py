"""CalibrationCallback: expected calibration error, reliability diagram and temperature, from the validation pass
the trainer already runs (no extra forward)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._outputs import ValidationOutputsCallback
from lightning_interp.methods import (
    OutputTransform,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from lightning_interp.visualize import reliability_image

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
      :func:`~lightning_interp.methods.expected_calibration_error`);
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
        check_arguments(n_bins=n_bins)
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
