"""DatasetBiasCallback in a real Trainer: class counts equal the datasets' (sampler splits honoured), the imbalance
warning, per-class recall and precision equal torchmetrics on independently computed logits, datasets without label
lists, non-interference."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset
from torchmetrics.functional.classification import multiclass_precision, multiclass_recall

from lightning_interp import DatasetBiasCallback
from lightning_interp.methods import class_balance
from lightning_interp.synthetic import SyntheticShapes
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule


def test_class_counts_equal_the_datasets_and_per_class_recall_equals_torchmetrics(tmp_path):
    callback = DatasetBiasCallback(class_names=["disc", "square", "triangle", "cross"])
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=logger, max_epochs=2)
    model, datamodule = tiny_classifier(), tiny_datamodule()
    trainer.fit(model, datamodule=datamodule)
    train_counts = torch.bincount(datamodule.train_set.labels, minlength=4)
    val_counts = torch.bincount(datamodule.val_set.labels, minlength=4)
    assert torch.equal(callback.balances["train"].counts, train_counts)
    assert torch.equal(callback.balances["val"].counts, val_counts)
    events = read_events(logger.log_dir)
    ratio = [v for _, v in events.scalars["interp/bias/train/imbalance_ratio"]]
    assert ratio == [pytest.approx(float(train_counts.max() / train_counts.min()))]
    assert events.image_steps("interp/bias/class_counts") == [0]
    assert events.image_steps("interp/bias/confusion") == [4, 8]

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(batch[0]) for batch in datamodule.val_dataloader()])
    labels = datamodule.val_set.labels
    predictions = logits.argmax(dim=1)
    recall = multiclass_recall(predictions, labels, num_classes=4, average=None)
    metrics = trainer.callback_metrics
    for k, name in enumerate(["disc", "square", "triangle", "cross"]):
        assert float(metrics[f"interp/bias/{name}/recall"]) == pytest.approx(float(recall[k]), abs=1e-6)
    predicted = set(predictions.tolist())
    precision = multiclass_precision(predictions, labels, num_classes=4, average=None)
    for k in predicted:  # a class never predicted has no precision: not logged
        name = ["disc", "square", "triangle", "cross"][k]
        assert float(metrics[f"interp/bias/{name}/precision"]) == pytest.approx(float(precision[k]), abs=1e-6)
    assert float(metrics["interp/bias/recall_gap"]) == pytest.approx(float(recall.max() - recall.min()), abs=1e-6)


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
    assert not math.isnan(float(trainer.callback_metrics["interp/bias/worst_recall"]))


def test_class_balance_by_hand():
    balance = class_balance(torch.tensor([2, 2, 2, 2, 0]), num_classes=4)
    assert balance.counts.tolist() == [1, 0, 4, 0]
    assert balance.imbalance_ratio == math.inf and balance.rarest == 1 and balance.commonest == 2
    assert balance.shares.tolist() == [0.2, 0.0, 0.8, 0.0]
    with pytest.raises(ValueError, match="integer class labels"):
        class_balance(torch.rand(3))
