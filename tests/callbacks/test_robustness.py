"""Bad input and odd runs: a clear error at setup, or one warning and a safe skip; training goes on."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier, shapes_cnn
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def _all_callbacks():
    return [
        SaliencyCallback(methods=("gradient", "smoothgrad", ("integrated_gradients", {"n_steps": 4})), num_samples=4),
        GradCAMCallback(num_samples=4),
        LinearProbeCallback(num_samples=32),
        RepresentationSimilarityCallback(num_samples=32),
    ]


class NaNInEval(nn.Module):
    """Passes its input through in training, turns it into NaN in eval mode (as a diverged layer would)."""

    def forward(self, x):
        return x if self.training else x * float("nan")


def test_nan_activations_give_nan_scores_and_warnings_not_a_crash(tmp_path):
    net = shapes_cnn(width=4)
    net.insert(6, NaNInEval())  # after the second block
    callbacks = _all_callbacks()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=TensorBoardLogger(str(tmp_path)))
    with pytest.warns(UserWarning, match="NaN"):
        trainer.fit(ImageClassifier(net), datamodule=tiny_datamodule())
    assert trainer.current_epoch == 1, "training must go on"
    metrics = trainer.callback_metrics
    assert torch.isnan(metrics["interp_saliency/gradient/concentration"])
    assert torch.isnan(metrics["interp_probe/net.11/accuracy"])  # the head sees NaN
    assert not torch.isnan(metrics["interp_probe/net.0/accuracy"])  # the first conv does not
    events = read_events(str(tmp_path))
    assert "interp_saliency/maps/rows_1-2" in events.images and "interp_similarity/cka" in events.images


class TupleOutput(ImageClassifier):
    """A model that returns (logits, embedding), as many real models do."""

    def forward(self, x):
        return self.net(x), x.mean(dim=(2, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])[0], batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0])[0], batch[1]))


def test_several_outputs_need_output_transform_and_say_so_at_setup(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[SaliencyCallback(num_samples=4)], logger=False)
    with pytest.raises(TypeError, match="output_transform"):
        trainer.fit(TupleOutput(shapes_cnn(width=4)), datamodule=tiny_datamodule())

    def pick(out):
        return out[0]

    callbacks = [
        SaliencyCallback(num_samples=4, output_transform=pick),
        GradCAMCallback(num_samples=4, output_transform=pick),
    ]
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=False)
    trainer.fit(TupleOutput(shapes_cnn(width=4)), datamodule=tiny_datamodule())
    assert all(callback._runs == 1 for callback in callbacks)


def test_fixed_target_beyond_the_classes_fails_at_setup(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[GradCAMCallback(target=9)], logger=False)
    with pytest.raises(ValueError, match="4 classes: 0 to 3"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())


def test_trainer_test_warns_once_and_logs_nothing(tmp_path):
    callbacks = _all_callbacks()
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=False)
    with pytest.warns(UserWarning, match=r"trainer\.test") as record:
        trainer.test(tiny_classifier(), datamodule=tiny_datamodule())
    assert len([w for w in record if "trainer.test" in str(w.message)]) == len(callbacks)  # one per callback
    assert all(callback._runs == 0 for callback in callbacks)


def test_a_run_without_validation_warns_at_setup_and_at_the_end(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[GradCAMCallback()], logger=False, limit_val_batches=0)
    with pytest.warns(UserWarning) as record:
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    messages = [str(w.message) for w in record]
    assert any("limit_val_batches=0" in m for m in messages)
    assert any("never ran" in m for m in messages)


def test_every_n_epochs_beyond_the_run_warns_that_nothing_ran(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[SaliencyCallback(every_n_epochs=5)], logger=False)
    with pytest.warns(UserWarning, match="never ran"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())


@pytest.mark.parametrize("factory", [lambda: GradCAMCallback(), lambda: LinearProbeCallback()])
def test_fsdp1_on_one_device_is_refused_at_setup(factory):
    """FSDP1 does not shard on one device (NO_SHARD), and there the callbacks' backward pass would leave the model's
    parameters unregistered (tests/callbacks/test_sharded.py has the sharded cases)."""
    fake_trainer = types.SimpleNamespace(
        strategy=FSDPStrategy(), limit_val_batches=1.0, world_size=1, accumulate_grad_batches=1
    )
    with pytest.raises(ValueError, match=r"FSDPStrategy with a single device.*strategy='ddp'"):
        factory().setup(fake_trainer, tiny_classifier(), "fit")


def test_maps_that_are_zero_everywhere_are_reported_once_with_the_reason(tmp_path):
    net = shapes_cnn(width=4)
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()  # the first conv's output is zero everywhere, so its Grad-CAM map is too
    callback = GradCAMCallback(layer="net.0", num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    with pytest.warns(UserWarning, match=r"every map of 'net\.0' is zero.*positive evidence only") as record:
        trainer.validate(ImageClassifier(net), datamodule=tiny_datamodule())
    assert torch.isnan(trainer.callback_metrics["interp_gradcam/net.0/concentration"])
    assert len([w for w in record if "every map of" in str(w.message)]) == 1
