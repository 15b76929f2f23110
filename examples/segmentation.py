"""Segmentation: explain a class over its predicted mask while a tiny fully convolutional network trains.

Runs anywhere, with no download: the package's synthetic shapes become a segmentation set (the class map is the
shape's class + 1 inside its mask, 0 for the background). ``SaliencyCallback`` and ``GradCAMCallback`` see that
the model's output is dense (batch, classes, H, W) and explain, for each probe image, the sum of the scores of the
largest predicted non-background class over its predicted mask; they log the maps with the region outlined, and
localization / pointing game against the explained class's ground-truth mask. About half a minute on two cores.

    python examples/segmentation.py
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import DataDescription, GradCAMCallback, SaliencyCallback
from lightning_interp.methods import SegmentationTarget
from lightning_interp.synthetic import SHAPE_CLASSES, make_shapes

CLASS_NAMES = ("background", *SHAPE_CLASSES)


def shapes_segmentation(count: int, *, image_size: int = 32, seed: int = 0) -> TensorDataset:
    """``(image, class_map)`` pairs: the class map is the shape's class + 1 inside its mask, 0 elsewhere."""
    images, labels, masks = make_shapes(count, image_size=image_size, seed=seed, clutter=2)
    class_maps = torch.where(masks, labels[:, None, None] + 1, torch.zeros_like(masks, dtype=torch.long))
    return TensorDataset(images, class_maps)


class TinyFCN(nn.Module):
    """Two strided convolutions (a receptive field that sees a whole shape), a dilated one, a 1 x 1 classifier and
    a bilinear upsampling back to the input: dense (batch, classes, H, W) scores."""

    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 24) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.classifier(self.features(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class Segmenter(pl.LightningModule):
    """Per-pixel cross-entropy on ``(image, class_map)`` batches; logs ``val_loss`` and ``val_pixel_acc``."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out, y))
        self.log("val_pixel_acc", (out.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build_callbacks(num_samples: int = 8) -> list[pl.Callback]:
    """Saliency and Grad-CAM explaining each probe image's largest predicted class over its predicted mask."""
    explained = SegmentationTarget(class_index="pred", region="predicted", reduce="sum")
    data = DataDescription(class_names=CLASS_NAMES)
    return [
        SaliencyCallback(
            methods=("gradient", "smoothgrad"), target=explained, num_samples=num_samples, data=data, seed=0
        ),
        GradCAMCallback(layer="net.features.5", target=explained, num_samples=num_samples, data=data),
    ]


def main(argv: Sequence[str] | None = None) -> tuple[pl.Trainer, list[pl.Callback]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    train = DataLoader(shapes_segmentation(args.train_size, seed=0), batch_size=32, shuffle=True)
    val = DataLoader(shapes_segmentation(args.val_size, seed=1), batch_size=32)
    callbacks = build_callbacks()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(args.logdir, name="segmentation"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=8,
    )
    trainer.fit(Segmenter(TinyFCN()), train, val)
    return trainer, callbacks


if __name__ == "__main__":
    main()
