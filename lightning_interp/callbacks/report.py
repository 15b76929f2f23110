"""ReportCallback: the run's HTML report, written at the end of ``fit``."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_interp.callbacks._base import unwrapped
from lightning_interp.callbacks._context import active_context
from lightning_interp.report import CONFIGURATION_FILE, MODULES_FILE, write_report

__all__ = ["ReportCallback"]


class ReportCallback(Callback):
    """Write a self-contained HTML report of the run (:mod:`lightning_interp.report`) when ``fit`` ends.

    It reads the run's TensorBoard event files when the fit is torn down (after
    every callback's end-of-fit work and every image still being drawn is
    written), and saves ``filename`` in the logger's run directory (on
    global rank zero). It needs a :class:`~lightning.pytorch.loggers.TensorBoardLogger`;
    without one it warns and writes nothing. A run trained without it gets the
    same report from ``python -m lightning_interp.report LOGDIR``.

    Args:
        filename: the report's file name inside the run directory, or an absolute path.
        title: the report's title (default: from the run directory).

    Example:
        >>> ReportCallback().filename
        'report.html'
    """

    def __init__(self, filename: str = "report.html", title: str | None = None) -> None:
        if not isinstance(filename, str) or not filename.endswith((".html", ".htm")):
            raise ValueError(f"filename must name an .html file, got {filename!r}.")
        self.filename = filename
        self.title = title
        self.path: str | None = None
        self._fit_ended = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_ended = False

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_ended = True  # written at teardown: after every callback's on_fit_end (evolution strips, warnings)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._fit_ended:
            return
        self._fit_ended = False
        if not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            rank_zero_warn(
                "ReportCallback reads the run's TensorBoard event files, but the trainer has no TensorBoardLogger: "
                "no report is written. Add one (the default logger is one when tensorboard is installed)."
            )
            return
        context = active_context(trainer)
        if context is not None:
            context.worker.drain()  # every image of the run is in the event file before it is read
        logger.experiment.flush()
        log_dir = logger.log_dir
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, CONFIGURATION_FILE), "w", encoding="utf-8") as handle:
            json.dump(run_configuration(trainer), handle, indent=1)
        with open(os.path.join(log_dir, MODULES_FILE), "w", encoding="utf-8") as handle:
            json.dump(module_order(pl_module), handle)
        target = self.filename if os.path.isabs(self.filename) else os.path.join(log_dir, self.filename)
        self.path = write_report(log_dir, target, title=self.title)
        rank_zero_info(f"lightning-interp: report written to {self.path}")


def module_order(model: nn.Module) -> list[str]:
    """The model's module names in ``named_modules`` order (the order the report lists layers in), as the
    callbacks name them (without a compiled or wrapped model's own prefix).

    Example:
        >>> module_order(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        ['0', '1']
    """
    return [name for name, _ in unwrapped(model).named_modules() if name]


_SIMPLE = (bool, int, float, str)


def run_configuration(trainer: pl.Trainer) -> dict[str, dict[str, str]]:
    """The trainer's main settings and each lightning-interp callback's public settings, as text (for the report).

    Example:
        >>> trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False)
        >>> run_configuration(trainer)["Trainer"]["max_epochs"]
        '3'
    """
    settings = {
        "max_epochs": trainer.max_epochs,
        "precision": trainer.precision,
        "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.num_devices,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
    }
    configuration = {"Trainer": {key: str(value) for key, value in settings.items()}}
    for callback in trainer.callbacks:
        if not type(callback).__module__.startswith("lightning_interp"):
            continue
        shown: dict[str, str] = {}
        for key, value in vars(callback).items():
            if key.startswith("_") or key in ("probe", "path"):
                continue
            if isinstance(value, _SIMPLE) or (
                isinstance(value, (list, tuple)) and len(value) <= 12 and all(isinstance(v, _SIMPLE) for v in value)
            ):
                shown[key] = str(value)
        name = getattr(callback, "name", None)
        configuration[f"{type(callback).__name__}" + (f" ({name})" if name else "")] = shown
    return configuration
