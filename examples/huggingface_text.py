"""A HuggingFace model as people train one: a small BERT on offline keyword text, with dict batches.

Runs anywhere, with no download: the BERT is built from a small config with random weights
(``BertForSequenceClassification``), the package generates the data (filler words in which one to three keywords
decide between negative and positive; neutral sentences have none; see ``lightning_interp.synthetic_text``), and
a collate function pads each batch to its own longest sentence and gives the ``attention_mask``, as
HuggingFace's ``DataCollatorWithPadding`` does. The callbacks call the model as the batches feed it (with its
attention mask), read its ``logits``, leave the padding out of every map and probe, and check where attention and
attributions fall against the keyword masks. About 30 seconds on two CPU cores.

    python examples/huggingface_text.py
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_interp import (
    AttentionCallback,
    DataDescription,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)
from lightning_interp.synthetic_text import PAD_ID, TEXT_CLASSES, VOCABULARY, KeywordText, make_keyword_text

CLS_ID = len(VOCABULARY)  # a [CLS] token in front of each sentence: BERT classifies from its output
WORDS = (*VOCABULARY, "[CLS]")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--train-size", type=int, default=2048, help="synthetic training sentences")
    parser.add_argument("--val-size", type=int, default=192, help="synthetic validation sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=8, help="probe sentences shown by the map callbacks")
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


class Sentences(Dataset):
    """Keyword sentences as HuggingFace datasets give them: a dict per sentence, unpadded, with its label and the
    mask of its keywords (the evidence the callbacks score maps against)."""

    def __init__(self, text: KeywordText) -> None:
        self.text = text

    def __len__(self) -> int:
        return len(self.text.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids, keywords = self.text.ids[index], self.text.keyword_mask[index]
        length = int((ids != PAD_ID).sum())
        return {
            "input_ids": torch.cat([torch.tensor([CLS_ID]), ids[:length]]),
            "mask": torch.cat([torch.tensor([False]), keywords[:length]]),
            "labels": self.text.labels[index],
        }


def pad_batch(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad to the batch's longest sentence, with the attention mask (as ``DataCollatorWithPadding`` does)."""
    longest = max(len(sample["input_ids"]) for sample in samples)
    ids = torch.full((len(samples), longest), PAD_ID, dtype=torch.long)
    keywords = torch.zeros(len(samples), longest, dtype=torch.bool)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["input_ids"])] = sample["input_ids"]
        keywords[row, : len(sample["mask"])] = sample["mask"]
    return {
        "input_ids": ids,
        "attention_mask": (
            torch.arange(longest)[None] < torch.tensor([len(s["input_ids"]) for s in samples])[:, None]
        ).long(),
        "mask": keywords,
        "labels": torch.stack([sample["labels"] for sample in samples]),
    }


class BertClassifier(pl.LightningModule):
    """A LightningModule around a HuggingFace model, written the usual way: ``forward`` takes the model's inputs
    by name and returns its output object (the callbacks read its ``logits``)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=len(WORDS),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=len(TEXT_CLASSES),
            pad_token_id=PAD_ID,
            attn_implementation="sdpa",
        )
        self.model = BertForSequenceClassification(config)
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> object:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        output = self(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(output.logits, batch["labels"])
        accuracy = (output.logits.argmax(dim=1) == batch["labels"]).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_acc", accuracy, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, log, print where attention and attributions fall; return the final metrics."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    train = DataLoader(
        Sentences(make_keyword_text(args.train_size, seed=args.seed)),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=pad_batch,
    )
    val = DataLoader(
        Sentences(make_keyword_text(args.val_size, seed=args.seed + 1)),
        batch_size=args.batch_size,
        collate_fn=pad_batch,
    )
    words = DataDescription(vocabulary=WORDS, class_names=TEXT_CLASSES)  # padding: from the attention mask
    callbacks = [
        AttentionCallback(num_samples=args.num_samples, data=words),
        SaliencyCallback(
            methods=("gradient", "integrated_gradients"), input_layer="auto", num_samples=args.num_samples
        ),
        LinearProbeCallback(num_samples=args.val_size),
        RepresentationSimilarityCallback(num_samples=args.val_size),
    ]
    logger = TensorBoardLogger(args.log_dir, name="huggingface_text")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        deterministic=True,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(BertClassifier(), train, val)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    print()
    print(f"validation accuracy: {metrics.get('val_acc', float('nan')):.3f}")
    for callback in callbacks[:2]:
        for key in callback.last_maps:
            share = metrics.get(f"interp_{callback.name}/{key}/localization", float("nan"))
            print(f"{callback.name} {key}: {share:.2f} of its mass on the keywords")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {args.log_dir})")
    return metrics


if __name__ == "__main__":
    main()
