"""Helpers shared by the attribution functions that run many copies of a batch (the gradient family's noise and
interpolation paths, the perturbation family's masked copies): dtypes, counts, chunks, targets fixed on the clean
inputs, and random draws from the caller's generator only."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    checked_like,
    eager_forward,
    modes_preserved,
    resolve_target,
    scores_from_output,
)

__all__ = [
    "BaselineFn",
    "accumulation_dtype",
    "baseline_of",
    "check_count",
    "check_generator",
    "clean_scores",
    "draw_device",
    "fixed_target",
    "out_dtype",
    "row_chunks",
    "row_limit",
    "sample_noise",
    "sample_ranges",
    "segmented_columns",
]

_SEGMENTS: ContextVar[tuple[int, ...] | None] = ContextVar("lightning_interp_segments", default=None)


@contextmanager
def segmented_columns(sizes: Sequence[int]) -> Iterator[None]:
    """Within it, a (B, sum(sizes)) batch is several inputs packed side by side (``sizes`` columns each): each
    sample's value range, which scales SmoothGrad's noise, is taken per input (see :func:`sample_ranges`)."""
    token = _SEGMENTS.set(tuple(int(size) for size in sizes))
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def sample_ranges(x: Tensor) -> Tensor:
    """Each sample's value range (max - min, at least 1e-12) in float32, broadcastable to ``x``: (B, 1, ..., 1);
    for a batch of several packed inputs (inside :func:`segmented_columns`), each input's own range, (B, D).

    Example:
        >>> sample_ranges(torch.tensor([[0.0, 2.0, 1.0]])).tolist()
        [[2.0]]
        >>> with segmented_columns((2, 2)):
        ...     sample_ranges(torch.tensor([[0.0, 2.0, 5.0, 6.0]])).tolist()
        [[2.0, 2.0, 1.0, 1.0]]
    """
    sizes = _SEGMENTS.get()
    flat = x.detach().reshape(x.shape[0], -1).float()
    if sizes is None or x.ndim != 2 or x.shape[1] != sum(sizes):
        span = (flat.max(dim=1).values - flat.min(dim=1).values).clamp_min(1e-12)
        return span.reshape(x.shape[0], *([1] * (x.ndim - 1)))
    spans = [
        (part.max(dim=1).values - part.min(dim=1).values).clamp_min(1e-12) for part in torch.split(flat, sizes, dim=1)
    ]
    counts = torch.tensor(sizes, device=x.device)
    return torch.stack(spans, dim=1).repeat_interleave(counts, dim=1)


def sample_noise(shape: torch.Size, std: Tensor, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """float32 Gaussian noise with per-sample ``std`` on ``like``'s device (added in float32, then cast)."""
    gen_device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=like.device) * std.to(device=like.device, dtype=torch.float32)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half-precision sums lose too much)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def clean_scores(model: nn.Module, inputs: Tensor, output_transform: OutputTransform | None) -> Tensor:
    with modes_preserved(model), eager_forward(), torch.inference_mode(False), torch.no_grad():
        return scores_from_output(model(inputs.detach().clone()), output_transform)


def fixed_target(
    model: nn.Module, inputs: Tensor, target: Target, output_transform: OutputTransform | None, task: str
) -> Tensor:
    """Resolve the target once on the clean inputs so every perturbed copy explains the same class."""
    if target is None or isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        return resolve_target(target, clean_scores(model, inputs, output_transform), task)
    if isinstance(target, int):
        return torch.full((inputs.shape[0],), target, dtype=torch.long, device=inputs.device)
    index = target.to(device=inputs.device, dtype=torch.long).reshape(-1)
    return checked_like(target, index.expand(inputs.shape[0]) if index.numel() == 1 else index)


def out_dtype(inputs: Tensor) -> torch.dtype:
    """Attributions come in the inputs' dtype, float32 for integer inputs."""
    return inputs.dtype if inputs.is_floating_point() else torch.float32


def check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def row_limit(internal_batch_size: int | None, total: int, default: int | None = None) -> int:
    if internal_batch_size is None:
        return max(default or total, 1)
    if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size!r}.")
    return internal_batch_size


def row_chunks(total: int, limit: int) -> Iterator[tuple[int, int]]:
    """Half-open ranges of at most ``limit`` flat rows covering ``range(total)``."""
    for start in range(0, total, limit):
        yield start, min(start + limit, total)


def draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")


BaselineFn = Callable[[Tensor], "Tensor | float"]
"""A baseline given as a function of the inputs: ``baselines(inputs) -> Tensor`` (Captum's callable baselines)."""


def baseline_of(baseline: object, inputs: Tensor, name: str = "baseline") -> object:
    """``baseline(inputs)`` when ``baseline`` is a function (called once, on a detached copy of the inputs, so it can
    neither write to them nor reach the graph); anything else unchanged, for the method's own checks."""
    if baseline is None or isinstance(baseline, (Tensor, int, float)) or not callable(baseline):
        return baseline
    made = baseline(inputs.detach().clone())
    if isinstance(made, bool) or not isinstance(made, (Tensor, int, float)):
        raise TypeError(
            f"{name} given as a function must return a tensor (or a number) for the inputs of shape "
            f"{tuple(inputs.shape)}; it returned {type(made).__name__}."
        )
    return made.detach() if isinstance(made, Tensor) else made
