"""Mixed precision: the callbacks run in the trainer's autocast context and hand float32 maps onwards."""

from __future__ import annotations

import torch

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule


def test_bf16_mixed_on_cpu_gives_finite_float32_maps(tmp_path):
    saliency = SaliencyCallback(methods=("gradient", "smoothgrad", "integrated_gradients"), num_samples=4)
    gradcam = GradCAMCallback(num_samples=4)
    seen_autocast = []
    original = gradcam._explain

    def spy(*args, **kwargs):
        seen_autocast.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    gradcam._explain = spy
    probe = LinearProbeCallback(num_samples=32)
    similarity = RepresentationSimilarityCallback(num_samples=32)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[saliency, gradcam, probe, similarity], logger=False, precision="bf16-mixed"
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert seen_autocast == [True, True], "the trial before training and the run: both in the precision context"
    for callback in (saliency, gradcam):
        assert callback._previous, "the callback must have run"
        for name, maps in callback._previous.items():
            assert maps.dtype == torch.float32 and torch.isfinite(maps).all(), name
    for name, value in trainer.callback_metrics.items():
        if name.startswith(("interp_probe/", "interp_similarity/")) and name.endswith(("accuracy", "cka_vs_start")):
            assert torch.isfinite(value), name
    assert similarity._start_grams.dtype == torch.float32


def test_a_bf16_true_model_gets_smoothgrad_and_ig_in_its_own_dtype(tmp_path):
    # the noise and the path steps are added in float32 and handed to the model in bfloat16 (before: a dtype crash)
    saliency = SaliencyCallback(
        methods=("gradient", ("smoothgrad", {"n_samples": 4}), ("integrated_gradients", {"n_steps": 4})), num_samples=4
    )
    callbacks = [saliency, GradCAMCallback(num_samples=4), LinearProbeCallback(num_samples=16)]
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=False, precision="bf16-true")
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert all(callback._runs == 1 for callback in callbacks)
    for name, maps in saliency._previous.items():
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and maps.abs().sum() > 0, name
