"""DeepLiftShap, GradientSHAP's ``multiply_by_inputs=False`` and baselines given as functions of the inputs, against
Captum (``DeepLiftShap``, ``GradientShap`` given our draws, ``IntegratedGradients`` and ``DeepLift`` with the
baseline the function returns) and on analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods import Explainer, deeplift, deeplift_shap, gradient_shap, integrated_gradients
from lightning_interp.methods.attribution.gradient import _gradient_shap_draws
from lightning_interp.methods.model.batching import sample_noise

captum = pytest.importorskip("captum.attr")

DTYPES = [torch.float32, torch.float64]


def _cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding=1),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 5),
        )
        .eval()
        .to(dtype)
    )


def _images(batch: int = 3, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype, relative: float | None = None) -> None:
    theirs = theirs.detach()
    scale = float(theirs.abs().max())
    assert scale > 0
    relative = relative if relative is not None else (1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=relative * scale)


def _mean_of_pairs(x: torch.Tensor) -> torch.Tensor:
    """A baseline function: the batch mean and its negative, two references (Captum's DeepLiftShap wants K > 1)."""
    mean = x.mean(dim=0, keepdim=True)
    return torch.cat([mean, -mean])


# --------------------------------------------------------------------------- DeepLiftShap


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_deeplift_shap_matches_captum(dtype, multiply_by_inputs):
    model, x = _cnn(dtype), _images(dtype=dtype)
    references = _images(4, dtype, seed=2)
    target = torch.tensor([0, 4, 2])
    ours, delta = deeplift_shap(
        model, x, target, baselines=references, multiply_by_inputs=multiply_by_inputs,
        return_convergence_delta=True, internal_batch_size=5,
    )  # fmt: skip
    theirs, their_delta = captum.DeepLiftShap(model, multiply_by_inputs=multiply_by_inputs).attribute(
        x, references, target=target, return_convergence_delta=True
    )
    _close(ours, theirs, dtype)
    assert their_delta.shape == (3 * 4,)  # Captum: one residual per (input, baseline) pair; ours: their mean
    if multiply_by_inputs:  # Captum's residual of the multipliers alone is no summation-to-delta; ours stays the sum's
        torch.testing.assert_close(delta, their_delta.double().reshape(3, 4).mean(dim=1), rtol=0, atol=1e-5)
    else:
        _, multiplied = deeplift_shap(model, x, target, baselines=references, return_convergence_delta=True)
        torch.testing.assert_close(delta, multiplied, rtol=0, atol=0)


def test_deeplift_shap_sums_to_the_change_from_the_mean_baseline_score_and_is_linear_in_the_references():
    model, x, references = _cnn(torch.float64), _images(dtype=torch.float64), _images(5, torch.float64, seed=3)
    attributions, delta = deeplift_shap(model, x, 1, baselines=references, return_convergence_delta=True)
    with torch.no_grad():
        change = model(x)[:, 1] - model(references)[:, 1].mean()
    torch.testing.assert_close(attributions.reshape(3, -1).sum(dim=1), change, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12
    each = torch.stack([deeplift(model, x, 1, baseline=reference[None]) for reference in references])
    torch.testing.assert_close(attributions, each.mean(dim=0), rtol=0, atol=1e-14)
    # a linear model: w (x - mean reference)
    linear = nn.Linear(12, 3).double()
    flat, refs = x.reshape(3, -1)[:, :12], references.reshape(5, -1)[:, :12]
    expected = linear.weight[2].detach() * (flat - refs.mean(dim=0))
    torch.testing.assert_close(deeplift_shap(linear, flat, 2, baselines=refs), expected, rtol=0, atol=1e-14)


def test_deeplift_shap_callable_baselines_match_captum():
    model, x = _cnn(torch.float64), _images(dtype=torch.float64)
    ours = deeplift_shap(model, x, 3, baselines=_mean_of_pairs)
    theirs = captum.DeepLiftShap(model).attribute(x, _mean_of_pairs, target=3)
    _close(ours, theirs, torch.float64)


def test_deeplift_shap_rejects_baselines_that_do_not_fit():
    model, x = _cnn(), _images()
    with pytest.raises(ValueError, match="baselines of shape"):
        deeplift_shap(model, x, 0, baselines=torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="must return a tensor"):
        deeplift_shap(model, x, 0, baselines=lambda inputs: "zeros")


# --------------------------------------------------------------------------- GradientSHAP


def _captum_gradient_shap_with_our_draws(monkeypatch, model, x, target, baselines, references, n_samples, stdevs, seed,
                                         **init):  # fmt: skip
    """Captum's GradientShap fed the draws ``gradient_shap`` takes from a generator seeded ``seed``."""
    batch = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    choice, alphas = _gradient_shap_draws(n_samples, batch, references.shape[0], generator, x)
    noise = torch.stack([sample_noise(x.shape, torch.tensor(stdevs), generator, x) for _ in range(n_samples)])
    rows_choice, rows_alpha = choice.T.reshape(-1).numpy(), alphas.T.reshape(-1).numpy()  # Captum: sample-major
    rows_noise = noise.transpose(0, 1).reshape(batch * n_samples, *x.shape[1:])
    with monkeypatch.context() as patch:
        patch.setattr(np.random, "choice", lambda count, size: rows_choice)
        patch.setattr(np.random, "uniform", lambda low, high, size: rows_alpha)
        patch.setattr(torch, "normal", lambda mean, std: rows_noise)
        return captum.GradientShap(model, **init).attribute(
            x, baselines, n_samples=n_samples, stdevs=float(stdevs), target=target
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_shap_without_multiplying_by_inputs_matches_captum(monkeypatch, dtype):
    model, x, references = _cnn(dtype), _images(dtype=dtype), _images(4, dtype, seed=5)
    target = torch.tensor([1, 0, 3])
    ours = gradient_shap(model, x, target, n_samples=5, stdevs=0.2, baselines=references, multiply_by_inputs=False,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    theirs = _captum_gradient_shap_with_our_draws(
        monkeypatch, model, x, target, references, references, 5, 0.2, 3, multiply_by_inputs=False
    )
    _close(ours, theirs, dtype, 1e-6 if dtype == torch.float32 else 1e-12)
    multiplied = gradient_shap(model, x, target, n_samples=5, stdevs=0.2, baselines=references,
                               generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert not torch.allclose(multiplied, ours)


def test_gradient_shap_of_a_linear_model_without_multiplying_is_the_weight():
    linear = nn.Linear(6, 3).double()
    x, references = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    ours = gradient_shap(linear, x, 2, n_samples=7, stdevs=0.5, baselines=references, multiply_by_inputs=False,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(ours, linear.weight[2].detach().expand(4, 6), rtol=0, atol=1e-14)


def test_gradient_shap_callable_baselines_match_captum(monkeypatch):
    model, x = _cnn(torch.float64), _images(dtype=torch.float64)
    references = _mean_of_pairs(x)
    ours = gradient_shap(model, x, 2, n_samples=4, stdevs=0.1, baselines=_mean_of_pairs,
                         generator=torch.Generator().manual_seed(8))  # fmt: skip
    theirs = _captum_gradient_shap_with_our_draws(monkeypatch, model, x, 2, _mean_of_pairs, references, 4, 0.1, 8)
    _close(ours, theirs, torch.float64)


# --------------------------------------------------------------------------- baselines as functions


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift"])
def test_a_baseline_function_gives_what_its_tensor_gives_and_what_captum_gives_for_it(method):
    model, x = _cnn(torch.float64), _images(dtype=torch.float64)

    def blurred(inputs: torch.Tensor) -> torch.Tensor:  # a per-sample baseline: each image's channel means
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)

    tensor = blurred(x)
    if method == "integrated_gradients":
        ours, delta = integrated_gradients(model, x, 1, baseline=blurred, n_steps=16, return_convergence_delta=True)
        given = integrated_gradients(model, x, 1, baseline=tensor, n_steps=16)
        theirs = captum.IntegratedGradients(model).attribute(x, tensor, target=1, n_steps=16)
    else:
        ours, delta = deeplift(model, x, 1, baseline=blurred, return_convergence_delta=True)
        given = deeplift(model, x, 1, baseline=tensor)
        theirs = captum.DeepLift(model).attribute(x, tensor, target=1)
    torch.testing.assert_close(ours, given, rtol=0, atol=0)
    _close(ours, theirs, torch.float64, 1e-8)  # Captum's Gauss-Legendre points and weights differ in the last bits
    with torch.no_grad():
        change = model(x)[:, 1] - model(tensor)[:, 1]  # the delta is measured against the function's baseline
    torch.testing.assert_close(ours.reshape(3, -1).sum(dim=1) - change, delta, rtol=0, atol=1e-12)


def test_a_baseline_function_gets_a_copy_of_the_inputs():
    model, x = _cnn(), _images()
    before = x.clone()
    seen = []

    def scribbling(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs)
        inputs.zero_()  # must not reach the caller's tensor
        return torch.zeros_like(inputs)

    for method in (integrated_gradients, deeplift):
        method(model, x, 0, baseline=scribbling)
    gradient_shap(model, x, 0, baselines=lambda inputs: scribbling(inputs)[:1], n_samples=2)
    deeplift_shap(model, x, 0, baselines=scribbling)
    assert torch.equal(x, before) and len(seen) == 4 and not any(s.requires_grad for s in seen)
    with pytest.raises(TypeError, match="must return a tensor"):
        integrated_gradients(model, x, 0, baseline=lambda inputs: None)


def test_the_explainer_passes_a_baseline_function_and_logs_deeplift_shaps_completeness():
    model, x = _cnn(torch.float64), _images(dtype=torch.float64)
    result = Explainer({"deeplift_shap": {"baselines": _mean_of_pairs}, "integrated_gradients": {"baseline": 0.5}})(
        model, x
    )
    expected = deeplift_shap(model, x, result.target, baselines=_mean_of_pairs)
    torch.testing.assert_close(result.attributions["deeplift_shap"], expected, rtol=0, atol=0)
    assert float(result.scalars["deeplift_shap/completeness_error"]) < 1e-10
