"""LinearProbeCallback: how linearly decodable the labels are from each layer, every validation epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._base import class_name
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._representation import RepresentationCallback
from lightning_interp.methods import (
    GRADIENT_TOLERANCE,
    PROBE_ITERATIONS,
    ProbeSplit,
    TaskOption,
    class_labels,
    fit_probes,
    label_kind,
)
from lightning_interp.probe import ProbeSet, labels_of_the_data
from lightning_interp.visualize import line_image

POOLING_TITLES = {
    "cls": "first token",
    "mean": "mean over real tokens",
    "last": "last real token",
    "flatten": "every token",
}


class LinearProbeCallback(RepresentationCallback):
    """Fit a linear classifier (or regression) on each layer's outputs and log its held-out accuracy (or R²).

    At each due validation epoch the callback captures the layers' outputs on
    its probe set (one no-grad forward in chunks; conv maps average-pooled to
    at most ``max_features`` values per sample; everything stays on the
    model's device, the probes are fit there too), splits the probe samples once
    and for all into a stratified training and held-out half, standardises with
    the training half's statistics, fits one probe per layer and logs, under
    ``interp_<name>/``:

    - ``<layer>/accuracy``: held-out accuracy, the meaningful number (also in
      ``trainer.callback_metrics``, so EarlyStopping / ModelCheckpoint can
      monitor it);
    - ``<layer>/train_accuracy``: accuracy on the probe's own training half
      (how well it fits; far above ``accuracy`` means the layer is wide enough
      to memorise the probe set);
    - ``accuracy_by_depth``: a figure of both across the layers, with chance level.

    Labels of every kind: class indices and one-hot rows fit one multi-class
    probe; multi-hot (N, K) labels fit one binary probe per label and log the
    mean of their accuracies (chance: the mean share of each label's majority
    value); real-valued targets fit ridge regression and log ``<layer>/r2`` and
    ``<layer>/train_r2`` (held-out and training R²) and ``r2_by_depth``.

    Args:
        layers: ``"auto"`` or a list of dotted module names.
        num_samples: probe samples (half train the probes, half test them);
            needs labels.
        solver: ``"logistic"`` (multinomial logistic regression, every layer at
            once by a fixed number of Newton steps, see
            :func:`~lightning_interp.methods.fit_probes`) or ``"ridge"`` (closed form).
        l2: penalty strength on standardised features.
        test_fraction: share of each class held out.
        task: what the labels are: ``"auto"`` (class indices and one-hot rows
            are classes, other 0/1 rows are multi-label, other numbers are
            regression targets), or ``"multiclass"``/``"binary"``,
            ``"multilabel"``, ``"regression"`` to say so (e.g. for whole-number
            regression targets such as ages).
        seed: seed of the split.
        max_layers: most layers picked by ``"auto"``.
        max_features: per-layer feature bound.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``probe``, ``data``, ``display`` (see
            :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> LinearProbeCallback(layers=["net.3", "net.6"], num_samples=512).layers
        ['net.3', 'net.6']
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        layers: str | Sequence[str] = "auto",
        *,
        num_samples: int = 1024,
        solver: Literal["logistic", "ridge"] = "logistic",
        l2: float = 1e-3,
        test_fraction: float = 0.5,
        task: TaskOption = "auto",
        seed: int = 0,
        max_layers: int = 6,
        max_features: int = 2048,
        name: str = "probe",
        **kwargs: Any,
    ) -> None:
        check_arguments(solver=solver, test_fraction=test_fraction, task=task, seed=seed)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}.")
        super().__init__(
            name=name,
            layers=layers,
            max_layers=max_layers,
            max_features=max_features,
            num_samples=num_samples,
            **kwargs,
        )
        self.solver = solver
        self.l2 = l2
        self.test_fraction = test_fraction
        self.task = task
        self.seed = seed
        self._targets: _Targets | None = None

    def _needs_labels(self) -> bool:
        return True

    def _label_task(self, labels: Tensor) -> str:
        """``"multiclass"``, ``"multilabel"`` or ``"regression"``: which probe the labels get."""
        kind = label_kind(labels)
        task = self.task if self.task != "auto" else {"multi_hot": "multilabel", "continuous": "regression"}.get(kind)
        task = "multiclass" if task in (None, "binary") else task
        wrong = (task == "multiclass" and kind not in ("class", "one_hot", "soft")) or (
            task == "multilabel" and kind not in ("one_hot", "multi_hot")
        )
        if wrong:
            raise ValueError(
                f"LinearProbeCallback(task={self.task!r}) cannot use labels of shape {tuple(labels.shape)} "
                f"({kind.replace('_', '-')}): class probes need class indices or one-hot rows, multi-label probes "
                "(N, K) rows of 0 and 1. Pass task='auto', or data=DataDescription(batch_parser=...) that returns "
                "such labels."
            )
        return task

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        assert probe.labels is not None
        task = self._label_task(labels_of_the_data(probe))
        if self._provisional:  # a stream's first samples: the counts are checked on the probe set itself
            return
        if task == "regression":
            if len(probe) < 4 or bool((probe.labels == probe.labels[0]).all()):
                raise ValueError(
                    f"LinearProbeCallback fits a regression to the probe set's target values and needs at least 4 "
                    f"samples whose targets are not all equal; it has {len(probe)}. Draw more samples (num_samples)."
                )
            return
        if task == "multilabel":
            positive = (probe.labels != 0).sum(dim=0)
            if not bool(((positive >= 2) & (positive <= len(probe) - 2)).any()):
                raise ValueError(
                    "LinearProbeCallback fits one binary probe per label of multi-hot labels, and needs a label with "
                    f"at least two positive and two negative probe samples; none of the {probe.labels.shape[1]} has "
                    f"among the {len(probe)} samples. Draw more samples (num_samples)."
                )
            return
        classes, counts = class_labels(probe.labels, task).unique(return_counts=True)
        if classes.numel() < 2:
            raise ValueError(
                f"LinearProbeCallback needs at least two classes among its probe samples to fit a classifier; all "
                f"{len(probe)} are of class {class_name(self.class_names, int(classes[0]))}. Check the labels, or draw "
                "more samples (num_samples)."
            )
        if int(counts.max()) < 2:
            raise ValueError(
                "LinearProbeCallback holds out part of each class to test the probe, but each of the "
                f"{classes.numel()} classes has a single probe sample ({len(probe)} samples), so nothing is left to "
                "test on. Draw at least two samples per class (a larger num_samples)."
            )

    def _labels_reason(self) -> str:
        return "LinearProbeCallback fits classifiers to the probe set's labels, so it needs labels"

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._targets = None

    def _prepared_targets(self) -> _Targets:
        """The task, the split(s) and the chance level of this fit's probe set, made once (no per-run label work)."""
        assert self.probe is not None and self.probe.labels is not None
        if self._targets is None or self._targets.probe is not self.probe:
            task = self._label_task(labels_of_the_data(self.probe))
            labels = self.probe.labels if task != "multiclass" else class_labels(self.probe.labels, task)
            common = {"test_fraction": self.test_fraction, "seed": self.seed}
            if task == "regression":
                split: ProbeSplit | list[ProbeSplit] = ProbeSplit.regression(labels, **common)
                reference = 0.0
            elif task == "multilabel":
                split = ProbeSplit.per_label(labels, **common)
                positive = (labels != 0).sum(dim=0)
                usable = (positive >= 2) & (positive <= labels.shape[0] - 2)  # the labels that got a probe
                share = positive[usable].double() / labels.shape[0]
                reference = float(torch.maximum(share, 1 - share).mean())
            else:
                split = ProbeSplit.classes(labels, **common)
                reference = float(split.targets.bincount().max()) / len(split)
            self._targets = _Targets(self.probe, task, split, reference)
        return self._targets

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        targets = self._prepared_targets()
        features = self._features(trainer, pl_module)
        task, metric = targets.task, "r2" if targets.task == "regression" else "accuracy"
        scores = fit_probes(list(features.values()), targets.split, solver=self.solver, l2=self.l2)
        values = torch.stack([scores.score, scores.train_score, scores.finite.double(), scores.converged.double()])
        held_out, fitted, finite, converged = values.tolist()  # the one transfer of the run
        scalars: dict[str, float] = {}
        for layer, score, train_score in zip(features, held_out, fitted, strict=True):
            scalars[f"interp_{self.name}/{layer}/{metric}"] = score
            scalars[f"interp_{self.name}/{layer}/train_{metric}"] = train_score
        for layer, ok in zip(features, finite, strict=True):
            if not ok:
                self._warn(
                    f"LinearProbeCallback: layer {layer!r} output NaN or inf at epoch {trainer.current_epoch}; "
                    f"its probe {metric} is logged as NaN."
                )
        slow = [layer for layer, ok, done in zip(features, finite, converged, strict=True) if ok and not done]
        if slow:
            self._warn_once(
                "not converged",
                f"LinearProbeCallback: the logistic probes of {slow} had not converged after their "
                f"{PROBE_ITERATIONS} Newton steps at epoch {trainer.current_epoch}: their held-out predictions were "
                f"still changing and their largest gradient entry was above {GRADIENT_TOLERANCE:g}, so their "
                "accuracies may be a little off (a sample or two). A larger l2 makes the problem easier; "
                "solver='ridge' has a closed form.",
            )
        step, epoch, names = logging_step(trainer), trainer.current_epoch, list(features)
        if task == "regression":
            reference, reference_label, ylim = 0.0, "R² of the mean", (min(-0.05, *held_out, *fitted), 1.02)
        else:
            reference, reference_label, ylim = targets.reference, "chance", (0.0, 1.02)

        def draw() -> None:
            figure = line_image(
                names,
                {"held-out": held_out, "train": fitted},
                title=f"linear probe {'R²' if task == 'regression' else 'accuracy'} by depth (epoch {epoch})"
                + (f"\ntokens pooled: {POOLING_TITLES[self._pooling]}" if self._pooling else ""),
                ylabel="R²" if task == "regression" else "accuracy",
                ylim=ylim if all(map(math.isfinite, ylim)) else None,
                reference=reference,
                reference_label=reference_label,
            )
            log_image(trainer, f"interp_{self.name}/{metric}_by_depth", figure, step)

        self._submit(trainer, draw)
        return scalars


@dataclass(frozen=True)
class _Targets:
    """What the probe set's labels give, prepared once per probe set: the task, the split(s), the chance level."""

    probe: ProbeSet
    task: str
    split: ProbeSplit | list[ProbeSplit]
    reference: float
