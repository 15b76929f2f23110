"""ConceptCallback: TCAV scores (Kim et al. 2018) of user concepts at every validation epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from typing_extensions import override

from lightning_interp._logging import log_image, logging_step, to_numpy
from lightning_interp.callbacks._base import InterpCallback, class_name, parse_layer_names
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.methods import (
    TCAVResult,
    class_labels,
    compute_cav,
    concept_activations,
    disjoint_random_sets,
    forward_chunk_size,
    get_module,
    label_kind,
    layer_gradients,
    module_name,
    scores_from_output,
    tcav_from_activations,
)
from lightning_interp.probe import ProbeSet, parse_batch
from lightning_interp.visualize import TCAVPanel, tcav_bar_image

Examples = Union[Tensor, Dataset, DataLoader]  # noqa: UP007 (runtime alias, Python 3.10)
"""Concept or random examples: an (N, ...) tensor of inputs, a Dataset (items ``x`` or ``(x, ...)``) or a DataLoader."""


__all__ = ["CAVOptions", "ConceptCallback", "TCAVTest"]

MIN_RANDOM_SET = 5
"""Fewest examples per random set: a CAV holds out ``test_fraction`` of each side to measure its accuracy."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CAVOptions:
    """How a concept activation vector (CAV) is trained, and when it is good enough to score with.

    A CAV is the normal of a logistic-regression boundary between a concept's and
    a random set's layer activations (see
    :func:`~lightning_interp.methods.compute_cav`).

    Args:
        test_fraction: share of each side's examples held out to measure the CAV's accuracy.
        l2: L2 penalty of the classifier on standardised activations (0: none).
        min_accuracy: mean held-out accuracy below which a concept's CAVs are taken for chance at a layer: it then
            gets no TCAV score or p-value there, only its ``cav_accuracy`` (0 scores every concept).

    Example:
        >>> CAVOptions(min_accuracy=0.7).min_accuracy
        0.7
    """

    test_fraction: float = 1 / 3
    l2: float = 1e-2
    min_accuracy: float = 0.6

    def __post_init__(self) -> None:
        if not _is_number(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise ValueError(
                f"CAVOptions(test_fraction=...) is the share of examples held out to test a CAV: a number strictly "
                f"between 0 and 1 (default 1/3), got {self.test_fraction!r}."
            )
        if not _is_number(self.l2) or self.l2 < 0:
            raise ValueError(
                f"CAVOptions(l2=...) is the classifier's penalty: a finite number >= 0 (default 0.01), got {self.l2!r}."
            )
        if not _is_number(self.min_accuracy) or not 0 <= self.min_accuracy <= 1:
            raise ValueError(
                f"CAVOptions(min_accuracy=...) is a held-out accuracy: a number in [0, 1] (default 0.6; 0 scores every "
                f"concept), got {self.min_accuracy!r}."
            )


@dataclass(frozen=True)
class TCAVTest:
    """The test of a concept's TCAV scores against those of random directions.

    For each concept and layer, ``n_random`` CAVs are trained (each against
    another random set) and ``n_random`` random-vs-random CAVs give the null
    distribution; a two-sided t-test compares the two groups of scores per class.

    Args:
        n_random: CAVs per concept and layer, and random-vs-random CAVs (>= 2 for the t-test). ``2 * n_random``
            disjoint random sets are drawn from the random pool.
        random_set_size: examples per random set (>= 5); None: as many as the largest concept has, at most
            ``pool // (2 * n_random)``.
        alpha: significance level: p-values below it are marked ``*`` in the figure.
        equal_var: Student's t-test (True, as in the paper) or Welch's (False).

    Example:
        >>> TCAVTest(n_random=20, alpha=0.01).n_random
        20
    """

    n_random: int = 10
    random_set_size: int | None = None
    alpha: float = 0.05
    equal_var: bool = True

    def __post_init__(self) -> None:
        n_random = self.n_random
        if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 2:
            raise ValueError(
                f"TCAVTest(n_random=...) must be an int >= 2 (the t-test needs two scores per group; default 10), "
                f"got {n_random!r}."
            )
        size = self.random_set_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < MIN_RANDOM_SET):
            raise ValueError(
                f"TCAVTest(random_set_size=...) must be None (sized from the concepts) or an int >= {MIN_RANDOM_SET} "
                f"(a CAV holds out part of each side to measure its accuracy), got {size!r}."
            )
        if not _is_number(self.alpha) or not 0 < self.alpha < 1:
            raise ValueError(
                f"TCAVTest(alpha=...) is a significance level: a number strictly between 0 and 1 (default 0.05), got "
                f"{self.alpha!r}."
            )
        if not isinstance(self.equal_var, bool):
            raise TypeError(
                f"TCAVTest(equal_var=...) must be True (Student's t-test) or False (Welch's), got {self.equal_var!r}."
            )


def read_examples(value: Examples, what: str, max_examples: int) -> Tensor:
    """The first ``max_examples`` inputs of a tensor, Dataset or DataLoader, as a CPU tensor (global RNG untouched)."""
    if isinstance(value, Tensor):
        examples = value[:max_examples]
    elif isinstance(value, DataLoader):
        parts: list[Tensor] = []
        held = 0
        with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws its base seed from the global RNG
            for batch in value:
                inputs = parse_batch(batch).inputs.detach().cpu()
                parts.append(inputs)
                held += inputs.shape[0]
                if held >= max_examples:
                    break
        if not parts:
            raise ValueError(f"ConceptCallback: {what} is a DataLoader that yields no batches.")
        examples = torch.cat(parts)[:max_examples]
    elif isinstance(value, Dataset) and hasattr(value, "__len__"):
        count = min(len(value), max_examples)  # type: ignore[arg-type]
        if count == 0:
            raise ValueError(f"ConceptCallback: {what} is an empty Dataset.")
        with torch.random.fork_rng(devices=[]):  # a Dataset's __getitem__ may draw random augmentations
            examples = parse_batch(default_collate([value[i] for i in range(count)])).inputs
    else:
        raise TypeError(
            f"ConceptCallback: {what} must be an (N, ...) tensor of inputs, a map-style Dataset or a DataLoader, got "
            f"{type(value).__name__}."
        )
    if examples.ndim < 2 or examples.shape[0] < 2:
        raise ValueError(
            f"ConceptCallback: {what} must hold at least 2 examples as an (N, ...) batch of inputs (a CAV is trained "
            f"on part of them and tested on the rest; 20 or more give stable CAVs), got shape {tuple(examples.shape)}."
        )
    with torch.inference_mode(False):
        return examples.detach().cpu().clone()


class ConceptCallback(InterpCallback):
    """Log TCAV scores (Testing with Concept Activation Vectors, Kim et al. 2018) of concepts the user gives.

    A concept is a set of example inputs (say, images of stripes). At each due
    validation epoch, for every concept and layer, the callback trains
    ``test.n_random`` concept activation vectors (CAVs; see
    :func:`~lightning_interp.methods.compute_cav`: logistic regression on
    standardised, flattened layer activations of the concept examples against
    one random set each, the CAV being the boundary's normal in the raw
    activation space) and, for each target class, counts the share of the probe
    set's samples of that class whose class logit grows along the CAV (positive
    directional derivative). The same is done for ``test.n_random`` random-vs-random
    CAVs, and a two-sided t-test (Student's, as in the paper;
    ``TCAVTest(equal_var=False)`` for Welch's) says whether the concept's scores
    differ from the random ones.
    Under ``interp_<name>/`` it logs:

    - ``<concept>/<layer>/<class>/tcav`` (``<class>``: its name from
      ``DataDescription(class_names=...)``, else its index): the TCAV score, mean over the
      ``n_random`` runs (0.5 = no preference; near 1 the concept pushes the
      class up, near 0 down);
    - ``<concept>/<layer>/<class>/p_value``: the t-test's p-value (below
      ``test.alpha`` = significant);
    - ``<concept>/<layer>/cav_accuracy``: the CAVs' mean held-out accuracy
      (how well the layer separates the concept from random examples);
    - ``scores``: a bar chart per layer, classes x concepts, with the random
      CAVs' scores for reference, error bars (std over the runs) and ``*`` on
      the significant ones.

    A concept whose CAVs are no better than chance at a layer (mean held-out
    accuracy below ``cav.min_accuracy``, default 0.6) gets no TCAV score or
    p-value there at that epoch: only its ``cav_accuracy`` is logged, the figure
    shows "n/a", and a warning says so once per run (its direction would be
    noise, and a TCAV score of noise looks like a result). Where both groups'
    scores are all equal the p-value is 1 (no difference to test). A layer whose
    class gradient is zero, or one vector per class (only linear operations
    between it and the logits), is warned about: its scores would be 0 or 1 by
    construction.

    Random counter-examples: ``random_examples=`` (a tensor, Dataset or
    DataLoader, read once, at most ``max_random_examples``) or, by default, the
    callback's probe set itself (the samples that are scored; drawn from the
    first validation dataloader, stratified over classes, ``num_samples``).
    ``2 * n_random`` disjoint random sets of ``test.random_set_size`` examples
    each (default: as many as the largest concept has, at most ``pool // (2 *
    n_random)``; at least 5, else the fit stops before training saying what to
    change) are drawn once per fit from that pool with the callback's own
    ``torch.Generator`` (seed ``seed``): the concept CAVs are trained against
    the first half, the random-vs-random CAVs pair the second half with the
    first. On random "concepts" this flags about 5% of class tests at p < 0.05
    at the defaults; larger sets or overlapping ones flag more (see
    :func:`~lightning_interp.methods.tcav_from_activations`). Concept
    examples are read once, at construction (at most ``max_examples`` of each),
    kept on the CPU and stored with the random examples and sets in the
    callback's ``state_dict``, so a resumed run scores the same examples (mind
    the checkpoint size with large inputs).

    Cost per run: one forward + one ``torch.autograd.grad`` over the probe set
    (all layers at once), one no-grad forward over the concept (and given random)
    examples, and ``(len(concepts) + 1) * n_random`` small logistic fits per layer,
    batched and without a host read (:func:`~lightning_interp.methods.fit_cavs`), on
    the model's device. A forward pass takes as many samples as keep the largest
    layer output near a budget (see :func:`~lightning_interp.methods.forward_chunk_size`;
    a gradient pass, which keeps the graph for the backward, a quarter of that).
    The probe set needs labels (class indices or one-hot rows);
    multi-class (C logits) and binary (one logit) models are supported. Choose
    layers with a non-linearity between them and the logits: after the last one
    (e.g. the ReLU before global pooling and a linear head) the logit's gradient is
    the same for every sample, so each CAV scores a class 0 or 1.

    Args:
        concepts: concept name (no '/') -> its examples, each like the probe inputs.
        layers: dotted module name(s) whose outputs the CAVs live in (flattened, unpooled).
        targets: class index or indices to score; None for every class among the probe labels.
        random_examples: a pool of random counter-examples; None draws them from the probe set.
        cav: how the CAVs are trained and when they are good enough to score with (:class:`CAVOptions`:
            ``test_fraction=1/3``, ``l2=0.01``, ``min_accuracy=0.6``); None for the defaults.
        test: the test against random CAVs (:class:`TCAVTest`: ``n_random=10``, ``random_set_size=None``,
            ``alpha=0.05``, ``equal_var=True``); None for the defaults.
        num_samples: probe samples drawn from the validation data (scored, and the default random pool).
        max_examples: examples read at most from each concept.
        max_random_examples: examples read at most from ``random_examples``.
        seed: seed of the random sets and the CAV splits.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``probe``, ``data``, ``display``,
            ``forward_fn`` (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> stripes = torch.rand(20, 3, 16, 16)
        >>> callback = ConceptCallback({"stripes": stripes}, layers=["net.4"], test=TCAVTest(n_random=20))
        >>> sorted(callback.concepts), callback.layers, callback.test.n_random, callback.cav.min_accuracy
        (['stripes'], ['net.4'], 20, 0.6)
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        concepts: Mapping[str, Examples],
        layers: str | Sequence[str],
        *,
        targets: int | Sequence[int] | None = None,
        random_examples: Examples | None = None,
        cav: CAVOptions | None = None,
        test: TCAVTest | None = None,
        num_samples: int = 256,
        max_examples: int = 100,
        max_random_examples: int = 1000,
        seed: int = 0,
        name: str = "tcav",
        **kwargs: Any,
    ) -> None:
        check_arguments(seed=seed)
        super().__init__(name=name, num_samples=num_samples, **kwargs)
        if not isinstance(concepts, Mapping) or not concepts:
            raise ValueError(
                "ConceptCallback needs at least one concept: pass concepts={'name': examples}, the examples an "
                f"(N, ...) tensor of inputs, a Dataset or a DataLoader; got {concepts!r}."
            )
        for concept in concepts:
            if not isinstance(concept, str) or not concept or "/" in concept:
                raise ValueError(f"Concept names must be non-empty strings without '/', got {concept!r}.")
        names = parse_layer_names(layers, "layers")
        if not names:
            raise ValueError(
                "ConceptCallback needs explicit layer names (e.g. layers=['net.4']): a CAV lives in one layer's "
                "activation space, and which layers to test is the question TCAV asks, so there is no 'auto'."
            )
        if targets is not None:
            listed = [targets] if isinstance(targets, int) else list(targets)
            if not listed or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in listed):
                raise ValueError(f"targets must be a class index >= 0, a list of them, or None; got {targets!r}.")
            if len(set(listed)) != len(listed):
                raise ValueError(f"targets lists a class twice: {listed}.")
            targets = listed
        for option, value in (("max_examples", max_examples), ("max_random_examples", max_random_examples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"{option} must be an int >= 2, got {value!r}.")
        if cav is not None and not isinstance(cav, CAVOptions):
            raise TypeError(
                f"cav must be a CAVOptions or None, got {type(cav).__name__}: write cav=CAVOptions(min_accuracy=0.7)."
            )
        if test is not None and not isinstance(test, TCAVTest):
            raise TypeError(
                f"test must be a TCAVTest or None, got {type(test).__name__}: write test=TCAVTest(n_random=20)."
            )
        self.concepts: dict[str, Tensor] = {
            concept: read_examples(value, f"concept {concept!r}", max_examples) for concept, value in concepts.items()
        }
        self.random_examples: Tensor | None = (
            None if random_examples is None else read_examples(random_examples, "random_examples", max_random_examples)
        )
        self.layers: list[str] = names
        self.targets: list[int] | None = targets  # type: ignore[assignment]
        self.cav = cav if cav is not None else CAVOptions()
        self.test = test if test is not None else TCAVTest()
        self.max_examples = max_examples
        self.max_random_examples = max_random_examples
        self.seed = seed
        self._chunk = 256  # samples per forward pass (a quarter per gradient pass); chosen at fit start
        self._random_sets: Tensor | None = None  # (2 * n_random, set size) indices into the random pool
        self._classes: list[int] = []
        # per probe set: the rows of each class with two or more samples (on the model's device), found once
        self._class_rows: tuple[ProbeSet, list[Tensor]] | None = None
        self._task = "multiclass"

    # ------------------------------------------------------------------ state
    def _needs_labels(self) -> bool:
        return True

    def _labels_reason(self) -> str:
        return "ConceptCallback scores each class on the probe samples of that class, so it needs labels"

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._random_sets = None
        self._class_rows = None

    def _restart_comparisons(self) -> None:
        super()._restart_comparisons()
        self._random_sets = None  # indices into a probe set that is drawn anew

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["concepts"] = dict(self.concepts)
        state["random_examples"] = self.random_examples
        state["random_sets"] = self._random_sets
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("concepts") or {}
        for concept in self.concepts:  # the checkpoint's examples of the concepts this callback scores
            if concept in saved:
                self.concepts[concept] = saved[concept].detach().cpu().clone()
        missing = sorted(set(self.concepts) - set(saved))
        if saved and missing:
            rank_zero_warn(
                f"ConceptCallback: the checkpoint holds no examples of the concept(s) {missing}; using those given now."
            )
        if self.random_examples is not None and state_dict.get("random_examples") is not None:
            self.random_examples = state_dict["random_examples"].detach().cpu().clone()
        sets = state_dict.get("random_sets")
        self._random_sets = None if sets is None else sets.detach().cpu().long().clone()

    # ------------------------------------------------------------------ checks, before training
    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for layer in self.layers:
            get_module(pl_module, layer)

    def _pool(self, probe: ProbeSet) -> Tensor:
        return probe.inputs if self.random_examples is None else self.random_examples

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        if self._call is not None and self._call.keys:
            raise ValueError(
                f"ConceptCallback: the model takes {list(self._call.keys)} from the validation batches besides the "
                "inputs, but concept examples are bare input tensors that carry none. Pass forward_fn=lambda model, "
                "inputs: ... that makes them from the inputs (e.g. attention_mask=(ids != pad_id)), so probe "
                "samples and concept examples are called the same way."
            )
        if probe.more_inputs:  # concept examples would be paired with the probe samples' other inputs
            raise ValueError(
                f"ConceptCallback: the model takes {len(probe.all_inputs)} inputs, but concept and random examples are "
                "bare tensors of one input, so the model cannot be called on them. Pass forward_fn=lambda model, "
                "image: ... that calls the model on the first input alone (e.g. with a fixed second input), and give "
                "the probe samples the first input only (data=DataDescription(batch_parser=...)); concept sets of "
                "several inputs are not supported yet."
            )
        trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
        self._chunk = forward_chunk_size(trace, pl_module.device)
        for layer in self.layers:
            name = module_name(pl_module, layer) or layer
            if name not in trace.calls or name not in trace.shapes:
                raise ValueError(
                    f"ConceptCallback: layer {layer!r} does not return a tensor in a forward pass of the model on its "
                    "probe inputs (it does not run, or returns a tuple), so it has no activations to train a CAV on. "
                    "Name a module that forward() calls and that returns a tensor."
                )
        outputs = scores_from_output(trace.output, None).shape[1]
        self._task = "binary" if outputs == 1 else "multiclass"
        n_classes = 2 if outputs == 1 else outputs
        assert probe.labels is not None
        kind = label_kind(probe.labels)
        if kind not in ("class", "one_hot"):
            raise ValueError(
                f"ConceptCallback scores the probe samples of each class, so it needs class labels: (N,) class indices "
                f"or (N, K) one-hot rows; the probe labels have shape {tuple(probe.labels.shape)} ({kind}). Pass "
                "data=DataDescription(batch_parser=...) that returns class labels, or probe=ProbeSet(inputs, labels)."
            )
        labels = class_labels(probe.labels, "multiclass")
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise ValueError(
                f"ConceptCallback: the probe labels range over {int(labels.min())}..{int(labels.max())}, but the model "
                f"gives {outputs} score(s) per sample (classes 0..{n_classes - 1}). Check the labels or the model head."
            )
        present = sorted(int(k) for k in labels.unique().tolist())
        if self.targets is None:
            self._classes = present
        else:
            wrong = [k for k in self.targets if k >= n_classes]
            if wrong:
                raise ValueError(
                    f"ConceptCallback: class target(s) {wrong} out of range: the model gives {outputs} score(s) per "
                    f"sample, so targets must lie in 0..{n_classes - 1}. Fix targets=..."
                )
            absent = [k for k in self.targets if k not in present]
            if absent and not self._provisional:
                self._warn(
                    f"ConceptCallback: target class(es) {self._named(absent)} have no probe samples, so they get no "
                    "TCAV score. "
                    "Draw more probe samples (num_samples) or give probe=ProbeSet(...) with samples of those classes."
                )
            self._classes = [k for k in self.targets if k in present]
            if not self._classes and not self._provisional:
                raise ValueError(
                    f"ConceptCallback: none of the target classes {self._named(self.targets)} has probe samples (the "
                    f"probe's classes are {self._named(present)}): nothing to score. Change targets or the probe set."
                )
        shape = tuple(probe.inputs.shape[1:])
        given = [(f"concept {c!r}", x) for c, x in self.concepts.items()]
        if self.random_examples is not None:
            given.append(("random_examples", self.random_examples))
        for what, examples in given:
            if tuple(examples.shape[1:]) != shape:
                raise ValueError(
                    f"ConceptCallback: the examples of {what} have shape {tuple(examples.shape[1:])} per sample, but "
                    f"the probe inputs (what the model is fed) have {shape}. Give the examples in the form of a "
                    "validation batch's inputs (same size, channels and preprocessing)."
                )
        pool = self._pool(probe).shape[0]
        for what, examples in given:
            if examples.dtype != probe.inputs.dtype and not (
                examples.is_floating_point() and probe.inputs.is_floating_point()
            ):
                raise ValueError(
                    f"ConceptCallback: the examples of {what} are {examples.dtype}, the probe inputs "
                    f"{probe.inputs.dtype}: give the examples as the model is fed (e.g. float images after the "
                    "validation transforms)."
                )
        if self._provisional and self.random_examples is None:
            return  # the pool is the probe set, drawn later from more samples than the few seen so far
        source = "the probe set (num_samples)" if self.random_examples is None else "random_examples"
        given_size, count = self.test.random_set_size, 2 * self.test.n_random
        size = given_size or min(max(x.shape[0] for x in self.concepts.values()), pool // count)
        if size < MIN_RANDOM_SET or size * count > pool:
            raise ValueError(
                f"ConceptCallback draws {count} disjoint random sets (2 x n_random={self.test.n_random}) of "
                f"{size if given_size else f'at least {MIN_RANDOM_SET}'} examples from {source}, which "
                f"holds {pool}: it needs {count * max(size, MIN_RANDOM_SET)}. Draw more probe samples "
                "(num_samples=...), give more random_examples=..., or lower test=TCAVTest(n_random=..., "
                "random_set_size=...)."
            )
        if self._provisional:
            return
        sets = self._random_sets
        if sets is None or sets.shape != (count, size) or int(sets.max()) >= pool:
            self._random_sets = disjoint_random_sets(pool, count, size, seed=self.seed)

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """The gradient pass on two probe samples, the activations of a few examples and one CAV per layer."""
        small = probe.subset(min(2, len(probe)))
        assert small.labels is not None
        inputs = self._probe_inputs(trainer, pl_module, small)
        labels = class_labels(small.labels, "multiclass").to(inputs.device)
        first = next(iter(self.concepts.values()))[:2]
        bank = self._as_probe_dtype(torch.cat([first, self._pool(probe)[:2]]), probe)
        with self._model_context(trainer):
            layer_gradients(
                self._explained(pl_module, small),
                inputs,
                self.layers,
                labels,
                batch_size=self._gradient_chunk,
                task=self._task,
            )
            acts = concept_activations(
                pl_module, self._device_inputs(trainer, pl_module, bank), self.layers, batch_size=self._chunk
            )
        for values in acts:
            compute_cav(values[:2], values[2:], test_fraction=self.cav.test_fraction, l2=self.cav.l2, max_iter=5)

    def _rows_of_classes(self, probe: ProbeSet, device: torch.device) -> list[Tensor]:
        """The row indices, on ``device``, of each probe class with two or more samples (in class order), found from
        the host labels once per probe set: the probe is fixed for a fit."""
        cached = self._class_rows
        if cached is None or cached[0] is not probe or (cached[1] and cached[1][0].device != device):
            assert probe.labels is not None
            labels = class_labels(probe.labels, "multiclass").cpu()
            rows = [(labels == k).nonzero().flatten() for k in labels.unique()]
            cached = (probe, [index.to(device) for index in rows if index.numel() >= 2])
            self._class_rows = cached
        return cached[1]

    @property
    def _gradient_chunk(self) -> int:
        """Samples per gradient pass: a quarter of the forward chunk (the backward keeps every layer's output)."""
        return max(1, self._chunk // 4)

    @staticmethod
    def _as_probe_dtype(examples: Tensor, probe: ProbeSet) -> Tensor:
        if examples.is_floating_point() and probe.inputs.is_floating_point():
            return examples.to(probe.inputs.dtype)
        return examples

    # ------------------------------------------------------------------ the run
    def _warn_once(self, key: str, message: str) -> None:
        super()._warn_once(key, f"{message} (this warning is given once per run)")

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        probe = self.probe
        assert probe is not None and probe.labels is not None and self._random_sets is not None
        inputs = self._probe_inputs(trainer, pl_module)
        labels = class_labels(probe.labels, "multiclass").to(inputs.device)
        names = list(self.concepts)
        parts = [self.concepts[c] for c in names] + ([] if self.random_examples is None else [self.random_examples])
        sizes = [part.shape[0] for part in parts]
        bank = self._device_inputs(trainer, pl_module, self._as_probe_dtype(torch.cat(parts), probe))
        with self._model_context(trainer):
            probe_acts, grads = layer_gradients(
                pl_module, inputs, self.layers, labels, batch_size=self._gradient_chunk, task=self._task
            )
            bank_acts = concept_activations(pl_module, bank, self.layers, batch_size=self._chunk)
        sets = self._random_sets.to(inputs.device)
        class_rows = self._rows_of_classes(probe, inputs.device)
        results: dict[str, dict[str, TCAVResult]] = {}
        flags = []  # per layer: (any gradient, same gradient within classes), read after the loop in one transfer
        for layer, acts, gradient, examples in zip(self.layers, probe_acts, grads, bank_acts, strict=True):
            flags.append(torch.stack([gradient.any(), _same_gradient_within_classes(gradient, class_rows)]))
            split = examples.split(sizes)
            pool = acts if self.random_examples is None else split[-1]
            results[layer] = tcav_from_activations(
                dict(zip(names, split[: len(names)], strict=True)),
                [pool[index] for index in sets],
                gradient,
                labels,
                self._classes,
                test_fraction=self.cav.test_fraction,
                l2=self.cav.l2,
                seed=self.seed,
                equal_var=self.test.equal_var,
            )
        for layer, (moving, linear) in zip(self.layers, torch.stack(flags).tolist(), strict=True):
            if not moving:
                self._warn_once(
                    f"zero {layer}",
                    f"ConceptCallback: the gradient of the class logits at layer {layer!r} is zero for every probe "
                    "sample (the units are dead, or the output does not depend on this layer), so no CAV can raise "
                    "a class: its TCAV scores are 0 by construction and mean nothing. Choose another layer",
                )
            elif linear:
                self._warn_once(
                    f"linear {layer}",
                    f"ConceptCallback: at layer {layer!r} the gradient of each class's logit is the same for every "
                    "probe sample of that class, so every CAV scores a class exactly 0 or 1 and the TCAV scores say "
                    "only which way the CAV points: the layer is followed by linear operations alone (e.g. the ReLU "
                    "before global pooling and a linear head). Choose a layer with a non-linearity between it and "
                    "the logits",
                )
        # every number to the CPU at once
        packed = to_numpy(
            {
                f"{kind} {layer} {concept}": value
                for layer, per_layer in results.items()
                for concept, r in per_layer.items()
                for kind, value in (
                    ("scores", r.scores),
                    ("p", r.p_values),
                    ("random", r.random_scores),
                    ("accuracy", r.accuracies.mean()),
                )
            }
        )  # every number of every layer and concept to the host in one copy
        numbers = {
            (layer, concept): tuple(
                packed[f"{kind} {layer} {concept}"] for kind in ("scores", "p", "random", "accuracy")
            )
            for layer, per_layer in results.items()
            for concept in per_layer
        }
        scalars: dict[str, float] = {}
        panels: list[TCAVPanel] = []
        epoch = trainer.current_epoch
        for layer in self.layers:
            bars: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
            random_scores = None
            for concept in names:
                scores, p_values, random_scores, accuracy_array = numbers[(layer, concept)]
                accuracy = float(accuracy_array)
                base = f"interp_{self.name}/{concept}/{layer}"
                scalars[f"{base}/cav_accuracy"] = accuracy
                if math.isnan(accuracy):
                    self._warn_once(
                        f"nan {concept} {layer}",
                        f"ConceptCallback: the activations of layer {layer!r} hold NaN or inf for concept {concept!r} "
                        f"or its random examples at epoch {epoch}, so no CAV can be fitted: its cav_accuracy is "
                        "logged as NaN and no TCAV score while this lasts",
                    )
                    bars[concept] = None
                    continue
                if accuracy < self.cav.min_accuracy:
                    self._warn_once(
                        f"chance {concept} {layer}",
                        f"ConceptCallback: the CAVs of concept {concept!r} at layer {layer!r} separate its examples "
                        f"from random ones no better than chance (mean held-out accuracy {accuracy:.2f} < "
                        f"cav.min_accuracy={self.cav.min_accuracy}) at epoch {epoch}: the layer does not encode the "
                        "concept linearly (or the examples are too few), so its TCAV scores would be noise: "
                        "only its cav_accuracy is logged while this lasts",
                    )
                    bars[concept] = None
                    continue
                means, spread = scores.mean(axis=0), scores.std(axis=0, ddof=1)  # ddof=1: torch's std
                bars[concept] = (means, spread, p_values)
                for column, k in enumerate(self._classes):
                    shown = class_name(self.class_names, k)
                    scalars[f"{base}/{shown}/tcav"] = float(means[column])
                    scalars[f"{base}/{shown}/p_value"] = float(p_values[column])
            assert random_scores is not None
            panels.append((layer, bars, (random_scores.mean(axis=0), random_scores.std(axis=0, ddof=1))))
        step, classes, class_names = logging_step(trainer), list(self._classes), self.class_names
        alpha = self.test.alpha

        def draw() -> None:
            image = tcav_bar_image(
                panels, names, classes, alpha=alpha, title=f"TCAV scores (epoch {epoch})", class_names=class_names
            )
            log_image(trainer, f"interp_{self.name}/scores", image, step)

        self._submit(trainer, draw)
        return scalars

    def _named(self, classes: Sequence[int]) -> list[str] | list[int]:
        """Class indices as their names where ``class_names`` gives them (for messages), else the indices."""
        return [class_name(self.class_names, k) for k in classes] if self.class_names else list(classes)


def _same_gradient_within_classes(gradient: Tensor, class_rows: list[Tensor]) -> Tensor:
    """0-d bool on the gradient's device: whether every class with two or more samples (``class_rows``: each such
    class's row indices) has one gradient row repeated (to float32 rounding); False when there is none."""
    repeated = []
    for index in class_rows:
        rows = gradient.index_select(0, index)
        scale = rows.abs().amax().clamp_min(torch.finfo(rows.dtype).tiny)
        repeated.append((rows - rows[:1]).abs().amax() <= 1e-5 * scale)
    if not repeated:
        return torch.zeros((), dtype=torch.bool, device=gradient.device)
    return torch.stack(repeated).all()
