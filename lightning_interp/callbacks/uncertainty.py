"""UncertaintyCallback: Monte Carlo dropout uncertainty of a fixed probe set, every validation epoch."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._base import InterpCallback, class_name, unwrapped
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.methods import (
    DROPOUT_TYPES,
    METHODS,
    Explainer,
    MethodsArg,
    OutputTransform,
    class_labels,
    dirichlet_uncertainty,
    eager_forward,
    expected_entropy,
    label_kind,
    map_agreement,
    mc_dropout_maps,
    mc_dropout_predictions,
    modes_preserved,
    mutual_information,
    parse_methods,
    predictive_entropy,
    scores_from_output,
)
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import input_to_rgb, map_tiles, render_grid

__all__ = ["UncertaintyCallback"]

SHOWN = 8  # probe samples in the figure: the most uncertain ones


class UncertaintyCallback(InterpCallback):
    """Log how uncertain the model is on a fixed probe set, by Monte Carlo dropout (Gal & Ghahramani 2016).

    At each due validation epoch the probe set goes through ``passes``
    stochastic forward passes with only the model's dropout layers active (every
    other module in eval mode, every flag restored; see
    :func:`~lightning_interp.methods.mc_dropout_predictions`). The
    dropout masks come from the callback's own generator, seeded with ``seed``
    afresh at every run, so epochs are compared on the same masks and the
    global CPU and CUDA random state is untouched (training stays
    bit-identical). From the samples' softmax outputs ``p_s`` and their mean
    ``p̄``, per probe sample:

    - predictive entropy ``H(p̄)``: the total uncertainty;
    - expected entropy ``mean_s H(p_s)``: the aleatoric part (what every dropout
      sub-network finds ambiguous);
    - mutual information ``H(p̄) - mean_s H(p_s)`` >= 0: the epistemic part
      (how much the sub-networks disagree), which shrinks as the model learns
      what its data can teach.

    Logged under ``interp_<name>/`` (default ``uncertainty``):

    - ``predictive_entropy``, ``expected_entropy``, ``mutual_information``: means
      over the probe set (nats; the most a K-class prediction can have is log K);
    - with class labels, ``<class>/predictive_entropy``,
      ``<class>/mutual_information`` per label class, and
      ``predictive_entropy_wrong`` / ``predictive_entropy_right``: the mean over
      the samples the MC-averaged prediction gets wrong and right (an
      over-confident model has the two close together);
    - ``most_uncertain`` (image inputs): the ``8`` probe samples of highest
      predictive entropy, each titled with its label, the MC-averaged prediction
      and the two uncertainties.

    The explained samples are ``explain_samples`` probe samples spread evenly
    over the probe set (so several classes appear).

    Evidential models (``output_kind="evidential"``, Sensoy et al. 2018): the
    head outputs Dirichlet evidence (>= 0, e.g. after a softplus; alpha =
    evidence + 1). One eval-mode forward of the probe set gives, per sample,
    the vacuity ``K / sum(alpha)`` (1 = no evidence at all) and the predictive
    entropy of the expected probability ``alpha / sum(alpha)``; logged as
    ``vacuity``, ``predictive_entropy``, per class, ``vacuity_right`` /
    ``vacuity_wrong``, and the figure ranked by vacuity. No dropout needed; a
    head with negative outputs is refused before training.

    Uncertainty of an explanation (``methods="gradient"`` or any registered
    methods; the study of "uncertain DeepLIFT / LRP" under MC dropout, for any
    method): for ``explain_samples`` probe samples, each method's map
    of the predicted class under each of the ``passes`` dropout
    sub-networks (:func:`~lightning_interp.methods.mc_dropout_maps`;
    the explained class is the MC-averaged prediction, the one the figures show),
    logged as ``<method>/maps`` (input, mean map, per-pixel standard deviation
    over the passes), ``<method>/map_agreement`` (mean Spearman correlation
    between the passes' maps: 1 = the explanation does not depend on which
    units dropped out) and ``<method>/map_relative_std`` (mean per-pixel std
    over the mean map's mean). Cost: ``passes`` runs of each method on
    ``explain_samples`` samples. The methods run through an
    :class:`~lightning_interp.methods.Explainer` whose stochastic methods draw
    from a generator seeded afresh in every pass, so the passes differ by the
    dropped units only (a CAM method without a layer gets the automatic
    Grad-CAM layer, chosen once per fit).

    A model without a dropout module is refused before training (MC dropout
    needs one). A warning says when every stochastic pass gave the same output
    (the dropout layers have ``p=0``, or forward() does not call them): the
    epistemic part is then 0 by construction, not because the model is certain.

    Cost per run: ``passes`` no-grad forward passes of the probe set.

    Args:
        passes: stochastic forward passes per run (>= 2).
        num_samples: probe samples drawn from the validation data.
        seed: seed of the callback's generator, used afresh at every run.
        output_transform: picks the (B, K) logits out of the model's output.
        methods: registered attribution methods to run under MC dropout (a name, a list, or a
            ``{name: {option: value}}`` mapping, e.g. ``{"integrated_gradients": {"n_steps": 16}}``), or None (the
            default) for none.
        explain_samples: probe samples explained, spread evenly over the probe set (rows of ``<method>/maps``).
        output_kind: ``"logits"`` (MC dropout, the default) or ``"evidential"`` (the output is Dirichlet evidence).
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``probe``, ``data``, ``display``,
            ``forward_fn`` (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> callback = UncertaintyCallback(passes=16, num_samples=128)
        >>> callback.passes, callback.name
        (16, 'uncertainty')
    """

    display_fields = ("background_drawing", "cmap")

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        passes: int = 16,
        *,
        num_samples: int = 256,
        seed: int = 0,
        output_transform: OutputTransform | None = None,
        methods: MethodsArg | None = None,
        explain_samples: int = 4,
        output_kind: Literal["logits", "evidential"] = "logits",
        name: str = "uncertainty",
        **kwargs: Any,
    ) -> None:
        check_arguments(
            seed=seed,
            passes=passes,
            output_transform=output_transform,
            output_kind=output_kind,
            explain_samples=explain_samples,
        )
        parsed = {} if methods is None else parse_methods(methods, owner="UncertaintyCallback")
        super().__init__(name=name, num_samples=num_samples, **kwargs)
        self._members: tuple[ProbeSet, list[tuple[int, Tensor]]] | None = None  # per class of the probe: its samples
        self.methods = tuple(parsed)
        self.method_options = {method: options for method, options in parsed.items() if options}
        self.output_kind = output_kind
        self.explain_samples = explain_samples
        self.passes = passes
        self._layers: dict[str, str] = {}  # per CAM method without a layer: the automatic one of this fit
        self.seed = seed
        self.output_transform = output_transform

    # ------------------------------------------------------------------ checks, before training
    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._members = None

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        model = unwrapped(pl_module)
        needs_dropout = self.output_kind == "logits" or bool(self.methods)
        if needs_dropout and not any(isinstance(module, DROPOUT_TYPES) for module in model.modules()):
            why = "estimates uncertainty" if self.output_kind == "logits" else "explains"
            raise ValueError(
                f"UncertaintyCallback {why} by Monte Carlo dropout, but {type(model).__name__} has no dropout module "
                f"({', '.join(t.__name__ for t in DROPOUT_TYPES)}). Add one (e.g. nn.Dropout(0.1) before the "
                "classifier), use output_kind='evidential' for an evidential head, or leave this callback out."
            )

    def _predictions(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)  # afresh each run: the same masks every epoch
        with self._model_context(trainer):
            return mc_dropout_predictions(
                self._explained(pl_module),
                inputs,
                self.passes,
                generator=generator,
                output_transform=self.output_transform,
            )

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        two = probe.subset(min(2, len(probe)))
        pl_module = self._explained(pl_module, two)
        inputs = self._probe_inputs(trainer, pl_module, two)
        if self.output_kind == "evidential":
            self._evidence(trainer, pl_module, inputs)  # refuses negative "evidence" before training
        else:
            generator = torch.Generator().manual_seed(self.seed)
            with self._model_context(trainer):
                mc_dropout_predictions(
                    self._explained(pl_module), inputs, 2, generator=generator, output_transform=self.output_transform
                )
        for method in self.methods:
            self._maps(trainer, pl_module, method, inputs, passes=2)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        self._layers = {}
        for method in self.methods:
            if METHODS[method].needs_layer and "layer" not in self.method_options.get(method, {}):
                labels = _class_labels(probe.labels)
                self._layers[method] = self._automatic_cam_layer(
                    trainer, pl_module, probe, labels, self.output_transform
                )

    def explainer(self, method: str) -> Explainer:
        """The :class:`~lightning_interp.methods.Explainer` run in each dropout pass for ``method``: its options, its
        layer (given, or this fit's automatic one), ``output_transform`` and ``seed``."""
        options = dict(self.method_options.get(method, {}))
        if method in self._layers:
            options["layer"] = self._layers[method]
        return Explainer({method: options}, output_transform=self.output_transform, seed=self.seed)

    def _maps(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        method: str,
        inputs: Tensor,
        passes: int,
        target: Tensor | None = None,
    ) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        with self._model_context(trainer):
            return mc_dropout_maps(
                self._explained(pl_module),
                inputs,
                self.explainer(method),
                passes,
                target=target,
                generator=generator,
                output_transform=self.output_transform,
            )

    # ------------------------------------------------------------------ the run
    def _quantities(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], Tensor]:
        """Per probe sample: the uncertainties by name (the first ranks the figure) and the predicted class."""
        inputs = self._probe_inputs(trainer, pl_module)
        if self.output_kind == "evidential":
            evidence = self._evidence(trainer, pl_module, inputs)
            expected, vacuity = dirichlet_uncertainty(evidence)
            return {"vacuity": vacuity, "predictive_entropy": predictive_entropy(expected)}, expected.argmax(dim=1)
        probs = self._predictions(trainer, pl_module, inputs)  # (S, N, K)
        quantities = {
            "predictive_entropy": predictive_entropy(probs),
            "expected_entropy": expected_entropy(probs),
            "mutual_information": mutual_information(probs),
        }
        return quantities, probs.mean(dim=0).argmax(dim=1)

    def _evidence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        """The model's (N, K) output read as Dirichlet evidence, from one eval-mode no-grad forward."""
        model = self._explained(pl_module)
        with torch.no_grad(), modes_preserved(model), eager_forward(), self._model_context(trainer):
            parts = [
                scores_from_output(model(inputs[start : start + 256]), self.output_transform).float()
                for start in range(0, inputs.shape[0], 256)
            ]
        evidence = torch.cat(parts)
        if bool((evidence < 0).any()):
            raise ValueError(
                "UncertaintyCallback(output_kind='evidential') reads the model's output as Dirichlet evidence, which "
                f"must be >= 0, but it has values down to {float(evidence.min()):.4g}: end the head in softplus, relu "
                "or exp (or use output_transform=...), or use output_kind='logits' for MC dropout."
            )
        return evidence

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        probe = self.probe
        assert probe is not None
        quantities, predicted = self._quantities(trainer, pl_module)
        names = list(quantities)
        # one transfer: the uncertainties and the predictions (class indices are exact in float64)
        host = torch.cat([torch.stack(list(quantities.values())).double(), predicted.double()[None]]).cpu()
        rows, predicted_cpu = host[:-1], host[-1].long()
        labels = _class_labels(probe.labels)
        means = torch.stack([row.mean() for row in rows]).tolist()  # read once
        scalars = {f"interp_{self.name}/{name}": value for name, value in zip(names, means, strict=True)}
        if not all(math.isfinite(value) for value in means) and not bool(torch.isfinite(rows).all()):
            self._warn(
                f"UncertaintyCallback: the model's outputs on the probe set are not finite at epoch "
                f"{trainer.current_epoch}, so the uncertainties are NaN."
            )
        main, second = names[0], names[-1]  # the figure's ranking, and the other number in its titles
        if labels is not None:
            # host tensors: the per-class and per-group means are gathered and read in one go
            right = predicted_cpu == labels
            found: dict[str, Tensor] = {}
            for k, members in self._class_members(probe, labels):
                tag = f"interp_{self.name}/{self._class_name(k)}"
                for name in dict.fromkeys((main, "predictive_entropy", second)):
                    found[f"{tag}/{name}"] = rows[names.index(name)].index_select(0, members).mean()
            for group, which in (("right", right), ("wrong", ~right)):
                chosen = which.nonzero().flatten()
                if chosen.numel():
                    found[f"interp_{self.name}/{main}_{group}"] = rows[0].index_select(0, chosen).mean()
            if found:
                scalars.update(zip(found, torch.stack(list(found.values())).tolist(), strict=True))
        for method in self.methods:
            scalars.update(self._explanation_uncertainty(trainer, pl_module, method, probe, predicted))
        if probe.inputs.ndim == 4:
            order = torch.argsort(rows[0], descending=True, stable=True)[: min(SHOWN, len(probe))]
            shown = probe.inputs[order]
            short = {"predictive_entropy": "H", "mutual_information": "MI", "vacuity": "vac"}
            # the shown samples' numbers, read once (host tensors)
            firsts, others = rows[[0, names.index(second)]][:, order].tolist()
            guesses = predicted_cpu[order].tolist()
            truths = None if labels is None else labels[order].tolist()
            titles = [
                self._title(
                    guesses[j],
                    None if truths is None else truths[j],
                    (short[main], firsts[j]),
                    (short[second], others[j]),
                )
                for j in range(len(guesses))
            ]
            step, epoch = logging_step(trainer), trainer.current_epoch

            def draw() -> None:
                tiles = [list(input_to_rgb(shown))]
                grid = render_grid(tiles, column_titles=titles, title=f"most uncertain probe samples (epoch {epoch})")
                log_image(trainer, f"interp_{self.name}/most_uncertain", grid, step)

            self._submit(trainer, draw)
        return scalars

    def _explanation_uncertainty(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, method: str, probe: ProbeSet, predicted: Tensor
    ) -> dict[str, float]:
        count = min(self.explain_samples, len(probe))
        picks = np.linspace(0, len(probe) - 1, count).round().astype(np.int64).tolist()  # spread: several classes
        rows = probe.take(picks)
        target = predicted[torch.as_tensor(picks, device=predicted.device)]  # the class the figure shows as pred
        inputs = self._probe_inputs(trainer, pl_module, rows)
        pl_module = self._explained(pl_module, rows)
        maps = self._maps(trainer, pl_module, method, inputs, passes=self.passes, target=target)
        mean, spread = maps.mean(dim=0), maps.std(dim=0)
        agreement = map_agreement(maps)
        relative = spread.flatten(1).mean(dim=1) / mean.flatten(1).mean(dim=1).clamp_min(1e-12)
        # one transfer: the two numbers, the constant-maps flag and the pictures (float32 values: exact in float64)
        small = torch.stack([agreement.double().nanmean(), relative.double().mean(), agreement.isnan().all().double()])
        pictures = torch.stack([mean.float(), spread.float()])
        host = torch.cat([small, pictures.double().flatten()]).cpu()
        agreement_mean, relative_std, constant = host[:3].tolist()
        if constant:
            self._warn(
                f"UncertaintyCallback: the {method} maps under MC dropout are constant (a zero gradient, e.g. "
                f"dead units) at epoch {trainer.current_epoch}, so their agreement is undefined and logged as NaN."
            )
        base = f"interp_{self.name}/{method}"
        scalars = {f"{base}/map_agreement": agreement_mean, f"{base}/map_relative_std": relative_std}
        mean_cpu, spread_cpu = host[3:].reshape(pictures.shape).float().unbind(0)
        shown = rows.inputs
        step, epoch, cmap = logging_step(trainer), trainer.current_epoch, self.cmap

        def draw() -> None:
            columns = [
                list(input_to_rgb(shown)),
                map_tiles(shown, mean_cpu, cmap=cmap),
                map_tiles(shown, spread_cpu, cmap=cmap),
            ]
            tiles = [[column[i] for column in columns] for i in range(len(shown))]
            grid = render_grid(
                tiles,
                column_titles=["input", "mean", "std"],
                title=f"{method} under MC dropout (epoch {epoch})",
            )
            log_image(trainer, f"{base}/maps", grid, step)

        if shown.ndim == 4:
            self._submit(trainer, draw)
        return scalars

    def _class_members(self, probe: ProbeSet, labels: Tensor) -> list[tuple[int, Tensor]]:
        """Each class of the probe labels, in order, with the (host) indices of its samples: found once per probe set
        (it is fixed for a fit), not at every run."""
        cached = self._members
        if cached is None or cached[0] is not probe:
            classes = sorted(set(labels.tolist()))
            cached = (probe, [(k, (labels == k).nonzero().flatten()) for k in classes])
            self._members = cached
        return cached[1]

    def _class_name(self, k: int) -> str:
        return class_name(self.class_names, k)

    def _title(self, predicted: int, label: int | None, first: tuple[str, float], second: tuple[str, float]) -> str:
        guess = self._class_name(predicted)
        head = f"y {self._class_name(label)}\n" if label is not None else ""
        return f"{head}pred {guess}\n{first[0]} {first[1]:.2f}\n{second[0]} {second[1]:.3f}"


def _class_labels(labels: Tensor | None) -> Tensor | None:
    """(N,) class indices from class-index or one-hot labels; None for other labels (regression, multi-label)."""
    if labels is None or label_kind(labels) not in ("class", "one_hot"):
        return None
    return class_labels(labels, "multiclass").long().cpu()
