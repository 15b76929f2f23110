"""One contract over every callback ``lightning_interp`` exports.

Each exported callback has an entry in ``CASES`` (a test fails when a new one has none), and each entry runs the
same checks: training stays bit-identical (weights, optimizer state, global RNG) with every stochastic method the
callback takes; no hook is left after ``fit``, after ``validate`` or after an exception in ``training_step``;
``trainer.validate()`` runs it; a resumed fit continues it; a LightningCLI YAML builds it. The callbacks that
explain (one :class:`~lightning_interp.methods.Explainer` seam) log what the functional API gives on the same model
and probe.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_interp
from lightning_interp import (
    ActivationMapsCallback,
    AttentionCallback,
    CalibrationCallback,
    ConceptCallback,
    DataDescription,
    DatasetBiasCallback,
    Display,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    UncertaintyCallback,
)
from lightning_interp.callbacks.concept import CAVOptions, TCAVTest
from lightning_interp.demo import ImageClassifier, TextTransformer
from lightning_interp.methods import (
    METHODS,
    Explainer,
    class_attribution,
    concentration,
    map_agreement,
    mc_dropout_maps,
    sparseness,
)
from lightning_interp.synthetic import SyntheticShapesDataModule
from lightning_interp.synthetic_text import PAD_ID, VOCABULARY, make_keyword_text
from tests.conftest import BatchNormDropoutNet, assert_training_identical, quiet_trainer

STOCHASTIC = tuple(name for name, spec in METHODS.items() if spec.stochastic)
FAST = {  # each stochastic method at its cheapest, so the suite stays small
    "smoothgrad": {"n_samples": 2},
    "noise_tunnel": {"n_samples": 2},
    "smoothgrad_sq": {"n_samples": 2},
    "vargrad": {"n_samples": 2},
    "gradient_shap": {"n_samples": 2},
    "lime": {"n_samples": 4},
    "kernel_shap": {"n_samples": 4},
    "smooth_grad_cam_plus_plus": {"n_samples": 2},
    "feature_permutation": {},
    "shapley_value_sampling": {"n_samples": 2},
}
IMAGE_STOCHASTIC = tuple(name for name in STOCHASTIC if not METHODS[name].needs_layer)
CAM_STOCHASTIC = tuple(name for name in STOCHASTIC if METHODS[name].needs_layer)


def _image_model() -> pl.LightningModule:
    return ImageClassifier(BatchNormDropoutNet(), lr=5e-3)


def _image_data() -> dict[str, Any]:
    return {"datamodule": SyntheticShapesDataModule(train_size=64, val_size=32, batch_size=16, image_size=16, seed=0)}


def _text_model() -> pl.LightningModule:
    net = TextTransformer(len(VOCABULARY), 3, dim=16, heads=2, layers=2, max_length=12, pad_id=PAD_ID)
    return ImageClassifier(net, lr=1e-3)


def _text_data() -> dict[str, Any]:
    data = make_keyword_text(96, length=12, min_length=6, seed=0)
    loader = DataLoader(TensorDataset(data.ids, data.labels), batch_size=16)
    return {"train_dataloaders": loader, "val_dataloaders": loader}


@dataclass
class Case:
    """How the contract builds one callback: ``make(methods)`` (``methods``: a ``{name: options}`` mapping, or None
    for the callback's own choice), the stochastic methods it takes, its model and data, and its YAML init_args."""

    make: Callable[[dict[str, Any] | None], Callback]
    yaml: str
    stochastic: tuple[str, ...] = ()
    model: Callable[[], pl.LightningModule] = _image_model
    data: Callable[[], dict[str, Any]] = _image_data
    runs_at_validation: bool = True
    explains: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _concepts() -> dict[str, torch.Tensor]:
    return {"noise": torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))}


CASES: dict[type[Callback], Case] = {
    SaliencyCallback: Case(
        lambda methods: SaliencyCallback(
            methods=methods or {"gradient": None}, num_samples=4, display=Display(evolution_samples=2)
        ),
        "methods: {gradient: null, smoothgrad: {n_samples: 2}}\nnum_samples: 4",
        stochastic=IMAGE_STOCHASTIC,
        explains=True,
    ),
    GradCAMCallback: Case(
        lambda methods: GradCAMCallback(
            layer=["net.features.2", "net.features.5"], methods=methods or ("grad_cam",), num_samples=4
        ),
        "methods: {grad_cam: null, layer_cam: null}\nlayer: [net.features.5]",
        stochastic=CAM_STOCHASTIC,
        explains=True,
    ),
    LinearProbeCallback: Case(lambda methods: LinearProbeCallback(num_samples=16), "num_samples: 16"),
    RepresentationSimilarityCallback: Case(
        lambda methods: RepresentationSimilarityCallback(num_samples=16), "num_samples: 16"
    ),
    ActivationMapsCallback: Case(
        lambda methods: ActivationMapsCallback(layers=["net.features.1", "net.features.5"], num_samples=4),
        "layers: [net.features.1]\nnum_samples: 4",
    ),
    FeatureVisualizationCallback: Case(
        lambda methods: FeatureVisualizationCallback(
            targets=["net.features.1:2", "class:1"], steps=2, every_n_epochs=1
        ),
        "targets: ['class:1']\nsteps: 2\nimage: {parameterization: pixel, octaves: 1}",
    ),
    ConceptCallback: Case(
        lambda methods: ConceptCallback(
            _concepts(),
            layers=["net.features.2"],
            test=TCAVTest(n_random=2),
            num_samples=32,
            cav=CAVOptions(min_accuracy=0.0),
        ),
        "layers: [net.features.2]\nconcepts:\n  noise:\n    class_path: torchvision.datasets.FakeData\n"
        "    init_args: {size: 8, image_size: [3, 16, 16], transform: {class_path: torchvision.transforms.ToTensor}}\n"
        "test: {n_random: 2}\ncav: {min_accuracy: 0.0}",
    ),
    UncertaintyCallback: Case(
        lambda methods: UncertaintyCallback(passes=2, num_samples=8, methods=methods, explain_samples=2),
        "passes: 4\nmethods: {integrated_gradients: {n_steps: 4}}",
        stochastic=IMAGE_STOCHASTIC,
        explains=True,
    ),
    CalibrationCallback: Case(lambda methods: CalibrationCallback(), "n_bins: 10"),
    DatasetBiasCallback: Case(
        lambda methods: DatasetBiasCallback(methods=methods or "gradient", num_samples=8),
        "methods: {grad_cam: {layer: net.features.5}}\nnum_samples: 8",
        stochastic=IMAGE_STOCHASTIC,
        explains=True,
    ),
    ExplanationQualityCallback: Case(
        lambda methods: ExplanationQualityCallback(
            methods or {"gradient": None}, num_samples=4, metrics={"deletion": {"steps": 2}, "sparseness": None}
        ),
        "methods: {gradient: null, grad_cam: {layer: net.features.5}}\nmetrics: {deletion: {steps: 4}}",
        stochastic=IMAGE_STOCHASTIC,
        explains=True,
    ),
    AttentionCallback: Case(
        lambda methods: AttentionCallback(num_samples=4, data=DataDescription(pad_id=PAD_ID)),
        "num_samples: 4\ndata: {pad_id: 0}",
        model=_text_model,
        data=_text_data,
    ),
    ReportCallback: Case(lambda methods: ReportCallback(), "filename: run.html", runs_at_validation=False),
}


def _exported_callbacks() -> set[type]:
    """The exported callbacks that do work of their own (``UnshardedWindow`` only switches how the others work under
    FSDP2, where ``test_sharded.py`` and ``test_window.py`` hold it to the same contract; elsewhere it does nothing)."""
    return {
        value
        for value in (getattr(lightning_interp, name) for name in lightning_interp.__all__)
        if inspect.isclass(value) and issubclass(value, Callback) and value is not lightning_interp.UnshardedWindow
    }


def test_every_exported_callback_has_a_contract_entry():
    missing = _exported_callbacks() - set(CASES)
    assert not missing, f"add a contract entry (CASES) for {sorted(c.__name__ for c in missing)}"
    assert set(CASES) == _exported_callbacks()


def _case_params(with_methods: bool) -> list[Any]:
    params = []
    for kind, case in CASES.items():
        if with_methods and case.stochastic:
            params += [pytest.param(kind, method, id=f"{kind.__name__}-{method}") for method in case.stochastic]
        else:
            params.append(pytest.param(kind, None, id=kind.__name__))
    return params


def _fit(tmp_path, case: Case, callbacks: list[Callback], **options) -> tuple[Any, pl.Trainer, pl.LightningModule]:
    pl.seed_everything(123, verbose=False)
    model = case.model()
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=False, deterministic=True, **options)
    trainer.fit(model, **case.data())
    return (model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state()), trainer, model


def _validation_data(data: dict[str, Any]) -> dict[str, Any]:
    return {"datamodule": data["datamodule"]} if "datamodule" in data else {"dataloaders": data["val_dataloaders"]}


_PLAIN: dict[Callable, Any] = {}  # the run without callbacks, once per model


@pytest.mark.parametrize(("kind", "method"), _case_params(with_methods=True))
def test_training_stays_bit_identical(tmp_path, kind, method):
    """Weights, optimizer state and global RNG as without the callback, with validation inside gradient
    accumulation, and with each stochastic method the callback takes."""
    case = CASES[kind]
    options = {"max_epochs": 1, "accumulate_grad_batches": 2, "val_check_interval": 0.5}
    if case.model not in _PLAIN:
        _PLAIN[case.model] = _fit(tmp_path / "plain", case, [], **options)[0]
    callback = case.make(None if method is None else {method: FAST[method]})
    result, _, _ = _fit(tmp_path / "with", case, [callback], **options)
    if case.runs_at_validation:
        assert callback._runs >= 1, "the callback must actually have run"
    assert_training_identical(_PLAIN[case.model], result)


def _hook_counts(model: nn.Module) -> tuple[int, ...]:
    per_module = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    hooks = torch.nn.modules.module
    global_hooks = (
        len(hooks._global_forward_hooks),
        len(hooks._global_forward_pre_hooks),
        len(hooks._global_backward_hooks),
        len(hooks._global_backward_pre_hooks),
    )
    return (per_module, *global_hooks)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["fit", "validate", "exception"])
@pytest.mark.parametrize(("kind", "method"), _case_params(with_methods=False))
def test_no_hook_is_left(tmp_path, kind, method, stage):
    case = CASES[kind]
    model = case.model()
    before = _hook_counts(model)
    callback = case.make(None)
    if stage == "exception":  # validation runs after two batches, then training_step raises
        step = model.training_step

        def failing(batch, batch_idx):
            if batch_idx == 3:
                raise _Boom("a failure in training_step")
            return step(batch, batch_idx)

        model.training_step = failing
        trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, val_check_interval=2)
        with pytest.raises(_Boom):
            trainer.fit(model, **case.data())
        if case.runs_at_validation:
            assert callback._runs == 1
    else:
        trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
        data = case.data()
        if stage == "fit":
            trainer.fit(model, **data)
        else:
            loaders = (
                {"datamodule": data["datamodule"]} if "datamodule" in data else {"dataloaders": data["val_dataloaders"]}
            )
            trainer.validate(model, verbose=False, **loaders)
    assert _hook_counts(model) == before


@pytest.mark.parametrize(("kind", "method"), _case_params(with_methods=False))
def test_validate_runs_it(tmp_path, kind, method):
    case = CASES[kind]
    callback = case.make(None)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    data = case.data()
    trainer.validate(case.model(), verbose=False, **_validation_data(data))
    if case.runs_at_validation:
        assert callback._runs == 1
        assert any(key.startswith(f"interp_{callback.name}/") for key in trainer.callback_metrics)


@pytest.mark.parametrize(("kind", "method"), _case_params(with_methods=False))
def test_a_resumed_fit_continues_it(tmp_path, kind, method):
    case = CASES[kind]
    first = case.make(None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, callbacks=[first, checkpoint], logger=False, max_epochs=1,
                            enable_checkpointing=True)  # fmt: skip
    trainer.fit(case.model(), **case.data())
    resumed = case.make(None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, callbacks=[resumed, checkpoint], logger=False, max_epochs=2,
                            enable_checkpointing=True)  # fmt: skip
    trainer.fit(case.model(), **case.data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    if case.runs_at_validation:
        assert resumed._runs == 2, "the count of runs continues from the checkpoint"
        if getattr(first, "probe", None) is not None and getattr(first, "num_samples", 2) > 2:
            assert torch.equal(resumed.probe.inputs, first.probe.inputs), "a resumed fit explains the same samples"


class _SmallShapes(ImageClassifier):
    def __init__(self) -> None:
        super().__init__(BatchNormDropoutNet(), lr=5e-3)


@pytest.mark.parametrize(("kind", "method"), _case_params(with_methods=False))
def test_a_lightning_cli_yaml_builds_it(tmp_path, kind, method):
    case = CASES[kind]
    init_args = "\n".join(f"        {line}" for line in case.yaml.splitlines())
    config = tmp_path / "config.yaml"
    config.write_text(
        f"trainer:\n  logger: false\n  callbacks:\n    - class_path: lightning_interp.{kind.__name__}\n"
        f"      init_args:\n{init_args}\n"
    )
    cli = LightningCLI(
        _SmallShapes, SyntheticShapesDataModule, run=False,
        args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)],
    )  # fmt: skip
    built = [callback for callback in cli.trainer.callbacks if isinstance(callback, kind)]
    assert len(built) == 1
    key = case.yaml.splitlines()[0].split(": ", 1)[0]  # the first option reached the callback
    assert getattr(built[0], key, None) is not None


# ------------------------------------------------------------------ the explain seam: logged = functional
def _explaining_fit(tmp_path, callback: Callback) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)
    model = _image_model()
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    trainer.fit(model, **_image_data())
    return trainer, model


def test_saliency_logs_what_the_functional_api_gives(tmp_path):
    methods = {"gradient": None, "smoothgrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 8}}
    callback = SaliencyCallback(methods=methods, num_samples=4, seed=7, display=Display(background_drawing=False))
    trainer, model = _explaining_fit(tmp_path, callback)
    ours = Explainer(methods, seed=7)(model, callback.probe.inputs)  # an independent explainer, same settings
    for key, maps in ours.maps().items():
        torch.testing.assert_close(callback.last_maps[key], maps)
        logged = float(trainer.callback_metrics[f"interp_saliency/{key}/concentration"])
        assert logged == pytest.approx(float(concentration(maps).mean()), rel=1e-5)
    logged = float(trainer.callback_metrics["interp_saliency/integrated_gradients/completeness_error"])
    assert logged == pytest.approx(float(ours.scalars["integrated_gradients/completeness_error"]), rel=1e-6)


def test_gradcam_logs_what_the_functional_api_gives(tmp_path):
    callback = GradCAMCallback(layer=["net.features.5"], methods=("grad_cam", "score_cam"), num_samples=4)
    _, model = _explaining_fit(tmp_path, callback)
    ours = Explainer({"grad_cam": None, "score_cam": None}, layers=["net.features.5"])(model, callback.probe.inputs)
    torch.testing.assert_close(callback.last_maps["net.features.5"], ours.maps()["grad_cam@net.features.5"])
    torch.testing.assert_close(callback.last_maps["net.features.5/score_cam"], ours.maps()["score_cam@net.features.5"])


def test_quality_scores_the_functional_apis_maps(tmp_path):
    callback = ExplanationQualityCallback({"smoothgrad": {"n_samples": 3}}, num_samples=4, metrics="sparseness", seed=3)
    trainer, model = _explaining_fit(tmp_path, callback)
    maps = Explainer({"smoothgrad": {"n_samples": 3}}, seed=3)(model, callback.probe.inputs).maps()["smoothgrad"]
    logged = float(trainer.callback_metrics["interp_quality/smoothgrad/sparseness"])
    assert logged == pytest.approx(float(sparseness(maps).mean()), rel=1e-5)


def test_bias_measures_the_functional_apis_maps(tmp_path):
    callback = DatasetBiasCallback(methods={"lime": {"n_samples": 8}}, num_samples=8, seed=2)
    trainer, model = _explaining_fit(tmp_path, callback)
    probe = callback.probe
    maps = Explainer({"lime": {"n_samples": 8}}, seed=2)(model, probe.inputs, probe.labels).maps()["lime"]
    found = class_attribution(maps, probe.labels, 4, masks=probe.masks, border_fraction=callback.border_fraction)
    for k in range(4):
        if found.counts[k] > 0:
            logged = float(trainer.callback_metrics[f"interp_bias/{k}/{found.measure}"])
            assert logged == pytest.approx(float(found.scores[k]), rel=1e-5)


def test_uncertainty_measures_the_functional_apis_maps(tmp_path):
    callback = UncertaintyCallback(
                                   passes=3,
                                   num_samples=4,
                                   explain_samples=4,
                                   methods="gradient",
                                   seed=1,
                                   display=Display(background_drawing=False),
                               )  # fmt: skip
    trainer, model = _explaining_fit(tmp_path, callback)
    inputs = callback.probe.inputs
    maps = mc_dropout_maps(
        model,
        inputs,
        Explainer("gradient", seed=1),
        3,
        target=_mc_prediction(model, inputs, passes=3, seed=1),
        generator=torch.Generator().manual_seed(2),
    )
    logged = float(trainer.callback_metrics["interp_uncertainty/gradient/map_agreement"])
    assert logged == pytest.approx(float(map_agreement(maps).nanmean()), rel=1e-5)


def _mc_prediction(model: nn.Module, inputs: torch.Tensor, passes: int, seed: int) -> torch.Tensor:
    from lightning_interp.methods import mc_dropout_predictions

    probs = mc_dropout_predictions(model, inputs, passes, generator=torch.Generator().manual_seed(seed))
    return probs.mean(dim=0).argmax(dim=1)
