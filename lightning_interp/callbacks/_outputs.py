"""Callbacks that read the validation pass the trainer already runs: the logits and labels of every batch, kept
without an extra forward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_interp.callbacks._base import InterpCallback, refuse_unknown_arguments
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.methods import (
    OutputTransform,
    class_labels,
    label_kind,
    scores_from_output,
)
from lightning_interp.options import DataDescription, Display
from lightning_interp.probe import ProbeSet, parse_batch

LOGIT_KEYS = ("logits", "scores", "preds", "y_hat")
"""Keys of a ``validation_step`` output dict read as the batch's logits, before the forward hook's capture."""


class ValidationOutputsCallback(InterpCallback):
    """Keeps the logits and class labels of the first validation dataloader's batches during due validation epochs.

    A forward hook on the LightningModule, active only during a due
    validation epoch on global rank zero and removed at its end before any
    other work, keeps (detached, on its device) what each ``validation_step``
    gets from ``self(x)`` and counts those calls (not a call that holds
    others: under DDP, Lightning runs ``validation_step`` itself as a call of
    the LightningModule, redirected through the wrapper's ``forward``); a
    ``validation_step`` that
    returns a dict with ``"logits"`` (or ``"scores"``, ``"preds"``, ``"y_hat"``)
    is read from that instead, however often it called the model. A
    ``validation_step`` that calls ``self(...)`` more than once on a batch
    (test-time augmentation, an ensemble of passes) and returns no logits is
    read from its last call, which is not what it reports: that is warned
    about once per fit, with the fix (return ``{"logits": averaged}``).
    Labels come from the batch (``batch_parser``). A subclass's ``_run`` calls
    :meth:`_collected`. The base's probe set (two samples, or ``num_samples``
    set by a subclass that also explains probe samples) marks the run as
    ready.
    """

    def __init__(
        self,
        *,
        name: str,
        output_transform: OutputTransform | None = None,
        every_n_epochs: int = 1,
        data: DataDescription | None = None,
        display: Display | None = None,
        **unknown: Any,
    ) -> None:
        refuse_unknown_arguments(self, unknown)  # a 0.1 name: what to write instead
        check_arguments(output_transform=output_transform)
        # no probe set, num_samples or forward_fn: the base's probe (two samples, unless a subclass that explains
        # probe samples sets ``num_samples`` after this) marks the run as ready
        super().__init__(
            name=name,
            num_samples=2,
            every_n_epochs=every_n_epochs,
            data=data,
            display=display,
        )
        self.output_transform = output_transform
        self._handle: RemovableHandle | None = None
        self._pre_handle: RemovableHandle | None = None
        self._open: list[bool] = []  # per call of the LightningModule under way: whether it holds another call
        self._captured: Any = None  # the output of the batch's last call of the LightningModule
        self._calls = 0  # how often validation_step called the LightningModule on the batch
        self._logits: list[Tensor] = []
        self._labels: list[Tensor] = []

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._release()

    def _collecting(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.is_global_zero and self._is_due(trainer)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        if self._collecting(trainer):

            def enter(module: torch.nn.Module, args: Any) -> None:
                if self._open:
                    self._open[-1] = True  # the enclosing call holds this one
                self._open.append(False)

            def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
                holds_calls = self._open.pop() if self._open else False
                if holds_calls:  # a call around validation_step's own calls: DDP's redirection of validation_step
                    return  # through the wrapper's forward (its output is validation_step's, not logits)
                self._captured = output
                self._calls += 1

            self._pre_handle = pl_module.register_forward_pre_hook(enter)
            self._handle = pl_module.register_forward_hook(keep)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._captured, self._calls, self._open = None, 0, []

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
        captured, calls = self._captured, self._calls
        self._captured, self._calls = None, 0
        if self._handle is None or dataloader_idx != 0:
            return
        output = _logits_in(outputs)
        last_of_several = output is None and calls > 1  # returned logits are what validation_step reports: read those
        if output is None:
            if not calls:
                self._warn_once(
                    "no output",
                    f"{type(self).__name__}: validation_step neither called the LightningModule (self(x)) nor "
                    f"returned logits (a dict with one of {LOGIT_KEYS}), so there are no logits to read; nothing is "
                    "logged.",
                )
                return
            output = captured
        labels = parse_batch(batch, self.batch_parser).labels
        if labels is None:
            self._warn_once("no labels", f"{type(self).__name__} needs labels in the validation batches; none found.")
            return
        with torch.no_grad():
            logits = scores_from_output(output, self.output_transform).detach().float()
        if logits.shape[0] != labels.shape[0]:
            self._warn_once(
                "size",
                f"{type(self).__name__}: the model output read for a validation batch has {logits.shape[0]} rows "
                f"but the batch has {labels.shape[0]} labels (validation_step called the model on something else, "
                "or several times); pass output_transform=..., or return {'logits': ...} from validation_step.",
            )
            return
        if last_of_several:
            self._warn_once(
                "several calls",
                f"{type(self).__name__}: validation_step called the LightningModule {calls} times on one batch "
                "(test-time augmentation, several passes?) and returned no logits, so this callback reads the output "
                "of the last call only, not the prediction validation_step reports (e.g. the mean of the calls). To "
                "analyse what it reports, return it: `return {'logits': averaged_logits}` from validation_step (or "
                f"under one of the keys {LOGIT_KEYS}); it is read instead of the calls.",
            )
        self._logits.append(logits)
        self._labels.append(labels.detach())

    def _remove_hooks(self) -> None:
        for handle in (self._pre_handle, self._handle):
            if handle is not None:
                handle.remove()
        self._pre_handle, self._handle, self._open = None, None, []

    def _release(self) -> None:
        self._remove_hooks()
        self._captured, self._calls = None, 0
        self._logits, self._labels = [], []

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()  # before any other work: our own computations must not be captured
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

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Nothing to check on the model: the logits are read at the first validation batch."""

    def _collected(self) -> tuple[Tensor, Tensor] | None:
        """The epoch's (N, C) float32 logits and (N,) class labels on one device, or None (warned once) if unusable:
        nothing captured, non-finite logits, labels that are not classes, or labels outside the model's classes."""
        if not self._logits:
            return None
        logits = torch.cat([part.to(self._logits[0].device) for part in self._logits])
        raw = torch.cat([part.to(logits.device) for part in self._labels])
        kind = label_kind(raw)
        labels = class_labels(raw, "multiclass").to(logits.device) if kind in ("class", "one_hot") else None
        checks = [torch.isfinite(logits).all()]
        if labels is not None and labels.numel():
            checks += [labels.min(), labels.max()]
        finite, *bounds = torch.stack([check.double() for check in checks]).tolist()  # one read for every check
        if not finite:
            self._warn_once(
                "finite",
                f"{type(self).__name__}: the model's validation outputs contain NaN or inf, so no number computed "
                "from them would mean anything; nothing is logged while this lasts.",
            )
            return None
        if labels is None:
            self._warn_once(
                "kind",
                f"{type(self).__name__} needs class labels ((N,) indices or (N, C) one-hot rows); the validation "
                f"labels look like {kind} targets, so nothing is logged.",
            )
            return None
        classes = 2 if logits.shape[1] == 1 else logits.shape[1]
        if bounds and (bounds[0] < 0 or bounds[1] >= classes):
            self._warn_once(
                "range",
                f"{type(self).__name__}: the labels range over {int(bounds[0])}..{int(bounds[1])} but the model "
                f"gives {logits.shape[1]} score(s) per sample; nothing is logged.",
            )
            return None
        return logits, labels


def _logits_in(outputs: Any) -> Any:
    """The logits a ``validation_step`` returned in a dict, if it did."""
    if isinstance(outputs, Mapping):
        for key in LOGIT_KEYS:
            if isinstance(outputs.get(key), Tensor):
                return outputs[key]
    return None
