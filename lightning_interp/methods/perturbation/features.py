"""Feature-group perturbations: feature ablation, feature permutation and Shapley value sampling.

The features are those of :func:`~lightning_interp.methods.lime`: square
patches of (B, C, H, W) images (a 4 x 4 grid by default), every element of
other inputs, or the integer groups of a ``feature_mask`` (one mask for the
batch, or one per sample). Each function returns one value per feature,
spread over the feature's elements, in the shape of ``inputs``. Like the
other perturbation methods they only run forward passes under
``torch.no_grad()``, at most ``internal_batch_size`` (default 64) perturbed
inputs per forward, in eval mode with each module's mode restored; the target
is fixed on the clean inputs. Random draws (the batch permutations, the
feature orderings) come from the caller's ``torch.Generator`` only, and one
draw serves the whole batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.batching import (
    check_count,
    check_generator,
    draw_device,
    out_dtype,
    row_chunks,
    row_limit,
)
from lightning_interp.methods.model.core import OutputTransform, Target
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.perturbation.ablation import (
    PERTURBED_PER_FORWARD,
    _baseline_like,
    _clean_target,
    _feature_mask,
    _perturbed_scores,
    _row_scores,
    _spread,
)
from lightning_interp.methods.registry import register_method

__all__ = ["feature_ablation", "feature_permutation", "shapley_value_sampling"]


# --------------------------------------------------------------------------- feature ablation


@register_method(
    "perturbation", "feature\nablation",
    cost="F + 1 forwards (17 for the default 4 x 4 patches), no backward",
    reference="Captum FeatureAblation", several_inputs="joint",
)  # fmt: skip
def feature_ablation(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    feature_mask: Tensor | None = None,
    patch_size: int | None = None,
    baseline: Tensor | float = 0.0,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Feature ablation: the drop of the target score when one feature group at a time takes the baseline.

    Each feature (see the module docstring) is set to ``baseline`` with every
    other feature kept; its attribution is ``score(x) - score(x with it
    ablated)``, on each of its elements: Captum's ``FeatureAblation`` with the
    same ``feature_mask`` (Captum's default mask gives every element its own
    feature; for images ours is a grid of patches, pass ``patch_size=1`` or a
    mask for finer features). A feature missing from a sample's own mask gets 0
    there. Costs one forward for the clean batch and one per feature.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        feature_mask: integer tensor of feature ids 0 .. F-1, broadcastable to
            ``inputs`` (see :func:`~lightning_interp.methods.lime`).
        patch_size: side of the square patches of the default mask for images;
            default ``ceil(min(H, W) / 4)`` (a 4 x 4 grid, 16 features).
        baseline: the value an ablated feature takes: a scalar or a tensor
            broadcastable to ``inputs``.
        internal_batch_size: at most this many perturbed inputs per forward pass
            (default :data:`~lightning_interp.methods.perturbation.ablation.PERTURBED_PER_FORWARD`, 64).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``, one value per feature.

    Raises:
        ValueError: ``feature_mask`` has the wrong shape, dtype or ids, or the
            baseline does not broadcast to the inputs.

    Example:
        >>> linear = nn.Linear(4, 2)
        >>> x = torch.randn(3, 4)
        >>> attr = feature_ablation(linear, x, 1)  # one feature per element by default (not an image)
        >>> torch.allclose(attr, linear.weight[1] * x, atol=1e-6)  # a linear model: w (x - baseline)
        True
    """
    x = inputs.detach()
    base = _baseline_like(baseline, x)
    mask, features, present = _feature_mask(x, feature_mask, patch_size)
    index, clean = _clean_target(model, x, target, output_transform, task)
    ablated = ~torch.eye(features, dtype=torch.bool, device=x.device)  # coalition f: every feature but f
    scores, _ = _perturbed_scores(model, x, base, mask, ablated, index, internal_batch_size, output_transform, task)
    drops = (clean.double()[:, None] - scores.T) * present  # (B, F), score(x) - score(ablated), Captum's order
    return _spread(drops, mask, x, out_dtype(inputs))


# --------------------------------------------------------------------------- feature permutation


def _batch_permutations(features: int, batch: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """(F, B) permutations of the batch, one per feature, none the identity (redrawn as Captum's
    ``_permute_feature`` does), drawn from ``generator`` in feature order; on ``like``'s device."""
    device = draw_device(generator, like)
    identity = torch.arange(batch, device=device)
    rows = []
    for _ in range(features):
        perm = torch.randperm(batch, generator=generator, device=device)
        while bool((perm == identity).all()):
            perm = torch.randperm(batch, generator=generator, device=device)
        rows.append(perm)
    return torch.stack(rows).to(like.device)


@register_method(
    "perturbation", "feature\npermutation", stochastic=True,
    cost="F + 1 forwards (17 for the default 4 x 4 patches), no backward; needs a batch of 2 or more",
    reference="Captum FeaturePermutation, same permutations",
    several_inputs="joint",
)  # fmt: skip
def feature_permutation(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    feature_mask: Tensor | None = None,
    patch_size: int | None = None,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Permutation feature importance: the drop of each sample's target score when one feature is shuffled across
    the batch (Breiman 2001; Fisher et al. 2019).

    For each feature (see the module docstring) one random permutation of the
    batch, never the identity, is drawn from ``generator``; the feature's
    elements of every sample take the values of the sample it is sent to, the
    other features are kept, and the attribution of the feature for sample
    ``i`` is ``score(x_i) - score(x_i with the feature taken from another
    sample)``, on each of its elements: Captum's ``FeaturePermutation`` given
    the same permutations. A sample's explanation depends on the rest of the
    batch by design (the batch is the distribution the values come from), so
    the batch must hold at least two samples, and the mask must be one for the
    whole batch. Costs one forward for the clean batch and one per feature.

    Args:
        model: the network.
        inputs: (B, ...) batch, B >= 2.
        target: class index, LongTensor (B,), or None for the predicted class.
        feature_mask: integer tensor of feature ids 0 .. F-1, broadcastable to
            one input (leading dimension 1 or none: one mask for the batch).
        patch_size: side of the square patches of the default mask for images;
            default ``ceil(min(H, W) / 4)`` (a 4 x 4 grid, 16 features).
        generator: source of the permutations; pass your own for
            reproducibility and to leave the global RNG untouched (the default
            draws from it).
        internal_batch_size: at most this many perturbed inputs per forward pass
            (default :data:`~lightning_interp.methods.perturbation.ablation.PERTURBED_PER_FORWARD`, 64).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``, one value per feature.

    Raises:
        ValueError: the batch holds one sample, ``feature_mask`` is given per
            sample, or it has the wrong shape, dtype or ids.

    Example:
        >>> linear = nn.Linear(3, 2)
        >>> x = torch.randn(2, 3)
        >>> attr = feature_permutation(linear, x, 0, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(attr, linear.weight[0] * (x - x.flip(0)), atol=1e-6)  # two samples: they swap
        True
    """
    check_generator(generator)
    x = inputs.detach()
    batch = x.shape[0]
    if batch < 2:
        raise ValueError(
            f"feature_permutation shuffles each feature across the batch, so it needs at least 2 samples; got a "
            f"batch of {batch}. Explain a larger batch, or use feature_ablation, which replaces a feature by a "
            "baseline instead."
        )
    if feature_mask is not None and feature_mask.ndim == x.ndim and feature_mask.shape[0] != 1:
        raise ValueError(
            f"feature_permutation swaps a feature's elements between samples, so the feature mask must be one for "
            f"the whole batch (leading dimension 1 or none); got a mask of shape {tuple(feature_mask.shape)}."
        )
    mask, features, _ = _feature_mask(x, feature_mask, patch_size)
    index, clean = _clean_target(model, x, target, output_transform, task)
    perms = _batch_permutations(features, batch, generator, x)  # (F, B)
    total = features * batch  # flat rows: feature-major, then sample
    scores = torch.empty(total, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start, end in row_chunks(total, row_limit(internal_batch_size, total, PERTURBED_PER_FORWARD)):
            flat = torch.arange(start, end, device=x.device)
            feature, sample = flat // batch, flat % batch
            chosen = (mask == feature.reshape(-1, *([1] * (x.ndim - 1)))).expand(-1, *x.shape[1:])
            rows = torch.where(chosen, x[perms[feature, sample]], x[sample])
            scores[start:end] = _row_scores(for_rows(model, sample), rows, index[sample], output_transform, task)
    drops = clean.double()[:, None] - scores.reshape(features, batch).T  # (B, F)
    return _spread(drops, mask, x, out_dtype(inputs))


# --------------------------------------------------------------------------- Shapley value sampling


def _exact_shapley(features: int, n_samples: int) -> bool:
    """Whether :func:`shapley_value_sampling` enumerates every coalition rather than sampling ``n_samples`` orderings:
    when the ``2**F - 2`` coalitions other than the empty and the full one cost no more forwards than the orderings'
    ``n_samples * (F - 1)``."""
    return features < 63 and 2**features - 2 <= n_samples * (features - 1)


def _all_subsets(features: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every coalition but the empty and the full one, (2**F - 2, F) bool, and the (2**F, F) float64 matrix ``A``
    with ``phi = v @ A`` for the values ``v`` of [empty, those coalitions, full]: ``A[S, i]`` is the Shapley weight
    ``|S'|! (F - |S'| - 1)! / F!`` of ``S' = S - {i}``, positive where ``i`` is in ``S`` and negative otherwise."""
    codes = torch.arange(2**features, device=device)
    subsets = (codes[:, None] >> torch.arange(features, device=device)) & 1 == 1  # (2**F, F); 0 empty, last full
    size = subsets.sum(dim=1, keepdim=True).double()
    weight = torch.tensor(
        [math.factorial(s) * math.factorial(features - s - 1) / math.factorial(features) for s in range(features)]
        + [0.0],
        dtype=torch.float64,
        device=device,
    )
    with_i = weight[(size - 1).clamp_min(0).long()].expand(-1, features)
    without_i = weight[size.long()].expand(-1, features)
    matrix = torch.where(subsets, with_i, -without_i)
    return subsets[1:-1], matrix


def _orderings(n_samples: int, features: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """(n, F) random orderings of the features (each a ``torch.randperm``), on ``like``'s device."""
    device = draw_device(generator, like)
    return torch.stack([torch.randperm(features, generator=generator, device=device) for _ in range(n_samples)]).to(
        like.device
    )


@register_method(
    "perturbation", "Shapley\nsampling", stochastic=True, run_defaults={"n_samples": 8},
    cost="n_samples * (F - 1) + 2 forwards (377 at 25 orderings of 16 patches; callbacks: 8 orderings, 122), no "
    "backward; every coalition (2**F) when that is no dearer",
    reference="Captum ShapleyValueSampling, same orderings; Captum ShapleyValues when exact",
    several_inputs="joint",
)  # fmt: skip
def shapley_value_sampling(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    n_samples: int = 25,
    feature_mask: Tensor | None = None,
    patch_size: int | None = None,
    baseline: Tensor | float = 0.0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Shapley value sampling: each feature's marginal contribution averaged over random orderings (Castro et al.
    2009; Strumbelj & Kononenko 2010).

    For each of ``n_samples`` orderings of the features (see the module
    docstring), drawn from ``generator`` and shared by the batch, the features
    are switched from the ``baseline`` to the input one at a time in that
    order; a feature's contribution is the change of the target score when it
    is switched on. The attribution is the mean contribution: Captum's
    ``ShapleyValueSampling`` given the same orderings. The contributions of an
    ordering sum to ``f(x) - f(baseline)``, so every estimate is efficient
    exactly, and for an additive model each contribution is the feature's own
    term, whatever the ordering.

    When the features are few, so that their ``2**F - 2`` coalitions other than
    the empty and the full one cost no more forwards than the orderings
    (``2**F - 2 <= n_samples * (F - 1)``: F <= 7 at the default 25), every
    coalition is evaluated once instead and the Shapley values are computed
    exactly, ``phi_i = sum_S |S|! (F - |S| - 1)! / F! (v(S + i) - v(S))``
    (Captum's ``ShapleyValues``, which walks all ``F!`` orderings, gives the
    same numbers); the generator is then not drawn from.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        n_samples: number of random orderings; each costs ``F - 1`` forwards
            per sample (the first and last steps are the baseline and the input).
        feature_mask: integer tensor of feature ids 0 .. F-1, broadcastable to
            ``inputs`` (see :func:`~lightning_interp.methods.lime`).
        patch_size: side of the square patches of the default mask for images;
            default ``ceil(min(H, W) / 4)`` (a 4 x 4 grid, 16 features).
        baseline: the value of features that are off: a scalar or a tensor
            broadcastable to ``inputs``.
        generator: source of the orderings; pass your own for reproducibility
            and to leave the global RNG untouched (the default draws from it).
        internal_batch_size: at most this many perturbed inputs per forward pass
            (default :data:`~lightning_interp.methods.perturbation.ablation.PERTURBED_PER_FORWARD`, 64).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``, one value per feature; a sample's
        features sum to ``f(x) - f(baseline)`` for the explained score.

    Raises:
        ValueError: ``n_samples`` is not positive, or ``feature_mask`` has the
            wrong shape, dtype or ids.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 10)
        >>> attr = shapley_value_sampling(net, x, 0, n_samples=4, generator=torch.Generator().manual_seed(0))
        >>> change = net(x)[:, 0] - net(torch.zeros_like(x))[:, 0]
        >>> torch.allclose(attr.sum(dim=1), change, atol=1e-5)  # efficient at any number of orderings
        True
    """
    check_count("n_samples", n_samples)
    check_generator(generator)
    x = inputs.detach()
    base = _baseline_like(baseline, x)
    mask, features, present = _feature_mask(x, feature_mask, patch_size)
    index, clean = _clean_target(model, x, target, output_transform, task)
    empty = torch.zeros(1, features, dtype=torch.bool, device=x.device)
    null, _ = _perturbed_scores(model, x, base, mask, empty, index, internal_batch_size, output_transform, task)
    null, clean = null[0], clean.double()  # (B,) each
    if features == 1:
        return _spread((clean - null)[:, None], mask, x, out_dtype(inputs))
    if _exact_shapley(features, n_samples):
        subsets, matrix = _all_subsets(features, x.device)
        scores, _ = _perturbed_scores(model, x, base, mask, subsets, index, internal_batch_size, output_transform, task)
        values = torch.cat([null[None], scores, clean[None]])  # (2**F, B)
        phi = values.T @ matrix
    else:
        orders = _orderings(n_samples, features, generator, x)  # (n, F)
        rank = orders.argsort(dim=1)  # each feature's position in each ordering
        steps = torch.arange(1, features, device=x.device)
        coalitions = (rank[:, None, :] < steps[None, :, None]).reshape(-1, features)  # (n * (F - 1), F): first k on
        scores, _ = _perturbed_scores(
            model, x, base, mask, coalitions, index, internal_batch_size, output_transform, task
        )
        batch = x.shape[0]
        path = torch.cat(  # (n, F + 1, B): the score after 0 .. F features are on
            [
                null.expand(n_samples, 1, batch),
                scores.reshape(n_samples, features - 1, batch),
                clean.expand(n_samples, 1, batch),
            ],
            dim=1,
        )
        gains = path[:, 1:] - path[:, :-1]  # (n, F, B): the gain of the k-th feature of each ordering
        phi = torch.zeros(batch, features, dtype=torch.float64, device=x.device)
        phi.index_add_(1, orders.reshape(-1), gains.reshape(-1, batch).T)
        phi = phi / n_samples
    return _spread(phi * present, mask, x, out_dtype(inputs))
