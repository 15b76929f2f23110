"""Overhead: what the callbacks add to a training epoch at their default settings.

A real ``Trainer.fit`` runs a fraction of an epoch (a few dozen training
batches, a few validation batches, four epochs) with all four callbacks;
each callback's hooks are timed individually (median over the second and
later validations: the first pays one-time costs such as drawing the probe
set, reported separately). A second fit without callbacks gives the time per
training and validation batch, from which a full epoch is estimated
(MNIST: 60,000 training and 10,000 validation images; CIFAR-10: 50,000 and
10,000). Data are random tensors of the datasets' shapes: the cost does not
depend on the pixel values.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from _timing import markdown_table
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier, cifar_resnet, mnist_cnn

TARGET_SHARE = 0.05


class BatchClock(Callback):
    """Wall time of every training and validation batch."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.train.append(time.perf_counter() - self._start)

    def on_validation_batch_start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if not trainer.sanity_checking:
            self.val.append(time.perf_counter() - self._start)


def clock_hooks(callback: Callback, hooks: tuple[str, ...]) -> dict[str, list[float]]:
    """Replace the callback's hooks by timed versions (per instance); return the list each fills."""
    times: dict[str, list[float]] = {hook: [] for hook in hooks}
    for hook in hooks:
        original: Callable = getattr(callback, hook)

        def timed(*args: object, _original: Callable = original, _hook: str = hook, **kwargs: object) -> object:
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            times[_hook].append(time.perf_counter() - start)
            return result

        setattr(callback, hook, timed)
    return times


def _loaders(shape: tuple[int, ...], train: int, val: int, batch: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    train_set = TensorDataset(torch.randn(train, *shape, generator=generator), torch.randint(10, (train,)))
    val_set = TensorDataset(torch.randn(val, *shape, generator=generator), torch.randint(10, (val,)))
    return DataLoader(train_set, batch_size=batch, shuffle=True), DataLoader(val_set, batch_size=2 * batch)


def _fit(
    net: torch.nn.Module,
    loaders: tuple[DataLoader, DataLoader],
    callbacks: list[Callback],
    batches: int,
    val_batches: int,
) -> None:
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=batches,
        limit_val_batches=val_batches,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ImageClassifier(net), *loaders)


def measure(
    name: str,
    make_net: Callable[[], torch.nn.Module],
    shape: tuple[int, ...],
    full_train: int,
    full_val: int,
    quick: bool,
) -> list[list[object]]:
    batch = 128
    batches, val_batches = (2, 1) if quick else (30, 8)  # per epoch; 4 epochs: 3 timed validations
    pool = (batches * batch, max(val_batches * 2 * batch, 64 if quick else 1024))
    loaders = _loaders(shape, *pool, batch)
    clock = BatchClock()
    _fit(make_net(), loaders, [clock], batches, val_batches)
    per_train = statistics.median(clock.train[batches:])  # skip the first epoch's batches
    per_val = statistics.median(clock.val)
    epoch = per_train * math.ceil(full_train / batch) + per_val * math.ceil(full_val / (2 * batch))

    small = 32 if quick else None
    callbacks: dict[str, Callback] = {
        "SaliencyCallback()": SaliencyCallback(),
        "GradCAMCallback()": GradCAMCallback(),
        "LinearProbeCallback()": LinearProbeCallback(num_samples=small or 1024),
        "RepresentationSimilarityCallback()": RepresentationSimilarityCallback(num_samples=small or 512),
    }
    hooks = ("setup", "on_train_start", "on_validation_epoch_end", "on_fit_end")
    timings = {label: clock_hooks(callback, hooks) for label, callback in callbacks.items()}
    _fit(make_net(), loaders, list(callbacks.values()), batches, val_batches)

    rows: list[list[object]] = []
    total = 0.0
    for label, times in timings.items():
        per_run = statistics.median(times["on_validation_epoch_end"][1:])
        first_extra = max(0.0, times["on_validation_epoch_end"][0] - per_run)
        once = sum(times["setup"]) + sum(times["on_train_start"]) + first_extra
        total += per_run
        rows.append([name, label, per_run * 1000, f"{per_run / epoch:.2%}", once * 1000])
    verdict = "MET" if total / epoch <= TARGET_SHARE else "MISSED"
    rows.append([name, "all four", total * 1000, f"{total / epoch:.2%} ({verdict})", ""])
    rows.append([name, "(estimated epoch, no callbacks)", epoch * 1000, "100%", ""])
    return rows


def run(quick: bool) -> str:
    rows = measure("MNIST-sized (mnist_cnn, 1x28x28)", mnist_cnn, (1, 28, 28), 60_000, 10_000, quick)
    rows += measure("CIFAR-sized (cifar_resnet, 3x32x32)", cifar_resnet, (3, 32, 32), 50_000, 10_000, quick)
    table = markdown_table(
        ["configuration", "callback", "ms per validation epoch", "share of a training epoch", "one-time ms"], rows
    )
    return "\n".join(
        [
            "## Overhead of leaving the callbacks on",
            "",
            (__doc__ or "").split("\n\n", 1)[1].strip(),
            "",
            f"Target: all four together add at most {TARGET_SHARE:.0%} to an MNIST-sized epoch at defaults.",
            "",
            table,
        ]
    )
