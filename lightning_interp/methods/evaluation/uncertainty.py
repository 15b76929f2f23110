"""Predictive uncertainty and calibration: MC dropout, entropies, ECE, reliability curves, temperature, Dirichlet.

MC dropout (Gal & Ghahramani 2016) runs ``S`` stochastic forward passes with
only the dropout layers active and treats the ``S`` softmax outputs as samples
of the predictive distribution. With ``p̄ = mean_s p_s`` and the entropy
``H(p) = -Σ_k p_k log p_k`` (natural log, ``0 log 0 = 0``), the total
(predictive) uncertainty splits into an aleatoric and an epistemic part:

``H(p̄) = E_s[H(p_s)] + I``, where ``I >= 0`` is the mutual information between
the prediction and the weights (Depeweg et al. 2018; Smith & Gal 2018).

Calibration: the expected calibration error (Naeini et al. 2015; Guo et al.
2017) through torchmetrics, the reliability curve behind it, and temperature
scaling (Guo et al. 2017). Evidential outputs (Sensoy et al. 2018):
:func:`dirichlet_uncertainty`. Everything here is pure torch; the global RNG is
never used and every module's mode is restored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from lightning_interp.methods.evaluation.map_metrics import attribution_to_map, rank_correlation
from lightning_interp.methods.model.core import (
    DROPOUT_TYPES,
    OutputTransform,
    Target,
    dropout_active,
    eager_forward,
    modes_preserved,
    scores_from_output,
)
from lightning_interp.methods.model.inputs import for_rows

if TYPE_CHECKING:
    from lightning_interp.methods.explain import Explainer

__all__ = [
    "DROPOUT_TYPES",
    "dirichlet_uncertainty",
    "expected_calibration_error",
    "expected_entropy",
    "fit_temperature",
    "map_agreement",
    "mc_dropout_maps",
    "mc_dropout_predictions",
    "mutual_information",
    "predictive_entropy",
    "reliability_curve",
    "temperature_steps",
    "temperature_warning",
]

_PROB_ATOL = 1e-3  # how far a row of probabilities may be from summing to 1 (float16 / bfloat16 softmax included)


# --------------------------------------------------------------------------------------------------------------------
# MC dropout
# --------------------------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module, inputs: Tensor) -> torch.device:
    return next((p.device for p in model.parameters()), inputs.device)


@contextmanager
def _private_rng(model: nn.Module, device: torch.device, seed: int) -> Iterator[None]:
    """Fork the CPU RNG and that of every CUDA device the model lives on, seed them with ``seed``, restore on exit.

    Only the forked generators are seeded (not ``torch.manual_seed``, which would
    reseed every CUDA device, including ones the fork does not restore).
    """
    cuda = sorted(
        {t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}
        | ({device.index or 0} if device.type == "cuda" else set())
    )
    if device.type not in ("cpu", "cuda"):  # another accelerator (mps, xpu, ...): fork and seed its one generator
        with torch.random.fork_rng(devices=[device.index or 0], device_type=device.type):
            torch.manual_seed(seed)
            yield
        return
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def mc_dropout_predictions(
    model: nn.Module,
    inputs: Tensor,
    n_samples: int = 16,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    output_transform: OutputTransform | None = None,
) -> Tensor:
    """Monte Carlo dropout: ``n_samples`` stochastic forward passes, as (n_samples, N, K) softmax probabilities.

    Only the dropout modules (:data:`DROPOUT_TYPES`) are put in train mode;
    every other module runs in eval mode (BatchNorm uses and keeps its running
    statistics), and every module's ``training`` flag is restored afterwards,
    also when the forward raises. The passes run under ``torch.no_grad()``.

    Randomness: a seed is drawn from ``generator`` (a fixed-seed private one if
    None, so two calls without a generator agree), and the passes run inside
    ``torch.random.fork_rng`` over the CPU and the model's CUDA devices, whose
    generators are seeded with it; on exit their states are restored, so the
    global CPU and CUDA RNG are exactly as before. The same generator state
    gives the same samples on the same device and batch size.

    A binary model (one logit per sample) gives (n_samples, N, 2)
    probabilities ``[1 - p, p]`` with ``p = sigmoid(logit)``. Dropout written as
    ``F.dropout(x, training=self.training)`` inside another module, or skipped
    by a fused path (``nn.TransformerEncoderLayer`` in eval mode), stays off:
    if all samples come out identical although a dropout layer has ``p > 0``,
    a warning says so.

    Args:
        model: the network, called as ``model(chunk)``.
        inputs: (N, ...) samples, on any device (moved to the model's).
        n_samples: stochastic passes, >= 1.
        generator: source of the seed; never advanced by anything else.
        batch_size: samples per forward pass.
        output_transform: maps the model output to (B, K) logits.

    Returns:
        (n_samples, N, K) float32 probabilities on the model's device (K = 2 for a one-logit model).

    Raises:
        ValueError: the model has no dropout module, or an argument is out of range.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        >>> probs = mc_dropout_predictions(net, torch.randn(5, 4), 8, generator=torch.Generator().manual_seed(0))
        >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(8, 5)))
        (torch.Size([8, 5, 3]), True)
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError("mc_dropout_predictions needs at least one input sample, (N, ...).")
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    if not dropouts:
        raise ValueError(
            f"MC dropout needs dropout layers, but {type(model).__name__} has no module of type "
            f"{', '.join(t.__name__ for t in DROPOUT_TYPES)}. Add one (e.g. nn.Dropout(0.1) before the classifier) "
            "or estimate the uncertainty another way (an ensemble, predictive_entropy of a single softmax)."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    device = _model_device(model, inputs)
    samples: list[Tensor] = []
    with dropout_active(), modes_preserved(model), eager_forward(), _private_rng(model, device, seed):
        for _ in range(n_samples):
            parts = []
            for start in range(0, inputs.shape[0], batch_size):
                chunk = inputs[start : start + batch_size].to(device)
                bound = for_rows(model, slice(start, start + batch_size)) if chunk.shape[0] < inputs.shape[0] else model
                scores = scores_from_output(bound(chunk), output_transform).float()
                if scores.shape[1] == 1:
                    positive = torch.sigmoid(scores)
                    parts.append(torch.cat([1 - positive, positive], dim=1))
                else:
                    parts.append(torch.softmax(scores, dim=1))
            samples.append(torch.cat(parts))
    probs = torch.stack(samples)
    if not bool(torch.isfinite(probs).all()):
        warnings.warn(
            "mc_dropout_predictions: the model produced non-finite scores (NaN or inf), so some probabilities are "
            "NaN; check the inputs and the weights.",
            stacklevel=2,
        )
    if n_samples > 1 and bool((probs == probs[:1]).all()):
        if all(float(getattr(m, "p", 0.0)) == 0.0 for m in dropouts):
            cause = "every dropout layer has p=0"
        else:
            cause = (
                "no dropout layer changed the output: the dropout modules are not called in forward(), dropout is "
                "applied functionally with another module's training flag, or a fused eval path skips it "
                "(nn.TransformerEncoderLayer / nn.MultiheadAttention)"
            )
        warnings.warn(
            f"mc_dropout_predictions: all {n_samples} samples are identical ({cause}); the epistemic uncertainty "
            "(mutual_information) is 0 by construction, not because the model is certain.",
            stacklevel=2,
        )
    return probs


# --------------------------------------------------------------------------------------------------------------------
# Entropies
# --------------------------------------------------------------------------------------------------------------------


def _check_probs(probs: Tensor, name: str = "probs") -> Tensor:
    """Raise unless ``probs`` holds probability vectors on its last axis; return it detached."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {type(probs).__name__}.")
    probs = probs.detach()
    if probs.numel() == 0:
        raise ValueError(f"{name} is empty: {tuple(probs.shape)}.")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} contains NaN or inf; the uncertainty of such a prediction is undefined.")
    sums = probs.sum(dim=-1)
    if bool((probs < -_PROB_ATOL).any()) or not bool(((sums - 1).abs() <= _PROB_ATOL * probs.shape[-1]).all()):
        raise ValueError(
            f"{name} must be probabilities (non-negative, summing to 1 over the last axis); these look like logits "
            f"(sums from {float(sums.min()):.4g} to {float(sums.max()):.4g}). Apply torch.softmax(logits, dim=-1) "
            "first."
        )
    return probs


def _entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis, with 0 log 0 = 0."""
    return torch.special.entr(probs.clamp(min=0)).sum(dim=-1) + 0.0  # + 0.0 turns -0.0 (entr(1)) into 0.0


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy of the mean prediction, the total uncertainty: ``H(mean_s p_s)`` in nats.

    .. math::

        \\mathbb{H}[\\bar p] = -\\sum_k \\bar p_k \\log \\bar p_k, \\qquad \\bar p = \\frac{1}{S} \\sum_s p_s

    Args:
        probs: (S, N, K) samples (as :func:`mc_dropout_predictions` gives them) or one (N, K) prediction.

    Returns:
        (N,) entropies in [0, log K]; ``0 log 0`` counts as 0.

    Example:
        >>> predictive_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    probs = _check_probs(probs)
    if probs.ndim == 3:
        probs = probs.mean(dim=0)
    elif probs.ndim != 2:
        raise ValueError(f"probs must have shape (S, N, K) or (N, K), got {tuple(probs.shape)}.")
    return _entropy(probs)


def _check_samples(probs: Tensor) -> Tensor:
    probs = _check_probs(probs)
    if probs.ndim != 3:
        raise ValueError(
            f"probs must have shape (S, N, K): S stochastic samples of N predictions, got {tuple(probs.shape)}. "
            "For a single prediction use predictive_entropy; for several, stack them (torch.stack)."
        )
    return probs


def expected_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of the individual samples, the aleatoric part: ``mean_s H(p_s)`` in nats.

    Args:
        probs: (S, N, K) samples.

    Returns:
        (N,) expected entropies.

    Example:
        >>> samples = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident samples that disagree
        >>> expected_entropy(samples), predictive_entropy(samples)
        (tensor([0.]), tensor([0.6931]))
    """
    return _entropy(_check_samples(probs)).mean(dim=0)


def mutual_information(probs: Tensor) -> Tensor:
    """Mutual information between prediction and weights, the epistemic part (BALD score).

    .. math::

        I = \\mathbb{H}[\\bar p] - \\frac{1}{S} \\sum_s \\mathbb{H}[p_s] \\ge 0

    Clamped at 0 (rounding can make the difference slightly negative).

    Args:
        probs: (S, N, K) samples.

    Returns:
        (N,) mutual information in nats, in [0, log K].

    Example:
        >>> samples = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
        >>> mutual_information(samples)
        tensor([0.6931, 0.0000])
    """
    probs = _check_samples(probs)
    return (_entropy(probs.mean(dim=0)) - _entropy(probs).mean(dim=0)).clamp(min=0)


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------


def _calibration_inputs(probs: Tensor, labels: Tensor, from_logits: bool) -> tuple[Tensor, Tensor, bool]:
    """float32 probabilities ((N,) binary or (N, K)), long labels on their device, and whether binary."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor, got {type(probs).__name__}.")
    if probs.ndim == 3:
        raise ValueError(
            f"Got (S, N, K) = {tuple(probs.shape)} samples; calibration needs one prediction per sample: pass "
            "probs.mean(dim=0) (the MC dropout predictive distribution)."
        )
    binary = probs.ndim == 1 or (probs.ndim == 2 and probs.shape[1] == 1)
    if probs.ndim not in (1, 2) or probs.shape[0] == 0:
        raise ValueError(
            f"probs must have shape (N, K) or (N,) / (N, 1) for binary, with N >= 1, got {tuple(probs.shape)}."
        )
    p = probs.detach().float().reshape(-1) if binary else probs.detach().float()
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs contains NaN or inf; the calibration error would be NaN.")
    if from_logits:
        p = torch.sigmoid(p) if binary else torch.softmax(p, dim=1)
    elif binary:
        if bool(((p < -_PROB_ATOL) | (p > 1 + _PROB_ATOL)).any()):
            raise ValueError("Binary probs must lie in [0, 1]; these look like logits: pass from_logits=True.")
    else:
        p = _check_probs(p)
    p = p.clamp(0, 1)  # torchmetrics treats anything outside [0, 1] as logits and would apply a softmax again
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be an integer (or bool) tensor of class indices, shape (N,).")
    labels = labels.detach().reshape(-1).to(device=p.device, dtype=torch.long)
    if labels.numel() != p.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries but probs has {p.shape[0]} samples.")
    classes = 2 if binary else p.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(
            f"labels must lie in [0, {classes - 1}], got values from {int(labels.min())} to {int(labels.max())}."
        )
    return p, labels, binary


def expected_calibration_error(
    probs_or_logits: Tensor,
    labels: Tensor,
    *,
    n_bins: int = 15,
    norm: Literal["l1", "l2", "max"] = "l1",
    from_logits: bool = False,
) -> Tensor:
    """Top-label calibration error with equal-width confidence bins, computed by torchmetrics.

    .. math::

        \\text{ECE} = \\sum_b \\frac{n_b}{N} \\left| \\text{acc}_b - \\text{conf}_b \\right|

    (``norm="l2"``: the root of the weighted squared gaps; ``"max"``: the largest
    gap). Multiclass (N, K) inputs use
    ``torchmetrics.functional.classification.multiclass_calibration_error``
    (confidence = max probability, accuracy = argmax == label); binary (N,) or
    (N, 1) inputs, the probability of class 1, use ``binary_calibration_error``
    (confidence = p, accuracy = label). Probabilities are checked (they must
    not look like logits); with ``from_logits=True`` softmax / sigmoid is
    applied first.

    Args:
        probs_or_logits: (N, K) or (N,) / (N, 1) probabilities, or logits with ``from_logits=True``.
        labels: (N,) integer class indices.
        n_bins: equal-width bins on [0, 1].
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).
        from_logits: the first argument holds logits.

    Returns:
        A float32 scalar tensor on the inputs' device.

    Example:
        >>> probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3]])
        >>> expected_calibration_error(probs, torch.tensor([0, 1, 0]), n_bins=2)  # |1 - 0.4| / 3 + |0.5 - 0.85| * 2 / 3
        tensor(0.4333)
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}.")
    p, labels, binary = _calibration_inputs(probs_or_logits, labels, from_logits)
    if binary:
        value = binary_calibration_error(p, labels, n_bins=n_bins, norm=norm)
    else:
        value = multiclass_calibration_error(p, labels, num_classes=p.shape[1], n_bins=n_bins, norm=norm)
    return torch.as_tensor(value, dtype=torch.float32, device=p.device)  # torchmetrics' l2 of 0 is an int tensor


def reliability_curve(probs: Tensor, labels: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """The reliability diagram: mean confidence, accuracy and sample count of each equal-width confidence bin.

    The binning is torchmetrics' (confidence = max probability in float32,
    bin ``b`` = ``[b / n_bins, (b + 1) / n_bins)``, found with
    ``torch.bucketize(..., right=True)``), so
    ``sum(counts / N * |accuracy - confidence|)`` is
    :func:`expected_calibration_error`. One difference: torchmetrics gives a
    confidence of exactly 1.0 a zero-width bin of its own, here it joins the
    last bin (a diagram cannot draw a zero-width bar), which changes the sum
    only when some confidence is exactly 1.0. Binary (N,) / (N, 1) inputs, the
    probability of class 1, bin that probability against the label, as the
    binary ECE does.

    Args:
        probs: (N, K) probabilities, or (N,) / (N, 1) probabilities of class 1.
        labels: (N,) integer class indices.
        n_bins: number of bins.

    Returns:
        ``(confidence, accuracy, counts)``, each of shape (n_bins,): float32 means per bin (0 for an
        empty bin; see ``counts``) and int64 counts.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
        >>> conf, acc, counts = reliability_curve(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> conf, acc, counts
        (tensor([0.0000, 0.7667]), tensor([0.0000, 0.6667]), tensor([0, 3]))
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    p, labels, binary = _calibration_inputs(probs, labels, from_logits=False)
    if binary:
        confidence, accuracy = p, labels.float()
    else:
        confidence, prediction = p.max(dim=1)
        accuracy = prediction.eq(labels).float()
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.zeros(n_bins, dtype=torch.long, device=p.device).scatter_add_(0, index, torch.ones_like(index))
    conf_sum = torch.zeros(n_bins, dtype=torch.float32, device=p.device).scatter_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float32, device=p.device).scatter_add_(0, index, accuracy)
    safe = counts.clamp(min=1).float()
    return conf_sum / safe, acc_sum / safe, counts


_BETA_BRACKET = (1e-6, 1e6)  # the inverse temperatures searched: T from 1e-6 to 1e6
_NO_MINIMUM_BELOW, _NO_MINIMUM_ABOVE = 1e-3, 1e3  # a temperature outside these is warned about


def temperature_steps(logits: Tensor, labels: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """The temperature-scaling fit without a host read: ``(T, separable)`` as 0-d tensors on the logits' device.

    The mean NLL of ``softmax(beta * z)`` is convex in the inverse temperature ``beta = 1 / T`` (a log-sum-exp minus
    a linear term), with closed-form derivatives: the mean over samples of ``E_p[z] - z_y`` and of ``Var_p[z]``
    (binary, with ``p = sigmoid(beta * z)``: ``(p - y) z`` and ``p (1 - p) z^2``). Its root is found by a safeguarded
    Newton iteration on ``beta``, started at ``T = 1``, inside a bracket ``[1e-6, 1e6]`` that every evaluation
    narrows by the sign of the derivative; a Newton step that leaves the bracket (or is not finite) is replaced by
    the bracket's geometric mean. Exactly ``iterations`` steps run, whatever happens, so the host never has to read
    a value to decide whether to go on; 20 reach the float64 minimiser to about 1e-12 on the interior minima tried in
    the tests. Without an interior minimum the iteration runs into an end of the bracket (or stops where the
    derivative underflows), and ``T`` is that end.

    Args:
        logits: (N, K) logits, or (N,) / (N, 1) for a binary model (sigmoid likelihood); not checked.
        labels: (N,) class indices in range, on the logits' device; not checked.
        iterations: Newton / bisection steps.

    Returns:
        ``(temperature, separable)``: a float64 0-d tensor, and a bool 0-d tensor that is True when every sample is
        classified correctly (the NLL then falls all the way to ``T -> 0``).

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
        >>> t, separable = temperature_steps(z, torch.tensor([0, 1, 1, 0]), 20)
        >>> round(float(t), 4), bool(separable)
        (1.8205, False)
    """
    z = logits.detach().to(torch.float64)
    y = labels.detach().reshape(-1).long()
    if z.ndim == 1 or z.shape[1] == 1:
        z = z.reshape(-1)
        target, squared = y.to(torch.float64), z * z
        separable = torch.where(y == 1, z > 0, z < 0).all()

        def derivatives(beta: Tensor) -> tuple[Tensor, Tensor]:
            p = torch.sigmoid(beta * z)
            return ((p - target) * z).mean(), (p * (1 - p) * squared).mean()

    else:
        label_logit = z.gather(1, y.unsqueeze(1))
        separable = ((z < label_logit) | (torch.arange(z.shape[1], device=z.device) == y.unsqueeze(1))).all()
        label_mean = label_logit.mean()

        def derivatives(beta: Tensor) -> tuple[Tensor, Tensor]:
            p = torch.softmax(beta * z, dim=1)
            expected = (p * z).sum(dim=1, keepdim=True)
            return expected.mean() - label_mean, (p * (z - expected).square()).sum(dim=1).mean()

    low, high = (torch.full((), end, dtype=torch.float64, device=z.device) for end in _BETA_BRACKET)  # no copy
    beta = torch.ones((), dtype=torch.float64, device=z.device)
    with torch.no_grad():
        for _ in range(iterations):
            slope, curvature = derivatives(beta)
            low = torch.where(slope < 0, beta, low)  # the minimum lies above beta
            high = torch.where(slope > 0, beta, high)  # ... or below it
            newton = beta - slope / curvature  # NaN or inf where the curvature vanishes: never inside the bracket
            beta = torch.where((newton >= low) & (newton <= high), newton, (low * high).sqrt())
    return 1 / beta, separable


def temperature_warning(temperature: float, separable: bool) -> str | None:
    """What to warn about a fitted temperature that is not an interior minimum of the NLL, or None.

    Args:
        temperature: the fitted temperature (from :func:`temperature_steps`).
        separable: whether every sample was classified correctly.

    Example:
        >>> temperature_warning(1.8, False) is None, temperature_warning(1e6, False)[:32]
        (True, 'the NLL has no interior minimum ')
    """
    if not separable and _NO_MINIMUM_BELOW <= temperature <= _NO_MINIMUM_ABOVE:
        return None
    cause = (
        "every sample is classified correctly, so the NLL keeps falling as T -> 0"
        if separable
        else "the logits carry (almost) no information about the labels"
        if temperature > _NO_MINIMUM_ABOVE
        else "almost every sample is classified correctly, by a wide margin, so the NLL falls until T is tiny"
    )
    return (
        f"the NLL has no interior minimum ({cause}); T = {temperature:.3g} is where the optimiser stopped, not a "
        "meaningful calibration. Fit on held-out data the model was not trained on."
    )


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """Temperature scaling: the ``T > 0`` that minimises the mean NLL of ``softmax(logits / T)`` on held-out data.

    .. math::

        T^* = \\arg\\min_{T > 0} -\\frac{1}{N} \\sum_i \\log \\operatorname{softmax}(z_i / T)_{y_i}

    The NLL is convex in ``1 / T``; its minimum is found in float64 on the logits' device by a safeguarded Newton
    iteration on ``1 / T`` (exact first and second derivatives, a bracket narrowed at every step, started at T = 1,
    searched over T in [1e-6, 1e6]), with no randomness and two reads of the device in all: one for the input checks,
    one for the result. A binary model's (N,) / (N, 1) logits use the sigmoid likelihood. When the NLL has no
    interior minimum (every sample classified correctly drives T to 0; uninformative logits drive it to infinity) a
    warning says that the returned value is only where the optimiser stopped.

    Args:
        logits: (N, K) logits, or (N,) / (N, 1) for a binary model.
        labels: (N,) integer class indices.
        max_iter: Newton steps, all of which run (20 reach the float64 minimum on typical logits).

    Returns:
        The temperature; divide the logits by it.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
        >>> round(fit_temperature(z, torch.tensor([0, 1, 1, 0])), 3)  # one of four confident predictions is wrong
        1.82
    """
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}.")
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {type(logits).__name__}.")
    binary = logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)
    if logits.ndim not in (1, 2) or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, K) or (N,) with N >= 1, got {tuple(logits.shape)}.")
    if not isinstance(labels, Tensor) or labels.is_floating_point():
        raise TypeError("labels must be an integer (or bool) tensor of class indices, shape (N,).")
    y = labels.detach().reshape(-1).to(device=logits.device, dtype=torch.long)
    if y.numel() != logits.shape[0]:
        raise ValueError(f"labels has {y.numel()} entries but logits has {logits.shape[0]} samples.")
    classes = 2 if binary else logits.shape[1]
    finite, in_range = torch.stack([torch.isfinite(logits).all(), ((y >= 0) & (y < classes)).all()]).tolist()
    if not finite:
        raise ValueError("logits contains NaN or inf; no temperature can be fitted.")
    if not in_range:
        raise ValueError(f"labels must lie in [0, {classes - 1}].")
    fitted, separable = temperature_steps(logits, y, max_iter)
    temperature, flag = torch.stack([fitted, separable.to(fitted.dtype)]).tolist()
    if not math.isfinite(temperature):
        raise RuntimeError("fit_temperature diverged (T is not finite); check the logits and labels.")
    message = temperature_warning(temperature, bool(flag))
    if message is not None:
        warnings.warn(f"fit_temperature: {message}", stacklevel=2)
    return temperature


# --------------------------------------------------------------------------------------------------------------------
# Evidential (Dirichlet) outputs
# --------------------------------------------------------------------------------------------------------------------


def dirichlet_uncertainty(evidence: Tensor) -> tuple[Tensor, Tensor]:
    """Expected class probabilities and vacuity of Dirichlet evidence (evidential deep learning).

    .. math::

        \\alpha = e + 1, \\qquad \\mathbb{E}[p_k] = \\frac{\\alpha_k}{\\sum_j \\alpha_j}, \\qquad
        u = \\frac{K}{\\sum_j \\alpha_j}

    Vacuity ``u`` is 1 without any evidence and tends to 0 as evidence grows.

    Args:
        evidence: (N, K) non-negative evidence (e.g. ``softplus`` or ``relu`` of the logits).

    Returns:
        ``(expected_probability, vacuity)`` of shapes (N, K) and (N,).

    Raises:
        ValueError: negative or non-finite evidence.

    Example:
        >>> p, u = dirichlet_uncertainty(torch.tensor([[0.0, 0.0], [8.0, 0.0]]))
        >>> p, u
        (tensor([[0.5000, 0.5000],
                [0.9000, 0.1000]]), tensor([1.0000, 0.2000]))
    """
    if not isinstance(evidence, Tensor) or not evidence.is_floating_point():
        raise TypeError(f"evidence must be a floating-point tensor, got {type(evidence).__name__}.")
    if evidence.ndim != 2 or evidence.shape[1] < 1:
        raise ValueError(f"evidence must have shape (N, K), got {tuple(evidence.shape)}.")
    evidence = evidence.detach()
    if not bool(torch.isfinite(evidence).all()):
        raise ValueError("evidence contains NaN or inf.")
    if bool((evidence < 0).any()):
        raise ValueError(
            f"evidence must be >= 0 (the Dirichlet parameters are evidence + 1), got a minimum of "
            f"{float(evidence.min()):.4g}. Map the logits to evidence with torch.nn.functional.softplus, relu or exp."
        )
    alpha = evidence + 1
    strength = alpha.sum(dim=1)
    return alpha / strength.unsqueeze(1), evidence.shape[1] / strength


# --------------------------------------------------------------------------------------------------------------------
# Explanations under MC dropout
# --------------------------------------------------------------------------------------------------------------------


def mc_dropout_maps(
    model: nn.Module,
    inputs: Tensor,
    method: str | Explainer = "gradient",
    n_samples: int = 8,
    *,
    target: Target = None,
    generator: torch.Generator | None = None,
    reduction: str = "abs_sum",
    output_transform: OutputTransform | None = None,
    **options: object,
) -> Tensor:
    """A registered method's maps under MC dropout: one map per stochastic sub-network, (n_samples, N, H, W).

    Each pass runs :func:`~lightning_interp.methods.registry.attribute` (or an
    :class:`~lightning_interp.methods.Explainer` of one method) with the
    dropout modules in train mode (every other module in eval mode, see
    :func:`~lightning_interp.methods.dropout_active`) inside a fork of the
    CPU and model-CUDA RNG seeded from ``generator``, so the global random state
    is untouched and the same generator state gives the same maps. A method
    with several forward passes (integrated gradients, SmoothGrad) draws new
    masks in each of them. The explained class is fixed for all passes:
    ``target``, or the deterministic (eval-mode) prediction when None, so the
    maps differ only by the dropped units. Input attributions are reduced over
    channels with ``reduction`` (see
    :func:`~lightning_interp.methods.attribution_to_map`); CAM
    methods (``layer=`` in ``options``) give their maps as they are.

    Args:
        model: the network, with at least one dropout module.
        inputs: (N, ...) samples on the model's device.
        method: a name from :func:`~lightning_interp.methods.registry.available_methods`, or an
            :class:`~lightning_interp.methods.Explainer` of one method (its options, layer and seeded generator;
            ``options`` must then be empty).
        n_samples: stochastic passes, >= 2.
        target: class index, (N,) LongTensor, or None for the eval-mode prediction.
        generator: source of the passes' seeds (a fixed-seed private one if None).
        reduction: channel reduction of input attributions.
        output_transform: maps the model output to (N, K) logits.
        **options: the method's own options (e.g. ``n_steps=16``; ``layer=`` for CAM methods).

    Returns:
        (n_samples, N, H, W) float32 maps on the model's device.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.5),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> maps = mc_dropout_maps(net, torch.rand(2, 3, 8, 8), "gradient", 4)
        >>> maps.shape, bool(map_agreement(maps).lt(1).all())  # sub-networks disagree
        (torch.Size([4, 2, 8, 8]), True)
    """
    from lightning_interp.methods.explain import Explainer
    from lightning_interp.methods.registry import attribute

    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2 (the maps are compared), got {n_samples!r}.")
    if not any(isinstance(m, DROPOUT_TYPES) for m in model.modules()):
        raise ValueError(
            f"MC dropout needs dropout layers, but {type(model).__name__} has none: its maps would all be the same."
        )
    if isinstance(method, Explainer):
        if options or len(method.keys) != 1:
            raise ValueError(
                "mc_dropout_maps takes an Explainer of one method, which holds that method's options; pass none here."
            )
        given, held = output_transform, method.output_transform
        if given is not None and held is not None and given is not held:
            raise ValueError("mc_dropout_maps: output_transform differs from the Explainer's; give one.")
        output_transform = output_transform or method.output_transform
    elif output_transform is not None:
        options["output_transform"] = output_transform
    if target is None:
        with torch.no_grad(), modes_preserved(model), eager_forward():
            target = scores_from_output(model(inputs), output_transform).argmax(dim=1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (n_samples,), generator=generator).tolist()
    device = _model_device(model, inputs)
    if isinstance(method, Explainer):
        explainer = method

        def explain() -> Tensor:
            return explainer(model, inputs, target).maps(reduction)[explainer.keys[0]]  # type: ignore[arg-type]
    else:

        def explain() -> Tensor:
            return attribution_to_map(attribute(method, model, inputs, target, **options), reduction)

    maps = []
    for seed in seeds:
        with _private_rng(model, device, int(seed)), dropout_active():
            maps.append(explain())
    return torch.stack(maps)


def map_agreement(maps: Tensor) -> Tensor:
    """Mean Spearman rank correlation between the maps of every pair of passes, per sample: (S, N, ...) -> (N,).

    1 when every stochastic sub-network ranks the pixels alike; near 0 when the
    explanation depends on which units dropped out. Constant maps give NaN.

    Example:
        >>> base = torch.rand(1, 3, 5, 5)
        >>> map_agreement(torch.cat([base, base ** 2])).tolist()  # monotone transforms rank alike
        [1.0, 1.0, 1.0]
    """
    if maps.ndim < 3 or maps.shape[0] < 2:
        raise ValueError(f"map_agreement needs (S, N, ...) maps with S >= 2 passes, got {tuple(maps.shape)}.")
    total = torch.zeros(maps.shape[1], dtype=torch.float64, device=maps.device)
    pairs = 0
    for i in range(maps.shape[0]):
        for j in range(i + 1, maps.shape[0]):
            total += rank_correlation(maps[i], maps[j])
            pairs += 1
    return total / pairs
