"""LightningCLI configs: the type hints of every callback argument accept what the code accepts.

``methods="gradient"`` worked in Python but was refused by LightningCLI, whose parser reads the type hints.
"""

from __future__ import annotations

import re

import pytest

from lightning_interp import (
    ActivationMapsCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.synthetic import SyntheticShapesDataModule

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI

CONFIG = """
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_interp.SaliencyCallback
      init_args:
        methods: gradient
        num_samples: 4
        task: multiclass
    - class_path: lightning_interp.SaliencyCallback
      init_args:
        methods: [gradient, [smoothgrad, {n_samples: 2, noise_level: 0.1}]]
        name: saliency_pair
        target: label
    - class_path: lightning_interp.GradCAMCallback
      init_args:
        layer: auto
        num_samples: 4
        target: 1
    - class_path: lightning_interp.LinearProbeCallback
      init_args:
        layers: [net.1, net.4]
        num_samples: 32
        task: auto
    - class_path: lightning_interp.RepresentationSimilarityCallback
      init_args:
        layers: auto
        num_samples: 16
    - class_path: lightning_interp.ActivationMapsCallback
      init_args:
        layers: [net.1, net.4]
        channels: {net.1: [0, 2], net.4: [1]}
        num_samples: 4
    - class_path: lightning_interp.FeatureVisualizationCallback
      init_args:
        targets: ["net.4:1", [class, 2]]
        steps: 4
        image: {value_range: [0.0, [1.0, 1.0, 1.0]]}
        every_n_epochs: 1
        data: {class_names: [disc, square, triangle, cross]}
"""


class SmallClassifier(ImageClassifier):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(shapes_cnn(num_classes=4, width=4), lr=lr)


def test_a_yaml_config_builds_and_runs_every_callback(tmp_path):
    config = tmp_path / "interp.yaml"
    config.write_text(CONFIG)
    data = ["--data.train_size", "32", "--data.val_size", "32", "--data.image_size", "16", "--data.batch_size", "16"]
    cli = LightningCLI(
        SmallClassifier,
        SyntheticShapesDataModule,
        run=False,
        args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path), *data],
    )
    callbacks = [c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_interp")]
    kinds = [type(c) for c in callbacks]
    assert kinds == [
        SaliencyCallback,
        SaliencyCallback,
        GradCAMCallback,
        LinearProbeCallback,
        RepresentationSimilarityCallback,
        ActivationMapsCallback,
        FeatureVisualizationCallback,
    ]
    single, pair, gradcam, probe, similarity, activations, featvis = callbacks
    assert single.methods == ("gradient",) and single.num_samples == 4 and single.task == "multiclass"
    assert pair.methods == ("gradient", "smoothgrad") and pair.target == "label"
    assert pair.method_options == {"smoothgrad": {"n_samples": 2, "noise_level": 0.1}}
    assert gradcam.target == 1 and gradcam.num_samples == 4 and gradcam.layers == []
    assert probe.layers == ["net.1", "net.4"] and similarity.num_samples == 16
    assert activations.layers == ["net.1", "net.4"] and dict(activations.channels) == {"net.1": [0, 2], "net.4": [1]}
    assert [t.label for t in featvis.targets] == ["net.4:1", "class:2"] and featvis.class_names[2] == "triangle"
    assert featvis.image.value_range == (0.0, (1.0, 1.0, 1.0)) and featvis.image.parameterization == "fourier"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert all(callback._runs == 1 for callback in callbacks)


CONCEPT_AND_FEATVIS_CONFIG = """
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_interp.ConceptCallback
      init_args:
        concepts:
          noise:
            class_path: torchvision.datasets.FakeData
            init_args: {size: 8, image_size: [3, 16, 16], transform: {class_path: torchvision.transforms.ToTensor}}
        layers: [net.4]
        num_samples: 32
        cav: {test_fraction: 0.25, l2: 0.1, min_accuracy: 0.0}
        test: {n_random: 2, alpha: 0.01, equal_var: false}
    - class_path: lightning_interp.FeatureVisualizationCallback
      init_args:
        targets: ["class:1"]
        mode: dream
        steps: 2
        every_n_epochs: 1
        image: {parameterization: pixel, decorrelate: false, value_range: probe_std, transforms: false, octaves: 1}
"""


def _concept_and_featvis_cli(tmp_path, config: str) -> LightningCLI:
    path = tmp_path / "option_groups.yaml"
    path.write_text(config)
    data = ["--data.train_size", "32", "--data.val_size", "32", "--data.image_size", "16", "--data.batch_size", "16"]
    return LightningCLI(
        SmallClassifier,
        SyntheticShapesDataModule,
        run=False,
        args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path), *data],
    )


def test_a_yaml_config_builds_the_option_groups_of_the_concept_and_feature_visualization_callbacks(tmp_path):
    pytest.importorskip("torchvision")
    from lightning_interp.callbacks.concept import CAVOptions, ConceptCallback, TCAVTest
    from lightning_interp.callbacks.feature_visualization import ImageOptions

    cli = _concept_and_featvis_cli(tmp_path, CONCEPT_AND_FEATVIS_CONFIG)
    concept, featvis = [c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_interp")]
    assert isinstance(concept, ConceptCallback) and isinstance(featvis, FeatureVisualizationCallback)
    assert concept.cav == CAVOptions(test_fraction=0.25, l2=0.1, min_accuracy=0.0)
    assert concept.test == TCAVTest(n_random=2, alpha=0.01, equal_var=False)
    assert tuple(concept.concepts["noise"].shape) == (8, 3, 16, 16)
    assert featvis.image == ImageOptions(
        parameterization="pixel", decorrelate=False, value_range="probe_std", transforms=False, octaves=1
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert concept._runs == 1 and featvis._runs == 1


@pytest.mark.parametrize(
    ("right", "wrong", "message"),
    [
        ("parameterization: pixel", "parameterization: fft", "parameterization"),  # the Literal, checked by the parser
        ("{n_random: 2,", "{n_random: 1,", r"n_random=...\) must be an int >= 2"),  # __post_init__
    ],
)
def test_a_yaml_config_with_a_bad_option_group_value_is_refused_before_training(
    tmp_path, capsys, right, wrong, message
):
    """A bad Literal is refused by the parser (exit 2), a bad number by the dataclass's check while instantiating."""
    pytest.importorskip("torchvision")
    with pytest.raises((SystemExit, ValueError)) as caught:
        _concept_and_featvis_cli(tmp_path, CONCEPT_AND_FEATVIS_CONFIG.replace(right, wrong))
    assert re.search(message, f"{caught.value}\n{capsys.readouterr().err}")


UNCERTAINTY_CONFIG = """
trainer:
  logger: false
  callbacks:
    - class_path: lightning_interp.UncertaintyCallback
      init_args:
        passes: 8
        methods: {integrated_gradients: {n_steps: 8}}
        output_kind: logits
        data: {class_names: [disc, square, triangle, cross]}
    - class_path: lightning_interp.CalibrationCallback
      init_args:
        n_bins: 10
    - class_path: lightning_interp.DatasetBiasCallback
      init_args:
        imbalance_warning: 4.0
        methods: {grad_cam: {layer: net.4}}
        num_samples: 64
    - class_path: lightning_interp.ExplanationQualityCallback
      init_args:
        methods: [gradient, [grad_cam, {layer: net.4}]]
        num_samples: 8
        metrics: {deletion: {steps: 4, baseline: mean}, robustness: {radius: 0.05}}
"""


def test_a_yaml_config_builds_the_uncertainty_calibration_and_bias_callbacks(tmp_path):
    from lightning_interp import CalibrationCallback, DatasetBiasCallback, UncertaintyCallback

    config = tmp_path / "uncertainty.yaml"
    config.write_text(UNCERTAINTY_CONFIG)
    cli = LightningCLI(
        SmallClassifier,
        SyntheticShapesDataModule,
        run=False,
        args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)],
    )
    ours = [c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_interp")]
    uncertainty, calibration, bias, quality = ours[:4]
    assert isinstance(uncertainty, UncertaintyCallback) and uncertainty.passes == 8
    assert uncertainty.methods == ("integrated_gradients",) and uncertainty.method_options == {
        "integrated_gradients": {"n_steps": 8}
    }
    assert isinstance(calibration, CalibrationCallback) and calibration.n_bins == 10
    assert isinstance(bias, DatasetBiasCallback) and bias.imbalance_warning == 4.0
    assert (
        bias.method == "grad_cam" and bias.method_options == {"grad_cam": {"layer": "net.4"}} and bias.num_samples == 64
    )
    assert quality.keys == ["gradient", "grad_cam@net.4"] and quality.metric_options == {
        "deletion": {"steps": 4, "baseline": "mean"},
        "robustness": {"radius": 0.05, "samples": 4},
    }


FREE_TEXT = {
    "name",
    "cmap",
    "filename",
    "title",
    "input_layer",
    "layer",
    "layers",
    "reference_layers",
    "methods",
    "targets",
}  # names, not enumerations


def test_enumerated_string_options_are_literals_the_code_accepts():
    """LightningCLI checks a Literal before training; a plain ``str`` would let a typo through to the callback."""
    import inspect
    import typing

    from lightning.pytorch.callbacks import Callback

    import lightning_interp
    from lightning_interp.callbacks._checks import ARGUMENTS
    from lightning_interp.methods import CHANNEL_REDUCTIONS, HEAD_FUSIONS, PROBE_SOLVERS, REMOVAL_BASELINES, TASKS
    from lightning_interp.methods.representation.feature_visualization import PARAMETERIZATIONS
    from lightning_interp.methods.representation.similarity import RDM_METRICS, RSA_METHODS

    accepted = {  # the tables the argument checks read: each Literal must list exactly these
        "channel_reduction": CHANNEL_REDUCTIONS,
        "head_fusion": HEAD_FUSIONS,
        "solver": PROBE_SOLVERS,
        "baseline": REMOVAL_BASELINES,
        "rdm_metric": RDM_METRICS,
        "rsa_method": RSA_METHODS,
        "parameterization": PARAMETERIZATIONS,
        "task": ("auto", *TASKS),
        "mode": ARGUMENTS["mode"].choices,  # the table the constructors check against
        "output_kind": ARGUMENTS["output_kind"].choices,
    }
    seen = set()
    for name in lightning_interp.__all__:
        kind = getattr(lightning_interp, name)
        if not (inspect.isclass(kind) and issubclass(kind, Callback)):
            continue
        for klass in kind.__mro__:
            if "__init__" not in vars(klass) or not klass.__module__.startswith("lightning_interp"):
                continue
            hints = typing.get_type_hints(klass.__init__)
            for parameter in inspect.signature(klass.__init__).parameters.values():
                if not isinstance(parameter.default, str) or parameter.name in FREE_TEXT:
                    continue
                values = [
                    arg for part in typing.get_args(hints[parameter.name]) or (hints[parameter.name],)
                    for arg in (typing.get_args(part) if typing.get_origin(part) is typing.Literal else ())
                ] or list(typing.get_args(hints[parameter.name]) if typing.get_origin(hints[parameter.name])
                          is typing.Literal else [])  # fmt: skip
                assert values, f"{klass.__name__}({parameter.name}=...) is an enumeration typed {hints[parameter.name]}"
                assert parameter.default in values
                if parameter.name in accepted:
                    assert tuple(values) == tuple(accepted[parameter.name]), (klass.__name__, parameter.name)
                seen.add(parameter.name)
    assert {"channel_reduction", "solver", "task", "mode", "output_kind", "query"} <= seen
