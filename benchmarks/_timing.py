"""Shared benchmark helpers: medians of repeated timings, machine description, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import torch


def synchronize() -> None:
    """Wait for queued GPU work, so a timer read next includes it (nothing to do without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 5, settle_s: float = 0.0
) -> dict[str, float]:
    """Medians of several functions timed in turns (A, B, A, B, ...), so drifts in machine load hit all alike.

    ``settle_s`` sleeps that long (untimed) before each timed call. Needed when the functions use different
    thread pools (torch's OpenMP vs numpy's OpenBLAS): a pool's worker threads keep spinning for a while after
    a call returns and steal the cores from the next call of the other library (on 2 cores this made a 20 ms
    torch call take 150 ms right after a scikit-learn fit).
    """
    for fn in fns.values():
        fn()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with_gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    packages = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "lightning", "captum", "grad-cam", "scikit-learn", "ckatorch")
    )
    return (
        f"- machine: {platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"GPU: {with_gpu}\n- Python {platform.python_version()}; {packages}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
