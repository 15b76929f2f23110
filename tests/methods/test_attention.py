"""Attention weights recomputed in hooks, against the layers' own weights; rollout against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods.representation.attention import (
    attention_entropy,
    attention_layers,
    attention_rollout,
    capture_attention,
    layer_attention,
)


def _own_weights(attention: nn.MultiheadAttention, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return attention(x, x, x, need_weights=True, average_attn_weights=False, **kwargs)[1]


@pytest.mark.parametrize("batch_first", [True, False])
def test_weights_recomputed_in_the_hook_equal_multihead_attentions_own(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=batch_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True  # the first sequence is two tokens shorter
    # in eval mode without gradients the encoder would take torch's fused fast path, which never calls self_attn
    records, output = capture_attention(
        encoder, x, forward=lambda model, inputs: model(inputs, src_key_padding_mask=padding)
    )
    assert list(records) == ["layers.0.self_attn", "layers.1.self_attn"]
    with torch.no_grad():
        reference_output = encoder(x, src_key_padding_mask=padding)
        first_input = x
        own = _own_weights(encoder.layers[0].self_attn, first_input, key_padding_mask=padding)
        second_input = encoder.layers[0](x, src_key_padding_mask=padding)
        own_second = _own_weights(encoder.layers[1].self_attn, second_input, key_padding_mask=padding)
    torch.testing.assert_close(records["layers.0.self_attn"], own)
    torch.testing.assert_close(records["layers.1.self_attn"], own_second, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output, reference_output, atol=1e-5, rtol=1e-4)  # the forward itself is unchanged
    assert float(records["layers.0.self_attn"][0, :, :, 5:].abs().max()) == 0.0  # padded keys get no attention
    torch.testing.assert_close(records["layers.0.self_attn"].sum(-1), torch.ones(3, 4, 7))


def test_weights_equal_a_softmax_computed_by_hand_from_the_packed_projection():
    # an independent reference: q and k from in_proj by hand, softmax(q k^T / sqrt(d) + padding mask)
    torch.manual_seed(2)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    weights, _ = layer_attention(attention, (x, x, x), {"key_padding_mask": padding, "need_weights": False})
    w, b = attention.in_proj_weight, attention.in_proj_bias
    q = (x @ w[:8].T + b[:8]).reshape(2, 5, 2, 4).transpose(1, 2)
    k = (x @ w[8:16].T + b[8:16]).reshape(2, 5, 2, 4).transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) / 2.0  # sqrt(head dim 4)
    logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    torch.testing.assert_close(weights, logits.softmax(dim=-1), atol=1e-6, rtol=1e-5)


def test_separate_key_value_sizes_masks_and_bias_k_match_the_modules_own_weights():
    torch.manual_seed(1)
    attention = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, bias=True, add_bias_kv=True, add_zero_attn=True)
    attention.eval()
    query, key, value = torch.randn(4, 2, 8), torch.randn(6, 2, 5), torch.randn(6, 2, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 0] = True
    weights, output = layer_attention(attention, (query, key, value), {"attn_mask": mask, "need_weights": False})
    with torch.no_grad():
        own_output, own = attention(query, key, value, attn_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(weights, own)
    torch.testing.assert_close(output, own_output)
    assert weights.shape == (2, 2, 4, 8)  # 6 keys + bias_k + the zero key


def test_timm_attention_weights_equal_its_own_unfused_softmax():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
    net.eval()
    names = attention_layers(net)
    assert names == ["blocks.0.attn", "blocks.1.attn"]
    own = {}
    for name in names:  # timm's unfused path hands its softmax weights to attn_drop: an independent reference
        module = net.get_submodule(name)
        module.fused_attn = False
        module.attn_drop.register_forward_hook(lambda m, args, out, name=name: own.__setitem__(name, args[0].detach()))
    x = torch.randn(2, 3, 32, 32)
    records, _ = capture_attention(net, x, verify=True)
    for name in names:
        assert records[name].shape == (2, 3, 17, 17)  # 3 heads, class token + 4 x 4 patches
        torch.testing.assert_close(records[name], own[name], atol=1e-6, rtol=1e-5)


def test_a_layer_whose_forward_does_more_is_refused_when_verified():
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3)
    attention = net.blocks[0].attn
    plain_forward = attention.forward
    attention.forward = lambda x, **kwargs: plain_forward(x, **kwargs) + 0.5  # e.g. a bias the recomputation lacks
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="do not reproduce its output"):
        capture_attention(net, x, verify=True)
    records, _ = capture_attention(net, x)  # unverified it records (the caller chose not to check)
    assert records["blocks.0.attn"].shape == (2, 3, 17, 17)


def test_rollout_equals_a_hand_computation_on_two_layers():
    first = np.array([[0.6, 0.4], [0.2, 0.8]])
    second_heads = np.array([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])  # two heads
    second = second_heads.mean(axis=0)  # [[0.5, 0.5], [0.5, 0.5]]
    eye = np.eye(2)
    a1 = 0.5 * first + 0.5 * eye  # rows already sum to one
    a2 = 0.5 * second + 0.5 * eye
    expected = a2 @ a1  # later layers on the left
    weights = [torch.tensor(first)[None, None].expand(1, 2, 2, 2), torch.tensor(second_heads)[None]]
    rollout = attention_rollout(weights)
    np.testing.assert_allclose(rollout[0].numpy(), expected, rtol=1e-6)
    # by hand: a1 = [[.8, .2], [.1, .9]], a2 = [[.75, .25], [.25, .75]]; a2 a1 = [[.6 + .025, .15 + .225], ...]
    assert np.allclose(expected, [[0.625, 0.375], [0.275, 0.725]])
    raw = attention_rollout(weights, residual=False)
    np.testing.assert_allclose(raw[0].numpy(), second @ first, rtol=1e-6)
    maximum = attention_rollout(weights, head_fusion="max", residual=False)
    fused = second_heads.max(axis=0)
    fused = fused / fused.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(maximum[0].numpy(), fused @ first, rtol=1e-6)


def test_rollout_refuses_cross_attention_and_unknown_fusions():
    with pytest.raises(ValueError, match="self-attention"):
        attention_rollout([torch.full((1, 1, 2, 3), 1 / 3)])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([torch.full((1, 1, 2, 2), 0.5)], head_fusion="median")


def test_entropy_is_one_for_uniform_rows_and_zero_for_one_hot_rows():
    uniform = torch.full((2, 3, 5, 5), 0.2)
    peaked = torch.eye(5).expand(2, 3, 5, 5)
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, 1, 4, 4)  # two keys visible (two masked): uniform over them
    skewed = torch.tensor([0.75, 0.25]).expand(1, 1, 2, 2)  # -(.75 ln .75 + .25 ln .25) / ln 2 = 0.8113
    torch.testing.assert_close(attention_entropy(uniform), torch.ones(2))
    torch.testing.assert_close(attention_entropy(peaked), torch.zeros(2))
    torch.testing.assert_close(attention_entropy(half), torch.tensor([1.0]))
    torch.testing.assert_close(attention_entropy(skewed), torch.tensor([0.8113]), atol=1e-4, rtol=0)
    causal = torch.tril(torch.ones(4, 4))
    causal = (causal / causal.sum(dim=1, keepdim=True))[None, None]  # uniform over what each row may see
    torch.testing.assert_close(attention_entropy(causal), torch.tensor([1.0]))  # the first row (one key) left out


def test_errors_name_the_attention_layers_there_are():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no attention layer"):
        capture_attention(net, torch.randn(2, 4))
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, batch_first=True), 1, enable_nested_tensor=False)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn"):
        capture_attention(encoder, torch.randn(2, 3, 8), ["layers.0.linear1"])
