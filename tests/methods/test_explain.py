"""The explain seam: Explainer gives each method's own result, shares one pass, and respects the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    METHODS,
    Explainer,
    attribute,
    mc_dropout_maps,
    parse_methods,
    register_cam,
    register_method,
)
from lightning_interp.methods.cams.gradcam import CAM_VARIANTS


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.fixture
def registry_restored():
    methods, variants = dict(METHODS), dict(CAM_VARIANTS)
    try:
        yield
    finally:
        for table, before in ((METHODS, methods), (CAM_VARIANTS, variants)):
            table.clear()
            table.update(before)


def test_each_method_gives_what_attribute_gives_with_the_same_options_and_generator():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    options = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 8}, "lime": {"n_samples": 8}}
    names = ["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "lime", "grad_cam", "score_cam"]
    explainer = Explainer({name: options.get(name) for name in names}, layers=["1"], seed=4, run_defaults=False)
    result = explainer(net, x)
    target = result.target
    assert torch.equal(target, net.eval()(x).argmax(dim=1))
    for name in names:
        spec = METHODS[name]
        extra = {"generator": torch.Generator().manual_seed(4)} if spec.stochastic else {}
        layer = {"layer": "1"} if spec.needs_layer else {}
        expected = attribute(name, net, x, target, **layer, **options.get(name, {}), **extra)
        key = f"{name}@1" if spec.needs_layer else name
        torch.testing.assert_close(result.attributions[key], expected, rtol=1e-5, atol=1e-7)


def test_two_calls_draw_the_same_noise_and_leave_the_global_rng_alone():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    explainer = Explainer({"smoothgrad": {"n_samples": 4}, "kernel_shap": {"n_samples": 8}}, seed=1)
    before = torch.get_rng_state()
    first, second = explainer(net, x), explainer(net, x)
    assert torch.equal(torch.get_rng_state(), before)
    for key in first.attributions:
        assert torch.equal(first.attributions[key], second.attributions[key])


def test_completeness_error_is_a_device_scalar():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    result = Explainer({"integrated_gradients": {"n_steps": 64}})(net, x)
    error = result.scalars["integrated_gradients/completeness_error"]
    assert isinstance(error, torch.Tensor) and error.ndim == 0 and 0 <= float(error) < 0.05


def test_a_method_declared_again_under_a_built_in_name_is_the_one_that_runs(registry_restored):
    net, x = _net(), torch.randn(2, 3, 8, 8)

    @register_method("gradient", name="gradient", replace=True, shared_pass=True)
    def ones(model, inputs, target=None, *, task="multiclass", output_transform=None):
        return torch.ones_like(inputs)

    @register_method("cam", name="grad_cam", replace=True, shared_pass=True)
    def flat(model, inputs, target=None, layer=None, *, relu=True, output_transform=None, task="multiclass"):
        return torch.full(inputs.shape[:1] + inputs.shape[-2:], 2.0)

    result = Explainer({"gradient": None, "grad_cam": {"layer": "1"}})(net, x)
    assert bool((result.attributions["gradient"] == 1).all())
    assert bool((result.attributions["grad_cam@1"] == 2).all())


def test_a_declared_cam_variant_is_served_by_the_shared_pass(registry_restored):
    net, x = _net(), torch.randn(2, 3, 8, 8)

    @register_cam("negative Grad-CAM")
    def negative_grad_cam_weights(activation, grad):
        return -grad.mean(dim=(2, 3), keepdim=True)

    result = Explainer({"grad_cam": None, "negative_grad_cam": None}, layers=["1"], relu=False)(net, x)
    torch.testing.assert_close(result.attributions["negative_grad_cam@1"], -result.attributions["grad_cam@1"])


def test_mc_dropout_maps_take_an_explainer_with_its_output_transform():
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return {"logits": self.net(x)}

    model, x = Dict(), torch.randn(2, 3, 8, 8)
    pick = lambda output: output["logits"]  # noqa: E731
    explainer = Explainer("gradient", output_transform=pick)
    maps = mc_dropout_maps(model, x, explainer, 3, generator=torch.Generator().manual_seed(0))
    assert maps.shape == (3, 2, 8, 8) and torch.isfinite(maps).all()
    same = mc_dropout_maps(model, x, explainer, 3, output_transform=pick, generator=torch.Generator().manual_seed(0))
    assert torch.equal(maps, same)
    with pytest.raises(ValueError, match="differs from the Explainer's"):
        mc_dropout_maps(model, x, explainer, 3, output_transform=lambda output: output["logits"])


@pytest.mark.parametrize(
    ("methods", "error", "message"),
    [
        ("no_such", ValueError, "Unknown attribution method 'no_such'"),
        ([("gradient", {"n_steps": 3})], TypeError, r"gradient takes no option\(s\) \['n_steps'\]"),
        (["gradient", "gradient"], ValueError, "lists 'gradient' twice"),
        ({"smoothgrad": {"n_samples": 0}}, ValueError, "n_samples must be a positive int"),
        ({"smoothgrad": {"generator": None}}, TypeError, "takes no option"),
        ([3], TypeError, "takes a method name"),
        ({"gradient": 3}, TypeError, "must be a mapping"),
        ([], ValueError, "needs at least one method"),
    ],
)
def test_parse_methods_refuses_what_cannot_work(methods, error, message):
    with pytest.raises(error, match=message):
        parse_methods(methods)
