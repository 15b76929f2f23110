"""MNIST: train the classic 2-conv / 2-fc network and watch its saliency and Grad-CAM maps evolve.

Validation runs on the MNIST test split; at each validation epoch a fixed,
class-stratified probe set of test digits is explained with plain gradients,
integrated gradients and Grad-CAM, and the maps and their scores go to
TensorBoard. The network usually reaches about 99% test accuracy in a few epochs.

    python examples/mnist.py                     # downloads MNIST into ./data on the first run
    python examples/mnist.py --data-dir /datasets --no-download
    tensorboard --logdir lightning_logs

Offline, the script reads torchvision's layout: <data-dir>/MNIST/raw/ holding
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte. No data at all? `python examples/quickstart.py` needs none.
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
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from lightning_interp import (
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier, mnist_cnn

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASS_NAMES = [str(digit) for digit in range(10)]
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
    parser.add_argument("--data-dir", default="./data", help="holds MNIST/raw/... (default ./data)")
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download MNIST into --data-dir when it is missing (default: try)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
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
    """What to tell a user whose MNIST files are missing and could not be downloaded."""
    root = os.path.abspath(data_dir)
    raw = os.path.join(root, "MNIST", "raw")
    missing = [name for name in RAW_FILES if not os.path.isfile(os.path.join(raw, name))]
    if download_error is not None:
        why = f"downloading it failed ({_root_cause(download_error)})"
    else:
        why = "downloading is off (--no-download; without it the script fetches MNIST itself)"
    return "\n".join(
        [
            f"MNIST is not in {raw}/ and {why}.",
            f"Missing: {', '.join(missing) or 'none (but torchvision could not read the files)'}.",
            "To get the data, either:",
            "  - run this script once where the internet is reachable and copy its MNIST/ folder into --data-dir, or",
            "  - fetch the four .gz files (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/), gunzip them",
            f"    into {raw}/ and run again with --data-dir {data_dir}.",
            "No data at hand? `python examples/quickstart.py` trains on generated shapes and needs no download.",
        ]
    )


def load_mnist(data_dir: str, download: bool) -> tuple[Dataset, Dataset]:
    """The MNIST train and test splits, normalised; exits with a clear message when they cannot be had."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])

    def open_splits() -> tuple[Dataset, Dataset]:
        train = datasets.MNIST(data_dir, train=True, transform=transform, download=False)
        test = datasets.MNIST(data_dir, train=False, transform=transform, download=False)
        return train, test

    try:
        return open_splits()
    except RuntimeError:  # torchvision's "Dataset not found"
        if not download:
            raise SystemExit(missing_data_message(data_dir, None)) from None
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            datasets.MNIST(data_dir, train=True, download=True)
    except Exception as error:  # no network, a proxy, a full disk, a checksum mismatch, ...
        raise SystemExit(missing_data_message(data_dir, error)) from None
    return open_splits()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, log, print where the logs are; return the final logged metrics."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    train_set, test_set = load_mnist(args.data_dir, args.download)
    loader_options = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
    }
    train_loader = DataLoader(train_set, shuffle=True, **loader_options)
    val_loader = DataLoader(test_set, shuffle=False, **loader_options)

    model = ImageClassifier(mnist_cnn(num_classes=len(CLASS_NAMES)), lr=args.lr)
    saliency = SaliencyCallback(
        methods=("gradient", "integrated_gradients"), num_samples=args.num_samples, class_names=CLASS_NAMES
    )
    gradcam = GradCAMCallback(layer="auto", num_samples=args.num_samples, class_names=CLASS_NAMES)
    probes = LinearProbeCallback(layers="auto", num_samples=args.representation_samples)
    similarity = RepresentationSimilarityCallback(layers="auto", num_samples=min(512, args.representation_samples))
    logger = TensorBoardLogger(args.log_dir, name="mnist")
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
