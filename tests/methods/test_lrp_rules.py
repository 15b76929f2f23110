"""LRP rule objects and composites: each built-in rule against zennit's rule of the same name, composites by type,
name and first layer against zennit's composites, a rule of one's own by hand, conservation, and the refusals."""

from __future__ import annotations

import typing
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods.attribution.lrp import (
    LRP_COMPOSITES,
    LRP_RULES,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    LRPComposite,
    LRPLayer,
    LRPRule,
    LRPRuleName,
    WSquare,
    ZBox,
    ZPlus,
    lrp,
)

LOW = torch.tensor([-1.0, -0.5, -2.0])[:, None, None]  # per-channel bounds of the input box
HIGH = torch.tensor([1.5, 2.0, 1.0])[:, None, None]


def _network(bias: bool = True) -> nn.Sequential:
    """Conv + BatchNorm (eps=0, random statistics: zennit's merge is then exact) + ReLU + pooling + linear, float64;
    ``bias=False`` zeroes every bias and the BatchNorm's mean and shift (zennit's merge needs bias parameters)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, eps=0.0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )
    norm = net[1]
    norm.running_mean.copy_(torch.rand(4) * 0.4 - 0.2)
    norm.running_var.copy_(torch.rand(4) * 1.5 + 0.5)
    norm.weight.data.copy_(torch.rand(4) + 0.5)
    norm.bias.data.copy_(torch.rand(4) * 0.2 - 0.1)
    if not bias:
        norm.running_mean.zero_()
        for module in net.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
    return net.double().eval()


def _inside_the_box(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return (LOW + (HIGH - LOW) * torch.rand(batch, 3, 8, 8)).double()


TARGET = torch.tensor([1, 2])


def _zennit(model: nn.Module, x: torch.Tensor, composite_of) -> torch.Tensor:
    """zennit's relevance with the composite ``composite_of(base layer map, canonizers)``."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import layer_map_base

    composite = composite_of(layer_map_base(), [SequentialMergeBatchNorm()])
    with torch.no_grad():
        one_hot = F.one_hot(TARGET, model(x).shape[1]).to(x.dtype)
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), lambda output: one_hot * output)
    return relevance


def _assert_close(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-12) -> None:
    scale = expected.abs().max()
    assert scale > 0
    assert (ours - expected).abs().max() <= tolerance * scale, float((ours - expected).abs().max() / scale)


ZENNIT_PAIRS = {
    "epsilon": (Epsilon(), lambda r: r.Epsilon(1e-6)),
    "epsilon_0.25": (Epsilon(0.25), lambda r: r.Epsilon(0.25)),
    "zplus": (ZPlus(), lambda r: r.ZPlus()),
    "alpha2_beta1": (AlphaBeta(2.0, 1.0), lambda r: r.AlphaBeta(2.0, 1.0)),
    "alpha1_beta0": (AlphaBeta(1.0, 0.0), lambda r: r.AlphaBeta(1.0, 0.0)),
    "gamma": (Gamma(), lambda r: r.Gamma(0.25)),
    "gamma_1": (Gamma(1.0, stabilizer=1e-4), lambda r: r.Gamma(1.0, stabilizer=1e-4)),
    "flat": (Flat(), lambda r: r.Flat()),
    "wsquare": (WSquare(), lambda r: r.WSquare(zero_params=["bias"])),  # the paper's rule has no bias
    "zbox": (ZBox(-3.0, 3.0), lambda r: r.ZBox(-3.0, 3.0)),
}


@pytest.mark.parametrize("name", ZENNIT_PAIRS)
def test_each_rule_on_every_layer_matches_zennit(name):
    pytest.importorskip("zennit")
    from zennit import rules
    from zennit.composites import LayerMapComposite
    from zennit.types import Linear

    ours, theirs = ZENNIT_PAIRS[name]
    model, x = _network(), _inside_the_box()

    def composite(base, canonizers):
        return LayerMapComposite([*base, (Linear, theirs(rules))], canonizers=canonizers)

    expected = _zennit(model, x, composite)
    _assert_close(lrp(model, x, TARGET, rule=ours), expected)


def test_first_layer_type_and_name_composite_matches_zennit():
    """ZBox (per-channel bounds) on the first layer, z+ on convolutions, epsilon on linear layers, and a name ('10',
    a Linear) that wins over its type; given as an LRPComposite and as a plain mapping."""
    pytest.importorskip("zennit")
    from zennit import rules
    from zennit.composites import LayerMapComposite, MixedComposite, NameMapComposite, SpecialFirstLayerMapComposite
    from zennit.types import Convolution, Linear

    model, x = _network(), _inside_the_box()

    def composite(base, canonizers):
        by_type = SpecialFirstLayerMapComposite(
            [*base, (Convolution, rules.ZPlus()), (nn.Linear, rules.Epsilon(0.25))],
            [(Linear, rules.ZBox(LOW[None], HIGH[None]))],
        )
        return MixedComposite([NameMapComposite([(("10",), rules.Gamma(0.5))]), by_type], canonizers=canonizers)

    expected = _zennit(model, x, composite)
    composite = LRPComposite(
        first_layer=ZBox(LOW, HIGH),
        by_type={nn.Conv2d: ZPlus(), nn.Linear: Epsilon(0.25)},
        by_name={"10": Gamma(0.5)},
    )
    _assert_close(lrp(model, x, TARGET, rule=composite), expected)

    def names_only(base, canonizers):  # the mapping form: names win, the other layers get Epsilon()
        name_map = [(("0",), rules.ZBox(LOW[None], HIGH[None])), (("8",), rules.Flat())]
        return MixedComposite(
            [NameMapComposite(name_map), LayerMapComposite([*base, (Linear, rules.Epsilon())])],
            canonizers=canonizers,
        )

    expected = _zennit(model, x, names_only)
    _assert_close(lrp(model, x, TARGET, rule={"0": ZBox(LOW, HIGH), "8": Flat(), nn.Linear: Epsilon()}), expected)


def test_named_rules_are_their_rule_objects():
    """The names keep their numbers: each is its objects, to the bit (transposed convolutions map as convolutions)."""
    model, x = _network(), _inside_the_box()
    convolutions = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    linear = Epsilon(0.1)
    objects = {
        "epsilon": Epsilon(0.1),
        "gamma": Gamma(0.5, stabilizer=1e-5),
        "alpha_beta": AlphaBeta(1.5, 0.5, stabilizer=1e-5),
        "zplus": ZPlus(1e-5),
        "epsilon_plus": LRPComposite(by_type={convolutions: ZPlus(1e-5), nn.Linear: linear}),
        "epsilon_plus_flat": LRPComposite(
            by_type={convolutions: ZPlus(1e-5), nn.Linear: linear}, first_layer=Flat(1e-5)
        ),
        "epsilon_gamma_box": LRPComposite(
            by_type={convolutions: Gamma(0.5, 1e-5), nn.Linear: linear}, first_layer=ZBox(LOW, HIGH, 1e-5)
        ),
        "epsilon_alpha2_beta1": LRPComposite(by_type={convolutions: AlphaBeta(2.0, 1.0, 1e-5), nn.Linear: linear}),
        "epsilon_alpha2_beta1_flat": LRPComposite(
            by_type={convolutions: AlphaBeta(2.0, 1.0, 1e-5), nn.Linear: linear}, first_layer=Flat(1e-5)
        ),
    }
    assert set(typing.get_args(LRPRuleName)) == set(LRP_RULES + LRP_COMPOSITES) == set(objects)
    for name, rule in objects.items():
        keywords = {"epsilon": 0.1, "gamma": 0.5, "stabilizer": 1e-5}
        if name == "alpha_beta":
            keywords.update(alpha=1.5, beta=0.5)
        if name == "epsilon_gamma_box":
            keywords.update(low=LOW, high=HIGH)
        named = lrp(model, x, TARGET, rule=name, **keywords)
        assert torch.equal(named, lrp(model, x, TARGET, rule=rule, stabilizer=1e-5)), name


class AbsoluteWeight(LRPRule):
    """A rule of one's own: each output's relevance split over its inputs in proportion to |w|."""

    def propagate(self, layer: LRPLayer, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        magnitude = layer.weight.abs()
        total = layer.forward(torch.ones_like(x), magnitude)
        return layer.gradient(x, relevance / total, magnitude)


class ShiftedEpsilon(LRPRule):
    """Another: the epsilon rule with ``z + epsilon`` (no sign) in the denominator."""

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon

    def propagate(self, layer: LRPLayer, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        z = layer.forward(x, layer.weight, layer.bias)
        return x * layer.gradient(x, relevance / (z + self.epsilon), layer.weight)


def test_a_rule_of_ones_own_by_hand():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    w1, b1, w2, b2 = (p.detach() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    score = net(x)[:, 1].detach()

    hidden = w2[1].abs() / w2[1].abs().sum() * score[:, None]  # (5, 4): the head's relevance split by |w|
    expected = hidden @ (w1.abs() / w1.abs().sum(dim=1, keepdim=True))  # (5, 3)
    torch.testing.assert_close(lrp(net, x, 1, rule=AbsoluteWeight()), expected)
    torch.testing.assert_close(expected.sum(dim=1), score)  # it conserves, biases or not

    h = torch.relu(x @ w1.T + b1)  # the mixed composite: ShiftedEpsilon on '2' by name, AbsoluteWeight by type
    hidden = h * w2[1] * (score / (score + 0.5))[:, None]
    expected = hidden @ (w1.abs() / w1.abs().sum(dim=1, keepdim=True))
    relevance = lrp(net, x, 1, rule={"2": ShiftedEpsilon(0.5), nn.Linear: AbsoluteWeight()})
    torch.testing.assert_close(relevance, expected)
    assert b2.abs().sum() > 0  # the head's bias is really absorbed by the epsilon rule, not by the hand computation


def test_a_rule_sees_the_batchnorm_merged_weights():
    seen = []

    class Recording(Epsilon):
        def propagate(self, layer, x, relevance):
            seen.append((layer.module, layer.weight, layer.bias))
            return super().propagate(layer, x, relevance)

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    norm = net[1]
    norm.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    norm.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 1.5]))
    lrp(net, torch.randn(2, 3, dtype=torch.float64), 0, rule={"0": Recording()})
    ((module, weight, bias),) = seen
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    assert module is net[0]
    torch.testing.assert_close(weight, net[0].weight.detach() * scale[:, None])
    torch.testing.assert_close(bias, (net[0].bias.detach() - norm.running_mean) * scale + norm.bias.detach())


@pytest.mark.parametrize(
    "rule",
    [Epsilon(0.0), ZPlus(1e-12), {nn.Conv2d: ZPlus(1e-12), nn.Linear: Epsilon(0.0)}],
    ids=["epsilon0", "zplus", "zplus_conv_epsilon0_linear"],
)
def test_bias_free_relu_network_conserves_the_score(rule):
    model = _network(bias=False)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)  # non-negative: z+ conserves layer by layer
    if isinstance(rule, ZPlus):
        model.append(nn.ReLU())  # a non-negative score, which z+ on the head can conserve
    relevance = lrp(model, x, TARGET, rule=rule, stabilizer=1e-12)
    explained = model(x).gather(1, TARGET[:, None])[:, 0].detach()
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), explained, rtol=1e-8, atol=1e-10)


def test_zbox_first_layer_conserves_and_matches_zennit():
    pytest.importorskip("zennit")
    from zennit import rules
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.types import Convolution, Linear

    model, x = _network(bias=False), _inside_the_box()
    composite = LRPComposite(first_layer=ZBox(LOW, HIGH, 0.0), by_type={nn.Conv2d: ZPlus(0.0), nn.Linear: Epsilon(0.0)})
    relevance = lrp(model, x, TARGET, rule=composite, stabilizer=1e-12)
    explained = model(x).gather(1, TARGET[:, None])[:, 0].detach()
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), explained, rtol=1e-8, atol=1e-10)

    def theirs(base, canonizers):
        layer_map = [*base, (Convolution, rules.ZPlus(0.0)), (nn.Linear, rules.Epsilon(0.0))]
        return SpecialFirstLayerMapComposite(layer_map, [(Linear, rules.ZBox(LOW[None], HIGH[None], 0.0))], canonizers)

    _assert_close(lrp(model, x, TARGET, rule=composite), _zennit(model, x, theirs))


def test_names_cover_containers_and_the_most_specific_rule_wins():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()), nn.Flatten(), nn.Linear(16, 3)
    ).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def run(rule):
        return lrp(net, x, 0, rule=rule)

    explicit = run({"0.0": ZPlus(), "0.2": Gamma(0.5), "2": Epsilon()})
    assert not torch.equal(run(Gamma(0.5)), explicit)
    # a container's name covers its layers, a deeper name wins, the rest get Epsilon()
    assert torch.equal(run({"0": ZPlus(), "0.2": Gamma(0.5)}), explicit)
    # the first layer's rule wins over a container's name ...
    assert torch.equal(run(LRPComposite(by_name={"0": Gamma(0.5)}, first_layer=ZPlus())), explicit)
    # ... and the layer's own name over the first layer's rule, names over types
    own_name = LRPComposite(by_name={"0.0": ZPlus()}, first_layer=Flat(), by_type={nn.Conv2d: Gamma(0.5)})
    assert torch.equal(run(own_name), explicit)
    # the most specific class wins whatever the order: nn.Conv2d over nn.Module
    by_class = run({nn.Module: Gamma(0.5), nn.Conv2d: ZPlus(), "0.2": Gamma(0.5)})
    assert torch.equal(by_class, run({"0.0": ZPlus(), "0.2": Gamma(0.5), "2": Gamma(0.5)}))


def test_refusals_name_the_problem_and_leave_nothing_behind():
    features = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    net = nn.Sequential(OrderedDict(features=features, head=nn.Linear(4, 2)))
    x = torch.randn(2, 3)
    attributes = [set(vars(module)) for module in net.modules()]
    with pytest.raises(
        ValueError, match=r"'feature\.0' is not a sub-module of Sequential\. Closest names: 'features\.0'"
    ):
        lrp(net, x, rule={"feature.0": ZBox(0.0, 1.0)})
    with pytest.raises(ValueError, match=r"'features.1' \(ReLU\) is no convolution or linear layer and holds none"):
        lrp(net, x, rule=LRPComposite(by_name={"features.1": Epsilon()}))
    with pytest.raises(ValueError, match="no such layer is a ReLU"):
        lrp(net, x, rule={nn.ReLU: Epsilon()})
    with pytest.raises(TypeError, match=r"rule for Linear must be an LRPRule, got 'epsilon'.*use Epsilon\(\) here"):
        lrp(net, x, rule={nn.Linear: "epsilon"})
    with pytest.raises(TypeError, match="by_type keys must be module classes"):
        lrp(net, x, rule={3: Epsilon()})
    with pytest.raises(ValueError, match=r"epsilon, gamma only configure the named rules.*Epsilon\(0\.25\)"):
        lrp(net, x, rule=ZPlus(), epsilon=0.25, gamma=1.0)
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBeta(1.0, 1.0)
    with pytest.raises(ValueError, match="epsilon >= 0"):
        Epsilon(-1.0)
    with pytest.raises(ValueError, match="low <= high"):
        ZBox(1.0, 0.0)
    with pytest.raises(TypeError, match="got int"):
        lrp(net, x, rule=3)

    class Wrong(LRPRule):
        def propagate(self, layer, x, relevance):
            return relevance

    with pytest.raises(
        ValueError, match=r"Wrong.* of module 'head' returned \(2, 2\), not a tensor shaped .* \(2, 4\)"
    ):
        lrp(net, x, 0, rule={"head": Wrong()})
    for module, before in zip(net.modules(), attributes, strict=True):  # no hook, no attribute set on a module
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
        assert set(vars(module)) == before
    assert F.relu(torch.tensor([-1.0, 1.0])).tolist() == [0.0, 1.0]  # no mode outlives a refusal
