"""All four callbacks under ``strategy="ddp"`` on 2 CPU processes (gloo), with a DistributedSampler'd validation set.

Lightning's DDP strategy re-launches the running script for the other ranks, so the training runs in
``ddp_run.py`` as a subprocess of its own; it leaves each rank's callback state in ``rank<N>.pt``. One run (about
half a minute on two cores) is shared by the tests below: with ``EarlyStopping`` and ``ModelCheckpoint`` monitoring an
interp scalar, as users monitor them (a second launch for the monitors alone would cost as much again).
"""

from __future__ import annotations

import glob
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lightning_interp import (
    GradCAMCallback,
    LinearProbeCallback,
    ProbeSet,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from tests.callbacks.ddp_run import CALLBACK_KEYS, MAX_EPOCHS, MONITOR
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_run.py")
DEVICES = 2
TIMEOUT_S = 300  # generous: the run takes ~30 s alone, more when the two cores are shared
IMAGE_TAGS = (
    "interp_saliency/maps/rows_1-2",
    "interp_gradcam/maps/rows_1-2",
    "interp_probe/accuracy_by_depth",
    "interp_similarity/cka",
)
# Environment that would make the launched script think it is already one rank of a running job.
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DDPRun:
    log_dir: Path
    returncode: int
    output: str
    reports: dict[int, dict]


def launch(root: Path, *extra_args: str) -> DDPRun:
    """Run ``ddp_run.py`` on ``DEVICES`` CPU processes with logs and reports under ``root``."""
    log_dir, out_dir = root / "logs", root / "out"
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(SCRIPT), str(log_dir), str(out_dir), str(DEVICES), *extra_args]
    # subprocess.run(timeout=...) would kill only the launcher, leaving the rank Lightning spawned behind:
    # start a session of our own and kill its whole process group on timeout.
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the DDP run did not finish within {TIMEOUT_S} s (hang?); its output:\n{output[-6000:]}")
    reports = {}
    for rank in range(DEVICES):
        path = out_dir / f"rank{rank}.pt"
        if path.exists():
            reports[rank] = torch.load(path, weights_only=False)
    return DDPRun(log_dir, process.returncode, output, reports)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> DDPRun:
    return launch(tmp_path_factory.mktemp("ddp"), "--monitor")


def expected_steps() -> list[int]:
    """``global_step`` after each epoch: DistributedSampler gives each rank ceil(N / devices) samples (padded)."""
    datamodule = tiny_datamodule()
    datamodule.setup("fit")
    per_rank = math.ceil(len(datamodule.train_set) / DEVICES)
    batches_per_epoch = math.ceil(per_rank / datamodule.batch_size)  # one optimizer step per batch
    return [batches_per_epoch * (epoch + 1) for epoch in range(MAX_EPOCHS)]


def test_ddp_run_exits_cleanly_on_both_ranks(ddp_run):
    assert ddp_run.returncode == 0, ddp_run.output[-6000:]
    assert sorted(ddp_run.reports) == list(range(DEVICES)), ddp_run.output[-6000:]
    steps = expected_steps()
    assert steps == [2, 4]  # 64 images, 2 ranks, batch 16: 2 steps per epoch (a single process makes 4)
    for rank, report in ddp_run.reports.items():
        assert report["global_rank"] == rank and report["world_size"] == DEVICES
        assert report["is_global_zero"] == (rank == 0)
        assert report["backend"] == "gloo"
        # What Lightning actually did agrees with the arithmetic above.
        assert report["num_training_batches"] * report["max_epochs"] == report["global_step"] == steps[-1]
        assert report["accumulate_grad_batches"] == 1
        assert report["train_sampler"] == "DistributedSampler"
        assert report["val_sampler_is_distributed"], report["val_sampler"]
    # The validation shards are disjoint and cover the validation set: each rank sees only half of it.
    shards = [set(ddp_run.reports[rank]["val_indices"]) for rank in range(DEVICES)]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(32))


def test_callbacks_run_on_rank_zero_only(ddp_run):
    assert ddp_run.returncode == 0, ddp_run.output[-6000:]
    for key in CALLBACK_KEYS:
        assert ddp_run.reports[0]["runs"][key] == MAX_EPOCHS, key  # once per validation epoch, not in sanity check
        assert ddp_run.reports[1]["runs"][key] == 0, key
    assert "interp_probe/net.10/accuracy" in ddp_run.reports[0]["interp_metrics"]


def test_rank_zero_logs_each_image_once_per_validation_epoch(ddp_run):
    assert ddp_run.returncode == 0, ddp_run.output[-6000:]
    steps = expected_steps()
    logged = [step - 1 for step in steps]  # Lightning's logging step of each validation: val_loss's
    files = glob.glob(str(ddp_run.log_dir / "**" / "events.out.tfevents.*"), recursive=True)
    assert [os.path.relpath(os.path.dirname(f), ddp_run.log_dir) for f in files] == [os.path.join("ddp", "version_0")]
    assert sorted(os.listdir(ddp_run.log_dir / "ddp")) == ["version_0"]  # rank 1 made no version of its own
    assert ddp_run.reports[0]["logger_version"] == ddp_run.reports[1]["logger_version"] == 0
    assert not list(ddp_run.log_dir.rglob("*.png")), "a TensorBoard run needs no PNG fallback"

    events = read_events(str(ddp_run.log_dir))
    for tag in IMAGE_TAGS:
        assert events.image_steps(tag) == logged, tag
    for method in ("gradient", "smoothgrad", "integrated_gradients"):
        assert events.scalar_steps(f"interp_saliency/{method}/concentration") == logged
        assert events.image_steps(f"interp_saliency/{method}/evolution") == [logged[-1]]
    assert events.scalar_steps("interp_gradcam/net.7/localization") == logged
    assert events.scalar_steps("interp_probe/net.10/accuracy") == logged
    assert events.scalar_steps("interp_similarity/net.10/cka_vs_start") == logged


def assert_same_probe(actual: dict, expected: ProbeSet, what: str) -> None:
    for field in ("inputs", "labels", "masks"):
        assert torch.equal(actual[field], getattr(expected, field)), f"{what}: {field}"


def test_probe_samples_are_those_of_a_single_process_run(ddp_run, tmp_path):
    assert ddp_run.returncode == 0, ddp_run.output[-6000:]
    datamodule = tiny_datamodule()
    datamodule.setup("fit")
    loader = datamodule.val_dataloader()
    for rank, report in ddp_run.reports.items():
        for key in CALLBACK_KEYS:
            expected = ProbeSet.from_dataloader(loader, report["num_samples"][key])
            assert_same_probe(report["probes"][key], expected, f"rank {rank} {key}")
        # Drawn after fit from the DistributedSampler'd loader the trainer validated with: still the whole set.
        assert_same_probe(report["late_probe"], ProbeSet.from_dataloader(loader, 32), f"rank {rank} late draw")

    # The same callbacks in a single-process run draw the same samples.
    callbacks = {
        "saliency": SaliencyCallback(methods=("gradient",)),
        "gradcam": GradCAMCallback(),
        "probe": LinearProbeCallback(num_samples=32),
        "similarity": RepresentationSimilarityCallback(num_samples=32, metrics=("cka",)),
    }
    trainer = quiet_trainer(tmp_path, callbacks=list(callbacks.values()), logger=False)
    trainer.validate(tiny_classifier(), datamodule=tiny_datamodule(), verbose=False)
    for key, callback in callbacks.items():
        assert callback.probe is not None and len(callback.probe) == ddp_run.reports[0]["num_samples"][key]
        assert_same_probe(ddp_run.reports[0]["probes"][key], callback.probe, f"single process {key}")

    # The check has teeth: drawn from rank 0's validation shard alone, the probe set would differ.
    shard = Subset(datamodule.val_set, ddp_run.reports[0]["val_indices"])
    from_shard = ProbeSet.from_dataloader(DataLoader(shard, batch_size=16), 8)
    assert len(from_shard) == 8
    assert not torch.equal(from_shard.inputs, ddp_run.reports[0]["probes"]["saliency"]["inputs"])


def test_interp_scalars_are_monitorable_under_ddp(ddp_run):
    assert ddp_run.returncode == 0, ddp_run.output[-6000:]  # EarlyStopping and ModelCheckpoint found it on each rank
    for rank in range(DEVICES):
        assert MONITOR in ddp_run.reports[rank]["interp_metrics"], rank
