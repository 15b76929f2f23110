"""A hundred validation epochs: no hooks left, bounded state, bounded memory."""

from __future__ import annotations

import gc
import os

import matplotlib.pyplot as plt
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import (
    Display,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule

EPOCHS = 100


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryRecorder(Callback):
    def __init__(self) -> None:
        self.resident: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        gc.collect()
        self.resident.append(resident_mib())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_hundred_validation_epochs_leave_no_hooks_and_bounded_memory(tmp_path):
    saliency = SaliencyCallback(
        methods=("gradient", ("smoothgrad", {"n_samples": 4}), ("integrated_gradients", {"n_steps": 4})),
        num_samples=4,
        display=Display(evolution_columns=10),
    )
    gradcam = GradCAMCallback(layer=["net.4", "net.7"], num_samples=4)
    probe = LinearProbeCallback(num_samples=16)  # limit_val_batches=1: one batch of 16 is all it validates on
    similarity = RepresentationSimilarityCallback(num_samples=16)
    recorder = MemoryRecorder()
    model = tiny_classifier()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=EPOCHS,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[saliency, gradcam, probe, similarity, recorder],
        logger=TensorBoardLogger(str(tmp_path)),
    )
    trainer.fit(model, datamodule=tiny_datamodule())

    assert all(callback._runs == EPOCHS for callback in (saliency, gradcam, probe, similarity))
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    # State stays bounded: the evolution history is thinned, "previous" holds one entry per map.
    for callback in (saliency, gradcam):
        assert len(callback._history) <= 2 * callback.evolution_columns + 1
        epochs = [epoch for epoch, _ in callback._history]
        assert epochs[0] == 0 and epochs[-1] == EPOCHS - 1 and epochs == sorted(epochs)
    assert len(saliency._previous) == 3 and len(gradcam._previous) == 2
    assert plt.get_fignums() == [], "no pyplot figure may stay open"

    # Resident memory after warm-up grows by less than 40 MiB over 80 epochs (an unbounded list of maps,
    # features or figures would grow every epoch).
    growth = recorder.resident[-1] - recorder.resident[19]
    print(f"resident memory: epoch 20 {recorder.resident[19]:.1f} MiB, epoch {EPOCHS} {recorder.resident[-1]:.1f} MiB")
    assert growth < 40, recorder.resident[19::10]

    events = read_events(str(tmp_path))
    assert len(events.image_steps("interp_saliency/maps/rows_1-2")) == EPOCHS
    evolution = events.images["interp_gradcam/net.7/evolution"]
    assert len(evolution) == 1
