"""Every attribution method, declared once, beside its function: what it is, what it needs, how to call it.

A method module declares each of its methods with :func:`register_method`
(``@register_method("gradient", "gradient", ...)`` above the function); a user
declares their own the same way. The callbacks, the contract tests, the
benchmarks and the docs' method catalogue read :data:`METHODS`; nothing else
keeps a list of methods. ``attribute(name, model, inputs, target, **options)``
calls any of them; ``available_methods()`` lists them.

This module imports no method module (they import it, to declare themselves);
importing :mod:`lightning_interp.methods` declares every built-in method.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "METHODS",
    "Family",
    "MethodSpec",
    "attribute",
    "available_methods",
    "check_method_options",
    "method_spec",
    "register_method",
]

Family = Literal["gradient", "modified backward", "perturbation", "cam", "layer"]
SeveralInputs = Literal["joint", "each", "first"]
FAMILIES: tuple[Family, ...] = ("gradient", "modified backward", "perturbation", "cam", "layer")

F = TypeVar("F", bound=Callable[..., Any])

_SEVERAL_INPUTS_BY_FAMILY: dict[str, SeveralInputs] = {
    "gradient": "joint",
    "modified backward": "joint",
    "perturbation": "each",
    "cam": "first",
    "layer": "joint",
}


@dataclass(frozen=True)
class MethodSpec:
    """What one attribution method is and needs.

    Attributes:
        name: the canonical snake_case name (the function's name unless declared otherwise).
        family: ``"gradient"``, ``"modified backward"``, ``"perturbation"``, ``"cam"`` or ``"layer"`` (layer
            attribution: attributions shaped like a layer's output, not maps).
        function: ``fn(model, inputs, target, **options)`` (CAM methods: ``fn(model, inputs, target, layer, ...)``).
        title: a short column title for pictures (a line break where one line would be too wide).
        needs_layer: takes ``layer=`` and returns (B, H, W) maps (else maps shaped like the inputs).
        stochastic: draws random numbers from a ``generator=`` it accepts (the callbacks always pass their own;
            a direct call without one draws from the global RNG).
        shared_pass: can be served from the one forward and backward of ``attribution_pass`` that several
            methods share (the input gradient, or a layer's activation and gradient).
        scalars: extra scalars a callback logs for it (tag suffixes).
        sensitivity: returns how sensitive the score is to each input value (a gradient, guided or not), not each
            value's contribution to it (input × gradient, integrated gradients, LRP relevance, ...): at an
            embedding, a token's score is then the norm of its vector rather than its sum.
        run_defaults: options the callbacks use unless told otherwise, where the function's own default is too
            dear to pay at every validation epoch (SmoothGrad's 25 noisy copies become 16).
        cost: forward and backward passes per probe sample at the default options (for the docs).
        reference: the implementation its tests compare it with.
        several_inputs: how it explains a model of several inputs (a tuple, see
            :mod:`~lightning_interp.methods.model.multi_input`): ``"joint"`` (all inputs together, packed side by side:
            paths, noise, coalitions and features span them; one result per input), ``"each"`` (one input at a
            time, the others at their values; one result per input) or ``"first"`` (the first input's map, the
            others at their values: the CAM family).
    """

    name: str
    family: Family
    function: Callable[..., Tensor]
    title: str
    needs_layer: bool = False
    stochastic: bool = False
    shared_pass: bool = False
    scalars: tuple[str, ...] = ()
    sensitivity: bool = False
    run_defaults: Mapping[str, Any] = field(default_factory=dict)
    cost: str = ""
    reference: str = ""
    several_inputs: SeveralInputs = "each"

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the function takes besides model, inputs, target (and layer)."""
        skip = {"model", "inputs", "target", "layer"}
        return tuple(name for name in inspect.signature(self.function).parameters if name not in skip)


METHODS: dict[str, MethodSpec] = {}
"""Every declared method by name, in the order of :data:`FAMILIES` (then in the order of declaration)."""


def register_method(
    family: Family,
    title: str | None = None,
    *,
    name: str | None = None,
    needs_layer: bool | None = None,
    stochastic: bool = False,
    shared_pass: bool = False,
    scalars: Sequence[str] = (),
    sensitivity: bool = False,
    run_defaults: Mapping[str, Any] | None = None,
    cost: str = "",
    reference: str = "",
    several_inputs: SeveralInputs | None = None,
    replace: bool = False,
) -> Callable[[F], F]:
    """Declare an attribution method: a decorator above its function, which it returns unchanged.

    The function takes ``(model, inputs, target, **options)`` and returns
    attributions shaped like ``inputs``; a CAM method (``family="cam"``) takes
    ``(model, inputs, target, layer, **options)`` and returns (B, H, W) maps.
    Once declared, every callback that takes ``methods=`` accepts its name, its
    keyword options are checked against the function's signature, and the
    contract tests run it. A stochastic method must take ``generator=`` and
    draw every random number from it.

    Args:
        family: one of :data:`FAMILIES`.
        title: column title in pictures (default: the name).
        name: the registered name (default: the function's ``__name__``).
        needs_layer: whether it takes ``layer=`` (default: the ``"cam"`` and ``"layer"`` families).
        stochastic: it draws from a ``generator=`` option.
        shared_pass: served by the shared forward and backward (built-in methods only).
        scalars: the extra scalars its callbacks log.
        sensitivity: it measures sensitivity (a gradient), not contribution.
        run_defaults: the options callbacks use by default (cheaper than the function's).
        cost: passes per sample, for the docs.
        reference: the implementation it is tested against.
        several_inputs: how it explains a model of several inputs (:attr:`MethodSpec.several_inputs`); default
            ``"joint"`` for the gradient, modified-backward and layer families (they treat every value alike,
            whatever the input's shape), ``"each"`` for perturbation methods (the method then sees one input at a
            time, shaped as it is: safe for any method) and ``"first"`` for the CAM family.
        replace: allow replacing a method already declared under ``name``.

    Raises:
        ValueError: the name is taken (and ``replace`` is False), or ``family`` is unknown.
        TypeError: a stochastic method without a ``generator`` parameter.

    Example:
        >>> import torch
        >>> @register_method("gradient", "|gradient|", sensitivity=True, replace=True)
        ... def absolute_gradient(model, inputs, target=None, *, task="multiclass", output_transform=None):
        ...     from lightning_interp.methods import gradient
        ...     return gradient(model, inputs, target, task=task, output_transform=output_transform).abs()
        >>> net = torch.nn.Linear(3, 2)
        >>> bool((attribute("absolute_gradient", net, torch.randn(1, 3), 0) >= 0).all())
        True
        >>> _ = METHODS.pop("absolute_gradient")  # (the docs' example leaves the registry as it was)
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    if several_inputs not in (None, "joint", "each", "first"):
        raise ValueError(f"several_inputs must be 'joint', 'each' or 'first', got {several_inputs!r}.")

    def declare(function: F) -> F:
        key = name or function.__name__
        if key in METHODS and not replace:
            raise ValueError(
                f"An attribution method named {key!r} is already declared; pass replace=True or pick another name."
            )
        if stochastic and "generator" not in inspect.signature(function).parameters:
            raise TypeError(f"{key} is declared stochastic, so it must take generator= and draw from it only.")
        spec = MethodSpec(
            name=key,
            family=family,
            function=function,
            title=title or key,
            needs_layer=family in ("cam", "layer") if needs_layer is None else needs_layer,
            stochastic=stochastic,
            shared_pass=shared_pass,
            scalars=tuple(scalars),
            sensitivity=sensitivity,
            run_defaults=dict(run_defaults or {}),
            cost=cost,
            reference=reference,
            several_inputs=several_inputs or _SEVERAL_INPUTS_BY_FAMILY[family],
        )
        declared = {**METHODS, key: spec}
        METHODS.clear()  # in place: modules that imported METHODS keep seeing every method
        METHODS.update(sorted(declared.items(), key=lambda item: FAMILIES.index(item[1].family)))
        return function

    return declare


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``, with the known names in the error otherwise.

    Example:
        >>> method_spec("grad_cam").family
        'cam'
    """
    if name not in METHODS:
        raise ValueError(f"Unknown attribution method {name!r}; the registered ones are: {', '.join(METHODS)}.")
    return METHODS[name]


def check_method_options(
    name: str, options: Mapping[str, object] | None, *, managed: Sequence[str] = (), layer: bool = True
) -> MethodSpec:
    """The :class:`MethodSpec` of ``name`` after checking that it takes every option in ``options`` (``layer`` for a
    CAM method, unless ``layer=False``: the caller sets the layers itself); ``managed`` options, set by the caller
    itself, are refused too. Raises with the accepted ones.

    Example:
        >>> check_method_options("grad_cam", {"layer": "net.4"}).needs_layer
        True
        >>> check_method_options("deeplift", {"rule": "reveal_cancel"}).name
        'deeplift'
    """
    spec = method_spec(name)
    accepted = [option for option in spec.options if option not in managed]
    if spec.needs_layer and layer:
        accepted = ["layer", *accepted]
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        takes = f"its options are: {', '.join(accepted)}" if accepted else "it takes none here"
        raise TypeError(f"{name} takes no option(s) {unknown} here; {takes}.")
    for option, value in (options or {}).items():  # an enumerated string checked now, not at the first validation
        choices = _literal_choices(spec.function, option)
        if choices and isinstance(value, str) and value not in choices:
            raise ValueError(f"{name}'s {option} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return spec


def _literal_choices(function: Callable[..., Any], option: str) -> tuple[object, ...]:
    """The values of ``option`` when the function types it as a ``Literal`` (else an empty tuple)."""
    try:
        hint = typing.get_type_hints(function).get(option)
    except (NameError, TypeError):  # an annotation that does not resolve at run time: no check
        return ()
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def available_methods(family: Family | None = None) -> dict[str, str]:
    """The registered methods, name -> family, optionally of one family only.

    Example:
        >>> list(available_methods("gradient"))
        ['gradient', 'input_x_gradient', 'smoothgrad', 'integrated_gradients', 'gradient_shap', 'full_grad',
         'noise_tunnel', 'smoothgrad_sq', 'vargrad']
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    return {name: spec.family for name, spec in METHODS.items() if family in (None, spec.family)}


def attribute(
    name: str,
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    target: Any = None,
    /,
    *,
    layer: nn.Module | str | None = None,
    additional_forward_args: tuple[Any, ...] | None = None,
    **options: object,
) -> Any:
    """Explain ``inputs`` with the registered method ``name``.

    Input-attribution methods return attributions shaped like ``inputs``;
    CAM methods take ``layer=`` (a module or dotted name; None picks the
    automatic layer) and return (B, H, W) maps, unnormalised, upsampled to the
    input size. Options are the method's own keyword arguments
    (``METHODS[name].options``), passed through whatever they are called
    (``method=`` of integrated gradients included): the first four arguments
    are positional only.

    A model of several inputs, ``model(image, table)``, takes them as a tuple
    (Captum's convention): the input-attribution methods return a tuple of
    attributions, one per input, shaped like it, and the options that describe
    the inputs (``baseline``, ``baselines``, ``feature_mask``, LRP's ``low`` and
    ``high``) are given as tuples too; CAM methods return the first input's map.
    How each method treats them is :attr:`MethodSpec.several_inputs`.

    Args:
        name: a name from :func:`available_methods`.
        model: the network.
        inputs: (B, ...) batch, or a tuple of such batches (one per model input, floating point, the same B).
        target: class index, LongTensor (B,), or None for the prediction.
        layer: for CAM methods, the layer to explain.
        additional_forward_args: further positional arguments of the model, after the inputs, not explained: a
            tensor holds one row per sample (each copy a method makes gets its sample's row); other values are
            passed as they are.
        **options: the method's options, e.g. ``n_samples=8`` for SmoothGrad.

    Raises:
        ValueError: an unknown method, or ``layer`` given to a method without one.
        TypeError: an option the method does not take (the message lists those it does).

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> attribute("gradient", net, x).shape, attribute("grad_cam", net, x, layer="1").shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 8]))
        >>> attribute("integrated_gradients", net, x, 0, method="riemann_right").shape
        torch.Size([2, 3, 8, 8])
        >>> class TwoInputs(nn.Module):
        ...     def forward(self, image, table, scale):
        ...         return image.mean(dim=(2, 3)) * scale + table
        >>> image, table = torch.rand(2, 3, 4, 4), torch.rand(2, 3)
        >>> maps = attribute("integrated_gradients", TwoInputs(), (image, table), 0,
        ...                  additional_forward_args=(torch.tensor([[1.0], [2.0]]),))
        >>> [tuple(part.shape) for part in maps]
        [(2, 3, 4, 4), (2, 3)]
    """
    spec = method_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"{name} takes no option(s) {unknown}; its options are: {', '.join(spec.options)}.")
    if layer is not None and not spec.needs_layer:
        raise ValueError(f"{name} attributes to the input and takes no layer; CAM methods take one.")
    if not isinstance(inputs, Tensor) or additional_forward_args:
        from lightning_interp.methods.model.multi_input import attribute_several  # not a method module

        if not isinstance(inputs, (Tensor, tuple, list)):
            raise TypeError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}.")
        return attribute_several(spec, model, inputs, target, layer, additional_forward_args, options)
    if spec.needs_layer:
        return spec.function(model, inputs, target, layer, **options)
    return spec.function(model, inputs, target, **options)
