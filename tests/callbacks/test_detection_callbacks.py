"""Map callbacks on a torchvision detector with the real Trainer: (images, targets) batches, one detection
explained per image, its box drawn, modes and BatchNorm statistics left alone."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_interp import DetectionTarget, GradCAMCallback, SaliencyCallback
from lightning_interp.methods import detection_target, grad_cam, gradient
from tests.conftest import quiet_trainer, read_events

detection = pytest.importorskip("torchvision.models.detection")

OUTLINE = np.array([25, 255, 76])  # outline_region's colour, (0.1, 1.0, 0.3), as drawn in a uint8 grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


class Boxes(Dataset):
    """Images with one or two bright rectangles, the detection targets torchvision's detectors train on."""

    def __init__(self, count: int = 4, sizes: tuple[int, ...] = (64,)) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(count):
            size = sizes[i % len(sizes)]
            image = 0.2 * torch.rand(3, size, size, generator=generator)
            boxes = [[4 + 2 * i, 6, 30 + 2 * i, 28]] + ([[36, 34, 60, 58]] if i % 2 else [])
            for x1, y1, x2, y2 in boxes:
                image[:, y1:y2, x1:x2] += 0.7
            labels = [1 + i % 2] + ([2] if i % 2 else [])
            target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
            self.items.append((image, target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def collate(samples):
    return tuple(zip(*samples, strict=True))  # torchvision's reference collate: (images, targets)


class Detector(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return sum(self.model(list(images), list(targets)).values())  # train mode: the losses

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_detector(**options) -> nn.Module:
    torch.manual_seed(0)
    settings = dict(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=64,
        box_score_thresh=0.0,
        box_detections_per_img=5,
        rpn_pre_nms_top_n_train=60,
        rpn_post_nms_top_n_train=30,
        rpn_pre_nms_top_n_test=60,
        rpn_post_nms_top_n_test=30,
        box_batch_size_per_image=32,
    )
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(**(settings | options))
    # BatchNorm statistics estimated on random images (the initial ones give every proposal the same score)
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.momentum = None  # a cumulative average over the estimation pass
            norm.reset_running_stats()
        model.backbone.train()
        model.backbone(model.transform(list(torch.rand(8, 3, 64, 64)))[0].tensors)
    for norm in norms:
        norm.momentum = 0.1
    return model.train()


def fit(tmp_path, callbacks, *, data=None, epochs=1, logger=True, **options):
    pl.seed_everything(7, verbose=False)
    data = Boxes() if data is None else data
    loader = DataLoader(data, batch_size=2, collate_fn=collate)
    log = TensorBoardLogger(str(tmp_path), name="det") if logger else False
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, logger=log, deterministic=True)
    module = Detector(make_detector(**options))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader, loader)
    events = read_events(log.log_dir) if logger else None
    return module, events, [str(w.message) for w in caught]


def box_union(boxes: torch.Tensor, size: int = 64) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.long().tolist():
        mask[y1:y2, x1:x2] = True
    return mask


def test_saliency_explains_the_top_detection_as_the_functional_api_and_draws_its_box(tmp_path):
    callback = SaliencyCallback(methods=("gradient",), num_samples=3)
    pictures = []
    callback._log_grids = lambda trainer, picture, step: pictures.append(picture)  # the picture drawn, kept
    module, events, _ = fit(tmp_path, [callback])
    assert callback.detection == DetectionTarget()
    probe = callback.probe
    data = Boxes()
    expected_masks = torch.stack([box_union(data[i][1]["boxes"]) for i in range(3)])
    assert probe.labels is None and torch.equal(probe.masks, expected_masks)  # ground-truth boxes as masks
    model = module.eval()
    target, transform = detection_target(model, probe.inputs)
    expected = gradient(model, probe.inputs, target, output_transform=transform).abs().sum(dim=1)
    maps = callback.last_maps["gradient"]
    assert maps.abs().sum() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-8)
    share = ((maps * expected_masks).flatten(1).sum(1) / maps.flatten(1).sum(1)).mean()
    assert events.scalars["interp_saliency/gradient/localization"][-1][1] == pytest.approx(float(share), rel=1e-4)
    assert all(math.isfinite(v) for _, v in events.scalars["interp_saliency/gradient/concentration"])
    # the picture: the explained box outlined, the detection beside the row
    picture = pictures[-1]
    assert torch.equal(picture.regions, transform.masks((64, 64)))
    labels, _, boxes, found = picture.detections
    assert torch.equal(labels, transform.labels) and torch.equal(boxes, transform.boxes) and bool(found.all())
    image = callback._grid_image(picture)
    plain = callback._grid_image(type(picture)(**{**vars(picture), "regions": None}))
    changed = (image[..., :3] != plain[..., :3]).any(axis=-1)
    assert (image[changed][:, :3] == OUTLINE).all()  # only the outline differs
    perimeter = int(sum(int((mask ^ _eroded(mask)).sum()) for mask in picture.regions))
    assert perimeter > 0 and int(changed.sum()) >= 2 * perimeter  # the box's border on the input and the map tiles


def _eroded(mask: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def test_grad_cam_on_a_named_layer_explains_the_top_detection_of_a_class(tmp_path):
    spec = DetectionTarget(label=2, include_box=True)
    callback = GradCAMCallback(layer="model.backbone.body.12", target=spec, num_samples=2)
    module, _, _ = fit(tmp_path, [callback], logger=False)
    model = module.eval()
    target, transform = spec.resolve(model, callback.probe.inputs)
    assert transform.labels.tolist() == [2, 2]
    expected = grad_cam(
        model, callback.probe.inputs, target, layer="model.backbone.body.12", output_transform=transform
    )
    maps = callback.last_maps["model.backbone.body.12"]
    assert maps.shape == (2, 64, 64) and maps.abs().sum() > 0
    torch.testing.assert_close(maps, expected.float(), rtol=1e-4, atol=1e-6)


class Snapshot(pl.Callback):
    """Records every module's mode flag and the BatchNorm statistics when validation ends."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, bool], dict[str, torch.Tensor]]] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        flags = {name: module.training for name, module in pl_module.named_modules()}
        buffers = {name: value.clone() for name, value in pl_module.named_buffers()}
        self.seen.append((flags, buffers))


def test_training_modes_and_batchnorm_statistics_are_untouched(tmp_path):
    before, after = Snapshot(), Snapshot()
    callbacks = [before, SaliencyCallback(methods=("gradient", "smoothgrad"), num_samples=2), after]
    with_callback, _, _ = fit(tmp_path / "with", callbacks, epochs=2, logger=False)
    without, _, _ = fit(tmp_path / "without", [], epochs=2, logger=False)
    assert len(before.seen) == len(after.seen) == 3  # the sanity check and two epochs
    for (flags, buffers), (flags_after, buffers_after) in zip(before.seen, after.seen, strict=True):
        assert flags == flags_after
        assert buffers.keys() == buffers_after.keys()
        assert all(torch.equal(buffers[key], buffers_after[key]) for key in buffers)
    trained, reference = with_callback.state_dict(), without.state_dict()
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[key], reference[key]) for key in trained)
    initial = Detector(make_detector()).state_dict()
    assert any(not torch.equal(trained[key], initial[key]) for key in trained)  # it trained


def test_what_is_not_supported_is_refused_before_training(tmp_path):
    steps = []

    class Counting(Detector):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    def run(callback, data=None):
        trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
        loader = DataLoader(Boxes() if data is None else data, batch_size=2, collate_fn=collate)
        trainer.fit(Counting(make_detector()), loader, loader)

    with pytest.raises(ValueError, match=r"different sizes.*Resize"):
        run(SaliencyCallback(methods=("gradient",), num_samples=2), Boxes(sizes=(64, 48)))
    with pytest.raises(ValueError, match=r"object detector, target='pred' \(the top detection\)"):
        run(SaliencyCallback(methods=("gradient",), target="label", num_samples=2))

    class Classifier(Detector):
        def forward(self, images):
            return images.flatten(1)[:, :3]

    callback = SaliencyCallback(methods=("gradient",), target=DetectionTarget(), num_samples=2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    loader = DataLoader(Boxes(), batch_size=2, collate_fn=collate)
    with pytest.raises(ValueError, match="explains an object detector"):
        trainer.fit(Classifier(make_detector()), loader, loader)
    assert steps == []


def test_images_without_a_detection_are_said_once_and_get_zero_maps(tmp_path):
    callback = SaliencyCallback(methods=("gradient",), num_samples=2)
    _, _, messages = fit(tmp_path, [callback], logger=False, box_score_thresh=0.999)
    said = [m for m in messages if "have no detection" in m]
    assert len(said) == 1 and "box_score_thresh" in said[0]
    assert torch.equal(callback.last_maps["gradient"], torch.zeros(2, 64, 64))
