"""The contract's last part for the callbacks that do not explain: what each logs equals what the public functional
API (:mod:`lightning_interp.methods`) gives on the same model and the same probe samples.

Every expected value is computed here from the public functions, on a probe set drawn here with
:meth:`~lightning_interp.probe.ProbeSet.from_dataloader` (the draw the callbacks make; the test only checks that the
callback explained the same samples). Logged values are read from ``trainer.callback_metrics`` (stored as float32 by
Lightning, hence relative tolerances of 1e-6 where the computation itself is exact) or, for the report, from the
run's TensorBoard events.
"""

from __future__ import annotations

import copy
import re
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import (
    ActivationMapsCallback,
    AttentionCallback,
    CalibrationCallback,
    ConceptCallback,
    FeatureVisualizationCallback,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
)
from lightning_interp.demo import ImageClassifier, TextTransformer
from lightning_interp.methods import (
    activation_maps,
    activation_statistics,
    attention_entropy,
    attention_rollout,
    capture_attention,
    capture_features,
    cka_matrix,
    disjoint_random_sets,
    expected_calibration_error,
    feature_visualization,
    fuse_heads,
    label_rdm,
    linear_cka,
    linear_probe_accuracy,
    rdm,
    rsa,
    tcav_scores,
)
from lightning_interp.probe import ProbeSet
from lightning_interp.synthetic_text import PAD_ID, VOCABULARY, make_keyword_text
from tests.conftest import BatchNormDropoutNet, quiet_trainer, read_events, tiny_datamodule

LAYERS = ["net.features.2", "net.features.5"]  # the in-place ReLU (6 x 16 x 16) and the last ReLU (8 x 8 x 8)


def _image_model() -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(BatchNormDropoutNet(), lr=5e-3)


def _fit(tmp_path, model: pl.LightningModule, callbacks: list[Callback], val_size: int = 32, **options) -> pl.Trainer:
    """One epoch on the tiny shapes data (64 training, ``val_size`` validation samples of 16 x 16)."""
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, max_epochs=1, **{"logger": False, **options})
    trainer.fit(model, datamodule=tiny_datamodule(val_size=val_size))
    return trainer


def _val_loader(val_size: int = 32) -> DataLoader:
    datamodule = tiny_datamodule(val_size=val_size)
    datamodule.setup("fit")
    return datamodule.val_dataloader()


def _probe(num_samples: int, val_size: int = 32) -> ProbeSet:
    """The probe samples a callback draws from the tiny validation data, drawn here independently."""
    return ProbeSet.from_dataloader(_val_loader(val_size), num_samples)


def _same_samples(callback: Callback, probe: ProbeSet) -> None:
    assert callback.probe is not None and torch.equal(callback.probe.inputs, probe.inputs)


def _logged(trainer: pl.Trainer, tag: str) -> float:
    assert tag in trainer.callback_metrics, f"{tag} was not logged; logged: {sorted(trainer.callback_metrics)}"
    return float(trainer.callback_metrics[tag])


# ------------------------------------------------------------------ linear probe
def test_linear_probe_logs_the_functional_probe_accuracy(tmp_path):
    """The callback pools each layer's output (here to 256 features, so both layers are pooled: 6 x 4 x 4 and
    8 x 4 x 4), standardises with the training half, splits by class with its seed and fits L-BFGS logistic
    regression: :func:`capture_features` + :func:`linear_probe_accuracy` with the same options."""
    callback = LinearProbeCallback(layers=LAYERS, num_samples=32, max_features=256, seed=3, l2=1e-2)
    model = _image_model()
    trainer = _fit(tmp_path, model, [callback])
    probe = _probe(32)
    _same_samples(callback, probe)
    features = capture_features(model, probe.inputs, LAYERS, max_features=256)
    assert {layer: tuple(values.shape) for layer, values in features.items()} == {
        "net.features.2": (32, 96),
        "net.features.5": (32, 128),
    }
    for layer in LAYERS:
        ours = linear_probe_accuracy(features[layer], probe.labels, test_fraction=0.5, l2=1e-2, seed=3)
        # shares of a count of samples: equal to float32 rounding, or a whole sample apart
        assert _logged(trainer, f"interp_probe/{layer}/accuracy") == pytest.approx(ours.accuracy, rel=1e-6)
        assert _logged(trainer, f"interp_probe/{layer}/train_accuracy") == pytest.approx(ours.train_accuracy, rel=1e-6)


# ------------------------------------------------------------------ representation similarity
def test_similarity_logs_the_functional_cka_and_rsa(tmp_path):
    """``cka_vs_start`` is the debiased linear CKA (:func:`linear_cka`) of a layer now and before the first step;
    ``cka_vs_reference_max`` the row maximum of the model x reference block of :func:`cka_matrix` (a network of
    another initialisation as ``reference_model``); ``rsa_vs_labels`` the Spearman :func:`rsa` of the layer's
    correlation :func:`rdm` and the :func:`label_rdm`. Features: :func:`capture_features`, pooled to 256."""
    model = _image_model()
    untrained = copy.deepcopy(model.net)  # the weights at on_train_start (sanity validation runs in eval mode)
    torch.manual_seed(1)
    reference = BatchNormDropoutNet()
    reference_layers = ["features.2", "features.5"]
    callback = RepresentationSimilarityCallback(
        layers=LAYERS,
        num_samples=32,
        max_features=256,
        reference_model=reference,
        reference_layers=reference_layers,
    )
    trainer = _fit(tmp_path, model, [callback])
    probe = _probe(32)
    _same_samples(callback, probe)
    now = capture_features(model, probe.inputs, LAYERS, max_features=256)
    start = capture_features(untrained, probe.inputs, reference_layers, max_features=256)
    theirs = capture_features(reference, probe.inputs, reference_layers, max_features=256)
    matrix = cka_matrix({**now, **{f"reference.{name}": values for name, values in theirs.items()}}, debiased=True)
    for row, (layer, first) in enumerate(zip(LAYERS, reference_layers, strict=True)):
        # the callback keeps the start's Gram matrices in float32 (checkpoint size): agreement to ~1e-7
        expected = float(linear_cka(now[layer], start[first], debiased=True))
        assert _logged(trainer, f"interp_similarity/{layer}/cka_vs_start") == pytest.approx(expected, rel=1e-5)
        best = float(matrix[row, len(LAYERS) :].max())
        assert _logged(trainer, f"interp_similarity/{layer}/cka_vs_reference_max") == pytest.approx(best, rel=1e-6)
        correlation = float(rsa(rdm(now[layer]), label_rdm(probe.labels)))
        assert _logged(trainer, f"interp_similarity/{layer}/rsa_vs_labels") == pytest.approx(correlation, rel=1e-6)


# ------------------------------------------------------------------ activation maps
def test_activation_maps_log_the_functional_statistics(tmp_path):
    layers = ["net.features.1", "net.features.5"]  # BatchNorm output (signed) and a ReLU output
    callback = ActivationMapsCallback(layers=layers, num_samples=8)
    model = _image_model()
    trainer = _fit(tmp_path, model, [callback])
    probe = _probe(8)
    _same_samples(callback, probe)
    maps = activation_maps(model, probe.inputs, layers)
    for layer in layers:
        stats = activation_statistics(maps[layer])
        for metric in ("dead_fraction", "mean_activation", "sparsity"):
            logged = _logged(trainer, f"interp_activations/{layer}/{metric}")
            assert logged == pytest.approx(getattr(stats, metric), rel=1e-6, abs=1e-9), (layer, metric)


# ------------------------------------------------------------------ calibration
def test_calibration_logs_the_functional_ece_of_the_validation_pass(tmp_path):
    callback = CalibrationCallback(n_bins=10)
    model = _image_model()
    trainer = _fit(tmp_path, model, [callback])
    model.eval()
    logits, labels = [], []
    with torch.no_grad():  # the validation pass again, batch by batch as the trainer ran it
        for batch in _val_loader():  # (images, labels, masks)
            logits.append(model(batch[0]))
            labels.append(batch[1])
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert logits.shape == (32, 4)
    ece = float(expected_calibration_error(logits, labels, n_bins=10, from_logits=True))
    assert _logged(trainer, "interp_calibration/ece") == pytest.approx(ece, rel=1e-5)
    accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    assert _logged(trainer, "interp_calibration/accuracy") == pytest.approx(accuracy, rel=1e-6)


# ------------------------------------------------------------------ attention
def test_attention_maps_are_the_functional_attention_and_rollout(tmp_path):
    """Defaults: the last attention layer, the mean over heads and over every query token (no ``pad_id``: padding
    queries count too), rollout with the residual identity through every layer."""
    torch.manual_seed(0)
    net = TextTransformer(len(VOCABULARY), 3, dim=16, heads=2, layers=2, max_length=12, pad_id=PAD_ID)
    model = ImageClassifier(net, lr=1e-3)
    data = make_keyword_text(96, length=12, min_length=6, seed=0)
    loader = DataLoader(TensorDataset(data.ids, data.labels), batch_size=16)
    callback = AttentionCallback(num_samples=8)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=1)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    probe = ProbeSet.from_dataloader(loader, 8)
    _same_samples(callback, probe)
    weights, _ = capture_attention(model, probe.inputs)  # every attention layer, in forward order
    names = list(weights)
    assert names == ["net.encoder.layers.0.self_attn", "net.encoder.layers.1.self_attn"]
    last = weights[names[-1]]  # (B, heads, queries, keys)
    maps = callback.last_maps
    torch.testing.assert_close(maps[names[-1]], fuse_heads(last, "mean").mean(dim=1))
    rollout = attention_rollout([fuse_heads(w, "mean") for w in weights.values()], residual=True)
    torch.testing.assert_close(maps["rollout"], rollout.mean(dim=1))
    for name, w in weights.items():
        expected = float(attention_entropy(w).mean())
        assert _logged(trainer, f"interp_attention/{name}/entropy") == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ concepts
def test_concept_logs_the_functional_tcav_scores(tmp_path):
    """The callback's random counter-examples are 2 x n_random disjoint sets of its probe samples
    (:func:`disjoint_random_sets` with its seed, each of min(largest concept, pool // (2 n_random)) samples);
    :func:`tcav_scores` on those sets, with the same seed, split and penalty, gives the same scores. (The callback
    reads the random sets' activations from its gradient pass over the probe set, tcav_scores from a no-grad pass
    over the sets: the same forward of the same samples.) The callback runs at its defaults (n_random=10,
    test_fraction=1/3, l2=0.01, Student's t-test, min CAV accuracy 0.6), hence 128 validation samples: 20 sets
    of min(8, 128 // 20) = 6."""
    concept = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    callback = ConceptCallback({"noise": concept}, layers=["net.features.2"], num_samples=128, seed=4)
    model = _image_model()
    trainer = _fit(tmp_path, model, [callback], val_size=128)
    probe = _probe(128, val_size=128)
    _same_samples(callback, probe)
    sets = disjoint_random_sets(128, 20, 6, seed=4)
    result = tcav_scores(
        model,
        probe.inputs,
        probe.labels,
        "net.features.2",
        concept,
        [probe.inputs[index] for index in sets],
        test_fraction=1 / 3,
        l2=1e-2,
        seed=4,
        equal_var=True,
    )
    assert result.classes == (0, 1, 2, 3)
    assert result.accuracy >= 0.6, "below the callback's min CAV accuracy it logs no TCAV score"
    base = "interp_tcav/noise/net.features.2"
    assert _logged(trainer, f"{base}/cav_accuracy") == pytest.approx(result.accuracy, rel=1e-6)
    for column, k in enumerate(result.classes):
        assert _logged(trainer, f"{base}/{k}/tcav") == pytest.approx(float(result.mean_scores[column]), rel=1e-6)
        assert _logged(trainer, f"{base}/{k}/p_value") == pytest.approx(float(result.p_values[column]), rel=1e-5)


# ------------------------------------------------------------------ feature visualisation
def test_feature_visualization_logs_the_functional_objectives(tmp_path):
    """Each run starts a generator seeded with ``seed`` afresh, and maps the image to the probe inputs' per-channel
    min..max: :func:`feature_visualization` with that generator and range reaches the same objectives."""
    targets = ["net.features.4:2", "class:1"]  # a convolution's channel (signed: never dead)
    callback = FeatureVisualizationCallback(targets=targets, steps=6, every_n_epochs=1, seed=5)
    model = _image_model()
    trainer = _fit(tmp_path, model, [callback])
    probe = _probe(32)  # the callback's default num_samples: the range comes from all 32 validation samples
    _same_samples(callback, probe)
    low, high = probe.inputs.amin(dim=(0, 2, 3)), probe.inputs.amax(dim=(0, 2, 3))
    result = feature_visualization(
        model,
        targets,
        image_shape=(3, 16, 16),
        steps=6,
        lr=0.05,
        generator=torch.Generator().manual_seed(5),
        value_range=(low, high),
    )
    for target, objective in zip(targets, result.objectives.mean(dim=1).tolist(), strict=True):
        assert _logged(trainer, f"interp_featvis/{target}/objective") == pytest.approx(objective, rel=1e-5)


# ------------------------------------------------------------------ report
def test_the_report_names_the_scalar_tags_another_callback_logged(tmp_path):
    """The report's curves section shows each callback's tag group and one chart per metric that changed, captioned
    with the metric and how many series it has, and names the others with their value: every scalar tag the
    calibration callback wrote to the events is there."""
    report = ReportCallback()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    _fit(tmp_path, _image_model(), [CalibrationCallback(), report], logger=logger)
    ours = [tag for tag in read_events(logger.log_dir).scalars if tag.startswith("interp_calibration/")]
    assert {tag.rsplit("/", 1)[-1] for tag in ours} >= {"ece", "accuracy", "temperature", "ece_after_temperature"}
    assert report.path is not None
    with open(report.path, encoding="utf-8") as handle:
        text = handle.read()
    curves = text[text.index('id="curves"') : text.index('id="configuration"')]
    assert 'id="curves-interp_calibration">Calibration (interp_calibration)</h3>' in curves
    not_drawn = curves.split("Not drawn", 1)[1] if "Not drawn" in curves else ""
    for metric, count in Counter(tag.rsplit("/", 1)[-1] for tag in ours).items():
        charted = re.search(rf"<figcaption>{metric}(: [^<(]*)? \({count} series\)</figcaption>", curves)
        assert charted or f"{metric}: " in not_drawn, metric
    assert "Callbacks that logged: calibration." in text
