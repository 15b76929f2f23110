"""UnshardedWindow: under FSDP2, explain the whole model on rank zero once per run instead of in lockstep."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_interp.callbacks._sharding import is_lockstep, strategy_name


class UnshardedWindow(Callback):
    """Run every lightning-interp callback's work in an unsharded window under FSDP2, instead of in lockstep.

    Under a strategy that shards the parameters, the callbacks run in lockstep by default: every rank does the same
    work, and each forward and backward pass gathers the parameters it needs from all ranks. With this callback in
    the trainer, every rank instead gathers each ``fully_shard`` module's parameters once per run (the window),
    rank zero explains the whole model alone, with no collective inside its passes, while the other ranks wait, and
    every rank reshards on leaving. That saves collectives (one all-gather per parameter group per run, instead of
    one per group per pass), and the methods that read weights outside a forward pass (``cam``) work. The price is
    memory: the whole model sits on each device during the window, beside training's state, which is what sharding
    avoided. Use it when the whole model fits on one device and the callbacks run many passes (integrated
    gradients, SmoothGrad, perturbation methods); keep lockstep (no ``UnshardedWindow``) for models that only fit
    sharded. Where the parameters are whole (one device, DDP, DeepSpeed ZeRO 0-2) it changes nothing.

    The window is FSDP2's (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model()``); under FSDP1
    (``FSDPStrategy``) and DeepSpeed ZeRO-3 it is refused before training (use lockstep there). Each run's failure
    on rank zero is raised on every rank after the window closes; training's next step finds the parameters as it
    left them.

    Example:
        >>> from lightning_interp import GradCAMCallback, SaliencyCallback
        >>> callbacks = [SaliencyCallback(), GradCAMCallback(methods=("grad_cam", "cam")), UnshardedWindow()]
        >>> [type(c).__name__ for c in callbacks][-1]
        'UnshardedWindow'
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = strategy_name(trainer)
        if is_lockstep(trainer) and "ModelParallel" not in name:
            raise ValueError(
                f"UnshardedWindow opens its window under FSDP2 only (ModelParallelStrategy with fully_shard in "
                f"configure_model()), not under {name}. Remove UnshardedWindow() from the callbacks: the "
                "lightning-interp callbacks then run in lockstep on every rank."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}


def in_window(trainer: Any) -> bool:
    """Whether the lightning-interp callbacks of ``trainer`` work in the unsharded window: the strategy shards the
    parameters and an :class:`UnshardedWindow` is among the callbacks."""
    return is_lockstep(trainer) and any(isinstance(c, UnshardedWindow) for c in getattr(trainer, "callbacks", ()))
