"""What a validation costs a GPU, counted on the CPU: the default callbacks' budget of ops and host syncs, and no
callback whose syncs grow with the layers, the samples or a method's steps.

The census is benchmarks/bench_cost.py's (aten ops, and host syncs both at dispatch and as Python reads of tensor
values); the counts are deterministic, unlike times.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from lightning_interp import (
    CAVOptions,
    ConceptCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ProbeSet,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    TCAVTest,
)
from lightning_interp.synthetic import make_shapes
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
BUDGET_OPS, BUDGET_SYNCS = 4000, 40  # issue 26: the four default callbacks together, per validation


def _bench_cost():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_cost
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench_cost


def _syncs_of_last_validation(tmp_path, callback, datamodule=None) -> int:
    datamodule = datamodule or tiny_datamodule(val_size=48)
    counted = _bench_cost()._Counted(callback)
    torch.manual_seed(0)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback], logger=False)
    trainer.fit(tiny_classifier(), datamodule=datamodule)
    assert counted.last is not None and counted.last.ops > 0, "no validation was counted"
    return sum(counted.last.syncs.values())


def _labelled_probe(n: int) -> ProbeSet:
    g = torch.Generator().manual_seed(1)
    return ProbeSet(torch.rand(n, 3, 16, 16, generator=g), labels=torch.arange(n) % 4)


def _concepts(count: int) -> dict[str, torch.Tensor]:
    images, labels, _ = make_shapes(96, image_size=16, seed=5)
    return {f"shape {k}": images[labels == k][:12] for k in range(count)}


GROWTH = {
    "saliency: samples": lambda size: SaliencyCallback(probe=_labelled_probe(4 * size)),
    "saliency: integration steps": lambda size: SaliencyCallback(
        methods={"integrated_gradients": {"n_steps": 8 * size, "internal_batch_size": 8}}, num_samples=4
    ),
    "saliency: smoothgrad copies": lambda size: SaliencyCallback(
        methods={"smoothgrad": {"n_samples": 4 * size, "internal_batch_size": 4}}, num_samples=4
    ),
    "grad-cam: layers": lambda size: GradCAMCallback(layer=["net.0", "net.3", "net.6"][: 1 + size], num_samples=4),
    "linear probe: layers": lambda size: LinearProbeCallback(
        layers=["net.0", "net.3", "net.6", "net.10"][: 2 * size], num_samples=32
    ),
    "linear probe: samples": lambda size: LinearProbeCallback(
        layers=["net.3", "net.10"], probe=_labelled_probe(16 * size)
    ),
    "concepts: layers, concepts and random sets": lambda size: ConceptCallback(
        _concepts(size),
        layers=["net.3", "net.7"][:size],
        num_samples=48,
        test=TCAVTest(n_random=2 + size, random_set_size=5),
        cav=CAVOptions(min_accuracy=0.0),
    ),
}


@pytest.mark.parametrize("make", GROWTH.values(), ids=GROWTH.keys())
def test_syncs_do_not_grow_with_layers_samples_or_steps(tmp_path, make):
    small = _syncs_of_last_validation(tmp_path / "small", make(1))
    large = _syncs_of_last_validation(tmp_path / "large", make(2))
    assert small == large, f"{small} host syncs with the smaller setting, {large} with the larger"
    assert small <= 5  # concepts: the flags, one copy of every number (cpu + numpy), the labels' range


@pytest.mark.slow
def test_the_four_default_callbacks_stay_within_the_budget_on_resnet18():
    """torchvision resnet18 on 3x32x32 (the issue's configuration, 256 validation samples so that the probe callbacks
    take several forward chunks): the four default callbacks' last validation together."""
    pytest.importorskip("torchvision")
    bench_cost = _bench_cost()
    makers = {
        "saliency": SaliencyCallback,
        "grad-cam": GradCAMCallback,
        "linear probe": LinearProbeCallback,
        "similarity": RepresentationSimilarityCallback,
    }
    counts = {}
    for name, make in makers.items():
        census = bench_cost.census(make, val_size=256, quick=True, device="cpu")
        assert not isinstance(census, str), f"{name}: {census}"
        counts[name] = (census.ops, sum(census.syncs.values()))
    ops, syncs = (sum(values) for values in zip(*counts.values(), strict=True))
    assert syncs <= BUDGET_SYNCS and ops <= BUDGET_OPS, counts
    assert all(count <= 4 for _, count in counts.values()), counts  # each one transfer or a few
