"""What the dataset examples (mnist.py, cifar10.py) share: options, data loading with a clear offline message, the run.

Not a script: the examples import it with ``from _common import ...`` (their own folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import VisionDataset

from lightning_interp import (
    DataDescription,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)

DOWNLOAD_TIMEOUT_S = 30.0
QUICKSTART_HINT = "No data at hand? `python examples/quickstart.py` trains on generated shapes and needs no download."

DatasetT = TypeVar("DatasetT", bound=VisionDataset)


# ---------------------------------------------------------------------- command line
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


def example_parser(
    description: str | None,
    *,
    dataset: str,
    layout: str,
    epochs: int,
    model_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """The options every dataset example takes.

    Args:
        description: the script's docstring, shown by ``--help``.
        dataset: the dataset's name in the help texts ("MNIST").
        layout: what ``--data-dir`` holds, as its help text says it ("MNIST/raw/...").
        epochs: the default of ``--epochs``.
        model_arguments: adds the script's own model options, listed right after ``--lr``.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help=f"holds {layout} (default ./data)")
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"download {dataset} into --data-dir when it is missing (default: try)",
    )
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    if model_arguments is not None:
        model_arguments(parser)
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
    return parser


# ---------------------------------------------------------------------- data
@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Let a blocked download fail instead of hanging on a firewalled network."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def root_cause(error: BaseException) -> str:
    """The last line of an error message (torchvision puts the network error there)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def describe_missing_data(
    dataset: str,
    folder: str,
    files: Sequence[str],
    download_error: BaseException | None,
    *,
    none_missing: str,
    how_to_get_it: Sequence[str],
) -> str:
    """What to tell a user whose dataset files are missing (or unreadable) and could not be downloaded.

    Args:
        dataset: the dataset's name ("MNIST").
        folder: the absolute folder the files should be in.
        files: the file names expected in ``folder``.
        download_error: why the download failed; None when downloading was off.
        none_missing: the line said in place of "Missing: ..." when every file is there.
        how_to_get_it: the lines after "To get the data, either:".
    """
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if download_error is not None:
        why = f"downloading it failed ({root_cause(download_error)})"
    else:
        why = f"downloading is off (--no-download; without it the script fetches {dataset} itself)"
    found = f"Missing: {', '.join(missing)}." if missing else none_missing
    return "\n".join(
        [
            f"{dataset} is not in {folder}/ and {why}.",
            found,
            "To get the data, either:",
            *how_to_get_it,
            QUICKSTART_HINT,
        ]
    )


def load_splits(
    dataset: type[DatasetT],
    data_dir: str,
    download: bool,
    train_transform: Callable[[Any], Any],
    test_transform: Callable[[Any], Any],
    missing_data_message: Callable[[str, BaseException | None], str],
) -> tuple[DatasetT, DatasetT]:
    """The train and test splits of a torchvision dataset, downloaded first if missing and allowed.

    Exits with ``missing_data_message(data_dir, None)`` when the data is missing and downloading is off, with
    ``missing_data_message(data_dir, error)`` when the download fails.
    """

    def open_splits() -> tuple[DatasetT, DatasetT]:
        train = dataset(data_dir, train=True, transform=train_transform, download=False)
        test = dataset(data_dir, train=False, transform=test_transform, download=False)
        return train, test

    try:
        return open_splits()
    except RuntimeError:  # torchvision's "Dataset not found (or corrupted)"
        if not download:
            raise SystemExit(missing_data_message(data_dir, None)) from None
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            dataset(data_dir, train=True, download=True)
    except Exception as error:  # no network, a proxy, a full disk, a checksum mismatch, ...
        raise SystemExit(missing_data_message(data_dir, error)) from None
    return open_splits()


# ---------------------------------------------------------------------- the run
def set_up(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and ``--seed``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)


def fit_and_report(
    args: argparse.Namespace,
    model: pl.LightningModule,
    train_set: Dataset,
    test_set: Dataset,
    *,
    class_names: Sequence[str],
    name: str,
    extra_callbacks: Sequence[pl.Callback] = (),
) -> dict[str, float]:
    """Train with the interpretability callbacks, validating on ``test_set``; print a summary, return the metrics."""
    loader_options: dict[str, Any] = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
    }
    train_loader = DataLoader(train_set, shuffle=True, **loader_options)
    val_loader = DataLoader(test_set, shuffle=False, **loader_options)

    saliency = SaliencyCallback(
        methods=("gradient", "integrated_gradients"),
        num_samples=args.num_samples,
        data=DataDescription(class_names=class_names),
    )
    gradcam = GradCAMCallback(layer="auto", num_samples=args.num_samples, data=DataDescription(class_names=class_names))
    probes = LinearProbeCallback(layers="auto", num_samples=args.representation_samples)
    similarity = RepresentationSimilarityCallback(layers="auto", num_samples=min(512, args.representation_samples))
    logger = TensorBoardLogger(args.log_dir, name=name)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        callbacks=[saliency, gradcam, probes, similarity, *extra_callbacks],
        logger=logger,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    print()
    print(f"test accuracy: {metrics.get('val_acc', float('nan')):.4f}")
    for layer in gradcam.layers:
        key = f"interp_gradcam/{layer}/concentration"
        if key in metrics:
            print(f"Grad-CAM layer {layer}: {metrics[key]:.3f} of the map's mass in its top 10% of pixels")
    if "interp_uncertainty/mutual_information" in metrics:
        print(
            f"MC-dropout uncertainty of the probe set: {metrics['interp_uncertainty/predictive_entropy']:.3f} nats "
            f"in all, {metrics['interp_uncertainty/mutual_information']:.3f} of it epistemic"
        )
    if "interp_calibration/ece" in metrics:
        print(
            f"calibration: ECE {metrics['interp_calibration/ece']:.3f}, "
            f"{metrics['interp_calibration/ece_after_temperature']:.3f} after temperature scaling "
            f"(T = {metrics['interp_calibration/temperature']:.2f})"
        )
    print(f"logs written to {os.path.abspath(logger.log_dir)}")
    print(f"view them with:  tensorboard --logdir {args.log_dir}")
    return metrics
