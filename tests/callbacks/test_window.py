"""The unsharded window under FSDP2 on 2 CPU processes (gloo): one all-gather per parameter group to open it, no
collective while rank zero explains the model alone inside, maps equal to an unsharded replica's (CAM, which reads the
classifier's weights, included), and training afterwards bitwise that of a run without the window, also when rank
zero's work fails inside a backward pass. The run is ``window_run.py``, bounded by a timeout that kills its processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_interp import GradCAMCallback, ProbeSet, SaliencyCallback, UnshardedWindow
from lightning_interp.callbacks._sharding import is_lockstep
from lightning_interp.callbacks._window import check_window_model, unsharded_window, window_support_problem
from lightning_interp.callbacks.unsharded_window import in_window
from tests.callbacks.collectives import Counter
from tests.conftest import tiny_classifier

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("window_run.py")
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("window")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the window run did not finish within {TIMEOUT_S} s (hang?):\n{output[-6000:]}")
    errors = "".join(path.read_text() for path in sorted(root.glob("rank*.err")))
    assert process.returncode == 0, (errors or output)[-6000:]
    return {rank: torch.load(root / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.mark.slow
def test_opening_the_window_gathers_each_group_once_and_rank_zeros_work_makes_no_collective(reports):
    for rank, report in reports.items():
        window = report["window"]
        assert window["parameter_groups"] == 4  # the three convolutions and the linear layer
        gathers = sum(window["entering_calls"].get(name, 0) for name in Counter.GATHERS)
        assert gathers == window["parameter_groups"], (rank, window["entering_calls"])
        assert sum(window["entering_calls"].values()) == gathers, (rank, window["entering_calls"])
        assert window["inside_calls"] == {}, (rank, window["inside_calls"])  # three maps, their backward passes


@pytest.mark.slow
def test_maps_inside_the_window_equal_an_unsharded_replicas(reports):
    window = reports[0]["window"]
    assert window["error"] is None
    for name in ("gradient", "grad_cam", "cam"):
        sharded, replica = window["maps"][name], window["replica_maps"][name]
        assert replica.abs().max() > 0, name
        torch.testing.assert_close(sharded, replica, rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
def test_training_after_the_window_is_bitwise_that_of_a_run_without_it_also_after_a_failure(reports):
    assert reports[0]["failing window"]["error"] == "injected failure inside the window's backward pass"
    assert reports[1]["failing window"]["error"] is None  # rank one only waited
    for rank, report in reports.items():
        for mode in ("window", "failing window"):
            assert report[mode]["sharded_before"] == report[mode]["sharded_after"], (rank, mode)
            assert report[mode]["weights"].keys() == report["none"]["weights"].keys()
            for name, tensor in report["none"]["weights"].items():
                assert torch.equal(report[mode]["weights"][name], tensor), (rank, mode, name)


def test_the_window_needs_fsdp2_modules_and_says_so():
    assert window_support_problem(nn.Linear(2, 2)) == "the model has no fully_shard (FSDP2) module"
    with pytest.raises(ValueError, match="no fully_shard"), unsharded_window(nn.Linear(2, 2)):
        pass


class ModelParallelStrategy:  # named as Lightning's: the checks read the strategy's type name
    _tensor_parallel_size = 1


class FSDPStrategy:
    pass


class FakeTrainer(types.SimpleNamespace):  # hashable, weakly referenced: the run context keys on the trainer
    __hash__ = object.__hash__


def fake_trainer(*callbacks, strategy=None) -> FakeTrainer:
    strategy = ModelParallelStrategy() if strategy is None else strategy
    return FakeTrainer(strategy=strategy, world_size=2, limit_val_batches=1.0, callbacks=list(callbacks))


def test_cam_reads_whole_weights_in_the_window_and_is_refused_in_lockstep():
    probe = ProbeSet(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))  # given: setup draws nothing
    window = UnshardedWindow()
    cam = GradCAMCallback(methods=("cam",), probe=probe)
    cam.setup(fake_trainer(cam, window), tiny_classifier(), "fit")
    with pytest.raises(ValueError, match=r"\['cam'\] reads the classifier's weights"):
        GradCAMCallback(methods=("cam",)).setup(fake_trainer(), tiny_classifier(), "fit")


def test_the_window_is_refused_under_fsdp1_and_changes_nothing_where_parameters_are_whole():
    trainer = fake_trainer(UnshardedWindow(), strategy=FSDPStrategy())
    if is_lockstep(trainer):  # FSDP1 runs the callbacks in lockstep: the window is FSDP2's only
        with pytest.raises(ValueError, match=r"FSDP2 only.*not under FSDPStrategy.*lockstep"):
            UnshardedWindow().setup(trainer, tiny_classifier(), "fit")
    ddp = fake_trainer(UnshardedWindow(), strategy=types.SimpleNamespace())
    UnshardedWindow().setup(ddp, tiny_classifier(), "fit")
    assert not in_window(ddp) and in_window(fake_trainer(UnshardedWindow()))


def test_the_window_on_a_model_without_fully_shard_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"cannot open the unsharded window.*no fully_shard.*remove UnshardedWindow"):
        check_window_model(SaliencyCallback(), tiny_classifier())
