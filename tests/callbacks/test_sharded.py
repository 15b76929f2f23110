"""The callbacks under sharded strategies: FSDP2 (``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with ``fully_shard``) on 2 CPU processes (gloo), against DDP and against training alone;
and the refusals, before training, of what cannot work.

The multi-process runs are ``sharded_run.py`` subprocesses (Lightning re-launches the script for rank 1), each bounded
by a timeout that kills its whole process group, and a process-group timeout inside, so a hang fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_interp import (
    CalibrationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.callbacks._sharding import has_activation_checkpointing
from lightning_interp.methods import module_name
from lightning_interp.methods.model.core import plain_name
from tests.callbacks.sharded_run import MAX_EPOCHS
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("sharded_run.py")
DEVICES = 2
TIMEOUT_S = 300  # a run takes ~15-25 s alone, more when the two cores are shared
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CALLBACK_KEYS = ("saliency", "gradcam", "probe", "similarity")


@dataclass
class Run:
    returncode: int
    output: str
    reports: dict[int, dict]

    def check(self) -> None:
        assert self.returncode == 0, self.output[-6000:]
        assert sorted(self.reports) == list(range(DEVICES)), self.output[-6000:]


def launch(root: Path, strategy: str, *extra_args: str) -> Run:
    """Run ``sharded_run.py`` on ``DEVICES`` CPU processes, its reports under ``root``."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(SCRIPT), strategy, str(root), *extra_args]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:  # kill the rank Lightning spawned too, not only the launcher
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the {strategy} run did not finish within {TIMEOUT_S} s (hang?); its output:\n{output[-6000:]}")
    reports = {}
    for rank in range(DEVICES):
        path = root / f"rank{rank}.pt"
        if path.exists():
            reports[rank] = torch.load(path, weights_only=False)
    return Run(process.returncode, output, reports)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> Run:
    return launch(tmp_path_factory.mktemp("fsdp2"), "fsdp2")


@pytest.fixture(scope="module")
def fsdp2_alone(tmp_path_factory) -> Run:
    return launch(tmp_path_factory.mktemp("fsdp2_alone"), "fsdp2", "--no-callbacks")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Run:
    return launch(tmp_path_factory.mktemp("ddp"), "ddp")


def max_weight_difference(a: dict, b: dict) -> float:
    assert a["weights"].keys() == b["weights"].keys() and a["weights"]
    return max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])


@pytest.mark.slow
def test_fsdp2_training_is_bitwise_that_of_training_alone(fsdp2, fsdp2_alone):
    fsdp2.check()
    fsdp2_alone.check()
    for rank in range(DEVICES):
        for name, tensor in fsdp2_alone.reports[rank]["weights"].items():
            assert torch.equal(fsdp2.reports[rank]["weights"][name], tensor), (rank, name)
    # the check has teeth: the weights moved during training
    assert max_weight_difference(fsdp2.reports[0], {"weights": tiny_classifier().state_dict()}) > 1e-3


@pytest.mark.slow
def test_fsdp2_every_rank_works_in_lockstep_and_gets_rank_zeros_scalars(fsdp2):
    fsdp2.check()
    for rank in range(DEVICES):
        assert fsdp2.reports[rank]["runs"] == dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS), rank
    zero, one = (fsdp2.reports[rank]["scalars"] for rank in range(DEVICES))
    assert len(zero) == MAX_EPOCHS
    assert zero == one  # bit for bit: broadcast from rank zero
    names = set(zero[-1])
    for key in ("interp_probe/net.10/accuracy", "interp_gradcam/net.7/localization"):
        assert key in names, sorted(names)  # plain layer names, no wrapper prefix
    assert any(name.startswith("interp_saliency/") for name in names)
    assert any(name.startswith("interp_similarity/") for name in names)
    for key in CALLBACK_KEYS:  # one probe set, rank zero's, everywhere
        assert torch.equal(fsdp2.reports[0]["probes"][key], fsdp2.reports[1]["probes"][key]), key


@pytest.mark.slow
def test_fsdp2_scalars_match_the_ddp_runs(fsdp2, ddp):
    fsdp2.check()
    ddp.check()
    assert ddp.reports[1]["runs"] == dict.fromkeys(CALLBACK_KEYS, 0)  # DDP: rank zero alone works
    for key in CALLBACK_KEYS:
        assert torch.equal(fsdp2.reports[0]["probes"][key], ddp.reports[0]["probes"][key]), key
    # The trained weights differ by reduction order alone (measured 6e-8: FSDP2 reduce-scatters, DDP all-reduces)
    assert max_weight_difference(fsdp2.reports[0], ddp.reports[0]) < 1e-6
    for sharded, plain in zip(fsdp2.reports[0]["scalars"], ddp.reports[0]["scalars"], strict=True):
        assert sharded.keys() == plain.keys()
        for name, value in plain.items():
            assert sharded[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.slow
def test_fsdp2_a_failure_on_one_rank_is_raised_on_both_and_leaves_training_as_it_was(tmp_path, fsdp2_alone):
    run = launch(tmp_path, "fsdp2", "--fail-rank", "1")  # the backward of the first saliency pass raises on rank 1
    run.check()
    assert run.reports[1]["errors"] == ["InjectedError: injected failure on rank 1"]
    assert run.reports[0]["errors"] == [
        "PeerFailure: the callbacks' work failed on another rank (its error is raised there)"
    ]
    fsdp2_alone.check()
    for rank in range(DEVICES):  # the run went on after the caught failure: its training is training alone's
        for name, tensor in fsdp2_alone.reports[rank]["weights"].items():
            assert torch.equal(run.reports[rank]["weights"][name], tensor), (rank, name)
    assert run.reports[0]["runs"]["saliency"] == MAX_EPOCHS - 1


# ---------------------------------------------------------------------------------------------- refusals, in process


class ModelParallelStrategy:  # named as Lightning's: the checks read the strategy's type name
    def __init__(self, tensor_parallel_size: int) -> None:
        self._tensor_parallel_size = tensor_parallel_size


def fake_trainer(strategy: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(strategy=strategy, world_size=2, limit_val_batches=1.0)


def test_tensor_parallelism_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*tensor_parallel_size=1"):
        SaliencyCallback().setup(fake_trainer(ModelParallelStrategy(2)), tiny_classifier(), "fit")


def test_a_callback_without_lockstep_refuses_sharded_strategies_and_says_what_to_do():
    class RankZeroOnly(CalibrationCallback):  # every shipped callback runs in lockstep: a subclass that does not
        sharded_support = False

    with pytest.raises(ValueError, match=r"RankZeroOnly does not support ModelParallelStrategy:.*strategy='ddp'"):
        RankZeroOnly().setup(fake_trainer(ModelParallelStrategy(1)), tiny_classifier(), "fit")


def test_weight_reading_cam_is_refused_under_sharded_strategies():
    with pytest.raises(ValueError, match=r"\['cam'\] reads the classifier's weights.*grad_cam"):
        GradCAMCallback(methods=("cam",)).setup(fake_trainer(ModelParallelStrategy(1)), tiny_classifier(), "fit")


def test_modified_backward_methods_are_refused_with_activation_checkpointing(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_classifier()
    model.net[3] = checkpoint_wrapper(model.net[3])
    assert has_activation_checkpointing(model)
    callback = SaliencyCallback(methods=("gradient", "lrp"), num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match=r"\['lrp'\].*activation checkpointing"):
        trainer.fit(model, datamodule=tiny_datamodule())


def test_wrapper_segments_leave_plain_names_that_find_the_innermost_layer():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    assert plain_name("_fsdp_wrapped_module.net.1._fsdp_wrapped_module._checkpoint_wrapped_module") == "net.1"

    class Wrapper(nn.Module):  # names its child as FSDP1 does
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = module

    net = Wrapper(nn.Sequential(nn.Linear(2, 2), Wrapper(checkpoint_wrapper(nn.Linear(2, 2)))))
    real = module_name(net, "1")
    assert real == "_fsdp_wrapped_module.1._fsdp_wrapped_module._checkpoint_wrapped_module"
    assert isinstance(net.get_submodule(real), nn.Linear)  # the layer itself, not a wrapper
    assert module_name(net, "0") == "_fsdp_wrapped_module.0"


def test_linear_probe_and_similarity_are_lockstep_callbacks():
    for kind in (SaliencyCallback, GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback):
        assert kind.sharded_support, kind
