"""Tabular (N, F) and signal (N, C, T) inputs: pictures of a readable size whose labels do not overlap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import DataDescription, SaliencyCallback
from lightning_interp.demo import ImageClassifier
from lightning_interp.visualize.maps import _feature_figure, _signal_figure
from tests.conftest import quiet_trainer, read_events

FEATURES = [f"feature_{name}" for name in ("age", "income", "height", "weight", "score")] + [f"f{i}" for i in range(15)]


def _texts_do_not_overlap(figure) -> list[tuple[str, object]]:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [text for axes in figure.axes for text in axes.texts] + list(figure.texts)
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in texts if text.get_text()]
    width, height = figure.canvas.get_width_height()
    for text, box in boxes:
        assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= width + 0.5 and box.y1 <= height + 0.5, (text, box)
    for (first, a), (second, b) in itertools.combinations(boxes, 2):
        overlap = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap[0] <= 0.5 or overlap[1] <= 0.5, f"{first!r} overlaps {second!r}"
    return boxes


def _fit(tmp_path, net, inputs, labels, **options):
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=8)
    callback = SaliencyCallback(
        methods=("gradient", ("integrated_gradients", {"n_steps": 8})), num_samples=4, **options
    )
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=logger)
    trainer.fit(ImageClassifier(net), loader, loader)
    return read_events(logger.log_dir).images


def test_tabular_grids_are_heat_rows_of_readable_cells_with_the_feature_names(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(16, 20, generator=generator), torch.arange(16) % 2
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))
    images = _fit(tmp_path, net, inputs, labels, data=DataDescription(feature_names=FEATURES))
    height, width = images["interp_saliency/maps/rows_1-2"][-1][1]  # the default: parts of two samples
    # before: 186 x 44 pixels. Now 20 cells of 26 px, and per sample a header, the input row and two map rows
    assert width >= 20 * 26 and height >= 2 * (22 + 3 * 26)
    assert "interp_saliency/maps/rows_3-4" in images
    figure = _feature_figure(
        inputs[:4].numpy(),
        [[np.random.rand(20), np.random.randn(20)] for _ in range(4)],
        headers=["#0   label 1   pred  1 97%", "#1", "#2", "#3"],
        line_titles=["gradient", "integ. grads"],
        feature_names=FEATURES,
        signed=[False, True],
    )
    boxes = _texts_do_not_overlap(figure)
    names = [(text, box) for text, box in boxes if text in FEATURES]
    assert len(names) == 20  # every name written out (none longer than 14 characters here)
    assert all(box.height >= 6 * len(text) and box.width <= 14 for text, box in names)  # upright: ~6.7 px a letter
    assert min(box.width for text, box in boxes if text in ("gradient", "input")) >= 30


def test_feature_names_that_do_not_fit_the_inputs_are_refused_before_training(tmp_path):
    net = nn.Sequential(nn.Linear(20, 2))
    with pytest.raises(ValueError, match="feature_names has 3 names"):
        _fit(
            tmp_path,
            net,
            torch.randn(16, 20),
            torch.arange(16) % 2,
            data=DataDescription(feature_names=["a", "b", "c"]),
        )
    with pytest.raises(ValueError, match="list of strings"):
        SaliencyCallback(data=DataDescription(feature_names="abc"))


def test_signals_are_drawn_as_lines_with_the_map_as_a_band(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(16, 2, 100, generator=generator), torch.arange(16) % 2
    net = nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    images = _fit(tmp_path, net, inputs, labels)
    height, width = images["interp_saliency/maps/rows_1-2"][-1][1]  # the default: parts of two samples
    assert width >= 2 * 300 and height >= 2 * 110  # before: 402 x 48 pixels with 1-2 px strips
    figure = _signal_figure(
        inputs[:4],
        [torch.rand(4, 2, 100), torch.rand(4, 100)],
        column_titles=["gradient", "integ. grads"],
        row_labels=["#0\nlabel 1\npred  1 97%", "#1", "#2", "#3"],
    )
    _texts_do_not_overlap(figure)
    bands = [axes for axes in figure.axes if axes.images]
    assert len(bands) == 8 and all(axes.get_window_extent().height >= 20 for axes in bands)  # 4 rows, 2 maps


def test_the_band_follows_the_map_along_time():
    inputs = torch.zeros(1, 1, 50)
    hot = torch.zeros(1, 50)
    hot[0, 40:] = 1.0  # the map is high at the end only
    figure = _signal_figure(inputs, [hot], column_titles=["m"], row_labels=["#0"], cmap="gray")
    band = next(axes for axes in figure.axes if axes.images).images[0].get_array()
    assert float(band[0, 45]) == pytest.approx(1.0) and float(band[0, 5]) == pytest.approx(0.0)


def test_signal_maps_meet_time_step_masks_summed_over_channels():
    from lightning_interp.callbacks._maps import _on_mask_grid

    maps = torch.zeros(3, 3, 10)  # as many samples as channels: the grid must not be confused with (N, T)
    maps[:, 1, 7] = 2.0
    masks = torch.zeros(3, 10, dtype=torch.bool)
    masks[:, 7] = True
    laid = _on_mask_grid(maps, masks)
    assert laid.shape == (3, 10) and float(laid[0, 7]) == 2.0
    assert _on_mask_grid(torch.zeros(3, 8, 8), masks) is None  # an image map does not meet a sequence mask
    assert _on_mask_grid(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool)).shape == (3, 8, 8)
