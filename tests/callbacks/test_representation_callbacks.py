"""LinearProbeCallback and RepresentationSimilarityCallback in real Trainers, read back from TensorBoard."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import LinearProbeCallback, ProbeSet, RepresentationSimilarityCallback
from lightning_interp.methods import capture_features, rdm, rsa
from tests.conftest import quiet_trainer, read_events, tiny_classifier, tiny_datamodule

STEPS_PER_EPOCH = 4
LAYERS = ["net.0", "net.3", "net.6", "net.10"]  # what layers="auto" picks in shapes_cnn: its parameterised blocks


def test_probe_and_similarity_log_scalars_and_figures_at_each_validation(tmp_path):
    probe_cb = LinearProbeCallback(num_samples=32)
    similarity = RepresentationSimilarityCallback(num_samples=32)
    trainer = quiet_trainer(
        tmp_path, max_epochs=3, callbacks=[probe_cb, similarity], logger=TensorBoardLogger(str(tmp_path), name="rep")
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert probe_cb.layers == LAYERS and similarity.layers == LAYERS
    events = read_events(str(tmp_path / "rep"))
    expected = [STEPS_PER_EPOCH * (epoch + 1) - 1 for epoch in range(3)]  # at Lightning's step of each validation
    for tag in ("interp_probe/accuracy_by_depth", "interp_similarity/cka", "interp_similarity/rdm"):
        assert events.image_steps(tag) == expected, tag
    for layer in LAYERS:
        assert events.scalar_steps(f"interp_probe/{layer}/accuracy") == expected
        assert events.scalar_steps(f"interp_probe/{layer}/train_accuracy") == expected
        assert events.scalar_steps(f"interp_similarity/{layer}/cka_vs_start") == expected
        assert events.scalar_steps(f"interp_similarity/{layer}/cka_vs_previous") == expected[1:]
        assert events.scalar_steps(f"interp_similarity/{layer}/rsa_vs_labels") == expected
    assert events.scalar_steps(f"interp_similarity/{LAYERS[-1]}/rsa_vs_next") == []  # the last layer has no next
    for tag, values in events.scalars.items():
        if tag.startswith("interp_probe/"):
            assert all(0.0 <= v <= 1.0 for _, v in values), tag
        if "/cka_vs_" in tag:
            assert all(math.isnan(v) or -0.2 <= v <= 1.0 + 1e-6 for _, v in values), tag
    # The held-out accuracy is monitorable.
    assert f"interp_probe/{LAYERS[-1]}/accuracy" in trainer.callback_metrics


def test_cka_vs_start_is_one_before_any_step_and_vs_previous_is_one_without_training(tmp_path):
    similarity = RepresentationSimilarityCallback(layers=["net.3", "net.10"], num_samples=32, metrics=("cka",))
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[similarity], logger=False)
    model = tiny_classifier()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)  # weights never move
    trainer.fit(model, datamodule=tiny_datamodule())
    for layer in ("net.3", "net.10"):
        assert trainer.callback_metrics[f"interp_similarity/{layer}/cka_vs_start"] == pytest.approx(1.0, abs=1e-5)
        assert trainer.callback_metrics[f"interp_similarity/{layer}/cka_vs_previous"] == pytest.approx(1.0, abs=1e-5)


def test_a_copy_of_the_model_as_reference_matches_every_layer(tmp_path):
    model = tiny_classifier()
    teacher = copy.deepcopy(model.net)
    similarity = RepresentationSimilarityCallback(
        num_samples=32, metrics=("cka",), reference_model=teacher, every_n_epochs=1
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[similarity], logger=False)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    trainer.fit(model, datamodule=tiny_datamodule())
    assert similarity.reference_layers == ["0", "3", "6", "10"]
    for layer in LAYERS:
        assert trainer.callback_metrics[f"interp_similarity/{layer}/cka_vs_reference_max"] == pytest.approx(1.0)


def _fit_with_a_checkpoint(tmp_path) -> RepresentationSimilarityCallback:
    """One epoch with the CKA callback, saving tmp_path/ckpt/last.ckpt; returns the callback."""
    first = RepresentationSimilarityCallback(num_samples=32, metrics=("cka",))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True, logger=False
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    return first


def test_state_survives_a_checkpoint_and_the_series_continue(tmp_path):
    first = _fit_with_a_checkpoint(tmp_path)
    start = first._start_grams.clone()
    saved = torch.load(str(tmp_path / "ckpt" / "last.ckpt"), weights_only=False)["callbacks"][first.state_key]
    assert "inputs" not in saved["probe"], "samples of an indexable dataset are saved as indices"
    assert torch.equal(saved["probe"]["indices"], first.probe.indices)

    resumed = RepresentationSimilarityCallback(num_samples=32, metrics=("cka",))
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[resumed, ModelCheckpoint(dirpath=str(tmp_path / "c2"))],
        enable_checkpointing=True,
        logger=TensorBoardLogger(str(tmp_path), name="resumed"),
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed._start_grams, start), "the start reference must come from the first run"
    assert torch.equal(resumed.probe.inputs, first.probe.inputs), "the same samples, re-read by index"
    events = read_events(str(tmp_path / "resumed"))
    # The first validation after resuming already has a previous run to compare with.
    assert events.scalar_steps("interp_similarity/net.10/cka_vs_previous") == [2 * STEPS_PER_EPOCH - 1]


def test_resuming_on_changed_validation_data_is_reported_and_comparisons_restart(tmp_path):
    first = _fit_with_a_checkpoint(tmp_path)

    resumed = RepresentationSimilarityCallback(num_samples=32, metrics=("cka",))
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, callbacks=[resumed], logger=TensorBoardLogger(str(tmp_path), name="changed")
    )
    with pytest.warns(UserWarning, match="validation data changed since the checkpoint"):
        trainer.fit(
            tiny_classifier(), datamodule=tiny_datamodule(seed=5), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    assert not torch.equal(resumed.probe.inputs, first.probe.inputs), "the new data's samples, not stale ones"
    events = read_events(str(tmp_path / "changed"))
    assert events.scalar_steps("interp_similarity/net.10/cka_vs_previous") == [], "nothing to compare with yet"
    assert events.scalar_steps("interp_similarity/net.10/cka_vs_start") == [2 * STEPS_PER_EPOCH - 1]


def test_probe_needs_labels(tmp_path):
    images = TensorDataset(torch.rand(16, 3, 16, 16))
    trainer = quiet_trainer(tmp_path, callbacks=[LinearProbeCallback(num_samples=8)], logger=False)
    with pytest.raises(ValueError, match="needs labels"):
        trainer.validate(tiny_classifier(), DataLoader(images, batch_size=8))
    with pytest.raises(ValueError, match="labels"):
        LinearProbeCallback(probe=ProbeSet(torch.rand(4, 3, 16, 16)))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: LinearProbeCallback(solver="svm"), "solver"),
        (lambda: LinearProbeCallback(test_fraction=1.0), "test_fraction"),
        (lambda: LinearProbeCallback(layers=[]), "layers"),
        (lambda: LinearProbeCallback(layers=["auto", "net.3"]), "auto"),
        (lambda: RepresentationSimilarityCallback(metrics=("cka", "svcca")), "metrics"),
        (lambda: RepresentationSimilarityCallback(rdm_metric="cosine"), "rdm_metric"),
        (lambda: RepresentationSimilarityCallback(rsa_method="kendall"), "rsa_method"),
        (lambda: RepresentationSimilarityCallback(metrics=("rsa",), reference_model=torch.nn.Linear(2, 2)), "cka"),
        (lambda: RepresentationSimilarityCallback(max_features=0), "max_features"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


def test_unknown_layer_fails_at_setup_with_suggestions(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[LinearProbeCallback(layers=["net.33"])], logger=False)
    with pytest.raises(ValueError, match=r"'net\.3'"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())


def test_rsa_scalars_equal_rsa_of_the_layers_rdms_computed_here(tmp_path):
    # the callback ranks each RDM once for all comparisons; each scalar must still be rsa() of the right pair
    callback = RepresentationSimilarityCallback(num_samples=32, metrics=("rsa",))
    model = tiny_classifier()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(model, datamodule=tiny_datamodule())
    features = capture_features(model, callback.probe.inputs, callback.layers, max_features=callback.max_features)
    order = torch.argsort(callback.probe.labels, stable=True)
    rdms = [rdm(features[name][order]) for name in callback.layers]
    labels = callback.probe.labels[order]
    label_rdm = (labels[:, None] != labels[None, :]).double()
    for index, name in enumerate(callback.layers):
        logged = trainer.callback_metrics[f"interp_similarity/{name}/rsa_vs_labels"].item()
        assert logged == pytest.approx(rsa(rdms[index], label_rdm).item(), abs=1e-6), name
        if index + 1 < len(rdms):
            logged = trainer.callback_metrics[f"interp_similarity/{name}/rsa_vs_next"].item()
            assert logged == pytest.approx(rsa(rdms[index], rdms[index + 1]).item(), abs=1e-6), name


class _CountForwards(Callback):
    """Two of these bracket the other callbacks: model forwards made by the callbacks between them."""

    def __init__(self, counter: dict, start: bool) -> None:
        self.counter, self.start = counter, start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.counter["on"] = self.start


def _validate(tmp_path, callbacks, counter=None):
    model = tiny_classifier()
    torch.manual_seed(0)
    model.load_state_dict(tiny_classifier().state_dict())
    hooks = []
    if counter is not None:
        counter.update(on=False, calls=0)
        model.register_forward_pre_hook(lambda *_: counter.update(calls=counter["calls"] + counter["on"]))
        hooks = [_CountForwards(counter, True), *callbacks, _CountForwards(counter, False)]
    trainer = quiet_trainer(tmp_path, callbacks=hooks or callbacks, logger=False)
    trainer.validate(model, datamodule=tiny_datamodule())
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("interp_")}


def test_the_representation_callbacks_share_one_forward_and_get_the_numbers_they_get_alone(tmp_path):
    counter: dict = {}
    shared = _validate(
        tmp_path, [LinearProbeCallback(num_samples=32), RepresentationSimilarityCallback(num_samples=16)], counter
    )
    assert counter["calls"] == 1, "one pass over the union of the two nested probe sets (32 samples, one chunk)"
    alone = _validate(tmp_path, [LinearProbeCallback(num_samples=32)])
    alone.update(_validate(tmp_path, [RepresentationSimilarityCallback(num_samples=16)]))
    assert shared.keys() == alone.keys() and len(shared) > 10
    for key, value in alone.items():
        assert shared[key] == pytest.approx(value, abs=1e-5), key
