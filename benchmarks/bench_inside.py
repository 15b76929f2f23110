"""Inside the network, and uncertainty: what one run of each of the activation-maps, feature-visualisation, concept,
MC-dropout and calibration callbacks costs.

Each callback runs at its defaults (feature visualisation and concepts with
``every_n_epochs=1`` here, so every validation is a run) in a real
``Trainer.fit`` of a few short epochs on random tensors of the dataset's
shape; its ``_run`` (the training-thread part of a validation epoch: forward
and backward passes, the maths, the hand-over of the pictures) is timed, on a
GPU with ``torch.cuda.synchronize()`` before and after. Reported: the median
over the second and later runs and the first run (which also pays one-time
costs such as choosing the channels to show). The drawing happens on the
background thread and is not counted: before each timed run the previous
run's drawing is let finish, as it would between the validations of real
epochs (these epochs are two batches long). Models: the quickstart's ``shapes_cnn``
(3 x 32 x 32, four classes) and ``cifar_resnet`` (3 x 32 x 32, ten classes); the MC-dropout and
calibration callbacks on ``mnist_cnn`` (1 x 28 x 28, ten classes, two dropout layers), the others having none.
The calibration callback's per-batch work (keeping the logits of the validation pass) is not in ``_run``; it is a
detach per batch.
There is no peer to compare with: no other tool runs these during training.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from _timing import markdown_table, synchronize
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import (
    ActivationMapsCallback,
    CalibrationCallback,
    ConceptCallback,
    FeatureVisualizationCallback,
    UncertaintyCallback,
)
from lightning_interp.callbacks._context import active_context
from lightning_interp.demo import ImageClassifier, cifar_resnet, mnist_cnn, shapes_cnn

MODELS = {  # name: (constructor, input shape, a middle layer for the concepts, or None: the dropout callbacks)
    "shapes_cnn (quickstart)": (lambda: shapes_cnn(num_classes=4), (3, 32, 32), "net.4"),
    "cifar_resnet": (lambda: cifar_resnet(num_classes=10), (3, 32, 32), "net.layer2"),
    "mnist_cnn (two dropout layers)": (lambda: mnist_cnn(num_classes=10), (1, 28, 28), None),
}
CONCEPT_EXAMPLES = 40  # per concept; two concepts


def _callbacks(layer: str | None, shape: tuple[int, ...]) -> dict[str, Callable[[], pl.Callback]]:
    if layer is None:  # a model with dropout: MC dropout and calibration
        return {
            "UncertaintyCallback()": lambda: UncertaintyCallback(),
            "UncertaintyCallback(methods='gradient')": lambda: UncertaintyCallback(methods="gradient"),
            "CalibrationCallback() (no forward; the rest of its work)": lambda: CalibrationCallback(),
        }
    generator = torch.Generator().manual_seed(1)
    concepts = {name: torch.rand(CONCEPT_EXAMPLES, *shape, generator=generator) for name in ("first", "second")}
    return {
        "ActivationMapsCallback()": lambda: ActivationMapsCallback(),
        "FeatureVisualizationCallback(every_n_epochs=1), default every 5": lambda: FeatureVisualizationCallback(
            every_n_epochs=1
        ),
        f"ConceptCallback(2 concepts x {CONCEPT_EXAMPLES}, layers=['{layer}'])": lambda: ConceptCallback(
            concepts, layers=[layer]
        ),
    }


def _timed_fit(
    make_net: Callable[[], torch.nn.Module], shape: tuple[int, ...], callback: pl.Callback, epochs: int, device: str
) -> list[float]:
    times: list[float] = []
    original = callback._run  # type: ignore[attr-defined]

    def timed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        context = active_context(trainer)
        if context is not None:  # these epochs are a few batches long: let the last run's drawing finish first
            context.worker.drain()
        synchronize()
        started = time.perf_counter()
        result = original(trainer, pl_module)
        synchronize()
        times.append(time.perf_counter() - started)
        return result

    callback._run = timed  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(256, *shape, generator=generator)
    model = ImageClassifier(make_net())
    classes = model.net(images[:1]).shape[1]
    labels = torch.randint(classes, (256,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)
    with tempfile.TemporaryDirectory() as directory:
        trainer = pl.Trainer(
            default_root_dir=directory,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=[callback],
            limit_train_batches=2,
            limit_val_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    return times


def run(quick: bool, device: str = "cpu") -> str:
    epochs = 2 if quick else 5
    rows: list[list[object]] = []
    for label, (make_net, shape, layer) in MODELS.items():
        for name, make in _callbacks(layer, shape).items():
            times = _timed_fit(make_net, shape, make(), epochs, device)
            later = times[1:] or times
            rows.append([label, name, 1000 * statistics.median(later), 1000 * times[0], len(times)])
    table = markdown_table(["model", "callback", "ms per run (median)", "first run ms", "runs"], rows)
    where = "GPU" if device == "cuda" else "CPU"
    return "\n".join(
        [
            f"## Inside the network: ms per run ({where})",
            "",
            "Training-thread time of one run of each callback at its defaults, in a real fit (see "
            "`benchmarks/bench_inside.py`); the pictures are drawn on the background thread. Feature visualisation "
            "and concepts run every `every_n_epochs` validations (defaults in the table's callback column).",
            "",
            table,
        ]
    )
