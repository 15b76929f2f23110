"""What the units of a layer do on a set of inputs: their feature maps, dead units, sparsity, the most active ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import captured_outputs, eager_forward, get_module, modes_preserved
from lightning_interp.methods.model.inputs import for_rows

__all__ = ["ActivationStatistics", "activation_maps", "activation_statistics", "most_active_channels"]

TokenToGrid = Callable[[Tensor], Tensor]
"""Turns a layer's output into a (B, C, h, w) grid: token outputs (B, N, C) (as ``methods.token_grids`` gives
them), or channels-last (B, h, w, C) ones (``channels_last_to_first``)."""


@torch.no_grad()
def activation_maps(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str],
    *,
    reshape: Mapping[str, TokenToGrid] | None = None,
    batch_size: int = 256,
    eval_mode: bool = True,
) -> dict[str, Tensor]:
    """The full outputs of ``layers`` on ``inputs``: (N, C, h, w) feature maps of spatial layers, (N, C) otherwise.

    One chunked no-grad forward pass (see :func:`~lightning_interp.methods.capture_features`,
    here without pooling), every module's mode saved and restored, hooks removed
    in ``finally``; each output is copied inside its hook, so a later in-place
    ReLU cannot change it. An output with an entry in ``reshape`` goes through
    it: token outputs (N, T, C) become (N, C, h, w) grids, channels-last
    (N, h, w, C) ones (Swin's stages, the norms inside ConvNeXt blocks; see
    :func:`~lightning_interp.methods.model.tokens.layer_layouts`) become
    (N, C, h, w) through
    :func:`~lightning_interp.methods.model.tokens.channels_last_to_first`;
    other outputs keep their shape, with the channels (units) on dimension 1.
    The maps stay on the model's device, in float32.

    Args:
        model: the network, called as ``model(chunk)``.
        inputs: (N, ...) samples, on any device.
        layers: dotted module names.
        reshape: layer name -> a function turning its output ((B, T, C) tokens, or (B, h, w, C) channels-last)
            into (B, C, h, w).
        batch_size: samples per forward pass.
        eval_mode: run the model in eval mode.

    Returns:
        layer name -> float32 tensor of the layer's output shape (after ``reshape``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())
        >>> activation_maps(net, torch.randn(5, 1, 8, 8), ["1"])["1"].shape
        torch.Size([5, 3, 6, 6])
        >>> from lightning_interp.methods.model.tokens import channels_last_to_first
        >>> class ToChannelsLast(nn.Module):
        ...     def forward(self, x):
        ...         return x.permute(0, 2, 3, 1)
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3), ToChannelsLast(), nn.Linear(3, 5))  # "2": (N, 6, 6, 5)
        >>> activation_maps(net, torch.randn(2, 1, 8, 8), ["2"], reshape={"2": channels_last_to_first})["2"].shape
        torch.Size([2, 5, 6, 6])
    """
    if inputs.shape[0] == 0:
        raise ValueError("activation_maps needs at least one input sample.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    names = list(layers)
    if len(set(names)) != len(names):
        raise ValueError(f"Each layer must appear once, got {names}.")
    modules = [get_module(model, name) for name in names]
    model_device = next((p.device for p in model.parameters()), inputs.device)
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    with modes_preserved(model, eval_mode=eval_mode), eager_forward(), torch.inference_mode(False):
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size]
            moved = chunk.to(model_device, non_blocking=chunk.is_pinned())
            with captured_outputs(modules) as outputs:  # the recorded output is never overwritten in place
                bound = for_rows(model, slice(start, start + batch_size)) if chunk.shape[0] < inputs.shape[0] else model
                bound(moved.clone() if moved.device == chunk.device else moved)  # never an inference tensor
            for name, output in zip(names, outputs, strict=True):
                if output is None:
                    raise ValueError(
                        f"Layer {name!r} returned no tensor in a forward pass of {type(model).__name__} (or did not "
                        "run); name a module whose output is a tensor."
                    )
                parts[name].append(output.detach().float())
    maps = {}
    for name in names:
        values = torch.cat(parts[name])
        to_grid = (reshape or {}).get(name)
        maps[name] = to_grid(values) if to_grid is not None else values
    return maps


@dataclass(frozen=True)
class ActivationStatistics:
    """Summary of one layer's activations on a set of inputs (units = channels, dimension 1).

    Attributes:
        channel_mean: (C,) mean activation of each unit over the samples and positions.
        dead: (C,) True for a unit that is never positive on any sample at any position.
        dead_fraction: share of the units that are dead.
        mean_activation: mean of every value of the layer's output.
        sparsity: share of the output values that are not positive (zero after a ReLU).
    """

    channel_mean: Tensor
    dead: Tensor
    dead_fraction: float
    mean_activation: float
    sparsity: float


def _per_unit(activations: Tensor) -> Tensor:
    """(C, N * positions) view of an (N, C, ...) activation tensor."""
    if activations.ndim < 2:
        raise ValueError(f"activations must have shape (N, C, ...), got {tuple(activations.shape)}.")
    return activations.detach().float().transpose(0, 1).reshape(activations.shape[1], -1)


def activation_statistics(activations: Tensor) -> ActivationStatistics:
    """Dead units, mean activation and sparsity of a layer's (N, C, ...) output.

    .. math::

        \\text{dead}_c = [\\max_{n, p} a_{n,c,p} \\le 0], \\qquad
        \\text{sparsity} = \\frac{1}{N C P} \\sum_{n,c,p} [a_{n,c,p} \\le 0]

    A unit is dead on these inputs when it is never positive (after a ReLU it
    passes nothing on); sparsity counts the values that are not positive.
    Computed where the activations are; only the summaries are Python floats.

    Args:
        activations: (N, C) or (N, C, ...) tensor, channels (units) on dimension 1.

    Example:
        >>> a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [-1.0, 0.0]]])  # N=2, C=2, 2 positions
        >>> stats = activation_statistics(a)
        >>> stats.dead.tolist(), stats.dead_fraction, stats.sparsity
        ([False, True], 0.5, 0.75)
    """
    units = _per_unit(activations)
    if units.shape[1] == 0:
        raise ValueError("activation_statistics needs at least one sample.")
    dead = units.amax(dim=1) <= 0
    channel_mean = units.mean(dim=1)
    summary = torch.stack([dead.float().mean(), units.mean(), (units <= 0).float().mean()]).tolist()
    return ActivationStatistics(
        channel_mean=channel_mean,
        dead=dead,
        dead_fraction=summary[0],
        mean_activation=summary[1],
        sparsity=summary[2],
    )


def most_active_channels(activations: Tensor, k: int) -> Tensor:
    """The ``k`` units with the largest mean activation over the samples and positions, most active first.

    Ties keep the lower index first, so the order is reproducible. With fewer
    than ``k`` units, all of them are returned.

    Args:
        activations: (N, C) or (N, C, ...) tensor.
        k: how many units, >= 1.

    Example:
        >>> most_active_channels(torch.tensor([[0.1, 3.0, 2.0, 3.0]]), 3).tolist()
        [1, 3, 2]
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    means = _per_unit(activations).mean(dim=1)
    order = torch.sort(means, descending=True, stable=True).indices
    return order[: min(k, int(means.numel()))]
