"""MNIST: train the classic 2-conv / 2-fc network and watch its saliency maps, Grad-CAM, probes and CKA evolve.

Validation runs on the MNIST test split; at each validation epoch a fixed,
class-stratified probe set of test digits is explained with plain gradients,
integrated gradients and Grad-CAM, and the maps and their scores go to
TensorBoard, next to linear-probe accuracy and CKA / RSA of
the layers on 1024 test images. The network usually reaches about 99% test accuracy in a few epochs.

    python examples/mnist.py                     # downloads MNIST into ./data on the first run
    python examples/mnist.py --data-dir /datasets --no-download
    python examples/mnist.py --uncertainty       # adds MC-dropout uncertainty, calibration and dataset bias
    tensorboard --logdir lightning_logs

Offline, the script reads torchvision's layout: <data-dir>/MNIST/raw/ holding
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte. No data at all? `python examples/quickstart.py` needs none.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from lightning_interp import CalibrationCallback, DataDescription, DatasetBiasCallback, UncertaintyCallback
from lightning_interp.demo import ImageClassifier, mnist_cnn

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # imported by file path (tests, importlib): _common.py lies next to this script
    sys.path.insert(0, _HERE)
from _common import describe_missing_data, example_parser, fit_and_report, load_splits, set_up  # noqa: E402

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASS_NAMES = [str(digit) for digit in range(10)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, dataset="MNIST", layout="MNIST/raw/...", epochs=3)
    parser.add_argument(
        "--uncertainty",
        action="store_true",
        help="also log MC-dropout uncertainty of the probe set (the network's two dropout layers) and the "
        "calibration of the test set (ECE, reliability diagram, temperature) and its per-class recall and balance",
    )
    return parser.parse_args(argv)


def missing_data_message(data_dir: str, download_error: BaseException | None) -> str:
    """What to tell a user whose MNIST files are missing and could not be downloaded."""
    raw = os.path.join(os.path.abspath(data_dir), "MNIST", "raw")
    how_to_get_it = [
        "  - run this script once where the internet is reachable and copy its MNIST/ folder into --data-dir, or",
        "  - fetch the four .gz files (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/), gunzip them",
        f"    into {raw}/ and run again with --data-dir {data_dir}.",
    ]
    none_missing = "Missing: none (but torchvision could not read the files)."
    return describe_missing_data(
        "MNIST", raw, RAW_FILES, download_error, none_missing=none_missing, how_to_get_it=how_to_get_it
    )


def load_mnist(data_dir: str, download: bool) -> tuple[Dataset, Dataset]:
    """The MNIST train and test splits, normalised; exits with a clear message when they cannot be had."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    return load_splits(datasets.MNIST, data_dir, download, transform, transform, missing_data_message)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train the 2-conv / 2-fc network on MNIST, log, print where the logs are; return the final logged metrics."""
    args = parse_args(argv)
    set_up(args)
    train_set, test_set = load_mnist(args.data_dir, args.download)
    model = ImageClassifier(mnist_cnn(num_classes=len(CLASS_NAMES)), lr=args.lr)
    extra = (
        [
            UncertaintyCallback(num_samples=256, methods="gradient", data=DataDescription(class_names=CLASS_NAMES)),
            CalibrationCallback(),
            DatasetBiasCallback(data=DataDescription(class_names=CLASS_NAMES)),
        ]
        if args.uncertainty
        else []
    )
    return fit_and_report(
        args, model, train_set, test_set, class_names=CLASS_NAMES, name="mnist", extra_callbacks=extra
    )


if __name__ == "__main__":
    main()
