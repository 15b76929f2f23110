"""MkDocs hook: the method catalogue's table is made from the registry at build time, so it cannot drift.

``docs/methods.md`` holds the marker ``<!-- the registry's table -->``; :func:`method_table` writes one row per
method of :data:`lightning_interp.methods.METHODS`, in the registry's order: name, family, what it is (the first
paragraph of its docstring), cost per probe sample at the callbacks' defaults, and the reference its tests compare it
with. ``tests/test_docs.py`` checks the rows against the registry.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- the registry's table -->"
ROLE = re.compile(r":(?:py:)?[a-z]+:`([^`]+)`")


def _cell(text: str) -> str:
    text = ROLE.sub(lambda match: f"`{match.group(1).lstrip('~').rsplit('.', 1)[-1]}`", text)  # :func:`~a.b` -> `b`
    return " ".join(text.split()).replace("|", "\\|")


def method_table() -> str:
    """The catalogue as a Markdown table, one row per registered method."""
    from lightning_interp.methods import METHODS

    rows = [
        "| method | family | what it is | cost per sample | checked against |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, spec in METHODS.items():
        doc = (spec.function.__doc__ or "").strip().split("\n\n")[0]
        rows.append(
            f"| `{name}` | {spec.family}{', stochastic' if spec.stochastic else ''} | {_cell(doc)} "
            f"| {_cell(spec.cost.replace('`', ''))} | {_cell(spec.reference)} |"
        )
    return "\n".join(rows) + "\n"


def on_config(config: Any, **kwargs: Any) -> None:
    """Document the checkout being built (as mkdocstrings does, ``paths: [.]``), not another installed copy."""
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, method_table())
    return markdown
