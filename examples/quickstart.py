"""Quickstart: train a small CNN on offline synthetic shapes and watch its explanations.

Runs anywhere, with no download: the package generates the data (shapes over
clutter, with object masks), so Grad-CAM and saliency localization scores are
logged next to the maps; linear probes and CKA / RSA show what the layers
learn and when they settle. Under a minute on two CPU cores.

    python examples/quickstart.py
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp import (
    ActivationMapsCallback,
    ConceptCallback,
    DataDescription,
    DatasetBiasCallback,
    Display,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.synthetic import SHAPE_CLASSES, SyntheticShapesDataModule, make_shapes

RARE_CLASS, TINTED_CLASS = SHAPE_CLASSES.index("triangle"), SHAPE_CLASSES.index("cross")
"""The biases --biased plants: triangles are rare, crosses always come on a red background."""


def concept_examples(count: int = 40, image_size: int = 32, seed: int = 1000) -> dict[str, torch.Tensor]:
    """Two concepts for TCAV, from seeds the training data does not use: horizontal stripes (straight horizontal
    edges, which squares, triangles and crosses have and discs lack) and discs (images of the disc class, at random
    positions over clutter: too varied for one linear direction in a spatial layer, so its CAVs stay near chance
    and ConceptCallback logs only their accuracy)."""
    images, labels, _ = make_shapes(8 * count, image_size=image_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(image_size, dtype=torch.float32)[:, None]
    period = 3 + torch.randint(4, (count, 1, 1), generator=generator)
    phase = torch.randint(6, (count, 1, 1), generator=generator)
    stripes = ((rows[None] + phase) % period < period / 2).float().expand(count, image_size, image_size)
    colour = 0.3 + 0.7 * torch.rand(count, 3, 1, 1, generator=generator)
    striped = 0.15 + (colour - 0.15) * stripes[:, None]
    return {"disc": images[labels == 0][:count], "stripes": striped}


def _rows_per_image(text: str) -> int | str | None:
    """``--rows-per-image``: 'auto', 'none' or a positive number."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or a positive number, got {text!r}")
    return int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--train-size", type=int, default=4096, help="synthetic training images")
    parser.add_argument("--val-size", type=int, default=512, help="synthetic validation images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=8, help="probe samples shown by each callback")
    parser.add_argument(
        "--rows-per-image",
        type=_rows_per_image,
        default="auto",
        help="probe rows per map grid image: 'auto' (the default: 2, legible in TensorBoard's Time Series cards), a "
        "number, or 'none' for one tall grid per run (read it in the Images tab)",
    )
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--inside",
        action="store_true",
        help="also look inside the network: feature maps and dead units of the ReLU layers, images optimised for "
        "each class (feature visualisation) and TCAV scores of two concepts",
    )
    parser.add_argument(
        "--quality",
        action="store_true",
        help="also score the explanations every epoch (deletion / insertion, top-20%% removal, the randomisation "
        "sanity check, sparseness) for four methods and random maps, with a ranked comparison table",
    )
    parser.add_argument(
        "--biased",
        action="store_true",
        help="plant two biases in the data (triangles 12 times rarer than the other shapes; crosses always on a red "
        "background, the other shapes never) and add DatasetBiasCallback to find them",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, log, print where the logs are; return the final logged metrics."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    bias = {}
    if args.biased:
        weights = [1.0] * len(SHAPE_CLASSES)
        weights[RARE_CLASS] = 1 / 12
        bias = {"class_weights": weights, "tinted_class": TINTED_CLASS, "tint_share": 1.0}
    data = SyntheticShapesDataModule(args.train_size, args.val_size, batch_size=args.batch_size, seed=args.seed, **bias)
    model = ImageClassifier(shapes_cnn(num_classes=data.num_classes))
    callbacks = [
        SaliencyCallback(
            methods=("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients"),
            num_samples=args.num_samples,
            data=DataDescription(class_names=data.class_names),
            display=Display(rows_per_image=args.rows_per_image),
        ),
        GradCAMCallback(
            layer=["net.4", "net.7"],
            num_samples=args.num_samples,
            data=DataDescription(class_names=data.class_names),
            display=Display(rows_per_image=args.rows_per_image),
        ),
        LinearProbeCallback(layers="auto", num_samples=args.val_size),
        RepresentationSimilarityCallback(layers="auto", num_samples=min(256, args.val_size)),
    ]
    inside = []
    if args.inside:
        inside = [
            ActivationMapsCallback(num_samples=args.num_samples, data=DataDescription(class_names=data.class_names)),
            FeatureVisualizationCallback(
                targets="classes", every_n_epochs=2, data=DataDescription(class_names=data.class_names)
            ),
            ConceptCallback(concept_examples(), layers=["net.4"], data=DataDescription(class_names=data.class_names)),
        ]
    callbacks += inside
    report = ReportCallback()  # a self-contained HTML report of the run at the end of fit
    callbacks.append(report)
    quality = None
    if args.quality:
        quality = ExplanationQualityCallback(
            ["gradient", "integrated_gradients", "guided_backprop", ("grad_cam", {"layer": "net.7"})]
        )
        callbacks.append(quality)
    bias_callback = None
    if args.biased:
        bias_callback = DatasetBiasCallback(
            methods={"grad_cam": {"layer": "net.7"}},
            data=DataDescription(class_names=data.class_names),
        )
        callbacks.append(bias_callback)
    logger = TensorBoardLogger(args.log_dir, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        deterministic=True,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    print()
    print(f"validation accuracy: {metrics.get('val_acc', float('nan')):.3f}")
    probe = callbacks[1].probe
    uniform = float(probe.masks.float().mean()) if probe is not None and probe.masks is not None else float("nan")
    for layer in ("net.4", "net.7"):
        key = f"interp_gradcam/{layer}/localization"
        if key in metrics:
            print(
                f"Grad-CAM localization ({layer}): {metrics[key]:.3f} of the map's mass on the object "
                f"(a uniform map: {uniform:.3f})"
            )
    for layer in callbacks[2].layers:
        key = f"interp_probe/{layer}/accuracy"
        if key in metrics:
            print(f"linear probe on {layer}: {metrics[key]:.3f} held-out accuracy")
    if inside:
        for layer in inside[0].layers:
            key = f"interp_activations/{layer}/dead_fraction"
            if key in metrics:
                print(f"dead units at {layer}: {metrics[key]:.0%} of its channels never fire on the probe set")
        for concept in ("stripes", "disc"):
            base = f"interp_tcav/{concept}/net.4"
            scores = [
                f"{name} {metrics[f'{base}/{name}/tcav']:.2f} "
                f"(p={metrics.get(f'{base}/{name}/p_value', float('nan')):.2g})"
                for name in data.class_names  # the tags name the classes
                if f"{base}/{name}/tcav" in metrics
            ]
            accuracy = metrics.get(f"{base}/cav_accuracy", float("nan"))
            found = ", ".join(scores) if scores else "no score (CAVs at chance)"
            print(f"TCAV of '{concept}' at net.4 (CAV accuracy {accuracy:.2f}): {found}")
    if quality is not None:
        print("explanation quality (deletion AUC: lower is better; similarity to the untrained network's maps: lower")
        print("means the maps depend more on what was learnt):")
        for key in [*quality.keys, "random"]:
            deletion = metrics.get(f"interp_quality/{key}/deletion_auc", float("nan"))
            sanity = metrics.get(f"interp_quality/{key}/sanity_rank_correlation")
            told = "" if sanity is None else f", similarity to the untrained network's maps {sanity:.2f}"
            print(f"  {key}: deletion AUC {deletion:.3f}{told}")
    if bias_callback is not None:
        for split, balance in bias_callback.balances.items():
            print(
                f"{split} set: rarest class {data.class_names[balance.rarest]!r} "
                f"({int(balance.counts[balance.rarest])} of {int(balance.counts.sum())}), imbalance ratio "
                f"{balance.imbalance_ratio:.1f}"
            )
        recalls = ", ".join(
            f"{name} {metrics[f'interp_bias/{name}/recall']:.2f}"
            for name in data.class_names
            if f"interp_bias/{name}/recall" in metrics
        )
        print(f"validation recall per class: {recalls}")
        lifts = ", ".join(
            f"{name} {metrics[f'interp_bias/{name}/localization_lift']:.2f}"
            for name in data.class_names
            if f"interp_bias/{name}/localization_lift" in metrics
        )
        print(f"Grad-CAM mass on the object over a uniform map's, per true class: {lifts}")
    print(f"logs written to {os.path.abspath(logger.log_dir)}")
    if report.path is not None:
        print(f"report (open it in a browser): {os.path.abspath(report.path)}")
    print(f"view them with:  tensorboard --logdir {args.log_dir}")
    return metrics


if __name__ == "__main__":
    main()
