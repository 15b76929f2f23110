"""MC dropout, entropies, calibration error, temperature scaling and Dirichlet uncertainty, against hand cases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_interp.methods.evaluation.uncertainty import (
    dirichlet_uncertainty,
    expected_calibration_error,
    expected_entropy,
    fit_temperature,
    mc_dropout_predictions,
    mutual_information,
    predictive_entropy,
    reliability_curve,
    temperature_steps,
)
from tests.conftest import BatchNormDropoutNet


def _mlp(p: float = 0.5, outputs: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, outputs))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_probs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.softmax(2 * torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=-1)


def _reference_entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


# --------------------------------------------------------------------------------------------------------------------
# MC dropout
# --------------------------------------------------------------------------------------------------------------------


def test_mutual_information_is_zero_without_randomness_and_positive_with_dropout():
    torch.manual_seed(0)
    inputs = torch.randn(20, 4)
    with pytest.warns(UserWarning, match="p=0"):
        still = mc_dropout_predictions(_mlp(p=0.0), inputs, 8, generator=_gen(1))
    assert torch.allclose(mutual_information(still), torch.zeros(20), atol=1e-6)
    noisy = mc_dropout_predictions(_mlp(p=0.5), inputs, 8, generator=_gen(1))
    assert noisy.shape == (8, 20, 3)
    assert torch.allclose(noisy.sum(-1), torch.ones(8, 20), atol=1e-6)
    assert (mutual_information(noisy) > 0).all()


def test_mc_dropout_leaves_the_global_rng_alone_and_is_seeded_by_its_generator():
    net, inputs = _mlp(), torch.randn(10, 4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = mc_dropout_predictions(net, inputs, 6, generator=_gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: the samples must not depend on it
    again = mc_dropout_predictions(net, inputs, 6, generator=_gen(7))
    other = mc_dropout_predictions(net, inputs, 6, generator=_gen(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(mc_dropout_predictions(net, inputs, 6), mc_dropout_predictions(net, inputs, 6))  # default seed


@pytest.mark.parametrize("train", [True, False])
def test_mc_dropout_restores_every_flag_and_leaves_batchnorm_statistics(train):
    torch.manual_seed(0)
    net = BatchNormDropoutNet().train(train)
    if train:
        net.features[4].eval()  # a frozen sub-module stays frozen
    flags = {name: m.training for name, m in net.named_modules()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    bn = net.features[1]
    seen: dict[str, set[bool]] = {"bn": set(), "dropout": set()}

    def record(key):
        def hook(module, _args, _output):
            seen[key].add(module.training)

        return hook

    bn.register_forward_hook(record("bn"))
    net.head[2].register_forward_hook(record("dropout"))
    probs = mc_dropout_predictions(net, torch.randn(6, 3, 8, 8), 4, generator=_gen(0), batch_size=4)
    assert probs.shape == (4, 6, 4)
    assert seen == {"bn": {False}, "dropout": {True}}  # only dropout in train mode during the passes
    assert {name: m.training for name, m in net.named_modules()} == flags
    for name, value in net.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_mc_dropout_restores_modes_and_rng_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net, inputs = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), Boom()).train(), torch.randn(3, 4)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        mc_dropout_predictions(net, inputs, 2)
    assert all(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), state)


def test_mc_dropout_without_dropout_raises():
    with pytest.raises(ValueError, match="MC dropout needs dropout layers"):
        mc_dropout_predictions(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))


def test_mc_dropout_binary_gives_both_sides_of_the_sigmoid():
    net, inputs = _mlp(p=0.0, outputs=1).eval(), torch.randn(5, 4)
    with pytest.warns(UserWarning, match="identical"):
        probs = mc_dropout_predictions(net, inputs, 3)
    positive = torch.sigmoid(net(inputs).detach()[:, 0])
    assert probs.shape == (3, 5, 2)
    assert torch.allclose(probs[..., 1], positive.expand(3, 5), atol=1e-6)
    assert torch.allclose(probs[..., 0], 1 - positive.expand(3, 5), atol=1e-6)


def test_mc_dropout_finds_spatial_and_alpha_dropout():
    for layer in (nn.Dropout2d(0.5), nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5)):
        net = nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.Flatten(), nn.LazyLinear(3))
        probs = mc_dropout_predictions(net, torch.randn(4, 1, 6, 6), 4, generator=_gen(0))
        assert (mutual_information(probs) > 0).all(), type(layer).__name__


# --------------------------------------------------------------------------------------------------------------------
# Entropies
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 5, 10])
def test_predictive_entropy_of_a_uniform_prediction_is_log_k(classes):
    uniform = torch.full((3, classes), 1.0 / classes)
    assert torch.allclose(predictive_entropy(uniform), torch.full((3,), math.log(classes)))
    assert torch.allclose(predictive_entropy(uniform.expand(4, 3, classes)), torch.full((3,), math.log(classes)))
    one_hot = torch.eye(classes)[:1]
    assert predictive_entropy(one_hot).item() == 0.0  # safe at p = 0


def test_entropies_decompose_and_match_a_reference_formula():
    probs = _random_probs((7, 30, 4))
    total, aleatoric, epistemic = predictive_entropy(probs), expected_entropy(probs), mutual_information(probs)
    assert torch.allclose(total, aleatoric + epistemic, atol=1e-12)
    assert (epistemic >= 0).all() and (epistemic > 0).all()
    for n in (0, 13, 29):
        mean = [sum(probs[s, n, k].item() for s in range(7)) / 7 for k in range(4)]
        assert total[n].item() == pytest.approx(_reference_entropy(mean), rel=1e-10)
        each = [_reference_entropy(probs[s, n].tolist()) for s in range(7)]
        assert aleatoric[n].item() == pytest.approx(sum(each) / 7, rel=1e-10)


def test_entropies_reject_logits_and_wrong_shapes():
    with pytest.raises(ValueError, match="softmax"):
        predictive_entropy(torch.randn(4, 3) * 5)
    with pytest.raises(ValueError, match=r"\(S, N, K\)"):
        mutual_information(torch.full((4, 3), 1 / 3))


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------

# Five bins [0, .2), [.2, .4), [.4, .6), [.6, .8), [.8, 1]; top-label confidence and correctness of each sample:
_PROBS = torch.tensor(
    [
        [0.35, 0.33, 0.32],  # conf .35, bin 1, correct
        [0.50, 0.30, 0.20],  # conf .50, bin 2, wrong
        [0.55, 0.25, 0.20],  # conf .55, bin 2, correct
        [0.70, 0.20, 0.10],  # conf .70, bin 3, correct
        [0.90, 0.05, 0.05],  # conf .90, bin 4, wrong
        [0.85, 0.10, 0.05],  # conf .85, bin 4, correct
    ]
)
_LABELS = torch.tensor([0, 1, 0, 0, 2, 0])
# bin 1: conf .35, acc 1, n 1 | bin 2: conf .525, acc .5, n 2 | bin 3: conf .7, acc 1, n 1 | bin 4: conf .875, acc .5,
# n 2: the gaps |acc - conf| and the counts
_GAPS, _COUNTS = [0.65, 0.025, 0.3, 0.375], [1, 2, 1, 2]


def test_ece_equals_a_hand_computation():
    l1 = sum(g * n for g, n in zip(_GAPS, _COUNTS, strict=True)) / 6  # 1.75 / 6
    l2 = math.sqrt(sum(g * g * n for g, n in zip(_GAPS, _COUNTS, strict=True)) / 6)
    assert expected_calibration_error(_PROBS, _LABELS, n_bins=5).item() == pytest.approx(l1, abs=1e-6)
    assert expected_calibration_error(_PROBS, _LABELS, n_bins=5, norm="l2").item() == pytest.approx(l2, abs=1e-6)
    assert expected_calibration_error(_PROBS, _LABELS, n_bins=5, norm="max").item() == pytest.approx(0.65, abs=1e-6)
    logits = _PROBS.log() + 3.0  # same softmax
    assert expected_calibration_error(logits, _LABELS, n_bins=5, from_logits=True).item() == pytest.approx(l1, abs=1e-6)


def test_reliability_curve_equals_a_hand_computation():
    conf, acc, counts = reliability_curve(_PROBS, _LABELS, n_bins=5)
    assert counts.tolist() == [0, 1, 2, 1, 2]
    assert torch.allclose(conf, torch.tensor([0.0, 0.35, 0.525, 0.7, 0.875]))
    assert torch.allclose(acc, torch.tensor([0.0, 1.0, 0.5, 1.0, 0.5]))


def test_binary_ece_equals_a_hand_computation():
    p, labels = torch.tensor([0.1, 0.3, 0.8, 0.9]), torch.tensor([0, 1, 1, 0])
    # bins [0, .5): mean p .2, positives .5 -> .3 | [.5, 1]: mean p .85, positives .5 -> .35; each half the samples
    for form in (p, p[:, None], torch.logit(p)):
        ece = expected_calibration_error(form, labels, n_bins=2, from_logits=form.min() < 0)
        assert ece.item() == pytest.approx(0.325, abs=1e-6)
    conf, acc, counts = reliability_curve(p, labels, n_bins=2)
    assert counts.tolist() == [2, 2] and torch.allclose(conf, torch.tensor([0.2, 0.85]))
    assert torch.allclose(acc, torch.tensor([0.5, 0.5]))


def _reference_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    conf, pred = probs.max(dim=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
        if inside.any():
            gap = (pred[inside] == labels[inside]).float().mean() - conf[inside].mean()
            total += abs(gap.item()) * inside.sum().item() / len(labels)
    return total


def test_ece_on_random_logits_equals_torchmetrics_and_a_reference_loop_and_the_curve():
    logits = 2 * torch.randn(500, 4, generator=_gen(3))
    labels = torch.randint(0, 4, (500,), generator=_gen(4))
    ece = expected_calibration_error(logits, labels, n_bins=10, from_logits=True)
    assert ece.dtype == torch.float32
    assert ece.item() == pytest.approx(multiclass_calibration_error(logits, labels, 4, n_bins=10).item(), abs=1e-6)
    probs = torch.softmax(logits, dim=1)
    assert ece.item() == pytest.approx(_reference_ece(probs, labels, 10), abs=1e-5)
    conf, acc, counts = reliability_curve(probs, labels, n_bins=10)
    assert counts.sum().item() == 500
    assert ece.item() == pytest.approx(((acc - conf).abs() * counts / 500).sum().item(), abs=1e-5)


def test_ece_rejects_logits_without_the_flag_and_mc_samples():
    with pytest.raises(ValueError, match="from_logits=True"):
        expected_calibration_error(torch.tensor([-1.0, 2.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(torch.randn(5, 3) * 4, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mean\(dim=0\)"):
        expected_calibration_error(torch.full((2, 5, 3), 1 / 3), torch.zeros(5, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------------
# Temperature scaling
# --------------------------------------------------------------------------------------------------------------------


def test_fit_temperature_recovers_a_known_temperature():
    gen = _gen(0)
    z = 2 * torch.randn(20000, 5, generator=gen)  # well-calibrated logits: the labels are drawn from softmax(z)
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=gen)[:, 0]
    state = torch.get_rng_state()
    for t0 in (0.5, 2.0, 3.0):
        assert fit_temperature(z * t0, labels) == pytest.approx(t0, rel=0.05)
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_temperature_binary_and_the_separable_warning():
    gen = _gen(1)
    z = 2 * torch.randn(20000, generator=gen)
    labels = torch.bernoulli(torch.sigmoid(z), generator=gen).long()
    assert fit_temperature(z * 2.0, labels) == pytest.approx(2.0, rel=0.05)
    with pytest.warns(UserWarning, match="no interior minimum"):
        fit_temperature(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]))


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """The float64 mean NLL of the tempered logits: the sigmoid likelihood for (N,) / (N, 1) logits."""
    z = logits.double() / temperature
    if z.ndim == 1 or z.shape[1] == 1:
        return float(F.binary_cross_entropy_with_logits(z.reshape(-1), labels.double()))
    return float(F.cross_entropy(z, labels))


def _exact_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """scipy's 1-D minimiser of the float64 NLL over log T: the reference fit_temperature is held to."""
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)), bracket=(-1.0, 1.0), method="brent", tol=1e-12
    )
    return math.exp(result.x)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", ["(N, K)", "(N,)", "(N, 1)"])
def test_fit_temperature_equals_an_exact_one_dimensional_minimiser(seed, shape):
    """Random logits of random scale and classes, labels drawn at another temperature (an interior minimum)."""
    gen = _gen(100 + seed)
    n = int(torch.randint(200, 3000, (1,), generator=gen))
    classes = int(torch.randint(2, 12, (1,), generator=gen)) if shape == "(N, K)" else 1
    scale = float(10 ** (torch.rand(1, generator=gen) * 2 - 1))  # logits of size 0.1 to 10
    truth = float(10 ** (torch.rand(1, generator=gen) - 0.5))  # the labels' temperature, 0.3 to 3
    z = torch.randn(n, classes, generator=gen) * scale
    if classes == 1:
        labels = torch.bernoulli(torch.sigmoid(z[:, 0] / truth), generator=gen).long()
        z = z[:, 0] if shape == "(N,)" else z
    else:
        labels = torch.multinomial(torch.softmax(z / truth, dim=1), 1, generator=gen)[:, 0]
    expected = _exact_temperature(z, labels)
    fitted = fit_temperature(z, labels)
    assert fitted == pytest.approx(expected, rel=1e-6)
    assert _nll(z, labels, fitted) <= _nll(z, labels, expected) + 1e-12
    assert fit_temperature(z, labels, max_iter=20) == pytest.approx(fitted, rel=1e-9)  # converged long before 100


def test_fit_temperature_finds_far_minima_and_warns_without_an_interior_one():
    gen = _gen(7)
    z = torch.randn(4000, 4, generator=gen)
    labels = torch.multinomial(torch.softmax(z / 200, dim=1), 1, generator=gen)[:, 0]  # nearly uninformative
    for factor in (1e-3, 1.0, 1e3):  # the same problem at three logit scales: T scales with the logits
        with warnings.catch_warnings():
            warnings.simplefilter("error" if factor == 1.0 else "ignore")
            fitted = fit_temperature(z * factor, labels)
        assert fitted == pytest.approx(_exact_temperature(z, labels) * factor, rel=1e-6)
    with pytest.warns(UserWarning, match="no interior minimum .the logits carry"):
        assert fit_temperature(z, torch.randint(0, 4, (4000,), generator=gen).flip(0)) > 1e3
    with pytest.warns(UserWarning, match="every sample is classified correctly"):
        assert fit_temperature(z, z.argmax(dim=1)) < 1e-3
    with pytest.warns(UserWarning, match="every sample is classified correctly"):
        assert fit_temperature(z[:, 0], (z[:, 0] > 0).long()) < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_temperature(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0  # flat NLL: T stays at 1


def test_fit_temperature_checks_its_inputs():
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        fit_temperature(torch.zeros(2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="2 entries"):
        fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels"):
        fit_temperature(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="max_iter"):
        fit_temperature(torch.zeros(2, 2), torch.tensor([0, 1]), max_iter=0)


class _HostReads(TorchFunctionMode):
    """Counts Python's reads of tensor values (each a device-to-host wait on a GPU) and the aten ops that sync."""

    READS = frozenset(
        {
            torch.Tensor.tolist,
            torch.Tensor.item,
            torch.Tensor.cpu,
            torch.Tensor.numpy,
            torch.Tensor.__bool__,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
            torch.Tensor.__index__,
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


class _SyncingOps(TorchDispatchMode):
    """Counts the aten ops whose result the host waits for (``_local_scalar_dense`` is ``item()`` at dispatch)."""

    SYNCING = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"})

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func.overloadpacket.__name__ in self.SYNCING
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(500, 7), (500,)])
def test_the_temperature_fit_reads_the_device_a_fixed_number_of_times(shape):
    """The core reads nothing; fit_temperature reads twice (its checks, its result), whatever max_iter is."""
    gen = _gen(3)
    z = torch.randn(*shape, generator=gen)
    labels = torch.randint(0, 7 if len(shape) == 2 else 2, (500,), generator=gen)
    for iterations in (4, 40):
        with _HostReads() as reads, _SyncingOps() as ops:
            temperature, separable = temperature_steps(z, labels, iterations)
        assert (reads.reads, ops.syncs) == (0, 0)
        assert temperature.shape == separable.shape == () and separable.dtype == torch.bool
    counts = []
    for max_iter in (5, 100):
        with warnings.catch_warnings(), _HostReads() as reads, _SyncingOps() as ops:
            warnings.simplefilter("ignore")
            fit_temperature(z, labels, max_iter=max_iter)
        counts.append((reads.reads, ops.syncs))
    assert counts == [(2, 0), (2, 0)]  # two tolist() calls (L-BFGS made an item() call per function evaluation)


# --------------------------------------------------------------------------------------------------------------------
# Dirichlet
# --------------------------------------------------------------------------------------------------------------------


def test_dirichlet_uncertainty_limits_and_a_hand_case():
    p, u = dirichlet_uncertainty(torch.zeros(3, 4))
    assert torch.allclose(u, torch.ones(3)) and torch.allclose(p, torch.full((3, 4), 0.25))
    p, u = dirichlet_uncertainty(torch.tensor([[1e6, 0.0, 0.0]]))
    assert u.item() < 1e-5 and p[0, 0].item() > 1 - 1e-5
    p, u = dirichlet_uncertainty(torch.tensor([[2.0, 1.0, 0.0]]))  # alpha (3, 2, 1), strength 6
    assert torch.allclose(p, torch.tensor([[0.5, 1 / 3, 1 / 6]])) and u.item() == pytest.approx(0.5)


def test_dirichlet_uncertainty_rejects_negative_evidence():
    with pytest.raises(ValueError, match=">= 0"):
        dirichlet_uncertainty(torch.tensor([[1.0, -0.5]]))


# ---------------------------------------------------------------------------------- explanations under MC dropout
def test_mc_dropout_gradient_maps_are_the_masked_weights_of_a_linear_model():
    """y = W dropout(x): the input gradient of class k is mask * W_k / (1 - p), so each map is 2 |W_k| where the
    mask kept the pixel and 0 where it dropped it; the passes draw different masks; the global RNG is untouched."""
    from lightning_interp.methods.evaluation.uncertainty import map_agreement, mc_dropout_maps

    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.Flatten(), nn.Linear(16, 2)).train()
    inputs = torch.rand(3, 1, 4, 4)
    weights = net[2].weight.detach().abs().reshape(2, 4, 4)
    before = torch.get_rng_state()
    maps = mc_dropout_maps(net, inputs, "gradient", 6, target=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(module.training for module in net.modules()), "modes restored"
    assert maps.shape == (6, 3, 4, 4)
    ratio = maps / (2 * weights[1])
    kept = ratio > 0.5
    assert torch.allclose(ratio, kept.float(), atol=1e-5), "each pixel: kept (2|W|) or dropped (0)"
    assert 0.2 < kept.float().mean() < 0.8
    assert not torch.equal(kept[0], kept[1]), "new masks in every pass"
    again = mc_dropout_maps(net, inputs, "gradient", 6, target=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(maps, again)
    assert bool((map_agreement(maps) < 0.99).all())


def test_map_agreement_is_one_without_dropout_randomness_and_the_mean_of_pairwise_correlations():
    from lightning_interp.methods.evaluation.map_metrics import rank_correlation
    from lightning_interp.methods.evaluation.uncertainty import map_agreement, mc_dropout_maps

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.0), nn.Flatten(), nn.Linear(64, 3))
    maps = mc_dropout_maps(net, torch.rand(2, 3, 4, 4), "input_x_gradient", 3)
    assert torch.allclose(map_agreement(maps), torch.ones(2, dtype=torch.float64))
    random_maps = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    pairs = [rank_correlation(random_maps[i], random_maps[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert torch.allclose(map_agreement(random_maps), torch.stack(pairs).mean(dim=0))
    with pytest.raises(ValueError, match="S >= 2"):
        map_agreement(random_maps[:1])
