"""Models of several inputs (``model(image, table)``) in the callbacks: batches ``((image, table), label)`` are read
into probe sets that keep every input of each sample together; every callback calls the model with all of them;
``SaliencyCallback`` explains the floating-point inputs together and logs one map and score set per input, and what
it logs equals Captum's tuple attributions on the same model and samples."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_interp import (
    ActivationMapsCallback,
    CalibrationCallback,
    ConceptCallback,
    DataDescription,
    DatasetBiasCallback,
    Display,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ProbeSet,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    UncertaintyCallback,
)
from lightning_interp.probe import parse_batch
from tests.callbacks.test_contract import CASES
from tests.conftest import BatchNormDropoutNet, assert_training_identical, quiet_trainer

CLASSES = 4
FEATURES = 5


class ImageAndTable(Dataset):
    """``((image, table), label)`` samples: a (3, 16, 16) image and FEATURES table values whose first value carries
    the label, and an integer site index (a third input the model embeds)."""

    def __init__(self, count: int = 48, seed: int = 0, with_site: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(count) % CLASSES
        self.images = torch.rand(count, 3, 16, 16, generator=generator)
        self.tables = torch.randn(count, FEATURES, generator=generator)
        self.tables[:, 0] += self.labels.float()
        self.sites = torch.randint(3, (count,), generator=generator)
        self.with_site = with_site

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        inputs = (self.images[index], self.tables[index])
        if self.with_site:
            inputs = (*inputs, self.sites[index])
        return inputs, self.labels[index]


class TwoInputNet(pl.LightningModule):
    """``forward(image, table[, site])``: a small CNN (``net``) on the image plus a linear head on the table (and a
    site embedding); ``use_table=False`` ignores the table."""

    def __init__(self, use_table: bool = True, with_site: bool = False) -> None:
        super().__init__()
        self.net = BatchNormDropoutNet(CLASSES)
        self.table_head = nn.Linear(FEATURES, CLASSES)
        self.site = nn.Embedding(3, CLASSES) if with_site else None
        self.use_table = use_table

    def forward(self, image, table, site=None):
        scores = self.net(image)
        if self.use_table:
            scores = scores + self.table_head(table)
        if self.site is not None:
            scores = scores + self.site(site)
        return scores

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self(*inputs), labels)

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(*inputs), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loaders(with_site: bool = False) -> dict[str, DataLoader]:
    return {
        "train_dataloaders": DataLoader(ImageAndTable(64, seed=1, with_site=with_site), batch_size=16),
        "val_dataloaders": DataLoader(ImageAndTable(32, seed=2, with_site=with_site), batch_size=16),
    }


# ---------------------------------------------------------------------------------------------- reading the batches
def test_nested_inputs_are_read_as_several_inputs():
    image, table, labels = torch.rand(4, 3, 8, 8), torch.randn(4, FEATURES), torch.tensor([0, 1, 2, 3])
    masks = torch.rand(4, 8, 8) > 0.5
    for batch in (((image, table), labels), [[image, table], labels, masks]):
        parsed = parse_batch(batch)
        assert parsed.inputs is image
        assert len(parsed.more_inputs) == 1 and parsed.more_inputs[0] is table
        assert torch.equal(parsed.labels, labels)
    assert torch.equal(parse_batch([[image, table], labels, masks]).masks, masks)
    with pytest.warns(UserWarning, match="nest them"):
        flat = parse_batch((image, table, labels))  # (inputs, labels, ...): the flat form stays one input
    assert flat.more_inputs == ()


def test_a_batch_parser_may_return_several_inputs():
    def parser(batch):
        return (batch["image"], batch["table"]), batch["y"]

    batch = {"image": torch.rand(2, 3, 8, 8), "table": torch.randn(2, FEATURES), "y": torch.tensor([1, 0])}
    parsed = parse_batch(batch, parser)
    assert parsed.inputs is batch["image"] and parsed.more_inputs[0] is batch["table"]


def test_several_inputs_of_different_sample_counts_are_refused():
    with pytest.raises(ValueError, match="different numbers of samples"):
        ProbeSet((torch.rand(4, 3, 8, 8), torch.randn(3, FEATURES)))


def test_a_probe_of_several_inputs_keeps_each_samples_inputs_together():
    data = ImageAndTable(40, seed=3)
    probe = ProbeSet.from_dataloader(DataLoader(data, batch_size=8, shuffle=False), 8)
    assert len(probe.all_inputs) == 2
    for row, index in enumerate(probe.indices.tolist()):  # every input of a row is that dataset sample's
        assert torch.equal(probe.inputs[row], data.images[index])
        assert torch.equal(probe.more_inputs[0][row], data.tables[index])
        assert int(probe.labels[row]) == int(data.labels[index])
    rows = probe.take([3, 0])
    assert torch.equal(rows.more_inputs[0], probe.more_inputs[0][[3, 0]])
    again = ProbeSet.from_state_dict(probe.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.all_inputs, probe.all_inputs, strict=True))
    changed = ProbeSet((probe.inputs, probe.more_inputs[0] + 1), probe.labels)
    assert not changed.matches(probe.fingerprint()), "a changed second input is a changed sample"


def test_input_names_must_fit_the_inputs(tmp_path):
    callback = SaliencyCallback(num_samples=4, data=DataDescription(input_names=["image", "table", "extra"]))
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.raises(ValueError, match="names 3 inputs, but the probe samples hold 2"):
        trainer.fit(TwoInputNet(), **_loaders())


# ---------------------------------------------------------------------------------------------- every callback
def _callbacks_on_two_inputs() -> dict[type, pl.Callback]:
    """Every callback of the contract that runs on images, set up as the contract does (its layers are those of the
    image branch, ``net``)."""
    kinds = [
        SaliencyCallback,
        GradCAMCallback,
        LinearProbeCallback,
        RepresentationSimilarityCallback,
        ActivationMapsCallback,
        FeatureVisualizationCallback,
        UncertaintyCallback,
        CalibrationCallback,
        DatasetBiasCallback,
        ExplanationQualityCallback,
    ]
    return {kind: CASES[kind].make(None) for kind in kinds}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(_callbacks_on_two_inputs()), ids=lambda kind: kind.__name__)
def test_every_callback_runs_on_a_model_of_several_inputs_and_leaves_training_alone(tmp_path, kind):
    """Each callback calls the model with all its inputs (a wrong pairing or a missing input fails the call), logs
    its results, and leaves training bit-identical."""
    options = {"max_epochs": 1, "limit_train_batches": 2, "deterministic": True, "logger": False}

    def fit(callbacks):
        pl.seed_everything(7, verbose=False)
        model = TwoInputNet(with_site=True)
        trainer = quiet_trainer(tmp_path, callbacks=callbacks, **options)
        trainer.fit(model, **_loaders(with_site=True))
        return (model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state()), trainer

    plain, _ = fit([])
    callback = _callbacks_on_two_inputs()[kind]
    result, trainer = fit([callback])
    assert callback._runs >= 1
    assert any(key.startswith(f"interp_{callback.name}/") for key in trainer.callback_metrics)
    assert_training_identical(plain, result)


def test_concepts_on_a_model_of_several_inputs_are_refused_before_training(tmp_path):
    callback = ConceptCallback({"noise": torch.rand(8, 3, 16, 16)}, layers=["net.features.2"], num_samples=8)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.raises(ValueError, match="bare tensors of one input"):
        trainer.fit(TwoInputNet(), **_loaders())


# ---------------------------------------------------------------------------------------------- saliency per input
def _captum_ig(model: nn.Module, explained: tuple, others: tuple = (), n_steps: int = 16) -> tuple:
    """Captum's IntegratedGradients on the explained tuple (zero baselines) for the model's predicted classes, and
    each input's mean share of the attribution mass."""
    model.eval()
    with torch.no_grad():
        target = model(*explained, *others).argmax(dim=1)
    attributions = IntegratedGradients(model).attribute(
        explained, target=target, n_steps=n_steps, method="gausslegendre", additional_forward_args=others or None
    )
    mass = torch.stack([part.abs().flatten(1).sum(1) for part in attributions])
    return attributions, (mass / mass.sum(0)).mean(1).tolist()


def _saliency_run(tmp_path, model: TwoInputNet, **options) -> tuple[SaliencyCallback, pl.Trainer]:
    callback = SaliencyCallback(
        methods={"gradient": None, "integrated_gradients": {"n_steps": 16}},
        num_samples=4,
        data=DataDescription(input_names=["image", "table"], feature_names=[f"f{i}" for i in range(FEATURES)]),
        display=Display(background_drawing=False),
        **options,
    )
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=1, limit_train_batches=2)
    trainer.fit(model, **_loaders())
    return callback, trainer


def test_saliency_explains_each_input_as_captum_does(tmp_path):
    """The table's maps and each input's share of the attribution mass equal Captum's IntegratedGradients on the
    tuple (image, table), with the zero baselines, on the trained model and the probe samples."""
    model = TwoInputNet()
    callback, trainer = _saliency_run(tmp_path, model)
    probe = callback.probe
    assert probe is not None and len(probe.more_inputs) == 1
    metrics = trainer.callback_metrics
    (_, ig_table), shares = _captum_ig(model, (probe.inputs, probe.more_inputs[0]))
    logged = [float(metrics[f"interp_saliency/integrated_gradients/share_{name}"]) for name in ("image", "table")]
    assert logged == pytest.approx(shares, abs=1e-4)
    assert sum(logged) == pytest.approx(1.0, abs=1e-6)
    # completeness covers both inputs together: the sum over image and table is f(x) - f(0)
    assert float(metrics["interp_saliency/integrated_gradients/completeness_error"]) < 0.02
    # the table's concentration is computed on the table's own map, |IG| per feature (top 10% of 5 features: 1)
    expected = (ig_table.abs().amax(1) / ig_table.abs().sum(1)).mean()
    assert float(metrics["interp_saliency/integrated_gradients/table/concentration"]) == pytest.approx(
        float(expected), abs=1e-4
    )
    assert "interp_saliency/gradient/share_table" not in metrics, "a gradient's size is in each input's units"


def test_saliency_draws_one_picture_per_input(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, trainer = _saliency_run(tmp_path, TwoInputNet())
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "interp_saliency/maps/rows_1-2" in tags
    assert "interp_saliency/maps_table/rows_1-2" in tags and "interp_saliency/maps_table/rows_3-4" in tags
    first = events.Images("interp_saliency/maps/rows_1-2")[-1]
    table = events.Images("interp_saliency/maps_table/rows_1-2")[-1]
    assert (first.width, first.height) != (table.width, table.height), "the table is drawn as feature rows"
    # the evolution strip at fit end: one per input, the table's drawn over the table's rows
    assert {
        "interp_saliency/integrated_gradients/evolution",
        "interp_saliency/integrated_gradients/table/evolution",
    } <= set(tags)
    image_strip = events.Images("interp_saliency/integrated_gradients/evolution")[-1]
    table_strip = events.Images("interp_saliency/integrated_gradients/table/evolution")[-1]
    assert (image_strip.width, image_strip.height) != (table_strip.width, table_strip.height)


def test_an_input_the_model_ignores_gets_no_share_and_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"every map of 'integrated_gradients/table' is zero"):
        _, trainer = _saliency_run(tmp_path, TwoInputNet(use_table=False))
    metrics = trainer.callback_metrics
    assert float(metrics["interp_saliency/integrated_gradients/share_table"]) == 0.0
    assert float(metrics["interp_saliency/integrated_gradients/share_image"]) == pytest.approx(1.0)


def test_an_integer_input_is_passed_along_not_explained(tmp_path):
    """``forward(image, table, site)`` with integer site indices: the floating inputs are explained, the site of
    each sample follows it into every copy the methods make (a wrong pairing would change the scores)."""
    callback = SaliencyCallback(
        methods={"integrated_gradients": {"n_steps": 8}},
        num_samples=4,
        display=Display(background_drawing=False),
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    model = TwoInputNet(with_site=True)
    trainer.fit(model, **_loaders(with_site=True))
    probe = callback.probe
    assert len(probe.more_inputs) == 2 and not probe.more_inputs[1].is_floating_point()
    metrics = trainer.callback_metrics
    assert "interp_saliency/integrated_gradients/input1/concentration" in metrics
    assert not any("input2" in key for key in metrics), "the integer site is not explained"
    _, shares = _captum_ig(model, (probe.inputs, probe.more_inputs[0]), (probe.more_inputs[1],), n_steps=8)
    assert float(metrics["interp_saliency/integrated_gradients/share_input1"]) == pytest.approx(shares[1], abs=1e-4)


class _Rearranged(Dataset):
    """The samples of :class:`ImageAndTable` (with the site) in another form: ``arrange((image, table, site),
    label)``."""

    def __init__(self, count: int, seed: int, arrange) -> None:
        self.samples = ImageAndTable(count, seed, with_site=True)
        self.arrange = arrange

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.arrange(*self.samples[index])


def _DictBatches(count: int, seed: int) -> Dataset:
    """``{"image", "table", "weight_mask", "label"}`` samples: a dict batch whose other keys the model takes by name."""
    return _Rearranged(
        count,
        seed,
        lambda inputs, label: {
            "image": inputs[0],
            "table": inputs[1],
            "weight_mask": torch.ones(FEATURES),
            "label": label,
        },
    )


class _KeywordNet(TwoInputNet):
    def forward(self, image, table, weight_mask=None):
        return super().forward(image, table * weight_mask)

    def training_step(self, batch, batch_idx):
        scores = self(batch["image"], table=batch["table"], weight_mask=batch["weight_mask"])
        return nn.functional.cross_entropy(scores, batch["label"])

    def validation_step(self, batch, batch_idx):
        pass


def test_a_dict_batchs_floating_inputs_are_explained_by_their_keys(tmp_path):
    """A dict batch's other floating-point keys the model takes by name are explained with the first input and named
    by their key; one whose name ends in "mask" is passed along, not explained."""
    callback = SaliencyCallback(
        methods={"integrated_gradients": {"n_steps": 8}}, num_samples=4, display=Display(background_drawing=False)
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    model = _KeywordNet()
    loaders = [DataLoader(_DictBatches(32, seed), batch_size=16) for seed in (1, 2)]
    trainer.fit(model, *loaders)
    metrics = trainer.callback_metrics
    probe = callback.probe
    explained, others = (probe.inputs, probe.extras["table"]), (probe.extras["weight_mask"],)
    _, shares = _captum_ig(model, explained, others, n_steps=8)
    assert float(metrics["interp_saliency/integrated_gradients/share_table"]) == pytest.approx(shares[1], abs=1e-4)
    assert not any("weight_mask" in key for key in metrics)


def test_methods_of_the_first_input_alone_run_beside_the_joint_ones(tmp_path):
    """Occlusion (its window slides over images) and FullGrad explain the image with the table bound; their image
    maps equal the functional API's on the model called with the table; integrated gradients still covers both."""
    from lightning_interp.methods import attribute, attribution_to_map

    callback = SaliencyCallback(
        methods={"integrated_gradients": {"n_steps": 8}, "occlusion": {"window": 4}, "full_grad": None},
        num_samples=4,
        display=Display(background_drawing=False),
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    model = TwoInputNet()
    trainer.fit(model, **_loaders())
    metrics = trainer.callback_metrics
    assert "interp_saliency/integrated_gradients/input1/concentration" in metrics
    assert "interp_saliency/occlusion/concentration" in metrics
    assert not any(
        key.startswith(("interp_saliency/occlusion/input1", "interp_saliency/full_grad/input1")) for key in metrics
    )
    probe = callback.probe
    model.eval()
    image, table = probe.inputs, probe.more_inputs[0]
    with torch.no_grad():
        target = model(image, table).argmax(dim=1)
    occluded = attribute("occlusion", model, (image,), target, window=4, additional_forward_args=(table,))[0]
    assert torch.allclose(callback.last_maps["occlusion"], attribution_to_map(occluded), atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_the_other_inputs_take_the_trainers_precision(tmp_path, precision):
    """Under a true-precision trainer the bound inputs are converted like the first (a float32 table into a bfloat16
    layer would fail)."""
    callback = SaliencyCallback(
        methods={"integrated_gradients": {"n_steps": 4}}, num_samples=4, display=Display(background_drawing=False)
    )
    trainer = quiet_trainer(
        tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2, precision=precision
    )
    trainer.fit(TwoInputNet(), **_loaders())
    shares = [float(trainer.callback_metrics[f"interp_saliency/integrated_gradients/share_input{i}"]) for i in (0, 1)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3) and min(shares) > 0


def test_a_dict_batchs_other_inputs_take_the_trainers_precision(tmp_path):
    callback = SaliencyCallback(
        methods={"integrated_gradients": {"n_steps": 4}}, num_samples=4, display=Display(background_drawing=False)
    )
    trainer = quiet_trainer(
        tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2, precision="bf16-true"
    )
    trainer.fit(_KeywordNet(), *[DataLoader(_DictBatches(32, seed), batch_size=16) for seed in (1, 2)])
    share = float(trainer.callback_metrics["interp_saliency/integrated_gradients/share_table"])
    assert 0 < share < 1


# ---------------------------------------------------------------------------------------------- mistakes, said early
def test_a_flat_batch_that_looks_like_several_inputs_is_warned_about():
    image, table, labels = torch.rand(4, 3, 8, 8), torch.randn(4, FEATURES), torch.tensor([0, 1, 2, 3])
    with pytest.warns(UserWarning, match=r"nest them in the batch, \(\(image, table\), label\)"):
        parsed = parse_batch((image, table, labels))
    assert parsed.labels is table  # the flat form still reads as (inputs, labels, ...)


@pytest.mark.parametrize("use_table", [True, False])
def test_a_feature_methods_shares_count_each_feature_once_as_captum_gives_them(tmp_path, use_table):
    """Feature ablation copies one feature's value onto each of its elements (a 4 x 4 patch of the image over its 3
    channels, a table value alone): the shares count each feature once. Equal to Captum's FeatureAblation on the
    tuple with the same features, read one element per feature; a table the model ignores gets exactly 0."""
    from captum.attr import FeatureAblation

    callback = SaliencyCallback(methods={"feature_ablation": None, "occlusion": {"window": 4}}, num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    model = TwoInputNet(use_table=use_table)
    trainer.fit(model, **_loaders())
    metrics = trainer.callback_metrics
    probe = callback.probe
    image, table = probe.inputs, probe.more_inputs[0]
    model.eval()
    with torch.no_grad():
        target = model(image, table).argmax(dim=1)
    rows, cols = torch.arange(16) // 4, torch.arange(16) // 4
    patches = (rows[:, None] * 4 + cols[None, :]).reshape(1, 1, 16, 16)  # 16 patches of 4 x 4, every channel
    features = (torch.arange(FEATURES) + 16).reshape(1, FEATURES)
    ablated = FeatureAblation(model).attribute((image, table), target=target, feature_mask=(patches, features))
    per_patch = ablated[0][:, 0, ::4, ::4].abs().flatten(1).sum(1)  # one element of each patch
    per_feature = ablated[1].abs().sum(1)
    expected = (per_feature / (per_patch + per_feature)).mean()
    logged = float(metrics["interp_saliency/feature_ablation/share_input1"])
    assert logged == pytest.approx(float(expected), abs=1e-5)
    if not use_table:
        assert logged == 0.0
    assert float(metrics["interp_saliency/feature_ablation/share_input0"]) == pytest.approx(1 - logged, abs=1e-6)
    assert not any(key.startswith("interp_saliency/occlusion/share") for key in metrics), "windows overlap"


class _TwoImages(TwoInputNet):
    """``forward(left, right)``: a branch per image; ``right``'s branch (``right_branch``) is the deepest conv."""

    def __init__(self) -> None:
        super().__init__()
        self.right_branch = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.right_head = nn.Linear(4, CLASSES)

    def forward(self, left, right):
        return self.net(left) + self.right_head(self.right_branch(right).mean(dim=(2, 3)))


class _ImagePairs(ImageAndTable):
    def __getitem__(self, index: int):
        (image, _), label = super().__getitem__(index)
        return (image, image.flip(-1)), label


@pytest.mark.parametrize("layer", ["auto", "right_branch"])
def test_a_cam_layer_that_does_not_see_the_first_input_is_refused(tmp_path, layer):
    """Grad-CAM's maps are drawn over the first input: a layer of the second image's branch (chosen automatically as
    the deepest, or named) is refused before training, not drawn over the wrong image."""
    callback = GradCAMCallback(layer=layer, num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    loaders = [DataLoader(_ImagePairs(32, seed), batch_size=16) for seed in (1, 2)]
    with pytest.raises(ValueError, match="not see the model's first input"):
        trainer.fit(_TwoImages(), *loaders)
    assert trainer.global_step == 0
    named = GradCAMCallback(layer="net.features.4", num_samples=4)  # the left image's branch: fine
    trainer = quiet_trainer(tmp_path, callbacks=[named], logger=False, max_epochs=1, limit_train_batches=2)
    trainer.fit(_TwoImages(), *loaders)
    assert named._runs == 1


def _TableFirst(count: int, seed: int) -> Dataset:
    return _Rearranged(count, seed, lambda inputs, label: ((inputs[1], inputs[0]), label))


class _TableFirstNet(TwoInputNet):
    def forward(self, table, image):  # the image branch sees the table too (its layers depend on the first input)
        return super().forward(image + table.mean(dim=1)[:, None, None, None], table)


def test_image_maps_over_a_table_first_are_refused_before_training(tmp_path):
    callback = GradCAMCallback(layer="net.features.4", num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    loaders = [DataLoader(_TableFirst(32, seed), batch_size=16) for seed in (1, 2)]
    with pytest.raises(ValueError, match="Put the image first"):
        trainer.fit(_TableFirstNet(), *loaders)
    assert trainer.global_step == 0


def _CategoriesFirst(count: int, seed: int) -> Dataset:
    return _Rearranged(count, seed, lambda inputs, label: ((inputs[2].reshape(1), inputs[1]), label))


class _CategoriesFirstNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(3, 4)
        self.head = nn.Linear(4 + FEATURES, CLASSES)

    def forward(self, site, table):
        return self.head(torch.cat([self.embedding(site).mean(dim=1), table], dim=1))

    training_step = TwoInputNet.training_step
    validation_step = TwoInputNet.validation_step
    configure_optimizers = TwoInputNet.configure_optimizers


def test_integer_ids_first_explain_the_first_input_alone_and_say_so(tmp_path):
    callback = SaliencyCallback(methods="integrated_gradients", input_layer="auto", num_samples=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    loaders = [DataLoader(_CategoriesFirst(32, seed), batch_size=16) for seed in (1, 2)]
    with pytest.warns(UserWarning, match=r"floating-point input\(s\) \['input1'\] get no map"):
        trainer.fit(_CategoriesFirstNet(), *loaders)


def test_a_dict_batch_names_its_first_input_by_its_key_and_refuses_input_names(tmp_path):
    loaders = [DataLoader(_DictBatches(32, seed), batch_size=16) for seed in (1, 2)]
    names = DataDescription(feature_names=[f"f{i}" for i in range(FEATURES)])  # the table's, a keyword input
    callback = SaliencyCallback(methods={"integrated_gradients": {"n_steps": 4}}, num_samples=4, data=names)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1, limit_train_batches=2)
    trainer.fit(_KeywordNet(), *loaders)
    assert {
        "interp_saliency/integrated_gradients/share_image",
        "interp_saliency/integrated_gradients/share_table",
    } <= set(trainer.callback_metrics)
    named = SaliencyCallback(num_samples=4, data=DataDescription(input_names=["img", "meta"]))
    trainer = quiet_trainer(tmp_path, callbacks=[named], logger=False, max_epochs=1, limit_train_batches=2)
    with pytest.raises(ValueError, match="named by their keys"):
        trainer.fit(_KeywordNet(), *loaders)
