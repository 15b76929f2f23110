"""CKA and RSA against independent numpy / scipy references, invariances and edge cases."""

from __future__ import annotations

import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch

from lightning_interp.methods.representation import similarity
from lightning_interp.methods.representation.similarity import (
    MinibatchCKA,
    center_gram,
    cka_matrix,
    linear_cka,
    rbf_cka,
    rdm,
    rsa,
    rsa_matrix,
)

scipy_spatial = pytest.importorskip("scipy.spatial.distance")
stats = pytest.importorskip("scipy.stats")


# ---------------------------------------------------------------- numpy float64 references


def np_hsic_biased(k: np.ndarray, m: np.ndarray) -> float:
    """tr(K H L H) / (n - 1)^2."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ m @ h)) / (n - 1) ** 2


def np_hsic_unbiased(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out on zero-diagonal kernels."""
    n = k.shape[0]
    kt, mt = k.copy(), m.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(mt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ mt)
    term2 = (one @ kt @ one) * (one @ mt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ mt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def np_cka_from_grams(k: np.ndarray, m: np.ndarray, hsic) -> float:
    return hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m))


def np_linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    a = x.reshape(x.shape[0], -1).double().numpy()
    b = y.reshape(y.shape[0], -1).double().numpy()
    # HSIC is shift invariant; removing the column means first only spares the reference
    # the cancellation of huge Gram entries when the features carry a large offset
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return np_cka_from_grams(a @ a.T, b @ b.T, np_hsic_unbiased if debiased else np_hsic_biased)


def np_rbf_gram(x: torch.Tensor, sigma: float) -> np.ndarray:
    """A transcription of ``gram_rbf`` from Kornblith et al.'s reference code (google-research/CKA_similarity)."""
    x = x.reshape(x.shape[0], -1).double().numpy()
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * sigma**2 * sq_median_distance))


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def related_pair(n: int, d1: int, d2: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 representations sharing a low-dimensional signal, CKA well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x = z @ torch.randn(4, d1, generator=g, dtype=torch.float64) + torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = torch.tanh(z @ torch.randn(4, d2, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        n, d2, generator=g, dtype=torch.float64
    )
    return x, y


FORMS = ("gram", "feature")
SHAPES = [(60, 10, 25), (24, 70, 90), (40, 3, 200)]  # samples > features, features > samples, mixed


# ---------------------------------------------------------------- linear CKA


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_linear_cka_matches_numpy_reference(n, d1, d2, debiased):
    x, y = related_pair(n, d1, d2)
    expected = np_linear_cka(x, y, debiased)
    for form in ("auto", *FORMS):
        value = linear_cka(x, y, debiased=debiased, form=form)
        assert value.shape == () and value.dtype == torch.float64
        assert value.item() == pytest.approx(expected, abs=1e-10), form
    assert 0.05 < expected < 0.99  # a value that says something


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_linear_cka_of_a_representation_with_itself_is_one(form, debiased):
    x, _ = related_pair(30, 12, 5)
    assert linear_cka(x, x, debiased=debiased, form=form).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_linear_cka_invariances(form, debiased):
    g = torch.Generator().manual_seed(3)
    x, y = related_pair(40, 16, 24, seed=1)
    base = linear_cka(x, y, debiased=debiased, form=form).item()
    q = random_orthogonal(16, g)
    shift = 100 * torch.randn(1, 16, generator=g, dtype=torch.float64)
    for transformed in (x @ q, 7.5 * x, x + shift, 0.01 * (x @ q) - 3.0):
        assert linear_cka(transformed, y, debiased=debiased, form=form).item() == pytest.approx(base, abs=1e-10)
        assert linear_cka(y, transformed, debiased=debiased, form=form).item() == pytest.approx(base, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_changes_under_anisotropic_linear_map(debiased):
    g = torch.Generator().manual_seed(4)
    x, y = related_pair(50, 8, 20, seed=2)
    scales = torch.logspace(-2, 2, 8, dtype=torch.float64)
    stretch = random_orthogonal(8, g) @ torch.diag(scales) @ random_orthogonal(8, g)
    assert torch.linalg.matrix_rank(stretch) == 8  # invertible, yet not a similarity transform
    base = linear_cka(x, y, debiased=debiased).item()
    changed = linear_cka(x @ stretch, y, debiased=debiased).item()
    assert abs(changed - base) > 0.05
    assert changed == pytest.approx(np_linear_cka(x @ stretch, y, debiased), abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_is_symmetric_and_flattens_extra_dims(debiased):
    x, y = related_pair(30, 24, 9)
    assert linear_cka(x, y, debiased=debiased).item() == pytest.approx(
        linear_cka(y, x, debiased=debiased).item(), abs=1e-12
    )
    assert linear_cka(x.reshape(30, 2, 3, 4), y, debiased=debiased).item() == pytest.approx(
        linear_cka(x, y, debiased=debiased).item(), abs=1e-12
    )


@pytest.mark.parametrize("n,d1,d2", [(50, 20, 30), (20, 60, 80), (10, 5, 200)])
@pytest.mark.parametrize("debiased", [False, True])
def test_gram_and_feature_forms_agree(n, d1, d2, debiased):
    x, y = related_pair(n, d1, d2, seed=5)
    gram = linear_cka(x, y, debiased=debiased, form="gram").item()
    feature = linear_cka(x, y, debiased=debiased, form="feature").item()
    assert gram == pytest.approx(feature, abs=1e-11)


def test_debiased_cka_near_zero_on_independent_data_where_biased_is_inflated():
    g = torch.Generator().manual_seed(6)
    biased, unbiased = [], []
    for _ in range(5):
        x = torch.randn(32, 1024, generator=g)
        y = torch.randn(32, 1024, generator=g)
        biased.append(linear_cka(x, y).item())
        unbiased.append(linear_cka(x, y, debiased=True).item())
    assert min(biased) > 0.5
    assert max(abs(v) for v in unbiased) < 0.2
    assert abs(sum(unbiased) / len(unbiased)) < 0.1


def test_float32_with_large_offset_stays_accurate():
    x64, y64 = related_pair(64, 32, 48, seed=7)
    x32, y32 = (x64 + 1e4).float(), (y64 - 1e4).float()
    for debiased in (False, True):
        expected = np_linear_cka(x32, y32, debiased)  # same float32 values, float64 maths
        for form in FORMS:
            value = linear_cka(x32, y32, debiased=debiased, form=form).item()
            assert math.isfinite(value)
            assert value == pytest.approx(expected, abs=1e-8), (form, debiased)
        # and the offset itself barely matters (float32 quantisation at 1e4 is ~1e-3)
        assert expected == pytest.approx(np_linear_cka(x64, y64, debiased), abs=1e-2)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("value", [0.0, 0.1, 1e4 / 3])
def test_constant_layer_gives_nan_and_a_warning(form, debiased, value):
    x = torch.full((37, 10), value, dtype=torch.float64)  # a naive float64 mean of 37 copies of 0.1 is not 0.1
    y, _ = related_pair(37, 6, 6)
    with pytest.warns(RuntimeWarning, match="constant"):
        result = linear_cka(x, y, debiased=debiased, form=form)
    assert torch.isnan(result)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert torch.isnan(linear_cka(y, x, debiased=debiased, form=form))


def test_linear_cka_rejects_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="form"):
        linear_cka(x, x, form="dual")


# ---------------------------------------------------------------- cka_matrix and centring


def test_center_gram_matches_definitions():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64)
    k = a @ a.T
    h = torch.eye(9, dtype=torch.float64) - 1 / 9
    torch.testing.assert_close(center_gram(k), h @ k @ h, rtol=0, atol=1e-12)
    m = (a + 1).square() @ (a + 1).square().T
    u_k, u_m = center_gram(k, unbiased=True), center_gram(m, unbiased=True)
    assert torch.all(u_k.diagonal() == 0)
    assert ((u_k * u_m).sum() / (9 * 6)).item() == pytest.approx(np_hsic_unbiased(k.numpy(), m.numpy()), rel=1e-10)


def layers(n: int = 48, seed: int = 9) -> dict[str, torch.Tensor]:
    x, y = related_pair(n, 20, 70, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    return {
        "a": x.float(),
        "b": y,
        "c": torch.relu(x @ torch.randn(20, 30, generator=g, dtype=torch.float64)).reshape(n, 5, 6),
        "d": torch.randn(n, 8, generator=g),
    }


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_pairwise_linear_cka(debiased):
    feats = layers()
    matrix = cka_matrix(feats, debiased=debiased)
    assert matrix.shape == (4, 4) and matrix.dtype == torch.float64
    values = list(feats.values())
    for i in range(4):
        for j in range(4):
            assert matrix[i, j].item() == pytest.approx(
                linear_cka(values[i], values[j], debiased=debiased).item(), abs=1e-11
            )
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(cka_matrix(values, debiased=debiased), matrix, rtol=0, atol=0)  # list == dict


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_stack_equals_centring_the_raw_gram_and_leaves_inputs_untouched(debiased):
    # the stack skips centring the Gram of centred features (already centred) and U-centres analytically;
    # the reference centres the Gram of the *raw* features with center_gram, which must give the same matrix
    feats = layers()
    feats["b"] = feats["b"] + 3.0  # float64 input, which the stack must copy, not shift in place
    before = {name: value.clone() for name, value in feats.items()}
    grams = similarity.normalized_grams(feats, debiased=debiased)
    for row, value in zip(grams, feats.values(), strict=True):
        raw = value.reshape(48, -1).double()
        reference = center_gram(raw @ raw.T, unbiased=debiased)
        torch.testing.assert_close(row, (reference / reference.norm()).reshape(-1), rtol=0, atol=1e-12)
    for name, value in feats.items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("strip_rows", [1, 7, 16])
def test_cka_matrix_from_upper_triangle_strips_equals_full_grams(debiased, strip_rows, monkeypatch):
    # cka_matrix forms only the upper triangle of each Gram in strips of rows once n > 2 * strip rows; with small
    # strips (7 does not divide 48: a shorter last strip) it must still equal the pairwise full-Gram computation
    monkeypatch.setattr(similarity, "_GRAM_STRIP_ROWS", strip_rows)
    feats = layers()
    values = list(feats.values())
    matrix = cka_matrix(feats, debiased=debiased)
    for i in range(4):
        for j in range(4):
            expected = linear_cka(values[i], values[j], debiased=debiased, form="gram").item()
            assert matrix[i, j].item() == pytest.approx(expected, abs=1e-11)
    batch = MinibatchCKA()
    batch.update(feats)
    torch.testing.assert_close(batch.compute(), cka_matrix(feats, debiased=True), rtol=0, atol=1e-11)


@pytest.mark.parametrize("debiased", [False, True])
def test_float32_gram_products_agree_with_float64_within_1e_7(debiased):
    # GPUs without fast float64 form the Grams in float32; the result must stay close to the float64 one, also for
    # many features with a large common offset (ReLU outputs) where a naive float32 Gram would lose every digit
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 8, generator=g)
    feats = {
        "relu": torch.relu(z @ torch.randn(8, 2048, generator=g) + 0.5) + 40.0,
        "linear": z @ torch.randn(8, 512, generator=g) + 0.3 * torch.randn(300, 512, generator=g),
        "noise": torch.randn(300, 64, generator=g),
    }
    exact = cka_matrix(feats, debiased=debiased, gram_dtype=torch.float64)
    fast = cka_matrix(feats, debiased=debiased, gram_dtype=torch.float32)
    assert fast.dtype == torch.float64 and not torch.equal(fast, exact)  # the float32 path really ran
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-7)
    grams = similarity.normalized_grams(feats, debiased=debiased, gram_dtype=torch.float32)
    torch.testing.assert_close(grams @ grams.T, exact, rtol=0, atol=1e-7)
    batch = MinibatchCKA(gram_dtype=torch.float32)
    batch.update(feats)
    torch.testing.assert_close(batch.compute(), cka_matrix(feats, debiased=True), rtol=0, atol=1e-7)


def test_gram_dtype_is_float64_on_the_cpu_and_checked():
    assert similarity.gram_dtype_for("cpu") == torch.float64
    with pytest.raises(ValueError, match="gram_dtype"):
        cka_matrix(layers(), gram_dtype=torch.float16)


def test_cka_matrix_marks_a_constant_layer_nan_and_keeps_the_rest():
    feats = layers()
    feats["dead"] = torch.zeros(48, 16)
    with pytest.warns(RuntimeWarning, match="dead"):
        matrix = cka_matrix(feats)
    assert torch.isnan(matrix[4]).all() and torch.isnan(matrix[:, 4]).all()
    assert torch.isfinite(matrix[:4, :4]).all()


def test_cka_matrix_rejects_mismatched_layers():
    with pytest.raises(ValueError, match="same samples"):
        cka_matrix([torch.randn(10, 3), torch.randn(11, 3)])
    with pytest.raises(TypeError):
        cka_matrix(torch.randn(10, 3))
    with pytest.raises(ValueError, match="sample dimension"):
        cka_matrix({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})


# ---------------------------------------------------------------- minibatch CKA


def structured_layers(n: int = 2048, seed: int = 0) -> list[torch.Tensor]:
    """Four representations of the same 3-d latent: a low-dimensional, structured population."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)

    def w(a: int, b: int) -> torch.Tensor:
        return torch.randn(a, b, generator=g)

    return [
        z @ w(3, 64) + 0.5 * torch.randn(n, 64, generator=g),
        torch.tanh(z @ w(3, 128)),
        torch.relu(z @ w(3, 256)) + 0.2 * torch.randn(n, 256, generator=g),
        torch.sin(z @ w(3, 32)),
    ]


def test_minibatch_cka_with_one_batch_equals_full_batch_debiased():
    feats = layers(n=40)
    acc = MinibatchCKA()
    acc.update(feats)
    assert acc.num_batches == 1
    torch.testing.assert_close(acc.compute(), cka_matrix(feats, debiased=True), rtol=0, atol=1e-13)


def test_minibatch_cka_estimates_the_full_batch_unbiased_value():
    feats = structured_layers()
    full = cka_matrix(feats, debiased=True)
    assert full.min() < 0.8  # the layers are not all alike
    for batch in (32, 128, 512):
        acc = MinibatchCKA()
        for start in range(0, 2048, batch):
            acc.update([f[start : start + batch] for f in feats])
        assert acc.num_batches == 2048 // batch
        assert (acc.compute() - full).abs().max().item() < 0.02, batch
    # the naive alternative, averaging per-batch *biased* CKA at batch 32, is off by more
    naive = torch.stack([cka_matrix([f[s : s + 32] for f in feats]) for s in range(0, 2048, 32)]).mean(dim=0)
    assert (naive - full).abs().max().item() > 0.03  # would fail the 0.02 bound above


def test_minibatch_cka_mean_of_unequal_batches_by_hand_and_reset():
    feats = layers(n=30)
    values = list(feats.values())
    first, second = [v[:12] for v in values], [v[12:] for v in values]
    acc = MinibatchCKA()
    acc.update(first)
    acc.update(second)

    def hsic(a, b):
        a = a.reshape(a.shape[0], -1).double().numpy()
        b = b.reshape(b.shape[0], -1).double().numpy()
        return np_hsic_unbiased(a @ a.T, b @ b.T)

    expected = np.array(
        [[(hsic(first[i], first[j]) + hsic(second[i], second[j])) / 2 for j in range(4)] for i in range(4)]
    )
    expected = expected / np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=0, atol=1e-10)
    acc.reset()
    assert acc.num_batches == 0
    with pytest.raises(RuntimeError, match="update"):
        acc.compute()
    acc.update(second)
    torch.testing.assert_close(acc.compute(), cka_matrix(second, debiased=True), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="layers"):
        acc.update(second[:2])
    with pytest.raises(ValueError, match="layers"):
        acc.update(dict(zip("wxyz", second, strict=True)))
    with pytest.raises(ValueError, match="at least 4"):
        acc.update([v[:3] for v in values])


# ---------------------------------------------------------------- RBF CKA


def test_rbf_cka_matches_numpy_reference():
    x, y = related_pair(40, 10, 30, seed=10)
    for sigma in (0.5, 0.8, 2.0):
        expected = np_cka_from_grams(np_rbf_gram(x, sigma), np_rbf_gram(y, sigma), np_hsic_biased)
        assert rbf_cka(x, y, sigma=sigma).item() == pytest.approx(expected, abs=1e-10)
    # odd number of pairs: 35 * 34 / 2 = 595, the median is a single distance
    assert rbf_cka(x[:35], y[:35]).item() == pytest.approx(
        np_cka_from_grams(np_rbf_gram(x[:35], 0.8), np_rbf_gram(y[:35], 0.8), np_hsic_biased), abs=1e-10
    )


def test_rbf_cka_identity_and_invariances():
    g = torch.Generator().manual_seed(11)
    x, y = related_pair(36, 12, 7, seed=11)
    assert rbf_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    base = rbf_cka(x, y).item()
    assert 0.05 < base < 0.99
    q = random_orthogonal(12, g)
    for transformed in (x @ q, 4.0 * x, x - 50.0):
        assert rbf_cka(transformed, y).item() == pytest.approx(base, abs=1e-9)
    assert rbf_cka(y, x).item() == pytest.approx(base, abs=1e-12)


def test_rbf_cka_constant_layer_nan_and_bad_sigma():
    y, _ = related_pair(20, 5, 5)
    with pytest.warns(RuntimeWarning, match="median"):
        assert torch.isnan(rbf_cka(torch.ones(20, 4), y))
    with pytest.raises(ValueError, match="sigma"):
        rbf_cka(y, y, sigma=0)


# ---------------------------------------------------------------- RDM and RSA


def test_rdm_correlation_matches_numpy_and_is_a_dissimilarity():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(15, 3, 4, generator=g)
    x[3] = 2 * x[1] + 5  # the same pattern up to an affine map
    d = rdm(x)
    assert d.shape == (15, 15) and d.dtype == torch.float64
    flat = x.reshape(15, -1).double().numpy()
    np.testing.assert_allclose(d.numpy(), 1 - np.corrcoef(flat), rtol=0, atol=1e-12)
    torch.testing.assert_close(d, d.T, rtol=0, atol=0)
    assert torch.all(d.diagonal() == 0)
    assert d[1, 3].item() == pytest.approx(0.0, abs=1e-12)
    assert d.min() >= 0 and d.max() <= 2


def test_rdm_euclidean_matches_scipy_pdist():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(20, 7, generator=g, dtype=torch.float64) + 10.0
    d = rdm(x, metric="euclidean")
    expected = scipy_spatial.squareform(scipy_spatial.pdist(x.numpy()))
    np.testing.assert_allclose(d.numpy(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d, d.T, rtol=0, atol=0)
    assert torch.all(d.diagonal() == 0)


def test_rdm_constant_pattern_and_bad_metric():
    x = torch.randn(5, 6)
    x[2] = 3.0
    with pytest.warns(RuntimeWarning, match="constant"):
        d = rdm(x)
    assert torch.isnan(d[2]).all() and torch.isfinite(d[[0, 1, 3, 4]][:, [0, 1, 3, 4]]).all()
    with pytest.raises(ValueError, match="metric"):
        rdm(x, metric="cosine")


def upper(d: torch.Tensor) -> np.ndarray:
    rows, cols = np.triu_indices(d.shape[0], k=1)
    return d.numpy()[rows, cols]


def np_tau_a(a: np.ndarray, b: np.ndarray) -> float:
    m = a.size
    concordance = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    return float(np.triu(concordance, k=1).sum()) / (m * (m - 1) / 2)


def rdm_pair(n: int = 24, seed: int = 14, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, 6, generator=g, dtype=torch.float64) + 2 * torch.randn(
        n, 6, generator=g, dtype=torch.float64
    )
    a, b = rdm(x), rdm(y, metric="euclidean")
    if ties:
        a, b = (a * 4).round() / 4, b.round()
    return a, b


@pytest.mark.parametrize("ties", [False, True])
def test_rsa_spearman_and_pearson_match_scipy(ties):
    a, b = rdm_pair(ties=ties)
    ua, ub = upper(a), upper(b)
    if ties:
        assert len(np.unique(ua)) < len(ua) / 10  # heavy ties
    spearman = rsa(a, b)
    assert spearman.shape == () and spearman.dtype == torch.float64
    assert spearman.item() == pytest.approx(stats.spearmanr(ua, ub).statistic, abs=1e-12)
    assert rsa(a, b, method="pearson").item() == pytest.approx(stats.pearsonr(ua, ub).statistic, abs=1e-12)
    assert 0.1 < spearman.item() < 0.95


@pytest.mark.parametrize("ties", [False, True])
def test_rsa_tau_a_matches_hand_reference_and_scipy_without_ties(ties, monkeypatch):
    a, b = rdm_pair(n=20, ties=ties)
    ua, ub = upper(a), upper(b)
    expected = np_tau_a(ua, ub)
    assert rsa(a, b, method="tau_a").item() == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(similarity, "_TAU_CHUNK_ELEMENTS", 1000)  # many small, unevenly sized blocks
    assert rsa(a, b, method="tau_a").item() == pytest.approx(expected, abs=1e-12)
    tau_b = stats.kendalltau(ua, ub).statistic
    if ties:
        assert abs(expected) < abs(tau_b)  # tau-a counts tied pairs as 0 in the numerator only
    else:
        assert expected == pytest.approx(tau_b, abs=1e-12)


def test_rsa_identity_monotone_and_errors():
    a, _ = rdm_pair(n=12)
    for method in ("spearman", "tau_a"):
        assert rsa(a, a.sqrt(), method=method).item() == pytest.approx(1.0, abs=1e-12)
        assert rsa(a, -a, method=method).item() == pytest.approx(-1.0, abs=1e-12)
    with pytest.raises(ValueError, match="method"):
        rsa(a, a, method="kendall")
    with pytest.raises(ValueError, match="square"):
        rsa(a, a[:, :5])
    nan_rdm = a.clone()
    nan_rdm[0, 1] = nan_rdm[1, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="NaN"):
        assert torch.isnan(rsa(a, nan_rdm))


def test_warnings_point_at_the_caller():
    with pytest.warns(RuntimeWarning) as record:
        linear_cka(torch.ones(8, 3), torch.randn(8, 3))
        cka_matrix([torch.ones(8, 3), torch.randn(8, 3)])
    assert [w.filename for w in record] == [__file__, __file__]


def test_no_warning_on_healthy_input():
    x, y = related_pair(30, 8, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_cka(x, y, debiased=True)
        cka_matrix([x, y])
        rbf_cka(x, y)
        rsa(rdm(x), rdm(y))


@pytest.mark.parametrize("method", ["spearman", "pearson", "tau_a"])
def test_rsa_matrix_equals_rsa_pair_by_pair(method):
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(12) % 3
    rdms = {
        "a": rdm(torch.randn(12, 7, generator=g)),
        "b": rdm(torch.randn(12, 30, generator=g), metric="euclidean"),
        "labels": (labels[:, None] != labels[None, :]).double(),  # two values only: heavy ties
    }
    matrix = rsa_matrix(rdms, method=method)
    values = list(rdms.values())
    for i in range(3):
        for j in range(3):
            expected = 1.0 if i == j else rsa(values[i], values[j], method=method).item()
            assert matrix[i, j].item() == pytest.approx(expected, abs=1e-12), (i, j)


def test_rsa_matrix_marks_broken_rdms_nan_and_checks_shapes():
    good = rdm(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)))
    with_nan = good.clone()
    with_nan[0, 1] = with_nan[1, 0] = float("nan")
    constant = torch.ones(8, 8) - torch.eye(8)
    with pytest.warns(RuntimeWarning, match=r"NaN|constant"):
        matrix = rsa_matrix([good, with_nan, constant, good.sqrt()])
    assert torch.isnan(matrix[1]).all() and torch.isnan(matrix[:, 2]).all()
    assert matrix[0, 3].item() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"same samples|equal shape"):
        rsa_matrix([good, good[:5, :5]])
    with pytest.raises(ValueError, match="equal shape"):
        rsa_matrix([good, good[:, :5]])
    with pytest.raises(ValueError, match="method"):
        rsa_matrix([good, good], method="kendall")


# ---------------------------------------------------------------- host syncs


def _census():
    """benchmarks/bench_cost.py's Census: counts aten ops and host syncs (dispatch-level and Python reads)."""
    root = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        from bench_cost import Census
    finally:
        sys.path.remove(str(root))
    return Census()


def _layers(count: int, n: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    layers = [torch.randn(n, 3 + i, generator=g) for i in range(count)]
    layers[1] = torch.ones(n, 4)  # a constant layer: degenerate CKA, an all-NaN correlation RDM
    return layers


def _syncs_of(work) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with _census() as census:
            work()
    return sum(census.syncs.values())


@pytest.mark.parametrize("warn", [True, False])
@pytest.mark.parametrize("method", ["spearman", "pearson", "tau_a"])
def test_the_similarity_functions_wait_for_the_device_as_often_for_2_as_for_5_layers(warn, method):
    # one sync for all the warnings at most (none without them); a per-layer or per-pair sync would grow with L
    def work(count: int) -> None:
        layers = _layers(count)
        similarity.normalized_grams(layers, debiased=True, warn=warn)
        rdms = [rdm(layer, warn=warn) for layer in layers[:1]]  # rdm is per layer: one call, count-independent
        rdms += [rdm(layer, metric="euclidean", warn=warn) for layer in layers[1:]]
        rsa_matrix(rdms, method=method, warn=warn)

    counts = [_syncs_of(lambda count=count: work(count)) for count in (2, 5)]
    assert counts[0] == counts[1], counts
    assert counts[0] == (3 if warn else 0), counts  # grams, the one rdm, rsa_matrix: one each when warning


def test_cka_matrix_waits_for_the_device_once_whatever_the_number_of_layers():
    assert _syncs_of(lambda: cka_matrix(_layers(2))) == _syncs_of(lambda: cka_matrix(_layers(5))) == 1


def test_normalized_grams_without_warning_give_the_same_rows_a_constant_layer_nan_throughout():
    layers = _layers(4)
    with pytest.warns(RuntimeWarning, match=r"Layer\(s\) 1 has zero self-similarity"):
        warned = similarity.normalized_grams(layers, debiased=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = similarity.normalized_grams(layers, debiased=True, warn=False)
    assert torch.equal(quiet.nan_to_num(nan=7.0), warned.nan_to_num(nan=7.0))
    assert quiet.isnan().all(dim=1).tolist() == [False, True, False, False]


def test_rdm_without_warning_marks_constant_patterns_on_its_diagonal():
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    x[[2, 5]] = 3.0
    with pytest.warns(RuntimeWarning, match="2 pattern"):
        warned = rdm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = rdm(x, warn=False)
    assert torch.equal(quiet.nan_to_num(nan=7.0), warned.nan_to_num(nan=7.0))
    assert quiet.diagonal().isnan().nonzero().flatten().tolist() == [2, 5]
    assert torch.isnan(quiet[2]).all() and torch.isnan(quiet[:, 5]).all() and not torch.isnan(quiet[0, 1])


@pytest.mark.parametrize("method", ["spearman", "pearson", "tau_a"])
def test_rsa_matrix_without_warning_gives_the_same_matrix_undefined_rdms_nan_on_the_diagonal(method):
    good = rdm(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)))
    with_nan = good.clone()
    with_nan[0, 1] = with_nan[1, 0] = float("nan")
    constant = torch.ones(8, 8) - torch.eye(8)
    rdms = {"good": good, "with_nan": with_nan, "constant": constant, "root": good.sqrt()}
    with pytest.warns(RuntimeWarning) as record:
        warned = rsa_matrix(rdms, method=method)
    messages = [str(w.message) for w in record]
    assert messages[0] == "RDM(s) with_nan hold NaN (constant patterns?); their RSA is NaN."
    if method != "tau_a":  # tau-a needs no spread: a constant RDM has ties only, its tau-a with anything is 0
        assert messages[1:] == ["The upper triangle of RDM(s) constant is constant; their correlation is NaN."]
    assert [w.filename for w in record] == [__file__] * len(record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = rsa_matrix(rdms, method=method, warn=False)
    assert torch.equal(quiet.nan_to_num(nan=7.0), warned.nan_to_num(nan=7.0))
    expected = [False, True, method != "tau_a", False]
    assert quiet.diagonal().isnan().tolist() == expected
