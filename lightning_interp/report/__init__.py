"""A self-contained HTML report of a run, written from its TensorBoard event files.

    python -m lightning_interp.report lightning_logs/quickstart/version_0            # -> .../version_0/report.html
    python -m lightning_interp.report lightning_logs/quickstart/version_0 -o run.html

The report needs nothing but the file: images are embedded, there is no
script and no link to the network. It shows the run's configuration
(``hparams.yaml``), a summary in words of what changed during training, the
scalar curves of every callback (one chart per metric, every layer or
method overlaid), the final picture of every image tag with the start,
middle and end of the representation figures, and the explanation-quality
comparison. Runs trained without :class:`~lightning_interp.callbacks.ReportCallback`
get the same report from this command.
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
from collections.abc import Sequence
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_interp._logging import TAG_PREFIX

__all__ = ["RunLog", "main", "read_run", "summary_by_callback", "summary_findings", "summary_sentences", "write_report"]

CONFIGURATION_FILE = "interp_configuration.json"
"""Written next to the event files by :class:`~lightning_interp.callbacks.ReportCallback`: what the report's
configuration section shows (the command line reads it too)."""

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
    """

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=dict)
    hparams: str = ""
    configuration: dict[str, dict[str, str]] = field(default_factory=dict)

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
        accumulator = EventAccumulator(directory, size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            run.scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["images"]:
            run.images.setdefault(tag, []).extend((e.step, e.encoded_image_string) for e in accumulator.Images(tag))
    for series in (*run.scalars.values(), *run.images.values()):
        series.sort(key=lambda point: point[0])
    run.epochs = {step: round(value) for step, value in run.scalars.pop("epoch", [])}
    saved = os.path.join(log_dir, CONFIGURATION_FILE)
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as handle:
            run.configuration = json.load(handle)
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


def summary_findings(run: RunLog) -> list[tuple[str, float, str]]:
    """Every finding as ``(group, weight, sentence)``: the group is ``"training"`` or the callback's tag group; the
    weight ranks findings within a group (a threshold crossed or not yet reached: 1; a change: its size)."""
    findings: list[tuple[str, float, str]] = []
    for name in ("val_acc", "val_loss"):
        series = run.scalars.get(name)
        if series and len(series) > 1:
            text = f"{name} went from {series[0][1]:.3f} to {series[-1][1]:.3f} over {len(series)} validations."
            findings.append(("training", 1.0, text))
    ours = {  # NaN points (warned about during training: zero maps, ...) say nothing; the chance level is no finding
        tag: [(step, value) for step, value in series if not math.isnan(value)]
        for tag, series in run.scalars.items()
        if tag.startswith(TAG_PREFIX) and "/random/" not in tag
    }
    for tag, series in sorted(ours.items()):
        if not series:
            continue
        metric, owner, group = _metric(tag), _owner(tag), _group(tag)
        first, last = series[0][1], series[-1][1]
        if metric in ("stability", "cka_vs_previous"):
            settled = next((step for step, value in series if value >= SETTLED), None)
            if settled is not None:
                when = run.epoch_of(settled)
                findings.append((group, 1.0, f"{owner}: {metric} first reached {SETTLED} at {when} (last {last:.2f})."))
            else:
                text = f"{owner}: {metric} stayed below {SETTLED} (last {last:.2f}): not settled yet."
                findings.append((group, 1.0, text))
        elif metric in ("localization", "accuracy", "deletion_auc", "sanity_rank_correlation", "ece", "worst_recall"):
            if len(series) > 1:
                change = abs(last - first)
                if change < 0.005:
                    findings.append((group, 0.0, f"{owner}: {metric} stayed at {last:.2f}."))
                else:
                    verb = "rose" if last > first else "fell"
                    findings.append((group, change, f"{owner}: {metric} {verb} from {first:.2f} to {last:.2f}."))
            if metric == "accuracy" and "interp_probe" in tag:
                passed = next((step for step, value in series if value >= 0.9), None)
                if passed is not None:
                    findings.append((group, 1.0, f"{owner}: probe accuracy passed 0.9 at {run.epoch_of(passed)}."))
    return findings


def summary_sentences(run: RunLog) -> list[str]:
    """What changed during training, in words, from the scalars alone (every finding, in tag order).

    Example:
        >>> run = RunLog(scalars={"interp_gradcam/net.7/localization": [(3, 0.1), (7, 0.32)],
        ...                       "interp_gradcam/net.7/stability": [(7, 0.97)]}, epochs={3: 0, 7: 1})
        >>> summary_sentences(run)[0]
        'Grad-CAM at net.7: localization rose from 0.10 to 0.32.'
    """
    return [sentence for _, _, sentence in summary_findings(run)]


def summary_by_callback(run: RunLog, per_callback: int = 5) -> dict[str, tuple[list[str], int]]:
    """Per group (``"training"`` first, then each callback): its ``per_callback`` weightiest findings in tag order,
    and how many were left out.

    Example:
        >>> run = RunLog(scalars={f"interp_probe/net.{i}/accuracy": [(1, 0.1), (2, 0.1 * i)] for i in range(1, 9)})
        >>> shown, left = summary_by_callback(run, per_callback=2)["interp_probe"]
        >>> shown[-1], left  # the two largest changes, in tag order; six more in the curves
        ('Linear probe at net.8: accuracy rose from 0.10 to 0.80.', 6)
    """
    grouped: dict[str, list[tuple[int, float, str]]] = {}
    for order, (group, weight, sentence) in enumerate(summary_findings(run)):
        grouped.setdefault(group, []).append((order, weight, sentence))
    result: dict[str, tuple[list[str], int]] = {}
    for group in sorted(grouped, key=lambda name: (name != "training", name)):
        entries = grouped[group]
        kept = sorted(sorted(entries, key=lambda entry: -entry[1])[:per_callback])
        result[group] = ([sentence for _, _, sentence in kept], len(entries) - len(kept))
    return result


def _owner(tag: str) -> str:
    group = _group(tag)[len(TAG_PREFIX) :]
    names = {
        "gradcam": "Grad-CAM",
        "saliency": "Saliency",
        "probe": "Linear probe",
        "similarity": "CKA / RSA",
        "quality": "Explanation quality",
        "bias": "Dataset bias",
        "calibration": "Calibration",
        "uncertainty": "Uncertainty",
        "activations": "Activations",
    }
    subject = _series_name(tag)
    who = names.get(group, group)
    return f"{who} at {subject}" if subject != _metric(tag) else who


def _png(figure: Figure) -> bytes:
    canvas = FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def curve_png(run: RunLog, tags: Sequence[str], title: str) -> bytes:
    """One line chart of the given scalar series (x: step, with the epochs where known). Returns PNG bytes."""
    figure = Figure(figsize=(5.2, 2.8), dpi=100, facecolor="white")
    axes = figure.add_subplot(1, 1, 1)
    by_epoch = all(step in run.epochs for tag in tags for step, _ in run.scalars[tag])
    for tag in tags:
        steps, values = zip(*run.scalars[tag], strict=True)
        where = [run.epochs[step] for step in steps] if by_epoch else list(steps)
        axes.plot(where, values, marker="o", markersize=3, linewidth=1.2, label=_series_name(tag))
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("epoch" if by_epoch else "step", fontsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    if len(tags) > 1:
        axes.legend(fontsize=6, frameon=False, ncols=2 if len(tags) > 6 else 1)
    figure.tight_layout()
    return _png(figure)


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: .8em; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
table { border-collapse: collapse; font-size: .85em; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
"""


def _configuration_table(configuration: dict[str, dict[str, str]]) -> str:
    if not configuration:
        return "<p>No saved trainer configuration (ReportCallback saves it during fit).</p>"
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


def render_report(run: RunLog, *, title: str, source: str) -> str:
    """The report's HTML text (see the module docstring)."""
    groups = sorted({_group(tag) for tag in [*run.scalars, *run.images] if tag.startswith(TAG_PREFIX)})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run directory: <code>{html.escape(source)}</code>; written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by lightning-interp from the event files.</p>",
        '<h2 id="configuration">Configuration</h2>',
        f"<p>Callbacks that logged: {html.escape(', '.join(g[len(TAG_PREFIX) :] for g in groups) or 'none')}.</p>",
        _configuration_table(run.configuration),
        "<h3>Model hyperparameters (hparams.yaml)</h3>",
        f"<pre>{html.escape(run.hparams)}</pre>" if run.hparams else "<p>No hparams.yaml in the run directory.</p>",
        '<h2 id="summary">Summary</h2>',
    ]
    summary = summary_by_callback(run)
    if not summary:
        parts.append("<p>No scalar series to summarise.</p>")
    for group, (sentences, left) in summary.items():
        items = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in sentences)
        more = f"<li><em>{left} more in the curves below</em></li>" if left else ""
        parts.append(f"<h3>{html.escape(group)}</h3><ul>{items}{more}</ul>")
    parts.append('<h2 id="curves">Scalar curves</h2>')
    for group in groups:
        by_metric: dict[str, list[str]] = {}
        for tag in sorted(run.scalars):
            if _group(tag) == group:
                by_metric.setdefault(_metric(tag), []).append(tag)
        if not by_metric:
            continue
        parts.append(f'<h3>{html.escape(group)}</h3><div class="grid">')
        for metric, tags in by_metric.items():
            parts.append(_figure(curve_png(run, tags, f"{group}: {metric}"), f"{metric} ({len(tags)} series)"))
        parts.append("</div>")
    parts.append('<h2 id="pictures">Pictures</h2>')
    for group in groups:
        tags = sorted(tag for tag in run.images if _group(tag) == group and not tag.endswith("/comparison"))
        if not tags:
            continue
        parts.append(f'<h3>{html.escape(group)}</h3><div class="grid">')
        for tag in tags:
            series = run.images[tag]
            if _metric(tag) in THREE_POINT_TAGS:
                for when, step, data in _pick_steps(series):
                    parts.append(_figure(data, f"{tag}, {when} ({run.epoch_of(step)})"))
            else:
                step, data = series[-1]
                parts.append(_figure(data, f"{tag} ({run.epoch_of(step)})"))
        parts.append("</div>")
    parts.append('<h2 id="comparison">Method comparison</h2>')
    comparisons = [tag for tag in run.images if tag.endswith("/comparison")]
    if comparisons:
        for tag in sorted(comparisons):
            step, data = run.images[tag][-1]
            parts.append(_figure(data, f"{tag} ({run.epoch_of(step)})"))
    else:
        parts.append("<p>No explanation-quality comparison in this run (add ExplanationQualityCallback).</p>")
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
