"""Train with all four callbacks under ``strategy="ddp"`` on 2 CPU processes; launched by ``test_distributed.py``.

Lightning's DDP strategy re-launches this very script for the other ranks (same command line, ``LOCAL_RANK``
set in the environment), so it has to run as a script of its own rather than inside pytest.

Usage: ``python tests/callbacks/ddp_run.py LOG_DIR OUT_DIR [DEVICES] [--monitor]``

``--monitor`` adds ``EarlyStopping`` and ``ModelCheckpoint`` monitoring an interp scalar (``MONITOR``), as the
docs say one can (docs/concepts/logging.md).

Every rank writes ``OUT_DIR/rank<global rank>.pt`` after ``fit`` with what the test checks: the run count and
probe tensors of each callback, the samplers Lightning put on the loaders, and the trainer's step arithmetic.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script: make ``tests.conftest`` importable whatever the caller's PYTHONPATH
    sys.path.insert(0, REPO)

CALLBACK_KEYS = ("saliency", "gradcam", "probe", "similarity")
MAX_EPOCHS = 2
MONITOR = "interp_probe/net.10/accuracy"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("log_dir")
    parser.add_argument("out_dir")
    parser.add_argument("devices", nargs="?", type=int, default=2)
    parser.add_argument("--monitor", action="store_true", help=f"EarlyStopping and ModelCheckpoint on {MONITOR}")
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DistributedSampler

    from lightning_interp import (
        GradCAMCallback,
        LinearProbeCallback,
        RepresentationSimilarityCallback,
        SaliencyCallback,
    )
    from tests.conftest import tiny_classifier, tiny_datamodule

    pl.seed_everything(0, workers=True, verbose=False)
    callbacks = {
        "saliency": SaliencyCallback(methods=("gradient", "smoothgrad", "integrated_gradients")),
        "gradcam": GradCAMCallback(),
        "probe": LinearProbeCallback(num_samples=32),
        "similarity": RepresentationSimilarityCallback(num_samples=32),
    }
    extra = []
    if args.monitor:
        extra = [
            EarlyStopping(monitor=MONITOR, mode="max", patience=MAX_EPOCHS + 1),
            ModelCheckpoint(monitor=MONITOR, mode="max"),
        ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=MAX_EPOCHS,
        callbacks=[*callbacks.values(), *extra],
        logger=TensorBoardLogger(args.log_dir, name="ddp"),
        default_root_dir=args.log_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())

    val_loader = trainer.val_dataloaders
    # The probes above were drawn at setup, from the datamodule's loader before Lightning put a DistributedSampler
    # on it. A callback that cannot draw at setup draws later from the loader the trainer actually validates
    # with (this rank's shard): draw that way too, so the test sees that it still gets the whole validation set.
    late = LinearProbeCallback(num_samples=32)
    late._ensure_ready(trainer, trainer.lightning_module)
    train_loader = trainer.train_dataloader
    report = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "is_global_zero": trainer.is_global_zero,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "max_epochs": MAX_EPOCHS,
        "num_training_batches": trainer.num_training_batches,
        "num_val_batches": list(trainer.num_val_batches),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "train_sampler": type(train_loader.sampler).__name__,
        "val_sampler": type(val_loader.sampler).__name__,
        "val_sampler_is_distributed": isinstance(val_loader.sampler, DistributedSampler),
        "val_indices": list(iter(val_loader.sampler)),
        "logger_version": trainer.logger.version,
        "interp_metrics": sorted(k for k in trainer.callback_metrics if k.startswith("interp_")),
        "runs": {key: cb._runs for key, cb in callbacks.items()},
        "num_samples": {key: cb.num_samples for key, cb in callbacks.items()},
        "late_probe": late.probe.state_dict(),
        "probes": {key: None if cb.probe is None else cb.probe.state_dict() for key, cb in callbacks.items()},
    }
    os.makedirs(args.out_dir, exist_ok=True)
    torch.save(report, os.path.join(args.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
