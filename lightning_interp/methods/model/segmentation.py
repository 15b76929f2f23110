"""Segmentation targets: explain the scores of class ``c`` summed (or averaged) over a region of a dense output.

A segmentation network returns dense scores, (B, C, H, W), or a dict holding them under ``"out"`` (torchvision's
FCN, DeepLabV3, LR-ASPP). Every attribution method explains one number per sample; for a segmentation model that
number is the sum (or the mean) of class ``c``'s scores over a region ``R`` of the image, as pytorch-grad-cam's
``SemanticSegmentationTarget`` and Captum's segmentation tutorial define it. :class:`RegionScores` is an
``output_transform`` that turns the dense output into (B, C) *region scores* (column ``c``: class ``c``'s scores
over sample ``b``'s region of class ``c``), so every registered method (the gradient family, the CAMs, the
perturbations) explains "class ``c`` over ``R``" unchanged.

The region is fixed on the clean inputs and is the same for every copy of a sample that a method batches
(SmoothGrad's noisy copies, integrated gradients' path points, perturbed copies), copy after copy: row ``r`` of a
batch of ``k * B`` rows is a copy of sample ``r % B``; any other batch size is refused. Regions:

- ``"predicted"``: the pixels whose predicted class (the argmax on the clean inputs) is ``c``;
- ``"label"``: the pixels whose ground-truth class (a (B, H, W) class map) is ``c`` (``ignore_index`` left out);
- ``"all"``: every pixel;
- a tensor: (B, H, W) (the same region for every class) or (B, C, H, W), boolean or 0/1.

:func:`segmentation_target` runs the clean forward and returns the explained class of each sample with the
transform. Everything here is pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.model.core import eager_forward, gradients_enabled, modes_preserved

__all__ = [
    "REGION_REDUCTIONS",
    "SEGMENTATION_REGIONS",
    "RegionReduce",
    "RegionScores",
    "SegmentationRegion",
    "SegmentationTarget",
    "class_regions",
    "dense_output",
    "dominant_class",
    "present_classes",
    "present_counts",
    "reduce_regions",
    "segmentation_target",
]

SegmentationRegion = Literal["predicted", "label", "all"]
RegionReduce = Literal["sum", "mean"]
SEGMENTATION_REGIONS: tuple[str, ...] = ("predicted", "label", "all")
REGION_REDUCTIONS: tuple[str, ...] = ("sum", "mean")

DenseTransform = Callable[[object], Tensor]
"""Picks the dense (B, C, H, W) scores out of what a segmentation model returns."""


@dataclass(frozen=True)
class SegmentationTarget:
    """What a segmentation explanation explains: class ``class_index``'s scores over a region, summed or averaged.

    Give it as a map callback's ``target`` (``SaliencyCallback(target=SegmentationTarget(region="label"))``), or
    call :meth:`resolve` (:func:`segmentation_target`) outside Lightning.

    Attributes:
        class_index: the explained class: an index, ``"pred"`` (per sample the class other than ``background``
            with the largest predicted area; ``background`` when nothing else is predicted) or ``"label"`` (the
            same in the ground-truth class map).
        region: where the class's scores are read: ``"predicted"`` (its predicted pixels), ``"label"`` (its
            ground-truth pixels) or ``"all"`` (the whole image).
        reduce: ``"sum"`` (pytorch-grad-cam's ``SemanticSegmentationTarget``) or ``"mean"`` over the region.
        background: the class ``"pred"`` and ``"label"`` pass over (None: every class counts).
        ignore_index: the class-map value of unlabelled pixels (VOC's 255), in no region; None for none.

    Example:
        >>> SegmentationTarget(class_index=2, region="label").needs_class_map
        True
    """

    class_index: int | Literal["pred", "label"] = "pred"
    region: SegmentationRegion = "predicted"
    reduce: RegionReduce = "sum"
    background: int | None = 0
    ignore_index: int | None = 255

    def __post_init__(self) -> None:
        index = self.class_index
        if not (index in ("pred", "label") or (isinstance(index, int) and not isinstance(index, bool) and index >= 0)):
            raise ValueError(f"class_index must be 'pred', 'label' or a class index >= 0, got {index!r}.")
        if self.region not in SEGMENTATION_REGIONS:
            raise ValueError(f"region must be one of {SEGMENTATION_REGIONS}, got {self.region!r}.")
        if self.reduce not in REGION_REDUCTIONS:
            raise ValueError(f"reduce must be one of {REGION_REDUCTIONS}, got {self.reduce!r}.")
        for name in ("background", "ignore_index"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int or None, got {value!r}.")

    @property
    def needs_class_map(self) -> bool:
        """Whether the ground-truth class map is needed (``class_index="label"`` or ``region="label"``)."""
        return self.class_index == "label" or self.region == "label"

    def resolve(
        self,
        model: nn.Module,
        inputs: Tensor,
        class_map: Tensor | None = None,
        *,
        output_transform: DenseTransform | None = None,
    ) -> tuple[Tensor, RegionScores]:
        """:func:`segmentation_target` with these settings: the (B,) explained classes and the transform."""
        return segmentation_target(
            model,
            inputs,
            self.class_index,
            region=self.region,
            reduce=self.reduce,
            class_map=class_map,
            background=self.background,
            ignore_index=self.ignore_index,
            output_transform=output_transform,
        )


def dense_output(output: object) -> Tensor | None:
    """The dense (B, C, H, W) scores of a model output: the output itself, a mapping's ``"out"`` (torchvision's
    segmentation models) or ``"logits"``, or an object's ``logits`` (HuggingFace); None when there are none.

    Example:
        >>> dense_output({"out": torch.zeros(2, 3, 4, 4), "aux": torch.zeros(2, 3, 4, 4)}).shape
        torch.Size([2, 3, 4, 4])
        >>> dense_output(torch.zeros(2, 3)) is None
        True
    """
    if isinstance(output, Mapping):
        candidate = output.get("out", output.get("logits"))
    elif isinstance(output, Tensor):
        candidate = output
    else:
        candidate = getattr(output, "logits", None)
    return candidate if isinstance(candidate, Tensor) and candidate.ndim == 4 else None


def _dense(output: object, output_transform: DenseTransform | None) -> Tensor:
    dense = output_transform(output) if output_transform is not None else dense_output(output)
    if not isinstance(dense, Tensor) or dense.ndim != 4:
        found = tuple(dense.shape) if isinstance(dense, Tensor) else type(output).__name__
        raise ValueError(
            f"Segmentation targets need dense class scores (batch, classes, H, W) (a tensor, or a dict's 'out'), "
            f"got {found}. Pass output_transform=... that returns them."
        )
    return dense


def _region_masks(region: Tensor, batch: int, classes: int) -> Tensor:
    """A user region as (B, C or 1, H, W) bool."""
    if region.dtype != torch.bool:
        values = region.unique()
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError(
                "A region tensor must be boolean or hold 0 and 1 only; a class map (one class index per pixel) "
                "goes in class_map=..., with region='label'."
            )
        region = region != 0
    if region.ndim == 3:
        region = region[:, None]
    if region.ndim != 4 or region.shape[0] != batch or region.shape[1] not in (1, classes):
        raise ValueError(
            f"A region must be (B, H, W) or (B, C, H, W) with B={batch} and C={classes}, got {tuple(region.shape)}."
        )
    return region


def class_regions(
    region: SegmentationRegion | Tensor,
    dense: Tensor,
    class_map: Tensor | None = None,
    *,
    ignore_index: int | None = 255,
) -> Tensor:
    """Each sample's region of each class, (B, C, H, W) bool (or (B, 1, H, W) for one region shared by every
    class), on the grid of ``dense`` (a ``"label"`` class map on another grid is resized, nearest neighbour).

    Args:
        region: ``"predicted"``, ``"label"``, ``"all"`` or a (B, H, W) / (B, C, H, W) mask (see the module).
        dense: the clean (B, C, H, W) scores.
        class_map: (B, H, W) ground-truth class indices, for ``"label"``.
        ignore_index: the class-map value of unlabelled pixels (in no region), or None.

    Example:
        >>> dense = torch.tensor([[[[2.0, 0.0]], [[1.0, 3.0]]]])  # one sample, two classes, a 1 x 2 image
        >>> class_regions("predicted", dense)[0, :, 0].tolist()
        [[True, False], [False, True]]
    """
    batch, classes, height, width = dense.shape
    if isinstance(region, Tensor):
        masks = _region_masks(region.to(dense.device), batch, classes)
    elif region == "predicted":
        predicted = dense.detach().argmax(dim=1)
        masks = predicted[:, None] == torch.arange(classes, device=dense.device)[None, :, None, None]
    elif region == "label":
        if class_map is None:
            raise ValueError("region='label' needs the ground-truth class map: pass class_map=(B, H, W) class indices.")
        labels = _class_map(class_map, batch).to(dense.device)
        masks = labels[:, None] == torch.arange(classes, device=dense.device)[None, :, None, None]
        if ignore_index is not None:
            masks &= (labels != ignore_index)[:, None]
    elif region == "all":
        masks = torch.ones(batch, 1, height, width, dtype=torch.bool, device=dense.device)
    else:
        raise ValueError(f"region must be one of {SEGMENTATION_REGIONS} or a mask tensor, got {region!r}.")
    return _on_grid(masks, (height, width))


def _class_map(class_map: Tensor, batch: int) -> Tensor:
    labels = torch.as_tensor(class_map)
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3 or labels.shape[0] != batch or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"class_map must be ({batch}, H, W) integer class indices (one per pixel), got "
            f"{tuple(labels.shape)} {labels.dtype}."
        )
    return labels.long()


def _on_grid(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) bool masks on the (H, W) grid (nearest neighbour)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks.float(), size=size, mode="nearest") > 0.5


def reduce_regions(dense: Tensor, regions: Tensor, reduce: RegionReduce = "sum") -> Tensor:
    """(M, C) region scores: column ``c`` of row ``r`` is the sum (or mean) of ``dense[r, c]`` over the region of
    class ``c`` of sample ``r % B``. ``dense`` has M = k * B rows (copies of the B samples, copy after copy);
    ``regions`` is (B, C, H, W) or (B, 1, H, W), resized to the scores' grid (nearest neighbour) if needed.

    Raises:
        ValueError: M is not a whole number of copies of the B samples.

    Example:
        >>> dense = torch.arange(8.0).reshape(1, 2, 2, 2)
        >>> regions = torch.tensor([[[True, False], [False, False]]])  # one pixel, for both classes
        >>> reduce_regions(dense, regions).tolist(), reduce_regions(dense.repeat(2, 1, 1, 1), regions).shape
        ([[0.0, 4.0]], torch.Size([2, 2]))
    """
    if reduce not in REGION_REDUCTIONS:
        raise ValueError(f"reduce must be one of {REGION_REDUCTIONS}, got {reduce!r}.")
    if regions.ndim == 3:
        regions = regions[:, None]
    rows, samples = dense.shape[0], regions.shape[0]
    if rows != samples:
        if samples == 0 or rows % samples:
            raise ValueError(
                f"A batch of {rows} rows cannot be paired with the regions of {samples} samples: the rows must be "
                "whole copies of the samples, copy after copy. Explain the samples the regions were made for (or, "
                "for a perturbation method, pass internal_batch_size=<a multiple of the batch size>)."
            )
        regions = regions.repeat(rows // samples, 1, 1, 1)
    regions = _on_grid(regions.to(dense.device), tuple(dense.shape[-2:]))
    weights = regions.to(dense.dtype)
    total = (dense * weights).sum(dim=(2, 3))
    if reduce == "sum":
        return total
    return total / weights.sum(dim=(2, 3)).clamp_min(1)


class RegionScores:
    """An ``output_transform`` that turns a dense output into (B, C) region scores (see :func:`reduce_regions`).

    Args:
        regions: (B, C, H, W) or (B, 1, H, W) bool: each sample's region of each class (:func:`class_regions`).
        reduce: ``"sum"`` or ``"mean"``.
        output_transform: picks the dense scores out of the model's output (default: :func:`dense_output`).

    Attributes:
        regions: as given.
        reduce: as given.

    Example:
        >>> transform = RegionScores(torch.ones(2, 1, 4, 4, dtype=torch.bool), reduce="mean")
        >>> transform({"out": torch.ones(2, 3, 4, 4)}).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(
        self, regions: Tensor, reduce: RegionReduce = "sum", output_transform: DenseTransform | None = None
    ) -> None:
        if reduce not in REGION_REDUCTIONS:
            raise ValueError(f"reduce must be one of {REGION_REDUCTIONS}, got {reduce!r}.")
        if regions.dtype != torch.bool or regions.ndim not in (3, 4):
            raise ValueError(
                f"regions must be (B, C, H, W) or (B, H, W) bool, got {tuple(regions.shape)} {regions.dtype}."
            )
        self.regions = regions if regions.ndim == 4 else regions[:, None]
        self.reduce = reduce
        self.output_transform = output_transform

    def __call__(self, output: object) -> Tensor:
        return reduce_regions(_dense(output, self.output_transform), self.regions, self.reduce)

    def region_of(self, target: Tensor) -> Tensor:
        """(B, H, W) bool: each sample's region of its explained class ``target`` (B,)."""
        if self.regions.shape[1] == 1:
            return self.regions[:, 0]
        rows = torch.arange(self.regions.shape[0], device=self.regions.device)
        return self.regions[rows, target.to(self.regions.device)]

    def __repr__(self) -> str:
        return f"RegionScores(regions={tuple(self.regions.shape)}, reduce={self.reduce!r})"


def dominant_class(
    class_map: Tensor, num_classes: int, *, background: int | None = 0, ignore_index: int | None = 255
) -> Tensor:
    """(B,) the class with the most pixels in each (B, H, W) class map, ``background`` and ``ignore_index`` passed
    over; ``background`` where no other class has a pixel.

    Example:
        >>> maps = torch.tensor([[[0, 0, 2], [1, 2, 2]], [[0, 0, 0], [0, 0, 255]]])
        >>> dominant_class(maps, 3).tolist()
        [2, 0]
    """
    counts = present_counts(class_map, num_classes, ignore_index=ignore_index).clone()
    if background is not None and 0 <= background < num_classes:
        other = counts.clone()
        other[:, background] = -1
        best = other.argmax(dim=1)
        none = other.amax(dim=1) <= 0
        return torch.where(none, torch.full_like(best, background), best)
    return counts.argmax(dim=1)


def present_counts(class_map: Tensor, num_classes: int, *, ignore_index: int | None = 255) -> Tensor:
    """(B, C) pixel count of each class in each (B, H, W) class map (``ignore_index`` and values outside
    ``0 .. C-1`` left out).

    Example:
        >>> present_counts(torch.tensor([[[0, 2], [2, 255]]]), 3).tolist()
        [[1, 0, 2]]
    """
    labels = class_map.reshape(class_map.shape[0], -1).long()
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid &= labels != ignore_index
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels.clamp(0, num_classes - 1), valid.long())


def present_classes(
    class_map: Tensor, num_classes: int, *, background: int | None = None, ignore_index: int | None = 255
) -> Tensor:
    """(B, C) multi-hot image labels of (B, H, W) class maps: 1 where the class has a pixel (``background``, when
    given, always 0), for the representation callbacks on a segmentation set.

    Example:
        >>> present_classes(torch.tensor([[[0, 2], [2, 255]]]), 3, background=0).tolist()
        [[0, 0, 1]]
    """
    present = (present_counts(class_map, num_classes, ignore_index=ignore_index) > 0).long()
    if background is not None and 0 <= background < num_classes:
        present[:, background] = 0
    return present


def segmentation_target(
    model: nn.Module,
    inputs: Tensor,
    class_index: int | Tensor | Literal["pred", "label"] = "pred",
    *,
    region: SegmentationRegion | Tensor = "predicted",
    reduce: RegionReduce = "sum",
    class_map: Tensor | None = None,
    background: int | None = 0,
    ignore_index: int | None = 255,
    output_transform: DenseTransform | None = None,
) -> tuple[Tensor, RegionScores]:
    """The explained class of each sample and the ``output_transform`` that explains it over its region.

    One forward of ``model`` on the clean ``inputs`` (eval mode, no gradient) fixes the predicted classes and
    regions; pass both results to any method: ``attribute(name, model, inputs, target,
    output_transform=transform)``. The explained number of sample ``b`` is then the sum (``reduce="sum"``) or mean
    of ``dense[b, target[b]]`` over ``transform.region_of(target)[b]``.

    Args:
        model: the segmentation network, called as ``model(inputs)``.
        inputs: (B, ...) batch.
        class_index: an index, a (B,) LongTensor, ``"pred"`` (the largest predicted class other than
            ``background``) or ``"label"`` (the same in ``class_map``).
        region: ``"predicted"``, ``"label"``, ``"all"``, or a (B, H, W) / (B, C, H, W) mask.
        reduce: ``"sum"`` or ``"mean"``.
        class_map: (B, H, W) ground-truth class indices (for ``"label"``).
        background: the class ``"pred"`` / ``"label"`` pass over, or None.
        ignore_index: the class-map value of unlabelled pixels, or None.
        output_transform: picks the dense (B, C, H, W) scores out of the model's output (default: the output,
            or its ``"out"``).

    Returns:
        ``(target, transform)``: (B,) long on the inputs' device, and a :class:`RegionScores`.

    Example:
        >>> net = nn.Conv2d(3, 4, 1)
        >>> target, transform = segmentation_target(net, torch.randn(2, 3, 8, 8), 1, region="all", reduce="mean")
        >>> target.tolist(), transform(net(torch.randn(6, 3, 8, 8))).shape  # three copies of the two samples
        ([1, 1], torch.Size([6, 4]))
    """
    with modes_preserved(model), eager_forward(), gradients_enabled(), torch.no_grad():
        dense = _dense(model(inputs.detach().clone()), output_transform).detach()
    batch, classes = dense.shape[:2]
    if isinstance(class_index, str):
        if class_index == "pred":
            index = dominant_class(dense.argmax(dim=1), classes, background=background, ignore_index=None)
        elif class_index == "label":
            if class_map is None:
                raise ValueError("class_index='label' needs the ground-truth class map: pass class_map=(B, H, W).")
            labels = _class_map(class_map, batch).to(dense.device)
            index = dominant_class(labels, classes, background=background, ignore_index=ignore_index)
        else:
            raise ValueError(f"class_index must be 'pred', 'label', an int or a (B,) tensor, got {class_index!r}.")
    elif isinstance(class_index, int) and not isinstance(class_index, bool):
        index = torch.full((batch,), class_index, dtype=torch.long, device=dense.device)
    elif isinstance(class_index, Tensor):
        index = class_index.to(device=dense.device, dtype=torch.long).reshape(-1).clone()
        if index.numel() == 1:
            index = index.expand(batch).clone()
    else:
        raise TypeError(f"class_index must be 'pred', 'label', an int or a (B,) tensor, got {class_index!r}.")
    if index.shape != (batch,) or bool(((index < 0) | (index >= classes)).any()):
        raise ValueError(f"class indices must be {batch} values in [0, {classes - 1}], got {index.tolist()}.")
    regions = class_regions(region, dense, class_map, ignore_index=ignore_index)
    return index.to(inputs.device), RegionScores(regions, reduce, output_transform)
