"""Explanation-quality metrics: analytic cases (a perfect explanation of a linear model is the best possible deletion
and insertion order; random maps score at chance), invariances, and agreement with Quantus on the same maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    curve_auc,
    max_sensitivity,
    perturbation_curve,
    removal_baseline,
    sanity_similarity,
    sparseness,
    target_probability,
    top_fraction_drop,
)


def _linear_model(channels: int = 3, size: int = 8, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Two logits: (w . x, 0). The probability of class 0 is sigmoid(w . x), monotone in the logit."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(channels, size, size, generator=generator)
    linear = nn.Linear(channels * size * size, 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0] = weights.reshape(-1)
    return nn.Sequential(nn.Flatten(), linear), weights


def test_a_perfect_explanation_of_a_linear_model_is_the_best_deletion_and_insertion_order():
    model, weights = _linear_model()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(6, 3, 8, 8, generator=generator)
    # with a zero baseline, removing pixel p lowers the logit by its contribution sum_c w x: removing the largest
    # contributions first gives the lowest logit after every step, whatever other order one takes
    perfect = (weights * inputs).sum(dim=1)
    deletion = perturbation_curve(model, inputs, perfect, 0, steps=16, baseline="zero")
    insertion = perturbation_curve(model, inputs, perfect, 0, mode="insertion", steps=16, baseline="zero")
    for trial in range(5):
        other = torch.rand(6, 8, 8, generator=generator) if trial else weights.abs().sum(dim=0).expand(6, 8, 8)
        assert bool((deletion <= perturbation_curve(model, inputs, other, 0, steps=16, baseline="zero") + 1e-6).all())
        other_insertion = perturbation_curve(model, inputs, other, 0, mode="insertion", steps=16, baseline="zero")
        assert bool((insertion >= other_insertion - 1e-6).all())
    # the curve's ends: the original image, and the baseline everywhere (the logit 0: probability 1/2)
    original = torch.sigmoid((weights * inputs).sum(dim=(1, 2, 3)))
    assert torch.allclose(deletion[:, 0], original, atol=1e-6) and torch.allclose(insertion[:, -1], original, atol=1e-6)
    assert torch.allclose(deletion[:, -1], torch.full((6,), 0.5)) and torch.allclose(
        insertion[:, 0], torch.full((6,), 0.5)
    )
    assert bool((curve_auc(deletion) < curve_auc(insertion)).all())


def test_random_maps_remove_at_chance_and_a_faithful_map_beats_them():
    model, weights = _linear_model(seed=2)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.rand(400, 3, 8, 8, generator=generator)
    random_maps = torch.rand(400, 8, 8, generator=generator)
    top, random = top_fraction_drop(model, inputs, random_maps, 0, baseline="zero", generator=generator)
    # a random map's top 20% is a random 20%: the two drops have the same distribution
    assert abs(float(top.mean() - random.mean())) < 0.1 * float(random.abs().mean()) + 0.01
    perfect = (weights * inputs).sum(dim=1)
    top, random = top_fraction_drop(model, inputs, perfect, 0, baseline="zero")
    assert bool((top >= random - 1e-6).all()) and float(top.mean()) > float(random.mean()) + 0.05
    # the global RNG is never used
    state = torch.get_rng_state()
    top_fraction_drop(model, inputs[:4], perfect[:4], 0)
    assert torch.equal(state, torch.get_rng_state())


def test_the_curve_does_not_depend_on_how_the_forwards_are_batched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    inputs, maps = torch.rand(5, 3, 8, 8), torch.rand(5, 8, 8)
    target = torch.tensor([0, 1, 2, 3, 4])
    whole = perturbation_curve(model, inputs, maps, target, steps=8)
    chunked = perturbation_curve(model, inputs, maps, target, steps=8, batch_size=7)
    assert torch.allclose(whole, chunked, atol=1e-6)
    # one sample alone gives its own row: nothing mixes between samples
    alone = perturbation_curve(model, inputs[2:3], maps[2:3], target[2:3], steps=8)
    assert torch.allclose(alone[0], whole[2], atol=1e-6)


def test_removal_baselines():
    constant = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(removal_baseline(constant, "blur"), constant, atol=1e-6)  # blurring a flat image keeps it
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = removal_baseline(images, "blur")
    assert float(blurred.std()) < 0.5 * float(images.std())  # detail removed
    assert torch.allclose(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.02)  # colour kept
    mean = removal_baseline(images, "mean")
    assert torch.allclose(mean, images.mean(dim=(2, 3), keepdim=True).expand_as(images))
    assert removal_baseline(images, "zero").abs().sum() == 0
    with pytest.raises(ValueError, match="baseline must be one of"):
        removal_baseline(images, "noise")


def test_target_probability_per_task():
    scores = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(target_probability(scores, torch.tensor([0, 1])), scores.softmax(dim=1).diagonal())
    logit = torch.tensor([[2.0], [2.0]])
    binary = target_probability(logit, torch.tensor([1, 0]), "binary")
    assert torch.allclose(binary, torch.tensor([torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-2.0))]))


def test_sparseness_analytic_cases_and_invariances():
    n = 64
    one = torch.zeros(1, 8, 8)
    one[0, 3, 5] = 2.0
    assert sparseness(torch.ones(1, 8, 8)).item() == pytest.approx(0.0, abs=1e-12)
    assert sparseness(one).item() == pytest.approx((n - 1) / n)
    maps = torch.rand(3, 8, 8)
    assert torch.allclose(sparseness(maps), sparseness(7 * maps))  # scale-free
    assert torch.allclose(sparseness(maps), sparseness(-maps))  # magnitudes
    flipped = maps.flip(-1)
    assert torch.allclose(sparseness(maps), sparseness(flipped))  # where the mass is does not matter
    assert math.isnan(sparseness(torch.zeros(1, 4, 4)).item())


def test_sanity_similarity_is_one_for_the_same_maps_and_near_zero_for_unrelated_ones():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(50, 16, 16, generator=generator)
    assert torch.allclose(sanity_similarity(maps, maps**3), torch.ones(50, dtype=torch.float64))
    unrelated = sanity_similarity(maps, torch.rand(50, 16, 16, generator=generator))
    assert abs(float(unrelated.mean())) < 0.05


def test_max_sensitivity_is_zero_for_a_constant_gradient_and_positive_for_a_relu_net():
    model, _ = _linear_model()
    inputs = torch.rand(3, 3, 8, 8)

    def gradient(batch):
        batch = batch.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(model(batch)[:, 0].sum(), batch)
        return score

    assert max_sensitivity(gradient, inputs, radius=0.1).abs().max().item() < 1e-6
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 2))

    def relu_gradient(batch):
        batch = batch.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(relu(batch)[:, 0].sum(), batch)
        return score

    small, large = (max_sensitivity(relu_gradient, inputs, radius=r) for r in (0.001, 0.5))
    assert bool((large > 0).all()) and float(large.mean()) > float(small.mean())


# -------------------------------------------------------------------------------------------- against Quantus
def test_sparseness_equals_quantus():
    quantus = pytest.importorskip("quantus")
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(6, 1, 10, 10, generator=generator) ** 4 + 0.01
    inputs = torch.rand(6, 1, 10, 10, generator=generator)
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 3))
    theirs = quantus.Sparseness(disable_warnings=True, normalise=False, abs=True)(
        model=model, x_batch=inputs.numpy(), y_batch=np.zeros(6, dtype=np.int64), a_batch=maps.numpy(), device="cpu"
    )
    ours = sparseness(maps[:, 0])
    assert np.allclose(ours.numpy(), np.asarray(theirs), atol=1e-5)  # Quantus adds 1e-7 to every value


def test_deletion_curve_equals_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.rand(4, 1, 8, 8, generator=generator)
    maps = torch.rand(4, 8, 8, generator=generator)  # distinct values: both sorts give the same order
    labels = torch.tensor([0, 1, 2, 0])
    theirs = quantus.PixelFlipping(
        features_in_step=4, perturb_baseline="black", normalise=False, disable_warnings=True
    )(
        model=model,
        x_batch=inputs.numpy(),
        y_batch=labels.numpy(),
        a_batch=maps[:, None].numpy(),
        device="cpu",
        softmax=True,
    )
    # Quantus's "black" is each image's minimum
    black = inputs.amin(dim=(1, 2, 3), keepdim=True)
    ours = perturbation_curve(model, inputs, maps, labels, steps=16, baseline=black)
    # Quantus gives the probability after each step (16 of 4 pixels); ours also has the start point
    assert np.allclose(ours[:, 1:].numpy(), np.asarray(theirs), atol=1e-6)


def test_cascading_randomization_separates_a_weight_blind_map_from_the_gradient_and_touches_nothing():
    from lightning_interp.methods import cascading_randomization

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    inputs = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    state = torch.get_rng_state()

    def gradient(net):
        batch = inputs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(batch)[:, 0].sum(), batch)
        return grad.abs().sum(dim=1)

    found = cascading_randomization(model, gradient, depth=2)
    assert list(found) == ["3", "0"]  # from the output down
    # the head re-initialised: the gradient map loses its learnt pattern (here: the random init's), far from 1
    assert float(found["3"].mean()) < 0.8
    # a "map" that never looks at the weights stays identical: it fails the test, as it should
    blind = cascading_randomization(model, lambda net: inputs.sum(dim=1), depth=2)
    assert all(torch.allclose(value, torch.ones(6, dtype=torch.float64)) for value in blind.values())
    # the model and the global RNG are untouched
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert torch.equal(state, torch.get_rng_state())
