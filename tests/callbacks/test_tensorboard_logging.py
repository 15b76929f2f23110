"""Callbacks in a real Trainer, read back from the real TensorBoard event files."""

from __future__ import annotations

import math
import os
import re

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from lightning_interp import GradCAMCallback, ProbeSet, SaliencyCallback
from tests.conftest import quiet_trainer, read_events, read_scalar_layout, tiny_classifier, tiny_datamodule

STEPS_PER_EPOCH = 4  # 64 training images / batch 16


def test_fit_logs_images_and_scalars_at_each_validation_step(tmp_path):
    torch.manual_seed(0)
    saliency = SaliencyCallback(
        methods=("gradient", "input_x_gradient", "smoothgrad", ("integrated_gradients", {"n_steps": 8})), num_samples=4
    )
    gradcam = GradCAMCallback(layer=["net.4", "net.7"], num_samples=4)
    trainer = quiet_trainer(
        tmp_path, max_epochs=3, callbacks=[saliency, gradcam], logger=TensorBoardLogger(str(tmp_path), name="run")
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    events = read_events(str(tmp_path / "run"))
    # at the step of Lightning's own val_loss of the same validation (the batches that stepped so far, one behind
    # global_step at an end-of-epoch validation); the sanity check is skipped
    expected = [STEPS_PER_EPOCH * (epoch + 1) - 1 for epoch in range(3)]
    assert events.scalar_steps("val_loss") == expected
    fit_end = [expected[-1]]  # the evolution strips, with the last grid

    for part in ("rows_1-2", "rows_3-4"):  # the default, rows_per_image="auto": parts of two rows
        assert events.image_steps(f"interp_saliency/maps/{part}") == expected
        assert events.image_steps(f"interp_gradcam/maps/{part}") == expected
    assert "interp_saliency/maps" not in events.images
    for method in ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients"):
        assert events.scalar_steps(f"interp_saliency/{method}/concentration") == expected
        assert events.scalar_steps(f"interp_saliency/{method}/localization") == expected  # the data has masks
        assert events.scalar_steps(f"interp_saliency/{method}/pointing_game") == expected
        assert events.scalar_steps(f"interp_saliency/{method}/stability") == expected[1:]  # needs a previous map
        assert events.image_steps(f"interp_saliency/{method}/evolution") == fit_end
    for layer in ("net.4", "net.7"):
        assert events.scalar_steps(f"interp_gradcam/{layer}/localization") == expected
        assert events.image_steps(f"interp_gradcam/{layer}/evolution") == fit_end
    assert events.scalar_steps("interp_saliency/integrated_gradients/completeness_error") == expected

    # Scores lie in their mathematical ranges (NaN only where a map is all zero, e.g. a dead ReLU layer).
    for tag, values in events.scalars.items():
        finite = [v for _, v in values if not math.isnan(v)]
        assert finite, tag
        if tag.endswith(("/localization", "/pointing_game", "/concentration")):
            assert all(0.0 <= v <= 1.0 for v in finite), (tag, values)
        if tag.endswith("/stability"):
            assert all(-1.0 <= v <= 1.0 for v in finite), (tag, values)

    # A part has two rows and one column per map plus the input: it grows with the columns (the saliency grid's
    # long method names take two title lines), and a Time Series card (about 370 x 215 px) shows it at 0.7 or more.
    (_, (height, width)), *_ = events.images["interp_saliency/maps/rows_1-2"]
    (_, (cam_height, cam_width)), *_ = events.images["interp_gradcam/maps/rows_1-2"]
    assert width > cam_width and height >= cam_height
    assert min(370 / width, 215 / height) >= 0.7 and min(370 / cam_width, 215 / cam_height) >= 0.7
    # one size from epoch to epoch and part to part (the card does not jitter under TensorBoard's step slider)
    sizes = {size for part in ("rows_1-2", "rows_3-4") for _, size in events.images[f"interp_saliency/maps/{part}"]}
    assert len(sizes) == 1

    # The scalars are monitorable by EarlyStopping / ModelCheckpoint.
    assert "interp_gradcam/net.7/localization" in trainer.callback_metrics

    # TensorBoard groups cards by the first path segment: one group per callback
    assert {tag.split("/")[0] for tag in events.scalars if tag.startswith("interp")} == {
        "interp_saliency",
        "interp_gradcam",
    }
    # the custom-scalars layout: per callback and metric a category, in it one chart per method or layer, each with
    # exactly one tag (TensorBoard draws every line of a run in one colour: one line per chart tells them apart);
    # every tag logged has its chart, stability included (it starts at the second run)
    layout = read_scalar_layout(str(tmp_path / "run"))
    assert {category.split("/")[0] for category in layout} == {"interp_saliency", "interp_gradcam"}
    assert {"stability", "concentration", "localization", "pointing_game", "completeness_error"} <= {
        category.split("/")[1] for category in layout if category.startswith("interp_saliency/")
    }
    charted = []
    for category, by_title in layout.items():
        for title, patterns in by_title.items():
            matched = [tag for tag in events.scalars if any(re.match(p, tag) for p in patterns)]
            assert matched == [f"{category.split('/')[0]}/{title}/{category.split('/')[1]}"], (category, title)
            charted += matched
    assert sorted(charted) == sorted(tag for tag in events.scalars if tag.startswith("interp_"))
    assert len(layout["interp_saliency/concentration"]) == 4  # the four saliency methods, side by side


def test_validate_runs_under_inference_mode_and_logs(tmp_path):
    callbacks = [SaliencyCallback(methods=("gradient", "smoothgrad"), num_samples=4), GradCAMCallback(num_samples=4)]
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=TensorBoardLogger(str(tmp_path), name="val"))
    seen_inference_mode = []
    model = tiny_classifier()
    original = model.validation_step

    def spy(batch, batch_idx):
        seen_inference_mode.append(torch.is_inference_mode_enabled())
        return original(batch, batch_idx)

    model.validation_step = spy
    trainer.validate(model, datamodule=tiny_datamodule())
    assert seen_inference_mode and all(seen_inference_mode)
    events = read_events(str(tmp_path / "val"))
    assert events.image_steps("interp_saliency/maps/rows_1-2") == [0]
    assert events.image_steps("interp_gradcam/maps/rows_1-2") == [0]
    assert events.scalar_steps("interp_gradcam/net.7/concentration") == [0]


def test_every_n_epochs_and_shared_probe(tmp_path):
    images = torch.rand(6, 3, 16, 16)
    probe = ProbeSet(images, labels=torch.tensor([0, 1, 2, 3, 0, 1]))
    saliency = SaliencyCallback(methods=("gradient",), probe=probe, every_n_epochs=2)
    gradcam = GradCAMCallback(probe=probe, every_n_epochs=2)
    trainer = quiet_trainer(
        tmp_path, max_epochs=4, callbacks=[saliency, gradcam], logger=TensorBoardLogger(str(tmp_path), name="n")
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    events = read_events(str(tmp_path / "n"))
    assert events.image_steps("interp_saliency/maps/rows_1-2") == [2 * STEPS_PER_EPOCH - 1, 4 * STEPS_PER_EPOCH - 1]
    assert events.image_steps("interp_gradcam/maps/rows_5-6") == [2 * STEPS_PER_EPOCH - 1, 4 * STEPS_PER_EPOCH - 1]
    assert saliency.probe is probe and gradcam.probe is probe
    # No masks in this probe: no localization scores.
    assert not any(tag.endswith("/localization") for tag in events.scalars)


def test_without_logger_pngs_are_written_under_the_run_directory(tmp_path):
    callback = GradCAMCallback(num_samples=4, name="cam")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    folder = tmp_path / "interp_images"
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert f"interp_cam__maps__rows_1-2{os.sep}step_0000003.png" in written  # the default: parts of two rows
    assert any("evolution" in name for name in written)


def test_logger_without_image_api_gets_pngs_and_scalars(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[SaliencyCallback(num_samples=4)], logger=logger)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    pngs = list((tmp_path / "csv").rglob("*.png"))
    assert pngs, "expected PNG files next to the CSV logs"
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "interp_saliency/gradient/concentration" in metrics


class RecordingLogger(Logger):
    """A logger with its own image API, like Weights & Biases' ``log_image``."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, int, tuple[int, ...]]] = []
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None) -> None:
        self.images.extend((key, step, image.shape) for image in images)


def test_logger_with_its_own_image_api_receives_the_images(tmp_path):
    logger = RecordingLogger()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[GradCAMCallback(num_samples=4)], logger=logger)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    keys = [(key, step) for key, step, _ in logger.images]
    assert ("interp_gradcam/maps/rows_1-2", STEPS_PER_EPOCH - 1) in keys  # Lightning's step of the validation
    assert ("interp_gradcam/net.7/evolution", STEPS_PER_EPOCH - 1) in keys
    assert all(len(shape) == 3 and shape[2] == 3 for _, _, shape in logger.images)
    assert not list(tmp_path.rglob("*.png")), "a logger with an image API gets no PNG files"
    assert any("interp_gradcam/net.7/concentration" in m for _, m in logger.metrics)
