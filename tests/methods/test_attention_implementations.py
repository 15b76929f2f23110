"""Attention captured from any implementation, against independent references.

References: the model's own ``output_attentions=True`` (HF, eager), a softmax written out by hand from the
arguments of ``F.scaled_dot_product_attention``, the window weights the Swin modules compute themselves laid on the
grid with the libraries' own ``window_partition`` and an index grid.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods.representation.attention import (
    attention_layers,
    attention_stack,
    capture_attention,
    find_attention_layers,
)

transformers = pytest.importorskip("transformers")

PAD = 0


def _text_model(family: str) -> nn.Module:
    common = {"vocab_size": 40, "num_labels": 3}
    if family == "bert":
        config = transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common
        )
        return transformers.BertForSequenceClassification._from_config(config, attn_implementation="eager")
    if family == "roberta":
        config = transformers.RobertaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=20,
            pad_token_id=PAD,
            **common,
        )
        return transformers.RobertaForSequenceClassification._from_config(config, attn_implementation="eager")
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, pad_token_id=PAD, **common)
        return transformers.DistilBertForSequenceClassification._from_config(config, attn_implementation="eager")
    config = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, n_positions=16, pad_token_id=PAD, bos_token_id=1, eos_token_id=1, **common
    )
    return transformers.GPT2ForSequenceClassification._from_config(config, attn_implementation="eager")


def _image_model(family: str) -> nn.Module:
    options = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "num_labels": 3,
    }
    if family == "vit":
        return transformers.ViTForImageClassification._from_config(
            transformers.ViTConfig(**options), attn_implementation="eager"
        )
    return transformers.DeiTForImageClassification._from_config(
        transformers.DeiTConfig(**options), attn_implementation="eager"
    )


def _padded_ids() -> torch.Tensor:
    ids = torch.randint(2, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 6:] = PAD  # four padding tokens at the end
    ids[1, 9:] = PAD
    return ids


def _text_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=(ids != PAD).long()).logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_text_models_attention_equals_their_own_output_attentions(family, implementation):
    torch.manual_seed(0)
    model = _text_model(family).eval()
    ids = _padded_ids()
    with torch.no_grad():  # the reference: the eager model's own attention probabilities
        own = model(input_ids=ids, attention_mask=(ids != PAD).long(), output_attentions=True).attentions
    model.set_attn_implementation(implementation)
    found = find_attention_layers(model, ids, forward=_text_forward, verify=True)
    source = "softmax" if implementation == "eager" else "scaled_dot_product_attention"
    assert [layer.source for layer in found] == [source, source]  # captured where this implementation computes it
    assert not any(layer.cross for layer in found)
    records, _ = capture_attention(model, ids, forward=_text_forward)
    assert list(records) == [layer.name for layer in found]
    for weights, reference in zip(records.values(), own, strict=True):
        assert weights.shape == (3, 2, 10, 10)
        torch.testing.assert_close(weights, reference.float(), atol=1e-5, rtol=0)
        assert float(weights[0, :, :, 6:].abs().max()) == 0.0  # padding keys get no weight
        if family == "gpt2":  # causal: nothing above the diagonal
            assert float(weights.triu(diagonal=1).abs().max()) == 0.0
    assert attention_stack(found).layers == tuple(layer.name for layer in found)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_image_models_attention_equals_their_own_output_attentions(family, implementation):
    torch.manual_seed(0)
    model = _image_model(family).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        own = model(pixel_values=images, output_attentions=True).attentions
    model.set_attn_implementation(implementation)
    records, _ = capture_attention(model, images, forward=lambda m, x: m(pixel_values=x).logits, verify=True)
    tokens = 16 + (1 if family == "vit" else 2)  # 4 x 4 patches after the class (and distillation) token
    for weights, reference in zip(records.values(), own, strict=True):
        assert weights.shape == (2, 2, tokens, tokens)
        torch.testing.assert_close(weights, reference.float(), atol=1e-5, rtol=0)


def _hand_softmax(q, k, mask=None, causal=False, scale=None, groups=1):
    """softmax(q k^T * scale + mask), written out: an independent reference for the SDPA recomputation."""
    k = torch.cat([k[:, h : h + 1].expand(-1, groups, -1, -1) for h in range(k.shape[1])], dim=1)  # head h -> group h
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if causal:
        logits = logits + torch.full(logits.shape[-2:], float("-inf")).triu(1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1)


class _HandAttention(nn.Module):
    """A hand-written layer that calls F.scaled_dot_product_attention with the given options."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, **options) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.options = heads, kv_heads, options
        self.q = nn.Linear(8, 2 * heads)
        self.kv = nn.Linear(8, 4 * kv_heads)
        self.last: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, self.heads, 2).transpose(1, 2)
        k, v = self.kv(x).view(batch, tokens, 2, self.kv_heads, 2).permute(2, 0, 3, 1, 4)
        self.last = (q, k)
        out = F.scaled_dot_product_attention(q, k, v, **self.options)
        return out.transpose(1, 2).reshape(batch, tokens, -1)


class _Net(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn = attention
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x).mean(dim=1))


def _masks():
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, :, :, 3:] = False  # the first sample's last two keys are padding
    additive = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(3))  # a per-head bias
    return keep, additive


@pytest.mark.parametrize("case", ["bool_mask", "additive_mask", "causal", "scale", "gqa"])
def test_scaled_dot_product_attention_weights_equal_a_hand_softmax(case):
    torch.manual_seed(0)
    keep, additive = _masks()
    options, hand, kv_heads = {}, {}, 4
    if case == "bool_mask":
        options, hand = {"attn_mask": keep}, {"mask": keep}
    elif case == "additive_mask":
        options, hand = {"attn_mask": additive}, {"mask": additive}
    elif case == "causal":
        options, hand = {"is_causal": True}, {"causal": True}
    elif case == "scale":
        options, hand = {"scale": 0.3}, {"scale": 0.3}
    else:
        options, hand, kv_heads = {"enable_gqa": True}, {"groups": 2}, 2  # 4 query heads share 2 key heads
    attention = _HandAttention(kv_heads=kv_heads, **options)
    net = _Net(attention).eval()
    x = torch.randn(2, 5, 8)
    records, _ = capture_attention(net, x, verify=True)  # verify: weights @ v rebuilds the call's own output
    q, k = attention.last
    torch.testing.assert_close(records["attn"], _hand_softmax(q, k, **hand), atol=1e-6, rtol=1e-5)
    if case == "bool_mask":
        assert float(records["attn"][0, :, :, 3:].abs().max()) == 0.0


def test_an_explicit_softmax_is_captured_and_a_three_d_softmax_is_not():
    class Eager(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            self.probabilities = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
            gate = (x @ x.transpose(1, 2)).softmax(dim=-1)  # 3-D: not (batch, heads, queries, keys) attention
            return (self.probabilities @ v).transpose(1, 2).reshape(2, 5, 8) + gate @ x

    torch.manual_seed(0)
    net = _Net(Eager()).eval()
    records, _ = capture_attention(net, torch.randn(2, 5, 8))
    assert list(records) == ["attn"]
    torch.testing.assert_close(records["attn"], net.attn.probabilities)


def test_multihead_attention_and_timm_attention_are_not_counted_twice():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), 2, enable_nested_tensor=False)
    found = find_attention_layers(encoder, torch.randn(2, 5, 16))
    assert [(layer.name, layer.source, layer.calls) for layer in found] == [
        ("layers.0.self_attn", "multihead_attention", 1),
        ("layers.1.self_attn", "multihead_attention", 1),
    ]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
    for block in vit.blocks:
        block.attn.fused_attn = True  # its own SDPA call runs inside it: recomputed once, by the timm path
    found = find_attention_layers(vit, torch.randn(2, 3, 32, 32))
    assert [(layer.name, layer.source, layer.calls) for layer in found] == [
        ("blocks.0.attn", "timm_attention", 1),
        ("blocks.1.attn", "timm_attention", 1),
    ]
    assert [layer.name for layer in found] == attention_layers(vit)  # found without a forward too


def test_a_named_block_captures_the_attention_computed_inside_it():
    torch.manual_seed(0)
    model = _text_model("bert").eval()
    model.set_attn_implementation("sdpa")
    ids = _padded_ids()
    inner, _ = capture_attention(model, ids, ["bert.encoder.layer.1.attention.self"], forward=_text_forward)
    outer, _ = capture_attention(model, ids, ["bert.encoder.layer.1"], forward=_text_forward)
    torch.testing.assert_close(outer["bert.encoder.layer.1"], inner["bert.encoder.layer.1.attention.self"])
    with pytest.raises(ValueError, match=r"more than once.*name the inner ones"):
        capture_attention(model, ids, ["bert.encoder"], forward=_text_forward)
    with pytest.raises(ValueError, match=r"compute no attention.*bert\.encoder\.layer\.0\.attention\.self"):
        capture_attention(model, ids, ["bert.pooler"], forward=_text_forward)


def _hand_layout(windows: torch.Tensor, grid: int, window: int, shift: int, partition) -> torch.Tensor:
    """Window weights laid on the grid by hand: the library's own window_partition of a rolled index grid says
    which token sits at each place of each window."""
    index = torch.arange(grid * grid).view(1, grid, grid, 1)
    index = torch.roll(index, shifts=(-shift, -shift), dims=(1, 2))
    index = partition(index, window).reshape(-1, window * window)  # (windows, N): the token at each place
    count = index.shape[0]
    batch = windows.shape[0] // count
    dense = torch.zeros(batch, windows.shape[1], grid * grid, grid * grid)
    for b in range(batch):
        for w in range(count):
            dense[b][:, index[w][:, None], index[w][None, :]] = windows[b * count + w].float()
    return dense


def test_hf_swin_window_attention_is_laid_on_the_grid_with_and_without_shift():
    torch.manual_seed(0)
    from transformers.models.swin.modeling_swin import window_partition

    config = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=3
    )
    model = transformers.SwinForImageClassification._from_config(config, attn_implementation="eager").eval()
    own, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(".attention") and "blocks" in name:  # SwinAttention returns (output, its own weights)
            hook = module.register_forward_hook(lambda m, args, out, name=name: own.__setitem__(name, out[1]))
            handles.append(hook)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values=images)
    for handle in handles:
        handle.remove()
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        found = {layer.name: layer for layer in find_attention_layers(model, images, forward=lambda m, x: m(x).logits)}
        records, _ = capture_attention(model, images, forward=lambda m, x: m(pixel_values=x).logits)
        checked = set()
        for name, windows in own.items():
            block = model.get_submodule(name.rsplit(".", 1)[0])
            grid = found[name].grid[0]
            expected = _hand_layout(windows, grid, block.window_size, block.shift_size, window_partition)
            torch.testing.assert_close(records[name], expected, atol=1e-6, rtol=0)
            checked.add(block.shift_size > 0)
        assert checked == {True, False}  # shifted and plain windows
    stack = attention_stack(list(found.values()))
    assert "different token sets (16x16 grid" in stack.refusal and "8x8 grid" in stack.refusal


def test_timm_swin_window_attention_fused_and_unfused_is_laid_on_the_grid():
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import window_partition

    torch.manual_seed(0)
    net = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 2),
        num_classes=3,
    ).eval()
    own = {}
    attentions = {name: m for name, m in net.named_modules() if type(m).__name__ == "WindowAttention"}
    for name, module in attentions.items():  # the unfused path's own softmax: the reference
        module.fused_attn = False
        module.softmax.register_forward_hook(lambda m, args, out, name=name: own.__setitem__(name, out))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(images)
    own = {name: weights.clone() for name, weights in own.items()}  # later passes call the hooks again
    for fused in (False, True):
        for module in attentions.values():
            module.fused_attn = fused
        found = {layer.name: layer for layer in find_attention_layers(net, images, verify=True)}
        assert {layer.source for layer in found.values()} == {"scaled_dot_product_attention" if fused else "softmax"}
        records, _ = capture_attention(net, images)
        shifts = set()
        for name, windows in own.items():
            block = net.get_submodule(name.rsplit(".", 1)[0])
            window, shift = block.window_size[0], block.shift_size[0]
            expected = _hand_layout(
                windows, found[name].grid[0], window, shift, lambda x, s: window_partition(x, (s, s))
            )
            torch.testing.assert_close(records[name], expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(records[name].sum(-1), torch.ones_like(records[name].sum(-1)))
            shifts.add(shift > 0)
        assert shifts == {True, False}


def test_encoder_decoder_stack_and_cross_attention():
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, batch_first=True)
    source, target = torch.randn(2, 6, 16), torch.randn(2, 6, 16)  # equal lengths: shapes cannot tell cross from self
    found = find_attention_layers(model, source, forward=lambda m, x: m(x, target))
    cross = [layer.name for layer in found if layer.cross]
    assert cross == ["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]
    stack = attention_stack(found)
    assert stack.layers == ("encoder.layers.0.self_attn", "encoder.layers.1.self_attn") and stack.refusal is None
    decoder = attention_stack(found, ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"])
    assert "cross-attention runs between" in decoder.refusal
    mixed = attention_stack(found, ["encoder.layers.1.self_attn", "decoder.layers.0.self_attn"])
    assert "different stacks" in mixed.refusal
    assert "cross-attention" in attention_stack(found, ["decoder.layers.0.multihead_attn"]).refusal


def test_self_attention_stays_self_attention_when_a_hook_passes_aliases_of_its_input():
    """DeepSpeed ZeRO-3's pre-forward hook hands each module detached aliases of its inputs: query and key are then
    two objects for one tensor, and must not be taken for cross-attention (keys from another sequence)."""

    class Block(nn.Module):
        def __init__(self, cross: bool) -> None:
            super().__init__()
            self.cross = cross
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            other = x.flip(1) if self.cross else x  # another sequence, or the same one
            return self.attn(x, other, other, need_weights=False)[0]

    def aliases(module, args, kwargs):
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs

    x = torch.randn(2, 5, 8)
    for cross in (False, True):
        block = Block(cross)
        block.attn.register_forward_pre_hook(aliases, with_kwargs=True)
        (layer,) = find_attention_layers(block, x)
        assert layer.cross is cross
