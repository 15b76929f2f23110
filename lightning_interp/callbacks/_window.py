"""The unsharded window's mechanics: under FSDP2, every rank gathers the whole model once, rank zero explains it alone
with no collective inside its passes, and every rank reshards it afterwards (``UnshardedWindow`` turns it on; see
``_sharding.py`` for lockstep, the default).

Lockstep gathers the parameters for every forward pass of the callbacks' work (and again for its backward passes),
on every rank. The window gathers each FSDP module's parameters once per run and keeps them whole until the run ends:
fewer collectives, and methods that read weights outside a forward pass (CAM) see whole weights. It needs the whole
model to fit on one device next to training's state, which is what sharding was avoiding, so it is opt-in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from lightning_interp.callbacks._sharding import (
    PeerFailure,
    all_ranks_ok,
    finish_fsdp_backward,
    root_fsdp_modules,
)

T = TypeVar("T")


WINDOW_INTERNALS = (
    "post_forward_mesh_info",
    "reshard_after_backward",
    "reduce_grads",
    "all_reduce_grads",
    "is_unsharded",
    "_post_forward_indices",
    "comm_ctx",
)
"""The FSDP2 parameter-group attributes the window saves and restores (torch's own ``set_reshard_after_forward``,
``set_reshard_after_backward`` and ``set_requires_gradient_sync`` write them, but have no getters)."""


def fsdp2_modules(model: nn.Module) -> list[Any]:
    """Every FSDP2 (``fully_shard``) module of ``model``, ``model`` included, in module order."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - an old torch
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def window_support_problem(model: nn.Module) -> str | None:
    """Why the window cannot be opened on ``model`` (no FSDP2 module, or a torch whose FSDP2 internals differ), or
    None when it can."""
    modules = fsdp2_modules(model)
    if not modules:
        return "the model has no fully_shard (FSDP2) module"
    for module in modules:
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            missing = [name for name in WINDOW_INTERNALS if not hasattr(group, name)]
            if missing:
                return f"this torch's FSDP2 parameter groups lack {missing}"
        for name in ("_auto_reshard_after_forward", "_lazy_init"):
            if not hasattr(state, name):
                return f"this torch's FSDP2 state lacks {name}"
    return None


@dataclass
class _SavedGroup:
    group: Any
    post_forward_mesh_info: Any
    reshard_after_backward: bool
    reduce_grads: bool
    all_reduce_grads: bool
    was_unsharded: bool
    post_forward_indices: list[int]


@contextlib.contextmanager
def unsharded_window(model: nn.Module) -> Iterator[None]:
    """Keep every FSDP2 parameter of ``model`` whole inside the block, gathered once on entry; every rank enters it.

    Inside, a forward or backward pass on one rank alone makes no collective: no module reshards after its forward
    or backward pass (so none gathers again), and no gradient is reduce-scattered (the callbacks take gradients with
    respect to inputs; a parameter gradient that autograd accumulates anyway stays on its rank, as under
    ``set_requires_gradient_sync(False)``). On exit every setting is restored and the groups that were sharded on
    entry are resharded, so training's next step finds the model as it left it.

    Args:
        model: a module with ``fully_shard`` applied to it or to some of its sub-modules.

    Raises:
        ValueError: ``model`` has no FSDP2 module, or this torch's FSDP2 internals are not the ones the window knows.

    Example:
        >>> import torch
        >>> with unsharded_window(torch.nn.Linear(2, 2)):  # doctest: +IGNORE_EXCEPTION_DETAIL
        ...     pass
        Traceback (most recent call last):
        ValueError: the unsharded window needs ...: the model has no fully_shard (FSDP2) module
    """
    problem = window_support_problem(model)
    if problem is not None:
        raise ValueError(f"the unsharded window needs FSDP2's fully_shard modules: {problem}.")
    modules = fsdp2_modules(model)
    states = [module._get_fsdp_state() for module in modules]
    auto = [state._auto_reshard_after_forward for state in states]
    saved = [
        _SavedGroup(
            group,
            group.post_forward_mesh_info,
            group.reshard_after_backward,
            group.reduce_grads,
            group.all_reduce_grads,
            group.is_unsharded,
            list(group._post_forward_indices),
        )
        for state in states
        for group in state._fsdp_param_groups
    ]
    # The order of the forward passes FSDP2 records for its backward prefetching: rank zero's passes inside the window
    # must not leave it different from the other ranks' (they would then gather different groups in training's next
    # backward pass, and wait for each other forever).
    orders = {id(entry.group.comm_ctx): entry.group.comm_ctx for entry in saved}
    saved_orders = {key: list(context.post_forward_order) for key, context in orders.items()}
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.set_reshard_after_backward(False, recurse=False)
            module.set_requires_gradient_sync(False, recurse=False)
        for module in modules:  # one all-gather per parameter group, in module order on every rank
            module.unshard()
        yield
    except BaseException:
        # a backward pass that raised leaves FSDP2's final callback queued: run it while no gradient is reduced (the
        # other ranks ran no backward pass), so that restoring the settings leaves nothing behind
        finish_fsdp_backward(model)
        raise
    finally:
        for key, context in orders.items():
            context.post_forward_order[:] = saved_orders[key]
        for state, value in zip(states, auto, strict=True):
            state._auto_reshard_after_forward = value
        for entry in saved:
            entry.group.post_forward_mesh_info = entry.post_forward_mesh_info
            entry.group.reshard_after_backward = entry.reshard_after_backward
            entry.group.reduce_grads = entry.reduce_grads
            entry.group.all_reduce_grads = entry.all_reduce_grads
            entry.group._post_forward_indices[:] = entry.post_forward_indices
            if not entry.was_unsharded and entry.group.is_unsharded:
                entry.group.reshard()


def prepare_fsdp2_roots(model: nn.Module) -> None:
    """Run FSDP2's lazy initialisation of ``model``'s roots now (a root runs it at its first forward pass, which may
    not have come yet at fit start), so that the window's gathers find the parameter groups set up; idempotent."""
    for root in root_fsdp_modules(model):
        root._get_fsdp_state()._lazy_init()


def run_in_window(model: nn.Module, is_zero: bool, work: Callable[[], T], what: str) -> T | None:
    """``work()`` on rank zero alone, inside an :func:`unsharded_window` every rank opens; the other ranks wait.

    A failure on rank zero (the window is closed first, an interrupted backward pass finished) is raised on every
    rank: rank zero's own error there, :class:`~lightning_interp.callbacks._sharding.PeerFailure` elsewhere, after
    one all-reduce of a flag that every rank makes.

    Args:
        model: the module with ``fully_shard`` applied.
        is_zero: whether this is global rank zero.
        work: what rank zero computes.
        what: the work, as the error note names it.

    Returns:
        ``work()``'s result on rank zero, None on the other ranks.
    """
    result: T | None = None
    error: BaseException | None = None
    prepare_fsdp2_roots(model)
    try:
        with unsharded_window(model):
            if is_zero:
                result = work()
    except Exception as caught:  # raised below, once every rank knows
        error = caught
    if not all_ranks_ok(error is None):
        if error is None:
            raise PeerFailure(f"{what} failed on rank zero (its error is raised there)")
        note = getattr(error, "add_note", None)
        if note is not None:
            note(f"({what} failed on rank zero, inside the unsharded window; the other ranks stopped it too.)")
        raise error
    return result


def check_window_model(callback: Any, model: nn.Module) -> None:
    """Refuse, before training, the unsharded window on a model it cannot open (no ``fully_shard`` module, or a torch
    whose FSDP2 internals the window does not know)."""
    problem = window_support_problem(model)
    if problem is not None:
        raise ValueError(
            f"{type(callback).__name__} cannot open the unsharded window that UnshardedWindow() asks for: {problem}. "
            "Apply fully_shard in configure_model(), or remove UnshardedWindow() from the callbacks (the work then "
            "runs in lockstep on every rank)."
        )
