"""The callbacks must not change training: bit-identical weights and optimizer state with and without them."""

from __future__ import annotations

import pytest
import torch

from lightning_interp import (
    ActivationMapsCallback,
    CalibrationCallback,
    ConceptCallback,
    DatasetBiasCallback,
    Display,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    UncertaintyCallback,
)
from lightning_interp.callbacks.concept import CAVOptions, TCAVTest
from lightning_interp.methods import METHODS
from tests.conftest import BatchNormDropoutNet, assert_training_identical, train_with


def _all_callbacks():
    return [
        SaliencyCallback(
            methods=(
                "gradient",
                "input_x_gradient",
                ("smoothgrad", {"n_samples": 4}),
                ("integrated_gradients", {"n_steps": 4}),
            ),
            num_samples=4,
        ),
        GradCAMCallback(layer=["net.features.2", "net.features.5"], num_samples=4),
        LinearProbeCallback(num_samples=16),
        RepresentationSimilarityCallback(num_samples=16, reference_model=BatchNormDropoutNet().train()),
        ActivationMapsCallback(layers=["net.features.1", "net.features.5", "net.head.3"], num_samples=4),
        FeatureVisualizationCallback(targets=["net.features.1:2", "class:1"], steps=4, every_n_epochs=1),
        FeatureVisualizationCallback(mode="dream", targets=["net.features.4"], steps=4, every_n_epochs=1, name="dream"),
        ConceptCallback(
            {"noise": torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))},
            layers=["net.features.2", "net.features.4"],
            test=TCAVTest(n_random=2),
            num_samples=32,
            cav=CAVOptions(min_accuracy=0.0),
        ),
        UncertaintyCallback(  # MC dropout: the Dropout layer of the head in train mode, also inside IG's passes
            passes=4, num_samples=16, methods={"integrated_gradients": {"n_steps": 4}}
        ),
        CalibrationCallback(),  # a forward hook during validation, a temperature fit at its end
        DatasetBiasCallback(),  # the samplers' indices read at train start (their generators restored)
        ExplanationQualityCallback(  # maps of the untrained net at train start; batched deletion / insertion passes
            ["gradient", "smoothgrad", ("grad_cam", {"layer": "net.features.5"})],
            num_samples=8,
            metrics={
                "deletion": {"steps": 4},
                "insertion": {"steps": 4},
                "top_drop": None,
                "sanity": None,
                "sparseness": None,
                "robustness": None,
                "cascading": {"depth": 2},  # re-initialises layers of a deep copy, under a forked and re-seeded RNG
            },
        ),
        DatasetBiasCallback(  # and Grad-CAM per true class, through the Dropout / BatchNorm net in eval mode
            methods={"grad_cam": {"layer": "net.features.5"}}, name="bias_cues"
        ),
    ]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"max_epochs": 2}, id="batchnorm-dropout-inplace-relu"),
        pytest.param(
            {"max_epochs": 1, "accumulate_grad_batches": 2, "val_check_interval": 0.5},
            id="validation-inside-gradient-accumulation",
        ),
        pytest.param({"max_epochs": 2, "frozen": True}, id="frozen-first-block"),
        pytest.param({"max_epochs": 2, "num_workers": 2}, id="shuffled-data-with-workers"),
    ],
)
def test_weights_optimizer_and_rng_bit_identical(tmp_path, options):
    plain = train_with(tmp_path / "plain", [], **options)
    callbacks = _all_callbacks()
    other = train_with(tmp_path / "with", callbacks, **options)
    assert all(callback._runs >= 1 for callback in callbacks), "the callbacks must actually have run"
    assert_training_identical(plain, other)


def test_every_registered_method_in_a_callback_leaves_training_bit_identical(tmp_path):
    """Each method of the registry, run by the callback that takes it, on the BatchNorm/Dropout/in-place-ReLU net."""
    fast = {
        "smoothgrad": {"n_samples": 2},
        "noise_tunnel": {"n_samples": 2},
        "smoothgrad_sq": {"n_samples": 2},
        "vargrad": {"n_samples": 2},
        "integrated_gradients": {"n_steps": 2},
        "gradient_shap": {"n_samples": 2},
        "lime": {"n_samples": 4},
        "kernel_shap": {"n_samples": 4},
        "smooth_grad_cam_plus_plus": {"n_samples": 2},
    }
    saliency = [(name, fast.get(name, {})) for name, spec in METHODS.items() if not spec.needs_layer]
    cams = [(name, fast.get(name, {})) for name, spec in METHODS.items() if spec.family == "cam" and name != "cam"]
    callbacks = [
        SaliencyCallback(methods=saliency, num_samples=2, display=Display(evolution_samples=0)),
        GradCAMCallback(layer="net.features.5", methods=cams, num_samples=2, display=Display(evolution_samples=0)),
        GradCAMCallback(
            layer="net.features.5", methods=["cam"], num_samples=2, name="cam", display=Display(evolution_samples=0)
        ),
    ]
    plain = train_with(tmp_path / "plain", [], max_epochs=1)
    other = train_with(tmp_path / "with", callbacks, max_epochs=1)
    assert all(callback._runs == 1 for callback in callbacks)
    assert {key.split("/")[-1] for key in callbacks[1]._previous} >= {"score_cam", "eigen_cam"}
    assert set(callbacks[0]._previous) == {name for name, _ in saliency}  # every input-attribution method made a map
    assert_training_identical(plain, other)
