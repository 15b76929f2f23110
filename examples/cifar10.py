"""CIFAR-10: train a small ResNet and watch its saliency maps, Grad-CAM, probes and CKA evolve.

Training uses random-crop and horizontal-flip augmentation; validation runs on
the CIFAR-10 test split. At each validation epoch a fixed, class-stratified
probe set of test images is explained with plain gradients, integrated
gradients and Grad-CAM (layer="auto" picks the last residual stage,
``net.layer3``), and the maps and their scores go to TensorBoard, next to linear-probe accuracy and
CKA / RSA of the layers on 1024 test images.

    python examples/cifar10.py                   # downloads CIFAR-10 (163 MB) into ./data on the first run
    python examples/cifar10.py --data-dir /datasets --no-download
    python examples/cifar10.py --calibration     # adds calibration and dataset bias (with Grad-CAM border shares)
    tensorboard --logdir lightning_logs

Offline, the script reads torchvision's layout: <data-dir>/cifar-10-batches-py/
holding data_batch_1 ... data_batch_5, test_batch and batches.meta (the
unpacked "python version" archive). No data at all? `python examples/quickstart.py`
needs none.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from torchvision import datasets, transforms

from lightning_interp import CalibrationCallback, DataDescription, DatasetBiasCallback
from lightning_interp.demo import ImageClassifier, cifar_resnet

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # imported by file path (tests, importlib): _common.py lies next to this script
    sys.path.insert(0, _HERE)
from _common import describe_missing_data, example_parser, fit_and_report, load_splits, set_up  # noqa: E402

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ResNet's own option, listed after --lr."""
    parser.add_argument("--width", type=int, default=32, help="channels of the first residual stage (default 32)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = example_parser(
        __doc__, dataset="CIFAR-10", layout="cifar-10-batches-py/", epochs=10, model_arguments=add_model_arguments
    )
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="also log the test set's calibration (ECE, reliability diagram, temperature) and its per-class recall "
        "and class balance, and per class how much of its Grad-CAM mass lies on the image border (a background "
        "cue; the ResNet has no dropout, so no MC-dropout uncertainty)",
    )
    return parser.parse_args(argv)


def missing_data_message(data_dir: str, download_error: BaseException | None) -> str:
    """What to tell a user whose CIFAR-10 files are missing (or damaged) and could not be downloaded."""
    root = os.path.abspath(data_dir)
    how_to_get_it = [
        "  - run this script once where the internet is reachable and copy its cifar-10-batches-py/ folder",
        "    into --data-dir, or",
        f"  - fetch {ARCHIVE_URL} (the python version),",
        f"    unpack it with `tar xzf cifar-10-python.tar.gz -C {root}` and run again with --data-dir {data_dir}.",
    ]
    return describe_missing_data(
        "CIFAR-10",
        os.path.join(root, datasets.CIFAR10.base_folder),
        FILES,
        download_error,
        none_missing="All files are there but a checksum does not match: delete the folder and fetch it again.",
        how_to_get_it=how_to_get_it,
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
    return load_splits(datasets.CIFAR10, data_dir, download, train_transform, test_transform, missing_data_message)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train the small ResNet on CIFAR-10, log, print where the logs are; return the final logged metrics."""
    args = parse_args(argv)
    set_up(args)
    train_set, test_set = load_cifar10(args.data_dir, args.download)
    class_names = list(train_set.classes)
    model = ImageClassifier(cifar_resnet(num_classes=len(class_names), width=args.width), lr=args.lr)
    extra = []
    if args.calibration:  # CIFAR-10 photos are object-centred: the border share is a fair proxy of background cues
        extra = [
            CalibrationCallback(),
            DatasetBiasCallback(methods="grad_cam", data=DataDescription(class_names=class_names)),
        ]
    return fit_and_report(
        args, model, train_set, test_set, class_names=class_names, name="cifar10", extra_callbacks=extra
    )


if __name__ == "__main__":
    main()
