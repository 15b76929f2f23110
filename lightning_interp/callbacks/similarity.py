"""RepresentationSimilarityCallback: CKA and RSA between layers, across epochs and against a reference."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_interp._logging import log_image, logging_step, to_numpy
from lightning_interp.callbacks._base import unwrapped
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._representation import RepresentationCallback
from lightning_interp.callbacks._sharding import is_lockstep
from lightning_interp.methods import (
    TaskOption,
    auto_layers,
    capture_features,
    forward_chunk_size,
    get_module,
    label_kind,
    label_rdm,
    normalized_grams,
    rdm,
    rsa_matrix,
)
from lightning_interp.probe import ProbeSet, strata
from lightning_interp.visualize import matrix_image, rdm_image

SIMILARITY_METRICS = ("cka", "rsa")
RDM_TILE = 128  # RDM pictures are average-pooled to at most this many pixels a side


class RepresentationSimilarityCallback(RepresentationCallback):
    """Log how similar layers are to each other, to their own past, and to the labels.

    At each due validation epoch the callback captures the layers' outputs on
    its probe set and logs, under ``interp_<name>/``:

    with ``"cka"`` in ``metrics`` (linear CKA, Kornblith et al. 2019; the
    unbiased HSIC of Song et al. 2012 when ``debiased``):

    - ``cka``: the layer x layer CKA matrix as an annotated heatmap (all pairs
      from one matrix product of centred Gram matrices);
    - ``<layer>/cka_vs_previous``: CKA between the layer now and at the
      previous logged run: near 1 once the layer has settled;
    - ``<layer>/cka_vs_start``: CKA to the layer before the first optimisation
      step (captured at ``on_train_start``): how far training has moved it.
      With a stream (an ``IterableDataset``) as validation data whose probe
      set is not drawn yet at ``on_train_start`` (the sanity check's batches
      were too few), a CPU copy of the model's weights and buffers at that
      moment is kept instead, said in the log with its size; once the probe is
      drawn (at the end of the first validation epoch) the start features are
      computed with those weights put into the model for one forward pass and
      the current ones put back, bit for bit, and the copy is dropped. To avoid
      the copy, give ``probe=ProbeSet(...)`` or more ``num_sanity_val_steps``;
    - with ``reference_model``: ``cka_vs_reference`` (a layers x reference
      layers heatmap) and ``<layer>/cka_vs_reference_max``.

    with ``"rsa"`` (representational similarity analysis, Kriegeskorte et al. 2008):

    - ``rdm``: each layer's representational dissimilarity matrix, samples
      sorted by class, so class blocks show on the diagonal (white lines mark
      the class boundaries, the blocks are named from ``class_names``; one
      colour bar: each RDM over its own 99th percentile, whose value its title
      gives);
    - ``<layer>/rsa_vs_labels``: rank correlation between the layer's RDM and
      the label RDM (0 within a class, 1 across; for multi-hot labels the
      Jaccard distance of the label sets, for real-valued targets their
      distance; see :func:`~lightning_interp.methods.label_rdm`);
    - ``<layer>/rsa_vs_next``: between consecutive layers' RDMs.

    Gram matrices of the previous and the first run are kept in the
    checkpoint (``4 n^2`` bytes per layer each), so a resumed run continues the
    "vs previous" / "vs start" series.

    Args:
        layers: ``"auto"`` or a list of dotted module names.
        num_samples: probe samples.
        metrics: any of ``"cka"``, ``"rsa"``.
        debiased: unbiased HSIC for CKA (recommended when features outnumber samples).
        rdm_metric: ``"correlation"`` (1 - Pearson r) or ``"euclidean"``.
        rsa_method: ``"spearman"``, ``"pearson"`` or ``"tau_a"`` (slow beyond ~200 samples).
        task: how ``rsa_vs_labels`` reads the labels: ``"auto"`` (class
            indices and one-hot rows as classes, multi-hot rows as label sets,
            fractional values as values), or ``"regression"`` to compare
            whole-number targets (counts, ages) by their distance rather than
            as classes (see :func:`~lightning_interp.methods.label_rdm`).
        reference_model: a fixed network (e.g. a teacher) whose layers every
            layer is compared with; it is moved to the model's device and run
            in eval mode.
        reference_layers: ``"auto"`` or names in ``reference_model``.
        max_layers: most layers picked by ``"auto"``.
        max_features: per-layer feature bound.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``probe``, ``data``, ``display``.

    Example:
        >>> RepresentationSimilarityCallback(metrics=("cka",)).metrics
        ('cka',)
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    later_metrics = ("cka_vs_previous",)

    def __init__(
        self,
        layers: str | Sequence[str] = "auto",
        *,
        num_samples: int = 512,
        metrics: Sequence[str] = SIMILARITY_METRICS,
        debiased: bool = True,
        rdm_metric: Literal["correlation", "euclidean"] = "correlation",
        rsa_method: Literal["spearman", "pearson", "tau_a"] = "spearman",
        task: TaskOption = "auto",
        reference_model: nn.Module | None = None,
        reference_layers: str | Sequence[str] = "auto",
        max_layers: int = 6,
        max_features: int = 4096,
        name: str = "similarity",
        **kwargs: Any,
    ) -> None:
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = [m for m in metrics if m not in SIMILARITY_METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty subset of {SIMILARITY_METRICS}, got {list(metrics)}.")
        check_arguments(rdm_metric=rdm_metric, rsa_method=rsa_method, task=task)
        if reference_model is not None and not isinstance(reference_model, nn.Module):
            raise TypeError(f"reference_model must be an nn.Module, got {type(reference_model).__name__}.")
        if reference_model is not None and "cka" not in metrics:
            raise ValueError("reference_model is compared by CKA; add 'cka' to metrics.")
        super().__init__(
            name=name,
            layers=layers,
            max_layers=max_layers,
            max_features=max_features,
            num_samples=num_samples,
            **kwargs,
        )
        if debiased and num_samples < 4:
            raise ValueError("debiased CKA needs num_samples >= 4.")
        self.metrics = metrics
        self.debiased = debiased
        self.rdm_metric = rdm_metric
        self.rsa_method = rsa_method
        self.task = task
        self.reference_model = reference_model
        self.reference_layers: list[str] = (
            []
            if reference_layers == "auto"
            else [reference_layers]
            if isinstance(reference_layers, str)
            else list(reference_layers)
        )
        self._reference_auto = not self.reference_layers
        self._reference_chunk = 256
        self._previous_grams: Tensor | None = None
        self._start_grams: Tensor | None = None
        self._start_weights: list[Tensor] | None = None  # a stream's start weights (CPU), until its probe is drawn
        self._noted_single = False  # warned this run that one-value layers use the Euclidean RDM
        self._layout: tuple[ProbeSet, torch.device, Tensor, Tensor | None] | None = None  # see _probe_layout
        self._group_cache: tuple[ProbeSet, list[int] | None, list[str] | None] | None = None  # see _groups

    # ------------------------------------------------------------------ setup
    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._previous_grams = self._start_grams = None
        self._start_weights = None
        self._noted_single = False
        self._layout = None
        self._group_cache = None
        if self._reference_auto:
            self.reference_layers = []

    def _restart_comparisons(self) -> None:
        super()._restart_comparisons()
        self._previous_grams = self._start_grams = None
        self._start_weights = None

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        super()._check_model(pl_module)
        if self.reference_model is not None:
            for name in self.reference_layers:
                get_module(self.reference_model, name)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        if self.reference_model is not None:
            self.reference_model.to(pl_module.device)
            example = probe.inputs[:1].to(pl_module.device)
            trace = self._trace(trainer, self.reference_model, example)
            self._reference_chunk = forward_chunk_size(trace, pl_module.device)
            if not self.reference_layers:
                self.reference_layers = auto_layers(self.reference_model, None, max_layers=self.max_layers, trace=trace)

    def _reference_features(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet
    ) -> dict[str, Tensor]:
        """The reference model's features on ``probe``, its inputs in the reference model's own dtype."""
        assert self.reference_model is not None
        inputs = self._probe_inputs(trainer, pl_module, probe)
        parameter = next((p for p in self.reference_model.parameters() if p.is_floating_point()), None)
        if parameter is not None and inputs.is_floating_point():
            inputs = inputs.to(
                parameter.dtype
            )  # under bf16-true the trainer's inputs are bf16, a reference need not be
        with self._model_context(trainer):
            return capture_features(
                self.reference_model,
                inputs,
                self.reference_layers,
                max_features=self.max_features,
                batch_size=self._reference_chunk,
            )

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._trial(trainer, pl_module, probe)
        if self.reference_model is not None:
            self._reference_features(trainer, pl_module, probe.subset(min(4, len(probe))))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the layers' Gram matrices before the first optimisation step, for ``cka_vs_start``; for a stream whose
        probe is not drawn yet, a CPU copy of the weights, to compute them once it is."""
        if "cka" not in self.metrics or self._start_grams is not None:
            return
        if not (trainer.is_global_zero or is_lockstep(trainer)):  # sharded parameters: every rank joins the forward
            return
        if self._ensure_ready(trainer, pl_module):
            self._start_grams = self._grams(self._features(trainer, self._explained(pl_module), shared=False)).float()
        elif self._from_stream and self.probe is None:
            self._start_weights = [tensor.detach().to("cpu", copy=True) for tensor in _weights(unwrapped(pl_module))]
            size = sum(tensor.numel() * tensor.element_size() for tensor in self._start_weights) / 2**20
            rank_zero_info(
                f"{type(self).__name__}: the validation data is a stream and the probe samples come from its batches, "
                "too few of which were seen before training to draw them; a CPU copy of the start weights "
                f"({size:.1f} MiB) is kept until the probe is drawn at the end of the first validation, for "
                "cka_vs_start. To avoid it, give probe=ProbeSet(...) or raise num_sanity_val_steps."
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        if self._start_weights is not None and self.probe is not None and self._prepared and trainer.is_global_zero:
            self._take_start_grams(trainer, pl_module)  # a probe drawn at an epoch not due: the copy can go now

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._start_weights = None  # a stream that never gave a probe: the copy goes with the run
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._start_weights = None
        super().on_exception(trainer, pl_module, exception)

    def _take_start_grams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The Gram matrices of the start weights kept for a stream (see :meth:`on_train_start`): put into the model
        for one forward pass on the probe set, the model's own weights and buffers put back bit for bit."""
        start, self._start_weights = self._start_weights, None
        assert start is not None
        current = _weights(unwrapped(pl_module))
        if len(current) != len(start) or any(a.shape != b.shape for a, b in zip(current, start, strict=True)):
            self._warn(
                f"{type(self).__name__}: the model's parameters changed shape since training started; "
                "cka_vs_start is not logged in this run."
            )
            return
        saved = [tensor.detach().to("cpu", copy=True) for tensor in current]  # on the host: no device memory spent
        try:
            with torch.no_grad():
                for tensor, value in zip(current, start, strict=True):
                    tensor.data.copy_(value)
            features = self._features(trainer, self._explained(pl_module), shared=False)
            self._start_grams = self._grams(features).float()
        finally:
            with torch.no_grad():
                for tensor, value in zip(current, saved, strict=True):
                    tensor.data.copy_(value)

    # ------------------------------------------------------------------ the work
    def _grams(self, features: dict[str, Tensor], *, warn: bool = True) -> Tensor:
        return normalized_grams(features, debiased=self.debiased, warn=warn)

    def _order(self) -> Tensor:
        """Probe samples sorted by class (stable; by first label or by value for other labels), so RDM class blocks
        sit on the diagonal."""
        assert self.probe is not None
        if self.probe.labels is None:
            return torch.arange(len(self.probe))
        return torch.argsort(strata(self.probe.labels), stable=True)

    def _probe_layout(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The class order of the probe samples and the label RDM in that order, on ``device``: made once per probe
        set (its labels are fixed for a fit), so reading the labels' kind waits for no device at later runs."""
        assert self.probe is not None
        cached = self._layout
        if cached is None or cached[0] is not self.probe or cached[1] != device:
            order = self._order().to(device)
            labels = self.probe.labels
            target = (
                None if labels is None else label_rdm(labels.to(device)[order], as_values=self.task == "regression")
            )
            cached = self._layout = (self.probe, device, order, target)
        return cached[2], cached[3]

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._start_weights is not None:  # a stream's probe, just drawn: the start features first
            self._take_start_grams(trainer, pl_module)
        features = self._features(trainer, pl_module)
        step = logging_step(trainer)
        parts: list[_Pending] = []
        if "cka" in self.metrics:
            parts.append(self._cka(trainer, pl_module, features, step))
        if "rsa" in self.metrics:
            parts.append(self._rsa(trainer, features, step))
        numbers, pictures = _to_host(
            {k: v for part in parts for k, v in part.numbers.items()},
            {k: v for part in parts for k, v in part.pictures.items()},
        )  # the one transfer of the run: the scalars, the flags the warnings need and what the drawings show
        scalars: dict[str, float] = {}
        for part in parts:
            scalars.update(part.finish(numbers, pictures))
        return scalars

    def _cka(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, features: dict[str, Tensor], step: int
    ) -> _Pending:
        """CKA on the device; its :class:`_Pending` warns, submits the drawings and names the scalars once the
        numbers are on the host."""
        names = list(features)
        grams = self._grams(features, warn=False)  # (L, n^2) on the model's device; a constant layer's row is NaN
        epoch = trainer.current_epoch
        numbers: dict[str, Tensor] = {"cka.degenerate": grams.isnan().all(dim=1)}
        keys: list[str] = []
        for key, reference in (("cka_vs_previous", self._previous_grams), ("cka_vs_start", self._start_grams)):
            if reference is not None and reference.shape == grams.shape:
                numbers[f"cka.{key}"] = (grams * reference.to(grams.device, torch.float64)).sum(dim=1)
                keys.append(key)
        self._previous_grams = grams.float()
        pictures = {"cka.matrix": grams @ grams.T}
        columns: list[str] = []
        if self.reference_model is not None:
            assert self.probe is not None
            reference = self._reference_features(trainer, pl_module, self.probe)
            reference_grams = self._grams(reference, warn=False)
            columns = list(reference)
            cross = grams @ reference_grams.T
            pictures["cka.cross"] = cross
            numbers["cka.reference_degenerate"] = reference_grams.isnan().all(dim=1)
            numbers["cka.cka_vs_reference_max"] = torch.nan_to_num(cross, nan=-float("inf")).amax(dim=1)
            keys.append("cka_vs_reference_max")

        def finish(host: dict[str, list[float]], drawn: dict[str, Tensor]) -> dict[str, float]:
            _warn_degenerate(names, host["cka.degenerate"])
            matrix = drawn["cka.matrix"]
            title = f"{'debiased ' if self.debiased else ''}linear CKA between layers (epoch {epoch})"
            self._submit(
                trainer,
                lambda: log_image(trainer, f"interp_{self.name}/cka", matrix_image(matrix, names, title=title), step),
            )
            if columns:
                _warn_degenerate(columns, host["cka.reference_degenerate"])
                cross = drawn["cka.cross"]

                def draw_reference() -> None:
                    title = f"CKA: model (rows) vs reference (epoch {epoch})"
                    image = matrix_image(cross, names, column_labels=columns, title=title)
                    log_image(trainer, f"interp_{self.name}/cka_vs_reference", image, step)

                self._submit(trainer, draw_reference)
            return {
                f"interp_{self.name}/{layer}/{key}": value
                for key in keys
                for layer, value in zip(names, host[f"cka.{key}"], strict=True)
            }

        return _Pending(numbers, pictures, finish)

    def _rsa(self, trainer: pl.Trainer, features: dict[str, Tensor], step: int) -> _Pending:
        """RSA on the device; its :class:`_Pending` warns, submits the drawing and names the scalars once the
        numbers are on the host."""
        assert self.probe is not None
        names = list(features)
        device = next(iter(features.values())).device
        order, target = self._probe_layout(device)
        single = [n for n in names if features[n].shape[1] < 2] if self.rdm_metric == "correlation" else []
        rdms = torch.stack(
            [rdm(features[n][order], metric="euclidean" if n in single else self.rdm_metric, warn=False) for n in names]
        )  # (L, n, n); a constant pattern's diagonal entry is NaN
        numbers: dict[str, Tensor] = {
            "rsa.finite": torch.isfinite(rdms).flatten(1).all(dim=1),
            "rsa.constant_patterns": rdms.diagonal(dim1=1, dim2=2).isnan().sum(dim=1),
        }
        # every comparison from one RSA matrix: each RDM ranked once; those of non-finite RDMs are set to NaN below,
        # as are (by rsa_matrix) those of an RDM with a constant upper triangle
        compared = [*rdms, *([] if target is None else [target])]
        if len(compared) >= 2:
            similarity = rsa_matrix(compared, method=self.rsa_method, warn=False)
            finite = numbers["rsa.finite"]
            nan = torch.full((), float("nan"), dtype=torch.float64, device=device)
            numbers["rsa.undefined"] = similarity.diagonal().isnan()  # a constant upper triangle or NaN in the RDM
            if target is not None:
                numbers["rsa.rsa_vs_labels"] = torch.where(finite, similarity[: len(names), len(names)], nan)
                numbers["rsa.labels_nan"] = target.isnan().any()[None]
            both = finite[:-1] & finite[1:]
            numbers["rsa.rsa_vs_next"] = torch.where(both, similarity.diagonal(offset=1)[: len(names) - 1], nan)
        tiles = self._rdm_tiles(rdms)  # pooled where they are, small on the host
        title = f"RDMs ({self.rdm_metric}), samples sorted by class, epoch {trainer.current_epoch}"
        groups, group_names = self._groups()

        def finish(host: dict[str, list[float]], drawn: dict[str, Tensor]) -> dict[str, float]:
            if single and not self._noted_single:
                self._noted_single = True
                self._warn(
                    f"RepresentationSimilarityCallback: {single} give one value per sample, where the correlation "
                    "distance between two samples is undefined; their RDMs use the Euclidean distance (|a - b|) "
                    "instead (said once per run)."
                )
            for count in host["rsa.constant_patterns"]:
                if count:
                    warnings.warn(
                        f"{int(count)} pattern(s) are constant across features; their correlation distance is NaN.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            finite = [bool(ok) for ok in host["rsa.finite"]]
            if not all(finite):
                broken = [n for n, ok in zip(names, finite, strict=True) if not ok]
                self._warn(f"RepresentationSimilarityCallback: non-finite RDMs for {broken}; their RSA is NaN.")
            if "rsa.undefined" in host:
                _warn_undefined_rsa(finite, host["rsa.undefined"], host.get("rsa.labels_nan"))
            pictures = drawn["rsa.tiles"]

            def draw() -> None:
                image = rdm_image(list(pictures), names, groups=groups, group_names=group_names, title=title)
                log_image(trainer, f"interp_{self.name}/rdm", image, step)

            self._submit(trainer, draw)
            values: dict[str, float] = {}
            if target is not None:
                nan = [float("nan")] * len(names)
                labels = host.get("rsa.rsa_vs_labels", nan)
                values.update({f"interp_{self.name}/{n}/rsa_vs_labels": v for n, v in zip(names, labels, strict=True)})
            following = host.get("rsa.rsa_vs_next", [])
            values.update({f"interp_{self.name}/{n}/rsa_vs_next": v for n, v in zip(names, following, strict=False)})
            return values

        return _Pending(numbers, {"rsa.tiles": tiles}, finish)

    def _groups(self) -> tuple[list[int] | None, list[str] | None]:
        """Each probe sample's class in the RDMs' order (for the class boundaries of the RDM picture) and the names of
        the classes: None for real-valued targets (sorted by value, no classes) or without labels."""
        assert self.probe is not None
        cached = self._group_cache
        if cached is not None and cached[0] is self.probe:  # the labels' kind is read once per probe set
            return cached[1], cached[2]
        labels = self.probe.labels
        kind = None if labels is None else label_kind(labels)
        groups: list[int] | None = None
        names: list[str] | None = None
        if labels is not None and self.task != "regression" and kind != "continuous":
            groups = strata(labels)[self._order()].tolist()
            names = list(self.class_names) if self.class_names else None
            if names is not None and kind == "multi_hot":
                names.append("no label")  # the group of rows without a positive label
        self._group_cache = (self.probe, groups, names)
        return groups, names

    @staticmethod
    def _rdm_tiles(matrices: Tensor) -> Tensor:
        """(L, n, n) RDMs as float32 pictures of at most RDM_TILE pixels a side (average-pooled)."""
        small = matrices.float()
        if small.shape[-1] > RDM_TILE:
            small = F.adaptive_avg_pool2d(small[:, None], RDM_TILE)[:, 0]
        return small

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(previous_grams=_on_cpu(self._previous_grams), start_grams=_on_cpu(self._start_grams))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._previous_grams = state_dict.get("previous_grams")
        self._start_grams = state_dict.get("start_grams")


class _Pending(NamedTuple):
    """One metric's work, done on the device and waiting for the run's single transfer to the host.

    Attributes:
        numbers: named tensors read as Python floats (the scalars and the flags the warnings need).
        pictures: named tensors the drawings show, brought over as tensors of their own shape and dtype.
        finish: given both on the host, warns, submits the drawings and returns the scalars to log.
    """

    numbers: dict[str, Tensor]
    pictures: dict[str, Tensor]
    finish: Callable[[dict[str, list[float]], dict[str, Tensor]], dict[str, float]]


def _to_host(
    numbers: dict[str, Tensor], pictures: dict[str, Tensor]
) -> tuple[dict[str, list[float]], dict[str, Tensor]]:
    """Every tensor on the host in one copy (:func:`~lightning_interp._logging.to_numpy`): each of ``numbers``
    flattened to a list of floats, each of ``pictures`` a host tensor of its own shape and dtype (float64 holds
    every float32 and float64 value exactly)."""
    arrays = to_numpy({**numbers, **pictures})
    host = {name: arrays[name].reshape(-1).tolist() for name in numbers}
    drawn = {name: torch.from_numpy(arrays[name]).to(tensor.dtype) for name, tensor in pictures.items()}
    return host, drawn


def _warn_degenerate(names: Sequence[str], flags: Sequence[float]) -> None:
    """The RuntimeWarning :func:`~lightning_interp.methods.normalized_grams` gives for constant layers."""
    degenerate = [name for name, flag in zip(names, flags, strict=True) if flag]
    if degenerate:
        warnings.warn(
            f"Layer(s) {', '.join(degenerate)} has zero self-similarity (a constant layer, with zero variance across "
            "samples); its CKA is undefined and returned as NaN.",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_undefined_rsa(finite: Sequence[bool], undefined: Sequence[float], labels_nan: Sequence[float] | None) -> None:
    """The RuntimeWarnings :func:`~lightning_interp.methods.rsa_matrix` gives for the compared RDMs (the finite
    layers' and the labels', numbered in that order) that hold NaN or have a constant upper triangle.

    Args:
        finite: per layer, whether its RDM is finite (only those are compared).
        undefined: per RDM of the RSA matrix (every layer's, then the labels'), whether its diagonal entry is NaN.
        labels_nan: ``[flag]``, whether the label RDM holds NaN; None without labels.
    """
    slots = [index for index, ok in enumerate(finite) if ok]
    flags = [bool(undefined[index]) for index in slots]
    with_nan: list[int] = []
    if labels_nan is not None:
        slots.append(len(finite))
        flags.append(bool(undefined[len(finite)]) and not labels_nan[0])
        with_nan = [len(slots) - 1] if labels_nan[0] else []
    if len(slots) < 2:  # nothing compared
        return
    if with_nan:
        warnings.warn(
            f"RDM(s) {with_nan[0]} hold NaN (constant patterns?); their RSA is NaN.", RuntimeWarning, stacklevel=3
        )
    constant = [str(position) for position, flag in enumerate(flags) if flag]
    if constant:
        warnings.warn(
            f"The upper triangle of RDM(s) {', '.join(constant)} is constant; their correlation is NaN.",
            RuntimeWarning,
            stacklevel=3,
        )


def _weights(model: nn.Module) -> list[Tensor]:
    """The model's parameters and buffers, in a fixed order (what a forward pass depends on)."""
    return [*model.parameters(), *model.buffers()]


def _on_cpu(tensor: Tensor | None) -> Tensor | None:
    """A checkpoint copy on the CPU, so it loads on any machine."""
    return None if tensor is None else tensor.cpu()
