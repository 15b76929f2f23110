"""Guided backprop and deconvnet: rules on every ReLU for one call, against Captum, on models nobody wrote for us."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import attribute, deconvnet, guided_backprop

torchvision = pytest.importorskip("torchvision")
captum = pytest.importorskip("captum.attr")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", ["resnet18", "vgg11"])
def test_guided_backprop_and_deconvnet_match_captum(network, dtype):
    torch.manual_seed(0)
    model = getattr(torchvision.models, network)(num_classes=5).eval().to(dtype)  # in-place ReLUs throughout
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    target = torch.tensor([1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's notes about in-place ReLUs
        guided = captum.GuidedBackprop(model).attribute(x, target=target)
        deconv = captum.Deconvolution(model).attribute(x, target=target)
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(guided_backprop(model, x, target), guided, **tolerance)
    torch.testing.assert_close(deconvnet(model, x, target), deconv, **tolerance)
    assert not torch.allclose(guided_backprop(model, x, target), deconvnet(model, x, target))


class FunctionalNet(nn.Module):
    """ReLUs called as functions (F.relu, Tensor.relu): the rule must reach them too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.c(self.b(F.relu(self.a(x))).relu())


def test_rules_reach_functional_relus_by_hand():
    torch.manual_seed(1)
    net = FunctionalNet()
    x = torch.randn(3, 4)
    h1 = net.a(x)
    h2 = net.b(h1.relu())
    grad = net.c.weight[1].detach().expand(3, -1)  # d score_1 / d relu(h2)
    guided = grad.clamp_min(0) * (h2 > 0)
    guided = (guided @ net.b.weight).clamp_min(0) * (h1 > 0)
    expected = guided @ net.a.weight
    torch.testing.assert_close(guided_backprop(net, x, 1), expected.detach())
    deconv = (grad.clamp_min(0) @ net.b.weight).clamp_min(0) @ net.a.weight
    torch.testing.assert_close(deconvnet(net, x, 1), deconv.detach())


def test_other_activations_are_refused_by_name():
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"calls GELU in module '1.1'"):
        attribute("guided_backprop", net, torch.randn(2, 3))
    # and nothing is left active: plain torch works afterwards
    assert torch.nn.functional.relu(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
