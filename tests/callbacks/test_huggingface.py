"""HuggingFace models as people train them: dict batches with attention masks, output objects with logits, dynamic
padding, causal language models. Models come from small configs with random weights (no download); every map is
checked against autograd on the model called with its mask, the way validation calls it."""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_interp import DataDescription, Display
from lightning_interp.callbacks import (
    AttentionCallback,
    GradCAMCallback,
    LinearProbeCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
)

transformers = pytest.importorskip("transformers")

INLINE = Display(background_drawing=False)
VOCAB = 40


class Sentences(Dataset):
    """Dict samples of random token ids padded with 0 to ``length`` (or unpadded with ``ragged``)."""

    def __init__(self, count=16, length=10, seed=1, ragged=False, extra=None):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (count, length), generator=generator)
        self.lengths = torch.randint(3, length, (count,), generator=generator)
        self.mask = (torch.arange(length)[None] < self.lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = torch.arange(count) % 2
        self.ragged, self.extra = ragged, extra or {}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        end = int(self.lengths[index]) if self.ragged else self.ids.shape[1]
        sample = {"input_ids": self.ids[index, :end], "attention_mask": self.mask[index, :end]}
        sample["labels"] = self.labels[index]
        sample.update({key: value[index, :end] for key, value in self.extra.items()})
        return sample


def pad_batch(samples):
    """Dynamic padding to the batch's longest sample, as HuggingFace's DataCollatorWithPadding does."""
    longest = max(len(sample["input_ids"]) for sample in samples)
    batch = {}
    for key in samples[0]:
        if samples[0][key].ndim == 0:
            batch[key] = torch.stack([sample[key] for sample in samples])
            continue
        padded = torch.zeros(len(samples), longest, dtype=samples[0][key].dtype)
        for row, sample in enumerate(samples):
            padded[row, : len(sample[key])] = sample[key]
        batch[key] = padded
    return batch


def bert(kind="bert", **overrides):
    configs = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
        "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForSequenceClassification),
    }
    config_class, model_class = configs[kind]
    if kind == "distilbert":
        sizes = {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32}
    else:
        sizes = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    config = config_class(vocab_size=VOCAB, max_position_embeddings=48, num_labels=2, pad_token_id=0, **sizes)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return model_class(config)


class Classifier(LightningModule):
    """A LightningModule around a HuggingFace model (subclasses write its forward the ways people do)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return torch.nn.functional.cross_entropy(self.model(**inputs).logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay: the reference uses the same ones


def named_forward(self, input_ids, attention_mask=None, token_type_ids=None):
    return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class NamedClassifier(Classifier):
    forward = named_forward


class IdsOnlyClassifier(Classifier):
    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


class OpenClassifier(Classifier):
    def forward(self, **batch):
        return self.model(**batch)


def fit(module, callbacks, dataset, tmp_path, collate=None):
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    return trainer


def masked_gradient_norms(model, embedding, ids, mask, next_token=False, **extra):
    """The reference: autograd at the embedding output of the model called with its mask (eval mode)."""
    model.eval()
    vectors = embedding(ids).detach().requires_grad_(True)
    handle = embedding.register_forward_hook(lambda module, args, output: vectors)
    try:
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits
    finally:
        handle.remove()
    if next_token:
        logits = logits[torch.arange(len(ids)), mask.sum(dim=1) - 1]
    chosen = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
    (gradient,) = torch.autograd.grad(chosen, vectors)
    return gradient.norm(dim=-1) * mask, logits.detach()


@pytest.mark.parametrize(("kind", "module_class"), [("bert", NamedClassifier), ("distilbert", OpenClassifier)])
def test_token_maps_are_those_of_the_model_called_with_its_attention_mask(tmp_path, kind, module_class):
    model = bert(kind)
    callback = SaliencyCallback(methods=["gradient"], input_layer="auto", num_samples=6, display=INLINE)
    fit(module_class(model), [callback], Sentences(), tmp_path)
    probe = callback.probe
    assert probe.input_key == "input_ids" and set(probe.extras) == {"attention_mask"}
    embedding = model.get_input_embeddings()
    reference, _ = masked_gradient_norms(model, embedding, probe.inputs, probe.extras["attention_mask"])
    maps = callback.last_maps["gradient"]
    assert torch.allclose(maps, reference, atol=1e-5)
    assert (maps[probe.extras["attention_mask"] == 0] == 0).all()
    unmasked, _ = masked_gradient_norms(model, embedding, probe.inputs, torch.ones_like(probe.inputs))
    assert not torch.allclose(maps, unmasked * probe.extras["attention_mask"], atol=1e-4)  # the mask mattered


def test_a_mask_the_model_never_receives_is_said_before_training(tmp_path):
    callback = SaliencyCallback(methods=["gradient"], input_layer="auto", num_samples=4, display=INLINE)
    module = IdsOnlyClassifier(bert())
    with pytest.warns(UserWarning, match=r"carry 'attention_mask'.*takes no argument of that name"):
        trainer = fit(module, [callback], Sentences(), tmp_path)
    assert trainer.state.finished


def test_forward_fn_receives_the_batch_inputs_it_names(tmp_path):
    model = bert()
    received = []

    def forward_fn(module, ids, attention_mask):
        received.append(attention_mask.shape)
        return module.model(input_ids=ids, attention_mask=attention_mask).logits

    callback = SaliencyCallback(
        methods=["gradient"], input_layer="auto", num_samples=4, display=INLINE, forward_fn=forward_fn
    )
    fit(Classifier(model), [callback], Sentences(), tmp_path)
    assert received and all(shape[1] == 10 for shape in received)
    probe = callback.probe
    reference, _ = masked_gradient_norms(
        model, model.get_input_embeddings(), probe.inputs, probe.extras["attention_mask"]
    )
    assert torch.allclose(callback.last_maps["gradient"], reference, atol=1e-5)


def test_dynamically_padded_batches_become_one_probe_with_its_mask(tmp_path):
    model = bert()
    callback = SaliencyCallback(methods=["gradient"], input_layer="auto", num_samples=8, display=INLINE)
    data = Sentences(ragged=True, extra={"token_type_ids": torch.zeros(16, 10, dtype=torch.long)})
    fit(NamedClassifier(model), [callback], data, tmp_path, collate=pad_batch)
    probe = callback.probe
    lengths = probe.extras["attention_mask"].sum(dim=1)
    assert probe.inputs.shape[1] == int(lengths.max()) and set(probe.extras) == {"attention_mask", "token_type_ids"}
    model.eval()
    with torch.no_grad():  # padding to the probe's length changes no prediction: the mask hides it
        alone = [model(input_ids=ids[None, :n]).logits for ids, n in zip(probe.inputs, lengths, strict=True)]
        together = model(input_ids=probe.inputs, attention_mask=probe.extras["attention_mask"]).logits
    assert torch.allclose(torch.cat(alone), together, atol=1e-5)
    assert (callback.last_maps["gradient"][probe.extras["attention_mask"] == 0] == 0).all()


def test_representations_of_a_language_model_are_block_outputs_pooled_over_real_tokens(tmp_path):
    model = bert("roberta")
    probe_callback = LinearProbeCallback(num_samples=16)
    similarity = RepresentationSimilarityCallback(num_samples=16)
    module = NamedClassifier(model)
    trainer = fit(module, [probe_callback, similarity], Sentences(), tmp_path)
    expected = ["model.roberta.embeddings", "model.roberta.encoder.layer.0", "model.roberta.encoder.layer.1"]
    assert probe_callback.layers == expected and similarity.layers == expected
    assert probe_callback._pooling == "mean"  # a bidirectional encoder
    probe = probe_callback.probe
    mask = probe.extras["attention_mask"]
    model.eval()
    with torch.no_grad():
        hidden = model(input_ids=probe.inputs, attention_mask=mask, output_hidden_states=True).hidden_states
    weights = mask[..., None].float()
    mean = [(states * weights).sum(dim=1) / weights.sum(dim=1) for states in hidden]
    features = probe_callback._own_features(trainer, probe_callback._explained(module))  # the pass of a run
    for layer, reference in zip(expected, mean, strict=True):
        assert torch.allclose(features[layer], reference, atol=1e-5), layer


def test_a_causal_language_model_is_explained_at_its_next_token(tmp_path):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    vocabulary = [f"w{i}" for i in range(VOCAB)]
    saliency = SaliencyCallback(
        methods=["gradient"],
        input_layer="auto",
        num_samples=4,
        display=INLINE,
        data=DataDescription(vocabulary=vocabulary),
    )
    probe_callback = LinearProbeCallback(num_samples=16)

    class CausalLM(Classifier):
        def forward(self, input_ids, attention_mask=None):
            return self.model(input_ids=input_ids, attention_mask=attention_mask)

        def training_step(self, batch, batch_idx):
            return self.model(
                batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
            ).loss

    attention = AttentionCallback(num_samples=4, display=INLINE, rollout=False)
    fit(CausalLM(model), [saliency, probe_callback, attention], Sentences(), tmp_path)
    assert saliency._call.next_token and probe_callback._pooling == "last"  # found causal on one sample
    assert attention._query == "last"  # the token the next one is read at
    probe = attention.probe
    mask = probe.extras["attention_mask"]
    model.eval()
    model.set_attn_implementation("eager")  # the model's own weights: its eager attention reports them
    with torch.no_grad():
        own = model(input_ids=probe.inputs, attention_mask=mask, output_attentions=True).attentions[-1]
    last = mask.sum(dim=1) - 1
    rows = own[torch.arange(len(last)), :, last].mean(dim=1) * mask
    assert torch.allclose(next(iter(attention.last_maps.values())), rows, atol=1e-5)
    probe = saliency.probe
    mask = probe.extras["attention_mask"]
    reference, _ = masked_gradient_norms(model, model.get_input_embeddings(), probe.inputs, mask, next_token=True)
    assert torch.allclose(saliency.last_maps["gradient"], reference, atol=1e-5)
    names = saliency._next_token_names(VOCAB)
    assert names is not None and names[7] == "'w7'"  # the grid names the predicted next token


def test_a_vision_transformer_fed_pixel_values_is_explained_from_its_logits(tmp_path):
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)

    class Pixels(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"pixel_values": torch.rand(3, 16, 16, generator=generator), "labels": torch.tensor(index % 2)}

    class ViTModule(Classifier):
        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values)

    gradcam = GradCAMCallback(num_samples=4, display=INLINE)
    saliency = SaliencyCallback(methods=["gradient"], num_samples=4, display=INLINE)
    fit(ViTModule(model), [gradcam, saliency], Pixels(), tmp_path)
    probe = saliency.probe
    assert probe.input_key == "pixel_values"
    pixels = probe.inputs.clone().requires_grad_(True)
    model.eval()
    logits = model(pixel_values=pixels).logits
    (gradient,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), pixels)
    assert torch.allclose(saliency.last_maps["gradient"], gradient.abs().sum(dim=1), atol=1e-5)  # abs_sum
    assert gradcam.last_maps and all(m.shape == (4, 16, 16) for m in gradcam.last_maps.values())


class TupleSentences(Sentences):
    """The same samples as ``(input_ids, attention_mask, labels)`` tuples, as a ``TensorDataset`` gives them."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        return sample["input_ids"], sample["attention_mask"], sample["labels"]


class TupleClassifier(Classifier):
    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch
        return torch.nn.functional.cross_entropy(self(ids, mask).logits, labels)


class TupleIdsOnlyClassifier(TupleClassifier):
    def forward(self, input_ids):
        return self.model(input_ids=input_ids)

    def training_step(self, batch, batch_idx):
        ids, _, labels = batch
        return torch.nn.functional.cross_entropy(self(ids).logits, labels)


def test_tuple_batches_pass_their_attention_mask_to_the_model(tmp_path):
    model = bert()
    callback = SaliencyCallback(methods=["gradient"], input_layer="auto", num_samples=6, display=INLINE)
    fit(TupleClassifier(model), [callback], TupleSentences(), tmp_path)
    probe = callback.probe
    assert probe.input_key is None and set(probe.extras) == {"attention_mask"}
    mask = probe.extras["attention_mask"]
    assert (mask == 0).any()  # padded samples: the mask matters
    reference, _ = masked_gradient_norms(model, model.get_input_embeddings(), probe.inputs, mask)
    assert torch.allclose(callback.last_maps["gradient"], reference, atol=1e-5)


def test_a_tuple_batchs_mask_the_model_never_receives_is_said_before_training(tmp_path):
    callback = SaliencyCallback(methods=["gradient"], input_layer="auto", num_samples=4, display=INLINE)
    with pytest.warns(UserWarning, match=r"carry an attention mask \(the integer 0/1 second item.*takes no argument"):
        trainer = fit(TupleIdsOnlyClassifier(bert()), [callback], TupleSentences(), tmp_path)
    assert trainer.state.finished
