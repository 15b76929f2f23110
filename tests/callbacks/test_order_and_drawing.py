"""Order of work and drawing off the training thread, in real Trainers.

Lightning calls the callbacks' ``setup`` before it builds the model in
``configure_model()`` and before it moves the weights to their device, so no
callback may run the model there; every mistake must still be reported before
the first training step. Images are drawn on one background thread per run,
drained at the end of fit / validate, at teardown and when training raises.
"""

from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import (
    Display,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp._logging import WORKER_THREAD_NAME
from lightning_interp.callbacks import _base, _context, _maps
from lightning_interp.demo import ImageClassifier, shapes_cnn
from tests.conftest import quiet_trainer, read_events, read_image_bytes, tiny_classifier, tiny_datamodule


def _all_callbacks(**options):
    return [
        SaliencyCallback(
            methods=("gradient", ("smoothgrad", {"n_samples": 4}), ("integrated_gradients", {"n_steps": 4})),
            num_samples=4,
            **options,
        ),
        GradCAMCallback(num_samples=4, **options),
        LinearProbeCallback(num_samples=32, **options),
        RepresentationSimilarityCallback(num_samples=32, **options),
    ]


def _drawing_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == WORKER_THREAD_NAME]


class ForwardCounter(Callback):
    """Listed after our callbacks, so its hooks run after theirs: model forwards seen by then."""

    def __init__(self) -> None:
        self.calls = 0
        self.at_setup: int | None = None
        self.at_fit_start: int | None = None
        self.handle = None

    def count(self, *_: object) -> None:
        self.calls += 1

    def setup(self, trainer, pl_module, stage) -> None:
        self.at_setup = self.calls

    def on_fit_start(self, trainer, pl_module) -> None:
        self.at_fit_start = self.calls


def test_no_model_forward_at_setup_and_one_shared_dry_forward_at_fit_start(tmp_path, monkeypatch):
    model = tiny_classifier()
    counter = ForwardCounter()
    handle = model.register_forward_pre_hook(counter.count)
    traces = []
    original_trace = _base.trace_model
    monkeypatch.setattr(_base, "trace_model", lambda *args: traces.append(1) or original_trace(*args))
    callbacks = _all_callbacks()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[*callbacks, counter], logger=False)
    trainer.fit(model, datamodule=tiny_datamodule())
    handle.remove()
    assert counter.at_setup == 0, "no callback may run the model before Lightning has built and placed it"
    assert len(traces) == 1, "the four callbacks share one dry forward (output check and layer choice)"
    assert counter.at_fit_start > 1, "and each tries its computation on two samples before training"
    assert all(callback._runs == 1 for callback in callbacks)
    saliency, gradcam, probe, similarity = callbacks
    assert saliency.probe is gradcam.probe, "callbacks asking for the same samples share one draw"
    assert gradcam.layers == ["net.7"] and probe.layers == similarity.layers


class LateBuiltClassifier(ImageClassifier):
    """Builds its network in configure_model(), as Lightning recommends for large models."""

    def __init__(self) -> None:
        super().__init__(net=None, lr=1e-2)  # type: ignore[arg-type]
        self.built = 0

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = shapes_cnn(num_classes=4, width=4)
            self.built += 1


def test_a_model_built_in_configure_model_works_with_every_callback_and_resumes(tmp_path):
    callbacks = [
        SaliencyCallback(methods=("gradient",), num_samples=4),
        GradCAMCallback(layer="auto", num_samples=4),
        GradCAMCallback(layer=["net.4", "net.7"], num_samples=4, name="gradcam_named"),
        LinearProbeCallback(layers="auto", num_samples=32),
        RepresentationSimilarityCallback(layers=["net.1", "net.4", "net.10"], num_samples=32),
    ]
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    logger = TensorBoardLogger(str(tmp_path), name="late")
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[*callbacks, checkpoint], logger=logger, enable_checkpointing=True
    )
    model = LateBuiltClassifier()
    trainer.fit(model, datamodule=tiny_datamodule())
    assert model.built == 1
    assert all(callback._runs == 1 for callback in callbacks)
    assert callbacks[1].layers == ["net.7"]
    assert callbacks[3].layers == ["net.0", "net.3", "net.6", "net.10"]
    events = read_events(str(tmp_path / "late"))
    assert events.image_steps("interp_gradcam_named/maps/rows_1-2") == [3]
    assert events.scalar_steps("interp_similarity/net.10/cka_vs_start") == [3]

    # resume: a fresh model object, built again in configure_model, restored from the checkpoint
    resumed = [GradCAMCallback(layer="auto", num_samples=4), RepresentationSimilarityCallback(num_samples=32)]
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=resumed, logger=False)
    trainer.fit(LateBuiltClassifier(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed[0].layers == ["net.7"] and resumed[0]._runs == 2
    assert "interp_similarity/net.10/cka_vs_previous" in trainer.callback_metrics


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (lambda: GradCAMCallback(layer="net.44", num_samples=4), r"'net\.4'"),
        (lambda: GradCAMCallback(layer="net.10", num_samples=4), "spatial"),
        (lambda: LinearProbeCallback(layers=["net.99"], num_samples=32), "net.99"),
    ],
    ids=["unknown-layer", "layer-without-spatial-output", "unknown-probe-layer"],
)
def test_mistakes_about_a_late_built_model_are_reported_before_the_first_training_step(tmp_path, callback, message):
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback()], logger=False)
    with pytest.raises(ValueError, match=message):
        trainer.fit(LateBuiltClassifier(), datamodule=tiny_datamodule())
    assert trainer.global_step == 0
    assert not _drawing_threads()


def test_the_worker_is_drained_and_gone_after_fit_and_after_validate(tmp_path):
    callbacks = _all_callbacks()
    logger = TensorBoardLogger(str(tmp_path), name="fit")
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=callbacks, logger=logger)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert not _drawing_threads(), "no drawing thread may outlive fit()"
    images = read_events(str(tmp_path / "fit")).images
    for tag in ("interp_saliency/maps/rows_1-2", "interp_gradcam/maps/rows_1-2", "interp_probe/accuracy_by_depth"):
        assert [step for step, _ in images[tag]] == [3, 7], tag
    assert [step for step, _ in images["interp_gradcam/net.7/evolution"]] == [7]

    logger = TensorBoardLogger(str(tmp_path), name="validate")
    trainer = quiet_trainer(tmp_path, callbacks=_all_callbacks(), logger=logger)
    trainer.validate(tiny_classifier(), datamodule=tiny_datamodule())
    assert not _drawing_threads(), "no drawing thread may outlive validate()"
    images = read_events(str(tmp_path / "validate")).images
    assert {"interp_saliency/maps/rows_1-2", "interp_similarity/cka", "interp_similarity/rdm"} <= set(images)


def _slow(render):
    def slow_render(*args, **kwargs):
        time.sleep(0.2)  # drawing lags behind training, so jobs are still queued when training fails
        return render(*args, **kwargs)

    return slow_render


class FailsAtStep(ImageClassifier):
    def __init__(self, step: int) -> None:
        super().__init__(shapes_cnn(num_classes=4, width=4), lr=1e-2)
        self.fail_at = step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("training broke")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_step_drains_the_queued_images_and_leaves_no_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(_maps, "render_grid", _slow(_maps.render_grid))
    callbacks = _all_callbacks()
    logger = TensorBoardLogger(str(tmp_path), name="broken")
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=callbacks, logger=logger)
    with pytest.raises(RuntimeError, match="training broke"):
        trainer.fit(FailsAtStep(step=5), datamodule=tiny_datamodule())  # after the first validation epoch
    assert not _drawing_threads()
    images = read_events(str(tmp_path / "broken")).images
    assert [step for step, _ in images["interp_saliency/maps/rows_1-2"]] == [3], (
        "images queued before the error are kept"
    )
    assert [step for step, _ in images["interp_gradcam/maps/rows_1-2"]] == [3]


def broken_render_grid(*args, **kwargs):
    raise ValueError("the grid cannot be drawn")


def test_a_drawing_error_is_raised_on_the_training_thread_with_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(_maps, "render_grid", broken_render_grid)
    seen_on: list[str] = []

    class ThreadSpy(Callback):
        def on_train_batch_start(self, *args) -> None:
            seen_on.append(threading.current_thread().name)

    trainer = quiet_trainer(
        tmp_path, max_epochs=3, callbacks=[GradCAMCallback(num_samples=4), ThreadSpy()], logger=False
    )
    with pytest.raises(ValueError, match="cannot be drawn") as caught:
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "broken_render_grid" in frames, "the original traceback of the drawing thread is kept"
    assert any(frame in frames for frame in ("submit", "drain")), "raised where the training thread met it"
    assert trainer.current_epoch < 3, "the error stops the run at the next run or at fit end"
    assert set(seen_on) == {threading.main_thread().name}
    assert not _drawing_threads()


def _deterministic_fit(tmp_path, name: str, background: bool):
    torch.manual_seed(0)
    callbacks = _all_callbacks(display=Display(background_drawing=background))
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, callbacks=callbacks, logger=TensorBoardLogger(str(tmp_path), name=name)
    )
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    return read_events(str(tmp_path / name)).scalars, read_image_bytes(str(tmp_path / name))


def test_images_and_scalars_are_identical_with_the_worker_on_and_off(tmp_path):
    background_scalars, background_images = _deterministic_fit(tmp_path, "background", True)
    inline_scalars, inline_images = _deterministic_fit(tmp_path, "inline", False)
    interp = sorted(tag for tag in background_scalars if tag.startswith("interp_"))
    assert interp and interp == sorted(tag for tag in inline_scalars if tag.startswith("interp_"))
    for tag in interp:
        assert background_scalars[tag] == inline_scalars[tag], tag
    expected = {
        "interp_saliency/maps/rows_1-2",
        "interp_saliency/maps/rows_3-4",  # the default: parts of two rows
        "interp_saliency/gradient/evolution",
        "interp_saliency/smoothgrad/evolution",
        "interp_saliency/integrated_gradients/evolution",
        "interp_gradcam/maps/rows_1-2",
        "interp_gradcam/maps/rows_3-4",
        "interp_gradcam/net.7/evolution",
        "interp_probe/accuracy_by_depth",
        "interp_similarity/cka",
        "interp_similarity/rdm",
    }
    assert set(background_images) == set(inline_images) == expected
    for tag, entries in background_images.items():
        assert entries == inline_images[tag], f"{tag}: the PNG bytes differ"


def test_one_time_costs_are_recorded_once_per_run(tmp_path):
    recorded = {}

    class Reader(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            recorded.update(_context.current_timings(trainer))

    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[*_all_callbacks(), Reader()], logger=False)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert set(recorded) == {"probe draw", "layer choice"}
    assert all(seconds > 0 for seconds in recorded.values())
    assert _context.current_timings(trainer) == {}, "the run's shared state is gone after fit"
