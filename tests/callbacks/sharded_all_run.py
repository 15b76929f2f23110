"""Train a tiny hybrid CNN-attention classifier on 2 CPU processes under DDP, FSDP2, FSDP1 or ZeRO-3, with or without
the callbacks that issue 29 brought to sharded strategies; launched by ``test_sharded_all_callbacks.py``.

FSDP2 is ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` applied in
``configure_model()``; it runs on the CPU as is. FSDP1 and ZeRO-3 run through the CPU subclasses of
``sharded_run.py``. Lightning re-launches this script for rank 1, as under DDP.

One model serves every callback, so that one run covers them all (CI time): a convolutional stem (activation maps,
feature visualisation, Grad-CAM layers, concept activations), one transformer encoder layer over the stem's 4 x 4 grid
of positions (AttentionCallback lays its maps on that grid), and dropout before the head (UncertaintyCallback's Monte
Carlo dropout).

Usage: ``python tests/callbacks/sharded_all_run.py {ddp,fsdp2,fsdp1,deepspeed3} OUT_DIR [--no-callbacks] [--then
[STRATEGY] [--no-callbacks]]...`` (``--then``: one more run in the same two processes, its reports in
``OUT_DIR/then<i>``, as in ``sharded_run.py``).

Every rank writes ``OUT_DIR/rank<global rank>.pt``: the final weights (whole tensors), the interp scalars after each
validation epoch, the run counts, the probe inputs, whether the parameters were sharded, and the wall time of the fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script: make ``tests.conftest`` importable whatever the caller's PYTHONPATH
    sys.path.insert(0, REPO)

from tests.callbacks.sharded_run import run_plan  # noqa: E402 (after the path set-up)

MAX_EPOCHS = 2
PG_TIMEOUT_S = 90  # a collective that waits longer fails the run instead of stalling it
CALLBACK_KEYS = (
    "activations",
    "attention",
    "calibration",
    "concept",
    "bias",
    "quality",
    "features",
    "uncertainty",
)
"""The callbacks of the run, by the ``name=`` each is given (its scalars are ``interp_<key>/...``)."""


def hybrid_net(num_classes: int = 4, width: int = 8):
    """A convolutional stem, one transformer encoder layer over its grid of positions, dropout and a linear head."""
    import torch
    from torch import nn

    class HybridNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.attn = nn.TransformerEncoderLayer(2 * width, 2, 4 * width, dropout=0.0, batch_first=True)
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, h * w, C): one token per position of the grid
            return self.head(self.attn(tokens).mean(dim=1))

    return HybridNet()


def stripes(count: int = 10, size: int = 16):
    """Concept examples: horizontal stripes of random phase and colour (a fixed generator: the same on every rank)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    rows = torch.arange(size).reshape(1, 1, size, 1)
    phase = torch.randint(0, 4, (count, 1, 1, 1), generator=generator)
    colour = torch.rand(count, 3, 1, 1, generator=generator)
    return (((rows + phase) // 2) % 2 * colour).expand(count, 3, size, size).contiguous()


def make_callbacks() -> dict:
    from lightning_interp import (
        ActivationMapsCallback,
        AttentionCallback,
        CalibrationCallback,
        ConceptCallback,
        DatasetBiasCallback,
        ExplanationQualityCallback,
        FeatureVisualizationCallback,
        TCAVTest,
        UncertaintyCallback,
    )

    quality_metrics = {
        "deletion": {"steps": 4},
        "insertion": {"steps": 4},
        "top_drop": None,
        "sanity": None,  # the maps of the untrained network, taken at train start (every rank joins those passes)
        "sparseness": None,
        "localization": None,
        "robustness": {"samples": 2},  # noise from the callback's generator: the same draws on every rank
    }
    cam = ("grad_cam", {"layer": "net.stem.3"})  # the stem's last convolution: a (B, C, H, W) map, named
    return {
        "activations": ActivationMapsCallback(num_samples=4, name="activations"),
        "attention": AttentionCallback(num_samples=4, name="attention"),
        "calibration": CalibrationCallback(n_bins=5, name="calibration"),
        "concept": ConceptCallback(
            {"stripes": stripes()}, layers=["net.stem.3"], num_samples=24, test=TCAVTest(n_random=2), name="concept"
        ),
        "bias": DatasetBiasCallback(methods=[cam], num_samples=16, name="bias"),
        "quality": ExplanationQualityCallback(
            methods=["gradient", cam], num_samples=8, metrics=quality_metrics, name="quality"
        ),
        "features": FeatureVisualizationCallback(steps=4, max_classes=2, every_n_epochs=1, name="features"),
        "uncertainty": UncertaintyCallback(
            passes=4, num_samples=8, methods=("gradient",), explain_samples=2, name="uncertainty"
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("strategy", choices=("ddp", "fsdp2", "fsdp1", "deepspeed3"))
    parser.add_argument("out_dir")
    parser.add_argument("--no-callbacks", action="store_true")
    plan = run_plan(parser, sys.argv[1:] if argv is None else argv)  # each run's flags and report directory

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lightning_interp.demo import ImageClassifier
    from tests.callbacks.sharded_run import cpu_deepspeed_strategy, cpu_fsdp_strategy, whole_weights
    from tests.conftest import tiny_datamodule

    class ShardedClassifier(ImageClassifier):
        """The hybrid classifier with every layer that has parameters, and the network, under ``fully_shard``."""

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net.stem[0], self.net.stem[3], self.net.attn, self.net.head[1]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    class Recorder(pl.Callback):
        """The interp scalars of each validation epoch (after the callbacks logged them)."""

        def __init__(self) -> None:
            self.scalars: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                metrics = trainer.callback_metrics
                self.scalars.append({k: float(v) for k, v in sorted(metrics.items()) if k.startswith("interp_")})

    def fit(args: argparse.Namespace, out_dir: str) -> None:
        """One training run from seed 0 with ``args``' flags; each rank writes ``out_dir/rank<r>.pt``."""
        pl.seed_everything(0, workers=True, verbose=False)
        callbacks = {} if args.no_callbacks else make_callbacks()
        recorder = Recorder()
        timeout = timedelta(seconds=PG_TIMEOUT_S)
        model_type = ImageClassifier
        if args.strategy == "ddp":
            strategy = DDPStrategy(timeout=timeout)
        elif args.strategy == "fsdp2":
            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timeout)
            model_type = ShardedClassifier
        elif args.strategy == "fsdp1":  # the convolutions and the encoder layer as units (not its attention's out_proj,
            # a Linear whose weight MultiheadAttention reads without calling it), the head with the root
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            units = ModuleWrapPolicy({torch.nn.Conv2d, torch.nn.TransformerEncoderLayer})
            strategy = cpu_fsdp_strategy()(auto_wrap_policy=units, timeout=timeout)
        else:  # ZeRO-3, every parameter partitioned however small
            strategy = cpu_deepspeed_strategy()(stage=3, timeout=timeout)
            strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        model = model_type(hybrid_net(), lr=1e-2)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_epochs=MAX_EPOCHS,
            callbacks=[*callbacks.values(), recorder],
            logger=False,
            enable_checkpointing=False,
            default_root_dir=out_dir,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=tiny_datamodule())
        seconds = time.perf_counter() - start
        parameters = list(trainer.lightning_module.parameters())
        sharded = any(hasattr(p, "full_tensor") or hasattr(p, "ds_tensor") for p in parameters)  # FSDP2, ZeRO-3
        sharded = sharded or args.strategy == "fsdp1"  # (FSDP1's flat shards show as views: the strategy says it)
        weights = whole_weights(trainer, args.strategy)
        report = {
            "global_rank": trainer.global_rank,
            "sharded": sharded,  # the parameters are shards (FSDP2's DTensors, ZeRO-3's partitions, FSDP1), not whole
            "weights": weights,
            "scalars": recorder.scalars,
            "runs": {key: cb._runs for key, cb in callbacks.items()},
            "probes": {key: None if cb.probe is None else cb.probe.inputs.clone() for key, cb in callbacks.items()},
            "fit_seconds": seconds,
        }
        os.makedirs(out_dir, exist_ok=True)
        torch.save(report, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))

    for args, out_dir in plan:
        fit(args, out_dir)
    if torch.distributed.is_initialized():  # both ranks done: close the group before the interpreter exits
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
