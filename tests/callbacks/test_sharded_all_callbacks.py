"""Every callback under FSDP2 (``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
``fully_shard``), FSDP1 and ZeRO-3 on 2 CPU processes (gloo), against DDP and against training alone: the eight
callbacks that issue 29 brought to sharded strategies, on one tiny hybrid CNN-attention model (see
``sharded_all_run.py``); and the refusals, before training, of what cannot work in lockstep.

The multi-process runs are one ``sharded_all_run.py`` subprocess that trains them one after the other (Lightning
re-launches the script for rank 1), bounded by a timeout that kills its whole process group, and a process-group
timeout inside, so a hang fails the test.
The runs are shared by the tests of this module: with every callback and without any under FSDP2, FSDP1 and ZeRO-3
(skipped without DeepSpeed), and DDP with every callback, all from one launch.
"""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lightning_interp
from lightning_interp import DatasetBiasCallback, ExplanationQualityCallback, UncertaintyCallback
from lightning_interp.callbacks import InterpCallback
from tests.callbacks.multiprocess import DEVICES, Run, launch_plan
from tests.callbacks.sharded_all_run import CALLBACK_KEYS, MAX_EPOCHS, hybrid_net
from tests.conftest import tiny_classifier

SCRIPT = Path(__file__).with_name("sharded_all_run.py")


# Every run the tests read, in the order of the module's one launch (``sharded_all_run.py``'s ``--then``): starting the
# two processes costs more than these tiny runs. Training alone before the run with every callback.
PLAN: list[tuple[str, ...]] = [
    ("ddp",),
    ("fsdp2", "--no-callbacks"),
    ("fsdp2",),
    ("fsdp1", "--no-callbacks"),
    ("fsdp1",),
    ("deepspeed3", "--no-callbacks"),
    ("deepspeed3",),
]


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory) -> dict[tuple[str, ...], Run]:
    """Every run of ``PLAN`` (without ZeRO-3's where DeepSpeed is not installed), from one launch."""
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    plan = [run for run in PLAN if deepspeed or not run[0].startswith("deepspeed")]
    return launch_plan(SCRIPT, tmp_path_factory.mktemp("plan_all"), plan)


@pytest.fixture(scope="module")
def fsdp2(all_runs) -> Run:
    return all_runs[("fsdp2",)]


@pytest.fixture(scope="module")
def fsdp2_alone(all_runs) -> Run:
    return all_runs[("fsdp2", "--no-callbacks")]


@pytest.fixture(scope="module")
def ddp(all_runs) -> Run:
    return all_runs[("ddp",)]


def max_weight_difference(a: dict, b: dict) -> float:
    assert a["weights"].keys() == b["weights"].keys() and a["weights"]
    return max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])


def prefixes(scalars: dict[str, float]) -> set[str]:
    return {name.split("/")[0].removeprefix("interp_") for name in scalars}


@pytest.mark.slow
def test_fsdp2_training_with_every_callback_is_bitwise_that_of_training_alone(fsdp2, fsdp2_alone):
    fsdp2.check()
    fsdp2_alone.check()
    for rank in range(DEVICES):
        assert fsdp2.reports[rank]["sharded"], "the parameters were not sharded: the run tests nothing"
        for name, tensor in fsdp2_alone.reports[rank]["weights"].items():
            assert torch.equal(fsdp2.reports[rank]["weights"][name], tensor), (rank, name)
    # the check has teeth: the weights moved during training
    torch.manual_seed(0)
    start = {f"net.{name}": value for name, value in hybrid_net().state_dict().items()}
    assert max_weight_difference(fsdp2.reports[0], {"weights": start}) > 1e-3


@pytest.mark.slow
def test_fsdp2_every_callback_runs_every_epoch_on_both_ranks_with_rank_zeros_scalars(fsdp2):
    fsdp2.check()
    for rank in range(DEVICES):  # in lockstep: every rank did the work of every due epoch
        assert fsdp2.reports[rank]["runs"] == dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS), rank
    zero, one = (fsdp2.reports[rank]["scalars"] for rank in range(DEVICES))
    assert len(zero) == MAX_EPOCHS
    for a, b in zip(zero, one, strict=True):  # bit for bit (NaN where both are NaN): broadcast from rank zero
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), a
    for epoch in zero:  # every callback logged at every epoch
        assert prefixes(epoch) == set(CALLBACK_KEYS), sorted(prefixes(epoch))
    names = set(zero[-1])
    for key in (  # plain layer names, no wrapper prefix; the train-start maps (sanity) were taken on every rank
        "interp_attention/net.attn.self_attn/entropy",
        "interp_quality/gradient/sanity_rank_correlation",
        "interp_concept/stripes/net.stem.3/cav_accuracy",
        "interp_uncertainty/gradient/map_agreement",
    ):
        assert key in names, sorted(names)
    for key in CALLBACK_KEYS:  # one probe set, rank zero's, everywhere
        assert torch.equal(fsdp2.reports[0]["probes"][key], fsdp2.reports[1]["probes"][key]), key


@pytest.mark.slow
def test_fsdp2_scalars_match_the_ddp_runs(fsdp2, ddp):
    fsdp2.check()
    ddp.check()
    assert ddp.reports[1]["runs"] == dict.fromkeys(CALLBACK_KEYS, 0)  # DDP: rank zero alone works
    assert not ddp.reports[0]["sharded"]
    for key in CALLBACK_KEYS:
        assert torch.equal(fsdp2.reports[0]["probes"][key], ddp.reports[0]["probes"][key]), key
    # The trained weights differ by reduction order alone (FSDP2 reduce-scatters, DDP all-reduces; measured 2e-5 on
    # this model after 4 steps): the scalars, computed on the same probe samples with the same seeds, differ by what
    # that moves them (measured at most 7e-6 absolute, 1e-5 relative); 1e-3 relative leaves room for other CPUs'
    # kernels without hiding a rank's own probe, seed or layer, which moves them by far more.
    assert max_weight_difference(fsdp2.reports[0], ddp.reports[0]) < 1e-4
    for sharded, plain in zip(fsdp2.reports[0]["scalars"], ddp.reports[0]["scalars"], strict=True):
        assert sharded.keys() == plain.keys()
        for name, value in plain.items():
            assert sharded[name] == pytest.approx(value, rel=1e-3, abs=1e-5, nan_ok=True), name


@pytest.fixture(scope="module")
def other_runs(all_runs):
    """``other_runs(strategy, *args)``: that run of ``PLAN`` under FSDP1 or ZeRO-3 (skipped without DeepSpeed)."""

    def get(strategy: str, *args: str) -> Run:
        if strategy.startswith("deepspeed"):
            pytest.importorskip("deepspeed")
        run = all_runs[(strategy, *args)]
        run.check()
        return run

    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp1", "deepspeed3"])
def test_every_callback_under_fsdp1_and_zero3_in_lockstep_leaves_training_bitwise(other_runs, strategy):
    run, alone = other_runs(strategy), other_runs(strategy, "--no-callbacks")
    for rank in range(DEVICES):
        assert run.reports[rank]["sharded"]
        assert run.reports[rank]["runs"] == dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS), rank  # every rank worked
        for name, tensor in alone.reports[rank]["weights"].items():
            assert torch.equal(run.reports[rank]["weights"][name], tensor), (rank, name)
    zero, one = (run.reports[rank]["scalars"] for rank in range(DEVICES))
    assert len(zero) == MAX_EPOCHS
    for a, b in zip(zero, one, strict=True):  # broadcast from rank zero
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), a
        assert prefixes(a) == set(CALLBACK_KEYS), sorted(prefixes(a))
    assert "interp_attention/net.attn.self_attn/entropy" in zero[-1]  # self-attention, not cross (ZeRO-3's aliases)


@pytest.mark.slow
def test_zero3_scalars_match_the_ddp_runs(other_runs, ddp):
    run = other_runs("deepspeed3")
    ddp.check()
    assert max_weight_difference(run.reports[0], ddp.reports[0]) < 1e-4  # reduction order alone
    for sharded, plain in zip(run.reports[0]["scalars"], ddp.reports[0]["scalars"], strict=True):
        assert sharded.keys() == plain.keys()
        for name, value in plain.items():  # the tolerance of the FSDP2 comparison above, for the same reason
            assert sharded[name] == pytest.approx(value, rel=1e-3, abs=1e-5, nan_ok=True), name


# ---------------------------------------------------------------------------------------------- refusals, in process


class ModelParallelStrategy:  # named as Lightning's: the checks read the strategy's type name
    def __init__(self, tensor_parallel_size: int) -> None:
        self._tensor_parallel_size = tensor_parallel_size


def fake_trainer(strategy: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(strategy=strategy, world_size=2, limit_val_batches=1.0)


def test_every_exported_callback_runs_in_lockstep():
    kinds = [
        value
        for value in vars(lightning_interp).values()
        if isinstance(value, type) and issubclass(value, InterpCallback) and value.__name__.endswith("Callback")
    ]
    assert len(kinds) >= 12  # the four core callbacks and the eight of issue 29, at least
    for kind in kinds:
        assert kind.sharded_support, kind


def test_cascading_randomisation_is_refused_at_setup_under_sharded_strategies():
    callback = ExplanationQualityCallback(methods=("gradient",), metrics=("deletion", "cascading"))
    with pytest.raises(ValueError, match=r"'cascading'.*deep copy.*shards.*metrics=.*strategy='ddp'"):
        callback.setup(fake_trainer(ModelParallelStrategy(1)), tiny_classifier(), "fit")


@pytest.mark.parametrize(
    "make",
    [
        lambda: DatasetBiasCallback(methods={"cam": {"layer": "net.7"}}),
        lambda: ExplanationQualityCallback(methods=("gradient", "cam")),
        lambda: UncertaintyCallback(methods=("cam",)),
    ],
    ids=["dataset_bias", "explanation_quality", "uncertainty"],
)
def test_weight_reading_cam_in_methods_is_refused_at_setup_under_sharded_strategies(make):
    with pytest.raises(ValueError, match=r"\['cam'\] reads the classifier's weights.*grad_cam"):
        make().setup(fake_trainer(ModelParallelStrategy(1)), tiny_classifier(), "fit")


def test_the_validation_outputs_callbacks_skip_ddps_redirected_call_of_validation_step():
    """Under DDP, Lightning runs ``validation_step`` as a call of the LightningModule redirected through the wrapper's
    ``forward``: that call's output (``validation_step``'s, here None) is no logits; the ``self(x)`` inside it is."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch import nn

    from lightning_interp import CalibrationCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(3, 4)

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            self(batch[0])  # returns nothing, as most validation steps

    class Wrapper(nn.Module):  # calls the module it wraps, as DistributedDataParallel does
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    module, callback = Module(), CalibrationCallback()
    trainer = types.SimpleNamespace(
        sanity_checking=False, is_global_zero=True, state=types.SimpleNamespace(fn="validate")
    )
    batch = (torch.randn(5, 3), torch.arange(5) % 4)
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_start(trainer, module, batch, 0)
    outputs = _ForwardRedirection()(Wrapper(module), module, "validation_step", batch, 0)
    callback.on_validation_batch_end(trainer, module, outputs, batch, 0)
    callback._remove_hooks()
    assert len(callback._logits) == 1
    assert torch.equal(callback._logits[0], module(batch[0]).detach())
