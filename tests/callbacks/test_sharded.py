"""The callbacks under sharded strategies on 2 CPU processes (gloo), against DDP and against training alone: FSDP2
(``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard``), FSDP1
(``FSDPStrategy``) and DeepSpeed ZeRO-3 in lockstep, DeepSpeed ZeRO-2 on rank zero alone (see ``sharded_run.py`` for
the CPU subclasses); and the refusals, before training, of what cannot work. The DeepSpeed runs skip without
DeepSpeed (``pip install lightning-interp[sharded]``).

The multi-process runs are one ``sharded_run.py`` subprocess that trains them one after the other (Lightning re-launches
the script for rank 1), bounded by a timeout that kills its whole process group, and a process-group timeout inside, so
a hang fails the test.
"""

from __future__ import annotations

import importlib.util
import types
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
from lightning_interp.callbacks._sharding import (
    check_strategy,
    has_activation_checkpointing,
    is_lockstep,
    strategy_kind,
)
from lightning_interp.methods import module_name
from lightning_interp.methods.model.core import plain_name
from tests.callbacks.collectives import Counter
from tests.callbacks.multiprocess import DEVICES, Run, launch_plan
from tests.callbacks.multiprocess import launch as launch_script
from tests.callbacks.sharded_run import MAX_EPOCHS
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

SCRIPT = Path(__file__).with_name("sharded_run.py")
CALLBACK_KEYS = ("saliency", "gradcam", "probe", "similarity")


def launch(root: Path, strategy: str, *extra_args: str) -> Run:
    """Run ``sharded_run.py`` on ``DEVICES`` CPU processes, its reports under ``root``."""
    return launch_script(SCRIPT, root, strategy, *extra_args)


LOCKSTEP = ("fsdp2", "fsdp1", "deepspeed3")  # sharded parameters: every rank does the callbacks' work
RANK_ZERO = ("deepspeed2",)  # whole parameters on every rank: rank zero works alone, as under DDP
STRATEGIES = LOCKSTEP + RANK_ZERO


def needs(strategy: str) -> None:
    """Skip a DeepSpeed run where DeepSpeed is not installed (``pip install lightning-interp[sharded]``)."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")


# Every run the tests read, in the order of the module's one launch (``sharded_run.py``'s ``--then``): starting the
# two processes costs more than these tiny runs. Training alone before the run with the callbacks; the refusal last.
PLAN: list[tuple[str, ...]] = [
    ("ddp",),
    ("fsdp2", "--no-callbacks"),
    ("fsdp2",),
    ("fsdp2", "--fail-rank", "1"),
    ("fsdp2", "--window"),
    ("fsdp2", "--accumulate", "--no-callbacks"),
    ("fsdp2", "--accumulate"),
    ("fsdp2", "--checkpointing"),
    ("fsdp1", "--no-callbacks"),
    ("fsdp1",),
    ("fsdp1", "--fail-rank", "1"),
    ("deepspeed3", "--no-callbacks"),
    ("deepspeed3",),
    ("deepspeed3", "--fail-rank", "1"),
    ("deepspeed2", "--no-callbacks"),
    ("deepspeed2",),
    ("fsdp1", "--accumulate"),
]


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(strategy, *args)``: that run of ``sharded_run.py``; the runs of ``PLAN`` (without DeepSpeed's where it is
    not installed) come from one launch at the first request, any other run from a launch of its own."""
    done: dict[tuple[str, ...], Run] = {}
    launched = []  # the plan's launch, once: a launch that timed out is not tried again by every later test

    def get(strategy: str, *args: str) -> Run:
        key = (strategy, *args)
        needs(strategy)
        plan = [run for run in PLAN if deepspeed_installed() or not run[0].startswith("deepspeed")]
        if key not in done and key in plan:
            if launched:
                pytest.fail("the launch of the planned runs failed (see the first test that needed it)")
            launched.append(True)
            done.update(launch_plan(SCRIPT, tmp_path_factory.mktemp("plan"), plan))
        if key not in done:
            done[key] = launch(tmp_path_factory.mktemp("_".join(key).replace("-", "")), strategy, *args)
        done[key].check()
        return done[key]

    return get


def max_weight_difference(a: dict, b: dict) -> float:
    assert a["weights"].keys() == b["weights"].keys() and a["weights"]
    return max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])


def assert_training_alone(run: Run, alone: Run) -> None:
    for rank in range(DEVICES):
        assert run.reports[rank]["weights"].keys() == alone.reports[rank]["weights"].keys()
        for name, tensor in alone.reports[rank]["weights"].items():
            assert torch.equal(run.reports[rank]["weights"][name], tensor), (rank, name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_is_bitwise_that_of_training_alone(runs, strategy):
    run, alone = runs(strategy), runs(strategy, "--no-callbacks")
    assert_training_alone(run, alone)
    # the check has teeth: the weights moved during training
    assert max_weight_difference(run.reports[0], {"weights": tiny_classifier().state_dict()}) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_parameters_are_sharded_or_whole_as_the_strategy_says(runs, strategy):
    run = runs(strategy)
    whole = sum(tensor.numel() for tensor in run.reports[0]["weights"].values())
    held = [run.reports[rank]["local_numel"] for rank in range(DEVICES)]
    if strategy in LOCKSTEP:  # what makes lockstep necessary: no rank holds the whole model between passes
        assert all(count < whole for count in held), (held, whole)
        assert sum(held) >= whole
    else:
        assert held == [whole] * DEVICES


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_work_runs_where_the_strategy_needs_it_and_every_rank_gets_rank_zeros_scalars(runs, strategy):
    run = runs(strategy)
    expected = dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS)
    assert run.reports[0]["runs"] == expected
    assert run.reports[1]["runs"] == (expected if strategy in LOCKSTEP else dict.fromkeys(CALLBACK_KEYS, 0))
    zero, one = (run.reports[rank]["scalars"] for rank in range(DEVICES))
    assert len(zero) == MAX_EPOCHS
    assert zero == one  # bit for bit: broadcast from rank zero
    names = set(zero[-1])
    for key in ("interp_probe/net.10/accuracy", "interp_gradcam/net.7/localization", "interp_probe/net.0/accuracy"):
        assert key in names, sorted(names)  # plain layer names, no wrapper prefix (FSDP1 wraps net.0 in a unit)
    assert any(name.startswith("interp_saliency/") for name in names)
    assert any(name.startswith("interp_similarity/") for name in names)
    for key in CALLBACK_KEYS:  # one probe set, rank zero's, everywhere
        assert torch.equal(run.reports[0]["probes"][key], run.reports[1]["probes"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_scalars_match_the_ddp_runs(runs, strategy):
    run, ddp = runs(strategy), runs("ddp")
    assert ddp.reports[1]["runs"] == dict.fromkeys(CALLBACK_KEYS, 0)  # DDP: rank zero alone works
    for key in CALLBACK_KEYS:
        assert torch.equal(run.reports[0]["probes"][key], ddp.reports[0]["probes"][key]), key
    # The trained weights differ by reduction order at most (measured: FSDP2 and FSDP1 6e-8, ZeRO 2 and 3 none)
    assert max_weight_difference(run.reports[0], ddp.reports[0]) < 1e-6
    for sharded, plain in zip(run.reports[0]["scalars"], ddp.reports[0]["scalars"], strict=True):
        assert sharded.keys() == plain.keys()
        for name, value in plain.items():
            assert sharded[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", LOCKSTEP)
def test_a_failure_on_one_rank_is_raised_on_both_and_leaves_training_as_it_was(runs, strategy):
    run = runs(strategy, "--fail-rank", "1")  # the backward of the first saliency pass raises on rank 1
    assert run.reports[1]["errors"] == ["InjectedError: injected failure on rank 1"]
    assert run.reports[0]["errors"] == [
        "PeerFailure: the callbacks' work failed on another rank (its error is raised there)"
    ]
    # the run went on after the caught failure (the other callbacks, the next epoch): its training is training alone's
    assert_training_alone(run, runs(strategy, "--no-callbacks"))
    for rank in range(DEVICES):
        assert run.reports[rank]["runs"] == {**dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS), "saliency": MAX_EPOCHS - 1}
    assert run.reports[0]["scalars"] == run.reports[1]["scalars"]


@pytest.mark.slow
def test_the_unsharded_window_explains_on_rank_zero_alone_with_one_gather_per_group_and_run(runs):
    window, lockstep, alone = runs("fsdp2", "--window"), runs("fsdp2"), runs("fsdp2", "--no-callbacks")
    assert_training_alone(window, alone)
    assert window.reports[0]["runs"] == dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS)
    assert window.reports[1]["runs"] == dict.fromkeys(CALLBACK_KEYS, 0)  # rank one only opens the windows
    zero, one = (window.reports[rank]["scalars"] for rank in range(DEVICES))
    assert zero == one and len(zero) == MAX_EPOCHS
    for in_window, in_lockstep in zip(zero, lockstep.reports[0]["scalars"], strict=True):
        assert set(in_lockstep) < set(in_window)  # the same scalars, and CAM's, which lockstep refuses
        assert "interp_gradcam/net.7/cam/localization" in in_window
        for name, value in in_lockstep.items():  # the same computation on the same whole weights
            assert in_window[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    groups = 4  # the three convolutions and the linear layer, each under fully_shard
    for rank in range(DEVICES):
        counts = zip(window.reports[rank]["collectives"], lockstep.reports[rank]["collectives"], strict=True)
        assert len(window.reports[rank]["collectives"]) == MAX_EPOCHS
        for opened, stepped in counts:
            gathers = sum(opened.get(name, 0) for name in Counter.GATHERS)
            assert gathers == groups * len(CALLBACK_KEYS), opened  # each callback's window gathers each group once
            assert gathers < sum(stepped.get(name, 0) for name in Counter.GATHERS), (opened, stepped)
            assert not any("reduce_scatter" in name for name in opened), opened  # no gradient is reduced


@pytest.mark.slow
@pytest.mark.parametrize("strategy", LOCKSTEP)
def test_maps_in_lockstep_are_an_unsharded_replicas(runs, strategy):
    """The DDP run is the unsharded replica: whole parameters on every rank, the same data and probe; its weights
    differ from the sharded runs' by reduction order alone (< 1e-6), so its maps may differ by as little."""
    sharded, replica = runs(strategy), runs("ddp")
    maps, reference = sharded.reports[0]["maps"], replica.reports[0]["maps"]
    assert maps.keys() == reference.keys() and {"gradient", "smoothgrad", "integrated_gradients"} <= set(maps)
    for name, expected in reference.items():
        assert expected.abs().max() > 0, name
        difference = (maps[name] - expected).abs().max() / expected.abs().max()
        assert difference < 1e-4, (name, float(difference))
        assert torch.equal(sharded.reports[1]["maps"][name], maps[name]), name  # every rank computed them alike


@pytest.mark.slow
def test_a_validation_between_micro_batches_leaves_fsdp2_accumulation_as_it_was(runs):
    run, alone = runs("fsdp2", "--accumulate"), runs("fsdp2", "--accumulate", "--no-callbacks")
    assert_training_alone(run, alone)
    assert run.reports[0]["runs"]["saliency"] == 2 * MAX_EPOCHS  # after each of the 2 batches of every epoch


@pytest.mark.slow
def test_fsdp1_refuses_a_validation_between_micro_batches_before_training(runs):
    """Measured before the refusal: FSDP1 asserted in its post-backward ("should use _saved_grad_shard") at the
    callbacks' backward pass after the first micro-batch, for use_orig_params True and False alike."""
    run = runs("fsdp1", "--accumulate")
    for rank in range(DEVICES):
        assert "accumulate_grad_batches=2 and val_check_interval=1" in run.reports[rank]["refused"], rank


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp2_leaves_training_as_it_was(runs):
    # Checkpointing recomputes the same forward pass: training alone with it is bitwise training alone without it
    # (measured), so the run without either is the reference; were that not so, this would fail, not pass.
    run, alone = runs("fsdp2", "--checkpointing"), runs("fsdp2", "--no-callbacks")
    assert_training_alone(run, alone)
    assert run.reports[0]["runs"] == dict.fromkeys(CALLBACK_KEYS, MAX_EPOCHS)
    plain = runs("fsdp2")  # checkpointing recomputes the forward pass: the same maps
    for name, expected in plain.reports[0]["maps"].items():
        torch.testing.assert_close(run.reports[0]["maps"][name], expected, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- refusals, in process


class ModelParallelStrategy:  # named as Lightning's: the checks read the strategy's type name
    def __init__(self, tensor_parallel_size: int) -> None:
        self._tensor_parallel_size = tensor_parallel_size


def fake_trainer(
    strategy: object, accumulate_grad_batches: int = 1, val_check_interval: int | float = 1.0
) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        strategy=strategy,
        world_size=2,
        limit_val_batches=1.0,
        accumulate_grad_batches=accumulate_grad_batches,
        val_check_interval=val_check_interval,
    )


def test_fsdp1_with_accumulation_is_refused_where_a_validation_can_fall_between_micro_batches():
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    for interval in (1, 3, 0.5):  # every batch, every third (not a multiple of 2), half an epoch: between
        with pytest.raises(ValueError, match=rf"accumulate_grad_batches=2 and val_check_interval={interval}"):
            check_strategy(SaliencyCallback(), fake_trainer(LightningFSDP(), 2, interval), supported=True)
    for interval in (1.0, 4):  # the end of every epoch (after its optimizer step), a multiple of 2 batches
        check_strategy(SaliencyCallback(), fake_trainer(LightningFSDP(), 2, interval), supported=True)
    check_strategy(SaliencyCallback(), fake_trainer(LightningFSDP(), 1, 1), supported=True)  # no accumulation


class FSDPStrategy:  # named as Lightning's FSDP1 strategy, with its keyword arguments for FSDP
    def __init__(self, **kwargs: object) -> None:
        self.kwargs = {"use_orig_params": True, **kwargs}  # Lightning's default: use_orig_params=True


class DeepSpeedStrategy:  # named as Lightning's, with its config
    def __init__(self, stage: int) -> None:
        self.config = {"zero_optimization": {"stage": stage}}


def test_tensor_parallelism_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*tensor_parallel_size=1"):
        SaliencyCallback().setup(fake_trainer(ModelParallelStrategy(2)), tiny_classifier(), "fit")


class RankZeroOnly(CalibrationCallback):  # every shipped callback runs in lockstep: a subclass that does not
    sharded_support = False


def test_a_callback_without_lockstep_refuses_sharded_strategies_and_says_what_to_do():
    refusal = r"RankZeroOnly does not support ModelParallelStrategy:.*sharded_support = False.*strategy='ddp'"
    with pytest.raises(ValueError, match=refusal):
        RankZeroOnly().setup(fake_trainer(ModelParallelStrategy(1)), tiny_classifier(), "fit")


@pytest.mark.parametrize(
    ("strategy", "lockstep"),
    [
        (ModelParallelStrategy(1), True),
        (FSDPStrategy(), True),
        (DeepSpeedStrategy(3), True),
        (DeepSpeedStrategy(2), False),
        (DeepSpeedStrategy(1), False),
    ],
    ids=["fsdp2", "fsdp1", "zero3", "zero2", "zero1"],
)
def test_sharded_parameters_mean_lockstep_and_refusal_of_the_others(strategy, lockstep):
    assert is_lockstep(fake_trainer(strategy)) is lockstep
    for supported in (True, False):
        if lockstep and not supported:
            with pytest.raises(ValueError, match=rf"does not support {type(strategy).__name__}.*strategy='ddp'"):
                check_strategy(CalibrationCallback(), fake_trainer(strategy), supported=False)
        else:  # whole parameters on every rank (rank zero works alone), or a lockstep callback
            check_strategy(CalibrationCallback(), fake_trainer(strategy), supported=supported)
    single = types.SimpleNamespace(strategy=strategy, world_size=1)
    assert not is_lockstep(single)  # one process: nothing to keep in step


def test_a_subclass_of_lightnings_strategies_takes_their_path():
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    class MyFSDP(LightningFSDP):  # a user's subclass, whatever its name
        pass

    assert strategy_kind(fake_trainer(MyFSDP())) == "fsdp1"
    assert is_lockstep(fake_trainer(MyFSDP()))
    with pytest.raises(ValueError, match="does not support MyFSDP:"):
        check_strategy(CalibrationCallback(), fake_trainer(MyFSDP()), supported=False)


def test_fsdp1_flat_parameters_with_gradient_accumulation_are_refused_at_setup(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    assert quiet_trainer(tmp_path, accumulate_grad_batches=4).accumulate_grad_batches == 4  # what the check reads
    flat = LightningFSDP(use_orig_params=False)  # Lightning's own strategy object: its kwargs hold the setting
    with pytest.raises(
        ValueError, match=r"use_orig_params=False\) with accumulate_grad_batches=4.*use_orig_params=True"
    ):
        SaliencyCallback().setup(fake_trainer(flat, accumulate_grad_batches=4), tiny_classifier(), "fit")
    # either alone is fine: Lightning's default use_orig_params=True, or no accumulation
    check_strategy(SaliencyCallback(), fake_trainer(LightningFSDP(), accumulate_grad_batches=4), supported=True)
    check_strategy(SaliencyCallback(), fake_trainer(flat, accumulate_grad_batches=1), supported=True)
    check_strategy(SaliencyCallback(), fake_trainer(FSDPStrategy(), accumulate_grad_batches=4), supported=True)
    with pytest.raises(ValueError, match="use_orig_params=False"):
        check_strategy(SaliencyCallback(), fake_trainer(FSDPStrategy(use_orig_params=False), 2), supported=True)


def test_fsdp1_without_sharding_is_refused_at_setup():
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    with pytest.raises(ValueError, match=r"sharding_strategy='NO_SHARD'.*state_dict.*strategy='ddp'"):
        SaliencyCallback().setup(fake_trainer(LightningFSDP(sharding_strategy="NO_SHARD")), tiny_classifier(), "fit")
    single = types.SimpleNamespace(strategy=LightningFSDP(), world_size=1, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match=r"a single device.*strategy='ddp'"):
        check_strategy(SaliencyCallback(), single, supported=True)
    policy = {nn.Conv2d}  # Lightning asks hybrid sharding for a wrapping policy
    for sharding in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"):
        strategy = LightningFSDP(sharding_strategy=sharding, auto_wrap_policy=policy)
        check_strategy(SaliencyCallback(), fake_trainer(strategy), supported=True)


def test_lightnings_deepspeed_strategy_is_read_at_its_zero_stage():
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeed

    for stage, lockstep in ((1, False), (2, False), (3, True)):
        trainer = fake_trainer(LightningDeepSpeed(stage=stage))
        assert is_lockstep(trainer) is lockstep, stage
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO stage 3.*DeepSpeed ZeRO stage 2"):
        RankZeroOnly().setup(fake_trainer(LightningDeepSpeed(stage=3)), tiny_classifier(), "fit")


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
    # a unit that takes its layer's name (FSDP1's auto-wrapping: ``net.0`` is the unit): the layer inside it
    units = nn.Sequential(Wrapper(checkpoint_wrapper(nn.Linear(2, 2))), nn.ReLU())
    assert module_name(units, "0") == "0._fsdp_wrapped_module._checkpoint_wrapped_module"
    assert isinstance(units.get_submodule(module_name(units, "0")), nn.Linear)
    assert module_name(units, "1") == "1"


def test_linear_probe_and_similarity_are_lockstep_callbacks():
    for kind in (SaliencyCallback, GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback):
        assert kind.sharded_support, kind


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, for FSDP1 wrappers in this process (destroyed after the test)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp1_wrapped(model: nn.Module) -> nn.Module:
    """``model`` under an FSDP1 root, its convolutions in units of their own (the linear layer stays with the root)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({nn.Conv2d})
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))


def test_fsdp1_calls_go_through_the_root_wrapper_also_for_a_forward_fn(one_process_group):
    from lightning_interp.callbacks._sharding import ThroughRoot

    model = tiny_classifier()
    inputs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(inputs)
    view = ThroughRoot(model, fsdp1_wrapped(model))  # a fresh root: its first call sets up every unit
    with torch.no_grad():
        assert torch.allclose(view(inputs), expected)
        # a forward_fn calling a sub-module directly runs inside the root's forward (the root's own parameters, the
        # linear layer's, are gathered there)
        doubled = view.redirect(lambda module, x: module.net(x) * 2)
        assert torch.allclose(doubled(view, inputs), 2 * expected)
    assert "forward" not in vars(model)  # the model's own forward is back

    def fails(module, x):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        view.redirect(fails)(view, inputs)
    assert "forward" not in vars(model)
    # the names are the model's own: the layers themselves, inside their units
    assert isinstance(view.get_submodule(module_name(view, "net.0")), nn.Conv2d)
    assert module_name(view, "net.0") == "net.0._fsdp_wrapped_module"

    # what the view avoids: calling the model itself first makes an inner unit a root, and the real root then fails
    other = tiny_classifier()
    root = fsdp1_wrapped(other)
    with torch.no_grad():
        other(inputs)
        with pytest.raises(AssertionError, match="_is_root"):
            root(inputs)
