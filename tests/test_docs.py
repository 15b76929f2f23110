"""The documentation cannot drift from the code: the catalogue is the registry's, every Extending example runs, and the
site builds in strict mode (no broken link, anchor, page or docstring reference)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lightning_interp.methods.cams.gradcam as gradcam_module
import lightning_interp.methods.registry as registry_module
from lightning_interp.methods import METHODS
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXTENDING = DOCS / "extending.md"


def _section_blocks(page: Path, heading: str) -> list[str]:
    """The fenced python blocks under ``## <heading>`` of a docs page (up to the next ``## `` heading)."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\s*$", text, flags=re.MULTILINE)
    assert match is not None, f"{page.name} has no '## {heading}' section"
    section = text[match.end() :]
    following = re.search(r"^## ", section, flags=re.MULTILINE)
    section = section[: following.start()] if following else section
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def _run_example(page: Path, heading: str, name: str) -> dict[str, object]:
    (source,) = _section_blocks(page, heading)
    namespace: dict[str, object] = {"__name__": name}
    with torch.random.fork_rng(devices=[]):  # the examples draw weights and inputs: seeded, then given back
        torch.manual_seed(0)
        exec(compile(source, f"{page}#{heading}", "exec"), namespace)  # our own docs' example
    return namespace


def _catalogue_hook():
    spec = importlib.util.spec_from_file_location("docs_catalogue_hook", DOCS / "hooks" / "catalogue.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """Cells of the table whose header starts with ``header_start`` (cells split on unescaped pipes)."""
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if line.replace(" ", "").startswith(header_start)]
    assert len(starts) == 1, f"expected one table starting {header_start!r}, found {len(starts)}"
    rows = []
    for line in lines[starts[0] + 2 :]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


# ---------------------------------------------------------------------- the catalogue
def test_the_catalogue_page_is_the_registry():
    hook = _catalogue_hook()
    source = (DOCS / "methods.md").read_text(encoding="utf-8")
    assert source.count(hook.MARKER) == 1, "docs/methods.md must hold the table's marker once"
    rows = _table_rows(hook.on_page_markdown(source, page=None), "|method|family|")
    assert [re.findall(r"`([^`]+)`", row[0]) for row in rows] == [[name] for name in METHODS], (
        "the catalogue must list the registry's methods, one per row, in its order"
    )
    for (_, family, description, cost, reference), (name, spec) in zip(rows, METHODS.items(), strict=True):
        assert family.startswith(spec.family), f"{name}: family {family!r}, registry {spec.family!r}"
        assert ("stochastic" in family) == spec.stochastic, name
        assert reference == spec.reference and cost, name
        assert description and description.split()[0] in (spec.function.__doc__ or ""), name


# ---------------------------------------------------------------------- Extending: a method and a CAM variant
@pytest.fixture
def registry_restored():
    """Whatever a test declares leaves ``METHODS`` and ``CAM_VARIANTS`` as they were."""
    methods = dict(registry_module.METHODS)
    variants = dict(gradcam_module.CAM_VARIANTS)
    try:
        yield
    finally:
        for table, before in ((registry_module.METHODS, methods), (gradcam_module.CAM_VARIANTS, variants)):
            table.clear()  # in place: every module that imported the table keeps seeing the same object
            table.update(before)


def _declared_names() -> tuple[str, str]:
    (source,) = _section_blocks(EXTENDING, "A CAM variant")
    names = re.findall(r"^def (\w+)\(", source, flags=re.MULTILINE)
    assert len(names) == 2, f"expected one method and one CAM weights function in the example, got {names}"
    return names[0], names[1].removesuffix("_weights")


def test_the_method_and_cam_variant_example_runs_and_declares_its_methods(registry_restored, capsys):
    method, cam = _declared_names()
    assert method not in METHODS and cam not in METHODS, "the example must declare new names"
    namespace = _run_example(EXTENDING, "A CAM variant", "docs_extending")

    assert METHODS[method].family == "gradient"
    assert METHODS[cam].family == "cam" and METHODS[cam].needs_layer
    assert cam in gradcam_module.CAM_VARIANTS
    printed = capsys.readouterr().out
    assert "torch.Size([2, 3, 16, 16])" in printed and "torch.Size([2, 16, 16])" in printed

    net, x = namespace["net"], namespace["x"]
    assert isinstance(net, torch.nn.Module) and isinstance(x, torch.Tensor)
    attributions = registry_module.attribute(method, net, x, 0)
    assert attributions.shape == x.shape
    assert torch.isfinite(attributions).all()
    maps = registry_module.attribute(cam, net, x, None, layer="3")
    assert maps.shape == (x.shape[0], *x.shape[-2:])  # (B, H, W)
    assert (maps >= 0).all()  # the ReLU of the CAM definition
    # the absolute gradients' weights differ from Grad-CAM's signed ones, so the maps are the variant's own
    signed = registry_module.attribute("grad_cam", net, x, None, layer="3", relu=False)
    unsigned = registry_module.attribute(cam, net, x, None, layer="3", relu=False)
    assert not torch.allclose(signed, unsigned)

    assert namespace["saliency"].methods == ("gradient", method)
    assert namespace["gradcam"].methods == ("grad_cam", cam)
    result = namespace["result"]
    assert {key: tuple(value.shape) for key, value in result.maps().items()} == {
        method: (2, 16, 16),
        f"{cam}@3": (2, 16, 16),
    }


def test_the_registry_is_restored_after_the_example():
    """Runs after the example (file order): nothing it declared is left behind."""
    for name in _declared_names():
        assert name not in METHODS and name not in gradcam_module.CAM_VARIANTS


# ---------------------------------------------------------------------- Extending: LRP rules and composites
def test_the_lrp_example_runs_and_its_rules_do_what_it_says():
    from lightning_interp.methods import Epsilon, lrp

    namespace = _run_example(EXTENDING, "An LRP rule or composite", "docs_lrp")
    net, x = namespace["net"], namespace["x"]
    assert namespace["relevance"].shape == x.shape and namespace["halved"].shape == x.shape
    # the user's rule on the last layer passes down exactly half of what the epsilon rule does (the same
    # stabiliser), and the composite's z+ / box rules are used below it: the halving carries to the input
    plain = lrp(net, x, 0, rule={"6": Epsilon(1e-6), torch.nn.Conv2d: namespace["ZPlus"]()})
    torch.testing.assert_close(namespace["halved"], 0.5 * plain)
    assert namespace["callback"].method_options["lrp"]["rule"] is namespace["composite"]


def test_a_composite_given_as_a_method_option_reaches_lrp_through_the_callbacks_explainer():
    from lightning_interp.methods import lrp

    namespace = _run_example(EXTENDING, "An LRP rule or composite", "docs_lrp_callback")
    net, x, composite = namespace["net"], namespace["x"], namespace["composite"]
    result = namespace["callback"].explainer()(net, x)
    expected = lrp(net, x, result.target, rule=composite)
    torch.testing.assert_close(result.attributions["lrp"], expected)
    assert not torch.allclose(expected, lrp(net, x, result.target))  # the composite is not the default rule


# ---------------------------------------------------------------------- Extending: a callback
def _fit(tmp_path, callbacks) -> tuple[pl.LightningModule, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = tiny_classifier()
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=False, max_epochs=2, limit_train_batches=3)
    trainer.fit(model, datamodule=tiny_datamodule())
    return model, trainer


def test_the_callback_example_logs_its_scalars_and_leaves_training_alone(tmp_path):
    namespace = _run_example(EXTENDING, "A callback", "docs_callback")
    callback = namespace["callback"]
    assert isinstance(callback, pl.Callback)

    with_it, trainer = _fit(tmp_path / "with", [callback])
    without, _ = _fit(tmp_path / "without", [])
    for (name, ours), (_, theirs) in zip(with_it.state_dict().items(), without.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), f"the example callback changed training: {name}"

    for key in ("my_interp/gradient/concentration", "my_interp/smoothgrad/concentration"):
        value = float(trainer.callback_metrics[key])
        # the share of the mass in the top 10% of pixels: at least 0.1 (a uniform map), at most 1
        assert 0.1 - 1e-6 <= value <= 1.0, (key, value)
    assert len(callback.probe) == callback.num_samples == 8

    # trainer.validate() runs under inference mode: the example still explains there
    validating = quiet_trainer(tmp_path / "validate", callbacks=[callback], logger=False)
    (metrics,) = validating.validate(with_it, datamodule=tiny_datamodule(), verbose=False)
    assert 0.1 - 1e-6 <= metrics["my_interp/gradient/concentration"] <= 1.0


# ---------------------------------------------------------------------- the site
@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, a page missing from the nav, a docstring reference to a
    name that does not exist, or a docstring mkdocstrings cannot render fails it. Skipped only outside CI without
    the ``docs`` extra (``pip install -e ".[docs]"``)."""
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        if os.environ.get("CI"):
            pytest.fail('CI must build the docs: install the docs extra (pip install -e ".[test,docs]")')
        pytest.skip('mkdocs is not installed (pip install -e ".[docs]")')
    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    done = subprocess.run(
        [*command, "--site-dir", str(site)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=900,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    catalogue = (site / "methods" / "index.html").read_text(encoding="utf-8")
    for name in METHODS:  # the generated table reached the built page
        assert f"<code>{name}</code>" in catalogue, name
    for page in ("callbacks/saliency", "reference/methods", "benchmarks", "changelog"):
        assert (site / page / "index.html").is_file(), page
