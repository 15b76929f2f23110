"""Probe sets drawn from what the trainer validates on, in real Trainers, and fresh state for every fit.

A user's validation split (a sampler over the full dataset), a class-sorted folder of images, a one-shot stream,
``limit_val_batches``: the probe samples must come from exactly the samples the trainer validates on, stratified
over all of them, reading as little as possible; and a callback reused in a new ``fit`` must not compare the new
model with the old one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imsave
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SubsetRandomSampler

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.synthetic import SyntheticShapes
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def _train_loader():
    module = tiny_datamodule()
    module.setup("fit")
    return module.train_dataloader()


def _four(**sizes):
    return [
        SaliencyCallback(methods=("gradient",), num_samples=sizes.get("maps", 4)),
        GradCAMCallback(num_samples=sizes.get("maps", 4)),
        LinearProbeCallback(num_samples=sizes.get("probe", 16)),
        RepresentationSimilarityCallback(num_samples=sizes.get("similarity", 8)),
    ]


def test_a_sampler_validation_split_is_honoured_by_every_callback(tmp_path):
    data = SyntheticShapes(96, image_size=16, seed=0)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(1)).tolist()
    train_idx, val_idx = order[:64], order[64:]
    train = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(train_idx))
    val = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(val_idx))
    callbacks = _four()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=False)
    trainer.fit(tiny_classifier(), train, val)
    for callback in callbacks:
        indices = callback.probe.indices.tolist()
        assert set(indices) <= set(val_idx), f"{type(callback).__name__} drew training samples"
        assert torch.equal(callback.probe.inputs, data.images[indices]), "each input is that dataset sample"
        assert callback._runs == 1


def _write_image_folder(root, classes: int = 10, per_class: int = 30) -> None:
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.random((8, 8, 3)) * 0.5
            pixels[..., label % 3] += 0.4  # a little class signal
            imsave(folder / f"{index:03d}.png", np.clip(pixels, 0, 1))


def test_a_class_sorted_image_folder_gives_every_class(tmp_path):
    _write_image_folder(tmp_path / "val")
    folder = torchvision.datasets.ImageFolder(
        str(tmp_path / "val"), transform=torchvision.transforms.Compose([torchvision.transforms.ToTensor()])
    )
    assert folder.targets[:31] == [0] * 30 + [1], "sorted by class, as ImageFolder lists them"
    loader = DataLoader(folder, batch_size=32)
    callbacks = [GradCAMCallback(num_samples=10), LinearProbeCallback(num_samples=40)]
    model = ImageClassifier(shapes_cnn(num_classes=10, width=4), lr=1e-2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=callbacks, logger=False)
    trainer.fit(model, loader, loader)
    assert sorted(callbacks[0].probe.labels.tolist()) == list(range(10))
    assert torch.bincount(callbacks[1].probe.labels, minlength=10).tolist() == [4] * 10
    assert set(callbacks[0].probe.indices.tolist()) <= set(callbacks[1].probe.indices.tolist()), "nested draws"


class OneShotStream(IterableDataset):
    """Yields its samples on the first iteration only, as a network stream or a generator would."""

    def __init__(self, count: int = 48) -> None:
        self.images, self.labels, self.masks = SyntheticShapes(count, image_size=16, seed=3)[:]
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        if self.iterations > 1:
            return iter(())
        return iter(zip(self.images, self.labels, strict=True))


class CountValidation(Callback):
    def __init__(self) -> None:
        self.samples = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.samples += batch[0].shape[0]


def test_a_one_shot_stream_is_never_consumed_by_the_callbacks(tmp_path):
    stream = OneShotStream()
    counter = CountValidation()
    callbacks = [GradCAMCallback(num_samples=4), LinearProbeCallback(num_samples=16)]
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, num_sanity_val_steps=0, callbacks=[*callbacks, counter], logger=False
    )
    trainer.fit(tiny_classifier(), _train_loader(), DataLoader(stream, batch_size=8))
    assert stream.iterations == 1, "only the trainer iterated the stream"
    assert counter.samples == 48, "the trainer's validation saw every sample"
    assert "val_loss" in trainer.callback_metrics
    assert all(callback._runs == 1 for callback in callbacks), "the probe came from the batches the trainer loaded"
    assert callbacks[0].probe.indices is None and len(callbacks[1].probe) == 16


class CountedShapes(Dataset):
    """Synthetic shapes that count every sample read; optionally without a label list."""

    def __init__(self, count: int, listed: bool) -> None:
        self.images, labels, self.masks = SyntheticShapes(count, image_size=16, seed=4)[:]
        self._labels = labels
        if listed:
            self.targets = labels.tolist()
        self.reads = 0

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int):
        self.reads += 1
        return self.images[index], self._labels[index], self.masks[index]


class ReadsBeforeValidation(Callback):
    """Listed last: how many samples were read by the time the callbacks are ready (before any validation)."""

    def __init__(self, dataset: CountedShapes) -> None:
        self.dataset = dataset
        self.reads = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        self.reads = self.dataset.reads


@pytest.mark.parametrize("listed", [True, False], ids=["label-list", "no-label-list"])
def test_the_four_callbacks_at_defaults_read_the_validation_set_at_most_once(tmp_path, listed):
    dataset = CountedShapes(1200, listed=listed)
    reads = ReadsBeforeValidation(dataset)
    callbacks = [SaliencyCallback(), GradCAMCallback(), LinearProbeCallback(), RepresentationSimilarityCallback()]
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, callbacks=[*callbacks, reads],
        logger=False,
    )  # fmt: skip
    trainer.fit(tiny_classifier(), _train_loader(), DataLoader(dataset, batch_size=100))
    if listed:
        assert reads.reads == 1024, "with a label list only the chosen samples are read (the largest draw)"
    else:
        assert reads.reads == 1200, "one pass for the labels, and the chosen samples come from it"
    assert callbacks[0].probe is callbacks[1].probe, "equal draws are one probe set"
    assert set(callbacks[3].probe.indices.tolist()) <= set(callbacks[2].probe.indices.tolist())


def test_limit_val_batches_bounds_the_candidates(tmp_path):
    callbacks = _four(probe=8, similarity=8)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=1, callbacks=callbacks, logger=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())  # validation batches of 16
    for callback in callbacks:
        assert callback.probe.indices.max() < 16, type(callback).__name__


def test_callbacks_reused_in_a_new_fit_start_clean(tmp_path):
    saliency = SaliencyCallback(methods=("gradient",), num_samples=4)
    gradcam = GradCAMCallback(num_samples=4)
    similarity = RepresentationSimilarityCallback(num_samples=16, metrics=("cka",))
    callbacks = [saliency, gradcam, similarity]
    first = quiet_trainer(tmp_path, max_epochs=2, callbacks=callbacks, logger=False)
    first.fit(tiny_classifier(), datamodule=tiny_datamodule(image_size=16))
    first_probe, first_runs = saliency.probe, saliency._runs
    assert first_runs == 2

    second = quiet_trainer(
        tmp_path, max_epochs=2, callbacks=callbacks, logger=TensorBoardLogger(str(tmp_path), name="second")
    )
    second.fit(tiny_classifier(), datamodule=tiny_datamodule(image_size=24, seed=9))
    assert saliency.probe is not first_probe and saliency.probe.inputs.shape[-1] == 24, "the new fit's data"
    assert saliency._runs == 2 and gradcam._runs == 2
    events = read_events(str(tmp_path / "second"))
    # nothing of the first fit is compared with: stability and cka_vs_previous start at the second validation
    assert events.scalar_steps("interp_saliency/gradient/stability") == [7]
    assert events.scalar_steps("interp_gradcam/net.7/stability") == [7]
    assert events.scalar_steps("interp_similarity/net.10/cka_vs_previous") == [7]
    assert [epoch for epoch, _ in gradcam._history] == [0, 1], "the evolution strip shows this fit only"
    assert all(maps.shape[-1] == 24 for maps in gradcam._previous.values())


def test_validate_after_fit_draws_from_the_data_it_validates_and_rechooses_automatic_layers(tmp_path):
    gradcam, probe = GradCAMCallback(num_samples=4), LinearProbeCallback(num_samples=16)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[gradcam, probe], logger=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    fit_inputs = gradcam.probe.inputs.clone()

    other = tiny_datamodule(seed=9)
    other.setup("validate")
    wider = ImageClassifier(shapes_cnn(num_classes=4, width=4)[:6].append(nn.Flatten()).append(nn.LazyLinear(4)))
    wider(torch.zeros(1, 3, 16, 16))  # a different architecture: its automatic layers differ
    trainer = quiet_trainer(tmp_path, callbacks=[gradcam, probe], logger=False)
    trainer.validate(wider, dataloaders=other.val_dataloader())
    assert not torch.equal(gradcam.probe.inputs, fit_inputs), "explains the data it validates, not the fit's"
    indices = gradcam.probe.indices.tolist()
    assert torch.equal(gradcam.probe.inputs, other.val_set.images[indices])
    assert probe.layers == ["net.0", "net.3", "net.7"] and probe._runs == 1


class LabelledStream(IterableDataset):
    def __init__(self, count: int = 64) -> None:
        self.images = torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        self.labels = torch.arange(count) % 4

    def __iter__(self):
        return iter(zip(self.images, self.labels, strict=True))


class StreamSpy(Callback):
    def __init__(self) -> None:
        self.kept: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from lightning_interp.callbacks._context import active_context

        self.kept.append(len(active_context(trainer).stream))


def test_a_stream_checked_in_the_sanity_check_then_drawn_in_full_and_its_batches_released(tmp_path):
    # the sanity check sees 2 batches of 2 (4 samples): enough to check the model, not to draw 16 probe samples
    probe = LinearProbeCallback(num_samples=16)
    spy = StreamSpy()
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[probe, spy], logger=False)
    trainer.fit(tiny_classifier(), _train_loader(), DataLoader(LabelledStream(), batch_size=2))
    assert probe._runs == 2
    assert torch.bincount(probe.probe.labels).tolist() == [4, 4, 4, 4], "the full probe, not the sanity check's"
    rows = probe.probe.inputs.reshape(16, -1)
    assert torch.unique(rows, dim=0).shape[0] == 16, "a re-iterable stream's sanity batches are not counted twice"
    assert spy.kept[-1] == 0, "the kept stream batches are released once every callback has its probe"


def test_resuming_with_a_new_validation_split_of_the_same_files_is_reported(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = SyntheticShapes(96, image_size=16, seed=0)
    train = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(list(range(64))))

    def validation(indices):
        return DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(indices))

    first = GradCAMCallback(num_samples=8)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True)
    trainer.fit(tiny_classifier(), train, validation(list(range(64, 96))))

    resumed = GradCAMCallback(num_samples=8)
    new_split = list(range(32))  # the same files; the old validation samples are training samples now
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[resumed], logger=False)
    with pytest.warns(UserWarning, match="no longer among those the trainer validates on"):
        trainer.fit(tiny_classifier(), train, validation(new_split), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert set(resumed.probe.indices.tolist()) <= set(new_split)


def test_concept_callback_on_a_stream_waits_for_the_full_probe_before_sizing_its_random_sets(tmp_path):
    """The sanity check sees 4 stream samples, too few for 2 x 2 disjoint random sets of 5; the probe drawn later
    holds 32, which is enough: the fit must not stop at the sanity check."""
    from lightning_interp import CAVOptions, ConceptCallback, TCAVTest

    concept = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    callback = ConceptCallback(
        {"noise": concept}, layers=["net.4"], test=TCAVTest(n_random=2), cav=CAVOptions(min_accuracy=0), num_samples=32
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(tiny_classifier(), _train_loader(), DataLoader(LabelledStream(), batch_size=2))
    assert callback._runs == 1 and len(callback.probe) == 32
    assert callback._random_sets.shape == (4, 8) and callback._random_sets.unique().numel() == 32
