"""Testing with Concept Activation Vectors (TCAV; Kim et al. 2018), in pure torch.

A *concept activation vector* (CAV) of a layer is the normal of a linear
boundary that separates the layer's activations of examples of a concept (say
"striped") from those of random counter-examples. The *TCAV score* of a class
is the share of that class's samples whose class logit increases when the
layer's activation moves along the CAV, i.e. whose directional derivative

.. math::

    S_{C,k,l}(x) = \\nabla_{a_l} f_k(x) \\cdot v_C^l

is positive. A CAV trained against one random set can separate noise, so CAVs
are trained against several random sets and their scores are compared by a
two-sided t-test with those of random-vs-random CAVs: only a concept whose
scores differ significantly from the random ones is meaningful.

Everything runs on the model's device; gradients come from
``torch.autograd.grad`` with respect to captured activations only (never
``.backward()``, ``param.grad`` untouched), every module's mode is restored,
hooks live inside ``try/finally``, randomness is seeded (the global RNG is
untouched), and the functions work under ``torch.no_grad()`` and
``torch.inference_mode()``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    attribution_pass,
    checked_like,
    gradients_enabled,
    resolve_target,
)
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.representation.features import capture_features
from lightning_interp.methods.representation.linear_probes import stratified_split

__all__ = [
    "CAV",
    "TCAVResult",
    "compute_cav",
    "concept_activations",
    "directional_derivatives",
    "disjoint_random_sets",
    "fit_cavs",
    "layer_gradients",
    "tcav_from_activations",
    "tcav_scores",
    "ttest_pvalue",
]


# ---------------------------------------------------------------------------------------------------- t-test
def _betacf(a: Tensor, b: Tensor, x: Tensor, terms: int) -> Tensor:
    """Continued fraction of the regularised incomplete beta function (modified Lentz; Numerical Recipes 6.4), its
    first ``terms`` terms: the caller knows how many its ``a`` and ``b`` need, so nothing is read back to stop early
    (the terms after convergence multiply by 1)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c = torch.ones_like(x)
    d = 1 - qab * x / qap
    d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d).reciprocal()
    h = d.clone()
    for m in range(1, terms + 1):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1 + numerator * d
            d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d).reciprocal()
            c = 1 + numerator / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            h = h * (d * c)
    return h


def _betainc(a: Tensor, b: Tensor, x: Tensor, largest: float) -> Tensor:
    """Regularised incomplete beta ``I_x(a, b)`` in float64 for ``a, b <= largest``: ``torch.special.betainc`` where
    torch has it, else the continued fraction on the side where it converges, with enough terms for ``largest``
    (it needs about ``sqrt(max(a, b))``)."""
    special = getattr(torch.special, "betainc", None)
    if special is not None:
        return special(a, b, x)
    inside = (x > 0) & (x < 1)
    xs = torch.where(inside, x, torch.full_like(x, 0.5))
    log_front = torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b) + a * xs.log() + b * torch.log1p(-xs)
    front = log_front.exp()
    direct = xs < (a + 1) / (a + b + 2)  # the continued fraction converges fast on this side; else use symmetry
    terms = 24 + 6 * math.ceil(math.sqrt(max(largest, 1.0)))
    value = torch.where(
        direct,
        front * _betacf(a, b, xs, terms) / a,
        1 - front * _betacf(b, a, 1 - xs, terms) / b,
    )
    value = torch.where(x <= 0, torch.zeros_like(x), torch.where(x >= 1, torch.ones_like(x), value))
    return torch.where(torch.isnan(x), x, value)


def ttest_pvalue(a: Tensor, b: Tensor, *, equal_var: bool = True) -> Tensor:
    """Two-sided p-value of the independent two-sample t-test of ``a`` against ``b``, along the last dimension.

    ``equal_var=True`` is Student's test with the pooled variance (TCAV's
    choice, and the default of ``scipy.stats.ttest_ind``); ``False`` is
    Welch's test with the Welch-Satterthwaite degrees of freedom. The p-value is

    .. math::

        p = I_{\\nu / (\\nu + t^2)}(\\nu / 2, 1 / 2),

    the regularised incomplete beta function (``torch.special.betainc`` where
    torch has it, else a continued fraction), computed in float64. As in scipy,
    the p-value is NaN when both samples are constant and equal (0 / 0), and 0
    when both are constant but differ.

    Args:
        a: (..., n_a) first sample(s), at least 2 values each.
        b: (..., n_b) second sample(s), at least 2 values each; leading dims broadcast with ``a``'s.
        equal_var: Student's (True) or Welch's (False) test.

    Returns:
        (...) float64 p-values on ``a``'s device.

    Example:
        >>> p = ttest_pvalue(torch.tensor([0.9, 1.0, 0.8, 0.95]), torch.tensor([0.4, 0.6, 0.5, 0.55]))
        >>> round(float(p), 6)
        0.00057
    """
    if a.shape[-1] < 2 or b.shape[-1] < 2:
        raise ValueError(f"A t-test needs at least 2 values in each sample, got {a.shape[-1]} and {b.shape[-1]}.")
    a, b = a.detach().double(), b.detach().to(a.device, torch.float64)
    n_a, n_b = a.shape[-1], b.shape[-1]
    var_a, var_b = a.var(dim=-1), b.var(dim=-1)
    difference = a.mean(dim=-1) - b.mean(dim=-1)
    if equal_var:
        dof = torch.full_like(difference, float(n_a + n_b - 2))
        pooled = ((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2)
        variance = pooled * (1 / n_a + 1 / n_b)
    else:
        share_a, share_b = var_a / n_a, var_b / n_b
        variance = share_a + share_b
        dof = variance.square() / (share_a.square() / (n_a - 1) + share_b.square() / (n_b - 1))
    t = difference / variance.sqrt()
    # x = nu / (nu + t^2) in [0, 1]: 0 for an infinite t (p = 0), NaN for 0 / 0 (p = NaN)
    x = torch.where(torch.isinf(t), torch.zeros_like(t), dof / (dof + t.square()))
    return _betainc(dof / 2, torch.full_like(dof, 0.5), x, largest=(n_a + n_b - 2) / 2)  # Welch's dof is at most


CAV_STEPS = 30
"""Newton steps of each CAV's logistic regression (all of them run: no step depends on a value read back)."""
_LENGTHS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0)


# ---------------------------------------------------------------------------------------------------- CAVs
class CAV(NamedTuple):
    """A concept activation vector and how well its boundary separates held-out examples.

    Attributes:
        vector: (D,) unit vector in the layer's raw (flattened) activation space, pointing from the random
            examples towards the concept.
        accuracy: held-out accuracy of the linear classifier it is the normal of (0.5 is chance for
            balanced sets).
    """

    vector: Tensor
    accuracy: float


def compute_cav(
    concept_acts: Tensor,
    random_acts: Tensor,
    *,
    test_fraction: float = 1 / 3,
    l2: float = 1e-2,
    seed: int = 0,
    max_iter: int = CAV_STEPS,
) -> CAV:
    """The CAV separating a concept's layer activations from random ones, with its held-out accuracy.

    The examples are split once (stratified, a private generator seeded by
    ``seed``; the global RNG is untouched); the activations are standardised
    with the training part's mean and standard deviation and a logistic
    regression (two-class softmax, ``mean cross-entropy + l2 / 2 ||W||^2``, bias
    unpenalised; Newton steps in kernel form, see :func:`fit_cavs`) separates
    concept (1) from random (0). The CAV
    is the normal of that decision boundary expressed in the *raw* activation
    space: with standardised ``z = (a - mu) / sigma`` the boundary ``w . z + b``
    is ``(w / sigma) . a + const``, so the CAV is ``w / sigma``, scaled to unit
    norm (features constant on the training part get 0). The default ``l2 =
    1e-2`` on standardised features (scikit-learn's ``SGDClassifier(alpha=0.01)``
    that the TCAV reference code uses has the same penalty) keeps the fit
    well-posed when features outnumber examples, as they usually do.

    Args:
        concept_acts: (n_c, ...) activations of the concept examples, n_c >= 2; any device.
        random_acts: (n_r, ...) activations of the random counter-examples, n_r >= 2; same device.
        test_fraction: share of each side held out, in (0, 1).
        l2: penalty strength on standardised activations, >= 0.
        seed: seed of the split.
        max_iter: Newton steps of the logistic regression (all of them run).

    Returns:
        :class:`CAV`: the (D,) float32 unit vector on the activations' device (float64 for float64
        activations) and the held-out accuracy.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> concept = torch.randn(20, 3, generator=g) + torch.tensor([6.0, 0.0, 0.0])
        >>> cav = compute_cav(concept, torch.randn(20, 3, generator=g))
        >>> cav.accuracy, bool(cav.vector[0] > 0.9)
        (1.0, True)
    """
    if concept_acts.ndim < 1 or random_acts.ndim < 1 or concept_acts.shape[1:] != random_acts.shape[1:]:
        raise ValueError(
            "concept and random activations must be (n, ...) tensors of the same sample shape, got "
            f"{tuple(concept_acts.shape)} and {tuple(random_acts.shape)}."
        )
    n_c, n_r = concept_acts.shape[0], random_acts.shape[0]
    if n_c < 2 or n_r < 2:
        raise ValueError(
            f"A CAV needs at least 2 concept and 2 random examples (to train and to hold out), got {n_c} and {n_r}."
        )
    if not l2 >= 0 or math.isinf(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
    dtype = torch.float64 if concept_acts.dtype == torch.float64 else torch.float32
    vectors, accuracies = fit_cavs([(concept_acts, random_acts)], [seed], test_fraction=test_fraction, l2=l2)
    accuracy = float(accuracies[0])
    if math.isnan(accuracy):
        raise ValueError("The activations contain NaN or infinite values; no CAV can be fitted.")
    return CAV(vector=vectors[:, 0].to(dtype), accuracy=accuracy)


def fit_cavs(
    pairs: Sequence[tuple[Tensor, Tensor]],
    seeds: Sequence[int],
    *,
    test_fraction: float = 1 / 3,
    l2: float = 1e-2,
    steps: int = CAV_STEPS,
) -> tuple[Tensor, Tensor]:
    """Several CAVs at once, without a device-to-host sync: the (D, M) unit vectors and the (M,) held-out accuracies.

    Each pair ``(concept_acts, random_acts)`` is split with its seed (stratified, see :func:`compute_cav`, which is
    this function for one pair), standardised with its training part's statistics, and separated by an L2 logistic
    regression (mean cross-entropy + l2 / 4 ||normal||^2, the two-class softmax's penalty; bias unpenalised) solved
    by ``steps`` Newton steps in the span of the training examples (kernel form: an (n + 1) x (n + 1) system per CAV,
    n training examples), each step's length chosen on the
    same sizes are fit in one batch. A pair whose activations hold NaN or inf gets a NaN vector and accuracy.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> concept = torch.randn(20, 3, generator=g) + torch.tensor([6.0, 0.0, 0.0])
        >>> vectors, accuracies = fit_cavs([(concept, torch.randn(20, 3, generator=g))] * 2, [0, 1])
        >>> vectors.shape, accuracies.tolist()
        (torch.Size([3, 2]), [1.0, 1.0])
    """
    if len(pairs) != len(seeds) or not pairs:
        raise ValueError(f"fit_cavs needs one seed per pair and at least one pair, got {len(pairs)} and {len(seeds)}.")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (concept, other) in enumerate(pairs):
        groups.setdefault((concept.shape[0], other.shape[0]), []).append(index)
    vectors: list[Tensor | None] = [None] * len(pairs)
    accuracies: list[Tensor | None] = [None] * len(pairs)
    with torch.inference_mode(False), torch.no_grad():
        for members in groups.values():
            batch_vectors, batch_accuracies = _fit_cav_batch(
                [pairs[i] for i in members], [seeds[i] for i in members], test_fraction, l2, steps
            )
            for position, index in enumerate(members):
                vectors[index], accuracies[index] = batch_vectors[position], batch_accuracies[position]
        return torch.stack(vectors, dim=1), torch.stack(accuracies)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _cav_split(n_concept: int, n_random: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The stratified split of ``n_concept`` concept (1) and ``n_random`` random (0) examples, made once."""
    labels = torch.cat([torch.ones(n_concept, dtype=torch.long), torch.zeros(n_random, dtype=torch.long)])
    return stratified_split(labels, test_fraction, seed=seed)


def _fit_cav_batch(
    pairs: Sequence[tuple[Tensor, Tensor]], seeds: Sequence[int], test_fraction: float, l2: float, steps: int
) -> tuple[Tensor, Tensor]:
    """:func:`fit_cavs` for pairs of the same sizes: (M, D) vectors and (M,) accuracies, float64."""
    n_c, n_r = pairs[0][0].shape[0], pairs[0][1].shape[0]
    if n_c < 2 or n_r < 2:
        raise ValueError(
            f"A CAV needs at least 2 concept and 2 random examples (to train and to hold out), got {n_c} and {n_r}."
        )
    device = pairs[0][0].device
    flat = torch.stack(
        [torch.cat([c.detach().reshape(n_c, -1), r.detach().to(device).reshape(n_r, -1)]) for c, r in pairs]
    ).to(torch.float64)  # (M, n, D)
    splits = [_cav_split(n_c, n_r, test_fraction, seed) for seed in seeds]
    train = torch.stack([train for train, _ in splits]).to(device)  # (M, n_train)
    test = torch.stack([test for _, test in splits]).to(device)
    labels = torch.cat([torch.ones(n_c), torch.zeros(n_r)]).to(device, torch.float64)
    rows = torch.arange(len(pairs), device=device)[:, None]
    x_train, x_test = flat[rows, train], flat[rows, test]
    y_train, y_test = labels[train], labels[test]
    mean = x_train.mean(dim=1, keepdim=True)
    std = (x_train - mean).square().mean(dim=1, keepdim=True).sqrt()
    scale = torch.where(std > 0, std, 1).reciprocal()
    x_train, x_test = (x_train - mean) * scale, (x_test - mean) * scale
    kernel, cross = x_train @ x_train.mT, x_test @ x_train.mT
    coefficients, bias = _kernel_logistic(kernel, y_train, l2 / 2, steps)  # l2/4 ||normal||^2 = (l2/2) / 2 ||.||^2
    accuracy = (((cross @ coefficients[..., None])[..., 0] + bias[:, None] > 0).double() == y_test).double().mean(1)
    normal = (x_train.mT @ coefficients[..., None])[..., 0]  # (M, D) in standardised units
    vector = torch.where(std[:, 0] > 0, normal * scale[:, 0], 0)  # back to the raw activations: w / sigma
    norm = vector.norm(dim=1, keepdim=True)
    vector = torch.where(norm > 0, vector / torch.where(norm > 0, norm, 1), vector)
    finite = torch.isfinite(flat).flatten(1).all(dim=1)  # NaN or inf activations: NaN, never a made-up CAV
    nan = torch.full((), float("nan"), dtype=vector.dtype, device=vector.device)
    return torch.where(finite[:, None], vector, nan), torch.where(finite, accuracy, nan)


def _kernel_logistic(kernel: Tensor, y: Tensor, penalty: float, steps: int) -> tuple[Tensor, Tensor]:
    """Binary logistic regression ``mean CE(K a + b) + penalty / 2 a^T K a`` by Newton steps in the kernel form.

    With ``w = X^T a`` the Newton system for ``(w, b)`` is solved by ``(D K / n + penalty I) da + D 1 db / n =
    r / n + penalty a`` and ``1^T D K da / n + 1^T D 1 db / n = 1^T r / n`` (``r`` the residuals, ``D`` the
    curvatures), an (n + 1) x (n + 1) system per CAV; each step's length is the best of ``_LENGTHS`` (losses of all
    at once, chosen on the device). Returns ``a`` (M, n) and ``b`` (M,).
    """
    batch, n = y.shape
    coefficients = kernel.new_zeros(batch, n)
    bias = kernel.new_zeros(batch)
    identity = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    lengths = torch.tensor(_LENGTHS, dtype=kernel.dtype, device=kernel.device)
    logits = kernel.new_zeros(batch, n)
    for _ in range(steps):
        probabilities = torch.sigmoid(logits)
        residual = probabilities - y
        curvature = (probabilities * (1 - probabilities)).clamp_min(1e-12)
        top = torch.cat([curvature[..., None] * kernel / n + penalty * identity, curvature[..., None] / n], dim=2)
        bottom = torch.cat([(curvature[:, None, :] @ kernel) / n, curvature.sum(1)[:, None, None] / n], dim=2)
        system = torch.cat([top, bottom], dim=1)  # (M, n + 1, n + 1)
        rhs = torch.cat([residual / n + penalty * coefficients, residual.mean(1, keepdim=True)], dim=1)
        step = torch.linalg.solve_ex(system, rhs[..., None])[0][..., 0]
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        step_coefficients, step_bias = step[:, :n], step[:, n]
        step_logits = (kernel @ step_coefficients[..., None])[..., 0] + step_bias[:, None]
        candidates = logits[:, None] - lengths[None, :, None] * step_logits[:, None]  # (M, T, n)
        cross_entropy = (torch.nn.functional.softplus(candidates) - y[:, None] * candidates).mean(-1)
        moved = coefficients[:, None] - lengths[None, :, None] * step_coefficients[:, None]  # (M, T, n)
        quadratic = (moved * (moved @ kernel)).sum(-1)  # a^T K a of each candidate
        loss = torch.nan_to_num(cross_entropy + 0.5 * penalty * quadratic, nan=float("inf"))
        length = lengths[loss.argmin(dim=1)]
        coefficients = coefficients - length[:, None] * step_coefficients
        bias = bias - length * step_bias
        logits = logits - length[:, None] * step_logits
    return coefficients, bias


# ---------------------------------------------------------------------------------------------------- gradients
def layer_gradients(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str | nn.Module],
    target: Target,
    *,
    batch_size: int = 64,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's flattened activations and the gradient of the target score with respect to them.

    One forward and one ``torch.autograd.grad`` per chunk of ``batch_size``
    samples, for all layers at once (see
    :func:`~lightning_interp.methods.attribution_pass`: eval mode,
    modes restored, hooks removed, ``param.grad`` untouched).

    Args:
        model: the network, called as ``model(inputs)``.
        inputs: (B, ...) samples on the model's device.
        layers: dotted names or modules.
        target: class index, (B,) LongTensor, or None for the predicted class.
        batch_size: samples per pass.
        output_transform: maps the model output to (B, C) scores.
        task: the output kind (``"binary"`` for one logit: target 0 differentiates its negative).

    Returns:
        ``(activations, gradients)``: per layer a (B, D) float32 tensor each, on the model's device.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> acts, grads = layer_gradients(net, torch.randn(5, 3), ["1"], 0)
        >>> acts[0].shape, grads[0].shape
        (torch.Size([5, 4]), torch.Size([5, 4]))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    count = inputs.shape[0]
    if isinstance(target, Tensor) and target.numel() == count and count > 1:
        target = target.reshape(-1)
    acts: list[list[Tensor]] = [[] for _ in layers]
    grads: list[list[Tensor]] = [[] for _ in layers]
    checked: Tensor | None = None  # the whole target, checked once after the first chunk gave the scores' width
    for start in range(0, count, batch_size):
        chunk_target = target[start : start + batch_size] if isinstance(target, Tensor) and target.ndim else target
        if checked is not None:
            chunk_target = checked_like(checked, checked[start : start + batch_size])
        result = attribution_pass(
            for_rows(model, slice(start, start + batch_size)) if count > batch_size else model,
            inputs[start : start + batch_size],
            chunk_target,
            layers=list(layers),
            input_gradient=False,
            output_transform=output_transform,
            task=task,
        )
        if checked is None and isinstance(target, Tensor) and target.numel() == count and count > batch_size:
            stand_in = torch.empty((), device=result.scores.device).expand(count, result.scores.shape[1])
            checked = resolve_target(target, stand_in, task)  # one check for every later chunk, not one each
        for slot, (act, grad) in enumerate(zip(result.activations, result.activation_grads, strict=True)):
            acts[slot].append(act.reshape(act.shape[0], -1).float())
            grads[slot].append(grad.reshape(grad.shape[0], -1).float())
    return [torch.cat(parts) for parts in acts], [torch.cat(parts) for parts in grads]


def directional_derivatives(
    model: nn.Module,
    inputs: Tensor,
    layer: str | nn.Module,
    cav: Tensor | CAV,
    target: Target = None,
    *,
    batch_size: int = 64,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """The derivative of each sample's target score along the CAV at ``layer``: ``grad_a f_k(x) . v``.

    Args:
        model: the network, called as ``model(inputs)``.
        inputs: (B, ...) samples on the model's device.
        layer: dotted name or module whose output the CAV lives in.
        cav: (D,) vector (or a :class:`CAV`) in the layer's flattened output space.
        target: class index, (B,) LongTensor, or None for the predicted class.
        batch_size: samples per pass.
        output_transform: maps the model output to (B, C) scores.
        task: the output kind, see :func:`layer_gradients`.

    Returns:
        (B,) float32 directional derivatives on the model's device; TCAV counts the positive ones.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Identity())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(2))
        >>> directional_derivatives(net, torch.randn(3, 2), "1", torch.tensor([1.0, 0.0]), target=0)
        tensor([1., 1., 1.])
    """
    vector = cav.vector if isinstance(cav, CAV) else cav
    _, grads = layer_gradients(
        model, inputs, [layer], target, batch_size=batch_size, output_transform=output_transform, task=task
    )
    gradient = grads[0]
    if vector.numel() != gradient.shape[1]:
        raise ValueError(
            f"The CAV has {vector.numel()} entries but layer {layer!r} outputs {gradient.shape[1]} values per sample: "
            "a CAV must come from the same layer's activations."
        )
    with torch.inference_mode(False):
        return gradient @ vector.detach().to(gradient.device, torch.float32).reshape(-1)


def concept_activations(
    model: nn.Module, examples: Tensor, layers: Sequence[str | nn.Module], *, batch_size: int = 64
) -> list[Tensor]:
    """Each layer's flattened (unpooled) output on ``examples``: (N, D) float32 per layer, on the model's device.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> concept_activations(net, torch.randn(4, 1, 5, 5), ["1"])[0].shape
        torch.Size([4, 18])
    """
    features = capture_features(model, examples, list(layers), batch_size=batch_size, max_features=None)
    return list(features.values())  # in the order of ``layers``


# ---------------------------------------------------------------------------------------------------- TCAV
@dataclass(frozen=True)
class TCAVResult:
    """TCAV of one concept at one layer.

    Attributes:
        classes: the class indices the columns stand for.
        scores: (R, K) TCAV score of the CAV against random set i (rows) for each class (columns): the share of
            the class's samples with a positive directional derivative; NaN for a class without samples.
        random_scores: (R, K) the same for the random-vs-random CAVs (the null distribution).
        p_values: (K,) two-sided t-test p-values of ``scores`` against ``random_scores`` per class: 1 where every
            score of both is the same value (no difference at all; the t statistic would be 0 / 0), NaN for a
            class without samples.
        accuracies: (R,) held-out accuracies of the concept CAVs.
        random_accuracies: (R,) held-out accuracies of the random-vs-random CAVs.
    """

    classes: tuple[int, ...]
    scores: Tensor
    random_scores: Tensor
    p_values: Tensor
    accuracies: Tensor
    random_accuracies: Tensor

    @property
    def mean_scores(self) -> Tensor:
        """(K,) TCAV score per class, the mean over the random runs."""
        return self.scores.mean(dim=0)

    @property
    def accuracy(self) -> float:
        """Mean held-out accuracy of the concept CAVs."""
        return float(self.accuracies.mean())


def _sign_scores(gradients: Tensor, vectors: Tensor, labels: Tensor, classes: Sequence[int]) -> Tensor:
    """(M, K) share of each class's rows of ``gradients`` (N, D) with a positive derivative along each of the
    (D, M) ``vectors``."""
    positive = (gradients @ vectors > 0).double()  # (N, M)
    members = torch.stack([labels == k for k in classes], dim=1).double()  # (N, K)
    counts = members.sum(dim=0)
    shares = positive.T @ members / counts  # 0 / 0 = NaN for a class without samples
    return shares.float()


def disjoint_random_sets(pool: int, count: int, size: int, *, seed: int = 0) -> Tensor:
    """Indices of ``count`` disjoint random sets of ``size`` samples each from ``range(pool)``: one permutation from
    a private generator (the global RNG untouched), cut in pieces.

    Args:
        pool: number of samples to draw from.
        count: number of sets (``2 * n_random`` for TCAV).
        size: samples per set.
        seed: seed of the generator.

    Returns:
        (count, size) LongTensor; no index appears twice.

    Example:
        >>> sets = disjoint_random_sets(10, 2, 4)
        >>> sets.shape, len(set(sets.flatten().tolist()))
        (torch.Size([2, 4]), 8)
    """
    if count < 1 or size < 1 or count * size > pool:
        raise ValueError(
            f"{count} disjoint sets of {size} need {count * size} samples, the pool holds {pool}: "
            "give more samples or ask for fewer or smaller sets."
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(pool, generator=generator)[: count * size].reshape(count, size)


def tcav_from_activations(
    concept_acts: Mapping[str, Tensor],
    random_acts: Sequence[Tensor],
    gradients: Tensor,
    labels: Tensor,
    classes: Sequence[int],
    *,
    test_fraction: float = 1 / 3,
    l2: float = 1e-2,
    seed: int = 0,
    max_iter: int = CAV_STEPS,
    equal_var: bool = True,
) -> dict[str, TCAVResult]:
    """TCAV of several concepts at one layer from activations and target-logit gradients already computed.

    ``random_acts`` holds 2R random sets: each concept gets one CAV against each
    of the first R (its R runs), and the null distribution comes from R
    random-vs-random CAVs, set ``R + i`` against set ``i``, shared by all
    concepts. CAV i (concept or random) is split with seed ``seed + i``.

    The null CAVs use independent random "concepts" rather than one fixed random
    set against all others (the TCAV reference code's and Captum's recipe): with
    one fixed set every null CAV shares that set's sampling noise, so the null
    scores cluster around an arbitrary value and random concepts come out
    "significant" more often than the nominal rate. The sets must not overlap
    (see :func:`disjoint_random_sets`); overlapping sets make null CAVs of nearly
    the same points and the test flags random concepts about half the time.

    Calibration, measured on random "concepts" (the null hypothesis true) at a
    ReLU layer of a small MLP, share of class tests at p < 0.05: 5% with 2 x 10
    disjoint sets of 12 from a 256-sample pool (ConceptCallback's defaults),
    12% with 40-example sets, 32% with one fixed random set (the reference
    recipe). The t-test treats the R runs as independent although they share the
    concept's examples, so it can be anti-conservative: read p-values together
    with the CAV accuracy and with how the score holds over epochs
    (``tests/methods/test_concepts.py`` checks the default case).

    Args:
        concept_acts: concept name -> (n_c, D) layer activations of its examples.
        random_acts: 2R >= 4 tensors (n_r, D) of random counter-examples' activations.
        gradients: (N, D) gradient of each sample's class score with respect to the layer's activation
            (the class of its label; see :func:`layer_gradients`).
        labels: (N,) class index of each row of ``gradients``.
        classes: the classes to score.
        test_fraction: share of each side held out to score a CAV, see :func:`compute_cav`.
        l2: penalty of the CAV classifier, see :func:`compute_cav`.
        seed: base seed of the CAV splits.
        max_iter: Newton steps per CAV (all of them run).
        equal_var: Student's (True) or Welch's (False) t-test.

    Returns:
        concept name -> :class:`TCAVResult`.

    Example:
        >>> grads = torch.tensor([[1.0, 0.0]]).repeat(6, 1)
        >>> randoms = [torch.randn(8, 2, generator=torch.Generator().manual_seed(i)) for i in range(6)]
        >>> concept = torch.randn(8, 2, generator=torch.Generator().manual_seed(9)) + torch.tensor([5.0, 0.0])
        >>> out = tcav_from_activations({"c": concept}, randoms, grads, torch.zeros(6, dtype=torch.long), [0])
        >>> out["c"].mean_scores.tolist(), out["c"].scores.shape
        ([1.0], torch.Size([3, 1]))
    """
    if len(random_acts) < 4 or len(random_acts) % 2:
        raise ValueError(
            "TCAV needs an even number of random sets, at least 4: the first half pairs with the concept "
            "(one CAV each, at least 2 for the t-test), the second half with the first for the null CAVs; got "
            f"{len(random_acts)}."
        )
    if gradients.ndim != 2 or labels.shape != (gradients.shape[0],):
        raise ValueError(
            f"gradients must be (N, D) and labels (N,), got {tuple(gradients.shape)} and {tuple(labels.shape)}."
        )
    if not classes:
        raise ValueError("classes must name at least one class to score.")
    common = {"test_fraction": test_fraction, "l2": l2, "steps": max_iter}
    with torch.inference_mode(False):
        device = gradients.device
        labels = labels.to(device)
        half = len(random_acts) // 2
        counterparts, null_concepts = list(random_acts[:half]), list(random_acts[half:])

        def runs(sides: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
            vectors, accuracy = fit_cavs(  # all of them at once, nothing read back
                list(zip(sides, counterparts, strict=True)), [seed + i for i in range(len(sides))], **common
            )
            return _sign_scores(gradients, vectors.to(device, gradients.dtype), labels, classes), accuracy

        random_scores, random_accuracies = runs(null_concepts)
        results = {}
        for name, acts in concept_acts.items():
            scores, accuracies = runs([acts] * half)
            p_values = ttest_pvalue(scores.T, random_scores.T, equal_var=equal_var)
            # every score of both groups the same value: the t statistic is 0 / 0, but there is no difference at
            # all (a permutation test gives exactly 1)
            both = torch.cat([scores, random_scores]).double()
            same = (both == both[:1]).all(dim=0).to(p_values.device)
            p_values = torch.where(same, torch.ones_like(p_values), p_values)
            results[name] = TCAVResult(
                classes=tuple(int(k) for k in classes),
                scores=scores,
                random_scores=random_scores,
                p_values=p_values,
                accuracies=accuracies,
                random_accuracies=random_accuracies,
            )
    return results


def tcav_scores(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    layer: str | nn.Module,
    concept_examples: Tensor,
    random_sets: Sequence[Tensor],
    *,
    classes: Sequence[int] | None = None,
    test_fraction: float = 1 / 3,
    l2: float = 1e-2,
    seed: int = 0,
    max_iter: int = CAV_STEPS,
    equal_var: bool = True,
    batch_size: int = 64,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> TCAVResult:
    """TCAV of one concept at one layer of ``model``: scores per class, their p-values, the CAVs' accuracies.

    The layer's flattened activations of the concept examples and of each
    random set come from no-grad forward passes; the gradient of each input's
    own class score (the class of its label) with respect to the layer's
    activation from one forward and one ``torch.autograd.grad``; then
    :func:`tcav_from_activations`: one CAV (:func:`compute_cav`) against each of
    the first half of ``random_sets``, the null distribution from the second half
    against the first, and a two-sided t-test per class (:func:`ttest_pvalue`).

    Args:
        model: the network, called as ``model(inputs)``; everything runs on its device.
        inputs: (N, ...) samples to score (on the model's device).
        labels: (N,) class index of each sample.
        layer: dotted name or module.
        concept_examples: (n_c, ...) inputs showing the concept, like ``inputs``.
        random_sets: 2R >= 4 tensors (n_r, ...) of random counter-example inputs (R runs).
        classes: classes to score; None for every class among ``labels``.
        test_fraction: share of each side held out to score a CAV, see :func:`compute_cav`.
        l2: penalty of the CAV classifier, see :func:`compute_cav`.
        max_iter: Newton steps per CAV (all of them run).
        seed: base seed of the CAV splits.
        equal_var: Student's (True) or Welch's (False) t-test.
        batch_size: samples per forward pass.
        output_transform: maps the model output to (B, C) scores.
        task: the output kind, see :func:`layer_gradients`.

    Returns:
        :class:`TCAVResult`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x, y = torch.randn(12, 4, generator=g), torch.arange(12) % 2
        >>> randoms = [torch.randn(8, 4, generator=g) for _ in range(6)]
        >>> result = tcav_scores(net, x, y, "1", torch.randn(8, 4, generator=g) + 3, randoms)
        >>> result.scores.shape, result.p_values.shape
        (torch.Size([3, 2]), torch.Size([2]))
    """
    labels = labels.reshape(-1)
    if labels.numel() != inputs.shape[0]:
        raise ValueError(f"labels must have one entry per input ({inputs.shape[0]}), got {tuple(labels.shape)}.")
    if classes is None:
        classes = [int(k) for k in labels.unique().tolist()]
    device = next((p.device for p in model.parameters()), inputs.device)
    inputs = inputs.to(device)
    labels = labels.to(device, torch.long)
    _, grads = layer_gradients(
        model, inputs, [layer], labels, batch_size=batch_size, output_transform=output_transform, task=task
    )
    with gradients_enabled():  # plain tensors even under inference_mode
        examples = [concept_examples.to(device), *(part.to(device) for part in random_sets)]
        sizes = [part.shape[0] for part in examples]
        acts = concept_activations(model, torch.cat(examples), [layer], batch_size=batch_size)[0].split(sizes)
    result = tcav_from_activations(
        {"concept": acts[0]},
        list(acts[1:]),
        grads[0],
        labels,
        classes,
        test_fraction=test_fraction,
        l2=l2,
        seed=seed,
        max_iter=max_iter,
        equal_var=equal_var,
    )
    return result["concept"]
