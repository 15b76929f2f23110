"""Representation similarity: CKA (linear, RBF, all layer pairs, minibatch) and RSA.

Centred kernel alignment (Kornblith et al. 2019) compares two representations
of the same ``n`` samples, ``x`` of shape (n, d1) and ``y`` of shape (n, d2)
(more dimensions are flattened to (n, -1)), through the Hilbert-Schmidt
independence criterion (HSIC) of their Gram matrices ``K`` and ``L``:

``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))``.

The biased HSIC is ``tr(K H L H) / (n - 1)^2`` with the centring matrix
``H = I - 11^T / n``. The unbiased estimator of Song et al. (2012), as used by
Nguyen et al. (2021), removes the dependence on ``d / n``: with few samples and
many features the biased CKA of two *independent* representations is far from
0, the unbiased one is not. All sums are accumulated in float64.

Representational similarity analysis (Kriegeskorte et al. 2008) compares two
representational dissimilarity matrices (RDMs), see :func:`rdm` and :func:`rsa`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from lightning_interp.methods.evaluation.map_metrics import ranks
from lightning_interp.methods.model.tasks import label_kind

__all__ = [
    "MinibatchCKA",
    "center_gram",
    "cka_matrix",
    "gram_dtype_for",
    "label_rdm",
    "linear_cka",
    "normalized_grams",
    "rbf_cka",
    "rdm",
    "rsa",
    "rsa_matrix",
]

CKA_FORMS = ("auto", "gram", "feature")
RDM_METRICS = ("correlation", "euclidean")
RSA_METHODS = ("spearman", "pearson", "tau_a")
_GRAM_STRIP_ROWS = 256  # rows per strip when cka_matrix forms only the upper triangle of a Gram matrix (n > 512)
_FAST_FLOAT64_GPUS = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}  # P100, V100, A100, H100/H200, B200
_TAU_CHUNK_ELEMENTS = 1 << 22  # pairwise-sign block size of rsa(method="tau_a"): 4M entries (32 MiB in float64)


def _flatten64(features: Tensor, name: str = "features") -> Tensor:
    """(n, ...) -> (n, d) float64, detached."""
    if features.ndim == 0:
        raise ValueError(f"{name} must have a sample dimension, got a 0-dim tensor.")
    return features.detach().reshape(features.shape[0], -1).to(torch.float64)


def _centre(features: Tensor) -> Tensor:
    """Column-centre (n, d) features in float64.

    The first sample is subtracted before the mean so that large constant
    offsets cancel exactly (a constant column becomes exactly zero).
    """
    shifted = features - features[:1]
    return shifted - shifted.mean(dim=0, keepdim=True)


def _check_samples(n: int, debiased: bool) -> None:
    minimum = 4 if debiased else 2
    if n < minimum:
        kind = "unbiased (debiased)" if debiased else "biased"
        raise ValueError(f"The {kind} HSIC needs at least {minimum} samples, got {n}.")


def _warn_degenerate(what: str) -> None:
    warnings.warn(
        f"{what} has zero self-similarity (a constant layer, with zero variance across samples); "
        "its CKA is undefined and returned as NaN.",
        RuntimeWarning,
        stacklevel=4,
    )


def _normalise(hsic_xy: Tensor, hsic_xx: Tensor, hsic_yy: Tensor) -> Tensor:
    """CKA from the three HSIC values; NaN with a RuntimeWarning for a degenerate layer."""
    if not (hsic_xx > 0 and hsic_yy > 0):
        _warn_degenerate("x" if not hsic_xx > 0 else "y")
        return torch.full((), math.nan, dtype=torch.float64, device=hsic_xy.device)
    return hsic_xy / (hsic_xx.sqrt() * hsic_yy.sqrt())


def center_gram(gram: Tensor, *, unbiased: bool = False) -> Tensor:
    """Centre an (n, n) Gram matrix in float64.

    ``unbiased=False`` gives ``H K H`` with ``H = I - 11^T / n``; then
    ``<HKH, HLH>_F / (n - 1)^2`` is the biased HSIC. ``unbiased=True`` gives the
    "U-centred" matrix (Székely & Rizzo 2014; Kornblith's ``center_gram(...,
    unbiased=True)``): zero diagonal, and ``<K_u, L_u>_F / (n (n - 3))`` is the
    unbiased HSIC estimator of Song et al. (2012); it needs ``n >= 4``.

    Args:
        gram: symmetric (n, n) kernel matrix.
        unbiased: U-centre instead of double-centre.

    Returns:
        The centred matrix, float64 (a new tensor).

    Example:
        >>> k = center_gram(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> k
        tensor([[ 0.5000, -0.5000],
                [-0.5000,  0.5000]], dtype=torch.float64)
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"A Gram matrix must be square (n, n), got shape {tuple(gram.shape)}.")
    gram = gram.detach().to(torch.float64).clone()
    n = gram.shape[0]
    if not unbiased:
        gram = gram - gram.mean(dim=0, keepdim=True)
        return gram - gram.mean(dim=1, keepdim=True)
    _check_samples(n, debiased=True)
    gram.fill_diagonal_(0)
    means = gram.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    gram.fill_diagonal_(0)
    return gram


def _debiased_dot(xty: Tensor, rows_x: Tensor, rows_y: Tensor, norm_x: Tensor, norm_y: Tensor, n: int) -> Tensor:
    """Unbiased HSIC times n (n - 3) for linear kernels of *centred* features (Kornblith's helper)."""
    return xty - n / (n - 2) * rows_x.dot(rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


def linear_cka(x: Tensor, y: Tensor, *, debiased: bool = False, form: str = "auto") -> Tensor:
    """Linear centred kernel alignment between two representations of the same samples.

    Computed in float64 on the inputs' device. Two equivalent forms:
    the *feature* form ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on centred
    features (cost ``n (d1 d2 + d1^2 + d2^2)``), and the *Gram* form, HSIC of the
    centred ``n x n`` Gram matrices (cost ``n^2 (d1 + d2)``). ``form="auto"``
    takes the Gram form when the features outnumber the samples
    (``d1 + d2 > 2 n``), the feature form otherwise.

    Invariant to orthogonal transforms, isotropic scaling and constant shifts of
    either representation, not to general invertible linear maps. A constant
    layer gives NaN with a :class:`RuntimeWarning`.

    Args:
        x: (n, d1) features (more dims are flattened).
        y: (n, d2) features of the same n samples.
        debiased: use the unbiased HSIC estimator (Song et al. 2012; needs ``n >= 4``).
            Debiased CKA stays near 0 for independent representations even when
            ``n << d``, where the biased one is inflated. It may be slightly negative.
        form: ``"auto"``, ``"gram"`` or ``"feature"``; all give the same value up to rounding.

    Returns:
        0-dim float64 tensor.

    Example:
        >>> x = torch.randn(50, 8)
        >>> round(linear_cka(x, 3 * x + 1).item(), 6)
        1.0
    """
    if form not in CKA_FORMS:
        raise ValueError(f"Unknown CKA form {form!r}; use one of {CKA_FORMS}.")
    xf, yf = _flatten64(x, "x"), _flatten64(y, "y").to(x.device)
    n = xf.shape[0]
    if yf.shape[0] != n:
        raise ValueError(f"x and y must hold the same samples, got {n} and {yf.shape[0]} rows.")
    _check_samples(n, debiased)
    xc, yc = _centre(xf), _centre(yf)
    if form == "gram" or (form == "auto" and xc.shape[1] + yc.shape[1] > 2 * n):
        kx = center_gram(xc @ xc.T, unbiased=debiased)
        ky = center_gram(yc @ yc.T, unbiased=debiased)
        return _normalise((kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum())
    xty = (yc.T @ xc).square().sum()
    xtx = (xc.T @ xc).square().sum()
    yty = (yc.T @ yc).square().sum()
    if debiased:
        rows_x, rows_y = xc.square().sum(dim=1), yc.square().sum(dim=1)
        norm_x, norm_y = rows_x.sum(), rows_y.sum()
        xty = _debiased_dot(xty, rows_x, rows_y, norm_x, norm_y, n)
        xtx = _debiased_dot(xtx, rows_x, rows_x, norm_x, norm_x, n)
        yty = _debiased_dot(yty, rows_y, rows_y, norm_y, norm_y, n)
    return _normalise(xty, xtx, yty)


def _squared_distances(centred: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances of the rows of centred (n, d) float64 features."""
    gram = centred @ centred.T
    sq_norms = gram.diagonal()
    squared = (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min(0)
    squared = (squared + squared.T) / 2
    return squared.fill_diagonal_(0)


def _median(values: Tensor) -> Tensor:
    """Median of a 1-D tensor, averaging the two middle values for an even count (as ``numpy.median``)."""
    ordered = values.sort().values
    m = ordered.numel()
    return ordered[m // 2] if m % 2 else (ordered[m // 2 - 1] + ordered[m // 2]) / 2


def _rbf_gram(features: Tensor, sigma: float, name: str) -> Tensor | None:
    squared = _squared_distances(_centre(_flatten64(features, name)))
    median = _median(squared.reshape(-1))  # over all n^2 squared distances, diagonal zeros included (as the paper's)
    if not median > 0:
        return None
    return torch.exp(-squared / (2 * sigma**2 * median))


def rbf_cka(x: Tensor, y: Tensor, *, sigma: float = 0.8) -> Tensor:
    """CKA with Gaussian (RBF) kernels, biased HSIC (Kornblith et al. 2019).

    The kernel is ``exp(-||a - b||^2 / (2 sigma^2 m))`` where ``m`` is the
    median of the full ``n x n`` matrix of squared distances between each
    representation's samples, its zero diagonal included: exactly the
    ``gram_rbf(x, threshold=sigma)`` of Kornblith et al.'s reference code (so
    values agree with the published code on the same data). Costs
    ``O(n^2 d)`` time and a few ``n x n`` float64 matrices.

    Args:
        x: (n, d1) features (more dims are flattened).
        y: (n, d2) features of the same n samples.
        sigma: bandwidth as a fraction of the median distance (the reference code's ``threshold``; 0.8 as in
            the paper's tables).

    Returns:
        0-dim float64 tensor; NaN with a RuntimeWarning when a layer's median distance is 0.

    Example:
        >>> x = torch.randn(30, 5)
        >>> round(rbf_cka(x, 2 * x).item(), 6)
        1.0
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples, got {x.shape[0]} and {y.shape[0]} rows.")
    _check_samples(x.shape[0], debiased=False)
    kx = _rbf_gram(x, sigma, "x")
    ky = _rbf_gram(y.to(x.device), sigma, "y")
    if kx is None or ky is None:
        warnings.warn(
            f"{'x' if kx is None else 'y'} has a zero median pairwise distance (constant layer?); "
            "the RBF bandwidth is undefined and CKA is returned as NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.full((), math.nan, dtype=torch.float64, device=x.device)
    kx, ky = center_gram(kx), center_gram(ky)
    return _normalise((kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum())


def _layer_list(features: Sequence[Tensor] | Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    if isinstance(features, Mapping):
        names, tensors = [str(k) for k in features], list(features.values())
    elif isinstance(features, Tensor):
        raise TypeError("Pass a sequence or dict of per-layer tensors, not a single tensor.")
    else:
        tensors = list(features)
        names = [str(i) for i in range(len(tensors))]
    if not tensors:
        raise ValueError("No layers given.")
    scalars = [name for name, t in zip(names, tensors, strict=True) if t.ndim == 0]
    if scalars:
        raise ValueError(f"Each layer needs a sample dimension (n, ...); got 0-dim tensors for {scalars}.")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"Every layer must hold the same samples; got sample counts {sorted(sizes)}.")
    return names, tensors


def _centred64(t: Tensor, n: int, device: torch.device) -> Tensor:
    """A layer's (n, d) features as a new column-centred float64 tensor (the input is never modified)."""
    centred = t.detach().reshape(n, -1).to(device=device, dtype=torch.float64, copy=True)
    centred -= centred[:1].clone()  # large constant offsets cancel exactly before the mean is taken
    centred -= centred.mean(dim=0, keepdim=True)
    return centred


def gram_dtype_for(device: torch.device | str) -> torch.dtype:
    """The dtype in which Gram matrices are formed on ``device``: float64 where that is fast, float32 elsewhere.

    Forming the Gram matrices is the one expensive step of CKA (``n^2 d`` per layer); everything after it is
    ``L^2 n^2`` or less and always runs in float64. float64 matrix products run at full speed on the CPU and
    on data-centre GPUs (compute capability 6.0, 7.0, 8.0, 9.0, 10.0: P100, V100, A100, H100/H200, B200) but at
    1/32 to 1/64 of the float32 rate on the others, where the Grams are formed in float32 (TF32 turned off for
    the product). The features are centred in float64 first, so the float32 Grams give CKA values within about
    1e-8 of the float64 ones (tested to 1e-7, with a large common offset); the float64 path within about 1e-12.

    Example:
        >>> gram_dtype_for("cpu")
        torch.float64
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float64
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in _FAST_FLOAT64_GPUS:
        return torch.float64
    return torch.float32


@contextlib.contextmanager
def _true_float32_products() -> Iterator[None]:
    """float32 matrix products without TF32 or bfloat16 shortcuts for the block (restored afterwards)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _products_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a @ b.T`` with ``a`` and ``b`` already in the compute dtype (``out`` may be wider)."""
    if a.dtype == out.dtype:
        torch.mm(a, b.T, out=out)
        return
    with _true_float32_products():
        out.copy_(torch.mm(a, b.T))


def _compute_dtype(device: torch.device, requested: torch.dtype | None) -> torch.dtype:
    dtype = gram_dtype_for(device) if requested is None else requested
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_dtype must be torch.float32, torch.float64 or None, got {dtype}.")
    return dtype


def _gram_stack(tensors: list[Tensor], debiased: bool, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Each layer's linear Gram matrix of its column-centred features, formed once: (L, n, n) float64.

    The Gram matrix of centred features already has zero row and column sums, so it *is* its double-centred
    version ``H K H``: no further centring pass is needed. The products run in ``dtype`` (see :func:`gram_dtype_for`)
    and are stored in float64. Returns the stack and its (L, n) diagonals (a copy).
    """
    device = tensors[0].device
    n = int(tensors[0].shape[0])
    _check_samples(n, debiased)
    compute = _compute_dtype(device, dtype)
    out = torch.empty(len(tensors), n, n, dtype=torch.float64, device=device)
    for i, t in enumerate(tensors):
        centred = _centred64(t, n, device).to(compute)
        _products_into(out[i], centred, centred)
    return out, out.diagonal(dim1=1, dim2=2).clone()


def _strip_rows(n: int) -> int:
    """Rows per strip of :func:`_packed_hsic_products`: one strip (the plain Gram) up to n = 512."""
    return n if n <= 2 * _GRAM_STRIP_ROWS else _GRAM_STRIP_ROWS


def _packed_hsic_products(tensors: list[Tensor], debiased: bool, dtype: torch.dtype | None = None) -> Tensor:
    """(L, L) HSIC of every pair of layers up to a common factor, from about half the work of full Gram matrices.

    A Gram matrix is symmetric, so only its upper triangle is formed, in strips of rows: strip ``s`` holds the
    square block on the diagonal (counted once in a Frobenius product) and the rectangle right of it (counted
    twice, for itself and its mirror image below the diagonal). Forming the strips costs about ``(n + b) / 2n``
    of the full Gram (``b`` rows per strip) and the stack holds ``n (n + b) / 2`` numbers per layer, not ``n^2``.
    The common factor is ``(n - 1)^2`` for the biased HSIC and ``n (n - 3)`` for the unbiased one. The strips
    are formed in ``dtype`` (see :func:`gram_dtype_for`), stored and multiplied in float64.
    """
    device = tensors[0].device
    n = int(tensors[0].shape[0])
    _check_samples(n, debiased)
    compute = _compute_dtype(device, dtype)
    rows = _strip_rows(n)
    starts = range(0, n, rows)
    square_sizes = [min(rows, n - i) for i in starts]
    rectangle_sizes = [b * (n - i - b) for i, b in zip(starts, square_sizes, strict=True)]
    squares = torch.empty(len(tensors), sum(b * b for b in square_sizes), dtype=torch.float64, device=device)
    rectangles = torch.empty(len(tensors), sum(rectangle_sizes), dtype=torch.float64, device=device)
    diagonals = torch.empty(len(tensors), n, dtype=torch.float64, device=device)
    for layer, t in enumerate(tensors):
        centred = _centred64(t, n, device).to(compute)
        square_at = rectangle_at = 0
        for i, b, size in zip(starts, square_sizes, rectangle_sizes, strict=True):
            strip = centred[i : i + b]
            square = squares[layer, square_at : square_at + b * b].view(b, b)
            _products_into(square, strip, strip)
            diagonals[layer, i : i + b] = square.diagonal()
            if size:
                rectangle = rectangles[layer, rectangle_at : rectangle_at + size].view(b, n - i - b)
                _products_into(rectangle, strip, centred[i + b :])
            square_at, rectangle_at = square_at + b * b, rectangle_at + size
    products = squares @ squares.T + 2 * (rectangles @ rectangles.T)
    return _debias_products(products, diagonals, n) if debiased else products


def _debias_products(products: Tensor, diagonals: Tensor, n: int) -> Tensor:
    """Unbiased HSIC times ``n (n - 3)`` from ``<K_i, K_j>`` of Gram matrices of centred features.

    No U-centred copy is needed (Kornblith et al. 2019, ``_debiased_dot_product_similarity_helper``):
    ``<K, L> - n / (n - 2) diag(K).diag(L) + tr K tr L / ((n - 1)(n - 2))`` equals the inner product of the
    U-centred matrices.
    """
    traces = diagonals.sum(dim=1)
    products = products - n / (n - 2) * (diagonals @ diagonals.T)
    return products + traces[:, None] * traces[None, :] / ((n - 1) * (n - 2))


def _u_centre_in_place(grams: Tensor, diagonals: Tensor) -> None:
    """U-centre (L, n, n) Gram matrices of centred features in place (same result as ``center_gram(unbiased=True)``).

    With zero row sums, the zero-diagonal matrix has row sums ``-K_ii``, so the row means that U-centring subtracts
    are ``m_i = -K_ii / (n - 2) + tr K / (2 (n - 1)(n - 2))``.
    """
    n = grams.shape[-1]
    means = -diagonals / (n - 2) + diagonals.sum(dim=1, keepdim=True) / (2 * (n - 1) * (n - 2))
    grams -= means[:, :, None]
    grams -= means[:, None, :]
    grams.diagonal(dim1=1, dim2=2).zero_()


def _nan_rows_and_columns(matrix: Tensor, bad: Tensor) -> Tensor:
    """``matrix`` with the rows and columns flagged in the 1-D boolean ``bad`` set to NaN, in place (no host sync)."""
    return matrix.masked_fill_(bad[:, None] | bad[None, :], math.nan)


def _flagged(names: Sequence[str], flags: Sequence[bool]) -> list[str]:
    return [name for name, flag in zip(names, flags, strict=True) if flag]


def _normalise_matrix(hsic: Tensor, names: list[str]) -> Tensor:
    diagonal = hsic.diagonal()
    bad = ~(diagonal > 0)
    degenerate = _flagged(names, bad.tolist())  # the one host sync, for the warning
    if degenerate:
        _warn_degenerate(f"Layer(s) {', '.join(degenerate)}")
    scale = diagonal.clamp_min(0).sqrt()
    cka = hsic / (scale[:, None] * scale[None, :])
    return _nan_rows_and_columns(cka, bad)


def cka_matrix(
    features: Sequence[Tensor] | Mapping[str, Tensor], *, debiased: bool = False, gram_dtype: torch.dtype | None = None
) -> Tensor:
    """Linear CKA between every pair of L layers, as one (L, L) float64 matrix.

    Each layer's features are centred once and only the upper triangle of
    their Gram matrix is formed (in strips of 256 rows once n > 512; the Gram
    matrix of centred features needs no further centring, and the unbiased
    HSIC follows from it and its diagonal without a U-centred copy); the L
    triangles are stacked and one matrix product gives every pairwise HSIC.
    Equals :func:`linear_cka` pair by pair. Costs about ``n^2 sum(d_l) / 2``
    for the Grams plus ``L^2 n^2 / 2`` for the product, and about ``L n^2 / 2``
    float64 of memory (30 MiB for 6 layers at n = 1024).

    Args:
        features: per-layer tensors (n, ...) of the same n samples, as a sequence
            or a dict (rows and columns then follow the dict's order).
        debiased: use the unbiased HSIC (Song et al. 2012; needs ``n >= 4``).
        gram_dtype: dtype of the Gram products; None chooses by device (see :func:`gram_dtype_for`).

    Returns:
        (L, L) float64 tensor on the first layer's device; rows and columns of a
        constant layer are NaN (with a RuntimeWarning).

    Example:
        >>> x = torch.randn(20, 6)
        >>> m = cka_matrix({"a": x, "b": 2 * x, "c": torch.randn(20, 3)})
        >>> m.shape, round(m[0, 1].item(), 6)
        (torch.Size([3, 3]), 1.0)
    """
    names, tensors = _layer_list(features)
    return _normalise_matrix(_packed_hsic_products(tensors, debiased, gram_dtype), names)


def normalized_grams(
    features: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    debiased: bool = False,
    gram_dtype: torch.dtype | None = None,
    warn: bool = True,
) -> Tensor:
    """Each layer's centred linear Gram matrix, flattened and scaled to unit Frobenius norm: (L, n*n) float64.

    The inner product of two rows is the linear CKA of those layers (the HSIC
    normalisers cancel), so a stack serves every pair at once and a row kept
    from an earlier epoch compares a layer with its past self without storing
    features. Rows of constant layers are NaN (with a RuntimeWarning).

    Args:
        features: per-layer tensors (n, ...) of the same n samples.
        debiased: U-centre for the unbiased HSIC (Song et al. 2012; needs ``n >= 4``).
        gram_dtype: dtype of the Gram products; None chooses by device (see :func:`gram_dtype_for`).
        warn: look for constant layers and warn about them, which waits for the device once (one host sync
            whatever the number of layers); ``False`` computes without waiting and leaves the check to the
            caller: a constant layer's row is NaN throughout (``grams.isnan().all(dim=1)``).

    Example:
        >>> x, y = torch.randn(30, 5), torch.randn(30, 4)
        >>> grams = normalized_grams([x, y])
        >>> torch.allclose(grams[0] @ grams[1], linear_cka(x, y))
        True
    """
    names, tensors = _layer_list(features)
    grams, diagonals = _gram_stack(tensors, debiased, gram_dtype)
    if debiased:
        _u_centre_in_place(grams, diagonals)
    grams = grams.reshape(len(tensors), -1)
    norms = grams.norm(dim=1)
    bad = ~(norms > 0)
    if warn and (degenerate := _flagged(names, bad.tolist())):  # the one host sync
        _warn_degenerate(f"Layer(s) {', '.join(degenerate)}")
    grams /= norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    return grams.masked_fill_(bad[:, None], math.nan)


class MinibatchCKA:
    """Linear CKA between every pair of layers accumulated over minibatches (Nguyen et al. 2021).

    Each :meth:`update` adds, for every pair of layers, the unbiased HSIC
    (Song et al. 2012) of that minibatch; :meth:`compute` returns

    ``CKA_ij = mean_b HSIC_u(K_i^b, K_j^b) / sqrt(mean_b HSIC_u(K_i^b, K_i^b) * mean_b HSIC_u(K_j^b, K_j^b))``.

    Since each per-batch unbiased HSIC is an unbiased estimate of the population
    HSIC, the averages estimate the same population quantity as full-batch
    debiased CKA (:func:`cka_matrix` with ``debiased=True``), without ever holding
    more than one batch's ``n x n`` Grams; with a single batch both are
    identical. Batches need at least 4 samples and may differ in size.

    Args:
        gram_dtype: dtype of the Gram products; None chooses by device (see :func:`gram_dtype_for`).

    Example:
        >>> acc = MinibatchCKA()
        >>> for _ in range(3):
        ...     x = torch.randn(16, 8)
        ...     acc.update([x, 2 * x, x.square()])
        >>> acc.compute().shape, round(acc.compute()[0, 1].item(), 6)
        (torch.Size([3, 3]), 1.0)
    """

    def __init__(self, *, gram_dtype: torch.dtype | None = None) -> None:
        self.gram_dtype = gram_dtype
        self.hsic_sum: Tensor | None = None
        self.num_batches = 0
        self.names: list[str] | None = None

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self.hsic_sum = None
        self.num_batches = 0
        self.names = None

    def update(self, features: Sequence[Tensor] | Mapping[str, Tensor]) -> None:
        """Add one minibatch: per-layer tensors (b, ...) of the same b >= 4 samples, same layers every time.

        Args:
            features: sequence or dict of per-layer activations of this batch.
        """
        names, tensors = _layer_list(features)
        if self.names is not None and names != self.names:
            raise ValueError(f"Expected the layers {self.names} as in earlier batches, got {names}.")
        n = int(tensors[0].shape[0])
        hsic = _packed_hsic_products(tensors, debiased=True, dtype=self.gram_dtype) / (n * (n - 3))
        if self.hsic_sum is None:
            self.hsic_sum, self.names = hsic, names
        else:
            self.hsic_sum = self.hsic_sum + hsic.to(self.hsic_sum.device)
        self.num_batches += 1

    def compute(self) -> Tensor:
        """The (L, L) float64 CKA matrix of everything seen since the last reset.

        Returns:
            (L, L) float64 tensor; rows and columns of a constant layer are NaN.
        """
        if self.hsic_sum is None or self.names is None:
            raise RuntimeError("MinibatchCKA.compute() called before any update().")
        return _normalise_matrix(self.hsic_sum / self.num_batches, self.names)


def label_rdm(labels: Tensor, *, as_values: bool = False) -> Tensor:
    """The dissimilarity of the samples' labels, (n, n) float64 with a zero diagonal: the model RDM's ideal.

    Class indices (and one-hot or soft rows, by their most likely class): 0 within a class, 1 across.
    ``as_values=True`` reads any labels as values (whole-number regression
    targets such as counts), compared by their Euclidean distance. Multi-hot
    rows: the Jaccard distance of the label sets (1 - shared / either; 0 for
    two samples without any label). Real-valued targets: the Euclidean distance.

    Example:
        >>> label_rdm(torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]])).tolist()
        [[0.0, 0.5, 1.0], [0.5, 0.0, 1.0], [1.0, 1.0, 0.0]]
    """
    kind = "continuous" if as_values else label_kind(labels)
    if kind in ("class", "one_hot", "soft"):
        index = labels.argmax(dim=1) if labels.ndim == 2 else labels.round().long()
        return (index[:, None] != index[None, :]).double()
    values = labels.double().reshape(labels.shape[0], -1)
    if kind == "multi_hot":
        positive = (values != 0).double()
        shared = positive @ positive.T
        either = positive.sum(dim=1)[:, None] + positive.sum(dim=1)[None, :] - shared
        return torch.where(either > 0, 1 - shared / either.clamp_min(1), torch.zeros_like(shared))
    return torch.cdist(values, values)


def rdm(x: Tensor, *, metric: str = "correlation", warn: bool = True) -> Tensor:
    """Representational dissimilarity matrix between the n sample patterns (rows) of x.

    ``"correlation"``: 1 - Pearson correlation between the rows (0 for identical
    patterns up to an affine map, 2 for opposite ones); a constant row gives NaN
    with a RuntimeWarning. ``"euclidean"``: Euclidean distance between the rows.

    Args:
        x: (n, ...) patterns, flattened to (n, d).
        metric: ``"correlation"`` or ``"euclidean"``.
        warn: count the constant patterns and warn about them, which waits for the device once (one host sync,
            ``"correlation"`` only); ``False`` leaves the check to the caller: a pattern is constant exactly
            where the diagonal holds NaN (it is 0 elsewhere).

    Returns:
        Symmetric (n, n) float64 matrix with a zero diagonal.

    Example:
        >>> rdm(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])).round(decimals=6)
        tensor([[0., 0., 2.],
                [0., 0., 2.],
                [2., 2., 0.]], dtype=torch.float64)
    """
    if metric not in RDM_METRICS:
        raise ValueError(f"Unknown RDM metric {metric!r}; use one of {RDM_METRICS}.")
    patterns = _flatten64(x, "x")
    if metric == "euclidean":
        return _squared_distances(_centre(patterns)).sqrt()
    centred = patterns - patterns.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    constant = ~(norms > 0)
    if warn and (count := int(constant.sum())):  # the one host sync
        warnings.warn(
            f"{count} pattern(s) are constant across features; their correlation distance is NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
    unit = centred / norms[:, None]
    distance = (1 - unit @ unit.T).clamp(0, 2)
    distance = (distance + distance.T) / 2
    distance.fill_diagonal_(0)
    return _nan_rows_and_columns(distance, constant)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    if not denominator > 0:
        warnings.warn("An RDM's upper triangle is constant; the correlation is NaN.", RuntimeWarning, stacklevel=3)
        return torch.full((), math.nan, dtype=torch.float64, device=a.device)
    return (a * b).sum() / denominator


def _tau_a(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's tau-a: mean over pairs i < j of sign(a_i - a_j) sign(b_i - b_j), in row chunks."""
    m = a.numel()
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    chunk = max(1, _TAU_CHUNK_ELEMENTS // m)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        # block over rows [start, stop) x columns [start, m): pairs i < j plus the within-chunk square twice
        block = (a[start:stop, None] - a[None, start:]).sign_()
        block.mul_((b[start:stop, None] - b[None, start:]).sign_())
        total += block.sum() - block[:, : stop - start].sum() / 2
    return total / (m * (m - 1) / 2)


def rsa(rdm_a: Tensor, rdm_b: Tensor, *, method: str = "spearman") -> Tensor:
    """Compare two (n, n) RDMs over their upper triangles (diagonal excluded): RSA.

    ``"spearman"`` (default): Pearson correlation of the ranks, ties averaged.
    ``"pearson"``: Pearson correlation of the dissimilarities.
    ``"tau_a"``: Kendall's tau-a, recommended by Nili et al. (2014) when an RDM
    has ties; it counts all ``m (m - 1) / 2`` pairs of the ``m = n (n - 1) / 2``
    entries, so it costs ``O(m^2) = O(n^4)`` time: 2M sign products at n = 64
    (~0.03 s on 2 CPU cores), 8.6e9 at n = 512 (~45 s). It runs in blocks of at
    most 4M entries, so memory stays bounded (two 32 MiB blocks) for any n.

    Args:
        rdm_a: (n, n) dissimilarity matrix.
        rdm_b: (n, n) dissimilarity matrix of the same n conditions.
        method: ``"spearman"``, ``"pearson"`` or ``"tau_a"``.

    Returns:
        0-dim float64 tensor; NaN (with a RuntimeWarning) when an RDM holds NaN
        or, for the correlations, when an upper triangle is constant.

    Example:
        >>> a = rdm(torch.randn(6, 10))
        >>> rsa(a, a.square()).item()
        1.0
    """
    if method not in RSA_METHODS:
        raise ValueError(f"Unknown RSA method {method!r}; use one of {RSA_METHODS}.")
    if rdm_a.ndim != 2 or rdm_a.shape[0] != rdm_a.shape[1] or rdm_a.shape != rdm_b.shape:
        raise ValueError(f"RDMs must be square and of equal shape, got {tuple(rdm_a.shape)} and {tuple(rdm_b.shape)}.")
    n = rdm_a.shape[0]
    if n < 3:
        raise ValueError(f"RSA needs at least 3 conditions (3 distinct pairs), got {n}.")
    upper = torch.triu_indices(n, n, offset=1, device=rdm_a.device)
    a = rdm_a.detach().to(torch.float64)[upper[0], upper[1]]
    b = rdm_b.detach().to(device=rdm_a.device, dtype=torch.float64)[upper[0], upper[1]]
    if a.isnan().any() or b.isnan().any():
        warnings.warn("An RDM holds NaN (constant patterns?); RSA is NaN.", RuntimeWarning, stacklevel=2)
        return torch.full((), math.nan, dtype=torch.float64, device=a.device)
    if method == "pearson":
        return _pearson(a, b)
    if method == "spearman":
        return _pearson(ranks(a[None])[0], ranks(b[None])[0])
    return _tau_a(a, b)


def rsa_matrix(rdms: Sequence[Tensor] | Mapping[str, Tensor], *, method: str = "spearman", warn: bool = True) -> Tensor:
    """RSA between every pair of K RDMs of the same n conditions, as one (K, K) float64 matrix.

    Equals :func:`rsa` pair by pair, but each RDM's upper triangle is taken
    (and, for ``"spearman"``, ranked) once, and the correlations of all pairs
    come from one matrix product; ``"tau_a"`` still runs pair by pair.

    Args:
        rdms: K square (n, n) dissimilarity matrices, as a sequence or a dict.
        method: ``"spearman"``, ``"pearson"`` or ``"tau_a"``.
        warn: look for RDMs holding NaN or with a constant upper triangle and warn about them, which waits for
            the device once (one host sync whatever K); ``False`` computes without waiting (``"tau_a"`` then
            also compares the RDMs holding NaN, to no use) and leaves the check to the caller: such an RDM's
            diagonal entry is NaN (it is 1 elsewhere).

    Returns:
        (K, K) float64 tensor on the first RDM's device, 1 on the diagonal; rows and
        columns of an RDM holding NaN, or with a constant upper triangle, are NaN
        (with a RuntimeWarning).

    Example:
        >>> a = rdm(torch.randn(6, 10))
        >>> rsa_matrix([a, a.square(), rdm(torch.randn(6, 4))]).shape
        torch.Size([3, 3])
    """
    if method not in RSA_METHODS:
        raise ValueError(f"Unknown RSA method {method!r}; use one of {RSA_METHODS}.")
    names, matrices = _layer_list(rdms)
    shape = tuple(matrices[0].shape)
    if len(shape) != 2 or shape[0] != shape[1] or any(tuple(m.shape) != shape for m in matrices):
        raise ValueError(f"RDMs must be square and of equal shape, got {[tuple(m.shape) for m in matrices]}.")
    n = shape[0]
    if n < 3:
        raise ValueError(f"RSA needs at least 3 conditions (3 distinct pairs), got {n}.")
    device = matrices[0].device
    upper = torch.triu_indices(n, n, offset=1, device=device)
    values = torch.stack([m.detach().to(device=device, dtype=torch.float64)[upper[0], upper[1]] for m in matrices])
    broken = values.isnan().any(dim=1)
    if method == "tau_a":
        flags = broken.tolist() if warn else [False] * len(matrices)  # the one host sync
        _warn_rsa(_flagged(names, flags), [], stacklevel=3)
        out = torch.eye(len(matrices), dtype=torch.float64, device=device)
        for i in range(len(matrices)):
            for j in range(i + 1, len(matrices)):
                if not (flags[i] or flags[j]):
                    out[i, j] = out[j, i] = _tau_a(values[i], values[j])
    else:
        if method == "spearman":
            values = ranks(torch.nan_to_num(values))
        centred = values - values.mean(dim=1, keepdim=True)
        norms = centred.norm(dim=1)
        constant = ~(norms > 0) & ~broken
        if warn:
            with_nan, flat = torch.stack([broken, constant]).tolist()  # the one host sync
            _warn_rsa(_flagged(names, with_nan), _flagged(names, flat), stacklevel=3)
        unit = centred / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
        out = unit @ unit.T
        out.diagonal().fill_(1.0)
        broken = broken | constant
    return _nan_rows_and_columns(out, broken)


def _warn_rsa(with_nan: Sequence[str], constant: Sequence[str], stacklevel: int) -> None:
    """The RuntimeWarnings of :func:`rsa_matrix` about RDMs holding NaN and RDMs with a constant upper triangle."""
    if with_nan:
        warnings.warn(
            f"RDM(s) {', '.join(with_nan)} hold NaN (constant patterns?); their RSA is NaN.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    if constant:
        warnings.warn(
            f"The upper triangle of RDM(s) {', '.join(constant)} is constant; their correlation is NaN.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
