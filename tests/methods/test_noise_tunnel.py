"""Noise tunnels (SmoothGrad, SmoothGrad-squared, VarGrad around any registered method) against Captum's NoiseTunnel
given the same noise, and their analytic properties."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    Explainer,
    attribute,
    noise_tunnel,
    smoothgrad,
    smoothgrad_sq,
    vargrad,
)
from lightning_interp.methods.attribution import noise_tunnel as tunnel_module

captum = pytest.importorskip("captum.attr")
captum_tunnel = pytest.importorskip("captum.attr._core.noise_tunnel")

KINDS = ["smoothgrad", "smoothgrad_sq", "vargrad"]


def _cnn() -> nn.Module:
    """ReLU and tanh, no max pool: Captum's DeepLift treats a max pool next to an activation otherwise than ours."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.AvgPool2d(2), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    ).eval()  # fmt: skip


def _our_noise(seed: int, copies: int, x: torch.Tensor, std: float) -> torch.Tensor:
    """The noise the tunnel draws from a generator seeded ``seed``: one ``randn(x.shape)`` per copy, float32, times
    the std; laid out as Captum's (B * copies, ...) with each sample's copies together (``repeat_interleave``)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.stack([torch.randn(x.shape, generator=generator) * std for _ in range(copies)])
    return noise.to(x.dtype).transpose(0, 1).reshape(x.shape[0] * copies, *x.shape[1:])


def _captum_with_noise(monkeypatch, attribution, x, noise, **options):
    """Captum's NoiseTunnel with its torch.normal draw replaced by ``noise``."""
    monkeypatch.setattr(captum_tunnel.torch, "normal", lambda mean, std: noise.to(std.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captum.NoiseTunnel(attribution).attribute(x, **options)


PEERS = {  # our registered method and its options -> Captum's attribution and its options
    "gradient": (lambda model: captum.Saliency(model), {"abs": False}, {}),
    "input_x_gradient": (lambda model: captum.InputXGradient(model), {}, {}),
    "integrated_gradients": (
        lambda model: captum.IntegratedGradients(model),
        {"n_steps": 8, "method": "gausslegendre", "baselines": 0.1},
        {"n_steps": 8, "method": "gausslegendre", "baseline": 0.1},
    ),
    "deeplift": (lambda model: captum.DeepLift(model), {"baselines": 0.1}, {"baseline": 0.1}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(PEERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_tunnel_matches_captum_given_the_same_noise(monkeypatch, method, kind, dtype):
    model = _cnn().to(dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    target, copies, std, seed = torch.tensor([0, 3, 1]), 5, 0.3, 7
    make, their_options, our_options = PEERS[method]
    ours = noise_tunnel(model, x, target, method=method, kind=kind, n_samples=copies, stdevs=std,
                        method_options=our_options, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    noise = _our_noise(seed, copies, x, std)
    theirs = _captum_with_noise(monkeypatch, make(model), x, noise, nt_type=kind, nt_samples=copies, stdevs=std,
                                target=target, **their_options)  # fmt: skip
    assert ours.dtype == dtype and ours.shape == x.shape
    # Captum takes mean(a^2) - mean(a)^2 for VarGrad, in the attributions' dtype (ours: Chan's update in float64),
    # and its Gauss-Legendre nodes agree with ours to about 1e-8
    scale = float(theirs.abs().max())
    tolerance = 1e-4 if dtype == torch.float32 else (1e-7 if method == "integrated_gradients" else 1e-10)
    assert float((ours - theirs).abs().max()) <= tolerance * scale
    assert scale > 0


@pytest.mark.parametrize("samples_per_call", [1, 2, 3, 7])
def test_chunking_the_copies_changes_nothing(samples_per_call):
    model, x = _cnn().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for kind in KINDS:
        whole = noise_tunnel(model, x, 1, kind=kind, n_samples=7, generator=torch.Generator().manual_seed(0))
        chunked = noise_tunnel(model, x, 1, kind=kind, n_samples=7, samples_per_call=samples_per_call,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_vargrad_of_a_linear_model_is_zero_and_smoothgrad_is_its_weight():
    torch.manual_seed(2)
    linear = nn.Linear(12, 3)
    x = torch.randn(4, 12)
    options = {"n_samples": 9, "stdevs": 2.0, "samples_per_call": 4}
    spread = vargrad(linear, x, 2, generator=torch.Generator().manual_seed(0), **options)
    assert bool((spread == 0).all())  # exactly: the gradient is the same at every noisy copy
    mean = noise_tunnel(linear, x, 2, generator=torch.Generator().manual_seed(0), **options)
    torch.testing.assert_close(mean, linear.weight[2].expand(4, 12))
    squared = smoothgrad_sq(linear, x, 2, generator=torch.Generator().manual_seed(0), **options)
    torch.testing.assert_close(squared, (linear.weight[2] ** 2).expand(4, 12))


@pytest.mark.parametrize("method", ["gradient", "input_x_gradient", "integrated_gradients"])
def test_smoothgrad_squared_is_at_least_smoothgrad_squared_and_vargrad_is_their_difference(method):
    model, x = _cnn(), torch.randn(2, 3, 8, 8)
    options = {"method": method, "n_samples": 6, "noise_level": 0.2}
    draws = {kind: noise_tunnel(model, x, None, kind=kind, generator=torch.Generator().manual_seed(3), **options)
             for kind in KINDS}  # fmt: skip
    assert bool((draws["smoothgrad_sq"] >= draws["smoothgrad"] ** 2).all())
    assert bool((draws["vargrad"] >= 0).all()) and float(draws["vargrad"].max()) > 0
    torch.testing.assert_close(draws["vargrad"], draws["smoothgrad_sq"] - draws["smoothgrad"] ** 2,
                               rtol=1e-4, atol=1e-10)  # fmt: skip


def test_the_gradient_tunnel_is_smoothgrad_on_the_same_noise():
    """Our own SmoothGrad draws its noise the same way (the range-relative noise_level): the same numbers."""
    model, x = _cnn().double(), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    tunnel = noise_tunnel(model, x, 2, n_samples=5, noise_level=0.1, generator=torch.Generator().manual_seed(4))
    plain = smoothgrad(model, x, 2, n_samples=5, noise_level=0.1, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tunnel, plain, rtol=1e-10, atol=1e-12)


def test_per_sample_baselines_and_stochastic_methods_inside():
    model, x = _cnn().double(), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    baseline = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    both = noise_tunnel(model, x, 1, method="integrated_gradients", n_samples=3, stdevs=0.0,
                        method_options={"baseline": baseline, "n_steps": 6})  # fmt: skip
    expected = attribute("integrated_gradients", model, x, 1, baseline=baseline, n_steps=6)  # no noise: the method
    torch.testing.assert_close(both, expected, rtol=1e-10, atol=1e-12)
    # a stochastic method inside draws from the tunnel's generator: seeded, the same; the global RNG untouched
    state = torch.random.get_rng_state()
    first = vargrad(model, x, 1, method="gradient_shap", n_samples=3, generator=torch.Generator().manual_seed(0))
    again = vargrad(model, x, 1, method="gradient_shap", n_samples=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and torch.equal(torch.random.get_rng_state(), state)


def test_callbacks_reach_the_tunnels_by_name():
    model, x = _cnn(), torch.randn(2, 3, 8, 8)
    tunnel = {"method": "integrated_gradients", "method_options": {"n_steps": 4}}
    explainer = Explainer({"vargrad": {"n_samples": 4}, "smoothgrad_sq": None, "noise_tunnel": tunnel})
    result = explainer(model, x)
    assert set(result.maps()) == {"vargrad", "smoothgrad_sq", "noise_tunnel"}
    again = explainer(model, x)  # the explainer's own seeded generator: the same draws at every call
    for key, value in result.attributions.items():
        assert torch.equal(value, again.attributions[key]), key


def test_bad_arguments_are_refused_with_the_reason():
    model, x = _cnn(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="kind must be one of"):
        noise_tunnel(model, x, kind="smoothgrad2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown attribution method"):
        noise_tunnel(model, x, method="saliency")
    with pytest.raises(ValueError, match="CAM method"):
        noise_tunnel(model, x, method="grad_cam")
    with pytest.raises(ValueError, match="either stdevs"):
        noise_tunnel(model, x, stdevs=0.1, noise_level=0.1)
    with pytest.raises(ValueError, match="stdevs must be"):
        noise_tunnel(model, x, stdevs=-1.0)
    with pytest.raises(ValueError, match="n_samples must be"):
        noise_tunnel(model, x, n_samples=0)
    with pytest.raises(ValueError, match=r"sets .*generator"):
        noise_tunnel(model, x, method="smoothgrad", method_options={"generator": torch.Generator()})
    with pytest.raises(TypeError, match="takes no option"):
        noise_tunnel(model, x, method="gradient", method_options={"n_steps": 4})
    assert tuple(KINDS) == tunnel_module.NOISE_TUNNEL_KINDS
