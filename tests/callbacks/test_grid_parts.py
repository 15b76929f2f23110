"""``rows_per_image``: a map grid split into images of a few rows, legible at a TensorBoard Time Series card's size.

TensorBoard 2.21's Time Series card shows an image scaled to fit a box of
about 370 x 215 px (measured in headless Chromium at 1400 and 1920 px wide
windows): the quickstart's 8-row saliency grid (652 x 825 px) is shown at a
quarter of its size there; its compact 2-row parts (526 x 176 px) at 0.71.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_interp import Display, GradCAMCallback, ProbeSet, SaliencyCallback
from lightning_interp.callbacks._maps import grid_parts
from tests.conftest import quiet_trainer, read_image_bytes, tiny_classifier, tiny_datamodule


def test_grid_parts_cover_every_row_once_in_order():
    for count, per in [(8, 2), (7, 3), (5, 5), (12, 1), (3, 8)]:
        parts = grid_parts("t/maps", count, per)
        rows = [i for _, part in parts for i in part]
        assert rows == list(range(count))
        assert all(len(part) <= per for _, part in parts)
        tags = [tag for tag, _ in parts]
        assert tags == sorted(tags), "tags sort in row order (zero-padded)"
    assert grid_parts("t/maps", 8, None) == [("t/maps", range(8))]
    assert grid_parts("t/maps", 4, 4) == [("t/maps", range(4))], "a grid that fits one part keeps the plain tag"
    assert [tag for tag, _ in grid_parts("t/maps", 12, 5)] == [
        "t/maps/rows_01-05",
        "t/maps/rows_06-10",
        "t/maps/rows_11-12",
    ]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", "Auto"])
def test_rows_per_image_is_checked_at_construction(bad):
    with pytest.raises(ValueError, match="rows_per_image"):
        SaliencyCallback(display=Display(rows_per_image=bad))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _colour_probe() -> ProbeSet:
    """Six 16 x 16 inputs, each half one pure colour and half black: sample i is found by its colour."""
    inputs = torch.zeros(len(COLOURS), 3, 16, 16)
    for index, colour in enumerate(COLOURS):
        inputs[index, :, :, :8] = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255
    return ProbeSet(inputs, torch.arange(len(COLOURS)) % 4)


def _rows_of(picture: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixel rows where ``colour`` appears (the input tile of that sample)."""
    hits = (np.abs(picture - np.array(colour)).max(axis=-1) <= 2).nonzero()[0]
    return hits


def test_split_grids_in_a_real_fit_hold_each_row_once_in_order_and_fit_a_card(tmp_path):
    """Each part shows its own probe rows, in order, and is small enough for a Time Series card; widths are stable."""
    whole = SaliencyCallback(
        name="whole",
        methods=("gradient", "input_x_gradient"),
        probe=_colour_probe(),
        display=Display(rows_per_image=None),  # one grid per run (the default, "auto", splits it)
    )
    split = SaliencyCallback(
        name="split",
        methods=("gradient", "input_x_gradient"),
        probe=_colour_probe(),
        display=Display(rows_per_image=2),
    )
    cam = GradCAMCallback(num_samples=6, display=Display(rows_per_image=4))
    quickstart = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients")  # the quickstart's columns
    default = SaliencyCallback(name="default", methods=quickstart, probe=_colour_probe())  # rows_per_image="auto"
    trainer = quiet_trainer(tmp_path, callbacks=[whole, split, cam, default], max_epochs=2)
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule(seed=3))
    images = read_image_bytes(str(tmp_path))

    parts = ["interp_split/maps/rows_1-2", "interp_split/maps/rows_3-4", "interp_split/maps/rows_5-6"]
    assert set(parts) <= set(images) and "interp_split/maps" not in images
    assert {"interp_gradcam/maps/rows_1-4", "interp_gradcam/maps/rows_5-6"} <= set(images)
    assert [step for step, _ in images[parts[0]]] == [step for step, _ in images["interp_whole/maps"]]
    assert len(images[parts[0]]) == 2

    for index, tag in enumerate(parts):
        pictures = [_decode(data) for _, data in images[tag]]
        assert len({picture.shape for picture in pictures}) == 1, "every run's part has one size (no jitter)"
        picture = pictures[-1]
        mine = [_rows_of(picture, COLOURS[i]) for i in (2 * index, 2 * index + 1)]
        assert all(len(rows) >= 16 * 32 for rows in mine), f"{tag} lacks one of its input tiles"
        assert mine[0].max() < mine[1].min(), f"{tag} shows its rows out of order"
        others = [i for i in range(len(COLOURS)) if i // 2 != index]
        assert all(len(_rows_of(picture, COLOURS[i])) == 0 for i in others), f"{tag} shows another part's row"
        # TensorBoard's card box is about 370 x 215 px: a part is shown at 0.7 of its size or more there
        height, width = picture.shape[:2]
        assert min(370 / width, 215 / height) >= 0.7, (width, height)
    # by default a grid of images comes in parts of two rows, each shown at 0.7 of its size or more in a card
    defaults = [tag for tag in images if tag.startswith("interp_default/maps")]
    assert sorted(defaults) == [f"interp_default/maps/rows_{i}-{i + 1}" for i in (1, 3, 5)]
    for tag in defaults:
        height, width = _decode(images[tag][-1][1]).shape[:2]
        assert min(370 / width, 215 / height) >= 0.7, (tag, width, height)
    full = _decode(images["interp_whole/maps"][-1][1])
    assert min(370 / full.shape[1], 215 / full.shape[0]) < 0.4, "the unsplit grid is the tall one"
    assert all(len(_rows_of(full, colour)) >= 16 * 32 for colour in COLOURS)
