"""Grad-CAM (Selvaraju et al. 2017) and automatic choice of its target layer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    attribution_pass,
    captured_outputs,
    eager_forward,
    get_module,
    modes_preserved,
    module_name,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.model.layers import find_target_layer
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.model.tokens import (
    TokenReshape,
    _class_layout,
    channels_last_to_first,
    layer_layouts,
    token_grids,
)
from lightning_interp.methods.model.trace import trace_model
from lightning_interp.methods.registry import METHODS, register_method

__all__ = [
    "CAM_VARIANTS",
    "GRADIENT_CAMS",
    "CamVariant",
    "CamWeights",
    "cam",
    "cam_from_activation",
    "eigen_cam",
    "grad_cam",
    "grad_cam_plus_plus",
    "hires_cam",
    "layer_cam",
    "register_cam",
    "score_cam",
    "xgrad_cam",
]


CamWeights = Callable[[Tensor, Tensor], Tensor]
"""A gradient CAM variant's weights: ``(activation, grad)``, both (B, C, h, w) float32, -> (B, C, 1, 1) channel
weights (or (B, C, h, w) element-wise weights); the map is ``sum_k weights_k * activation_k``."""


@dataclass(frozen=True)
class CamVariant:
    """One gradient CAM variant, as :func:`register_cam` records it in :data:`CAM_VARIANTS`.

    Attributes:
        name: the method's name (in :data:`~lightning_interp.methods.registry.METHODS` too).
        weights: the declared function, ``(activation, grad) -> weights`` (see :data:`CamWeights`), or, with
            ``gives_map``, ``(activation, grad) -> (B, h, w) map``.
        function: the public method ``fn(model, inputs, target, layer, **options)`` built from it.
        elementwise: ``weights`` gives (B, C, h, w) weights, one per activation value, not (B, C, 1, 1).
        gives_map: ``weights`` gives the map itself (Eigen-CAM: a projection, not a weighting).
    """

    name: str
    weights: Callable[[Tensor, Tensor], Tensor]
    function: Callable[..., Tensor]
    elementwise: bool = False
    gives_map: bool = False


CAM_VARIANTS: dict[str, CamVariant] = {}
"""Every gradient CAM variant by name, in the order of declaration: the one table that
:func:`cam_from_activation` reads and :func:`register_cam` fills."""


class _VariantNames(Sequence[str]):
    """A live, read-only tuple-like view of the names in :data:`CAM_VARIANTS`."""

    def __getitem__(self, index):  # an int gives a name, a slice a tuple, as a tuple's would
        return tuple(CAM_VARIANTS)[index]

    def __len__(self) -> int:
        return len(CAM_VARIANTS)

    def __contains__(self, name: object) -> bool:
        return name in CAM_VARIANTS

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(CAM_VARIANTS))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, _VariantNames)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # it changes as variants are declared

    def __repr__(self) -> str:
        return repr(tuple(self))


GRADIENT_CAMS: Sequence[str] = _VariantNames()
"""CAM methods computed from one layer's activation and its gradient (all served by one forward and backward):
a live view of the names in :data:`CAM_VARIANTS`, so it includes variants declared later with
:func:`register_cam` (compare it with a tuple, or take ``tuple(GRADIENT_CAMS)`` for a snapshot)."""


def cam_from_activation(
    activation: Tensor,
    activation_grad: Tensor,
    *,
    relu: bool = True,
    output_size: Sequence[int] | None = None,
    reshape: TokenReshape | None = None,
    method: str = "grad_cam",
) -> Tensor:
    """Gradient CAM map from a layer's activation and the gradient of the score with respect to it.

    The map is ``ReLU(sum_k w_k A_k)`` (``relu``), optionally resized
    bilinearly (``align_corners=False``) to ``output_size``, where the weights
    ``w`` of the activation ``A`` by its gradient ``G`` are those of the variant
    ``method`` of :data:`CAM_VARIANTS` (declared with :func:`register_cam`; each
    method's documentation gives its weighting). The built-in ones:
    ``grad_cam`` (Selvaraju et al. 2017), ``grad_cam_plus_plus`` (Chattopadhay
    et al. 2018), ``xgrad_cam`` (Fu et al. 2020), ``layer_cam`` (Jiang et al.
    2021), ``hires_cam`` (Draelos and Carin 2020) and ``eigen_cam`` (Muhammad
    and Yeasin 2020: the centred activations' first principal component, no
    gradient, its sign fixed to agree with the mean activation).

    Args:
        activation: (B, C, h, w) layer output (or tokens, with ``reshape``).
        activation_grad: gradient of the target score, same shape.
        relu: apply the ReLU of the original definition.
        output_size: (H, W) to upsample to, or None to keep (h, w).
        reshape: turns (B, N, C) token tensors into (B, C, h, w).
        method: one of :data:`GRADIENT_CAMS`.

    Returns:
        (B, H, W) float32 map, not normalised.

    Raises:
        ValueError: an activation that is not (B, C, h, w), an unknown ``method``, or weights of the wrong shape.

    Example:
        >>> act = torch.ones(1, 2, 3, 3)
        >>> grad = torch.stack([torch.full((3, 3), 0.5), torch.full((3, 3), -1.0)])[None]
        >>> cam_from_activation(act, grad, relu=False)[0, 0, 0].item()
        -0.5
    """
    if reshape is not None:
        activation, activation_grad = reshape(activation), reshape(activation_grad)
    if activation.ndim != 4:
        raise ValueError(
            f"Grad-CAM needs a (batch, channels, height, width) activation, got shape {tuple(activation.shape)}. "
            "For token outputs (batch, tokens, channels) pass reshape=... that returns (batch, channels, h, w)."
        )
    cam = _combine(method, activation.float(), activation_grad.float())
    if relu:
        cam = cam.clamp_min(0)
    if output_size is not None and tuple(cam.shape[-2:]) != tuple(output_size):
        cam = F.interpolate(cam[:, None], size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0]
    return cam


def _combine(method: str, activation: Tensor, grad: Tensor) -> Tensor:
    """The (B, h, w) map of one gradient CAM variant, before the ReLU and resizing."""
    variant = CAM_VARIANTS.get(method)
    if variant is None:
        raise ValueError(f"Unknown CAM method {method!r}; use one of {GRADIENT_CAMS}.")
    result = variant.weights(activation, grad)
    batch, channels, height, width = activation.shape
    if variant.gives_map:
        expected: tuple[int, ...] = (batch, height, width)
    else:
        expected = (batch, channels, height, width) if variant.elementwise else (batch, channels, 1, 1)
    if tuple(result.shape) != expected:
        what = "map" if variant.gives_map else "element-wise weights" if variant.elementwise else "channel weights"
        raise ValueError(
            f"The {what} of CAM method {method!r} must have shape {expected} for an activation of shape "
            f"{tuple(activation.shape)}, got {tuple(result.shape)}."
        )
    return result if variant.gives_map else (result * activation).sum(dim=1)


def _first_component(activation: Tensor) -> Tensor:
    """Per sample: the (h, w) pixels' activations, centred over pixels, projected on their first principal axis;
    signed so that the projection correlates positively with the mean activation over channels."""
    batch, channels, height, width = activation.shape
    pixels = activation.double().reshape(batch, channels, -1).transpose(1, 2)  # (B, hw, C)
    centred = pixels - pixels.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = centred @ vh[:, 0, :, None]  # (B, hw, 1)
    mean_activation = pixels.mean(dim=2, keepdim=True)
    agreement = ((projection - projection.mean(dim=1, keepdim=True)) * mean_activation).sum(dim=1, keepdim=True)
    projection = torch.where(agreement < 0, -projection, projection)
    return projection.reshape(batch, height, width).to(activation.dtype)


def _layer_and_reshape(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    layer: nn.Module | str | None,
    reshape: TokenReshape | None,
    output_transform: OutputTransform | None,
    task: str,
) -> tuple[nn.Module | str, TokenReshape | None]:
    """``layer`` (None: :func:`find_target_layer`, from one dry forward whose trace also gives a token layout, or
    the channels-last layout of a (B, h, w, C) layer: :func:`~lightning_interp.methods.layer_layouts`)."""
    if layer is None:
        trace = trace_model(model, inputs)
        layer = find_target_layer(
            model,
            inputs,
            reshape=reshape,
            trace=trace,
            target=target,
            output_transform=output_transform,
            task=task,
            channels_last=reshape is None,
        )
        if reshape is None and len(trace.shapes.get(layer, ())) == 3:
            reshape = token_grids(trace).get(layer)
        elif reshape is None and layer_layouts(model, trace).get(layer) == "channels_last":
            reshape = channels_last_to_first
    return layer, reshape


def _grid_of(
    model: nn.Module, inputs: Tensor, layer: nn.Module | str, activation: Tensor, reshape: TokenReshape | None
) -> TokenReshape | None:
    """How a token output (B, N, C) of ``layer`` becomes a grid: ``reshape``, or its known vision-transformer
    layout, read from a dry forward only when the captured output is tokens (a CNN layer costs nothing here). A
    named 4-D layer is read channels-first unless the module itself works over the last dimension (an
    ``nn.LayerNorm`` or ``nn.Linear`` on a (B, h, w, C) map): then channels-last."""
    laid_out = activation.ndim == 4 and _class_layout(get_module(model, layer), tuple(activation.shape))
    if reshape is None and laid_out == "channels_last":
        return channels_last_to_first
    if reshape is not None or activation.ndim != 3 or not isinstance(layer, str):
        return reshape
    trace = trace_model(model, inputs)
    return token_grids(trace).get(module_name(model, layer) or layer)


def _gradient_cam(
    method: str,
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    layer: nn.Module | str | None,
    relu: bool,
    upsample: bool,
    reshape: TokenReshape | None,
    output_transform: OutputTransform | None,
    task: str,
) -> Tensor:
    layer, reshape = _layer_and_reshape(model, inputs, target, layer, reshape, output_transform, task)
    result = attribution_pass(
        model, inputs, target, layers=[layer], input_gradient=False, output_transform=output_transform, task=task
    )
    size = inputs.shape[-2:] if upsample else None
    reshape = _grid_of(model, inputs, layer, result.activations[0], reshape)
    return cam_from_activation(
        result.activations[0], result.activation_grads[0], relu=relu, output_size=size, reshape=reshape, method=method
    )


def register_cam(
    title: str | None = None,
    *,
    name: str | None = None,
    reference: str = "",
    cost: str = "1 forward + 1 backward",
    elementwise: bool = False,
    gives_map: bool = False,
    replace: bool = False,
) -> Callable[[CamWeights], Callable[..., Tensor]]:
    """Declare a gradient CAM variant by its weights function: a decorator that returns the public method.

    The decorated function takes the layer's activation ``A`` and the gradient
    ``G`` of the target score with respect to it, both (B, C, h, w) float32,
    and returns the weights ``w``: (B, C, 1, 1), one per channel, or with
    ``elementwise`` (B, C, h, w), one per activation value. The map is
    ``sum_k w_k A_k`` (then the ReLU and the resize of
    :func:`cam_from_activation`). With ``gives_map`` it returns the (B, h, w)
    map itself (Eigen-CAM, which weights nothing). The decorator

    - records the function in :data:`CAM_VARIANTS`, the table that
      :func:`cam_from_activation` reads (``method=name``), so the name joins
      :data:`GRADIENT_CAMS` and the callbacks serve it from their one shared
      forward and backward;
    - builds the public method ``fn(model, inputs, target=None, layer=None, *,
      relu, upsample, reshape, output_transform, task)``, with the arguments
      and result of :func:`grad_cam` and a docstring whose first paragraph is
      the weights function's, and declares it with
      :func:`~lightning_interp.methods.registry.register_method` (family
      ``"cam"``, ``shared_pass=True``), so ``attribute(name, ...)`` and every
      callback's ``methods=`` accept it;
    - returns that public method: name the weights function after the method
      and the module gets the method under that name (the weights function
      stays in ``CAM_VARIANTS[name].weights``).

    To remove a variant again, pop its name from both ``CAM_VARIANTS`` and
    ``METHODS``.

    Args:
        title: column title in pictures (default: the name).
        name: the method's name (default: the function's ``__name__`` less a trailing ``_weights``).
        reference: the implementation its tests compare it with.
        cost: passes per sample, for the docs.
        elementwise: the function gives (B, C, h, w) weights, not (B, C, 1, 1).
        gives_map: the function gives the (B, h, w) map itself, not weights.
        replace: allow replacing a method already declared under the name.

    Returns:
        A decorator that declares the weights function and returns the public method.

    Raises:
        ValueError: the name is taken (by any method) and ``replace`` is False, or both ``elementwise`` and
            ``gives_map`` are set.

    Example:
        >>> from lightning_interp.methods.registry import METHODS
        >>> @register_cam("|Grad|-CAM", reference="a hand formula")
        ... def abs_grad_cam(activation, grad):
        ...     '''Grad-CAM heatmap of ``layer`` with absolute gradients: ``w_k`` = spatial mean of ``|G_k|``.'''
        ...     return grad.abs().mean(dim=(2, 3), keepdim=True)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> abs_grad_cam(net, torch.randn(2, 3, 8, 8), None, "1").shape
        torch.Size([2, 8, 8])
        >>> "abs_grad_cam" in GRADIENT_CAMS, METHODS["abs_grad_cam"].family
        (True, 'cam')
        >>> _ = CAM_VARIANTS.pop("abs_grad_cam"), METHODS.pop("abs_grad_cam")  # (leaves both tables as they were)
    """
    if elementwise and gives_map:
        raise ValueError("A CAM variant gives element-wise weights or the map itself, not both.")

    def declare(weights: CamWeights) -> Callable[..., Tensor]:
        key = name or weights.__name__.removesuffix("_weights")
        if not replace and (key in CAM_VARIANTS or key in METHODS):
            raise ValueError(
                f"An attribution method named {key!r} is already declared; pass replace=True or pick another name."
            )
        summary = inspect.cleandoc(weights.__doc__ or "").split("\n\n")[0]
        summary = summary or f"{(title or key).replace(chr(10), ' ')} heatmap of ``layer``."
        function = _public_variant(key, summary, cost, elementwise=elementwise, gives_map=gives_map)
        function.__module__ = weights.__module__
        register_method("cam", title, name=key, shared_pass=True, cost=cost, reference=reference, replace=replace)(
            function
        )
        CAM_VARIANTS[key] = CamVariant(key, weights, function, elementwise=elementwise, gives_map=gives_map)
        return function

    return declare


def _public_variant(name: str, summary: str, cost: str, *, elementwise: bool, gives_map: bool) -> Callable[..., Tensor]:
    """The public method of the gradient CAM variant ``name``, with the arguments and result of :func:`grad_cam`."""

    def variant(
        model: nn.Module,
        inputs: Tensor,
        target: Target = None,
        layer: nn.Module | str | None = None,
        *,
        relu: bool = True,
        upsample: bool = True,
        reshape: TokenReshape | None = None,
        output_transform: OutputTransform | None = None,
        task: str = "multiclass",
    ) -> Tensor:
        return _gradient_cam(name, model, inputs, target, layer, relu, upsample, reshape, output_transform, task)

    if gives_map:
        weighting = "The map is computed from the activation of ``layer`` alone (no weighting by its gradient)."
    else:
        kind = "element-wise weights ``w_kij``" if elementwise else "one weight ``w_k`` per channel"
        weighting = (
            f"The map is ``sum_k w_k A_k``, with {kind} computed from the activation ``A`` of ``layer`` and the "
            "gradient ``G`` of the target score with respect to it (see :func:`cam_from_activation`)."
        )
    variant.__name__ = variant.__qualname__ = name
    variant.__doc__ = f"""{summary}

{weighting} Cost: {cost}.

Args:
    model: the network.
    inputs: (B, C, H, W) batch.
    target: class index, LongTensor (B,), or None for the predicted class.
    layer: module or dotted name; None picks :func:`find_target_layer`.
    relu: keep only the positive evidence (the paper's definition).
    upsample: resize to the input's (H, W) bilinearly (align_corners=False).
    reshape: turns token outputs (B, N, C) into (B, C, h, w); by default the
        layouts of torchvision's and timm's vision transformers are read
        from the model (:func:`token_grids`).
    output_transform: maps the model's output to (B, C) scores.
    task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

Returns:
    (B, H, W) float32 map (or (B, h, w) without ``upsample``), not normalised.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> {name}(net, torch.randn(2, 3, 8, 8), None, "1").shape
    torch.Size([2, 8, 8])
"""
    return variant


# The built-in variants: each is its weights function and one declaration (in the order of the registry's table).


@register_cam("Grad-CAM", reference="Captum LayerGradCam, pytorch-grad-cam GradCAM")
def grad_cam(activation: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM heatmap of ``layer`` for the target class (Selvaraju et al. 2017): ``w_k`` = spatial mean of
    ``G_k``."""
    return grad.mean(dim=(2, 3), keepdim=True)


@register_cam("Grad-CAM++", reference="pytorch-grad-cam GradCAMPlusPlus")
def grad_cam_plus_plus(activation: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM++ heatmap of ``layer`` (Chattopadhay et al. 2018): ``w_k = sum_ij relu(G_kij) a_kij`` with
    ``a = G^2 / (2 G^2 + sum_ij(A_k) G^3)`` (eq. 19)."""
    squared = grad.square()
    total = activation.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + total * squared * grad + 1e-6)
    alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
    return (grad.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)


@register_cam("XGrad-CAM", reference="pytorch-grad-cam XGradCAM")
def xgrad_cam(activation: Tensor, grad: Tensor) -> Tensor:
    """XGrad-CAM heatmap of ``layer`` (Fu et al. 2020): ``w_k = sum_ij G_kij A_kij / sum_ij A_kij``."""
    total = activation.sum(dim=(2, 3), keepdim=True)
    return (grad * activation / (total + 1e-7)).sum(dim=(2, 3), keepdim=True)


@register_cam("Layer-CAM", reference="pytorch-grad-cam LayerCAM", elementwise=True)
def layer_cam(activation: Tensor, grad: Tensor) -> Tensor:
    """Layer-CAM heatmap of ``layer`` (Jiang et al. 2021): element-wise positive weights ``w_kij = relu(G_kij)``."""
    return grad.clamp_min(0)


@register_cam("HiRes-CAM", reference="pytorch-grad-cam HiResCAM", elementwise=True)
def hires_cam(activation: Tensor, grad: Tensor) -> Tensor:
    """HiRes-CAM heatmap of ``layer`` (Draelos and Carin 2020): element-wise weights ``w_kij = G_kij``."""
    return grad


@register_cam(
    "Eigen-CAM",
    reference="pytorch-grad-cam EigenCAM (sign fixed)",
    cost="1 forward (an SVD per sample)",
    gives_map=True,
)
def eigen_cam(activation: Tensor, grad: Tensor) -> Tensor:
    """Eigen-CAM heatmap of ``layer`` (Muhammad and Yeasin 2020): the activations' first component, centred over
    pixels, its sign fixed to agree with the mean activation (an SVD's sign is arbitrary)."""
    return _first_component(activation)


@register_method(
    "cam", "Score-CAM",
    cost="1 forward per channel of the layer (512 for a ResNet's layer4)", reference="pytorch-grad-cam ScoreCAM",
)  # fmt: skip
def score_cam(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    reshape: TokenReshape | None = None,
    internal_batch_size: int = 64,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Score-CAM heatmap of ``layer`` (Wang et al. 2020): channels weighted by how much they alone keep the score.

    Each of the layer's C channels, upsampled to the input size (bilinearly,
    ``align_corners=True`` as the reference implementation) and min-max
    normalised to [0, 1], masks the input; the target score of every masked
    input (no gradients, ``internal_batch_size`` inputs per forward) goes
    through a softmax over the channels to give the channel weights, and the
    map is ``ReLU(sum_k w_k A_k)``. Cost: one forward per channel per sample
    (512 for a ResNet's ``layer4``), against one forward and one backward for
    Grad-CAM.

    Args:
        model: the network.
        inputs: (B, C, H, W) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        layer: module or dotted name; None picks :func:`find_target_layer`.
        relu: keep only the positive part of the map.
        upsample: resize to the input's (H, W) bilinearly (align_corners=False).
        reshape: turns token outputs (B, N, C) into (B, C, h, w) (default: the known layouts).
        internal_batch_size: most masked inputs per forward pass.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> score_cam(net, torch.randn(2, 3, 8, 8), None, "1").shape
        torch.Size([2, 8, 8])
    """
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size}.")
    layer, reshape = _layer_and_reshape(model, inputs, target, layer, reshape, output_transform, task)
    module = get_module(model, layer)
    with modes_preserved(model), eager_forward(), torch.inference_mode(False), torch.no_grad():
        x = inputs.detach().clone()
        with captured_outputs([module]) as outputs:
            scores = scores_from_output(model(x), output_transform)
        index = resolve_target(target, scores, task)
        activation = outputs[0]
        if activation is None:
            raise RuntimeError(f"Layer {layer!r} produced no tensor output during the forward pass.")
        reshape = _grid_of(model, x, layer, activation, reshape)
        activation = (reshape(activation) if reshape is not None else activation).float()
        masks = F.interpolate(activation, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=True)
        low = masks.amin(dim=(2, 3), keepdim=True)
        high = masks.amax(dim=(2, 3), keepdim=True)
        masks = (masks - low) / (high - low + 1e-8)  # (B, C, H, W)
        batch, channels = masks.shape[:2]
        weights = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
        for sample in range(batch):
            for start in range(0, channels, internal_batch_size):
                chunk = masks[sample, start : start + internal_batch_size, None].to(x.dtype)
                masked = x[sample : sample + 1] * chunk  # (k, C_in, H, W)
                out = scores_from_output(for_rows(model, slice(sample, sample + 1))(masked), output_transform)
                explained = index[sample].expand(masked.shape[0])
                weights[sample, start : start + masked.shape[0]] = target_scores(out, explained, task).float()
        weights = weights.softmax(dim=1)
        cam = (weights[:, :, None, None] * activation).sum(dim=1)
    if relu:
        cam = cam.clamp_min(0)
    if upsample and tuple(cam.shape[-2:]) != tuple(x.shape[-2:]):
        cam = F.interpolate(cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return cam


@register_method(
    "cam", "CAM",
    cost="1 forward (needs a global-average-pooled linear head)", reference="torchcam CAM",
)  # fmt: skip
def cam(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    classifier: nn.Module | str | None = None,
    relu: bool = True,
    upsample: bool = True,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Class activation map (Zhou et al. 2016): ``layer``'s channels weighted by the classifier's weights.

    Defined for a head that global-average-pools ``layer`` and applies one
    linear ``classifier`` (ResNets, most CNNs): the map is
    ``sum_k W[c, k] A_k`` for the explained class ``c``. ``classifier``
    defaults to the last ``nn.Linear``; a head of another form is refused.

    Args:
        model: the network.
        inputs: (B, C, H, W) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        layer: module or dotted name; None picks :func:`find_target_layer`.
        relu: keep only the positive part of the map.
        upsample: resize to the input's (H, W) bilinearly (align_corners=False).
        classifier: the linear layer that reads the pooled channels (module or dotted name).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Raises:
        ValueError: the classifier does not read one value per channel of ``layer``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> cam(net, torch.randn(2, 3, 8, 8), None, "1").shape
        torch.Size([2, 8, 8])
    """
    layer, _ = _layer_and_reshape(model, inputs, target, layer, None, output_transform, task)
    if classifier is None:
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError(
                f"CAM needs a linear classifier after global average pooling; {type(model).__name__} has none."
            )
        head = linears[-1]
    else:
        head = get_module(model, classifier)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"CAM's classifier must be an nn.Linear, got {type(head).__name__}.")
    module = get_module(model, layer)
    with modes_preserved(model), eager_forward(), torch.inference_mode(False), torch.no_grad():
        with captured_outputs([module, head]) as outputs:
            scores = scores_from_output(model(inputs.detach().clone()), output_transform)
        activation = outputs[0]
        if activation is None or activation.ndim != 4:
            raise ValueError(f"CAM needs a (batch, channels, h, w) output of layer {layer!r}.")
        if head.in_features != activation.shape[1]:
            raise ValueError(
                f"CAM weights the {activation.shape[1]} channels of layer {layer!r} by the classifier's weights, but "
                f"the classifier reads {head.in_features} values: the head is not global average pooling of this "
                "layer followed by one linear layer. Use grad_cam (the same map for such heads), or name the layer "
                "the classifier pools."
            )
        index = resolve_target(target, scores, task)
        weights = head.weight.detach().float()
        if task == "binary":  # one logit: class 1 is its weight row, class 0 the negative
            chosen = weights[0].expand(index.numel(), -1) * torch.where(index == 1, 1.0, -1.0)[:, None]
        else:
            chosen = weights[index]
        result = (chosen[:, :, None, None] * activation.float()).sum(dim=1)
    if relu:
        result = result.clamp_min(0)
    if upsample and tuple(result.shape[-2:]) != tuple(inputs.shape[-2:]):
        result = F.interpolate(result[:, None], size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)[
            :, 0
        ]
    return result
