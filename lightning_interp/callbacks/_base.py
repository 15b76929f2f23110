"""Plumbing shared by every callback: schedule, probe set, order of work, precision, drawing, state."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_interp._lightning import compiled_by_lightning, validation_source
from lightning_interp._logging import (
    TAG_PREFIX,
    host_scalars,
    log_scalars,
    log_warnings,
    logging_step,
    monitor_scalars,
    prepare_loggers,
    write_scalar_layout,
)
from lightning_interp.callbacks._checks import check_arguments, refuse_moved_arguments
from lightning_interp.callbacks._context import active_context, end_run, join_run
from lightning_interp.callbacks._sharding import (
    ThroughRoot,
    broadcast_from_zero,
    check_strategy,
    fsdp1_root,
    is_lockstep,
    refuse_checkpoint_fragile,
    refuse_weight_reading,
    run_in_lockstep,
)
from lightning_interp.callbacks._window import check_window_model, prepare_fsdp2_roots, run_in_window, unsharded_window
from lightning_interp.callbacks.unsharded_window import in_window
from lightning_interp.methods import (
    BoundInputs,
    ForwardWith,
    ModelTrace,
    find_target_layer,
    keyword_inputs,
    layer_output,
    logits_of,
    trace_model,
)
from lightning_interp.options import DataDescription, Display
from lightning_interp.probe import BatchParser, ProbeSet, ValidationScan, parse_batch, scannable

T = TypeVar("T")
MODEL_INPUT_KEYS = ("token_type_ids", "position_ids", "pixel_mask", "bool_masked_pos")
"""Batch keys that change what a HuggingFace model computes (with ``*attention_mask``): one the model never
receives is warned about before training."""
POOL_FACTOR = 8  # a stream's probe is drawn from this many times num_samples of its first samples


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
        name: tag prefix (``interp_<name>/...``) and part of the checkpoint
            ``state_key``; give two instances of one class different names.
        num_samples: probe samples to draw when ``probe`` is None.
        every_n_epochs: run at validation epochs whose number (1-based) is a
            multiple of this.
        probe: a ready :class:`ProbeSet` (share one between callbacks so
            their results line up), or None to draw one from the first
            validation dataloader.
        data: what the data is (class names, vocabulary, padding, feature
            names, how to read a batch): a
            :class:`~lightning_interp.options.DataDescription`, given once: a
            callback without one uses the one given to another lightning-interp
            callback of the same ``Trainer``.
        display: how the pictures look and are drawn (colormap, evolution
            strips, rows per image, background drawing): a
            :class:`~lightning_interp.options.Display`.
        forward_fn: how to call the model on a batch of probe inputs, as
            ``forward_fn(model, inputs)``, when its ``forward`` does not take the
            inputs tensor alone (e.g. ``lambda model, x: model.net(x)`` for a
            LightningModule whose ``forward`` takes the whole batch, or
            ``lambda model, ids: model(input_ids=ids).logits``). Layer names stay
            the model's own. Default: ``model(inputs)``.
    """

    def __init__(
        self,
        *,
        name: str,
        num_samples: int,
        every_n_epochs: int = 1,
        probe: ProbeSet | None = None,
        data: DataDescription | None = None,
        display: Display | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
        **unknown: Any,
    ) -> None:
        refuse_unknown_arguments(self, unknown)  # a 0.1 name: what to write instead
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}.")
        check_arguments(num_samples=num_samples, every_n_epochs=every_n_epochs, forward_fn=forward_fn)
        if data is not None and not isinstance(data, DataDescription):
            raise TypeError(f"data must be a DataDescription or None, got {type(data).__name__}.")
        if display is not None and not isinstance(display, Display):
            raise TypeError(f"display must be a Display or None, got {type(display).__name__}.")
        if probe is not None and not isinstance(probe, ProbeSet):
            raise TypeError(f"probe must be a ProbeSet or None, got {type(probe).__name__}.")
        self.name = name
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self._given_data = data
        self._data: DataDescription | None = None  # in force this run: given, or shared by another callback
        self.display = display if display is not None else Display()
        unused = [
            field.name
            for field in fields(Display)
            if field.name not in self.display_fields and getattr(self.display, field.name) != field.default
        ]
        if unused:
            rank_zero_warn(
                f"{type(self).__name__} does not use Display({', '.join(f'{n}=...' for n in unused)}): it uses "
                f"{', '.join(self.display_fields)} only."
            )
        self.forward_fn = forward_fn
        self._wrapper: ForwardWith | None = None
        self._root: ThroughRoot | None = None  # under FSDPStrategy: the model called through the FSDP1 root wrapper
        self._call: ModelCall | None = None  # how the model takes the probe's other inputs (dict batches)
        self._convert_input: Callable[[Any], Any] | None = None  # the trainer's precision plugin's, for bound inputs
        self._model_pad_id: int | None = None  # the model's own padding id (a HuggingFace config's)
        self._views: dict[int, tuple[ProbeSet, BoundInputs]] = {}
        self.probe: ProbeSet | None = probe
        self._given_probe = probe is not None  # a user's probe is kept across fits; a drawn one is redrawn
        self._runs = 0
        self._last_step: int | None = None  # the logging step of the last run (fit-end summaries are shown there)
        self._warned: set[str] = set()  # the keys of the once-per-fit warnings already given
        self._unlogged: list[str] = []  # warnings given since the last write to the loggers (see _warn)
        self._prepared = False
        self._pending_probe: dict[str, Any] | None = None  # a checkpoint's probe, by dataset index, to re-read
        self._from_stream = False  # the validation data is a stream: take the probe from the batches it yields
        self._provisional = False  # checks running on a stream's first few samples, before its probe is drawn
        if probe is not None and self._needs_labels() and not probe.has_labels:
            raise ValueError(f"{self._labels_reason()}, but the given ProbeSet has none.")

    sharded_support: bool = False
    """Whether this callback runs under sharded strategies (every rank in lockstep; see ``_sharding.py``); the others
    refuse them before training."""

    display_fields: tuple[str, ...] = ("background_drawing",)
    """The :class:`~lightning_interp.options.Display` fields this callback uses (a subclass that draws maps adds
    its own); another field set to a non-default value is warned about at construction."""

    default_cmap = "inferno"
    """The colormap of this callback's heatmaps when ``display.cmap`` is None."""

    @property
    def data(self) -> DataDescription:
        """The data description in force: this callback's own, else one shared by another callback of the run."""
        if self._given_data is not None:
            return self._given_data
        return self._data if self._data is not None else _NO_DESCRIPTION

    @property
    def pad_id(self) -> int | None:
        """The padding id of token inputs: the data description's, else the model's own (a HuggingFace config's
        ``pad_token_id``), found at fit start."""
        return self.data.pad_id if self.data.pad_id is not None else self._model_pad_id

    def _shown_inputs(self, probe: ProbeSet) -> Tensor:
        """The probe inputs as the pictures show them: token ids with -1 at the padding (hidden)."""
        real = probe.real_tokens(self.pad_id)
        return probe.inputs if real is None else probe.inputs.masked_fill(~real, -1)

    @property
    def batch_parser(self) -> BatchParser | None:
        return self.data.batch_parser

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.data.class_names  # type: ignore[return-value]

    @property
    def background_drawing(self) -> bool:
        return self.display.background_drawing

    @property
    def cmap(self) -> str:
        return self.display.cmap or self.default_cmap

    @property
    def evolution_samples(self) -> int:
        return self.display.evolution_samples

    @property
    def evolution_columns(self) -> int:
        return self.display.evolution_columns

    @property
    def rows_per_image(self) -> int | Literal["auto"] | None:
        return self.display.rows_per_image

    later_metrics: tuple[str, ...] = ()
    """Metric names this callback logs only from its second run on (they get their chart in the layout too)."""

    # ------------------------------------------------------------------ hooks to implement
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Mapping[str, float | Tensor]:
        """Compute on the probe set, submit the images; return the scalars (the base logs them). Scalars computed
        on the device may be returned as 0-d tensors: the base brings them all to the host in one transfer."""
        raise NotImplementedError

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Resolve what needs the built model on its device (output check, automatic layers); once per run."""

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        """Cheap argument checks against the model's sub-modules (e.g. layer names exist)."""

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """The computation of a run on two probe samples, logging nothing, so it fails before training if it fails."""

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
        check_strategy(self, trainer, supported=self.sharded_support)
        if not self._in_window(trainer):  # the window gathers whole weights: CAM reads them there
            refuse_weight_reading(self, trainer, getattr(self, "methods", ()))
        _refuse_name_clash(self, trainer)
        _run_before_weight_averaging(trainer)
        self._data = _shared_description(self, trainer)
        join_run(trainer, self)
        if stage in ("fit", "validate"):  # every run starts clean; a checkpoint's state, if any, is loaded next
            self._reset_run_state()
        self._prepared = False
        self._provisional = False
        if stage == "fit" and trainer.limit_val_batches == 0:
            rank_zero_warn(
                f"{type(self).__name__} runs at validation epochs, but limit_val_batches=0 turns validation off: "
                "it will log nothing in this run."
            )
        if not _builds_in_configure_model(pl_module):  # otherwise the layers do not exist yet: checked at fit start
            self._check_model(pl_module)
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn; its value is "fit", ...
        if self.probe is None and stage in ("fit", "validate"):
            source = validation_source(trainer, stage)
            if source is not None and not source.is_defined():
                argument = "val_dataloaders" if stage == "fit" else "dataloaders"
                raise ValueError(
                    f"{type(self).__name__} draws its probe samples from the validation data, but this "
                    f"{stage} run has no validation dataloader. Pass {argument}=... to trainer.{stage}(), "
                    "define val_dataloader() in your LightningModule or DataModule, or give the callback "
                    "probe=ProbeSet(inputs, labels)."
                )
            loader = None
            with contextlib.suppress(Exception):  # the loader may need hooks that have not run yet: draw later
                loader = _first_loader(source.dataloader()) if source is not None else None
            if loader is not None:
                self._draw_probe(trainer, loader)

    def _reset_run_state(self) -> None:
        """Forget everything of an earlier fit (subclasses add their own state)."""
        self._runs = 0
        self._last_step = None
        self._warned = set()
        self._unlogged = []
        self._pending_probe = None
        self._from_stream = False
        if not self._given_probe:
            self.probe = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        context = active_context(trainer)
        if context is not None and self._from_stream and self.probe is None and not trainer.sanity_checking:
            # a stream's probe comes from one validation loop's batches: a re-iterable stream yields the sanity
            # check's batches again, and keeping both would put samples into the probe twice
            context.stream.clear()
            context.stream_seen.clear()
        self._ensure_ready(trainer, pl_module)  # trainer.validate() has no on_fit_start

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """With a stream as validation data, keep the first batches the trainer loads (never iterate it ourselves)."""
        if self.probe is not None or not self._from_stream or dataloader_idx != 0:
            return
        context = active_context(trainer)
        if context is not None:
            key = (trainer.sanity_checking, trainer.global_step, batch_idx)
            context.collect(key, parse_batch(batch, self.batch_parser), POOL_FACTOR * self.num_samples)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ready = self._ensure_ready(trainer, pl_module, epoch_end=True)
        if trainer.world_size > 1 and self._from_stream:  # a stream's shards may differ: all ranks go on, or none
            ready = bool(trainer.strategy.reduce_boolean_decision(ready, all=True))
        if not ready:
            return
        if trainer.sanity_checking or not self._is_due(trainer):
            return
        scalars: dict[str, float] = {}
        lockstep = is_lockstep(trainer)  # sharded parameters: every rank joins each forward pass
        if self._in_window(trainer):  # every rank gathers the whole model once; rank zero works alone
            what = f"{type(self).__name__}'s work at this validation epoch"
            work = lambda: host_scalars(self._run(trainer, self._explained(pl_module)))  # noqa: E731
            scalars = run_in_window(pl_module, trainer.is_global_zero, work, what) or {}
            self._runs += int(trainer.is_global_zero)
        elif trainer.is_global_zero or lockstep:  # the work: rank zero only, or every rank in lockstep
            scalars = self._run_in_step(trainer, pl_module, lockstep)
            self._runs += 1
        if trainer.is_global_zero:  # the images and the loggers: rank zero only
            self._last_step = logging_step(trainer)
            log_scalars(trainer, scalars, self._last_step)
            self._log_warnings(trainer, self._last_step)
            self._note_layout(trainer, scalars)
        if trainer.world_size > 1:  # every rank gets the values, so a monitor on any rank finds them
            scalars = trainer.strategy.broadcast(scalars, src=0)
        monitor_scalars(pl_module, scalars)

    def _run_in_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, lockstep: bool) -> dict[str, float]:
        """``_run``'s scalars; in lockstep, a failure on any rank is raised on every rank, after an FSDP2 backward
        it interrupted is finished (so training's next step finds the parameters as it left them)."""
        if not lockstep:
            return host_scalars(self._run(trainer, self._explained(pl_module)))  # one transfer per device
        work = lambda: host_scalars(self._run(trainer, self._explained(pl_module)))  # noqa: E731
        what = f"{type(self).__name__}'s work at this validation epoch"
        return run_in_lockstep(pl_module, work, what, trainer=trainer)

    def _in_window(self, trainer: pl.Trainer) -> bool:
        """Whether this callback's work runs in the unsharded window: the strategy shards the parameters, and the
        trainer has an :class:`~lightning_interp.callbacks.UnshardedWindow` callback."""
        return in_window(trainer)

    def _warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` comes up in this fit."""
        self._warn(message, key=key, stacklevel=2)

    def _warn(self, message: str, *, key: str | None = None, stacklevel: int = 1) -> None:
        """Warn with ``message`` (once per fit for a given ``key``) on stderr now, and in the run's logs at the next
        logging step: TensorBoard text under ``interp_<name>/warnings``, which the HTML report puts at its top.
        ``stacklevel``: the frame the warning names, 1 for the caller."""
        if key is not None:
            if key in self._warned:
                return
            self._warned.add(key)
        rank_zero_warn(message, stacklevel=4 + stacklevel)
        self._unlogged.append(message)

    def _log_warnings(self, trainer: pl.Trainer, step: int) -> None:
        """Write the warnings given since the last call to the loggers, at ``step`` (global rank zero only)."""
        if self._unlogged and trainer.is_global_zero:
            log_warnings(trainer, f"{TAG_PREFIX}{self.name}", self._unlogged, step)
        self._unlogged = []

    def _summary_step(self, trainer: pl.Trainer) -> int:
        """The step of a fit-end summary (an evolution strip): that of the last run, so TensorBoard shows it with the
        last grid and the last scalars."""
        return self._last_step if self._last_step is not None else logging_step(trainer)

    def _note_layout(self, trainer: pl.Trainer, scalars: dict[str, float]) -> None:
        """Add this run's scalar tags to the run's layout, and the tags of the metrics that come only from a later run
        (``later_metrics``, for each layer or method that logs a metric now)."""
        context = active_context(trainer)
        if context is None:
            return
        prefix = f"{TAG_PREFIX}{self.name}/"
        tags = context.layout.setdefault(self.name, set())
        ours = [tag for tag in scalars if tag.startswith(prefix)]
        tags.update(ours)
        owners = {tag.rpartition("/")[0] for tag in ours if tag.count("/") > 1}
        tags.update(f"{owner}/{metric}" for owner in owners for metric in self.later_metrics)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        context = active_context(trainer)
        count = 0 if context is None else sum(len(tags) for tags in context.layout.values())
        if context is not None and count > context.layout_written:
            # after every callback's epoch-end work of a validation that added tags: the run's layout, complete so far
            write_scalar_layout(trainer, context.layout, logging_step(trainer))
            context.layout_written = count
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
            self._warn(
                f"{type(self).__name__} never ran in this fit: no validation epoch was due (check "
                f"limit_val_batches, check_val_every_n_epoch and every_n_epochs={self.every_n_epochs})."
            )
        self._log_warnings(trainer, self._summary_step(trainer))
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
        # samples drawn from an indexable dataset are saved as indices + fingerprint, re-read on resume
        probe = None if self.probe is None else self.probe.state_dict(by_index=not self._given_probe)
        return {"probe": probe, "runs": self._runs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("probe")
        if saved is not None and saved.get("inputs") is not None:
            self.probe = ProbeSet.from_state_dict(saved)
            self._pending_probe = None
        elif saved is not None:  # re-read from the dataset at fit start, and checked against the fingerprint
            self.probe, self._pending_probe = None, dict(saved)
        self._runs = int(state_dict.get("runs", 0))

    # ------------------------------------------------------------------ shared internals
    def _ensure_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, epoch_end: bool = False) -> bool:
        """Have a probe set and be prepared (once per run); False when no validation data is at hand yet."""
        if self._pending_probe is not None:
            self._restore_probe(trainer)
        if self.probe is None and not self._from_stream:
            loader = self._current_loader(trainer)
            if loader is None:
                return False
            self._draw_probe(trainer, loader)
        # a stream: its probe is drawn from the batches the trainer loaded, at the end of a validation
        if self.probe is None and not (epoch_end and self._probe_from_stream(trainer, pl_module)):
            return False
        assert self.probe is not None
        if not self._prepared and self._in_window(trainer):  # every rank tries it inside the window
            check_window_model(self, pl_module)
            prepare_fsdp2_roots(pl_module)
            with unsharded_window(pl_module):
                self._get_ready(trainer, pl_module, self.probe)
        elif not self._prepared:
            self._get_ready(trainer, pl_module, self.probe)
        return True

    def _explained(self, pl_module: nn.Module, rows: ProbeSet | None = None) -> pl.LightningModule:
        """The module the methods call on the inputs of ``rows`` (default: the probe set): ``pl_module`` called as
        the data loader feeds it, with the other model inputs of those samples (a dict batch's ``attention_mask``,
        ...) where its ``forward`` takes them, or through ``forward_fn``. ``pl_module`` may be such a view already:
        without ``rows`` it is returned as it is, with ``rows`` it is bound to those."""
        if rows is None and isinstance(pl_module, ForwardWith):
            return pl_module  # type: ignore[return-value]
        model = unwrapped(pl_module)
        forward_fn = self.forward_fn
        if self._root is not None and self._root.model is model:  # FSDP1: every call goes through the root wrapper
            model = self._root
            forward_fn = None if forward_fn is None else self._root.redirect(forward_fn)
        rows = self.probe if rows is None else rows
        call = self._call
        keys = () if call is None else call.keys
        next_token = call is not None and call.next_token
        more = 0 if self.probe is None else len(self.probe.more_inputs)  # the model's inputs after the first
        if rows is not None and (keys or next_token or more or rows.more_inputs):
            cached = self._views.get(id(rows))
            if cached is not None and cached[0] is rows and cached[1].model is model:
                return cached[1]  # type: ignore[return-value]
            missing = [key for key in keys if key not in rows.extras]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: these samples lack the model inputs {missing} that the probe samples "
                    "carry and the model takes; give every set of samples (probe, concepts) the same batch keys."
                )
            if len(rows.more_inputs) != more:
                raise ValueError(
                    f"{type(self).__name__}: these samples hold {1 + len(rows.more_inputs)} model inputs, the probe "
                    f"samples {1 + more}; give every set of samples (probe, concepts) every input of the model."
                )
            device = _device_of(model)
            extras = {key: self._converted(rows.extras[key].to(device)) for key in keys}
            if rows.more_inputs:  # model(x, *more): bound by position, each sample's own
                extras = {
                    **{f"{MORE_INPUT}{position}": self._converted(value.to(device)) for position, value in enumerate(
                        rows.more_inputs, 1)},
                    **extras,
                }  # fmt: skip
                forward_fn = _with_more_inputs(forward_fn, len(rows.more_inputs))
            view = BoundInputs(
                model,
                extras,
                input_key=None if call is None else call.input_key,
                forward_fn=forward_fn,
                next_token=next_token,
            )
            self._views = {id(rows): (rows, view)}  # the last rows' view: the probe's, reused every epoch
            return view  # type: ignore[return-value]
        if call is not None and call.input_key is not None:
            return BoundInputs(model, {}, input_key=call.input_key)  # type: ignore[return-value]
        if forward_fn is None:
            return model  # type: ignore[return-value]
        if self._wrapper is None or self._wrapper.model is not model:
            self._wrapper = ForwardWith(model, forward_fn)
        return self._wrapper  # type: ignore[return-value]

    def _converted(self, value: Tensor) -> Tensor:
        """A bound input of the model, on its device, converted like the probe inputs (the trainer's precision, which
        converts floating-point tensors only, as it does every batch in training)."""
        return value if self._convert_input is None else self._convert_input(value)

    def input_name(self, position: int) -> str:
        """The name of the model's input at ``position`` in tags: ``DataDescription(input_names=...)``'s, else
        ``input<position>`` (a dict batch's first input: its key)."""
        names = self.data.input_names
        if names is not None and position < len(names):
            return names[position]
        if position == 0 and self.probe is not None and self.probe.input_key is not None:
            return self.probe.input_key  # a dict batch: its inputs are named by their keys
        return f"input{position}"

    def _model_call(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> ModelCall | None:
        """How the model is called on the probe samples, decided from the signature of its ``forward`` (or of
        ``forward_fn``) and the batch's keys, as HuggingFace's ``Trainer`` does; a batch key the model never
        receives that looks like a mask is said before training (once per run)."""
        if not probe.extras and probe.input_key is None:
            return None
        offered = list(probe.extras)
        if self.forward_fn is not None:
            keys = keyword_inputs(self.forward_fn, offered, skip=2)
            input_key = None
        else:
            keys = keyword_inputs(pl_module.forward, offered)
            named = probe.input_key is not None and keyword_inputs(pl_module.forward, [probe.input_key])
            input_key = probe.input_key if named else None
        left = [key for key in offered if key not in keys]
        masks = [key for key in left if key.endswith("attention_mask") or key in MODEL_INPUT_KEYS]
        context = active_context(trainer)
        note = f"unreceived {sorted(masks)}"
        if masks and (context is None or note not in context.notes):
            if context is not None:
                context.notes.add(note)
            how = "forward_fn(model, inputs)" if self.forward_fn is not None else f"{type(pl_module).__name__}.forward"
            carried = ", ".join(repr(k) for k in masks)
            if probe.input_key is None:  # a tuple batch: the name is ours
                carried = "an attention mask (the integer 0/1 second item of their (ids, mask, labels) tuples)"
            rank_zero_warn(
                f"lightning-interp: the validation batches carry {carried}, but "
                f"{how} takes no argument of that name, so the callbacks call the model without it (padding would "
                "be attended, and the maps would explain another computation than validation's). Name the "
                "argument in forward (e.g. forward(self, input_ids, attention_mask=None)), or give forward_fn=lambda "
                "model, inputs, attention_mask: ... a parameter of that name: it receives the samples' values."
            )
        return ModelCall(input_key, tuple(keys))

    def _next_token_call(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> ModelCall | None:
        """The model call, marked as a causal language model's when the model gives (1, T, V) logits for (1, T)
        token ids and no ``output_transform`` says how to read them: the callbacks then explain the score of
        the token after each text (the prediction at its last real token)."""
        call = self._call
        if probe.inputs.ndim != 2 or probe.inputs.is_floating_point() or getattr(self, "output_transform", None):
            return call
        trace = self._trace(trainer, self._explained(pl_module, probe), self._example_input(pl_module, probe))
        logits = logits_of(trace.output)
        if not (isinstance(logits, Tensor) and logits.ndim == 3 and logits.shape[:2] == probe.inputs[:1].shape):
            return call
        return ModelCall(None, (), True) if call is None else replace(call, next_token=True)

    def _get_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Check the model, prepare, and try the computation on two samples: every mistake surfaces now."""
        plugin = getattr(trainer, "precision_plugin", None)
        self._convert_input = None if plugin is None else plugin.convert_input
        names = self.data.input_names
        if names is not None and probe.input_key is not None:
            raise ValueError(
                f"{type(self).__name__}: DataDescription(input_names=...) names the inputs of tuple batches "
                f"((image, table), label); a dict batch's inputs are named by their keys ({probe.input_key!r}, "
                f"{', '.join(repr(key) for key in probe.extras)}). Leave input_names out."
            )
        if names is not None and len(names) != len(probe.all_inputs):
            raise ValueError(
                f"{type(self).__name__}: DataDescription(input_names={list(names)}) names {len(names)} inputs, but "
                f"the probe samples hold {len(probe.all_inputs)} (shapes "
                f"{[tuple(value.shape[1:]) for value in probe.all_inputs]}); give one name per model input."
            )
        root = fsdp1_root(trainer, unwrapped(pl_module))
        self._root = None if root is None else ThroughRoot(unwrapped(pl_module), root)
        self._call = self._model_call(trainer, pl_module, probe)
        self._views = {}
        self._model_pad_id = model_pad_id(pl_module)
        self._call = self._next_token_call(trainer, pl_module, probe)
        self._views = {}  # made with the call before it was known to be a language model's
        pl_module = self._explained(pl_module, probe)
        _check_finite_inputs(self, probe)
        self._check_model(pl_module)  # again: a model built in configure_model() has its layers only now
        refuse_checkpoint_fragile(self, unwrapped(pl_module), getattr(self, "methods", ()))
        context = active_context(trainer)
        if _is_compiled(pl_module) and (context is None or "compiled" not in context.notes):
            if context is not None:
                context.notes.add("compiled")
            rank_zero_info(_COMPILED_NOTE)
        self._prepare(trainer, pl_module, probe)
        try:
            self._trial(trainer, pl_module, probe)
        except Exception as error:
            note = getattr(error, "add_note", None)
            if note is not None:
                note(
                    f"({type(self).__name__} tried its computation on two probe samples before training, to report "
                    "any failure now rather than at the end of the first epoch, and it failed as above.)"
                )
            raise
        self._prepared = True

    def _current_loader(self, trainer: pl.Trainer) -> Any:
        loader = _first_loader(trainer.val_dataloaders)
        if loader is None:
            source = validation_source(trainer, "validate" if trainer.state.fn == "validate" else "fit")
            with contextlib.suppress(Exception):
                loader = _first_loader(source.dataloader()) if source is not None else None
        return loader

    def _is_due(self, trainer: pl.Trainer) -> bool:
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _scan(self, trainer: pl.Trainer, loader: DataLoader) -> ValidationScan:
        """The run's scan of what ``loader`` validates on (one per dataset, shared by the callbacks)."""
        limit = trainer.limit_val_batches if trainer.state.fn in ("fit", "validate") else None

        def make() -> ValidationScan:
            with torch.inference_mode(False):
                return ValidationScan(loader, limit_batches=limit, batch_parser=self.batch_parser)

        return self._shared(trainer, "scans", (id(loader.dataset), limit, self.batch_parser), make)

    def _draw_probe(self, trainer: pl.Trainer, loader: Any) -> None:
        if trainer.limit_val_batches == 0:  # validation is off (warned at setup): nothing to draw from
            return
        if not scannable(loader):
            if is_lockstep(trainer):
                raise ValueError(
                    f"{type(self).__name__}: under {type(trainer.strategy).__name__} every rank explains the same "
                    "probe samples in lockstep, and this run's validation data is a stream (no indexable dataset), "
                    "whose batches differ from rank to rank. Give the callback probe=ProbeSet(inputs, labels), the "
                    "same on every rank, or validate on a map-style Dataset."
                )
            self._from_stream = True  # never iterate a stream ourselves: it may be one-shot
            return
        scan = self._scan(trainer, loader)
        if len(scan) == 0:
            raise ValueError(
                f"{type(self).__name__}: the validation dataloader yields no samples (check its sampler and "
                "limit_val_batches), so there is nothing to draw probe samples from."
            )
        with torch.inference_mode(False):
            probe = self._shared(
                trainer,
                "probes",
                (id(scan), self.num_samples),
                lambda: broadcast_from_zero(trainer, lambda: scan.load(scan.select(self.num_samples))),
            )
        self._accept_probe(probe)

    def _accept_probe(self, probe: ProbeSet) -> None:
        if len(probe) < self.num_samples:
            rank_zero_warn(
                f"{type(self).__name__}: asked for num_samples={self.num_samples} but the validation data "
                f"holds only {len(probe)}; using {len(probe)}."
            )
        if self._needs_labels() and not probe.has_labels:
            raise ValueError(
                f"{self._labels_reason()}, but the validation batches carry no labels: a (batch,) or (batch, K) "
                "tensor after the inputs in a tuple, or under a key such as 'label', 'target' or 'y' in a dict. Pass "
                "data=DataDescription(batch_parser=...) that returns (inputs, labels, masks), or give "
                "probe=ProbeSet(inputs, labels)."
            )
        self.probe = probe

    def _probe_from_stream(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Draw from the stream batches kept during this validation; during the sanity check, when they are too
        few, only check the model on them (errors still come before training) and keep collecting."""
        context = active_context(trainer)
        if context is None or not context.stream:
            return False
        held = sum(part.inputs.shape[0] for part in context.stream)
        with torch.inference_mode(False):
            probe = ProbeSet.from_batches(list(context.stream), self.num_samples, pool_factor=POOL_FACTOR)
        if trainer.sanity_checking and held < POOL_FACTOR * self.num_samples:
            if not self._prepared:  # the model's checks on the few samples seen so far; the probe comes later
                self._provisional = True
                try:
                    self._get_ready(trainer, pl_module, probe)
                finally:
                    self._provisional = False
                self._prepared = False  # checked again, all of it, on the probe set itself
            return False
        self._accept_probe(probe)
        if not any(
            isinstance(callback, InterpCallback) and callback._from_stream and callback.probe is None
            for callback in trainer.callbacks
        ):  # every callback has its probe: the kept batches can go
            context.stream.clear()
            context.stream_seen.clear()
        return True

    def _restore_probe(self, trainer: pl.Trainer) -> None:
        """Re-read a checkpoint's probe samples by dataset index and check them against their fingerprint."""
        saved, self._pending_probe = self._pending_probe, None
        assert saved is not None
        loader = self._current_loader(trainer)
        if not scannable(loader):
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint names its probe samples by dataset index, but this run's "
                "validation data is not an indexable dataset; drawing a new probe set."
            )
            self._restart_comparisons()
            return
        indices = saved["indices"]
        dataset_size = len(loader.dataset)
        scan = self._scan(trainer, loader)
        if not (indices.numel() and int(indices.max()) < dataset_size):
            change = f"the dataset now holds {dataset_size} samples, fewer than the saved indices need"
        elif not bool(torch.isin(indices, scan.indices).all()):
            change = "some saved samples are no longer among those the trainer validates on (a new split?)"
        else:
            key = (id(scan), "indices", tuple(indices.tolist()))
            with torch.inference_mode(False):
                load = lambda: broadcast_from_zero(trainer, lambda: scan.load(indices))  # noqa: E731
                probe = self._shared(trainer, "probes", key, load)
            if probe.matches(saved["fingerprint"]):
                self._accept_probe(probe)
                return
            change = "the samples at the saved dataset indices differ from the saved ones"
        rank_zero_warn(
            f"{type(self).__name__}: the validation data changed since the checkpoint was saved: {change}. "
            "Drawing a new probe set: stability, CKA against earlier epochs and the evolution strips start over."
        )
        self._restart_comparisons()

    def _restart_comparisons(self) -> None:
        """Forget what compares this run with earlier epochs (when the probe samples had to change)."""
        self.probe = None

    def _trace(self, trainer: pl.Trainer, model: nn.Module, example: Tensor) -> ModelTrace:
        """The run's one dry-forward trace of ``model`` for inputs like ``example`` (shared by the callbacks): the
        first probe sample, with its other model inputs."""
        model = first_rows(model, example.shape[0])
        extras = (tuple(model.extras), model.next_token) if isinstance(model, BoundInputs) else ()
        key = (
            id(unwrapped(model)),  # the model itself (not a view, nor FSDP1's root view): a long-lived object: the
            # views are made afresh, and an id reused on one rank only would change how many forwards run there
            id(self.forward_fn),
            extras,
            tuple(example.shape[1:]),
            example.dtype,
            example.device,
        )
        return self._shared(trainer, "traces", key, lambda: self._traced(model, example))

    def _traced(self, model: nn.Module, example: Tensor) -> ModelTrace:
        try:
            return trace_model(model, example)
        except Exception as error:
            several = self.probe is not None and bool(self.probe.more_inputs)
            arguments = "inputs" if not several else ", ".join(f"input{i}" for i in range(len(self.probe.all_inputs)))
            how = f"forward_fn(model, {arguments})" if self.forward_fn is not None else f"model({arguments})"
            note = getattr(error, "add_note", None)
            if note is not None:
                note(
                    f"({type(self).__name__} called the model as {how} with "
                    f"{'a first input' if several else 'probe inputs'} of shape "
                    f"{tuple(example.shape)} and dtype {example.dtype}, and the call failed as above. If the model's "
                    "forward takes something else (the whole batch, keyword arguments), pass forward_fn=lambda "
                    f"model, {arguments}: ... that calls it on {'them' if several else 'an inputs tensor'}; if the "
                    "inputs are not what the model expects, pass data=DataDescription(batch_parser=...) or "
                    "probe=ProbeSet(...). A model of several inputs, model(image, table), takes batches with the "
                    "inputs nested, ((image, table), label).)"
                    + (
                        " This callback's inputs come from the ProbeSet given to it as probe=...: check that they "
                        "have the form of a validation batch's inputs."
                        if self._given_probe
                        else ""
                    )
                )
            raise

    def _shared(self, trainer: pl.Trainer, cache: str, key: tuple, make: Callable[[], T]) -> T:
        """``make()`` once per run for every callback asking the same ``key`` of ``cache`` (made afresh outside a
        run, e.g. a method called by hand)."""
        context = active_context(trainer)
        return make() if context is None else context.once(cache, key, make)

    def _submit(self, trainer: pl.Trainer, job: Callable[[], None]) -> None:
        """Hand a drawing-and-logging job to the run's worker; run it now when background drawing is off or
        outside a run (a method called by hand: no thread may start that nothing would stop)."""
        if not getattr(trainer, "is_global_zero", True):  # in lockstep every rank computes; rank zero alone draws
            return
        context = active_context(trainer)
        if context is None:
            job()
            return
        prepare_loggers(trainer)
        context.worker.submit(job, inline=not self.background_drawing)

    def _automatic_cam_layer(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        probe: ProbeSet,
        target: Tensor | None,
        output_transform: Callable[[Any], Tensor] | None,
    ) -> str:
        """The layer ``GradCAMCallback(layer="auto")`` would choose, found on the run's shared dry forward (for a
        callback that runs a CAM method without a layer: chosen once per fit, not at every call)."""
        example = self._example_input(pl_module, probe)
        two = self._device_inputs(trainer, pl_module, probe.inputs[:2]).to(example.dtype)
        with self._model_context(trainer):
            layer = find_target_layer(
                first_rows(pl_module, two.shape[0]),
                two,
                trace=self._trace(trainer, pl_module, example),
                target=None if target is None else target[:2].to(two.device),
                output_transform=output_transform,
            )
        self._refuse_layers_blind_to_the_first_input(trainer, pl_module, probe, [layer], automatic=True)
        return layer

    def _refuse_layers_blind_to_the_first_input(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        probe: ProbeSet,
        layers: Sequence[str],
        *,
        automatic: bool,
    ) -> None:
        """A model of several inputs: refuse a CAM layer whose output does not change with the first input (the one
        its maps are drawn over, and sized to), e.g. a layer of a second image's branch."""
        if not probe.more_inputs or not probe.inputs.is_floating_point():
            return
        rows = probe.subset(min(2, len(probe)))
        view = self._explained(pl_module, rows)
        inputs = self._device_inputs(trainer, pl_module, rows.inputs)
        blind = []
        with self._model_context(trainer):
            for layer in layers:
                before = layer_output(view, layer, inputs)
                after = layer_output(view, layer, inputs + 1)
                if isinstance(before, Tensor) and isinstance(after, Tensor) and torch.equal(before, after):
                    blind.append(layer)
        if blind:
            how = f"layer='auto' chose {blind[0]!r}, which does" if automatic else f"the layer(s) {blind} do"
            raise ValueError(
                f"{type(self).__name__}: {how} not see the model's first input (of shape "
                f"{tuple(probe.inputs.shape[1:])}), the one the maps are drawn over: in this model of "
                f"{len(probe.all_inputs)} inputs it belongs to another input's branch. Name a layer of the first "
                "input's branch (layer='...'), or put the input to explain first in the batches."
            )

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

    def _probe_inputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet | None = None
    ) -> Tensor:
        """The probe inputs on the model's device, in the trainer's input precision."""
        probe = self.probe if probe is None else probe
        assert probe is not None
        return self._device_inputs(trainer, pl_module, probe.inputs)

    def _device_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        """Host ``inputs`` on the model's device (copied asynchronously from pinned memory to a GPU), converted by
        the trainer's precision plugin."""
        device = pl_module.device
        context = active_context(trainer)
        host = inputs if context is None else context.host_copy(inputs, device)
        moved = host.to(device, non_blocking=host.is_pinned())
        plugin = getattr(trainer, "precision_plugin", None)
        return plugin.convert_input(moved) if plugin is not None else moved


_COMPILED_NOTE = (
    "lightning-interp: the model is compiled with torch.compile; its explanations and features are computed by "
    "running the same modules and weights eagerly (torch.compiler.set_stance('force_eager')), because hooks added "
    "after compilation never fire in a compiled graph. Training itself stays compiled."
)


def _is_compiled(pl_module: nn.Module) -> bool:
    """Whether the module, or one of its sub-modules, runs through torch.compile."""
    if compiled_by_lightning(pl_module):  # Lightning's unwrapped torch.compile(lightning_module)
        return True
    return any(type(module).__name__ == "OptimizedModule" for module in pl_module.modules())


_NO_DESCRIPTION = DataDescription()


def _shared_description(callback: InterpCallback, trainer: pl.Trainer) -> DataDescription | None:
    """The data description given to the lightning-interp callbacks of ``trainer`` (for ``callback`` when it has
    none): the one given, or None when none or several different ones are."""
    given = [
        other._given_data
        for other in trainer.callbacks
        if isinstance(other, InterpCallback) and other._given_data is not None
    ]
    distinct = {id(description): description for description in given}
    if len(distinct) > 1 and any(description != given[0] for description in given):
        if callback._given_data is None:
            rank_zero_warn(
                f"{type(callback).__name__} has no data=DataDescription(...) and the other lightning-interp callbacks "
                "were given different ones, so it uses none (class indices, token ids): give it its own."
            )
        return None
    return given[0] if given else None


def refuse_unknown_arguments(callback: object, unknown: dict[str, Any]) -> None:
    """Refuse the keyword arguments a callback's constructor caught in ``**unknown`` (it takes them only to answer
    better than Python would): a 0.1 name with what to write instead, anything else as Python's own TypeError."""
    if unknown:
        kind = type(callback)
        refuse_moved_arguments(kind, unknown, _accepted_arguments(kind))
        raise TypeError(f"{kind.__name__}.__init__() got an unexpected keyword argument {next(iter(unknown))!r}")


def _accepted_arguments(kind: type) -> set[str]:
    """The names ``kind``'s constructor takes, following its ``**kwargs`` down the classes it passes them to (a
    ``**unknown`` catches names only to refuse them)."""
    names: set[str] = set()
    for klass in kind.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self")
        if not any(p.kind == p.VAR_KEYWORD and p.name == "kwargs" for p in parameters):
            break
    return names


def _refuse_name_clash(callback: InterpCallback, trainer: pl.Trainer) -> None:
    """Two callbacks of one class and name in one Trainer: say to pass ``name=``. Lightning refuses them first, in
    ``Trainer.__init__``, with its own message about ``state_key`` (a test checks that it still does); this check, at
    ``setup``, covers callbacks added to ``trainer.callbacks`` afterwards, from the public list only."""
    for other in trainer.callbacks:
        if other is not callback and type(other) is type(callback) and getattr(other, "name", None) == callback.name:
            kind = type(callback).__name__
            raise ValueError(
                f"Two {kind}s named {callback.name!r} are in one Trainer. Their TensorBoard tags "
                f"(interp_{callback.name}/...) and checkpoint state would collide: give each its own name, e.g. "
                f"{kind}(..., name='{callback.name}_2')."
            )


def _run_before_weight_averaging(trainer: pl.Trainer) -> None:
    """Put every lightning-interp callback before the first ``WeightAveraging`` callback in ``trainer.callbacks``.

    Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (``EMAWeightAveraging``, ...) swaps the
    averaged weights into the model at ``on_validation_epoch_start`` and the trained ones back at
    ``on_validation_epoch_end``, the hook where the lightning-interp callbacks work: one listed after it would explain
    the trained weights while validation scored the averaged ones. Hooks are called in the order of
    ``trainer.callbacks`` at the time of each call, and Lightning sorts that list (checkpoint callbacks last) before
    the callbacks' ``setup`` only, so the order set here holds for the run. The other callbacks keep their relative
    order; a new list is assigned (the ``setup`` loop in progress goes on over the old one, each callback once).
    Idempotent: every lightning-interp callback's ``setup`` calls it, the first one reorders and says so in the log.
    ``StochasticWeightAveraging`` swaps nothing at validation (it copies its average in when training ends), so it is
    left alone.
    """
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning before 2.5 has no WeightAveraging
        return
    callbacks = list(trainer.callbacks)
    first = next((i for i, callback in enumerate(callbacks) if isinstance(callback, WeightAveraging)), None)
    if first is None:
        return
    late = [callback for callback in callbacks[first + 1 :] if isinstance(callback, InterpCallback)]
    if not late:
        return
    moved = {id(callback) for callback in late}
    trainer.callbacks = [*callbacks[:first], *late, *(c for c in callbacks[first:] if id(c) not in moved)]
    averaging = type(callbacks[first]).__name__
    rank_zero_info(
        f"lightning-interp: {', '.join(type(callback).__name__ for callback in late)} now run before {averaging} in "
        f"trainer.callbacks, so that they explain the averaged weights validation uses ({averaging} swaps them in at "
        "each validation epoch's start and back at its end, where these callbacks work); the other callbacks keep "
        "their order."
    )


def _check_finite_inputs(callback: Callback, probe: ProbeSet) -> None:
    """Refuse probe samples holding NaN or inf: every map, feature and score of them would be NaN."""
    values = [value.reshape(len(probe), -1) for value in probe.all_inputs if value.is_floating_point()]
    if not values:
        return
    bad = (~torch.isfinite(torch.cat(values, dim=1))).any(dim=1).nonzero().flatten()
    if bad.numel():
        where = f" (dataset indices {probe.indices[bad].tolist()[:8]})" if probe.indices is not None else ""
        raise ValueError(
            f"{type(callback).__name__}: {bad.numel()} of the {len(probe)} probe samples hold NaN or inf values: rows "
            f"{bad.tolist()[:8]}{where}. Their maps, features and scores would all be NaN (and a linear probe's "
            "accuracy over every sample). Clean or drop those samples in the validation data, or pass "
            "probe=ProbeSet(...) without them."
        )


MORE_INPUT = "input "
"""The key prefix of a view's bound inputs after the first (``"input 1"``, ...), passed by position."""


def _with_more_inputs(forward_fn: Callable[..., Any] | None, count: int) -> Callable[..., Any]:
    """How a :class:`BoundInputs` view calls a model of several inputs: the explained input first, then the bound
    inputs ``"input 1"``, ... in order (positionally), then the keyword inputs; through ``forward_fn(model, x,
    *more, **keywords)`` when one is given."""

    def call(network: nn.Module, x: Tensor, **bound: Any) -> Any:
        more = [bound.pop(f"{MORE_INPUT}{position}") for position in range(1, count + 1)]
        if forward_fn is not None:
            return forward_fn(network, x, *more, **bound)
        return network(x, *more, **bound)

    return call


class AllInputs(ForwardWith):
    """A model of several inputs called on its explained inputs first, then the others: ``AllInputs(view, order)(
    *values)`` calls ``view``'s model with each value where ``order`` puts it (an int: the model's positional
    argument at that position; a str: the keyword input of that name), as the view would. The methods explain the
    first values together (:func:`~lightning_interp.methods.attribute` with a tuple) and pass the rest as
    ``additional_forward_args``, each row following its sample."""

    def __init__(self, view: BoundInputs, order: Sequence[int | str]) -> None:
        super().__init__(view.model, view.call)  # type: ignore[arg-type]
        object.__setattr__(self, "order", tuple(order))
        object.__setattr__(self, "input_key", view.input_key)

    def forward(self, *values: Tensor) -> object:  # type: ignore[override]
        placed = dict(zip(self.order, values, strict=True))
        first = placed.pop(0)
        bound = {f"{MORE_INPUT}{key}" if isinstance(key, int) else key: value for key, value in placed.items()}
        if self.forward_fn is not None:
            return self.forward_fn(self.model, first, **bound)
        if self.input_key is not None:
            return self.model(**{self.input_key: first}, **bound)
        return self.model(first, **bound)


@dataclass(frozen=True)
class JointInputs:
    """A model of several inputs, ready to explain its floating-point inputs together (see :func:`several_inputs`)."""

    model: AllInputs
    """Called on ``(*explained, *others)``."""
    explained: tuple[Tensor, ...]
    """The floating-point inputs, ``first`` first: (B, ...) each."""
    inputs: tuple[int | str, ...]
    """Which input each explained one is: its position among the model's positional arguments (0 for ``first``),
    or its keyword (a dict batch's key)."""
    others: tuple[Tensor, ...]
    """The other inputs (integer ids, masks): one row per sample each, passed as ``additional_forward_args``."""


def several_inputs(view: nn.Module, first: Tensor) -> JointInputs | None:
    """For a view bound to the other inputs of a model of several inputs (see ``_explained``): the model taking
    every floating-point input (the explained ones, ``first`` first; a keyword input whose name ends in ``mask`` is
    never explained) then the others, with those inputs; None when ``first`` is the only floating-point input or is
    not floating point (token ids: the first alone is explained, at its embedding)."""
    if not isinstance(view, BoundInputs) or view.next_token or not first.is_floating_point():
        return None
    count = sum(key.startswith(MORE_INPUT) for key in view.extras)
    values: dict[int | str, Tensor] = {0: first}
    values |= {position: view.extras[f"{MORE_INPUT}{position}"] for position in range(1, count + 1)}
    values |= {key: value for key, value in view.extras.items() if not key.startswith(MORE_INPUT)}

    def explained_input(key: int | str, value: Tensor) -> bool:
        return value.is_floating_point() and not (isinstance(key, str) and key.lower().endswith("mask"))

    explained = [key for key, value in values.items() if explained_input(key, value)]
    if len(explained) < 2:
        return None
    others = [key for key in values if key not in explained]
    return JointInputs(
        AllInputs(view, [*explained, *others]),
        tuple(values[key] for key in explained),
        tuple(explained),
        tuple(values[key] for key in others),
    )


def unwrapped(model: nn.Module) -> nn.Module:
    """The model itself, also when seen through ``forward_fn`` (:class:`ForwardWith`), bound to other inputs, or
    through FSDP1's root wrapper (:class:`ThroughRoot`)."""
    while isinstance(model, ForwardWith):
        model = model.model
    return model


def first_rows(model: nn.Module, count: int) -> nn.Module:
    """``model`` (a view bound to some samples' other inputs, or not) for the first ``count`` of those samples."""
    if isinstance(model, BoundInputs) and model.samples not in (None, count):
        return model.rows(slice(0, count))
    return model


def model_pad_id(model: nn.Module) -> int | None:
    """The padding token id a HuggingFace model's config names (``config.pad_token_id``), or None."""
    for module in model.modules():
        pad = getattr(getattr(module, "config", None), "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
            return pad
    return None


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is not None:
        return parameter.device
    return getattr(model, "device", torch.device("cpu"))


@dataclass(frozen=True)
class ModelCall:
    """How the callbacks call the model on probe inputs from dict batches: the keyword of the inputs (None:
    positionally) and the batch keys passed along with them."""

    input_key: str | None
    keys: tuple[str, ...]
    next_token: bool = False
    """The model is a causal language model: its (B, T, V) logits are read at each text's last real token."""


def _builds_in_configure_model(pl_module: pl.LightningModule) -> bool:
    """Whether the module builds layers in ``configure_model()`` (or its legacy name), after the callbacks' setup."""
    return any(is_overridden(hook, pl_module) for hook in ("configure_model", "configure_sharded_model"))


def parse_layer_names(layers: str | Sequence[str], option: str) -> list[str]:
    """Check a ``layer(s)`` argument: ``"auto"`` (returned as ``[]``) or distinct dotted module names."""
    if isinstance(layers, nn.Module) or (
        isinstance(layers, (list, tuple)) and any(isinstance(n, nn.Module) for n in layers)
    ):
        raise TypeError(
            f"{option} takes dotted module names such as 'net.3' (from model.named_modules()), not module objects: "
            "a name is what checkpoints and LightningCLI configs can hold."
        )
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{option} must be 'auto', a dotted module name or a list of names, got {layers!r}.")
    if "auto" in names and len(names) > 1:
        raise ValueError(f"{option}='auto' cannot be combined with layer names.")
    if len(set(names)) != len(names):
        raise ValueError(f"{option} lists a name twice: {names}.")
    return [] if names == ["auto"] else names


def parse_names(names: Sequence[str] | None, option: str) -> list[str] | None:
    """Check a list-of-names argument (``class_names``, ``feature_names``, ``vocabulary``): None or a list of
    strings (a bare string would be read letter by letter)."""
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{option} must be a list of strings, got {names!r}.")
    return list(names)


def class_name(class_names: Sequence[str] | None, k: int) -> str:
    """Class ``k``'s name where ``class_names`` has a usable one (no '/', which would split a tag), else ``str(k)``."""
    if class_names and 0 <= k < len(class_names) and "/" not in class_names[k]:
        return class_names[k]
    return str(k)
