"""The non-interference contract, checked for every method with one parametrised suite.

Every method must leave no hook behind (also after an exception in forward), restore every module's
``training`` flag, never touch ``param.grad``, BatchNorm statistics or the global RNG, and work under
``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_globals

from lightning_interp.methods import ATTRIBUTION_METHODS, attribute, available_methods, grad_cam
from lightning_interp.methods import METHODS as METHOD_SPECS


class ContractNet(nn.Module):
    """Conv net with BatchNorm, Dropout and an in-place ReLU; ``explode`` makes forward raise mid-way."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, classes))
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if self.explode:
            raise RuntimeError("boom inside forward")
        return self.head(features)


Method = Callable[[nn.Module, torch.Tensor, object], torch.Tensor]

LAYER = "features.4"  # the last conv: what every CAM method explains here (CAM: the head pools it, then one Linear)
FAST_OPTIONS: dict[str, dict[str, object]] = {  # the registry's methods at options that keep the suite quick
    "smoothgrad": {"n_samples": 3},
    "noise_tunnel": {"n_samples": 3},
    "smoothgrad_sq": {"n_samples": 3},
    "vargrad": {"n_samples": 3},
    "integrated_gradients": {"n_steps": 4, "internal_batch_size": 6},
    "score_cam": {"internal_batch_size": 3},
    "gradient_shap": {"n_samples": 3},
    "occlusion": {"window": (4, 4), "stride": (4, 4), "internal_batch_size": 8},
    "lime": {"n_samples": 6},
    "kernel_shap": {"n_samples": 6},
    "ablation_cam": {"internal_batch_size": 3},
    "smooth_grad_cam_plus_plus": {"n_samples": 3},
    "layer_integrated_gradients": {"n_steps": 4, "internal_batch_size": 6},
    "layer_conductance": {"n_steps": 4, "internal_batch_size": 6},
    "shapley_value_sampling": {"n_samples": 2},
}


def _registered(name: str) -> Method:
    spec = METHOD_SPECS[name]

    def run(model: nn.Module, x: torch.Tensor, target: object) -> torch.Tensor:
        options = dict(FAST_OPTIONS.get(name, {}))
        if spec.stochastic:
            options["generator"] = torch.Generator(device=x.device).manual_seed(0)
        return attribute(name, model, x, target, layer=LAYER if spec.needs_layer else None, **options)

    return run


METHODS: dict[str, Method] = {name: _registered(name) for name in available_methods()}
METHODS["grad_cam_module"] = lambda model, x, target: grad_cam(model, x, target, model.features[5])
METHODS["grad_cam_auto_layer"] = lambda model, x, target: grad_cam(model, x, target, None)
METHODS["lrp_epsilon_gamma_box"] = lambda model, x, target: (
    attribute(  # a box holding the randn inputs, bias-free rules
        "lrp", model, x, target, rule="epsilon_gamma_box", low=-8.0, high=8.0, bias=False
    )
)
LAYER_METHODS = {name for name, spec in METHOD_SPECS.items() if spec.family == "layer"}  # shaped like LAYER's output
MAP_METHODS = {name for name, spec in METHOD_SPECS.items() if spec.needs_layer} - LAYER_METHODS | {
    "grad_cam_module",
    "grad_cam_auto_layer",
}
# SmoothGrad's, the noise tunnels', Smooth Grad-CAM++'s and GradientSHAP's draws depend on the batch they see; LIME's
# and KernelSHAP's coalitions (and Shapley sampling's orderings) are shared by the whole batch, so a sample gets the
# same explanation alone or in a batch; feature permutation takes each feature's values from the other samples
DETERMINISTIC = sorted(
    set(METHODS)
    - {
        "smoothgrad",
        "noise_tunnel",
        "smoothgrad_sq",
        "vargrad",
        "gradient_shap",
        "smooth_grad_cam_plus_plus",
        "feature_permutation",
    }
)

all_methods = pytest.mark.parametrize("name", sorted(METHODS))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _model(seed: int = 0) -> ContractNet:
    torch.manual_seed(seed)
    model = ContractNet()
    # give BatchNorm non-trivial running statistics so eval vs train mode gives different outputs
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


def _mixed_modes(model: ContractNet) -> dict[str, bool]:
    """A mode pattern that model.train()/model.eval() cannot restore: frozen features with a BatchNorm in train."""
    model.train()
    model.features.eval()
    model.features[1].train()
    model.head[1].eval()
    return {name: module.training for name, module in model.named_modules()}


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, kind), f"{kind} left on {name!r}"
    assert not module_globals._global_forward_hooks
    assert not module_globals._global_forward_pre_hooks
    assert not module_globals._global_backward_hooks


def _inputs(batch: int = 3, seed: int = 1, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, **kwargs)


def _expected_shape(name: str, x: torch.Tensor) -> tuple[int, ...]:
    if name in LAYER_METHODS:  # LAYER's output: 8 channels after one 2x2 max-pool
        return (x.shape[0], 8, x.shape[-2] // 2, x.shape[-1] // 2)
    return (x.shape[0], *x.shape[-2:]) if name in MAP_METHODS else tuple(x.shape)


def test_every_registered_method_is_covered_and_the_lists_agree():
    assert set(METHOD_SPECS) <= set(METHODS)  # the suite is generated from the registry
    assert set(ATTRIBUTION_METHODS) == {name for name, spec in METHOD_SPECS.items() if not spec.needs_layer}
    for name, spec in METHOD_SPECS.items():
        assert spec.name == name == spec.function.__name__  # canonical names equal the function names


@all_methods
@pytest.mark.parametrize("target", [None, 2, "per-sample"])
def test_no_hooks_left_and_modes_restored(name, target):
    model = _model()
    modes = _mixed_modes(model)
    x = _inputs()
    if target == "per-sample":
        target = torch.tensor([0, 3, 1])
    METHODS[name](model, x, target)
    _assert_no_hooks(model)
    assert _modes(model) == modes


@all_methods
@pytest.mark.parametrize("target", [None, 1])
def test_exception_in_forward_leaves_no_hooks_and_restores_modes(name, target):
    model = _model()
    modes = _mixed_modes(model)
    model.explode = True
    with pytest.raises(RuntimeError, match="boom inside forward"):
        METHODS[name](model, _inputs(), target)
    _assert_no_hooks(model)
    assert _modes(model) == modes
    # and the model is fully usable afterwards
    model.explode = False
    assert METHODS[name](model, _inputs(), target).isfinite().all()


@all_methods
def test_param_grad_is_never_touched(name):
    model = _model()
    _mixed_modes(model)
    existing = {
        "features.0.weight": torch.randn_like(model.features[0].weight),
        "head.3.bias": torch.randn_like(model.head[3].bias),
    }
    parameters = dict(model.named_parameters())
    for key, value in existing.items():
        parameters[key].grad = value.clone()
    requires_grad = {key: p.requires_grad for key, p in parameters.items()}

    METHODS[name](model, _inputs(), None)

    for key, parameter in model.named_parameters():
        if key in existing:
            assert torch.equal(parameter.grad, existing[key]), key
        else:
            assert parameter.grad is None, key
        assert parameter.requires_grad == requires_grad[key]


@all_methods
def test_batchnorm_stats_parameters_and_inputs_unchanged_in_train_mode(name):
    model = _model()
    model.train()
    buffers = {key: b.clone() for key, b in model.named_buffers()}
    parameters = {key: p.detach().clone() for key, p in model.named_parameters()}
    x = _inputs()
    x_before = x.clone()

    METHODS[name](model, x, 0)

    assert all(module.training for module in model.modules())
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    for key, value in model.named_parameters():
        assert torch.equal(value, parameters[key]), key
    assert torch.equal(x, x_before)


@all_methods
def test_runs_in_eval_mode_whatever_the_model_mode(name):
    # Dropout and training-mode BatchNorm would make results random and batch-dependent
    model = _model()
    x = _inputs()
    model.eval()
    reference = METHODS[name](model, x, 1)
    model.train()
    first = METHODS[name](model, x, 1)
    second = METHODS[name](model, x, 1)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_each_sample_is_explained_independently_of_the_batch(name):
    model = _model().train()
    x = _inputs(batch=5)
    target = torch.tensor([0, 1, 2, 3, 0])
    whole = METHODS[name](model, x, target)
    part = METHODS[name](model, x[1:3], target[1:3])
    torch.testing.assert_close(part, whole[1:3], rtol=1e-5, atol=1e-6)


@all_methods
def test_global_rng_untouched(name):
    model, x = _model().train(), _inputs()
    before = torch.get_rng_state()
    METHODS[name](model, x, None)
    assert torch.equal(torch.get_rng_state(), before)


@all_methods
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_output_shape_dtype_device(name, dtype, device):
    model = _model().to(device=device, dtype=dtype)
    x = _inputs(device=device, dtype=dtype)
    out = METHODS[name](model, x, None)
    assert tuple(out.shape) == _expected_shape(name, x)
    assert out.dtype == (torch.float32 if name in MAP_METHODS else dtype)
    assert out.device == x.device
    assert not out.requires_grad
    assert out.isfinite().all() and (out != 0).any()


@all_methods
def test_works_under_no_grad(name):
    model = _model()
    x = _inputs()
    reference = METHODS[name](model, x, None)
    with torch.no_grad():
        result = METHODS[name](model, x, None)
    assert torch.is_grad_enabled()
    torch.testing.assert_close(result, reference, rtol=0, atol=0)


@all_methods
@pytest.mark.parametrize("target_kind", ["none", "int", "tensor"])
def test_works_under_inference_mode_with_inference_inputs(name, target_kind):
    def make_target():
        return {"none": None, "int": 2, "tensor": torch.tensor([1, 0, 3])}[target_kind]

    model = _model()
    reference = METHODS[name](model, _inputs(), make_target())
    with torch.inference_mode():
        x, target = _inputs(), make_target()
        assert x.is_inference()
        result = METHODS[name](model, x, target)
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    _assert_no_hooks(model)
