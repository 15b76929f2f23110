"""Charts of the callbacks that are not maps: reliability diagram, class counts, confusion matrix, class lifts, TCAV
bars and the explanation-quality comparison table. Each takes CPU tensors or numpy arrays and returns a uint8
(H, W, 3) image, drawn on a private Agg canvas (no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from lightning_interp.methods import QUALITY_COLUMNS, rank_methods
from lightning_interp.visualize.maps import figure_to_array

__all__ = [
    "TCAVPanel",
    "class_counts_image",
    "class_lift_image",
    "comparison_image",
    "confusion_image",
    "reliability_image",
    "tcav_bar_image",
]

TCAVPanel = tuple[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None], tuple[np.ndarray, np.ndarray]]
"""One layer of the TCAV figure: its name, per concept (TCAV means, stds, p-values) or None (no usable CAV), and the
random CAVs' (means, stds)."""


def reliability_image(
    confidence: Tensor, accuracy: Tensor, counts: Tensor, *, ece: float, title: str = ""
) -> np.ndarray:
    """A reliability diagram: accuracy per equal-width confidence bin against the diagonal, the gap to the bin's
    mean confidence hatched (above a bar: over-confident there; inside it: under-confident), and the
    share of samples per bin below it. Returns uint8 (H, W, 3).

    Example:
        >>> conf, acc, counts = torch.tensor([0.3, 0.8]), torch.tensor([0.5, 0.6]), torch.tensor([4, 6])
        >>> reliability_image(conf, acc, counts, ece=0.2).dtype
        dtype('uint8')
    """
    bins = confidence.numel()
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    filled = counts.numpy() > 0
    figure = Figure(figsize=(4.2, 4.8), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], accuracy.numpy()[filled], width, color="C0", edgecolor="white", label="accuracy")
    gap = confidence.numpy()[filled] - accuracy.numpy()[filled]  # > 0: over-confident in that bin
    top.bar(
        centres[filled],
        gap,
        width,
        bottom=accuracy.numpy()[filled],
        fill=False,
        hatch="///",
        edgecolor="C3",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy", fontsize=8)
    top.legend(loc="upper left", fontsize=7, frameon=False)
    top.set_title(f"{title}\nECE {ece:.3f}" if title else f"ECE {ece:.3f}", fontsize=9)
    share = counts.numpy() / max(int(counts.sum()), 1)
    bottom.bar(centres, share, width, color="grey", edgecolor="white")
    bottom.set_xlabel("confidence", fontsize=8)
    bottom.set_ylabel("share", fontsize=8)
    for axes in (top, bottom):
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    return figure_to_array(figure, canvas)


def class_counts_image(counts: dict[str, Tensor], names: Sequence[str]) -> np.ndarray:
    """Grouped bars of each split's class shares (so a small validation set reads as well as the training set),
    the counts written on the bars. Returns uint8 (H, W, 3).

    Example:
        >>> class_counts_image({"train": torch.tensor([5, 1]), "val": torch.tensor([2, 2])}, ["a", "b"]).dtype
        dtype('uint8')
    """
    classes = len(names)
    figure = Figure(figsize=(max(4.0, 0.6 * classes + 2), 3.2), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(counts), 1)
    highest = 0.0
    for slot, (split, values) in enumerate(counts.items()):
        shares = values.double() / max(int(values.sum()), 1)
        highest = max(highest, float(shares.max()))
        positions = np.arange(classes) - 0.4 + width * (slot + 0.5)
        bars = axes.bar(positions, shares.numpy(), width, label=f"{split} ({int(values.sum())} samples)")
        if classes <= 20:
            axes.bar_label(bars, [str(int(v)) for v in values], fontsize=6, padding=1)
    axes.set_ylim(0, highest * 1.25 + 1e-9)
    axes.set_xticks(np.arange(classes), list(names), fontsize=7, rotation=45 if classes > 8 else 0)
    axes.set_ylabel("share of the set", fontsize=8)
    axes.set_title("class counts", fontsize=9)
    axes.legend(fontsize=7, frameon=False, loc="upper left", ncols=len(counts))
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    return figure_to_array(figure, canvas)


def confusion_image(confusion: Tensor, names: Sequence[str], *, title: str = "") -> np.ndarray:
    """The confusion matrix with each row normalised to its true class (the diagonal is the recall), counts in the
    cells. Returns uint8 (H, W, 3).

    Example:
        >>> confusion_image(torch.tensor([[3, 1], [0, 4]]), ["a", "b"]).dtype
        dtype('uint8')
    """
    counts = confusion.double()
    rows = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    classes = len(names)
    side = max(3.2, 0.45 * classes + 1.6)
    figure = Figure(figsize=(side + 0.6, side), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    shown = axes.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if classes <= 20:
        for i in range(classes):
            for j in range(classes):
                colour = "white" if rows[i, j] > 0.6 else "black"
                axes.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=colour)
    axes.set_xticks(range(classes), list(names), fontsize=7, rotation=45 if classes > 8 else 0)
    axes.set_yticks(range(classes), list(names), fontsize=7)
    axes.set_xlabel("predicted", fontsize=8)
    axes.set_ylabel("true", fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    figure.tight_layout()
    return figure_to_array(figure, canvas)


def class_lift_image(lifts: Tensor, names: Sequence[str], measure: str, *, title: str = "") -> np.ndarray:
    """Horizontal bars of each class's lift (its maps' share on the object, or on the border, over a uniform
    map's), with the uniform map's 1 marked. Returns uint8 (H, W, 3).

    Example:
        >>> class_lift_image(torch.tensor([2.0, 1.0]), ["a", "b"], "localization").dtype
        dtype('uint8')
    """
    classes = len(names)
    figure = Figure(figsize=(5.0, max(2.4, 0.32 * classes + 1.4)), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    values = torch.nan_to_num(lifts.double(), nan=0.0).numpy()
    positions = np.arange(classes)[::-1]
    axes.barh(positions, values, color="tab:blue")
    axes.axvline(1.0, color="black", linewidth=1, linestyle="--", label="uniform map")
    axes.set_yticks(positions, list(names), fontsize=7)
    what = "mass on the object" if measure == "localization" else "mass on the image border"
    axes.set_xlabel(f"{what} / a uniform map's", fontsize=8)
    axes.tick_params(axis="x", labelsize=7)
    axes.legend(fontsize=7, frameon=False, loc="lower right")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure_to_array(figure, canvas)


def _tcav_figure(
    panels: Sequence[TCAVPanel],
    concepts: Sequence[str],
    classes: Sequence[int],
    *,
    alpha: float = 0.05,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Figure:
    """The figure of :func:`tcav_bar_image` (its tick labels and legend are what the tests read back)."""
    groups = len(classes)
    bars = len(concepts) + 1
    panel_width = max(3.2, 0.28 * groups * bars + 1.2)
    figure = Figure(figsize=(panel_width * len(panels) + 0.4, 3.4), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    colours = [f"C{i % 10}" for i in range(len(concepts))]
    width = 0.8 / bars
    positions = np.arange(groups)

    def clipped(means: np.ndarray, spread: np.ndarray) -> np.ndarray:  # error bars inside [0, 1]
        return np.stack([np.minimum(spread, means), np.minimum(spread, 1 - means)])

    for index, (layer, per_concept, (random_mean, random_std)) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for slot, concept in enumerate(concepts):
            where = positions - 0.4 + width * (slot + 0.5)
            entry = per_concept.get(concept)
            if entry is None:  # no CAV better than chance at this layer
                for x in where:
                    axes.text(x, 0.03, "n/a", ha="center", va="bottom", fontsize=8, rotation=90, color=colours[slot])
                continue
            means, spread, p_values = entry
            significant = p_values < alpha
            errors = clipped(means, spread)
            for column, (x, mean, star) in enumerate(zip(where, means, significant, strict=True)):
                axes.bar(
                    x,
                    mean,
                    width,
                    yerr=errors[:, column : column + 1],
                    color=colours[slot],
                    alpha=1.0 if star else 0.35,
                    capsize=2,
                    error_kw={"lw": 0.8},
                )
                if star:
                    axes.text(x, mean + errors[1, column] + 0.01, "*", ha="center", va="bottom", fontsize=11)
        where = positions - 0.4 + width * (bars - 0.5)
        axes.bar(where, random_mean, width, yerr=clipped(random_mean, random_std), color="#aaaaaa", capsize=2)
        axes.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ticks = [class_names[k] if class_names and k < len(class_names) else str(k) for k in classes]
        axes.set_xticks(positions, ticks, fontsize=10)
        axes.set_xlim(-0.5, groups - 0.5)
        axes.set_xlabel("class", fontsize=9)
        axes.set_ylim(0, 1.12)
        axes.set_title(layer, fontsize=10)
        axes.tick_params(axis="y", labelsize=9)
        if index == 0:
            axes.set_ylabel("TCAV score", fontsize=9)
    handles = [Patch(color=colour, label=concept) for colour, concept in zip(colours, concepts, strict=True)]
    handles.append(Patch(color="#aaaaaa", label="random vs random"))
    figure.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize=9, frameon=False)
    if title:
        figure.suptitle(f"{title}\n* p < {alpha:g}; faded: not significant; n/a: CAV at chance", fontsize=9)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def tcav_bar_image(
    panels: Sequence[TCAVPanel],
    concepts: Sequence[str],
    classes: Sequence[int],
    *,
    alpha: float = 0.05,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Grouped bars of TCAV scores, one panel per layer: classes on the x axis, one bar per concept and one grey
    bar for the random CAVs; error bars are the std over the runs, ``*`` marks p < alpha, faded bars are not
    significant, "n/a" a concept without a usable CAV; classes are named from ``class_names`` where it has an entry.
    Returns uint8 (H, W, 3).

    Example:
        >>> random = (np.full(2, 0.5), np.full(2, 0.2))
        >>> panel = ("net.4", {"stripes": (np.array([0.9, 0.2]), np.full(2, 0.05), np.array([0.001, 0.3]))}, random)
        >>> tcav_bar_image([panel], ["stripes"], [0, 1]).dtype
        dtype('uint8')
    """
    figure = _tcav_figure(panels, concepts, classes, alpha=alpha, title=title, class_names=class_names)
    return figure_to_array(figure, figure.canvas)


def comparison_image(table: dict[str, dict[str, float]], *, title: str = "") -> np.ndarray:
    """A table of the methods (rows, best mean rank first) by metric (columns), each cell shaded by the method's rank
    in that column (green best). Returns uint8 (H, W, 3).

    Example:
        >>> comparison_image({"a": {"deletion_auc": 0.1}, "b": {"deletion_auc": 0.3}}).dtype
        dtype('uint8')
    """
    overall = rank_methods(table)
    keys = sorted(table, key=lambda key: (math.isnan(overall[key]), overall[key]))
    columns = [metric for metric in QUALITY_COLUMNS if any(metric in row for row in table.values())]
    cells = [[_format(table[key].get(metric)) for metric in columns] + [_format(overall[key])] for key in keys]
    colours = []
    for key in keys:
        row_colours = []
        for metric in columns:
            higher = QUALITY_COLUMNS[metric][1]
            row_colours.append(_shade(table, key, metric, higher))
        row_colours.append("#f2f2f2")
        colours.append(row_colours)
    label = 0.2 + 0.068 * max((len(key) for key in keys), default=4)  # inches for the row labels (8 pt, ~6.5 px a char)
    width = 1.25 * (len(columns) + 1) + label + 0.15
    figure = Figure(figsize=(width, 0.3 * (len(keys) + 2) + 0.5), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((label / width, 0.02, 1 - (label + 0.1) / width, 0.98 - 0.45 / figure.get_figheight()))
    axes.axis("off")
    shown = axes.table(
        cellText=cells,
        cellColours=colours,
        rowLabels=keys,
        colLabels=[QUALITY_COLUMNS[metric][0] for metric in columns] + ["mean rank"],
        cellLoc="center",
        bbox=(0.0, 0.0, 1.0, 1.0),
    )
    shown.auto_set_font_size(False)
    shown.set_fontsize(8)
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.12 / figure.get_figheight())
    return figure_to_array(figure, canvas)


def _format(value: float | None) -> str:
    if value is None:
        return "–"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _shade(table: dict[str, dict[str, float]], key: str, metric: str, higher: bool | None) -> str:
    value = table[key].get(metric)
    present = [row[metric] for row in table.values() if metric in row and not math.isnan(row[metric])]
    if higher is None or value is None or math.isnan(value) or len(present) < 2:
        return "white"
    low, high = min(present), max(present)
    if _format(low) == _format(high):  # the same as shown (three decimals): no ranking colours for rounding noise
        return "#f2f2f2"
    goodness = (value - low) / (high - low)
    goodness = goodness if higher else 1 - goodness
    red, green = 1 - 0.45 * goodness, 0.55 + 0.45 * goodness
    return f"#{round(255 * red):02x}{round(255 * green):02x}{round(255 * min(red, green)):02x}"
