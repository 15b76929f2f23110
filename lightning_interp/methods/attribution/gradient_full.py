"""FullGrad (Srinivas and Fleuret 2019): the input-gradient term and the bias-gradients of every convolution and
BatchNorm, post-processed and summed into one map per image."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.model.core import OutputTransform, Target, attribution_pass, module_name
from lightning_interp.methods.registry import register_method

__all__ = ["FULL_GRAD_SCALINGS", "FullGradScaling", "full_grad", "full_grad_biases"]

FullGradScaling = Literal["channel", "layer"]
FULL_GRAD_SCALINGS: tuple[FullGradScaling, ...] = ("channel", "layer")


def full_grad_biases(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The layers whose bias-gradients FullGrad sums, with the bias each adds (as pytorch-grad-cam and the paper's
    code find them): every ``nn.Conv2d`` and ``nn.BatchNorm2d`` with a bias, a BatchNorm's bias being the one it
    adds in eval mode, ``beta - running_mean * gamma / sqrt(running_var + eps)``.

    Raises:
        ValueError: a BatchNorm2d without running statistics (its bias depends on the batch).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
        >>> [(name, tuple(bias.shape)) for name, bias in full_grad_biases(net)]
        [('0', (4,)), ('1', (4,))]
    """
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or module.bias is None:
            continue
        if isinstance(module, nn.BatchNorm2d):
            if module.running_mean is None or module.running_var is None:
                raise ValueError(
                    f"FullGrad needs the bias BatchNorm {name!r} adds in eval mode, but it keeps no running statistics "
                    "(track_running_stats=False): its bias depends on the batch."
                )
            bias = module.bias - module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)
        else:
            bias = module.bias
        found.append((name, bias.detach()))
    return found


def _scaled(maps: Tensor, scaling: FullGradScaling) -> Tensor:
    """pytorch-grad-cam's ``scale_cam_image``: ``m - min``, then divided by ``1e-7 + max``, over each (sample,
    channel) (``"channel"``) or each sample's whole (C, h, w) tensor (``"layer"``)."""
    dims = (2, 3) if scaling == "channel" else (1, 2, 3)
    shifted = maps - maps.amin(dim=dims, keepdim=True)
    return shifted / (1e-7 + shifted.amax(dim=dims, keepdim=True))


@register_method(
    "gradient", "FullGrad",
    cost="1 forward + 1 backward (gradients at every convolution and BatchNorm)",
    reference="pytorch-grad-cam FullGrad",
    several_inputs="first",
)  # fmt: skip
def full_grad(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    scaling: FullGradScaling = "channel",
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """FullGrad saliency (Srinivas and Fleuret 2019), as pytorch-grad-cam computes it.

    One forward and one backward give the gradient ``g`` of the target score
    with respect to the input and to the output of every layer of
    :func:`full_grad_biases`. The map is the sum of ``psi(|x * g|)`` summed
    over the input channels and, for each such layer, ``psi(|b * g_layer|)``
    summed over its channels, where ``psi`` rescales to [0, 1] (``m - min``,
    then divided by ``1e-7 + max``) and resizes bilinearly (align_corners=False)
    to the input size; the sum is rescaled the same way, so each map spans
    [0, 1]. ``scaling="channel"`` rescales each channel of each term on its own
    (pytorch-grad-cam's ``FullGrad``); ``"layer"`` rescales each term as a
    whole, as the paper's reference code does (which resizes with
    align_corners=True; here always False). Linear layers' biases have no
    spatial map and are left out, as in both.

    FullGrad gives one value per pixel; it is returned shaped like the inputs,
    shared equally by the C input channels (the map divided by C), so their
    sum (the callbacks' ``channel_reduction="abs_sum"`` or ``"sum"``) is the map.

    Args:
        model: the network (run in eval mode: BatchNorm's bias is its running-statistics one).
        inputs: (B, C, H, W) images.
        target: class index, LongTensor (B,), or None for the prediction.
        scaling: ``"channel"`` (pytorch-grad-cam) or ``"layer"`` (the paper's code).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``: the map / C in every channel.

    Raises:
        ValueError: inputs that are not images, or an unknown ``scaling``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> maps = full_grad(net, torch.randn(2, 3, 8, 8), 1).sum(dim=1)
        >>> maps.shape, float(maps.amin()), round(float(maps.amax()), 4)
        (torch.Size([2, 8, 8]), 0.0, 1.0)
    """
    if inputs.ndim != 4:
        raise ValueError(
            f"FullGrad needs images (B, C, H, W), got inputs of shape {tuple(inputs.shape)}: its bias-gradient maps "
            "are resized to the input's height and width."
        )
    if scaling not in FULL_GRAD_SCALINGS:
        raise ValueError(f"scaling must be one of {FULL_GRAD_SCALINGS}, got {scaling!r}.")
    biases = full_grad_biases(model)
    names = [name for name, _ in biases]
    result = attribution_pass(
        model, inputs, target, layers=names, input_gradient=True, output_transform=output_transform, task=task
    )
    assert result.input_grad is not None
    size = tuple(inputs.shape[-2:])
    x = result.inputs.float()
    total = _scaled((x * result.input_grad.float()).abs(), scaling).sum(dim=1)
    for (name, bias), grad in zip(biases, result.activation_grads, strict=True):
        if grad.ndim != 4:
            where = module_name(model, name) or name
            raise ValueError(f"FullGrad needs a (B, C, h, w) output of {where!r}, got {tuple(grad.shape)}.")
        term = _scaled((bias.float()[None, :, None, None] * grad.float()).abs(), scaling)
        if tuple(term.shape[-2:]) != size:
            term = F.interpolate(term, size=size, mode="bilinear", align_corners=False)
        total = total + term.sum(dim=1)
    shifted = total - total.amin(dim=(1, 2), keepdim=True)
    saliency = shifted / (1e-7 + shifted.amax(dim=(1, 2), keepdim=True))
    channels = inputs.shape[1]
    return (saliency / channels)[:, None].expand(-1, channels, -1, -1).contiguous().to(inputs.dtype)
