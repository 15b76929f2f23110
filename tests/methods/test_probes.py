"""Linear probes: separable and random labels, scikit-learn references, the split, RNG and grad regimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.methods.representation.linear_probes import (
    ProbeResult,
    ProbeSplit,
    fit_probes,
    linear_probe_accuracy,
    stratified_split,
)

SOLVERS = ("logistic", "ridge")


def separable(n_per_class: int = 30, d: int = 20, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 8 * torch.randn(classes, d, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), d, generator=g), labels


def standardised_split(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.5, seed: int = 0):
    """The probe's split, with numpy standardisation fitted on the training part (zero-variance columns kept at 0)."""
    train, test = (i.numpy() for i in stratified_split(torch.from_numpy(labels), test_fraction, seed=seed))
    mean, std = features[train].mean(axis=0), features[train].std(axis=0)
    std[std == 0] = 1.0
    return (features[train] - mean) / std, labels[train], (features[test] - mean) / std, labels[test]


@pytest.mark.parametrize("solver", SOLVERS)
def test_separable_data_is_decoded_perfectly(solver):
    x, y = separable()
    result = linear_probe_accuracy(x, y, solver=solver)
    assert isinstance(result, ProbeResult)
    assert result.accuracy == 1.0 and result.train_accuracy == 1.0
    assert (result.n_train, result.n_test, result.n_classes) == (45, 45, 3)


@pytest.mark.parametrize("solver", SOLVERS)
def test_random_labels_fit_in_training_but_not_held_out(solver):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 1000, generator=g)  # d > n: any labelling can be fit
    y = torch.randint(0, 4, (200,), generator=g)
    result = linear_probe_accuracy(x, y, solver=solver)
    assert result.train_accuracy > 0.95
    assert result.accuracy < 0.45  # chance is 0.25; 0.45 is > 4 standard errors above it at 100 held-out samples


def test_logistic_matches_scikit_learn_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    linear_model = pytest.importorskip("sklearn.linear_model")
    features, labels = datasets.load_digits(return_X_y=True)
    l2 = 1e-3
    result = linear_probe_accuracy(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), l2=l2)
    x_train, y_train, x_test, y_test = standardised_split(features, labels)
    assert (result.n_train, result.n_test) == (len(y_train), len(y_test))
    # ours: mean cross-entropy + l2/2 ||W||^2  <=>  sklearn: C * sum cross-entropy + 1/2 ||W||^2 with C = 1/(l2 n)
    reference = linear_model.LogisticRegression(C=1 / (l2 * len(y_train)), max_iter=5000).fit(x_train, y_train)
    assert result.accuracy == pytest.approx(reference.score(x_test, y_test), abs=0.005)  # issue 26: 0.5 points
    assert result.train_accuracy == pytest.approx(reference.score(x_train, y_train), abs=0.005)
    assert result.accuracy > 0.9


@pytest.mark.parametrize("shape", [(300, 40), (80, 300)])  # primal (d <= n_train) and dual (d > n_train) ridge
def test_ridge_predictions_match_scikit_learn_ridge_classifier(shape):
    linear_model = pytest.importorskip("sklearn.linear_model")
    n, d = shape
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(n, 3, generator=g)
    features = (latent @ torch.randn(3, d, generator=g) + 2 * torch.randn(n, d, generator=g)).double()
    labels = latent.argmax(dim=1)
    l2 = 1e-2
    result = linear_probe_accuracy(features, labels, solver="ridge", l2=l2)
    x_train, y_train, x_test, y_test = standardised_split(features.numpy(), labels.numpy())
    # ours: mean squared error / 2 + l2/2 ||W||^2  <=>  sklearn: ||XW - Y||^2 + alpha ||W||^2 with alpha = l2 n
    reference = linear_model.RidgeClassifier(alpha=l2 * len(y_train)).fit(x_train, y_train)
    assert result.accuracy == pytest.approx(reference.score(x_test, y_test), abs=1e-12)
    assert result.train_accuracy == pytest.approx(reference.score(x_train, y_train), abs=1e-12)
    assert 0.4 < result.accuracy < 1.0  # neither trivial nor chance


def test_split_is_stratified_deterministic_and_covers_everything():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 2 + [5] * 1 + [3] * 30)
    train, test = stratified_split(labels, 0.3, seed=4)
    assert train.dtype == torch.int64 and test.dtype == torch.int64
    assert sorted(torch.cat([train, test]).tolist()) == list(range(len(labels)))  # a partition
    for value, count in [(0, 10), (1, 7), (2, 2), (3, 30)]:
        in_test = int((labels[test] == value).sum())
        assert 1 <= in_test <= count - 1
        assert in_test == min(max(round(0.3 * count), 1), count - 1)
    assert int((labels[train] == 5).sum()) == 1  # a lone sample can only train
    again = stratified_split(labels, 0.3, seed=4)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    other = stratified_split(labels, 0.3, seed=5)
    assert not torch.equal(other[1], test)


def test_global_rng_is_untouched_and_irrelevant():
    x, y = separable(n_per_class=20, d=50, classes=4)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]  # hard labels: a real fit
    torch.manual_seed(123)
    state = torch.get_rng_state()
    results = [linear_probe_accuracy(x, y, solver=solver) for solver in SOLVERS]
    stratified_split(y, 0.5, seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert [linear_probe_accuracy(x, y, solver=solver) for solver in SOLVERS] == results


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("regime", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(solver, regime):
    g = torch.Generator().manual_seed(6)
    layer = nn.Linear(30, 60)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(60, 30, generator=g))
        layer.bias.zero_()
    inputs = torch.randn(300, 30, generator=g)
    labels = (inputs[:, 0] - inputs[:, 1] > 0).long()  # linearly decodable from the layer's output
    expected = linear_probe_accuracy(layer(inputs).detach(), labels, solver=solver)
    context = torch.no_grad() if regime == "no_grad" else torch.inference_mode()
    with context:
        features = layer(inputs)
        result = linear_probe_accuracy(features, labels, solver=solver)
    assert result == expected
    assert result.accuracy > 0.8
    # features that carry a graph are not differentiated through either
    assert linear_probe_accuracy(layer(inputs), labels, solver=solver) == expected
    assert all(p.grad is None for p in layer.parameters())


def test_labels_may_be_any_integers_and_features_any_shape():
    x, y = separable(n_per_class=12, d=24, classes=3)
    relabelled = torch.tensor([7, -2, 40])[y]
    a = linear_probe_accuracy(x, y)
    b = linear_probe_accuracy(x.reshape(36, 2, 3, 4), relabelled)
    assert a.n_classes == b.n_classes == 3
    assert a.accuracy == b.accuracy == 1.0


@pytest.mark.parametrize(
    "kwargs, labels, message",
    [
        ({}, torch.zeros(9, dtype=torch.long), "shape"),
        ({}, torch.zeros(10, 1, dtype=torch.long), "shape"),
        ({}, torch.zeros(10), "integer"),
        ({}, torch.zeros(10, dtype=torch.long), "at least 2 classes"),
        ({"test_fraction": 0.0}, None, "test_fraction"),
        ({"test_fraction": 1.0}, None, "test_fraction"),
        ({"solver": "svm"}, None, "solver"),
        ({"l2": -1.0}, None, "l2"),
        ({"iterations": 0}, None, "iterations"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, labels, message):
    x = torch.randn(10, 4)
    labels = torch.arange(10) % 2 if labels is None else labels
    with pytest.raises(ValueError, match=message):
        linear_probe_accuracy(x, labels, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("part", [0, 1])
def test_non_finite_features_raise_in_either_part(bad, part):
    labels = torch.arange(10) % 2
    row = stratified_split(labels, 0.5)[part][0]  # a training row, then a held-out one
    x = torch.randn(10, 4)
    x[row, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_probe_accuracy(x, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", SOLVERS)
def test_features_are_not_modified(dtype, solver):
    x, y = separable()
    x = x.to(dtype) + 5.0
    kept = x.clone()
    linear_probe_accuracy(x, y, solver=solver)
    assert torch.equal(x, kept)


def test_singleton_classes_raise():
    with pytest.raises(ValueError, match="held-out"):
        linear_probe_accuracy(torch.randn(4, 3), torch.arange(4))


@pytest.mark.parametrize("solver", SOLVERS)
def test_standardisation_and_fit_use_the_training_part_only(solver):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(160, 12, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 2 * torch.randn(160, generator=g, dtype=torch.float64) > 0).long()  # noisy: no perfect fit
    before = linear_probe_accuracy(x, y, solver=solver)
    assert before.train_accuracy < 1.0
    _, test = stratified_split(y, 0.5)
    moved = x.clone()
    moved[test] = 1e3 * moved[test] + 50.0  # held-out rows only
    after = linear_probe_accuracy(moved, y, solver=solver)
    assert after.train_accuracy == before.train_accuracy


# ---------------------------------------------------------------- fit_probes: every layer at once, no host sync
def _benchmark_features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits lifted to d random ReLU features with noise (as in benchmarks/bench_probes.py)."""
    datasets = pytest.importorskip("sklearn.datasets")
    pixels, labels = datasets.load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(labels), generator=g)[:n]
    x = torch.tensor(pixels, dtype=torch.float32)[keep]
    x = (x - x.mean(dim=0)) / x.std(dim=0).clamp_min(1e-6)
    projection = torch.randn(x.shape[1], d, generator=g) / x.shape[1] ** 0.5
    return torch.relu(x @ projection) + 0.5 * torch.randn(n, d, generator=g), torch.tensor(labels)[keep]


@pytest.mark.parametrize("shape", [(600, 96), (400, 1500)])  # primal (d < n_train) and dual (d > n_train) bases
def test_logistic_reaches_the_optimum_scikit_learn_converges_to(shape):
    """Against a tightly converged scikit-learn (tol 1e-8): the same objective value and the same held-out
    accuracy within one sample; and within 0.5 points of scikit-learn at its default tolerance."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    features, labels = _benchmark_features(*shape)
    l2 = 1e-3
    result = linear_probe_accuracy(features, labels, l2=l2)
    x_train, y_train, x_test, y_test = standardised_split(features.double().numpy(), labels.numpy())
    c = 1 / (l2 * len(y_train))
    exact = linear_model.LogisticRegression(C=c, tol=1e-8, max_iter=20_000).fit(x_train, y_train)
    default = linear_model.LogisticRegression(C=c, max_iter=5000).fit(x_train, y_train)
    assert result.converged
    assert abs(result.accuracy - exact.score(x_test, y_test)) <= 1 / len(y_test) + 1e-12
    assert abs(result.accuracy - default.score(x_test, y_test)) <= 0.005 + 1 / len(y_test)


def test_several_layers_at_once_give_each_layer_its_own_probe():
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(90) % 3
    decodable = torch.nn.functional.one_hot(labels, 3).float() * 4 + torch.randn(90, 3, generator=g)
    noise = torch.randn(90, 40, generator=g)
    images = torch.randn(90, 2, 5, 5, generator=g) + labels[:, None, None, None]  # any shape, flattened
    split = ProbeSplit.classes(labels)
    scores = fit_probes([decodable, noise, images], split)
    alone = [linear_probe_accuracy(x, labels) for x in (decodable, noise, images)]
    assert scores.score.tolist() == pytest.approx([r.accuracy for r in alone], abs=1 / split.test.numel() + 1e-9)
    assert scores.score[0] > 0.9 and scores.score[1] < 0.6 and scores.score[2] > 0.9
    assert scores.finite.all() and scores.converged.all()


def test_a_layer_with_nan_gets_nan_and_leaves_the_others_alone():
    labels = torch.arange(40) % 2
    good = labels[:, None].float() + 0.1 * torch.randn(40, 2)
    bad = torch.randn(40, 6)
    bad[3, 1] = float("nan")
    scores = fit_probes([good, bad], ProbeSplit.classes(labels))
    assert scores.finite.tolist() == [True, False]
    assert scores.score[0] == 1.0 and scores.score[1].isnan() and scores.train_score[1].isnan()
    assert not scores.converged[1]


def test_fit_probes_never_waits_for_the_device():
    """No ``.item()``, ``nonzero``, ``unique`` or boolean indexing inside a fit, whatever the number of layers or
    steps (benchmarks/bench_cost.py's census of dispatched ops)."""
    census_class = _census_class()
    labels = torch.arange(64) % 4
    split = ProbeSplit.classes(labels)
    counts = []
    for layers, iterations in ((2, 5), (5, 20)):
        features = [torch.randn(64, 8 * (k + 1)) for k in range(layers)]
        for solver in ("logistic", "ridge"):
            with census_class() as census:
                fit_probes(features, split, solver=solver, iterations=iterations)
            counts.append(sum(census.syncs.values()))
    regression = ProbeSplit.regression(torch.randn(64))
    with census_class() as census:
        fit_probes([torch.randn(64, 5), torch.randn(64, 70)], regression)
    assert [*counts, sum(census.syncs.values())] == [0] * 5


def test_fewer_steps_than_needed_are_reported_as_not_converged():
    features, labels = _benchmark_features(300, 200)
    assert not linear_probe_accuracy(features, labels, iterations=1).converged
    assert linear_probe_accuracy(features, labels).converged


def test_ridge_without_penalty_is_the_least_squares_fit():
    """l2 = 0: the minimum-norm least-squares solution (the pseudo-inverse), with more and with fewer features than
    training samples."""
    g = torch.Generator().manual_seed(5)
    for d in (6, 80):
        x = torch.randn(60, d, generator=g, dtype=torch.float64)
        labels = (x[:, 0] > 0).long()
        result = linear_probe_accuracy(x, labels, solver="ridge", l2=0.0)
        x_train, y_train, x_test, y_test = standardised_split(x.numpy(), labels.numpy())
        targets = np.eye(2)[y_train]
        weight = np.linalg.pinv(x_train) @ (targets - targets.mean(axis=0))
        predicted = (x_test @ weight + targets.mean(axis=0)).argmax(axis=1)
        assert result.accuracy == pytest.approx((predicted == y_test).mean(), abs=1e-12)


def _census_class():
    import pathlib
    import sys

    benchmarks = str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        from bench_cost import Census
    finally:
        sys.path.remove(benchmarks)
    return Census
