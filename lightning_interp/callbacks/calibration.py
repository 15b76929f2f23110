"""CalibrationCallback: expected calibration error, reliability diagram and temperature, from the validation pass
the trainer already runs (no extra forward)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._outputs import ValidationOutputsCallback
from lightning_interp.methods import OutputTransform, temperature_steps, temperature_warning
from lightning_interp.visualize import reliability_image

__all__ = ["CalibrationCallback"]

TEMPERATURE_STEPS = 32
"""Newton steps of the temperature fit (each a few element-wise ops on the logits, no host read): about twice what
the interior minima tried in the tests need to reach the float64 minimiser."""


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

    What is calibrated is what ``validation_step`` reports: the logits it
    returns in such a dict, whenever it returns them. A ``validation_step``
    that calls ``self(...)`` several times on a batch (test-time
    augmentation: ``(self(x) + self(x.flip(-1))) / 2``) and returns nothing
    would be read from its last call alone; that is warned about once per
    fit: return ``{"logits": averaged}`` to calibrate the averaged prediction.

    Multi-class (C logits) and binary (one logit) models with class-index or
    one-hot labels are supported. A ``validation_step`` that neither calls
    ``self(...)`` nor returns logits is warned about once (nothing to read);
    so is a captured output whose batch size differs from the labels'. Under
    DDP and FSDP2 the numbers are those of rank zero's share of the validation
    set.
    With a ``WeightAveraging`` callback (``EMAWeightAveraging``), the
    validation pass, and so the calibration, is that of the averaged weights.

    Cost per run: the kept logits (N x C values on the model's device), a
    fixed number of Newton steps for the temperature (a few element-wise ops
    on the logits each), both ECEs and the diagram's bins in one pass, and one
    read of the device for every number logged and drawn; no forward pass.

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

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

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
        temperature, separable = temperature_steps(logits, labels, TEMPERATURE_STEPS)
        # the ECE before and after temperature scaling in one pass: (2, N, C) logits, (2, 3, n_bins + 1) bin sums
        scaled = torch.stack([logits, logits / temperature.to(logits.dtype)])
        probs = torch.sigmoid(scaled[..., 0]) if binary else torch.softmax(scaled, dim=2)
        sums = _bin_sums(probs, labels, binary, self.n_bins)
        ece = (sums[:, 2] - sums[:, 1]).abs().sum(dim=1) / labels.numel()  # sum_b n_b / N |acc_b - conf_b|
        if binary:
            confidence = torch.maximum(probs[0], 1 - probs[0])
            correct = (probs[0] > 0.5).long() == labels
        else:
            confidence, predicted = probs[0].max(dim=1)
            correct = predicted == labels
        # the diagram's bins: a confidence of exactly 1 joins the last bin (see reliability_curve)
        curve = torch.cat([sums[0, :, :-2], sums[0, :, -2:].sum(dim=1, keepdim=True)], dim=1)
        summary = [ece[0], confidence.double().mean(), correct.double().mean(), ece[1], temperature, separable]
        numbers = torch.cat([torch.stack([value.double() for value in summary]), curve.double().reshape(-1)])
        values = numbers.tolist()  # the one read of the device: everything logged, warned about and drawn
        ece_value, mean_confidence, accuracy, after, fitted, flag = values[: len(summary)]
        counts, confidence_sums, accuracy_sums = torch.tensor(values[len(summary) :], dtype=torch.float64).view(3, -1)
        message = temperature_warning(fitted, bool(flag))
        if message is not None:
            self._warn_once("temperature", f"interp_{self.name}/temperature: {message}")  # once per fit
        scalars = {
            f"interp_{self.name}/ece": ece_value,
            f"interp_{self.name}/mean_confidence": mean_confidence,
            f"interp_{self.name}/accuracy": accuracy,
            f"interp_{self.name}/overconfidence": mean_confidence - accuracy,
            f"interp_{self.name}/temperature": fitted,
            f"interp_{self.name}/ece_after_temperature": after,
        }
        safe = counts.clamp(min=1)
        bins = ((confidence_sums / safe).float(), (accuracy_sums / safe).float(), counts.long())
        step, epoch, count = logging_step(trainer), trainer.current_epoch, labels.numel()

        def draw() -> None:
            image = reliability_image(*bins, ece=ece_value, title=f"reliability (epoch {epoch}, {count} samples)")
            log_image(trainer, f"interp_{self.name}/reliability", image, step)

        self._submit(trainer, draw)
        return scalars


def _bin_sums(probs: Tensor, labels: Tensor, binary: bool, n_bins: int) -> Tensor:
    """Per equal-width confidence bin, the sample count, confidence sum and accuracy sum, binned as torchmetrics'
    calibration error bins them (bin ``b`` = ``[b / n_bins, (b + 1) / n_bins)``, a confidence of exactly 1 in an
    extra bin ``n_bins``): (..., 3, n_bins + 1) float32 from (..., N, C) probabilities, or (..., N) of class 1 when
    ``binary`` (confidence = that probability, accuracy = the label, as the binary calibration error has them).

    Example:
        >>> _bin_sums(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]), torch.tensor([0, 1, 1]), False, 2)
        tensor([[0.0000, 3.0000, 0.0000],
                [0.0000, 2.3000, 0.0000],
                [0.0000, 2.0000, 0.0000]])
    """
    if binary:
        confidence, accuracy = probs.float(), labels.float().expand_as(probs)
    else:
        confidence, predicted = probs.float().max(dim=-1)
        accuracy = (predicted == labels).float()
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = torch.bucketize(confidence, boundaries, right=True) - 1
    values = torch.stack([torch.ones_like(confidence), confidence, accuracy], dim=-2)  # (..., 3, N)
    sums = torch.zeros((*values.shape[:-1], n_bins + 1), dtype=values.dtype, device=values.device)
    return sums.scatter_add_(-1, index.unsqueeze(-2).expand_as(values), values)
