"""Gradient-based input attributions with one signature.

Every function here is ``fn(model, inputs, target, **options) -> Tensor`` and
returns attributions with the shape of ``inputs``. ``target`` is a class
index, a LongTensor of shape (B,), or None for the predicted class. The model
runs in eval mode for the call; each module's mode is restored afterwards,
``param.grad`` is never touched and no hook outlives the call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_interp.methods._core import (
    OutputTransform,
    Target,
    attribution_pass,
    eager_forward,
    modes_preserved,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.registry import register_method
from lightning_interp.methods.tasks import target_scores

__all__ = ["gradient", "input_x_gradient", "integrated_gradients", "integration_points", "smoothgrad"]


@register_method(
    "gradient", "gradient", shared_pass=True, sensitivity=True,
    cost="1 forward + 1 backward", reference="Captum Saliency (abs=False)",
)  # fmt: skip
def gradient(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Plain gradient of the target score with respect to the input (Simonyan et al. 2014).

    Args:
        model: the network, called as ``model(inputs)``.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.tasks`).

    Returns:
        d score / d input, same shape, dtype and device as ``inputs``.

    Example:
        >>> linear = nn.Linear(3, 2)
        >>> g = gradient(linear, torch.randn(5, 3), target=1)
        >>> torch.allclose(g, linear.weight[1].expand(5, 3))
        True
    """
    grad = attribution_pass(model, inputs, target, output_transform=output_transform, task=task).input_grad
    assert grad is not None
    return grad.to(inputs.dtype) if inputs.is_floating_point() else grad


@register_method(
    "gradient", "input × grad", shared_pass=True,
    cost="1 forward + 1 backward", reference="Captum InputXGradient",
)  # fmt: skip
def input_x_gradient(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Input times gradient, elementwise (Shrikumar et al. 2016).

    Example:
        >>> linear = nn.Linear(3, 1)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(input_x_gradient(linear, x, 0), x * linear.weight[0])
        True
    """
    grad = gradient(model, inputs, target, output_transform=output_transform, task=task)
    return inputs * grad


def _sample_noise(shape: torch.Size, std: Tensor, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """float32 Gaussian noise with per-sample ``std`` on ``like``'s device (added in float32, then cast)."""
    gen_device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=like.device) * std.to(device=like.device, dtype=torch.float32)


@register_method(
    "gradient", "SmoothGrad", stochastic=True, sensitivity=True, run_defaults={"n_samples": 16},
    cost="n_samples (16 in the callbacks) forwards + backwards", reference="Captum NoiseTunnel(Saliency), same noise",
)  # fmt: skip
def smoothgrad(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    noise_level: float = 0.15,
    n_samples: int = 25,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """SmoothGrad: the gradient averaged over noisy copies of the input (Smilkov et al. 2017).

    The noise is Gaussian with standard deviation ``noise_level`` times each
    sample's value range (max - min). The target is fixed from the clean input
    when None, so every noisy copy explains the same class.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        noise_level: noise std as a fraction of the input range.
        n_samples: number of noisy copies per input.
        generator: source of the noise; pass your own for reproducibility and
            to leave the global RNG untouched (the default draws from it).
        internal_batch_size: at most this many noisy inputs per forward pass.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.tasks`).

    Returns:
        Averaged gradients, same shape as ``inputs``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> smoothgrad(net, torch.randn(2, 4), None, n_samples=8, generator=g).shape
        torch.Size([2, 4])
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}.")
    if not inputs.is_floating_point():
        inputs = inputs.float()  # integer pixels: add the noise in float
    batch = inputs.shape[0]
    index = _fixed_target(model, inputs, target, output_transform, task)
    flat = inputs.detach().reshape(batch, -1).float()
    value_range = (flat.max(dim=1).values - flat.min(dim=1).values).clamp_min(1e-12)
    std = (noise_level * value_range).reshape(batch, *([1] * (inputs.ndim - 1)))
    chunk = _chunk_copies(internal_batch_size, batch, n_samples)
    total = torch.zeros_like(inputs, dtype=_accumulation_dtype(inputs))
    done = 0
    while done < n_samples:
        copies = min(chunk, n_samples - done)
        noise = _sample_noise(torch.Size((copies, *inputs.shape)), std.unsqueeze(0), generator, inputs)
        work = torch.promote_types(inputs.dtype, torch.float32)  # add in float32 (float64 stays float64) ...
        noisy = (inputs.detach().unsqueeze(0).to(work) + noise.to(work)).to(inputs.dtype)  # ... the model's dtype
        noisy = noisy.reshape(copies * batch, *inputs.shape[1:])
        grads = attribution_pass(
            model, noisy, index.repeat(copies), output_transform=output_transform, task=task
        ).input_grad
        assert grads is not None
        total += grads.reshape(copies, *inputs.shape).to(total.dtype).sum(dim=0)
        done += copies
    return (total / n_samples).to(inputs.dtype)


def integration_points(n_steps: int, method: str = "gausslegendre") -> tuple[Tensor, Tensor]:
    """Nodes in [0, 1] and weights summing to 1 for path integration (float64).

    ``gausslegendre`` (the default, exact for polynomials of degree < 2n) uses
    the Golub-Welsch eigenvalue method; ``riemann_left``, ``riemann_right``,
    ``riemann_middle`` and ``riemann_trapezoid`` are the usual Riemann sums.

    Example:
        >>> nodes, weights = integration_points(4)
        >>> float((weights * nodes**3).sum())  # integral of a^3 on [0, 1]
        0.25...
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}.")
    if method == "gausslegendre":
        k = torch.arange(1, n_steps, dtype=torch.float64)
        off = k / torch.sqrt(4 * k * k - 1)
        jacobi = torch.diag(off, 1) + torch.diag(off, -1)
        nodes, vectors = torch.linalg.eigh(jacobi)
        return (nodes + 1) / 2, vectors[0] ** 2
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2.")
        nodes = torch.linspace(0, 1, n_steps, dtype=torch.float64)
        weights = torch.full((n_steps,), 1.0 / (n_steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return nodes, weights
    starts = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    if method not in starts:
        raise ValueError(
            f"Unknown integration method {method!r}; use 'gausslegendre', 'riemann_left', "
            "'riemann_right', 'riemann_middle' or 'riemann_trapezoid'."
        )
    nodes = (torch.arange(n_steps, dtype=torch.float64) + starts[method]) / n_steps
    return nodes, torch.full((n_steps,), 1.0 / n_steps, dtype=torch.float64)


@register_method(
    "gradient", "integ. grads", scalars=("completeness_error",),
    cost="n_steps (32) forwards + backwards", reference="Captum IntegratedGradients",
)  # fmt: skip
def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    baseline: Tensor | float | None = None,
    n_steps: int = 32,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrated gradients along the straight path from a baseline (Sundararajan et al. 2017).

    All interpolation steps are batched, ``internal_batch_size`` inputs per
    forward pass at most. Completeness says the attributions of a sample sum to
    ``f(x) - f(baseline)``; the residual is the convergence delta.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        baseline: tensor broadcastable to ``inputs`` or a scalar; default zeros.
        n_steps: number of integration points.
        method: integration rule, see :func:`integration_points`.
        internal_batch_size: at most this many interpolated inputs per pass.
        return_convergence_delta: also return, per sample,
            ``sum(attributions) - (f(x) - f(baseline))``.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.tasks`).

    Returns:
        Attributions shaped like ``inputs``; with ``return_convergence_delta``
        a tuple ``(attributions, delta)`` where ``delta`` has shape (B,).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> attr, delta = integrated_gradients(net, torch.randn(3, 4), 0, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-4)
        True
    """
    batch = inputs.shape[0]
    x = inputs.detach() if inputs.is_floating_point() else inputs.detach().float()  # integers: interpolate in float
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    base = base.expand_as(x)
    index = _fixed_target(model, inputs, target, output_transform, task)
    nodes, weights = integration_points(n_steps, method)
    chunk = _chunk_copies(internal_batch_size, batch, n_steps)
    diff = x - base
    total = torch.zeros_like(x, dtype=_accumulation_dtype(x))
    for start in range(0, n_steps, chunk):
        alphas = nodes[start : start + chunk].to(device=x.device, dtype=x.dtype)
        steps = alphas.numel()
        shape = (steps, *([1] * x.ndim))
        path = (base.unsqueeze(0) + alphas.reshape(shape) * diff.unsqueeze(0)).reshape(steps * batch, *x.shape[1:])
        grads = attribution_pass(
            model, path, index.repeat(steps), output_transform=output_transform, task=task
        ).input_grad
        assert grads is not None
        w = weights[start : start + chunk].to(device=x.device, dtype=total.dtype).reshape(shape)
        total += (grads.reshape(steps, *x.shape).to(total.dtype) * w).sum(dim=0)
    attributions = (diff.to(total.dtype) * total).to(x.dtype)
    if not return_convergence_delta:
        return attributions
    with torch.no_grad():
        end_scores = _scores(model, torch.cat([x, base]), output_transform)
    chosen = target_scores(end_scores, torch.cat([index, index]), task).double()
    delta = attributions.reshape(batch, -1).double().sum(dim=1) - (chosen[:batch] - chosen[batch:])
    return attributions, delta


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half-precision sums lose too much)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_copies(internal_batch_size: int | None, batch: int, copies: int) -> int:
    """How many copies of the batch fit in one pass of ``internal_batch_size``."""
    if internal_batch_size is None:
        return copies
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size}.")
    return max(1, min(copies, internal_batch_size // max(batch, 1)))


def _scores(model: nn.Module, inputs: Tensor, output_transform: OutputTransform | None) -> Tensor:
    with modes_preserved(model), eager_forward(), torch.inference_mode(False), torch.no_grad():
        return scores_from_output(model(inputs.detach().clone()), output_transform)


def _fixed_target(
    model: nn.Module, inputs: Tensor, target: Target, output_transform: OutputTransform | None, task: str
) -> Tensor:
    """Resolve the target once on the clean inputs so every perturbed copy explains the same class."""
    if target is None or isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        return resolve_target(target, _scores(model, inputs, output_transform), task)
    if isinstance(target, int):
        return torch.full((inputs.shape[0],), target, dtype=torch.long, device=inputs.device)
    index = target.to(device=inputs.device, dtype=torch.long).reshape(-1)
    return index.expand(inputs.shape[0]) if index.numel() == 1 else index
