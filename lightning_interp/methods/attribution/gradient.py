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

from lightning_interp.methods.model.batching import (
    BaselineFn,
    accumulation_dtype,
    baseline_of,
    check_count,
    check_generator,
    clean_scores,
    draw_device,
    fixed_target,
    out_dtype,
    row_chunks,
    row_limit,
    sample_noise,
    sample_ranges,
)
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    attribution_pass,
    repeat_target,
)
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.model.neuron import bind_neuron
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.registry import register_method

__all__ = ["gradient", "gradient_shap", "input_x_gradient", "integrated_gradients", "integration_points", "smoothgrad"]


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
        target: class index, LongTensor (B,), or None for the predicted class; or a
            :class:`~lightning_interp.methods.NeuronTarget` (a unit of a layer, as Captum's ``NeuronGradient``;
            every method of this module takes one).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        d score / d input, same shape, dtype and device as ``inputs``.

    Example:
        >>> linear = nn.Linear(3, 2)
        >>> g = gradient(linear, torch.randn(5, 3), target=1)
        >>> torch.allclose(g, linear.weight[1].expand(5, 3))
        True
    """
    model, target, output_transform, task = bind_neuron(model, target, output_transform, task)  # a NeuronTarget
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
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Averaged gradients, same shape as ``inputs``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> smoothgrad(net, torch.randn(2, 4), None, n_samples=8, generator=g).shape
        torch.Size([2, 4])
    """
    model, target, output_transform, task = bind_neuron(model, target, output_transform, task)  # a NeuronTarget
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}.")
    if not inputs.is_floating_point():
        inputs = inputs.float()  # integer pixels: add the noise in float
    batch = inputs.shape[0]
    index = fixed_target(model, inputs, target, output_transform, task)
    std = noise_level * sample_ranges(inputs)  # per input when several are packed side by side
    chunk = _chunk_copies(internal_batch_size, batch, n_samples)
    total = torch.zeros_like(inputs, dtype=accumulation_dtype(inputs))
    done = 0
    while done < n_samples:
        copies = min(chunk, n_samples - done)
        noise = sample_noise(torch.Size((copies, *inputs.shape)), std.unsqueeze(0), generator, inputs)
        work = torch.promote_types(inputs.dtype, torch.float32)  # add in float32 (float64 stays float64) ...
        noisy = (inputs.detach().unsqueeze(0).to(work) + noise.to(work)).to(inputs.dtype)  # ... the model's dtype
        noisy = noisy.reshape(copies * batch, *inputs.shape[1:])
        grads = attribution_pass(
            model, noisy, repeat_target(index, copies), output_transform=output_transform, task=task
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
    baseline: Tensor | float | BaselineFn | None = None,
    n_steps: int = 32,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    multiply_by_inputs: bool = True,
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
        baseline: tensor broadcastable to ``inputs`` or a scalar; default zeros;
            or a function of the inputs returning one (called once per call, on
            a detached copy of the inputs), e.g. ``lambda x: x.mean(dim=(2, 3), keepdim=True)``.
        n_steps: number of integration points.
        method: integration rule, see :func:`integration_points`.
        internal_batch_size: at most this many interpolated inputs per pass.
        return_convergence_delta: also return, per sample,
            ``sum(attributions) - (f(x) - f(baseline))`` (of the attributions
            multiplied by ``x - baseline``, whatever ``multiply_by_inputs``).
        multiply_by_inputs: multiply the path-averaged gradient by
            ``x - baseline`` (the attributions); False returns the averaged
            gradient alone (Captum's ``multiply_by_inputs=False``: a local
            rather than a global attribution).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``; with ``return_convergence_delta``
        a tuple ``(attributions, delta)`` where ``delta`` has shape (B,).

    Example:
        >>> linear = nn.Linear(4, 2)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(integrated_gradients(linear, x, 1, multiply_by_inputs=False), linear.weight[1].expand(3, 4))
        True
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> attr, delta = integrated_gradients(net, torch.randn(3, 4), 0, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-4)
        True
    """
    model, target, output_transform, task = bind_neuron(model, target, output_transform, task)  # a NeuronTarget
    batch = inputs.shape[0]
    x = inputs.detach() if inputs.is_floating_point() else inputs.detach().float()  # integers: interpolate in float
    baseline = baseline_of(baseline, x)
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    base = base.expand_as(x)
    index = fixed_target(model, inputs, target, output_transform, task)
    nodes, weights = integration_points(n_steps, method)
    chunk = _chunk_copies(internal_batch_size, batch, n_steps)
    diff = x - base
    total = torch.zeros_like(x, dtype=accumulation_dtype(x))
    for start in range(0, n_steps, chunk):
        alphas = nodes[start : start + chunk].to(device=x.device, dtype=x.dtype)
        steps = alphas.numel()
        shape = (steps, *([1] * x.ndim))
        path = (base.unsqueeze(0) + alphas.reshape(shape) * diff.unsqueeze(0)).reshape(steps * batch, *x.shape[1:])
        grads = attribution_pass(
            model, path, repeat_target(index, steps), output_transform=output_transform, task=task
        ).input_grad
        assert grads is not None
        w = weights[start : start + chunk].to(device=x.device, dtype=total.dtype).reshape(shape)
        total += (grads.reshape(steps, *x.shape).to(total.dtype) * w).sum(dim=0)
    attributions = (diff.to(total.dtype) * total).to(x.dtype)
    result = attributions if multiply_by_inputs else total.to(x.dtype)
    if not return_convergence_delta:
        return result
    with torch.no_grad():
        end_scores = clean_scores(model, torch.cat([x, base]), output_transform)
    chosen = target_scores(end_scores, torch.cat([index, index]), task).double()
    delta = attributions.reshape(batch, -1).double().sum(dim=1) - (chosen[:batch] - chosen[batch:])
    return result, delta


def _chunk_copies(internal_batch_size: int | None, batch: int, copies: int) -> int:
    """How many copies of the batch fit in one pass of ``internal_batch_size``."""
    if internal_batch_size is None:
        return copies
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size}.")
    return max(1, min(copies, internal_batch_size // max(batch, 1)))


def _gradient_shap_draws(
    n_samples: int, batch: int, references: int, generator: torch.Generator | None, like: Tensor
) -> tuple[Tensor, Tensor]:
    """The baseline index (n, B) and the path position alpha (n, B, float64) of every draw, on ``like``'s device.

    Drawn before the noise, which comes one draw at a time, so the draws do not
    depend on ``internal_batch_size``.
    """
    device = draw_device(generator, like)
    choice = torch.randint(references, (n_samples, batch), generator=generator, device=device)
    alphas = torch.rand((n_samples, batch), generator=generator, device=device, dtype=torch.float64)
    return choice.to(like.device), alphas.to(like.device)


def reference_inputs(baselines: Tensor | float | BaselineFn | None, x: Tensor) -> Tensor:
    """The (K, ...) reference inputs of GradientSHAP and DeepLiftShap, on ``x``'s device and dtype: a (K, ...) tensor
    whose trailing dimensions broadcast to one input's, a scalar (one constant reference), None (zeros), or a function
    of the inputs returning one of those."""
    shape = x.shape[1:]
    baselines = baseline_of(baselines, x, "baselines")
    if baselines is None or not isinstance(baselines, Tensor):
        references = torch.full((1, *shape), 0.0 if baselines is None else float(baselines), dtype=x.dtype)
    else:
        references = baselines
        try:
            ok = references.ndim == x.ndim and torch.broadcast_shapes(references.shape[1:], shape) == shape
        except RuntimeError:
            ok = False
        if not ok or references.shape[0] < 1:
            raise ValueError(
                f"baselines of shape {tuple(references.shape)} do not fit inputs of shape {tuple(x.shape)}: pass K "
                f"reference inputs as a (K, {', '.join(str(s) for s in shape)}) tensor, a scalar, or None for zeros."
            )
    return references.detach().to(device=x.device, dtype=x.dtype).expand(-1, *shape)


@register_method(
    "gradient", "GradientSHAP", stochastic=True, scalars=("completeness_error",),
    cost="n_samples (16) forwards + backwards", reference="Captum GradientShap, same draws",
)  # fmt: skip
def gradient_shap(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    n_samples: int = 16,
    stdevs: float = 0.0,
    baselines: Tensor | float | BaselineFn | None = None,
    return_convergence_delta: bool = False,
    multiply_by_inputs: bool = True,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """GradientSHAP: expected gradients between random baselines and noisy inputs (Lundberg & Lee 2017).

    For each of ``n_samples`` draws per sample: a baseline ``r`` picked
    uniformly from ``baselines``, Gaussian noise of standard deviation
    ``stdevs`` added to the input (``x'``), a point ``alpha`` uniform on [0, 1];
    the attribution is the mean over draws of the gradient at
    ``alpha x' + (1 - alpha) r`` times ``x' - r``. As Captum's ``GradientShap``
    (which also multiplies by the noisy input). The target is fixed from the
    clean input. For a linear model it is ``w (x - mean(baselines))`` in
    expectation.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        n_samples: draws per sample (forward and backward passes per sample).
        stdevs: standard deviation of the Gaussian noise added to the inputs,
            in input units (0: no noise).
        baselines: reference inputs to draw from, a (K, ...) tensor whose
            trailing dimensions broadcast to one input's; a scalar for one
            constant baseline; None for zeros; or a function of the inputs
            returning one of those (called once, on a detached copy of the
            inputs), as Captum's callable baselines.
        return_convergence_delta: also return, per sample, the mean over the
            draws of ``sum(g * (x' - r)) - (f(x') - f(r))`` (the residuals Captum
            returns per sample and draw, averaged over the draws), i.e.
            ``sum(attributions) - mean(f(x') - f(r))`` of the multiplied
            attributions, whatever ``multiply_by_inputs``. Completeness holds
            only in expectation over the points ``alpha``: the delta is the
            Monte-Carlo error of the draws (it shrinks as ``1 / sqrt(n_samples)``),
            not a bias. Costs a no-grad forward of each reference and each
            input (of each draw's noisy input when ``stdevs > 0``).
        multiply_by_inputs: multiply each gradient by ``x' - r`` (the
            attributions); False averages the gradients alone (Captum's
            ``multiply_by_inputs=False``: a local rather than a global attribution).
        generator: source of every draw (baselines, points and noise); pass
            your own for reproducibility and to leave the global RNG untouched
            (the default draws from it).
        internal_batch_size: at most this many inputs per forward/backward pass
            (default: all draws at once).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``; with ``return_convergence_delta``
        a tuple ``(attributions, delta)`` where ``delta`` has shape (B,).

    Raises:
        ValueError: ``n_samples`` is not positive, ``stdevs`` is negative, or
            ``baselines`` has the wrong shape.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> linear = nn.Linear(4, 2)
        >>> x = torch.randn(3, 4)
        >>> attr = gradient_shap(linear, x, 0, n_samples=8, generator=g)
        >>> torch.allclose(attr, linear.weight[0] * x)  # zero baseline, no noise: exact for a linear model
        True
        >>> torch.allclose(gradient_shap(linear, x, 0, multiply_by_inputs=False), linear.weight[0].expand(3, 4))
        True
        >>> references = torch.randn(5, 4)
        >>> _, delta = gradient_shap(linear, x, 0, baselines=references, generator=g, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-5)  # a linear model: every draw is exact
        True
    """
    model, target, output_transform, task = bind_neuron(model, target, output_transform, task)  # a NeuronTarget
    check_count("n_samples", n_samples)
    check_generator(generator)
    if not stdevs >= 0:
        raise ValueError(f"stdevs must be >= 0, got {stdevs!r}.")
    x = inputs.detach() if inputs.is_floating_point() else inputs.detach().float()  # integers: interpolate in float
    batch, shape = x.shape[0], x.shape[1:]
    references = reference_inputs(baselines, x)
    index = fixed_target(model, x, target, output_transform, task)
    choice, alphas = _gradient_shap_draws(n_samples, batch, references.shape[0], generator, x)
    std = torch.tensor(float(stdevs))
    work = torch.promote_types(x.dtype, torch.float32)  # noise is added in float32 (float64 stays float64)
    noise: dict[int, Tensor] = {}
    next_draw = 0
    total_rows = n_samples * batch  # flat rows: draw-major, then sample
    total = torch.zeros_like(x, dtype=accumulation_dtype(x))
    residual = torch.zeros(batch, dtype=torch.float64, device=x.device)
    reference_scores: Tensor | None = None
    input_scores: Tensor | None = None
    limit = row_limit(internal_batch_size, total_rows)
    limit -= limit % batch if limit >= batch else 0  # whole copies of the batch per pass (as the gradient methods)
    for start, end in row_chunks(total_rows, limit):
        flat = torch.arange(start, end, device=x.device)
        draw, sample = flat // batch, flat % batch
        if stdevs > 0:
            first, last = start // batch, (end - 1) // batch
            for old in [d for d in noise if d < first]:
                del noise[old]
            while next_draw <= last:  # one draw's noise at a time: the same numbers for any chunking
                noise[next_draw] = sample_noise(x.shape, std, generator, x)
                next_draw += 1
            drawn = torch.cat(
                [noise[d][max(start - d * batch, 0) : min(end - d * batch, batch)] for d in range(first, last + 1)]
            )
            noisy = (x[sample].to(work) + drawn.to(work)).to(x.dtype)
        else:
            noisy = x[sample]
        reference = references[choice[draw, sample]]
        alpha = alphas[draw, sample].to(x.dtype).reshape(-1, *([1] * len(shape)))
        points = alpha * noisy + (1.0 - alpha) * reference
        bound = for_rows(model, sample)  # each row with its own sample's other inputs
        grads = attribution_pass(bound, points, index[sample], output_transform=output_transform, task=task).input_grad
        assert grads is not None
        contributions = grads.to(x.dtype) * (noisy - reference)
        gained = contributions if multiply_by_inputs else grads.to(x.dtype)
        total.index_add_(0, sample, gained.to(total.dtype))
        if return_convergence_delta:  # per draw: sum of contributions - (f(x') - f(r)), as Captum's
            if bound is not model:  # other inputs per sample: each row scored with its own sample's
                at_input = clean_scores(bound, noisy, output_transform)
                at_reference = clean_scores(bound, reference, output_transform)
            else:
                if reference_scores is None:  # each reference and (without noise) each input once
                    reference_scores = clean_scores(model, references, output_transform)
                    input_scores = None if stdevs > 0 else clean_scores(model, x, output_transform)
                at_input = (
                    clean_scores(model, noisy, output_transform) if input_scores is None else input_scores[sample]
                )
                at_reference = reference_scores[choice[draw, sample]]
            rows = contributions.reshape(end - start, -1).double().sum(dim=1)
            rows -= target_scores(at_input, index[sample], task).double()
            rows += target_scores(at_reference, index[sample], task).double()
            residual.index_add_(0, sample, rows)
    result = (total / n_samples).to(out_dtype(inputs))
    return (result, residual / n_samples) if return_convergence_delta else result
