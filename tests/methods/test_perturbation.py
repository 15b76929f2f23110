"""Occlusion, LIME, KernelSHAP and GradientSHAP against Captum (same windows, same coalitions, same random draws),
on torchvision networks with random weights and a hand-built ReLU CNN, plus analytic cases and the contract."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods.attribution.gradient import _gradient_shap_draws, gradient_shap
from lightning_interp.methods.model.batching import sample_noise
from lightning_interp.methods.perturbation.ablation import (
    _shapley_coalitions,
    kernel_shap,
    lime,
    occlusion,
    patch_feature_mask,
)

torchvision = pytest.importorskip("torchvision")
captum = pytest.importorskip("captum.attr")
linear_models = pytest.importorskip("captum._utils.models.linear_model")

DTYPES = [torch.float32, torch.float64]
_NETWORKS: dict[tuple[str, torch.dtype], nn.Module] = {}


def _network(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A torchvision network with random weights, or the hand-built ReLU CNN; built once per session and dtype (the
    float64 copy has the float32 one's weights)."""
    if (name, dtype) in _NETWORKS:
        return _NETWORKS[name, dtype]
    if dtype != torch.float32:
        _NETWORKS[name, dtype] = copy.deepcopy(_network(name)).to(dtype)
        return _NETWORKS[name, dtype]
    torch.manual_seed(0)
    if name == "cnn":
        _NETWORKS[name, dtype] = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 5),
        ).eval()
    else:
        _NETWORKS[name, dtype] = getattr(torchvision.models, name)(num_classes=5).eval()
    return _NETWORKS[name, dtype]


@pytest.fixture(autouse=True, scope="module")
def _free_networks():
    """Drop the cached networks (vgg11 in float64 is about 1 GB) when this module is done."""
    yield
    _NETWORKS.clear()


def _images(size: int = 32, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, size, size, dtype=dtype)


def _tolerance(dtype: torch.dtype, reference: torch.Tensor, relative: float) -> dict[str, float]:
    """Relative to the reference's largest attribution (single entries can be ~0)."""
    scale = float(reference.abs().max())
    return {"rtol": 0.0, "atol": relative * scale}


class _Flat(nn.Module):
    """A linear model on the flattened input: the exact answer of every method is known."""

    def __init__(self, shape: tuple[int, ...], classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(math.prod(shape), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))

    def weight(self, target: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return self.linear.weight.detach()[target].reshape(-1, *shape)


def _feature_values(attributions: torch.Tensor, mask: torch.Tensor, features: int) -> torch.Tensor:
    """(B, F): each feature's attribution (every element of a feature carries the same value)."""
    mask = mask.expand_as(attributions).reshape(attributions.shape[0], -1)
    flat = attributions.reshape(attributions.shape[0], -1)
    values = torch.zeros(attributions.shape[0], features, dtype=flat.dtype).scatter_reduce(
        1, mask, flat, "amax", include_self=False
    )
    low = torch.zeros_like(values).scatter_reduce(1, mask, flat, "amin", include_self=False)
    assert torch.equal(values, low), "every element of a feature carries the same attribution"
    return values


def _linear_feature_shares(model: _Flat, x, target, baseline, mask, features) -> torch.Tensor:
    """(B, F): sum over each feature of w * (x - baseline), the exact attribution of a linear model."""
    contribution = (model.weight(target, x.shape[1:]) * (x - baseline)).double()
    ids = mask.expand_as(x).reshape(x.shape[0], -1)
    return torch.zeros(x.shape[0], features, dtype=torch.float64).scatter_add(1, ids, contribution.reshape(len(x), -1))


# --------------------------------------------------------------------------- occlusion


def _occlusion_loop(model, x, target, window, stride, baseline=0.0) -> torch.Tensor:
    """Captum's semantics written out: positions 0, s, ... up to the first window reaching the edge (cut there),
    each pixel the mean over its windows of score(x) - score(occluded)."""
    _, _, height, width = x.shape
    with torch.no_grad():
        clean = model(x).gather(1, target[:, None])[:, 0]
        total = torch.zeros_like(x)
        count = torch.zeros_like(x)
        for i in range(math.ceil((height - window[0]) / stride[0]) + 1):
            for j in range(math.ceil((width - window[1]) / stride[1]) + 1):
                rows = slice(i * stride[0], i * stride[0] + window[0])
                cols = slice(j * stride[1], j * stride[1] + window[1])
                occluded = x.clone()
                occluded[:, :, rows, cols] = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)[:, :, rows, cols]
                drop = clean - model(occluded).gather(1, target[:, None])[:, 0]
                total[:, :, rows, cols] += drop[:, None, None, None]
                count[:, :, rows, cols] += 1
    return total / count


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("network", ["resnet18", "vgg11"])
def test_occlusion_matches_captum_on_torchvision_networks(network, dtype):
    model = _network(network, dtype)
    x = _images(dtype=dtype)
    target = torch.tensor([1, 3])
    # overlapping windows that do not tile 32: the last row and column of windows are cut at the edge
    ours = occlusion(model, x, target, window=(12, 10), stride=(9, 8))
    theirs = captum.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, 12, 10), strides=(3, 9, 8), target=target, perturbations_per_eval=32
    )
    assert ours.dtype == dtype
    # Captum divides by the window counts in float32 (float64 inputs give float32 attributions)
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **_tolerance(dtype, theirs, 1e-6))
    assert float(theirs.abs().max()) > 0


@pytest.mark.parametrize(
    ("window", "stride"),
    [((4, 4), (4, 4)), ((5, 3), (2, 3)), ((7, 7), (7, 6)), ((16, 6), (1, 5)), ((16, 16), (3, 3)), ((1, 1), (1, 1))],
)
def test_occlusion_matches_captum_and_a_float64_loop_on_a_relu_cnn(window, stride):
    x = _images(16, batch=3, dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    baseline = torch.linspace(-1, 1, 3, dtype=torch.float64).reshape(1, 3, 1, 1)
    model = _network("cnn", torch.float64)
    ours = occlusion(model, x, target, window=window, stride=stride, baseline=baseline)
    torch.testing.assert_close(ours, _occlusion_loop(model, x, target, window, stride, baseline), rtol=0, atol=1e-12)
    model32, x32 = _network("cnn"), x.float()
    theirs = captum.Occlusion(model32).attribute(
        x32, sliding_window_shapes=(3, *window), strides=(3, *stride), baselines=baseline.float(), target=target
    )
    ours32 = occlusion(model32, x32, target, window=window, stride=stride, baseline=baseline.float())
    torch.testing.assert_close(ours32, theirs, **_tolerance(torch.float32, theirs, 1e-6))


def test_occlusion_of_a_linear_model_is_the_window_sum_of_weight_times_difference():
    model = _Flat((2, 8, 8))
    x = torch.randn(3, 2, 8, 8)
    target = torch.tensor([2, 0, 1])
    baseline = torch.tensor([0.5, -0.25]).reshape(1, 2, 1, 1)
    contribution = model.weight(target, (2, 8, 8)) * (x - baseline)
    # non-overlapping 4 x 4 windows: every pixel gets its window's sum over the window and the channels
    window_sums = contribution.sum(dim=1).reshape(3, 2, 4, 2, 4).sum(dim=(2, 4))
    expected = window_sums.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)[:, None].expand_as(x)
    attr = occlusion(model, x, target, window=4, baseline=baseline)
    torch.testing.assert_close(attr, expected, rtol=1e-5, atol=1e-5)
    # overlapping 4 x 4 windows at stride 2: each pixel averages the sums of the windows covering it
    attr = occlusion(model, x, target, window=4, stride=2, baseline=baseline)
    sums = nn.functional.avg_pool2d(contribution.sum(dim=1, keepdim=True), 4, stride=2) * 16  # (3, 1, 3, 3)
    total = nn.functional.conv_transpose2d(sums, torch.ones(1, 1, 4, 4), stride=2)
    count = nn.functional.conv_transpose2d(torch.ones_like(sums), torch.ones(1, 1, 4, 4), stride=2)
    torch.testing.assert_close(attr, (total / count).expand_as(x), rtol=1e-5, atol=1e-5)


def test_occlusion_default_window_is_an_eight_by_eight_grid():
    model = _Flat((1, 16, 16))
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(occlusion(model, x, 1), occlusion(model, x, 1, window=2, stride=2))
    # equal within each 2 x 2 window, different between windows
    attr = occlusion(model, x, 1)
    assert torch.equal(attr[:, :, ::2, ::2], attr[:, :, 1::2, 1::2])
    assert not torch.equal(attr[:, :, 0, 0], attr[:, :, 0, 2])


@pytest.mark.parametrize("internal_batch_size", [1, 5, 7, 10_000])
def test_occlusion_chunking_does_not_change_the_result(internal_batch_size):
    model, x = _network("cnn"), _images(16, batch=3)
    whole = occlusion(model, x, None, window=5, stride=3)
    chunked = occlusion(model, x, None, window=5, stride=3, internal_batch_size=internal_batch_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_occlusion_rejects_bad_arguments():
    model, x = _network("cnn"), _images(16)
    with pytest.raises(ValueError, match=r"images of shape \(B, C, H, W\)"):
        occlusion(nn.Linear(5, 2), torch.randn(3, 5), 0)
    with pytest.raises(ValueError, match="larger than the inputs' spatial size"):
        occlusion(model, x, 0, window=(17, 4))
    with pytest.raises(ValueError, match="stride 5 is larger than the window 4"):
        occlusion(model, x, 0, window=4, stride=(2, 5))
    with pytest.raises(ValueError, match="stride must be positive"):
        occlusion(model, x, 0, window=4, stride=0)
    with pytest.raises(ValueError, match="window must be an int or a pair"):
        occlusion(model, x, 0, window=(4, 4, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        occlusion(model, x, 0, window=4, baseline=torch.zeros(5, 1, 1))
    with pytest.raises(ValueError, match="internal_batch_size"):
        occlusion(model, x, 0, window=4, internal_batch_size=0)
    with pytest.raises(ValueError, match="target"):
        occlusion(model, x, 7, window=4)


def test_occlusion_on_uint8_images_runs_the_model_on_uint8_and_returns_float32():
    class Pixels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _Flat((1, 8, 8))

        def forward(self, x):
            assert x.dtype == torch.uint8
            return self.inner(x.float() / 255)

    model = Pixels()
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    attr = occlusion(model, x, 0, window=4)
    assert attr.dtype == torch.float32
    expected = occlusion(model.inner, x.float() / 255, 0, window=4)
    torch.testing.assert_close(attr, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LIME and KernelSHAP against Captum


def _lime_coalitions(seed: int, n_samples: int, features: int) -> torch.Tensor:
    """The coalitions ``lime`` draws with a generator seeded ``seed`` (documented: rand < 1/2 per feature)."""
    return torch.rand((n_samples, features), generator=torch.Generator().manual_seed(seed)) < 0.5


def _replay(coalitions: torch.Tensor, full_and_empty: bool = False):
    """A Captum ``perturb_func`` yielding these coalitions (a fresh generator per example, as Captum asks)."""

    def perturb(_inputs, **_kwargs):
        features = coalitions.shape[1]
        if full_and_empty:  # what Captum's KernelShap yields first
            yield torch.ones(1, features, dtype=torch.long)
            yield torch.zeros(1, features, dtype=torch.long)
        for row in coalitions:
            yield row[None].long()

    return perturb


CASES = {  # network, image size, feature mask (None: the default 4 x 4 grid of 8-pixel patches)
    "resnet18": ("resnet18", 32, None),
    "cnn_per_sample_mask": ("cnn", 16, "per_sample"),
}


def _case(name: str, dtype: torch.dtype):
    network, size, mask_kind = CASES[name]
    model, x = _network(network, dtype), _images(size, dtype=dtype)
    if mask_kind is None:
        return model, x, None, patch_feature_mask(size, size, size // 4), 16
    torch.manual_seed(3)
    masks = torch.stack([torch.randperm(12).repeat_interleave(math.ceil(size * size / 12))[: size * size]] * 2)
    masks[1] = masks[1].flip(0)
    mask = masks.reshape(2, 1, size, size)
    return model, x, mask, mask, 12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_lime_matches_captum_with_the_same_coalitions(case, dtype):
    model, x, feature_mask, mask, features = _case(case, dtype)
    target = torch.tensor([1, 3])
    baseline = 0.1
    ours = lime(
        model, x, target, n_samples=48, feature_mask=feature_mask, baseline=baseline,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    method = captum.Lime(
        model,
        interpretable_model=linear_models.SkLearnLinearRegression(),
        perturb_func=_replay(_lime_coalitions(5, 48, features)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's note about explaining several examples at once
        theirs = method.attribute(
            x, baselines=baseline, target=target, n_samples=48, feature_mask=mask, perturbations_per_eval=48
        )
    assert ours.dtype == dtype
    # Captum fits in float32 (sklearn), ours in float64
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **_tolerance(dtype, theirs, 2e-5))
    assert float(theirs.abs().max()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_shap_matches_captum_with_the_same_coalitions(case, dtype):
    model, x, feature_mask, mask, features = _case(case, dtype)
    target = torch.tensor([1, 3])
    ours = kernel_shap(
        model, x, target, n_samples=48, feature_mask=feature_mask, generator=torch.Generator().manual_seed(5)
    )
    coalitions = _shapley_coalitions(48, features, torch.Generator().manual_seed(5), torch.device("cpu"))
    method = captum.KernelShap(model)
    method.perturb_func = _replay(coalitions, full_and_empty=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = method.attribute(x, target=target, n_samples=50, feature_mask=mask, perturbations_per_eval=50)
    # Captum enforces efficiency with weights of 1e6 on the full and empty coalitions, in float32; ours exactly
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, **_tolerance(dtype, theirs, 1e-4))
    assert float(theirs.abs().max()) > 0


def test_shapley_coalitions_follow_the_kernel_size_distribution():
    features, draws = 6, 20_000
    coalitions = _shapley_coalitions(draws, features, torch.Generator().manual_seed(0), torch.device("cpu"))
    sizes = coalitions.sum(dim=1)
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= features - 1
    k = torch.arange(1, features, dtype=torch.float64)
    expected = (features - 1) / (k * (features - k))
    expected /= expected.sum()
    observed = torch.bincount(sizes, minlength=features)[1:].double() / draws
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.015)
    # within a size, every feature equally likely
    torch.testing.assert_close(coalitions.double().mean(dim=0), torch.full((features,), 0.5, dtype=torch.float64),
                               rtol=0, atol=0.015)  # fmt: skip


# --------------------------------------------------------------------------- LIME and KernelSHAP: analytic cases


@pytest.mark.parametrize("method", [lime, kernel_shap])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_model_weights_are_recovered_exactly(method, dtype):
    model = _Flat((3, 8, 8)).to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    target = torch.tensor([0, 2, 1, 2])
    baseline = torch.randn(1, 3, 8, 8, dtype=dtype)
    attr = method(model, x, target, n_samples=40, patch_size=3, baseline=baseline,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    mask = patch_feature_mask(8, 8, 3)  # 3 x 3 grid of patches, cut at the edges: 9 features
    values = _feature_values(attr, mask, 9)
    expected = _linear_feature_shares(model, x, target, baseline, mask, 9)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(values.double(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_shap_is_efficient_exactly(dtype):
    model = _network("cnn", dtype)
    x = _images(16, batch=3, dtype=dtype)
    baseline = 0.3
    for n_samples in (5, 60):  # also with fewer samples than features (a minimum-norm solve)
        attr = kernel_shap(model, x, None, n_samples=n_samples, patch_size=2, baseline=baseline,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        values = _feature_values(attr, patch_feature_mask(16, 16, 2), 64)
        with torch.no_grad():
            scores, null = model(x), model(torch.full_like(x, baseline))
        target = scores.argmax(dim=1, keepdim=True)
        change = (scores.gather(1, target) - null.gather(1, target))[:, 0].double()
        assert change.abs().min() > 1e-3
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(values.double().sum(dim=1), change, rtol=0, atol=tolerance)


class _Interacting(nn.Module):
    """Six inputs to two scores with products, a max and a tanh between the inputs: far from additive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0] * x[:, 3] + torch.tanh(x[:, 1] - 2 * x[:, 4]) + torch.maximum(x[:, 2], x[:, 5]) ** 2
        second = x[:, 0] * x[:, 1] * x[:, 2] - x[:, 5]
        return torch.stack([first, second], dim=1)


def _brute_force_shapley(model: nn.Module, x: torch.Tensor, baseline: torch.Tensor, groups: list[list[int]], target):
    """Shapley values of the feature groups from the definition: sum over coalitions S without i of
    |S|! (F - |S| - 1)! / F! (v(S + i) - v(S)), with v(S) the target score with the groups outside S at the baseline;
    float64, one sample at a time (B, F)."""
    features = len(groups)

    def value(sample: int, members: tuple[int, ...]) -> float:
        point = baseline[sample].clone()
        for group in members:
            point[groups[group]] = x[sample, groups[group]]
        with torch.no_grad():
            return float(model(point[None].double())[0, target])

    values = torch.zeros(x.shape[0], features, dtype=torch.float64)
    for sample in range(x.shape[0]):
        for i in range(features):
            others = [j for j in range(features) if j != i]
            for size in range(features):
                weight = math.factorial(size) * math.factorial(features - size - 1) / math.factorial(features)
                for members in itertools.combinations(others, size):
                    values[sample, i] += weight * (value(sample, (*members, i)) - value(sample, members))
    return values


@pytest.mark.parametrize("groups", [[[0, 1, 2], [3, 4, 5]], [[0, 3], [1], [2, 4, 5]], [[0], [1, 4], [2], [3, 5]]])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kernel_shap_with_few_features_gives_the_shapley_values_at_any_seed(groups, seed):
    torch.manual_seed(10)
    model = _Interacting()
    x, baseline = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    mask = torch.zeros(6, dtype=torch.long)
    for feature, members in enumerate(groups):
        mask[members] = feature
    features = len(groups)
    expected = _brute_force_shapley(model, x, baseline, groups, target=0)
    # n_samples = 2**F - 2 (the smallest budget that enumerates) and far more: the same exact answer
    for n_samples in (2**features - 2, 500):
        attr = kernel_shap(model, x, 0, n_samples=n_samples, feature_mask=mask, baseline=baseline,
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
        values = _feature_values(attr, mask[None], features)
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-12)


def test_kernel_shap_enumerates_in_float32_and_with_per_sample_masks():
    torch.manual_seed(10)
    model = _Interacting()
    x = torch.randn(2, 6)
    masks = torch.tensor([[0, 0, 1, 1, 2, 2], [1, 0, 1, 0, 1, 0]])  # 3 groups, and 2 groups (id 2 missing)
    attr = kernel_shap(model, x, 1, n_samples=6, feature_mask=masks)
    for sample, groups in ((0, [[0, 1], [2, 3], [4, 5]]), (1, [[1, 3, 5], [0, 2, 4]])):
        expected = _brute_force_shapley(model, x[sample : sample + 1].double(), torch.zeros(1, 6, dtype=torch.float64),
                                        groups, target=1)  # fmt: skip
        values = _feature_values(attr[sample : sample + 1], masks[sample : sample + 1], 3)[:, : len(groups)]
        torch.testing.assert_close(values.double(), expected, rtol=0, atol=1e-5)
    assert float(_feature_values(attr[1:], masks[1:], 3)[0, 2]) == 0.0


_captum_models = pytest.importorskip("captum.testing.helpers.basic_models")


@pytest.mark.parametrize(
    ("inputs", "options", "expected"),
    [  # Captum's own test_kernel_shap.py cases (their inputs, masks, baselines and expected values), 2 or 3 features
        ([[20.0, 50.0, 30.0]], {"n_samples": 500}, [[76.66666, 196.66666, 116.66666]]),
        ([[20.0, 50.0, 30.0]], {"feature_mask": [[0, 0, 1]]}, [[275.0, 275.0, 115.0]]),
        ([[20.0, 50.0, 30.0]], {"feature_mask": [[0, 0, 1]], "baseline": 4.0}, [[248.0, 248.0, 104.0]]),
        ([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]], {"n_samples": 2000},
         [[7.0, 32.5, 10.5], [76.66666, 196.66666, 116.66666]]),
        ([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]], {"feature_mask": [[0, 0, 1], [1, 1, 0]]},
         [[39.5, 39.5, 10.5], [275.0, 275.0, 115.0]]),
    ],
)  # fmt: skip
def test_kernel_shap_passes_captums_cases_at_every_seed(inputs, options, expected):
    model = _captum_models.BasicModel_MultiLayer()
    options = {"n_samples": 100, **options}  # Captum's helper's default n_samples
    if "feature_mask" in options:
        options["feature_mask"] = torch.tensor(options["feature_mask"])
    x = torch.tensor(inputs)
    for seed in range(20):
        attr = kernel_shap(model, x, 0, generator=torch.Generator().manual_seed(seed), **options)
        # Captum's tolerance is 1.0 (max abs); the exact answer meets their rounded expected values far closer
        torch.testing.assert_close(attr, torch.tensor(expected), rtol=0, atol=1e-4)


def test_kernel_shap_with_one_feature_gives_it_the_whole_change():
    model = _network("cnn")
    x = _images(16)
    attr = kernel_shap(model, x, 2, feature_mask=torch.zeros(16, 16, dtype=torch.long))
    with torch.no_grad():
        change = model(x)[:, 2] - model(torch.zeros_like(x))[:, 2]
    torch.testing.assert_close(attr, change[:, None, None, None].expand_as(x).contiguous())


@pytest.mark.parametrize("method", [lime, kernel_shap])
def test_seeded_generator_is_deterministic_and_leaves_the_global_rng_alone(method):
    model, x = _network("cnn"), _images(16)
    state = torch.random.get_rng_state()
    first = method(model, x, None, n_samples=20, generator=torch.Generator().manual_seed(3))
    again = method(model, x, None, n_samples=20, generator=torch.Generator().manual_seed(3))
    other = method(model, x, None, n_samples=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("method", [lime, kernel_shap])
def test_each_sample_is_explained_independently_of_the_batch(method):
    model, x = _network("cnn"), _images(16, batch=4)
    together = method(model, x, 1, n_samples=24, generator=torch.Generator().manual_seed(2))
    alone = method(model, x[2:3], 1, n_samples=24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(together[2:3], alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [lime, kernel_shap])
@pytest.mark.parametrize("internal_batch_size", [1, 7, 10_000])
def test_lime_and_kernel_shap_chunking_does_not_change_the_result(method, internal_batch_size):
    model, x = _network("cnn"), _images(16, batch=3)
    whole = method(model, x, None, n_samples=16, generator=torch.Generator().manual_seed(0))
    chunked = method(model, x, None, n_samples=16, generator=torch.Generator().manual_seed(0),
                     internal_batch_size=internal_batch_size)  # fmt: skip
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [lime, kernel_shap])
def test_feature_mask_shared_and_per_sample_forms_agree(method):
    model = _Flat((2, 6, 6))
    x = torch.randn(3, 2, 6, 6)
    mask = (torch.arange(36).reshape(6, 6) % 5).long()  # 5 features, stripes
    options = {"n_samples": 30, "target": 1}
    plain = method(model, x, feature_mask=mask, generator=torch.Generator().manual_seed(0), **options)
    for form in (mask[None, None], mask[None].expand(2, 6, 6), mask.expand(3, 1, 6, 6), mask.expand(3, 2, 6, 6)):
        same = method(model, x, feature_mask=form, generator=torch.Generator().manual_seed(0), **options)
        torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-6)
    values = _feature_values(plain, mask, 5)
    expected = _linear_feature_shares(model, x, torch.tensor([1, 1, 1]), 0.0, mask, 5)
    torch.testing.assert_close(values.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [lime, kernel_shap])
def test_a_feature_missing_from_one_samples_mask_gets_nothing_there(method):
    model = _Flat((1, 4, 4))
    x = torch.randn(2, 1, 4, 4)
    mask = torch.stack([torch.arange(16) % 4, torch.arange(16) % 3]).reshape(2, 1, 4, 4)  # sample 1 lacks id 3
    attr = method(model, x, 0, feature_mask=mask, n_samples=30, generator=torch.Generator().manual_seed(0))
    expected = _linear_feature_shares(model, x, torch.tensor([0, 0]), 0.0, mask, 4)
    values = _feature_values(attr, mask, 4)
    torch.testing.assert_close(values[0].double(), expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(values[1, :3].double(), expected[1, :3], rtol=0, atol=1e-5)


def test_non_image_inputs_get_one_feature_per_element():
    model = _Flat((6,))
    x = torch.randn(3, 6)
    for method in (lime, kernel_shap):
        attr = method(model, x, 2, n_samples=32, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(attr, model.weight(torch.tensor([2, 2, 2]), (6,)) * x, rtol=0, atol=1e-5)


def test_lime_weights_perturbed_inputs_by_cosine_similarity():
    # a non-linear model: the fit, hence the attributions, depends on how the perturbed inputs are weighted
    model = _network("cnn", torch.float64)
    x = _images(16, dtype=torch.float64)
    narrow = lime(model, x, 1, n_samples=64, kernel_width=0.05, generator=torch.Generator().manual_seed(0))
    wide = lime(model, x, 1, n_samples=64, kernel_width=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(narrow, wide)


@pytest.mark.parametrize("method", [lime, kernel_shap])
def test_lime_and_kernel_shap_reject_bad_arguments(method):
    model, x = _network("cnn"), _images(16)
    grid = torch.zeros(16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        method(model, x, 0, n_samples=0)
    with pytest.raises(ValueError, match="integer tensor"):
        method(model, x, 0, feature_mask=grid.float())
    with pytest.raises(ValueError, match="not booleans"):
        method(model, x, 0, feature_mask=grid.bool())
    with pytest.raises(ValueError, match=r"does not broadcast to the inputs' shape"):
        method(model, x, 0, feature_mask=torch.zeros(2, 16, 16, dtype=torch.long))  # (B, H, W): needs (B, 1, H, W)
    with pytest.raises(ValueError, match=r"ids \[1, 2\] are missing"):
        method(model, x, 0, feature_mask=(grid + 3 * (torch.arange(16) >= 8)[:, None]))
    with pytest.raises(ValueError, match="negative id"):
        method(model, x, 0, feature_mask=grid - 1)
    with pytest.raises(ValueError, match="either feature_mask or patch_size"):
        method(model, x, 0, feature_mask=grid, patch_size=4)
    with pytest.raises(ValueError, match="patch_size applies to images"):
        method(_Flat((6,)), torch.randn(2, 6), 0, patch_size=2)
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1"):
        method(model, x, 0, patch_size=0)
    with pytest.raises(ValueError, match="does not broadcast"):
        method(model, x, 0, baseline=torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="internal_batch_size"):
        method(model, x, 0, internal_batch_size=0)
    with pytest.raises(TypeError, match="generator"):
        method(model, x, 0, generator=0)
    if method is lime:
        with pytest.raises(ValueError, match="kernel_width"):
            lime(model, x, 0, kernel_width=0.0)


# --------------------------------------------------------------------------- GradientSHAP


def _captum_gradient_shap_with_our_draws(monkeypatch, model, x, target, references, n_samples, stdevs, seed):
    """Captum's GradientShap fed the baseline indices, path points and noise our ``gradient_shap`` draws from a
    generator seeded ``seed`` (replayed with the same helpers, in the same order)."""
    batch = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    choice, alphas = _gradient_shap_draws(n_samples, batch, references.shape[0], generator, x)
    noise = torch.stack([sample_noise(x.shape, torch.tensor(stdevs), generator, x) for _ in range(n_samples)])
    # Captum's rows are sample-major (repeat_interleave), ours draw-major
    rows_choice = choice.T.reshape(-1).numpy()
    rows_alpha = alphas.T.reshape(-1).numpy()
    rows_noise = noise.transpose(0, 1).reshape(batch * n_samples, *x.shape[1:])
    with monkeypatch.context() as patch:
        patch.setattr(np.random, "choice", lambda count, size: rows_choice)
        patch.setattr(np.random, "uniform", lambda low, high, size: rows_alpha)
        patch.setattr(torch, "normal", lambda mean, std: rows_noise)
        return captum.GradientShap(model).attribute(
            x, references, n_samples=n_samples, stdevs=float(stdevs), target=target
        )


@pytest.mark.parametrize(
    ("network", "dtype"), [("resnet18", torch.float32), ("resnet18", torch.float64), ("vgg11", torch.float32)]
)
def test_gradient_shap_matches_captum_given_the_same_draws(monkeypatch, network, dtype):
    model = _network(network, dtype)
    x = _images(dtype=dtype)
    torch.manual_seed(4)
    references = torch.randn(3, 3, 32, 32, dtype=dtype)
    target = torch.tensor([1, 3])
    ours = gradient_shap(model, x, target, n_samples=4, stdevs=0.3, baselines=references,
                         generator=torch.Generator().manual_seed(7))  # fmt: skip
    theirs = _captum_gradient_shap_with_our_draws(monkeypatch, model, x, target, references, 4, 0.3, seed=7)
    assert ours.dtype == theirs.dtype == dtype
    relative = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, theirs, **_tolerance(dtype, theirs, relative))
    assert float(theirs.abs().max()) > 0


def test_gradient_shap_of_a_linear_model():
    model = _Flat((4,)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    weight = model.weight(target, (4,))
    # zero baseline, no noise: exactly w * x whatever the draws
    torch.testing.assert_close(gradient_shap(model, x, target, n_samples=3), weight * x)
    # one reference: exactly w * (x - r)
    reference = torch.randn(1, 4, dtype=torch.float64)
    torch.testing.assert_close(
        gradient_shap(model, x, target, n_samples=3, baselines=reference), weight * (x - reference)
    )
    # several references and noise: w * (x - mean reference) in expectation, and so is Captum's
    references = torch.randn(5, 4, dtype=torch.float64)
    expected = weight * (x - references.mean(dim=0))
    n_samples = 4000
    ours = gradient_shap(model, x, target, n_samples=n_samples, stdevs=0.5, baselines=references,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.manual_seed(0)
    np.random.seed(0)
    theirs = captum.GradientShap(model).attribute(x, references, n_samples=n_samples, stdevs=0.5, target=target)
    # per element: w * (r or noise), std <= |w| * (std of references + 0.5) over sqrt(n) draws; 5 sigma
    spread = weight.abs() * (references.std(dim=0) + 0.5) / math.sqrt(n_samples)
    assert ((ours - expected).abs() < 5 * spread).all()
    assert ((theirs - expected).abs() < 5 * spread).all()


def test_gradient_shap_draws_are_seeded_chunk_independent_and_leave_the_global_rng_alone():
    model, x = _network("cnn", torch.float64), _images(16, batch=3, dtype=torch.float64)
    references = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    options = {"n_samples": 5, "stdevs": 0.2, "baselines": references}
    state = torch.random.get_rng_state()
    whole = gradient_shap(model, x, None, generator=torch.Generator().manual_seed(1), **options)
    for size in (1, 4, 7, 1000):
        chunked = gradient_shap(
            model, x, None, generator=torch.Generator().manual_seed(1), internal_batch_size=size, **options
        )
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    other = gradient_shap(model, x, None, generator=torch.Generator().manual_seed(2), **options)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.allclose(other, whole)


def test_gradient_shap_rejects_bad_arguments():
    model, x = _network("cnn"), _images(16)
    with pytest.raises(ValueError, match="n_samples"):
        gradient_shap(model, x, 0, n_samples=0)
    with pytest.raises(ValueError, match="stdevs"):
        gradient_shap(model, x, 0, stdevs=-0.1)
    with pytest.raises(ValueError, match=r"\(K, 3, 16, 16\) tensor"):
        gradient_shap(model, x, 0, baselines=torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="internal_batch_size"):
        gradient_shap(model, x, 0, internal_batch_size=0)


def test_gradient_shap_scalar_baseline_and_integer_inputs():
    model = _Flat((5,))
    x = torch.randint(0, 4, (2, 5))
    attr = gradient_shap(model, x, 1, baselines=0.5, n_samples=2)
    assert attr.dtype == torch.float32
    torch.testing.assert_close(attr, model.weight(torch.tensor([1, 1]), (5,)) * (x - 0.5))


# --------------------------------------------------------------------------- the contract, for all four


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3))
        with torch.no_grad():
            self.features[1].running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.features(x))


def _run(name: str, model: nn.Module, x: torch.Tensor, target, task: str = "multiclass") -> torch.Tensor:
    """Each method at quick options, seeded, with chunked forwards."""
    generator = torch.Generator().manual_seed(0)
    if name == "occlusion":
        return occlusion(model, x, target, window=3, stride=2, internal_batch_size=8, task=task)
    if name == "gradient_shap":
        return gradient_shap(
            model, x, target, n_samples=4, stdevs=0.1, generator=generator, internal_batch_size=5, task=task
        )
    method = {"lime": lime, "kernel_shap": kernel_shap}[name]
    return method(model, x, target, n_samples=12, generator=generator, internal_batch_size=10, task=task)


@pytest.mark.parametrize("name", ["occlusion", "lime", "kernel_shap", "gradient_shap"])
def test_contract_modes_hooks_grads_no_grad_and_inference_mode(name):
    model = _BatchNormNet()
    model.train()
    model.features.eval()
    model.features[1].train()  # a pattern model.train()/eval() cannot restore
    modes = {n: m.training for n, m in model.named_modules()}
    running = model.features[1].running_mean.clone()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    reference = _run(name, model, x, None)
    assert reference.shape == x.shape and reference.dtype == torch.float32
    with torch.no_grad():
        under_no_grad = _run(name, model, x, None)
    with torch.inference_mode():
        under_inference = _run(name, model, x.clone(), torch.tensor([0, 1, 2]))
    assert torch.equal(under_no_grad, reference)
    torch.testing.assert_close(under_inference, _run(name, model, x, torch.tensor([0, 1, 2])), rtol=0, atol=0)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.features[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    double = _run(name, copy.deepcopy(model).double(), x.double(), None)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["occlusion", "lime", "kernel_shap", "gradient_shap"])
def test_binary_target_one_explains_the_logit_and_target_zero_its_negative(name):
    model = _Flat((1, 6, 6), classes=1)
    x = torch.randn(4, 1, 6, 6)
    logit = _run(name, model, x, 0)  # the one output, as a multiclass column
    positive = _run(name, model, x, torch.ones(4, dtype=torch.long), task="binary")
    negative = _run(name, model, x, torch.zeros(4, dtype=torch.long), task="binary")
    torch.testing.assert_close(positive, logit)
    torch.testing.assert_close(negative, -logit, rtol=1e-5, atol=1e-6)
    assert float(logit.abs().max()) > 0


@pytest.mark.parametrize("name", ["occlusion", "lime", "kernel_shap", "gradient_shap"])
def test_target_none_is_the_prediction_on_the_clean_input(name):
    model = _Flat((1, 6, 6), classes=3, seed=2)
    torch.manual_seed(3)
    x = 3 * torch.randn(6, 1, 6, 6)
    predicted = model(x).argmax(dim=1)
    assert predicted.unique().numel() > 1, "precondition: several classes are predicted"
    torch.testing.assert_close(_run(name, model, x, None), _run(name, model, x, predicted))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["occlusion", "lime", "kernel_shap", "gradient_shap"])
def test_output_shape_dtype_and_device_with_a_generator_on_that_device(name, dtype, device):
    model = _BatchNormNet().to(device=device, dtype=dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    if name == "occlusion":
        attr = occlusion(model, x, None, window=3)
    elif name == "gradient_shap":
        attr = gradient_shap(model, x, None, n_samples=3, stdevs=0.1, generator=generator)
    else:
        attr = {"lime": lime, "kernel_shap": kernel_shap}[name](model, x, None, n_samples=10, generator=generator)
    assert attr.shape == x.shape and attr.dtype == dtype and attr.device == x.device
    assert torch.isfinite(attr).all()
