"""The one place that reads Lightning's internals.

Everything else in lightning-interp uses Lightning's public API. Four facts
have no public accessor; each is read here, in one function, with a fallback
that degrades (never a wrong result), and ``tests/test_lightning_internals.py``
fails loudly when a Lightning release moves one of them.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

__all__ = ["batches_that_stepped", "compiled_by_lightning", "user_sampler", "validation_source"]


def validation_source(trainer: pl.Trainer, stage: str | None) -> Any:
    """Where the validation data of ``stage`` comes from (Lightning's ``_DataConnector`` source, with
    ``is_defined()`` and ``dataloader()``), or None when unknown: the probe is then drawn later, from
    ``trainer.val_dataloaders`` once the loop has loaded them. Reads the loop's ``_data_source``."""
    loop = trainer.validate_loop if stage == "validate" else trainer.fit_loop.epoch_loop.val_loop
    return getattr(loop, "_data_source", None)


def compiled_by_lightning(module: nn.Module) -> bool:
    """Whether ``module`` is a LightningModule that ``trainer.fit`` unwrapped from ``torch.compile(module)``
    (Lightning keeps the compile arguments in ``_compiler_ctx``). A sub-module compiled by the user is found by
    its type (``OptimizedModule``) instead."""
    return bool(getattr(module, "_compiler_ctx", None))


def user_sampler(sampler: Any) -> Any:
    """The user's own sampler inside Lightning's ``DistributedSamplerWrapper`` (its ``dataset`` is a
    ``_DatasetSamplerWrapper`` holding it as ``_sampler``), or None for any other sampler."""
    return getattr(getattr(sampler, "dataset", None), "_sampler", None)


def batches_that_stepped(trainer: pl.Trainer) -> int | None:
    """The step Lightning's own ``self.log`` calls use (the fit loop's count of batches that stepped the
    optimizer: one behind ``global_step`` in an end-of-epoch validation, and different with several
    optimizers), or None when unknown."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return step if isinstance(step, int) else None
