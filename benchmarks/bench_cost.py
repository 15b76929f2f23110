"""What a validation costs on a GPU, counted on any device: aten ops launched and host syncs, per callback.

On a GPU the training thread pays for every op it launches (several microseconds each) and waits at every
device-to-host sync; both can be counted on the CPU. A ``TorchDispatchMode`` entered around each of a callback's
hooks, on the training thread only (the drawing thread is not counted: modes are thread-local), counts every aten op
and, as syncs, ``_local_scalar_dense`` (``.item()``, ``float()``, ``bool()`` of a tensor), ``nonzero``, ``unique``,
``masked_select``, indexing with a boolean mask, and copies from another device to the CPU (these last are only
visible where a GPU is). The
counts are those of the last validation of a short fit, the one-time work at fit start left out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import (
    ActivationMapsCallback,
    CalibrationCallback,
    DatasetBiasCallback,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier

SYNC_OPS = (
    "_local_scalar_dense",
    "nonzero",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
)
HOOKS = (
    "on_validation_start",
    "on_validation_epoch_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_epoch_end",
    "on_validation_end",
)
DEFAULT_FOUR = (
    "SaliencyCallback()",
    "GradCAMCallback()",
    "LinearProbeCallback()",
    "RepresentationSimilarityCallback()",
)


HOST_READS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.item: "item",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__index__: "index",
}


class Census(TorchDispatchMode):
    """Counts aten ops and host syncs dispatched while it is active (on this thread).

    Two kinds of sync are counted. Ops whose output size or value the host must wait for (``nonzero``, ``unique``,
    ``masked_select``, boolean-mask indexing, ``_local_scalar_dense``) are seen at dispatch. Reads of a tensor's
    values by Python (``tolist()``, ``cpu()``, ``numpy()``, ``item()``, ``float()``, ``int()``, ``bool()``, use as
    an index) are seen one level up, by a ``TorchFunctionMode`` entered with the census (on a CPU a ``tolist()`` or
    ``cpu()`` dispatches nothing, on a GPU it is a device-to-host copy); the scalar read inside one of them is not
    counted twice. A read of a tensor that lives on the host anyway (a probe label) is counted too: the count is an
    upper bound of what a GPU would wait for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: collections.Counter[str] = collections.Counter()
        self._reads = _HostReads(self)
        self._reading = 0

    def __enter__(self) -> Census:
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._reads.__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            if not (name == "_local_scalar_dense" and self._reading):
                self.syncs[name] += 1
        elif name in ("index", "index_put", "index_put_") and _boolean_index(args):
            self.syncs["boolean index"] += 1  # a mask's count of True values decides the output: a sync on a GPU
        elif name in ("_to_copy", "copy_") and _copy_to_cpu(name, args, kwargs) and not self._reading:
            self.syncs["copy to cpu"] += 1
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    """Counts Python's reads of tensor values (see :class:`Census`) into the census it belongs to."""

    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kind = HOST_READS.get(func)
        if kind is None:
            return func(*args, **(kwargs or {}))
        self.census.syncs[kind] += 1
        self.census._reading += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.census._reading -= 1


def _boolean_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


def _copy_to_cpu(name: str, args: tuple, kwargs: dict) -> bool:
    source = args[1] if name == "copy_" else args[0]
    target = args[0].device if name == "copy_" else kwargs.get("device")
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu" or target is None:
        return False
    return torch.device(target).type == "cpu"


class _Counted(pl.Callback):
    """Wraps one callback's validation hooks in a :class:`Census`, reset at each validation's start."""

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = callback
        self.last: Census | None = None
        self.current = Census()
        for hook in HOOKS:
            original = getattr(callback, hook)

            def counted(*args: Any, _original: Callable = original, _hook: str = hook, **kwargs: Any) -> Any:
                if _hook == "on_validation_start":
                    self.current = Census()
                with self.current:
                    result = _original(*args, **kwargs)
                if _hook == "on_validation_end":
                    self.last = self.current
                return result

            setattr(callback, hook, counted)


def _resnet18(classes: int = 10) -> torch.nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=classes)


def census(make: Callable[[], pl.Callback], *, val_size: int, quick: bool, device: str) -> Census | str:
    """The census of the last validation of a two-epoch fit of resnet18 on random CIFAR-sized data."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64 + val_size, 3, 32, 32, generator=generator)
    labels = torch.arange(64 + val_size) % 10
    train = DataLoader(TensorDataset(images[:64], labels[:64]), batch_size=32)
    val = DataLoader(TensorDataset(images[64:], labels[64:]), batch_size=128)
    try:
        callback = make()
    except Exception as error:  # a callback this model cannot have (e.g. no dropout for MC dropout)
        return f"n/a ({type(error).__name__})"
    counted = _Counted(callback)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(ImageClassifier(_resnet18(), lr=1e-3), train, val)
    assert counted.last is not None, "no validation was counted"
    return counted.last


BUDGETS = {  # per validation at defaults on resnet18 3x32x32: (aten ops, host syncs); None: ops grow with steps
    "SaliencyCallback()": (1_500, 4),
    "GradCAMCallback()": (600, 4),
    "LinearProbeCallback()": (2_000, 4),
    "RepresentationSimilarityCallback()": (1_200, 4),
    "ActivationMapsCallback()": (600, 4),
    "CalibrationCallback()": (1_500, 4),
    "DatasetBiasCallback()": (1_000, 6),
    "DatasetBiasCallback(methods='grad_cam')": (2_500, 6),
    "ExplanationQualityCallback()": (None, 6),
    "FeatureVisualizationCallback(every_n_epochs=1)": (None, 6),
}
"""Each callback's budget; the four defaults together: 4,000 ops and 40 syncs (issue 26). The quality metrics'
perturbation steps and the feature visualisation's optimisation steps are each a forward (and backward) pass, so
their ops grow with those steps; their syncs may not."""


def _within(name: str, ops: int, syncs: int) -> str:
    budget_ops, budget_syncs = BUDGETS[name]
    ok = syncs <= budget_syncs and (budget_ops is None or ops <= budget_ops)
    shown = "ops grow with its steps" if budget_ops is None else f"{budget_ops:,} ops"
    return f"{shown}, {budget_syncs} syncs: {'within' if ok else 'OVER'}"


def run(quick: bool, device: str = "cpu") -> str:
    val_size = 64 if quick else 1024
    makers: dict[str, Callable[[], pl.Callback]] = {
        "SaliencyCallback()": lambda: SaliencyCallback(),
        "GradCAMCallback()": lambda: GradCAMCallback(),
        "LinearProbeCallback()": lambda: LinearProbeCallback(),
        "RepresentationSimilarityCallback()": lambda: RepresentationSimilarityCallback(),
        "ActivationMapsCallback()": lambda: ActivationMapsCallback(),
        "CalibrationCallback()": lambda: CalibrationCallback(),
        "DatasetBiasCallback()": lambda: DatasetBiasCallback(),
        "DatasetBiasCallback(methods='grad_cam')": lambda: DatasetBiasCallback(methods="grad_cam"),
        "ExplanationQualityCallback()": lambda: ExplanationQualityCallback(),
        "FeatureVisualizationCallback(every_n_epochs=1)": lambda: FeatureVisualizationCallback(every_n_epochs=1),
    }
    if quick:
        makers = {name: makers[name] for name in (*DEFAULT_FOUR, "CalibrationCallback()")}
    rows = []
    totals = [0, 0]
    for name, make in makers.items():
        counted = census(make, val_size=val_size, quick=quick, device=device)
        if isinstance(counted, str):
            rows.append(f"| {name} | {counted} | | | |")
            continue
        syncs = sum(counted.syncs.values())
        detail = ", ".join(f"{count} {op}" for op, count in counted.syncs.most_common()) or "none"
        rows.append(f"| {name} | {counted.ops:,} | {syncs:,} | {detail} | {_within(name, counted.ops, syncs)} |")
        if name in DEFAULT_FOUR:
            totals[0] += counted.ops
            totals[1] += syncs
    verdict = "MET" if totals[0] <= 4000 and totals[1] <= 40 else "MISSED"
    lines = [
        f"## Ops and host syncs per validation ({'GPU' if device == 'cuda' else 'CPU'})",
        "",
        "Counted on the training thread in the callbacks' hooks during the second validation of a two-epoch fit "
        f"(the one-time work at fit start left out): torchvision resnet18 (random weights), 3x32x32 inputs, "
        f"{val_size} validation samples. A sync is an op whose result the host must wait for (`nonzero`, "
        "`unique`, `masked_select`, indexing with a boolean mask, `_local_scalar_dense`) or a read of a tensor's "
        "values by Python (`tolist()`, `cpu()`, `numpy()`, `item()`, `float()`, `int()`, `bool()`, use as an "
        "index: on a GPU a copy to the host). Reads of tensors that live on the host anyway (probe labels) count "
        "too, so the count is an upper bound of what a GPU waits for. Issue 26's budget for the four default "
        "callbacks together: at most 40 syncs and 4,000 ops per validation; each callback's own budget in the "
        "last column.",
        "",
        "| callback (defaults) | aten ops | host syncs | of which | budget |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        f"| the four defaults together | {totals[0]:,} | {totals[1]:,} | the first four rows "
        f"| 4,000 ops, 40 syncs: {verdict} |",
    ]
    return "\n".join(lines)
