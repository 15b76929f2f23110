"""Activation maps, dead units, sparsity and the most active channels, against hooks and hand-built layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import activation_maps, activation_statistics, most_active_channels
from lightning_interp.methods.model.tokens import token_grids
from lightning_interp.methods.model.trace import trace_model
from tests.conftest import BatchNormDropoutNet


def _hooked(model, inputs, module):
    """The module's output as a plain forward hook sees it (cloned at once), model in eval mode."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(inputs)
        model.train(was)
    finally:
        handle.remove()
    return seen[0]


def test_maps_equal_a_forward_hook_also_before_an_in_place_relu_and_in_chunks():
    torch.manual_seed(0)
    net = BatchNormDropoutNet()  # features.1 is a BatchNorm followed by an in-place ReLU
    inputs = torch.randn(7, 3, 12, 12)
    whole = activation_maps(net, inputs, ["features.1", "features.4", "head.3"])
    assert torch.equal(whole["features.1"], _hooked(net, inputs, net.features[1]))  # not overwritten by the ReLU
    assert (whole["features.1"] < 0).any()
    assert torch.equal(whole["features.4"], _hooked(net, inputs, net.features[4]))
    maps = activation_maps(net, inputs, ["features.1", "features.4", "head.3"], batch_size=3)  # 3 + 3 + 1 samples
    for name in whole:  # a convolution of another batch size may round differently in the last bit
        assert torch.allclose(maps[name], whole[name], rtol=0, atol=1e-6)
    assert maps["head.3"].shape == (7, 4)
    assert torch.allclose(maps["head.3"], _hooked(net, inputs, net.head[3]))


def test_modes_restored_and_eval_mode_used():
    net = BatchNormDropoutNet().train()
    net.features[1].eval()  # a frozen BatchNorm stays frozen
    stats = net.features[1].running_mean.clone()
    inputs = torch.randn(4, 3, 8, 8)
    first = activation_maps(net, inputs, ["head.2"])["head.2"]
    second = activation_maps(net, inputs, ["head.2"])["head.2"]
    assert torch.equal(first, second)  # dropout off: eval mode inside
    assert net.training and not net.features[1].training and net.head[2].training
    assert torch.equal(stats, net.features[1].running_mean)


def _known_dead_layer():
    """A conv whose channels 1, 4, 6 are dead by construction (zero weights, negative bias) and the rest alive."""
    conv = nn.Conv2d(1, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.fill_(0.0)
        for c in (1, 4, 6):
            conv.weight[c] = 0.0
            conv.bias[c] = -0.5
        conv.weight[0] = 0.0
        conv.bias[0] = 2.0  # always 2: alive, and the most active
    return nn.Sequential(conv, nn.ReLU())


def test_dead_fraction_and_sparsity_on_a_layer_with_known_dead_channels():
    torch.manual_seed(1)
    net = _known_dead_layer()
    maps = activation_maps(net, torch.randn(16, 1, 6, 6), ["1"])["1"]
    stats = activation_statistics(maps)
    assert stats.dead.tolist() == [c in (1, 4, 6) for c in range(8)]
    assert stats.dead_fraction == pytest.approx(3 / 8)
    zero_share = float((maps <= 0).float().mean())
    assert stats.sparsity == pytest.approx(zero_share)
    assert stats.sparsity >= 3 / 8  # the dead channels are zero everywhere
    assert stats.mean_activation == pytest.approx(float(maps.mean()))
    assert stats.channel_mean[0] == pytest.approx(2.0)
    assert most_active_channels(maps, 1).tolist() == [0]


def test_most_active_channels_order_ties_and_bounds():
    a = torch.zeros(2, 5, 2, 2)
    a[:, 3] = 4.0
    a[:, 1] = 1.0
    a[:, 4] = 1.0  # tie with channel 1: the lower index first
    a[0, 2, 0, 0] = 8.0  # mean 1 over 8 values: ties too
    assert most_active_channels(a, 4).tolist() == [3, 1, 2, 4]
    assert most_active_channels(a, 50).tolist() == [3, 1, 2, 4, 0]
    with pytest.raises(ValueError, match="positive int"):
        most_active_channels(a, 0)


def test_token_outputs_become_grids_with_the_models_layout():
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    inputs = torch.randn(3, 3, 16, 16)
    layer = "encoder.layers.encoder_layer_1"
    grids = token_grids(trace_model(vit, inputs))
    maps = activation_maps(vit, inputs, [layer], reshape={layer: grids[layer]})[layer]
    tokens = _hooked(vit, inputs, dict(vit.named_modules())[layer])  # (3, 1 + 16, 8): class token, then 4 x 4
    assert maps.shape == (3, 8, 4, 4)
    assert torch.allclose(maps.permute(0, 2, 3, 1).reshape(3, 16, 8), tokens[:, 1:], atol=1e-5)


def test_errors_name_the_problem():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(ValueError, match="at least one input"):
        activation_maps(net, torch.randn(0, 3), ["0"])
    with pytest.raises(ValueError, match="appear once"):
        activation_maps(net, torch.randn(2, 3), ["0", "0"])
    with pytest.raises((AttributeError, ValueError, KeyError)):
        activation_maps(net, torch.randn(2, 3), ["nope"])
    with pytest.raises(ValueError, match=r"\(N, C"):
        activation_statistics(torch.randn(5))
