"""zennit's named LRP composites (epsilon-gamma-box, epsilon-alpha2-beta1, their flat variants, epsilon-plus) and their
bias-free variants against zennit's composites of the same name; transposed convolutions against zennit; the box
bounds' refusals; and LRP's convergence delta against analytic residuals.

Every comparison is float64 on the same model and inputs, as the largest difference relative to the largest |relevance|
of zennit: the formulas are the same, so only the order of summation differs (1e-16 relative, amplified at most by
1 / epsilon = 1e6 where an output is near 0): 1e-10 is the bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import Explainer
from lightning_interp.methods.attribution.lrp import (
    LRP_COMPOSITES,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    LRPLayer,
    WSquare,
    ZBox,
    ZPlus,
    lrp,
)

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]  # ImageNet's normalisation
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD  # the box of the normalised pixels
TOLERANCE = 1e-10


def _with_statistics(net: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (eps=0: zennit's merge and ours then agree to rounding)."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 0.0
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(channels) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(channels) + 0.5)
            module.bias.data.copy_(torch.rand(channels) * 0.2 - 0.1)
    return net.double().eval()


def _vgg_like() -> nn.Module:
    """A small VGG: conv-BN-ReLU blocks, max pooling, a pooled flatten and a two-layer linear head."""
    torch.manual_seed(0)
    return _with_statistics(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(48, 16),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(16, 5),
        )
    )


def _flatten_head() -> nn.Module:
    """Convolutions without BatchNorm, average pooling, and a flatten straight into one linear classifier."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    ).double()


MODELS = {"vgg_like": (_vgg_like, 8), "flatten_head": (_flatten_head, 8)}


def _normalised_images(size: int, batch: int = 3) -> torch.Tensor:
    torch.manual_seed(2)
    return (torch.rand(batch, 3, size, size, dtype=torch.float64) - MEAN) / STD


TARGET = torch.tensor([1, 4, 0])


def _zennit(model: nn.Module, x: torch.Tensor, composite) -> torch.Tensor:
    from zennit.attribution import Gradient

    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        one_hot = F.one_hot(TARGET[: x.shape[0]], model(x).shape[1]).to(x.dtype)
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), lambda output: one_hot * output)
    for key, value in model.state_dict().items():  # zennit's canonizers put the model back
        assert torch.equal(value, state[key]), key
    return relevance


def _difference(ours: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max()
    assert scale > 0 and torch.isfinite(expected).all()
    return float((ours - expected).abs().max() / scale)


def _their_composite(name: str, bias: bool, low=None, high=None):
    from zennit import composites
    from zennit.canonizers import SequentialMergeBatchNorm

    zero = {} if bias else {"zero_params": "bias"}
    kind = {
        "epsilon_plus": composites.EpsilonPlus,
        "epsilon_plus_flat": composites.EpsilonPlusFlat,
        "epsilon_gamma_box": composites.EpsilonGammaBox,
        "epsilon_alpha2_beta1": composites.EpsilonAlpha2Beta1,
        "epsilon_alpha2_beta1_flat": composites.EpsilonAlpha2Beta1Flat,
    }[name]
    assert composites.COMPOSITES[name] is kind  # zennit registers each under the same name
    box = {"low": low[None], "high": high[None]} if name == "epsilon_gamma_box" else {}
    return kind(**box, canonizers=[SequentialMergeBatchNorm()], **zero)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "bias_free"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", LRP_COMPOSITES)
def test_named_composites_match_zennits_of_the_same_name(name, model_name, bias):
    pytest.importorskip("zennit")
    build, size = MODELS[model_name]
    model, x = build(), _normalised_images(size)
    expected = _zennit(model, x, _their_composite(name, bias, LOW, HIGH))
    box = {"low": LOW, "high": HIGH} if name == "epsilon_gamma_box" else {}
    ours = lrp(model, x, TARGET, rule=name, bias=bias, **box)
    assert _difference(ours, expected) <= TOLERANCE, (name, model_name, bias, _difference(ours, expected))
    if not bias:  # the bias-free variant really differs: the biases took a share before
        assert _difference(lrp(model, x, TARGET, rule=name, **box), expected) > 1e-4


def test_the_box_defaults_to_raw_images_and_refuses_inputs_outside_it():
    pytest.importorskip("zennit")
    model = _flatten_head()
    torch.manual_seed(3)
    pixels = torch.rand(3, 3, 8, 8, dtype=torch.float64)  # raw [0, 1] images: the default box
    expected = _zennit(
        model, pixels, _their_composite("epsilon_gamma_box", True, torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
    )
    assert _difference(lrp(model, pixels, TARGET, rule="epsilon_gamma_box"), expected) <= TOLERANCE
    assert _difference(lrp(model, pixels, TARGET, rule="epsilon_gamma_box", low=0.0, high=1.0), expected) <= TOLERANCE

    normalised = _normalised_images(8)  # the default box cannot hold them: refused, with the way out
    with pytest.raises(
        ValueError, match=r"input range \[0, 1\] by default.*spans \[-2\.\d+, 2\.\d+\].*low = \(0 - mean\)"
    ):
        lrp(model, normalised, TARGET, rule="epsilon_gamma_box")
    with pytest.raises(ValueError, match=r"with the low and high given.*values outside\).*the box must hold every"):
        lrp(model, normalised, TARGET, rule="epsilon_gamma_box", low=-1.0, high=1.0)
    with pytest.raises(ValueError, match=r"needs both bounds.*low=-1\.0, high=None"):
        lrp(model, normalised, TARGET, rule="epsilon_gamma_box", low=-1.0)
    with pytest.raises(
        ValueError, match=r"low and high are the input box of rule='epsilon_gamma_box'; rule='epsilon_plus'"
    ):
        lrp(model, normalised, TARGET, rule="epsilon_plus", low=LOW, high=HIGH)
    with pytest.raises(ValueError, match=r"alpha=2, beta=1 on convolutions.*got alpha=3\.0"):
        lrp(model, normalised, TARGET, rule="epsilon_alpha2_beta1", alpha=3.0, beta=2.0)
    with pytest.raises(ValueError, match=r"bias only configures the named rules.*Epsilon\(bias=False\)"):
        lrp(model, normalised, TARGET, rule=Epsilon(), bias=False)
    with pytest.raises(ValueError, match=r"low, high only configure the named rules"):
        lrp(model, normalised, TARGET, rule=Epsilon(), low=0.0, high=1.0)
    # a model that normalises inside forward: the box is the first layer's input range, the raw pixels' [0, 1] fit
    inner = nn.Sequential(Normalise(), *model)
    with pytest.raises(ValueError, match="by default"):
        lrp(inner, pixels, TARGET, rule="epsilon_gamma_box")
    relevance = lrp(inner, pixels, TARGET, rule="epsilon_gamma_box", low=LOW, high=HIGH)
    outside = lrp(model, (pixels - MEAN) / STD, TARGET, rule="epsilon_gamma_box", low=LOW, high=HIGH)
    assert _difference(relevance * STD, outside) < 1e-12  # the normalisation keeps its gradient (1 / std), as zennit


class Normalise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MEAN) / STD


# the rules' bias-free variants, each on every layer, against zennit's ``zero_params="bias"``
BIAS_FREE_PAIRS = {
    "epsilon": (Epsilon(bias=False), lambda r: r.Epsilon(1e-6, zero_params="bias")),
    "epsilon_0.25": (Epsilon(0.25, bias=False), lambda r: r.Epsilon(0.25, zero_params=["bias"])),
    "zplus": (ZPlus(bias=False), lambda r: r.ZPlus(zero_params="bias")),
    "alpha2_beta1": (AlphaBeta(2.0, 1.0, bias=False), lambda r: r.AlphaBeta(2.0, 1.0, zero_params="bias")),
    "gamma": (Gamma(0.5, bias=False), lambda r: r.Gamma(0.5, zero_params="bias")),
    "wsquare_with_bias": (WSquare(bias=True), lambda r: r.WSquare()),  # zennit's default adds b² to the denominator
}


@pytest.mark.parametrize("name", BIAS_FREE_PAIRS)
def test_bias_free_rules_match_zennits_zero_params(name):
    pytest.importorskip("zennit")
    from zennit import rules
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.types import Linear

    ours, theirs = BIAS_FREE_PAIRS[name]
    model, x = _vgg_like(), _normalised_images(8)
    composite = LayerMapComposite([*layer_map_base(), (Linear, theirs(rules))], canonizers=[SequentialMergeBatchNorm()])
    expected = _zennit(model, x, composite)
    assert _difference(lrp(model, x, TARGET, rule=ours), expected) <= TOLERANCE
    with_bias = type(ours)(**{**vars(ours), "bias": not ours.bias})
    assert _difference(lrp(model, x, TARGET, rule=with_bias), expected) > 1e-4  # the bias matters on this model


def _decoder() -> nn.Sequential:
    """A decoder-like model: a code upsampled by strided transposed convolutions (one followed by BatchNorm, one
    grouped, one dilated), then a 1x1 convolution, pooling and a linear head for the scores (modules throughout, so
    that zennit's hooks see every layer)."""
    torch.manual_seed(13)
    return _with_statistics(
        nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 6, 4, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 4, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(4, 3, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 5),
        )
    )


def _codes() -> torch.Tensor:
    torch.manual_seed(6)
    return torch.randn(3, 4, 3, 3, dtype=torch.float64)


RULES = {
    "epsilon": (Epsilon(), lambda r: r.Epsilon()),
    "zplus": (ZPlus(), lambda r: r.ZPlus()),
    "alpha2_beta1": (AlphaBeta(), lambda r: r.AlphaBeta(2.0, 1.0)),
    "gamma": (Gamma(), lambda r: r.Gamma(0.25)),
    "flat": (Flat(), lambda r: r.Flat()),
    "wsquare": (WSquare(), lambda r: r.WSquare(zero_params="bias")),
    "zbox": (ZBox(-4.0, 4.0), lambda r: r.ZBox(-4.0, 4.0)),
    "epsilon_bias_free": (Epsilon(bias=False), lambda r: r.Epsilon(zero_params="bias")),
}


@pytest.mark.parametrize("name", RULES)
def test_transposed_convolutions_match_zennit(name):
    pytest.importorskip("zennit")
    from zennit import rules
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.types import Linear

    ours, theirs = RULES[name]
    model, z = _decoder(), _codes()
    # zennit's BatchNorm merge scales a transposed convolution's weight along dim 1 without regard to groups: right
    # here, where the BatchNorm follows the ungrouped first layer
    canonizers = [SequentialMergeBatchNorm()]
    expected = _zennit(model, z, LayerMapComposite([*layer_map_base(), (Linear, theirs(rules))], canonizers=canonizers))
    assert _difference(lrp(model, z, TARGET, rule=ours), expected) <= TOLERANCE


@pytest.mark.parametrize("name", LRP_COMPOSITES)
def test_transposed_convolutions_take_the_convolution_rule_of_the_named_composites(name):
    pytest.importorskip("zennit")
    model, z = _decoder(), _codes()
    box = (
        {"low": torch.full((4, 1, 1), -4.0), "high": torch.full((4, 1, 1), 4.0)} if name == "epsilon_gamma_box" else {}
    )
    expected = _zennit(model, z, _their_composite(name, True, **box))
    assert _difference(lrp(model, z, TARGET, rule=name, **box), expected) <= TOLERANCE


def test_transposed_convolutions_in_1d_and_3d_and_with_an_output_size_match_zennit():
    pytest.importorskip("zennit")
    from zennit import rules
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.types import Linear

    torch.manual_seed(7)
    one_d = nn.Sequential(
        nn.ConvTranspose1d(2, 4, 5, stride=3, padding=1, output_padding=2, groups=2, dilation=2),
        nn.ReLU(),
        nn.ConvTranspose1d(4, 3, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(5),
    ).double()
    three_d = nn.Sequential(nn.ConvTranspose3d(2, 3, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).double()
    for model, x in (
        (one_d, torch.randn(3, 2, 6, dtype=torch.float64)),
        (three_d, torch.randn(3, 2, 2, 2, 2, dtype=torch.float64)),
    ):
        model(x)  # materialise the lazy head
        for ours, theirs in (RULES["gamma"], RULES["alpha2_beta1"], RULES["epsilon_bias_free"]):
            expected = _zennit(model, x, LayerMapComposite([*layer_map_base(), (Linear, theirs(rules))]))
            assert _difference(lrp(model, x, TARGET, rule=ours), expected) <= TOLERANCE

    # an output_size given to forward picks the output padding of the call: the same as a module that has it
    class Sized(nn.Module):
        def __init__(self, output_padding: int, sized: bool) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=output_padding)
            self.head = nn.Linear(2 * 8 * 8, 5)
            self.sized = sized

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.up(x, output_size=[8, 8]) if self.sized else self.up(x)
            return self.head(torch.flatten(F.relu(h), 1))

    torch.manual_seed(8)
    padded, sized = Sized(1, False).double(), Sized(0, True).double()
    sized.load_state_dict(padded.state_dict())
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    for rule in (Epsilon(), ZPlus(), Gamma(), Flat()):
        torch.testing.assert_close(lrp(sized, x, TARGET, rule=rule), lrp(padded, x, TARGET, rule=rule), rtol=0, atol=0)


def test_a_batchnorm_after_a_grouped_transposed_convolution_is_merged_per_output_channel():
    torch.manual_seed(9)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)  # weight (4, 3, 3, 3): output channel 3g + j
    net = _with_statistics(nn.Sequential(up, nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2).double()))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    net(x)
    seen: list[LRPLayer] = []

    class Recording(Epsilon):
        def propagate(self, layer, x, relevance):
            seen.append(layer)
            return super().propagate(layer, x, relevance)

    lrp(net, x, 0, rule={"0": Recording()})
    (layer,) = seen
    with torch.no_grad():  # the merged layer computes the convolution followed by the BatchNorm
        torch.testing.assert_close(
            layer.forward(x, layer.weight, layer.bias), net[1](net[0](x)), rtol=1e-12, atol=1e-12
        )


def test_convergence_delta_is_zero_when_relevance_is_conserved():
    """A bias-free ReLU network: LRP-0 (epsilon=0) conserves exactly; z+ too on non-negative inputs with a
    non-negative score."""
    torch.manual_seed(10)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 6, bias=False),
        nn.ReLU(),
        nn.Linear(6, 3, bias=False),
    ).double()
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    relevance, delta = lrp(net, x, target, rule="epsilon", epsilon=0.0, return_convergence_delta=True)
    assert delta.shape == (4,) and delta.dtype == torch.float64
    score = net(x).gather(1, target[:, None])[:, 0].detach()
    assert score.abs().min() > 1e-3
    assert delta.abs().max() <= 1e-12 * score.abs().max()
    torch.testing.assert_close(relevance, lrp(net, x, target, rule="epsilon", epsilon=0.0), rtol=0, atol=0)
    net.append(nn.ReLU())
    _, delta = lrp(net, x, target, rule=ZPlus(1e-14), return_convergence_delta=True, stabilizer=1e-14)
    assert delta.abs().max() <= 1e-10 * score.abs().max()


def test_convergence_delta_is_the_share_of_the_biases_and_of_epsilon():
    """Analytic residuals: LRP-0 on ``w2 relu(W1 x + b1) + b2`` leaves out ``b2 + sum_j [h_j > 0] b1_j w2_j``; the
    epsilon rule on a bias-free ``z = w x`` keeps ``z^2 / (z + epsilon sign z)``, a residual of ``-epsilon z / (|z| +
    epsilon)``."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        net[0].bias.uniform_(-0.5, 0.5)
        net[2].bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([2, 0, 1, 2, 1])
    _, delta = lrp(net, x, target, rule=Epsilon(0.0), return_convergence_delta=True)
    w1, b1, w2, b2 = (p.detach() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    active = (x @ w1.T + b1 > 0).double()
    expected = -(b2[target] + (active * b1 * w2[target]).sum(dim=1))
    assert expected.abs().min() > 1e-2  # non-zero: the biases take a share
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-12)
    _, delta = lrp(net, x, target, rule=Epsilon(0.0, bias=False), return_convergence_delta=True)
    assert delta.abs().max() < 1e-12  # the bias-free variant conserves the whole score

    linear = nn.Linear(6, 2, bias=False).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    z = linear(x)[:, 1].detach()
    for epsilon in (0.1, 1.0):
        _, delta = lrp(linear, x, 1, rule="epsilon", epsilon=epsilon, return_convergence_delta=True)
        torch.testing.assert_close(delta, -epsilon * z / (z.abs() + epsilon), rtol=1e-12, atol=1e-14)


def test_the_explainer_reports_lrps_completeness_error():
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    result = Explainer({"lrp": {"rule": "epsilon", "epsilon": 0.0}})(net, x)
    relevance, delta = lrp(net, x, result.target, rule="epsilon", epsilon=0.0, return_convergence_delta=True)
    torch.testing.assert_close(result.attributions["lrp"], relevance)
    score = relevance.sum(dim=1) - delta
    expected = delta.abs().mean() / score.abs().mean()
    assert float(expected) > 1e-3
    torch.testing.assert_close(result.scalars["lrp/completeness_error"].double(), expected)
