"""Checkpoint state, coexisting instances, and models nobody wrote for us (torchvision)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import GradCAMCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def test_probe_and_history_survive_a_checkpoint_and_resume(tmp_path):
    first = GradCAMCallback(num_samples=6)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, callbacks=[first, checkpoint], logger=False, enable_checkpointing=True
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert first.layers == ["net.7"]  # 'auto' resolved to the last spatial module (the last ReLU)

    # The resumed run re-reads its probe samples from the data by the checkpoint's dataset indices.
    resumed = GradCAMCallback(num_samples=6)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[resumed], logger=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe.indices, first.probe.indices)
    assert torch.equal(resumed.probe.inputs, first.probe.inputs)
    assert torch.equal(resumed.probe.labels, first.probe.labels)
    assert torch.equal(resumed.probe.masks, first.probe.masks)
    assert resumed._runs == first._runs + 1
    assert [epoch for epoch, _ in resumed._history] == [0, 1, 2]


def test_two_instances_of_one_class_coexist_in_a_checkpoint(tmp_path):
    coarse = GradCAMCallback(layer="net.7", name="cam_coarse", num_samples=4)
    fine = GradCAMCallback(layer="net.4", name="cam_fine", num_samples=4)
    assert coarse.state_key != fine.state_key
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[coarse, fine], logger=TensorBoardLogger(str(tmp_path), name="two")
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(str(path))
    saved = torch.load(str(path), weights_only=False)["callbacks"]
    assert {coarse.state_key, fine.state_key} <= set(saved)
    assert saved[fine.state_key]["layers"] == ["net.4"]
    events = read_events(str(tmp_path / "two"))
    assert "interp_cam_coarse/maps/rows_1-2" in events.images and "interp_cam_fine/maps/rows_1-2" in events.images


@pytest.mark.parametrize(
    ("factory", "expected_layer"),
    [
        (lambda: torchvision.models.resnet18(weights=None, num_classes=4), "net.layer4"),
        (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=4), "net.features"),
    ],
    ids=["resnet18", "mobilenet_v3_small"],
)
def test_torchvision_models_with_auto_layer(tmp_path, factory, expected_layer):
    torch.manual_seed(0)
    gradcam = GradCAMCallback(layer="auto", num_samples=4)
    saliency = SaliencyCallback(methods=("gradient", ("integrated_gradients", {"n_steps": 4})), num_samples=4)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        callbacks=[gradcam, saliency],
        logger=TensorBoardLogger(str(tmp_path), name="tv"),
    )
    trainer.fit(ImageClassifier(factory()), datamodule=tiny_datamodule(image_size=64, val_size=16))
    assert gradcam.layers == [expected_layer]
    cam = gradcam._previous[expected_layer]
    assert cam.shape == (4, 64, 64) and torch.isfinite(cam).all() and (cam >= 0).all()
    events = read_events(str(tmp_path / "tv"))
    assert events.image_steps("interp_gradcam/maps/rows_1-2") == [1]
    assert events.scalar_steps(f"interp_gradcam/{expected_layer}/localization") == [1]
