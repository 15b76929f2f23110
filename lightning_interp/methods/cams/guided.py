"""Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation weighted by the upsampled Grad-CAM map, an
attribution to the input (shaped like it), so it is declared with the input-attribution methods."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.attribution.modified import guided_backprop
from lightning_interp.methods.cams.gradcam import grad_cam
from lightning_interp.methods.model.batching import fixed_target
from lightning_interp.methods.model.core import OutputTransform, Target
from lightning_interp.methods.model.tokens import TokenReshape
from lightning_interp.methods.registry import register_method

__all__ = ["GUIDED_GRAD_CAM_INTERPOLATIONS", "GuidedGradCamInterpolation", "guided_grad_cam"]

GuidedGradCamInterpolation = Literal["bilinear", "nearest"]
GUIDED_GRAD_CAM_INTERPOLATIONS: tuple[GuidedGradCamInterpolation, ...] = ("bilinear", "nearest")


@register_method(
    "modified backward", "guided\nGrad-CAM", sensitivity=True,
    cost="2 forwards + 2 backwards (Grad-CAM, guided backprop)",
    reference="Captum GuidedGradCam", several_inputs="first",
)  # fmt: skip
def guided_grad_cam(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    cam_layer: nn.Module | str | None = None,
    interpolate_mode: GuidedGradCamInterpolation = "bilinear",
    reshape: TokenReshape | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the Grad-CAM map of ``cam_layer``.

    The Grad-CAM map (ReLU applied) is resized to the input's (H, W) with
    ``interpolate_mode`` (``"bilinear"``, align_corners=False, as the paper;
    Captum's ``GuidedGradCam`` defaults to ``"nearest"``) and multiplies every
    input channel of :func:`~lightning_interp.methods.guided_backprop`'s
    attributions. Both explain the same target (fixed once on the clean
    input). The layer option is ``cam_layer`` because the method attributes to
    the input: it is an input-attribution method (``SaliencyCallback``), not a
    layer map (``GradCAMCallback``).

    Args:
        model: the network (ReLU activations, for the guided part).
        inputs: (B, C, H, W) images.
        target: class index, LongTensor (B,), or None for the prediction.
        cam_layer: the Grad-CAM layer, a module or dotted name; None picks
            :func:`~lightning_interp.methods.find_target_layer`.
        interpolate_mode: how the Grad-CAM map is resized: ``"bilinear"`` or ``"nearest"``.
        reshape: turns token outputs (B, N, C) of the layer into (B, C, h, w) (default: the known layouts).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``.

    Raises:
        ValueError: inputs that are not images (B, C, H, W), or an unknown ``interpolate_mode``.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> guided_grad_cam(net, torch.randn(2, 3, 8, 8), 1, cam_layer="1").shape
        torch.Size([2, 3, 8, 8])
    """
    if inputs.ndim != 4:
        raise ValueError(
            f"Guided Grad-CAM needs images (B, C, H, W), got inputs of shape {tuple(inputs.shape)}: its Grad-CAM map "
            "is resized to the input's height and width. Use guided_backprop for other inputs."
        )
    if interpolate_mode not in GUIDED_GRAD_CAM_INTERPOLATIONS:
        raise ValueError(f"interpolate_mode must be one of {GUIDED_GRAD_CAM_INTERPOLATIONS}, got {interpolate_mode!r}.")
    index = fixed_target(model, inputs, target, output_transform, task)
    cam = grad_cam(
        model, inputs, index, cam_layer, upsample=False, reshape=reshape, output_transform=output_transform, task=task
    )
    size = tuple(inputs.shape[-2:])
    if tuple(cam.shape[-2:]) != size:
        corners = {"align_corners": False} if interpolate_mode == "bilinear" else {}
        cam = F.interpolate(cam[:, None], size=size, mode=interpolate_mode, **corners)[:, 0]
    guided = guided_backprop(model, inputs, index, output_transform=output_transform, task=task)
    return guided * cam[:, None].to(guided.dtype)
