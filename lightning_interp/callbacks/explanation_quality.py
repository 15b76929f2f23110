"""ExplanationQualityCallback: is each explanation faithful, specific to what was learnt, and readable? Tracked every
validation epoch, with a comparison of the methods."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._base import InterpCallback, refuse_unknown_arguments
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._maps import _nanmean
from lightning_interp.callbacks._sharding import is_lockstep, run_in_lockstep, strategy_name
from lightning_interp.methods import (
    METHODS,
    REMOVAL_BASELINES,
    Explainer,
    MethodsArg,
    OutputTransform,
    TaskOption,
    cascading_randomization,
    class_labels,
    curve_auc,
    eager_forward,
    get_module,
    infer_task,
    localization,
    masked_confidence,
    max_sensitivity,
    modes_preserved,
    parse_methods,
    perturbation_curve,
    plain_name,
    resolve_target,
    sanity_similarity,
    scores_from_output,
    sparseness,
    top_fraction_drop,
)
from lightning_interp.options import DataDescription, Display
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import comparison_image

__all__ = [
    "DEFAULT_METRICS",
    "QUALITY_METRICS",
    "ExplanationQualityCallback",
    "MetricsArg",
]

QualityMetric = Literal[
    "deletion", "insertion", "top_drop", "sanity", "sparseness", "localization", "robustness", "cascading", "confidence"
]

QUALITY_METRICS: tuple[str, ...] = get_args(QualityMetric)
"""What the callback can compute per method; ``robustness``, ``cascading`` and ``confidence`` are off by default (the
first explains every sample again per noise draw, the second a copy of the model once per randomised layer; the third
is the Grad-CAM++ paper's pair, opt-in so the default scalars stay as they were)."""

DEFAULT_METRICS = ("deletion", "insertion", "top_drop", "sanity", "sparseness", "localization")
"""The metrics computed when ``metrics=`` is not given, each at its default options."""

MetricsArg = (
    QualityMetric
    | Sequence[QualityMetric | tuple[QualityMetric, Mapping[str, Any] | None]]
    | Mapping[QualityMetric, Mapping[str, Any] | None]
)
"""How the callback takes its metrics, spelt as ``methods=`` is: a name, a list of names (or ``(name, {option:
value})`` pairs), or a ``{name: {option: value}}`` mapping (``None`` for the defaults)."""


@dataclass(frozen=True)
class _Check:
    """What a metric option accepts: ``wants`` says it in words for the messages."""

    wants: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_STEPS = _Check("an int >= 2", lambda value: _is_int(value) and value >= 2)
_BASELINE = _Check(f"one of {REMOVAL_BASELINES}", lambda value: isinstance(value, str) and value in REMOVAL_BASELINES)
_FRACTION = _Check("a number in (0, 1)", lambda value: _is_number(value) and 0 < value < 1)
_RADIUS = _Check("a number > 0", lambda value: _is_number(value) and value > 0)
_POSITIVE = _Check("an int >= 1", lambda value: _is_int(value) and value >= 1)

RANDOM_KEY = "random"
"""The tag segment of the random reference maps."""

DEFAULT_METHODS = ("gradient", "integrated_gradients", "guided_backprop", "grad_cam")
"""Two gradient methods, one modified-backward method (which Adebayo et al. found insensitive to the weights) and
Grad-CAM at the automatic layer."""


class ExplanationQualityCallback(InterpCallback):
    """Score the explanations of several methods on a fixed probe set at every validation epoch, and rank them.

    For each method (any registered one; CAM methods at a layer), on
    ``num_samples`` validation images, each explained for ``target``, the
    callback logs under ``interp_<name>/<method>/`` the scores of the chosen
    ``metrics`` (each with its own options; see :attr:`METRIC_OPTIONS`):

    - **faithfulness**: ``deletion`` and ``insertion`` log ``deletion_auc``
      and ``insertion_auc``, the area under the target's probability as the
      pixels are removed (replaced by the metric's ``baseline``) or added
      back, most relevant first, in ``steps`` equal parts
      (:func:`~lightning_interp.methods.perturbation_curve`; every step of
      every sample is one batched forward). A faithful map gives a low
      deletion and a high insertion area. ``top_drop`` logs ``top_drop`` and
      ``random_drop``: the probability's fall when the top ``fraction`` of
      pixels is removed (to its ``baseline``), and when as many random pixels
      are; ``top_drop_gain`` is the difference (0 for a map no better than
      chance);
    - ``sanity`` (the end point of the model-randomisation test of Adebayo et
      al. 2018): ``sanity_rank_correlation``, the rank correlation of the maps
      with the same method's maps of the same samples on the network as it was
      before the first optimisation step (computed at train start and kept in
      the checkpoint). A method that stays near 1 shows the input or the
      architecture, not what the network learnt;
    - ``sparseness`` (complexity): the Gini index of the map (0 uniform, near 1 one pixel);
    - ``localization`` (share of the map on the object) when the batches carry masks;
    - ``cascading`` (cascading randomisation; off by default): on a deep copy
      of the model, the last ``depth`` parametrised layers are re-initialised
      one after the other from the output down, and ``cascade/<layer>`` is the
      rank correlation of the maps with the trained network's after
      randomising down to that layer (Adebayo et al. 2018). It costs a copy of
      the model and ``depth`` more explanations per method and run;
    - ``robustness`` (off by default): ``max_sensitivity``, the largest
      relative change of the map under uniform input noise of ``radius`` of
      the value range, over ``samples`` draws of the callback's own generator;
    - ``confidence`` (off by default; Chattopadhay et al. 2018): the image
      multiplied by its map (rescaled to [0, 1]) against the image
      (:func:`~lightning_interp.methods.masked_confidence`, 2 no-grad forwards
      per sample): ``average_drop``, the mean relative fall of the target's
      probability ``max(0, Y - O) / Y`` (lower is better), and
      ``increase_in_confidence``, the share of samples whose probability rises
      (higher is better); both as fractions, not percent.

    No option is shared between metrics: ``deletion``, ``insertion`` and
    ``top_drop`` each take their own ``baseline`` (all ``"blur"`` by default)
    and the two curves their own ``steps`` (both 16), so changing one leaves
    the others as they are; give each the value you want.

    ``random_reference=True`` (default) scores uniform random maps (the
    callback's generator, the same every run) the same way, under
    ``interp_<name>/random/``: the chance level of every metric (its sanity
    score is not computed: random maps have nothing to learn). With two or
    more rows it also logs ``comparison``: a table of the methods (and the
    random reference), ranked by their mean rank over the metrics marked with
    an arrow.

    The maps are scored as they are shown: input attributions reduced over
    channels by ``channel_reduction`` (``"abs_sum"``, as ``SaliencyCallback``
    shows them; ``"sum"`` orders pixels by signed evidence), CAM maps as they
    are. Cost per run and method: the method's own passes, plus
    ``(deletion steps + 1) + (insertion steps + 1) + 3`` no-grad forward
    passes per sample for the faithfulness scores (at the defaults 37 x 32
    images; see BENCHMARKS.md).

    Args:
        methods: registered methods: a name, a list of names, or a ``{name: {option: value}}`` mapping
            (``(name, options)`` pairs in a list work too; ``{"layer": "net.7"}`` for a CAM method; without a
            layer, the automatic Grad-CAM layer, chosen once per fit).
        num_samples: probe samples scored (drawn from the validation data, balanced over classes).
        metrics: which of :data:`QUALITY_METRICS` to compute, and their
            options, spelt as ``methods=`` is: a name, a list of names or
            ``(name, {option: value})`` pairs, or a ``{name: {option: value}}``
            mapping (``None``: the defaults). Default: :data:`DEFAULT_METRICS`.
            The options (default), checked at construction:

            - ``deletion``, ``insertion``: ``steps`` (16), parts of the curve;
              ``baseline`` (``"blur"``), what removed pixels become:
              ``"blur"``, ``"mean"`` or ``"zero"``
              (:func:`~lightning_interp.methods.removal_baseline`);
            - ``top_drop``: ``fraction`` (0.2), the share of pixels removed; ``baseline`` (``"blur"``);
            - ``robustness``: ``radius`` (0.02), the noise amplitude as a share
              of each image's value range; ``samples`` (4), noise draws;
            - ``cascading``: ``depth`` (3), layers re-initialised from the output down;
            - ``sanity``, ``sparseness``, ``localization``, ``confidence``: none.
        target: ``"pred"`` (the prediction; default) or ``"label"``.
        task: the output kind (``"auto"``: inferred from the output's width and the labels, as the map callbacks do);
            a multi-label model follows its top label, a regression model its first output.
        channel_reduction: how input attributions become one value per pixel.
        random_reference: also score random maps, the chance level of each metric.
        seed: seed of the callback's generator (stochastic methods, random pixels, noise), used afresh each run.
        output_transform: picks the (B, C) logits out of the model's output.
        name: tag prefix; distinct names let two instances coexist.
        every_n_epochs: as ``probe``, ``data``, ``display`` and ``forward_fn``, shared by every callback
            (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Raises:
        ValueError: an unknown metric, one given twice, none at all, or an option value out of range.
        TypeError: a metric entry of another form, or an option the metric does not take.

    Example:
        >>> callback = ExplanationQualityCallback(
        ...     ["gradient", ("grad_cam", {"layer": "net.7"})],
        ...     metrics={"deletion": {"steps": 8}, "insertion": None, "robustness": {"radius": 0.05}},
        ... )
        >>> callback.keys
        ['gradient', 'grad_cam@net.7']
        >>> callback.metrics
        ('deletion', 'insertion', 'robustness')
        >>> callback.metric_options["deletion"], callback.metric_options["robustness"]
        ({'steps': 8, 'baseline': 'blur'}, {'radius': 0.05, 'samples': 4})
        >>> ExplanationQualityCallback(metrics={"deletion": {"fraction": 0.1}})
        Traceback (most recent call last):
        ...
        TypeError: ...(metrics=...): deletion takes no option(s) ['fraction']; its options are: steps, baseline.
    """

    METRIC_OPTIONS: ClassVar[dict[str, dict[str, tuple[Any, _Check]]]] = {
        "deletion": {"steps": (16, _STEPS), "baseline": ("blur", _BASELINE)},
        "insertion": {"steps": (16, _STEPS), "baseline": ("blur", _BASELINE)},
        "top_drop": {"fraction": (0.2, _FRACTION), "baseline": ("blur", _BASELINE)},
        "sanity": {},
        "sparseness": {},
        "localization": {},
        "robustness": {"radius": (0.02, _RADIUS), "samples": (4, _POSITIVE)},
        "cascading": {"depth": (3, _POSITIVE)},
        "confidence": {},
    }
    """metric -> {option: (default, check)}: every metric of :data:`QUALITY_METRICS` and the options it takes."""

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        methods: MethodsArg = DEFAULT_METHODS,
        *,
        num_samples: int = 32,
        metrics: MetricsArg = DEFAULT_METRICS,
        target: Literal["pred", "label"] = "pred",
        task: TaskOption = "auto",
        channel_reduction: Literal["abs_sum", "abs_max", "sum"] = "abs_sum",
        random_reference: bool = True,
        seed: int = 0,
        output_transform: OutputTransform | None = None,
        name: str = "quality",
        every_n_epochs: int = 1,
        probe: ProbeSet | None = None,
        data: DataDescription | None = None,
        display: Display | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
        **unknown: Any,
    ) -> None:
        refuse_unknown_arguments(self, unknown)  # a 0.1 name: what to write instead
        parsed = parse_methods(methods, owner="ExplanationQualityCallback")
        self.methods = tuple(parsed)
        self.method_options = {method: options for method, options in parsed.items() if options}
        self.metric_options = self.parse_metrics(metrics)
        self.metrics = tuple(self.metric_options)
        if target not in ("pred", "label"):
            raise ValueError(f"target must be 'pred' or 'label', got {target!r}.")
        check_arguments(task=task, channel_reduction=channel_reduction, output_transform=output_transform, seed=seed)
        self.target = target
        self.task = task
        self._output_task = "multiclass"  # the kind in force this fit (``task``, or inferred at fit start)
        self.channel_reduction = channel_reduction
        self.random_reference = bool(random_reference)
        self.seed = seed
        self.output_transform = output_transform
        super().__init__(
            name=name,
            num_samples=num_samples,
            every_n_epochs=every_n_epochs,
            probe=probe,
            data=data,
            display=display,
            forward_fn=forward_fn,
        )
        self._layers: dict[str, str] = {}  # per CAM method: its layer this fit (given, or the automatic one)
        self._start_maps: dict[str, Tensor] = {}  # per key: the maps of the network before training, on the CPU
        self._width = 1  # the model's scores per sample, read at fit start
        # the fixed targets (labels, or output 0 of a regression) of one probe set, checked once: (probe, targets)
        self._fixed_targets: tuple[ProbeSet, Tensor] | None = None

    @classmethod
    def parse_metrics(cls, metrics: MetricsArg) -> dict[str, dict[str, Any]]:
        """Check a ``metrics=`` argument against :attr:`METRIC_OPTIONS`; ``{metric: options}`` in the order given,
        each metric's options complete (its defaults where not given).

        Raises:
            ValueError: an unknown metric, one given twice, none at all, or an option value out of range.
            TypeError: an entry of another form, or an option the metric does not take.

        Example:
            >>> ExplanationQualityCallback.parse_metrics(["sparseness", ("top_drop", {"fraction": 0.1})])
            {'sparseness': {}, 'top_drop': {'fraction': 0.1, 'baseline': 'blur'}}
        """
        owner = f"{cls.__name__}(metrics=...)"
        if isinstance(metrics, str):
            entries: list[Any] = [(metrics, None)]
        elif isinstance(metrics, Mapping):
            entries = list(metrics.items())
        else:
            entries = list(metrics)
        parsed: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if isinstance(entry, str):
                metric, chosen = entry, None
            elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
                metric, chosen = entry
            else:
                raise TypeError(
                    f"{owner} takes a metric name, a list of names or (name, {{option: value}}) pairs, or a "
                    f"{{name: {{option: value}}}} mapping; got the entry {entry!r}."
                )
            if metric not in cls.METRIC_OPTIONS:
                raise ValueError(
                    f"Unknown quality metric {metric!r} in {owner}; choose from: {', '.join(cls.METRIC_OPTIONS)}."
                )
            if chosen is not None and not isinstance(chosen, Mapping):
                raise TypeError(f"{owner}: the options of {metric!r} must be a mapping, got {chosen!r}.")
            if metric in parsed:
                raise ValueError(f"{owner} lists {metric!r} twice.")
            table = cls.METRIC_OPTIONS[metric]
            chosen = dict(chosen or {})
            unknown = sorted(set(chosen) - set(table), key=str)
            if unknown:
                takes = f"its options are: {', '.join(table)}" if table else "it takes none"
                raise TypeError(f"{owner}: {metric} takes no option(s) {unknown}; {takes}.")
            options: dict[str, Any] = {}
            for option, (default, check) in table.items():
                value = chosen.get(option, default)
                if not check.accepts(value):
                    raise ValueError(f"{owner}: {metric}'s {option} must be {check.wants}, got {value!r}.")
                options[option] = float(value) if isinstance(default, float) else value
            parsed[metric] = options
        if not parsed:
            raise ValueError(f"{owner} names no metric; choose from: {', '.join(cls.METRIC_OPTIONS)}.")
        return parsed

    @property
    def keys(self) -> list[str]:
        """The tag segment of each method: its name, ``name@layer`` for a CAM method with a given layer."""
        return [_key(method, self.method_options.get(method, {})) for method in self.methods]

    def _needs_labels(self) -> bool:
        return self.target == "label"

    def _labels_reason(self) -> str:
        return "ExplanationQualityCallback(target='label') explains each sample for its label"

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._layers = {}
        self._start_maps = {}
        self._fixed_targets = None

    # ------------------------------------------------------------------ checks and the untrained network's maps
    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for method in self.methods:
            layer = self.method_options.get(method, {}).get("layer")
            if isinstance(layer, str):
                get_module(pl_module, layer)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        if probe.inputs.ndim != 4:
            raise ValueError(
                "ExplanationQualityCallback removes and adds pixels of images (N, C, H, W); the validation inputs "
                f"are {tuple(probe.inputs.shape)}."
            )
        sample = probe.subset(min(2, len(probe)))
        with torch.no_grad(), modes_preserved(pl_module), eager_forward(), self._model_context(trainer):
            two = self._probe_inputs(trainer, pl_module, sample)
            width = scores_from_output(self._explained(pl_module, sample)(two), self.output_transform).shape[1]
        self._output_task = infer_task(width, probe.labels, self.task)
        self._width = width
        self._fixed_targets = None
        if self.target == "label" and self._output_task not in ("multiclass", "binary"):
            raise ValueError(
                f"ExplanationQualityCallback(target='label') explains each sample for its class, but the model's "
                f"output is {self._output_task}; use target='pred'."
            )
        self._layers = {}
        for method in self.methods:
            options = self.method_options.get(method, {})
            if METHODS[method].needs_layer:
                layer = options.get("layer")
                if layer is None:
                    labels = self._labels(probe)
                    layer = self._automatic_cam_layer(trainer, pl_module, probe, labels, self.output_transform)
                self._layers[method] = str(layer)

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        two = probe.subset(min(2, len(probe)))
        inputs = self._probe_inputs(trainer, pl_module, two)
        pl_module = self._explained(pl_module, two)
        target = self._targets(trainer, pl_module, inputs, two)
        for method in self.methods:
            self._maps(trainer, pl_module, method, inputs, target)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "cascading" in self.metric_options and is_lockstep(trainer):
            raise ValueError(
                "ExplanationQualityCallback: the 'cascading' metric re-initialises layers of a deep copy of the model, "
                f"and under {strategy_name(trainer)} the model's parameters are shards spread over the ranks: a copy "
                "of them is no model that can be explained on its own. Leave 'cascading' out of metrics= in sharded "
                "runs (the other metrics work), or measure it with strategy='ddp' or on a single device."
            )
        super().setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if "sanity" not in self.metrics or self._start_maps:
            return  # resumed: the maps of the untrained network came with the checkpoint
        lockstep = is_lockstep(trainer)  # sharded parameters: every rank joins each forward pass
        if not (trainer.is_global_zero or lockstep):
            return
        if trainer.global_step > 0 or self.probe is None or not self._prepared:
            self._warn_once(
                "no start",
                "ExplanationQualityCallback: the maps of the untrained network could not be taken at train start ("
                + ("training resumed from a checkpoint without them" if trainer.global_step > 0 else "no probe yet")
                + "), so sanity_rank_correlation is not logged in this fit.",
            )
            return
        if lockstep:
            run_in_lockstep(
                pl_module,
                lambda: self._take_start_maps(trainer, pl_module),
                "ExplanationQualityCallback's maps of the untrained network at train start",
            )
        else:
            self._take_start_maps(trainer, pl_module)

    def _take_start_maps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The maps of the untrained network, per method (for ``sanity_rank_correlation``)."""
        assert self.probe is not None
        explained = self._explained(pl_module)
        inputs = self._probe_inputs(trainer, pl_module)
        target = self._targets(trainer, explained, inputs, self.probe)
        maps = {
            key: self._maps(trainer, explained, method, inputs, target)
            for method, key in zip(self.methods, self.keys, strict=True)
        }
        self._start_maps = {key: value.float().cpu() for key, value in maps.items()}  # all or none

    # ------------------------------------------------------------------ the run
    def _labels(self, probe: ProbeSet) -> Tensor | None:
        return None if probe.labels is None else class_labels(probe.labels, "multiclass")

    def _targets(self, trainer: pl.Trainer, model: nn.Module, inputs: Tensor, probe: ProbeSet) -> Tensor:
        """(N,) the explained output per sample: the predicted class (the top label; for regression output 0), or the
        label.

        The index comes out of :func:`~lightning_interp.methods.resolve_target`, so the explainers take it as checked
        and do not read it back from the device: the prediction needs no check, and a fixed target (the labels, or
        output 0 of a regression) is checked once per probe set, from the host.
        """
        task = self._output_task
        if self.target == "label" or task == "regression":
            cached = self._fixed_targets
            if cached is not None and cached[0] is probe and cached[1].device == inputs.device:
                return cached[1]
            if self.target == "label":
                assert probe.labels is not None
                fixed = class_labels(probe.labels, task).long()
            else:
                fixed = torch.zeros(inputs.shape[0], dtype=torch.long)
            # only the shape and the device of the scores matter to the check: a stand-in allocates nothing
            shape = torch.empty((), device=inputs.device).expand(inputs.shape[0], self._width)
            index = resolve_target(fixed, shape, task)
            self._fixed_targets = (probe, index)
            return index
        with torch.no_grad(), modes_preserved(model), eager_forward(), self._model_context(trainer):
            scores = scores_from_output(model(inputs), self.output_transform)
            return resolve_target(None, scores, task)  # the prediction, as prediction_and_confidence gives it

    def explainer(self, method: str) -> Explainer:
        """The :class:`~lightning_interp.methods.Explainer` of one method as this fit runs it: its options, its layer
        (given, or the automatic one chosen at fit start), the output kind in force, ``output_transform`` and
        ``seed``."""
        options = dict(self.method_options.get(method, {}))
        if METHODS[method].needs_layer and method in self._layers:
            options["layer"] = self._layers[method]
        return Explainer(
            {method: options}, task=self._output_task, output_transform=self.output_transform, seed=self.seed
        )

    def _maps(self, trainer: pl.Trainer, model: nn.Module, method: str, inputs: Tensor, target: Tensor) -> Tensor:
        """(N, H, W) float32 maps of ``method``, one value per pixel, as the map callbacks show them."""
        explainer = self.explainer(method)
        with self._model_context(trainer):
            result = explainer(model, inputs, target)
        return result.maps(self.channel_reduction)[explainer.keys[0]].detach()

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        probe = self.probe
        assert probe is not None
        model = self._explained(pl_module)
        inputs = self._probe_inputs(trainer, pl_module)
        target = self._targets(trainer, model, inputs, probe)
        task = self._output_task
        masks = probe.masks if probe.masks is not None and probe.masks.ndim == 3 else None  # image masks only
        masks = masks if masks is not None and masks.shape[-2:] == inputs.shape[-2:] else None
        values: dict[str, dict[str, Tensor]] = {}
        for method, key in zip(self.methods, self.keys, strict=True):
            maps = self._maps(trainer, model, method, inputs, target)
            values[key] = self._scores(trainer, model, method, key, inputs, maps, target, task, masks)
        if self.random_reference:
            generator = torch.Generator(device=inputs.device).manual_seed(self.seed + 3)
            noise = torch.rand(inputs.shape[0], *inputs.shape[2:], generator=generator, device=inputs.device)
            values[RANDOM_KEY] = self._scores(trainer, model, None, RANDOM_KEY, inputs, noise, target, task, masks)
        # one transfer for every number of the run
        flat = [(key, metric, value) for key, scores in values.items() for metric, value in scores.items()]
        numbers = torch.stack([value.double().reshape(()) for _, _, value in flat]).tolist() if flat else []
        table: dict[str, dict[str, float]] = {key: {} for key in values}
        scalars: dict[str, float] = {}
        for (key, metric, _), number in zip(flat, numbers, strict=True):
            table[key][metric] = number
            scalars[f"interp_{self.name}/{key}/{metric}"] = number
        for key, row in table.items():
            if any(math.isnan(v) for v in row.values()):
                self._warn_once(
                    f"nan {key}",
                    f"ExplanationQualityCallback: some scores of {key!r} are NaN at epoch {trainer.current_epoch} "
                    "(all-zero or constant maps, e.g. no gradient reaching the input or the layer); they are "
                    "logged as NaN and left out of the ranking while this lasts (warned once per fit).",
                )
        if len(table) >= 2:
            step, epoch = logging_step(trainer), trainer.current_epoch
            snapshot = {key: dict(row) for key, row in table.items()}

            def draw() -> None:
                image = comparison_image(snapshot, title=f"explanation quality (epoch {epoch}): {_described(snapshot)}")
                log_image(trainer, f"interp_{self.name}/comparison", image, step)

            self._submit(trainer, draw)
        return scalars

    def _scores(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        method: str | None,
        key: str,
        inputs: Tensor,
        maps: Tensor,
        target: Tensor,
        task: str,
        masks: Tensor | None,
    ) -> dict[str, Tensor]:
        """The metrics of one method's maps (``method`` None: the random reference), as 0-dim tensors where the model
        is."""
        options = self.metric_options
        common = {"output_transform": self.output_transform, "task": task}
        scores: dict[str, Tensor] = {}
        with self._model_context(trainer):
            if "deletion" in options:
                curve = perturbation_curve(model, inputs, maps, target, **options["deletion"], **common)
                scores["deletion_auc"] = _nanmean(curve_auc(curve))
            if "insertion" in options:
                curve = perturbation_curve(
                    model, inputs, maps, target, mode="insertion", **options["insertion"], **common
                )
                scores["insertion_auc"] = _nanmean(curve_auc(curve))
            if "top_drop" in options:
                generator = torch.Generator(device=inputs.device).manual_seed(self.seed + 1)
                top, random = top_fraction_drop(
                    model, inputs, maps, target, **options["top_drop"], generator=generator, **common
                )
                scores["top_drop"], scores["random_drop"] = _nanmean(top), _nanmean(random)
                scores["top_drop_gain"] = _nanmean(top - random)
            if "confidence" in options:
                original, kept = masked_confidence(model, inputs, maps, target, **common)
                scores["average_drop"] = _nanmean((original - kept).clamp_min(0) / original)
                scores["increase_in_confidence"] = _nanmean((kept > original).float())
        if "sanity" in self.metrics and key in self._start_maps:
            start = self._start_maps[key]
            if start.shape == maps.shape:
                scores["sanity_rank_correlation"] = _nanmean(sanity_similarity(maps, start))
        if "sparseness" in self.metrics:
            scores["sparseness"] = _nanmean(sparseness(maps))
        if "localization" in self.metrics and masks is not None:
            scores["localization"] = _nanmean(localization(maps.clamp_min(0), masks.to(maps.device)))
        if "cascading" in options and method is not None:
            try:
                cascade = cascading_randomization(
                    model,
                    lambda net: self._maps(trainer, net, method, inputs, target),
                    depth=options["cascading"]["depth"],
                    seed=self.seed + 4,
                    reference=maps,
                )
            except (RuntimeError, TypeError, copy.Error) as error:  # e.g. a model that cannot be deep-copied
                self._warn_once(
                    "cascade",
                    f"ExplanationQualityCallback: the cascading randomisation needs a deep copy of the model, which "
                    f"failed ({error!r}); it is skipped in this fit.",
                )
                cascade = {}
            for layer, correlation in cascade.items():
                scores[f"cascade/{plain_name(layer)}"] = _nanmean(correlation)
        if "robustness" in options and method is not None:
            generator = torch.Generator(device=inputs.device).manual_seed(self.seed + 2)
            sensitivity = max_sensitivity(
                lambda batch: self._maps(trainer, model, method, batch, target),
                inputs,
                radius=options["robustness"]["radius"],
                n_samples=options["robustness"]["samples"],
                generator=generator,
            )
            scores["max_sensitivity"] = _nanmean(sensitivity)
        return scores

    # ------------------------------------------------------------------ checkpoint: the untrained network's maps
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["start_maps"] = {key: maps.half() for key, maps in self._start_maps.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._start_maps = {key: maps.float() for key, maps in state_dict.get("start_maps", {}).items()}


def _key(method: str, options: dict[str, Any]) -> str:
    layer = options.get("layer")
    return f"{method}@{layer}" if isinstance(layer, str) else method


def _described(table: dict[str, dict[str, float]]) -> str:
    methods = len([key for key in table if key != RANDOM_KEY])
    return f"{methods} method{'s' if methods != 1 else ''}" + (" and random maps" if RANDOM_KEY in table else "")
