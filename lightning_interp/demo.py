"""Small models and a LightningModule used by the examples, tests and benchmarks.

These are conveniences for trying the callbacks, not part of the callback
API: ``ImageClassifier`` wraps any ``nn.Module`` that maps images to logits.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ImageClassifier", "TextTransformer", "cifar_resnet", "mnist_cnn", "shapes_cnn"]


def shapes_cnn(num_classes: int = 4, in_channels: int = 3, width: int = 16) -> nn.Sequential:
    """A three-block CNN with global average pooling, for 32 x 32 synthetic shapes.

    Example:
        >>> shapes_cnn()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 4])
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """The classic 2-conv / 2-fc MNIST network (about 99% test accuracy in a few epochs).

    Example:
        >>> mnist_cnn()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _SmallResNet(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = _BasicBlock(width, width, 1)
        self.layer2 = _BasicBlock(width, 2 * width, 2)
        self.layer3 = _BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small ResNet-style network for 32 x 32 colour images (three residual stages).

    Example:
        >>> cifar_resnet(width=8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _SmallResNet(num_classes, width)


class TextTransformer(nn.Module):
    """A small text classifier on token ids: embedding + positions, ``nn.TransformerEncoder``, mean over tokens.

    Padding tokens (``pad_id``) are masked out of attention and of the mean.

    Args:
        vocab_size: number of token ids.
        num_classes: output classes.
        dim: embedding width.
        heads: attention heads per layer.
        layers: encoder layers.
        max_length: longest sequence (learnt position embeddings).
        pad_id: the padding id.

    Example:
        >>> net = TextTransformer(vocab_size=50, num_classes=2)
        >>> net(torch.randint(1, 50, (3, 12))).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        dim: int = 32,
        heads: int = 2,
        layers: int = 2,
        max_length: int = 64,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position = nn.Parameter(0.02 * torch.randn(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        padding = ids == self.pad_id
        x = self.embedding(ids) + self.position[:, : ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0))


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around any image model; logs ``train_loss``, ``val_loss`` and ``val_acc``.

    Batches may be ``(x, y)`` or ``(x, y, mask)``; extra items are ignored.

    Args:
        net: maps (B, C, H, W) images to (B, classes) logits; registered as ``self.net``,
            so its layers are addressed as ``"net.<name>"`` in the callbacks.
        lr: Adam learning rate.

    Example:
        >>> model = ImageClassifier(shapes_cnn())
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 4])
    """

    def __init__(self, net: nn.Module, lr: float = 2e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, ...], prefix: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log(f"{prefix}_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
