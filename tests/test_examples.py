"""The MNIST and CIFAR-10 example scripts, run end to end on tiny fake datasets in torchvision's on-disk formats."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import pickle
import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from torchvision import datasets

from tests.conftest import read_events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- fake datasets
def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships them (unzipped): big-endian magic 0x0000 08 <ndim>, then each dim, then bytes."""
    assert array.dtype == np.uint8
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> None:
    """``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``: what ``MNIST(root, download=False)`` reads.

    torchvision only checks that the four files exist (no checksum on the unzipped files).
    """
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def write_fake_cifar10(root: Path, per_batch: int = 16, n_test: int = 32, seed: int = 0) -> dict[str, str]:
    """``<root>/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta; returns name -> md5.

    The files are pickled dicts like the real (Python 2) ones: str keys, ``"data"`` a uint8 (N, 3072) array in
    channel-major order, ``"labels"`` a list of ints; batches.meta holds ``"label_names"``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    contents = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in contents.items():
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": [int(label) for label in np.arange(n) % 10],
            "filenames": [f"fake_{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch) -> Path:
    """A fake CIFAR-10 under tmp_path, with torchvision told its checksums.

    ``CIFAR10(download=False)`` compares the md5 of every batch file (``_check_integrity``) and of batches.meta
    (``_load_meta``) with the real dataset's, which fake files cannot match. Instead of disabling the checks, the
    test swaps the expected checksums (class attributes ``train_list``, ``test_list``, ``meta``) for the fake
    files' own, so torchvision's loading code runs unchanged.
    """
    root = tmp_path / "data"
    md5 = write_fake_cifar10(root)
    cifar = datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, md5[name]] for name, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[name, md5[name]] for name, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5[cifar.meta["filename"]]})
    return root


def tiny_run_args(data_dir: Path, log_dir: Path) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--log-dir",
        str(log_dir),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--num-samples",
        "4",
        "--representation-samples",
        "32",
        "--limit-train-batches",
        "2",
        "--limit-val-batches",
        "1",
        "--num-workers",
        "0",
        "--accelerator",
        "cpu",
    ]


# ---------------------------------------------------------------------- the fakes are what torchvision reads
def test_fake_datasets_load_with_torchvision(tmp_path, fake_cifar10):
    write_fake_mnist(tmp_path / "mnist")
    train, test = datasets.MNIST(tmp_path / "mnist", train=True), datasets.MNIST(tmp_path / "mnist", train=False)
    assert (len(train), len(test)) == (64, 32)
    assert train[13][0].size == (28, 28) and train[13][1] == 3

    train, test = datasets.CIFAR10(fake_cifar10, train=True), datasets.CIFAR10(fake_cifar10, train=False)
    assert (len(train), len(test)) == (80, 32)
    assert train.classes == CIFAR10_CLASSES
    assert train[13][0].size == (32, 32) and train[13][1] == 3


# ---------------------------------------------------------------------- one tiny epoch of each script
def test_mnist_example_logs_maps_and_scores(tmp_path, capsys):
    write_fake_mnist(tmp_path / "data")
    metrics = load_example("mnist").main(tiny_run_args(tmp_path / "data", tmp_path / "logs"))

    events = read_events(str(tmp_path / "logs"))
    assert events.image_steps("interp_saliency/maps/rows_1-2") == [1]  # after two training steps, as val_loss
    assert events.image_steps("interp_gradcam/maps/rows_1-2") == [1]
    for tag in ("interp_probe/accuracy_by_depth", "interp_similarity/cka", "interp_similarity/rdm"):
        assert events.image_steps(tag) == [1], tag
    assert any(tag.startswith("interp_probe/") and tag.endswith("/accuracy") for tag in events.scalars)
    for method in ("gradient", "integrated_gradients"):
        assert f"interp_saliency/{method}/concentration" in events.scalars
    assert "interp_saliency/integrated_gradients/completeness_error" in events.scalars
    assert any(tag.startswith("interp_gradcam/") and tag.endswith("/concentration") for tag in events.scalars)
    assert 0.0 <= metrics["val_acc"] <= 1.0
    assert "logs written to" in capsys.readouterr().out


def test_mnist_example_with_uncertainty_logs_mc_dropout_numbers(tmp_path, capsys):
    write_fake_mnist(tmp_path / "data")
    metrics = load_example("mnist").main([*tiny_run_args(tmp_path / "data", tmp_path / "logs"), "--uncertainty"])
    events = read_events(str(tmp_path / "logs"))
    assert events.image_steps("interp_uncertainty/most_uncertain") == [1]
    total = metrics["interp_uncertainty/predictive_entropy"]
    epistemic = metrics["interp_uncertainty/mutual_information"]
    assert 0.0 < total <= math.log(10) + 1e-6 and 0.0 < epistemic < total  # two dropout layers: the passes disagree
    assert events.image_steps("interp_calibration/reliability") == [1]
    assert events.image_steps("interp_uncertainty/gradient/maps") == [1]
    assert events.image_steps("interp_bias/confusion") == [1] and events.image_steps("interp_bias/class_counts") == [0]
    assert metrics["interp_uncertainty/gradient/map_agreement"] < 1.0  # the two dropout layers change the maps
    assert 0.0 <= metrics["interp_calibration/ece"] <= 1.0
    printed = capsys.readouterr().out
    assert "MC-dropout uncertainty of the probe set" in printed and "calibration: ECE" in printed


def test_text_example_logs_attention_and_token_saliency_as_text(tmp_path, capsys):
    arguments = ["--epochs", "1", "--train-size", "128", "--val-size", "48", "--num-samples", "4"]
    metrics = load_example("text_classification").main([*arguments, "--log-dir", str(tmp_path / "logs")])
    events = read_events(str(tmp_path / "logs"))
    layer = "net.encoder.layers.1.self_attn"
    for tag in ("interp_attention/maps", f"interp_attention/{layer}/heads", "interp_saliency/maps"):
        assert events.image_steps(tag) == [1], tag
        assert events.images[tag][-1][1][1] == 900  # the text pictures, not a strip of token ids
    for tag in (f"interp_attention/{layer}/entropy", "interp_attention/rollout/concentration"):
        assert 0.0 < metrics[tag] <= 1.0, tag
    assert "interp_saliency/integrated_gradients/completeness_error" in metrics
    assert 0.0 <= metrics["interp_attention/rollout/localization"] <= 1.0  # the keyword masks travel with the batches
    assert any(tag.startswith("interp_probe/") for tag in metrics)
    printed = capsys.readouterr().out
    assert "attention rollout:" in printed and "of its mass on the keywords (a uniform map:" in printed


def test_cifar10_example_logs_maps_and_scores(tmp_path, fake_cifar10):
    metrics = load_example("cifar10").main(tiny_run_args(fake_cifar10, tmp_path / "logs"))

    events = read_events(str(tmp_path / "logs"))
    assert events.image_steps("interp_saliency/maps/rows_1-2") == [1]
    assert events.image_steps("interp_gradcam/maps/rows_1-2") == [1]
    for tag in ("interp_probe/accuracy_by_depth", "interp_similarity/cka", "interp_similarity/rdm"):
        assert events.image_steps(tag) == [1], tag
    assert any(tag.startswith("interp_probe/") and tag.endswith("/accuracy") for tag in events.scalars)
    for method in ("gradient", "integrated_gradients"):
        assert f"interp_saliency/{method}/concentration" in events.scalars
    assert "interp_gradcam/net.layer3/concentration" in events.scalars  # layer="auto" found the last stage
    assert 0.0 <= metrics["val_acc"] <= 1.0


def test_cifar10_example_with_calibration_logs_ece_and_class_balance(tmp_path, fake_cifar10):
    metrics = load_example("cifar10").main([*tiny_run_args(fake_cifar10, tmp_path / "logs"), "--calibration"])
    events = read_events(str(tmp_path / "logs"))
    assert events.image_steps("interp_calibration/reliability") == [1]
    assert events.image_steps("interp_bias/class_counts") == [0]
    assert 0.0 <= metrics["interp_calibration/ece"] <= 1.0
    assert "interp_bias/recall_gap" in metrics
    # CIFAR has no masks: the border-share proxy, a share of each class's map mass in [0, 1]
    shares = [value for key, value in metrics.items() if key.endswith("/border_share")]
    assert shares and all(0.0 <= value <= 1.0 for value in shares)
    assert events.image_steps("interp_bias/attribution_by_class") == [1]


# ---------------------------------------------------------------------- no data, no network: one clear message
@pytest.mark.parametrize(("name", "layout"), [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_data_without_download_exits_with_a_clear_message(tmp_path, name, layout):
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit) as raised:
        load_example(name).main(["--data-dir", str(empty), "--no-download", "--log-dir", str(tmp_path / "logs")])
    message = str(raised.value.code)
    assert str(empty / layout) in message  # where it looked
    assert "--no-download" in message  # why it did not fetch the data
    assert "python examples/quickstart.py" in message  # the offline way out
    assert not empty.exists()  # nothing was created


@pytest.mark.parametrize(("name", "dataset"), [("mnist", datasets.MNIST), ("cifar10", datasets.CIFAR10)])
def test_failed_download_exits_with_the_network_error(tmp_path, monkeypatch, name, dataset):
    def offline_download(self):
        raise RuntimeError("Error downloading:\nTried https://example.invalid/, got:\n<urlopen error no network>\n")

    monkeypatch.setattr(dataset, "download", offline_download)
    with pytest.raises(SystemExit) as raised:
        load_example(name).main(["--data-dir", str(tmp_path / "empty"), "--log-dir", str(tmp_path / "logs")])
    message = str(raised.value.code)
    assert "downloading it failed (<urlopen error no network>)" in message
    assert "python examples/quickstart.py" in message


@pytest.mark.slow
def test_huggingface_example_puts_attention_and_attributions_on_the_keywords(tmp_path, capsys):
    """A small BERT from a config, trained with dict batches padded per batch: its maps fall on the keywords far
    more than a uniform map would, and nothing of the padding is shown or scored."""
    pytest.importorskip("transformers")
    example = load_example("huggingface_text")
    metrics = example.main(["--log-dir", str(tmp_path / "logs"), "--threads", "2"])  # the defaults: ~30 s
    assert metrics["val_acc"] > 0.9
    val = example.Sentences(example.make_keyword_text(192, seed=1))
    lengths = [len(sample["input_ids"]) for sample in val]
    keywords = [int(sample["mask"].sum()) for sample in val]
    uniform = sum(k / n for k, n in zip(keywords, lengths, strict=True) if k) / sum(1 for k in keywords if k)
    for tag in ("interp_saliency/integrated_gradients/localization", "interp_attention/rollout/localization"):
        assert metrics[tag] > 2 * uniform, (tag, metrics[tag], uniform)
    layer = next(
        tag for tag in metrics if tag.startswith("interp_attention/") and tag.endswith("attention.self/localization")
    )
    assert metrics[layer] > 2 * uniform
    events = read_events(str(tmp_path / "logs"))
    assert events.image_steps("interp_saliency/maps")[-1] == events.image_steps("interp_attention/maps")[-1]
    assert any(tag.startswith("interp_probe/model.bert.encoder.layer.1") for tag in metrics)
    assert "of its mass on the keywords" in capsys.readouterr().out
