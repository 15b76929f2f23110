"""Layer attribution and neuron targets: Captum side by side (float64), analytic cases, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    Explainer,
    NeuronTarget,
    attribute,
    gradient,
    gradient_shap,
    input_x_gradient,
    integrated_gradients,
    layer_conductance,
    layer_gradient_x_activation,
    layer_integrated_gradients,
    occlusion,
    smoothgrad,
    vargrad,
)

captum_attr = pytest.importorskip("captum.attr")

RIEMANN_AND_GAUSS = ["gausslegendre", "riemann_left", "riemann_middle", "riemann_right"]  # Captum's trapezoid differs


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    return net.double().eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3])


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.detach() - theirs.detach()).abs().max())


@pytest.mark.parametrize("method", RIEMANN_AND_GAUSS)
def test_layer_integrated_gradients_matches_captum(method):
    net, (x, t) = _convnet(), _inputs()
    ours, delta = layer_integrated_gradients(net, x, t, "2", n_steps=20, method=method, return_convergence_delta=True)
    theirs, their_delta = captum_attr.LayerIntegratedGradients(net, net[2]).attribute(
        x, target=t, n_steps=20, method=method, return_convergence_delta=True
    )
    assert ours.shape == theirs.shape == (4, 8, 6, 6)
    # Captum's Riemann points come from a float32 torch.linspace: ~1e-8 relative apart from ours (float64)
    assert _max_diff(ours, theirs) < 1e-7 * max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(delta, their_delta.to(delta.dtype), rtol=0, atol=1e-8)


def test_layer_integrated_gradients_with_a_baseline_and_chunks_matches_captum():
    net, (x, t) = _convnet(), _inputs()
    baseline = torch.full_like(x, 0.3)
    ours = layer_integrated_gradients(net, x, t, net[1], baseline=baseline, n_steps=12, internal_batch_size=8)
    theirs = captum_attr.LayerIntegratedGradients(net, net[1]).attribute(x, baselines=baseline, target=t, n_steps=12)
    assert _max_diff(ours, theirs) < 1e-10
    averaged = layer_integrated_gradients(net, x, t, "1", n_steps=12, multiply_by_inputs=False)
    theirs = captum_attr.LayerIntegratedGradients(net, net[1], multiply_by_inputs=False).attribute(
        x, target=t, n_steps=12
    )
    assert _max_diff(averaged, theirs) < 1e-10


def test_layer_integrated_gradients_at_an_embedding_of_token_ids_matches_captum():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Embedding(12, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).double().eval()
    ids = torch.tensor([[1, 4, 7, 2], [3, 3, 9, 11]])
    ours = layer_integrated_gradients(net, ids, 2, "0", baseline=0, n_steps=16)
    theirs = captum_attr.LayerIntegratedGradients(net, net[0]).attribute(
        ids, baselines=torch.zeros_like(ids), target=2, n_steps=16
    )
    assert ours.shape == (2, 4, 5)
    assert _max_diff(ours, theirs) < 1e-8  # Gauss-Legendre nodes: ours from eigh, Captum's from numpy


@pytest.mark.parametrize("method", RIEMANN_AND_GAUSS)
def test_layer_conductance_matches_captum(method):
    net, (x, t) = _convnet(), _inputs()
    ours, delta = layer_conductance(net, x, t, "3", n_steps=20, method=method, return_convergence_delta=True)
    theirs, their_delta = captum_attr.LayerConductance(net, net[3]).attribute(
        x, target=t, n_steps=20, method=method, return_convergence_delta=True
    )
    assert ours.shape == theirs.shape == (4, 8, 6, 6)
    assert _max_diff(ours, theirs) < 1e-9
    torch.testing.assert_close(delta, their_delta.to(delta.dtype), rtol=0, atol=1e-9)


def test_layer_conductance_in_chunks_is_the_same_sum():
    net, (x, t) = _convnet(), _inputs()
    whole = layer_conductance(net, x, t, "1", n_steps=10)
    chunked = layer_conductance(net, x, t, "1", n_steps=10, internal_batch_size=12)  # 3 points per pass, 11 in all
    theirs = captum_attr.LayerConductance(net, net[1]).attribute(x, target=t, n_steps=10)
    assert _max_diff(whole, chunked) < 1e-12
    assert _max_diff(chunked, theirs) < 1e-10


@pytest.mark.parametrize("multiply", [True, False])
def test_layer_gradient_x_activation_matches_captum(multiply):
    net, (x, t) = _convnet(), _inputs()
    ours = layer_gradient_x_activation(net, x, t, "3", multiply_by_inputs=multiply)
    theirs = captum_attr.LayerGradientXActivation(net, net[3], multiply_by_inputs=multiply).attribute(x, target=t)
    assert _max_diff(ours, theirs) < 1e-12


def test_layer_gradient_x_activation_of_a_linear_layer_is_each_units_contribution():
    """y = W2 h + b2 with h = W1 x + b1: the attribution of h_j to output c is h_j W2[c, j]; they sum to y_c - b2_c."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    attr = layer_gradient_x_activation(net, x, 1, "0")
    hidden = x @ net[0].weight.T + net[0].bias
    torch.testing.assert_close(attr, hidden * net[1].weight[1])
    torch.testing.assert_close(attr.sum(dim=1), net(x)[:, 1] - net[1].bias[1])


def test_layer_methods_through_the_registry_need_a_layer_and_refuse_wrong_names():
    net, (x, t) = _convnet(), _inputs()
    via_registry = attribute("layer_conductance", net, x, t, layer="3", n_steps=6)
    torch.testing.assert_close(via_registry, layer_conductance(net, x, t, "3", n_steps=6))
    with pytest.raises(ValueError, match="needs layer="):
        layer_integrated_gradients(net, x, t)
    with pytest.raises(ValueError, match="Closest names"):
        layer_gradient_x_activation(net, x, t, "30")
    with pytest.raises(ValueError, match="call it directly"):
        Explainer(["gradient", "layer_integrated_gradients"])


# ------------------------------------------------------------------------------------------------- neuron targets


@pytest.mark.parametrize(
    ("index", "reduce", "selector"),
    [
        ((2, 1, 1), "sum", (2, 1, 1)),  # one unit
        ((2,), "sum", (2, slice(None), slice(None))),  # a channel, summed (Captum's slices)
        (2, "mean", lambda out: out[:, 2].mean(dim=(1, 2))),  # a channel, averaged (a selector function)
    ],
)
def test_neuron_gradient_matches_captum(index, reduce, selector):
    net, (x, _) = _convnet(), _inputs()
    ours = gradient(net, x, NeuronTarget("3", index, reduce=reduce))
    theirs = captum_attr.NeuronGradient(net, net[3]).attribute(x, selector)
    assert (ours != 0).any()
    assert _max_diff(ours, theirs) < 1e-12


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right"])
@pytest.mark.parametrize(("index", "selector"), [((4, 3, 3), (4, 3, 3)), ((4,), (4, slice(None), slice(None)))])
def test_neuron_integrated_gradients_matches_captum(method, index, selector):
    net, (x, _) = _convnet(), _inputs()
    ours = integrated_gradients(net, x, NeuronTarget("1", index), n_steps=20, method=method, internal_batch_size=24)
    theirs = captum_attr.NeuronIntegratedGradients(net, net[1]).attribute(x, selector, n_steps=20, method=method)
    # Captum's Riemann points come from a float32 torch.linspace: ~1e-8 relative apart from ours (float64)
    assert _max_diff(ours, theirs) < 1e-7 * max(1.0, float(theirs.abs().max()))


def test_neuron_gradient_shap_matches_captum_on_one_draw_per_sample():
    """One draw of a zero baseline: GradientSHAP is the gradient at alpha x times x, alpha drawn per sample."""
    net, (x, _) = _convnet(), _inputs()
    unit = NeuronTarget("3", (1, 2, 2))
    ours = gradient_shap(net, x, unit, n_samples=1, generator=torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(0)
    torch.randint(1, (1, 4), generator=draws)  # the baseline drawn per sample (one: zeros), then alpha
    alphas = torch.rand((1, 4), generator=draws, dtype=torch.float64)[0]
    expected = torch.stack(
        [
            captum_attr.NeuronGradient(net, net[3]).attribute((alphas[i] * x[i : i + 1]).detach(), (1, 2, 2))[0]
            for i in range(4)
        ]
    )
    assert _max_diff(ours, expected * x) < 1e-12


def test_neuron_gradient_of_a_linear_unit_is_its_weight_row():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    torch.testing.assert_close(gradient(net, x, NeuronTarget("0", 2)), net[0].weight[2].expand(6, 3))
    torch.testing.assert_close(input_x_gradient(net, x, NeuronTarget("0", (1,))), x * net[0].weight[1])
    ig = integrated_gradients(net, x, NeuronTarget("0", 3), n_steps=4)  # linear: exact with any rule
    torch.testing.assert_close(ig, x * net[0].weight[3])
    averaged = gradient(net, x, NeuronTarget("0", (), reduce="mean"))  # the mean of the whole layer
    torch.testing.assert_close(averaged, net[0].weight.mean(dim=0).expand(6, 3))


def test_noise_tunnels_and_smoothgrad_take_a_neuron_target():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    unit = NeuronTarget("0", 1)
    smooth = smoothgrad(net, x, unit, n_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(smooth, net[0].weight[1].expand(2, 3))  # a linear unit: the same gradient everywhere
    spread = vargrad(net, x, unit, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert spread.abs().max() < 1e-10


def test_the_forward_stops_at_the_layer_and_leaves_no_hook_and_the_modes():
    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            self.body(x)
            raise AssertionError("ran past the explained layer")  # the head is never needed for a unit of body

    torch.manual_seed(6)
    net = Guarded().train()
    x = torch.randn(3, 3)
    first = gradient(net, x, NeuronTarget("body.1", 0))
    torch.testing.assert_close(first, gradient(net, x, NeuronTarget("body.1", 0)))  # Dropout off: deterministic
    assert net.training and net.body[1].training
    assert all(p.grad is None for p in net.parameters())
    for module in net.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_neuron_target_errors_name_the_problem():
    net, (x, _) = _convnet(), _inputs()
    with pytest.raises(ValueError, match="Closest names"):
        gradient(net, x, NeuronTarget("31", 0))
    with pytest.raises(ValueError, match=r"does not fit layer '3', whose output is \(4, 8, 6, 6\)"):
        gradient(net, x, NeuronTarget("3", (8,)))
    with pytest.raises(ValueError, match="at most 3 indices"):
        gradient(net, x, NeuronTarget("3", (0, 0, 0, 0)))
    with pytest.raises(ValueError, match="index must be"):
        NeuronTarget("3", (-1,))
    with pytest.raises(ValueError, match="reduce must be"):
        NeuronTarget("3", 0, reduce="max")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NeuronTarget"):
        occlusion(net, x, NeuronTarget("3", 0))
