"""Pictures: maps over inputs (heatmaps, overlays, annotated grids, text, feature rows and signals) in
:mod:`~lightning_interp.visualize.maps`, and the callbacks' charts in :mod:`~lightning_interp.visualize.charts`. Every
function returns numpy arrays (uint8 RGB for finished images), so any logger can take them."""

from lightning_interp.visualize.charts import (
    TCAVPanel,
    class_counts_image,
    class_lift_image,
    comparison_image,
    confusion_image,
    reliability_image,
    tcav_bar_image,
)
from lightning_interp.visualize.maps import (
    colorize,
    figure_to_array,
    input_to_rgb,
    is_signal_input,
    line_image,
    map_tiles,
    matrix_image,
    normalize_map,
    outline_region,
    overlay,
    rdm_image,
    render_feature_rows,
    render_grid,
    render_signals,
    render_tokens,
)

__all__ = [
    "TCAVPanel",
    "class_counts_image",
    "class_lift_image",
    "colorize",
    "comparison_image",
    "confusion_image",
    "figure_to_array",
    "input_to_rgb",
    "is_signal_input",
    "line_image",
    "map_tiles",
    "matrix_image",
    "normalize_map",
    "outline_region",
    "overlay",
    "rdm_image",
    "reliability_image",
    "render_feature_rows",
    "render_grid",
    "render_signals",
    "render_tokens",
    "tcav_bar_image",
]
