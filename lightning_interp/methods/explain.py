"""One way to explain: :class:`Explainer` runs several registered methods on a batch and returns their maps.

Every callback that shows or scores maps (saliency, Grad-CAM, explanation
quality, dataset bias, uncertainty) builds one :class:`Explainer` per fit and
calls it; so does a user who wants, outside Lightning, exactly what a callback
logs. It owns what must never differ between callbacks:

- the methods and their options, given in one spelling (:func:`parse_methods`);
- the one forward and backward shared by the input gradient, input ×
  gradient and every gradient CAM at every layer;
- the target: resolved once (the prediction, per ``task``) and the same for
  every method;
- randomness: each stochastic method draws from a generator of its own,
  seeded with ``seed`` afresh at every call, on the inputs' device, so the
  global CPU and CUDA RNGs are never touched and two calls agree;
- the methods' own scalars (the completeness error of integrated gradients
  and DeepLIFT), as tensors on the inputs' device (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.methods.attribution.gradient import gradient, input_x_gradient
from lightning_interp.methods.cams.gradcam import CAM_VARIANTS, cam_from_activation
from lightning_interp.methods.evaluation.map_metrics import attribution_to_map
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    attribution_pass,
    eager_forward,
    modes_preserved,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.model.tokens import TokenReshape
from lightning_interp.methods.registry import METHODS, MethodSpec, attribute, check_method_options

__all__ = ["MANAGED_OPTIONS", "Attributions", "Explainer", "MethodsArg", "parse_methods"]

MethodsArg = str | Sequence[str | tuple[str, Mapping[str, Any]]] | Mapping[str, Mapping[str, Any] | None]
"""How every callback takes its methods: a name, a list of names (or ``(name, {option: value})`` pairs), or a
``{name: {option: value}}`` mapping (``None`` for no options)."""

ChannelReduction = Literal["abs_sum", "abs_max", "sum"]

MANAGED_OPTIONS = ("generator", "output_transform", "task", "return_convergence_delta", "upsample")
"""Method options the explainer sets itself, from its own arguments, never per method."""

_FROM_INPUT_GRADIENT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradient": lambda inputs, grad: grad,
    "input_x_gradient": lambda inputs, grad: inputs * grad,
}


def parse_methods(
    methods: MethodsArg,
    *,
    allowed: Sequence[str] | None = None,
    owner: str = "methods",
    elsewhere: str = "",
    layer_option: bool = True,
    managed: Sequence[str] = MANAGED_OPTIONS,
) -> dict[str, dict[str, Any]]:
    """Check a ``methods=`` argument and return ``{name: options}`` in the order given.

    Args:
        methods: a name, a list of names or ``(name, {option: value})`` pairs, or a ``{name: options}`` mapping.
        allowed: the names this caller takes (default: every registered method).
        owner: who asks, for the messages (e.g. ``"SaliencyCallback"``).
        elsewhere: where the other registered methods belong, for the messages.
        layer_option: whether a CAM method may name its ``layer`` among its options.
        managed: options the caller sets itself, refused here.

    Raises:
        ValueError: an unknown or disallowed name, a name given twice, or no method at all.
        TypeError: an entry of another form, or an option the method does not take.

    Example:
        >>> parse_methods(["gradient", ("smoothgrad", {"n_samples": 8})])
        {'gradient': {}, 'smoothgrad': {'n_samples': 8}}
        >>> parse_methods({"integrated_gradients": {"n_steps": 16}, "gradient": None})
        {'integrated_gradients': {'n_steps': 16}, 'gradient': {}}
    """
    # layer attributions are shaped like a layer's output, not maps: called directly, never by an explainer
    allowed = tuple(n for n, spec in METHODS.items() if spec.family != "layer") if allowed is None else tuple(allowed)
    if isinstance(methods, str):
        entries: list[Any] = [(methods, None)]
    elif isinstance(methods, Mapping):
        entries = list(methods.items())
    else:
        entries = list(methods)
    parsed: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, chosen = entry, None
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
            name, chosen = entry
        else:
            raise TypeError(
                f"{owner}(methods=...) takes a method name, a list of names or (name, {{option: value}}) pairs, or a "
                f"{{name: {{option: value}}}} mapping; got the entry {entry!r}."
            )
        if chosen is not None and not isinstance(chosen, Mapping):
            raise TypeError(f"{owner}(methods=...): the options of {name!r} must be a mapping, got {chosen!r}.")
        if name not in METHODS:
            raise ValueError(
                f"Unknown attribution method {name!r} in {owner}(methods=...); choose from: {', '.join(allowed)}."
            )
        if name not in allowed:
            hint = f" {name!r} is for {elsewhere}." if elsewhere else ""
            if METHODS[name].family == "layer":
                hint = f" {name!r} attributes to a layer's output (shaped like it, not a map): call it directly."
            raise ValueError(f"{owner} cannot use method {name!r}.{hint} Choose from: {', '.join(allowed)}.")
        if name in parsed:
            raise ValueError(f"{owner}(methods=...) lists {name!r} twice.")
        options = dict(chosen or {})
        check_method_options(name, options, managed=managed, layer=layer_option)
        for option in ("n_samples", "n_steps"):
            value = options.get(option)
            if option in options and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}'s {option} must be a positive int, got {value!r}.")
        noise = options.get("noise_level", 0)
        if not (isinstance(noise, (int, float)) and noise >= 0):
            raise ValueError(f"{name}'s noise_level must be >= 0, got {noise!r}.")
        parsed[name] = options
    if not parsed:
        raise ValueError(f"{owner}(methods=...) needs at least one method; choose from: {', '.join(allowed)}.")
    return parsed


@dataclass
class Attributions:
    """What one call of an :class:`Explainer` gives.

    Attributes:
        attributions: key -> the method's raw result: attributions shaped like the inputs (a tuple of them, one per
            input, for a model of several inputs), or (B, H, W) CAM maps. The key is the method's name,
            ``name@layer`` for a CAM method.
        target: (B,) the explained index per sample (the same for every method).
        scores: (B, C) the model's scores (from the shared pass, or one no-grad forward when no method needs it).
        scalars: ``<key>/<scalar>`` -> 0-d tensor on the inputs' device, e.g.
            ``integrated_gradients/completeness_error``: mean |sum of attributions - (f(x) - f(baseline))| over mean
            |f(x) - f(baseline)| (every method that declares it; for GradientSHAP the change is the mean over its draws
            of ``f(x') - f(r)``, and the error that of the draws, as completeness holds in expectation only).
        cam: the keys of CAM maps (one value per pixel already; the rest are reduced over channels by :meth:`maps`).
    """

    attributions: dict[str, Tensor | tuple[Tensor, ...]]
    target: Tensor
    scores: Tensor
    scalars: dict[str, Tensor] = field(default_factory=dict)
    cam: set[str] = field(default_factory=set)

    def maps(self, channel_reduction: ChannelReduction = "abs_sum") -> dict[str, Tensor | tuple[Tensor, ...]]:
        """One float32 map per key: input attributions reduced over channels
        (:func:`~lightning_interp.methods.attribution_to_map`; a tuple of maps, one per input, for a model of several
        inputs), CAM maps as they are."""
        maps: dict[str, Tensor | tuple[Tensor, ...]] = {}
        for key, value in self.attributions.items():
            if isinstance(value, tuple):
                maps[key] = tuple(attribution_to_map(part, channel_reduction) for part in value)
            else:
                maps[key] = value.detach().float() if key in self.cam else attribution_to_map(value, channel_reduction)
        return maps


@dataclass(frozen=True)
class _Entry:
    key: str
    method: str
    layer: str | None
    options: dict[str, Any]


class Explainer:
    """Several registered methods, their options, the output kind and a seed: call it on a model and a batch.

    Args:
        methods: see :data:`MethodsArg`; a CAM method takes its ``layer`` among its options or from ``layers``.
        layers: the layers of the CAM methods that name none (each such method runs at each layer); a CAM method
            with no layer from either is run at the automatic layer of
            :func:`~lightning_interp.methods.find_target_layer`, found again at every call (callbacks resolve it
            once per fit and pass it here).
        task: the output kind (:data:`~lightning_interp.methods.TASKS`).
        output_transform: picks the (B, C) scores out of the model's output.
        seed: seed of every stochastic method's generator, afresh at each call.
        internal_batch_size: most inputs per forward for the methods that batch copies (their own default if None).
        relu: the CAM methods' ReLU (False keeps negative evidence).
        reshapes: per CAM layer, how its token output (B, N, C) becomes (B, C, h, w).
        run_defaults: use each method's ``run_defaults`` from the registry (cheaper settings for every epoch)
            unless an option says otherwise; False gives the functions' own defaults.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> explainer = Explainer({"gradient": None, "smoothgrad": {"n_samples": 4}, "grad_cam": {"layer": "1"}})
        >>> result = explainer(net, torch.randn(2, 3, 8, 8))
        >>> {key: tuple(value.shape) for key, value in result.maps().items()}
        {'gradient': (2, 8, 8), 'smoothgrad': (2, 8, 8), 'grad_cam@1': (2, 8, 8)}
        >>> explainer(net, torch.randn(2, 3, 8, 8), torch.tensor([0, 1])).target.tolist()
        [0, 1]
    """

    def __init__(
        self,
        methods: MethodsArg,
        *,
        layers: Sequence[str] | None = None,
        task: str = "multiclass",
        output_transform: OutputTransform | None = None,
        seed: int = 0,
        internal_batch_size: int | None = None,
        relu: bool = True,
        reshapes: Mapping[str, TokenReshape] | None = None,
        run_defaults: bool = True,
    ) -> None:
        parsed = parse_methods(methods)
        if internal_batch_size is not None and (
            not isinstance(internal_batch_size, int) or isinstance(internal_batch_size, bool) or internal_batch_size < 1
        ):
            raise ValueError(f"internal_batch_size must be None or a positive int, got {internal_batch_size!r}.")
        self.task = task
        self.output_transform = output_transform
        self.seed = seed
        self.internal_batch_size = internal_batch_size
        self.relu = relu
        self.reshapes = dict(reshapes or {})
        entries: list[_Entry] = []
        for method, chosen in parsed.items():
            spec = METHODS[method]
            options = {**(spec.run_defaults if run_defaults else {}), **chosen}
            if not spec.needs_layer:
                entries.append(_Entry(method, method, None, options))
                continue
            layer = options.pop("layer", None)
            where = [layer] if layer is not None else list(layers or [None])
            for one in where:
                name = None if one is None else str(one)
                entries.append(_Entry(method if name is None else f"{method}@{name}", method, name, options))
        self.entries: tuple[_Entry, ...] = tuple(entries)

    @property
    def keys(self) -> list[str]:
        """The keys of :attr:`Attributions.attributions`, in order."""
        return [entry.key for entry in self.entries]

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor | tuple[Tensor, ...],
        target: Target = None,
        *,
        baseline: Tensor | tuple[Tensor, ...] | None = None,
        additional_forward_args: tuple[Any, ...] | None = None,
    ) -> Attributions:
        """Explain ``inputs`` with every method.

        Args:
            model: the network (called as ``model(inputs)``, or ``model(*inputs, *additional_forward_args)``).
            inputs: (B, ...) batch on the model's device, or a tuple of them for a model of several inputs (see
                :func:`~lightning_interp.methods.attribute`): each input-attribution method then gives a tuple of
                attributions, one per input, and each CAM method the first input's map.
            target: class index, (B,) LongTensor, or None for the prediction (per ``task``).
            baseline: the reference of the methods that take ``baseline`` (integrated gradients, DeepLIFT) or
                ``baselines`` (GradientSHAP: its first row), unless their options set one; a tuple, one per input,
                for several inputs.
            additional_forward_args: the model's further positional arguments, not explained (a tensor holds one
                row per sample).

        Returns:
            An :class:`Attributions`.

        Example:
            >>> class TwoInputs(nn.Module):
            ...     def forward(self, image, table):
            ...         return image.mean(dim=(2, 3)) + table
            >>> result = Explainer(["gradient", "integrated_gradients"])(TwoInputs(), (torch.rand(2, 3, 4, 4),
            ...                                                          torch.rand(2, 3)))
            >>> [tuple(part.shape) for part in result.maps()["integrated_gradients"]]
            [(2, 4, 4), (2, 3)]
        """
        if not isinstance(inputs, Tensor) or additional_forward_args:
            return self._several(model, inputs, target, baseline, tuple(additional_forward_args or ()))
        input_gradient = any(_from_input_gradient(entry) for entry in self.entries)
        shared = [entry for entry in self.entries if _from_layer_pass(entry)]
        layers = list(dict.fromkeys(entry.layer for entry in shared if entry.layer is not None))
        result = None
        if input_gradient or layers:
            result = attribution_pass(
                model,
                inputs,
                target,
                layers=layers,
                input_gradient=input_gradient,
                output_transform=self.output_transform,
                task=self.task,
            )
            index, scores = result.target, result.scores
        else:
            index, scores = self._target(model, inputs, target)
        attributions: dict[str, Tensor] = {}
        scalars: dict[str, Tensor] = {}
        for entry in self.entries:
            spec = METHODS[entry.method]
            if result is not None and _from_input_gradient(entry):
                assert result.input_grad is not None
                attributions[entry.key] = _FROM_INPUT_GRADIENT[entry.method](result.inputs, result.input_grad)
            elif result is not None and _from_layer_pass(entry):
                position = layers.index(entry.layer)
                attributions[entry.key] = cam_from_activation(
                    result.activations[position],
                    result.activation_grads[position],
                    relu=entry.options.get("relu", self.relu),
                    output_size=inputs.shape[-2:],
                    reshape=entry.options.get("reshape", self.reshapes.get(entry.layer or "")),
                    method=entry.method,
                )
            else:
                attributions[entry.key] = self._run(spec, entry, model, inputs, index, baseline, scalars)
        return self._result(attributions, index, scores, scalars)

    def _result(
        self,
        attributions: dict[str, Tensor | tuple[Tensor, ...]],
        index: Tensor,
        scores: Tensor,
        scalars: dict[str, Tensor],
    ) -> Attributions:
        cam = {entry.key for entry in self.entries if METHODS[entry.method].needs_layer}
        return Attributions(attributions=attributions, target=index, scores=scores, scalars=scalars, cam=cam)

    def _several(
        self,
        model: nn.Module,
        inputs: Tensor | Sequence[Tensor],
        target: Target,
        baseline: Tensor | Sequence[Tensor] | None,
        arguments: tuple[Any, ...],
    ) -> Attributions:
        """Every method through :func:`~lightning_interp.methods.attribute`, on a model of several inputs or of
        further forward arguments (no shared pass: each method calls the model through its own view)."""
        if not isinstance(inputs, (Tensor, tuple, list)):
            raise TypeError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}.")
        several = not isinstance(inputs, Tensor)
        parts = tuple(inputs) if several else (inputs,)
        with torch.no_grad(), modes_preserved(model), eager_forward():
            scores = scores_from_output(model(*parts, *arguments), self.output_transform).detach()
        index = resolve_target(target, scores, self.task)
        attributions: dict[str, Tensor | tuple[Tensor, ...]] = {}
        scalars: dict[str, Tensor] = {}
        for entry in self.entries:
            attributions[entry.key] = self._run(
                METHODS[entry.method], entry, model, inputs, index, baseline, scalars, arguments
            )
        return self._result(attributions, index, scores, scalars)

    def _target(self, model: nn.Module, inputs: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        """The scores from one no-grad forward, and the explained index per sample (``target``, or the prediction)."""
        with torch.no_grad(), modes_preserved(model), eager_forward():
            scores = scores_from_output(model(inputs), self.output_transform).detach()
        return resolve_target(target, scores, self.task), scores

    def _run(
        self,
        spec: MethodSpec,
        entry: _Entry,
        model: nn.Module,
        inputs: Tensor | Sequence[Tensor],
        target: Tensor,
        baseline: Tensor | Sequence[Tensor] | None,
        scalars: dict[str, Tensor],
        arguments: tuple[Any, ...] = (),
    ) -> Tensor | tuple[Tensor, ...]:
        options = dict(entry.options)
        device = (inputs if isinstance(inputs, Tensor) else inputs[0]).device
        accepted = spec.options
        if "output_transform" in accepted:
            options["output_transform"] = self.output_transform
        if "task" in accepted:
            options["task"] = self.task
        if "internal_batch_size" in accepted and self.internal_batch_size is not None:
            options.setdefault("internal_batch_size", self.internal_batch_size)
        if spec.stochastic:  # its own generator, on the inputs' device, the same draws at every call
            options["generator"] = torch.Generator(device=device).manual_seed(self.seed)
        if spec.needs_layer:
            if "relu" in accepted:
                options.setdefault("relu", self.relu)
            if "reshape" in accepted and entry.layer in self.reshapes:
                options.setdefault("reshape", self.reshapes[entry.layer])
        if baseline is not None and "baseline" in accepted:
            options.setdefault("baseline", baseline)
        if baseline is not None and "baselines" in accepted:
            first = baseline[:1] if isinstance(baseline, Tensor) else tuple(part[:1] for part in baseline)
            options.setdefault("baselines", first)
        delta = "completeness_error" in spec.scalars and "return_convergence_delta" in accepted
        delta = delta and options.get("multiply_by_inputs", True) is not False  # multipliers alone: no completeness
        if delta:
            options["return_convergence_delta"] = True
        layer = {"layer": entry.layer} if spec.needs_layer else {}
        forward_args = {"additional_forward_args": arguments} if arguments else {}
        result = attribute(entry.method, model, inputs, target, **layer, **forward_args, **options)
        if delta:  # (attributions, per-sample completeness residual)
            result, residual = result
            parts = result if isinstance(result, tuple) else (result,)
            total = sum(part.reshape(part.shape[0], -1).double().sum(dim=1) for part in parts)
            difference = total - residual
            scalars[f"{entry.key}/completeness_error"] = residual.abs().mean() / difference.abs().mean().clamp_min(
                1e-12
            )
        return result


def _from_input_gradient(entry: _Entry) -> bool:
    """Whether an entry is the built-in gradient or input × gradient, served by the shared pass's input gradient (a
    method declared again under the same name, ``replace=True``, runs its own function)."""
    built_in = {"gradient": gradient, "input_x_gradient": input_x_gradient}.get(entry.method)
    return built_in is not None and METHODS[entry.method].function is built_in


def _from_layer_pass(entry: _Entry) -> bool:
    """Whether a CAM entry is computed from the shared pass's activation and gradient at its layer."""
    variant = CAM_VARIANTS.get(entry.method)
    return entry.layer is not None and variant is not None and METHODS[entry.method].function is variant.function
