"""Shared fixtures: tiny models and data, and a reader for real TensorBoard event files."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.synthetic import SyntheticShapesDataModule


@dataclass
class Events:
    """What a TensorBoard run directory holds: tag -> [(step, value)] and tag -> [(step, (h, w))]."""

    scalars: dict[str, list[tuple[int, float]]]
    images: dict[str, list[tuple[int, tuple[int, int]]]]

    def scalar_steps(self, tag: str) -> list[int]:
        return [step for step, _ in self.scalars.get(tag, [])]

    def image_steps(self, tag: str) -> list[int]:
        return [step for step, _ in self.images.get(tag, [])]


def read_events(log_dir: str) -> Events:
    """Read every event file under ``log_dir`` with tensorboard's own reader."""
    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event files under {log_dir}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    images: dict[str, list[tuple[int, tuple[int, int]]]] = {}
    for directory in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(directory, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend((e.step, (e.height, e.width)) for e in acc.Images(tag))
    return Events(scalars, images)


def read_scalar_layout(log_dir: str) -> dict[str, dict[str, list[str]]]:
    """The newest custom-scalars layout under ``log_dir`` (TensorBoard's own proto): category -> chart title ->
    regexes."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    for directory in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(directory, size_guidance={"tensors": 0})
        acc.Reload()
        if metadata.CONFIG_SUMMARY_TAG not in acc.Tags()["tensors"]:
            continue
        events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
        steps = [event.step for event in events]
        assert steps == sorted(set(steps)), "a layout is written again only at a later step"
        layout = layout_pb2.Layout()  # the newest: the one TensorBoard shows
        layout.ParseFromString(events[-1].tensor_proto.string_val[0])
        return {
            category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
            for category in layout.category
        }
    return {}


def read_image_bytes(log_dir: str) -> dict[str, list[tuple[int, bytes]]]:
    """Every image of every event file under ``log_dir``: tag -> [(step, encoded PNG bytes)]."""
    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event files under {log_dir}"
    images: dict[str, list[tuple[int, bytes]]] = {}
    for directory in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(directory, size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend((e.step, e.encoded_image_string) for e in acc.Images(tag))
    return images


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a test module (depthwise convolutions are slow on a busy CPU with several threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def events_reader():
    return read_events


@pytest.fixture(autouse=True)
def _restore_deterministic_algorithms():
    """``Trainer(deterministic=True)`` turns on torch's deterministic algorithms for the whole process and leaves them
    on: a later test's peer library (Captum's DeepLIFT calls ``max_unpool2d``, which has no deterministic mode) would
    then fail for a reason of test order. Every test starts from the setting the one before it found."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _restore_environment():
    """``seed_everything`` leaves ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS`` in ``os.environ``, and Lightning reads
    them back (strategies re-seed from the first, data loaders seed their workers by the second); its launchers set
    ``MASTER_PORT`` and the like. Every test starts from the environment the one before it found."""
    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before) - {"PYTEST_CURRENT_TEST"}:  # (pytest's own, set at each phase)
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value and name != "PYTEST_CURRENT_TEST":
            os.environ[name] = value


def tiny_datamodule(**overrides) -> SyntheticShapesDataModule:
    options = {"train_size": 64, "val_size": 32, "batch_size": 16, "image_size": 16, "seed": 0}
    options.update(overrides)
    return SyntheticShapesDataModule(**options)


def tiny_classifier(width: int = 4) -> ImageClassifier:
    return ImageClassifier(shapes_cnn(num_classes=4, width=width), lr=1e-2)


class BatchNormDropoutNet(nn.Module):
    """Conv net with BatchNorm, Dropout and an in-place ReLU: the layers that make interference visible."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NetClassifier(pl.LightningModule):
    """Any network on (x, y) batches: cross-entropy, or BCE for a single logit; SGD; logs ``val_loss``."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch[0], batch[1]
        out = self(x)
        if out.shape[-1] == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float())
        return torch.nn.functional.cross_entropy(out, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def quiet_trainer(tmp_path, **overrides) -> pl.Trainer:
    options = {
        "default_root_dir": str(tmp_path),
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
    }
    options.update(overrides)
    return pl.Trainer(**options)


def train_with(tmp_path, callbacks, *, frozen: bool = False, num_workers: int = 0, **trainer_options):
    """Fit the BatchNorm / Dropout / in-place-ReLU net from one seed; return (weights, optimizer state, global RNG).

    ``frozen``: the first block frozen and kept in eval mode, as users freeze backbones."""
    pl.seed_everything(123, verbose=False)
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)
    if frozen:
        model.net.features[:3].requires_grad_(False)
        model.on_train_epoch_start = lambda: model.net.features[:3].eval()
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=False, deterministic=True, **trainer_options)
    trainer.fit(model, datamodule=tiny_datamodule(num_workers=num_workers))
    return model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state()


def assert_training_identical(plain, other) -> None:
    """Two results of :func:`train_with`: bit-identical weights (BatchNorm statistics included), optimizer state and
    global RNG."""
    plain_weights, plain_optimizer, plain_rng = plain
    weights, optimizer, rng = other
    assert plain_weights.keys() == weights.keys()
    for name, value in plain_weights.items():
        assert torch.equal(value, weights[name]), f"{name} differs"
    for key, state in plain_optimizer["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer["state"][key][field])), (key, field)
    assert torch.equal(plain_rng, rng), "the global RNG advanced differently"
