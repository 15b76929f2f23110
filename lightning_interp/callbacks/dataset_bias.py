"""DatasetBiasCallback: class balance of the training and validation data, and which classes the model neglects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_interp._logging import log_image, log_scalars, logging_step
from lightning_interp.callbacks._base import _first_loader, class_name
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._outputs import ValidationOutputsCallback
from lightning_interp.methods import (
    METHODS,
    ClassAttribution,
    ClassBalance,
    Explainer,
    MethodsArg,
    OutputTransform,
    class_attribution,
    class_balance,
    class_labels,
    eager_forward,
    for_rows,
    get_module,
    label_kind,
    modes_preserved,
    parse_methods,
    per_class_metrics,
    scores_from_output,
)
from lightning_interp.probe import ProbeSet, dataset_labels, sampled_indices, scannable
from lightning_interp.visualize import class_counts_image, class_lift_image, confusion_image

__all__ = ["DatasetBiasCallback"]


class DatasetBiasCallback(ValidationOutputsCallback):
    """Log how the classes are balanced in the data, and which classes the model gets wrong, while it trains.

    At the start of training, from the datasets' own label lists (the
    ``targets`` / ``labels`` attribute of torchvision datasets and
    ``ImageFolder``, a ``TensorDataset``'s second tensor, through ``Subset``
    and ``ConcatDataset``; no image is loaded and no random state is used),
    restricted to the samples the loaders' samplers yield (a sampler-based
    split and ``limit_val_batches`` are honoured):

    - ``interp_<name>/train/imbalance_ratio`` and ``val/imbalance_ratio``:
      the largest class count over the smallest;
    - ``class_counts``: a bar chart of both sets' class counts;
    - a warning when a set's ratio exceeds ``imbalance_warning`` (default 10),
      naming its rarest class. A dataset that lists no labels is skipped with
      a warning (counting would mean loading every sample).

    At each due validation epoch, from the logits of the validation pass the
    trainer already runs (no extra forward; see
    :class:`~lightning_interp.callbacks.CalibrationCallback` for how they are
    read), per class (torchmetrics):

    - ``<class>/recall`` and ``<class>/precision``;
    - ``recall_gap``: best minus worst class recall, and ``worst_recall``;
    - ``confusion``: the confusion matrix, rows normalised to the true class.

    Multi-class (C logits) and binary (one logit) models with class-index or
    one-hot labels are supported. Under DDP the per-epoch numbers are those of
    rank zero's share of the validation set.

    **Spurious correlations** (``methods="grad_cam"`` or any one registered
    method; off by default): at each due epoch the callback explains
    ``num_samples`` validation images, each for its true class, and
    asks per class where the explanations' mass lies
    (:func:`~lightning_interp.methods.class_attribution`):

    - with object masks in the batches: ``<class>/localization``, the share of
      the map's mass on the object, and ``<class>/localization_lift``, that
      share over a uniform map's (1: the object is not favoured at all);
      ``min_localization_lift``; and a warning, once per fit, when one class
      sits near 1 while the others are well above: the model recognises that
      class by something outside the object, such as a background colour
      that comes with it in the data;
    - without masks, a cheap proxy: ``<class>/border_share``, the share of the
      map's magnitude in the outer ``border_fraction`` band of the image, and
      ``<class>/border_lift`` over a uniform map's; ``max_border_lift``. It
      means something only where objects sit near the centre (object-centred
      photos): it cannot tell an object that fills the frame from background,
      nor a cue in the centre from the object;
    - ``attribution_by_class``: a bar chart of the lifts.

    Cost: one attribution pass over the explained samples per due epoch (one
    forward and backward for Grad-CAM and gradients).

    Args:
        imbalance_warning: the class-count ratio above which a set is warned about.
        output_transform: picks the (B, C) logits out of the model's output.
        methods: one registered method (``available_methods()``) for the spurious-correlation check, as a name or a
            ``{name: {option: value}}`` mapping, e.g. ``{"grad_cam": {"layer": "net.7"}}`` (a CAM method without a
            layer gets the automatic Grad-CAM layer, chosen once per fit as ``GradCAMCallback(layer="auto")`` does);
            None (the default) for none. It runs through a :class:`~lightning_interp.methods.Explainer` with the
            callback's own ``seed``, so stochastic methods leave the global RNG alone.
        num_samples: validation images explained per due epoch (images (N, C, H, W) only), with ``methods``.
        seed: seed of the stochastic methods' generator, afresh at every run.
        border_fraction: width of the border band, as a fraction of each side, for the measure without masks.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``data``, ``display``
            (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> DatasetBiasCallback(imbalance_warning=5.0).imbalance_warning
        5.0
        >>> DatasetBiasCallback(methods={"grad_cam": {"layer": "net.7"}}).num_samples
        256
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        imbalance_warning: float = 10.0,
        *,
        output_transform: OutputTransform | None = None,
        methods: MethodsArg | None = None,
        num_samples: int = 256,
        seed: int = 0,
        border_fraction: float = 0.15,
        name: str = "bias",
        **kwargs: Any,
    ) -> None:
        if not imbalance_warning >= 1:
            raise ValueError(f"imbalance_warning must be a ratio >= 1, got {imbalance_warning!r}.")
        parsed = {} if methods is None else parse_methods(methods, owner="DatasetBiasCallback")
        if len(parsed) > 1:
            raise ValueError(
                f"DatasetBiasCallback compares where one method's maps lie across classes; methods= names "
                f"{list(parsed)}. Give one (a second DatasetBiasCallback(name=...) can watch another)."
            )
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}.")
        check_arguments(border_fraction=border_fraction, seed=seed)
        self.methods = tuple(parsed)
        self.method_options = {method: options for method, options in parsed.items() if options}
        self.seed = seed
        self.border_fraction = float(border_fraction)
        super().__init__(name=name, output_transform=output_transform, **kwargs)
        if self.methods:
            self.num_samples = num_samples  # the probe is drawn at setup, with this many samples
        self.imbalance_warning = float(imbalance_warning)
        self.balances: dict[str, ClassBalance] = {}
        self.class_attribution: ClassAttribution | None = None
        self._warned_background = False
        self._layer: str | None = None  # the automatic CAM layer of this fit
        self._probe_classes: _ProbeClasses | None = None  # what the probe's labels give, read once per probe set

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.balances = {}
        self.class_attribution = None
        self._warned_background = False
        self._layer = None
        self._probe_classes = None

    @property
    def method(self) -> str | None:
        """The method of the spurious-correlation check, or None."""
        return self.methods[0] if self.methods else None

    def _needs_labels(self) -> bool:
        return self.method is not None

    def _labels_reason(self) -> str:
        return "DatasetBiasCallback(methods=...) explains each sample for its true class, so it needs labels"

    def _class_name(self, k: int) -> str:
        return class_name(self.class_names, k)

    # ------------------------------------------------------------------ class counts, at the start of training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        loaders = {
            "train": (_first_loader(trainer.train_dataloader), trainer.limit_train_batches),
            "val": (self._current_loader(trainer), trainer.limit_val_batches),
        }
        for split, (loader, limit) in loaders.items():
            labels = _loader_labels(loader, limit)
            if labels is None:
                self._warn(
                    f"DatasetBiasCallback: the {split} data is not a map-style dataset that lists its labels (a "
                    "`targets` or `labels` attribute, or a TensorDataset), so its class counts are skipped: counting "
                    "them would load every sample (or consume a stream)."
                )
                continue
            self.balances[split] = class_balance(labels)
        if not self.balances:
            return
        classes = max(balance.counts.numel() for balance in self.balances.values())
        self.balances = {split: class_balance(_labels_of(b), classes) for split, b in self.balances.items()}
        scalars = {
            f"interp_{self.name}/{split}/imbalance_ratio": b.imbalance_ratio for split, b in self.balances.items()
        }
        for split, balance in self.balances.items():
            if balance.imbalance_ratio > self.imbalance_warning:
                self._warn(
                    f"DatasetBiasCallback: the {split} set is imbalanced: class {self._class_name(balance.rarest)!r} "
                    f"has {int(balance.counts[balance.rarest])} samples, class "
                    f"{self._class_name(balance.commonest)!r} {int(balance.counts[balance.commonest])} (ratio "
                    f"{balance.imbalance_ratio:.3g} > imbalance_warning={self.imbalance_warning:g}). Expect its "
                    "recall to lag; consider class weights or a balanced sampler."
                )
        log_scalars(trainer, scalars, logging_step(trainer))
        self._log_warnings(trainer, logging_step(trainer))  # the report's top says the imbalance
        counts = {split: b.counts.clone() for split, b in self.balances.items()}
        names = [self._class_name(k) for k in range(classes)]
        step = logging_step(trainer)

        def draw() -> None:
            log_image(trainer, f"interp_{self.name}/class_counts", class_counts_image(counts, names), step)

        self._submit(trainer, draw)

    # ------------------------------------------------------------------ where each class's explanations lie
    def _check_model(self, pl_module: pl.LightningModule) -> None:
        layer = self.method_options.get(self.method or "", {}).get("layer")
        if isinstance(layer, str):
            get_module(pl_module, layer)  # a wrong name fails now, with the closest names

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        if self.method is None:
            return
        if probe.inputs.ndim != 4:
            raise ValueError(
                f"DatasetBiasCallback(methods={self.method!r}) compares where each class's explanations "
                f"lie in images (N, C, H, W); the validation inputs are {tuple(probe.inputs.shape)}. Leave "
                "methods=None for this data."
            )
        if probe.labels is None or label_kind(probe.labels) not in ("class", "one_hot"):
            kind = "no" if probe.labels is None else label_kind(probe.labels)
            raise ValueError(
                f"DatasetBiasCallback(methods=...) explains each sample for its class; the validation batches "
                f"carry {kind} labels, not class indices or one-hot rows. Leave methods=None for this data."
            )
        sample = probe.subset(min(2, len(probe)))
        with torch.no_grad(), modes_preserved(pl_module), eager_forward(), self._model_context(trainer):
            two = self._probe_inputs(trainer, pl_module, sample)
            width = scores_from_output(self._explained(pl_module, sample)(two), self.output_transform).shape[1]
        if width < 2:
            raise ValueError(
                "DatasetBiasCallback(methods=...) explains each sample for its own class and needs one score per "
                f"class; the model gives {width}. Leave methods=None for a binary (one-logit) model."
            )
        self._layer = None
        if METHODS[self.method].needs_layer and self.method_options.get(self.method, {}).get("layer") is None:
            # the automatic CAM layer, chosen once per fit (on the run's shared dry forward), not at every call
            labels = class_labels(probe.labels, "multiclass")
            self._layer = self._automatic_cam_layer(trainer, pl_module, probe, labels, self.output_transform)

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        if self.method is not None:
            self._attribution_maps(trainer, pl_module, probe.subset(min(2, len(probe))))

    def _attribution_maps(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        probe: ProbeSet,
        targets: list[Tensor] | None = None,
    ) -> Tensor:
        """(N, H, W) non-negative maps of ``probe``'s images, each explained for its true class.

        ``targets``: the explained class of each chunk of 64 samples, from the host labels where None or where an
        entry is missing; the target each explanation resolved replaces its entry (on the model's device and checked
        once: given back at the next run, it is not read again).
        """
        assert probe.labels is not None
        model = self._explained(pl_module, probe)
        explainer = self.explainer()
        maps = []
        for chunk, start in enumerate(range(0, len(probe), 64)):
            inputs = self._device_inputs(trainer, pl_module, probe.inputs[start : start + 64])
            bound = for_rows(model, slice(start, start + 64))
            if targets is not None and chunk < len(targets):
                target = targets[chunk]
            else:  # the host labels: their check reads no value back from the device
                target = class_labels(probe.labels[start : start + 64], "multiclass")
            with self._model_context(trainer):
                explained = explainer(bound, inputs, target)
            if targets is not None:
                targets[chunk : chunk + 1] = [explained.target]
            maps.append(explained.maps()[explainer.keys[0]].detach())
        return torch.cat(maps)

    def _classes_of(self, probe: ProbeSet) -> _ProbeClasses:
        """The (N,) class labels of ``probe`` and what follows from them, computed at its first run and kept while
        the probe set is the same (it is fixed for a fit)."""
        cached = self._probe_classes
        if cached is None or cached.probe is not probe:
            assert probe.labels is not None
            labels = class_labels(probe.labels, "multiclass")
            cached = _ProbeClasses(probe=probe, labels=labels, classes=int(labels.max()) + 1, targets=[])
            self._probe_classes = cached
        return cached

    def explainer(self) -> Explainer:
        """The :class:`~lightning_interp.methods.Explainer` of the spurious-correlation check: the method, its options,
        its layer (given, or the automatic one of this fit), ``output_transform`` and ``seed``."""
        assert self.method is not None
        options = dict(self.method_options.get(self.method, {}))
        if self._layer is not None:
            options["layer"] = self._layer
        return Explainer({self.method: options}, output_transform=self.output_transform, seed=self.seed)

    def _spurious(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, recall: list[float] | None
    ) -> dict[str, float]:
        probe = self.probe
        assert probe is not None and probe.labels is not None
        known = self._classes_of(probe)
        maps = self._attribution_maps(trainer, pl_module, probe, known.targets)
        labels, classes = known.labels, known.classes
        if self.balances:
            classes = max(classes, max(balance.counts.numel() for balance in self.balances.values()))
        masks = probe.masks if probe.masks is not None and probe.masks.ndim == 3 else None  # image masks only
        masks = masks if masks is not None and masks.shape[-2:] == maps.shape[-2:] else None
        found = class_attribution(maps, labels, classes, masks=masks, border_fraction=self.border_fraction)
        self.class_attribution = found
        measure = found.measure
        lift_name = "localization_lift" if measure == "localization" else "border_lift"
        lifts = found.lift
        # one read of the (host) values; the scalars come from the lists
        scores, lift_values, counts = torch.stack([found.scores, lifts, found.counts.double()]).tolist()
        scalars: dict[str, float] = {}
        for k in range(classes):
            if counts[k] > 0:
                scalars[f"interp_{self.name}/{self._class_name(k)}/{measure}"] = scores[k]
                scalars[f"interp_{self.name}/{self._class_name(k)}/{lift_name}"] = lift_values[k]
        present = [lift for lift in lift_values if not math.isnan(lift)]
        if present:
            if measure == "localization":
                scalars[f"interp_{self.name}/min_{lift_name}"] = min(present)
            else:
                scalars[f"interp_{self.name}/max_{lift_name}"] = max(present)
        if measure == "localization":
            self._warn_background(trainer, lift_values, recall)
        names = [self._class_name(k) for k in range(classes)]
        step, epoch, method = logging_step(trainer), trainer.current_epoch, self.method

        def draw() -> None:
            image = class_lift_image(
                lifts, names, measure, title=f"where the {method} maps of each true class lie (epoch {epoch})"
            )
            log_image(trainer, f"interp_{self.name}/attribution_by_class", image, step)

        self._submit(trainer, draw)
        return scalars

    def _warn_background(self, trainer: pl.Trainer, lifts: list[float], recall: list[float] | None) -> None:
        """Once per fit: a class the model gets right (recall >= 0.5) whose maps favour its objects no more than a
        uniform map does, while the other classes' maps clearly favour theirs (``lifts`` and ``recall`` per class, on
        the host)."""
        if self._warned_background:
            return
        learnt = [not math.isnan(lift) for lift in lifts]
        if recall is not None and len(recall) == len(lifts):
            # a class not learnt at all (NaN recall counts as 0): its low recall says so
            learnt = [ok and (0.0 if math.isnan(r) else r) >= 0.5 for ok, r in zip(learnt, recall, strict=True)]
        if sum(learnt) < 3:
            return
        k = min(range(len(lifts)), key=lambda i: lifts[i] if learnt[i] else math.inf)  # the first of ties
        others = sorted(lift for i, lift in enumerate(lifts) if learnt[i] and i != k)
        median = others[(len(others) - 1) // 2]  # the lower of the two middle values, as torch.median
        if lifts[k] < 1.25 and median > 1.5:
            self._warned_background = True
            got = "" if recall is None else f" although it recognises {recall[k]:.0%} of them"
            self._warn(
                f"DatasetBiasCallback: at epoch {trainer.current_epoch} the {self.method} maps of class "
                f"{self._class_name(k)!r} put no more of their mass on the object than a uniform map would"
                f"{got} (localization lift {lifts[k]:.2f}; the other classes' median "
                f"{median:.2f}). The model may recognise this class by its background or context "
                "rather than the object: a spurious correlation in the data (look at its maps, and at images of it "
                "with other backgrounds)."
            )

    # ------------------------------------------------------------------ per-class quality, every validation
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        scalars, recall = self._per_class_quality(trainer)
        if self.method is not None:
            scalars.update(self._spurious(trainer, pl_module, recall))
        return scalars

    def _per_class_quality(self, trainer: pl.Trainer) -> tuple[dict[str, float], list[float] | None]:
        """The per-class scalars of the validation pass, and the K recalls (None without usable outputs)."""
        collected = self._collected()
        if collected is None:
            return {}, None
        logits, labels = collected
        binary = logits.shape[1] == 1
        predictions = (logits[:, 0] > 0).long() if binary else logits.argmax(dim=1)
        classes = 2 if binary else logits.shape[1]
        # the predictions and the labels (checked by _collected) lie in [0, classes): no unique() to check them
        metrics = per_class_metrics(predictions, labels, classes, validate=False)
        recall, precision = torch.stack([metrics.recall, metrics.precision]).tolist()  # host values, read once
        scalars: dict[str, float] = {}
        for k in range(classes):
            for what, values in (("recall", recall), ("precision", precision)):
                value = values[k]
                if value == value:  # NaN: the class has no sample / no prediction, nothing to log
                    scalars[f"interp_{self.name}/{self._class_name(k)}/{what}"] = value
        recalls = [value for value in recall if value == value]
        if recalls:
            scalars[f"interp_{self.name}/recall_gap"] = max(recalls) - min(recalls)
            scalars[f"interp_{self.name}/worst_recall"] = min(recalls)
        confusion, names = metrics.confusion, [self._class_name(k) for k in range(classes)]
        step, epoch = logging_step(trainer), trainer.current_epoch

        def draw() -> None:
            image = confusion_image(confusion, names, title=f"confusion (epoch {epoch}), rows: true class")
            log_image(trainer, f"interp_{self.name}/confusion", image, step)

        self._submit(trainer, draw)
        return scalars, recall


def _loader_labels(loader: Any, limit: int | float | None) -> Tensor | None:
    """The labels of the samples ``loader`` yields (within ``limit`` batches), from the dataset's label list."""
    if loader is None or not scannable(loader):
        return None
    labels = dataset_labels(loader.dataset)
    if labels is None or labels.numel() == 0:
        return None
    return labels[sampled_indices(loader, limit)]


def _labels_of(balance: ClassBalance) -> Tensor:
    """Labels with the same counts as ``balance`` (to recount them over more classes)."""
    return torch.repeat_interleave(torch.arange(balance.counts.numel()), balance.counts)


@dataclass
class _ProbeClasses:
    """What a probe set's labels give, once per probe set: its (N,) class labels (on the host), the number of classes
    they span, and the explained class of each chunk of samples as the explanations resolved it (on the model's
    device, filled at the first run)."""

    probe: ProbeSet
    labels: Tensor
    classes: int
    targets: list[Tensor] = field(default_factory=list)
