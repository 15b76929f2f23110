"""The README cannot drift from the code: its method table is the registry's, and its Extending example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lightning_interp.methods.cams.gradcam as gradcam_module
import lightning_interp.methods.registry as registry_module
from lightning_interp.methods import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _method_table(text: str) -> list[tuple[list[str], str]]:
    """The rows of the table whose header starts ``| method | family |``: (method names, family column)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.replace(" ", "").startswith("|method|family|")]
    assert len(starts) == 1, f"expected one method table in README.md, found {len(starts)}"
    rows = []
    for line in lines[starts[0] + 2 :]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        assert names, f"a method table row names no method: {line!r}"
        rows.append((names, cells[1]))
    return rows


def _extending_block(text: str, index: int = 0) -> str:
    """The ``index``-th fenced python block after the ``## Extending`` heading (and before the next ``## ``
    section)."""
    match = re.search(r"^## Extending\s*$", text, flags=re.MULTILINE)
    assert match is not None, "README.md has no '## Extending' section"
    section = text[match.end() :]
    following = re.search(r"^## ", section, flags=re.MULTILINE)
    section = section[: following.start()] if following else section
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) > index, f"the '## Extending' section has no python block number {index + 1}"
    return blocks[index]


def test_method_table_is_the_registry():
    rows = _method_table(_readme())
    names = [name for row_names, _ in rows for name in row_names]
    assert names == list(METHODS), "README's method table must list the registry's methods in its order"
    for row_names, family in rows:
        for name in row_names:
            assert family.startswith(METHODS[name].family), (
                f"README gives {name!r} the family {family!r}; the registry says {METHODS[name].family!r}"
            )


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


def test_extending_example_runs_and_declares_its_methods(registry_restored, capsys):
    source = _extending_block(_readme())
    names = re.findall(r"^def (\w+)\(", source, flags=re.MULTILINE)
    assert len(names) == 2, f"expected one method and one CAM weights function in the example, got {names}"
    method, cam = names[0], names[1].removesuffix("_weights")
    assert method not in METHODS and cam not in METHODS, "the example must declare new names"

    namespace: dict[str, object] = {"__name__": "readme_extending"}
    with torch.random.fork_rng(devices=[]):  # the example draws its weights and inputs: seeded, then given back
        torch.manual_seed(0)
        exec(compile(source, f"{README}#extending", "exec"), namespace)  # our own README's example

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
    source = _extending_block(_readme())
    names = re.findall(r"^def (\w+)\(", source, flags=re.MULTILINE)
    for name in (names[0], names[1].removesuffix("_weights")):
        assert name not in METHODS and name not in gradcam_module.CAM_VARIANTS


def test_the_lrp_example_runs_and_its_rules_do_what_it_says():
    from lightning_interp.methods import Epsilon, lrp

    namespace: dict[str, object] = {"__name__": "readme_lrp"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        exec(compile(_extending_block(_readme(), 1), f"{README}#lrp", "exec"), namespace)
    net, x = namespace["net"], namespace["x"]
    assert namespace["relevance"].shape == x.shape and namespace["halved"].shape == x.shape
    # the user's rule on the last layer passes down exactly half of what the epsilon rule does (the same
    # stabiliser), and the composite's z+ / box rules are used below it: the halving carries to the input
    plain = lrp(net, x, 0, rule={"6": Epsilon(1e-6), torch.nn.Conv2d: namespace["ZPlus"]()})
    torch.testing.assert_close(namespace["halved"], 0.5 * plain)
    assert namespace["callback"].method_options["lrp"]["rule"] is namespace["composite"]


def test_a_composite_given_as_a_method_option_reaches_lrp_through_the_callbacks_explainer():
    from lightning_interp.methods import lrp

    namespace: dict[str, object] = {"__name__": "readme_lrp_callback"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        exec(compile(_extending_block(_readme(), 1), f"{README}#lrp", "exec"), namespace)
    net, x, composite = namespace["net"], namespace["x"], namespace["composite"]
    result = namespace["callback"].explainer()(net, x)
    expected = lrp(net, x, result.target, rule=composite)
    torch.testing.assert_close(result.attributions["lrp"], expected)
    assert not torch.allclose(expected, lrp(net, x, result.target))  # the composite is not the default rule
