"""A self-contained HTML report of a run, written from its TensorBoard event files.

    python -m lightning_interp.report lightning_logs/quickstart/version_0            # -> .../version_0/report.html
    python -m lightning_interp.report lightning_logs/quickstart/version_0 -o run.html

The report needs nothing but the file: images are embedded, there is no
script and no link to the network. From the top: a table of contents; the
warnings the callbacks gave during the run (a spurious cue, a rare class,
all-zero maps; they are logged as TensorBoard text under
``interp_<callback>/warnings``) and the layers with many dead units; a
summary in words with a line for every callback that logged, each change
worded by which way is better for its metric (:mod:`lightning_interp.report.metrics`);
the scalar curves (one chart per metric, every layer or method overlaid, in
the model's module order; a series that never changes is named, not drawn);
the final picture of every image tag with the start, middle and end of the
representation figures; the explanation-quality comparison; the run's
configuration. A section with nothing to show is left out. Runs trained
without :class:`~lightning_interp.callbacks.ReportCallback` get the same
report from this command (the layers then in natural order: net.3 before
net.10, unless the run directory holds ``interp_modules.json``).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import glob
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_interp._logging import TAG_PREFIX, WARNINGS_TAG
from lightning_interp.report.metrics import change_words, metric_info

__all__ = [
    "RunLog",
    "main",
    "read_run",
    "run_warnings",
    "series_key",
    "summary_by_callback",
    "summary_findings",
    "summary_sentences",
    "write_report",
]

CONFIGURATION_FILE = "interp_configuration.json"
"""Written next to the event files by :class:`~lightning_interp.callbacks.ReportCallback`: what the report's
configuration section shows (the command line reads it too)."""

MODULES_FILE = "interp_modules.json"
"""Written next to the event files by :class:`~lightning_interp.callbacks.ReportCallback`: the model's module names in
``named_modules`` order, so the report lists layers in model order (the command line reads it too)."""

DEAD_UNITS_WARNING = 0.1
"""A layer whose ``dead_fraction`` at the last validation is at least this is named among the warnings."""

NOTABLE_CHANGE = 0.1
"""A metric without a better direction (a description: sparsity, CKA to the start) is summarised when it moved at
least this much; one with a known direction whenever it moved."""

SETTLED = 0.95
"""A ``stability`` or ``cka_vs_previous`` series counts as settled from the first point at or above this."""


@dataclass
class RunLog:
    """What a run's event files hold.

    Attributes:
        scalars: tag -> [(step, value)] in step order.
        images: tag -> [(step, PNG bytes)] in step order.
        epochs: step -> epoch, from Lightning's ``epoch`` scalar (empty if it was not logged).
        hparams: the text of ``hparams.yaml`` in the log directory, or "".
        configuration: the trainer's and callbacks' settings that :class:`ReportCallback` saved next to the event
            files (``interp_configuration.json``), or empty.
        texts: tag -> [(step, text)] of the TensorBoard text events (the callbacks' warnings), in step order.
        modules: the model's module names in ``named_modules`` order (``interp_modules.json``), or empty where
            unknown.
    """

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=dict)
    hparams: str = ""
    configuration: dict[str, dict[str, str]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)

    def epoch_of(self, step: int) -> str:
        """The epoch of ``step`` as text ("epoch 3"), or the step where the epochs are unknown."""
        if step in self.epochs:
            return f"epoch {self.epochs[step]}"
        return f"step {step}"


def read_run(log_dir: str) -> RunLog:
    """Read every TensorBoard event file under ``log_dir`` (one run: a Lightning version directory).

    Raises:
        FileNotFoundError: no event file under ``log_dir``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    if not files:
        raise FileNotFoundError(
            f"No TensorBoard event file under {log_dir!r}. Pass the run's directory, e.g. "
            "lightning_logs/<name>/version_0 (the folder with the events.out.tfevents.* files)."
        )
    run = RunLog()
    for directory in sorted({os.path.dirname(f) for f in files}):
        accumulator = EventAccumulator(directory, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            run.scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["images"]:
            run.images.setdefault(tag, []).extend((e.step, e.encoded_image_string) for e in accumulator.Images(tag))
        for tag in accumulator.Tags()["tensors"]:
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "text":
                continue
            texts = run.texts.setdefault(tag.removesuffix("/text_summary"), [])
            for event in accumulator.Tensors(tag):
                texts.extend((event.step, value.decode("utf-8")) for value in event.tensor_proto.string_val)
    for series in (*run.scalars.values(), *run.images.values(), *run.texts.values()):
        series.sort(key=lambda point: point[0])
    run.epochs = {step: round(value) for step, value in run.scalars.pop("epoch", [])}
    saved = os.path.join(log_dir, CONFIGURATION_FILE)
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as handle:
            run.configuration = json.load(handle)
    modules = os.path.join(log_dir, MODULES_FILE)
    if os.path.isfile(modules):
        with open(modules, encoding="utf-8") as handle:
            run.modules = [str(name) for name in json.load(handle)]
    for name in ("hparams.yaml", os.path.join("..", "hparams.yaml")):
        path = os.path.join(log_dir, name)
        if os.path.isfile(path):
            with open(path) as handle:
                run.hparams = handle.read()
            break
    return run


def _group(tag: str) -> str:
    return tag.split("/", 1)[0]


def _metric(tag: str) -> str:
    return tag.rsplit("/", 1)[-1]


def _series_name(tag: str) -> str:
    """The part between the callback's group and the metric: the layer, method or class (or the metric itself)."""
    parts = tag.split("/")
    return "/".join(parts[1:-1]) or parts[-1]


def _natural(text: str) -> list[tuple[int, int | str]]:
    """A sort key that orders the numbers inside names by value (net.3 before net.10)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


def series_key(run: RunLog) -> Callable[[str], tuple]:
    """A sort key for series names (``net.4``, ``grad_cam@net.7``, ``stripes/net.4/0``): by the position of the first
    module they name in the model (``run.modules``), in natural order where the run does not say the modules' order
    or a name holds no module.

    Example:
        >>> names = ["net.0", "net.10", "net.3", "head"]
        >>> sorted(names, key=series_key(RunLog(modules=["net.0", "net.3", "net.10", "head"])))
        ['net.0', 'net.3', 'net.10', 'head']
        >>> sorted(names, key=series_key(RunLog()))  # order unknown: natural sort
        ['head', 'net.0', 'net.3', 'net.10']
    """
    position = {name: i for i, name in enumerate(run.modules)}

    def key(name: str) -> tuple:
        where = [position[part] for part in re.split(r"[/@]", name) if part in position]
        return (0, min(where), _natural(name)) if where else (1, 0, _natural(name))

    return key


def _tag_key(run: RunLog) -> Callable[[str], tuple]:
    by_series = series_key(run)
    return lambda tag: (_group(tag), _metric(tag), by_series(_series_name(tag)))


def _finite(series: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, value) for step, value in series if not math.isnan(value)]


def run_warnings(run: RunLog) -> list[tuple[str, str]]:
    """The run's warnings as ``(group, text)``, in the order they were given: what the callbacks warned about (their
    ``interp_<name>/warnings`` text: a spurious cue, a rare class, all-zero maps, ...), then the layers whose share of
    dead units at the last validation is at least :data:`DEAD_UNITS_WARNING`.

    Example:
        >>> run = RunLog(scalars={"interp_activations/net.4/dead_fraction": [(1, 0.0), (2, 0.25)]},
        ...              texts={"interp_bias/warnings": [(0, "the train set is imbalanced")]})
        >>> for group, text in run_warnings(run):
        ...     print(group, "|", text)
        interp_bias | the train set is imbalanced
        interp_activations | net.4: 25% of its units are dead (never active on the probe set) at step 2.
    """
    found: list[tuple[int, str, str]] = []
    for tag, texts in run.texts.items():
        if tag.startswith(TAG_PREFIX) and _metric(tag) == WARNINGS_TAG:
            # the heading names the callback: "DatasetBiasCallback: the train set ..." reads "the train set ..."
            found.extend((step, _group(tag), re.sub(r"^[A-Z]\w*Callback: ", "", text)) for step, text in texts)
    found.sort(key=lambda entry: entry[0])
    result = list(dict.fromkeys((group, text) for _, group, text in found))  # a resumed run may repeat one
    dead = [tag for tag in run.scalars if tag.startswith(TAG_PREFIX) and _metric(tag) == "dead_fraction"]
    for tag in sorted(dead, key=_tag_key(run)):
        series = _finite(run.scalars[tag])
        if series and series[-1][1] >= DEAD_UNITS_WARNING:
            step, value = series[-1]
            text = (
                f"{_series_name(tag)}: {value:.0%} of its units are dead (never active on the probe set) at "
                f"{run.epoch_of(step)}."
            )
            result.append((_group(tag), text))
    return result


def summary_findings(run: RunLog) -> list[tuple[str, float, str]]:
    """Every finding as ``(group, weight, sentence)``: the group is ``"training"`` or the callback's tag group; the
    weight ranks findings within a group (a threshold crossed or not yet reached: 1; a change: its size, plus 1 for a
    metric whose better direction is known). A change is worded by :func:`~lightning_interp.report.metrics.change_words`
    (which way is better, where the metric's direction is known; neutral otherwise)."""
    findings: list[tuple[str, float, str]] = []
    for name in ("val_acc", "val_loss"):
        series = run.scalars.get(name)
        if series and len(series) > 1:
            first, last = series[0][1], series[-1][1]
            words = change_words(name, first, last).replace(f"{first:.2f}", f"{first:.3f}", 1)
            words = words.replace(f"to {last:.2f}", f"to {last:.3f}", 1)
            findings.append(("training", 1.0, f"{name} {words} over {len(series)} validations."))
    ours = {  # NaN points (warned about during training: zero maps, ...) say nothing; the chance level is no finding
        tag: _finite(series)
        for tag, series in run.scalars.items()
        if tag.startswith(TAG_PREFIX) and "/random/" not in tag
    }
    for tag in sorted(ours, key=_tag_key(run)):
        series = ours[tag]
        if not series:
            continue
        metric, owner, group = _metric(tag), _owner(tag), _group(tag)
        first, last = series[0][1], series[-1][1]
        info = metric_info(metric)
        if metric in ("stability", "cka_vs_previous"):
            settled = next((step for step, value in series if value >= SETTLED), None)
            if settled is not None:
                when = run.epoch_of(settled)
                findings.append((group, 1.0, f"{owner}: {metric} first reached {SETTLED} at {when} (last {last:.2f})."))
            else:
                text = f"{owner}: {metric} stayed below {SETTLED} (last {last:.2f}): not settled yet."
                findings.append((group, 1.0, text))
            continue
        if metric == "tcav" and f"{tag[: -len(metric)]}p_value" in run.scalars:
            findings.append((group, *_tcav_sentence(run, tag)))
            continue
        if metric == "p_value":  # said with its TCAV score
            continue
        if len(series) > 1:
            change = abs(last - first)
            known = info is not None and info.direction != "neither"
            if f"{first:.2f}" == f"{last:.2f}":
                findings.append((group, 0.0, f"{owner}: {metric} stayed at {last:.2f}."))
            elif known or change >= NOTABLE_CHANGE:  # a descriptive metric's small drift is no finding
                findings.append((group, change + known, f"{owner}: {metric} {change_words(metric, first, last)}."))
        if metric == "accuracy" and "interp_probe" in tag:
            passed = next((step for step, value in series if value >= 0.9), None)
            if passed is not None:
                findings.append((group, 1.0, f"{owner}: probe accuracy passed 0.9 at {run.epoch_of(passed)}."))
    return findings


def _tcav_sentence(run: RunLog, tag: str) -> tuple[float, str]:
    """A TCAV score at the last validation with its p-value, and whether it is significant (p < 0.05); weighted 1
    when it is, 0.5 when not."""
    step, score = _finite(run.scalars[tag])[-1]
    p_values = dict(run.scalars[f"{tag[: -len('tcav')]}p_value"])
    p_value = p_values.get(step, float("nan"))
    parts = _series_name(tag).split("/")
    concept, rest = parts[0], "/".join(parts[1:])
    where, _, target = rest.rpartition("/")
    verdict = "significant" if p_value < 0.05 else "not significant"
    text = (
        f"TCAV of '{concept}' at {where or rest} for target {target}: {score:.2f} at {run.epoch_of(step)} "
        f"(p={p_value:.2g}, {verdict} at 0.05)."
    )
    return (1.0 if p_value < 0.05 else 0.5), text


def summary_sentences(run: RunLog) -> list[str]:
    """What changed during training, in words, from the scalars alone (every finding, in tag order).

    Example:
        >>> run = RunLog(scalars={"interp_gradcam/net.7/localization": [(3, 0.1), (7, 0.32)],
        ...                       "interp_gradcam/net.7/stability": [(7, 0.97)]}, epochs={3: 0, 7: 1})
        >>> summary_sentences(run)[0]
        'Grad-CAM at net.7: localization rose from 0.10 to 0.32 (better: higher is better).'
    """
    return [sentence for _, _, sentence in summary_findings(run)]


HEADLINES = (
    "accuracy",
    "r2",
    "localization_lift",
    "border_lift",
    "localization",
    "deletion_auc",
    "recall",
    "dead_fraction",
    "objective",
    "ece",
    "cav_accuracy",
    "rsa_vs_labels",
    "predictive_entropy",
)
"""The metric a callback's summary starts with, as its values of every layer, method or class at the last validation:
the first of these the callback logged (else its first metric logged for several series)."""


def _headline(run: RunLog, group: str) -> tuple[str, str] | None:
    """A metric of ``group`` and one line with its last value for every series (in model order), or None."""
    by_metric: dict[str, list[str]] = {}
    for tag in sorted(run.scalars, key=_tag_key(run)):
        if _group(tag) == group and _finite(run.scalars[tag]):
            by_metric.setdefault(_metric(tag), []).append(tag)
    if not by_metric:
        return None
    chosen = next((metric for metric in HEADLINES if metric in by_metric), None)
    if chosen is None:
        chosen = next((metric for metric, tags in by_metric.items() if len(tags) > 1), next(iter(by_metric)))
    tags = by_metric[chosen]
    steps = {_finite(run.scalars[tag])[-1][0] for tag in tags}
    values = ", ".join(f"{_series_name(tag)} {_finite(run.scalars[tag])[-1][1]:.2f}" for tag in tags)
    info = metric_info(chosen)
    about = []
    if info is not None and info.meaning:
        about.append(info.meaning)
    if info is not None and info.direction != "neither":
        about.append(f"{info.direction} is better")
    when = run.epoch_of(max(steps))
    lengths = {len(_finite(run.scalars[tag])) for tag in tags}
    once = " (one validation)" if lengths == {1} else ""
    return chosen, f"{chosen} at {when}{once}: {values}" + (f" ({'; '.join(about)})." if about else ".")


def summary_by_callback(run: RunLog, per_callback: int = 5) -> dict[str, tuple[list[str], int]]:
    """Per group (``"training"`` first, then every callback that logged anything, scalars or pictures): its
    headline (a metric's last value for every layer, method or class), then its ``per_callback`` weightiest findings
    in tag order, and how many were left out. A callback that logged pictures only gets a line saying so.

    Example:
        >>> run = RunLog(scalars={f"interp_probe/net.{i}/accuracy": [(1, 0.1), (2, 0.1 * i)] for i in range(1, 4)})
        >>> shown, left = summary_by_callback(run, per_callback=1)["interp_probe"]
        >>> shown[0]  # the headline: the last value of every layer
        'accuracy at step 2: net.1 0.10, net.2 0.20, net.3 0.30 (accuracy on held-out samples; higher is better).'
        >>> shown[1], left  # the largest change; net.2's in the curves (net.1 stayed: its headline value says so)
        ('Linear probe at net.3: accuracy rose from 0.10 to 0.30 (better: higher is better).', 1)
    """
    grouped: dict[str, list[tuple[int, float, str]]] = {}
    for order, (group, weight, sentence) in enumerate(summary_findings(run)):
        grouped.setdefault(group, []).append((order, weight, sentence))
    result: dict[str, tuple[list[str], int]] = {}
    if "training" in grouped:
        result["training"] = ([sentence for _, _, sentence in grouped["training"]], 0)
    for group in _callback_groups(run):
        entries = grouped.get(group, [])
        headline = _headline(run, group)
        if headline is not None:  # "<metric> stayed at x" says no more than the headline's values
            entries = [entry for entry in entries if f": {headline[0]} stayed at " not in entry[2]]
        kept = sorted(sorted(entries, key=lambda entry: -entry[1])[:per_callback])
        lines = [sentence for _, _, sentence in kept]
        if headline is not None:
            lines.insert(0, headline[1])
        if not lines:
            pictures = sum(1 for tag in run.images if _group(tag) == group)
            lines = [f"Pictures only ({pictures} image series): see the pictures below."]
        result[group] = (lines, len(entries) - len(kept))
    return result


def _callback_groups(run: RunLog) -> list[str]:
    """Every callback group that logged something (scalars, pictures or warnings), by name."""
    tags = [*run.scalars, *run.images, *run.texts]
    return sorted({_group(tag) for tag in tags if tag.startswith(TAG_PREFIX)})


CALLBACK_NAMES = {
    "gradcam": "Grad-CAM",
    "saliency": "Saliency",
    "probe": "Linear probe",
    "similarity": "CKA / RSA",
    "quality": "Explanation quality",
    "bias": "Dataset bias",
    "calibration": "Calibration",
    "uncertainty": "Uncertainty",
    "activations": "Activations",
    "featvis": "Feature visualisation",
    "tcav": "Concepts (TCAV)",
    "attention": "Attention",
}
"""The default callback names (the tag groups ``interp_<name>``) as the report's headings say them."""


def _callback_title(group: str) -> str:
    if group == "training":
        return "Training"
    name = group[len(TAG_PREFIX) :] if group.startswith(TAG_PREFIX) else group
    return f"{CALLBACK_NAMES[name]} ({group})" if name in CALLBACK_NAMES else group


def _owner(tag: str) -> str:
    group = _group(tag)[len(TAG_PREFIX) :]
    subject = _series_name(tag)
    who = CALLBACK_NAMES.get(group, group)
    return f"{who} at {subject}" if subject != _metric(tag) else who


def _png(figure: Figure) -> bytes:
    canvas = FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def curve_png(run: RunLog, tags: Sequence[str], title: str, labels: Sequence[str] | None = None) -> bytes:
    """One line chart of the given scalar series (x: step, with the epochs where known). Returns PNG bytes."""
    figure = Figure(figsize=(5.2, 2.8), dpi=100, facecolor="white")
    axes = figure.add_subplot(1, 1, 1)
    by_epoch = all(step in run.epochs for tag in tags for step, _ in run.scalars[tag])
    for i, tag in enumerate(tags):
        steps, values = zip(*run.scalars[tag], strict=True)
        where = [run.epochs[step] for step in steps] if by_epoch else list(steps)
        label = labels[i] if labels is not None else _series_name(tag)
        axes.plot(where, values, marker="o", markersize=3, linewidth=1.2, label=label)
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("epoch" if by_epoch else "step", fontsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    names = labels if labels is not None else [_series_name(tag) for tag in tags]
    if len(tags) > 1 or (tags and names[0] != _metric(tags[0])):  # a lone line is named unless it is the metric
        axes.legend(fontsize=6, frameon=False, ncols=2 if len(tags) > 6 else 1)
    figure.tight_layout()
    return _png(figure)


def _number(value: float) -> str:
    """A value as the report shows it: two decimals, or three significant digits for a small one."""
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def _constant(values: Sequence[float]) -> bool:
    return max(values) - min(values) <= 1e-6 * max(1.0, abs(max(values)))


def chart_plan(run: RunLog, tags: Sequence[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Which series of one metric carry information: ``(drawn, notes)``. ``drawn`` lists each distinct series, as (its
    tag, every series name with the same values); ``notes`` says in words what is not drawn. A chart is drawn only
    when some series changes (a flat line is then drawn beside it, for comparison); a series with one point or none
    is never drawn. Nothing drawn means no chart.

    Example:
        >>> run = RunLog(scalars={"interp_probe/net.0/train_accuracy": [(1, 1.0), (2, 1.0)],
        ...                       "interp_probe/net.3/train_accuracy": [(1, 1.0), (2, 1.0)]})
        >>> chart_plan(run, sorted(run.scalars))  # nothing changes: no chart
        ([], ['net.0: 1.00 at every validation', 'net.3: 1.00 at every validation'])
        >>> run.scalars["interp_probe/net.6/train_accuracy"] = [(1, 0.5), (2, 0.7)]
        >>> chart_plan(run, sorted(run.scalars))[0]  # drawn, the identical flat lines as one
        [('interp_probe/net.0/train_accuracy', ['net.0', 'net.3']), ('interp_probe/net.6/train_accuracy', ['net.6'])]
    """
    lines: dict[tuple, tuple[str, list[str]]] = {}
    flat: list[str] = []
    notes: list[str] = []
    varies = False
    for tag in tags:
        series = run.scalars[tag]
        values = [value for _, value in series if not math.isnan(value)]
        name = _series_name(tag)
        if not values:
            notes.append(f"{name}: no finite value")
            continue
        if len(values) == 1:
            notes.append(f"{name}: {_number(values[0])} ({run.epoch_of(series[0][0])}, one point)")
            continue
        if _constant(values) and len(values) == len(series):
            flat.append(f"{name}: {_number(values[0])} at every validation")
        else:
            varies = True
        signature = tuple((step, round(value, 6)) for step, value in series)
        lines.setdefault(signature, (tag, []))[1].append(name)
    if not varies:
        return [], flat + notes
    return list(lines.values()), notes


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h2 a.top { font-size: .6em; font-weight: normal; float: right; color: #666; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
nav { background: #f6f6f6; padding: .5em 1em; border: 1px solid #ddd; }
nav ul { margin: .2em 0; } nav li { margin: .1em 0; }
nav > ul > li > ul { display: flex; flex-wrap: wrap; gap: .2em 1.2em; padding-left: 1.2em; list-style: none; }
.warnings { background: #fff4e5; border: 1px solid #f0b45b; padding: .3em 1em; }
.warnings li { margin: .4em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: .8em; color: #555; max-width: 520px; }
p.notdrawn { font-size: .8em; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
table { border-collapse: collapse; font-size: .85em; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
"""


def _configuration_table(configuration: dict[str, dict[str, str]]) -> str:
    rows = []
    for owner, settings in configuration.items():
        text = ", ".join(f"{key}={value}" for key, value in settings.items())
        rows.append(f"<tr><th>{html.escape(owner)}</th><td>{html.escape(text)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _figure(data: bytes, caption: str) -> str:
    return f"<figure>{_img(data, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _pick_steps(series: list[tuple[int, bytes]]) -> list[tuple[str, int, bytes]]:
    """Start, middle and end of a series (fewer when it is shorter)."""
    if len(series) < 3:
        return [(("start", "end")[i] if len(series) > 1 else "end", *series[i]) for i in range(len(series))]
    middle = series[len(series) // 2]
    return [("start", *series[0]), ("middle", *middle), ("end", *series[-1])]


THREE_POINT_TAGS = ("accuracy_by_depth", "r2_by_depth", "cka", "rdm", "cka_vs_reference")
"""Figures shown at the start, middle and end of training; every other image tag shows its last picture."""


def _anchor(section: str, group: str) -> str:
    return f"{section}-{re.sub(r'[^A-Za-z0-9_-]+', '-', group)}"


def _metric_title(group: str, metric: str) -> str:
    info = metric_info(metric)
    better = f" ({info.direction} is better)" if info is not None and info.direction != "neither" else ""
    return f"{group[len(TAG_PREFIX) :]}: {metric}{better}"


def _curves(run: RunLog, group: str) -> tuple[list[str], list[str]]:
    """The charts of one callback (HTML figures) and the notes on the series not drawn."""
    by_metric: dict[str, list[str]] = {}
    for tag in sorted(run.scalars, key=_tag_key(run)):
        if _group(tag) == group:
            by_metric.setdefault(_metric(tag), []).append(tag)
    figures, notes = [], []
    for metric, tags in by_metric.items():
        drawn, skipped = chart_plan(run, tags)
        if skipped:
            notes.append(f"{metric}: " + "; ".join(skipped))
        if not drawn:
            continue
        labels = [" = ".join(names) for _, names in drawn]
        chart = curve_png(run, [tag for tag, _ in drawn], _metric_title(group, metric), labels)
        info = metric_info(metric)
        about = f": {info.meaning}" if info is not None and info.meaning else ""
        figures.append(_figure(chart, f"{metric}{about} ({len(tags)} series)"))
    return figures, notes


def _pictures(run: RunLog, group: str) -> list[str]:
    by_series = series_key(run)
    tags = sorted(
        (tag for tag in run.images if _group(tag) == group and not tag.endswith("/comparison")),
        key=lambda tag: by_series(_series_name(tag)),
    )
    figures = []
    for tag in tags:
        series = run.images[tag]
        if _metric(tag) in THREE_POINT_TAGS:
            for when, step, data in _pick_steps(series):
                figures.append(_figure(data, f"{tag}, {when} ({run.epoch_of(step)})"))
        else:
            step, data = series[-1]
            figures.append(_figure(data, f"{tag} ({run.epoch_of(step)})"))
    return figures


def render_report(run: RunLog, *, title: str, source: str) -> str:
    """The report's HTML text (see the module docstring)."""
    groups = _callback_groups(run)
    sections: list[tuple[str, str, list[tuple[str, str]], list[str]]] = []  # (id, title, [(sub id, sub title)], html)

    warnings = run_warnings(run)
    if warnings:
        items = "".join(
            f"<li><strong>{html.escape(_callback_title(group))}</strong>: {html.escape(text)}</li>"
            for group, text in warnings
        )
        body = [
            "<p>What the callbacks warned about during the run (also on stderr and in TensorBoard's Text tab):</p>",
            f'<ul class="warnings">{items}</ul>',
        ]
        sections.append(("warnings", f"Warnings ({len(warnings)})", [], body))

    summary = summary_by_callback(run)
    body, subs = [], []
    for group, (sentences, left) in summary.items():
        anchor = _anchor("summary", group)
        items = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in sentences)
        more = f"<li><em>{left} more in the curves below</em></li>" if left else ""
        body.append(f'<h3 id="{anchor}">{html.escape(_callback_title(group))}</h3><ul>{items}{more}</ul>')
        subs.append((anchor, _callback_title(group)))
    if body:
        sections.append(("summary", "Summary", subs, body))

    body, subs = [], []
    for group in groups:
        figures, notes = _curves(run, group)
        if not figures and not notes:
            continue
        anchor = _anchor("curves", group)
        body.append(f'<h3 id="{anchor}">{html.escape(_callback_title(group))}</h3>')
        if figures:
            body.append('<div class="grid">' + "".join(figures) + "</div>")
        if notes:
            body.append(
                '<p class="notdrawn">Not drawn (nothing to read in a chart): ' + html.escape(". ".join(notes)) + ".</p>"
            )
        subs.append((anchor, _callback_title(group)))
    if body:
        sections.append(("curves", "Scalar curves", subs, body))

    body, subs = [], []
    for group in groups:
        figures = _pictures(run, group)
        if not figures:
            continue
        anchor = _anchor("pictures", group)
        body.append(f'<h3 id="{anchor}">{html.escape(_callback_title(group))}</h3><div class="grid">')
        body.extend(figures)
        body.append("</div>")
        subs.append((anchor, _callback_title(group)))
    if body:
        sections.append(("pictures", "Pictures", subs, body))

    comparisons = sorted(tag for tag in run.images if tag.endswith("/comparison"))
    if comparisons:
        body = []
        for tag in comparisons:
            step, data = run.images[tag][-1]
            body.append(_figure(data, f"{tag} ({run.epoch_of(step)})"))
        sections.append(("comparison", "Method comparison", [], body))

    body = []
    if run.configuration:
        body.append(_configuration_table(run.configuration))
    if run.hparams.strip() not in ("", "{}"):
        body.append("<h3>Model hyperparameters (hparams.yaml)</h3>")
        body.append(f"<pre>{html.escape(run.hparams)}</pre>")
    if body:
        sections.append(("configuration", "Configuration", [], body))

    logged = ", ".join(g[len(TAG_PREFIX) :] for g in groups) or "none"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f'<h1 id="top">{html.escape(title)}</h1>',
        f"<p>Run directory: <code>{html.escape(source)}</code>; written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by lightning-interp from the event files. "
        f"Callbacks that logged: {html.escape(logged)}.</p>",
    ]
    if not sections:
        parts.append("<p>The run logged nothing a report can show.</p>")
    contents = []
    for section, heading, subs, _ in sections:
        inner = "".join(f'<li><a href="#{anchor}">{html.escape(name)}</a></li>' for anchor, name in subs)
        contents.append(
            f'<li><a href="#{section}">{html.escape(heading)}</a>' + (f"<ul>{inner}</ul>" if inner else "") + "</li>"
        )
    if contents:
        parts.append('<nav id="contents"><strong>Contents</strong><ul>' + "".join(contents) + "</ul></nav>")
    for section, heading, _, body in sections:
        parts.append(f'<h2 id="{section}">{html.escape(heading)}<a class="top" href="#contents">contents</a></h2>')
        parts.extend(body)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(log_dir: str, output: str | None = None, *, title: str | None = None) -> str:
    """Write the HTML report of the run in ``log_dir``; return its path (default ``<log_dir>/report.html``).

    Example:
        >>> import tempfile
        >>> try:
        ...     write_report(tempfile.mkdtemp())
        ... except FileNotFoundError as error:
        ...     print("No TensorBoard event file" in str(error))
        True
    """
    run = read_run(log_dir)
    path = output or os.path.join(log_dir, "report.html")
    text = render_report(run, title=title or f"lightning-interp report: {os.path.basename(os.path.abspath(log_dir))}",
                         source=os.path.abspath(log_dir))  # fmt: skip
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(partial, path)
    return path


def main(argv: Sequence[str] | None = None) -> str:
    """The command line: ``python -m lightning_interp.report LOGDIR [-o FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_interp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", help="the run's directory (with its events.out.tfevents.* files)")
    parser.add_argument("-o", "--output", default=None, help="the HTML file (default: LOGDIR/report.html)")
    parser.add_argument("--title", default=None, help="the report's title")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.log_dir, args.output, title=args.title)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"report written to {path}")
    return path
