"""Send images and scalars to whatever loggers the trainer has.

TensorBoard is first-class. Another logger with an image API of its own
(``log_image``, as Weights & Biases and Neptune have) gets the images through
it; a logger without one, or a trainer without loggers, gets PNG files under
the run directory. Nothing here ever fails for lack of a logger.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imsave

__all__ = ["image_directory", "log_image", "log_scalars", "monitor_scalars"]


def image_directory(trainer: pl.Trainer, logger: object | None = None) -> str:
    """Where PNG files go for a logger without an image API (or without any logger)."""
    base = None
    if logger is not None:
        base = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return os.path.join(base or trainer.default_root_dir, "interp_images")


def _png_path(directory: str, tag: str, step: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag.replace("/", os.sep).replace(os.sep, "__"))
    return os.path.join(directory, safe, f"step_{step:07d}.png")


def log_image(trainer: pl.Trainer, tag: str, image: np.ndarray, step: int) -> list[str]:
    """Log one uint8 (H, W, 3) image under ``tag`` at ``step``; return PNG paths written, if any."""
    written: list[str] = []
    loggers = list(trainer.loggers)
    if not loggers:
        loggers = [None]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            continue
        log_fn = getattr(logger, "log_image", None)
        if callable(log_fn):
            log_fn(key=tag, images=[image], step=step)
            continue
        path = _png_path(image_directory(trainer, logger), tag, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        imsave(path, image)
        written.append(path)
    return written


def log_scalars(trainer: pl.Trainer, scalars: Mapping[str, float], step: int) -> None:
    """Log scalars to every logger of the trainer at ``step`` (the step of the images, so sliders line up)."""
    if scalars:
        values = {name: float(value) for name, value in scalars.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


def monitor_scalars(pl_module: pl.LightningModule, scalars: Mapping[str, float]) -> None:
    """Put scalars into ``trainer.callback_metrics`` so EarlyStopping / ModelCheckpoint can monitor them.

    Every rank calls this with the same values (rank zero broadcasts them), so
    ``rank_zero_only=True`` makes Lightning skip a pointless reduction while a
    monitor on any rank still finds the key.
    """
    for name, value in scalars.items():
        pl_module.log(
            name, float(value), logger=False, sync_dist=True, rank_zero_only=True, on_step=False, on_epoch=True
        )
