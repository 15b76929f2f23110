"""MapCallback: the shared part of callbacks that log per-sample maps (saliency, Grad-CAM).

A subclass implements :meth:`MapCallback._explain`, which turns the probe set
into named (N, H, W) maps; scores, pictures, evolution strips and their state
live here, the schedule and probe handling in :class:`InterpCallback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_interp._logging import log_image, logging_step, to_host
from lightning_interp.callbacks._base import InterpCallback, parse_layer_names, refuse_unknown_arguments
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.methods import (
    METHODS,
    BoundInputs,
    OutputTransform,
    TaskOption,
    check_method_options,
    class_labels,
    concentration,
    infer_task,
    localization,
    pointing_game,
    prediction_and_confidence,
    rank_correlation,
    scores_from_output,
)
from lightning_interp.options import DataDescription, Display
from lightning_interp.probe import ProbeSet, labels_of_the_data
from lightning_interp.visualize import (
    input_to_rgb,
    is_signal_input,
    map_tiles,
    render_feature_rows,
    render_grid,
    render_signals,
    render_tokens,
)

TargetSpec = Literal["pred", "label"] | int

HISTORY_SIZE = 64  # longest side of the maps kept for evolution strips
MAX_GRID_ROWS = 32  # probe samples drawn in the per-epoch grid (scores cover all of them)


@dataclass
class Explanation:
    """What one run of a map callback produced on the probe set.

    Attributes:
        maps: name -> (N, H, W) float32 map on the model's device, in display order.
        scores: (N, C) class scores of the probe samples (any device).
        target: (N,) explained class per sample (any device).
        scalars: extra scalars by tag suffix (e.g. IG completeness error): floats, or 0-d tensors on any device
            (brought to the host with the run's other scalars, in one transfer).
        signed: names of maps with meaningful sign (shown with a diverging colormap).
        titles: optional display titles of the maps (default: their names).
        extra: further per-sample maps for a subclass's own pictures (not scored), e.g. one map per attention head.
    """

    maps: dict[str, Tensor]
    scores: Tensor
    target: Tensor
    scalars: Mapping[str, Tensor | float] = field(default_factory=dict)
    signed: set[str] = field(default_factory=set)
    titles: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)


class MapCallback(InterpCallback):
    """Base class of callbacks that log per-sample maps of a fixed probe set.

    Args:
        name: tag prefix (``interp_<name>/...``) and part of the checkpoint
            ``state_key``; give two instances different names.
        num_samples: probe samples to draw when ``probe`` is None.
        every_n_epochs: run at validation epochs whose number (1-based) is a
            multiple of this.
        target: ``"pred"`` (the prediction), ``"label"`` (needs labels) or a
            fixed class index (output index for a regression). For a binary
            model (one logit), ``"pred"`` explains the predicted side: for a
            negative prediction, what makes the logit more negative.
        task: the output kind: ``"multiclass"`` (softmax over C scores),
            ``"binary"`` (one logit, sigmoid), ``"multilabel"`` (C independent
            sigmoids, multi-hot labels; ``"pred"`` explains the top label) or
            ``"regression"`` (explains the output). ``"auto"`` (the default)
            infers it from the output's width and the labels, and asks for it
            where they do not tell (one output and no labels).
        probe: a ready :class:`ProbeSet` (share one between callbacks so
            their rows line up), or None to draw one from the first
            validation dataloader.
        output_transform: picks the (B, C) class scores out of the model's
            output when it is not a plain tensor.
        data: what the data is (:class:`~lightning_interp.options.DataDescription`: class names; for token
            inputs the vocabulary or decode function and the padding id, whose tokens are hidden and get zero map
            values; feature names of (N, F) inputs; a batch parser), given once for every callback of the run.
        display: how the grids look (:class:`~lightning_interp.options.Display`: colormap, evolution strip,
            rows per image, background drawing).
        forward_fn: how to call the model on a batch of probe inputs,
            ``forward_fn(model, inputs)`` (see :class:`~lightning_interp.callbacks.InterpCallback`).
    """

    later_metrics = ("stability",)
    display_fields = ("background_drawing", "cmap", "evolution_samples", "evolution_columns", "rows_per_image")

    def __init__(
        self,
        *,
        name: str,
        num_samples: int = 8,
        every_n_epochs: int = 1,
        target: TargetSpec = "pred",
        task: TaskOption = "auto",
        probe: ProbeSet | None = None,
        output_transform: OutputTransform | None = None,
        data: DataDescription | None = None,
        display: Display | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
        **unknown: Any,
    ) -> None:
        refuse_unknown_arguments(self, unknown)  # a 0.1 name: what to write instead
        if not (target in ("pred", "label") or (isinstance(target, int) and not isinstance(target, bool))):
            raise ValueError(f"target must be 'pred', 'label' or a class index (int), got {target!r}.")
        if isinstance(target, int) and target < 0:
            raise ValueError(f"A fixed target class must be >= 0, got {target}.")
        self.target = target
        self.task = task
        self._task: str | None = None  # the kind in force for this run (``task``, or inferred at fit start)
        self._labels_fit = True  # whether the probe labels fit the output kind (shown on the grid)
        super().__init__(
            name=name,
            num_samples=num_samples,
            every_n_epochs=every_n_epochs,
            probe=probe,
            data=data,
            display=display,
            forward_fn=forward_fn,
        )
        check_arguments(task=task, output_transform=output_transform)
        self.output_transform = output_transform
        self._previous: dict[str, Tensor] = {}
        self._history: list[tuple[int, dict[str, Tensor]]] = []
        self._warned_zero: set[str] = set()
        self._label_chars = 0  # the row-label width the grids of this fit use (drawn on the worker thread only)

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        raise NotImplementedError

    @property
    def vocabulary(self) -> tuple[str, ...] | None:
        return self.data.vocabulary  # type: ignore[return-value]

    @property
    def decode(self) -> Callable[[int], str] | None:
        return self.data.decode

    @property
    def feature_names(self) -> tuple[str, ...] | None:
        return self.data.feature_names  # type: ignore[return-value]

    @property
    def last_maps(self) -> dict[str, Tensor]:
        """The maps of every probe sample from the last run, by map name: (N, H, W) or (N, T) float32 on the CPU.

        Empty before the first run. Rows follow the probe set (``callback.probe``).
        """
        return {key: value.float().cpu() for key, value in self._previous.items()}

    @property
    def output_task(self) -> str:
        """The output kind in force: the ``task`` option, or what ``"auto"`` inferred at fit start."""
        return self._task or (self.task if self.task != "auto" else "multiclass")

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Check now, not at the first validation epoch, that the inputs can be shown as maps and that the
        model's output gives class scores for every target."""
        if probe.inputs.ndim not in (2, 3, 4):
            raise ValueError(
                f"{type(self).__name__} draws a map per sample for images (N, C, H, W), signals (N, C, T) or "
                f"feature vectors (N, D); the probe inputs have shape {tuple(probe.inputs.shape)}. For video or "
                "volumes, pass data=DataDescription(batch_parser=...) (or probe=ProbeSet(...)) that gives one of "
                "these forms, e.g. a frame."
            )
        name = type(self).__name__
        if self.vocabulary is not None and is_token_input(probe.inputs):
            largest = int(probe.inputs.max())
            if largest >= len(self.vocabulary):
                raise ValueError(
                    f"{name}: the probe inputs hold token id {largest}, but the vocabulary has {len(self.vocabulary)} "
                    f"entries (ids 0 to {len(self.vocabulary) - 1}): pass the full vocabulary, or "
                    "DataDescription(decode=...)."
                )
        if self.feature_names is not None and (
            probe.inputs.ndim != 2 or len(self.feature_names) != probe.inputs.shape[1]
        ):
            raise ValueError(
                f"{name}: feature_names has {len(self.feature_names)} names, but the probe inputs have shape "
                f"{tuple(probe.inputs.shape)}; give one name per feature of (N, F) inputs."
            )
        if probe.masks is not None and probe.inputs.ndim == 4 and probe.masks.shape[-2:] != probe.inputs.shape[-2:]:
            raise ValueError(
                f"{name}: the probe masks are {tuple(probe.masks.shape[-2:])} but the inputs "
                f"{tuple(probe.inputs.shape[-2:])}; localization and the pointing game compare maps and masks pixel "
                "by pixel on the inputs' grid. Resize the masks to the inputs (nearest neighbour), or build the "
                "ProbeSet without masks."
            )
        trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
        outputs = scores_from_output(trace.output, self.output_transform).shape[1]
        self._labels_fit = True
        try:
            task = infer_task(outputs, labels_of_the_data(probe), self.task)
        except ValueError as error:
            if self.target == "label" or probe.labels is None:
                raise ValueError(f"{name}: {error}") from None
            try:  # the prediction needs no labels: read the kind from the output alone, and say so
                task = infer_task(outputs, None, self.task)
            except ValueError:
                raise ValueError(f"{name}: {error}") from None
            self._labels_fit = False
            if not self._provisional:
                rank_zero_warn(
                    f"{name}: {error} The maps explain the prediction (target={self.target!r}), which needs no labels, "
                    f"so the output is read as {task} from its width alone and the grid leaves the labels out; pass "
                    "task=... to say what the output is, or data=DataDescription(batch_parser=...) to give the labels."
                )
        indices = 2 if task == "binary" else outputs  # a binary model's targets are its two sides, 0 and 1
        if isinstance(self.target, int) and self.target >= indices:
            what = ("output", "outputs") if task == "regression" else ("class", "classes")
            raise ValueError(
                f"{name}: target={self.target} is not a {what[0]} index of this {task} model ({indices} {what[1]}: 0 "
                f"to {indices - 1})."
            )
        if self.target == "label" and task in ("multilabel", "regression"):
            raise ValueError(
                f"{name}(target='label') explains the labelled class, but this is a {task} model: "
                + (
                    "a sample has several labels. Use target='pred' (each sample's top predicted label) or a class "
                    "index."
                    if task == "multilabel"
                    else "its labels are values, not outputs to pick. Use target='pred' or an output index."
                )
            )
        if self.target == "pred" and task == "regression" and outputs > 1:
            raise ValueError(
                f"{name}: a regression with {outputs} outputs; say which one to explain with target=<index> "
                f"(0 to {outputs - 1})."
            )
        self._task = task

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Explain two probe samples as a run would (in the trainer's precision), logging nothing."""
        sample = probe.subset(min(2, len(probe)))
        inputs = self._probe_inputs(trainer, pl_module, sample)
        with self._model_context(trainer):
            result = self._explain(self._explained(pl_module, sample), inputs, self._target_for(sample, inputs.device))
        for key, maps in result.maps.items():
            if maps.shape[0] != len(sample) or maps.ndim not in (2, 3):
                raise RuntimeError(f"{type(self).__name__}: the maps of {key!r} have shape {tuple(maps.shape)}.")

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._previous, self._history = {}, []
        self._warned_zero = set()
        self._task = None
        self._label_chars = 0

    def _zero_map_reason(self, key: str) -> str:
        """Why the maps of ``key`` can be zero everywhere (shown in the warning)."""
        return "the target scores do not change with it (saturated outputs or dead units)."

    def _restart_comparisons(self) -> None:
        super()._restart_comparisons()
        self._previous, self._history = {}, []

    def _needs_labels(self) -> bool:
        return self.target == "label"

    def _labels_reason(self) -> str:
        return f"{type(self).__name__}(target='label') needs labels (use target='pred' otherwise)"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.is_global_zero
            and self._history
            and self.evolution_samples > 0
            and self.probe is not None
            and (self.evolution_columns > 0)
        ):
            history, step = list(self._history), self._summary_step(trainer)
            inputs = self._shown_inputs(self.probe)[self._evolution_indices()]
            for key in self._history[-1][1]:
                tag = f"interp_{self.name}/{key}/evolution"

                def job(key: str = key, tag: str = tag) -> None:
                    image = self._evolution_image(key, history, inputs)
                    if image is not None:
                        log_image(trainer, tag, image, step)

                self._submit(trainer, job)
        super().on_fit_end(trainer, pl_module)  # drains the worker

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        previous = {key: maps.cpu() for key, maps in self._previous.items()}  # checkpoints load anywhere
        state.update(previous=previous, history=list(self._history))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._previous = dict(state_dict.get("previous", {}))
        self._history = list(state_dict.get("history", []))

    def _target_for(self, probe: ProbeSet, device: torch.device) -> Tensor | int | None:
        if self.target == "pred":
            return None
        if self.target == "label":
            if probe.labels is None:
                raise ValueError(f"{type(self).__name__}(target='label') needs a probe set with labels.")
            return class_labels(probe.labels, self.output_task).to(device)
        return int(self.target)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        probe = self.probe
        assert probe is not None
        inputs = self._probe_inputs(trainer, pl_module)
        with self._model_context(trainer):
            result = self._explain(pl_module, inputs, self._target_for(probe, inputs.device))
        maps = {key: value.float() for key, value in result.maps.items()}  # AMP: float32 before any scoring
        scores = self._scores(maps, result.signed, probe)
        device = next(iter(maps.values())).device if maps else torch.device("cpu")
        for key, value in result.scalars.items():  # the methods' own scalars join the one transfer below
            scores[f"interp_{self.name}/{key}"] = torch.as_tensor(value, dtype=torch.float64, device=device)
        flags = [torch.stack([torch.isfinite(m).all(), (m != 0).any()]).double() for m in maps.values()]
        numbers = torch.cat([*flags, *(v.double().reshape(1) for v in scores.values())]).tolist() if maps else []
        checks = [(bool(numbers[2 * i]), bool(numbers[2 * i + 1])) for i in range(len(maps))]  # one transfer in all
        broken = [key for key, (finite, _) in zip(maps, checks, strict=True) if not finite]
        if broken:
            rank_zero_warn(
                f"{type(self).__name__}: the maps of {broken} hold NaN or inf at epoch {trainer.current_epoch} "
                "(non-finite activations or gradients in the model); their scores are logged as NaN."
            )
        for key, (finite, nonzero) in zip(maps, checks, strict=True):
            if finite and not nonzero and key not in self._warned_zero:
                self._warned_zero.add(key)
                rank_zero_warn(
                    f"{type(self).__name__}: every map of {key!r} is zero at epoch {trainer.current_epoch}: "
                    f"{self._zero_map_reason(key)} Its concentration, stability and localization are logged as NaN "
                    "while this lasts (this warning is given once per run)."
                )
        step = logging_step(trainer)
        scalars = dict(zip(scores, numbers[2 * len(maps) :], strict=True))
        for key, (finite, nonzero) in zip(maps, checks, strict=True):
            warned = f"{key} (no positive part)"
            value = scalars.get(f"interp_{self.name}/{key}/concentration", 0.0)
            if finite and nonzero and key in result.signed and math.isnan(value) and warned not in self._warned_zero:
                self._warned_zero.add(warned)
                rank_zero_warn(
                    f"{type(self).__name__}: the signed maps of {key!r} are negative or zero everywhere in every probe "
                    f"sample at epoch {trainer.current_epoch}; concentration and localization read the positive part "
                    "(the evidence for the target), so they are logged as NaN while this lasts (warned once per run)."
                )
        shown = min(len(probe), MAX_GRID_ROWS)  # scores use every sample; the picture stays readable and small
        evolution = self._evolution_maps(maps)
        device_parts = {f"map {key}": value[:shown] for key, value in maps.items()}
        device_parts |= {f"extra {key}": value[:shown].float() for key, value in result.extra.items()}
        device_parts |= {f"evolution {key}": value for key, value in evolution.items()}
        device_parts |= {"scores": result.scores[:shown].float(), "target": result.target[:shown].float()}
        host = to_host(device_parts)  # one copy to the host for the whole picture and the evolution strip
        picture = _GridData(
            inputs=self._shown_inputs(probe)[:shown],
            labels=None if probe.labels is None or not self._labels_fit else probe.labels[:shown],
            maps={key: host[f"map {key}"] for key in maps},
            scores=host["scores"],
            target=host["target"].long(),
            signed=set(result.signed),
            titles=dict(result.titles),
            task=self.output_task,
            extra={key: host[f"extra {key}"] for key in result.extra},
        )
        self._submit(trainer, lambda: self._log_grids(trainer, picture, step))
        if evolution:
            self._remember(trainer.current_epoch, {key: host[f"evolution {key}"].half() for key in evolution})
        return scalars

    def _scores(self, maps: dict[str, Tensor], signed: set[str], probe: ProbeSet) -> dict[str, Tensor]:
        """Per-map scores as 0-dim tensors where the maps are (the caller brings them to the host at once)."""
        values: dict[str, Tensor] = {}
        masks = None
        real = probe.real_tokens(self.pad_id)  # token maps are scored over the real tokens
        for key, value in maps.items():
            prefix = f"interp_{self.name}/{key}"
            positive = value.clamp_min(0) if key in signed else value
            previous = self._previous.get(key)
            if previous is not None and previous.shape != value.shape:
                previous = None
            if real is None:
                values[f"{prefix}/concentration"] = _nanmean(concentration(positive))
                if previous is not None:
                    values[f"{prefix}/stability"] = _nanmean(rank_correlation(value, previous.to(value.device)))
            else:  # per sample over its real tokens, indexed from the CPU probe (no device sync per sample)
                kept = [row.nonzero().flatten().to(value.device) for row in real]
                nothing = torch.full((1,), float("nan"), dtype=torch.float64, device=value.device)
                shares = [
                    concentration(p[i][None]) if i.numel() else nothing for p, i in zip(positive, kept, strict=True)
                ]
                values[f"{prefix}/concentration"] = _nanmean(torch.cat(shares))
                if previous is not None:
                    before = previous.to(value.device)
                    pairs = zip(value, before, kept, strict=True)
                    correlations = [rank_correlation(now[i][None], then[i][None]) for now, then, i in pairs]
                    values[f"{prefix}/stability"] = _nanmean(torch.cat(correlations))
            where = _on_mask_grid(positive, probe.masks)
            if where is not None:
                masks = probe.masks.to(value.device) if masks is None else masks
                empty = ~masks.reshape(masks.shape[0], -1).any(dim=1)  # nothing to point at (a neutral sentence)
                for metric, score in (("localization", localization), ("pointing_game", pointing_game)):
                    per_sample = score(where, masks).double()
                    per_sample = torch.where(empty, torch.full_like(per_sample, float("nan")), per_sample)
                    values[f"{prefix}/{metric}"] = _nanmean(per_sample)
            self._previous[key] = value.detach().clone()
        return values

    def _log_grids(self, trainer: pl.Trainer, picture: _GridData, step: int) -> None:
        """Draw and log the run's grid, or its parts of ``rows_per_image`` rows (on the worker thread)."""
        shown = picture.scores.shape[0]
        for tag, rows in grid_parts(f"interp_{self.name}/maps", shown, self.rows_per_image):
            log_image(trainer, tag, self._grid_image(picture, rows), step)

    def _grid_image(self, picture: _GridData, rows: range | None = None) -> np.ndarray:
        """The per-run grid of the probe ``rows`` (all by default), drawn from CPU tensors only."""
        rows = range(picture.scores.shape[0]) if rows is None else rows
        part = slice(rows.start, rows.stop)
        inputs = picture.inputs[part]
        names = self.class_names or self._next_token_names(picture.scores.shape[1])
        labels = row_texts(picture.task, picture.scores, picture.target, picture.labels, names)
        drawn = self._rows_image(
            inputs,
            {picture.titles.get(key, key): maps[part] for key, maps in picture.maps.items()},
            labels[part],
            signed=[key in picture.signed for key in picture.maps],
        )
        if drawn is not None:
            return drawn
        columns = [list(input_to_rgb(inputs))]
        floor = self._display_floor(inputs)
        for key, maps in picture.maps.items():
            cmap = "RdBu_r" if key in picture.signed else self.cmap
            columns.append(map_tiles(inputs, maps[part], cmap=cmap, signed=key in picture.signed, floor=floor))
        tiles = [list(row) for row in zip(*columns, strict=True)]
        # the widest label of every row so far, plus room for a longer confidence: the grid (and each of its
        # parts) keeps one width from run to run
        longest = max((len(line) for text in labels for line in text.splitlines()), default=0)
        self._label_chars = max(self._label_chars, longest + 1)
        titles = [picture.titles.get(key, key) for key in picture.maps]
        return render_grid(
            tiles,
            column_titles=["input", *titles],
            row_labels=labels[part],
            min_label_chars=self._label_chars,
            compact=self.rows_per_image is not None,
        )

    def _rows_image(
        self,
        inputs: Tensor,
        columns: dict[str, Tensor],
        labels: Sequence[str],
        *,
        signed: Sequence[bool] | None = None,
        title: str = "",
    ) -> np.ndarray | None:
        """The picture of inputs that are not images: text for token ids, heat rows for feature vectors, lines
        with bands for signals; one entry of ``columns`` (title -> (N, ...) maps) per line or panel. None for
        images (drawn as tiles by the caller)."""
        signs = [False] * len(columns) if signed is None else list(signed)
        titles = [text.replace("\n", " ") for text in columns]
        per_sample = [[maps[i].float().numpy() for maps in columns.values()] for i in range(inputs.shape[0])]
        headers = ["   ".join(text.splitlines()) for text in labels]
        floor = self._display_floor(inputs)
        floors = None if floor is None else floor.tolist()
        if is_token_input(inputs):
            strings = self._token_strings(inputs)
            return render_tokens(
                strings, per_sample, headers=headers, line_titles=titles, signed=signs, floors=floors, title=title
            )
        if inputs.ndim == 2:
            return render_feature_rows(
                inputs,
                per_sample,
                headers=headers,
                line_titles=titles,
                feature_names=self.feature_names,
                title=title,
                signed=signs,
                cmap=self.cmap,
                floors=floors,
            )
        if is_signal_input(inputs):
            return render_signals(
                inputs, list(columns.values()), column_titles=list(columns), row_labels=list(labels), title=title,
                signed=signs, cmap=self.cmap, floors=floors,
            )  # fmt: skip
        return None

    def _display_floor(self, inputs: Tensor) -> Tensor | None:
        """Per sample of ``inputs``, the smallest scale its maps are drawn at (None: each map's own maximum)."""
        return None

    def _token_strings(self, ids: Tensor) -> list[list[str | None]]:
        """Each token id of ``ids`` (N, T) as its string (``vocabulary``, ``decode`` or the id); padding as None."""
        return token_strings(ids, vocabulary=self.vocabulary, decode=self.decode, pad_id=self.pad_id)

    def _next_token_names(self, count: int) -> Sequence[str] | None:
        """A causal language model's classes are its tokens: their strings (from the vocabulary or ``decode``), so
        the grid says which next token is predicted and explained."""
        if self._call is None or not self._call.next_token or (self.vocabulary is None and self.decode is None):
            return None
        return _TokenNames(count, self.vocabulary, self.decode)

    def _real_tokens(self, model: nn.Module, ids: Tensor) -> Tensor | None:
        """(B, T) bool, True at the real tokens of token-id ``ids`` (on their device): the attention mask the model
        receives with them, else the ids that are not the padding id; None for other inputs or when nothing says."""
        if not is_token_input(ids):
            return None
        mask = model.extras.get("attention_mask") if isinstance(model, BoundInputs) else None
        if mask is not None and mask.shape == ids.shape:
            return mask != 0
        return None if self.pad_id is None else ids != self.pad_id

    def _evolution_maps(self, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """The evolution strip's samples of each map, shrunk where the maps are (none when the strip is off)."""
        if self.evolution_samples == 0 or self.evolution_columns == 0:
            return {}
        picks = self._evolution_indices()
        return {key: _shrink(m[picks.to(m.device)]) for key, m in maps.items()}

    def _remember(self, epoch: int, kept: dict[str, Tensor]) -> None:
        """Keep a small CPU copy of a few samples' maps for the evolution strip, bounded in length."""
        self._history.append((epoch, kept))
        if len(self._history) > 2 * self.evolution_columns:
            thinned = self._history[::2]
            if thinned[-1] is not self._history[-1]:
                thinned.append(self._history[-1])
            self._history = thinned

    def _evolution_indices(self) -> Tensor:
        """Probe rows shown in the evolution strip: evenly spread, so each class tends to appear."""
        assert self.probe is not None
        count = min(self.evolution_samples, len(self.probe))
        return torch.from_numpy(np.linspace(0, len(self.probe) - 1, count).round().astype(np.int64))

    def _evolution_image(
        self, key: str, history: list[tuple[int, dict[str, Tensor]]], inputs: Tensor
    ) -> np.ndarray | None:
        """The strip of ``key``'s maps across the epochs in ``history`` for the probe rows in ``inputs``."""
        entries = [(epoch, maps[key]) for epoch, maps in history if key in maps]
        if not entries:
            return None
        spaced = np.linspace(0, len(entries) - 1, min(len(entries), self.evolution_columns))
        chosen = [entries[i] for i in sorted({round(i) for i in spaced})]
        count = inputs.shape[0]
        drawn = self._rows_image(
            inputs,
            {f"epoch {epoch}": maps.float() for epoch, maps in chosen},
            [f"sample {int(i)}" for i in self._evolution_indices()],
            title=f"{self.name}: {key}",
        )
        if drawn is not None:
            return drawn
        size = tuple(chosen[-1][1].shape[-2:])
        small_inputs = _resize_inputs(inputs, size)
        columns = [list(input_to_rgb(small_inputs))]
        floor = self._display_floor(inputs)
        columns += [map_tiles(small_inputs, maps.float(), cmap=self.cmap, floor=floor) for _, maps in chosen]
        tiles = [[column[i] for column in columns] for i in range(count)]
        titles = ["input"] + [f"epoch {epoch}" for epoch, _ in chosen]
        return render_grid(tiles, column_titles=titles, title=f"{self.name}: {key}")


class LayerMapCallback(MapCallback):
    """A map callback of chosen layers (Grad-CAM, attention): ``layers`` names them, or is empty when they are
    chosen automatically (``auto``) on each fit's model; the choice is kept in the checkpoint."""

    layers: list[str]
    auto: bool

    def _choose_layers(self, layers: str | Sequence[str], option: str) -> None:
        self.layers = parse_layer_names(layers, option)
        self.auto = not self.layers

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        if self.auto:  # chosen again on this fit's model
            self.layers = []

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["layers"] = list(self.layers)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.auto and state_dict.get("layers"):
            self.layers = list(state_dict["layers"])


MANAGED_OPTIONS = ("generator", "output_transform", "task", "return_convergence_delta", "relu", "upsample", "reshape")
"""Method options a map callback sets itself (from its own arguments), never per method."""


def parse_methods(
    methods: str | Sequence[str | tuple[str, dict[str, Any]]],
    allowed: Sequence[str],
    owner: str,
    elsewhere: str,
    *,
    layer_option: bool = False,
) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """Check a ``methods`` argument: names or ``(name, {option: value})`` pairs of registered methods in ``allowed``.

    Returns the names in order and each method's options. Unknown names, methods that belong to another callback,
    repeated names and options a method does not take are refused with what to write instead. ``layer_option``: a
    CAM method may name its layer among its options (else the callback sets the layers).
    """

    entries = [methods] if isinstance(methods, str) else list(methods)
    names: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, chosen = entry, {}
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
            name, chosen = entry[0], dict(entry[1] or {})
        else:
            raise TypeError(
                f"{owner}(methods=...) takes method names or (name, {{option: value}}) pairs, got {entry!r}."
            )
        if name not in allowed:
            hint = f" {name!r} is for {elsewhere}." if name in METHODS else ""
            raise ValueError(f"{owner} cannot use method {name!r}.{hint} Choose from: {', '.join(allowed)}.")
        if name in names:
            raise ValueError(f"{owner}(methods=...) lists {name!r} twice.")
        check_method_options(name, chosen, managed=MANAGED_OPTIONS, layer=layer_option)
        names.append(name)
        if chosen:
            options[name] = chosen
    if not names:
        raise ValueError(f"{owner}(methods=...) needs at least one method; choose from: {', '.join(allowed)}.")
    return tuple(names), options


def _resize_inputs(inputs: Tensor, size: tuple[int, ...]) -> Tensor:
    if inputs.ndim != 4 or tuple(inputs.shape[-2:]) == size:
        return inputs
    return torch.nn.functional.interpolate(inputs.float(), size=size, mode="bilinear", align_corners=False)


def _shrink(maps: Tensor) -> Tensor:
    """The maps at most HISTORY_SIZE pixels on their longest side (shrunk where the maps are), float32."""
    maps = maps.detach().float()
    if maps.ndim == 3 and max(maps.shape[-2:]) > HISTORY_SIZE:
        scale = HISTORY_SIZE / max(maps.shape[-2:])
        size = (max(1, round(maps.shape[-2] * scale)), max(1, round(maps.shape[-1] * scale)))
        maps = torch.nn.functional.interpolate(maps[:, None], size=size, mode="area")[:, 0]
    return maps


def _on_mask_grid(maps: Tensor, masks: Tensor | None) -> Tensor | None:
    """``maps`` laid on the masks' grid: image maps (N, H, W) on (N, H, W) masks, token / feature maps (N, T) or
    signal maps (N, C, T), summed over channels, on (N, T) masks; None when they do not fit."""
    if masks is None:
        return None
    if masks.ndim == 3:
        return maps if maps.ndim == 3 and tuple(maps.shape[-2:]) == tuple(masks.shape[-2:]) else None
    if maps.shape[-1] != masks.shape[-1]:
        return None
    return maps if maps.ndim == 2 else maps.sum(dim=1) if maps.ndim == 3 else None


def _nanmean(values: Tensor) -> Tensor:
    """Mean of the finite values as a 0-dim tensor on their device; NaN when there are none (no host sync)."""
    finite = torch.isfinite(values)
    count = finite.sum()
    total = torch.where(finite, values, torch.zeros_like(values)).sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@dataclass
class _GridData:
    """What the per-run grid needs, on the CPU: handed to the drawing thread."""

    inputs: Tensor
    labels: Tensor | None
    maps: dict[str, Tensor]
    scores: Tensor
    target: Tensor
    signed: set[str]
    titles: dict[str, str]
    task: str = "multiclass"
    extra: dict[str, Tensor] = field(default_factory=dict)


def is_token_input(inputs: Tensor) -> bool:
    """Whether probe inputs are token ids: an integer (N, T) tensor (drawn as text, not as a strip of pixels)."""
    return (
        inputs.ndim == 2 and not inputs.is_floating_point() and not inputs.is_complex() and inputs.dtype != torch.bool
    )


def token_strings(
    ids: Tensor,
    *,
    vocabulary: Sequence[str] | None = None,
    decode: Callable[[int], str] | None = None,
    pad_id: int | None = None,
) -> list[list[str | None]]:
    """The display string of each token id in ``ids`` (N, T); padding tokens become None (hidden).

    Example:
        >>> token_strings(torch.tensor([[2, 1, 0]]), vocabulary=["<pad>", "cat", "the"], pad_id=0)
        [['the', 'cat', None]]
    """

    def text(token: int) -> str:
        if decode is not None:
            return str(decode(token))
        if vocabulary is not None:
            return vocabulary[token] if 0 <= token < len(vocabulary) else f"<{token}?>"
        return str(token)

    return [[None if token == pad_id or token < 0 else text(token) for token in row] for row in ids.tolist()]


def grid_parts(tag: str, count: int, rows_per_image: int | None) -> list[tuple[str, range]]:
    """The image tags and probe rows of a grid of ``count`` rows split into parts of ``rows_per_image`` rows.

    One part under ``tag`` itself when the grid is not split (None, or no more
    rows than a part holds); otherwise ``tag/rows_<first>-<last>`` (1-based,
    zero-padded so the tags sort in row order).

    Example:
        >>> for tag, rows in grid_parts("interp_saliency/maps", 5, 2):
        ...     print(tag, list(rows))
        interp_saliency/maps/rows_1-2 [0, 1]
        interp_saliency/maps/rows_3-4 [2, 3]
        interp_saliency/maps/rows_5-5 [4]
    """
    if rows_per_image is None or count <= rows_per_image:
        return [(tag, range(count))]
    width = len(str(count))
    parts = []
    for start in range(0, count, rows_per_image):
        stop = min(start + rows_per_image, count)
        parts.append((f"{tag}/rows_{start + 1:0{width}d}-{stop:0{width}d}", range(start, stop)))
    return parts


class _TokenNames(Sequence[str]):
    """The strings of token ids 0 .. count - 1, made when asked (a vocabulary may be large)."""

    def __init__(self, count: int, vocabulary: Sequence[str] | None, decode: Callable[[int], str] | None) -> None:
        self.count, self.vocabulary, self.decode = count, vocabulary, decode

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if self.vocabulary is not None:
            return repr(self.vocabulary[index]) if index < len(self.vocabulary) else str(index)
        assert self.decode is not None
        return repr(self.decode(index))


def row_texts(
    task: str, scores: Tensor, target: Tensor, labels: Tensor | None, class_names: Sequence[str] | None = None
) -> list[str]:
    """The text beside each row of a map grid: sample number, label, prediction with confidence, explained target.

    Per output kind (see :mod:`lightning_interp.methods.model.tasks`): ``pred`` with the softmax
    (multiclass) or the sigmoid of the predicted side (binary); the label set and
    ``top`` label with its sigmoid (multi-label); the label value and ``out``, the
    explained output (regression). ``shows`` names the explained class when it is
    not the prediction.

    Example:
        >>> texts = row_texts("binary", torch.tensor([[2.0], [-2.0]]), torch.tensor([1, 0]), torch.tensor([1, 1]))
        >>> [text.splitlines() for text in texts]
        [['#0', 'label 1', 'pred  1 88%'], ['#1', 'label 1', 'pred  0 88%']]
    """

    def show(c: int) -> str:
        return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)

    predicted, confidence = prediction_and_confidence(scores, task)
    rows = []
    for i in range(scores.shape[0]):
        explained = int(target[i])
        lines = [f"#{i}"]
        if task == "regression":
            if labels is not None:
                value = labels[i].reshape(-1)
                lines.append(f"label {float(value[explained if value.numel() > 1 else 0]):.4g}")
            lines.append(f"out   {float(scores[i, explained]):.4g}")
            if scores.shape[1] > 1:
                lines.append(f"shows output {show(explained)}")
            rows.append("\n".join(lines))
            continue
        assert confidence is not None
        if labels is not None and task == "multilabel":
            positive = [show(int(c)) for c in torch.nonzero(labels[i]).flatten()]
            shown = ",".join(positive[:3]) + ("…" if len(positive) > 3 else "")
            lines.append(f"labels {shown or 'none'}")
        elif labels is not None:
            lines.append(f"label {show(int(class_labels(labels[i : i + 1], task)[0]))}")
        word = "top  " if task == "multilabel" else "pred "
        lines.append(f"{word} {show(int(predicted[i]))} {float(confidence[i]):.0%}")
        if explained != int(predicted[i]):
            lines.append(f"shows {show(explained)}")
        rows.append("\n".join(lines))
    return rows
