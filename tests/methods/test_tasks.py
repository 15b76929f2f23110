"""Output kinds: inference from output and labels, explained scores, predictions, label RDMs and probes.

Reference values are analytic (a linear model's gradient is its weight; IG completeness), computed with
independent formulas in the test, or come from scikit-learn.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.methods import (
    gradient,
    infer_task,
    integrated_gradients,
    label_kind,
    label_rdm,
    linear_probe_accuracy,
    linear_probe_r2,
    multilabel_probe_accuracy,
    prediction_and_confidence,
)
from lightning_interp.probe import ProbeSet, strata


@pytest.mark.parametrize(
    ("outputs", "labels", "task"),
    [
        (1, torch.tensor([0, 1, 1, 0]), "binary"),
        (1, torch.tensor([0.0, 1.0, 1.0]), "binary"),  # BCE targets as floats
        (1, torch.tensor([0.3, 2.5, -1.0]), "regression"),
        (4, torch.tensor([0, 3, 2]), "multiclass"),
        (4, None, "multiclass"),
        (3, torch.tensor([[0, 1, 0], [1, 0, 0]]), "multiclass"),  # one-hot rows
        (3, torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]]), "multilabel"),
        (2, torch.tensor([[0.5, 1.5], [2.0, -1.0]]), "regression"),
        (3, torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]), "multiclass"),  # soft targets (label smoothing)
    ],
)
def test_infer_task(outputs, labels, task):
    assert infer_task(outputs, labels) == task


@pytest.mark.parametrize(
    ("outputs", "labels", "task", "message"),
    [
        (1, None, "auto", "task='binary' or task='regression'"),
        (1, torch.tensor([0, 1, 2]), "auto", "whole numbers from 0 to 2"),
        (4, torch.tensor([0, 5]), "auto", "from 0 to 5"),
        (3, torch.tensor([[1, 1], [0, 1]]), "auto", "2 label columns for 3 scores"),
        (2, torch.tensor([0, 1]), "binary", "one logit"),
        (1, torch.tensor([0, 1]), "multiclass", "one logit is task='binary'"),
        (3, torch.tensor([0, 1]), "multilabel", "multi-hot"),
        (3, None, "ordinal", "task must be"),
        (3, torch.tensor([[1, 0, 0], [0, 0, 0]]), "auto", "one-hot class labels with an empty row"),
        (1, torch.tensor([[1, 0], [0, 1]]), "auto", "2 label columns for one output"),
        (4, torch.tensor([0.3, 0.7]), "auto", "per-sample weights"),
    ],
)
def test_infer_task_refuses_what_it_cannot_tell(outputs, labels, task, message):
    with pytest.raises(ValueError, match=message):
        infer_task(outputs, labels, task)


def test_label_kind():
    assert label_kind(torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == "one_hot"
    assert label_kind(torch.tensor([[0, 1], [1, 1]])) == "multi_hot"
    assert label_kind(torch.tensor([[0.2, 1.0]])) == "continuous"
    assert label_kind(torch.tensor([2.0, 7.0])) == "class"


def test_binary_gradient_explains_the_predicted_side():
    torch.manual_seed(0)
    linear = nn.Linear(5, 1)
    x = torch.randn(16, 5)
    logits = linear(x)[:, 0].detach()
    assert (logits > 0).any() and (logits < 0).any()
    expected = torch.where(logits[:, None] > 0, linear.weight[0], -linear.weight[0]).detach()
    assert torch.allclose(gradient(linear, x, task="binary"), expected)
    # a fixed side: target 1 is the logit's own gradient for every sample, target 0 its negative
    assert torch.allclose(gradient(linear, x, 1, task="binary"), linear.weight[0].detach().expand(16, 5))
    assert torch.allclose(gradient(linear, x, 0, task="binary"), -linear.weight[0].detach().expand(16, 5))


def test_binary_integrated_gradients_complete_on_the_explained_side():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(6, 4, dtype=torch.float64)
    net = net.double()
    attributions = integrated_gradients(net, x, task="binary", n_steps=64)
    with torch.no_grad():
        logit, base = net(x)[:, 0], net(torch.zeros_like(x))[:, 0]
    sign = torch.where(logit > 0, 1.0, -1.0).double()
    assert torch.allclose(attributions.sum(dim=1), sign * (logit - base), atol=1e-6)


def test_regression_with_several_outputs_needs_an_index():
    linear = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="which output"):
        gradient(linear, x, task="regression")
    assert torch.allclose(gradient(linear, x, 1, task="regression"), linear.weight[1].detach().expand(4, 3))
    one = nn.Linear(3, 1)
    assert torch.allclose(gradient(one, x, task="regression"), one.weight[0].detach().expand(4, 3))


def test_prediction_and_confidence_per_kind():
    scores = torch.tensor([[1.5, -0.5, 0.2], [-2.0, 0.1, 3.0]])
    predicted, confidence = prediction_and_confidence(scores, "multilabel")
    assert predicted.tolist() == [0, 2]
    assert torch.allclose(confidence, 1 / (1 + torch.exp(-torch.tensor([1.5, 3.0]))))
    predicted, confidence = prediction_and_confidence(scores, "multiclass")
    exp = scores.exp()
    assert torch.allclose(confidence, exp.max(dim=1).values / exp.sum(dim=1))
    predicted, confidence = prediction_and_confidence(torch.tensor([[0.0], [-3.0]]), "binary")
    assert predicted.tolist() == [0, 0]  # a logit of exactly 0 is not a positive prediction
    assert torch.allclose(confidence, torch.tensor([0.5, 1 / (1 + torch.exp(torch.tensor(-3.0)))]))
    values, confidence = prediction_and_confidence(torch.tensor([[2.5], [-1.0]]), "regression")
    assert values.tolist() == [2.5, -1.0] and confidence is None


def test_label_rdm_by_kind():
    multi_hot = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])
    sets = [set(torch.nonzero(row).flatten().tolist()) for row in multi_hot]
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            expected = 0.0 if not (a | b) else 1 - len(a & b) / len(a | b)
            assert label_rdm(multi_hot)[i, j] == pytest.approx(expected)
    values = torch.tensor([0.5, 2.0, -1.0])
    assert torch.allclose(label_rdm(values), (values[:, None] - values[None, :]).abs().double())
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0, 2]), 3)
    assert label_rdm(one_hot).tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


def test_strata_spread_a_draw_over_values_and_label_sets():
    values = torch.linspace(0, 1, 100)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    probe = ProbeSet(torch.zeros(100, 2), values)
    from lightning_interp.probe import _stratified_indices

    chosen = values[_stratified_indices(probe.labels, 4)]
    assert sorted(int(v * 4.0001) for v in chosen) == [0, 1, 2, 3]  # one value from each quarter of the range
    multi_hot = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 0]])
    assert strata(multi_hot).tolist() == [1, 1, 0, 2]


def test_linear_probe_r2_matches_scikit_learn_ridge():
    sklearn = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    targets = features @ torch.randn(6, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(
        40, generator=generator, dtype=torch.float64
    )
    l2 = 0.01
    result = linear_probe_r2(features, targets, l2=l2, seed=3)
    # the same split, rebuilt from the documented rule: sorted by target, groups of 2, one held out per group
    order = torch.argsort(targets, stable=True)
    split = torch.Generator().manual_seed(3)
    held = torch.zeros(40, dtype=torch.bool)
    for start in range(0, 39, 2):
        group = order[start : start + 2]
        held[group[int(torch.randint(group.numel(), (1,), generator=split))]] = True
    train, test = features[~held].numpy(), features[held].numpy()
    mean, std = train.mean(axis=0), train.std(axis=0)
    model = sklearn.Ridge(alpha=l2 * train.shape[0]).fit((train - mean) / std, targets[~held].numpy())
    expected = metrics.r2_score(targets[held].numpy(), model.predict((test - mean) / std))
    assert result.n_test == 20 and result.r2 == pytest.approx(expected, abs=1e-9)
    noise = linear_probe_r2(torch.randn(40, 6, generator=generator), torch.randn(40, generator=generator))
    assert noise.r2 < 0.3 < result.r2


def test_multilabel_probe_averages_one_probe_per_usable_label():
    x = torch.linspace(-1, 1, 24)[:, None]
    decodable = (x[:, 0] > 0).long()
    everywhere = torch.ones(24, dtype=torch.long)  # present in every sample: no probe can be tested on it
    labels = torch.stack([decodable, everywhere, 1 - decodable], dim=1)
    result = multilabel_probe_accuracy(x, labels)
    single = linear_probe_accuracy(x, decodable)
    assert result.n_classes == 2 and result.accuracy == pytest.approx(single.accuracy)
    with pytest.raises(ValueError, match="two positive and two negative"):
        multilabel_probe_accuracy(x, everywhere[:, None])
