"""Smoke run of ``benchmarks/run.py --quick``: every section runs, and ours agrees with each peer library.

The benchmark compares our functions with Captum, pytorch-grad-cam, ckatorch and scikit-learn on the same inputs;
at the quick sizes the timings mean nothing, but the agreement columns are real cross-checks against independent
implementations, and the run proves the benchmark code still works with the package as it is.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION_TITLES = (
    "## Overhead of leaving the callbacks on (CPU)",
    "## Ops and host syncs per validation (CPU)",
    "## Attribution vs peers",
    "## Method catalogue vs reference peers",
    "## Inside the network: ms per run (CPU)",
    "## CKA",
    "## Linear probes",
    "## Scaling and memory",
)


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^(## .+)$", markdown, flags=re.MULTILINE)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _tables(body: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``body`` as a list of {column: cell} rows."""
    tables, lines = [], body.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("| ") and index + 1 < len(lines) and lines[index + 1].startswith("| ---"):
            header = [cell.strip() for cell in lines[index].strip("|").split(" | ")]
            rows, index = [], index + 2
            while index < len(lines) and lines[index].startswith("| "):
                cells = [cell.strip() for cell in lines[index].strip().strip("|").split(" | ")]
                assert len(cells) == len(header), lines[index]
                rows.append(dict(zip(header, cells, strict=True)))
                index += 1
            tables.append(rows)
        else:
            index += 1
    return tables


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("captum", reason="the bench extra is part of the test extra; reinstall with .[test]")
    output = tmp_path_factory.mktemp("bench") / "BENCHMARKS.quick.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _sections(output.read_text())


@pytest.mark.slow
def test_every_section_is_written_with_its_tables_and_verdicts(report):
    assert tuple(report) == SECTION_TITLES
    for title, body in report.items():
        assert _tables(body), f"{title} has no table"
    for title in (*SECTION_TITLES[:4], *SECTION_TITLES[5:7]):  # the sections with targets state a verdict
        assert re.search(r"\b(MET|MISSED)\b", report[title]), title


@pytest.mark.slow
def test_cost_counts_each_default_callback_and_their_total(report):
    (rows,) = _tables(report["## Ops and host syncs per validation (CPU)"])
    counted = {row["callback (defaults)"]: row for row in rows}
    four = ("SaliencyCallback()", "GradCAMCallback()", "LinearProbeCallback()", "RepresentationSimilarityCallback()")
    for name in four:
        assert int(counted[name]["aten ops"].replace(",", "")) > 0, name
    total = counted["the four defaults together"]
    ops = sum(int(counted[name]["aten ops"].replace(",", "")) for name in four)
    assert int(total["aten ops"].replace(",", "")) == ops


def test_the_census_counts_ops_and_syncs_exactly():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_cost import Census
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    x = torch.arange(6.0)
    with Census() as census:
        total = x.sum()  # 1 op
        float(total)  # a read by Python (its _local_scalar_dense underneath is not counted twice)
        bool((x > 2).any())  # 2 ops and a read
        x[x > 2]  # gt, then index with a boolean mask: nonzero underneath
        x.tolist(), x.cpu()  # reads: on a GPU, copies to the host
        x.max().item()  # one read, not two
    assert dict(census.syncs) == {"float": 1, "bool": 1, "boolean index": 1, "tolist": 1, "cpu": 1, "item": 1}
    assert census.ops >= 7


@pytest.mark.slow
def test_overhead_rows_cover_each_callback_and_all_four(report):
    rows, once, opt_in = _tables(report["## Overhead of leaving the callbacks on (CPU)"])
    for configuration in ("MNIST-sized", "CIFAR-sized"):
        mine = [row for row in rows if row["configuration"].startswith(configuration)]
        callbacks = {row["callback"] for row in mine}
        assert {"SaliencyCallback()", "GradCAMCallback()", "LinearProbeCallback()", "all four"} <= callbacks
        assert "RepresentationSimilarityCallback()" in callbacks
        assert all(float(row["ms per validation epoch (training thread)"]) > 0 for row in mine)
        (all_four,) = [row for row in mine if row["callback"] == "all four"]
        assert float(all_four["drawing thread ms per validation"]) > 0, "images are drawn on the worker thread"
        (costs,) = [row for row in once if row["configuration"].startswith(configuration)]
        assert float(costs["probe draw ms (shared)"]) > 0 and float(costs["layer choice ms (shared)"]) > 0
        # the opt-in callbacks, each in its own fit: MC dropout only where the model has dropout (mnist_cnn)
        extra = {row["callback"]: row for row in opt_in if row["configuration"].startswith(configuration)}
        expected = {
            "CalibrationCallback()",
            "DatasetBiasCallback()",
            "DatasetBiasCallback(methods='grad_cam')",
            "ExplanationQualityCallback() (4 methods + random maps)",
        }
        assert set(extra) == expected | ({"UncertaintyCallback()"} if configuration == "MNIST-sized" else set())
        assert all(float(row["ms per validation epoch (training thread)"]) > 0 for row in extra.values())
        assert all(row["runs"] == "4" for row in extra.values())


@pytest.mark.slow
def test_attribution_agrees_with_captum_and_pytorch_grad_cam(report):
    rows, scores = _tables(report["## Attribution vs peers"])
    assert {row["model"] for row in rows} == {"mnist_cnn", "cifar_resnet"}
    for row in scores:  # our Spearman vs torchmetrics' on the same maps (torchmetrics returns float32)
        assert float(row["max abs diff"]) < 1e-6, row
        assert float(row["ours ms"]) > 0 and float(row["torchmetrics ms"]) > 0
    for row in rows:
        difference = float(row["max rel diff"])
        if "trapezoid" in row["ours"]:
            # Captum's trapezoid weights sum to (n - 1) / n, so ours is n / (n - 1) of Captum's (n = 32 steps);
            # after that factor the two must agree
            assert difference == pytest.approx(1 / 31, rel=1e-2), row
            rescaled = float(re.search(r"vs Captum: ([0-9.e+-]+)", row["note"]).group(1))
            assert rescaled < 1e-5, row
        elif row["peer"].startswith("pytorch-grad-cam"):
            assert difference < 1e-4, row  # numpy / cv2 float32 rounding on top of the same maths
        else:
            assert difference < 1e-5, row  # same maths in torch: bit-identical or float32 rounding
        assert float(row["ours ms"]) > 0 and float(row["peer ms"]) > 0


@pytest.mark.slow
def test_catalogue_covers_every_method_and_agrees_with_each_reference(report):
    from lightning_interp.methods import METHODS

    body = report["## Method catalogue vs reference peers"]
    rows = _tables(body)[0]
    named = {row["ours"].split()[0] for row in rows} | set(re.findall(r"`(\w+)` \(", body.split("without a row")[1]))
    assert named == set(METHODS)
    assert "failed" not in body
    for row in rows:
        if row["max rel diff"].startswith("n/a"):  # different random draws: checked on a linear model (note)
            assert "both exact" in row["note"], row
            continue
        if row["ours"].startswith("deeplift") and row["model"] == "mnist_cnn":
            continue  # Captum's rule for a max pool right after a ReLU (the note; tests/methods/test_lrp_deeplift.py)
        assert float(row["max rel diff"]) < 1e-4, row


@pytest.mark.slow
def test_inside_times_each_callback_on_both_models(report):
    (rows,) = _tables(report["## Inside the network: ms per run (CPU)"])
    models = {"shapes_cnn (quickstart)", "cifar_resnet", "mnist_cnn (two dropout layers)"}
    assert {row["model"] for row in rows} == models
    for model in ("shapes_cnn (quickstart)", "cifar_resnet"):
        names = {row["callback"].split("(")[0] for row in rows if row["model"] == model}
        assert names == {"ActivationMapsCallback", "FeatureVisualizationCallback", "ConceptCallback"}
    names = [row["callback"].split("(")[0] for row in rows if row["model"] == "mnist_cnn (two dropout layers)"]
    assert names == ["UncertaintyCallback", "UncertaintyCallback", "CalibrationCallback"]
    assert all(float(row["ms per run (median)"]) > 0 and int(row["runs"]) >= 2 for row in rows)


@pytest.mark.slow
def test_cka_agrees_with_pairwise_and_ckatorch(report):
    (rows,) = _tables(report["## CKA"])
    assert {row["HSIC"] for row in rows} == {"biased", "debiased"}
    for row in rows:
        assert float(row["max abs diff, pairwise"]) < 1e-10, row
        assert float(row["max abs diff, ckatorch"]) < 1e-10, row


@pytest.mark.slow
def test_probes_match_scikit_learn(report):
    (rows,) = _tables(report["## Linear probes"])
    for row in rows:
        gap = abs(float(row["ours - sklearn (points)"]))
        if row["probe"].startswith("ridge"):
            assert gap == 0.0, row  # the same closed-form solution
        else:  # the same objective; sklearn at its default tolerance stops early, at 1e-8 it is at the optimum
            assert gap <= 2.0, row
            exact = float(row["sklearn acc at tol 1e-8"])
            assert abs(float(row["ours acc"]) - exact) <= 0.02, row  # quick sizes: 64 held-out samples


@pytest.mark.slow
def test_scaling_measures_every_callback(report):
    sizes, layers = _tables(report["## Scaling and memory"])
    names = {row["callback"].split("(")[0] for row in sizes}
    assert names == {"SaliencyCallback", "GradCAMCallback", "LinearProbeCallback", "RepresentationSimilarityCallback"}
    assert all(float(row["ms per run"]) > 0 and float(row["peak extra MiB"]) >= 0 for row in sizes)
    assert {row["callback"] for row in layers} == {"GradCAMCallback", "RepresentationSimilarityCallback"}


def test_a_run_replaces_only_its_own_devices_part_of_the_report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as driver
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    report = driver.merge_report("", "cpu", "## CPU tables v1")
    report = driver.merge_report(report, "cuda", "## GPU tables")
    report = driver.merge_report(report, "cpu", "## CPU tables v2")
    assert "v1" not in report and "## CPU tables v2" in report and "## GPU tables" in report
    assert report.index("CPU tables") < report.index("GPU tables")
    assert report.startswith("# Benchmarks")
