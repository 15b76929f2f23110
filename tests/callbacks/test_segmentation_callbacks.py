"""Map callbacks on torchvision segmentation models with the real Trainer: regions, class masks, pictures."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import GradCAMCallback, SaliencyCallback
from lightning_interp.methods import SegmentationTarget, gradient, segmentation_target
from lightning_interp.probe import ProbeSet
from tests.conftest import quiet_trainer, read_events

torchvision = pytest.importorskip("torchvision")


class Segmenter(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["out"], batch[1], ignore_index=255)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(count: int = 4, size: int = 32):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 3, size, size, generator=generator)
    maps = torch.zeros(count, size, size, dtype=torch.long)
    for i in range(count):
        maps[i, 4 + i : 16 + i, 6:20] = 1 + i % 2
    maps[:, 0, :] = 255
    return images, maps


def _lraspp():
    torch.manual_seed(0)
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)


def _fit(tmp_path, net, callbacks, count=4):
    images, maps = _data(count)
    loader = DataLoader(TensorDataset(images, maps), batch_size=count)
    logger = TensorBoardLogger(str(tmp_path), name="seg")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Segmenter(net), loader, loader)
    return trainer, read_events(logger.log_dir), [str(w.message) for w in caught]


def test_saliency_on_a_segmentation_model_explains_the_label_region_as_the_functional_api(tmp_path):
    target = SegmentationTarget(class_index="label", region="label", reduce="mean")
    callback = SaliencyCallback(methods=("gradient",), target=target, num_samples=4)
    trainer, events, _ = _fit(tmp_path, _lraspp(), [callback])
    probe = callback.probe
    assert probe.class_maps is not None and probe.labels is None
    model = trainer.lightning_module.eval()
    explained, transform = segmentation_target(
        model, probe.inputs, "label", region="label", reduce="mean", class_map=probe.class_maps
    )
    assert explained.tolist() == [1, 2, 1, 2]  # the only labelled class of each sample
    expected = gradient(model, probe.inputs, explained, output_transform=transform).abs().sum(dim=1)
    torch.testing.assert_close(callback.last_maps["gradient"], expected, rtol=1e-4, atol=1e-8)
    for metric in ("localization", "pointing_game", "concentration"):
        values = events.scalars[f"interp_saliency/gradient/{metric}"]
        assert values and all(math.isfinite(v) for _, v in values)
    # localization against the explained class's ground-truth mask, computed here
    masks = probe.class_maps == explained[:, None, None]
    maps = callback.last_maps["gradient"]
    share = ((maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)).mean()
    assert events.scalars["interp_saliency/gradient/localization"][-1][1] == pytest.approx(float(share), rel=1e-4)
    assert events.image_steps("interp_saliency/maps/rows_1-2")


def test_default_target_explains_the_largest_predicted_class_over_its_predicted_mask(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    callbacks = [GradCAMCallback(layer="net.backbone.16", num_samples=2)]
    trainer, events, _ = _fit(tmp_path, net, callbacks, count=2)
    callback = callbacks[0]
    assert callback.segmentation == SegmentationTarget()
    model = trainer.lightning_module.eval()
    probe = callback.probe
    with torch.no_grad():
        predicted = model(probe.inputs)["out"].argmax(dim=1)
    areas = torch.stack([(predicted == c).sum(dim=(1, 2)) for c in range(3)], dim=1)
    areas[:, 0] = torch.where(areas[:, 1:].sum(dim=1) > 0, -1, areas[:, 0])  # the background only when alone
    explained = areas.argmax(dim=1)
    region = predicted == explained[:, None, None]
    assert torch.equal(callback._regions.region().cpu(), region)
    maps = callback.last_maps["net.backbone.16"]
    assert maps.shape == (2, 32, 32) and bool(torch.isfinite(maps).all())
    assert "interp_gradcam/net.backbone.16/localization" in events.scalars


def test_fcn_resnet50_with_a_fixed_class_and_every_region(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    callbacks = [
        SaliencyCallback(methods=("gradient",), target=SegmentationTarget(class_index=1, region="all"), num_samples=2)
    ]
    trainer, _events, _ = _fit(tmp_path, net, callbacks, count=2)
    model = trainer.lightning_module.eval()
    x = callbacks[0].probe.inputs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)["out"][:, 1].sum(), x)
    torch.testing.assert_close(callbacks[0].last_maps["gradient"], grad.abs().sum(dim=1), rtol=1e-4, atol=1e-8)


def test_region_label_without_class_maps_is_refused_before_training(tmp_path):
    images, _ = _data(2)
    probe = ProbeSet(images)
    callback = SaliencyCallback(methods=("gradient",), target=SegmentationTarget(region="label"), probe=probe)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    loader = DataLoader(TensorDataset(*_data(2)), batch_size=2)
    with pytest.raises(ValueError, match="class maps"):
        trainer.fit(Segmenter(_lraspp()), loader, loader)


def test_a_segmentation_target_on_a_classifier_is_refused(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    callback = SaliencyCallback(methods=("gradient",), target=SegmentationTarget(), num_samples=2)
    images, _maps = _data(2)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1])), batch_size=2)

    class Classifier(Segmenter):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match="dense class scores"):
        trainer.fit(Classifier(net), loader, loader)


def test_a_linear_probe_on_a_segmentation_set_reads_the_classes_present_in_each_image(tmp_path):
    """A segmentation set has no image labels: the probe is labelled with the classes present in each class map
    (multi-hot, background and 255 left out), and the linear probe runs one binary probe per class on them."""
    from lightning_interp.callbacks import LinearProbeCallback

    probe_callback = LinearProbeCallback(layers=["net.backbone.4"], num_samples=8)
    _, events, _ = _fit(tmp_path, _lraspp(), [probe_callback], count=8)
    _, maps = _data(8)
    expected = torch.stack([torch.stack([(m == c).any() for c in range(3)]) for m in maps]).long()
    expected[:, 0] = 0  # the background is not a label
    assert torch.equal(probe_callback.probe.labels, expected)
    assert probe_callback._runs == 1
    assert any(tag.startswith("interp_probe/net.backbone.4/") for tag in events.scalars)


def test_grad_cam_auto_layer_of_a_segmentation_model_is_before_its_class_score_head(tmp_path):
    """The last spatial layer of a segmentation model is its classifier (its channels are the classes): Grad-CAM of
    the logits themselves. layer='auto' takes the last spatial layer before the head's class-score layers."""
    from lightning_interp.callbacks import GradCAMCallback

    torch.manual_seed(0)
    net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )
    gradcam = GradCAMCallback(num_samples=2)
    _fit(tmp_path, net, [gradcam], count=2)
    (layer,) = gradcam.layers
    module = dict(Segmenter(net).named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    with torch.no_grad():
        net.eval()(torch.rand(1, 3, 32, 32))
    handle.remove()
    assert seen[0][1] != 3, layer  # not the 3-class scores (the head's last convolution, what 'auto' picked before)
    assert layer != "net.classifier.4" and gradcam.last_maps[layer].shape == (2, 32, 32)
