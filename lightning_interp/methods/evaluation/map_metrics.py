"""Scores of attribution maps: stability, concentration, localization.

All functions take maps of shape (B, H, W) (or any (B, ...)) and return one
value per sample, so callers can average or inspect them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "attribution_to_map",
    "concentration",
    "localization",
    "pointing_game",
    "rank_correlation",
    "ranks",
]

CHANNEL_REDUCTIONS = ("abs_sum", "abs_max", "sum")


def attribution_to_map(attributions: Tensor, reduction: str = "abs_sum") -> Tensor:
    """Reduce (B, C, H, W) attributions over channels to a (B, H, W) float32 map.

    ``abs_sum`` (default) sums magnitudes over channels, ``abs_max`` takes the
    largest magnitude (Simonyan et al. 2014), ``sum`` keeps the sign. Inputs
    of shape (B, H, W) or (B, D) are returned as float32 (absolute value for
    the ``abs_*`` reductions).

    Example:
        >>> attribution_to_map(torch.tensor([[[[1.0]], [[-2.0]]]])).item()
        3.0
    """
    if reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(f"Unknown channel reduction {reduction!r}; use one of {CHANNEL_REDUCTIONS}.")
    values = attributions.detach().float()
    if values.ndim == 4:
        if reduction == "abs_sum":
            return values.abs().sum(dim=1)
        if reduction == "abs_max":
            return values.abs().amax(dim=1)
        return values.sum(dim=1)
    return values if reduction == "sum" else values.abs()


def ranks(values: Tensor) -> Tensor:
    """Per-row ranks (1-based) of a (B, N) tensor, ties given their average rank.

    Example:
        >>> ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]]))
        tensor([[3.5000, 1.0000, 3.5000, 2.0000]], dtype=torch.float64)
    """
    batch, n = values.shape
    sorted_values, order = values.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1
    group = group + torch.arange(batch, device=values.device)[:, None] * n
    position = torch.arange(1, n + 1, dtype=torch.float64, device=values.device).expand(batch, n)
    sums = torch.zeros(batch * n, dtype=torch.float64, device=values.device).index_add_(
        0, group.reshape(-1), position.reshape(-1)
    )
    counts = torch.zeros(batch * n, dtype=torch.float64, device=values.device).index_add_(
        0, group.reshape(-1), torch.ones(batch * n, dtype=torch.float64, device=values.device)
    )
    averaged = (sums / counts.clamp_min(1))[group]
    out = torch.empty_like(averaged)
    out.scatter_(1, order, averaged)
    return out


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between matching maps of two batches, one value per sample.

    Ties get average ranks. A constant map has no defined correlation: NaN.

    Example:
        >>> x = torch.rand(2, 5, 5)
        >>> rank_correlation(x, x**3)
        tensor([1., 1.], dtype=torch.float64)
    """
    if a.shape != b.shape:
        raise ValueError(f"Maps to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    ra = ranks(a.detach().reshape(a.shape[0], -1).double())
    rb = ranks(b.detach().reshape(b.shape[0], -1).double())
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return (ra * rb).sum(dim=1) / denominator


def concentration(maps: Tensor, top_fraction: float = 0.1) -> Tensor:
    """Share of the attribution magnitude held by the top ``top_fraction`` of pixels.

    A uniform map scores ``top_fraction``; a map whose mass sits in a few
    pixels scores near 1. NaN for an all-zero map.

    Example:
        >>> concentration(torch.ones(1, 10, 10)).item()
        0.1
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}.")
    flat = maps.detach().reshape(maps.shape[0], -1).double().abs()
    k = max(1, round(top_fraction * flat.shape[1]))
    top = flat.topk(k, dim=1).values.sum(dim=1)
    return top / flat.sum(dim=1)


def localization(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the positive attribution mass that falls inside the object mask.

    A uniform map scores the mask's area fraction. NaN when a map has no
    positive mass.

    Example:
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool); mask[0, :2] = True
        >>> localization(torch.ones(1, 4, 4), mask).item()
        0.5
    """
    positive = maps.detach().double().clamp_min(0)
    inside = masks.to(device=positive.device).reshape(positive.shape).bool()
    total = positive.reshape(positive.shape[0], -1).sum(dim=1)
    return (positive * inside).reshape(positive.shape[0], -1).sum(dim=1) / total


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """1.0 where the map's maximum lies inside the mask, else 0.0 (Zhang et al. 2016), per sample.

    Example:
        >>> mask = torch.zeros(1, 3, 3, dtype=torch.bool); mask[0, 1, 1] = True
        >>> heat = torch.zeros(1, 3, 3); heat[0, 1, 1] = 5.0
        >>> pointing_game(heat, mask).item()
        1.0
    """
    flat = maps.detach().reshape(maps.shape[0], -1)
    inside = masks.to(device=flat.device).reshape(flat.shape).bool()
    peak = flat.argmax(dim=1, keepdim=True)
    return inside.gather(1, peak).squeeze(1).double()
