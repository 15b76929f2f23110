"""Which strategies the callbacks run under, and how: rank zero alone (whole parameters on every rank) or every rank in
lockstep (sharded parameters: every forward pass gathers them from all ranks)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn

T = TypeVar("T")

SUPPORTED = (
    "a single device, DDP (strategy='ddp', 'ddp_spawn', ...), and ModelParallelStrategy(tensor_parallel_size=1) "
    "with fully_shard (FSDP2) in configure_model()"
)
"""The strategies the callbacks run under, as the refusals name them."""

CHECKPOINT_FRAGILE_METHODS = frozenset({"lrp", "deeplift", "deeplift_shap", "deconvnet"})
"""Methods whose modified backward pass fails under activation checkpointing: the recomputed forward replaces the
module outputs they rewrite (``CheckpointError ... Recomputed values ... have different metadata``)."""

WEIGHT_READING_METHODS = frozenset({"cam"})
"""Methods that read a layer's weights outside a forward pass: a sharded weight is a shard there."""


def strategy_name(trainer: pl.Trainer) -> str:
    return type(getattr(trainer, "strategy", None)).__name__


def tensor_parallel_size(trainer: pl.Trainer) -> int | None:
    """The tensor-parallel size of a ``ModelParallelStrategy`` (resolved once its environment is set up), else None."""
    size = getattr(trainer.strategy, "_tensor_parallel_size", None)
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
        size = mesh["tensor_parallel"].size()
    return size if isinstance(size, int) else None


def is_lockstep(trainer: pl.Trainer | None) -> bool:
    """Whether the callbacks' work runs on every rank in lockstep: the strategy shards the parameters, so each forward
    pass of the explained model gathers them from all ranks, and every rank has to make the same calls in the same
    order (rank zero alone draws and logs; its scalars are broadcast). Under DDP the parameters are whole on every
    rank, and rank zero works alone."""
    if trainer is None or trainer.world_size <= 1:
        return False
    return "ModelParallel" in strategy_name(trainer)


def check_strategy(callback: Callback, trainer: pl.Trainer, *, supported: bool) -> None:
    """Refuse, before training, a strategy the callback cannot run under (it would hang or read shards).

    Args:
        callback: the callback being set up.
        trainer: its trainer (its strategy's environment is set up: the tensor-parallel size is known).
        supported: whether this callback runs in lockstep under sharded strategies.
    """
    name = strategy_name(trainer)
    owner = type(callback).__name__
    if "ModelParallel" in name:
        size = tensor_parallel_size(trainer)
        if size is not None and size > 1:
            raise ValueError(
                f"{owner} does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size="
                f"{size}): its hooks read layer outputs and gradients that tensor parallelism splits across ranks. "
                "Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard (FSDP2), "
                "or strategy='ddp', while you watch explanations."
            )
        if not supported:
            raise ValueError(
                f"{owner} does not support {name}: with sharded parameters every rank must join each forward pass, "
                f"and {owner} declares sharded_support = False (its passes run on rank zero only). Every callback "
                "that lightning-interp ships runs in lockstep; use strategy='ddp' (or a single device) for this one, "
                "set sharded_support = True once it runs the same passes on every rank, or remove it from sharded runs."
            )
        return
    if any(kind in name for kind in ("FSDP", "DeepSpeed")):
        raise ValueError(
            f"{owner} does not support {name} yet: with sharded parameters every rank must join each forward pass "
            f"of the callbacks' work. The callbacks run under {SUPPORTED}. Use one of those (for FSDP, "
            "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard in "
            "configure_model()) while you watch explanations, or remove the callback from this run."
        )


def refuse_weight_reading(callback: Callback, trainer: pl.Trainer, methods: Iterable[str]) -> None:
    """Refuse methods that read weights outside a forward pass where the weights are sharded (lockstep)."""
    reading = sorted(WEIGHT_READING_METHODS.intersection(methods))
    if reading and is_lockstep(trainer):
        raise ValueError(
            f"{type(callback).__name__}: {reading} read{'s' if len(reading) == 1 else ''} the classifier's weights "
            f"outside a forward pass, and under {strategy_name(trainer)} those are shards on each rank. Use a "
            "gradient-based CAM method (methods=('grad_cam',), the default) under sharded strategies, or "
            "strategy='ddp'."
        )


def has_activation_checkpointing(model: nn.Module) -> bool:
    """Whether some layer of ``model`` runs under activation checkpointing (``checkpoint_wrapper``, as
    ``apply_activation_checkpointing`` and Lightning's ``activation_checkpointing_policy`` apply it)."""
    return any(
        type(module).__name__ == "CheckpointWrapper" or hasattr(module, "_checkpoint_wrapped_module")
        for module in model.modules()
    )


def refuse_checkpoint_fragile(callback: Callback, model: nn.Module, methods: Iterable[str]) -> None:
    """Refuse LRP, DeepLIFT and deconvnet on a model with activation checkpointing (any strategy)."""
    fragile = sorted(CHECKPOINT_FRAGILE_METHODS.intersection(methods))
    if fragile and has_activation_checkpointing(model):
        raise ValueError(
            f"{type(callback).__name__}: {fragile} rewrite the backward pass of the model's layers, which fails "
            "under activation checkpointing (the recomputed forward pass differs from the one they rewrote). Drop "
            "them from methods= (gradient, integrated_gradients, smoothgrad and the CAM family work), or train "
            "without activation checkpointing while you watch them."
        )


def broadcast_from_zero(trainer: pl.Trainer, make: Callable[[], T]) -> T:
    """``make()`` on every rank, then rank zero's result on every rank (under lockstep; ``make()`` otherwise): rank
    zero's probe samples, whatever each node's data or stream gave the others."""
    made = make()
    if not is_lockstep(trainer):
        return made
    return trainer.strategy.broadcast(made, src=0)


class PeerFailure(RuntimeError):
    """The callbacks' work failed on another rank; that rank raises the error itself."""


def all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce of a flag: the only collective the failure checks make, so
    a rank that failed and one still working meet at the same call)."""
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def failure_checks(model: nn.Module) -> Iterator[None]:
    """Check before each forward pass of ``model``'s FSDP roots (``model`` itself without any) that no rank failed
    since the last check, and raise :class:`PeerFailure` if one did: a rank whose pass failed goes to
    :func:`run_in_lockstep`'s check instead of the next pass's parameter gathers, and the others meet it there."""

    def check(module: nn.Module, args: Any) -> None:
        if not all_ranks_ok(True):
            raise PeerFailure("the callbacks' work failed on another rank (its error is raised there)")

    handles = [root.register_forward_pre_hook(check) for root in (root_fsdp_modules(model) or [model])]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_in_lockstep(model: nn.Module, work: Callable[[], T], what: str) -> T:
    """``work()`` on every rank in lockstep; a failure on any rank is raised on every rank (its own error where it
    failed, :class:`PeerFailure` elsewhere), after an FSDP2 backward it interrupted is finished, so that training's
    next step finds the parameters and gradients as it left them. No rank is left waiting in a collective when the
    failure comes between forward passes; inside one, the process group's timeout ends the wait."""
    try:
        with failure_checks(model):
            result = work()
    except PeerFailure:
        finish_fsdp_backward(model)
        raise
    except Exception as error:
        finish_fsdp_backward(model)
        all_ranks_ok(False)
        note = getattr(error, "add_note", None)
        if note is not None:
            note(f"({what} failed on this rank; the other ranks stopped it too.)")
        raise
    if not all_ranks_ok(True):
        raise PeerFailure(f"{what} failed on another rank (its error is raised there)")
    return result


def root_fsdp_modules(model: nn.Module) -> list[Any]:
    """The FSDP2 (``fully_shard``) modules of ``model`` that are roots of their own (their parent is no FSDP module)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - an old torch
        return []
    roots: list[Any] = []
    covered: set[int] = set()
    for module in model.modules():
        if isinstance(module, FSDPModule) and id(module) not in covered:
            roots.append(module)
            covered.update(id(sub) for sub in module.modules())
    return roots


def finish_fsdp_backward(model: nn.Module) -> None:
    """After a failure inside an extra backward pass under FSDP2: run the root's post-backward final callback that
    autograd would have run, so the parameters are resharded and training's next step finds them as it left them."""
    for root in root_fsdp_modules(model):
        state = root._get_fsdp_state()
        context = getattr(state, "_state_ctx", None)
        final = getattr(state, "_root_post_backward_final_callback", None)
        if final is not None and getattr(context, "post_backward_final_callback_queued", False):
            with contextlib.suppress(Exception):  # best effort: the original error is the one to raise
                final()
