"""Failures that used to come at the end of the first training epoch now come before the first training step.

At fit start each callback checks what it can against the model and its probe samples and tries its computation
on two of them; a mistake is reported with what was found and how to fix it, and ``trainer.global_step == 0``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.probe import ProbeSet, parse_batch
from tests.conftest import NetClassifier, quiet_trainer, tiny_classifier, tiny_datamodule

Classifier = NetClassifier  # any network on (x, y) batches: cross-entropy, or BCE for a single logit


def _images(count: int = 32, classes: int = 4, size: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.rand(count, 3, size, size, generator=generator), torch.arange(count) % classes)
    return DataLoader(data, batch_size=8)


def _fails_before_training(tmp_path, model, callback, loader=None, message="", **trainer_options):
    loader = loader or _images()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False, **trainer_options)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=message):
        trainer.fit(model, loader, loader)
    assert trainer.global_step == 0, "the error must come before the first training step"


def _conv_net(outputs: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, outputs)
    )


def test_label_target_on_a_single_logit_model(tmp_path):
    model = Classifier(_conv_net(outputs=1))
    _fails_before_training(
        tmp_path, model, SaliencyCallback(target="label"), _images(classes=3), message=r"one score per class"
    )


def test_probe_labels_beyond_the_models_classes(tmp_path):
    model = Classifier(_conv_net(outputs=4))
    _fails_before_training(tmp_path, model, GradCAMCallback(target="label"), _images(classes=6), message="from 0 to 5")


@pytest.mark.parametrize(
    ("classes", "count", "num_samples", "message"),
    [(1, 32, 16, "at least two classes"), (4, 32, 4, "single probe sample")],
    ids=["one-class", "one-sample-per-class"],
)
def test_linear_probe_without_two_classes_or_held_out_samples(tmp_path, classes, count, num_samples, message):
    model = Classifier(_conv_net(outputs=4))
    loader = _images(count=count, classes=classes)
    _fails_before_training(tmp_path, model, LinearProbeCallback(num_samples=num_samples), loader, message=message)


class FrozenBackbone(nn.Module):
    """A backbone run under torch.no_grad() (a common way to freeze it): nothing before the head has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


@pytest.mark.parametrize(
    "callback",
    [lambda: SaliencyCallback(methods=("gradient",)), lambda: GradCAMCallback(layer="net.backbone.1")],
    ids=["saliency", "gradcam"],
)
def test_a_backbone_under_no_grad(tmp_path, callback):
    # before: saliency logged maps that were zero everywhere; Grad-CAM failed after the first epoch
    _fails_before_training(tmp_path, Classifier(FrozenBackbone()), callback(), message="require|differentiable path")


class ReentrantCheckpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=True))


def test_gradcam_inside_a_reentrant_checkpoint(tmp_path):
    callback = GradCAMCallback(layer="net.block.1")
    message = r"layer 'net\.block\.1' does not require a gradient.*reentrant checkpoint"
    _fails_before_training(tmp_path, Classifier(ReentrantCheckpointed()), callback, message=message)


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, tokens, 6)
        tokens = self.embed(x)
        mixed, _ = self.attention(tokens, tokens, tokens)
        return self.head(mixed.mean(dim=1))


def test_a_multihead_attention_module_named_as_a_probe_layer(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 5, 6, generator=generator), torch.arange(32) % 3)
    loader = DataLoader(data, batch_size=8)
    callback = LinearProbeCallback(layers=["net.attention"], num_samples=16)
    _fails_before_training(tmp_path, Classifier(WithAttention()), callback, loader, message="returns no tensor")


class VideoNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)


def test_video_inputs_to_saliency(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 3, 4, 8, 8, generator=generator), torch.arange(16) % 2)
    loader = DataLoader(data, batch_size=8)
    _fails_before_training(tmp_path, Classifier(VideoNet()), SaliencyCallback(), loader, message="video")


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


def test_saliency_on_integer_token_inputs(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(20, (16, 7), generator=generator), torch.arange(16) % 2)
    loader = DataLoader(data, batch_size=8)
    _fails_before_training(tmp_path, Classifier(TokenClassifier()), SaliencyCallback(), loader, message="token ids")


def test_integer_pixels_still_work(tmp_path):
    # uint8 images are attributed as floats, as before: only inputs that cannot take a gradient are refused
    class FromBytes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = shapes_cnn(width=4)

        def forward(self, x):
            return self.net(x.float() / 255)

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(256, (16, 3, 16, 16), generator=generator, dtype=torch.uint8), torch.arange(16) % 4
    )
    loader = DataLoader(data, batch_size=8)
    callback = SaliencyCallback(methods=("gradient", ("integrated_gradients", {"n_steps": 4})), num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(ImageClassifier(FromBytes()), loader, loader)
    assert callback._runs == 1


def test_a_trial_failure_says_it_happened_before_training(tmp_path):
    model = Classifier(FrozenBackbone())
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[SaliencyCallback()], logger=False)
    with pytest.raises(RuntimeError) as caught:
        trainer.fit(model, _images(), _images())
    assert any("before training" in note for note in getattr(caught.value, "__notes__", []))


def test_a_healthy_model_passes_every_check_and_trains(tmp_path):
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[RepresentationSimilarityCallback(num_samples=8)], logger=False
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())  # a healthy model passes every check
    assert trainer.global_step > 0


def test_integer_pixels_with_no_gradient_path_get_the_gradient_path_message(tmp_path):
    class BytesFrozen(FrozenBackbone):
        def forward(self, x):
            return super().forward(x.float() / 255)

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(256, (16, 3, 8, 8), generator=generator, dtype=torch.uint8)
    loader = DataLoader(TensorDataset(pixels, torch.arange(16) % 4), batch_size=8)
    _fails_before_training(tmp_path, Classifier(BytesFrozen()), SaliencyCallback(), loader, "differentiable path")


def test_masks_of_the_wrong_size_are_refused_or_left_out_with_a_warning(tmp_path):
    inputs = torch.rand(8, 3, 8, 8)
    probe = ProbeSet(inputs, torch.arange(8) % 4, torch.ones(8, 4, 4, dtype=torch.bool))
    model = Classifier(_conv_net(outputs=4))
    _fails_before_training(tmp_path, model, GradCAMCallback(probe=probe), message=r"masks are \(4, 4\)")
    # a dict batch whose mask key holds masks of another grid: left out, with a warning where the batch is read
    with pytest.warns(UserWarning, match=r"batch\['mask'\] of shape \(2, 4, 4\) looks like masks"):
        parsed = parse_batch(
            {"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 1]), "mask": torch.ones(2, 4, 4)}
        )
    assert parsed.masks is None and parsed.labels.tolist() == [0, 1]
    with pytest.warns(UserWarning, match=r"shape \(2, 4, 4\) looks like masks"):  # the same in a tuple batch
        parsed = parse_batch((torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.ones(2, 4, 4)))
    assert parsed.masks is None


def test_probe_samples_with_nan_are_refused_with_their_indices(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 8, 8, generator=generator)
    images[5, 0, 2, 2] = float("nan")
    images[9, 1, 0, 0] = float("inf")
    loader = DataLoader(TensorDataset(images, torch.arange(32) % 4), batch_size=8)
    model = Classifier(_conv_net(outputs=4))
    _fails_before_training(
        tmp_path, model, LinearProbeCallback(num_samples=32), loader, message=r"2 of the 32 probe samples"
    )


def test_a_given_probe_set_of_the_wrong_form_says_so(tmp_path):
    probe = ProbeSet(torch.rand(4, 1, 8, 8), torch.arange(4))  # one channel; the model takes three
    model = Classifier(_conv_net(outputs=4))
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[SaliencyCallback(probe=probe)], logger=False)
    with pytest.raises(RuntimeError) as caught:
        trainer.fit(model, _images(), _images())
    assert trainer.global_step == 0
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "probe inputs of shape (1, 1, 8, 8)" in notes and "ProbeSet given to it as probe=" in notes
