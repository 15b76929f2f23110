"""DatasetBiasCallback in a real Trainer: class counts equal the datasets' (sampler splits honoured), the imbalance
warning, per-class recall and precision equal torchmetrics on independently computed logits, datasets without label
lists; the spurious-cue measures on analytic maps and on a model whose gradients are known; the planted biases of
the synthetic shapes."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset
from torchmetrics.functional.classification import multiclass_precision, multiclass_recall

from lightning_interp import DataDescription, DatasetBiasCallback
from lightning_interp.methods import border_band, class_balance
from lightning_interp.synthetic import SyntheticShapes, make_shapes
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def test_class_counts_equal_the_datasets_and_per_class_recall_equals_torchmetrics(tmp_path):
    callback = DatasetBiasCallback(data=DataDescription(class_names=["disc", "square", "triangle", "cross"]))
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=2)
    model, datamodule = tiny_classifier(), tiny_datamodule()
    trainer.fit(model, datamodule=datamodule)
    train_counts = torch.bincount(datamodule.train_set.labels, minlength=4)
    val_counts = torch.bincount(datamodule.val_set.labels, minlength=4)
    assert torch.equal(callback.balances["train"].counts, train_counts)
    assert torch.equal(callback.balances["val"].counts, val_counts)
    events = read_events(logger.log_dir)
    ratio = [v for _, v in events.scalars["interp_bias/train/imbalance_ratio"]]
    assert ratio == [pytest.approx(float(train_counts.max() / train_counts.min()))]
    assert events.image_steps("interp_bias/class_counts") == [0]
    assert events.image_steps("interp_bias/confusion") == [3, 7]

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(batch[0]) for batch in datamodule.val_dataloader()])
    labels = datamodule.val_set.labels
    predictions = logits.argmax(dim=1)
    recall = multiclass_recall(predictions, labels, num_classes=4, average=None)
    metrics = trainer.callback_metrics
    for k, name in enumerate(["disc", "square", "triangle", "cross"]):
        assert float(metrics[f"interp_bias/{name}/recall"]) == pytest.approx(float(recall[k]), abs=1e-6)
    predicted = set(predictions.tolist())
    precision = multiclass_precision(predictions, labels, num_classes=4, average=None)
    for k in predicted:  # a class never predicted has no precision: not logged
        name = ["disc", "square", "triangle", "cross"][k]
        assert float(metrics[f"interp_bias/{name}/precision"]) == pytest.approx(float(precision[k]), abs=1e-6)
    assert float(metrics["interp_bias/recall_gap"]) == pytest.approx(float(recall.max() - recall.min()), abs=1e-6)


def test_a_rare_class_is_warned_about_and_a_sampler_split_is_counted_as_sampled(tmp_path):
    data = SyntheticShapes(96, image_size=16, seed=0)
    keep = [i for i in range(64) if data.labels[i] != 3][:40] + [i for i in range(64) if data.labels[i] == 3][:2]
    train = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(keep))  # class 3: 2 samples
    validation_indices = list(range(64, 96))
    validation = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(validation_indices))
    callback = DatasetBiasCallback(imbalance_warning=5)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match=r"the train set is imbalanced: class '3' has 2 samples"):
        trainer.fit(tiny_classifier(), train, validation)
    expected_train = class_balance(data.labels[sorted(keep)], 4)
    assert torch.equal(callback.balances["train"].counts, expected_train.counts)
    assert callback.balances["train"].rarest == 3
    assert torch.equal(callback.balances["val"].counts, torch.bincount(data.labels[validation_indices], minlength=4))


class NoLabelList(Dataset):
    """Samples with labels, but no list of them: counting would need every sample loaded."""

    def __init__(self) -> None:
        shapes = SyntheticShapes(32, image_size=16, seed=2)
        self.images, self.labels_hidden = shapes.images, shapes.labels

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int):
        return self.images[index], self.labels_hidden[index]


def test_a_dataset_without_a_label_list_is_skipped_with_a_warning_and_the_metrics_still_come(tmp_path):
    callback = DatasetBiasCallback()
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    loader = DataLoader(NoLabelList(), batch_size=16)
    shapes = SyntheticShapes(32, image_size=16)
    with pytest.warns(UserWarning, match="the train data is not a map-style dataset that lists its labels"):
        trainer.fit(tiny_classifier(), loader, DataLoader(TensorDataset(shapes.images, shapes.labels), batch_size=16))
    assert "train" not in callback.balances and "val" in callback.balances
    assert not math.isnan(float(trainer.callback_metrics["interp_bias/worst_recall"]))


def test_class_balance_by_hand():
    balance = class_balance(torch.tensor([2, 2, 2, 2, 0]), num_classes=4)
    assert balance.counts.tolist() == [1, 0, 4, 0]
    assert balance.imbalance_ratio == math.inf and balance.rarest == 1 and balance.commonest == 2
    assert balance.shares.tolist() == [0.2, 0.0, 0.8, 0.0]
    with pytest.raises(ValueError, match="integer class labels"):
        class_balance(torch.rand(3))


# ---------------------------------------------------------------------------------------------------- spurious cues
def test_border_share_and_class_attribution_on_analytic_maps():
    from lightning_interp.methods import border_share, class_attribution

    band = border_band(10, 20, 0.1)
    assert int(band.sum()) == 10 * 20 - 8 * 16  # 0.1 of the sides: one row and two columns at every edge
    assert not band[1:9, 2:18].any() and band[0].all() and band[:, :2].all()
    uniform = torch.ones(3, 10, 20)
    area = torch.full((3,), float(band.double().mean()), dtype=torch.float64)
    assert torch.allclose(border_share(uniform, 0.1), area)
    centre = torch.zeros(1, 10, 20)
    centre[0, 4:6, 8:12] = 2.0
    assert border_share(centre, 0.1).item() == 0.0
    assert border_share(-uniform, 0.1).equal(border_share(uniform, 0.1))  # the magnitude counts

    # with masks: class 0's maps sit exactly on the object, class 1's are uniform, class 2's miss the object
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True  # a quarter of the image
    maps = torch.zeros(6, 8, 8)
    maps[0:2] = masks[0:2].float() * torch.rand(2, 1, 1)
    maps[2:4] = 1.0
    maps[4:6, 0, 0] = 1.0
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    found = class_attribution(maps, labels, 4, masks=masks)
    assert found.measure == "localization"
    assert found.scores[:3].tolist() == [1.0, 0.25, 0.0]
    assert found.lift[:3].tolist() == [4.0, 1.0, 0.0]
    assert found.counts.tolist() == [2, 2, 2, 0] and found.scores[3].isnan()
    # an all-zero map has no mass to place: left out of its class's mean, not counted as 0
    maps[1] = 0.0
    assert class_attribution(maps, labels, 4, masks=masks).counts[0] == 1
    # without masks, the border measure: a uniform map's lift is exactly 1
    plain = class_attribution(torch.ones(4, 8, 8), torch.tensor([0, 1, 1, 0]), 2)
    assert plain.measure == "border_share" and torch.allclose(plain.lift, torch.ones(2, dtype=torch.float64))


class FixedLinear(pl.LightningModule):
    """A linear classifier that never changes (lr 0): the gradient of class k is its weight image W_k, so where the
    maps lie is known exactly. Class 0 reads only the border band, class 1 only the centre."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * size * size, 2, bias=False)
        band = border_band(size, size, 0.25)
        weights = torch.zeros(2, 3, size, size)
        weights[0, :, band] = 1.0
        weights[1, :, ~band] = 1.0
        with torch.no_grad():
            self.linear.weight.copy_(weights.reshape(2, -1))

    def forward(self, x):
        return self.linear(x.flatten(1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_spurious_cue_scalars_in_a_trainer_equal_the_analytic_values(tmp_path):
    inputs = torch.rand(48, 3, 16, 16)
    labels = torch.arange(48) % 2
    band = border_band(16, 16, 0.25)
    area = float(band.double().mean())
    callback = DatasetBiasCallback(methods="gradient", num_samples=32, border_fraction=0.25)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=1)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=16)
    trainer.fit(FixedLinear(), loader, loader)
    metrics = trainer.callback_metrics
    assert float(metrics["interp_bias/0/border_share"]) == pytest.approx(1.0)
    assert float(metrics["interp_bias/1/border_share"]) == pytest.approx(0.0, abs=1e-7)
    assert float(metrics["interp_bias/0/border_lift"]) == pytest.approx(1 / area)
    assert float(metrics["interp_bias/max_border_lift"]) == pytest.approx(1 / area)
    events = read_events(logger.log_dir)
    assert events.image_steps("interp_bias/attribution_by_class") == [2]

    # with masks: class 0's masks cover the band (its maps lie on them: localization 1), class 1's the band too
    # (its maps lie off them: 0); no 'recognised but not by the object' warning with fewer than three classes
    masks = band.expand(48, 16, 16).clone()
    callback = DatasetBiasCallback(methods="gradient", num_samples=32)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    loader = DataLoader(TensorDataset(inputs, labels, masks), batch_size=16)
    trainer.fit(FixedLinear(), loader, loader)
    metrics = trainer.callback_metrics
    assert float(metrics["interp_bias/0/localization"]) == pytest.approx(1.0)
    assert float(metrics["interp_bias/1/localization"]) == pytest.approx(0.0, abs=1e-7)
    assert float(metrics["interp_bias/0/localization_lift"]) == pytest.approx(1 / area)
    assert callback.class_attribution is not None and callback.class_attribution.measure == "localization"


def test_spurious_cue_options_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown attribution method"):
        DatasetBiasCallback(methods="no_such_method")
    with pytest.raises(TypeError, match="takes no option"):
        DatasetBiasCallback(methods={"gradient": {"n_steps": 4}})
    with pytest.raises(ValueError, match="one method's maps"):
        DatasetBiasCallback(methods=["gradient", "grad_cam"])
    with pytest.raises(ValueError, match="border_fraction"):
        DatasetBiasCallback(methods="gradient", border_fraction=0.5)
    # a layer that does not exist fails at fit start, before the first training step
    callback = DatasetBiasCallback(methods={"grad_cam": {"layer": "net.99"}})
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    model = tiny_classifier()
    steps = []
    model.on_train_batch_start = lambda *args: steps.append(1)
    with pytest.raises(Exception, match=r"net\.99"):
        trainer.fit(model, datamodule=tiny_datamodule())
    assert steps == []


def test_synthetic_shapes_plant_a_rare_class_and_a_class_coloured_background():
    images, labels, masks = make_shapes(2000, image_size=16, seed=3, class_weights=[1, 1, 0.1, 1], tinted_class=3)
    counts = torch.bincount(labels, minlength=4).double()
    assert counts[2] / counts.sum() == pytest.approx(0.1 / 3.1, abs=0.015)
    # the background's red excess over green: large for crosses (tint_share 0.9), small for the others (0.1)
    background = ~masks[:, None].expand_as(images)
    excess = ((images[:, 0] - images[:, 1]) * background[:, 0]).sum(dim=(1, 2)) / background[:, 0].sum(dim=(1, 2))
    red = excess > 0.15
    assert red[labels == 3].double().mean() == pytest.approx(0.9, abs=0.05)
    assert red[labels != 3].double().mean() == pytest.approx(0.1, abs=0.03)
    plain_images, plain_labels, _ = make_shapes(64, image_size=16, seed=3)
    assert torch.bincount(plain_labels, minlength=4).min() > 5
    plain = (plain_images[:, 0] - plain_images[:, 1]).mean(dim=(1, 2))
    assert bool((plain < 0.15).all())  # no tint without the option
    with pytest.raises(ValueError, match="class_weights"):
        make_shapes(8, class_weights=[1, 1])
    with pytest.raises(ValueError, match="tinted_class"):
        make_shapes(8, tinted_class=4)


def test_the_automatic_cam_layer_is_grad_cam_callbacks_and_is_chosen_once(tmp_path, monkeypatch):
    from lightning_interp import GradCAMCallback
    from lightning_interp.callbacks import _base

    choices = []
    original = _base.find_target_layer
    monkeypatch.setattr(_base, "find_target_layer", lambda *a, **k: choices.append(1) or original(*a, **k))
    bias, gradcam = DatasetBiasCallback(methods="grad_cam", num_samples=16), GradCAMCallback()
    trainer = quiet_trainer(tmp_path, callbacks=[bias, gradcam], logger=False, max_epochs=3)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert bias._layer == gradcam.layers[0] and len(choices) == 1
    assert bias._runs == 3 and bias.class_attribution is not None
    metrics = trainer.callback_metrics
    assert {f"interp_bias/{k}/localization_lift" for k in range(4) if bias.class_attribution.counts[k]} <= set(metrics)
