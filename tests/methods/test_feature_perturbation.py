"""Feature ablation, feature permutation and Shapley value sampling against Captum (same masks, the same batch
permutations through ``perm_func``, the same orderings through ``permutation_generator``), plus analytic cases:
a linear model's ablation is ``w (x - baseline)`` per feature, an additive model's sampled Shapley values are its
terms at any seed, and every Shapley estimate is efficient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_interp.methods import attribute, feature_ablation, feature_permutation, shapley_value_sampling
from lightning_interp.methods.perturbation.features import _batch_permutations, _exact_shapley, _orderings

captum = pytest.importorskip("captum.attr")

DTYPES = [torch.float32, torch.float64]


def _cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 5),
        )
        .eval()
        .to(dtype)
    )


def _images(batch: int = 3, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _patches(side: int = 2, size: int = 8) -> torch.Tensor:
    """(1, 1, size, size) ids of square patches, row by row."""
    per_row = size // side
    ids = torch.arange(per_row * per_row).reshape(per_row, per_row)
    return ids.repeat_interleave(side, 0).repeat_interleave(side, 1)[None, None]


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the largest attribution: float32 scores are subtracted, so single entries carry its rounding."""
    if theirs.dtype == torch.float32 and ours.dtype == torch.float64:  # Captum's Shapley classes sum in float32
        theirs, dtype = theirs.double(), torch.float32
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=(1e-5 if dtype == torch.float32 else 1e-12) * scale)


class _Additive(nn.Module):
    """``f(x) = sum_g tanh(sum of x over group g) * c_g + bias`` per class: additive over the mask's groups."""

    def __init__(self, mask: torch.Tensor, classes: int = 3) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        groups = int(mask.max()) + 1
        self.scale = nn.Parameter(torch.randn(classes, groups, generator=torch.Generator().manual_seed(5)))
        self.bias = nn.Parameter(torch.randn(classes, generator=torch.Generator().manual_seed(6)))

    def group_sums(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.mask.expand_as(x).reshape(x.shape[0], -1)
        sums = torch.zeros(x.shape[0], self.scale.shape[1], dtype=x.dtype)
        return sums.scatter_add(1, ids, x.reshape(x.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.group_sums(x)) @ self.scale.T.to(x.dtype) + self.bias.to(x.dtype)


# --------------------------------------------------------------------------- feature ablation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["patches", "per-sample", "elements"])
def test_feature_ablation_matches_captum(dtype, mask_kind):
    model, x = _cnn(dtype), _images(dtype=dtype)
    baseline = torch.linspace(-0.5, 0.5, 3, dtype=dtype).reshape(1, 3, 1, 1)
    mask = {
        "patches": _patches(),
        "per-sample": torch.stack([_patches(2)[0], _patches(4)[0], (_patches(2)[0] + 3) % 16]),
        "elements": torch.arange(3 * 64).reshape(1, 3, 8, 8),
    }[mask_kind]
    target = torch.tensor([0, 3, 1])
    ours = feature_ablation(model, x, target, feature_mask=mask, baseline=baseline, internal_batch_size=20)
    theirs = captum.FeatureAblation(model).attribute(x, target=target, feature_mask=mask, baselines=baseline)
    _close(ours, theirs, dtype)


def test_feature_ablation_of_a_linear_model_is_weight_times_difference_per_feature():
    torch.manual_seed(2)
    linear = nn.Linear(12, 4).double()
    x, baseline = torch.randn(5, 12, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)
    mask = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 4, 4, 0, 5])
    ours = feature_ablation(linear, x, 2, feature_mask=mask, baseline=baseline)
    terms = linear.weight[2].detach() * (x - baseline)
    expected = torch.stack([terms[:, mask == g].sum(dim=1) for g in range(6)], dim=1)[:, mask]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_feature_ablation_default_features_are_the_lime_patches_for_images():
    model, x = _cnn(), _images()
    default = feature_ablation(model, x, 1)
    torch.testing.assert_close(default, feature_ablation(model, x, 1, feature_mask=_patches(2)), rtol=0, atol=0)
    assert default[:, :, :2, :2].unique(dim=-1).shape[-1] == 1  # one value per 2 x 2 patch (ceil(8 / 4))


# --------------------------------------------------------------------------- feature permutation


def _captum_permutation(model, x, target, mask, perms):
    queue = iter(perms)

    def perm_func(values: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:  # our permutations, in feature order
        return torch.where(chosen, values[next(queue)], values)

    return captum.FeaturePermutation(model, perm_func=perm_func).attribute(x, target=target, feature_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [2, 5])
def test_feature_permutation_matches_captum_with_the_same_permutations(dtype, batch):
    model, x = _cnn(dtype), _images(batch, dtype)
    mask = _patches(4)  # 4 features
    ours = feature_permutation(model, x, 2, feature_mask=mask, generator=torch.Generator().manual_seed(7))
    perms = _batch_permutations(4, batch, torch.Generator().manual_seed(7), x)
    assert not (perms == torch.arange(batch)).all(dim=1).any()  # never the identity
    _close(ours, _captum_permutation(model, x, 2, mask, perms), dtype)


def test_feature_permutation_of_two_samples_swaps_them():
    torch.manual_seed(3)
    linear = nn.Linear(6, 3).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    mask = torch.tensor([0, 0, 1, 1, 2, 2])
    for seed in range(3):  # the only non-identity permutation of two: deterministic
        ours = feature_permutation(linear, x, 1, feature_mask=mask, generator=torch.Generator().manual_seed(seed))
        terms = linear.weight[1].detach() * (x - x.flip(0))
        expected = torch.stack([terms[:, mask == g].sum(dim=1) for g in range(3)], dim=1)[:, mask]
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_feature_permutation_refuses_one_sample_and_per_sample_masks():
    model = _cnn()
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_permutation(model, _images(1), 0)
    per_sample = _patches(4).expand(3, 1, 8, 8)
    with pytest.raises(ValueError, match="one for the whole batch"):
        feature_permutation(model, _images(3), 0, feature_mask=per_sample)


def test_feature_permutation_is_seeded_chunk_independent_and_leaves_the_global_rng_alone():
    model, x = _cnn(), _images(4)
    state = torch.get_rng_state()
    first = feature_permutation(model, x, 1, generator=torch.Generator().manual_seed(1))
    again = feature_permutation(model, x, 1, generator=torch.Generator().manual_seed(1), internal_batch_size=3)
    other = feature_permutation(model, x, 1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(first, again, rtol=0, atol=1e-6)
    assert not torch.allclose(first, other)


# --------------------------------------------------------------------------- Shapley value sampling


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapley_value_sampling_matches_captum_with_the_same_orderings(dtype):
    model, x = _cnn(dtype), _images(dtype=dtype)
    mask, n_samples = _patches(2), 3  # 16 features: sampled (2**16 coalitions are dearer than 3 * 15 forwards)
    assert not _exact_shapley(16, n_samples)
    target = torch.tensor([4, 0, 2])
    ours = shapley_value_sampling(
        model,
        x,
        target,
        n_samples=n_samples,
        feature_mask=mask,
        baseline=0.2,
        generator=torch.Generator().manual_seed(9),
    )
    orders = _orderings(n_samples, 16, torch.Generator().manual_seed(9), x)
    method = captum.ShapleyValueSampling(model)
    method.permutation_generator = lambda features, samples: iter(orders.tolist())
    theirs = method.attribute(x, target=target, feature_mask=mask, n_samples=n_samples, baselines=0.2)
    assert theirs.dtype == torch.float32  # Captum's quirk: it sums the contributions in float32 whatever the inputs
    _close(ours, theirs, dtype)


@pytest.mark.parametrize("features", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_few_features_give_the_exact_shapley_values_of_captums_shapley_values_at_any_seed(features, seed):
    model, x = _cnn(torch.float64), _images(dtype=torch.float64)
    mask = (_patches(2) % features).expand(1, 3, 8, 8).clone()
    mask[:, 1] = (mask[:, 1] + 1) % features  # groups spread over channels and positions
    assert _exact_shapley(features, 25)
    ours = shapley_value_sampling(model, x, 1, feature_mask=mask, generator=torch.Generator().manual_seed(seed))
    theirs = captum.ShapleyValues(model).attribute(x, target=1, feature_mask=mask)  # every one of the F! orderings
    _close(ours, theirs, torch.float64)


def test_the_exact_switch_is_where_coalitions_are_no_dearer_than_orderings():
    assert _exact_shapley(7, 25) and not _exact_shapley(8, 25)  # 126 <= 150; 254 > 175
    assert not _exact_shapley(3, 2) and _exact_shapley(3, 3)  # 6 > 4; 6 <= 6
    assert all(2**f - 2 <= 25 * (f - 1) for f in range(2, 8))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_samples", [1, 4])
def test_additive_model_gets_its_terms_at_any_seed(seed, n_samples):
    mask = _patches(2)  # 16 groups: sampled
    model = _Additive(mask).double()
    x, baseline = _images(4, torch.float64, seed=seed), torch.full((1, 3, 8, 8), 0.1, dtype=torch.float64)
    ours = shapley_value_sampling(
        model, x, 2, n_samples=n_samples, feature_mask=mask, baseline=baseline,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    with torch.no_grad():
        terms = (torch.tanh(model.group_sums(x)) - torch.tanh(model.group_sums(baseline))) * model.scale[2]
    expected = terms[:, mask.expand(4, 3, 8, 8).reshape(4, -1)].diagonal().T.reshape(4, 3, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_shapley_value_sampling_is_efficient_exactly(n_samples):
    model, x = _cnn(torch.float64), _images(dtype=torch.float64)
    ours = shapley_value_sampling(model, x, 3, n_samples=n_samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        change = model(x)[:, 3] - model(torch.zeros_like(x))[:, 3]
    per_feature = ours[:, 0, ::2, ::2].reshape(3, -1)  # one entry per 2 x 2 patch (every channel carries it)
    torch.testing.assert_close(per_feature.sum(dim=1), change, rtol=0, atol=1e-12)


def test_shapley_value_sampling_is_seeded_chunk_independent_batch_independent_and_leaves_the_global_rng_alone():
    model, x = _cnn(), _images(4)
    state = torch.get_rng_state()

    def run(inputs, seed=1, **options):
        generator = torch.Generator().manual_seed(seed)
        return shapley_value_sampling(model, inputs, 1, n_samples=2, generator=generator, **options)

    first = run(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(run(x, internal_batch_size=5), first, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(x[1:3]), first[1:3], rtol=0, atol=1e-6)  # one ordering serves the whole batch
    assert not torch.allclose(run(x, seed=2), first)


def test_per_sample_masks_with_a_feature_missing_from_one_sample_match_captums_shapley_values():
    model, x = _cnn(torch.float64), _images(2, torch.float64)
    mask = torch.stack([_patches(4)[0], _patches(4)[0] % 3])  # sample 1 has no feature 3
    ours = shapley_value_sampling(model, x, 0, feature_mask=mask)
    theirs = captum.ShapleyValues(model).attribute(x, target=0, feature_mask=mask)
    _close(ours, theirs, torch.float64)
    with torch.no_grad():
        change = model(x)[:, 0] - model(torch.zeros_like(x))[:, 0]
    sums = [sum(ours[b, 0][mask[b, 0] == g][0] for g in mask[b].unique()) for b in (0, 1)]  # one value per feature
    torch.testing.assert_close(torch.stack(sums), change, rtol=0, atol=1e-12)


def test_registered_with_options_and_reject_bad_arguments():
    model, x = _cnn(), _images()
    shape = attribute("shapley_value_sampling", model, x, 0, n_samples=1, generator=torch.Generator()).shape
    assert shape == x.shape
    with pytest.raises(ValueError, match="n_samples"):
        shapley_value_sampling(model, x, 0, n_samples=0)
    with pytest.raises(ValueError, match="feature_mask"):
        feature_ablation(model, x, 0, feature_mask=torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="baseline"):
        feature_ablation(model, x, 0, baseline=torch.zeros(5))
    with pytest.raises(TypeError, match="generator"):
        feature_permutation(model, x, 0, generator=1)
    assert math.isfinite(float(feature_ablation(model, x.double().float(), None).sum()))
