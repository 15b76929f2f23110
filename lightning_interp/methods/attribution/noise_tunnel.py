"""Noise tunnels: any registered input-attribution method, averaged over noisy copies of the inputs.

SmoothGrad (Smilkov et al. 2017) is the mean of a method's attributions over
Gaussian-noised copies of the input, SmoothGrad-squared the mean of their
squares, VarGrad (Adebayo et al. 2018) their variance; Captum's
``NoiseTunnel`` offers the three (``nt_type="smoothgrad"``,
``"smoothgrad_sq"``, ``"vargrad"``) around any of its methods, and so does
:func:`noise_tunnel` around any method of the registry. ``smoothgrad_sq`` and
``vargrad`` are the same function with the kind fixed, so the callbacks can
show them beside ``smoothgrad`` by name.

The noise is drawn from the caller's ``torch.Generator`` only, one copy of the
batch at a time (``randn(inputs.shape)``, copy after copy), so the draws do
not depend on ``samples_per_call``; the target is fixed on the clean inputs, so
every copy explains the same class. The statistics are accumulated in float64
(float32 on MPS) with Chan's pairwise update, so a VarGrad of constant
attributions is 0 to the last bit, not a difference of two large means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.batching import (
    check_count,
    check_generator,
    fixed_target,
    out_dtype,
    sample_noise,
    sample_ranges,
)
from lightning_interp.methods.model.core import OutputTransform, Target, repeat_target
from lightning_interp.methods.model.neuron import bind_neuron
from lightning_interp.methods.registry import attribute, method_spec, register_method

__all__ = ["NOISE_TUNNEL_KINDS", "NoiseTunnelKind", "noise_tunnel", "smoothgrad_sq", "vargrad"]

NoiseTunnelKind = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]
NOISE_TUNNEL_KINDS: tuple[NoiseTunnelKind, ...] = ("smoothgrad", "smoothgrad_sq", "vargrad")

_SET_BY_THE_TUNNEL = ("generator", "output_transform", "task", "return_convergence_delta")
_PER_SAMPLE_OPTIONS = ("baseline", "feature_mask")  # tiled over the copies when they hold one row per sample


def _noise_std(x: Tensor, stdevs: float | None, noise_level: float | None) -> Tensor:
    """The noise's standard deviation, broadcastable to ``x``: ``stdevs`` in input units, or ``noise_level`` times
    each sample's value range (SmoothGrad's σ / (x_max - x_min)); 0.15 of the range when neither is given."""
    if stdevs is not None and noise_level is not None:
        raise ValueError("Pass either stdevs (in input units) or noise_level (a fraction of each sample's range).")
    if stdevs is not None:
        if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
            raise ValueError(f"stdevs must be a number >= 0, got {stdevs!r}.")
        return torch.tensor(float(stdevs))
    level = 0.15 if noise_level is None else noise_level
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not level >= 0:
        raise ValueError(f"noise_level must be a number >= 0, got {level!r}.")
    return level * sample_ranges(x)  # per input when several are packed side by side


def _inner_options(
    method: str,
    options: Mapping[str, Any] | None,
    batch: int,
    ndim: int,
    copies: int,
    generator: torch.Generator | None,
    output_transform: OutputTransform | None,
    task: str,
) -> dict[str, Any]:
    """The wrapped method's options for ``copies`` copies of the batch: per-sample tensors tiled, and what the tunnel
    passes on itself (the generator of a stochastic method, the output transform, the task)."""
    spec = method_spec(method)
    chosen = dict(options or {})
    clash = sorted(set(chosen) & set(_SET_BY_THE_TUNNEL))
    if clash:
        raise ValueError(f"noise_tunnel sets {clash} of {method} itself; pass generator, output_transform and task to "
                         "noise_tunnel.")  # fmt: skip
    unknown = sorted(set(chosen) - set(spec.options))
    if unknown:
        raise TypeError(f"{method} takes no option(s) {unknown}; its options are: {', '.join(spec.options)}.")
    for name in _PER_SAMPLE_OPTIONS:
        value = chosen.get(name)
        if isinstance(value, Tensor) and value.ndim == ndim and value.shape[0] == batch and batch > 1:
            chosen[name] = value.repeat(copies, *([1] * (ndim - 1)))
    if spec.stochastic:
        chosen["generator"] = generator
    if "output_transform" in spec.options:
        chosen["output_transform"] = output_transform
    if "task" in spec.options:
        chosen["task"] = task
    return chosen


@register_method(
    "gradient", "noise tunnel", stochastic=True, sensitivity=True, run_defaults={"n_samples": 16},
    cost="n_samples (16) x the wrapped method's passes", reference="Captum NoiseTunnel, same noise",
)  # fmt: skip
def noise_tunnel(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    method: str = "gradient",
    kind: NoiseTunnelKind = "smoothgrad",
    n_samples: int = 25,
    stdevs: float | None = None,
    noise_level: float | None = None,
    method_options: Mapping[str, Any] | None = None,
    samples_per_call: int | None = None,
    generator: torch.Generator | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """A registered attribution method over ``n_samples`` noisy copies of the inputs: their mean, mean square or
    variance (Captum's ``NoiseTunnel``).

    Each copy adds Gaussian noise of standard deviation ``stdevs`` (input units,
    Captum's ``stdevs``) or ``noise_level`` times each sample's value range
    (SmoothGrad's convention, as :func:`~lightning_interp.methods.smoothgrad`;
    the default, 0.15) to every input, and ``method`` explains it for the
    target fixed on the clean inputs. ``kind`` combines the copies'
    attributions ``a_1 .. a_n`` elementwise: ``"smoothgrad"`` their mean,
    ``"smoothgrad_sq"`` the mean of their squares, ``"vargrad"`` their
    variance ``mean(a^2) - mean(a)^2`` (dividing by n, as Captum). With
    ``method="gradient"`` these are SmoothGrad, SmoothGrad-squared and VarGrad.
    Equal to ``NoiseTunnel(attribution).attribute(x, nt_type=kind,
    nt_samples=n_samples, stdevs=stdevs)`` given the same noise.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class (of the clean inputs).
        method: the registered input-attribution method to wrap (not a CAM method).
        kind: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"``.
        n_samples: noisy copies per input.
        stdevs: the noise's standard deviation in input units; or
        noise_level: the noise's standard deviation as a fraction of each sample's value range (default 0.15 when
            neither is given).
        method_options: the wrapped method's own options (e.g. ``{"n_steps": 16}``); a ``baseline`` or
            ``feature_mask`` with one row per sample serves that sample in every copy. Its generator, output
            transform and task are the tunnel's.
        samples_per_call: at most this many copies of the batch per call of the wrapped method (default: all).
        generator: source of the noise (and of the wrapped method's draws); pass your own for reproducibility and
            to leave the global RNG untouched (the default draws from it).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs`` (in their dtype; float32 for integer inputs).

    Raises:
        ValueError: an unknown kind or method, a CAM method, a non-positive count, a negative noise, both
            ``stdevs`` and ``noise_level``, or an option the tunnel sets itself in ``method_options``.
        TypeError: an option the wrapped method does not take.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> linear = nn.Linear(4, 3)
        >>> x = torch.randn(2, 4)
        >>> spread = noise_tunnel(linear, x, 1, kind="vargrad", n_samples=8, stdevs=0.5, generator=g)
        >>> bool((spread == 0).all())  # a linear model's gradient does not vary with the noise
        True
        >>> noise_tunnel(linear, x, 1, method="integrated_gradients", method_options={"n_steps": 8},
        ...              n_samples=4, generator=g).shape
        torch.Size([2, 4])
    """
    if kind not in NOISE_TUNNEL_KINDS:
        raise ValueError(f"kind must be one of {NOISE_TUNNEL_KINDS}, got {kind!r}.")
    check_count("n_samples", n_samples)
    check_generator(generator)
    if samples_per_call is not None:
        check_count("samples_per_call", samples_per_call)
    if not isinstance(method, str):
        raise TypeError(f"method must be the name of a registered method, got {type(method).__name__}.")
    if method_spec(method).needs_layer:
        raise ValueError(
            f"noise_tunnel wraps input-attribution methods; {method} is a CAM method (a layer's map), not supported "
            "yet."
        )
    model, target, output_transform, task = bind_neuron(model, target, output_transform, task)  # a NeuronTarget
    x = inputs.detach() if inputs.is_floating_point() else inputs.detach().float()  # integers: noise in float
    batch = x.shape[0]
    std = _noise_std(x, stdevs, noise_level)
    index = fixed_target(model, x, target, output_transform, task)
    stats = torch.float32 if x.device.type == "mps" else torch.float64
    work = torch.promote_types(x.dtype, torch.float32)  # noise added in float32 (float64 stays float64)
    chunk = n_samples if samples_per_call is None else min(samples_per_call, n_samples)
    count, mean, squares = 0, torch.zeros(x.shape, dtype=stats, device=x.device), None
    while count < n_samples:
        copies = min(chunk, n_samples - count)
        noise = torch.stack([sample_noise(x.shape, std, generator, x) for _ in range(copies)])
        noisy = (x.unsqueeze(0).to(work) + noise.to(work)).to(x.dtype).reshape(copies * batch, *x.shape[1:])
        options = _inner_options(method, method_options, batch, x.ndim, copies, generator, output_transform, task)
        result = attribute(method, model, noisy, repeat_target(index, copies), **options)
        values = result.detach().reshape(copies, *x.shape).to(stats)
        part_mean = values.mean(dim=0)
        part_squares = ((values - part_mean) ** 2).sum(dim=0)
        total = count + copies  # Chan et al.'s pairwise update of the mean and the sum of squared deviations
        shift = part_mean - mean
        mean = mean + shift * (copies / total)
        squares = part_squares if squares is None else squares + part_squares + shift**2 * (count * copies / total)
        count = total
    assert squares is not None
    variance = squares / n_samples
    combined = {"smoothgrad": mean, "smoothgrad_sq": variance + mean**2, "vargrad": variance}[kind]
    return combined.to(out_dtype(inputs))


@register_method(
    "gradient", "SmoothGrad²", stochastic=True, sensitivity=True, run_defaults={"n_samples": 16},
    cost="n_samples (16) forwards + backwards", reference="Captum NoiseTunnel(Saliency, 'smoothgrad_sq'), same noise",
)  # fmt: skip
def smoothgrad_sq(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    method: str = "gradient",
    n_samples: int = 25,
    stdevs: float | None = None,
    noise_level: float | None = None,
    method_options: Mapping[str, Any] | None = None,
    samples_per_call: int | None = None,
    generator: torch.Generator | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """SmoothGrad-squared: the mean of the squared gradients (or ``method``'s attributions) over noisy copies of the
    inputs; :func:`noise_tunnel` with ``kind="smoothgrad_sq"`` (see there for the options).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(2, 4)
        >>> squared = smoothgrad_sq(net, x, 0, n_samples=8, generator=torch.Generator().manual_seed(0))
        >>> mean = noise_tunnel(net, x, 0, n_samples=8, generator=torch.Generator().manual_seed(0))
        >>> bool((squared >= mean**2).all())  # the mean square is at least the squared mean
        True
    """
    return noise_tunnel(
        model, inputs, target, method=method, kind="smoothgrad_sq", n_samples=n_samples, stdevs=stdevs,
        noise_level=noise_level, method_options=method_options, samples_per_call=samples_per_call,
        generator=generator, output_transform=output_transform, task=task,
    )  # fmt: skip


@register_method(
    "gradient", "VarGrad", stochastic=True, sensitivity=True, run_defaults={"n_samples": 16},
    cost="n_samples (16) forwards + backwards", reference="Captum NoiseTunnel(Saliency, 'vargrad'), same noise",
)  # fmt: skip
def vargrad(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    method: str = "gradient",
    n_samples: int = 25,
    stdevs: float | None = None,
    noise_level: float | None = None,
    method_options: Mapping[str, Any] | None = None,
    samples_per_call: int | None = None,
    generator: torch.Generator | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """VarGrad: the variance of the gradients (or ``method``'s attributions) over noisy copies of the inputs
    (Adebayo et al. 2018); :func:`noise_tunnel` with ``kind="vargrad"`` (see there for the options).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> spread = vargrad(net, torch.randn(2, 4), 0, n_samples=8, generator=torch.Generator().manual_seed(0))
        >>> spread.shape, bool((spread >= 0).all())
        (torch.Size([2, 4]), True)
    """
    return noise_tunnel(
        model, inputs, target, method=method, kind="vargrad", n_samples=n_samples, stdevs=stdevs,
        noise_level=noise_level, method_options=method_options, samples_per_call=samples_per_call,
        generator=generator, output_transform=output_transform, task=task,
    )  # fmt: skip
