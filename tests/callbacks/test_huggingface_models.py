"""Every callback that applies, on each transformer people train (HuggingFace BERT, DistilBERT, RoBERTa, GPT-2, ViT,
Swin and timm's Swin, from small configs with random weights), in one real fit each: every callback runs, logs
finite numbers, and training is bitwise what it is without them."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset

from lightning_interp import DataDescription, Display
from lightning_interp.callbacks import (
    ActivationMapsCallback,
    AttentionCallback,
    CalibrationCallback,
    DatasetBiasCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    UncertaintyCallback,
)

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

INLINE = Display(background_drawing=False)
VOCAB = 40


class Batches(Dataset):
    """Dict samples: padded token ids with an attention mask, or pixel values; two classes."""

    def __init__(self, kind: str, count: int = 16) -> None:
        self.kind, self.count = kind, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        label = torch.tensor(index % 2)
        if self.kind == "image":
            return {"pixel_values": torch.rand(3, 32, 32, generator=generator), "labels": label}
        length = 4 + index % 6
        ids = torch.zeros(10, dtype=torch.long)
        ids[:length] = torch.randint(2, VOCAB, (length,), generator=generator)
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": label}


def text_model(kind: str) -> torch.nn.Module:
    small = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    common = {"vocab_size": VOCAB, "max_position_embeddings": 48, "num_labels": 2, "pad_token_id": 0}
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**small, **common))
    if kind == "roberta":
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**small, **common))
    if kind == "distilbert":
        config = transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **common)
        return transformers.DistilBertForSequenceClassification(config)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=1, num_labels=2,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(config)


def image_model(kind: str) -> torch.nn.Module:
    if kind == "vit":
        config = transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        )  # fmt: skip
        return transformers.ViTForImageClassification(config)
    if kind == "hf_swin":
        config = transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=2
        )
        return transformers.SwinForImageClassification(config)
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4, num_classes=2
    )


class Module(LightningModule):
    """A LightningModule around the model, written the usual way (the forward takes the batch's inputs by name)."""

    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None):
        if self.kind == "timm_swin":
            return self.model(pixel_values)
        if pixel_values is not None:
            return self.model(pixel_values=pixel_values)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def _loss(self, batch: dict) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        output = self(**inputs)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


TEXT = ["bert", "roberta", "distilbert", "gpt2"]
IMAGES = ["vit", "hf_swin", "timm_swin"]


def callbacks_for(kind: str) -> list:
    common = [
        SaliencyCallback(
            methods=["gradient", "integrated_gradients"],
            input_layer="auto" if kind in TEXT else None,
            num_samples=4,
            display=INLINE,
            data=DataDescription(vocabulary=[f"w{i}" for i in range(VOCAB)]) if kind in TEXT else None,
        ),
        AttentionCallback(num_samples=4, display=INLINE, rollout=kind not in ("hf_swin", "timm_swin")),
        LinearProbeCallback(num_samples=16),
        RepresentationSimilarityCallback(num_samples=16),
        CalibrationCallback(),
        UncertaintyCallback(num_samples=4, passes=2, methods=["gradient"] if kind in IMAGES else None),
    ]
    if kind in IMAGES:
        common += [
            GradCAMCallback(num_samples=4, display=INLINE),
            ActivationMapsCallback(num_samples=4, display=INLINE),
            DatasetBiasCallback(num_samples=8, methods="gradient"),
        ]
    return common


def run(kind: str, callbacks: list, tmp_path) -> tuple[Module, Trainer]:
    seed_everything(0, workers=True)
    model = text_model(kind) if kind in TEXT else image_model(kind)
    module = Module(model, kind)
    data = Batches("image" if kind in IMAGES else "text")
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return module, trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind", TEXT + IMAGES)
def test_every_callback_that_applies_runs_on_the_model_and_leaves_training_alone(kind, tmp_path):
    callbacks = callbacks_for(kind)
    module, trainer = run(kind, callbacks, tmp_path / "with")
    for callback in callbacks:
        assert callback._runs == 1, type(callback).__name__
    ours = {tag: float(value) for tag, value in trainer.callback_metrics.items() if tag.startswith("interp_")}
    names = {tag.split("/")[0] for tag in ours}
    expected = {f"interp_{callback.name}" for callback in callbacks if not isinstance(callback, UncertaintyCallback)}
    assert expected <= names | {"interp_bias"}, expected - names
    finite = [tag for tag, value in ours.items() if "stability" not in tag and not math.isnan(value)]
    assert finite and all(math.isfinite(ours[tag]) for tag in finite)
    bare, _ = run(kind, [], tmp_path / "without")
    for (name, ours_p), (_, theirs) in zip(module.state_dict().items(), bare.state_dict().items(), strict=True):
        assert torch.equal(ours_p, theirs), name  # the callbacks changed nothing of training
