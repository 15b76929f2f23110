"""Perturbation attributions: occlusion, LIME and KernelSHAP, with one signature.

Every function here is ``fn(model, inputs, target, **options) -> Tensor`` and
returns attributions with the shape of ``inputs`` (in its dtype; float32 for
integer inputs), on its device. ``target`` is a class index, a LongTensor of
shape (B,), or None for the predicted class; it is resolved once on the clean
inputs, so every perturbed copy explains the same class, and the explained
score of each copy is :func:`~lightning_interp.methods.target_scores`
(binary, multi-label and regression models work too).

Occlusion, LIME and KernelSHAP only run forward passes (under
``torch.no_grad()``); all perturbed copies of the batch go through the model
together, at most ``internal_batch_size`` (default 64) inputs per forward. LIME and
KernelSHAP share one set of random coalitions across the batch, so a sample's
explanation does not depend on the other samples in the batch, and draw them
from the caller's ``torch.Generator`` only. Their regressions are closed-form
weighted least squares in float64, batched over the samples. GradientSHAP runs
``n_samples`` forward and backward passes per sample. The model runs in eval
mode; each module's mode is restored afterwards, ``param.grad`` is never
touched and no hook is registered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.model.batching import (
    accumulation_dtype,
    check_count,
    check_generator,
    clean_scores,
    draw_device,
    out_dtype,
    row_chunks,
    row_limit,
)
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    resolve_target,
)
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.registry import register_method

__all__ = ["kernel_shap", "lime", "occlusion", "patch_feature_mask"]


# --------------------------------------------------------------------------- shared helpers


PERTURBED_PER_FORWARD = 64
"""Default most perturbed inputs per forward of occlusion, LIME and KernelSHAP: larger batches are no faster, and on
the CPU their activations (tens of MB a layer) cost fresh, zero-filled memory on every call."""


def _baseline_like(baseline: Tensor | float, x: Tensor, name: str = "baseline") -> Tensor:
    """``baseline`` as a tensor of ``x``'s shape (an expanded view), dtype and device."""
    dtype = None if isinstance(baseline, Tensor) else x.dtype  # a Python float straight to float64, not via float32
    base = torch.as_tensor(baseline, dtype=dtype, device=x.device)
    try:
        shape = torch.broadcast_shapes(base.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{name} of shape {tuple(base.shape)} does not broadcast to the inputs' shape {tuple(x.shape)}; pass a "
            "scalar, a tensor of the inputs' shape, or one broadcastable to it (e.g. (1, C, 1, 1) per channel)."
        )
    return base.to(x.dtype).expand(x.shape)


def _clean_target(
    model: nn.Module, x: Tensor, target: Target, output_transform: OutputTransform | None, task: str
) -> tuple[Tensor, Tensor]:
    """One forward on the clean inputs: the explained index per sample (fixed for every copy) and its score."""
    scores = clean_scores(model, x, output_transform)
    index = resolve_target(target, scores, task)
    return index, target_scores(scores, index, task)


def _row_scores(
    model: nn.Module, rows: Tensor, index: Tensor, output_transform: OutputTransform | None, task: str
) -> Tensor:
    """The explained score of each perturbed row (index: the explained class of each row), float64."""
    scores = clean_scores(model, rows, output_transform)
    if scores.shape[0] != rows.shape[0]:
        raise ValueError(
            f"The model returned {scores.shape[0]} score rows for {rows.shape[0]} inputs; perturbation methods need "
            "one row of scores per input."
        )
    return target_scores(scores, index, task).double()


# --------------------------------------------------------------------------- occlusion


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}.")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    return pair  # type: ignore[return-value]


def _window_cover(size: int, window: int, stride: int, device: torch.device) -> Tensor:
    """(positions, size) 0/1 rows: which pixels each window position covers along one axis.

    Positions are ``0, stride, 2 * stride, ...`` up to the first one whose window
    reaches the end; that last window is cut at the edge (Captum's Occlusion).
    """
    count = math.ceil((size - window) / stride) + 1
    starts = torch.arange(count, device=device)[:, None] * stride
    pixels = torch.arange(size, device=device)[None, :]
    return (pixels >= starts) & (pixels < starts + window)


@register_method(
    "perturbation", "occlusion",
    cost="1 + one forward per window (65 for the default 8 x 8 grid), no backward", reference="Captum Occlusion",
)  # fmt: skip
def occlusion(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: Tensor | float = 0.0,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Occlusion: the drop of the target score when a window of the image is replaced (Zeiler & Fergus 2014).

    A ``window`` slides over the two spatial dimensions of (B, C, H, W) inputs
    with ``stride``, covering every channel; positions are ``0, stride, ...``
    up to the first window that reaches the edge, which is cut there. Each
    pixel's attribution is the mean, over the windows covering it, of
    ``score(x) - score(x with the window set to baseline)``: Captum's
    ``Occlusion(sliding_window_shapes=(C, h, w), strides=(C, sh, sw))``.
    Costs one forward for the clean batch and one per window position.

    Args:
        model: the network.
        inputs: (B, C, H, W) images.
        target: class index, LongTensor (B,), or None for the predicted class.
        window: (height, width) of the occluded patch, or one int for a square;
            default: a square of side ``ceil(min(H, W) / 8)`` (an 8 x 8 grid
            of windows at the default stride, whatever the resolution).
        stride: step between window positions, (height, width) or one int;
            default: the window (non-overlapping). At most the window along an
            axis the window does not fill, so every pixel is covered.
        baseline: the value occluded pixels take: a scalar or a tensor
            broadcastable to ``inputs``.
        internal_batch_size: at most this many occluded inputs per forward pass
            (default :data:`PERTURBED_PER_FORWARD`, 64).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs`` (equal across channels).

    Raises:
        ValueError: the inputs are not (B, C, H, W), the window is larger than
            the image, a stride is not positive or larger than the window, or
            the baseline does not broadcast to the inputs.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> occlusion(net, torch.randn(2, 3, 8, 8), 1, window=4, stride=2).shape
        torch.Size([2, 3, 8, 8])
    """
    if inputs.ndim != 4:
        raise ValueError(
            f"occlusion slides a window over images of shape (B, C, H, W); got inputs of shape "
            f"{tuple(inputs.shape)}. For other inputs use lime or kernel_shap with a feature_mask."
        )
    x = inputs.detach()
    batch, _, height, width = x.shape
    if window is None:
        side = max(1, math.ceil(min(height, width) / 8))
        window = (side, side)
    win_h, win_w = _pair(window, "window")
    str_h, str_w = _pair(window if stride is None else stride, "stride")
    if win_h > height or win_w > width:
        raise ValueError(
            f"window {(win_h, win_w)} is larger than the inputs' spatial size {(height, width)}; pass a smaller window."
        )
    for axis, size, win, step in (("height", height, win_h, str_h), ("width", width, win_w, str_w)):
        if win < size and step > win:
            raise ValueError(
                f"stride {step} is larger than the window {win} along the {axis}: pixels between windows would "
                "never be occluded. Pass a stride no larger than the window."
            )
    base = _baseline_like(baseline, x)
    index, clean = _clean_target(model, x, target, output_transform, task)
    rows_cover = _window_cover(height, win_h, str_h, x.device)  # (n_h, H)
    cols_cover = _window_cover(width, win_w, str_w, x.device)  # (n_w, W)
    n_w = cols_cover.shape[0]
    total = rows_cover.shape[0] * n_w * batch  # flat rows: window-major, then sample
    drops = torch.empty(total, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start, end in row_chunks(total, row_limit(internal_batch_size, total, PERTURBED_PER_FORWARD)):
            flat = torch.arange(start, end, device=x.device)
            window_id, sample = flat // batch, flat % batch
            covered = rows_cover[window_id // n_w][:, None, :, None] & cols_cover[window_id % n_w][:, None, None, :]
            occluded = torch.where(covered, base[sample], x[sample])
            drops[start:end] = _row_scores(for_rows(model, sample), occluded, index[sample], output_transform, task)
        acc = accumulation_dtype(x)
        drops = clean.to(acc).repeat(total // batch) - drops.to(acc)  # score(x) - score(occluded), Captum's order
        drops = drops.reshape(rows_cover.shape[0], n_w, batch).permute(2, 0, 1)
        rows_f, cols_f = rows_cover.to(acc), cols_cover.to(acc)
        summed = torch.einsum("bij,ih,jw->bhw", drops, rows_f, cols_f)
        counts = rows_f.sum(dim=0)[:, None] * cols_f.sum(dim=0)[None, :]
        attributions = (summed / counts)[:, None].expand(x.shape)
    return attributions.to(out_dtype(inputs)).contiguous()


# --------------------------------------------------------------------------- LIME and KernelSHAP


def patch_feature_mask(height: int, width: int, patch_size: int, device: torch.device | str | None = None) -> Tensor:
    """A (1, 1, H, W) LongTensor numbering square patches row by row: LIME's and KernelSHAP's default features.

    Patches on the bottom and right edges are cut when ``patch_size`` does not
    divide the image.

    Args:
        height: image height.
        width: image width.
        patch_size: side of each square patch, in pixels.
        device: where to put the mask.

    Returns:
        Feature ids ``0 .. ceil(H / p) * ceil(W / p) - 1``, shape (1, 1, H, W).

    Example:
        >>> patch_feature_mask(3, 4, 2)[0, 0].tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]]
    """
    patch_size = check_count("patch_size", patch_size)
    rows = torch.arange(height, device=device) // patch_size
    cols = torch.arange(width, device=device) // patch_size
    return (rows[:, None] * math.ceil(width / patch_size) + cols[None, :]).reshape(1, 1, height, width)


def _feature_mask(inputs: Tensor, feature_mask: Tensor | None, patch_size: int | None) -> tuple[Tensor, int, Tensor]:
    """The feature mask with ``inputs.ndim`` dims (leading dim 1 or B), the number of features F, and which
    features each sample has, (B, F) bool."""
    batch = inputs.shape[0]
    if feature_mask is None:
        if inputs.ndim == 4:
            height, width = inputs.shape[-2:]
            side = max(1, math.ceil(min(height, width) / 4)) if patch_size is None else patch_size
            mask = patch_feature_mask(height, width, side, inputs.device)
        else:
            if patch_size is not None:
                raise ValueError(
                    f"patch_size applies to images (B, C, H, W); the inputs have shape {tuple(inputs.shape)}. "
                    "Pass a feature_mask to group their elements instead."
                )
            mask = torch.arange(inputs[0].numel(), device=inputs.device).reshape(1, *inputs.shape[1:])
        features = int(mask.max()) + 1
        return mask, features, torch.ones(batch, features, dtype=torch.bool, device=inputs.device)
    if patch_size is not None:
        raise ValueError("Pass either feature_mask or patch_size, not both: patch_size only shapes the default mask.")
    if not isinstance(feature_mask, Tensor) or feature_mask.is_floating_point() or feature_mask.is_complex():
        raise ValueError("feature_mask must be an integer tensor of feature ids 0 .. F-1.")
    if feature_mask.dtype == torch.bool:
        raise ValueError("feature_mask must hold integer feature ids 0 .. F-1, not booleans; use mask.long().")
    try:
        shape = torch.broadcast_shapes(feature_mask.shape, inputs.shape)
    except RuntimeError:
        shape = None
    if shape != inputs.shape:
        raise ValueError(
            f"feature_mask of shape {tuple(feature_mask.shape)} does not broadcast to the inputs' shape "
            f"{tuple(inputs.shape)}; pass one mask for all samples, e.g. (H, W) or (1, 1, H, W) for images, or one "
            f"per sample with a leading batch dimension, e.g. ({batch}, 1, H, W)."
        )
    mask = feature_mask.to(device=inputs.device, dtype=torch.long)
    mask = mask.reshape((1,) * (inputs.ndim - mask.ndim) + tuple(mask.shape))
    if mask.numel() == 0:
        raise ValueError("feature_mask is empty.")
    if int(mask.min()) < 0:
        raise ValueError(f"feature_mask ids must be 0 .. F-1, got a negative id {int(mask.min())}.")
    features = int(mask.max()) + 1
    used = torch.zeros(features, dtype=torch.bool, device=mask.device)
    used[mask.reshape(-1)] = True
    if not bool(used.all()):
        missing = torch.nonzero(~used).reshape(-1)[:8].tolist()
        raise ValueError(
            f"feature_mask ids must be 0 .. F-1 with none skipped; ids {missing} are missing below the largest id "
            f"{features - 1}. Renumber them, e.g. torch.unique(mask, return_inverse=True)[1]."
        )
    if mask.shape[0] == 1:
        present = torch.ones(batch, features, dtype=torch.bool, device=mask.device)
    else:
        present = torch.zeros(batch, features, dtype=torch.bool, device=mask.device)
        present.scatter_(1, mask.reshape(batch, -1), True)
    return mask, features, present


def _coalition_inputs(
    x: Tensor, base: Tensor, mask: Tensor, coalitions: Tensor, sample: Tensor, coalition: Tensor
) -> Tensor:
    """Rows ``x[sample]`` with the features off in ``coalitions[coalition]`` set to the baseline."""
    rows = sample.shape[0]
    ids = mask.reshape(mask.shape[0], -1)
    ids = ids.expand(rows, -1) if mask.shape[0] == 1 else ids[sample]
    on = torch.gather(coalitions[coalition], 1, ids).reshape(rows, *mask.shape[1:])
    return torch.where(on, x[sample], base[sample])


def _spread(coefficients: Tensor, mask: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Each feature's coefficient on every input element of that feature, shaped like ``x``."""
    ids = mask.reshape(mask.shape[0], -1).expand(x.shape[0], -1)
    values = torch.gather(coefficients, 1, ids).reshape(x.shape[0], *mask.shape[1:])
    return values.expand(x.shape).to(dtype).contiguous()


def _perturbed_scores(
    model: nn.Module,
    x: Tensor,
    base: Tensor,
    mask: Tensor,
    coalitions: Tensor,
    index: Tensor,
    internal_batch_size: int | None,
    output_transform: OutputTransform | None,
    task: str,
    similarity_width: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scores (n, B) of every coalition applied to every sample, float64, and with ``similarity_width`` LIME's
    exponential-kernel weights (n, B) on the cosine distance between each perturbed input and its original."""
    batch = x.shape[0]
    n_coalitions = coalitions.shape[0]
    total = n_coalitions * batch  # flat rows: coalition-major, then sample
    scores = torch.empty(total, dtype=torch.float64, device=x.device)
    weights = torch.empty(total, dtype=torch.float64, device=x.device) if similarity_width is not None else None
    with torch.no_grad():
        for start, end in row_chunks(total, row_limit(internal_batch_size, total, PERTURBED_PER_FORWARD)):
            flat = torch.arange(start, end, device=x.device)
            coalition, sample = flat // batch, flat % batch
            rows = _coalition_inputs(x, base, mask, coalitions, sample, coalition)
            scores[start:end] = _row_scores(for_rows(model, sample), rows, index[sample], output_transform, task)
            if weights is not None and similarity_width is not None:
                cosine = F.cosine_similarity(
                    rows.reshape(end - start, -1).double(), x[sample].reshape(end - start, -1).double(), dim=1
                )
                weights[start:end] = torch.exp(-((1 - cosine) ** 2) / (2 * similarity_width**2))
    return scores.reshape(n_coalitions, batch), (None if weights is None else weights.reshape(n_coalitions, batch))


def _least_squares(design: Tensor, response: Tensor) -> Tensor:
    """Minimum-norm least-squares solution of ``design @ coef = response``, batched: (B, n, F), (B, n) -> (B, F)."""
    return (torch.linalg.pinv(design) @ response.unsqueeze(-1)).squeeze(-1)


@register_method(
    "perturbation", "LIME", stochastic=True,
    cost="n_samples + 1 (129) forwards, no backward",
    reference="Captum Lime, same coalitions",
    several_inputs="joint",
)  # fmt: skip
def lime(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    n_samples: int = 128,
    feature_mask: Tensor | None = None,
    patch_size: int | None = None,
    baseline: Tensor | float = 0.0,
    kernel_width: float = 1.0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """LIME: a weighted linear surrogate of the model around each input (Ribeiro et al. 2016).

    The interpretable features are square patches of (B, C, H, W) images
    (every element for other inputs) or the groups of ``feature_mask``. Each of
    ``n_samples`` coalitions switches every feature on or off with probability
    1/2 (features off take the ``baseline``); the same coalitions serve every
    sample of the batch. A linear model with intercept is fitted to the target
    scores by weighted least squares (closed form, float64), weighting each
    perturbed input by Captum's default similarity: ``exp(-d^2 / (2 w^2))``
    with ``d`` the cosine distance between the perturbed and the original input
    and ``w = kernel_width``. A feature's coefficient is the attribution of
    each of its elements. Matches Captum's ``Lime`` with
    ``interpretable_model=SkLearnLinearRegression()`` given the same coalitions.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        n_samples: number of random coalitions (forward passes per sample).
        feature_mask: integer tensor of feature ids 0 .. F-1, broadcastable to
            ``inputs``: one mask for all samples, e.g. (H, W), or one per sample
            with a leading batch dimension. A sample's mask may skip ids other
            samples use; their attribution is zero for it.
        patch_size: side of the square patches of the default mask for images;
            default ``ceil(min(H, W) / 4)`` (a 4 x 4 grid, 16 features).
        baseline: the value of features that are off: a scalar or a tensor
            broadcastable to ``inputs``.
        kernel_width: width of the exponential similarity kernel.
        generator: source of the coalitions; pass your own for reproducibility
            and to leave the global RNG untouched (the default draws from it).
        internal_batch_size: at most this many perturbed inputs per forward pass
            (default :data:`PERTURBED_PER_FORWARD`, 64).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``, one value per feature.

    Raises:
        ValueError: ``n_samples`` or ``kernel_width`` is not positive, or
            ``feature_mask`` has the wrong shape, dtype or ids.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> linear = nn.Linear(4, 2)
        >>> x = torch.randn(3, 4)
        >>> attr = lime(linear, x, 1, n_samples=64, generator=g)
        >>> torch.allclose(attr, linear.weight[1] * x, atol=1e-5)  # exact for a linear model
        True
    """
    check_count("n_samples", n_samples)
    check_generator(generator)
    if not kernel_width > 0:
        raise ValueError(f"kernel_width must be positive, got {kernel_width!r}.")
    x = inputs.detach()
    base = _baseline_like(baseline, x)
    mask, features, present = _feature_mask(x, feature_mask, patch_size)
    index, _ = _clean_target(model, x, target, output_transform, task)
    device = draw_device(generator, x)
    coalitions = (torch.rand((n_samples, features), generator=generator, device=device) < 0.5).to(x.device)
    scores, weights = _perturbed_scores(
        model, x, base, mask, coalitions, index, internal_batch_size, output_transform, task, kernel_width
    )
    assert weights is not None
    design = coalitions.double().T.unsqueeze(0)  # (1, F, n)
    weights, scores = weights.T, scores.T  # (B, n)
    total_weight = weights.sum(dim=1, keepdim=True)
    mean_design = (design * weights[:, None, :]).sum(dim=2) / total_weight  # weighted means (B, F)
    mean_score = (scores * weights).sum(dim=1, keepdim=True) / total_weight
    root = weights.sqrt()
    centred = (design - mean_design[:, :, None]) * root[:, None, :] * present[:, :, None]  # (B, F, n)
    coefficients = _least_squares(centred.transpose(1, 2), (scores - mean_score) * root)
    return _spread(coefficients * present, mask, x, out_dtype(inputs))


def _shapley_coalitions(
    n_samples: int, features: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(n, F) coalitions drawn from the Shapley kernel: a size k in 1 .. F-1 with probability proportional to
    ``(F - 1) / (k (F - k))``, then k features uniformly (Captum's KernelShap sampling); weight 1 each."""
    sizes = torch.arange(1, features, dtype=torch.float64, device=device)
    probs = (features - 1) / (sizes * (features - sizes))
    size = torch.multinomial(probs, n_samples, replacement=True, generator=generator) + 1
    keys = torch.rand((n_samples, features), generator=generator, device=device)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < size[:, None]


def _exact_coalitions(features: int, n_samples: int) -> bool:
    """Whether :func:`kernel_shap` enumerates every coalition of ``features`` features rather than drawing
    ``n_samples``: when the coalitions other than the empty and the full one number at most ``n_samples``
    (``2**F - 2 <= n_samples``), so the exact answer costs no more forwards than the sampled one.
    """
    return features < 63 and 2**features - 2 <= n_samples


def _all_coalitions(features: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every coalition of ``features`` features but the empty and the full one, (2**F - 2, F) bool, and each one's
    Shapley-kernel weight ``(F - 1) / (C(F, k) k (F - k))`` for its size ``k`` (float64)."""
    codes = torch.arange(1, 2**features - 1, device=device)
    coalitions = (codes[:, None] >> torch.arange(features, device=device)) & 1 == 1
    size = coalitions.sum(dim=1)
    counts = torch.tensor([math.comb(features, k) for k in range(features + 1)], dtype=torch.float64, device=device)
    sizes = size.double()
    return coalitions, (features - 1) / (counts[size] * sizes * (features - sizes))


@register_method(
    "perturbation", "KernelSHAP", stochastic=True,
    cost="n_samples + 2 (130) forwards, no backward",
    reference="Captum KernelShap, same coalitions",
    several_inputs="joint",
)  # fmt: skip
def kernel_shap(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    n_samples: int = 128,
    feature_mask: Tensor | None = None,
    patch_size: int | None = None,
    baseline: Tensor | float = 0.0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """KernelSHAP: Shapley values of the features from a weighted linear regression (Lundberg & Lee 2017).

    Features as in :func:`lime`. ``n_samples`` coalitions are drawn from the
    Shapley kernel (a size ``k`` in 1 .. F-1 with probability proportional to
    ``(F - 1) / (k (F - k))``, then ``k`` features uniformly: Captum's
    sampling, so every drawn coalition has weight 1); features off take the
    ``baseline``, and the same coalitions serve every sample. The regression is
    the shap package's: no free intercept (it is ``f(baseline)``) and the
    constraint that a sample's attributions sum to ``f(x) - f(baseline)``
    (efficiency), which holds exactly; solved in closed form in float64.
    Captum's ``KernelShap`` approximates that constraint with weights of 1e6 on
    the full and the empty coalitions.

    When the features are few, so that their ``2**F - 2`` coalitions other than
    the empty and the full one number at most ``n_samples`` (F <= 7 at the
    default 128), every one of them is evaluated once, weighted by the Shapley
    kernel ``(F - 1) / (C(F, k) k (F - k))`` of its size ``k``, instead of
    drawing: the regression then gives the Shapley values exactly (Lundberg &
    Lee 2017, Theorem 2), whatever the generator, which is not drawn from, at
    ``2**F`` forwards per sample in all.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        n_samples: number of random coalitions; each sample also gets one
            forward with every feature at the baseline. At least ``2**F - 2``:
            every coalition, exactly (see above).
        feature_mask: integer tensor of feature ids 0 .. F-1, broadcastable to
            ``inputs`` (see :func:`lime`).
        patch_size: side of the square patches of the default mask for images;
            default ``ceil(min(H, W) / 4)`` (a 4 x 4 grid, 16 features).
        baseline: the value of features that are off: a scalar or a tensor
            broadcastable to ``inputs``.
        generator: source of the coalitions; pass your own for reproducibility
            and to leave the global RNG untouched (the default draws from it).
        internal_batch_size: at most this many perturbed inputs per forward pass
            (default :data:`PERTURBED_PER_FORWARD`, 64).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``, one value per feature; a sample's
        features sum to ``f(x) - f(baseline)`` for the explained score.

    Raises:
        ValueError: ``n_samples`` is not positive, or ``feature_mask`` has the
            wrong shape, dtype or ids.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> attr = kernel_shap(net, x, 0, n_samples=32, generator=g)
        >>> change = net(x)[:, 0] - net(torch.zeros_like(x))[:, 0]
        >>> torch.allclose(attr.sum(dim=1), change, atol=1e-5)
        True
    """
    check_count("n_samples", n_samples)
    check_generator(generator)
    x = inputs.detach()
    batch = x.shape[0]
    base = _baseline_like(baseline, x)
    mask, features, present = _feature_mask(x, feature_mask, patch_size)
    index, clean = _clean_target(model, x, target, output_transform, task)
    empty = torch.zeros(1, features, dtype=torch.bool, device=x.device)
    null, _ = _perturbed_scores(model, x, base, mask, empty, index, internal_batch_size, output_transform, task)
    change = clean.double() - null[0]  # f(x) - f(baseline), (B,)
    if features == 1:
        return _spread(change[:, None], mask, x, out_dtype(inputs))
    if _exact_coalitions(features, n_samples):  # every coalition once, with its kernel weight: exact Shapley values
        coalitions, kernel = _all_coalitions(features, x.device)
        root = kernel.sqrt()[None, :, None]  # (1, n, 1): weighted least squares as plain least squares
    else:
        coalitions = _shapley_coalitions(n_samples, features, generator, draw_device(generator, x)).to(x.device)
        root = None  # drawn from the kernel: weight 1 each
    scores, _ = _perturbed_scores(model, x, base, mask, coalitions, index, internal_batch_size, output_transform, task)
    # eliminate one present feature per sample (the last) with the constraint sum(phi) = change (shap's solve)
    last = (present * torch.arange(features, device=x.device)).argmax(dim=1)  # (B,)
    design = coalitions.double().unsqueeze(0).expand(batch, -1, -1)  # (B, n, F)
    last_column = torch.gather(design, 2, last[:, None, None].expand(-1, design.shape[1], 1))  # (B, n, 1)
    others = present.clone()
    others[torch.arange(batch, device=x.device), last] = False
    reduced = (design - last_column) * others[:, None, :]
    response = scores.T - null[0][:, None] - last_column[..., 0] * change[:, None]  # (B, n)
    if root is not None:
        reduced, response = reduced * root, response * root[..., 0]
    phi = _least_squares(reduced, response) * others
    phi[torch.arange(batch, device=x.device), last] = change - phi.sum(dim=1)
    return _spread(phi, mask, x, out_dtype(inputs))
