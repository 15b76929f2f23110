"""CIFAR-10: train a small ResNet and watch its saliency and Grad-CAM maps evolve.

Training uses random-crop and horizontal-flip augmentation; validation runs on
the CIFAR-10 test split. At each validation epoch a fixed, class-stratified
probe set of test images is explained with plain gradients, integrated
gradients and Grad-CAM (layer="auto" picks the last residual stage,
``net.layer3``), and the maps and their scores go to TensorBoard.

    python examples/cifar10.py                   # downloads CIFAR-10 (163 MB) into ./data on the first run
    python examples/cifar10.py --data-dir /datasets --no-download
    tensorboard --logdir lightning_logs

Offline, the script reads torchvision's layout: <data-dir>/cifar-10-batches-py/
holding data_batch_1 ... data_batch_5, test_batch and batches.meta (the
unpacked "python version" archive). No data at all? `python examples/quickstart.py`
needs none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from lightning_interp import (
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier, cifar_resnet

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 30.0


def batches_or_fraction(text: str) -> int | float:
    """Lightning's ``limit_*_batches`` convention: an int counts batches, a float in [0, 1] is a fraction."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of batches or a fraction, got {text!r}") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"a fraction must lie in [0, 1], got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help="holds cifar-10-batches-py/ (default ./data)")
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download CIFAR-10 into --data-dir when it is missing (default: try)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--width", type=int, default=32, help="channels of the first residual stage (default 32)")
    parser.add_argument("--num-samples", type=int, default=8, help="probe samples shown by each callback")
    parser.add_argument(
        "--representation-samples",
        type=int,
        default=1024,
        help="probe samples of the linear probes (CKA / RSA use at most 512 of as many)",
    )
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument(
        "--limit-train-batches",
        type=batches_or_fraction,
        default=1.0,
        help="training batches per epoch: an int counts batches, a float is a fraction (default 1.0)",
    )
    parser.add_argument(
        "--limit-val-batches", type=batches_or_fraction, default=1.0, help="validation batches, as above"
    )
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 0), help="dataloader worker processes"
    )
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Let a blocked download fail instead of hanging on a firewalled network."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _root_cause(error: BaseException) -> str:
    """The last line of an error message (torchvision puts the network error there)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def missing_data_message(data_dir: str, download_error: BaseException | None) -> str:
    """What to tell a user whose CIFAR-10 files are missing (or damaged) and could not be downloaded."""
    root = os.path.abspath(data_dir)
    folder = os.path.join(root, datasets.CIFAR10.base_folder)
    missing = [name for name in FILES if not os.path.isfile(os.path.join(folder, name))]
    if download_error is not None:
        why = f"downloading it failed ({_root_cause(download_error)})"
    else:
        why = "downloading is off (--no-download; without it the script fetches CIFAR-10 itself)"
    found = (
        f"Missing: {', '.join(missing)}."
        if missing
        else "All files are there but a checksum does not match: delete the folder and fetch it again."
    )
    return "\n".join(
        [
            f"CIFAR-10 is not in {folder}/ and {why}.",
            found,
            "To get the data, either:",
            "  - run this script once where the internet is reachable and copy its cifar-10-batches-py/ folder",
            "    into --data-dir, or",
            f"  - fetch {ARCHIVE_URL} (the python version),",
            f"    unpack it with `tar xzf cifar-10-python.tar.gz -C {root}` and run again with --data-dir {data_dir}.",
            "No data at hand? `python examples/quickstart.py` trains on generated shapes and needs no download.",
        ]
    )


def load_cifar10(data_dir: str, download: bool) -> tuple[datasets.CIFAR10, datasets.CIFAR10]:
    """Augmented training split and plain test split; exits with a clear message when they cannot be had."""
    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])

    def open_splits() -> tuple[datasets.CIFAR10, datasets.CIFAR10]:
        train = datasets.CIFAR10(data_dir, train=True, transform=train_transform, download=False)
        test = datasets.CIFAR10(data_dir, train=False, transform=test_transform, download=False)
        return train, test

    try:
        return open_splits()
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        if not download:
            raise SystemExit(missing_data_message(data_dir, None)) from None
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            datasets.CIFAR10(data_dir, train=True, download=True)
    except Exception as error:  # no network, a proxy, a full disk, a checksum mismatch, ...
        raise SystemExit(missing_data_message(data_dir, error)) from None
    return open_splits()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, log, print where the logs are; return the final logged metrics."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    train_set, test_set = load_cifar10(args.data_dir, args.download)
    class_names = list(train_set.classes)
    loader_options = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
    }
    train_loader = DataLoader(train_set, shuffle=True, **loader_options)
    val_loader = DataLoader(test_set, shuffle=False, **loader_options)

    model = ImageClassifier(cifar_resnet(num_classes=len(class_names), width=args.width), lr=args.lr)
    saliency = SaliencyCallback(
        methods=("gradient", "integrated_gradients"), num_samples=args.num_samples, class_names=class_names
    )
    gradcam = GradCAMCallback(layer="auto", num_samples=args.num_samples, class_names=class_names)
    probes = LinearProbeCallback(layers="auto", num_samples=args.representation_samples)
    similarity = RepresentationSimilarityCallback(layers="auto", num_samples=min(512, args.representation_samples))
    logger = TensorBoardLogger(args.log_dir, name="cifar10")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        callbacks=[saliency, gradcam, probes, similarity],
        logger=logger,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    print()
    print(f"test accuracy: {metrics.get('val_acc', float('nan')):.4f}")
    for layer in gradcam.layers:
        key = f"interp/gradcam/{layer}/concentration"
        if key in metrics:
            print(f"Grad-CAM layer {layer}: {metrics[key]:.3f} of the map's mass in its top 10% of pixels")
    print(f"logs written to {os.path.abspath(logger.log_dir)}")
    print(f"view them with:  tensorboard --logdir {args.log_dir}")
    return metrics


if __name__ == "__main__":
    main()
