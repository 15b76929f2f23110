"""Send images and scalars to whatever loggers the trainer has, and draw images off the training thread.

TensorBoard is first-class. Another logger with an image API of its own
(``log_image``, as Weights & Biases and Neptune have) gets the images through
it; a logger without one, or a trainer without loggers, gets PNG files under
the run directory. Nothing here ever fails for lack of a logger.

Scalars are logged synchronously (EarlyStopping and ModelCheckpoint read them
at the end of the same validation). Images are drawn and logged by a
:class:`DrawingWorker`: one thread, queued jobs in submission order, a small bounded
queue, drained at the end of ``fit``/``validate``, at teardown and when
training raises.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imsave
from torch import Tensor

from lightning_interp._lightning import batches_that_stepped

__all__ = [
    "DrawingWorker",
    "image_directory",
    "log_image",
    "log_scalars",
    "log_warnings",
    "logging_step",
    "monitor_scalars",
    "prepare_loggers",
    "scalar_layout",
    "write_scalar_layout",
]

WORKER_THREAD_NAME = "lightning-interp-drawing"
QUEUE_DEPTH = 8  # jobs waiting at most: a few validation epochs of every callback, then submit() waits


def image_directory(trainer: pl.Trainer, logger: object | None = None) -> str:
    """Where PNG files go for a logger without an image API (or without any logger)."""
    base = None
    if logger is not None:
        base = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return os.path.join(base or trainer.default_root_dir, "interp_images")


def _png_path(directory: str, tag: str, step: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag.replace("/", os.sep).replace(os.sep, "__"))
    return os.path.join(directory, safe, f"step_{step:07d}.png")


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own logger calls use now, so our scalars and images sit at the step of ``val_loss`` of the
    same validation (Lightning counts the batches that stepped the optimizer, one behind ``global_step`` during an
    end-of-epoch validation; the two differ also with several optimizers).

    Example:
        >>> logging_step(pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
        0
    """
    step = batches_that_stepped(trainer)
    return step if step is not None else int(trainer.global_step)


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
        partial = f"{path}.partial"
        imsave(partial, image, format="png")
        os.replace(partial, path)  # atomic: a reader (or a crash) never sees half a PNG under the real name
        written.append(path)
    return written


TAG_PREFIX = "interp_"
"""Every tag of ours starts with ``interp_<callback name>/``: TensorBoard groups its cards by the first path segment,
so each callback gets a group of its own (all of ours adjacent, and apart from the user's own metrics)."""


def scalar_layout(tags: Mapping[str, set[str]]) -> dict[str, dict[str, list]]:
    r"""A TensorBoard custom-scalars layout: per callback and metric a category ``interp_<name>/<metric>``, in it one
    chart per layer, method or class that logs the metric (one tag ``interp_<name>/<what>/<metric>`` each).

    TensorBoard's Custom Scalars tab draws every line of a run in that run's colour (tags of one run differ only by
    marker shape), so lines overlaid in one chart cannot be told apart; one tag per chart names each line by its
    chart's title, the charts of one metric side by side, and several runs in one chart keep their own colours.

    Example:
        >>> tags = {"interp_gradcam/net.4/localization", "interp_gradcam/net.7/localization"}
        >>> layout = scalar_layout({"gradcam": tags})
        >>> {title: chart[1] for title, chart in layout["interp_gradcam/localization"].items()}
        {'net.4': ['^interp_gradcam/net\\.4/localization$'], 'net.7': ['^interp_gradcam/net\\.7/localization$']}
    """
    layout: dict[str, dict[str, list]] = {}
    for name, names in sorted(tags.items()):
        prefix = f"{TAG_PREFIX}{name}/"
        for tag in sorted(names):
            if not tag.startswith(prefix):
                continue
            what, _, metric = tag[len(prefix) :].rpartition("/")
            layout.setdefault(f"{prefix}{metric}", {})[what or metric] = ["Multiline", [f"^{re.escape(tag)}$"]]
    return layout


def write_scalar_layout(trainer: pl.Trainer, tags: Mapping[str, set[str]], step: int = 0) -> bool:
    """Write :func:`scalar_layout` to every TensorBoard logger of the trainer at ``step``; True if one was written to.

    TensorBoard shows a run's newest layout, so a layout written again when new tags appear replaces the first.
    """
    from torch.utils.tensorboard.summary import custom_scalars

    layout = scalar_layout(tags)
    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and layout:
            writer = getattr(logger.experiment, "_get_file_writer", None)
            if callable(writer):
                writer().add_summary(custom_scalars(layout), global_step=step)
                written = True
    return written


def prepare_loggers(trainer: pl.Trainer) -> None:
    """Create lazily made logger resources (TensorBoard's writer) on the calling thread, before a worker uses them."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _ = logger.experiment


def host_scalars(scalars: Mapping[str, float | Tensor]) -> dict[str, float]:
    """The scalars as floats, the tensors among them brought to the host in one transfer per device.

    A callback's ``_run`` may return 0-d tensors where the values are computed: converting each with ``float()``
    would wait for the device once per scalar.

    Example:
        >>> host_scalars({"a": torch.tensor(0.5), "b": 2.0, "c": torch.tensor(1, dtype=torch.int64)})
        {'a': 0.5, 'b': 2.0, 'c': 1.0}
    """
    by_device: dict[torch.device, list[str]] = {}
    for name, value in scalars.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"Scalar {name!r} must be one number, got a tensor of shape {tuple(value.shape)}.")
            by_device.setdefault(value.device, []).append(name)
    result = {name: float(value) for name, value in scalars.items() if not isinstance(value, Tensor)}
    for device, names in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        values = torch.stack([scalars[name].detach().reshape(()).to(dtype) for name in names]).tolist()
        result.update(zip(names, values, strict=True))
    return {name: result[name] for name in scalars}


def to_host(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of the tensors, brought over in one copy per (device, dtype) instead of one per tensor.

    The tensors are flattened into one buffer on their device, copied once, and split back into their shapes
    (tensors already on the CPU are cloned there). Cast beforehand to bring mixed dtypes over in one copy.

    Example:
        >>> host = to_host({"a": torch.ones(2, 3), "b": torch.zeros(4)})
        >>> {name: tuple(t.shape) for name, t in host.items()}
        {'a': (2, 3), 'b': (4,)}
    """
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, value in tensors.items():
        groups.setdefault((value.device, value.dtype), []).append(name)
    result: dict[str, Tensor] = {}
    for names in groups.values():
        parts = [tensors[name].detach() for name in names]
        flat = torch.cat([part.reshape(-1) for part in parts]).cpu() if len(parts) > 1 else parts[0].cpu().clone()
        pieces = flat.split([part.numel() for part in parts]) if len(parts) > 1 else [flat]
        result.update({name: piece.view(part.shape) for name, piece, part in zip(names, pieces, parts, strict=True)})
    return {name: result[name] for name in tensors}


def to_numpy(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """float64 numpy copies of the tensors (all on one device), brought to the host in one copy and read once.

    Example:
        >>> arrays = to_numpy({"a": torch.ones(2, 3), "b": torch.tensor(0.5)})
        >>> arrays["a"].shape, float(arrays["b"])
        ((2, 3), 0.5)
    """
    if not tensors:
        return {}
    parts = [value.detach().reshape(-1).to(torch.float64) for value in tensors.values()]
    flat = torch.cat(parts).cpu().numpy()
    result, at = {}, 0
    for (name, value), part in zip(tensors.items(), parts, strict=True):
        result[name] = flat[at : at + part.numel()].reshape(tuple(value.shape))
        at += part.numel()
    return result


def log_scalars(trainer: pl.Trainer, scalars: Mapping[str, float], step: int) -> None:
    """Log scalars to every logger of the trainer at ``step`` (the step of the images, so sliders line up)."""
    if scalars:
        values = {name: float(value) for name, value in scalars.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


WARNINGS_TAG = "warnings"
"""A callback's warnings of a run are logged as TensorBoard text under ``interp_<callback name>/warnings`` (the
Text tab shows them, and the HTML report reads them back to put them at its top)."""


def log_warnings(trainer: pl.Trainer, group: str, messages: list[str], step: int) -> None:
    """Log warning ``messages`` (already shown on stderr) as text under ``<group>/warnings`` at ``step``, to every
    TensorBoard logger of the trainer (others have no text API in common; the warnings stay on stderr for them)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for message in messages:
                logger.experiment.add_text(f"{group}/{WARNINGS_TAG}", message, global_step=step)


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


class DrawingWorker:
    """Runs drawing-and-logging jobs on one background thread, in the order they were submitted.

    ``submit`` hands a job over and returns at once (it waits only while
    ``depth`` jobs are already queued, so a slow drawing cannot pile up
    memory); ``drain`` waits until every job has run; ``close`` drains and
    ends the thread. When a job raises, the jobs after it are skipped and
    the error is raised, with its original traceback, on the thread that
    next calls ``submit``, ``drain`` or ``close``. ``submit(job, inline=True)``
    runs the job on the calling thread instead, at once, ahead of jobs still
    queued (same output, for debugging).
    The thread starts with the first job, so an unused worker costs nothing.

    Args:
        depth: most jobs waiting in the queue.

    Attributes:
        job_seconds: how long each job took, in the order they ran.

    Example:
        >>> done = []
        >>> worker = DrawingWorker()
        >>> for i in range(3):
        ...     worker.submit(lambda i=i: done.append(i))
        >>> worker.close()
        >>> done
        [0, 1, 2]
    """

    def __init__(self, depth: int = QUEUE_DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        self.job_seconds: list[float] = []
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None], *, inline: bool = False) -> None:
        """Queue ``job`` (a no-argument callable), or run it now with ``inline``; first raise an earlier job's error."""
        self.raise_pending()
        if inline:
            self._timed(job)
            return
        with self._lock:
            if not self.alive:
                self._thread = threading.Thread(target=self._loop, name=WORKER_THREAD_NAME, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every submitted job has run, then raise the first error one of them left, if any."""
        if self.alive:
            self._jobs.join()
        self.raise_pending()

    def close(self, *, raise_errors: bool = True) -> BaseException | None:
        """Drain, end the thread and wait for it; return (or, with ``raise_errors``, raise) a job's error."""
        if self.alive:
            self._jobs.join()
            self._jobs.put(None)
            assert self._thread is not None
            self._thread.join()
        self._thread = None
        if raise_errors:
            self.raise_pending()
            return None
        error, self._error = self._error, None
        return error

    def raise_pending(self) -> None:
        """Raise the error a job left (once), on the calling thread, with the job's own traceback."""
        error, self._error = self._error, None
        if error is not None:
            note = getattr(error, "add_note", None)
            if note is not None:
                note(
                    "(raised by a lightning-interp drawing job on its background thread; "
                    "pass display=Display(background_drawing=False) to the callback to draw inline while debugging)"
                )
            raise error

    def _timed(self, job: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            job()
        finally:
            self.job_seconds.append(time.perf_counter() - started)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, skip the rest: the run is about to stop
                    self._timed(job)
            except BaseException as error:  # handed to the training thread
                self._error = error
            finally:
                self._jobs.task_done()
