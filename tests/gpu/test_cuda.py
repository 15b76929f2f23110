"""On a GPU, as users train: a model created on the CPU, ``accelerator="gpu"``, every callback, every precision.

Skipped without CUDA (see ``conftest.py``). Checks that nothing runs before Lightning has moved the model, that
maps and scores computed on the GPU equal those computed on the CPU within float32 tolerance, and that training
stays bit-identical with and without the callbacks (``deterministic=True``).
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import GradCAMCallback, LinearProbeCallback, RepresentationSimilarityCallback, SaliencyCallback
from lightning_interp.demo import ImageClassifier
from lightning_interp.methods import (
    METHODS,
    attribute,
    cka_matrix,
    concentration,
    grad_cam,
    gradient,
    gram_dtype_for,
    integrated_gradients,
    linear_probe_accuracy,
    rank_correlation,
    rdm,
    rsa,
)
from tests.conftest import BatchNormDropoutNet, quiet_trainer, read_events, tiny_classifier, tiny_datamodule
from tests.gpu.conftest import ACCELERATOR, DEVICE


def _reference_model() -> BatchNormDropoutNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # the same reference network in every run compared
        return BatchNormDropoutNet()


def _all_callbacks(smoothgrad: bool = True, cam_layers: tuple[str, ...] = ("net.4", "net.7")):
    methods = ["gradient", ("integrated_gradients", {"n_steps": 8})]
    if smoothgrad:
        methods.insert(1, ("smoothgrad", {"n_samples": 4}))
    return [
        SaliencyCallback(methods=methods, num_samples=4),
        GradCAMCallback(layer=list(cam_layers), num_samples=4),
        LinearProbeCallback(num_samples=32),
        RepresentationSimilarityCallback(num_samples=32, reference_model=_reference_model()),
    ]


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_a_model_created_on_the_cpu_trains_on_the_gpu_with_every_callback(tmp_path, precision):
    if DEVICE == "cpu" and precision == "16-mixed":
        pytest.skip("16-mixed needs CUDA")
    torch.manual_seed(0)
    model = tiny_classifier()
    assert next(model.parameters()).device.type == "cpu"  # the normal case: Lightning moves it
    callbacks = _all_callbacks()
    trainer = quiet_trainer(
        tmp_path,
        accelerator=ACCELERATOR,
        precision=precision,
        max_epochs=2,
        callbacks=callbacks,
        logger=TensorBoardLogger(str(tmp_path), name="gpu"),
    )
    trainer.fit(model, datamodule=tiny_datamodule())
    assert all(callback._runs == 2 for callback in callbacks)
    saliency, gradcam, _, similarity = callbacks
    for callback in (saliency, gradcam):
        for key, maps in callback._previous.items():
            assert maps.device.type == DEVICE and maps.dtype == torch.float32, key
            assert torch.isfinite(maps).all(), key
    assert similarity._previous_grams.device.type == DEVICE
    events = read_events(str(tmp_path / "gpu"))
    steps = [step for step, _ in events.scalars["val_loss"]]  # Lightning's own step for each validation
    assert len(steps) == 2
    for tag in (
        "interp_saliency/maps/rows_1-2",
        "interp_gradcam/maps/rows_1-2",
        "interp_probe/accuracy_by_depth",
        "interp_similarity/rdm",
    ):
        assert events.image_steps(tag) == steps, tag
    for tag in (
        "interp_saliency/gradient/concentration",
        "interp_gradcam/net.7/localization",
        "interp_probe/net.10/accuracy",
        "interp_similarity/net.10/cka_vs_start",
        "interp_similarity/net.10/rsa_vs_labels",
    ):
        assert [step for step, _ in events.scalars[tag]] == steps, tag
        assert all(math.isfinite(value) for _, value in events.scalars[tag]), tag


def _validate_metrics(tmp_path, model, accelerator: str, name: str):
    callbacks = _all_callbacks(smoothgrad=False)  # SmoothGrad noise comes from a generator on each device
    trainer = quiet_trainer(tmp_path / name, accelerator=accelerator, callbacks=callbacks, logger=False)
    trainer.validate(model, datamodule=tiny_datamodule())
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("interp_")}
    maps = {f"{cb.name}/{key}": value.cpu() for cb in callbacks[:2] for key, value in cb._previous.items()}
    return metrics, maps


def test_maps_and_scores_on_the_gpu_equal_the_cpu_ones(tmp_path):
    torch.manual_seed(0)
    model = tiny_classifier()
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        model, datamodule=tiny_datamodule()
    )  # a little trained, so the maps and probes are not trivial
    cpu_metrics, cpu_maps = _validate_metrics(tmp_path, copy.deepcopy(model), "cpu", "cpu")
    gpu_metrics, gpu_maps = _validate_metrics(tmp_path, copy.deepcopy(model), ACCELERATOR, "gpu")
    assert cpu_metrics.keys() == gpu_metrics.keys() and len(cpu_metrics) > 20
    for key, value in cpu_metrics.items():
        other = gpu_metrics[key]
        if key.endswith("accuracy"):
            allowed = 1 / 16 + 1e-9  # a probe may flip one held-out sample of 16
        elif key.endswith("pointing_game"):
            allowed = 1 / 4 + 1e-9  # a near-tie of two peaks may flip one of 4 samples
        else:
            allowed = 2e-3
        assert math.isnan(value) == math.isnan(other) and (math.isnan(value) or abs(value - other) <= allowed), key
    for key, maps in cpu_maps.items():
        scale = maps.abs().max().clamp_min(1e-12)
        assert ((gpu_maps[key] - maps).abs().max() / scale) < 1e-3, key


def test_methods_on_the_gpu_equal_the_cpu_ones():
    torch.manual_seed(0)
    model = tiny_classifier().eval()
    x = torch.rand(6, 3, 16, 16)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    on = copy.deepcopy(model).to(DEVICE)
    xg, tg = x.to(DEVICE), target.to(DEVICE)
    for ours, theirs in (
        (gradient(model, x, target), gradient(on, xg, tg)),
        (integrated_gradients(model, x, target, n_steps=8), integrated_gradients(on, xg, tg, n_steps=8)),
        (grad_cam(model, x, target, "net.4"), grad_cam(on, xg, tg, "net.4")),
    ):
        torch.testing.assert_close(theirs.cpu(), ours, rtol=1e-4, atol=1e-5)
    fast = {"integrated_gradients": {"n_steps": 4}, "occlusion": {"window": (4, 4), "stride": (4, 4)}}
    for name, spec in METHODS.items():  # every deterministic method of the registry, the same on both devices
        if spec.stochastic:
            continue
        layer = {"layer": "net.7" if name == "cam" else "net.4"} if spec.needs_layer else {}  # CAM: the pooled layer
        ours = attribute(name, model, x, target, **layer, **fast.get(name, {}))
        theirs = attribute(name, on, xg, tg, **layer, **fast.get(name, {}))
        scale = ours.abs().max().clamp_min(1e-12)
        assert (theirs.cpu() - ours).abs().max() / scale < 1e-3, name
    maps = torch.rand(6, 16, 16)
    torch.testing.assert_close(concentration(maps.to(DEVICE)).cpu(), concentration(maps), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        rank_correlation(maps.to(DEVICE), maps.square().to(DEVICE)).cpu(), rank_correlation(maps, maps.square())
    )
    g = torch.Generator().manual_seed(1)
    feats = {"a": torch.randn(64, 300, generator=g), "b": torch.relu(torch.randn(64, 50, generator=g)) + 5}
    tolerance = 1e-10 if gram_dtype_for(DEVICE) == torch.float64 else 1e-7
    for debiased in (False, True):
        expected = cka_matrix(feats, debiased=debiased)
        found = cka_matrix({k: v.to(DEVICE) for k, v in feats.items()}, debiased=debiased)
        torch.testing.assert_close(found.cpu(), expected, rtol=0, atol=tolerance)
    first, second = rdm(feats["a"]), rdm(feats["b"])
    found = rsa(rdm(feats["a"].to(DEVICE)), rdm(feats["b"].to(DEVICE)))
    assert abs(found.item() - rsa(first, second).item()) < 1e-10
    labels = torch.arange(64) % 4
    separable = feats["a"] + 3 * torch.nn.functional.one_hot(labels, 300).float()
    assert (
        linear_probe_accuracy(separable.to(DEVICE), labels).accuracy
        == linear_probe_accuracy(separable, labels).accuracy
    )


def _train(tmp_path, callbacks):
    pl.seed_everything(123, verbose=False)
    model = ImageClassifier(BatchNormDropoutNet(), lr=5e-3)  # created on the CPU
    trainer = quiet_trainer(
        tmp_path,
        accelerator=ACCELERATOR,
        callbacks=callbacks,
        logger=False,
        deterministic=True,
        max_epochs=1,
        accumulate_grad_batches=2,
        val_check_interval=0.5,
    )
    trainer.fit(model, datamodule=tiny_datamodule())
    cuda_rng = torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.empty(0)
    return model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state(), cuda_rng


def test_training_is_bit_identical_with_and_without_the_callbacks(tmp_path):
    plain = _train(tmp_path / "plain", [])
    callbacks = _all_callbacks(cam_layers=("net.features.2", "net.features.5"))
    observed = _train(tmp_path / "with", callbacks)
    assert all(callback._runs >= 1 for callback in callbacks)
    for name, value in plain[0].items():
        assert torch.equal(value.cpu(), observed[0][name].cpu()), name
    for key, state in plain[1]["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(observed[1]["state"][key][field]).cpu())
    assert torch.equal(plain[2], observed[2]), "the CPU RNG advanced differently"
    assert torch.equal(plain[3], observed[3]), "the CUDA RNG advanced differently"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_vision_transformer_and_a_binary_model_on_the_gpu(tmp_path, precision):
    """The token-layout path (automatic layer by a gradient probe) and the binary output kind, on the device."""
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models import VisionTransformer

    from tests.conftest import NetClassifier

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 32, 32, generator=generator)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    vit.heads.head = torch.nn.Linear(32, 4)
    loader = DataLoader(TensorDataset(images, torch.arange(32) % 4), batch_size=8)
    cam = GradCAMCallback(num_samples=8)
    trainer = quiet_trainer(tmp_path, accelerator=ACCELERATOR, devices=1, precision=precision, max_epochs=1,
                            callbacks=[cam], logger=False)  # fmt: skip
    trainer.fit(NetClassifier(vit, lr=0.05), loader, loader)
    assert cam.layers == ["net.encoder.layers.encoder_layer_1.ln_1"]
    maps = cam._previous[cam.layers[0]]
    assert maps.device.type == DEVICE and bool(torch.isfinite(maps).all()) and float(maps.abs().max()) > 0

    one_logit = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(1)
    )
    one_logit(images[:1])
    binary = DataLoader(TensorDataset(images, torch.arange(32) % 2), batch_size=8)
    saliency = SaliencyCallback(methods=("gradient", ("integrated_gradients", {"n_steps": 8})), num_samples=8)
    trainer = quiet_trainer(tmp_path, accelerator=ACCELERATOR, devices=1, precision=precision, max_epochs=1,
                            callbacks=[saliency], logger=False)  # fmt: skip
    model = NetClassifier(one_logit, lr=0.05)
    trainer.fit(model, binary, binary)
    assert saliency.output_task == "binary"
    inputs = saliency.probe.inputs.to(DEVICE)
    expected = gradient(model.to(DEVICE), inputs, task="binary").abs().sum(dim=1)  # in float32, here
    ours = saliency._previous["gradient"].float()
    if precision == "32-true":
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    else:  # computed under bf16 autocast: the same map up to bf16 rounding
        assert float(rank_correlation(ours, expected).min()) > 0.9


def test_a_generators_code_space_on_the_gpu_and_the_deconvnet_reconstruction(tmp_path):
    """The generator, made on the CPU and not part of the LightningModule, is moved to the model's device at fit
    start and comes out unchanged; the deconvnet reconstruction of a feature map on the GPU equals the CPU one."""
    from lightning_interp import FeatureVisualizationCallback, ImageOptions
    from lightning_interp.methods import GeneratorCode, NeuronTarget, deconvnet

    torch.manual_seed(5)
    generator = torch.nn.Sequential(
        torch.nn.Linear(8, 3 * 16 * 16), torch.nn.Sigmoid(), torch.nn.Unflatten(1, (3, 16, 16))
    )
    before = {name: value.clone() for name, value in generator.state_dict().items()}
    code = GeneratorCode(generator, code_shape=8, clip=(-3.0, 3.0))
    callback = FeatureVisualizationCallback(
        targets=["class:1"], steps=4, every_n_epochs=1, num_samples=8, image=ImageOptions(parameterization=code)
    )
    trainer = quiet_trainer(tmp_path, accelerator=ACCELERATOR, callbacks=[callback], logger=False)
    model = tiny_classifier()
    trainer.fit(model, datamodule=tiny_datamodule())
    assert callback._runs == 2
    assert next(generator.parameters()).device.type == DEVICE
    for name, value in generator.state_dict().items():
        assert torch.equal(value.cpu(), before[name]), name
    assert all(p.grad is None for p in generator.parameters())
    assert torch.isfinite(trainer.callback_metrics["interp_featvis/class:1/objective"])
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    unit = NeuronTarget("net.3", (1,))
    on_device = deconvnet(model.to(DEVICE), x.to(DEVICE), unit).cpu()
    on_cpu = deconvnet(model.cpu(), x, unit)
    assert on_cpu.abs().max() > 0
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-4, atol=1e-5)
