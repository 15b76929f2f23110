"""SaliencyCallback: input-attribution maps of a fixed probe set at every validation epoch."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_interp.callbacks._base import JointInputs, first_rows, several_inputs
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._maps import Explanation, MapCallback, is_token_input
from lightning_interp.methods import (
    METHODS,
    Explainer,
    LayerInput,
    MethodsArg,
    NeuronScores,
    NeuronTarget,
    find_input_embedding,
    get_module,
    input_feature_masks,
    input_shares,
    layer_output,
    parse_methods,
    plain_name,
    token_scores,
)
from lightning_interp.probe import ProbeSet


class SaliencyCallback(MapCallback):
    """Log saliency maps of a fixed probe set, with scores that track how they change.

    At each due validation epoch (never in the sanity check) the callback
    explains its probe samples with every method in ``methods`` and logs, under
    ``interp_<name>/``:

    - ``maps``: an image grid, one row per probe sample (label, prediction and
      confidence on the left), the input and then one heatmap overlay per method;
    - ``<method>/concentration``: share of attribution mass in the top 10% of pixels;
    - ``<method>/stability``: mean Spearman rank correlation with the maps of
      the previous run (from the second run on);
    - ``<method>/localization`` and ``<method>/pointing_game`` when the probe
      set has object masks;
    - ``<method>/completeness_error`` (integrated gradients, DeepLIFT,
      DeepLiftShap, LRP, GradientSHAP): mean |sum of attributions -
      (f(x) - f(baseline))| relative to mean |f(x) - f(baseline)|; for
      GradientSHAP, whose attributions sum to the change only in expectation,
      the change is the mean over its draws of f(x') - f(r) and the error is
      that of the draws (it shrinks as 1 / sqrt(n_samples));
    - at fit end, ``<method>/evolution``: the maps of a few samples across epochs.

    Token inputs (integer ids into an ``nn.Embedding``): ``input_layer="auto"``
    attributes at the output of the embedding layer the ids go into, one score
    per token: for the methods whose attributions are contributions (input ×
    gradient, integrated gradients, DeepLIFT, ...) their sum over the embedding
    dimension (for integrated gradients the scores of a sample then add up to
    ``f(x) - f(baseline)``), shown as its magnitude or signed with
    ``channel_reduction="sum"``; for the gradient methods (sensitivities) the
    norm of the token's gradient; padding tokens get zero. The baseline of
    integrated gradients, DeepLIFT and GradientSHAP is the padding id's
    embedding when the data description gives ``pad_id`` (zeros otherwise);
    the grid shows the text (its ``vocabulary`` or ``decode``).

    With ``target=NeuronTarget(layer="features.3", index=(c,))`` the maps
    explain a unit (a full index) or a channel (summed, or averaged with
    ``reduce="mean"``) of a layer instead of an output: the model runs up to
    that layer and the unit's activation is the explained score (Captum's
    ``NeuronGradient``, ``NeuronIntegratedGradients``), so its evolution over
    training shows what the unit comes to respond to; the grid shows the
    activation (``out``). The layer name is checked before training (with the
    closest names when it is wrong), and the index against the layer's output.
    ``methods="deconvnet"`` then shows Zeiler and Fergus's reconstruction from
    that feature map: its strongest activation passed down through the
    deconvnet (``{"deconvnet": {"keep": "map"}}``: the whole map).

    The methods run through one :class:`~lightning_interp.methods.Explainer`
    (built at fit start; ``callback.explainer()``), so an ``Explainer`` with the
    same settings (``task``, ``seed``, ``internal_batch_size=512``) called on
    the same model and probe gives exactly these maps. ``gradient`` and
    ``input_x_gradient`` share one forward and one backward.
    The stochastic methods (SmoothGrad, GradientSHAP, LIME, KernelSHAP) draw
    from the callback's own generator on the model's device, re-seeded each
    run, so the global and CUDA RNGs (and thus training) are untouched and
    epochs are compared on the same draws.

    Args:
        methods: input-attribution methods of the registry
            (:func:`~lightning_interp.methods.available_methods`): a name, a list
            of names, or a ``{name: {option: value}}`` mapping for a method's own
            options, e.g. ``{"gradient": None, "smoothgrad": {"n_samples": 8}}``
            (in YAML: ``methods: {gradient: null, smoothgrad: {n_samples: 8}}``);
            ``(name, options)`` pairs in a list work too.
        channel_reduction: how (B, C, H, W) attributions become one map:
            ``"abs_sum"``, ``"abs_max"`` or ``"sum"`` (signed, diverging colormap).
            At an embedding (``input_layer``) a token's score is the sum of its contributions over the embedding
            dimension (``"sum"`` shows it signed, the others its magnitude) or, for the gradient methods, the
            norm of its gradient.
        internal_batch_size: most inputs per forward pass, for every method that batches copies of the inputs.
        input_layer: attribute at the output of this layer instead of the input: ``"auto"`` (the first
            ``nn.Embedding`` called on the input ids) or a dotted name; None (the default) attributes to the
            input itself. For token-id inputs, with the gradient and modified-backward methods.
        seed: seed of the callback's generator for the stochastic methods.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: shared options of :class:`~lightning_interp.callbacks.MapCallback`
            (``num_samples``, ``every_n_epochs``, ``target``, ``probe``, ...).

    Example:
        >>> callback = SaliencyCallback(methods=("gradient", "smoothgrad"), num_samples=8)
        >>> callback.methods
        ('gradient', 'smoothgrad')
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)
    neuron_targets = True  # target=NeuronTarget(...): what drives a unit of a layer

    def __init__(
        self,
        methods: MethodsArg = ("gradient", "integrated_gradients"),
        *,
        channel_reduction: Literal["abs_sum", "abs_max", "sum"] = "abs_sum",
        internal_batch_size: int = 512,
        input_layer: str | None = None,
        seed: int = 0,
        name: str = "saliency",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        parsed = parse_methods(
            methods,
            allowed=[name for name, spec in METHODS.items() if not spec.needs_layer],  # as declared now
            owner="SaliencyCallback",
            elsewhere="GradCAMCallback(methods=...)",
        )
        names = tuple(parsed)
        check_arguments(channel_reduction=channel_reduction, internal_batch_size=internal_batch_size, seed=seed)
        if input_layer is not None and (not isinstance(input_layer, str) or not input_layer):
            raise ValueError(f"input_layer must be None, 'auto' or a dotted module name, got {input_layer!r}.")
        if input_layer is not None:
            perturbing = [method for method in names if METHODS[method].family == "perturbation"]
            if perturbing:
                raise ValueError(
                    f"SaliencyCallback(input_layer=...) attributes at an embedding with the gradient and "
                    f"modified-backward methods; {perturbing} perturb input positions in batches that cannot be "
                    "paired with the token ids. Leave them out."
                )
        self.methods = names
        self.method_options = {name: options for name, options in parsed.items() if options}
        self._explainer: Explainer | None = None  # built at fit start, with the output kind in force
        self.input_layer = input_layer
        self._embedding: str | None = None  # the layer attributed at, resolved at fit start
        self.channel_reduction = channel_reduction
        self.internal_batch_size = internal_batch_size
        self.seed = seed

    def explainer(self) -> Explainer:
        """The :class:`~lightning_interp.methods.Explainer` a run calls: these methods and options, the output kind in
        force (inferred at fit start; ``"multiclass"`` before), ``output_transform`` and ``seed``. Calling it on the
        model and the probe inputs gives the attributions behind the logged maps."""
        if self._explainer is not None:
            return self._explainer
        return self._explainer_of(self.methods)

    def _explainer_of(self, methods: tuple[str, ...] | list[str]) -> Explainer:
        """An :class:`Explainer` of some of the methods, with the callback's settings."""
        neuron = isinstance(self.target, NeuronTarget)  # the unit's activation is the score: no transform
        return Explainer(
            {name: self.method_options.get(name) for name in methods},
            task="regression" if neuron else self.output_task,
            output_transform=None if neuron else self.output_transform,
            seed=self.seed,
            internal_batch_size=self.internal_batch_size,
        )

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._explainer = None

    def _zero_map_reason(self, key: str) -> str:
        return (
            "the gradient of the target score with respect to every input value is zero (saturated outputs, dead "
            "ReLUs, or inputs the score does not depend on)."
        )

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        if isinstance(self.target, NeuronTarget):
            get_module(pl_module, self.target.layer)  # a wrong name fails now, with the closest names

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        floating = [i for i, value in enumerate(probe.more_inputs, 1) if value.is_floating_point()]
        alone = not probe.inputs.is_floating_point() or isinstance(self.target, NeuronTarget)
        if floating and alone:
            why = "a NeuronTarget is explained" if probe.inputs.is_floating_point() else "the first input is integer"
            self._warn(
                f"SaliencyCallback explains the first input only here ({why}), so the model's floating-point "
                f"input(s) {[self.input_name(i) for i in floating]} get no map and no share. To explain them all, "
                "put a floating-point input first in the batches (integer ids after it are passed along)."
            )
        self._explainer = None
        self._explainer = self.explainer()  # this fit's: with the output kind just inferred
        self._embedding = None
        if self.input_layer is None:
            return
        if not is_token_input(probe.inputs):
            raise ValueError(
                f"SaliencyCallback(input_layer={self.input_layer!r}) is for token-id inputs (integer (N, T) "
                f"tensors into an embedding); these probe inputs are {probe.inputs.dtype} of shape "
                f"{tuple(probe.inputs.shape)}: attribute to them directly with input_layer=None."
            )
        two = self._device_inputs(trainer, pl_module, probe.inputs[:2])
        model = first_rows(pl_module, two.shape[0])
        if self.input_layer == "auto":
            self._embedding = find_input_embedding(model, two)
        else:
            get_module(pl_module, self.input_layer)
            self._embedding = self.input_layer
        embedded = layer_output(model, self._embedding, two)
        if embedded.ndim != 3 or tuple(embedded.shape[:2]) != tuple(two.shape) or not embedded.is_floating_point():
            raise ValueError(
                f"SaliencyCallback: the output of input_layer {plain_name(self._embedding)!r} has shape "
                f"{tuple(embedded.shape)} ({embedded.dtype}) for ids of shape {tuple(two.shape)}; one score per "
                "token needs a float (batch, tokens, dim) output, as an nn.Embedding gives."
            )

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        try:
            super()._trial(trainer, pl_module, probe)
        except Exception as error:
            text = str(error)
            if self._embedding is not None or probe.inputs.is_floating_point():
                raise
            if not any(word in text for word in ("indices", "Long", "scalar type")):
                raise
            # integer pixels work (they are attributed as floats); integer token ids into an embedding do not
            raise ValueError(
                f"SaliencyCallback attributes to the input, and the model failed on its {probe.inputs.dtype} probe "
                "inputs made float (token ids into an nn.Embedding?). Pass input_layer='auto' to attribute at the "
                "output of the embedding layer, one score per token."
            ) from error

    def _attributed(
        self, pl_module: pl.LightningModule, inputs: Tensor, real: Tensor | None
    ) -> tuple[Any, Tensor, Tensor | None]:
        """The model and inputs the methods explain: ``pl_module`` on ``inputs``, or with ``input_layer`` the model
        as a function of its embedding output, on the embeddings; and the baseline there (or None): the padding
        token's embedding at the real tokens (``real``, (B, T) bool, or every token), the sample's own embedding
        at its padding, which the path then leaves as it is."""
        if self._embedding is None:
            return pl_module, inputs, None
        module = get_module(pl_module, self._embedding)
        baseline = None
        with torch.no_grad():
            if self.input_layer == "auto":  # found as the nn.Embedding called on the ids: call it on them directly
                embedded = module(inputs).detach()
                if self.pad_id is not None:
                    baseline = module(torch.full_like(inputs[:1], self.pad_id)).detach().expand_as(embedded)
            else:  # a named layer may see more than the ids: take its output from the model's own forward
                embedded = layer_output(pl_module, self._embedding, inputs)
                if self.pad_id is not None:
                    first = first_rows(pl_module, 1)
                    baseline = layer_output(first, self._embedding, torch.full_like(inputs[:1], self.pad_id))
                    baseline = baseline.expand_as(embedded)
        if real is not None:
            baseline = torch.zeros_like(embedded) if baseline is None else baseline
            baseline = torch.where(real[..., None], baseline, embedded)
        return LayerInput(pl_module, self._embedding, inputs), embedded, baseline

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        several = None
        if self._embedding is None and not isinstance(self.target, NeuronTarget):
            several = several_inputs(pl_module, inputs)
        if several is not None:
            return self._explain_several(several, pl_module, inputs, target)
        ids = inputs
        real = self._real_tokens(pl_module, ids) if self._embedding is not None else None
        model, inputs, pad_baseline = self._attributed(pl_module, inputs, real)
        if isinstance(self.target, NeuronTarget):
            model = NeuronScores(model, self.target)  # (B, 1): the unit's activation, explained as target 0
        result = self.explainer()(model, inputs, target, baseline=pad_baseline)
        attributions = result.attributions
        if self._embedding is not None:  # (B, T, D) at the embedding: a token's score is the sum over D
            keep = real if real is not None else torch.ones_like(ids, dtype=torch.bool)
            maps = {
                key: token_scores(
                    value, keep, signed=self.channel_reduction == "sum", sensitivity=METHODS[key].sensitivity
                )
                for key, value in attributions.items()
            }
        else:
            maps = result.maps(self.channel_reduction)
        signed = set(maps) if self.channel_reduction == "sum" else set()
        if self._embedding is not None:  # a gradient's norm per token has no sign
            signed = {key for key in signed if not METHODS[key].sensitivity}
        return Explanation(
            maps=maps,
            scores=result.scores,
            target=result.target,
            scalars=dict(result.scalars),
            signed=signed,
            titles={key: METHODS[key].title for key in maps},
        )

    def _shares(
        self, key: str, parts: tuple[Tensor, ...], inputs: tuple[Tensor, ...], options: dict[str, Any]
    ) -> Tensor | None:
        """(inputs, N): each input's share of method ``key``'s attribution mass per sample; None for a gradient (its
        size is in each input's units) and for a perturbation method without features (occlusion's windows
        overlap). A method of features (LIME, KernelSHAP, feature ablation, ...) counts each feature once, the
        features of the ``options`` it ran with."""
        spec = METHODS[key]
        if spec.sensitivity or (spec.family == "perturbation" and "feature_mask" not in spec.options):
            return None
        if "feature_mask" not in spec.options:
            return input_shares(parts)
        masks = input_feature_masks(inputs, options.get("feature_mask"), options.get("patch_size"))
        return input_shares(parts, masks)

    def _input_values(self, which: int | str) -> Tensor:
        """The probe samples' values of one model input (a position among the positional inputs, or a keyword), on
        the host, for the pictures."""
        assert self.probe is not None
        return self.probe.all_inputs[which] if isinstance(which, int) else self.probe.extras[which]

    def _explain_several(
        self, several: JointInputs, view: pl.LightningModule, inputs: Tensor, target: Tensor | int | None
    ) -> Explanation:
        """A model of several inputs: its floating-point inputs explained together (one path, one noise, one set of
        features across all of them, so completeness covers their sum), one map per input; the first input's maps
        are the grid's, the others' go in ``input_maps``. Each contribution method also gives each input's share of
        the attribution mass, ``<method>/share_<input name>`` (see ``_shares``). A method that explains the
        first input only (the ``"first"`` ones of the registry, and a ``"each"`` one such as occlusion when the
        other inputs are not of the first one's kind: occlusion's window slides over images) runs on the first
        input, the others bound."""
        kind = several.explained[0].ndim
        every = [
            key
            for key in self.methods
            if METHODS[key].several_inputs == "joint"
            or (METHODS[key].several_inputs == "each" and all(value.ndim == kind for value in several.explained))
        ]
        names = [self.input_name(which) if isinstance(which, int) else which for which in several.inputs]
        maps: dict[str, Tensor] = {}
        input_maps: dict[str, dict[str, Tensor]] = {name: {} for name in names[1:]}
        scalars: dict[str, Tensor | float] = {}
        result = None
        if every:
            explainer = self._explainer_of(every)
            result = explainer(several.model, several.explained, target, additional_forward_args=several.others)
            options = {entry.key: entry.options for entry in explainer.entries}  # with the registry's run defaults
            scalars |= result.scalars
            for key, parts in result.maps(self.channel_reduction).items():
                maps[key] = parts[0]  # type: ignore[index]
                for index, name in enumerate(names[1:], 1):
                    input_maps[name][key] = parts[index]  # type: ignore[index]
            for key, parts in result.attributions.items():
                shares = self._shares(key, parts, several.explained, options[key])  # type: ignore[arg-type]
                for index, name in enumerate([] if shares is None else names):
                    scalars[f"{key}/share_{name}"] = shares[index].mean()  # type: ignore[index]
        alone = [key for key in self.methods if key not in every]
        if alone:  # the first input's maps only, the other inputs bound at their values
            first = self._explainer_of(alone)(view, inputs, target if result is None else result.target)
            scalars |= first.scalars
            maps |= first.maps(self.channel_reduction)  # type: ignore[arg-type]
            result = result or first
        assert result is not None
        maps = {key: maps[key] for key in self.methods}
        return Explanation(
            maps=maps,
            scores=result.scores,
            target=result.target,
            scalars=scalars,
            signed=set(maps) if self.channel_reduction == "sum" else set(),
            titles={key: METHODS[key].title for key in maps},
            input_maps={name: values for name, values in input_maps.items() if values},
            input_values={name: self._input_values(which) for name, which in zip(names, several.inputs, strict=True)},
        )
