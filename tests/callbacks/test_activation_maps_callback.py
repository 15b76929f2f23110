"""ActivationMapsCallback in real Trainer runs: event files, values against hooks, fixed channels, resume, errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_interp import ActivationMapsCallback
from lightning_interp.demo import ImageClassifier, shapes_cnn
from tests.conftest import NetClassifier, quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def _hooked_output(model, module, inputs):
    seen = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return seen[0]


def test_logs_a_grid_per_layer_and_scalars_that_match_a_hook(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = tiny_classifier()
    callback = ActivationMapsCallback(num_samples=8, channels=3)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=2)
    trainer.fit(model, datamodule=tiny_datamodule())
    assert callback.layers == ["net.1", "net.4", "net.7"]  # each convolution's ReLU output
    events = read_events(logger.log_dir)
    steps = [trainer.global_step // 2 - 1, trainer.global_step - 1]  # Lightning's step of each validation
    for layer in callback.layers:
        assert events.image_steps(f"interp_activations/{layer}/maps") == steps
        for metric in ("dead_fraction", "mean_activation", "sparsity"):
            assert events.scalar_steps(f"interp_activations/{layer}/{metric}") == steps
    sizes = {size for layer in callback.layers for _, size in events.images[f"interp_activations/{layer}/maps"]}
    assert all(h > 8 * 96 and w > 5 * 96 for h, w in sizes)  # 8 rows; input, mean and 3 channels, each >= 96 px
    # the last values against the trained model's own outputs, read by a plain hook
    assert callback.probe is not None
    output = _hooked_output(model, model.net[7], callback.probe.inputs)
    never_positive = (output.transpose(0, 1).reshape(output.shape[1], -1) <= 0).all(dim=1).float().mean()
    logged = dict(events.scalars["interp_activations/net.7/dead_fraction"])[trainer.global_step - 1]
    assert logged == pytest.approx(float(never_positive), abs=1e-6)
    sparsity = dict(events.scalars["interp_activations/net.7/sparsity"])[trainer.global_step - 1]
    assert sparsity == pytest.approx(float((output <= 0).float().mean()), abs=1e-6)
    mean = dict(events.scalars["interp_activations/net.7/mean_activation"])[trainer.global_step - 1]
    assert mean == pytest.approx(float(output.mean()), rel=1e-4)


def test_dead_units_of_a_network_built_with_dead_channels(tmp_path):
    conv = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():  # channels 0 and 5: zero weights, negative bias, and no gradient to revive them
        conv.weight[[0, 5]] = 0.0
        conv.bias[[0, 5]] = -1.0
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    net[0].weight.register_hook(lambda g: g * torch.tensor([0, 1, 1, 1, 1, 0.0])[:, None, None, None])
    net[0].bias.register_hook(lambda g: g * torch.tensor([0, 1, 1, 1, 1, 0.0]))
    callback = ActivationMapsCallback(layers="net.1", channels=[0, 1], num_samples=8)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    trainer.fit(NetClassifier(net), datamodule=tiny_datamodule())
    dead = trainer.callback_metrics["interp_activations/net.1/dead_fraction"].item()
    assert dead == pytest.approx(2 / 6)
    assert callback._shown == {"net.1": [0, 1]}


def test_shown_channels_are_fixed_at_the_first_run_and_kept_on_resume(tmp_path):
    pl.seed_everything(1, verbose=False)
    model = tiny_classifier()
    callback = ActivationMapsCallback(layers=["net.4"], channels=4, num_samples=8)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = quiet_trainer(
        tmp_path, callbacks=[callback, checkpoint], logger=False, max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=tiny_datamodule())
    assert callback.probe is not None
    # the most active channels of the model as it was at that validation (the end of epoch 1), by hand
    output = _hooked_output(model, model.net[4], callback.probe.inputs)
    expected = output.mean(dim=(0, 2, 3)).sort(descending=True, stable=True).indices[:4].tolist()
    assert callback._shown["net.4"] == expected

    resumed = ActivationMapsCallback(layers=["net.4"], channels=4, num_samples=8)
    trainer = quiet_trainer(tmp_path, callbacks=[resumed], logger=False, max_epochs=4)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed._runs == 4
    assert resumed._shown["net.4"] == expected  # same units on the slider, though the model trained on

    fresh = ActivationMapsCallback(layers=["net.4"], channels=4, num_samples=8)
    fresh.load_state_dict({})  # a checkpoint written before this state existed
    assert fresh._shown == {}


def test_a_callback_reused_in_a_new_fit_chooses_its_channels_again(tmp_path):
    callback = ActivationMapsCallback(layers=["net.4"], channels=2, num_samples=4)
    quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1).fit(
        tiny_classifier(), datamodule=tiny_datamodule()
    )
    pl.seed_everything(5, verbose=False)
    other = tiny_classifier(width=8)  # 16 channels at net.4: the first fit's choice does not apply
    quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1).fit(other, datamodule=tiny_datamodule())
    assert callback.probe is not None
    output = _hooked_output(other, other.net[4], callback.probe.inputs)
    expected = output.mean(dim=(0, 2, 3)).sort(descending=True, stable=True).indices[:2].tolist()
    assert callback._shown["net.4"] == expected


def test_runs_under_validate_in_inference_mode(tmp_path):
    callback = ActivationMapsCallback(layers=["net.7"], num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    trainer.validate(tiny_classifier(), datamodule=tiny_datamodule(), verbose=False)
    assert callback._runs == 1
    assert 0.0 <= trainer.callback_metrics["interp_activations/net.7/sparsity"].item() <= 1.0


def test_resnet_and_vision_transformer_layers(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(num_classes=4)
    callback = ActivationMapsCallback(num_samples=4, channels=2)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=1)
    trainer.fit(NetClassifier(resnet), datamodule=tiny_datamodule(image_size=32))
    # the stages that keep spatial extent (layer4 is 1 x 1 at 32 x 32 pixels); conv1 is followed by its BatchNorm
    assert callback.layers == ["net.conv1", "net.layer1", "net.layer2", "net.layer3"]
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=4
    )
    layer = "net.encoder.layers.encoder_layer_1"
    callback = ActivationMapsCallback(layers=[layer], num_samples=4, channels=3)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=1)
    trainer.fit(NetClassifier(vit), datamodule=tiny_datamodule())
    assert callback._spatial[layer]  # tokens read as the 4 x 4 patch grid
    assert len(callback._shown[layer]) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": ["net.99"]}, "net.99"),
        ({"layers": ["net.4"], "channels": [2, 40]}, r"has 8 channels.*\[40\]"),
        ({"layers": ["net.4"], "channels": {"net.7": [0]}}, "no channels for layers"),
        ({"layers": ["net.4", "net.7"], "channels": {"net.4": [0], "net.7": [0], "net.1": [0]}}, "not among layers"),
    ],
)
def test_mistakes_are_reported_before_training(tmp_path, options, message):
    model = ImageClassifier(shapes_cnn(num_classes=4, width=4))
    started = []
    model.on_train_batch_start = lambda *args: started.append(1)
    with pytest.raises((ValueError, AttributeError), match=message):
        callback = ActivationMapsCallback(num_samples=4, **options)
        quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1).fit(
            model, datamodule=tiny_datamodule()
        )
    assert not started


def test_a_module_used_twice_is_refused(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

        def forward(self, x):
            return self.head(self.act(self.b(self.act(self.a(x)))))

    callback = ActivationMapsCallback(layers=["net.act"], num_samples=4)
    with pytest.raises(ValueError, match="runs 2 times"):
        quiet_trainer(tmp_path, callbacks=[callback], logger=False).fit(
            NetClassifier(Shared()), datamodule=tiny_datamodule()
        )


@pytest.mark.parametrize("channels", [0, -1, [], [1, 1], "3", [1.5], {"net.4": []}, True])
def test_bad_channel_options(channels):
    with pytest.raises(ValueError, match="channels"):
        ActivationMapsCallback(channels=channels)
