"""Vision transformers with the real Trainer: torchvision's VisionTransformer and timm's, no user reshape.

Before this, ``layer="auto"`` picked the patch embedding, or with a reshape the encoder output, whose patch tokens
get exactly zero gradient: every map was zero and the concentration NaN, silently.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from tests.conftest import NetClassifier, quiet_trainer, read_events

torchvision = pytest.importorskip("torchvision")


def _loader(count: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(count, 3, 32, 32, generator=generator), torch.arange(count) % 4)
    return DataLoader(data, batch_size=8)


def _fit(tmp_path, net, callbacks):
    logger = TensorBoardLogger(str(tmp_path), name="vit")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NetClassifier(net, lr=0.05), _loader(), _loader())
    return read_events(logger.log_dir).scalars, [str(w.message) for w in caught]


def test_torchvision_vit_grad_cam_auto_gives_nonzero_finite_maps_after_one_epoch(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    )
    callback = GradCAMCallback(layer="auto", num_samples=8)
    scalars, messages = _fit(tmp_path, net, [callback])
    assert callback.layers == ["net.encoder.layers.encoder_layer_1.ln_1"]
    maps = callback._previous[callback.layers[0]]
    assert maps.shape == (8, 32, 32)  # the 4 x 4 patch grid, upsampled to the input
    assert bool(torch.isfinite(maps).all()) and float(maps.abs().max()) > 0
    tag = f"interp_gradcam/{callback.layers[0]}/concentration"
    assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag])
    assert not [m for m in messages if "is zero at epoch" in m]


def test_timm_vit_with_register_tokens_through_every_callback(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4, depth=2, reg_tokens=4
    )
    callbacks = [
        GradCAMCallback(num_samples=8, relu=False),  # signed: a barely trained ViT's positive evidence may be nil
        SaliencyCallback(methods=("gradient",), num_samples=8),
        LinearProbeCallback(num_samples=32),
        RepresentationSimilarityCallback(num_samples=32),
    ]
    scalars, messages = _fit(tmp_path, net, callbacks)
    assert callbacks[0].layers == ["net.blocks.1.norm1"]
    assert float(callbacks[0]._previous["net.blocks.1.norm1"].abs().max()) > 0
    ours = {tag: values for tag, values in scalars.items() if tag.startswith("interp_")}
    assert {tag.split("/")[0] for tag in ours} >= {"interp_probe", "interp_similarity"}
    for tag, values in ours.items():  # a NaN only where a warning says why (signed maps without positive part)
        finite = all(math.isfinite(v) for _, v in values)
        assert finite or (tag.endswith("concentration") and any("negative or zero everywhere" in m for m in messages))
    assert not [m for m in messages if "is zero at epoch" in m]


def test_a_named_vit_layer_whose_patch_tokens_reach_nothing_is_refused_with_the_right_one(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    )
    callback = GradCAMCallback(layer="net.encoder.layers.encoder_layer_1", num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match=r"do not reach the model's score.*'net.encoder.layers.encoder_layer_1.ln_1'"):
        trainer.fit(NetClassifier(net), _loader(), _loader())
    assert trainer.global_step == 0
