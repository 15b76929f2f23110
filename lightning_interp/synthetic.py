"""Synthetic shapes: an offline image dataset with ground-truth object masks.

Each image shows one shape (the class) of random size, position and colour
over clutter (smooth background noise and small distractor squares that carry
no class information). The mask marks the shape's pixels, so one can check
that an explanation points at the object and not the clutter. Everything is
generated deterministically from a seed, in memory, in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["SHAPE_CLASSES", "SyntheticShapes", "SyntheticShapesDataModule", "make_shapes"]

SHAPE_CLASSES = ("disc", "square", "triangle", "cross")


TINT = (0.4, 0.0, 0.0)
"""What a tinted background adds to the (halved) red, green and blue of the background: a red cast."""


def make_shapes(
    count: int,
    *,
    image_size: int = 32,
    seed: int = 0,
    clutter: int = 4,
    class_weights: Sequence[float] | None = None,
    tinted_class: int | None = None,
    tint_share: float = 0.9,
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``count`` images with labels and object masks.

    Two options plant biases that a dataset-bias check should find:
    ``class_weights`` makes classes rare or common, and ``tinted_class`` gives
    that class's images a red background with probability ``tint_share`` and
    every other image one with probability ``1 - tint_share`` (a background
    colour correlated with a class: a spurious cue the model can learn
    instead of the shape). Without them the classes are uniform and no
    background is tinted.

    Args:
        count: number of images.
        image_size: side length in pixels (at least 16).
        seed: all randomness comes from a generator seeded with this.
        clutter: distractor squares per image.
        class_weights: relative frequency of each class (``len(SHAPE_CLASSES)`` values), or None for uniform.
        tinted_class: the class that mostly comes with a red background, or None for none.
        tint_share: the share of ``tinted_class``'s images with a red background (in [0.5, 1]).

    Returns:
        images (count, 3, S, S) float32 in [0, 1], labels (count,) int64 in
        ``range(len(SHAPE_CLASSES))``, masks (count, S, S) bool.

    Example:
        >>> images, labels, masks = make_shapes(8, image_size=24)
        >>> images.shape, labels.shape, masks.shape
        (torch.Size([8, 3, 24, 24]), torch.Size([8]), torch.Size([8, 24, 24]))
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}.")
    classes = len(SHAPE_CLASSES)
    if class_weights is not None:
        weights = torch.as_tensor(class_weights, dtype=torch.float64)
        if weights.shape != (classes,) or not bool((weights > 0).all()):
            raise ValueError(f"class_weights must be {classes} positive numbers, got {list(class_weights)}.")
    if tinted_class is not None and not 0 <= tinted_class < classes:
        raise ValueError(f"tinted_class must be a class index in 0..{classes - 1} or None, got {tinted_class!r}.")
    if not 0.5 <= tint_share <= 1:
        raise ValueError(f"tint_share must lie in [0.5, 1], got {tint_share!r}.")
    g = torch.Generator().manual_seed(seed)
    size = image_size
    if class_weights is None:
        labels = torch.randint(classes, (count,), generator=g)
    else:
        labels = torch.multinomial(weights, count, replacement=True, generator=g)
    radius = size * (0.16 + 0.10 * torch.rand(count, generator=g))
    margin = radius + 1
    cx = margin + torch.rand(count, generator=g) * (size - 2 * margin)
    cy = margin + torch.rand(count, generator=g) * (size - 2 * margin)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords[None, :, None], coords[None, None, :]
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    r = radius[:, None, None]
    disc = dx.square() + dy.square() <= r.square()
    square = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    triangle = (dy >= -r) & (dy <= 0.75 * r) & (dx.abs() <= 0.6 * (dy + r))
    arm = r / 3
    cross = ((dx.abs() <= r) & (dy.abs() <= arm)) | ((dy.abs() <= r) & (dx.abs() <= arm))
    masks = torch.stack([disc, square, triangle, cross], dim=1)[torch.arange(count), labels]

    background = F.interpolate(torch.rand(count, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    images = 0.15 + 0.3 * background + 0.05 * torch.randn(count, 3, size, size, generator=g)
    if tinted_class is not None:
        chance = torch.where(labels == tinted_class, tint_share, 1 - tint_share)
        tinted = torch.rand(count, generator=g) < chance
        cast = 0.5 * images + torch.tensor(TINT)[:, None, None]
        images = torch.where(tinted[:, None, None, None], cast, images)
    for _ in range(clutter):
        side = 2 + torch.randint(2, (count,), generator=g)
        x0 = torch.randint(size - 3, (count,), generator=g)
        y0 = torch.randint(size - 3, (count,), generator=g)
        inside = (
            (xx >= x0[:, None, None])
            & (xx < (x0 + side)[:, None, None])
            & (yy >= y0[:, None, None])
            & (yy < (y0 + side)[:, None, None])
        )
        colour = 0.4 + 0.6 * torch.rand(count, 3, 1, 1, generator=g)
        images = torch.where(inside[:, None], colour, images)
    colour = 0.55 + 0.45 * torch.rand(count, 3, 1, 1, generator=g)
    images = torch.where(masks[:, None], colour, images).clamp(0, 1)
    return images.contiguous(), labels, masks


class SyntheticShapes(Dataset):
    """Map-style dataset of :func:`make_shapes`; items are ``(image, label, mask)``.

    Example:
        >>> data = SyntheticShapes(16, image_size=32, seed=1)
        >>> image, label, mask = data[0]
        >>> image.shape, mask.dtype
        (torch.Size([3, 32, 32]), torch.bool)
    """

    classes = SHAPE_CLASSES

    def __init__(
        self,
        count: int,
        *,
        image_size: int = 32,
        seed: int = 0,
        clutter: int = 4,
        class_weights: Sequence[float] | None = None,
        tinted_class: int | None = None,
        tint_share: float = 0.9,
    ) -> None:
        self.images, self.labels, self.masks = make_shapes(
            count,
            image_size=image_size,
            seed=seed,
            clutter=clutter,
            class_weights=class_weights,
            tinted_class=tinted_class,
            tint_share=tint_share,
        )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[index], self.labels[index], self.masks[index]


class SyntheticShapesDataModule(pl.LightningDataModule):
    """Train / validation split of synthetic shapes, generated offline.

    Batches are ``(images, labels, masks)``; the probe sets of the callbacks
    pick the masks up automatically, so localization scores are logged.

    Args:
        train_size: training images.
        val_size: validation images (a different seed, so no overlap).
        image_size: side length in pixels.
        batch_size: batch size of both loaders.
        num_workers: dataloader worker processes.
        seed: base seed; validation uses ``seed + 1``.
        class_weights: relative class frequencies of both sets (see :func:`make_shapes`), or None for uniform.
        tinted_class: the class that mostly comes with a red background in both sets, or None.
        tint_share: the share of ``tinted_class``'s images with a red background.

    Example:
        >>> dm = SyntheticShapesDataModule(train_size=64, val_size=32)
        >>> dm.setup("fit")
        >>> len(dm.val_dataloader().dataset)
        32
    """

    def __init__(
        self,
        train_size: int = 4096,
        val_size: int = 512,
        *,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        class_weights: Sequence[float] | None = None,
        tinted_class: int | None = None,
        tint_share: float = 0.9,
    ) -> None:
        super().__init__()
        self.train_size, self.val_size, self.image_size = train_size, val_size, image_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.bias = {"class_weights": class_weights, "tinted_class": tinted_class, "tint_share": tint_share}
        self.num_classes = len(SHAPE_CLASSES)
        self.class_names = list(SHAPE_CLASSES)

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            size = self.image_size
            self.train_set = SyntheticShapes(self.train_size, image_size=size, seed=self.seed, **self.bias)
            self.val_set = SyntheticShapes(self.val_size, image_size=size, seed=self.seed + 1, **self.bias)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
