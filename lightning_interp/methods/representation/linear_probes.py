"""Linear probes: how linearly decodable are the labels from a layer's features?

A probe is fit on a fixed, stratified training part of the samples and scored
on the held-out rest; only the held-out accuracy says something about the
representation (with more features than samples any labels, even random ones,
can be fit on the training part). Everything runs in torch on the features'
device, draws randomness from its own :class:`torch.Generator` (never the
global RNG), and works under ``torch.no_grad()`` and ``torch.inference_mode()``.

:func:`fit_probes` fits one probe per layer for several layers at once without a
single device-to-host sync: the split is prepared once (:class:`ProbeSplit`), each
layer's standardised features are rotated into the eigenbasis of their Gram
matrix (one batched ``eigh`` for all layers), and the logistic probe takes a
fixed number of Newton steps with the Hessian's diagonal in that basis and a
step length chosen on the device among a few candidates (every candidate's loss
is computed at once; the smallest wins, so the loss never rises). Ridge and the
regression probe are closed forms in the same basis. The results stay on the
device until the caller brings them to the host, all in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PROBE_SOLVERS",
    "ProbeResult",
    "ProbeScores",
    "ProbeSplit",
    "RegressionProbeResult",
    "fit_probes",
    "linear_probe_accuracy",
    "linear_probe_r2",
    "multilabel_probe_accuracy",
    "stratified_split",
]

PROBE_SOLVERS = ("logistic", "ridge")
PROBE_ITERATIONS = 20
"""Newton steps of the logistic probe (all of them run: the number of steps never depends on the data)."""
STEP_LENGTHS = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
"""The candidate step lengths of each Newton step; 0 keeps the loss from ever rising."""
MOMENTA = (0.0, 0.5, 0.9)
"""How much of its previous move each Newton step may add again (chosen with the length, by the loss)."""
GRADIENT_TOLERANCE = 1e-3
"""Largest gradient entry below which a logistic probe counts as converged (scikit-learn stops at 1e-4); one whose
held-out predictions did not change over the last quarter of its steps counts as converged too."""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one linear probe.

    Attributes:
        accuracy: accuracy on the held-out part (the meaningful number).
        train_accuracy: accuracy on the training part (how well the probe fits).
        n_train: number of training samples.
        n_test: number of held-out samples.
        n_classes: number of distinct labels.
        converged: whether the logistic probe's largest gradient entry fell below
            ``GRADIENT_TOLERANCE`` (always True for ridge).
    """

    accuracy: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    converged: bool = True


def _check_labels(labels: Tensor, n: int) -> None:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the features, got {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")


def stratified_split(labels: Tensor, test_fraction: float = 0.5, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic stratified train / held-out split of sample indices.

    Within each class the samples are shuffled by a private
    ``torch.Generator().manual_seed(seed)`` (the global RNG is untouched) and
    ``round(test_fraction * count)`` of them, clamped to ``[1, count - 1]``, go
    to the held-out part, so every class with at least 2 samples appears in
    both parts; a class with a single sample goes to the training part.

    Args:
        labels: (n,) integer labels.
        test_fraction: share of each class held out, in (0, 1).
        seed: seed of the private generator.

    Returns:
        ``(train_indices, test_indices)``, sorted int64 CPU tensors.

    Example:
        >>> train, test = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1]), 0.5)
        >>> len(train), len(test)
        (3, 3)
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    _check_labels(labels, labels.shape[0] if labels.ndim else -1)
    generator = torch.Generator().manual_seed(seed)
    labels = labels.detach().cpu()
    train_parts, test_parts = [], []
    for value in torch.unique(labels):
        members = (labels == value).nonzero().flatten()
        count = members.numel()
        members = members[torch.randperm(count, generator=generator)]
        n_test = min(max(round(test_fraction * count), 1), count - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return torch.cat(train_parts).sort().values, torch.cat(test_parts).sort().values


def _regression_groups(values: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Held-out one sample per group of neighbours in target order (see :func:`linear_probe_r2`)."""
    n = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(values.detach().cpu().reshape(n, -1)[:, 0].double(), stable=True)
    group = max(2, round(1 / test_fraction))
    held = torch.zeros(n, dtype=torch.bool)
    for start in range(0, n - 1, group):
        members = order[start : start + group]
        if members.numel() >= 2:
            held[members[int(torch.randint(members.numel(), (1,), generator=generator))]] = True
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


@dataclass(frozen=True, eq=False)
class ProbeSplit:
    """The samples' split into a training and a held-out part, and their targets, prepared once for many fits.

    Build one with :meth:`classes` (class labels: a stratified split) or
    :meth:`regression` (real targets: a split that covers their range), then
    give it to :func:`fit_probes` at every fit: the split, the targets and their
    copies on the features' device are made once, so a fit needs no ``unique``,
    ``nonzero`` or host transfer.

    Attributes:
        train: sorted int64 indices of the training part (CPU).
        test: sorted int64 indices of the held-out part (CPU).
        targets: (n,) int64 class indices in ``0..n_classes - 1``, or (n, k) float64 regression targets (CPU).
        n_classes: number of classes; 0 for regression targets.

    Example:
        >>> split = ProbeSplit.classes(torch.tensor([3, 3, 7, 7, 7, 7]))
        >>> split.n_classes, split.targets.tolist(), len(split.train), len(split.test)
        (2, [0, 0, 1, 1, 1, 1], 3, 3)
    """

    train: Tensor
    test: Tensor
    targets: Tensor
    n_classes: int
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def classes(cls, labels: Tensor, test_fraction: float = 0.5, *, seed: int = 0) -> ProbeSplit:
        """A stratified split of (n,) integer labels (any values; mapped to ``0..C-1``); see :func:`stratified_split`.

        Raises:
            ValueError: fewer than 2 classes, or no class with 2 samples (nothing to hold out).
        """
        _check_labels(labels, labels.shape[0] if labels.ndim else -1)
        classes, targets = torch.unique(labels.detach().cpu(), return_inverse=True)
        if classes.numel() < 2:
            raise ValueError(f"A probe needs at least 2 classes, got {classes.numel()}.")
        train, test = stratified_split(labels, test_fraction, seed=seed)
        if test.numel() == 0:
            raise ValueError("No held-out samples: every class has a single sample.")
        return cls(train, test, targets, classes.numel())

    @classmethod
    def regression(cls, values: Tensor, test_fraction: float = 0.5, *, seed: int = 0) -> ProbeSplit:
        """A split of (n,) or (n, k) real targets that covers their range (see :func:`linear_probe_r2`)."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
        n = values.shape[0] if values.ndim else 0
        if n < 4 or values.ndim not in (1, 2):
            raise ValueError(f"Need (n,) or (n, k) targets with n >= 4, got {tuple(values.shape)}.")
        train, test = _regression_groups(values, test_fraction, seed)
        return cls(train, test, values.detach().cpu().double().reshape(n, -1), 0)

    @classmethod
    def per_label(cls, labels: Tensor, test_fraction: float = 0.5, *, seed: int = 0) -> list[ProbeSplit]:
        """One binary split per usable label of multi-hot (n, k) labels: those with at least two positive and two
        negative samples (the others are left out; none usable raises ``ValueError``)."""
        if labels.ndim != 2:
            raise ValueError(f"labels must have shape (n, k), got {tuple(labels.shape)}.")
        present = (labels.detach().cpu() != 0).long()
        counts = present.sum(dim=0)
        usable = [k for k in range(present.shape[1]) if 2 <= int(counts[k]) <= present.shape[0] - 2]
        if not usable:
            raise ValueError(
                "No label has at least two positive and two negative samples among the probe samples, so no binary "
                "probe can be fit and tested; draw more samples."
            )
        return [cls.classes(present[:, k], test_fraction, seed=seed) for k in usable]

    def __len__(self) -> int:
        return self.targets.shape[0]

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(train, test, targets)`` on ``device``, copied there once."""
        key = str(device)
        if key not in self._copies:
            with torch.inference_mode(False):
                self._copies[key] = tuple(t.clone().to(device) for t in (self.train, self.test, self.targets))
        return self._copies[key]


@dataclass(frozen=True)
class ProbeScores:
    """Per-layer outcome of :func:`fit_probes`, as (L,) tensors on the features' device (nothing on the host yet).

    Attributes:
        score: held-out accuracy (classes) or R² (regression); NaN for a layer with NaN or infinite features.
        train_score: the same on the training part.
        converged: whether each logistic probe's largest gradient entry fell below ``GRADIENT_TOLERANCE``
            (ridge and regression: True).
        finite: whether each layer's features were all finite.
    """

    score: Tensor
    train_score: Tensor
    converged: Tensor
    finite: Tensor


def fit_probes(
    features: Sequence[Tensor],
    split: ProbeSplit | Sequence[ProbeSplit],
    *,
    solver: str = "logistic",
    l2: float = 1e-3,
    iterations: int = PROBE_ITERATIONS,
) -> ProbeScores:
    """Fit one linear probe per layer, all layers at once, without a device-to-host sync.

    Each layer's features are flattened to (n, d) and standardised with the
    training part's mean and standard deviation (constant features left at 0).
    A classification split fits a multinomial logistic regression
    (``solver="logistic"``: mean cross-entropy + ``l2 / 2 * ||W||^2``, the bias
    unpenalised, scikit-learn's ``LogisticRegression(C=1 / (l2 * n_train))``) or
    ridge regression on one-hot targets predicting the argmax (``"ridge"``:
    mean squared error / 2 + ``l2 / 2 * ||W||^2``, scikit-learn's
    ``RidgeClassifier(alpha=l2 * n_train)``); a regression split fits ridge
    regression and scores R². All in float64.

    How: the features of every layer are rotated into the eigenbasis of their
    Gram matrix (features x features, or samples x samples when features
    outnumber training samples; one batched ``eigh``), where ridge is a division
    and the logistic Hessian's diagonal is cheap. The logistic probe then takes
    exactly ``iterations`` Newton steps with that diagonal, each with the step
    length among ``STEP_LENGTHS`` whose loss is smallest (all evaluated at once,
    chosen on the device). The cost grows with ``min(n_train, d)^3`` per layer.

    Args:
        features: L tensors of (n, ...) features of the same n samples, on one device.
        split: the samples' split and targets (:meth:`ProbeSplit.classes` or :meth:`ProbeSplit.regression`), or
            several splits (:meth:`ProbeSplit.per_label`, multi-hot labels: one binary probe per label, the scores
            averaged over the labels).
        solver: ``"logistic"`` or ``"ridge"`` (classification splits; regression is always ridge).
        l2: penalty strength, >= 0, relative to the mean per-sample loss.
        iterations: Newton steps of the logistic probe.

    Returns:
        :class:`ProbeScores` of (L,) tensors on the features' device.

    Example:
        >>> x = torch.linspace(-1, 1, 20)[:, None]
        >>> split = ProbeSplit.classes((x[:, 0] > 0).long())
        >>> scores = fit_probes([x, -x, torch.zeros(20, 3)], split)
        >>> scores.score.tolist()
        [1.0, 1.0, 0.5]
    """
    if solver not in PROBE_SOLVERS:
        raise ValueError(f"Unknown probe solver {solver!r}; use one of {PROBE_SOLVERS}.")
    if not l2 >= 0 or math.isinf(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}.")
    if not features:
        raise ValueError("fit_probes needs the features of at least one layer.")
    if not isinstance(split, ProbeSplit):
        if not split:
            raise ValueError("fit_probes needs at least one split.")
        each = [fit_probes(features, one, solver=solver, l2=l2, iterations=iterations) for one in split]
        return ProbeScores(
            score=torch.stack([scores.score for scores in each]).mean(dim=0),
            train_score=torch.stack([scores.train_score for scores in each]).mean(dim=0),
            converged=torch.stack([scores.converged for scores in each]).all(dim=0),
            finite=each[0].finite,
        )
    n = len(split)
    for values in features:
        if values.ndim < 1 or values.shape[0] != n:
            raise ValueError(
                f"Every layer's features must have shape ({n}, ...) to match the split, got {tuple(values.shape)}."
            )
    with torch.inference_mode(False), torch.no_grad():
        train, test, targets = split.on(features[0].device)
        phi, phi_test, eigenvalues, finite = _eigenbasis(features, train, test)
        if split.n_classes == 0:
            y = targets.to(phi.dtype)
            weight, bias = _ridge(phi, eigenvalues, y[train], l2)
            train_score = _r2(phi @ weight + bias[:, None], y[train])
            score = _r2(phi_test @ weight + bias[:, None], y[test])
            converged = torch.ones_like(finite)
        else:
            classes = torch.arange(split.n_classes, device=phi.device)
            onehot = (targets[train, None] == classes).to(phi.dtype)  # F.one_hot reads the targets' range back
            if solver == "ridge":
                weight, bias = _ridge(phi, eigenvalues, onehot, l2)
                converged = torch.ones_like(finite)
            else:
                weight, bias, converged = _logistic(phi, phi_test, onehot, l2, iterations)
            train_score = _accuracy(phi @ weight + bias[:, None], targets[train])
            score = _accuracy(phi_test @ weight + bias[:, None], targets[test])
        nan = torch.tensor(float("nan"), dtype=score.dtype, device=score.device)
        return ProbeScores(
            score=torch.where(finite, score, nan),
            train_score=torch.where(finite, train_score, nan),
            converged=converged & finite,
            finite=finite,
        )


def _eigenbasis(features: Sequence[Tensor], train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every layer's standardised training and held-out features in the eigenbasis of their Gram matrix.

    Returns ``(phi, phi_test, eigenvalues, finite)``: (L, n_train, r) and (L, n_test, r) with ``phi^T phi =
    diag(eigenvalues)`` per layer, r = min(n_train, largest d) (narrower layers padded with zero features, which
    stay at zero weight), and (L,) flags of layers whose features were all finite (the others are fit on zeros).
    """
    width = max(math.prod(values.shape[1:]) for values in features)
    flat = [values.detach().reshape(values.shape[0], -1) for values in features]
    stacked = torch.stack([F.pad(values, (0, width - values.shape[1])) for values in flat]).to(torch.float64)
    finite = torch.isfinite(stacked).all(dim=2).all(dim=1)
    stacked = stacked.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    x_train, x_test = stacked[:, train], stacked[:, test]
    mean = x_train.mean(dim=1, keepdim=True)
    x_train, x_test = x_train - mean, x_test - mean
    std = x_train.square().mean(dim=1, keepdim=True).sqrt_()
    scale = torch.where(std > 0, std, 1).reciprocal_()  # features constant on the training part stay at 0
    x_train, x_test = x_train.mul_(scale), x_test.mul_(scale)
    if width <= x_train.shape[1]:  # primal: eigenbasis of the (d, d) Gram matrix
        eigenvalues, basis = torch.linalg.eigh(x_train.mT @ x_train)
        phi, phi_test = x_train @ basis, x_test @ basis
    else:  # dual: of the (n, n) kernel; phi = U sqrt(lambda), test rows through the kernel
        eigenvalues, basis = torch.linalg.eigh(x_train @ x_train.mT)
        root = eigenvalues.clamp_min(0).sqrt()
        keep = eigenvalues > eigenvalues[:, -1:] * (x_train.shape[1] * torch.finfo(eigenvalues.dtype).eps)
        phi = basis * root[:, None, :]
        phi_test = (x_test @ x_train.mT) @ basis * torch.where(keep, root.reciprocal(), 0)[:, None, :]
    return phi, phi_test, eigenvalues.clamp_min(0), finite


def _ridge(phi: Tensor, eigenvalues: Tensor, targets: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Ridge regression in the eigenbasis: ``(lambda_j + l2 n) v_j = phi_j^T (y - mean y)``, the bias the mean."""
    bias = targets.mean(dim=0)
    denominator = (eigenvalues + l2 * phi.shape[1])[:, :, None]
    rhs = phi.mT @ (targets - bias)
    weight = torch.where(denominator > 0, rhs / denominator.clamp_min(torch.finfo(phi.dtype).tiny), 0)
    return weight, bias.expand(phi.shape[0], -1)


def _logistic(
    phi: Tensor, phi_test: Tensor, onehot: Tensor, l2: float, iterations: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Multinomial logistic regression in the eigenbasis by diagonal Newton steps with a device-side line search.

    Each step computes the Newton step ``s`` with the Hessian's diagonal and evaluates, for every pair of a length
    ``t`` in ``STEP_LENGTHS`` and a momentum ``m`` in ``MOMENTA``, the loss at ``x - t s + m (x - x_previous)``; the
    best pair wins (``t = 0, m = 0`` keeps the point, so the loss never rises). The point, the step and the previous
    move are kept as three rows of one buffer ``[W | b | logits]`` per layer (logits are linear in ``(W, b)``), so
    that all candidates' logits, their penalties and the update are each one batched product: about 30 ops a step
    for all layers together, none of them a sync.

    Returns the weights (L, r, C), the biases (L, C) and whether each layer converged: its largest gradient entry
    fell below ``GRADIENT_TOLERANCE``, or no held-out prediction changed over the last quarter of the steps (the
    accuracy has settled).
    """
    layers, n, rank = phi.shape
    classes = onehot.shape[1]
    sizes = (rank * classes, classes, n * classes)
    state = phi.new_zeros(layers, 3, sum(sizes))  # rows: the point, the step, the previous move
    weights, biases, logits = state.split(sizes, dim=-1)  # (L, 3, .) views
    weight, step_weight = weights[:, 0].view(layers, rank, classes), weights[:, 1].view(layers, rank, classes)
    bias, step_bias = biases[:, 0], biases[:, 1]
    logit, step_logit = logits[:, 0].view(layers, n, classes), logits[:, 1].view(layers, n, classes)
    point_and_move = state[:, 0::2]
    phi_t, squared = phi.mT, phi.square().mT.div(n)  # the diagonal of phi^T D phi / n is squared @ D
    target = onehot.flatten() / n
    # the candidates: coefficients (1, -t, m) of the three rows, and the rows (1, -t, m), (0, -t, m) they become
    grid = torch.tensor(
        [(1.0, -length, momentum) for length in STEP_LENGTHS for momentum in MOMENTA],
        dtype=phi.dtype,
        device=phi.device,
    )
    outer = (grid[:, :, None] * grid[:, None, :]).flatten(1).T  # (9, K): the penalty of each from the rows' Gram
    updates = torch.stack([grid, grid * grid.new_tensor([0.0, 1.0, 1.0])], dim=1)  # (K, 2, 3)
    floor, tiny = max(l2, torch.finfo(phi.dtype).tiny), torch.finfo(phi.dtype).tiny

    settle_from = iterations - max(1, iterations // 4)
    earlier = state[:, 0, : rank * classes + classes].clone()
    for index in range(iterations):
        if index == settle_from:
            earlier = state[:, 0, : rank * classes + classes].clone()
        probabilities = logit.softmax(dim=-1)
        residual = probabilities - onehot
        torch.baddbmm(weight, phi_t, residual, beta=l2, alpha=1 / n, out=step_weight)
        curvature = torch.addcmul(probabilities, probabilities, probabilities, value=-1)
        step_weight.div_(torch.bmm(squared, curvature).add_(floor))
        torch.sum(residual, dim=1, out=step_bias)
        step_bias.div_(curvature.sum(dim=1).clamp_min_(tiny))
        torch.baddbmm(step_bias.unsqueeze(1), phi, step_weight, out=step_logit)
        penalty = torch.bmm(weights, weights.mT).flatten(1) @ outer  # (L, K)
        candidates = torch.matmul(grid, logits).unflatten(-1, (n, classes))  # (L, K, n, C)
        loss = candidates.logsumexp(dim=-1).mean(dim=-1) - (logits @ target) @ grid.T
        best = torch.add(loss, penalty, alpha=0.5 * l2).argmin(dim=1)
        point_and_move.copy_(torch.bmm(updates[best], state))
    probabilities = logit.softmax(dim=-1)
    residual = probabilities - onehot
    largest = torch.maximum(
        torch.baddbmm(weight, phi_t, residual, beta=l2, alpha=1 / n).abs().amax(dim=(-2, -1)),
        residual.sum(dim=1).abs().amax(dim=-1) / n,
    )
    earlier_weight, earlier_bias = earlier.split((rank * classes, classes), dim=-1)
    before = torch.baddbmm(earlier_bias.unsqueeze(1), phi_test, earlier_weight.view(layers, rank, classes))
    settled = (torch.baddbmm(bias.unsqueeze(1), phi_test, weight).argmax(dim=-1) == before.argmax(dim=-1)).all(-1)
    return weight, bias, (largest <= GRADIENT_TOLERANCE) | settled


def _accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """(L,) share of rows whose argmax is the target."""
    return (logits.argmax(dim=-1) == targets).to(logits.dtype).mean(dim=-1)


def linear_probe_accuracy(
    features: Tensor,
    labels: Tensor,
    *,
    test_fraction: float = 0.5,
    solver: str = "logistic",
    l2: float = 1e-3,
    seed: int = 0,
    iterations: int = PROBE_ITERATIONS,
) -> ProbeResult:
    """Held-out accuracy of a linear classifier reading the labels from the features.

    Steps: a stratified split (:func:`stratified_split`, fixed by ``seed``);
    standardisation with the training part's mean and standard deviation
    (features constant on the training part are left at 0); then a linear
    classifier with an unpenalised bias, fit in float64 by :func:`fit_probes`:

    - ``"logistic"``: multinomial logistic regression minimising
      ``mean cross-entropy + l2 / 2 * ||W||^2`` by ``iterations`` Newton steps
      (the Hessian's diagonal in the eigenbasis of the features' Gram matrix,
      the step length chosen among a few on the device). Equivalent to
      scikit-learn's ``LogisticRegression(C=1 / (l2 * n_train))``; its
      accuracy within a point of scikit-learn's (BENCHMARKS.md).
    - ``"ridge"``: ridge regression on one-hot targets minimising
      ``mean squared error / 2 + l2 / 2 * ||W||^2`` in closed form, predicting
      the argmax (scikit-learn's ``RidgeClassifier(alpha=l2 * n_train)``).

    The default ``l2 = 1e-3`` on standardised features (``C`` of about 2 at 500
    training samples) is a weak penalty: structure that is linearly decodable
    is fit, while the problem stays well-posed when features outnumber samples.
    To fit several layers at once without a host sync, use :func:`fit_probes`.

    Args:
        features: (n, ...) features, flattened to (n, d); any device.
        labels: (n,) integer labels (any values; mapped to 0..C-1).
        test_fraction: share of each class held out, in (0, 1).
        solver: ``"logistic"`` or ``"ridge"``.
        l2: penalty strength, >= 0, relative to the mean per-sample loss.
        seed: seed of the split (a private generator; the global RNG is untouched).
        iterations: Newton steps of the logistic solver (all of them run).

    Returns:
        :class:`ProbeResult` with held-out and training accuracy and the part sizes.

    Raises:
        ValueError: bad options, labels that cannot be split, or features with NaN or infinite values.

    Example:
        >>> x = torch.linspace(-1, 1, 20)[:, None]
        >>> result = linear_probe_accuracy(x, (x[:, 0] > 0).long())
        >>> result.accuracy, result.n_train, result.n_test
        (1.0, 10, 10)
    """
    if solver not in PROBE_SOLVERS:
        raise ValueError(f"Unknown probe solver {solver!r}; use one of {PROBE_SOLVERS}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    if not l2 >= 0 or math.isinf(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}.")
    if features.ndim < 1 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (n, ...) with n >= 2, got {tuple(features.shape)}.")
    _check_labels(labels, features.shape[0])
    split = ProbeSplit.classes(labels, test_fraction, seed=seed)
    scores = fit_probes([features], split, solver=solver, l2=l2, iterations=iterations)
    accuracy, train_accuracy, finite, converged = _to_host(scores)[0]
    if not finite:
        raise ValueError("features contain NaN or infinite values.")
    return ProbeResult(
        accuracy=accuracy,
        train_accuracy=train_accuracy,
        n_train=split.train.numel(),
        n_test=split.test.numel(),
        n_classes=split.n_classes,
        converged=bool(converged),
    )


def _to_host(scores: ProbeScores) -> list[list[float]]:
    """Per layer ``[score, train_score, finite, converged]`` as floats, in one transfer."""
    values = torch.stack([scores.score, scores.train_score, scores.finite.to(scores.score.dtype)])
    values = torch.cat([values, scores.converged.to(values.dtype)[None]])
    return values.T.tolist()


@dataclass(frozen=True)
class RegressionProbeResult:
    """Outcome of one linear regression probe.

    Attributes:
        r2: coefficient of determination on the held-out part (1 is perfect, 0 is as good as predicting the
            held-out mean; scikit-learn's ``r2_score``).
        train_r2: the same on the training part.
        n_train: number of training samples.
        n_test: number of held-out samples.
    """

    r2: float
    train_r2: float
    n_train: int
    n_test: int


def linear_probe_r2(
    features: Tensor, values: Tensor, *, test_fraction: float = 0.5, l2: float = 1e-3, seed: int = 0
) -> RegressionProbeResult:
    """Held-out R² of ridge regression reading regression targets from the features.

    The samples, sorted by their (first) target value, are cut into groups of
    ``max(2, round(1 / test_fraction))`` neighbours, and each group gives one
    held-out sample (chosen by a private generator seeded with ``seed``), so
    both parts cover the targets' range; the held-out share is therefore about
    ``test_fraction`` for values up to 1/2 (and 1/2 above that).
    Features are standardised with the training part's statistics; the ridge
    fit is the closed form of :func:`linear_probe_accuracy`'s ``"ridge"``
    solver (float64). R² is averaged over the target columns.

    Args:
        features: (n, ...) features, flattened to (n, d); any device.
        values: (n,) or (n, k) real targets.
        test_fraction: about the share of the samples held out, in (0, 1) (at most 1/2, see above).
        l2: penalty strength, >= 0.
        seed: seed of the split's private generator.

    Example:
        >>> x = torch.linspace(-1, 1, 20)[:, None]
        >>> round(linear_probe_r2(x, 3 * x[:, 0] + 1).r2, 4)
        1.0
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    if not l2 >= 0 or math.isinf(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
    n = features.shape[0] if features.ndim else 0
    if n < 4 or values.shape[0] != n or values.ndim not in (1, 2):
        raise ValueError(
            f"Need (n, ...) features with n >= 4 and (n,) or (n, k) targets, got {tuple(features.shape)} and "
            f"{tuple(values.shape)}."
        )
    split = ProbeSplit.regression(values, test_fraction, seed=seed)
    r2, train_r2, finite, _ = _to_host(fit_probes([features], split, l2=l2))[0]
    if not finite:
        raise ValueError("features contain NaN or infinite values.")
    return RegressionProbeResult(r2=r2, train_r2=train_r2, n_train=split.train.numel(), n_test=split.test.numel())


def _r2(predicted: Tensor, actual: Tensor) -> Tensor:
    """(L,) mean over columns of 1 - SS_res / SS_tot (scikit-learn's ``r2_score``; constant columns skipped) of
    (L, n, k) predictions of (n, k) targets."""
    residual = (actual - predicted).square().sum(dim=-2)
    total = (actual - actual.mean(dim=0)).square().sum(dim=0)
    valid = total > 0
    per_column = torch.where(valid, 1 - residual / total.clamp_min(1e-300), torch.zeros_like(residual))
    return per_column.sum(dim=-1) / valid.sum().clamp_min(1)


def multilabel_probe_accuracy(
    features: Tensor,
    labels: Tensor,
    *,
    test_fraction: float = 0.5,
    solver: str = "logistic",
    l2: float = 1e-3,
    seed: int = 0,
    iterations: int = PROBE_ITERATIONS,
) -> ProbeResult:
    """Mean held-out accuracy of one binary probe per label of multi-hot (n, k) labels.

    Each label column with at least two samples of each value gets its own
    binary probe on its own stratified split (:meth:`ProbeSplit.per_label`); the
    accuracies are averaged over those labels (``n_classes`` counts them).
    Labels present in every sample or in fewer than two are skipped.

    Example:
        >>> x = torch.linspace(-1, 1, 20)[:, None]
        >>> labels = torch.stack([(x[:, 0] > 0), (x[:, 0] > 0.5)], dim=1).long()
        >>> result = multilabel_probe_accuracy(x, labels)
        >>> result.n_classes, result.accuracy >= 0.9
        (2, True)
    """
    if labels.ndim != 2 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]}, k), got {tuple(labels.shape)}.")
    splits = ProbeSplit.per_label(labels, test_fraction, seed=seed)
    scores = fit_probes([features], splits, solver=solver, l2=l2, iterations=iterations)
    accuracy, train_accuracy, finite, converged = _to_host(scores)[0]
    if not finite:
        raise ValueError("features contain NaN or infinite values.")
    return ProbeResult(
        accuracy=accuracy,
        train_accuracy=train_accuracy,
        n_train=splits[0].train.numel(),
        n_test=splits[0].test.numel(),
        n_classes=len(splits),
        converged=bool(converged),
    )
