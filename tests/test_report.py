"""The HTML report: written by a real fit (ReportCallback) and by the command line from the same run directory; every
section is there, the images are embedded and nothing points to the network; the warnings of the run come first, every
callback that logged has a summary line, changes are worded by which way is better, layers come in model order, the
table of contents resolves, no section is empty and no chart is drawn for a series that never changes."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections import OrderedDict
from html.parser import HTMLParser

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_interp import (
    ActivationMapsCallback,
    DataDescription,
    DatasetBiasCallback,
    ExplanationQualityCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier
from lightning_interp.report import (
    RunLog,
    chart_plan,
    render_report,
    summary_by_callback,
    summary_sentences,
    write_report,
)
from lightning_interp.synthetic import SHAPE_CLASSES
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

SECTIONS = ("summary", "curves", "pictures", "comparison", "configuration")


class Structure(HTMLParser):
    """The report's section ids (``<h2>``) and every other id, its image sources, every URL-bearing attribute, and
    what each section holds: its text and how many images."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.all_ids: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.sections: dict[str, dict] = {}  # h2 id -> {"text": ..., "images": n}
        self._section: str | None = None
        self._heading: str | None = None  # the tag of the heading being read, and its id
        self._heading_text: list[str] = []
        self.headings: list[tuple[str, str, str]] = []  # (tag, id, text) of every h2 / h3

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if "id" in values:
            self.all_ids.append(values["id"])
        if tag == "h2" and "id" in values:
            self.ids.append(values["id"])
            self._section = values["id"]
            self.sections[self._section] = {"text": "", "images": 0}
        if tag in ("h2", "h3"):
            self._heading, self._heading_text = f"{tag}#{values.get('id', '')}", []
        if tag == "img":
            self.images.append(values.get("src", ""))
            if self._section is not None:
                self.sections[self._section]["images"] += 1
        if tag == "script":
            self.scripts += 1
        for name in ("href", "src"):
            if name in values and tag != "img":
                self.links.append(values[name])

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._heading is not None:
            kind, _, anchor = self._heading.partition("#")
            self.headings.append((kind, anchor, "".join(self._heading_text)))
            self._heading = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading_text.append(data)
        elif self._section is not None:
            self.sections[self._section]["text"] += data


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
    assert structure.ids in (list(SECTIONS), ["warnings", *SECTIONS])  # warnings first where the run gave some
    assert structure.scripts == 0
    _assert_contents_resolve_and_no_section_is_empty(structure)
    assert not re.search(r"https?://", text), "nothing may point to the network"
    assert structure.images and all(src.startswith("data:image/png;base64,") for src in structure.images)
    for src in structure.images:  # every embedded picture is a real PNG
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # a summary block, with at least one line, for every callback that logged
    summary = [(anchor, title) for kind, anchor, title in structure.headings if anchor.startswith("summary-")]
    groups = ("interp_saliency", "interp_gradcam", "interp_probe", "interp_similarity", "interp_quality")
    assert [anchor for anchor, _ in summary] == ["summary-training"] + [f"summary-{g}" for g in sorted(groups)]
    for group in groups:
        block = text.split(f'id="summary-{group}"', 1)[1].split("</ul>", 1)[0]
        assert block.count("<li>") >= 1, group
    assert "interp_similarity/cka, start" in text and "interp_similarity/cka, end" in text  # start / middle / end
    assert "interp_quality/comparison" in text
    assert "val_loss fell from" in text or "val_loss rose from" in text
    assert "Grad-CAM at net.7: " in text  # the summary, per callback
    # the layers in model order (net.10 after net.3, which a text sort puts the other way)
    probe_line = text.split('id="summary-interp_probe"', 1)[1].split("</li>", 1)[0]
    positions = [probe_line.index(f"net.{i} ") for i in (0, 3, 6, 10)]
    assert positions == sorted(positions), probe_line
    # the model had no hyperparameters saved: no empty hparams block
    assert "hparams.yaml" not in text
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


def _assert_contents_resolve_and_no_section_is_empty(structure: Structure) -> None:
    internal = [link for link in structure.links if link.startswith("#")]
    assert internal and internal == structure.links, "only links inside the page"
    assert all(link[1:] in structure.all_ids for link in internal), set(internal) - {f"#{i}" for i in structure.all_ids}
    assert {f"#{section}" for section in structure.ids} <= set(internal), "every section is in the contents"
    for section, held in structure.sections.items():
        assert held["images"] or held["text"].strip(), f"section {section} is empty"


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
    assert "Linear probe at net.6: accuracy rose from 0.50 to 0.95 (better: higher is better)." in sentences
    assert "Linear probe at net.0: accuracy stayed at 0.35." in sentences  # no 'fell from 0.35 to 0.35'
    assert not any("random" in sentence for sentence in sentences)  # the chance level is no finding
    # NaN points (zero maps) are left out: one finite point is no change, an all-NaN series no sentence
    assert not any("nan" in sentence or "Grad-CAM" in sentence for sentence in sentences)


def test_the_warnings_of_the_run_come_first_read_back_from_the_event_files(tmp_path):
    """A rare class planted in the data, a layer whose Grad-CAM maps are zero everywhere and a ReLU with only dead
    units: each warned about during the fit, and the report's first section says all three."""
    pl.seed_everything(0, verbose=False)
    model = tiny_classifier()
    with torch.no_grad():
        model.net[0].weight.zero_()
        model.net[0].bias.zero_()
    model.net[0].requires_grad_(
        False
    )  # its output stays zero: zero Grad-CAM maps, every unit of the ReLU after it dead
    weights = [1.0] * len(SHAPE_CLASSES)
    weights[SHAPE_CLASSES.index("triangle")] = 0.2
    report = ReportCallback()
    callbacks = [
        GradCAMCallback(layer="net.0", num_samples=4),
        ActivationMapsCallback(layers=["net.1"], num_samples=4),
        DatasetBiasCallback(imbalance_warning=2.0, data=DataDescription(class_names=SHAPE_CLASSES)),
        report,
    ]
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=logger, max_epochs=1)
    with pytest.warns(UserWarning, match="imbalanced"):
        trainer.fit(model, datamodule=tiny_datamodule(class_weights=weights))

    structure, text = _parse(report.path)
    assert structure.ids[0] == "warnings"
    assert text.index('id="contents"') < text.index('id="warnings"') < text.index('id="summary"')
    warned = structure.sections["warnings"]["text"]
    assert "the train set is imbalanced: class 'triangle'" in warned
    assert "every map of 'net.0' is zero" in warned
    assert "net.1: 100% of its units are dead" in warned
    _assert_contents_resolve_and_no_section_is_empty(structure)
    summary = [anchor for kind, anchor, _ in structure.headings if anchor.startswith("summary-interp_")]
    assert summary == ["summary-interp_activations", "summary-interp_bias", "summary-interp_gradcam"]


def _ordered_net() -> nn.Sequential:
    """Module names whose model order (stem, block10, block2) is neither their text nor their natural order."""
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(3, 4, 3, padding=1),
            stem_act=nn.ReLU(),
            block10=nn.Conv2d(4, 4, 3, padding=1),
            block10_act=nn.ReLU(),
            block2=nn.Conv2d(4, 4, 3, padding=1),
            block2_act=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(4, 4),
        )
    )


def test_layers_are_listed_in_the_models_module_order_and_in_natural_order_where_it_is_unknown(tmp_path):
    pl.seed_everything(0, verbose=False)
    report = ReportCallback()
    probe = LinearProbeCallback(layers=["net.block2", "net.stem", "net.block10"], num_samples=32)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, callbacks=[probe, report], logger=logger, max_epochs=1)
    trainer.fit(ImageClassifier(_ordered_net()), datamodule=tiny_datamodule())

    def probe_order(path: str) -> list[str]:
        _, text = _parse(path)
        line = text.split('id="summary-interp_probe"', 1)[1].split("</li>", 1)[0]
        found = {name: line.index(f"net.{name} ") for name in ("stem", "block10", "block2")}
        return sorted(found, key=found.get)

    assert probe_order(report.path) == ["stem", "block10", "block2"]  # the model's order, as the run wrote it
    os.remove(os.path.join(logger.log_dir, "interp_modules.json"))
    assert probe_order(write_report(logger.log_dir, str(tmp_path / "cli.html"))) == ["block2", "block10", "stem"]


def test_changes_are_worded_by_which_way_is_better_and_unknown_metrics_neutrally():
    run = RunLog(
        scalars={
            "interp_quality/gradient/deletion_auc": [(1, 0.26), (2, 0.38)],
            "interp_quality/gradient/insertion_auc": [(1, 0.30), (2, 0.45)],
            "interp_saliency/integrated_gradients/completeness_error": [(1, 0.2), (2, 0.05)],
            "interp_gradcam/net.7/localization": [(1, 0.02), (2, 0.05)],
            "interp_mine/net.1/made_up_score": [(1, 0.5), (2, 0.9)],
        },
        epochs={1: 0, 2: 1},
    )
    sentences = summary_sentences(run)
    assert "Explanation quality at gradient: deletion_auc rose from 0.26 to 0.38 (worse: lower is better)." in sentences
    assert (
        "Explanation quality at gradient: insertion_auc rose from 0.30 to 0.45 (better: higher is better)." in sentences
    )
    assert (
        "Saliency at integrated_gradients: completeness_error fell from 0.20 to 0.05 (better: lower is better)."
        in sentences
    )
    assert "Grad-CAM at net.7: localization rose from 0.02 to 0.05 (better: higher is better)." in sentences
    assert "mine at net.1: made_up_score changed from 0.50 to 0.90." in sentences  # no guessed direction


def test_every_callback_that_logged_gets_a_summary_line_even_with_one_point_or_pictures_only():
    run = RunLog(
        scalars={
            "interp_featvis/class:0/objective": [(5, 0.2)],
            "interp_featvis/class:1/objective": [(5, 0.4)],
            "interp_tcav/stripes/net.4/0/tcav": [(5, 0.8)],
            "interp_tcav/stripes/net.4/0/p_value": [(5, 0.01)],
        },
        images={"interp_attention/rollout": [(5, b"")]},
        epochs={5: 2},
    )
    summary = summary_by_callback(run)
    assert set(summary) == {"interp_featvis", "interp_tcav", "interp_attention"}
    featvis, _ = summary["interp_featvis"]
    assert featvis[0].startswith("objective at epoch 2 (one validation): class:0 0.20, class:1 0.40")
    tcav, _ = summary["interp_tcav"]
    assert "TCAV of 'stripes' at net.4 for target 0: 0.80 at epoch 2 (p=0.01, significant at 0.05)." in tcav
    assert summary["interp_attention"][0][0].startswith("Pictures only")


def test_a_series_that_never_changes_draws_no_chart_and_identical_series_are_drawn_once():
    steps = {1: 0, 2: 1, 3: 2}
    run = RunLog(
        scalars={
            "interp_probe/net.0/train_accuracy": [(1, 1.0), (2, 1.0), (3, 1.0)],
            "interp_probe/net.3/train_accuracy": [(1, 1.0), (2, 1.0), (3, 1.0)],
            "interp_probe/net.0/accuracy": [(1, 0.3), (2, 0.5), (3, 0.7)],
            "interp_probe/net.3/accuracy": [(1, 0.3), (2, 0.5), (3, 0.7)],
            "interp_probe/net.6/accuracy": [(1, 0.3), (2, 0.3), (3, 0.3)],
        },
        epochs=steps,
    )
    structure = Structure()
    structure.feed(render_report(run, title="t", source="s"))
    assert structure.ids == ["summary", "curves"]  # no pictures, comparison or configuration: no empty sections
    assert structure.sections["curves"]["images"] == 1  # accuracy only: train_accuracy never changes
    assert (
        "train_accuracy: net.0: 1.00 at every validation; net.3: 1.00 at every validation"
        in (structure.sections["curves"]["text"])
    )
    # the accuracy chart: net.0 and net.3 as one line, the flat net.6 beside them
    drawn, notes = chart_plan(
        run, ["interp_probe/net.0/accuracy", "interp_probe/net.3/accuracy", "interp_probe/net.6/accuracy"]
    )
    assert [names for _, names in drawn] == [["net.0", "net.3"], ["net.6"]] and notes == []
    _assert_contents_resolve_and_no_section_is_empty(structure)
