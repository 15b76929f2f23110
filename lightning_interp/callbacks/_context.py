"""What the callbacks of one Trainer share during one run: the drawing worker and one-time work.

Several callbacks on one trainer draw their probe sets from the same
validation loader, trace the same model to choose layers, and log images.
A :class:`RunContext` per trainer and run holds the one background
:class:`~lightning_interp._logging.DrawingWorker`, the probe sets drawn so
far (so callbacks asking for the same samples get the same object, drawn
once), the model traces (one dry forward per model and input shape) and
pinned host copies of probe inputs for fast transfers. It is created by the
first callback's ``setup`` and ended at teardown or when training raises, so
nothing carries over to the next ``fit``.
"""

from __future__ import annotations

import atexit
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_interp._logging import DrawingWorker
from lightning_interp.methods import (
    ModelTrace,
)
from lightning_interp.probe import ParsedBatch, ProbeSet, ValidationScan


@dataclass
class RunContext:
    """Shared state of every lightning-interp callback of one trainer for one run.

    Attributes:
        worker: the one drawing thread of this run.
        members: ids of the callbacks whose ``setup`` ran in this run (a second
            ``setup`` of the same callback means a new run).
        scans: loader key -> the scan of what that loader validates on (labels read once).
        probes: draw key -> the probe set drawn for it.
        stream: batches of a one-shot validation stream, taken as the trainer loaded them.
        features: the features of one validation, captured once for every representation callback due then.
        unions: the probe samples of a group of callbacks, gathered once (with each callback's rows).
        traces: (model id, input shape, dtype, device) -> the model's trace.
        pinned: probe-input tensor id -> its pinned host copy.
        timings: one-time cost name -> seconds spent (for the benchmark).
        notes: the one-time messages already given in this run.
        layout: callback name -> its scalar tags (for TensorBoard's custom-scalars layout).
        layout_written: how many tags the layout last written in this run held (0: none written); it is written
            again when tags were added (TensorBoard shows a run's newest layout).
    """

    worker: DrawingWorker = field(default_factory=DrawingWorker)
    members: set[int] = field(default_factory=set)
    scans: dict[tuple, ValidationScan] = field(default_factory=dict)
    probes: dict[tuple, ProbeSet] = field(default_factory=dict)
    stream: list[ParsedBatch] = field(default_factory=list)
    stream_seen: set[tuple] = field(default_factory=set)
    features: dict[tuple, dict[int, dict[str, Tensor]]] = field(default_factory=dict)
    unions: dict[tuple, tuple[Tensor, dict[int, Tensor]]] = field(default_factory=dict)
    traces: dict[tuple, ModelTrace] = field(default_factory=dict)
    pinned: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: set[str] = field(default_factory=set)
    layout: dict[str, set[str]] = field(default_factory=dict)
    layout_written: int = 0

    def collect(self, key: tuple, batch: ParsedBatch, wanted: int) -> None:
        """Keep a validation batch of a stream (once per batch, whichever callback sees it first)."""
        if key in self.stream_seen or sum(part.inputs.shape[0] for part in self.stream) >= wanted:
            return
        self.stream_seen.add(key)
        self.stream.append(batch.to_host())

    def host_copy(self, inputs: Tensor, device: torch.device) -> Tensor:
        """``inputs`` in pinned host memory when they go to a CUDA device (fast, asynchronous copies), else as is."""
        if device.type != "cuda" or inputs.device.type != "cpu" or not torch.cuda.is_available():
            return inputs
        entry = self.pinned.get(id(inputs))
        if entry is None or entry[0] is not inputs:  # the id of a freed tensor can be reused
            entry = (inputs, inputs.pin_memory())
            self.pinned[id(inputs)] = entry
        return entry[1]

    def once(self, cache: str, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked of ``cache`` ("scans", "probes" or "traces") in this run, the
        same object after that; the time it took counts towards that cache's one-time cost."""
        store = getattr(self, cache)
        if key not in store:
            started = time.perf_counter()
            store[key] = make()
            cost = ONE_TIME_COSTS[cache]
            self.timings[cost] = self.timings.get(cost, 0.0) + time.perf_counter() - started
        return store[key]


ONE_TIME_COSTS = {"scans": "probe draw", "probes": "probe draw", "traces": "layer choice"}
_CONTEXTS: weakref.WeakKeyDictionary[pl.Trainer, RunContext] = weakref.WeakKeyDictionary()


def join_run(trainer: pl.Trainer, callback: object) -> RunContext:
    """The context of ``trainer``'s current run for ``callback`` (called from ``setup``).

    A callback joining twice means the trainer started a new run without
    ending the last (e.g. ``setup`` raised before teardown): the old context
    is ended quietly and a fresh one begins.
    """
    context = _CONTEXTS.get(trainer)
    if context is not None and id(callback) in context.members:
        end_run(trainer, raise_errors=False)
        context = None
    if context is None:
        context = RunContext()
        _CONTEXTS[trainer] = context
    context.members.add(id(callback))
    return context


def active_context(trainer: pl.Trainer) -> RunContext | None:
    """The context of ``trainer``'s current run, or None outside a run (e.g. a callback method called by hand)."""
    return _CONTEXTS.get(trainer)


def end_run(trainer: pl.Trainer, *, raise_errors: bool) -> BaseException | None:
    """Drain and stop the run's worker and forget its shared state; later calls for the same run do nothing.

    Returns the error a drawing job left when ``raise_errors`` is False (it is raised otherwise).
    """
    context = _CONTEXTS.pop(trainer, None)
    if context is None:
        return None
    return context.worker.close(raise_errors=raise_errors)


@atexit.register
def _close_every_worker() -> None:
    """At interpreter exit, stop drawing threads a run left behind (a daemon thread killed mid-draw aborts)."""
    for context in list(_CONTEXTS.values()):
        context.worker.close(raise_errors=False)
    _CONTEXTS.clear()


def current_timings(trainer: pl.Trainer) -> dict[str, Any]:
    """One-time costs of the current run so far (seconds by name); empty when no run is active."""
    context = _CONTEXTS.get(trainer)
    return dict(context.timings) if context is not None else {}
