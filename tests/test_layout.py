"""The package's shape: callbacks import public names only, methods never import Lightning, drawing lives in
``visualize``."""

from __future__ import annotations

import ast
import pathlib

import lightning_interp.methods as methods

PACKAGE = pathlib.Path(methods.__file__).parents[1]


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_callbacks_import_only_public_names_of_the_methods():
    offences = []
    for path in sorted((PACKAGE / "callbacks").glob("*.py")):
        for module, names in _imports(path):
            if not module.startswith("lightning_interp.methods"):
                continue
            private = [part for part in module.split(".") if part.startswith("_")]
            hidden = [name for name in names if name not in methods.__all__]
            if private or hidden:
                offences.append(f"{path.name}: from {module} import {', '.join(hidden) or '...'}")
    assert not offences, "callbacks use private parts of lightning_interp.methods:\n" + "\n".join(offences)


def test_the_methods_never_import_lightning():
    for path in sorted((PACKAGE / "methods").rglob("*.py")):
        for module, _ in _imports(path):
            assert not module.startswith(("lightning", "pytorch_lightning")) or module.startswith("lightning_interp"), (
                f"{path.relative_to(PACKAGE)} imports {module}: methods are pure torch"
            )


def test_drawing_lives_in_visualize():
    for path in sorted((PACKAGE / "callbacks").glob("*.py")):
        for module, _ in _imports(path):
            assert not module.startswith("matplotlib"), (
                f"callbacks/{path.name} draws with {module}: move it to visualize"
            )


def test_the_methods_are_grouped_by_family():
    groups = {p.name for p in (PACKAGE / "methods").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"attribution", "cams", "perturbation", "representation", "evaluation", "model"} <= groups
    loose = sorted(p.name for p in (PACKAGE / "methods").glob("*.py"))
    assert loose == ["__init__.py", "explain.py", "registry.py"], loose


def test_no_callback_takes_more_arguments_than_a_person_can_hold():
    """SaliencyCallback at most 15 constructor arguments, every public callback at most 18 (counted through the
    ``**kwargs`` each passes to its base); grouped options (DataDescription, Display, CAVOptions, ...) count once."""
    import inspect

    from lightning.pytorch.callbacks import Callback

    import lightning_interp
    from lightning_interp.callbacks._base import _accepted_arguments

    counts = {
        name: len(_accepted_arguments(kind))
        for name in lightning_interp.__all__
        if inspect.isclass(kind := getattr(lightning_interp, name)) and issubclass(kind, Callback)
    }
    assert counts["SaliencyCallback"] <= 15, counts
    assert max(counts.values()) <= 18, counts
    assert len(counts) == 14  # the 13 interp callbacks and UnshardedWindow (no argument)
