"""Models called with their other inputs (BoundInputs), signatures (keyword_inputs), next-token scores and token
pooling: the pure functions behind HuggingFace support, checked on analytic cases."""

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    BoundInputs,
    attends_ahead,
    for_rows,
    integrated_gradients,
    keyword_inputs,
    next_token_scores,
    pool_tokens,
    scores_from_output,
    smoothgrad,
    trace_model,
    transformer_stack,
)


class MaskedSum(nn.Module):
    """Scores = (sum of the embedded tokens the mask keeps) @ W: padding changes nothing when masked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        vectors = self.embed(input_ids)
        if attention_mask is not None:
            vectors = vectors * attention_mask[..., None]
        return {"logits": self.head(vectors.sum(dim=1)), "hidden": vectors}


def test_keyword_inputs_follows_the_signature_as_huggingface_trainer_does():
    def named(input_ids, attention_mask=None, token_type_ids=None, **kwargs): ...
    def open_ended(**batch): ...
    def positional(x): ...

    keys = ["attention_mask", "token_type_ids", "idx"]
    assert keyword_inputs(named, keys) == ("attention_mask", "token_type_ids")  # not idx, though **kwargs
    assert keyword_inputs(open_ended, keys) == tuple(keys)
    assert keyword_inputs(positional, keys) == ()
    assert keyword_inputs(lambda model, ids, attention_mask: None, keys, skip=2) == ("attention_mask",)


def test_bound_inputs_give_each_copy_its_samples_mask():
    model = MaskedSum()
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bound = BoundInputs(model, {"attention_mask": mask}, input_key="input_ids")
    one = scores_from_output(bound(ids), None)
    expected = model(ids, mask)["logits"]
    assert torch.allclose(one, expected)
    three = scores_from_output(bound(ids.repeat(3, 1)), None)  # copy after copy, as the methods batch them
    assert torch.allclose(three, expected.repeat(3, 1))
    with pytest.raises(ValueError, match="whole copies"):
        bound(ids[:1])
    assert torch.allclose(scores_from_output(for_rows(bound, slice(1, 2))(ids[1:]), None), expected[1:])


def test_attribution_through_a_bound_model_equals_the_masked_models_own():
    """Integrated gradients and SmoothGrad through BoundInputs equal the same methods on a model that builds the
    mask in its own forward: every batched copy got its own sample's mask."""
    model = MaskedSum()
    ids = torch.tensor([[1, 2, 0], [3, 4, 5]])
    mask = (ids != 0).long()
    embedded = model.embed(ids).detach()

    class OnEmbeddings(nn.Module):  # the reference: the mask is rebuilt from the (repeated) ids
        def forward(self, vectors):
            copies = vectors.shape[0] // ids.shape[0]
            return model.head((vectors * mask.repeat(copies, 1)[..., None]).sum(dim=1))

    class BoundOnEmbeddings(nn.Module):
        def forward(self, vectors, attention_mask):
            return model.head((vectors * attention_mask[..., None]).sum(dim=1))

    bound = BoundInputs(BoundOnEmbeddings(), {"attention_mask": mask})
    ours = integrated_gradients(bound, embedded, 1, n_steps=8, internal_batch_size=4)
    reference = integrated_gradients(OnEmbeddings(), embedded, 1, n_steps=8)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours[0, 2].abs().sum() == 0  # the padding gets nothing
    generator = torch.Generator().manual_seed(0)
    noisy = smoothgrad(bound, embedded, 1, n_samples=4, generator=generator)
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(noisy, smoothgrad(OnEmbeddings(), embedded, 1, n_samples=4, generator=generator))


def test_scores_are_read_from_logits_of_output_objects():
    class Output(dict):
        def __getattr__(self, name):
            return self[name]

    logits = torch.randn(2, 3)
    assert scores_from_output(Output(logits=logits, loss=None), None) is logits
    assert scores_from_output({"logits": logits}, None) is logits
    with pytest.raises(TypeError, match="output_transform"):
        scores_from_output({"scores": logits}, None)


def test_next_token_scores_read_the_last_real_token_on_either_side():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert next_token_scores(logits, right).tolist() == [logits[0, 1].tolist(), logits[1, 3].tolist()]
    assert next_token_scores(logits, left).tolist() == [logits[0, 3].tolist(), logits[1, 3].tolist()]
    assert next_token_scores(logits).tolist() == logits[:, -1].tolist()


def test_pool_tokens_leave_the_padding_out():
    tokens = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [100.0, 100.0]]])
    real = torch.tensor([[True, True, False]])
    assert pool_tokens(tokens, "mean", real).tolist() == [[2.0, 20.0]]
    assert pool_tokens(tokens, "last", real).tolist() == [[3.0, 30.0]]
    assert pool_tokens(tokens, "cls", real).tolist() == [[1.0, 10.0]]
    assert pool_tokens(tokens, "flatten", real).tolist() == [[1.0, 10.0, 3.0, 30.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="token pooling"):
        pool_tokens(tokens, "max")


def test_attends_ahead_tells_a_causal_encoder_from_a_bidirectional_one():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    class Net(nn.Module):
        def __init__(self, causal: bool) -> None:
            super().__init__()
            self.embed, self.encoder, self.causal = nn.Embedding(10, 8), encoder, causal

        def forward(self, ids):
            mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1]) if self.causal else None
            return self.encoder(self.embed(ids), mask=mask, is_causal=self.causal)

    ids = torch.tensor([[1, 2, 3, 4]])
    assert attends_ahead(Net(causal=False), ids, "encoder.layers.1")
    assert not attends_ahead(Net(causal=True), ids, "encoder.layers.1")


def test_transformer_stack_reads_block_outputs_not_projections():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16)
    model = BertModel(config).eval()
    stack = transformer_stack(model, trace_model(model, torch.tensor([[1, 2, 3]])))
    assert stack == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
