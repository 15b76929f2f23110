"""AttentionCallback and token attributions with the real Trainer: text, torchvision and timm transformers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import AttentionCallback, DataDescription, Display, SaliencyCallback
from lightning_interp.demo import ImageClassifier, TextTransformer, shapes_cnn
from lightning_interp.synthetic_text import PAD_ID, VOCABULARY, make_keyword_text
from tests.conftest import quiet_trainer, read_events


def _text_loader(count: int = 32, seed: int = 0, batch_size: int = 16) -> DataLoader:
    data = make_keyword_text(count, length=12, min_length=6, seed=seed)
    return DataLoader(TensorDataset(data.ids, data.labels), batch_size=batch_size)


def _fit(tmp_path, model, callbacks, loader, **options):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=logger, **{"max_epochs": 1, **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader, loader)
    return read_events(logger.log_dir), [str(w.message) for w in caught]


def _uniform_attention_model(bias_key: bool = False) -> ImageClassifier:
    """A text transformer whose queries and keys are zero: every token attends uniformly to the non-padding ones
    (``bias_key``: and to a learnt bias key after them, as ``add_bias_kv=True`` adds)."""
    torch.manual_seed(0)
    net = TextTransformer(len(VOCABULARY), 3, dim=16, heads=2, layers=2, max_length=12, pad_id=PAD_ID)
    for layer in net.encoder.layers:
        if bias_key:
            layer.self_attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
        with torch.no_grad():
            layer.self_attn.in_proj_weight[:32].zero_()  # q and k rows of the packed projection
            layer.self_attn.in_proj_bias[:32].zero_()
        layer.self_attn.in_proj_weight.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:32]), grad[32:]]))
        layer.self_attn.in_proj_bias.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:32]), grad[32:]]))
    return ImageClassifier(net, lr=1e-3)


def test_uniform_attention_reads_as_uniform_entropy_one_and_padding_gets_nothing(tmp_path):
    callback = AttentionCallback(
        num_samples=8,
        data=DataDescription(vocabulary=VOCABULARY, pad_id=PAD_ID),
        display=Display(background_drawing=False),
    )
    events, _ = _fit(tmp_path, _uniform_attention_model(), [callback], _text_loader())
    for layer in ("net.encoder.layers.0.self_attn", "net.encoder.layers.1.self_attn"):
        entropy = events.scalars[f"interp_attention/{layer}/entropy"][-1][1]
        assert entropy == pytest.approx(1.0, abs=1e-4)  # uniform over the real tokens, whatever the padding
    probe = callback.probe
    real = probe.inputs != PAD_ID
    for key in ("net.encoder.layers.1.self_attn", "rollout"):
        maps = callback.last_maps[key]
        assert maps.shape == probe.inputs.shape
        assert float(maps[~real].abs().max()) == 0.0  # padding: no attention, and hidden
        expected = real.float() / real.sum(dim=1, keepdim=True)  # uniform over each sample's real tokens
        torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    assert callback.layers == ["net.encoder.layers.1.self_attn"]
    images = events.images
    assert images["interp_attention/maps"][-1][1][1] == 900  # drawn as text, 900 px wide
    assert "interp_attention/net.encoder.layers.1.self_attn/heads" in images


def test_a_trained_text_transformer_attends_and_attributes_to_the_keywords(tmp_path):
    torch.manual_seed(0)
    train = make_keyword_text(768, length=16, min_length=8, seed=0)
    val = make_keyword_text(64, length=16, min_length=8, seed=1)
    val_loader = DataLoader(TensorDataset(val.ids, val.labels, val.keyword_mask), batch_size=32)  # masks: keywords
    train_loader = DataLoader(TensorDataset(train.ids, train.labels), batch_size=32, shuffle=True)
    net = TextTransformer(len(VOCABULARY), 3, dim=32, heads=2, layers=2, max_length=16, pad_id=PAD_ID)
    words = {
        "data": DataDescription(vocabulary=VOCABULARY, pad_id=PAD_ID),
        "num_samples": 32,
        "display": Display(background_drawing=False),
    }
    attention = AttentionCallback(**words)
    saliency = SaliencyCallback(
        methods=("gradient", ("integrated_gradients", {"n_steps": 64})), input_layer="auto", **words
    )
    logger = TensorBoardLogger(str(tmp_path), name="text")
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[attention, saliency], logger=logger)
    trainer.fit(ImageClassifier(net, lr=3e-3), train_loader, val_loader)
    assert float(trainer.callback_metrics["val_acc"]) > 0.9
    probe = attention.probe
    mask = val.keyword_mask[probe.indices]
    has = mask.any(dim=1)  # positive and negative sentences; neutral ones have no keywords
    mask, real = mask[has], (probe.inputs != PAD_ID)[has]
    uniform = float((mask.sum(1) / real.sum(1)).mean())  # a map spread evenly over the real tokens
    maps = {key: value[has].abs() for key, value in {**attention.last_maps, **saliency.last_maps}.items()}
    shares = {name: float(((m * mask).sum(1) / m.sum(1)).mean()) for name, m in maps.items()}
    assert saliency._embedding == "net.embedding"
    # measured: last layer 0.88, IG 0.80, gradient 0.51, rollout 0.43 of the mass on the keywords; uniform 0.19
    assert shares["net.encoder.layers.1.self_attn"] > 3 * uniform, (shares, uniform)
    assert shares["integrated_gradients"] > 3 * uniform, (shares, uniform)
    assert shares["gradient"] > 2 * uniform, (shares, uniform)
    assert shares["rollout"] > 1.8 * uniform, (shares, uniform)  # rollout keeps half of each token on itself
    scalars = read_events(logger.log_dir).scalars
    assert bool((attention.probe.masks == val.keyword_mask[probe.indices]).all())  # the bool (B, T) batch item
    for name, share in shares.items():  # logged as localization, neutral sentences (no keyword) left out
        callback = "attention" if name in attention.last_maps else "saliency"
        assert scalars[f"interp_{callback}/{name}/localization"][-1][1] == pytest.approx(share, abs=1e-4), name
    error = scalars["interp_saliency/integrated_gradients/completeness_error"][-1][1]
    assert error < 0.05  # 64 steps: sum of token attributions = f(x) - f(padding embedding) within 5%


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_vision_transformers_give_finite_maps_on_the_patch_grid_and_a_heads_picture(tmp_path, library):
    torch.manual_seed(0)
    if library == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        net = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
        )
        layer = "net.encoder.layers.encoder_layer_1.self_attention"
    else:
        timm = pytest.importorskip("timm")
        net = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4, depth=2, reg_tokens=2
        )
        layer = "net.blocks.1.attn"
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 3, 32, 32, generator=generator), torch.arange(16) % 4)
    callback = AttentionCallback(num_samples=8, heads=True, display=Display(background_drawing=False))
    events, messages = _fit(tmp_path, ImageClassifier(net), [callback], DataLoader(data, batch_size=8))
    assert callback.layers == [layer]
    assert callback._query == 0  # the class token (timm: before its two register tokens)
    for key in (layer, "rollout"):
        maps = callback.last_maps[key]
        assert maps.shape == (8, 32, 32) and bool(torch.isfinite(maps).all())
        assert float(maps.std()) > 0  # not flat
        assert math.isfinite(events.scalars[f"interp_attention/{key}/concentration"][-1][1])
    rows = callback.last_maps["rollout"].reshape(8, 4, 8, 4, 8).mean(dim=(2, 4))  # back to the 4 x 4 patch grid
    assert bool((rows.sum(dim=(1, 2)) < 16 / 17 + 1e-4).all())  # the patches' share of the class token's rollout
    assert f"interp_attention/{layer}/heads" in events.images
    assert not [m for m in messages if "NaN" in m or "zero at epoch" in m]


def test_timm_attention_is_recomputed_and_checked_under_bf16_autocast(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4, depth=2)
    data = TensorDataset(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 4)
    callback = AttentionCallback(num_samples=4, display=Display(background_drawing=False))
    # the recomputed weights must rebuild each block's bf16 output (within 5%) before training, or it is refused
    events, _ = _fit(tmp_path, ImageClassifier(net), [callback], DataLoader(data, batch_size=8), precision="bf16-mixed")
    rollout = callback.last_maps["rollout"]
    assert bool(torch.isfinite(rollout).all()) and float(rollout.std()) > 0
    assert 0 < events.scalars["interp_attention/net.blocks.1.attn/entropy"][-1][1] <= 1


def test_a_bias_key_is_not_taken_for_a_class_token(tmp_path):
    # bias_k adds a learnt key after the tokens: the weights are (T, T + 1); the tokens must stay where they are
    model = _uniform_attention_model(bias_key=True)
    with pytest.raises(ValueError, match="rollout=False"):
        _fit(tmp_path, model, [AttentionCallback(num_samples=4, data=DataDescription(pad_id=PAD_ID))], _text_loader())
    callback = AttentionCallback(
        num_samples=8,
        rollout=False,
        query="mean",
        data=DataDescription(pad_id=PAD_ID),
        display=Display(background_drawing=False),
    )
    _fit(tmp_path, model, [callback], _text_loader())
    probe = callback.probe
    real = probe.inputs != PAD_ID
    # q is zero: every real token and the bias key get the same weight, 1 / (real tokens + 1), padding none
    expected = real.float() / (real.sum(dim=1, keepdim=True) + 1)
    torch.testing.assert_close(callback.last_maps["net.encoder.layers.1.self_attn"], expected, atol=1e-5, rtol=0)


def test_a_stock_encoder_with_nested_tensors_and_padding_works(tmp_path):
    torch.manual_seed(0)

    class Stock(nn.Module):  # nn.TransformerEncoder's defaults: enable_nested_tensor=True
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(len(VOCABULARY), 16, padding_idx=PAD_ID)
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            padding = ids == PAD_ID
            x = self.encoder(self.embedding(ids), src_key_padding_mask=padding)
            return self.head(x.masked_fill(padding[..., None], 0).sum(1) / (~padding).sum(1, keepdim=True))

    from lightning_interp import LinearProbeCallback

    callbacks = [
        AttentionCallback(
            num_samples=8, data=DataDescription(pad_id=PAD_ID), display=Display(background_drawing=False)
        ),
        SaliencyCallback(
            input_layer="auto",
            num_samples=8,
            data=DataDescription(pad_id=PAD_ID),
            display=Display(background_drawing=False),
        ),
        LinearProbeCallback(num_samples=32),
    ]
    events, _ = _fit(tmp_path, ImageClassifier(Stock()), callbacks, _text_loader())
    real = callbacks[0].probe.inputs != PAD_ID
    assert float(callbacks[0].last_maps["rollout"][~real].abs().max()) == 0.0
    assert "interp_attention/rollout/concentration" in events.scalars
    assert any(tag.startswith("interp_probe/") for tag in events.scalars)


def test_tokens_land_on_their_patches_and_attention_is_drawn_on_an_absolute_floor():
    from lightning_interp.methods.model.tokens import TokenGrid

    callback = AttentionCallback()
    images = torch.zeros(1, 3, 20, 30)
    callback._layout(images, 1 + 2 * 3, {"block": TokenGrid(prefix=1, height=2, width=3)})
    assert callback._query == 0  # the class token
    rows = torch.zeros(1, 7)
    rows[0, 1 + 1 * 3 + 2] = 1.0  # all attention on the patch in row 1, column 2
    maps = callback._to_map(rows, images)
    assert maps.shape == (1, 20, 30)
    peak = divmod(int(maps[0].argmax()), 30)
    assert peak[0] >= 10 and peak[1] >= 20  # the bottom-right patch of the 2 x 3 grid
    assert float(callback._display_floor(images)[0]) == pytest.approx(2 / 6)  # twice the uniform share


def test_models_without_attention_and_wrong_layers_are_refused_before_training(tmp_path):
    images = TensorDataset(torch.rand(16, 3, 16, 16), torch.arange(16) % 4)
    loader = DataLoader(images, batch_size=8)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[AttentionCallback(num_samples=4)], logger=False)
    with pytest.raises(ValueError, match="no attention layer"):
        trainer.fit(ImageClassifier(shapes_cnn()), loader, loader)
    assert trainer.global_step == 0
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[AttentionCallback("net.head", num_samples=4)], logger=False
    )
    with pytest.raises(ValueError, match=r"not an attention layer.*net\.encoder\.layers\.0\.self_attn"):
        trainer.fit(_uniform_attention_model(), _text_loader(), _text_loader())
    with pytest.raises(TypeError, match="no target option"):
        AttentionCallback(target="label")
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionCallback(head_fusion="median")


def test_saliency_on_token_ids_points_to_input_layer_and_refuses_perturbation_methods():
    with pytest.raises(ValueError, match="perturb"):
        SaliencyCallback(methods=("gradient", "occlusion"), input_layer="auto")
    with pytest.raises(ValueError, match="input_layer"):
        SaliencyCallback(input_layer="")


class _DropoutText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TextTransformer(len(VOCABULARY), 3, dim=16, heads=2, layers=1, max_length=12, pad_id=PAD_ID)
        self.net.encoder.layers[0].dropout.p = 0.3  # dropout inside the encoder layer: the RNG is used in training
        self.net.encoder.layers[0].self_attn.dropout = 0.3

    def forward(self, ids):
        return self.net(ids)


def _train_text(tmp_path, callbacks):
    import lightning.pytorch as pl

    pl.seed_everything(7, verbose=False)
    model = ImageClassifier(_DropoutText(), lr=1e-3)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=callbacks, logger=False, deterministic=True)
    trainer.fit(model, _text_loader(48), _text_loader(32, seed=1))
    return model.state_dict(), torch.get_rng_state()


def test_attention_and_token_saliency_leave_training_bit_identical(tmp_path):
    plain_weights, plain_rng = _train_text(tmp_path / "plain", [])
    fast_path = torch.backends.mha.get_fastpath_enabled()
    callbacks = [
        AttentionCallback(num_samples=8, data=DataDescription(pad_id=PAD_ID)),
        SaliencyCallback(
            methods=("gradient", ("smoothgrad", {"n_samples": 3}), ("integrated_gradients", {"n_steps": 4})),
            input_layer="auto",
            num_samples=8,
            data=DataDescription(pad_id=PAD_ID),
        ),
    ]
    weights, rng = _train_text(tmp_path / "with", callbacks)
    for name, value in plain_weights.items():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(plain_rng, rng)
    assert torch.backends.mha.get_fastpath_enabled() == fast_path  # the fused path is switched back on
    assert callbacks[0]._runs == 2 and callbacks[1]._runs == 2


def test_the_heads_picture_of_text_has_a_line_per_head(tmp_path):
    callback = AttentionCallback(
        num_samples=4, head_samples=2, data=DataDescription(vocabulary=VOCABULARY, pad_id=PAD_ID)
    )
    drawn = []
    original = callback._heads_image

    def spy(picture, layer, heads):
        image = original(picture, layer, heads)
        drawn.append((heads.shape, image.shape))
        return image

    callback._heads_image = spy
    _fit(tmp_path, _uniform_attention_model(), [callback], _text_loader())
    heads_shape, image_shape = drawn[-1]
    assert heads_shape[:2] == (4, 2)  # 4 probe samples, 2 heads, one value per token
    assert image_shape[1] == 900 and image_shape[0] > 2 * (24 + 2 * 24)  # two samples, a header and two lines each


@pytest.mark.slow
def test_torchvision_vit_rollout_after_training_on_the_quickstart_shapes_is_finite_and_not_uniform(tmp_path):
    import lightning.pytorch as pl

    torchvision = pytest.importorskip("torchvision")
    from lightning_interp.synthetic import SyntheticShapesDataModule

    pl.seed_everything(0, verbose=False)
    data = SyntheticShapesDataModule(1024, 128, batch_size=64, seed=0)
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=4
    )
    callback = AttentionCallback(num_samples=64, display=Display(background_drawing=False))
    logger = TensorBoardLogger(str(tmp_path), name="vit")
    trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback], logger=logger)
    trainer.fit(ImageClassifier(net, lr=5e-4), datamodule=data)
    rollout = callback.last_maps["rollout"]
    assert rollout.shape == (64, 32, 32) and bool(torch.isfinite(rollout).all())
    scalars = read_events(logger.log_dir).scalars
    concentration = scalars["interp_attention/rollout/concentration"][-1][1]
    localization = scalars["interp_attention/rollout/localization"][-1][1]
    object_share = float(callback.probe.masks.float().mean())
    # a uniform map puts 0.10 of its mass in its top 10% and the object's area share on the object
    assert concentration > 0.12, concentration
    assert localization > object_share, (localization, object_share)
    entropy = [
        scalars[f"interp_attention/net.encoder.layers.encoder_layer_{i}.self_attention/entropy"] for i in range(3)
    ]
    assert all(0 < values[-1][1] < 1 for values in entropy)


def test_the_probe_callbacks_leave_out_a_position_embedding_of_the_sequence(tmp_path):
    from lightning_interp import LinearProbeCallback, RepresentationSimilarityCallback

    class BertLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(len(VOCABULARY), 16, padding_idx=PAD_ID)
            self.pos = nn.Embedding(12, 16)  # called on arange(T): (T, 16), the same for every sample
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            x = self.word(ids) + self.pos(torch.arange(ids.shape[1]))
            return self.head(self.encoder(x, src_key_padding_mask=ids == PAD_ID)[:, 0])

    callbacks = [LinearProbeCallback(num_samples=32), RepresentationSimilarityCallback(num_samples=32)]
    events, _ = _fit(tmp_path, ImageClassifier(BertLike()), callbacks, _text_loader(48))
    for callback in callbacks:
        assert "net.pos" not in callback.layers and "net.word" in callback.layers, callback.layers
    assert any(tag.endswith("/accuracy") for tag in events.scalars)


def test_token_map_scores_count_the_real_tokens_only():
    from lightning_interp.probe import ProbeSet

    ids = torch.zeros(16, 20, dtype=torch.long)
    ids[:, :8] = 5  # 8 real tokens, 12 padding
    callback = SaliencyCallback(
        probe=ProbeSet(ids, torch.zeros(16, dtype=torch.long)), data=DataDescription(pad_id=PAD_ID)
    )
    generator = torch.Generator().manual_seed(0)
    real = (ids != PAD_ID).float()
    first, second = torch.rand(16, 20, generator=generator) * real, torch.rand(16, 20, generator=generator) * real
    callback._scores({"gradient": first}, set(), callback.probe)
    scores = callback._scores({"gradient": second}, set(), callback.probe)
    # independent maps: no rank correlation over the real tokens (the tied zeros of padding would add about 0.9)
    assert abs(float(scores["interp_saliency/gradient/stability"])) < 0.3
    uniform = callback._scores({"gradient": real}, set(), callback.probe)
    assert float(uniform["interp_saliency/gradient/concentration"]) == pytest.approx(1 / 8)  # top 1 of 8 tokens


def test_a_causal_model_shows_its_last_token_and_uniform_causal_attention_reads_entropy_one(tmp_path):
    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _uniform_attention_model().net  # q = k = 0: each row uniform over the keys it may see

        def forward(self, ids):
            net, length = self.net, ids.shape[1]
            padding = ids == PAD_ID
            causal = nn.Transformer.generate_square_subsequent_mask(length)
            x = net.embedding(ids) + net.position[:, :length]
            x = net.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=True)
            last = (~padding).sum(dim=1) - 1
            return net.head(x[torch.arange(ids.shape[0]), last])

    callback = AttentionCallback(
        num_samples=8, query="last", data=DataDescription(pad_id=PAD_ID), display=Display(background_drawing=False)
    )
    events, _ = _fit(tmp_path, ImageClassifier(Causal()), [callback], _text_loader())
    real = callback.probe.inputs != PAD_ID
    # the last real token sees every real token before it, and nothing after: uniform over the real tokens
    expected = real.float() / real.sum(dim=1, keepdim=True)
    torch.testing.assert_close(callback.last_maps["net.net.encoder.layers.1.self_attn"], expected, atol=1e-5, rtol=0)
    entropy = events.scalars["interp_attention/net.net.encoder.layers.0.self_attn/entropy"][-1][1]
    assert entropy == pytest.approx(1.0, abs=1e-4)  # the first row sees one key: left out, not counted as 0


def test_hugging_face_style_dict_batches_and_a_short_vocabulary(tmp_path):
    data = make_keyword_text(32, length=12, min_length=6, seed=0)

    class Dicts(torch.utils.data.Dataset):  # {"input_ids": ..., "labels": ...}, as a tokenised HF dataset gives
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"input_ids": data.ids[i], "labels": data.labels[i]}

    class DictClassifier(ImageClassifier):
        def _batch(self, batch):
            return batch["input_ids"], batch["labels"]

        def training_step(self, batch, batch_idx):
            return super().training_step(self._batch(batch), batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().validation_step(self._batch(batch), batch_idx)

    loader = DataLoader(Dicts(), batch_size=16)
    callback = AttentionCallback(
        num_samples=4,
        data=DataDescription(vocabulary=VOCABULARY, pad_id=PAD_ID),
        display=Display(background_drawing=False),
    )
    events, _ = _fit(tmp_path, DictClassifier(_uniform_attention_model().net), [callback], loader)
    assert callback.probe.has_labels and callback.probe.inputs.dtype == torch.long
    assert "interp_attention/maps" in events.images
    short = AttentionCallback(num_samples=4, data=DataDescription(vocabulary=VOCABULARY[:10], pad_id=PAD_ID))
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[short], logger=False)
    with pytest.raises(ValueError, match="vocabulary has 10 entries"):
        trainer.fit(_uniform_attention_model(), _text_loader(), _text_loader())
    assert trainer.global_step == 0
