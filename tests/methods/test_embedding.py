"""Attribution at an embedding output: analytic gradients, IG completeness, ids paired with the right copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.demo import TextTransformer
from lightning_interp.methods.model.embedding import LayerInput, find_input_embedding, layer_output
from lightning_interp.methods.registry import attribute


class MeanEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(12, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.tokens(ids).mean(dim=1))


def _text_model_and_ids():
    torch.manual_seed(0)
    model = TextTransformer(20, 2, dim=16, heads=2, layers=2, pad_id=0).eval()
    ids = torch.randint(1, 20, (3, 9))
    ids[0, 6:] = 0  # different padding in each sample: the model's padding mask depends on the ids
    ids[1, 3:] = 0
    return model, ids


def test_the_gradient_at_the_embedding_is_the_analytic_one():
    model = MeanEmbedding()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    view = LayerInput(model, "tokens", ids)
    embedded = layer_output(model, "tokens", ids)
    grads = attribute("gradient", view, embedded, torch.tensor([2, 0]))
    # score_c = W_c . mean_t E_t + b_c, so d score_c / d E_t = W_c / T for every token
    expected = torch.stack([model.head.weight[2], model.head.weight[0]])[:, None, :].expand(2, 4, 5) / 4
    torch.testing.assert_close(grads, expected)


def test_token_integrated_gradients_are_complete_on_the_text_model():
    model, ids = _text_model_and_ids()
    view = LayerInput(model, "embedding", ids)
    embedded = layer_output(model, "embedding", ids)
    baseline = layer_output(model, "embedding", torch.zeros_like(ids))  # the padding id's embedding
    attributions, delta = attribute(
        "integrated_gradients", view, embedded, None, baseline=baseline, n_steps=128, return_convergence_delta=True
    )
    with torch.no_grad():
        target = model(ids).argmax(dim=1)
        # f(baseline) by hand: every token's embedding set to the padding embedding, the ids (and masks) unchanged
        handle = model.embedding.register_forward_hook(lambda m, a, out: torch.zeros_like(out) + baseline)
        at_baseline = model(ids)
        handle.remove()
        difference = model(ids).gather(1, target[:, None])[:, 0] - at_baseline.gather(1, target[:, None])[:, 0]
    per_token = attributions.sum(dim=2)
    torch.testing.assert_close(per_token.sum(dim=1), difference, atol=2e-3 * float(difference.abs().max()), rtol=0)
    assert float(delta.abs().max()) < 2e-3 * float(difference.abs().max())
    assert float(per_token[0, 6:].abs().max()) == 0.0  # padding positions sit at the baseline: no attribution


def test_a_batch_of_samples_is_explained_as_each_sample_alone():
    # IG batches its path points copy after copy; each copy must run with its own sample's ids (padding masks)
    model, ids = _text_model_and_ids()
    embedded = layer_output(model, "embedding", ids)
    together = attribute("integrated_gradients", LayerInput(model, "embedding", ids), embedded, 1, n_steps=8)
    for i in range(ids.shape[0]):
        alone = attribute(
            "integrated_gradients", LayerInput(model, "embedding", ids[i : i + 1]), embedded[i : i + 1], 1, n_steps=8
        )
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-4)


def test_batches_that_are_not_whole_copies_are_refused():
    model, ids = _text_model_and_ids()
    view = LayerInput(model, "embedding", ids)
    embedded = layer_output(model, "embedding", ids)
    with pytest.raises(ValueError, match="cannot be paired"):
        view(embedded[:2])
    assert view(torch.cat([embedded, embedded])).shape == (6, 2)


def test_the_embedding_of_the_input_ids_is_found_not_the_position_embedding():
    class WithPositions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positions = nn.Embedding(16, 4)  # registered first, called on arange, not on the input
            self.words = nn.Embedding(30, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            where = torch.arange(ids.shape[1])[None].expand_as(ids)
            return self.head((self.positions(where) + self.words(ids)).mean(dim=1))

    assert find_input_embedding(WithPositions(), torch.randint(30, (2, 6))) == "words"
    with pytest.raises(ValueError, match="input_layer="):
        find_input_embedding(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3))


def test_every_gradient_and_modified_backward_method_runs_at_the_embedding_or_says_why_not():
    from lightning_interp.methods.registry import METHODS

    model, ids = _text_model_and_ids()
    view = LayerInput(model, "embedding", ids)
    embedded = layer_output(model, "embedding", ids)
    refused = {}
    for name, spec in METHODS.items():
        if spec.needs_layer or spec.family == "perturbation":
            continue
        options = {"generator": torch.Generator().manual_seed(0)} if spec.stochastic else {}
        try:
            attributions = attribute(name, view, embedded, None, **options)
        except ValueError as error:
            refused[name] = str(error)
            continue
        assert attributions.shape == embedded.shape and bool(torch.isfinite(attributions).all()), name
        assert float(attributions[1, :3].abs().sum()) > 0, name  # the real tokens of the shortest sample
    # the rule-based methods have no rule for attention (or a bare parameter): refused with what to use instead
    # FullGrad and Guided Grad-CAM resize maps to an image's height and width: images only, said so
    assert set(refused) == {"lrp", "deeplift", "deeplift_shap", "full_grad", "guided_grad_cam"}
    assert "images" in refused["full_grad"] and "images" in refused["guided_grad_cam"]
    assert "attention" in refused["deeplift"] and "attention" in refused["deeplift_shap"]
    assert "no rule" in refused["lrp"]


def test_gradient_shap_batches_whole_copies_so_any_number_of_samples_pairs_with_its_ids():
    # 40 samples x 16 draws = 640 rows: a pass of 512 rows would split a copy of the batch
    torch.manual_seed(0)
    model = TextTransformer(20, 2, dim=8, heads=2, layers=1, pad_id=0).eval()
    ids = torch.randint(1, 20, (40, 6))
    ids[::3, 4:] = 0
    embedded = layer_output(model, "embedding", ids)
    view = LayerInput(model, "embedding", ids)

    def run(limit):
        generator = torch.Generator().manual_seed(5)
        return attribute(
            "gradient_shap", view, embedded, 1, n_samples=16, generator=generator, internal_batch_size=limit
        )

    chunked, whole = run(512), run(100_000)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)  # the passes' size does not change the result
