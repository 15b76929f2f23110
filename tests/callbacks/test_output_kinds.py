"""Binary, multi-label, regression and one-hot models through every callback, with the real Trainer.

The grid's text is checked against values the test computes itself from the trained model (sigmoid of the
predicted side, sigmoid of the top label, the raw output), not against what the code under test computed, and
every scalar read back from the TensorBoard event files must be finite.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_interp.callbacks._maps as maps_module
from lightning_interp import (
    Display,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from tests.conftest import quiet_trainer, read_events


class Net(pl.LightningModule):
    """A small conv net whose loss matches the output kind."""

    def __init__(self, outputs: int, loss: str) -> None:
        super().__init__()
        self.loss = loss
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, outputs),
        )

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        out = self(x)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out.reshape(y.shape), y.float())
        if self.loss == "mse":
            return F.mse_loss(out.reshape(y.shape), y)
        return F.cross_entropy(out, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(kind: str, count: int = 48) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(count, 3, 8, 8, generator=generator)
    brightness = x.mean(dim=(1, 2, 3))
    if kind == "binary":
        y = (torch.arange(count) % 2).long()  # 0/1 class indices, one logit
    elif kind == "multilabel":
        y = torch.stack([torch.arange(count) % 2, (torch.arange(count) // 2) % 2, torch.arange(count) % 3 == 0], dim=1)
        y = y.float()  # multi-hot rows: some with 0, 1, 2 or 3 labels
    elif kind == "regression":
        y = 3 * brightness + 0.1 * torch.randn(count, generator=generator)  # fractional values
    else:  # one-hot rows of 4 classes
        y = F.one_hot(torch.arange(count) % 4, 4).float()
    return TensorDataset(x, y)


def _fit(tmp_path, kind: str, callbacks, monkeypatch):
    """Fit one epoch; return the model, the row texts each grid rendered, and the logged scalars."""
    outputs, loss = {"binary": (1, "bce"), "multilabel": (3, "bce"), "regression": (1, "mse")}.get(kind, (4, "ce"))
    model = Net(outputs, loss)
    rendered: list[list[str]] = []
    original = maps_module.render_grid

    def recording(rows, **options):
        if options.get("row_labels"):
            rendered.append(list(options["row_labels"]))
        return original(rows, **options)

    monkeypatch.setattr(maps_module, "render_grid", recording)
    data = _data(kind)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, logger=logger)
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    return model, rendered, read_events(logger.log_dir).scalars


def _callbacks(**map_options):
    map_options.setdefault("display", Display(rows_per_image=None))  # one grid per run: its row texts read whole
    return [
        SaliencyCallback(methods=("gradient", ("integrated_gradients", {"n_steps": 4})), num_samples=6, **map_options),
        GradCAMCallback(layer="net.2", num_samples=6, **map_options),
        LinearProbeCallback(layers=["net.1", "net.3"], num_samples=24),
        RepresentationSimilarityCallback(layers=["net.1", "net.3", "net.6"], num_samples=24),  # net.6: the output
    ]


def _assert_all_finite(scalars, prefixes):
    ours = {tag: values for tag, values in scalars.items() if tag.split("/")[0] in prefixes}
    assert ours, f"no scalars under {prefixes}: {sorted(scalars)}"
    for tag, values in ours.items():
        assert all(math.isfinite(v) for _, v in values), f"{tag} is not finite: {values}"


def _logits(model, callback):
    with torch.no_grad():
        return model.eval()(callback.probe.inputs).float()


def test_binary_model_shows_the_predicted_side_and_its_sigmoid(tmp_path, monkeypatch):
    callbacks = _callbacks()
    model, rendered, scalars = _fit(tmp_path, "binary", callbacks, monkeypatch)
    saliency = callbacks[0]
    assert saliency.output_task == "binary"
    logits = _logits(model, saliency)[:, 0]
    labels = saliency.probe.labels
    expected = [
        f"#{i}\nlabel {int(labels[i])}\npred  {int(logit > 0)} {1 / (1 + math.exp(-abs(float(logit)))):.0%}"
        for i, logit in enumerate(logits)
    ]
    assert set(labels.tolist()) == {0, 1}
    assert rendered[0] == expected  # the saliency grid: no "pred 0 100%" from a softmax over one column
    assert rendered[1] == expected  # the Grad-CAM grid, on the same probe samples
    _assert_all_finite(scalars, {"interp_saliency", "interp_gradcam", "interp_probe", "interp_similarity"})
    assert any(tag.endswith("/accuracy") for tag in scalars)  # the probe treats 0/1 labels as two classes


def test_multilabel_model_shows_the_label_set_and_the_top_label(tmp_path, monkeypatch):
    callbacks = _callbacks()
    model, rendered, scalars = _fit(tmp_path, "multilabel", callbacks, monkeypatch)
    saliency = callbacks[0]
    assert saliency.output_task == "multilabel"
    scores = _logits(model, saliency)
    labels = saliency.probe.labels
    for i, text in enumerate(rendered[0]):
        positive = ",".join(str(int(c)) for c in torch.nonzero(labels[i]).flatten()) or "none"
        top = int(scores[i].argmax())
        confidence = 1 / (1 + math.exp(-float(scores[i, top])))  # a sigmoid per label, not a softmax
        assert text.splitlines() == [f"#{i}", f"labels {positive}", f"top   {top} {confidence:.0%}"]
    _assert_all_finite(scalars, {"interp_saliency", "interp_gradcam", "interp_probe", "interp_similarity"})
    probe_tags = [tag for tag in scalars if tag.endswith("/accuracy") and tag.startswith("interp_probe/")]
    assert probe_tags and all(0 <= scalars[tag][-1][1] <= 1 for tag in probe_tags)
    assert any(tag.endswith("rsa_vs_labels") for tag in scalars)


def test_regression_model_shows_the_target_value_and_the_output(tmp_path, monkeypatch):
    callbacks = _callbacks()
    model, rendered, scalars = _fit(tmp_path, "regression", callbacks, monkeypatch)
    saliency = callbacks[0]
    assert saliency.output_task == "regression"
    outputs = _logits(model, saliency)[:, 0]
    labels = saliency.probe.labels
    for i, text in enumerate(rendered[0]):
        assert text.splitlines() == [f"#{i}", f"label {float(labels[i]):.4g}", f"out   {float(outputs[i]):.4g}"]
    _assert_all_finite(scalars, {"interp_saliency", "interp_gradcam", "interp_probe", "interp_similarity"})
    assert any(tag.endswith("/r2") for tag in scalars) and not any(tag.endswith("/accuracy") for tag in scalars)
    assert any(tag.endswith("rsa_vs_labels") for tag in scalars)
    # the probe draw spreads over the targets' range: values from the lowest and the highest quarter are drawn
    everything = _data("regression").tensors[1]
    low, high = everything.quantile(0.25), everything.quantile(0.75)
    assert bool((labels <= low).any()) and bool((labels >= high).any())


def test_one_hot_labels_are_class_labels(tmp_path, monkeypatch):
    callbacks = _callbacks(target="label")
    _, rendered, scalars = _fit(tmp_path, "one_hot", callbacks, monkeypatch)
    saliency = callbacks[0]
    assert saliency.output_task == "multiclass"
    classes = saliency.probe.labels.argmax(dim=1)
    for i, text in enumerate(rendered[0]):
        assert text.splitlines()[1] == f"label {int(classes[i])}"
    _assert_all_finite(scalars, {"interp_saliency", "interp_gradcam", "interp_probe", "interp_similarity"})


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("multilabel", {"target": "label", "task": "multilabel"}, "several labels"),
        ("regression", {"target": "label"}, "labels are values"),
        ("binary", {"target": 2}, "2 classes: 0 to 1"),
        ("binary", {"task": "multiclass"}, "one logit is task='binary'"),
    ],
)
def test_output_kind_mistakes_fail_before_training(tmp_path, monkeypatch, kind, options, message):
    callback = SaliencyCallback(num_samples=4, **options)
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, kind, [callback], monkeypatch)


def test_one_output_without_labels_asks_for_the_task(tmp_path):
    data = TensorDataset(torch.rand(16, 3, 8, 8))

    class Unlabelled(Net):
        def validation_step(self, batch, batch_idx):
            self.log("val_out", self(batch[0]).mean())

        def training_step(self, batch, batch_idx):
            return self(batch[0]).square().mean()

    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[SaliencyCallback(num_samples=4)], logger=False)
    with pytest.raises(ValueError, match="task='binary' or task='regression'"):
        trainer.fit(Unlabelled(1, "mse"), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.global_step == 0
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[SaliencyCallback(num_samples=4, task="binary")], logger=False
    )
    trainer.fit(Unlabelled(1, "mse"), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.callbacks[0]._runs == 1


class SoftTargets(Net):
    """A 4-class softmax model trained on soft (label-smoothed) targets or with -100 'ignore' labels."""

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, ignore_index=-100) if y.ndim == 1 else F.cross_entropy(self(x), y)


@pytest.mark.parametrize("kind", ["soft", "ignore_index"])
def test_multiclass_models_with_soft_or_ignored_labels_explain_the_prediction(tmp_path, kind):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=generator)
    classes = torch.arange(32) % 4
    if kind == "soft":  # label smoothing: rows of 0.025 and 0.925
        y = F.one_hot(classes, 4).float() * 0.9 + 0.025
    else:
        y = torch.where(torch.arange(32) % 5 == 0, -100, classes)
    data = TensorDataset(x, y)
    callback = SaliencyCallback(methods=("gradient",), num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SoftTargets(4, "ce"), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert callback.output_task == "multiclass" and callback._runs == 1
    noted = [str(w.message) for w in caught if "needs no labels" in str(w.message)]
    assert bool(noted) == (kind == "ignore_index")  # soft rows are understood; -100 is said to be left out


def test_text_batches_with_an_attention_mask_before_the_labels():
    from lightning_interp.probe import parse_batch

    ids = torch.randint(0, 100, (4, 12))
    attention = torch.ones(4, 12, dtype=torch.long)
    labels = torch.tensor([0, 2, 1, 2])
    parsed = parse_batch((ids, attention, labels))
    assert parsed.labels is labels  # not the (B, T) mask, which is shaped like the inputs


def test_sparse_multilabel_data_is_read_from_all_its_labels_not_the_few_probe_rows(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 8, 8, generator=generator)
    y = F.one_hot(torch.arange(48) % 3, 3).float()
    y[[7, 23, 40], 0] = 1.0  # three samples with two labels; the four probe rows drawn have one each
    callback = SaliencyCallback(methods=("gradient",), num_samples=3)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    data = TensorDataset(x, y)
    trainer.fit(Net(3, "bce"), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    assert float(callback.probe.labels.sum(dim=1).max()) == 1.0  # the probe alone would look one-hot
    assert callback.output_task == "multilabel"


@pytest.mark.parametrize("kind", ["binary", "multilabel", "regression", "one_hot"])
def test_explanation_quality_follows_the_output_kind(tmp_path, monkeypatch, kind):
    from lightning_interp import ExplanationQualityCallback

    quality = ExplanationQualityCallback(
        ["gradient", ("grad_cam", {"layer": "net.2"})],
        num_samples=8,
        metrics={"deletion": {"steps": 4}, "insertion": {"steps": 4}, "top_drop": None, "sanity": None,
                 "sparseness": None, "localization": None},
    )  # fmt: skip
    _, _, scalars = _fit(tmp_path, kind, [quality], monkeypatch)
    expected = {"binary": "binary", "multilabel": "multilabel", "regression": "regression"}.get(kind, "multiclass")
    assert quality._output_task == expected  # a binary model: the sigmoid of its side, not a softmax of one logit
    for key in ("gradient", "grad_cam@net.2"):
        values = [v for _, v in scalars[f"interp_quality/{key}/deletion_auc"]]
        assert values and all(math.isfinite(v) for v in values), (key, values)
        if expected != "regression":  # a probability's mean over the curve
            assert all(0.0 <= v <= 1.0 for v in values), (key, values)
