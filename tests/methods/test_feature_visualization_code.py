"""Activation maximisation in a generator's code space (Nguyen et al. 2016): analytic optimum, range, contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import GeneratorCode, feature_visualization

SHAPE = (1, 4, 4)


def _linear_pair(code: int = 4) -> tuple[nn.Module, nn.Module]:
    """G(z) = A z (as a 1 x 4 x 4 image) and a linear unit w . x (the model's one output)."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(code, 16, bias=False), nn.Unflatten(1, SHAPE))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False))
    return generator, model


def test_a_linear_generator_and_unit_reach_the_analytic_optimum():
    """max_z w.A z - l2 |z|^2 is reached at z* = A^T w / (2 l2)."""
    generator, model = _linear_pair()
    a, w = generator[0].weight.detach(), model[1].weight.detach()[0]
    for l2 in (0.5, 0.1):
        code = GeneratorCode(generator, code_shape=4, l2=l2)
        result = feature_visualization(model, "class:0", image_shape=SHAPE, steps=400, lr=0.05, parameterization=code)
        expected = a.T @ w / (2 * l2)
        torch.testing.assert_close(result.codes[0, 0], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.objectives[0, 0], w @ a @ expected, rtol=1e-4, atol=1e-5)


def test_a_clipped_code_reaches_the_box_constrained_optimum():
    """The objective is separable in z (A^T w . z - l2 |z|^2), so the optimum in a box is z* clipped to it."""
    generator, model = _linear_pair()
    a, w = generator[0].weight.detach(), model[1].weight.detach()[0]
    unclipped = a.T @ w / (2 * 0.1)
    low, high = -0.5, 0.32
    assert ((unclipped < low) | (unclipped > high)).any() and ((unclipped > low) & (unclipped < high)).any()
    code = GeneratorCode(generator, code_shape=(4,), l2=0.1, clip=(low, high))
    result = feature_visualization(model, "class:0", image_shape=SHAPE, steps=400, parameterization=code)
    torch.testing.assert_close(result.codes[0, 0], unclipped.clamp(low, high), rtol=1e-4, atol=1e-5)


def test_the_image_is_the_generators_output_on_the_returned_code():
    torch.manual_seed(1)
    generator = nn.Sequential(nn.Linear(6, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    code = GeneratorCode(generator, code_shape=6, l2=0.001)
    result = feature_visualization(
        model, ["0:1", "class:2"], image_shape=(3, 8, 8), steps=20, num_images=2, parameterization=code,
        value_range=(-1.0, 1.0),
    )  # fmt: skip
    assert result.codes.shape == (2, 2, 6) and result.images.shape == (2, 2, 3, 8, 8)
    with torch.no_grad():
        regenerated = generator(result.codes.reshape(4, 6)).reshape(2, 2, 3, 8, 8)
    assert torch.equal(result.images, regenerated)  # in the generator's range: exactly G(z*)
    assert result.images.abs().max() <= 1  # (tanh)
    torch.testing.assert_close(result.rgb, (result.images + 1) / 2)
    assert (result.history[-1] > result.history[0]).all()


def test_the_generator_is_never_changed_gets_no_grad_and_keeps_its_flags_and_modes():
    torch.manual_seed(2)
    generator = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.BatchNorm1d(32), nn.Linear(32, 16))
    generator.append(nn.Unflatten(1, SHAPE)).train()
    generator[3].weight.requires_grad_(False)  # a user's frozen part stays frozen, the rest stays trainable
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).train()
    before = {name: value.clone() for name, value in generator.state_dict().items()}
    flags = [p.requires_grad for p in generator.parameters()]
    code = GeneratorCode(generator, code_shape=5)
    first = feature_visualization(model, "class:1", image_shape=SHAPE, steps=6, num_images=3, parameterization=code)
    for name, value in generator.state_dict().items():  # BatchNorm's running statistics included
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in [*generator.parameters(), *model.parameters()])
    assert [p.requires_grad for p in generator.parameters()] == flags
    assert all(module.training for module in [*generator.modules(), *model.modules()])
    # eval mode inside (Dropout off, BatchNorm on its running statistics): the images are G(z) in eval mode
    with torch.no_grad():
        generator.eval()
        regenerated = generator(first.codes.reshape(3, 5)).reshape(first.images.shape)
        generator.train()
    torch.testing.assert_close(first.images, regenerated, rtol=1e-6, atol=1e-6)  # (a BatchNorm: ~1 ulp apart)


def test_the_same_seed_gives_the_same_codes_and_the_global_rng_is_untouched():
    generator, model = _linear_pair(code=3)
    code = GeneratorCode(generator, code_shape=3, clip=(-1.0, 1.0))

    def run(seed: int):
        return feature_visualization(
            model, "class:0", image_shape=SHAPE, steps=5, num_images=2, parameterization=code,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    state = torch.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.images, again.images)
    assert not torch.equal(first.codes, other.codes)
    assert not torch.equal(first.codes[0, 0], first.codes[0, 1])  # the images of a target start apart


def test_a_dead_unit_is_still_warned_about_with_the_penalty():
    """The L2 penalty alone moves the code: the warning reads the objective's own gradient."""
    generator, _ = _linear_pair()
    dead = nn.Sequential(nn.Flatten(), nn.Linear(16, 1), nn.ReLU())
    with torch.no_grad():
        dead[1].weight.zero_()
        dead[1].bias.fill_(-1.0)
    with pytest.warns(UserWarning, match="got no gradient"):
        feature_visualization(dead, "2:0", image_shape=SHAPE, steps=3, parameterization=GeneratorCode(generator, 4))


def test_errors_say_what_to_give():
    generator, model = _linear_pair()
    with pytest.raises(ValueError, match="transforms"):
        feature_visualization(
            model, "class:0", image_shape=SHAPE, steps=2, transforms=True, parameterization=GeneratorCode(generator, 4)
        )
    with pytest.raises(ValueError, match=r"returns \(1, 1, 4, 4\) .* input shape \(1, 3, 4, 4\)"):
        feature_visualization(model, "class:0", image_shape=(3, 4, 4), parameterization=GeneratorCode(generator, 4))
    with pytest.raises(ValueError, match=r"generator's parameters are on meta.*generator\.to\('cpu'\)"):
        feature_visualization(
            model, "class:0", image_shape=SHAPE, parameterization=GeneratorCode(_linear_pair()[0].to("meta"), 4)
        )
    with pytest.raises(TypeError, match=r"nn\.Module"):
        GeneratorCode(lambda z: z, 4)  # type: ignore[arg-type]
    for options, message in [
        ({"code_shape": 0}, "code_shape"),
        ({"code_shape": (4, -1)}, "code_shape"),
        ({"code_shape": 4, "l2": -0.1}, "l2"),
        ({"code_shape": 4, "sd": float("nan")}, "sd"),
        ({"code_shape": 4, "clip": (1.0, 0.0)}, "clip"),
    ]:
        with pytest.raises(ValueError, match=message):
            GeneratorCode(generator, **options)
