"""The HTML report: written by a real fit (ReportCallback) and by the command line from the same run directory; every
section is there, the images are embedded and nothing points to the network."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import (
    ExplanationQualityCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.report import RunLog, summary_sentences, write_report
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

SECTIONS = ("configuration", "summary", "curves", "pictures", "comparison")


class Structure(HTMLParser):
    """The report's section ids, its image sources and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if "id" in values:
            self.ids.append(values["id"])
        if tag == "img":
            self.images.append(values.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for name in ("href", "src"):
            if name in values and tag != "img":
                self.links.append(values[name])


def _parse(path: str) -> tuple[Structure, str]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    structure = Structure()
    structure.feed(text)
    return structure, text


def test_a_fit_writes_a_self_contained_report_and_the_cli_writes_the_same_from_the_log_dir(tmp_path):
    pl.seed_everything(0, verbose=False)  # the tiny network's start decides whether its Grad-CAM maps have mass
    report = ReportCallback()
    callbacks = [
        SaliencyCallback(methods=("gradient",), num_samples=4),
        GradCAMCallback(layer="net.7", num_samples=4),
        LinearProbeCallback(num_samples=32),
        RepresentationSimilarityCallback(num_samples=32),
        ExplanationQualityCallback(
            ["gradient", ("grad_cam", {"layer": "net.7"})],
            num_samples=8,
            metrics=[
                ("deletion", {"steps": 4}),
                ("insertion", {"steps": 4}),
                "top_drop",
                "sanity",
                "sparseness",
                "localization",
            ],
        ),
        report,
    ]
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=logger, max_epochs=3)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert report.path == os.path.join(logger.log_dir, "report.html") and os.path.isfile(report.path)

    structure, text = _parse(report.path)
    assert structure.ids == list(SECTIONS)
    assert structure.scripts == 0 and structure.links == []
    assert not re.search(r"https?://", text), "nothing may point to the network"
    assert structure.images and all(src.startswith("data:image/png;base64,") for src in structure.images)
    for src in structure.images:  # every embedded picture is a real PNG
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for group in ("interp_saliency", "interp_gradcam", "interp_probe", "interp_similarity", "interp_quality"):
        assert f"<h3>{group}</h3>" in text, group
    assert "interp_similarity/cka, start" in text and "interp_similarity/cka, end" in text  # start / middle / end
    assert "interp_quality/comparison" in text
    assert "val_loss went from" in text and "Grad-CAM at net.7: " in text  # the summary, per callback
    assert "<h3>training</h3>" in text and text.index("<h3>training</h3>") < text.index('id="curves"')
    # the configuration: the trainer's settings and each callback's
    assert "<th>Trainer</th>" in text and "max_epochs=3" in text
    assert (
        "ExplanationQualityCallback (quality)" in text
        and "metrics=(&#x27;deletion&#x27;, &#x27;insertion&#x27;" in text
    )

    # the command line, from the run directory alone
    output = tmp_path / "again.html"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_interp.report", logger.log_dir, "-o", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    again, _ = _parse(str(output))
    assert again.ids == structure.ids and len(again.images) == len(structure.images)


def test_the_cli_says_what_is_wrong_with_a_directory_without_events(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_interp.report", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "No TensorBoard event file" in done.stderr
    with pytest.raises(FileNotFoundError, match="version_0"):
        write_report(str(tmp_path))


def test_the_summary_names_when_things_settled_and_passed_their_thresholds():
    run = RunLog(
        scalars={
            "interp_similarity/net.6/cka_vs_previous": [(3, 0.8), (7, 0.96), (11, 0.99)],
            "interp_saliency/gradient/stability": [(7, 0.5), (11, 0.6)],
            "interp_probe/net.6/accuracy": [(3, 0.5), (7, 0.92), (11, 0.95)],
            "interp_probe/net.0/accuracy": [(3, 0.351), (11, 0.349)],
            "interp_quality/random/deletion_auc": [(3, 0.7), (11, 0.6)],
            "interp_gradcam/net.7/localization": [(3, float("nan")), (7, 0.2), (11, float("nan"))],
            "interp_gradcam/net.4/localization": [(3, float("nan"))],
        },
        epochs={3: 0, 7: 1, 11: 2},
    )
    sentences = summary_sentences(run)
    assert "CKA / RSA at net.6: cka_vs_previous first reached 0.95 at epoch 1 (last 0.99)." in sentences
    assert "Saliency at gradient: stability stayed below 0.95 (last 0.60): not settled yet." in sentences
    assert "Linear probe at net.6: probe accuracy passed 0.9 at epoch 1." in sentences
    assert "Linear probe at net.6: accuracy rose from 0.50 to 0.95." in sentences
    assert "Linear probe at net.0: accuracy stayed at 0.35." in sentences  # no 'fell from 0.35 to 0.35'
    assert not any("random" in sentence for sentence in sentences)  # the chance level is no finding
    # NaN points (zero maps) are left out: one finite point is no change, an all-NaN series no sentence
    assert not any("nan" in sentence or "Grad-CAM" in sentence for sentence in sentences)
