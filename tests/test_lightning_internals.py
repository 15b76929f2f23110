"""The four facts lightning-interp reads from Lightning's internals (``lightning_interp/_lightning.py``). Each has a
fallback that degrades quietly, so these tests are what fails loudly when a Lightning release moves one of them."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_interp._lightning import batches_that_stepped, compiled_by_lightning, user_sampler, validation_source
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule


class _Watch(Callback):
    """Reads the validation source at setup, where the callbacks draw their probe."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        source = validation_source(trainer, name)
        self.seen[name] = source
        if source is not None and source.is_defined():
            self.seen[f"{name} loader"] = source.dataloader()


def test_the_validation_source_is_there_at_setup_for_fit_and_validate(tmp_path):
    watch = _Watch()
    trainer = quiet_trainer(tmp_path, callbacks=[watch], logger=False, max_epochs=1)
    data = tiny_datamodule()
    trainer.fit(tiny_classifier(), datamodule=data)
    loader = DataLoader(TensorDataset(torch.rand(8, 3, 16, 16), torch.arange(8) % 4), batch_size=4)
    trainer.validate(tiny_classifier(), dataloaders=loader, verbose=False)
    assert watch.seen["fit"] is not None and watch.seen["fit"].is_defined()
    assert isinstance(watch.seen["fit loader"], DataLoader)
    assert watch.seen["validate loader"] is loader


def test_a_lightning_module_unwrapped_from_torch_compile_is_known():
    from lightning.pytorch.utilities.compile import _maybe_unwrap_optimized  # what trainer.fit calls

    module = tiny_classifier()
    assert not compiled_by_lightning(module)
    unwrapped = _maybe_unwrap_optimized(torch.compile(module))  # compiles nothing until called
    assert unwrapped is module and compiled_by_lightning(unwrapped)


def test_the_users_sampler_is_found_inside_lightnings_distributed_wrapper():
    data = TensorDataset(torch.arange(10))
    mine = RandomSampler(data, generator=torch.Generator().manual_seed(0))
    wrapper = DistributedSamplerWrapper(mine, num_replicas=2, rank=0, shuffle=False)
    assert user_sampler(wrapper) is mine
    assert user_sampler(mine) is None


def test_the_logging_step_is_the_count_of_batches_that_stepped(tmp_path):
    trainer = quiet_trainer(tmp_path, logger=False, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert batches_that_stepped(trainer) == trainer.global_step == 3
