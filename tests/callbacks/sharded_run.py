"""Train the tiny CNN on 2 CPU processes under DDP, FSDP2, FSDP1 or DeepSpeed (ZeRO stage 2 or 3), with or without
the four core callbacks; launched by ``test_sharded.py``. Lightning re-launches this script for rank 1.

- ``fsdp2``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` applied in
  ``configure_model()``; it runs on the CPU as is.
- ``fsdp1``: ``FSDPStrategy`` with the convolutions wrapped as FSDP units of their own (the linear layer's parameters
  stay with the root). Lightning refuses FSDP on a CPU and FSDP1 needs a device: a subclass (test scaffolding; the
  library recognises it as the ``FSDPStrategy`` it is) wraps with ``device_id=torch.device("cpu")``.
- ``deepspeed2`` / ``deepspeed3``: ``DeepSpeedStrategy`` at ZeRO stage 2 / 3, through a subclass that skips its
  CUDA-only environment checks; stage 3 with ``stage3_param_persistence_threshold=0`` (otherwise a model this small
  is not partitioned at all).

Usage: ``python tests/callbacks/sharded_run.py STRATEGY OUT_DIR [FLAGS] [--then [STRATEGY] [FLAGS]]...`` with FLAGS
among ``--no-callbacks``, ``--fail-rank R``, ``--tp2``, ``--window``, ``--accumulate``, ``--checkpointing``.

- ``--then``: one more run after the previous one, in the same two processes, each from seed 0, under its own
  strategy or the one before, its reports in ``OUT_DIR/then<i>`` (the i-th ``--then``). Starting the processes
  (two interpreters importing torch and Lightning, the rendezvous) costs more than these tiny runs: a test module
  launches once.
- ``--no-callbacks``: the reference run (training alone).
- ``--fail-rank R``: the saliency pass raises inside its backward on rank R (-1: every rank) at the first validation
  epoch; a wrapper catches what the callback re-raises, so training goes on and its weights can be compared.
- ``--tp2``: ``tensor_parallel_size=2``, which the callbacks refuse before training.
- ``--accumulate``: ``accumulate_grad_batches=2`` with a validation after every batch: the callbacks' passes come
  between the two micro-batches of each accumulation, and after it.
- ``--checkpointing``: the second convolution under activation checkpointing (``checkpoint_wrapper``).
- ``--window``: ``UnshardedWindow()`` among the callbacks (FSDP2: rank zero explains the whole model alone at each
  run), and Grad-CAM with ``cam`` too, which reads the classifier's weights.

Every rank writes ``OUT_DIR/rank<global rank>.pt``: the final weights (whole tensors), the interp scalars after each
validation epoch, the collectives the callbacks' epoch-end work called at each validation, the run counts, the probe
inputs, and the errors the callbacks raised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from typing import ClassVar

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script: make ``tests.conftest`` importable whatever the caller's PYTHONPATH
    sys.path.insert(0, REPO)

MAX_EPOCHS = 2
PG_TIMEOUT_S = 90  # a collective that waits longer fails the run instead of stalling it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("strategy", choices=("ddp", "fsdp2", "fsdp1", "deepspeed2", "deepspeed3"))
    parser.add_argument("out_dir")
    parser.add_argument("--no-callbacks", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--tp2", action="store_true")
    parser.add_argument("--window", action="store_true")
    parser.add_argument("--accumulate", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    plan = run_plan(parser, sys.argv[1:] if argv is None else argv)  # each run's flags and report directory

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from lightning_interp import (
        GradCAMCallback,
        LinearProbeCallback,
        RepresentationSimilarityCallback,
        SaliencyCallback,
        UnshardedWindow,
    )
    from lightning_interp.demo import ImageClassifier, shapes_cnn
    from tests.callbacks.collectives import Counter
    from tests.conftest import tiny_datamodule

    class InjectedError(RuntimeError):
        pass

    class FailingSaliency(SaliencyCallback):
        """Raises inside the backward pass of its first run on ``fail_rank``, and keeps what the callback re-raises."""

        fail_rank: int = -1
        errors: ClassVar[list[str]] = []

        def _run(self, trainer, pl_module):
            handle = None
            if not self.errors and self.fail_rank in (-1, trainer.global_rank):  # the first run only

                def explode(module, grad_input, grad_output):
                    raise InjectedError(f"injected failure on rank {trainer.global_rank}")

                layer = pl_module.net[0]
                layer = getattr(layer, "_fsdp_wrapped_module", layer)  # the convolution, not its FSDP1 unit
                handle = layer.register_full_backward_hook(explode)
            try:
                return super()._run(trainer, pl_module)
            finally:
                if handle is not None:
                    handle.remove()

        def on_validation_epoch_end(self, trainer, pl_module):
            try:
                super().on_validation_epoch_end(trainer, pl_module)
            except RuntimeError as error:  # what the callback raised on this rank; training goes on
                self.errors.append(f"{type(error).__name__}: {error}")

    class Recorder(pl.Callback):
        """The interp scalars of each validation epoch (after the callbacks logged them)."""

        def __init__(self) -> None:
            self.scalars: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                metrics = trainer.callback_metrics
                self.scalars.append({k: float(v) for k, v in sorted(metrics.items()) if k.startswith("interp_")})

    class Collectives(pl.Callback):
        """The collectives called between its ``start`` (a callback before the interp callbacks) and its ``stop`` (one
        after them) at each validation epoch's end: what the callbacks' work costs in communication."""

        def __init__(self) -> None:
            self.counter: Counter | None = None
            self.started = 0.0
            self.per_validation: list[dict[str, int]] = []
            self.seconds: list[float] = []  # the wall time of the callbacks' epoch-end work, per validation

        def start(self, trainer) -> None:
            if not trainer.sanity_checking:
                self.counter = Counter().start()
                self.started = time.perf_counter()

        def stop(self, trainer) -> None:
            if self.counter is not None:
                self.seconds.append(time.perf_counter() - self.started)
                self.counter.stop()
                self.per_validation.append(dict(self.counter.calls))
                self.counter = None

    def fit(args: argparse.Namespace, out_dir: str) -> None:
        """One training run from seed 0 with ``args``' flags; each rank writes ``out_dir/rank<r>.pt``."""

        class ShardedClassifier(ImageClassifier):
            """The tiny classifier with every layer that has parameters, and the network, under ``fully_shard``."""

            def configure_model(self) -> None:
                from torch.distributed.fsdp import fully_shard

                if args.checkpointing:  # before sharding, as Lightning's activation_checkpointing_policy does
                    self.net[3] = checkpoint_wrapper(self.net[3])
                mesh = self.device_mesh["data_parallel"]
                for layer in self.net:
                    if any(True for _ in layer.parameters()):
                        fully_shard(layer, mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        FailingSaliency.errors.clear()  # an earlier run's
        collectives = Collectives()

        class StartCounting(pl.Callback):
            def on_validation_epoch_end(self, trainer, pl_module):
                collectives.start(trainer)

        class StopCounting(pl.Callback):
            def on_validation_epoch_end(self, trainer, pl_module):
                collectives.stop(trainer)

        pl.seed_everything(0, workers=True, verbose=False)
        saliency_type = FailingSaliency if args.fail_rank is not None else SaliencyCallback
        if args.fail_rank is not None:
            FailingSaliency.fail_rank = args.fail_rank
        callbacks = {
            "saliency": saliency_type(methods=("gradient", "smoothgrad", "integrated_gradients")),
            "gradcam": GradCAMCallback(methods=("grad_cam", "cam") if args.window else ("grad_cam",)),
            "probe": LinearProbeCallback(num_samples=32),
            "similarity": RepresentationSimilarityCallback(num_samples=32),
        }
        if args.no_callbacks:
            callbacks = {}
        recorder = Recorder()
        window = [UnshardedWindow()] if args.window else []
        timeout = timedelta(seconds=PG_TIMEOUT_S)
        if args.strategy == "ddp":
            strategy = DDPStrategy(timeout=timeout)
            model = ImageClassifier(shapes_cnn(num_classes=4, width=4), lr=1e-2)
        elif args.strategy == "fsdp2":
            strategy = ModelParallelStrategy(
                data_parallel_size=1 if args.tp2 else 2, tensor_parallel_size=2 if args.tp2 else 1, timeout=timeout
            )
            model = ShardedClassifier(shapes_cnn(num_classes=4, width=4), lr=1e-2)
        elif args.strategy == "fsdp1":
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            strategy = cpu_fsdp_strategy()(auto_wrap_policy=ModuleWrapPolicy({torch.nn.Conv2d}), timeout=timeout)
            model = ImageClassifier(shapes_cnn(num_classes=4, width=4), lr=1e-2)
            if args.checkpointing:
                model.net[3] = checkpoint_wrapper(model.net[3])
        else:
            strategy = cpu_deepspeed_strategy()(stage=int(args.strategy[-1]), timeout=timeout)
            strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            model = ImageClassifier(shapes_cnn(num_classes=4, width=4), lr=1e-2)
        # each rank's 2 batches per epoch: a validation after the first (mid-accumulation) and after the second
        schedule = {"accumulate_grad_batches": 2, "val_check_interval": 1} if args.accumulate else {}
        trainer = pl.Trainer(
            **schedule,
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_epochs=MAX_EPOCHS,
            callbacks=[StartCounting(), *callbacks.values(), *window, StopCounting(), recorder],
            logger=False,
            enable_checkpointing=False,
            default_root_dir=out_dir,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        report: dict = {}
        try:
            trainer.fit(model, datamodule=tiny_datamodule())
        except ValueError as error:  # a refusal before training
            report["refused"] = str(error)
        weights = {} if "refused" in report else whole_weights(trainer, args.strategy)
        local = 0  # the parameter elements this rank holds: fewer than the model's when the parameters are sharded
        for parameter in trainer.lightning_module.parameters():
            if hasattr(parameter, "ds_tensor"):  # ZeRO-3: this rank's partition
                local += parameter.ds_tensor.numel()
            else:  # FSDP2: a DTensor's local shard; FSDP1 (use_orig_params): a view into this rank's flat shard
                local += (parameter.to_local() if hasattr(parameter, "to_local") else parameter).numel()
        report.update(
            global_rank=trainer.global_rank,
            local_numel=local,
            weights=weights,
            scalars=recorder.scalars,
            collectives=collectives.per_validation,
            maps={k: v.clone() for k, v in callbacks["saliency"].last_maps.items()} if "saliency" in callbacks else {},
            work_seconds=collectives.seconds,
            runs={key: cb._runs for key, cb in callbacks.items()},
            probes={key: None if cb.probe is None else cb.probe.inputs.clone() for key, cb in callbacks.items()},
            errors=list(FailingSaliency.errors),
        )
        os.makedirs(out_dir, exist_ok=True)
        torch.save(report, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))

    for args, out_dir in plan:
        fit(args, out_dir)
    if torch.distributed.is_initialized():  # both ranks done: close the group before the interpreter exits (a gloo
        torch.distributed.barrier()  # pair torn down mid-exit can abort with "terminate called without an active
        torch.distributed.destroy_process_group()  # exception")


def run_plan(parser: argparse.ArgumentParser, argv: list[str]) -> list[tuple[argparse.Namespace, str]]:
    """Each run of ``argv`` (``STRATEGY OUT_DIR [FLAGS] [--then [STRATEGY] [FLAGS]]...``) with its report directory:
    ``OUT_DIR``, then ``OUT_DIR/then<i>`` for the i-th ``--then``; a run without a strategy keeps the one before."""
    first, *later = segments(argv)
    args = parser.parse_args(first)
    plan = [(args, args.out_dir)]
    for index, flags in enumerate(later, start=1):
        strategy = flags.pop(0) if flags and not flags[0].startswith("-") else plan[-1][0].strategy
        plan.append((parser.parse_args([strategy, args.out_dir, *flags]), then_dir(args.out_dir, index)))
    return plan


def segments(argv: list[str]) -> list[list[str]]:
    """``argv`` split at each ``--then``.

    >>> segments(["fsdp2", "out", "--no-callbacks", "--then", "--then", "ddp", "--fail-rank", "1"])
    [['fsdp2', 'out', '--no-callbacks'], [], ['ddp', '--fail-rank', '1']]
    """
    parts: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            parts.append([])
        else:
            parts[-1].append(arg)
    return parts


def then_dir(out_dir: str, index: int) -> str:
    """Where the ``index``-th run after ``--then`` writes its reports."""
    return os.path.join(out_dir, f"then{index}")


def whole_weights(trainer, strategy: str) -> dict:
    """The trained weights as whole tensors under their plain names (every rank joins the gathers)."""

    module = trainer.lightning_module
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        whole = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, whole):
            state = trainer.strategy.model.state_dict()
    elif strategy == "deepspeed3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    else:
        state = module.state_dict()
    weights = {}
    for name, tensor in state.items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2: every rank gathers
        weights[name] = full.detach().cpu().clone()
    return weights


def cpu_fsdp_strategy() -> type:
    """``FSDPStrategy`` on a CPU: Lightning refuses a CPU accelerator for the class itself (not a subclass), and
    passes ``device_id=None``, which FSDP1 refuses; this one wraps with ``device_id=torch.device("cpu")``."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            return FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )

    return CPUFSDPStrategy


def cpu_deepspeed_strategy() -> type:
    """``DeepSpeedStrategy`` on a CPU: without its CUDA-only check of the accelerator and of device indices, and with
    the process's rank as the device rank ``deepspeed.initialize`` asks for (a CPU device has no index)."""
    import argparse
    import importlib

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    # DeepSpeed's CPU inference all-reduce kernel, compiled at start-up when a C++ toolchain is found (a minute):
    # training does not use it (the module, not ``deepspeed.comm.torch``: that name is PyTorch there)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from lightning.fabric.utilities.seed import reset_seed

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            import deepspeed

            engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
            return engine, deepspeed_optimizer

    return CPUDeepSpeedStrategy


if __name__ == "__main__":
    main()
