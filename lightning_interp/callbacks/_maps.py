"""MapCallback: the shared part of callbacks that log per-sample maps (saliency, Grad-CAM).

A subclass implements :meth:`MapCallback._explain`, which turns the probe set
into named (N, H, W) maps; scores, pictures, evolution strips and their state
live here, the schedule and probe handling in :class:`InterpCallback`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from lightning_interp._logging import log_image, logging_step, to_host
from lightning_interp.callbacks._base import InterpCallback, parse_layer_names, refuse_unknown_arguments
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._detection import BoundDetections, detection_row_texts
from lightning_interp.callbacks._segmentation import (
    BoundRegions,
    region_pixels,
    segmentation_row_texts,
)
from lightning_interp.methods import (
    METHODS,
    BoundInputs,
    DetectionTarget,
    NeuronTarget,
    OutputTransform,
    SegmentationTarget,
    TaskOption,
    check_method_options,
    class_labels,
    concentration,
    dense_output,
    detection_outputs,
    get_module,
    infer_task,
    layer_output,
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
    outline_region,
    render_feature_rows,
    render_grid,
    render_signals,
    render_tokens,
)

TargetSpec = Literal["pred", "label"] | int | SegmentationTarget | DetectionTarget | NeuronTarget

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
        input_maps: a model of several inputs: the maps of each explained input after the first, by the input's
            name: method -> (N, ...) float32 map shaped like that input's samples (channels reduced); scored, and
            drawn as one picture per input (``interp_<name>/maps_<input name>``).
        input_values: the (N, ...) samples of each input of ``input_maps``, as the pictures show them.
    """

    maps: dict[str, Tensor]
    scores: Tensor
    target: Tensor
    scalars: Mapping[str, Tensor | float] = field(default_factory=dict)
    signed: set[str] = field(default_factory=set)
    titles: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    input_maps: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    input_values: dict[str, Tensor] = field(default_factory=dict)


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
            For a segmentation model (dense (B, C, H, W) scores, or a dict's
            ``"out"``) the maps explain class ``c``'s scores summed over a
            region: a :class:`~lightning_interp.methods.SegmentationTarget`
            says which class, which region (``"predicted"``, ``"label"``,
            ``"all"``) and ``"sum"`` or ``"mean"``; ``"pred"`` is
            ``SegmentationTarget()`` (per sample the non-background class with
            the largest predicted area, over its predicted mask), an index
            ``c`` that class over its predicted mask, and ``"label"`` the
            largest labelled class over its ground-truth mask (the probe's
            class maps). Localization and the pointing game then score each
            map against the explained class's ground-truth mask, and the grid
            outlines the region explained.
            For an object detector (a torchvision-style model that returns
            one dict of ``boxes``, ``labels`` and ``scores`` per image) the
            maps explain one detection per image, its class score: a
            :class:`~lightning_interp.methods.DetectionTarget` says which (by
            rank, of a class, with or without its box); ``"pred"`` is
            ``DetectionTarget()`` (the top detection) and an index ``c`` the
            top detection of class ``c``. The detection is fixed on the clean
            image and matched in every copy the methods run by label and IoU
            (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``); the grid
            outlines its box and localization scores the maps against the
            ground-truth boxes of ``(images, targets)`` batches.
            Callbacks that say so (``SaliencyCallback``) take a
            :class:`~lightning_interp.methods.NeuronTarget` too: the maps then
            explain a unit or channel of a layer instead of an output (the grid
            shows its activation as ``out``).
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
    neuron_targets = False  # whether target= may be a NeuronTarget (a unit of a layer instead of an output)
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
        if isinstance(target, NeuronTarget) and not self.neuron_targets:
            raise ValueError(
                f"{type(self).__name__} explains outputs and takes no NeuronTarget; SaliencyCallback(target="
                "NeuronTarget(...)) shows what drives a unit of a layer."
            )
        if not (
            isinstance(target, (NeuronTarget, SegmentationTarget, DetectionTarget))
            or target in ("pred", "label")
            or (isinstance(target, int) and not isinstance(target, bool))
        ):
            raise ValueError(
                f"target must be 'pred', 'label', a class index (int), a SegmentationTarget, a DetectionTarget or "
                f"(SaliencyCallback) a NeuronTarget, "
                f"got {target!r}."
            )
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

    _output_transform: OutputTransform | None = None
    _segmentation: SegmentationTarget | None = None  # in force for this fit: the model's output is dense
    _regions: BoundRegions | None = None
    _segmentation_model: tuple[pl.Trainer, pl.LightningModule] | None = None
    _detection: DetectionTarget | None = None  # in force for this fit: the model is a detector
    _detections: BoundDetections | None = None
    _detection_model: tuple[pl.Trainer, pl.LightningModule] | None = None

    @property
    def output_transform(self) -> OutputTransform | None:
        """The ``output_transform`` the methods get: the one given, or for a segmentation model the region scores
        of the samples being explained, for a detector their explained detections' scores (see ``target``)."""
        if self._regions is not None:
            return self._regions
        return self._detections if self._detections is not None else self._output_transform

    @output_transform.setter
    def output_transform(self, value: OutputTransform | None) -> None:
        self._output_transform = value

    @property
    def detection(self) -> DetectionTarget | None:
        """The detection target in force for this fit (None: the model is not a detector)."""
        return self._detection

    @property
    def segmentation(self) -> SegmentationTarget | None:
        """The segmentation target in force for this fit (None: the model's output is not dense)."""
        return self._segmentation

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
        candidates = [*probe.all_inputs, *(value for value in probe.extras.values() if value.is_floating_point())]
        if self.feature_names is not None and not any(
            value.ndim == 2 and len(self.feature_names) == value.shape[1] for value in candidates
        ):
            shapes = [tuple(value.shape) for value in candidates]
            raise ValueError(
                f"{name}: feature_names has {len(self.feature_names)} names, but the probe inputs have shape "
                f"{shapes[0] if len(shapes) == 1 else shapes}; give one name per feature of (N, F) inputs."
            )
        if probe.masks is not None and probe.inputs.ndim == 4 and probe.masks.shape[-2:] != probe.inputs.shape[-2:]:
            raise ValueError(
                f"{name}: the probe masks are {tuple(probe.masks.shape[-2:])} but the inputs "
                f"{tuple(probe.inputs.shape[-2:])}; localization and the pointing game compare maps and masks pixel "
                "by pixel on the inputs' grid. Resize the masks to the inputs (nearest neighbour), or build the "
                "ProbeSet without masks."
            )
        self._segmentation, self._regions = None, None
        self._detection, self._detections, self._detection_model = None, None, None
        if isinstance(self.target, NeuronTarget):
            self._prepare_neuron(trainer, pl_module, probe, self.target)
            return
        trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
        if self._prepare_detection(trainer, pl_module, probe, trace.output):
            return
        if self._prepare_segmentation(trainer, pl_module, probe, trace.output):
            return
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
                self._warn(
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

    def _prepare_neuron(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet, target: NeuronTarget
    ) -> None:
        """A neuron target: its layer exists (else the closest names) and its index fits the layer's output on two
        probe samples; the explained score is then the unit's activation, one output (task ``"regression"``)."""
        get_module(pl_module, target.layer)
        inputs = self._device_inputs(trainer, pl_module, probe.inputs[:2])
        with self._model_context(trainer):
            output = layer_output(self._explained(pl_module, probe.subset(inputs.shape[0])), target.layer, inputs)
        try:
            target.check(tuple(output.shape))
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self._task, self._labels_fit = "regression", False

    def _prepare_segmentation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet, output: object
    ) -> bool:
        """Whether the model is a segmentation model explained over regions (then checked and set up): its output
        (or ``output_transform``'s, with a ``SegmentationTarget``) is dense (B, C, H, W) scores of image inputs."""
        name = type(self).__name__
        given = self.target if isinstance(self.target, SegmentationTarget) else None
        if given is not None:
            dense = self._output_transform(output) if self._output_transform is not None else dense_output(output)
            if not isinstance(dense, Tensor) or dense.ndim != 4:
                found = tuple(dense.shape) if isinstance(dense, Tensor) else type(output).__name__
                raise ValueError(
                    f"{name}(target=SegmentationTarget(...)) explains a segmentation model, whose output is dense "
                    f"class scores (batch, classes, H, W) (or a dict with them under 'out'); this model gives "
                    f"{found}. Pass output_transform=... that returns the dense scores, or a plain target for a "
                    "classifier."
                )
        else:
            dense = dense_output(output) if self._output_transform is None and probe.inputs.ndim == 4 else None
            if dense is None:
                return False
            assert not isinstance(self.target, SegmentationTarget)
            given = SegmentationTarget(
                class_index=self.target,  # type: ignore[arg-type]
                region="label" if self.target == "label" else "predicted",
            )
        classes = dense.shape[1]
        if isinstance(given.class_index, int) and given.class_index >= classes:
            raise ValueError(
                f"{name}: class {given.class_index} is not a class of this segmentation model ({classes} classes: 0 "
                f"to {classes - 1})."
            )
        if given.needs_class_map and probe.class_maps is None:
            raise ValueError(
                f"{name}: {given} reads the ground-truth class maps, but the probe samples carry none. Give batches "
                "(image, class_map) with a (batch, H, W) integer class map, a dict with it under 'class_map' (or "
                "'mask', 'label'), or probe=ProbeSet(inputs, class_maps=...); or explain the predicted mask with "
                "SegmentationTarget(class_index='pred', region='predicted')."
            )
        if probe.class_maps is not None and tuple(probe.class_maps.shape[-2:]) != tuple(probe.inputs.shape[-2:]):
            raise ValueError(
                f"{name}: the probe class maps are {tuple(probe.class_maps.shape[-2:])} but the inputs "
                f"{tuple(probe.inputs.shape[-2:])}; resize the class maps to the inputs (nearest neighbour)."
            )
        self._segmentation, self._regions = given, BoundRegions()
        self._segmentation_model = (trainer, pl_module)
        self._task, self._labels_fit = "multiclass", False
        return True

    def _prepare_detection(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet, output: object
    ) -> bool:
        """Whether the model is an object detector explained one detection per image (then checked and set up):
        its output (or ``output_transform``'s, with a ``DetectionTarget``) is one dict of boxes, labels and scores
        per image of (N, C, H, W) image inputs."""
        name = type(self).__name__
        given = self.target if isinstance(self.target, DetectionTarget) else None
        if given is not None:
            picked = self._output_transform(output) if self._output_transform is not None else output
            if detection_outputs(picked) is None:
                raise ValueError(
                    f"{name}(target=DetectionTarget(...)) explains an object detector, whose output is one dict per "
                    "image with 'boxes' (K, 4), 'labels' (K,) and 'scores' (K,) (a torchvision detector in eval "
                    f"mode); this model gives {type(picked).__name__}. Pass output_transform=... that returns that "
                    "list, or a plain target for a classifier."
                )
        else:
            if self._output_transform is not None or detection_outputs(output) is None:
                return False
            if self.target == "label":
                raise ValueError(
                    f"{name}(target='label'): the model is an object detector, and an image holds several labelled "
                    "objects. Explain a detection instead: target='pred' (the top detection), a class index (the "
                    "top detection of that class) or target=DetectionTarget(index=..., label=...)."
                )
            given = DetectionTarget(label=self.target if isinstance(self.target, int) else None)
        if probe.inputs.ndim != 4:
            raise ValueError(
                f"{name}: a detector's probe inputs must be images (N, C, H, W), got {tuple(probe.inputs.shape)}. Give "
                "validation batches (images, targets) with a list of (C, H, W) images of one size and a list of "
                "target dicts, or probe=ProbeSet(images)."
            )
        self._detection, self._detections = given, BoundDetections()
        self._detection_model = (trainer, pl_module)
        self._task, self._labels_fit = "regression", False  # one output per sample: the explained detection's score
        return True

    def _bind_detections(self, probe: ProbeSet, device: torch.device) -> Tensor:
        """Fix the explained detection of each sample of ``probe`` on its clean inputs, for the methods' detection
        scores; returns the (B,) target column (zeros). Samples without one are warned about once per run."""
        assert self._detection is not None and self._detections is not None and self._detection_model is not None
        trainer, pl_module = self._detection_model
        inputs = self._device_inputs(trainer, pl_module, probe.inputs).to(device)
        model = self._explained(pl_module, probe)
        with self._model_context(trainer), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # said below, once per run, with what to do
            target, scores = self._detection.resolve(model, inputs, output_transform=self._output_transform)
        self._detections.bind(scores)
        missing = [int(i) for i in torch.nonzero(~scores.found.cpu()).flatten()]
        if missing and "no detection" not in self._warned_zero:
            self._warned_zero.add("no detection")
            what = f"of class {self._detection.label} " if self._detection.label is not None else ""
            self._warn(
                f"{type(self).__name__}: probe sample(s) {missing[:8]} have no detection {what}at rank "
                f"{self._detection.rank}, so their maps are zero. Lower the detector's score threshold (torchvision: "
                "box_score_thresh=...), or explain another rank or class with target=DetectionTarget(...) (warned "
                "once per run)."
            )
        return target

    def _bind_regions(self, probe: ProbeSet, device: torch.device) -> Tensor:
        """Fix the explained class and region of each sample of ``probe`` on its clean inputs, for the methods'
        region scores; returns the (B,) explained classes."""
        assert self._segmentation is not None and self._regions is not None and self._segmentation_model is not None
        trainer, pl_module = self._segmentation_model
        inputs = self._device_inputs(trainer, pl_module, probe.inputs).to(device)
        model = self._explained(pl_module, probe)
        with self._model_context(trainer):
            target, scores = self._segmentation.resolve(
                model, inputs, probe.class_maps, output_transform=self._output_transform
            )
        self._regions.bind(target, scores)
        return target

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Explain two probe samples as a run would (in the trainer's precision), logging nothing."""
        sample = probe.subset(min(2, len(probe)))
        inputs = self._probe_inputs(trainer, pl_module, sample)
        with self._model_context(trainer):
            result = self._explain(self._explained(pl_module, sample), inputs, self._target_for(sample, inputs.device))
        for key, maps in result.maps.items():
            if maps.shape[0] != len(sample) or maps.ndim not in (2, 3):
                raise RuntimeError(f"{type(self).__name__}: the maps of {key!r} have shape {tuple(maps.shape)}.")
            if maps.ndim == 3 and sample.inputs.ndim == 2:  # an image's (h, w) map cannot be drawn on a vector
                first = "the model's first input" if sample.more_inputs else "the inputs"
                raise ValueError(
                    f"{type(self).__name__}: the maps of {key!r} are (h, w) maps of an image, but {first} "
                    f"{tuple(sample.inputs.shape[1:])} is a vector (a table, token ids), which they cannot be drawn "
                    "over."
                    + (
                        " Put the image first in the batches, ((image, table), label): the maps are drawn over the "
                        "first input."
                        if sample.more_inputs
                        else ""
                    )
                )

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._previous, self._history = {}, []
        self._warned_zero = set()
        self._task = None
        self._label_chars = 0
        self._segmentation, self._regions, self._segmentation_model = None, None, None
        self._detection, self._detections, self._detection_model = None, None, None

    def _zero_map_reason(self, key: str) -> str:
        """Why the maps of ``key`` can be zero everywhere (shown in the warning)."""
        return "the target scores do not change with it (saturated outputs or dead units)."

    def _restart_comparisons(self) -> None:
        super()._restart_comparisons()
        self._previous, self._history = {}, []

    def _needs_labels(self) -> bool:
        return self.target == "label"

    def _labels_reason(self) -> str:
        return (
            f"{type(self).__name__}(target='label') needs labels (use target='pred' otherwise; for a segmentation "
            "set of (image, class_map) batches, target=SegmentationTarget(class_index='label', region='label'); for "
            "an object detector, target='pred' (the top detection) or target=DetectionTarget(...))"
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.is_global_zero
            and self._history
            and self.evolution_samples > 0
            and self.probe is not None
            and (self.evolution_columns > 0)
        ):
            history, step = list(self._history), self._summary_step(trainer)
            rows = self._evolution_indices()
            first = self._shown_inputs(self.probe)[rows]
            others = {name: values[rows] for name, values in self._other_inputs(self.probe).items()}
            for key in self._history[-1][1]:
                tag = f"interp_{self.name}/{key}/evolution"
                owner, _, name = key.rpartition("/")  # "<method>/<input name>": another input's maps
                inputs = others[name] if owner and name in others else first

                def job(key: str = key, tag: str = tag, inputs: Tensor = inputs) -> None:
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
        if isinstance(self.target, NeuronTarget):
            return 0  # the one output of the unit's activation (the methods run on NeuronScores)
        if self._detection is not None:
            return self._bind_detections(probe, device)
        if self._segmentation is not None:
            return self._bind_regions(probe, device)
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
        regions, class_masks = self._explained_regions(probe, result.target, tuple(probe.inputs.shape[-2:]))
        scores = self._scores(maps, result.signed, probe, masks=class_masks)
        # the other inputs of a model of several inputs: scored as "<key>/<input name>", never against the masks,
        # which are the first input's
        more = {
            f"{key}/{name}": value.float()
            for name, values in result.input_maps.items()
            for key, value in values.items()
        }
        more_signed = {f"{key}/{name}" for name, values in result.input_maps.items() for key in values}
        more_signed = {key for key in more_signed if key.rpartition("/")[0] in result.signed}
        scores |= self._scores(more, more_signed, probe, own_masks=False)
        all_maps = maps | more
        device = next(iter(maps.values())).device if maps else torch.device("cpu")
        for key, value in result.scalars.items():  # the methods' own scalars join the one transfer below
            scores[f"interp_{self.name}/{key}"] = torch.as_tensor(value, dtype=torch.float64, device=device)
        flags = [torch.stack([torch.isfinite(m).all(), (m != 0).any()]).double() for m in all_maps.values()]
        numbers = torch.cat([*flags, *(v.double().reshape(1) for v in scores.values())]).tolist() if maps else []
        checks = [(bool(numbers[2 * i]), bool(numbers[2 * i + 1])) for i in range(len(all_maps))]  # one transfer
        broken = [key for key, (finite, _) in zip(all_maps, checks, strict=True) if not finite]
        if broken:
            self._warn(
                f"{type(self).__name__}: the maps of {broken} hold NaN or inf at epoch {trainer.current_epoch} "
                "(non-finite activations or gradients in the model); their scores are logged as NaN."
            )
        for key, (finite, nonzero) in zip(all_maps, checks, strict=True):
            if finite and not nonzero and key not in self._warned_zero:
                self._warned_zero.add(key)
                self._warn(
                    f"{type(self).__name__}: every map of {key!r} is zero at epoch {trainer.current_epoch}: "
                    f"{self._zero_map_reason(key)} Its concentration, stability and localization are logged as NaN "
                    "while this lasts (this warning is given once per run)."
                )
        step = logging_step(trainer)
        scalars = dict(zip(scores, numbers[2 * len(all_maps) :], strict=True))
        for key, (finite, nonzero) in zip(all_maps, checks, strict=True):
            warned = f"{key} (no positive part)"
            value = scalars.get(f"interp_{self.name}/{key}/concentration", 0.0)
            if finite and nonzero and key in result.signed and math.isnan(value) and warned not in self._warned_zero:
                self._warned_zero.add(warned)
                self._warn(
                    f"{type(self).__name__}: the signed maps of {key!r} are negative or zero everywhere in every probe "
                    f"sample at epoch {trainer.current_epoch}; concentration and localization read the positive part "
                    "(the evidence for the target), so they are logged as NaN while this lasts (warned once per run)."
                )
        shown = min(len(probe), MAX_GRID_ROWS)  # scores use every sample; the picture stays readable and small
        evolution = self._evolution_maps(all_maps)
        device_parts = {f"map {key}": value[:shown] for key, value in all_maps.items()}
        device_parts |= {f"extra {key}": value[:shown].float() for key, value in result.extra.items()}
        device_parts |= {f"evolution {key}": value for key, value in evolution.items()}
        device_parts |= {"scores": result.scores[:shown].float(), "target": result.target[:shown].float()}
        if regions is not None:
            device_parts["regions"] = regions[:shown]
        detected = self._detections.current if self._detection is not None and self._detections else None
        if detected is not None:  # the explained detections, for the row texts
            device_parts |= {
                "detection labels": detected.labels[:shown],
                "detection scores": detected.scores[:shown].float(),
                "detection boxes": detected.boxes[:shown].float(),
                "detection found": detected.found[:shown],
            }
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
            input_maps={
                name: (
                    result.input_values[name][:shown],
                    {key: host[f"map {key}/{name}"] for key in values},
                )
                for name, values in result.input_maps.items()
            },
            regions=host.get("regions"),
            segmentation=self._segmentation,
            detections=None
            if detected is None
            else tuple(host[f"detection {part}"] for part in ("labels", "scores", "boxes", "found")),
        )
        self._submit(trainer, lambda: self._log_grids(trainer, picture, step))
        if evolution:
            self._remember(trainer.current_epoch, {key: host[f"evolution {key}"].half() for key in evolution})
        return scalars

    def _explained_regions(
        self, probe: ProbeSet, target: Tensor, size: tuple[int, ...]
    ) -> tuple[Tensor | None, Tensor | None]:
        """For a segmentation model: each sample's explained region on the inputs' grid (N, H, W) bool, and its
        ground-truth mask of the explained class (None without class maps); for a detector, each sample's explained
        box as a mask, scored against the probe's masks (its ground-truth boxes); (None, None) otherwise. Warns once
        when a region is empty (its maps are zero)."""
        if self._detection is not None and self._detections is not None and self._detections.current is not None:
            return self._detections.boxes((int(size[-2]), int(size[-1]))).to(target.device), None
        if self._segmentation is None or self._regions is None or self._regions.current is None:
            return None, None
        region = self._regions.region()
        if tuple(region.shape[-2:]) != tuple(size):
            region = torch.nn.functional.interpolate(region[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
        empty = [int(i) for i in torch.nonzero(region_pixels(region) == 0).flatten().tolist()]
        if empty and "empty regions" not in self._warned_zero:
            self._warned_zero.add("empty regions")
            self._warn(
                f"{type(self).__name__}: the explained region of probe sample(s) {empty[:8]} is empty (the explained "
                f"class has no pixel in the {self._segmentation.region} region), so their maps are zero. Use "
                "class_index='pred' or region='all' (warned once per run)."
            )
        masks = None
        if probe.class_maps is not None:
            masks = probe.class_maps.to(target.device) == target[:, None, None]
        return region, masks

    def _scores(
        self,
        maps: dict[str, Tensor],
        signed: set[str],
        probe: ProbeSet,
        *,
        masks: Tensor | None = None,
        own_masks: bool = True,
    ) -> dict[str, Tensor]:
        """Per-map scores as 0-dim tensors where the maps are (the caller brings them to the host at once);
        ``masks``: the masks to score against instead of the probe's (a segmentation model's explained classes);
        ``own_masks=False``: maps of another input than the first, which the probe's masks do not describe."""
        values: dict[str, Tensor] = {}
        given = masks
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
            reference = given if given is not None else probe.masks if own_masks else None
            where = _on_mask_grid(positive, reference)
            if where is not None:
                assert reference is not None
                masks = reference.to(value.device) if masks is None else masks
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
        per_image = rows_per_part(self.rows_per_image, picture.inputs)
        for tag, rows in grid_parts(f"interp_{self.name}/maps", shown, per_image):
            log_image(trainer, tag, self._grid_image(picture, rows, compact=per_image is not None), step)
        for name, (inputs, maps) in picture.input_maps.items():  # a model's other inputs: a picture each
            other = replace(
                picture, inputs=inputs, maps=maps, input_maps={}, extra={}, regions=None, title=f"input {name}"
            )
            per_image = rows_per_part(self.rows_per_image, inputs)
            for tag, rows in grid_parts(f"interp_{self.name}/maps_{name}", shown, per_image):
                log_image(trainer, tag, self._grid_image(other, rows, compact=per_image is not None), step)

    def _grid_image(self, picture: _GridData, rows: range | None = None, *, compact: bool = False) -> np.ndarray:
        """The per-run grid of the probe ``rows`` (all by default), drawn from CPU tensors only (``compact``: for a
        part of a split grid, see :func:`~lightning_interp.visualize.render_grid`)."""
        rows = range(picture.scores.shape[0]) if rows is None else rows
        part = slice(rows.start, rows.stop)
        inputs = picture.inputs[part]
        names = self.class_names or self._next_token_names(picture.scores.shape[1])
        if picture.detections is not None:
            labels = detection_row_texts(*picture.detections, names)
        elif picture.segmentation is not None and picture.regions is not None:
            pixels = region_pixels(picture.regions)
            labels = segmentation_row_texts(picture.target, picture.scores, pixels, picture.segmentation, names)
        else:
            labels = row_texts(picture.task, picture.scores, picture.target, picture.labels, names)
        drawn = self._rows_image(
            inputs,
            {picture.titles.get(key, key): maps[part] for key, maps in picture.maps.items()},
            labels[part],
            signed=[key in picture.signed for key in picture.maps],
            title=picture.title,
        )
        if drawn is not None:
            return drawn
        columns = [list(input_to_rgb(inputs))]
        floor = self._display_floor(inputs)
        for key, maps in picture.maps.items():
            cmap = "RdBu_r" if key in picture.signed else self.cmap
            columns.append(map_tiles(inputs, maps[part], cmap=cmap, signed=key in picture.signed, floor=floor))
        if picture.regions is not None:  # segmentation: the region explained, detection: its box, on every tile
            regions = picture.regions[part].numpy()
            columns = [
                [outline_region(tile, region) for tile, region in zip(column, regions, strict=True)]
                for column in columns
            ]
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
            compact=compact,
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
                feature_names=self.feature_names
                if self.feature_names is not None and len(self.feature_names) == inputs.shape[1]
                else None,
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

    def _other_inputs(self, probe: ProbeSet) -> dict[str, Tensor]:
        """A model of several inputs: the probe's inputs after the first, by the names their maps are logged under
        (positional ones by ``input_name``, a dict batch's by their keys), on the host."""
        named = {self.input_name(position): value for position, value in enumerate(probe.all_inputs) if position}
        return named | {key: value for key, value in probe.extras.items() if value.is_floating_point()}

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
    input_maps: dict[str, tuple[Tensor, dict[str, Tensor]]] = field(default_factory=dict)  # name: (inputs, maps)
    title: str = ""  # above a picture drawn row by row (the name of another input than the first)
    regions: Tensor | None = None  # a segmentation model's explained region per sample, (N, H, W) bool
    segmentation: SegmentationTarget | None = None
    detections: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # a detector: labels, scores, boxes, found


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


AUTO_ROWS_PER_IMAGE = 2
"""Probe rows per image with ``Display(rows_per_image="auto")``: TensorBoard 2.21's Time Series card shows an image in
a box of about 370 x 215 px; the quickstart's 8-row saliency grid (652 x 825 px) is shown there at 0.26 of its size,
its compact 2-row parts at 0.7 or more (measured in headless Chromium)."""


def rows_per_part(option: int | str | None, inputs: Tensor) -> int | None:
    """The rows per grid image for ``Display.rows_per_image`` and these probe ``inputs``: ``"auto"`` is
    :data:`AUTO_ROWS_PER_IMAGE` for pictures drawn row by row (images, feature vectors, signals) and one image for
    token text (900 px wide: a card shows it at its width, 0.4, whatever its rows); an int or None as given.

    Example:
        >>> rows_per_part("auto", torch.rand(8, 3, 32, 32)), rows_per_part("auto", torch.randint(9, (8, 12)))
        (2, None)
        >>> rows_per_part(3, torch.rand(8, 3, 32, 32)), rows_per_part(None, torch.rand(8, 3, 32, 32))
        (3, None)
    """
    if option == "auto":
        return None if is_token_input(inputs) else AUTO_ROWS_PER_IMAGE
    assert option is None or isinstance(option, int)
    return option


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
