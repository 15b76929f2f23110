"""What the callbacks share for segmentation models: the region transform a map callback binds to the samples it
explains, the text beside a segmentation grid's rows, and image labels derived from class maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_interp.methods import RegionScores, SegmentationTarget, present_classes
from lightning_interp.probe import ProbeSet

__all__ = ["BoundRegions", "SegmentationTarget", "derived_image_labels", "region_pixels", "segmentation_row_texts"]


class BoundRegions:
    """The ``output_transform`` a map callback gives its methods for a segmentation model: the
    :class:`~lightning_interp.methods.RegionScores` of the samples explained last (bound before each explanation,
    on their clean inputs), under one identity, so an explainer built once per fit keeps working."""

    def __init__(self) -> None:
        self.current: RegionScores | None = None
        self.target: Tensor | None = None

    def bind(self, target: Tensor, scores: RegionScores) -> None:
        self.target, self.current = target, scores

    def __call__(self, output: object) -> Tensor:
        if self.current is None:
            raise RuntimeError("No segmentation regions are bound yet: the callback binds them before explaining.")
        return self.current(output)

    def region(self) -> Tensor:
        """(B, h, w) bool: each bound sample's region of its explained class (on the model output's grid)."""
        assert self.current is not None and self.target is not None
        return self.current.region_of(self.target)


def segmentation_row_texts(
    target: Tensor, scores: Tensor, pixels: Tensor, spec: SegmentationTarget, class_names: Sequence[str] | None
) -> list[str]:
    """Beside each row: the sample, the explained class, the region and its size, and the explained score.

    Example:
        >>> texts = segmentation_row_texts(torch.tensor([2]), torch.tensor([[0.0, 1.0, 5.5]]), torch.tensor([12]),
        ...                                SegmentationTarget(), ["bg", "disc", "square"])
        >>> texts[0].splitlines()
        ['#0', 'class square', 'predicted', '12 px', 'sum 5.5']
    """
    rows = []
    for i in range(target.shape[0]):
        c = int(target[i])
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        value = float(scores[i, c])
        rows.append(f"#{i}\nclass {name}\n{spec.region}\n{int(pixels[i])} px\n{spec.reduce} {value:.3g}")
    return rows


def derived_image_labels(probe: ProbeSet, owner: str, *, background: int | None = 0) -> tuple[Tensor, str] | None:
    """For a probe of a segmentation set (class maps, no image labels): (N, C) multi-hot labels, 1 for each class
    other than ``background`` with a pixel in the sample (C: one past the largest class in the maps, ``255``
    left out), and the sentence that says so; None when the probe has labels or no class maps.

    Raises:
        ValueError: no sample has a class other than the background (nothing to label).

    Example:
        >>> maps = torch.tensor([[[0, 2], [2, 255]], [[1, 0], [0, 0]]])
        >>> probe = ProbeSet(torch.zeros(2, 3, 2, 2), class_maps=maps)
        >>> labels, note = derived_image_labels(probe, "LinearProbeCallback")
        >>> labels.tolist()
        [[0, 0, 1], [0, 1, 0]]
    """
    if probe.labels is not None or probe.class_maps is None:
        return None
    maps = probe.class_maps
    valid = maps[(maps >= 0) & (maps != 255)]
    classes = int(valid.max()) + 1 if valid.numel() else 0
    labels = present_classes(maps, max(classes, 1), background=background, ignore_index=255)
    if classes == 0 or not bool(labels.any()):
        raise ValueError(
            f"{owner}: the probe samples carry segmentation class maps but no image labels, and no sample holds a "
            f"class other than the background ({background}); nothing to derive image labels from. Pass "
            "data=DataDescription(batch_parser=...) that returns (inputs, labels, masks) with one label per image, "
            "or probe=ProbeSet(inputs, labels)."
        )
    note = (
        f"{owner}: the probe samples are a segmentation set (class maps, no image labels); each image is labelled "
        f"with the classes present in its class map (multi-hot over {classes} classes, background {background} "
        "left out, 255 ignored). For other labels pass data=DataDescription(batch_parser=...) that returns "
        "(inputs, labels, masks)."
    )
    return labels, note


def region_pixels(regions: Tensor) -> Tensor:
    """(N,) pixels in each (N, H, W) region."""
    return torch.count_nonzero(regions.reshape(regions.shape[0], -1), dim=1)
