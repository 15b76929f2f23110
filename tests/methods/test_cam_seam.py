"""The gradient CAM seam: a variant declared by its weights function alone (``register_cam``) is a method everywhere:
in the registry, through ``attribute``, in ``cam_from_activation`` and ``GRADIENT_CAMS``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods.cams.gradcam import (
    CAM_VARIANTS,
    GRADIENT_CAMS,
    cam_from_activation,
    eigen_cam,
    grad_cam,
    grad_cam_plus_plus,
    hires_cam,
    layer_cam,
    register_cam,
    xgrad_cam,
)
from lightning_interp.methods.model.tokens import TokenGrid
from lightning_interp.methods.registry import METHODS, attribute

BUILT_IN = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "hires_cam", "eigen_cam")


@pytest.fixture
def restore_tables():
    """Leave ``METHODS`` and ``CAM_VARIANTS`` as they were (in place: importers hold the same dicts)."""
    methods, variants = dict(METHODS), dict(CAM_VARIANTS)
    yield
    METHODS.clear()
    METHODS.update(methods)
    CAM_VARIANTS.clear()
    CAM_VARIANTS.update(variants)
    assert tuple(GRADIENT_CAMS) == BUILT_IN


def _net() -> nn.Sequential:
    """conv -> ReLU -> conv (stride 2, signed output: the explained layer "2") -> ReLU -> pool -> linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()  # fmt: skip


def _activation_and_gradient(net: nn.Sequential, x: torch.Tensor, target: torch.Tensor):
    """Layer "2"'s activation and the gradient of the target scores with respect to it, by hand."""
    activation = net[:3](x).detach().requires_grad_(True)
    scores = net[3:](activation)
    (grad,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), activation)
    return activation.detach(), grad


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (1e-7 + flat.max(dim=1, keepdim=True).values)).reshape(maps.shape)


def test_built_in_variants_are_the_table():
    assert GRADIENT_CAMS == BUILT_IN and len(GRADIENT_CAMS) == 6 and GRADIENT_CAMS[1] == "grad_cam_plus_plus"
    functions = (grad_cam, grad_cam_plus_plus, xgrad_cam, layer_cam, hires_cam, eigen_cam)
    for name, function in zip(BUILT_IN, functions, strict=True):
        assert function.__name__ == name and CAM_VARIANTS[name].function is function
        assert METHODS[name].function is function and METHODS[name].family == "cam" and METHODS[name].shared_pass
    assert list(METHODS)[list(METHODS).index("grad_cam") :][:6] == list(BUILT_IN)  # declaration order kept
    with pytest.raises(ValueError, match="Unknown CAM method 'nope'"):
        cam_from_activation(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), method="nope")


def test_user_elementwise_variant_matches_pytorch_grad_cam(restore_tables):
    @register_cam("Grad-CAM\nelement-wise", reference="pytorch-grad-cam GradCAMElementWise", elementwise=True)
    def grad_cam_element_wise(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Grad-CAM heatmap of ``layer`` weighted element-wise: ``sum_k relu(G_k A_k)``."""
        return torch.where(grad * activation > 0, grad, torch.zeros_like(grad))

    name = "grad_cam_element_wise"
    spec = METHODS[name]
    assert spec.family == "cam" and spec.needs_layer and spec.shared_pass and spec.title == "Grad-CAM\nelement-wise"
    assert spec.function is grad_cam_element_wise is CAM_VARIANTS[name].function and CAM_VARIANTS[name].elementwise
    assert spec.options == METHODS["grad_cam"].options
    assert name in GRADIENT_CAMS and GRADIENT_CAMS[-1] == name
    assert grad_cam_element_wise.__doc__.startswith("Grad-CAM heatmap of ``layer`` weighted element-wise")

    net, x, target = _net(), torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    activation, grad = _activation_and_gradient(net, x, target)
    expected = (grad * activation).clamp_min(0).sum(dim=1)  # pytorch-grad-cam's formula, by hand
    ours = attribute(name, net, x, target, layer="2", relu=False, upsample=False)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cam_from_activation(activation, grad, relu=False, method=name), expected)
    assert not torch.allclose(ours, hires_cam(net, x, target, "2", upsample=False)), "precondition: not HiRes-CAM"

    pgc = pytest.importorskip("pytorch_grad_cam")
    targets = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    with pgc.GradCAMElementWise(model=net, target_layers=[net[2]]) as method:
        theirs = method(input_tensor=x, targets=[targets.ClassifierOutputTarget(int(t)) for t in target])
    net.zero_grad(set_to_none=True)
    resized = F.interpolate(_minmax(ours)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(_minmax(resized), torch.from_numpy(theirs).float(), atol=2e-4, rtol=0)


def test_user_channel_variant_matches_a_hand_formula(restore_tables):
    @register_cam("|Grad|-CAM", reference="a hand formula")
    def abs_grad_cam_weights(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs().mean(dim=(2, 3), keepdim=True)

    name = "abs_grad_cam"  # the function's name less "_weights"
    assert METHODS[name].family == "cam" and METHODS[name].reference == "a hand formula" and name in GRADIENT_CAMS
    assert METHODS[name].cost == "1 forward + 1 backward" and not CAM_VARIANTS[name].elementwise

    net, x, target = _net(), torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 1])
    activation, grad = _activation_and_gradient(net, x, target)
    weights = grad.abs().mean(dim=(2, 3), keepdim=True)
    grid = (weights * activation).sum(dim=1).clamp_min(0)
    expected = F.interpolate(grid[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    ours = attribute(name, net, x, target, layer="2")
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(abs_grad_cam_weights(net, x, target, "2"), ours)  # the decorator gave the method

    # the callbacks' call form: tokens through reshape=, resized to output_size
    tokens = activation.flatten(2).transpose(1, 2)  # (B, 64, 6) patch tokens
    tokens = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)  # a class token in front
    token_grad = torch.cat([torch.zeros_like(tokens[:, :1]), grad.flatten(2).transpose(1, 2)], dim=1)
    assert name in GRADIENT_CAMS
    served = cam_from_activation(
        tokens, token_grad, relu=True, output_size=(16, 16), reshape=TokenGrid(1, 8, 8), method=name
    )
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)


def test_wrong_weight_shapes_are_refused(restore_tables):
    @register_cam("per-sample only")
    def flat_cam(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.mean(dim=(2, 3))  # (B, C): missing the (1, 1)

    with pytest.raises(ValueError, match=r"channel weights of CAM method 'flat_cam' must have shape \(1, 2, 1, 1\)"):
        cam_from_activation(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), method="flat_cam")
    with pytest.raises(ValueError, match="not both"):
        register_cam("both", elementwise=True, gives_map=True)


def test_redeclaring_a_name_needs_replace(restore_tables):
    def zero_weights(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad[:, :, :1, :1])

    for taken in ("grad_cam", "xgrad_cam", "score_cam", "gradient"):  # a CAM variant, or any method
        with pytest.raises(ValueError, match=f"{taken!r} is already declared"):
            register_cam("again", name=taken)(zero_weights)
    assert CAM_VARIANTS["xgrad_cam"].function is xgrad_cam is METHODS["xgrad_cam"].function  # nothing changed
    assert "score_cam" not in GRADIENT_CAMS and METHODS["score_cam"].title == "Score-CAM"

    replaced = register_cam("zero", name="xgrad_cam", replace=True)(zero_weights)
    assert GRADIENT_CAMS == BUILT_IN  # same place in the table
    assert METHODS["xgrad_cam"].function is replaced and METHODS["xgrad_cam"].title == "zero"
    net, x = _net(), torch.randn(1, 3, 16, 16)
    assert bool((attribute("xgrad_cam", net, x, 0, layer="2") == 0).all())
