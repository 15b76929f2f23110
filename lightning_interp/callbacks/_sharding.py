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

from lightning_interp.methods import ForwardWith

T = TypeVar("T")

SUPPORTED = (
    "a single device, DDP (strategy='ddp', 'ddp_spawn', ...) and DeepSpeed ZeRO stages 0-2 (rank zero works alone: "
    "the parameters are whole on every rank); FSDPStrategy (FSDP1), DeepSpeed ZeRO stage 3 and "
    "ModelParallelStrategy(tensor_parallel_size=1) with fully_shard (FSDP2) in configure_model() (every rank works "
    "in lockstep: the parameters are sharded)"
)
"""The strategies the callbacks run under, as the refusals name them."""

CHECKPOINT_FRAGILE_METHODS = frozenset({"lrp", "deeplift", "deeplift_shap", "deconvnet"})
"""Methods whose modified backward pass fails under activation checkpointing: the recomputed forward replaces the
module outputs they rewrite (``CheckpointError ... Recomputed values ... have different metadata``)."""

WEIGHT_READING_METHODS = frozenset({"cam"})
"""Methods that read a layer's weights outside a forward pass: a sharded weight is a shard there."""


def strategy_name(trainer: pl.Trainer) -> str:
    return type(getattr(trainer, "strategy", None)).__name__


def strategy_kind(trainer: pl.Trainer | None) -> str | None:
    """``"fsdp2"`` (``ModelParallelStrategy``), ``"fsdp1"`` (``FSDPStrategy``), ``"deepspeed"``
    (``DeepSpeedStrategy``) or None (a single device, DDP, ...): read from the names of the strategy's classes, so a
    subclass of Lightning's strategy is recognised as that strategy."""
    names = [cls.__name__ for cls in type(getattr(trainer, "strategy", None)).__mro__]
    for kind, marker in (("fsdp2", "ModelParallel"), ("fsdp1", "FSDP"), ("deepspeed", "DeepSpeed")):
        if any(marker in name for name in names):
            return kind
    return None


def deepspeed_stage(trainer: pl.Trainer) -> int:
    """The ZeRO stage of a ``DeepSpeedStrategy`` (its config's ``zero_optimization.stage``; 0 without one)."""
    config = getattr(trainer.strategy, "config", None)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else 0


def is_sharded(trainer: pl.Trainer | None) -> bool:
    """Whether the strategy shards the parameters across ranks: FSDP2, FSDP1 and DeepSpeed ZeRO stage 3 (stages 0-2
    keep them whole on every rank, as DDP does)."""
    kind = strategy_kind(trainer)
    return kind in ("fsdp2", "fsdp1") or (kind == "deepspeed" and deepspeed_stage(trainer) >= 3)


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
    order (rank zero alone draws and logs; its scalars are broadcast): FSDP2, FSDP1 and DeepSpeed ZeRO stage 3. Under
    DDP and DeepSpeed ZeRO stages 0-2 the parameters are whole on every rank, and rank zero works alone."""
    if trainer is None or trainer.world_size <= 1:
        return False
    return is_sharded(trainer)


def check_strategy(callback: Callback, trainer: pl.Trainer, *, supported: bool) -> None:
    """Refuse, before training, a strategy the callback cannot run under (it would hang, read shards or change
    training).

    Args:
        callback: the callback being set up.
        trainer: its trainer (its strategy's environment is set up: the tensor-parallel size is known).
        supported: whether this callback runs in lockstep under sharded strategies.
    """
    kind = strategy_kind(trainer)
    if kind is None:
        return
    name = strategy_name(trainer)
    owner = type(callback).__name__
    if kind == "fsdp2":
        size = tensor_parallel_size(trainer)
        if size is not None and size > 1:
            raise ValueError(
                f"{owner} does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size="
                f"{size}): its hooks read layer outputs and gradients that tensor parallelism splits across ranks. "
                "Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard (FSDP2), "
                "FSDPStrategy, or strategy='ddp', while you watch explanations."
            )
    if kind == "fsdp1":
        _refuse_fsdp1_no_shard(owner, trainer)
        _refuse_fsdp1_flat_accumulation(owner, trainer)
    if not supported and is_sharded(trainer):
        what = f"{name} (DeepSpeed ZeRO stage {deepspeed_stage(trainer)})" if kind == "deepspeed" else name
        raise ValueError(
            f"{owner} does not support {what}: with sharded parameters every rank must join each forward pass, and "
            f"{owner} declares sharded_support = False (its passes run on rank zero only). Every callback that "
            "lightning-interp ships runs in lockstep; use strategy='ddp' or DeepSpeed ZeRO stage 2 (whole parameters "
            "on every rank), or a single device, for this one, set sharded_support = True once it runs the same "
            "passes on every rank, or remove it from sharded runs."
        )


def _refuse_fsdp1_no_shard(owner: str, trainer: pl.Trainer) -> None:
    """Refuse FSDP1 without sharding (``NO_SHARD``, which FSDP1 also takes on a single device): after a backward pass
    that computes no parameter gradient (the callbacks' ``autograd.grad`` with respect to inputs) it leaves the
    model's original parameters as plain tensors, and the model's ``state_dict()`` (its checkpoints) then misses
    them."""
    sharding = getattr(trainer.strategy, "sharding_strategy", None)
    no_shard = getattr(sharding, "name", sharding) == "NO_SHARD"
    if no_shard or trainer.world_size == 1:
        why = "sharding_strategy='NO_SHARD'" if no_shard else "a single device (where FSDP1 does not shard)"
        raise ValueError(
            f"{owner} does not support FSDPStrategy with {why}: FSDP1 then leaves the model's parameters "
            "unregistered after the callbacks' backward pass, and the model's state_dict() (its checkpoints) would "
            "miss them. Use strategy='ddp' (what NO_SHARD amounts to) or a single-device strategy, or shard the "
            "parameters (FULL_SHARD, SHARD_GRAD_OP or HYBRID_SHARD) on several devices."
        )


def _refuse_fsdp1_flat_accumulation(owner: str, trainer: pl.Trainer) -> None:
    """Refuse FSDP1 with gradient accumulation where the callbacks' passes could come between two micro-batches: with
    ``use_orig_params=False`` always, and with any FSDP1 when validation is asked for in the middle of an epoch at
    batches that are no multiple of ``accumulate_grad_batches``. FSDP1 holds the gradients accumulated so far
    (Lightning accumulates under ``no_sync``), and a backward pass of the callbacks then breaks its bookkeeping
    (measured on 2 processes: ``AssertionError: All sharded parameters that received a gradient in the post-backward
    should use _saved_grad_shard``, for either setting of ``use_orig_params``). A validation at the end of an epoch
    comes after the optimizer step, and training stays bit for bit that of training alone."""
    kwargs = getattr(trainer.strategy, "kwargs", None)
    flat = isinstance(kwargs, dict) and kwargs.get("use_orig_params", True) is False
    accumulation = getattr(trainer, "accumulate_grad_batches", 1)
    if not isinstance(accumulation, int) or accumulation <= 1:
        return
    interval = getattr(trainer, "val_check_interval", 1.0)
    if isinstance(interval, bool):
        interval = 1.0
    between = (isinstance(interval, int) and interval % accumulation != 0) or (
        isinstance(interval, float) and interval < 1.0  # a fraction of an epoch: any batch
    )
    if flat:
        raise ValueError(
            f"{owner} does not support FSDPStrategy(use_orig_params=False) with accumulate_grad_batches="
            f"{accumulation}: FSDP1 then holds the gradients accumulated so far in its flat parameters, and a "
            "forward and backward pass of the callbacks at a validation between two micro-batches breaks its "
            "gradient bookkeeping (an AssertionError in FSDP's post-backward). Use FSDPStrategy(use_orig_params=True) "
            "(Lightning's default) with validation at the end of epochs, or accumulate_grad_batches=1, while you "
            "watch explanations."
        )
    if between:
        raise ValueError(
            f"{owner} does not support FSDPStrategy with accumulate_grad_batches={accumulation} and "
            f"val_check_interval={interval!r}: a validation would come between two micro-batches of an accumulation, "
            "and FSDP1 holds the gradients accumulated so far, which the callbacks' backward pass then breaks (an "
            "AssertionError in FSDP's post-backward). Validate at the end of epochs (val_check_interval=1.0), or at "
            f"a multiple of {accumulation} batches, or use ModelParallelStrategy with fully_shard (FSDP2), which "
            "keeps them apart."
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

    roots = root_fsdp_modules(model) or [model]  # FSDP1 and ZeRO-3: ``model`` is the module the callbacks call
    # first among the pre-hooks, before those that gather parameters (ZeRO-3's, FSDP2's)
    handles = [root.register_forward_pre_hook(check, prepend=True) for root in roots]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_in_lockstep(model: nn.Module, work: Callable[[], T], what: str, *, trainer: pl.Trainer | None = None) -> T:
    """``work()`` on every rank in lockstep; a failure on any rank is raised on every rank (its own error where it
    failed, :class:`PeerFailure` elsewhere), after the strategy's bookkeeping of a backward pass it interrupted is
    put back in order (:func:`finish_backward`), so that training's next step finds the parameters and gradients as
    it left them. No rank is left waiting in a collective when the failure comes between forward passes; inside one,
    the process group's timeout ends the wait.

    Args:
        model: the LightningModule (or a view of it) whose passes ``work`` runs.
        work: the computation, the same on every rank.
        what: what it is, for the note added to the error.
        trainer: the trainer running ``model`` (default: the LightningModule's own): under ``FSDPStrategy`` the
            failure checks go on its FSDP1 root wrapper, through which the passes enter.
    """
    trainer = trainer if trainer is not None else getattr(_inner(model), "_trainer", None)
    entered = fsdp1_root(trainer, _inner(model)) or model
    try:
        with failure_checks(entered):
            result = work()
    except PeerFailure:
        finish_backward(entered, trainer)
        raise
    except Exception as error:
        finish_backward(entered, trainer)
        all_ranks_ok(False)
        note = getattr(error, "add_note", None)
        if note is not None:
            note(f"({what} failed on this rank; the other ranks stopped it too.)")
        raise
    if not all_ranks_ok(True):
        finish_backward(entered, trainer)  # every rank alike: ZeRO-3 starts a new trace of its passes on each
        raise PeerFailure(f"{what} failed on another rank (its error is raised there)")
    return result


def finish_backward(model: nn.Module, trainer: pl.Trainer | None) -> None:
    """Put the strategy's bookkeeping back in order after the callbacks' work failed on some rank (every rank calls
    this; it makes no collective call): FSDP2's and FSDP1's post-backward final callback (:func:`finish_fsdp_backward`);
    under DeepSpeed ZeRO-3, the parameters a backward pass left gathered are released and the record of the order of
    the passes, which prefetching follows and which now differs from rank to rank, is started afresh on every rank."""
    finish_fsdp_backward(model)
    if trainer is not None and strategy_kind(trainer) == "deepspeed" and deepspeed_stage(trainer) >= 3:
        with contextlib.suppress(Exception):  # best effort: the original error is the one to raise
            _reset_zero3(getattr(trainer.strategy, "model", None))


def _reset_zero3(engine: Any) -> None:
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)  # training: the ZeRO-3 optimizer's; else its own
    leftovers = getattr(offload, "release_backward_leftovers", None)
    if leftovers is not None:  # the sub-modules whose post-backward hook never ran
        leftovers()
    engine.empty_partition_cache()  # every parameter back to its partition
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


def _inner(model: nn.Module) -> nn.Module:
    while isinstance(model, ForwardWith):
        model = model.model
    return model


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
    """After a failure inside an extra backward pass under FSDP2 or FSDP1: run the root's post-backward final callback
    that autograd would have run, so the parameters are resharded and training's next step finds them as it left
    them."""
    if is_fsdp1(model):
        _finish_fsdp1_backward(model)
        return
    for root in root_fsdp_modules(model):
        state = root._get_fsdp_state()
        context = getattr(state, "_state_ctx", None)
        final = getattr(state, "_root_post_backward_final_callback", None)
        if final is not None and getattr(context, "post_backward_final_callback_queued", False):
            with contextlib.suppress(Exception):  # best effort: the original error is the one to raise
                final()


def is_fsdp1(model: object) -> bool:
    """Whether ``model`` is an FSDP1 wrapper (``FullyShardedDataParallel``)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - an old torch
        return False
    return isinstance(model, FullyShardedDataParallel)


def _finish_fsdp1_backward(root: nn.Module) -> None:
    """FSDP1's counterpart of the FSDP2 final callback: the root queues ``_post_backward_final_callback`` on the
    autograd engine at the start of a backward pass, and a failure inside that pass drops it, leaving the root
    marked as having one queued (the next training backward would then queue none)."""
    if not getattr(root, "_post_backward_callback_queued", False):
        return
    with contextlib.suppress(Exception):  # best effort: the original error is the one to raise
        from torch.distributed.fsdp._runtime_utils import _post_backward_final_callback

        _post_backward_final_callback(root, root)


def fsdp1_root(trainer: pl.Trainer | None, model: nn.Module) -> nn.Module | None:
    """The FSDP1 root wrapper through which ``model`` (the LightningModule) is called under ``FSDPStrategy``, else
    None: calling ``model`` itself would run its inner FSDP units without the root (``Non-root FSDP instance's
    '_is_root' should not have been set yet``) and leave the root's own parameters sharded."""
    if trainer is None or strategy_kind(trainer) != "fsdp1":
        return None
    root = getattr(trainer.strategy, "model", None)
    if is_fsdp1(root) and getattr(root, "module", None) is model:
        return root
    return None


class ThroughRoot(ForwardWith):
    """``model`` (the LightningModule inside an FSDP1 root) called through the root wrapper, as Lightning calls
    its steps: its sub-modules, names, parameters, modes and attributes stay the model's own (layer hooks go on
    the inner layers), and each call runs the root's forward, which gathers the root's parameters and sets up the
    inner units' forward and backward passes.

    Args:
        model: the module the root wraps.
        root: the FSDP1 root (``trainer.strategy.model``).
    """

    def __init__(self, model: nn.Module, root: nn.Module) -> None:
        super().__init__(model, _call_root)
        object.__setattr__(self, "root", root)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.root(*args, **kwargs)

    def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` inside the root's forward (Lightning's forward redirection): the model's
        ``forward`` is replaced, for this one call, by ``function``, which may call any part of the model."""
        model = self.model
        own = model.__dict__.get("forward", _MISSING)  # Lightning's redirection leaves a bound method there

        def redirected(*inner_args: Any, **inner_kwargs: Any) -> T:
            _put_forward(model, own)  # the model's own forward again, for ``function`` to call
            return function(*inner_args, **inner_kwargs)

        model.forward = redirected
        try:
            return self.root(*args, **kwargs)
        finally:
            _put_forward(model, own)

    def redirect(self, forward_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``forward_fn(model, inputs, ...)`` run inside the root's forward (a user's ``forward_fn`` may call the
        model's sub-modules directly)."""

        def through_root(view: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.run(lambda *a, **k: forward_fn(self.model, *a, **k), *args, **kwargs)

        return through_root


_MISSING = object()


def _call_root(view: ThroughRoot, *args: Any, **kwargs: Any) -> Any:
    return view.root(*args, **kwargs)


def _put_forward(model: nn.Module, own: object) -> None:
    if own is _MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.forward = own  # type: ignore[method-assign]
