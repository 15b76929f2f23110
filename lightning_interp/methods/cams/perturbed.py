"""CAM methods that need more than one forward and backward: Ablation-CAM (one forward per ablated channel) and
Smooth Grad-CAM++ (Grad-CAM++ from the gradients of noisy copies of the input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.attribution.gradient import _chunk_copies
from lightning_interp.methods.attribution.noise_tunnel import _noise_std
from lightning_interp.methods.cams.gradcam import _grid_of, _layer_and_reshape
from lightning_interp.methods.model.batching import accumulation_dtype, check_count, check_generator, sample_noise
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    attribution_pass,
    captured_outputs,
    eager_forward,
    get_module,
    modes_preserved,
    repeat_target,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.model.tokens import TokenReshape
from lightning_interp.methods.perturbation.ablation import PERTURBED_PER_FORWARD
from lightning_interp.methods.registry import register_method

__all__ = ["ablation_cam", "plus_plus_weights", "smooth_grad_cam_plus_plus"]


def _finish(cam: Tensor, inputs: Tensor, relu: bool, upsample: bool) -> Tensor:
    if relu:
        cam = cam.clamp_min(0)
    if upsample and tuple(cam.shape[-2:]) != tuple(inputs.shape[-2:]):
        cam = F.interpolate(cam[:, None], size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return cam


@register_method(
    "cam", "Ablation-CAM",
    cost="1 forward + 1 forward per channel of the layer (512 for a ResNet's layer4), no backward",
    reference="pytorch-grad-cam AblationCAM",
)  # fmt: skip
def ablation_cam(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    reshape: TokenReshape | None = None,
    internal_batch_size: int = 32,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Ablation-CAM heatmap of ``layer`` (Desai and Ramaswamy 2020): channels weighted by the score lost without them.

    For each channel ``k`` of the layer's activation ``A``, the model runs
    again with ``A_k`` set to zero (the rest of ``A`` as it was; no
    gradients, ``internal_batch_size`` ablated copies per forward), and the
    channel's weight is the relative drop of the target score,
    ``w_k = (y - y_k) / y``; the map is ``ReLU(sum_k w_k A_k)``. A score of
    zero gives no weights (NaN), as the definition divides by it, and a
    negative score (a logit below 0, common in an untrained network) turns
    every weight's sign, as it does in pytorch-grad-cam.
    pytorch-grad-cam's ``AblationCAM`` zeroes a channel only when the
    activation's minimum is exactly 0 (after a ReLU) and otherwise sets it far
    below the minimum (``min - 1e7``, growing with each channel of a batch);
    here a channel is always zeroed, the paper's ablation. With a token or
    channels-last layout (``reshape``), the channels are the last dimension of
    the layer's output. The copies of a pass share the layer's input (they
    differ only at its output), so the layer runs on one copy's row and its
    output is replaced by the ablated copies, through hooks that live only
    inside the call: pytorch-grad-cam swaps the module for an
    ``AblationLayer`` instead; here no module or attribute of the model is
    touched. A layer that refuses one row runs on every copy.

    Args:
        model: the network.
        inputs: (B, C, H, W) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        layer: module or dotted name; None picks :func:`~lightning_interp.methods.find_target_layer`.
        relu: keep only the positive part of the map.
        upsample: resize to the input's (H, W) bilinearly (align_corners=False).
        reshape: turns token outputs (B, N, C) into (B, C, h, w) (default: the known layouts).
        internal_batch_size: most ablated copies per forward pass (default 32, pytorch-grad-cam's batch: on the
            CPU, passes of 64 copies do the same work and their larger activations' memory is often returned to the
            system and faulted in again, zero-filled, on the next pass).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        (B, H, W) float32 map (or (B, h, w) without ``upsample``), not normalised.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> ablation_cam(net, torch.randn(2, 3, 8, 8), None, "1").shape
        torch.Size([2, 8, 8])
    """
    check_count("internal_batch_size", internal_batch_size)
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
        activation = activation.detach()
        reshape = _grid_of(model, x, layer, activation, reshape)
        if reshape is None and activation.ndim != 4:
            raise ValueError(
                f"Ablation-CAM needs a (batch, channels, h, w) output of layer {layer!r}, got shape "
                f"{tuple(activation.shape)}; pass reshape=... for token outputs."
            )
        channel_dim = 1 if reshape is None else activation.ndim - 1
        batch, channels = activation.shape[0], activation.shape[channel_dim]
        base = target_scores(scores, index, task).float()
        ablated = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
        replacement: list[Tensor] = []
        one_row = [True]  # whether the layer runs on one copy's row (False once it refused to)

        def replace(_module: nn.Module, _args: object, _output: object) -> Tensor:
            return replacement[0]

        def first_row(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # The copies of a pass are one sample's, ablated at the layer's output: the layer's input is that sample's
            # in every row, and its output is replaced above; so it runs on the first row alone (of each tensor
            # argument with a row per copy), not once per copy. What it returns is never read.
            if not one_row[0]:
                return None
            rows = replacement[0].shape[0]
            return _first_rows(args, rows), {key: _first_rows((value,), rows)[0] for key, value in kwargs.items()}

        handles = [
            module.register_forward_pre_hook(first_row, with_kwargs=True),
            module.register_forward_hook(replace),
        ]
        try:
            for sample in range(batch):
                for start in range(0, channels, internal_batch_size):
                    count = min(internal_batch_size, channels - start)
                    copies = activation[sample : sample + 1].repeat(count, *([1] * (activation.ndim - 1)))
                    rows = torch.arange(count, device=x.device)
                    copies.movedim(channel_dim, 1)[rows, rows + start] = 0  # copy i without channel start + i
                    replacement[:] = [copies]
                    repeated = x[sample : sample + 1].repeat(count, *([1] * (x.ndim - 1)))
                    forward = for_rows(model, slice(sample, sample + 1))
                    try:
                        output = forward(repeated)
                    except Exception:
                        if not one_row[0] or count == 1:
                            raise
                        one_row[0] = False  # a layer that needs every row (a fixed batch size): run it on all
                        output = forward(repeated)
                    out = scores_from_output(output, output_transform)
                    explained = repeat_target(index[sample : sample + 1], count)
                    ablated[sample, start : start + count] = target_scores(out, explained, task).float()
        finally:
            for handle in handles:
                handle.remove()
        weights = (base[:, None] - ablated) / base[:, None]
        grid = (reshape(activation) if reshape is not None else activation).float()
        cam = (weights[:, :, None, None] * grid).sum(dim=1)
    return _finish(cam, x, relu, upsample)


def _first_rows(values: tuple, rows: int) -> tuple:
    """``values`` with each tensor of ``rows`` > 1 rows cut to its first row (anything else as it is)."""
    return tuple(
        value[:1] if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == rows > 1 else value
        for value in values
    )


def plus_plus_weights(activation: Tensor, grad: Tensor, grad_2: Tensor, grad_3: Tensor) -> Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018, eq. 19) from the gradient's first three powers.

    ``w_k = sum_ij relu(G_kij) a_kij`` with ``a = G2 / (2 G2 + sum_ab(A_kab) G3)``
    (0 where ``G2`` is 0). With ``G2 = G**2`` and ``G3 = G**3`` these are
    :func:`~lightning_interp.methods.grad_cam_plus_plus`'s weights; Smooth
    Grad-CAM++ passes the powers averaged over noisy copies of the input.

    Args:
        activation: (B, C, h, w) activation ``A``.
        grad: (B, C, h, w) gradient ``G`` of the score with respect to it (or its average).
        grad_2: ``G**2`` (or its average).
        grad_3: ``G**3`` (or its average).

    Returns:
        (B, C, 1, 1) weights.

    Example:
        >>> a, g = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
        >>> round(plus_plus_weights(a, g, g**2, g**3).item(), 4)  # 4 pixels of 0.5 * 0.25 / (0.5 + 4 * 0.125)
        0.5
    """
    return _plus_plus_weights(activation, grad, grad_2, grad_3, own=False)


def _plus_plus_weights(activation: Tensor, grad: Tensor, grad_2: Tensor, grad_3: Tensor, *, own: bool) -> Tensor:
    """:func:`plus_plus_weights`; with ``own`` (the gradients are the caller's scratch buffers) in place in them:
    the same operations on the same operands (products and sums swapped only where exact), so the same values, with
    two new (B, C, h, w) buffers instead of nine (on the CPU each fresh one costs its pages' zero-filling)."""
    total = activation.sum(dim=(2, 3), keepdim=True)
    if not own:
        alpha = grad_2 / (2 * grad_2 + total * grad_3 + 1e-6)
        alpha = torch.where(grad_2 != 0, alpha, torch.zeros_like(alpha))
        return (grad.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)
    # Where the averaged G2 is 0, every copy's G**2 was 0, so was its G**3 (|G| < 1 there), and a = 0 / (0 + total * 0
    # + 1e-6) is already +0 unless total is inf or NaN: the mask (a slow kernel on the CPU) only matters then.
    undefined = None if bool(total.isfinite().all()) else grad_2 == 0
    doubled = grad_2 * 2
    denominator = grad_3.mul_(total).add_(doubled).add_(1e-6)  # total * G3 + 2 * G2 + 1e-6
    alpha = torch.div(grad_2, denominator, out=doubled)
    if undefined is not None:
        alpha.masked_fill_(undefined, 0)
    return alpha.mul_(grad.clamp_min_(0)).sum(dim=(2, 3), keepdim=True)


def _add_powers(moments: list[Tensor | None], grad: Tensor, scratch: Tensor | None) -> Tensor | None:
    """Add the sums over the copies (``grad``'s first dimension) of ``G``, ``G**2`` and ``G**3`` to ``moments``.

    The same operations as ``moments[p] + (G**p).sum(dim=0)`` (``G * G``, then ``* G``), so the same values, but in
    place after the first pass, the powers written into ``scratch`` (the previous pass's buffer, returned for the
    next): a pass allocates no (copies, B, C, h, w) buffer of its own, where fresh ones cost the CPU their pages'
    zero-filling (on a layer of 64 x 24 x 24 more than the elementwise work itself).
    """
    single = grad.shape[0] == 1  # the sum over one copy is that copy

    def summed(term: Tensor) -> Tensor:
        return term[0] if single else term.sum(dim=0)

    if scratch is None or scratch.shape != grad.shape or scratch.dtype != grad.dtype:
        square = grad * grad
    else:
        square = torch.mul(grad, grad, out=scratch)
    if moments[0] is None or moments[1] is None or moments[2] is None:
        moments[0], moments[1], moments[2] = summed(grad), summed(square), summed(square * grad)
        return None if single else square  # with one copy, moments[1] is the square itself
    moments[0].add_(summed(grad))
    moments[1].add_(summed(square))
    moments[2].add_(summed(square.mul_(grad)))
    return square


@register_method(
    "cam", "Smooth\nGrad-CAM++", stochastic=True, run_defaults={"n_samples": 8},
    cost="`n_samples` (16) forwards + backwards, + 1 forward", reference="torchcam SmoothGradCAMpp",
)  # fmt: skip
def smooth_grad_cam_plus_plus(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    n_samples: int = 16,
    stdevs: float | None = None,
    noise_level: float | None = None,
    generator: torch.Generator | None = None,
    relu: bool = True,
    upsample: bool = True,
    reshape: TokenReshape | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Smooth Grad-CAM++ heatmap of ``layer`` (Omeiza et al. 2019): Grad-CAM++ with the gradient's powers averaged
    over noisy copies of the input.

    Each of ``n_samples`` copies adds Gaussian noise of standard deviation
    ``stdevs`` (input units) or ``noise_level`` times each sample's value
    range (default 0.15); the gradients ``G`` of the target score (fixed on
    the clean input) at the layer give the averages of ``G``, ``G**2`` and
    ``G**3``, and :func:`plus_plus_weights` of those weight the clean input's
    activation: ``ReLU(sum_k w_k A_k)``. The numerator of ``a`` is the
    averaged second power, as in Grad-CAM++ (the paper writes the first
    power; torchcam corrects it the same way). torchcam's ``SmoothGradCAMpp``
    differs in three places: it takes the positive part of the *last* noisy
    copy's gradient rather than of the average, combines the last noisy
    copy's activation rather than the clean one, and uses
    ``sum_ab A_kab G3_kab`` in the denominator (pytorch-grad-cam's and our
    Grad-CAM++ use ``sum_ab(A_kab) G3_kij``); all three agree when the
    layer's gradient is constant over its positions and across the copies.
    With no noise this is :func:`~lightning_interp.methods.grad_cam_plus_plus`.

    Args:
        model: the network.
        inputs: (B, C, H, W) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        layer: module or dotted name; None picks :func:`~lightning_interp.methods.find_target_layer`.
        n_samples: noisy copies per input.
        stdevs: the noise's standard deviation in input units; or
        noise_level: as a fraction of each sample's value range (0.15 when neither is given).
        generator: source of the noise (the callbacks pass their own; the default draws from the global RNG).
        relu: keep only the positive part of the map.
        upsample: resize to the input's (H, W) bilinearly (align_corners=False).
        reshape: turns token outputs (B, N, C) into (B, C, h, w) (default: the known layouts).
        internal_batch_size: at most this many noisy inputs per forward pass (whole copies of the batch; default:
            as many copies as fit in 64 inputs, at least one).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        (B, H, W) float32 map (or (B, h, w) without ``upsample``), not normalised.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> g = torch.Generator().manual_seed(0)
        >>> smooth_grad_cam_plus_plus(net, torch.randn(2, 3, 8, 8), None, "1", n_samples=4, generator=g).shape
        torch.Size([2, 8, 8])
    """
    check_count("n_samples", n_samples)
    check_generator(generator)
    layer, reshape = _layer_and_reshape(model, inputs, target, layer, reshape, output_transform, task)
    module = get_module(model, layer)
    with modes_preserved(model), eager_forward(), torch.inference_mode(False), torch.no_grad():
        x = inputs.detach().clone()
        # the layer's output handed on uncopied (a (B, C, h, w) copy per pass is the largest cost after the network
        # on a small one); when the network writes into it in place, the clean forward runs again with a copy, and
        # so do the noisy passes
        with captured_outputs([module], copy=False) as outputs:
            scores = scores_from_output(model(x), output_transform)
        copy_outputs = outputs.overwritten()
        if copy_outputs:
            with captured_outputs([module]) as outputs:
                scores = scores_from_output(model(x), output_transform)
        index = resolve_target(target, scores, task)
        clean = outputs[0]
        if clean is None:
            raise RuntimeError(f"Layer {layer!r} produced no tensor output during the forward pass.")
        clean = clean.detach()
    reshape = _grid_of(model, x, layer, clean, reshape)
    activation = (reshape(clean) if reshape is not None else clean).float()
    if activation.ndim != 4:
        raise ValueError(
            f"Smooth Grad-CAM++ needs a (batch, channels, h, w) output of layer {layer!r}, got shape "
            f"{tuple(activation.shape)}; pass reshape=... for token outputs."
        )
    batch = x.shape[0]
    std = _noise_std(x, stdevs, noise_level)
    # summed in the gradient's precision (float32, or float64 for a float64 model), as the other averaging methods
    # (accumulation_dtype); the three sums of n_samples terms lose nothing that matters at float32 output
    moments: list[Tensor | None] = [None, None, None]
    scratch: Tensor | None = None
    chunk = _chunk_copies(internal_batch_size, batch, n_samples)
    done = 0
    while done < n_samples:
        copies = min(chunk, n_samples - done)
        noise = sample_noise(torch.Size((copies, *x.shape)), std.unsqueeze(0), generator, x)
        work = torch.promote_types(x.dtype, torch.float32)
        noisy = (x.unsqueeze(0).to(work) + noise.to(work)).to(x.dtype).reshape(copies * batch, *x.shape[1:])
        # without internal_batch_size, at most PERTURBED_PER_FORWARD inputs per pass (the noise is still drawn at
        # once): larger passes are no faster, and on the CPU their activations cost fresh zero-filled memory each time
        per_pass = copies if internal_batch_size is not None else max(1, PERTURBED_PER_FORWARD // max(batch, 1))
        for first in range(0, copies, per_pass):
            part = min(per_pass, copies - first)
            result = attribution_pass(
                model,
                noisy[first * batch : (first + part) * batch],
                repeat_target(index, part),
                layers=[layer],
                input_gradient=False,
                output_transform=output_transform,
                task=task,
                copy_outputs=copy_outputs,
            )
            grad = result.activation_grads[0]
            grad = reshape(grad) if reshape is not None else grad
            grad = grad.to(accumulation_dtype(grad)).reshape(part, *activation.shape)
            scratch = _add_powers(moments, grad, scratch)
        done += copies
    grad_1, grad_2, grad_3 = (total.div_(n_samples).float() for total in moments if total is not None)
    weights = _plus_plus_weights(activation, grad_1, grad_2, grad_3, own=True)
    cam = (weights * activation).sum(dim=1)
    return _finish(cam, x, relu, upsample)
