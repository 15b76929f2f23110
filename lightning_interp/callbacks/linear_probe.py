"""LinearProbeCallback: how linearly decodable the labels are from each layer, every validation epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_interp._logging import log_image
from lightning_interp.callbacks._representation import RepresentationCallback
from lightning_interp.methods.probes import PROBE_SOLVERS, linear_probe_accuracy
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import line_image


class LinearProbeCallback(RepresentationCallback):
    """Fit a linear classifier on each layer's outputs and log its held-out accuracy.

    At each due validation epoch the callback captures the layers' outputs on
    its probe set (one no-grad forward in chunks; conv maps average-pooled to
    at most ``max_features`` values per sample; everything stays on the
    model's device, the probes are fit there too), splits the probe samples once
    and for all into a stratified training and held-out half, standardises with
    the training half's statistics, fits one probe per layer and logs, under
    ``interp/<name>/``:

    - ``<layer>/accuracy``: held-out accuracy, the meaningful number (also in
      ``trainer.callback_metrics``, so EarlyStopping / ModelCheckpoint can
      monitor it);
    - ``<layer>/train_accuracy``: accuracy on the probe's own training half
      (how well it fits; far above ``accuracy`` means the layer is wide enough
      to memorise the probe set);
    - ``accuracy_by_depth``: a figure of both across the layers, with chance level.

    Args:
        layers: ``"auto"`` or a list of dotted module names.
        num_samples: probe samples (half train the probes, half test them);
            needs labels.
        solver: ``"logistic"`` (full-batch L-BFGS multinomial logistic
            regression) or ``"ridge"`` (closed form).
        l2: penalty strength on standardised features.
        test_fraction: share of each class held out.
        seed: seed of the split.
        max_layers: most layers picked by ``"auto"``.
        max_features: per-layer feature bound.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``probe``, ``batch_parser`` (see
            :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> LinearProbeCallback(layers=["net.3", "net.6"], num_samples=512).layers
        ['net.3', 'net.6']
    """

    def __init__(
        self,
        layers: str | Sequence[str] = "auto",
        *,
        num_samples: int = 1024,
        solver: str = "logistic",
        l2: float = 1e-3,
        test_fraction: float = 0.5,
        seed: int = 0,
        max_layers: int = 6,
        max_features: int = 2048,
        name: str = "probe",
        **kwargs: Any,
    ) -> None:
        if solver not in PROBE_SOLVERS:
            raise ValueError(f"solver must be one of {PROBE_SOLVERS}, got {solver!r}.")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
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
        self.seed = seed

    def _needs_labels(self) -> bool:
        return True

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        assert probe.labels is not None
        if self._provisional:  # a stream's first samples: the counts are checked on the probe set itself
            return
        classes, counts = probe.labels.unique(return_counts=True)
        if classes.numel() < 2:
            raise ValueError(
                f"LinearProbeCallback needs at least two classes among its probe samples to fit a classifier; all "
                f"{len(probe)} are of class {int(classes[0])}. Check the labels, or draw more samples (num_samples)."
            )
        if int(counts.max()) < 2:
            raise ValueError(
                "LinearProbeCallback holds out part of each class to test the probe, but each of the "
                f"{classes.numel()} classes has a single probe sample ({len(probe)} samples), so nothing is left to "
                "test on. Draw at least two samples per class (a larger num_samples)."
            )

    def _labels_reason(self) -> str:
        return "LinearProbeCallback fits classifiers to the probe set's labels, so it needs labels"

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        assert self.probe is not None and self.probe.labels is not None
        features = self._features(trainer, pl_module)
        labels = self.probe.labels
        held_out: list[float] = []
        fitted: list[float] = []
        scalars: dict[str, float] = {}
        finite = torch.stack([torch.isfinite(values).all() for values in features.values()]).tolist()
        for (layer, values), ok in zip(features.items(), finite, strict=True):
            if ok:
                result = linear_probe_accuracy(
                    values, labels, test_fraction=self.test_fraction, solver=self.solver, l2=self.l2, seed=self.seed
                )
                accuracy, train_accuracy = result.accuracy, result.train_accuracy
            else:
                rank_zero_warn(
                    f"LinearProbeCallback: layer {layer!r} output NaN or inf at epoch {trainer.current_epoch}; "
                    "its probe accuracy is logged as NaN."
                )
                accuracy = train_accuracy = float("nan")
            scalars[f"interp/{self.name}/{layer}/accuracy"] = accuracy
            scalars[f"interp/{self.name}/{layer}/train_accuracy"] = train_accuracy
            held_out.append(accuracy)
            fitted.append(train_accuracy)
        step, epoch, names = trainer.global_step, trainer.current_epoch, list(features)
        chance = float(labels.bincount().max()) / labels.numel()

        def draw() -> None:
            figure = line_image(
                names,
                {"held-out": held_out, "train": fitted},
                title=f"linear probe accuracy by depth (epoch {epoch})",
                ylabel="accuracy",
                ylim=(0.0, 1.02),
                reference=chance,
            )
            log_image(trainer, f"interp/{self.name}/accuracy_by_depth", figure, step)

        self._submit(trainer, draw)
        return scalars
