"""AttentionCallback with the real Trainer on HF BERT and ViT, timm Swin and Lightning's demo Transformer.

The maps are checked against the models' own attention (HF ``output_attentions=True``, ``nn.MultiheadAttention``
called with ``need_weights=True`` layer by layer), reduced by hand.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import AttentionCallback, DataDescription, Display
from lightning_interp.methods import TokenGrid, attention_stack
from tests.callbacks.test_attention_callback import _fit
from tests.conftest import quiet_trainer

transformers = pytest.importorskip("transformers")

PAD = 0


class _Wrapped(pl.LightningModule):
    """Any classifier held as ``self.model``, called through the callbacks' ``forward_fn`` or ``call``."""

    def __init__(self, model: nn.Module, call=None) -> None:
        super().__init__()
        self.model = model
        self.call = call or (lambda model, x: model(x))

    def forward(self, x):
        return self.call(self.model, x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _text_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 30, (16, 10), generator=generator)
    lengths = torch.randint(5, 11, (16,), generator=generator)
    ids[torch.arange(10)[None, :] >= lengths[:, None]] = PAD  # padding at the end
    return DataLoader(TensorDataset(ids, torch.arange(16) % 3), batch_size=8)


def _image_loader() -> DataLoader:
    data = TensorDataset(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3)
    return DataLoader(data, batch_size=8)


def _bert_call(model, ids):
    return model(input_ids=ids, attention_mask=(ids != PAD).long()).logits


def test_hf_bert_token_maps_equal_its_own_attentions(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    bert = transformers.BertForSequenceClassification._from_config(config, attn_implementation="sdpa")
    callback = AttentionCallback(
        num_samples=4,
        forward_fn=lambda module, ids: _bert_call(module.model, ids),
        data=DataDescription(pad_id=PAD),
        display=Display(background_drawing=False),
    )
    model = _Wrapped(bert, _bert_call)
    events, _ = _fit(tmp_path, model, [callback], _text_loader())
    layer = "model.bert.encoder.layer.1.attention.self"
    assert callback.layers == [layer]
    ids = callback.probe.inputs
    real = (ids != PAD).float()
    bert.set_attn_implementation("eager")
    with torch.no_grad():  # the model's own attention probabilities, after the last validation epoch
        own = bert.eval()(input_ids=ids, attention_mask=real.long(), output_attentions=True).attentions
    mean_over_real = lambda w: (w * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)  # noqa: E731 (B, Q, K)
    torch.testing.assert_close(callback.last_maps[layer], mean_over_real(own[1].mean(1)), atol=1e-5, rtol=0)
    eye = torch.eye(10)
    steps = [(0.5 * w.mean(1) + 0.5 * eye) for w in own]  # rows already sum to one
    torch.testing.assert_close(callback.last_maps["rollout"], mean_over_real(steps[1] @ steps[0]), atol=1e-5, rtol=0)
    assert float(callback.last_maps[layer][real == 0].abs().max()) == 0.0  # padding: no attention
    assert "interp_attention/maps" in events.images and f"interp_attention/{layer}/heads" in events.images
    for name in ("model.bert.encoder.layer.0.attention.self", layer):
        assert 0 < events.scalars[f"interp_attention/{name}/entropy"][-1][1] <= 1


def test_hf_vit_image_maps_come_from_the_class_token_on_the_patch_grid(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    vit = transformers.ViTForImageClassification._from_config(config, attn_implementation="sdpa")
    callback = AttentionCallback(
        num_samples=4,
        forward_fn=lambda module, x: module.model(pixel_values=x).logits,
        display=Display(background_drawing=False),
    )
    events, _ = _fit(tmp_path, _Wrapped(vit, lambda m, x: m(pixel_values=x).logits), [callback], _image_loader())
    layer = "model.vit.layers.1.attention"
    assert callback.layers == [layer] and callback._query == 0  # the class token
    assert callback._grid == TokenGrid(prefix=1, height=4, width=4)
    vit.set_attn_implementation("eager")
    with torch.no_grad():
        own = vit.eval()(pixel_values=callback.probe.inputs, output_attentions=True).attentions
    patches = own[1].mean(1)[:, 0, 1:].reshape(4, 1, 4, 4)  # the class token's row, over the 4 x 4 patches
    expected = F.interpolate(patches, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(callback.last_maps[layer], expected, atol=1e-5, rtol=0)
    assert callback.last_maps["rollout"].shape == (4, 32, 32)
    assert math.isfinite(events.scalars["interp_attention/rollout/concentration"][-1][1])


def _timm_swin() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 2),
        num_classes=3,
    )


def test_timm_swin_refuses_rollout_across_stages_and_shows_window_attention_on_the_grid(tmp_path):
    torch.manual_seed(0)
    model = _Wrapped(_timm_swin())
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[AttentionCallback(num_samples=4)], logger=False)
    with pytest.raises(ValueError, match=r"rollout is not defined.*different token sets.*rollout=False"):
        trainer.fit(model, _image_loader(), _image_loader())
    assert trainer.global_step == 0  # refused before training
    callback = AttentionCallback(num_samples=4, rollout=False, display=Display(background_drawing=False))
    events, _ = _fit(tmp_path, model, [callback], _image_loader())
    layer = "model.layers.1.blocks.1.attn"  # the last (shifted-window) block of the last stage
    assert callback.layers == [layer] and "rollout" not in callback.last_maps
    assert callback._grid == TokenGrid(prefix=0, height=8, width=8) and callback._query == "mean"
    # each window's rows sum to one, so the attention a token receives, averaged over the 64 queries, sums to one
    received = callback.last_maps[layer].reshape(4, 8, 4, 8, 4).mean(dim=(2, 4))  # back to the 8 x 8 grid
    torch.testing.assert_close(received.sum(dim=(1, 2)), torch.ones(4), atol=1e-4, rtol=0)
    assert float(callback.last_maps[layer].std()) > 0
    assert f"interp_attention/{layer}/heads" in events.images
    assert 0 < events.scalars["interp_attention/model.layers.0.blocks.0.attn/entropy"][-1][1] <= 1


class _Demo(_Wrapped):
    """Lightning's demo encoder-decoder Transformer, classifying from its last position's first three outputs."""

    def __init__(self) -> None:
        from lightning.pytorch.demos import Transformer

        torch.manual_seed(0)
        super().__init__(Transformer(vocab_size=30, ninp=16, nhead=2, nhid=32, nlayers=2, dropout=0.1))

    def forward(self, ids):
        return self.model(ids, ids).view(ids.shape[0], ids.shape[1], -1)[:, -1, :3]


def _demo_loader() -> DataLoader:
    ids = torch.randint(1, 30, (16, 8), generator=torch.Generator().manual_seed(0))  # no padding: the demo masks none
    return DataLoader(TensorDataset(ids, torch.arange(16) % 3), batch_size=8)


def test_demo_transformer_shows_the_encoder_and_rolls_out_through_it_only(tmp_path):
    model = _Demo()
    callback = AttentionCallback(num_samples=4, display=Display(background_drawing=False))
    events, _ = _fit(tmp_path, model, [callback], _demo_loader())
    encoder = ["model.transformer.encoder.layers.0.self_attn", "model.transformer.encoder.layers.1.self_attn"]
    assert callback.layers == [encoder[1]]
    assert callback._rollout_layers == encoder  # not the decoder's self- or cross-attention
    # by hand: each encoder layer's own weights (need_weights=True) on its input, rollout over them, mean of queries
    demo, ids = model.model.eval(), callback.probe.inputs
    with torch.no_grad():
        x = demo.pos_encoder(demo.embedding(ids) * math.sqrt(demo.ninp))
        steps = []
        for block in demo.transformer.encoder.layers:
            weights = block.self_attn(x, x, x, need_weights=True, average_attn_weights=True)[1]
            steps.append(0.5 * weights + 0.5 * torch.eye(8))
            x = block(x)
    torch.testing.assert_close(callback.last_maps[encoder[1]], weights.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(callback.last_maps["rollout"], (steps[1] @ steps[0]).mean(1), atol=1e-5, rtol=0)
    assert not [tag for tag in events.scalars if "decoder" in tag]  # the decoder is not captured by default
    stack = attention_stack(callback._found, [encoder[1], "model.transformer.decoder.layers.0.self_attn"])
    assert "different stacks (an encoder and a decoder)" in stack.refusal


def test_demo_transformer_cross_attention_is_shown_when_named(tmp_path):
    cross = "model.transformer.decoder.layers.1.multihead_attn"
    callback = AttentionCallback(cross, num_samples=4, display=Display(background_drawing=False))
    events, _ = _fit(tmp_path, _Demo(), [callback], _demo_loader())
    assert callback.layers == [cross]
    found = {layer.name: layer for layer in callback._found}
    assert found[cross].cross and not found["model.transformer.decoder.layers.1.self_attn"].cross
    maps = callback.last_maps[cross]  # the decoder's queries' mean attention over the source tokens
    assert maps.shape == (4, 8)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    assert f"interp_attention/{cross}/entropy" in events.scalars
    assert callback._rollout_layers[-1] == "model.transformer.encoder.layers.1.self_attn"  # rollout: the encoder's
