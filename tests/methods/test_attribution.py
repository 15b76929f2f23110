"""Analytic and reference checks of gradient, input x gradient, integrated gradients and SmoothGrad."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    gradient,
    input_x_gradient,
    integrated_gradients,
    integration_points,
    smoothgrad,
)

INTEGRATION_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def _linear(in_features: int = 5, classes: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, classes)


def _mlp(activation: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), activation(), nn.Linear(16, 16), activation(), nn.Linear(16, 3))
    with torch.no_grad():  # larger weights than the default init: strongly curved, clearly varying scores
        for layer in model[::2]:
            layer.weight.mul_(4.0)
    return model


def _scores64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference class scores of ``model`` in float64, computed outside the package."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


class _Quadratic(nn.Module):
    """Scores (sum(x^2)/2, -sum(x^2)/2): the class-0 gradient is x itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = 0.5 * x.reshape(x.shape[0], -1).square().sum(dim=1)
        return torch.stack([half, -half], dim=1)


# --------------------------------------------------------------------------- gradient / input x gradient


def test_gradient_of_linear_model_is_weight_row_for_int_target():
    model = _linear()
    x = torch.randn(4, 5)
    for cls in range(3):
        torch.testing.assert_close(gradient(model, x, cls), model.weight.detach()[cls].expand(4, 5))


def test_gradient_of_linear_model_with_per_sample_target():
    model = _linear()
    x = torch.randn(4, 5)
    target = torch.tensor([2, 0, 1, 2])
    torch.testing.assert_close(gradient(model, x, target), model.weight.detach()[target])


def test_gradient_with_none_target_uses_predicted_class():
    model = _linear(seed=3)
    torch.manual_seed(1)
    x = 3 * torch.randn(16, 5)
    predicted = _scores64(model, x).argmax(dim=1)
    assert predicted.unique().numel() > 1, "precondition: several classes are predicted"
    torch.testing.assert_close(gradient(model, x, None), model.weight.detach()[predicted])


def test_zero_dim_tensor_target_applies_to_every_sample():
    model = _linear()
    x = torch.randn(3, 5)
    torch.testing.assert_close(gradient(model, x, torch.tensor(1)), gradient(model, x, 1))


@pytest.mark.parametrize("bad", [3, -1, torch.tensor([0, 5, 1])])
def test_out_of_range_target_raises(bad):
    with pytest.raises(ValueError, match="target"):
        gradient(_linear(), torch.randn(3, 5), bad)


def test_wrong_length_target_raises():
    with pytest.raises(ValueError, match="batch"):
        gradient(_linear(), torch.randn(3, 5), torch.tensor([0, 1]))


def test_non_integer_target_raises_type_error():
    with pytest.raises(TypeError, match="target"):
        gradient(_linear(), torch.randn(3, 5), 1.5)


def test_gradient_of_nonlinear_model_matches_float64_autograd_reference():
    model = _mlp()
    x = torch.randn(4, 6)
    target = torch.tensor([0, 1, 2, 1])
    reference_model = copy.deepcopy(model).double()
    x64 = x.double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(reference_model(x64).gather(1, target[:, None]).sum(), x64)
    torch.testing.assert_close(gradient(model, x, target).double(), grad64, rtol=1e-5, atol=1e-6)


def test_input_x_gradient_of_linear_model_is_weight_times_input():
    model = _linear()
    x = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(input_x_gradient(model, x, target), x * model.weight.detach()[target])
    torch.testing.assert_close(input_x_gradient(model, x, 2), x * model.weight.detach()[2])


def test_output_transform_selects_logits_from_a_dict_output():
    base = _linear()

    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = base

        def forward(self, x):
            return {"logits": self.inner(x), "aux": x.sum()}

    class ScoresModel(DictModel):
        def forward(self, x):
            return {"scores": self.inner(x)}

    x = torch.randn(2, 5)
    with pytest.raises(TypeError, match="output_transform"):
        gradient(ScoresModel(), x, 0)  # no "logits": which entry is meant is not guessed
    out = gradient(DictModel(), x, 1, output_transform=lambda out: out["logits"])
    torch.testing.assert_close(out, base.weight.detach()[1].expand(2, 5))
    torch.testing.assert_close(gradient(DictModel(), x, 1), out)  # "logits" (a HuggingFace output) is read as is


# --------------------------------------------------------------------------- integration points


@pytest.mark.parametrize("method", INTEGRATION_METHODS)
@pytest.mark.parametrize("n_steps", [2, 3, 7, 32])
def test_integration_points_are_a_probability_rule_on_unit_interval(method, n_steps):
    nodes, weights = integration_points(n_steps, method)
    assert nodes.dtype == weights.dtype == torch.float64
    assert nodes.shape == weights.shape == (n_steps,)
    assert (weights > 0).all()
    assert abs(float(weights.sum()) - 1.0) < 1e-12
    assert (nodes >= 0).all() and (nodes <= 1).all()
    assert (nodes.diff() > 0).all(), "nodes are distinct and increasing"


@pytest.mark.parametrize("n_steps", [1, 2, 3, 5, 8, 16])
def test_gauss_legendre_integrates_monomials_exactly_below_degree_2n(n_steps):
    nodes, weights = integration_points(n_steps, "gausslegendre")
    for k in range(2 * n_steps):
        assert abs(float((weights * nodes**k).sum()) - 1.0 / (k + 1)) < 1e-12, k
    if n_steps <= 8:  # and it is not exact at degree 2n, so the check above is not vacuous
        assert abs(float((weights * nodes ** (2 * n_steps)).sum()) - 1.0 / (2 * n_steps + 1)) > 1e-13


@pytest.mark.parametrize("n_steps", [1, 4, 9])
def test_gauss_legendre_matches_numpy_leggauss(n_steps):
    ref_nodes, ref_weights = np.polynomial.legendre.leggauss(n_steps)
    nodes, weights = integration_points(n_steps, "gausslegendre")
    np.testing.assert_allclose(nodes.numpy(), (ref_nodes + 1) / 2, atol=1e-13)
    np.testing.assert_allclose(weights.numpy(), ref_weights / 2, atol=1e-13)


@pytest.mark.parametrize("n_steps", [2, 5, 10])
def test_riemann_rules_on_linear_integrand(n_steps):
    # integral of a on [0, 1]: left sum (n-1)/(2n), right sum (n+1)/(2n), midpoint and trapezoid exact
    expected = {
        "riemann_left": (n_steps - 1) / (2 * n_steps),
        "riemann_right": (n_steps + 1) / (2 * n_steps),
        "riemann_middle": 0.5,
        "riemann_trapezoid": 0.5,
    }
    for method, value in expected.items():
        nodes, weights = integration_points(n_steps, method)
        assert abs(float((weights * nodes).sum()) - value) < 1e-12, method
    left, _ = integration_points(n_steps, "riemann_left")
    right, _ = integration_points(n_steps, "riemann_right")
    trapezoid, _ = integration_points(n_steps, "riemann_trapezoid")
    assert left[0] == 0 and right[-1] == 1 and trapezoid[0] == 0 and trapezoid[-1] == 1


def test_integration_points_reject_bad_arguments():
    with pytest.raises(ValueError, match="n_steps"):
        integration_points(0)
    with pytest.raises(ValueError, match="riemann_trapezoid"):
        integration_points(1, "riemann_trapezoid")
    with pytest.raises(ValueError, match="gausslegendre"):
        integration_points(4, "simpson")


# --------------------------------------------------------------------------- integrated gradients


@pytest.mark.parametrize("baseline", [None, 0.5, "tensor"])
def test_integrated_gradients_completeness_on_tanh_mlp(baseline):
    model = _mlp(nn.Tanh)
    torch.manual_seed(2)
    x = 2 * torch.randn(6, 6)
    if baseline == "tensor":
        baseline = 0.3 * torch.randn(1, 6)
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    # explain, per sample, the class whose score changes most between baseline and input (a well-posed ratio)
    all_changes = _scores64(model, x) - _scores64(model, base)
    target = all_changes.abs().argmax(dim=1)
    change = all_changes.gather(1, target[:, None]).squeeze(1)
    assert (change.abs() > 0.1).all(), "precondition: the score changes along the path"

    attr, delta = integrated_gradients(model, x, target, baseline=baseline, n_steps=64, return_convergence_delta=True)

    total = attr.double().sum(dim=1)
    relative = (total - change).abs() / change.abs()
    assert (relative < 1e-3).all(), relative
    # the returned delta is the same residual, computed by the package
    assert delta.shape == (6,)
    torch.testing.assert_close(delta.double(), total - change, rtol=0, atol=1e-5)


def test_integrated_gradients_completeness_on_relu_mlp_with_many_steps():
    model = _mlp(nn.ReLU, seed=1)
    torch.manual_seed(5)
    x = 2 * torch.randn(4, 6)
    all_changes = _scores64(model, x) - _scores64(model, torch.zeros_like(x))
    target = all_changes.abs().argmax(dim=1)
    scores = all_changes.gather(1, target[:, None]).squeeze(1)
    assert (scores.abs() > 0.1).all()
    attr = integrated_gradients(model, x, target, n_steps=1024, method="riemann_middle")
    relative = (attr.double().sum(dim=1) - scores).abs() / scores.abs()
    assert (relative < 1e-2).all(), relative


def test_integrated_gradients_on_linear_model_is_difference_times_weight():
    model = _linear()
    x = torch.randn(4, 5)
    target = torch.tensor([2, 0, 1, 1])
    weight = model.weight.detach()[target]
    for baseline, base in [
        (None, torch.zeros(1, 5)),
        (-0.7, torch.full((1, 5), -0.7)),
        (torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 5)[None]),
    ]:
        for method in INTEGRATION_METHODS:
            attr = integrated_gradients(model, x, target, baseline=baseline, n_steps=3, method=method)
            torch.testing.assert_close(attr, (x - base) * weight, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_with_baseline_equal_to_input_is_zero():
    model = _mlp()
    x = torch.randn(3, 6)
    attr, delta = integrated_gradients(model, x, 0, baseline=x.clone(), return_convergence_delta=True)
    assert (attr == 0).all()
    assert delta.abs().max() < 1e-6


@pytest.mark.parametrize("internal_batch_size", [1, 3, 4, 9, 10_000])
def test_integrated_gradients_chunking_does_not_change_result(internal_batch_size):
    model = _mlp()
    x = torch.randn(3, 6)
    whole = integrated_gradients(model, x, 2, n_steps=10)
    chunked = integrated_gradients(model, x, 2, n_steps=10, internal_batch_size=internal_batch_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_target_none_is_fixed_from_clean_input():
    # scores (x0, x1): along the path from 0 the argmax may flip, but IG must explain the clean prediction
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.9], [0.2, 0.8]])
    baseline = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    attr = integrated_gradients(model, x, None, baseline=baseline, n_steps=4)
    expected = (x - baseline) * torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(attr, expected)


def test_integrated_gradients_delta_under_inference_mode_matches_normal_mode():
    model = _mlp()
    torch.manual_seed(6)
    x = torch.randn(3, 6)
    attr, delta = integrated_gradients(model, x, None, baseline=0.2, n_steps=16, return_convergence_delta=True)
    with torch.inference_mode():
        x_inference = x.clone()
        attr_inf, delta_inf = integrated_gradients(
            model, x_inference, None, baseline=0.2, n_steps=16, return_convergence_delta=True
        )
    torch.testing.assert_close(attr_inf, attr, rtol=0, atol=0)
    torch.testing.assert_close(delta_inf, delta, rtol=0, atol=0)


def test_integrated_gradients_rejects_bad_internal_batch_size():
    with pytest.raises(ValueError, match="internal_batch_size"):
        integrated_gradients(_linear(), torch.randn(2, 5), 0, internal_batch_size=0)


def test_integrated_gradients_keeps_float64_precision():
    model = _linear().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    attr = integrated_gradients(model, x, 1, n_steps=4)
    torch.testing.assert_close(attr, x * model.weight.detach()[1], rtol=1e-12, atol=1e-12)


def test_integrated_gradients_on_integer_inputs_matches_float_inputs():
    class ScaleThenLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = _linear(4, 2)

        def forward(self, x):
            return self.linear(x.float() / 255)

    model = ScaleThenLinear()
    x = torch.randint(0, 256, (3, 4), dtype=torch.uint8)
    torch.testing.assert_close(
        integrated_gradients(model, x, 0).float(), integrated_gradients(model, x.float(), 0), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- SmoothGrad


def test_smoothgrad_same_generator_seed_gives_identical_output():
    model = _mlp()
    x = torch.randn(3, 6)
    first = smoothgrad(model, x, 0, n_samples=8, generator=torch.Generator().manual_seed(7))
    second = smoothgrad(model, x, 0, n_samples=8, generator=torch.Generator().manual_seed(7))
    other = smoothgrad(model, x, 0, n_samples=8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("internal_batch_size", [None, 3, 6])
def test_smoothgrad_with_generator_leaves_global_rng_untouched(internal_batch_size):
    model = _mlp()
    x = torch.randn(3, 6)
    before = torch.get_rng_state()
    smoothgrad(
        model,
        x,
        None,
        n_samples=5,
        generator=torch.Generator().manual_seed(0),
        internal_batch_size=internal_batch_size,
    )
    assert torch.equal(torch.get_rng_state(), before)


def test_smoothgrad_without_generator_is_reproducible_from_global_seed():
    model = _mlp()
    x = torch.randn(3, 6)
    torch.manual_seed(11)
    first = smoothgrad(model, x, 1, n_samples=4)
    torch.manual_seed(11)
    second = smoothgrad(model, x, 1, n_samples=4)
    assert torch.equal(first, second)


def test_smoothgrad_without_noise_equals_gradient():
    model = _mlp()
    x = torch.randn(4, 6)
    target = torch.tensor([0, 2, 1, 0])
    result = smoothgrad(model, x, target, noise_level=0.0, n_samples=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result, gradient(model, x, target), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("noise_level", [0.1, 1.0, 5.0])
def test_smoothgrad_of_linear_model_is_weight_row_for_any_noise(noise_level):
    model = _linear()
    x = torch.randn(4, 5)
    result = smoothgrad(model, x, 2, noise_level=noise_level, n_samples=6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(result, model.weight.detach()[2].expand(4, 5), rtol=1e-5, atol=1e-6)


def test_smoothgrad_target_none_is_fixed_from_clean_input():
    # identity scores: huge noise flips the argmax of most copies, the explained class must not flip
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.9], [0.1, 0.5]])
    result = smoothgrad(model, x, None, noise_level=5.0, n_samples=16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("internal_batch_size", [None, 4, 8])
def test_smoothgrad_noise_scale_is_noise_level_times_value_range(internal_batch_size):
    # for the quadratic model the class-0 gradient is the input, so smoothgrad - x = mean of the noise draws:
    # zero-mean, std = noise_level * (max - min) / sqrt(n_samples), independently per sample
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40)
    x[1] *= 10.0  # second sample has a 10x larger value range
    n_samples, noise_level = 4, 0.2
    result = smoothgrad(
        _Quadratic(),
        x,
        0,
        noise_level=noise_level,
        n_samples=n_samples,
        generator=torch.Generator().manual_seed(3),
        internal_batch_size=internal_batch_size,
    )
    mean_noise = (result - x).reshape(2, -1).double()
    value_range = (x.reshape(2, -1).amax(dim=1) - x.reshape(2, -1).amin(dim=1)).double()
    expected_std = noise_level * value_range / n_samples**0.5
    observed_std = mean_noise.std(dim=1)
    assert ((observed_std / expected_std - 1).abs() < 0.05).all(), observed_std / expected_std
    assert (mean_noise.mean(dim=1).abs() < 0.05 * expected_std).all()


def test_smoothgrad_chunked_is_deterministic_for_fixed_chunking():
    # noise is drawn chunk by chunk, so results depend on internal_batch_size; a fixed setting is reproducible
    model = _mlp()
    x = torch.randn(3, 6)
    runs = [
        smoothgrad(model, x, 0, n_samples=7, internal_batch_size=6, generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_smoothgrad_rejects_bad_arguments():
    model, x = _linear(), torch.randn(2, 5)
    with pytest.raises(ValueError, match="n_samples"):
        smoothgrad(model, x, 0, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        smoothgrad(model, x, 0, noise_level=-0.1)
    with pytest.raises(ValueError, match="internal_batch_size"):
        smoothgrad(model, x, 0, internal_batch_size=-1)
