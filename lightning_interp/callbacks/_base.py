"""Plumbing shared by every callback: schedule, probe set, order of work, precision, drawing, state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_interp._logging import log_scalars, monitor_scalars, prepare_loggers
from lightning_interp.callbacks._context import active_context, end_run, join_run
from lightning_interp.methods.trace import ModelTrace, trace_model
from lightning_interp.probe import BatchParser, ProbeSet


def _validation_source(trainer: pl.Trainer, stage: str | None) -> Any:
    """Lightning's record of where validation data comes from for ``stage`` (None if unknown)."""
    loop = trainer.validate_loop if stage == "validate" else trainer.fit_loop.epoch_loop.val_loop
    return getattr(loop, "_data_source", None)


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


class InterpCallback(Callback):
    """Shared plumbing of every lightning-interp callback.

    Handles the schedule (validation epochs, never the sanity check, only on
    global rank zero), the probe set (drawn once from the first validation
    dataloader, or given), the order of work, the trainer's precision
    context, background drawing and the checkpoint state. Subclasses
    implement :meth:`_run`.

    Order of work (Lightning builds the model in ``configure_model()`` and moves
    it to its device only after the callbacks' ``setup``): ``setup`` checks
    arguments against the model where the names already exist and draws the
    probe set; ``on_fit_start`` (``on_validation_start`` for ``validate()``)
    runs the one dry forward on the built model on its device and resolves
    automatic layers, before the first training step; each due validation
    epoch computes on the model's device and hands pictures to the run's one
    drawing thread; the end of ``fit``/``validate``, teardown and an
    exception in training drain that thread.

    Args:
        name: tag prefix (``interp/<name>/...``) and part of the checkpoint
            ``state_key``; give two instances of one class different names.
        num_samples: probe samples to draw when ``probe`` is None.
        every_n_epochs: run at validation epochs whose number (1-based) is a
            multiple of this.
        probe: a ready :class:`ProbeSet` (share one between callbacks so
            their results line up), or None to draw one from the first
            validation dataloader.
        batch_parser: turns a batch of an unusual form into
            ``(inputs, labels, masks)``; see :func:`~lightning_interp.probe.parse_batch`.
        background_drawing: draw and log images on a background thread (the
            default), so training waits only for the computation and the
            scalars; False draws them inline (same images, for debugging).
    """

    def __init__(
        self,
        *,
        name: str,
        num_samples: int,
        every_n_epochs: int = 1,
        probe: ProbeSet | None = None,
        batch_parser: BatchParser | None = None,
        background_drawing: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}.")
        _check_positive_int("num_samples", num_samples)
        _check_positive_int("every_n_epochs", every_n_epochs)
        _check_callable("batch_parser", batch_parser)
        if probe is not None and not isinstance(probe, ProbeSet):
            raise TypeError(f"probe must be a ProbeSet or None, got {type(probe).__name__}.")
        if not isinstance(background_drawing, bool):
            raise TypeError(f"background_drawing must be True or False, got {background_drawing!r}.")
        self.name = name
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.batch_parser = batch_parser
        self.background_drawing = background_drawing
        self.probe: ProbeSet | None = probe
        self._runs = 0
        self._prepared = False
        if probe is not None and self._needs_labels() and not probe.has_labels:
            raise ValueError(f"{self._labels_reason()}, but the given ProbeSet has none.")

    # ------------------------------------------------------------------ hooks to implement
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compute on the probe set, submit the images; return the scalars (the base logs them)."""
        raise NotImplementedError

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Resolve what needs the built model on its device (output check, automatic layers); once per run."""

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        """Cheap argument checks against the model's sub-modules (e.g. layer names exist)."""

    def _needs_labels(self) -> bool:
        return False

    def _labels_reason(self) -> str:
        return f"{type(self).__name__} needs labels"

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _refuse_sharded_strategies(self, trainer)
        join_run(trainer, self)
        self._prepared = False
        if stage == "fit" and trainer.limit_val_batches == 0:
            rank_zero_warn(
                f"{type(self).__name__} runs at validation epochs, but limit_val_batches=0 turns validation off: "
                "it will log nothing in this run."
            )
        if not _builds_in_configure_model(pl_module):  # otherwise the layers do not exist yet: checked at fit start
            self._check_model(pl_module)
        if self.probe is None and stage in ("fit", "validate"):
            source = _validation_source(trainer, stage)
            if source is not None and not source.is_defined():
                raise ValueError(
                    f"{type(self).__name__} draws its probe samples from the validation data, but this "
                    f"{stage} run has no validation dataloader. Pass val_dataloaders=... to trainer.{stage}(), "
                    "define val_dataloader() in your LightningModule or DataModule, or give the callback "
                    "probe=ProbeSet(inputs, labels)."
                )
            loader = None
            with contextlib.suppress(Exception):  # the loader may need hooks that have not run yet: draw later
                loader = _first_loader(source.dataloader()) if source is not None else None
            if loader is not None:
                self._draw_probe(trainer, loader)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(trainer, pl_module)  # trainer.validate() has no on_fit_start

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ensure_ready(trainer, pl_module):
            return
        if trainer.sanity_checking or not self._is_due(trainer):
            return
        scalars: dict[str, float] = {}
        if trainer.is_global_zero:  # the work, the images and the loggers: rank zero only
            scalars = self._run(trainer, pl_module)
            log_scalars(trainer, scalars, trainer.global_step)
            self._runs += 1
        if trainer.world_size > 1:  # every rank gets the values, so a monitor on any rank finds them
            scalars = trainer.strategy.broadcast(scalars, src=0)
        monitor_scalars(pl_module, scalars)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        context = active_context(trainer)
        if context is not None and trainer.state.fn == "validate":  # in fit, drawing is drained at fit end
            context.worker.drain()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_warn(
            f"{type(self).__name__} explains the probe set at validation epochs only; trainer.test() runs nothing "
            "of it. To analyse a dataset after training, call trainer.validate(model, dataloaders=...)."
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._runs == 0 and trainer.is_global_zero:
            rank_zero_warn(
                f"{type(self).__name__} never ran in this fit: no validation epoch was due (check "
                f"limit_val_batches, check_val_every_n_epoch and every_n_epochs={self.every_n_epochs})."
            )
        context = active_context(trainer)
        if context is not None:
            context.worker.drain()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        end_run(trainer, raise_errors=True)  # the first callback's teardown ends the run; no thread outlives it

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        error = end_run(trainer, raise_errors=False)  # the training error is the one to raise
        if error is not None and error is not exception:
            rank_zero_warn(f"{type(self).__name__}: a drawing job failed as well: {error!r}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"probe": None if self.probe is None else self.probe.state_dict(), "runs": self._runs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self.probe = ProbeSet.from_state_dict(state_dict["probe"])
        self._runs = int(state_dict.get("runs", 0))

    # ------------------------------------------------------------------ shared internals
    def _ensure_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Draw the probe set if setup could not, and prepare once per run; False when no validation data is at hand."""
        if self.probe is None:
            loader = _first_loader(trainer.val_dataloaders)
            if loader is None:
                source = _validation_source(trainer, "validate" if trainer.state.fn == "validate" else "fit")
                with contextlib.suppress(Exception):
                    loader = _first_loader(source.dataloader()) if source is not None else None
            if loader is None:
                return False
            self._draw_probe(trainer, loader)
        assert self.probe is not None
        if not self._prepared:
            self._check_model(pl_module)  # again: a model built in configure_model() has its layers only now
            self._prepare(trainer, pl_module, self.probe)
            self._prepared = True
        return True

    def _is_due(self, trainer: pl.Trainer) -> bool:
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _draw_probe(self, trainer: pl.Trainer, loader: Any) -> None:
        def draw() -> ProbeSet:
            return ProbeSet.from_dataloader(loader, self.num_samples, batch_parser=self.batch_parser)

        # callbacks drawing the same number of samples from the same data share one draw (and one ProbeSet)
        dataset = getattr(loader, "dataset", None)
        source = id(dataset) if dataset is not None and _is_indexable(dataset) else id(loader)
        context = active_context(trainer)
        probe = draw() if context is None else context.probe((source, self.num_samples, self.batch_parser), draw)
        if len(probe) < self.num_samples:
            rank_zero_warn(
                f"{type(self).__name__}: asked for num_samples={self.num_samples} but the validation data "
                f"holds only {len(probe)}; using {len(probe)}."
            )
        if self._needs_labels() and not probe.has_labels:
            raise ValueError(
                f"{self._labels_reason()}, but the validation batches carry none. Pass batch_parser=... that "
                "returns the labels, or give probe=ProbeSet(inputs, labels)."
            )
        self.probe = probe

    def _trace(self, trainer: pl.Trainer, model: nn.Module, example: Tensor) -> ModelTrace:
        """The run's one dry-forward trace of ``model`` for inputs like ``example`` (shared by the callbacks)."""
        context = active_context(trainer)
        return trace_model(model, example) if context is None else context.trace(model, example)

    def _submit(self, trainer: pl.Trainer, job: Callable[[], None]) -> None:
        """Hand a drawing-and-logging job to the run's worker; run it now when background drawing is off or
        outside a run (a method called by hand: no thread may start that nothing would stop)."""
        context = active_context(trainer)
        if context is None:
            job()
            return
        prepare_loggers(trainer)
        context.worker.submit(job, inline=not self.background_drawing)

    @contextlib.contextmanager
    def _model_context(self, trainer: pl.Trainer) -> Iterator[None]:
        """The trainer's precision context (autocast under AMP), if it has one."""
        plugin = getattr(trainer, "precision_plugin", None)
        context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
        with context:
            yield

    def _example_input(self, pl_module: pl.LightningModule, probe: ProbeSet) -> Tensor:
        """The first probe sample on the model's device and in its floating dtype, for dry forward passes."""
        example = probe.inputs[:1].to(pl_module.device)
        parameter = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        if parameter is not None and example.is_floating_point():
            example = example.to(parameter.dtype)
        return example

    def _probe_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """The probe inputs on the model's device (copied asynchronously from pinned memory to a GPU)."""
        assert self.probe is not None
        device = pl_module.device
        context = active_context(trainer)
        host = self.probe.inputs if context is None else context.host_copy(self.probe.inputs, device)
        inputs = host.to(device, non_blocking=host.is_pinned())
        plugin = getattr(trainer, "precision_plugin", None)
        return plugin.convert_input(inputs) if plugin is not None else inputs


def _builds_in_configure_model(pl_module: pl.LightningModule) -> bool:
    """Whether the module builds layers in ``configure_model()`` (or its legacy name), after the callbacks' setup."""
    return any(is_overridden(hook, pl_module) for hook in ("configure_model", "configure_sharded_model"))


def _is_indexable(dataset: object) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_callable(name: str, value: Callable | None) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}.")


def _refuse_sharded_strategies(callback: Callback, trainer: pl.Trainer) -> None:
    """Strategies that shard parameters need every rank in each forward pass; rank-zero-only work would hang."""
    strategy = type(getattr(trainer, "strategy", None)).__name__
    if any(kind in strategy for kind in ("FSDP", "DeepSpeed", "ModelParallel")):
        raise ValueError(
            f"{type(callback).__name__} does not support {strategy}: it runs extra forward passes on global rank "
            "zero only, and with sharded parameters every rank must join each forward pass. Use strategy='ddp' "
            "(or a single device) while you watch explanations, or remove the callback for sharded runs."
        )


def parse_layer_names(layers: str | Sequence[str], option: str) -> list[str]:
    """Check a ``layer(s)`` argument: ``"auto"`` (returned as ``[]``) or distinct dotted module names."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{option} must be 'auto', a dotted module name or a list of names, got {layers!r}.")
    if "auto" in names and len(names) > 1:
        raise ValueError(f"{option}='auto' cannot be combined with layer names.")
    if len(set(names)) != len(names):
        raise ValueError(f"{option} lists a name twice: {names}.")
    return [] if names == ["auto"] else names
