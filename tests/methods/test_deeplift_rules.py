"""DeepLIFT's rules (Shrikumar et al. 2017, sections 3.5.1-3.5.3): Linear, Rescale and RevealCancel.

Checked against the paper's definition: its Figure 3 network by hand, summation-to-delta for every rule on random
MLPs and CNNs, RevealCancel = Rescale where a layer's incoming contributions all have one sign, and a line-by-line
NumPy transcription of the ``deeplift`` package's Dense (Linear rule) and RevealCancel layers (the package itself needs
TensorFlow, which is not installed here). GradientSHAP's convergence delta against Captum's on the same draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods import Explainer, attribute, deeplift, deeplift_shap, gradient_shap
from lightning_interp.methods.attribution.gradient import _gradient_shap_draws
from lightning_interp.methods.model.batching import sample_noise
from lightning_interp.methods.registry import check_method_options

RULES = ("rescale", "reveal_cancel")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MinNet(nn.Module):
    """The paper's Figure 3: ``o = i1 - ReLU(i1 - i2) = min(i1, i2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.difference = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.difference.weight.copy_(torch.tensor([[1.0, -1.0]]))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - self.relu(self.difference(x))


@pytest.mark.parametrize(("i1", "i2"), [(3.0, 1.0), (1.0, 3.0), (2.0, 5.0), (4.0, 4.0)])
def test_figure_3_min_network_by_hand(i1, i2):
    """Reference (0, 0). By hand: the ReLU's input h = i1 - i2 has dh+ = i1, dh- = -i2 (reference 0), so

    RevealCancel: dy+ = (ReLU(i1) - 0) / 2 + (ReLU(i1 - i2) - ReLU(-i2)) / 2 and dy- = (ReLU(-i2) - 0) / 2 +
    (ReLU(i1 - i2) - ReLU(i1)) / 2; i1's share of ReLU's change is dy+ and i2's is dy-, and o = i1 - ReLU(.) gives
    i1 the score i1 - dy+ and i2 the score -dy-: min(i1, i2) / 2 each, for any positive i1, i2.
    Rescale (and gradient x input) give all of min(i1, i2) to the smaller input (and zero to the other).
    """
    x = torch.tensor([[i1, i2]], dtype=torch.float64)
    net = MinNet().double()
    relu = max
    dy_plus = (relu(i1, 0) - 0) / 2 + (relu(i1 - i2, 0) - relu(-i2, 0)) / 2
    dy_minus = (relu(-i2, 0) - 0) / 2 + (relu(i1 - i2, 0) - relu(i1, 0)) / 2
    expected = torch.tensor([[i1 - dy_plus, -dy_minus]], dtype=torch.float64)
    torch.testing.assert_close(expected, torch.full((1, 2), min(i1, i2) / 2, dtype=torch.float64))  # the hand sum
    torch.testing.assert_close(deeplift(net, x, 0, rule="reveal_cancel"), expected, rtol=1e-12, atol=1e-12)
    if i1 != i2:
        smaller = torch.tensor([[min(i1, i2) if i1 < i2 else 0.0, min(i1, i2) if i2 < i1 else 0.0]])
        torch.testing.assert_close(deeplift(net, x, 0, rule="rescale"), smaller.double())
        torch.testing.assert_close(attribute("input_x_gradient", net, x, 0), smaller.double())


def _mlp(activation: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 6), act(), nn.Linear(6, 3))


class _Residual(nn.Module):
    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), None
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        out += x  # in place, as torchvision's blocks
        return self.act(out)


def _cnn(activation: str, seed: int) -> nn.Module:
    """Conv -> BatchNorm -> act -> max pool -> (residual block) -> conv -> act -> linear -> act -> linear."""
    torch.manual_seed(seed)
    act = ACTIVATIONS[activation]
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), act(), nn.MaxPool2d(2), _Residual(4, activation),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), act(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), act(), nn.Linear(5, 3),
    )  # fmt: skip
    for module in model.modules():  # statistics and a negative scale, so the BatchNorm's sign flip is exercised
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    for (
        module
    ) in model.modules():  # sigmoid (slope <= 1/4): mean weight 2 / sqrt(fan-in), ~4x default, or nothing moves
        if isinstance(module, (nn.Conv2d, nn.Linear)) and activation == "sigmoid":
            module.weight.data.mul_(2 / module.weight[0].numel() ** 0.5 / module.weight.abs().mean())
    return model.eval()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("network", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rule_sums_to_the_change_of_the_score(rule, activation, network, dtype):
    model = (_mlp(activation, 3) if network == "mlp" else _cnn(activation, 3)).to(dtype)
    shape = (4, 5) if network == "mlp" else (4, 2, 8, 8)
    generator = torch.Generator().manual_seed(11)
    x = 2 * torch.randn(shape, generator=generator).to(dtype)
    baseline = torch.randn(shape, generator=generator).to(dtype)
    attributions, delta = deeplift(model, x, 1, baseline=baseline, rule=rule, return_convergence_delta=True)
    with torch.no_grad():
        change = (model(x)[:, 1] - model(baseline)[:, 1]).double()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-10
    assert (attributions.reshape(4, -1).double().sum(dim=1) - change).abs().max() < tolerance
    assert delta.abs().max() < tolerance
    assert change.abs().max() > 1e-2  # something to attribute


def test_reveal_cancel_differs_from_rescale_where_contributions_cancel():
    model = _cnn("relu", 3).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    rescale, reveal = (deeplift(model, x, 0, baseline=-x, rule=rule) for rule in RULES)
    assert (rescale - reveal).abs().max() > 1e-3


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_reveal_cancel_equals_rescale_where_every_contribution_has_one_sign(sign, activation):
    """Non-negative weights into each nonlinearity and an input moving one way: every term w_i dx_i into a
    nonlinearity has that sign (strictly monotone activations keep it), so dx- = 0 (or dx+ = 0) and RevealCancel's
    multiplier is Rescale's."""
    model = _mlp(activation, 5).double()
    with torch.no_grad():
        model[0].weight.abs_()
        model[2].weight.abs_()
    baseline = torch.randn(3, 5, dtype=torch.float64)
    x = baseline + sign * torch.rand(3, 5, dtype=torch.float64)
    rescale, reveal = (deeplift(model, x, 2, baseline=baseline, rule=rule) for rule in RULES)
    torch.testing.assert_close(reveal, rescale, rtol=1e-12, atol=1e-14)
    mixed = x.clone()
    mixed[:, 0] = baseline[:, 0] - sign * 2.0  # one input the other way: the terms now cancel in part
    rescale, reveal = (deeplift(model, mixed, 2, baseline=baseline, rule=rule) for rule in RULES)
    assert (rescale - reveal).abs().max() > 1e-6


# ------------------------------------------------------------------ the deeplift package's rules, in NumPy


def _package_reveal_cancel(layers: list, activation, x: np.ndarray, reference: np.ndarray, target: int) -> np.ndarray:
    """kundajelab/deeplift 0.6.13 on a Dense -> Activation -> ... -> Dense model, one sample: ``Dense`` with
    ``DenseMxtsMode.Linear`` (``_build_pos_and_neg_contribs``, ``_get_mxts_increments_for_inputs`` in layers/core.py)
    and the activations with ``NonlinearMxtsMode.RevealCancel`` (layers/activations.py), transcribed in float64.
    ``layers``: [(kernel (in, out), bias), ...]; an activation after each but the last."""
    acts, refs, contribs = [x], [reference], []
    for depth, (kernel, bias) in enumerate(layers):
        diff = acts[-1] - refs[-1]
        pos = (diff * (diff > 0)) @ (kernel * (kernel > 0)) + (diff * (diff < 0)) @ (kernel * (kernel < 0))
        neg = (diff * (diff > 0)) @ (kernel * (kernel < 0)) + (diff * (diff < 0)) @ (kernel * (kernel > 0))
        z, z0 = acts[-1] @ kernel + bias, refs[-1] @ kernel + bias
        if depth == len(layers) - 1:
            break
        contribs.append((pos, neg, z0))
        acts.append(activation(z))
        refs.append(activation(z0))
    pos_mxts = neg_mxts = np.eye(layers[-1][0].shape[1])[target]
    for depth in range(len(layers) - 1, -1, -1):
        kernel = layers[depth][0]
        diff = acts[depth] - refs[depth]
        up, down = kernel.T * (kernel.T > 0), kernel.T * (kernel.T < 0)
        increments = (diff > 0) * (pos_mxts @ up + neg_mxts @ down)
        increments = increments + (diff < 0) * (pos_mxts @ down + neg_mxts @ up)
        increments = increments + (diff == 0) * (0.5 * (pos_mxts + neg_mxts) @ kernel.T)
        if depth == 0:
            return increments * (x - reference)
        pos, neg, z0 = contribs[depth - 1]  # the activation before this Dense layer
        f = activation
        pos_contribs = 0.5 * ((f(z0 + pos) - f(z0)) + (f(z0 + neg + pos) - f(z0 + neg)))
        neg_contribs = 0.5 * ((f(z0 + neg) - f(z0)) + (f(z0 + pos + neg) - f(z0 + pos)))
        assert (pos != 0).all() and (neg != 0).all()  # where one is 0 the package's pseudocount gives m = 0, ours
        # the limit of m as it goes to 0 (they differ only in what an unchanged unit passes back): not compared here
        pos_mxts, neg_mxts = increments * pos_contribs / pos, increments * neg_contribs / neg
    raise AssertionError("unreachable")


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_reveal_cancel_matches_the_deeplift_packages_rules(activation):
    functions = {"relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "tanh": np.tanh}
    torch.manual_seed(7)
    act = ACTIVATIONS[activation]
    model = nn.Sequential(nn.Linear(12, 16), act(), nn.Linear(16, 10), act(), nn.Linear(10, 3)).double()
    generator = torch.Generator().manual_seed(2)
    x, baseline = torch.randn(4, 12, generator=generator).double(), torch.randn(4, 12, generator=generator).double()
    ours = deeplift(model, x, 1, baseline=baseline, rule="reveal_cancel")
    layers = [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in model if isinstance(m, nn.Linear)]
    for row in range(4):
        expected = _package_reveal_cancel(layers, functions[activation], x[row].numpy(), baseline[row].numpy(), 1)
        np.testing.assert_allclose(ours[row].numpy(), expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ refusals, options, the explain seam


def test_reveal_cancel_refuses_a_nonlinearity_without_a_linear_layer_before_it():
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Sigmoid(), nn.Tanh()), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"RevealCancel .* tanh .* in module '1.1'\. Use rule='rescale'"):
        deeplift(model, torch.randn(2, 4), 0, rule="reveal_cancel")
    deeplift(model, torch.randn(2, 4), 0, rule="rescale")  # Rescale takes it
    with pytest.raises(ValueError, match=r"rule must be one of 'rescale', 'reveal_cancel', got 'revealcancel'"):
        deeplift(model, torch.randn(2, 4), 0, rule="revealcancel")
    with pytest.raises(ValueError, match=r"rule must be one of"):
        deeplift_shap(model, torch.randn(2, 4), 0, rule="linear")


def test_deeplift_shap_takes_the_rule():
    model = _mlp("relu", 4).double()
    x, references = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    shap, delta = deeplift_shap(model, x, 0, baselines=references, rule="reveal_cancel", return_convergence_delta=True)
    each = torch.stack([deeplift(model, x, 0, baseline=r.expand(3, 5), rule="reveal_cancel") for r in references])
    torch.testing.assert_close(shap, each.mean(dim=0))
    assert delta.abs().max() < 1e-10


def test_the_explainer_passes_the_rule_and_reports_its_completeness_error():
    model = _mlp("tanh", 6).double()
    x = torch.randn(5, 5, dtype=torch.float64)
    assert check_method_options("deeplift", {"rule": "reveal_cancel"}).name == "deeplift"
    result = Explainer({"deeplift": {"rule": "reveal_cancel"}})(model, x)
    torch.testing.assert_close(result.attributions["deeplift"], deeplift(model, x, result.target, rule="reveal_cancel"))
    assert float(result.scalars["deeplift/completeness_error"]) < 1e-10


# ------------------------------------------------------------------ GradientSHAP's convergence delta


@pytest.mark.parametrize("stdevs", [0.3, 0.0])
def test_gradient_shap_convergence_delta_is_captums_averaged_over_the_draws(monkeypatch, stdevs):
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, references = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    target, n, seed = torch.tensor([0, 2, 1]), 6, 7
    options = {"n_samples": n, "stdevs": stdevs, "baselines": references, "return_convergence_delta": True}
    ours, delta = gradient_shap(model, x, target, generator=torch.Generator().manual_seed(seed), **options)
    generator = torch.Generator().manual_seed(seed)  # replay our draws into Captum (sample-major rows)
    choice, alphas = _gradient_shap_draws(n, 3, 4, generator, x)
    noise = torch.stack([sample_noise(x.shape, torch.tensor(stdevs), generator, x) for _ in range(n)])
    with monkeypatch.context() as patch:
        patch.setattr(np.random, "choice", lambda count, size: choice.T.reshape(-1).numpy())
        patch.setattr(np.random, "uniform", lambda low, high, size: alphas.T.reshape(-1).numpy())
        patch.setattr(torch, "normal", lambda mean, std: noise.transpose(0, 1).reshape(3 * n, 5))
        theirs, their_delta = captum.GradientShap(model).attribute(
            x, references, n_samples=n, stdevs=stdevs, target=target, return_convergence_delta=True
        )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert their_delta.shape == (3 * n,)
    torch.testing.assert_close(delta, their_delta.reshape(3, n).mean(dim=1), rtol=1e-10, atol=1e-14)
    assert delta.abs().min() > 1e-6  # one random point per draw: completeness only in expectation
    generator = torch.Generator().manual_seed(seed)
    _, again = gradient_shap(model, x, target, generator=generator, internal_batch_size=4, **options)
    torch.testing.assert_close(again, delta, rtol=1e-10, atol=1e-14)


def test_gradient_shap_delta_shrinks_with_the_draws_and_the_explainer_logs_it():
    """The residual is the Monte-Carlo error of the draws: its mean size falls like 1 / sqrt(n_samples)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, references = torch.randn(8, 5, dtype=torch.float64) * 2, torch.randn(6, 5, dtype=torch.float64)
    errors = {}
    for n in (4, 400):
        _, delta = gradient_shap(model, x, 0, n_samples=n, baselines=references,
                                 generator=torch.Generator().manual_seed(0), return_convergence_delta=True)  # fmt: skip
        errors[n] = float(delta.abs().mean())
    assert errors[400] < errors[4] / 4  # 1 / sqrt(100) = 1/10 expected; a margin for chance
    result = Explainer({"gradient_shap": {"n_samples": 4}})(model, x)
    generator = torch.Generator().manual_seed(0)  # the explainer's default seed
    attributions, delta = gradient_shap(model, x, result.target, n_samples=4, generator=generator,
                                        return_convergence_delta=True)  # fmt: skip
    torch.testing.assert_close(result.attributions["gradient_shap"], attributions)
    sampled_change = attributions.sum(dim=1) - delta
    expected = delta.abs().mean() / sampled_change.abs().mean()
    torch.testing.assert_close(result.scalars["gradient_shap/completeness_error"].double(), expected)
    multipliers = Explainer({"gradient_shap": {"n_samples": 2, "multiply_by_inputs": False}})(model, x)
    assert "gradient_shap/completeness_error" not in multipliers.scalars


def test_an_unknown_rule_is_refused_when_the_callback_is_made():
    from lightning_interp import SaliencyCallback

    with pytest.raises(ValueError, match=r"deeplift's rule must be one of 'rescale', 'reveal_cancel', got 'reveal'"):
        SaliencyCallback(methods={"deeplift": {"rule": "reveal"}})


def test_saliency_callback_logs_reveal_cancel_and_gradient_shap_completeness(tmp_path):
    import lightning.pytorch as pl

    from lightning_interp import Display, SaliencyCallback
    from lightning_interp.demo import ImageClassifier
    from lightning_interp.synthetic import SyntheticShapesDataModule
    from tests.conftest import BatchNormDropoutNet, quiet_trainer

    pl.seed_everything(0, verbose=False)
    methods = {"deeplift": {"rule": "reveal_cancel"}, "gradient_shap": {"n_samples": 2}}
    callback = SaliencyCallback(methods=methods, num_samples=4, display=Display(background_drawing=False))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)  # conv -> BatchNorm -> in-place ReLU, conv -> ReLU
    trainer.fit(model, datamodule=SyntheticShapesDataModule(train_size=32, val_size=16, batch_size=8, image_size=16))
    metrics = trainer.callback_metrics
    assert float(metrics["interp_saliency/deeplift/completeness_error"]) < 1e-5  # exact up to float32 rounding
    shap = float(metrics["interp_saliency/gradient_shap/completeness_error"])  # 2 random points: far from exact
    assert 0 < shap < float("inf")
    reveal = Explainer({"deeplift": {"rule": "reveal_cancel"}})(model, callback.probe.inputs)
    rescale = Explainer({"deeplift": {}})(model, callback.probe.inputs)
    torch.testing.assert_close(callback.last_maps["deeplift"], reveal.maps()["deeplift"])
    assert not torch.allclose(reveal.maps()["deeplift"], rescale.maps()["deeplift"])


def test_gradient_shap_delta_scores_each_draw_with_its_own_samples_other_inputs():
    """``f(x, s) = s * (w . x)`` is linear in ``x``: each draw is exact if ``f(r)`` takes its own row's ``s``."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * scale

    model = Scaled().double()
    x, scale = torch.randn(3, 4, dtype=torch.float64), torch.tensor([[1.0], [5.0], [-2.0]], dtype=torch.float64)
    references = torch.randn(4, 4, dtype=torch.float64)
    for size in (None, 2):
        _, delta = attribute(
            "gradient_shap", model, x, 1, additional_forward_args=(scale,), baselines=references, n_samples=5,
            generator=torch.Generator().manual_seed(0), internal_batch_size=size, return_convergence_delta=True,
        )  # fmt: skip
        assert delta.abs().max() < 1e-12
