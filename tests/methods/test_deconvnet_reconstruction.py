"""DeConvNet partial input reconstruction from one feature map (Zeiler and Fergus 2014, section 2.1).

The expected values are written here from the paper's definition: the chosen feature map (its strongest
activation, or all of it) with every other activation of the layer zero, unpooled with the max-pool switches,
rectified and filtered with the transposed filters, down to the input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import NeuronTarget, attribute, deconvnet, gradient

captum_attr = pytest.importorskip("captum.attr")


def _block_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2)).double().eval()


def _inputs(batch: int = 3, side: int = 8, channels: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _by_hand(conv: nn.Conv2d, x: torch.Tensor, channel: int, keep: str) -> torch.Tensor:
    """Conv, ReLU, max-pool forward with the switches; the zeroed map back through unpool, ReLU, transposed conv."""
    with torch.no_grad():
        rectified = F.relu(F.conv2d(x, conv.weight, conv.bias))
        pooled, switches = F.max_pool2d(rectified, 2, return_indices=True)
        signal = torch.zeros_like(pooled)
        for b in range(x.shape[0]):
            chosen = pooled[b, channel].flatten()
            if keep == "map":
                signal[b, channel] = pooled[b, channel]
            else:
                top = int(chosen.argmax())
                signal[b, channel].view(-1)[top] = chosen[top]
        unpooled = F.max_unpool2d(signal, switches, 2, output_size=rectified.shape[-2:])
        return F.conv_transpose2d(F.relu(unpooled), conv.weight)  # the transposed filters, no bias


@pytest.mark.parametrize("keep", ["top", "map"])
@pytest.mark.parametrize("channel", [0, 2])
def test_one_conv_relu_maxpool_block_is_reconstructed_as_by_hand(keep, channel):
    net, x = _block_net(), _inputs()
    ours = deconvnet(net, x, NeuronTarget("2", channel), keep=keep)
    expected = _by_hand(net[0], x, channel, keep)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_the_strongest_activation_is_the_default():
    net, x = _block_net(), _inputs()
    torch.testing.assert_close(deconvnet(net, x, NeuronTarget("2", 1)), _by_hand(net[0], x, 1, "top"))
    assert not torch.allclose(deconvnet(net, x, NeuronTarget("2", 1), keep="map"), _by_hand(net[0], x, 1, "top"))


def test_two_blocks_unpool_with_each_layers_switches_by_hand():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
    ).double()  # fmt: skip
    x = _inputs(batch=2, side=8, channels=1)
    with torch.no_grad():
        r1 = F.relu(net[0](x))
        p1, s1 = F.max_pool2d(r1, 2, return_indices=True)
        r2 = F.relu(net[3](p1))
        p2, s2 = F.max_pool2d(r2, 2, return_indices=True)
        signal = torch.zeros_like(p2)
        signal[:, 1] = p2[:, 1]
        down = F.conv_transpose2d(
            F.relu(F.max_unpool2d(signal, s2, 2, output_size=r2.shape[-2:])), net[3].weight, padding=1
        )
        expected = F.conv_transpose2d(
            F.relu(F.max_unpool2d(down, s1, 2, output_size=r1.shape[-2:])), net[0].weight, padding=1
        )
    assert expected.abs().max() > 0
    torch.testing.assert_close(deconvnet(net, x, NeuronTarget("5", 1), keep="map"), expected, rtol=1e-12, atol=1e-12)


def test_only_the_receptive_field_of_the_strongest_unit_is_non_zero():
    net, x = _block_net(), _inputs(batch=2)
    ours = deconvnet(net, x, NeuronTarget("2", 1))
    with torch.no_grad():
        pooled = net(x)[:, 1].flatten(1)  # (B, 3 * 3) pooled units of channel 1
    for b in range(x.shape[0]):
        i, j = divmod(int(pooled[b].argmax()), 3)
        field = torch.zeros(8, 8, dtype=torch.bool)
        field[2 * i : 2 * i + 4, 2 * j : 2 * j + 4] = True  # a 2x2 pool window of 3x3 convolutions: 4x4 pixels
        assert ours[b, :, ~field].abs().max() == 0
        assert ours[b, :, field].abs().max() > 0


def test_other_feature_maps_play_no_part():
    """The other maps' activations are zeroed: changing their filters changes nothing (the switches are the
    chosen map's own, max-pool works per channel)."""
    net, x = _block_net(), _inputs()
    before = deconvnet(net, x, NeuronTarget("2", 0), keep="map")
    with torch.no_grad():
        net[0].weight[1:].mul_(-3.0).add_(0.5)
        net[0].bias[1:].add_(1.0)
    torch.testing.assert_close(deconvnet(net, x, NeuronTarget("2", 0), keep="map"), before, rtol=0, atol=0)


def test_without_relu_or_pooling_it_is_the_gradient_of_the_unit_times_its_activation():
    """A linear network: the deconvnet is the gradient (Captum's NeuronGradient), scaled by the kept activation."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 3)).double()
    x = _inputs()
    unit = (2, 1, 3)  # one unit of the second convolution's (3, 4, 4) output
    with torch.no_grad():
        activation = net(x)[(slice(None), *unit)]
    gradient_of_unit = captum_attr.NeuronGradient(net, net[1]).attribute(x, unit)
    expected = activation[:, None, None, None] * gradient_of_unit
    torch.testing.assert_close(deconvnet(net, x, NeuronTarget("1", unit)), expected, rtol=1e-10, atol=1e-12)
    # keep="gradient": the deconvnet backward of the unit itself, which in a linear network is its gradient
    torch.testing.assert_close(deconvnet(net, x, NeuronTarget("1", unit), keep="gradient"), gradient_of_unit)
    torch.testing.assert_close(gradient(net, x, NeuronTarget("1", unit)), gradient_of_unit)


def test_keep_gradient_matches_captum_neuron_deconvolution():
    net, x = _block_net(), _inputs()
    theirs = captum_attr.NeuronDeconvolution(net, net[2]).attribute(x, (1, slice(None), slice(None)))
    ours = deconvnet(net, x, NeuronTarget("2", 1), keep="gradient")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_through_the_registry_and_the_errors():
    net, x = _block_net(), _inputs()
    torch.testing.assert_close(
        attribute("deconvnet", net, x, NeuronTarget("2", 1), keep="map"), _by_hand(net[0], x, 1, "map")
    )
    head = nn.Sequential(*net, nn.Flatten(), nn.Linear(27, 4)).double()
    with pytest.raises(ValueError, match=r"keep='map'\) reconstructs from a feature map.*NeuronTarget"):
        deconvnet(head, x, 1, keep="map")
    with pytest.raises(ValueError, match="keep must be one of"):
        deconvnet(net, x, NeuronTarget("2", 1), keep="max")  # type: ignore[arg-type]
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())
