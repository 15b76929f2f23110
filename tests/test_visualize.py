"""Heatmap normalisation, input display and grid rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_interp.visualize import colorize, input_to_rgb, map_tiles, normalize_map, overlay, render_grid


def test_normalize_map_unsigned_range_and_peak():
    torch.manual_seed(0)
    maps = torch.rand(3, 20, 20) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    out = normalize_map(maps, percentile=100)
    assert isinstance(out, np.ndarray) and out.shape == (3, 20, 20) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.reshape(3, -1).max(axis=1), 1.0, rtol=1e-6)
    # each map is divided by its own maximum: the pattern is kept, the scale is not
    np.testing.assert_allclose(out, (maps / maps.amax(dim=(1, 2), keepdim=True)).numpy(), rtol=1e-5, atol=1e-7)


def test_normalize_map_unsigned_clips_negative_values_to_zero():
    maps = torch.tensor([[[-2.0, 1.0], [0.5, -0.1]]])
    out = normalize_map(maps, percentile=100)
    np.testing.assert_allclose(out, [[[0.0, 0.5], [0.25, 0.0]]])


def test_normalize_map_signed_keeps_sign_in_minus_one_to_one():
    torch.manual_seed(1)
    maps = torch.randn(2, 16, 16)
    out = normalize_map(maps, signed=True, percentile=100)
    assert out.min() >= -1 and out.max() <= 1
    assert (np.sign(out) == np.sign(maps.numpy())).all()
    scale = maps.abs().amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(out, (maps / scale).numpy(), rtol=1e-5, atol=1e-7)


def test_normalize_map_is_robust_to_one_outlier_pixel():
    torch.manual_seed(2)
    clean = torch.rand(1, 32, 32)
    spiked = clean.clone()
    spiked[0, 5, 7] = 1e6
    out = normalize_map(spiked)
    assert out[0, 5, 7] == 1.0  # the outlier is clipped
    rest = np.delete(out.reshape(-1), 5 * 32 + 7)
    # the other pixels keep their contrast instead of collapsing to ~1e-6
    assert rest.max() > 0.95
    assert np.corrcoef(rest, np.delete(clean.numpy().reshape(-1), 5 * 32 + 7))[0, 1] > 0.999


def test_normalize_map_non_finite_values_become_zero_and_zero_map_stays_zero():
    maps = torch.tensor([[[float("nan"), 2.0], [float("inf"), -float("inf")]], [[0.0, 0.0], [0.0, 0.0]]])
    out = normalize_map(maps, percentile=100)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, [[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])


def test_normalize_map_accepts_other_dtypes_and_leaves_input_alone():
    maps = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64, requires_grad=True)
    out = normalize_map(maps, percentile=100)
    np.testing.assert_allclose(out, [[[1 / 3, 1.0]]], rtol=1e-6)
    assert maps.tolist() == [[[1.0, 3.0]]]


def test_input_to_rgb_single_channel_is_grey_and_min_max_scaled():
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]]])  # (1, 1, 2, 2)
    out = input_to_rgb(x)
    assert out.shape == (1, 2, 2, 3)
    expected = np.array([[0.0, 0.25], [0.5, 1.0]])
    for channel in range(3):
        np.testing.assert_allclose(out[0, :, :, channel], expected)


def test_input_to_rgb_three_channels_keep_colours_per_sample_scaling():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 5)
    x[1] *= 100
    out = input_to_rgb(x)
    assert out.shape == (2, 4, 5, 3) and out.min() >= 0 and out.max() <= 1
    for i in range(2):
        sample = x[i].permute(1, 2, 0).numpy()
        expected = (sample - sample.min()) / (sample.max() - sample.min())
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)


def test_input_to_rgb_more_than_three_channels_and_two_channels():
    x = torch.rand(1, 5, 3, 3)
    assert input_to_rgb(x).shape == (1, 3, 3, 3)
    assert input_to_rgb(torch.rand(1, 2, 3, 3)).shape == (1, 3, 3, 3)


def test_input_to_rgb_feature_vectors_become_one_row_strips():
    x = torch.tensor([[0.0, 1.0, 2.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    out = input_to_rgb(x)
    assert out.shape == (2, 1, 4, 3)
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.25, 0.5, 1.0])
    assert np.isfinite(out).all() and (out[1] == 0).all()  # a constant sample does not divide by zero


def test_input_to_rgb_three_dim_inputs_are_single_channel_images():
    assert input_to_rgb(torch.rand(2, 4, 6)).shape == (2, 4, 6, 3)


def _grid(rows: int, cols: int, size: int = 8, **kwargs) -> np.ndarray:
    tile = np.full((size, size, 3), 0.5)
    return render_grid([[tile] * cols for _ in range(rows)], **kwargs)


def test_render_grid_returns_uint8_rgb_that_grows_with_rows_and_columns():
    base = _grid(1, 1)
    assert base.dtype == np.uint8 and base.ndim == 3 and base.shape[2] == 3
    wider, taller = _grid(1, 3), _grid(3, 1)
    assert wider.shape[1] > base.shape[1] and wider.shape[0] == base.shape[0]
    assert taller.shape[0] > base.shape[0] and taller.shape[1] == base.shape[1]
    # each extra tile adds the same width (tile + gap)
    assert _grid(1, 5).shape[1] - _grid(1, 4).shape[1] == _grid(1, 4).shape[1] - _grid(1, 3).shape[1]


def test_render_grid_enlarges_small_tiles_and_shows_their_content():
    tile = np.zeros((8, 8, 3))
    tile[..., 0] = 1.0  # pure red
    grid = render_grid([[tile]])
    assert min(grid.shape[:2]) >= 96
    red = (grid[..., 0] > 200) & (grid[..., 1] < 50) & (grid[..., 2] < 50)
    assert red.sum() >= 0.9 * 96 * 96


def test_render_grid_titles_and_labels_add_margins():
    plain = _grid(2, 2)
    titled = _grid(2, 2, column_titles=["input", "map"], title="epoch 3")
    labelled = _grid(2, 2, row_labels=["y=1 p=0.9", "y=0 p=0.2"])
    assert titled.shape[0] > plain.shape[0] and titled.shape[1] == plain.shape[1]
    assert labelled.shape[1] > plain.shape[1] and labelled.shape[0] == plain.shape[0]
    assert titled.std() > 0 and labelled.std() > 0


def test_render_grid_long_feature_strips_are_not_enlarged_by_width():
    strip = np.zeros((1, 600, 3))
    grid = render_grid([[strip]])
    assert grid.shape[1] < 1000


def test_colorize_and_overlay_ranges():
    values = np.linspace(-1, 1, 11).reshape(1, 11)
    signed = colorize(values, "coolwarm", signed=True)
    assert signed.shape == (1, 11, 3) and signed.min() >= 0 and signed.max() <= 1
    assert not np.allclose(signed[0, 0], signed[0, -1])
    blended = overlay(np.ones((1, 11, 3)), signed, values)
    assert blended.shape == (1, 11, 3) and blended.min() >= 0 and blended.max() <= 1


@pytest.mark.parametrize("map_size", [(8, 8), (4, 4)])
def test_map_tiles_one_tile_per_sample_at_input_size(map_size):
    tiles = map_tiles(torch.rand(3, 3, 8, 8), torch.rand(3, *map_size))
    assert len(tiles) == 3
    assert all(tile.shape == (8, 8, 3) and tile.min() >= 0 and tile.max() <= 1 for tile in tiles)


def test_map_tiles_for_feature_vectors():
    tiles = map_tiles(torch.rand(2, 10), torch.rand(2, 10), signed=True)
    assert [tile.shape for tile in tiles] == [(1, 10, 3), (1, 10, 3)]


def test_a_title_wider_than_the_grid_is_wrapped_not_cut_off():
    tiles = [[np.random.default_rng(0).random((32, 32, 3))] * 2]
    title = "a long title that is much wider than the two small tiles below it, epoch 12"
    grid = render_grid(tiles, column_titles=["a", "b"], title=title)
    one_line = render_grid(tiles, column_titles=["a", "b"], title="short")
    assert grid.shape[1] == one_line.shape[1] and grid.shape[0] > one_line.shape[0], "taller, not wider"
    band = grid[:40].astype(int)  # the title lines
    assert (band[:, :3] > 200).all() and (band[:, -3:] > 200).all(), "no text touches the left or right edge"
    assert (band < 100).any(), "the title is drawn"


def test_grids_keep_their_width_while_a_label_grows_by_a_character():
    tiles = [[np.zeros((8, 8, 3))] * 2] * 2
    short = render_grid(tiles, column_titles=["input", "map"], row_labels=["pred 3 97%", "pred 1 88%"])
    longer = render_grid(tiles, column_titles=["input", "map"], row_labels=["pred 3 100%", "pred 1 88%"])
    assert short.shape == longer.shape
    # a label column asked to be wider is: the width follows min_label_chars
    wide = render_grid(tiles, column_titles=["input", "map"], row_labels=["pred 3 97%", "x"], min_label_chars=30)
    assert wide.shape[1] > short.shape[1] and wide.shape[0] == short.shape[0]


def test_a_floor_keeps_maps_that_are_small_in_absolute_terms_faint():
    uniform = torch.full((1, 4), 0.25)  # attention spread evenly over four tokens
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    assert normalize_map(uniform).tolist() == [[1.0] * 4]  # on its own maximum it would look maximal
    assert np.allclose(normalize_map(uniform, floor=[0.5]), 0.5)  # twice the uniform share: half strength
    assert float(normalize_map(peaked, floor=[0.5])[0, 0]) == 1.0  # a real peak still reaches full colour


# ---------------------------------------------------------------- figures that explain themselves (issue 31)


def test_rdm_figure_has_a_colour_bar_and_white_lines_at_each_class_change():
    from matplotlib.image import AxesImage

    from lightning_interp.visualize.maps import _rdm_figure

    groups = [0, 0, 0, 1, 1, 2, 2, 2]  # class changes before samples 3 and 5
    full = np.random.default_rng(0).random((8, 8))
    pooled = np.random.default_rng(1).random((4, 4))  # an average-pooled picture: half the samples' resolution
    figure = _rdm_figure([full, pooled], ["conv", "fc"], groups=groups, group_names=["cat", "dog", "owl"])
    labels = [axes.get_label() for axes in figure.axes]
    assert "colour bar" in labels
    bar = figure.axes[labels.index("colour bar")]
    assert bar.get_ylim() == pytest.approx((0.0, 1.0))
    for name, expected in (("conv", [2.5, 4.5]), ("fc", [1.0, 2.0])):  # pixel edges: 3 * 4 / 8 - 0.5, 5 * 4 / 8 - 0.5
        axes = figure.axes[labels.index(f"rdm {name}")]
        lines = [line for line in axes.get_lines() if line.get_gid() == "class boundary"]
        rows = sorted(line.get_ydata()[0] for line in lines if line.get_ydata()[0] == line.get_ydata()[1])
        columns = sorted(line.get_xdata()[0] for line in lines if line.get_xdata()[0] == line.get_xdata()[1])
        assert rows == pytest.approx(expected) and columns == pytest.approx(expected)
        assert [image for image in axes.get_children() if isinstance(image, AxesImage)]
    first = figure.axes[labels.index("rdm conv")]
    assert [tick.get_text() for tick in first.get_yticklabels()] == ["cat", "dog", "owl"]
    # each RDM over its own 99th percentile: the title says what 1 is
    assert figure.axes[labels.index("rdm conv")].get_title().endswith(f"1 = {np.percentile(full, 99):.3g}")

    # every picture pooled (the callback's RDMs of more than 128 samples): the lines scale, the picture fills its axes
    only_pooled = _rdm_figure([pooled], ["fc"], groups=groups)
    axes = only_pooled.axes[0]
    lines = [line for line in axes.get_lines() if line.get_gid() == "class boundary"]
    assert sorted({line.get_ydata()[0] for line in lines if line.get_ydata()[0] == line.get_ydata()[1]}) == [1.0, 2.0]
    assert axes.get_xlim() == pytest.approx((-0.5, 3.5)) and axes.get_ylim() == pytest.approx((3.5, -0.5))

    no_classes = _rdm_figure([full], ["conv"])
    assert not [line for axes in no_classes.axes for line in axes.get_lines() if line.get_gid() == "class boundary"]


def test_tabular_rows_have_a_colour_legend_for_each_colour_scale_in_use():
    from lightning_interp.visualize.maps import _feature_figure

    def legend_texts(signed):
        values = [[np.arange(5.0), -np.arange(5.0)]]
        figure = _feature_figure(np.ones((1, 5)), values, headers=["#0"], line_titles=["a", "b"], signed=signed)
        return [text.get_text() for axes in figure.axes for text in axes.texts if text.get_gid() == "legend"]

    both = legend_texts([True, False])
    assert len(both) == 3 and both[0].startswith("input") and both[1].startswith("map") and "−" in both[2]
    assert [text.split(":")[0] for text in legend_texts(False)] == ["input", "map"]
    assert [text.split(":")[0] for text in legend_texts(True)] == ["input", "signed map"]


def test_matrix_numbers_are_readable_at_card_size_or_left_out():
    from lightning_interp.visualize.maps import MIN_CARD_TEXT_PIXELS, _matrix_figure, card_scale

    small = np.arange(16.0).reshape(4, 4) / 16
    figure = _matrix_figure(small, ["net.0", "net.3", "net.6", "net.10"])
    numbers = [text for text in figure.axes[0].texts if text.get_gid() == "cell value"]
    assert sorted(text.get_text() for text in numbers) == sorted(f"{v:.2f}" for v in small.ravel())
    width, height = figure.get_size_inches() * figure.dpi
    shown = numbers[0].get_fontsize() * figure.dpi / 72 * card_scale(width, height)  # px in a Time Series card
    assert shown >= MIN_CARD_TEXT_PIXELS
    large = _matrix_figure(np.zeros((12, 12)), [f"layer{i}" for i in range(12)])
    assert not [text for text in large.axes[0].texts if text.get_gid() == "cell value"]


def test_tcav_figure_names_classes_from_class_names():
    from lightning_interp.visualize.charts import _tcav_figure

    random = (np.full(2, 0.5), np.full(2, 0.1))
    panel = ("net.4", {"stripes": (np.array([0.9, 0.2]), np.full(2, 0.05), np.array([0.001, 0.3]))}, random)
    named = _tcav_figure([panel], ["stripes"], [0, 2], class_names=["disc", "square", "cross"])
    assert [tick.get_text() for tick in named.axes[0].get_xticklabels()] == ["disc", "cross"]
    legend = [text.get_text() for text in named.legends[0].get_texts()]
    assert legend == ["stripes", "random vs random"]
    plain = _tcav_figure([panel], ["stripes"], [0, 2])
    assert [tick.get_text() for tick in plain.axes[0].get_xticklabels()] == ["0", "2"]


def test_the_quality_table_shades_no_ranking_for_values_equal_as_shown():
    """Deletion AUCs of 0.3700000 and 0.3700002 print alike: colouring them best and worst would rank rounding
    noise; a real difference is still coloured."""
    from lightning_interp.visualize.charts import _shade

    table = {"a": {"deletion_auc": 0.37}, "b": {"deletion_auc": 0.3700002}, "c": {"insertion_auc": 0.5}}
    assert _shade(table, "a", "deletion_auc", False) == _shade(table, "b", "deletion_auc", False) == "#f2f2f2"
    table["b"]["deletion_auc"] = 0.2
    assert _shade(table, "a", "deletion_auc", False) != _shade(table, "b", "deletion_auc", False)


def test_column_titles_fit_their_tiles():
    """Capitals are wider than lower-case letters: "KernelSHAP" and "SmoothGrad" are split where their case changes
    rather than drawn over their neighbours; a long layer name keeps its end."""
    from lightning_interp.visualize.maps import _title_lines, _title_width

    for title in ("KernelSHAP", "SmoothGrad", "Smooth Grad-CAM++", "DeepLIFT", "encoder.layers.encoder_layer_11.ln_1"):
        lines = _title_lines(title, 10, True)
        assert all(_title_width(line) <= 10 for line in lines), lines
        assert len(lines) <= 3
    assert _title_lines("KernelSHAP", 10, True) == ["Kernel", "SHAP"]
    assert _title_lines("encoder.layers.encoder_layer_11.ln_1", 10, True)[-1] == "ln_1"
