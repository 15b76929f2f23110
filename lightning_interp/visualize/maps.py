"""Turn inputs and maps into pictures: heatmaps, overlays and annotated grids.

Everything returns numpy arrays (uint8 RGB for finished images) so any logger
can take them. Figures are drawn on a private Agg canvas (no pyplot state), so
nothing is left open between calls.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = [
    "card_scale",
    "colorize",
    "figure_to_array",
    "input_to_rgb",
    "is_signal_input",
    "line_image",
    "map_tiles",
    "matrix_image",
    "normalize_map",
    "overlay",
    "rdm_image",
    "render_feature_rows",
    "render_grid",
    "render_signals",
    "render_tokens",
]

COMPACT_TILE_PIXELS = 64  # tiles of the compact grids (a TensorBoard card's small display box)
MIN_TILE_PIXELS = 96


def input_to_rgb(inputs: Tensor) -> np.ndarray:
    """Display version of a batch of inputs: (B, H, W, 3) float in [0, 1].

    Each sample is min-max scaled on its own (so normalised inputs display
    well); one channel becomes grey, more than three keep the first three.
    1-D inputs (B, D) become a one-row strip.

    Example:
        >>> input_to_rgb(torch.rand(2, 1, 5, 5)).shape
        (2, 5, 5, 3)
    """
    x = inputs.detach().float().cpu()
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], dim=1)
    x = x[:, :3]
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-12)
    return x.permute(0, 2, 3, 1).numpy()


def normalize_map(
    maps: Tensor, *, signed: bool = False, percentile: float = 99.5, floor: Tensor | Sequence[float] | None = None
) -> np.ndarray:
    """Scale each map to [0, 1] (or [-1, 1] when ``signed``) by its own robust maximum.

    The scale is the ``percentile`` of the map's magnitude, so one extreme
    pixel cannot wash out the rest; values beyond it are clipped. ``floor``
    (one value, or one per map) is the smallest scale: a map whose values are
    all below it is drawn faint instead of stretched to full colour (attention
    spread evenly is not "maximal" attention). An all-zero map stays zero. NaN
    and inf become 0.

    Example:
        >>> normalize_map(torch.tensor([[[0.0, 2.0], [1.0, 4.0]]]), percentile=100)[0].tolist()
        [[0.0, 0.5], [0.25, 1.0]]
    """
    m = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = m.reshape(m.shape[0], -1).abs()
    scale = torch.quantile(flat, percentile / 100.0, dim=1).clamp_min(1e-12)
    if floor is not None:  # values that are small in absolute terms (a uniform attention map) stay faint
        scale = torch.maximum(scale, torch.as_tensor(floor, dtype=scale.dtype).reshape(-1).expand_as(scale))
    scale = scale.reshape(-1, *([1] * (m.ndim - 1)))
    low = -1.0 if signed else 0.0
    return (m / scale).clamp(low, 1.0).numpy()


def colorize(values: np.ndarray, cmap: str = "inferno", *, signed: bool = False) -> np.ndarray:
    """Map normalised values to RGB with a matplotlib colormap: (..., 3) float in [0, 1].

    Example:
        >>> colorize(np.zeros((2, 2)), "gray")[0, 0].tolist()
        [0.0, 0.0, 0.0]
    """
    colormap = matplotlib.colormaps[cmap]
    scaled = (values + 1.0) / 2.0 if signed else values
    return colormap(np.clip(scaled, 0.0, 1.0))[..., :3]


def overlay(image: np.ndarray, heat: np.ndarray, values: np.ndarray, *, alpha: float = 0.65) -> np.ndarray:
    """Blend a coloured heatmap over a dimmed grey copy of the image.

    Stronger map values are more opaque, so the image stays visible where the
    map is weak. ``values`` are the normalised map values in [-1, 1].

    Example:
        >>> img = np.ones((2, 2, 3)); heat = np.zeros((2, 2, 3))
        >>> overlay(img, heat, np.zeros((2, 2)))[0, 0].round(2).tolist()  # 0.7 grey x (1 - 0.65 x 0.35)
        [0.54, 0.54, 0.54]
    """
    grey = image.mean(axis=-1, keepdims=True).repeat(3, axis=-1) * 0.7
    weight = alpha * (0.35 + 0.65 * np.abs(values))[..., None]
    return np.clip((1 - weight) * grey + weight * heat, 0.0, 1.0)


def outline_region(tile: np.ndarray, region: np.ndarray, color: Sequence[float] = (0.1, 1.0, 0.3)) -> np.ndarray:
    """``tile`` (H, W, 3) floats in [0, 1] with the border pixels of ``region`` (a boolean mask, resized nearest
    neighbour to the tile) painted ``color``: the region a segmentation explanation explains.

    Example:
        >>> region = np.zeros((5, 5), dtype=bool); region[1:4, 1:4] = True
        >>> drawn = outline_region(np.zeros((5, 5, 3)), region)
        >>> drawn[..., 1].astype(int).tolist()[2]  # the middle row: the border on both sides, the inside left alone
        [0, 1, 0, 1, 0]
    """
    mask = np.asarray(region, dtype=bool)
    height, width = tile.shape[:2]
    if mask.shape != (height, width):
        rows = (np.arange(height) * mask.shape[0] // max(height, 1)).clip(0, mask.shape[0] - 1)
        cols = (np.arange(width) * mask.shape[1] // max(width, 1)).clip(0, mask.shape[1] - 1)
        mask = mask[rows][:, cols]
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    border = mask & ~inner
    drawn = np.array(tile, dtype=float, copy=True)
    drawn[border] = np.asarray(color, dtype=float)
    return drawn


def _title_width(line: str) -> float:
    """A title line's width in lower-case characters: capitals are about a third wider ("KernelSHAP" is as wide as
    about 12 lower-case letters, not 10)."""
    return len(line) + 0.4 * sum(character.isupper() for character in line)


def _title_lines(text: str, fits: int, wrap: bool) -> list[str]:
    """A column title's lines, each at most ``fits`` lower-case characters wide (:func:`_title_width`): with
    ``wrap``, its words packed onto lines, a word too wide for one split where its case changes or after a hyphen
    or a dot ("Kernel" "SHAP", "Grad-" "CAM++", "net." "features") and one still too wide broken, at most three
    lines of each line of ``text`` (its end: a layer name's end tells it apart); then each line too wide cut from
    the left.

    Example:
        >>> _title_lines("KernelSHAP", 10, True), _title_lines("integ. grads", 10, True)
        (['Kernel', 'SHAP'], ['integ.', 'grads'])
        >>> _title_lines("Smooth Grad-CAM++", 10, True), _title_lines("layer4.1.conv2", 10, False)
        (['Smooth', 'Grad-', 'CAM++'], ['…4.1.conv2'])
    """
    lines = text.splitlines() or [""]
    if wrap:
        packed: list[str] = []
        for line in lines:
            pieces: list[tuple[str, bool]] = []  # (piece, joined to the previous one without a space)
            for word in line.split():
                parts = [word]
                if _title_width(word) > fits:
                    parts = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[-.])(?=\w)", "\n", word).splitlines()
                    parts = [chunk for part in parts for chunk in (textwrap.wrap(part, width=fits) or [part])]
                pieces += [(part, index > 0) for index, part in enumerate(parts)]
            current, own = "", []
            for piece, glued in pieces:
                joined = current + ("" if glued or not current else " ") + piece
                if current and _title_width(joined) > fits:
                    own.append(current)
                    current = piece
                else:
                    current = joined
            own.append(current)
            if len(own) > 3:  # a long layer name: its end
                own = ["…" + own[-3], *own[-2:]]
            packed += own
        lines = packed
    cut = []
    for line in lines:
        while _title_width(line) > fits and len(line) > 2:
            line = "…" + line[2:] if line.startswith("…") else "…" + line[1:]
        cut.append(line)
    return cut


def _upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    return tile if factor == 1 else tile.repeat(factor, axis=0).repeat(factor, axis=1)


def render_grid(
    tiles: Sequence[Sequence[np.ndarray]],
    *,
    column_titles: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    gap: int = 4,
    min_label_chars: int = 0,
    compact: bool = False,
) -> np.ndarray:
    """Lay out RGB tiles in a grid with column titles and row labels; return uint8 (H, W, 3).

    ``tiles[r][c]`` is an (h, w, 3) float image in [0, 1]; all tiles share one
    size. Small tiles are enlarged by an integer factor (nearest neighbour) to
    at least 96 pixels so they stay readable in TensorBoard. The label column
    is as wide as the longest label line, at least ``min_label_chars``, rounded
    up to a multiple of four characters, so grids of one series keep one width
    while their labels change by a character or two ("97%" / "100%").

    ``compact`` draws for a small display box (TensorBoard's Time Series card
    shows images in about 370 x 215 pixels): tiles of at least 64 pixels, row
    labels a quarter larger and column titles wrapped onto two lines, so a grid
    of two rows is shown at two thirds of its size or more and its text stays
    legible there.

    Example:
        >>> grid = render_grid([[np.zeros((8, 8, 3))] * 2], column_titles=["input", "map"], row_labels=["y=1"])
        >>> grid.dtype, grid.ndim
        (dtype('uint8'), 3)
    """
    rows, cols = len(tiles), len(tiles[0])
    height, width = tiles[0][0].shape[:2]
    minimum = COMPACT_TILE_PIXELS if compact else MIN_TILE_PIXELS
    scale = 1.25 if compact else 1.0  # label font sizes and the character widths that go with them
    factor = max(1, -(-minimum // max(height, 1)))
    if width * factor > 4 * minimum:  # long 1-D strips: enlarge by height only
        factor = 1
    th, tw = height * factor, width * factor
    mosaic = np.ones((rows * (th + gap) - gap, cols * (tw + gap) - gap, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            mosaic[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = _upscale(tile, factor)

    dpi = 100
    longest = max((len(line) for text in row_labels for line in text.splitlines()), default=0)
    longest = -(-max(longest, min_label_chars) // 4) * 4
    left = int(14 + 6.8 * scale * longest) if row_labels else 6  # 8 pt monospace is about 6.7 px a character
    fig_w = mosaic.shape[1] + left + 6
    # a title wider than the picture is wrapped (10 pt bold is up to about 8 px a character), never cut off
    title_lines = textwrap.wrap(title, width=max(12, int((fig_w - 8) / (8.2 * scale)))) if title else []
    # 9 pt is up to about 7 px a character, 6.6 for the mostly lower-case method names, and titles need a gap
    fits = max(4, int((tw + gap) / (6.6 if compact else 7.4)))
    title_rows = max((len(_title_lines(text, fits, compact)) if text else 0 for text in column_titles), default=0)
    # 9 pt title lines are about 15 px apart
    top = (8 + 15 * title_rows if column_titles else 4) + int(16 * scale) * len(title_lines)
    top += 6 if title_lines else 0
    fig_h = mosaic.shape[0] + top + 6
    figure = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((left / fig_w, 6 / fig_h, mosaic.shape[1] / fig_w, mosaic.shape[0] / fig_h))
    axes.imshow(mosaic, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    for c, text in enumerate(column_titles):
        x = (left + c * (tw + gap) + tw / 2) / fig_w
        shown = "\n".join(_title_lines(text, fits, compact))
        figure.text(x, 1 - (top - 4) / fig_h, shown, ha="center", va="bottom", fontsize=9)
    for r, text in enumerate(row_labels):
        y = 1 - (top + r * (th + gap) + th / 2) / fig_h
        figure.text(4 / fig_w, y, text, ha="left", va="center", fontsize=8 * scale, family="monospace")
    if title_lines:
        figure.text(
            0.5, 1 - 4 / fig_h, "\n".join(title_lines), ha="center", va="top", fontsize=10 * scale, weight="bold"
        )
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def map_tiles(
    inputs: Tensor,
    maps: Tensor,
    *,
    cmap: str = "inferno",
    signed: bool = False,
    floor: Tensor | Sequence[float] | None = None,
) -> list[np.ndarray]:
    """One overlay tile per sample: the map coloured and blended over its input.

    Maps of another spatial size than the inputs are resized bilinearly.
    Inputs that are not images ((B, D) features) give coloured strips.
    ``floor``: the smallest normalisation scale per map (see :func:`normalize_map`).

    Example:
        >>> tiles = map_tiles(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8))
        >>> len(tiles), tiles[0].shape
        (2, (8, 8, 3))
    """
    images = input_to_rgb(inputs)
    m = maps.detach().float().cpu()
    if m.ndim == 2:
        m = m[:, None, :]
    if tuple(m.shape[-2:]) != images.shape[1:3]:
        m = torch.nn.functional.interpolate(m[:, None], size=images.shape[1:3], mode="bilinear", align_corners=False)[
            :, 0
        ]
    values = normalize_map(m, signed=signed, floor=floor)
    heat = colorize(values, cmap, signed=signed)
    return [overlay(images[i], heat[i], values[i]) for i in range(len(images))]


def figure_to_array(figure: Figure, canvas: FigureCanvasAgg) -> np.ndarray:
    """Draw ``figure`` on its Agg ``canvas`` and return the pixels as uint8 (H, W, 3).

    Example:
        >>> figure = Figure(figsize=(1, 1), dpi=10)
        >>> figure_to_array(figure, FigureCanvasAgg(figure)).shape
        (10, 10, 3)
    """
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


CARD_BOX = (370, 215)
"""The box (width, height in px) in which TensorBoard 2.21's Time Series card shows an image, scaled to fit (measured
in headless Chromium at 1400, 1600 and 1920 px wide windows)."""
MIN_CARD_TEXT_PIXELS = 8.0  # the smallest font size (px) that reads in a Time Series card


def card_scale(width: float, height: float) -> float:
    """The scale at which a Time Series card shows an image of ``width`` x ``height`` px (at most 1).

    Example:
        >>> card_scale(740, 215), card_scale(100, 100)
        (0.5, 1.0)
    """
    return min(1.0, CARD_BOX[0] / width, CARD_BOX[1] / height)


MATRIX_CELL_INCHES = 0.5  # one cell of a matrix heatmap (50 px at 100 dpi)
MATRIX_NUMBER_POINTS = 11  # the numbers in the cells


def _matrix_figure(
    values: np.ndarray,
    labels: Sequence[str],
    *,
    column_labels: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "magma",
    vmin: float = 0.0,
    vmax: float = 1.0,
    annotate: bool = True,
) -> Figure:
    """The figure of :func:`matrix_image` (its texts are what the tests read back)."""
    rows, cols = values.shape
    columns = list(labels if column_labels is None else column_labels)
    longest = max((len(str(text)) for text in [*labels, *columns]), default=1)
    label_inches = 0.15 + 0.075 * min(longest, 24)  # 9 pt names
    width = label_inches + MATRIX_CELL_INCHES * cols + 0.85  # + the colour bar and its tick labels
    height = (0.45 if title else 0.15) + MATRIX_CELL_INCHES * rows + label_inches * 0.75  # rotated column names
    figure = Figure(figsize=(width, height), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=vmin, vmax=vmax)
    axes.set_xticks(range(cols), [str(c)[:24] for c in columns], rotation=45, ha="right", fontsize=9)
    axes.set_yticks(range(rows), [str(r)[:24] for r in labels], fontsize=9)
    # numbers only where a Time Series card shows them at a readable size (else the colours and the bar tell)
    readable = MATRIX_NUMBER_POINTS * 100 / 72 * card_scale(width * 100, height * 100) >= MIN_CARD_TEXT_PIXELS
    if annotate and readable:
        for i in range(rows):
            for j in range(cols):
                value = values[i, j]
                shade = (value - vmin) / (vmax - vmin) if np.isfinite(value) else 1.0
                axes.text(
                    j,
                    i,
                    "nan" if not np.isfinite(value) else f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=MATRIX_NUMBER_POINTS if cols <= 8 else MATRIX_NUMBER_POINTS - 2,
                    color="black" if shade > 0.6 else "white",
                    gid="cell value",
                )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04).ax.tick_params(labelsize=9)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout(pad=0.3)
    return figure


def matrix_image(
    matrix: Tensor | np.ndarray,
    labels: Sequence[str],
    *,
    column_labels: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "magma",
    vmin: float = 0.0,
    vmax: float = 1.0,
    annotate: bool = True,
) -> np.ndarray:
    """A matrix (e.g. layer x layer CKA) as an annotated heatmap; returns uint8 (H, W, 3).

    ``labels`` name the rows and, unless ``column_labels`` is given, the
    columns too. NaN cells are shown grey and annotated "nan". Cells are 50 px;
    with ``annotate`` each holds its value (11 pt) where a TensorBoard Time
    Series card shows them at 8 px or more (up to 6 x 6 cells, as many as
    ``max_layers`` picks by default), and the colours and the colour bar alone
    tell them in larger matrices.

    Example:
        >>> matrix_image(torch.eye(3), ["a", "b", "c"], title="CKA").dtype
        dtype('uint8')
    """
    values = matrix.detach().double().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, float)
    figure = _matrix_figure(
        values,
        labels,
        column_labels=column_labels,
        title=title,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        annotate=annotate,
    )
    return figure_to_array(figure, figure.canvas)


RDM_PANEL_INCHES = 1.1  # one RDM's side (110 px at 100 dpi: the pooled 128 x 128 RDMs lose little)


def _rdm_figure(
    rdms: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    groups: Sequence[int] | None = None,
    group_names: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "viridis",
    percentile: float = 99.0,
) -> Figure:
    """The figure of :func:`rdm_image` (its artists are what the tests read back)."""
    count = len(rdms)
    side, gap, left, bar = RDM_PANEL_INCHES, 0.12, 0.15, 0.62  # inches
    boundaries: list[int] = []
    blocks: list[tuple[float, str]] = []
    n = len(groups) if groups is not None else 0  # samples: a pooled picture has fewer pixels a side
    if groups is not None and len(groups) > 1:
        labels = list(groups)
        boundaries = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
        starts = [0, *boundaries]
        ends = [*boundaries, len(labels)]
        if len(starts) <= 12:  # block names where they fit beside the first RDM
            for start, end in zip(starts, ends, strict=True):
                k = labels[start]
                name = group_names[k] if group_names is not None and 0 <= k < len(group_names) else str(k)
                blocks.append(((start + end) / 2, name if len(name) <= 10 else name[:9] + "…"))
    if blocks:
        left += 0.07 * max(len(name) for _, name in blocks) + 0.1
    top = 0.3 + (0.22 if title else 0.0)
    width, height = left + count * (side + gap) + bar, top + side + 0.1
    figure = Figure(figsize=(width, height), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    image = None
    for index, (matrix, name) in enumerate(zip(rdms, names, strict=True)):
        values = np.asarray(matrix, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = float(np.percentile(np.abs(finite), percentile)) if finite.size else 0.0
        shown = values / scale if scale > 0 else np.zeros_like(values)
        axes = figure.add_axes(
            ((left + index * (side + gap)) / width, 0.1 / height, side / width, side / height), label=f"rdm {name}"
        )
        image = axes.imshow(np.ma.masked_invalid(shown), cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
        pixels = values.shape[0]
        for boundary in boundaries:  # between two classes, in the (possibly pooled) picture's pixels
            at = boundary * pixels / n - 0.5
            axes.axhline(at, color="white", linewidth=0.8, gid="class boundary")
            axes.axvline(at, color="white", linewidth=0.8, gid="class boundary")
        axes.set_xlim(-0.5, pixels - 0.5)
        axes.set_ylim(pixels - 0.5, -0.5)
        axes.set_xticks([])
        if index == 0 and blocks:
            axes.set_yticks(
                [centre * pixels / n - 0.5 for centre, _ in blocks], [name for _, name in blocks], fontsize=8
            )
            axes.tick_params(axis="y", length=0, pad=2)
        else:
            axes.set_yticks([])
        axes.set_title(f"{name}\n1 = {scale:.3g}", fontsize=8, pad=2)
    if image is not None:
        colour_axes = figure.add_axes(
            ((left + count * (side + gap)) / width, 0.1 / height, 0.1 / width, side / height), label="colour bar"
        )
        colour_bar = figure.colorbar(image, cax=colour_axes, ticks=[0.0, 0.5, 1.0])
        colour_bar.ax.tick_params(labelsize=8)
    if title:
        figure.text(0.5, 1 - 0.04 / height, title, ha="center", va="top", fontsize=9, weight="bold")
    return figure


def rdm_image(
    rdms: Sequence[Tensor | np.ndarray],
    names: Sequence[str],
    *,
    groups: Sequence[int] | None = None,
    group_names: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "viridis",
) -> np.ndarray:
    """Representational dissimilarity matrices side by side, with a colour bar and class boundaries; returns uint8
    (H, W, 3).

    Each RDM is divided by its own 99th percentile (so one far pair cannot wash out the rest; the panel's title
    gives the value of 1, in the RDM's own units) and drawn on the one colour bar from 0 to 1; NaN entries are grey.
    ``groups`` gives each sample's class in the RDMs' order (sorted by class): white lines mark where the class
    changes, and the first RDM names the class blocks (from ``group_names``, else the indices) when there are at most
    12. RDMs smaller than ``len(groups)`` (average-pooled pictures) get the boundaries at their scaled positions.

    Example:
        >>> rdm = torch.rand(6, 6)
        >>> rdm_image([rdm, rdm], ["conv", "fc"], groups=[0, 0, 1, 1, 2, 2], group_names=["a", "b", "c"]).dtype
        dtype('uint8')
    """
    arrays = [r.detach().double().cpu().numpy() if isinstance(r, Tensor) else np.asarray(r, float) for r in rdms]
    figure = _rdm_figure(arrays, names, groups=groups, group_names=group_names, title=title, cmap=cmap)
    return figure_to_array(figure, figure.canvas)


def line_image(
    x_labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    reference: float | None = None,
    reference_label: str = "chance",
) -> np.ndarray:
    """Lines over categorical x positions (e.g. accuracy by depth); returns uint8 (H, W, 3).

    ``reference`` draws a dashed horizontal line (e.g. chance level), named ``reference_label`` in the legend.

    Example:
        >>> line_image(["conv1", "fc"], {"held-out": [0.5, 0.9]}, ylim=(0, 1)).ndim
        3
    """
    figure = Figure(figsize=(max(4.0, 0.9 * len(x_labels) + 1.5), 3.2), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = np.arange(len(x_labels))
    for name, values in series.items():
        axes.plot(positions, list(values), marker="o", label=name)
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
    axes.set_xticks(positions, list(x_labels), rotation=30, ha="right", fontsize=8)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure_to_array(figure, canvas)


TOKEN_FONT_POINTS = 10  # the token text; at 100 dpi its capitals are about 10 pixels high
_TOKEN_CHAR = TOKEN_FONT_POINTS * 100 / 72 * 0.6021  # DejaVu Sans Mono advances 0.6021 em a character
_TOKEN_LINE = 24  # pixels from one line of tokens to the next
_TOKEN_PAD = 3  # pixels of background on each side of a token
_TOKEN_GAP = 5  # pixels between two tokens
MAX_TOKEN_CHARS = 18  # longer tokens are shortened with an ellipsis


def _shown_token(text: str) -> str:
    text = text.replace("\n", "⏎").replace("\t", " ").replace("$", "\\$")  # no mathtext from a "$" token
    return text if len(text) <= MAX_TOKEN_CHARS else text[: MAX_TOKEN_CHARS - 1] + "…"


def _token_figure(
    tokens: Sequence[Sequence[str | None]],
    values: Sequence[Sequence[np.ndarray]],
    *,
    headers: Sequence[str],
    line_titles: Sequence[str],
    title: str = "",
    signed: Sequence[bool] | bool = False,
    floors: Sequence[float] | None = None,
    width: int = 900,
) -> Figure:
    """The figure of :func:`render_tokens` (its text artists are what a layout test measures)."""
    signs = [signed] * len(line_titles) if isinstance(signed, bool) else list(signed)
    title_chars = max((len(text) for text in line_titles), default=0)
    left = 8 + (title_chars * _TOKEN_CHAR + 12 if title_chars else 0)
    right_edge = width - 8
    items: list[tuple[float, float, str, dict]] = []  # (x, y of the line's middle, text, style)
    boxes: list[tuple[float, float, float, tuple]] = []  # (x, y, box width, colour)
    y = 8.0
    if title:
        items.append((8, y + 9, title, {"weight": "bold", "fontsize": TOKEN_FONT_POINTS + 1}))
        y += _TOKEN_LINE + 4
    for sample, (row, header) in enumerate(zip(tokens, headers, strict=True)):
        if sample:
            y += 10  # a gap between samples
        items.append((8, y + _TOKEN_LINE / 2, header, {"weight": "bold"}))
        y += _TOKEN_LINE
        for line, line_title, sign in zip(values[sample], line_titles, signs, strict=True):
            cmap = matplotlib.colormaps["RdBu_r" if sign else "Oranges"]
            visible = [i for i, text in enumerate(row) if text is not None]
            shown = np.zeros(len(row))
            if visible:
                raw = torch.as_tensor(np.asarray(line, dtype=np.float64)[visible])[None]
                floor = None if floors is None else [floors[sample]]
                shown[visible] = normalize_map(raw, signed=sign, floor=floor)[0]
            if line_title:
                items.append((8, y + _TOKEN_LINE / 2, line_title, {"color": "#555555"}))
            x = left
            for i in visible:
                text = _shown_token(str(row[i]))
                box = len(text) * _TOKEN_CHAR + 2 * _TOKEN_PAD
                if x + box > right_edge and x > left:  # wrap
                    x, y = left, y + _TOKEN_LINE
                level = (shown[i] + 1) / 2 if sign else 0.08 + 0.92 * shown[i]
                colour = cmap(float(level))
                boxes.append((x, y + 2, box, colour))
                luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
                items.append(
                    (x + _TOKEN_PAD, y + _TOKEN_LINE / 2, text, {"color": "white" if luminance < 0.5 else "black"})
                )
                x += box + _TOKEN_GAP
            y += _TOKEN_LINE
    height = int(y + 8)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    for x, top, box, colour in boxes:
        axes.add_patch(matplotlib.patches.Rectangle((x, top), box, _TOKEN_LINE - 4, facecolor=colour, edgecolor="none"))
    for x, middle, text, style in items:
        style = {"fontsize": TOKEN_FONT_POINTS, **style}
        axes.text(x, middle, text, ha="left", va="center_baseline", family="DejaVu Sans Mono", **style)
    return figure


def render_tokens(
    tokens: Sequence[Sequence[str | None]],
    values: Sequence[Sequence[np.ndarray]],
    *,
    headers: Sequence[str],
    line_titles: Sequence[str] = ("",),
    title: str = "",
    signed: Sequence[bool] | bool = False,
    floors: Sequence[float] | None = None,
    width: int = 900,
) -> np.ndarray:
    """Token sequences with a coloured background per token: one block per sample; returns uint8 (H, W, 3).

    Each sample gets a bold header line (e.g. label, prediction, confidence)
    and then one line of its tokens per map (``line_titles`` name them, e.g.
    "rollout"), wrapped at ``width`` pixels. Each line's values are scaled by
    their own robust maximum (as :func:`normalize_map` does): white is none,
    dark orange the most (``signed``: blue negative, red positive). Tokens
    given as None (padding) are left out; tokens longer than 18 characters are
    shortened.

    Args:
        tokens: per sample, its token strings (None hides a token).
        values: per sample, one array of per-token values for each line title.
        headers: per sample, its header line.
        line_titles: the name of each line of values (shown at the left).
        title: a bold title above everything.
        signed: per line (or for all), values with meaningful sign (a diverging colormap).
        floors: per sample, the smallest scale of its lines (see :func:`normalize_map`).
        width: image width in pixels.

    Example:
        >>> image = render_tokens([["the", "cat", None]], [[np.array([0.1, 0.9, 0.0])]], headers=["#0 pred 1 90%"])
        >>> image.dtype, image.shape[1]
        (dtype('uint8'), 900)
    """
    figure = _token_figure(
        tokens,
        values,
        headers=headers,
        line_titles=line_titles,
        title=title,
        signed=signed,
        floors=floors,
        width=width,
    )
    return figure_to_array(figure, figure.canvas)


FEATURE_CELL_PIXELS = 26  # width and height of one feature's cell in the tabular pictures
MAX_FEATURES_SHOWN = 64  # features drawn per row (the scores use all of them)


def _feature_figure(
    inputs: np.ndarray,
    values: Sequence[Sequence[np.ndarray]],
    *,
    headers: Sequence[str],
    line_titles: Sequence[str],
    feature_names: Sequence[str] | None = None,
    title: str = "",
    signed: Sequence[bool] | bool = False,
    cmap: str = "inferno",
    floors: Sequence[float] | None = None,
) -> Figure:
    """The figure of :func:`render_feature_rows` (its text artists are what a layout test measures)."""
    count, features = inputs.shape
    shown = min(features, MAX_FEATURES_SHOWN)
    names = [str(n) for n in (feature_names if feature_names is not None else range(features))][:shown]
    names = [name if len(name) <= 14 else name[:13] + "…" for name in names]
    signs = [signed] * len(line_titles) if isinstance(signed, bool) else list(signed)
    cell, char = FEATURE_CELL_PIXELS, 8 * 100 / 72 * 0.6021  # 8 pt monospace
    title_chars = max([len(text) for text in line_titles] + [len("input")])
    left = 10 + title_chars * char + 10
    name_height = max(len(name) for name in names) * char + 10  # the names stand upright above the columns
    # the colour legend: one line per colour scale in use, a gradient and what its ends mean
    legend = [("Greys", "input: low → high (around the sample's mean)")]
    if not all(signs):
        legend.append((cmap, "map: 0 → the row's robust max"))
    if any(signs):
        legend.append(("RdBu_r", "signed map: − ← 0 → + (the row's robust max)"))
    legend_width = 10 + 64 + 8 + max(len(text) for _, text in legend) * 7.2 + 10
    width = int(max(left + shown * cell + 12, legend_width))
    legend_top = 8 + (24 if title else 0)
    top = legend_top + 18 * len(legend) + 6 + name_height
    block = 22 + (1 + len(line_titles)) * cell + 10  # header, the input row and one row per map, a gap
    height = int(top + count * block + 4)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    if title:
        axes.text(10, 18, title, ha="left", va="center", fontsize=11, weight="bold")
    ramp = np.linspace(0.0, 1.0, 64)[None]
    for line, (colours, text) in enumerate(legend):
        y = legend_top + 18 * line
        axes.imshow(ramp, cmap=colours, vmin=0, vmax=1, extent=(10, 74, y + 14, y + 2), aspect="auto", gid="legend")
        axes.add_patch(
            matplotlib.patches.Rectangle(
                (10, y + 2), 64, 12, fill=False, edgecolor="#888888", linewidth=0.6, gid="legend"
            )
        )
        axes.text(82, y + 8, text, ha="left", va="center", fontsize=8, color="#333333", gid="legend")
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    for j, name in enumerate(names):
        axes.text(left + j * cell + cell / 2, top - 6, name, rotation=90, ha="center", va="bottom", fontsize=8,
                  family="DejaVu Sans Mono")  # fmt: skip
    grey = matplotlib.colormaps["Greys"]
    for i in range(count):
        y = top + i * block
        axes.text(10, y + 10, headers[i], ha="left", va="center", fontsize=9, weight="bold", family="DejaVu Sans Mono")
        row = inputs[i, :shown].astype(np.float64)
        spread = np.nanmax(np.abs(row - np.nanmean(row))) or 1.0
        lines = [("input", 0.5 + 0.5 * (row - np.nanmean(row)) / spread, grey, False)]
        for line_title, line, sign in zip(line_titles, values[i], signs, strict=True):
            raw = torch.as_tensor(np.asarray(line, dtype=np.float64)[:shown])[None]
            scaled = normalize_map(raw, signed=sign, floor=None if floors is None else [floors[i]])[0]
            lines.append((line_title, scaled, matplotlib.colormaps["RdBu_r" if sign else cmap], sign))
        for r, (line_title, scaled, colours, sign) in enumerate(lines):
            top_of_row = y + 22 + r * cell
            axes.text(10, top_of_row + cell / 2, line_title, ha="left", va="center", fontsize=8, color="#444444",
                      family="DejaVu Sans Mono")  # fmt: skip
            for j in range(shown):
                level = (scaled[j] + 1) / 2 if sign else scaled[j]
                axes.add_patch(
                    matplotlib.patches.Rectangle(
                        (left + j * cell + 1, top_of_row + 1), cell - 2, cell - 2, facecolor=colours(float(level))
                    )
                )
    return figure


def render_feature_rows(
    inputs: Tensor | np.ndarray,
    values: Sequence[Sequence[np.ndarray]],
    *,
    headers: Sequence[str],
    line_titles: Sequence[str],
    feature_names: Sequence[str] | None = None,
    title: str = "",
    signed: Sequence[bool] | bool = False,
    cmap: str = "inferno",
    floors: Sequence[float] | None = None,
) -> np.ndarray:
    """Feature vectors (N, F) and their maps as heat rows of labelled cells; returns uint8 (H, W, 3).

    Each sample gets a bold header line, a grey row of its input values
    (centred on the sample's mean: dark is high) and one row per map, each
    cell 26 pixels wide, under the feature names (written upright once at the
    top, at most 14 characters). Each map row is scaled by its own robust
    maximum (``signed`` rows: blue negative, red positive). At most 64 features
    are drawn.

    Args:
        inputs: (N, F) feature values.
        values: per sample, one (F,) array per line title.
        headers: per sample, its header line.
        line_titles: the name of each map row.
        feature_names: the F feature names (default: their indices).
        title: a bold title above everything.
        signed: per map row (or for all), whether its values have meaningful sign.
        cmap: colormap of the unsigned rows.
        floors: per sample, the smallest scale of its map rows (see :func:`normalize_map`).

    Example:
        >>> values = [[np.arange(5.0)]] * 2  # per sample, one map row
        >>> image = render_feature_rows(np.ones((2, 5)), values, headers=["#0", "#1"], line_titles=["gradient"])
        >>> image.dtype, image.shape[1] > 5 * 26
        (dtype('uint8'), True)
    """
    values_in = inputs.detach().float().cpu().numpy() if isinstance(inputs, Tensor) else np.asarray(inputs, float)
    figure = _feature_figure(
        values_in,
        values,
        headers=headers,
        line_titles=line_titles,
        feature_names=feature_names,
        title=title,
        signed=signed,
        cmap=cmap,
        floors=floors,
    )
    return figure_to_array(figure, figure.canvas)


def is_signal_input(inputs: Tensor) -> bool:
    """Whether (N, C, T) inputs read as signals (a few channels over a long axis) rather than one-channel images.

    Example:
        >>> is_signal_input(torch.zeros(2, 3, 200)), is_signal_input(torch.zeros(2, 28, 28))
        (True, False)
    """
    return inputs.ndim == 3 and inputs.shape[1] <= 16 and inputs.shape[2] >= 2 * inputs.shape[1]


def render_signals(
    inputs: Tensor,
    maps: Sequence[Tensor],
    *,
    column_titles: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
    signed: Sequence[bool] | bool = False,
    cmap: str = "inferno",
    floors: Sequence[float] | None = None,
) -> np.ndarray:
    """Signals (N, C, T) as line plots with each map as a coloured band under the lines; returns uint8 (H, W, 3).

    One row per sample (its label at the left), one panel per map: the
    signal's channels (at most three drawn, each min-max scaled) above a band
    coloured by the map along the time axis (maps of another length are
    resized; (N, C, T) maps are summed over channels). Panels are 300 x 110
    pixels. ``floors``: per sample, the smallest scale of its bands (see
    :func:`normalize_map`).

    Example:
        >>> image = render_signals(torch.randn(2, 2, 100), [torch.rand(2, 100)], column_titles=["gradient"],
        ...                        row_labels=["#0", "#1"])
        >>> image.dtype, image.shape[1] >= 300
        (dtype('uint8'), True)
    """
    figure = _signal_figure(
        inputs,
        maps,
        column_titles=column_titles,
        row_labels=row_labels,
        title=title,
        signed=signed,
        cmap=cmap,
        floors=floors,
    )
    return figure_to_array(figure, figure.canvas)


def _signal_figure(
    inputs: Tensor,
    maps: Sequence[Tensor],
    *,
    column_titles: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
    signed: Sequence[bool] | bool = False,
    cmap: str = "inferno",
    floors: Sequence[float] | None = None,
) -> Figure:
    """The figure of :func:`render_signals`."""
    x = inputs.detach().float().cpu()
    count, channels, length = x.shape
    signs = [signed] * len(maps) if isinstance(signed, bool) else list(signed)
    label_chars = max((len(line) for text in row_labels for line in text.splitlines()), default=0)
    left = 12 + label_chars * 8 * 100 / 72 * 0.6021 + 8
    panel_w, panel_h, gap = 300, 110, 10
    top = (30 if title else 8) + 20
    width = int(left + len(maps) * (panel_w + gap) + 6)
    height = int(top + count * (panel_h + gap) + 4)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    low = x.amin(dim=2, keepdim=True)
    scaled = (x - low) / (x.amax(dim=2, keepdim=True) - low).clamp_min(1e-12)
    time = np.arange(length)
    bands = []
    for m, sign in zip(maps, signs, strict=True):
        band = m.detach().float().cpu()
        band = band.sum(dim=1) if band.ndim == 3 else band
        if band.shape[-1] != length:
            band = torch.nn.functional.interpolate(band[:, None], size=length, mode="linear", align_corners=False)[:, 0]
        bands.append(normalize_map(band, signed=sign, floor=floors))
    for c, text in enumerate(column_titles):
        figure.text((left + c * (panel_w + gap) + panel_w / 2) / width, 1 - (top - 6) / height, text, ha="center",
                    va="bottom", fontsize=9)  # fmt: skip
    if title:
        figure.text(0.5, 1 - 6 / height, title, ha="center", va="top", fontsize=11, weight="bold")
    for i in range(count):
        y = top + i * (panel_h + gap)
        figure.text(12 / width, 1 - (y + panel_h / 2) / height, row_labels[i], ha="left", va="center", fontsize=8,
                    family="DejaVu Sans Mono")  # fmt: skip
        for c, (band, sign) in enumerate(zip(bands, signs, strict=True)):
            x0 = left + c * (panel_w + gap)
            lines = figure.add_axes(
                (x0 / width, 1 - (y + panel_h * 0.72) / height, panel_w / width, panel_h * 0.72 / height)
            )
            for channel in range(min(channels, 3)):
                lines.plot(time, scaled[i, channel].numpy(), linewidth=1.0, color=f"C{channel}")
            lines.set_xlim(0, length - 1)
            lines.set_ylim(-0.05, 1.05)
            lines.set_xticks([])
            lines.set_yticks([])
            strip = figure.add_axes((x0 / width, 1 - (y + panel_h) / height, panel_w / width, panel_h * 0.24 / height))
            colours = "RdBu_r" if sign else cmap
            strip.imshow(band[i][None], aspect="auto", cmap=colours, vmin=-1 if sign else 0, vmax=1,
                         interpolation="nearest")  # fmt: skip
            strip.set_xticks([])
            strip.set_yticks([])
    return figure
