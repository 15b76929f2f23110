"""Text classification: train a small transformer on offline keyword text and watch its attention.

Runs anywhere, with no download: the package generates the data (sequences of
filler words in which one to three keywords decide between negative and
positive, and neutral sentences have none; see ``lightning_interp.synthetic_text``),
so one can check that attention and attributions fall on the keywords. About
40 seconds on two CPU cores.

    python examples/text_classification.py
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import (
    AttentionCallback,
    DataDescription,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier, TextTransformer
from lightning_interp.synthetic_text import PAD_ID, TEXT_CLASSES, VOCABULARY, make_keyword_text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--train-size", type=int, default=2048, help="synthetic training sentences")
    parser.add_argument("--val-size", type=int, default=256, help="synthetic validation sentences")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=8, help="probe sentences shown by each callback")
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of (ids, label, keyword mask): the mask marks the evidence tokens, so the
    callbacks log each map's localization on them (its share of the mass on the keywords)."""
    train = make_keyword_text(args.train_size, seed=args.seed)
    val = make_keyword_text(args.val_size, seed=args.seed + 1)
    train_loader = DataLoader(TensorDataset(*train), batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=args.batch_size)
    return train_loader, val_loader


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, log, print what the attention and the saliency maps put on the keywords; return the final metrics."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = loaders(args)
    model = ImageClassifier(TextTransformer(len(VOCABULARY), len(TEXT_CLASSES), pad_id=PAD_ID), lr=3e-3)
    words = DataDescription(vocabulary=VOCABULARY, pad_id=PAD_ID, class_names=TEXT_CLASSES)
    callbacks = [
        AttentionCallback(num_samples=args.num_samples, data=words),  # given once: the other callbacks use it too
        SaliencyCallback(
            methods=("gradient", "integrated_gradients"), input_layer="auto", num_samples=args.num_samples
        ),
        LinearProbeCallback(layers="auto", num_samples=args.val_size),
        RepresentationSimilarityCallback(layers="auto", num_samples=min(256, args.val_size)),
    ]
    logger = TensorBoardLogger(args.log_dir, name="text_classification")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        deterministic=True,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, train_loader, val_loader)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    print()
    print(f"validation accuracy: {metrics.get('val_acc', float('nan')):.3f}")
    attention, saliency = callbacks[0], callbacks[1]
    probe = attention.probe
    if probe is not None and probe.masks is not None:
        has = probe.masks.any(dim=1)  # the positive and negative sentences (neutral ones have no keywords)
        uniform = float((probe.masks.sum(1) / (probe.inputs != PAD_ID).sum(1))[has].mean())
        for callback in (attention, saliency):
            for key in callback.last_maps:
                share = metrics.get(f"interp_{callback.name}/{key}/localization", float("nan"))
                print(f"{callback.name} {key}: {share:.2f} of its mass on the keywords (a uniform map: {uniform:.2f})")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {args.log_dir})")
    return metrics


if __name__ == "__main__":
    main()
