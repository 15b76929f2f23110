"""Scaling: cost of one run of each callback against probe size and number of layers, and its peak memory.

Each callback runs on the MNIST-sized CNN (random weights) after a one-batch
``fit`` has set it up; one "run" is what happens at a validation epoch end
(compute, render, log to a temporary directory); runs longer than 5 s are
timed once. Peak memory is the largest resident-set increase sampled every
2 ms while one run executes, after freed heap pages have been handed back to
the OS (``malloc_trim``), so memory kept by earlier runs does not hide it
(CPU; on a GPU, ``torch.cuda.max_memory_allocated`` would be the measure).
Defaults for reference: the map callbacks draw 8 samples, the probe 1024 and
the similarity callback 512; SaliencyCallback runs the gradient and 32-step
integrated gradients, so its cost is about 33 forward and backward passes
per sample.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import tempfile
import threading
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from _timing import markdown_table, median_seconds
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import (
    Display,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.callbacks import InterpCallback
from lightning_interp.demo import ImageClassifier, mnist_cnn


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next resident-set increase shows a run's own peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: memory kept by earlier runs may then hide some
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Largest resident-memory increase while ``fn`` runs (sampled; NaN without /proc)."""
    if not os.path.exists("/proc/self/statm"):
        fn()
        return float("nan")
    release_free_memory()
    base, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], resident_bytes()) - base) / 2**20


def prepared(callback: InterpCallback, samples: int, root: str) -> tuple[Callable[[], object], pl.Trainer]:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(max(samples, 64), 1, 28, 28, generator=generator), torch.arange(max(samples, 64)) % 10
    )
    loader = DataLoader(data, batch_size=max(samples, 64))  # limit_val_batches=1: one batch must hold them all
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = ImageClassifier(mnist_cnn())
    trainer.fit(model, loader, loader)
    assert callback.probe is not None and len(callback.probe) == samples, "the row must measure the probe it names"
    return (lambda: callback._run(trainer, model)), trainer


def seconds_per_run(run_once: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``run_once`` after a warm-up call; a single timed call when the warm-up took over 5 s."""
    start = time.perf_counter()
    run_once()
    if time.perf_counter() - start > 5:
        repeats = 1
    return median_seconds(run_once, repeats=repeats, warmup=0)


def run(quick: bool, device: str = "cpu") -> str:
    if device != "cpu":
        raise ValueError("the scaling section measures host memory and runs on the CPU only")
    sizes = (16,) if quick else (16, 64, 256, 1024)
    repeats = 1 if quick else 3
    makers: dict[str, Callable[[int], InterpCallback]] = {
        "SaliencyCallback() (gradient + IG)": lambda n: SaliencyCallback(
            num_samples=n, display=Display(evolution_samples=0)
        ),
        "GradCAMCallback()": lambda n: GradCAMCallback(num_samples=n, display=Display(evolution_samples=0)),
        "LinearProbeCallback()": lambda n: LinearProbeCallback(num_samples=n),
        "RepresentationSimilarityCallback()": lambda n: RepresentationSimilarityCallback(num_samples=n),
    }
    cam_layers = ["net.0", "net.2", "net.4", "net.1"]  # the modules of mnist_cnn with spatial output
    deep_layers = ["net.0", "net.2", "net.4", "net.7", "net.10", "net.8"]
    size_rows: list[list[object]] = []
    layer_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as root:
        for label, make in makers.items():
            for n in sizes:
                run_once, _ = prepared(make(n), n, root)
                seconds = seconds_per_run(run_once, repeats)
                size_rows.append([label, n, seconds * 1000, peak_extra_mib(run_once)])
        for count in (1, 2) if quick else (1, 2, 3, 4):
            callback = GradCAMCallback(layer=cam_layers[:count], num_samples=64, display=Display(evolution_samples=0))
            run_once, _ = prepared(callback, 64, root)
            layer_rows.append(["GradCAMCallback", count, seconds_per_run(run_once, repeats) * 1000])
        for count in (2, 4) if quick else (2, 4, 6):
            callback = RepresentationSimilarityCallback(layers=deep_layers[:count], num_samples=256)
            run_once, _ = prepared(callback, 256, root)
            layer_rows.append(["RepresentationSimilarityCallback", count, seconds_per_run(run_once, repeats) * 1000])
    intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    return "\n".join(
        [
            "## Scaling and memory",
            "",
            intro,
            "",
            markdown_table(["callback", "probe samples", "ms per run", "peak extra MiB"], size_rows),
            "",
            "Against the number of layers (Grad-CAM: 64 samples; similarity: 256 samples):",
            "",
            markdown_table(["callback", "layers", "ms per run"], layer_rows),
        ]
    )
