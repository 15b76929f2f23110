"""LRP against zennit's rules and composites, DeepLIFT (Rescale) against Captum, and both methods' own laws.

LRP: conservation (the input relevance sums to the explained score when no bias absorbs any), the same relevance
whether activations, pooling and residual sums are modules or functions, BatchNorm merged without touching the module.
DeepLIFT: summation-to-delta on models nobody wrote for us, including ones Captum cannot take (a reused ReLU module).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import LRP_COMPOSITES, LRP_RULES, attribute, deeplift, lrp

torchvision = pytest.importorskip("torchvision")


def _random_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and eps=0.

    zennit merges a BatchNorm into the layer before it by rewriting parameters and leaves the BatchNorm as
    ``x / sqrt(1 + eps)``: with eps=0 its canonised model computes exactly the original function, so the two
    implementations can be compared to rounding.
    """
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.0
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) * 0.2 - 0.1)
    return model


def _zennit_relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor, rule: str, resnet: bool) -> torch.Tensor:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import COMPOSITES, LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import AlphaBeta, Epsilon, Gamma, Norm, Pass, ZPlus
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Activation, AvgPool, BatchNorm, Linear

    canonizers = [ResNetCanonizer()] if resnet else [SequentialMergeBatchNorm()]
    single = {"epsilon": Epsilon(1e-6), "zplus": ZPlus(), "alpha_beta": AlphaBeta(2.0, 1.0), "gamma": Gamma(0.25)}
    if rule in single:  # zennit's base layer map, with one rule on every convolution and linear layer
        layer_map = [
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Norm()),
            (BatchNorm, Pass()),
            (Linear, single[rule]),
        ]
        composite = LayerMapComposite([*layer_map, (Linear, single[rule])], canonizers=canonizers)
    else:
        box = {"low": -5.0 * torch.ones(1, 3, 1, 1), "high": 5.0 * torch.ones(1, 3, 1, 1)} if "box" in rule else {}
        composite = COMPOSITES[rule](canonizers=canonizers, **{key: value.to(x) for key, value in box.items()})
    with torch.no_grad():
        one_hot = F.one_hot(target, model(x).shape[1]).to(x.dtype)
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), lambda output: one_hot * output)
    return relevance


@pytest.mark.parametrize(
    ("network", "dtype"),
    [
        ("vgg11_bn", torch.float32),
        ("resnet18", torch.float32),
        ("resnet18", torch.float64),
        pytest.param("vgg11_bn", torch.float64, marks=pytest.mark.slow),  # 40 s of float64 convolutions
    ],
)
def test_lrp_matches_zennit_rules_and_composites(network, dtype):
    pytest.importorskip("zennit")
    torch.manual_seed(0)
    model = _random_batchnorm_statistics(getattr(torchvision.models, network)(num_classes=5)).eval().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    target = torch.tensor([1, 3])
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for rule in LRP_RULES + LRP_COMPOSITES:
        expected = _zennit_relevance(model, x, target, rule, resnet=network == "resnet18")
        for key, value in state.items():  # zennit's canonizers restore the model after each call
            model.state_dict()[key].copy_(value)
        ours = lrp(model, x, target, rule=rule, **({"low": -5.0, "high": 5.0} if "box" in rule else {}))
        scale = expected.abs().max()
        tolerance = 5e-4 if dtype == torch.float32 else 1e-10  # epsilon=1e-6 amplifies rounding
        assert (ours - expected).abs().max() <= tolerance * scale, (rule, float((ours - expected).abs().max() / scale))
    for key, value in model.state_dict().items():  # ours merged BatchNorm without touching a parameter or buffer
        assert torch.equal(value, state[key]), key


class BiasFreeResidualNet(nn.Module):
    """Convolutions without bias, a residual sum, max and average pooling; ``functional`` calls the same maps
    as functions (F.relu, F.max_pool2d, Tensor.mean, a + b) instead of modules."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.average = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = F.max_pool2d(F.relu(self.conv1(x)), 2)
            h = (h + self.conv2(h)).relu()
            return self.head(h.mean(dim=(2, 3)))
        h = self.pool(self.relu(self.conv1(x)))
        out = self.conv2(h)
        out += h
        return self.head(torch.flatten(self.average(self.relu(out)), 1))


@pytest.mark.parametrize("rule", LRP_RULES)
def test_lrp_conserves_the_explained_score_without_biases(rule):
    torch.manual_seed(2)
    net = BiasFreeResidualNet().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)  # positive pixels
    target = torch.tensor([0, 2, 3])
    relevance = lrp(net, x, target, rule=rule, epsilon=1e-12, stabilizer=1e-12)
    explained = net(x).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), explained.detach(), rtol=1e-8, atol=1e-10)


def test_lrp_sees_functional_activations_pooling_and_sums_as_their_modules():
    torch.manual_seed(4)
    modules, functional = BiasFreeResidualNet(), BiasFreeResidualNet(functional=True)
    functional.load_state_dict(modules.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for rule in ("epsilon", "zplus", "epsilon_plus_flat"):
        torch.testing.assert_close(lrp(functional, x, 1, rule=rule), lrp(modules, x, 1, rule=rule))


def test_lrp_epsilon_on_a_linear_layer_by_hand():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    z = layer(x)[:, 1].detach()
    expected = x * layer.weight[1].detach() * (z / (z + 0.5 * torch.where(z >= 0, 1.0, -1.0)))[:, None]
    torch.testing.assert_close(lrp(layer, x, 1, epsilon=0.5), expected)


def test_lrp_binary_model_explains_the_predicted_side():
    net = nn.Sequential(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 1, bias=False)).double()
    with torch.no_grad():
        net[2].weight.copy_(-net[2].weight.abs())  # every logit <= 0: the negative side is predicted
    x = torch.rand(4, 3, dtype=torch.float64)
    logit = net(x)[:, 0].detach()
    relevance = lrp(net, x, None, task="binary", epsilon=0.0)
    torch.testing.assert_close(relevance.sum(dim=1), -logit)  # evidence for the negative side, positive


def test_lrp_refuses_what_it_has_no_rule_for():
    with pytest.raises(ValueError, match=r"module '1' \(LayerNorm\) has parameters \(weight, bias\) and no rule"):
        lrp(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), torch.randn(2, 3))
    before_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    before_norm(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"'2' follows something else"):
        lrp(before_norm.eval(), torch.randn(2, 3, 6, 6))
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="rule must be one of"):
        lrp(net, torch.randn(2, 3), rule="z_beta")
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        lrp(net, torch.randn(2, 3), rule="alpha_beta", alpha=1.0, beta=1.0)
    assert F.relu(torch.tensor([-1.0, 1.0])).tolist() == [0.0, 1.0]  # no rule outlives a refusal


# ---------------------------------------------------------------- DeepLIFT


class SmallCNN(nn.Module):
    """A hand-built CNN with every layer Captum's DeepLift has a rule for, each module used once.

    Captum's rules agree with the Rescale rule only where a linear layer separates a max pool from an activation
    (with the two adjacent, its own summation-to-delta residual is about 1e-1 here); ``pool_after_activation``
    makes them adjacent, as in VGG.
    """

    def __init__(self, pool_after_activation: bool = False) -> None:
        super().__init__()
        self.pool_after_activation = pool_after_activation
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 6, 1)
        self.pool = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU(inplace=True)
        self.average = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(32, 10)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = self.pool(self.relu1(h)) if self.pool_after_activation else self.pool(self.mix(self.relu1(h)))
        h = self.average(self.relu2(self.norm(self.conv2(h))))
        return self.head(self.tanh(self.hidden(torch.flatten(h, 1))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "network",
    [
        "cnn",
        "mlp_sigmoid",
    ],
)
def test_deeplift_matches_captum(network, dtype):
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    if network == "cnn":
        model = _random_batchnorm_statistics(SmallCNN())
        shape = (3, 3, 16, 16)
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        shape = (3, 6)
    model = model.eval().to(dtype)
    x, baseline = torch.randn(shape, dtype=dtype), 0.1 * torch.randn(shape, dtype=dtype)
    target = torch.tensor([1, 0, 2])
    deterministic = torch.are_deterministic_algorithms_enabled()  # a Trainer(deterministic=True) may leave it on
    torch.use_deterministic_algorithms(False)  # Captum's max-pool rule calls max_unpool2d, which has no such mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = captum.DeepLift(model).attribute(x, baselines=baseline, target=target)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(deeplift(model, x, target, baseline=baseline), expected, **tolerance)


@pytest.mark.parametrize("network", ["vgg11", "resnet18", "pool_after_activation"])
def test_deeplift_sums_to_the_change_of_the_score(network):
    """Summation-to-delta, also where Captum cannot follow: resnet18 calls one ReLU module twice per block (Captum
    refuses it), and a max pool right after an activation (VGG) leaves Captum a residual."""
    torch.manual_seed(1)
    if network == "pool_after_activation":
        model = SmallCNN(pool_after_activation=True)
    else:
        model = getattr(torchvision.models, network)(num_classes=5)
    model = model.eval().double()
    x, baseline = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 3, 32, 32, dtype=torch.float64)
    attributions, delta = deeplift(model, x, 1, baseline=baseline, return_convergence_delta=True)
    with torch.no_grad():
        change = model(x)[:, 1] - model(baseline)[:, 1]
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), change, rtol=1e-9, atol=1e-10)
    assert delta.abs().max() < 1e-9
    assert not torch.allclose(attributions, attribute("input_x_gradient", model, x - baseline, 1))


def test_deeplift_max_pool_by_hand():
    """x = (3, 1), baseline (0, 2): the pool's output moves 2 -> 3; its maximum's share goes to x's maximum."""
    pool = nn.Sequential(nn.Unflatten(1, (1, 2)), nn.MaxPool1d(2), nn.Flatten())
    x, baseline = torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(deeplift(pool, x, 0, baseline=baseline), torch.tensor([[1.0, 0.0]]))


def test_deeplift_rescales_any_elementwise_activation_and_refuses_layer_norm_inside():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    _, delta = deeplift(net, x, 0, baseline=-0.5, return_convergence_delta=True)
    assert delta.abs().max() < 1e-10
    assert deeplift(net, x, 0, baseline=x).abs().max() == 0  # no change, nothing to attribute
    inside = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.LayerNorm(6)), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"calls layer normalisation in module '1.0'"):
        deeplift(inside, torch.randn(2, 4))
    assert torch.softmax(torch.zeros(2), 0).tolist() == [0.5, 0.5]  # no rule outlives a refusal
    batchwise = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=0), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"softmax over the batch dimension in module '1'"):
        deeplift(batchwise, torch.randn(2, 4))


# --------------------------------------------------------------------------- DeepLIFT through softmax


class SoftmaxHead(nn.Module):
    """Linear -> ReLU -> Linear -> nn.Softmax (Captum's rule reaches nn.Softmax modules only); ``centred`` makes the
    last layer's weights sum to zero over the classes, so the logits' sum never changes."""

    def __init__(self, centred: bool = False, log: bool = False) -> None:
        super().__init__()
        self.lin1, self.relu, self.lin2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)
        self.softmax = nn.LogSoftmax(dim=1) if log else nn.Softmax(dim=1)
        if centred:
            with torch.no_grad():
                self.lin2.weight -= self.lin2.weight.mean(dim=0, keepdim=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.logits(x))


def _captum_deeplift(model, x, baseline, target):
    captum = pytest.importorskip("captum.attr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captum.DeepLift(model).attribute(x, baselines=baseline, target=target, return_convergence_delta=True)


@pytest.mark.parametrize("target", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deeplift_through_a_final_softmax_is_captums_rule_rescaled_to_sum_to_the_change(seed, target):
    """Captum multiplies the logits' contributions, less their mean over the classes (the DeepLIFT paper's softmax
    adjustment), by ``ds_t / dz_t``; ours by ``ds_t / du_t`` with ``u = z - mean(z)``: the same map up to that factor,
    and equal where the logits' sum does not move. Captum normalises over the whole batch tensor, so one sample."""
    torch.manual_seed(seed)
    for centred in (True, False):
        model = SoftmaxHead(centred).double().eval()
        x, baseline = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
        ours, delta = deeplift(model, x, target, baseline=baseline, return_convergence_delta=True)
        theirs = _captum_deeplift(model, x, baseline, target)[0].detach()
        with torch.no_grad():
            z = model.logits(torch.cat([x, baseline]))
        u = z - z.mean(dim=1, keepdim=True)
        factor = (u[0, target] - u[1, target]) / (z[0, target] - z[1, target])
        torch.testing.assert_close(ours * factor, theirs, rtol=1e-9, atol=1e-12)
        if centred:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)  # weights centred in float32
        assert float(delta.abs().max()) < 1e-12  # summation-to-delta on the probability itself
        assert float(theirs.abs().max()) > 1e-3


def test_deeplift_softmax_and_log_softmax_anywhere_sum_to_the_change():
    """A softmax inside (a gate over features, as F.softmax and Tensor.softmax), log-softmax at the end: every
    sample's attributions sum to its change of the explained output; each sample alone as in the batch."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1, self.lin2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), SoftmaxHead(log=True)
            self.head.lin1 = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.lin1(x))
            gate = F.softmax(self.lin2(h), dim=-1) + h.softmax(1)
            return self.head(gate * 3.0)

    torch.manual_seed(3)
    model = Gated().double().eval()
    x, baseline = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    attributions, delta = deeplift(model, x, target, baseline=baseline, return_convergence_delta=True)
    with torch.no_grad():
        change = model(x).gather(1, target[:, None]) - model(baseline).gather(1, target[:, None])
    torch.testing.assert_close(attributions.sum(dim=1), change[:, 0], rtol=1e-9, atol=1e-12)
    assert float(delta.abs().max()) < 1e-12
    alone = deeplift(model, x[2:3], target[2:3], baseline=baseline[2:3])
    torch.testing.assert_close(alone, attributions[2:3], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(attributions, attribute("input_x_gradient", model, x - baseline, target))


@pytest.mark.parametrize(
    "case", ["softmax_zero_baseline", "softmax_batch_zero_baseline", "softmax_batch_arange_baseline", "convnet"]
)
def test_deeplift_passes_captums_softmax_classification_cases(case):
    """Captum's test_deeplift_classification.py softmax cases (their models, inputs, baselines, seed 1234 and targets
    2 and 1): summation-to-delta within their 0.003, and within their 0.05 of Captum's integrated gradients. The
    batch case with a zero baseline runs in float64: its all-ones layers put the float32 logits near 1.6e6, where they
    round by 0.125 and the probabilities' change is rounding (Captum's own residual passes 0.003 at other seeds)."""
    captum = pytest.importorskip("captum.attr")
    models = pytest.importorskip("captum.testing.helpers.classification_models")
    basic = pytest.importorskip("captum.testing.helpers.basic_models")
    torch.manual_seed(1234)
    if case == "softmax_zero_baseline":
        model, x, baseline = models.SoftmaxDeepLiftModel(20, 20, 10), torch.arange(20.0).unsqueeze(0), 0.0
    elif case == "softmax_batch_zero_baseline":
        model = models.SoftmaxDeepLiftModel(40, 20, 10).double()
        x, baseline = torch.arange(120.0).reshape(3, 40).double(), 0.0
    elif case == "softmax_batch_arange_baseline":
        model = models.SoftmaxDeepLiftModel(40, 20, 10).double()
        x, baseline = torch.arange(120.0).reshape(3, 40).double(), torch.arange(1.0, 41).reshape(1, 40).double()
    else:
        model, x, baseline = basic.BasicModel_ConvNet(), 100 * torch.randn(2, 1, 10, 10), 20 * torch.randn(2, 1, 10, 10)
    for target in (2, 1):
        attributions, delta = deeplift(model, x, target, baseline=baseline, return_convergence_delta=True)
        assert attributions.shape == x.shape
        assert float(delta.abs().max()) < (0.003 if x.dtype == torch.float32 else 1e-9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ig = captum.IntegratedGradients(model).attribute(x, baselines=baseline, target=target)
            theirs = captum.DeepLift(model).attribute(x, baselines=baseline, target=target)
        assert float((attributions - ig).abs().max()) < 0.05
        assert float((attributions - theirs).abs().max()) < 1e-3


def test_lrp_epsilon_is_the_epsilon_rule_only_as_in_zennit():
    """A large epsilon changes the epsilon rule, not z+ on the convolutions nor the pooling (their stabiliser)."""
    pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus

    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    one_hot = F.one_hot(torch.tensor([0, 2]), 3).double()
    with Gradient(model=net, composite=EpsilonPlus(epsilon=0.25)) as attributor:
        _, expected = attributor(x.clone().requires_grad_(True), lambda output: one_hot * output)
    torch.testing.assert_close(lrp(net, x, torch.tensor([0, 2]), rule="epsilon_plus", epsilon=0.25), expected)


class InPlaceStatements(nn.Module):
    """In-place calls whose results the model ignores: ``h.relu_()`` and ``h.add_(shortcut)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(3, 4, 1, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h.relu_()
        h.add_(self.skip(x))
        return self.head(h.mean(dim=(2, 3)))


def test_in_place_statements_keep_the_forward_pass():
    torch.manual_seed(7)
    net = InPlaceStatements().double()
    x, baseline = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    explained = net(x)[:, 1].detach()
    relevance = lrp(net, x, 1, epsilon=0.0, stabilizer=0.0)
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), explained)
    attributions = deeplift(net, x, 1, baseline=baseline)
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), explained - net(baseline)[:, 1].detach())


def test_deeplift_in_half_precision_and_with_clamp_as_relu():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.zero_()  # no pre-activation changes between input and baseline: 0 / 0 everywhere
    half = deeplift(net.half(), torch.randn(2, 3).half(), 0)
    assert half.isfinite().all()

    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).clamp(min=0))

    torch.manual_seed(8)
    _, delta = deeplift(Clamped().double(), torch.randn(4, 3, dtype=torch.float64), 1, return_convergence_delta=True)
    assert delta.abs().max() < 1e-12


def test_batchnorm_without_running_statistics_and_adaptive_max_pool_are_refused():
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    with pytest.raises(ValueError, match=r"'1' keeps none \(track_running_stats=False\)"):
        lrp(no_stats, torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="would mix them"):
        deeplift(no_stats, torch.randn(2, 3, 5, 5))
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"adaptive max pooling in module '1'"):
        deeplift(pooled, torch.randn(2, 3, 5, 5))
    root = nn.Sequential(nn.Linear(3, 2))
    root.register_parameter("offset", nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match=r"the model \(Sequential\) has parameters \(offset\)"):
        lrp(root, torch.randn(2, 3))


@pytest.mark.parametrize("method", ["deeplift", "integrated_gradients"])
def test_multiply_by_inputs_false_matches_captum(method):
    """Captum's multiply_by_inputs=False: the multipliers (DeepLIFT) or the path-averaged gradient (IG) alone; the
    convergence delta still belongs to the attributions (multiplied)."""
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, baseline = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    peer = captum.DeepLift if method == "deeplift" else captum.IntegratedGradients
    options = {} if method == "deeplift" else {"n_steps": 16}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peer(model, multiply_by_inputs=False).attribute(x, baselines=baseline, target=target, **options)
    ours, delta = attribute(method, model, x, target, baseline=baseline, multiply_by_inputs=False,
                            return_convergence_delta=True, **options)  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-10)
    multiplied, multiplied_delta = attribute(method, model, x, target, baseline=baseline,
                                             return_convergence_delta=True, **options)  # fmt: skip
    torch.testing.assert_close(multiplied, ours * (x - baseline), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(delta, multiplied_delta)
    if method == "deeplift":
        assert float(delta.abs().max()) < 1e-9
