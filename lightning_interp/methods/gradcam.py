"""Grad-CAM (Selvaraju et al. 2017) and automatic choice of its target layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods._core import OutputTransform, Target, attribution_pass
from lightning_interp.methods.trace import ModelTrace, trace_model

__all__ = ["cam_from_activation", "find_target_layer", "grad_cam", "spatial_layers"]

_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)

TokenReshape = Callable[[Tensor], Tensor]
"""Turns token outputs (B, N, C) of a vision transformer into (B, C, h, w)."""


def cam_from_activation(
    activation: Tensor,
    activation_grad: Tensor,
    *,
    relu: bool = True,
    output_size: Sequence[int] | None = None,
    reshape: TokenReshape | None = None,
) -> Tensor:
    """Grad-CAM map from a layer's activation and the gradient of the score with respect to it.

    Channel weights are the spatial mean of the gradient; the map is
    ``ReLU(sum_k w_k A_k)``, optionally resized bilinearly
    (``align_corners=False``) to ``output_size``.

    Args:
        activation: (B, C, h, w) layer output (or tokens, with ``reshape``).
        activation_grad: gradient of the target score, same shape.
        relu: apply the ReLU of the original definition.
        output_size: (H, W) to upsample to, or None to keep (h, w).
        reshape: turns (B, N, C) token tensors into (B, C, h, w).

    Returns:
        (B, H, W) float32 map, not normalised.

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
    weights = activation_grad.float().mean(dim=(2, 3), keepdim=True)
    cam = (weights * activation.float()).sum(dim=1)
    if relu:
        cam = cam.clamp_min(0)
    if output_size is not None and tuple(cam.shape[-2:]) != tuple(output_size):
        cam = F.interpolate(cam[:, None], size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0]
    return cam


def grad_cam(
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
    """Grad-CAM heatmap of ``layer`` for the target class.

    Args:
        model: the network.
        inputs: (B, C, H, W) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        layer: module or dotted name; None picks :func:`find_target_layer`.
        relu: keep only the positive evidence (the paper's definition).
        upsample: resize to the input's (H, W) bilinearly (align_corners=False).
        reshape: turns token outputs (B, N, C) into (B, C, h, w).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.tasks`).

    Returns:
        (B, H, W) float32 map (or (B, h, w) without ``upsample``), not normalised.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> grad_cam(net, torch.randn(2, 3, 8, 8), None, "1").shape
        torch.Size([2, 8, 8])
    """
    if layer is None:
        layer = find_target_layer(model, inputs, reshape=reshape)
    result = attribution_pass(
        model, inputs, target, layers=[layer], input_gradient=False, output_transform=output_transform, task=task
    )
    size = inputs.shape[-2:] if upsample else None
    return cam_from_activation(
        result.activations[0], result.activation_grads[0], relu=relu, output_size=size, reshape=reshape
    )


def spatial_layers(
    model: nn.Module,
    example_input: Tensor | None,
    *,
    reshape: TokenReshape | None = None,
    trace: ModelTrace | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and output shapes of the sub-modules with spatial output, in completion order.

    A dry forward (no gradients, eval mode, see :func:`trace_model`) records
    every module's output shape; a module counts when its output is
    (B, C, h, w) with h or w > 1 (after ``reshape`` for 3-D token outputs,
    tried on a zero tensor of the recorded shape), it ran exactly once, so its
    output is unambiguous, and it is not Identity or Dropout (which only repeat
    their input in eval mode).

    Args:
        model: the network.
        example_input: one or more inputs (only the first is run); may be None when ``trace`` is given.
        reshape: turns token outputs (B, N, C) into (B, C, h, w).
        trace: a :class:`ModelTrace` of ``model`` made earlier, to skip the dry forward.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> spatial_layers(net, torch.randn(1, 1, 5, 5))
        [('0', (1, 2, 3, 3)), ('1', (1, 2, 3, 3))]
    """
    if trace is None:
        if example_input is None:
            raise ValueError("spatial_layers needs an example_input or a trace.")
        trace = trace_model(model, example_input)
    modules = dict(model.named_modules())
    found: list[tuple[str, tuple[int, ...]]] = []
    for name in trace.ran_once():
        if isinstance(modules.get(name), _PASS_THROUGH):
            continue  # Identity and Dropout (in eval) repeat their input: the module before them is the layer
        shape = trace.shapes[name]
        if len(shape) == 3 and reshape is not None:
            try:
                shape = tuple(reshape(torch.zeros(shape)).shape)
            except Exception:  # a module whose tokens do not form the grid
                continue
        if len(shape) == 4 and max(shape[-2:]) > 1:
            found.append((name, shape))
    return found


def find_target_layer(model: nn.Module, example_input: Tensor, *, reshape: TokenReshape | None = None) -> str:
    """The dotted name of the last module whose output still has spatial extent.

    This is the usual Grad-CAM layer: for a ResNet it is ``layer4`` (the
    output of the last stage), for torchvision's MobileNet ``features``.

    Args:
        model: the network.
        example_input: one or more inputs; only the first is run.
        reshape: turns token outputs (B, N, C) into (B, C, h, w) for vision transformers.

    Raises:
        ValueError: no module has spatial output; the message says how to fix it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 2))
        >>> find_target_layer(net, torch.randn(1, 3, 16, 16))
        '1'
    """
    found = spatial_layers(model, example_input, reshape=reshape)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no sub-module with spatial output (batch, channels, h, w) with h or w > 1 "
            f"for inputs of shape {tuple(example_input.shape[1:])}, so Grad-CAM has nothing to weight. "
            "Use larger inputs, name a convolutional layer explicitly, pass reshape=... for token outputs, "
            "or use a saliency method instead."
        )
    return found[-1][0]
