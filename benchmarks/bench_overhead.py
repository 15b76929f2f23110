"""Overhead: what the callbacks add to a training epoch at their default settings.

A real ``Trainer.fit`` runs a fraction of an epoch (a few dozen training
batches, a few validation batches, four epochs) with all four callbacks;
each callback's hooks are timed on the training thread (median over the
second and later validations; on a GPU with ``torch.cuda.synchronize()``
before and after, so the device work the hook started is counted). The
first validation and the hooks before training pay one-time costs, reported
separately: the probe draw and the dry forward that chooses layers (both
shared by the callbacks of a run), the first drawing (font caches) and the
wait for the drawing thread at fit end. Images are drawn and logged on a
background thread; its time per validation is reported beside the
training-thread time (it shares the CPU and the interpreter lock with the
training loop, so on few cores it is not free: on the 2-core machine of the
CPU tables, five alternated fits of the MNIST-sized case gave median
training batches of 103, 125 and 115 ms without callbacks, 101 ms with the
four callbacks drawing in the background and 113 ms drawing inline, so any
slowdown of training batches by the drawing thread is below the run-to-run
variation of about 10% there and is not reported as a number). A second fit without
callbacks gives the time per training and validation batch, from which a
full epoch is estimated. Data are random tensors of the datasets' shapes:
the cost does not depend on the pixel values.

CPU configurations: MNIST-sized (``mnist_cnn``, 60,000 + 10,000 images of
1 x 28 x 28) and CIFAR-sized (``cifar_resnet``, 50,000 + 10,000 of
3 x 32 x 32), batch 128, 32-true. GPU configurations (``--device cuda``):
``cifar_resnet`` at 3 x 32 x 32, 50,000 images, 32-true, batch 128;
torchvision ``resnet18`` at 3 x 32 x 32, 50,000 images, bf16-mixed, batch 256;
and ``resnet18`` at 3 x 128 x 128, 126,000 training and 5,000 validation
images (ImageNet-100-sized), bf16-mixed, batch 128.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torchvision
from _timing import markdown_table, synchronize
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import (
    CalibrationCallback,
    DatasetBiasCallback,
    ExplanationQualityCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    UncertaintyCallback,
)
from lightning_interp.callbacks._context import active_context, current_timings
from lightning_interp.demo import ImageClassifier, cifar_resnet, mnist_cnn
from lightning_interp.methods import DROPOUT_TYPES

CPU_TARGET = 0.03  # MNIST-sized, CPU
GPU_TARGETS = {"resnet18-32": 0.05, "resnet18-128": 0.02}


@dataclass(frozen=True)
class Configuration:
    key: str
    label: str
    make_net: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    full_train: int
    full_val: int
    batch: int
    precision: str
    target: float | None


def _resnet18() -> torch.nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


CPU_CONFIGURATIONS = (
    Configuration("mnist", "MNIST-sized (mnist_cnn, 1x28x28, 32-true)", mnist_cnn, (1, 28, 28), 60_000, 10_000, 128,
                  "32-true", CPU_TARGET),
    Configuration("cifar", "CIFAR-sized (cifar_resnet, 3x32x32, 32-true)", cifar_resnet, (3, 32, 32), 50_000, 10_000,
                  128, "32-true", None),
)  # fmt: skip
GPU_CONFIGURATIONS = (
    Configuration("cifar_resnet", "demo cifar_resnet, 3x32x32, 50k, 32-true, batch 128", cifar_resnet, (3, 32, 32),
                  50_000, 10_000, 128, "32-true", None),
    Configuration("resnet18-32", "torchvision resnet18, 3x32x32, 50k, bf16-mixed, batch 256", _resnet18, (3, 32, 32),
                  50_000, 10_000, 256, "bf16-mixed", GPU_TARGETS["resnet18-32"]),
    Configuration("resnet18-128", "torchvision resnet18, 3x128x128, 126k, bf16-mixed, batch 128", _resnet18,
                  (3, 128, 128), 126_000, 5_000, 128, "bf16-mixed", GPU_TARGETS["resnet18-128"]),
)  # fmt: skip


class BatchClock(Callback):
    """Wall time of every training and validation batch (device work included on a GPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = 0.0

    def _now(self) -> float:
        if self.cuda:
            synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, *args: object) -> None:
        self._start = self._now()

    def on_train_batch_end(self, *args: object) -> None:
        self.train.append(self._now() - self._start)

    def on_validation_batch_start(self, *args: object) -> None:
        self._start = self._now()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if not trainer.sanity_checking:
            self.val.append(self._now() - self._start)


class CostReader(Callback):
    """Listed last: reads the run's shared one-time costs and the drawing thread's job times before teardown."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.jobs: list[float] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.timings = current_timings(trainer)
        context = active_context(trainer)
        self.jobs = list(context.worker.job_seconds) if context is not None else []


def clock_hooks(callback: Callback, hooks: tuple[str, ...], cuda: bool) -> dict[str, list[float]]:
    """Replace the callback's hooks by timed versions (per instance); return the list each fills."""
    times: dict[str, list[float]] = {hook: [] for hook in hooks}
    for hook in hooks:
        original: Callable = getattr(callback, hook)

        def timed(*args: object, _original: Callable = original, _hook: str = hook, **kwargs: object) -> object:
            if cuda:
                synchronize()
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            if cuda:
                synchronize()
            times[_hook].append(time.perf_counter() - start)
            return result

        setattr(callback, hook, timed)
    return times


def _loaders(shape: tuple[int, ...], train: int, val: int, batch: int, cuda: bool) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    train_set = TensorDataset(torch.randn(train, *shape, generator=generator), torch.randint(10, (train,)))
    val_set = TensorDataset(torch.randn(val, *shape, generator=generator), torch.randint(10, (val,)))
    return (
        DataLoader(train_set, batch_size=batch, shuffle=True, pin_memory=cuda),
        DataLoader(val_set, batch_size=2 * batch, pin_memory=cuda),
    )


def _fit(
    net: torch.nn.Module,
    loaders: tuple[DataLoader, DataLoader],
    callbacks: list[Callback],
    batches: int,
    val_batches: int,
    device: str,
    precision: str,
) -> None:
    with tempfile.TemporaryDirectory() as root:  # PNGs of a run without a logger go here, not into the cwd
        trainer = pl.Trainer(
            default_root_dir=root,
            max_epochs=4,
            limit_train_batches=batches,
            limit_val_batches=val_batches,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            precision=precision,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(ImageClassifier(net), *loaders)  # the model is created on the CPU, as users do


VALIDATION_HOOKS = ("on_validation_epoch_start", "on_validation_batch_start", "on_validation_batch_end")


def _opt_in_callbacks(net: torch.nn.Module, quick: bool) -> dict[str, Callable[[], Callback]]:
    """The callbacks that are not on in the default four, each measured in a fit of its own."""
    made: dict[str, Callable[[], Callback]] = {}
    if any(isinstance(module, DROPOUT_TYPES) for module in net.modules()):  # MC dropout needs dropout layers
        made["UncertaintyCallback()"] = lambda: UncertaintyCallback(num_samples=32 if quick else 256)
    made["CalibrationCallback()"] = CalibrationCallback
    made["DatasetBiasCallback()"] = DatasetBiasCallback
    made["DatasetBiasCallback(methods='grad_cam')"] = lambda: DatasetBiasCallback(
        methods="grad_cam", num_samples=32 if quick else 256
    )
    made["ExplanationQualityCallback() (4 methods + random maps)"] = lambda: ExplanationQualityCallback(
        num_samples=8 if quick else 32,
        metrics=[  # the default metrics; quick: both curves in 4 parts instead of 16
            ("deletion", {"steps": 4 if quick else 16}),
            ("insertion", {"steps": 4 if quick else 16}),
            "top_drop",
            "sanity",
            "sparseness",
            "localization",
        ],
    )
    return made


def _median_after(values: list[float], skip: int) -> float:
    """The median of the values after the first ``skip`` (the first validation's), or of all when that is all."""
    later = values[skip:] or values
    return statistics.median(later) if later else 0.0


def measure_opt_in(
    config: Configuration, device: str, quick: bool, loaders: tuple[DataLoader, DataLoader], epoch: float
) -> list[list[object]]:
    """Per opt-in callback: its training-thread time per validation epoch, per-batch hooks scaled to a full
    validation set, and the share of the estimated epoch."""
    batch = 16 if quick else config.batch
    batches, val_batches = (2, 1) if quick else (30, 8)
    full_val_batches = math.ceil(config.full_val / (2 * batch))
    rows: list[list[object]] = []
    for label, make in _opt_in_callbacks(config.make_net(), quick).items():
        callback = make()
        hooks = ("on_validation_epoch_end", *VALIDATION_HOOKS)
        times = clock_hooks(callback, hooks, device == "cuda")
        _fit(config.make_net(), loaders, [callback], batches, val_batches, device, config.precision)
        runs = len(times["on_validation_epoch_end"])
        per_batch = sum(_median_after(times[hook], val_batches) for hook in VALIDATION_HOOKS[1:])
        per_start = _median_after(times["on_validation_epoch_start"], 1)
        per_run = _median_after(times["on_validation_epoch_end"], 1) + per_start + per_batch * full_val_batches
        rows.append([config.label, label, per_run * 1000, f"{per_run / epoch:.2%}", per_batch * 1e6, runs])
    return rows


def measure(
    config: Configuration, device: str, quick: bool
) -> tuple[list[list[object]], list[list[object]], float, list[list[object]]]:
    """Rows of the per-callback table, rows of the one-time table, the all-four share of an epoch, and rows of the
    opt-in table."""
    cuda = device == "cuda"
    batch = 16 if quick else config.batch
    shape = (3, 32, 32) if quick and config.shape[-1] > 32 else config.shape
    batches, val_batches = (2, 1) if quick else (30, 8)  # per epoch; 4 epochs: 3 timed validations
    pool = (batches * batch, max(val_batches * 2 * batch, 64 if quick else 1024))
    loaders = _loaders(shape, *pool, batch, cuda)
    clock = BatchClock(cuda)
    _fit(config.make_net(), loaders, [clock], batches, val_batches, device, config.precision)
    per_train = statistics.median(clock.train[batches:])  # skip the first epoch's batches
    per_val = statistics.median(clock.val)
    epoch = per_train * math.ceil(config.full_train / batch) + per_val * math.ceil(config.full_val / (2 * batch))

    small = 32 if quick else None
    callbacks: dict[str, Callback] = {
        "SaliencyCallback()": SaliencyCallback(),
        "GradCAMCallback()": GradCAMCallback(),
        "LinearProbeCallback()": LinearProbeCallback(num_samples=small or 1024),
        "RepresentationSimilarityCallback()": RepresentationSimilarityCallback(num_samples=small or 512),
    }
    hooks = ("setup", "on_fit_start", "on_train_start", "on_validation_epoch_end", "on_fit_end", "teardown")
    timings = {label: clock_hooks(callback, hooks, cuda) for label, callback in callbacks.items()}
    costs = CostReader()
    _fit(config.make_net(), loaders, [*callbacks.values(), costs], batches, val_batches, device, config.precision)

    rows: list[list[object]] = []
    total = 0.0
    first_extra_total = 0.0
    before_training = 0.0
    at_fit_end = 0.0
    for label, times in timings.items():
        per_run = statistics.median(times["on_validation_epoch_end"][1:])
        first_extra = max(0.0, times["on_validation_epoch_end"][0] - per_run)
        total += per_run
        first_extra_total += first_extra
        before_training += sum(times["setup"]) + sum(times["on_fit_start"]) + sum(times["on_train_start"])
        at_fit_end += sum(times["on_fit_end"]) + sum(times["teardown"])
        rows.append([config.label, label, per_run * 1000, f"{per_run / epoch:.2%}", ""])
    runs = len(timings["SaliencyCallback()"]["on_validation_epoch_end"])
    saliency, gradcam = callbacks["SaliencyCallback()"], callbacks["GradCAMCallback()"]
    evolution_jobs = len(saliency.methods) + len(gradcam.layers)  # submitted at fit end, one per map column
    per_validation = (len(costs.jobs) - evolution_jobs) // max(runs, 1)
    sums = [sum(costs.jobs[i * per_validation : (i + 1) * per_validation]) for i in range(runs)]
    drawing = statistics.median(sums[1:]) if len(sums) > 1 else (sums[0] if sums else 0.0)
    verdict = ""
    if config.target is not None:
        verdict = f" ({'MET' if total / epoch <= config.target else 'MISSED'}: target {config.target:.0%})"
    rows.append([config.label, "all four", total * 1000, f"{total / epoch:.2%}{verdict}", drawing * 1000])
    rows.append([config.label, "(estimated epoch, no callbacks)", epoch * 1000, "100%", ""])
    once = [
        [
            config.label,
            costs.timings.get("probe draw", 0.0) * 1000,
            costs.timings.get("layer choice", 0.0) * 1000,
            before_training * 1000,
            first_extra_total * 1000,
            (costs.jobs[0] if costs.jobs else 0.0) * 1000,
            at_fit_end * 1000,
        ]
    ]
    return rows, once, total / epoch, measure_opt_in(config, device, quick, loaders, epoch)


def run(quick: bool, device: str = "cpu") -> str:
    configurations = GPU_CONFIGURATIONS if device == "cuda" else CPU_CONFIGURATIONS
    rows: list[list[object]] = []
    once: list[list[object]] = []
    opt_in: list[list[object]] = []
    for config in configurations:
        config_rows, config_once, _, config_opt_in = measure(config, device, quick)
        rows += config_rows
        once += config_once
        opt_in += config_opt_in
    table = markdown_table(
        [
            "configuration",
            "callback",
            "ms per validation epoch (training thread)",
            "share of a training epoch",
            "drawing thread ms per validation",
        ],
        rows,
    )
    once_table = markdown_table(
        [
            "configuration",
            "probe draw ms (shared)",
            "layer choice ms (shared)",
            "hooks before training ms (all four, incl. the two before)",
            "first validation extra ms",
            "first drawing ms (font caches)",
            "fit end ms (drawing drained)",
        ],
        once,
    )
    target = (
        f"Targets: all four together at most {GPU_TARGETS['resnet18-32']:.0%} of the CIFAR-sized resnet18 bf16-mixed "
        f"epoch and {GPU_TARGETS['resnet18-128']:.0%} of the ImageNet-100-sized one (one GPU)."
        if device == "cuda"
        else f"Target: all four together at most {CPU_TARGET:.0%} of an MNIST-sized epoch at defaults (CPU)."
    )
    return "\n".join(
        [
            f"## Overhead of leaving the callbacks on ({'GPU' if device == 'cuda' else 'CPU'})",
            "",
            (__doc__ or "").split("\n\n", 1)[1].strip(),
            "",
            target,
            "",
            table,
            "",
            "One-time costs per fit (not in the shares above):",
            "",
            once_table,
            "",
            'Opt-in callbacks, each in a fit of its own at its defaults (not in "all four"): the epoch-end run plus '
            "the per-batch hooks (the calibration and bias callbacks keep the logits the validation pass already "
            "computed: no extra forward) times the batches of a full validation set.",
            "",
            markdown_table(
                [
                    "configuration",
                    "callback",
                    "ms per validation epoch (training thread)",
                    "share of a training epoch",
                    "per-batch hooks µs",
                    "runs",
                ],
                opt_in,
            ),
        ]
    )
