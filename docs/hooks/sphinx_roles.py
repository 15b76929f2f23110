"""Griffe extension: the package's docstrings write Sphinx roles (:class:`~lightning_interp.methods.Explainer`,
:func:`lrp`); render each as code that links to the object's page where the site documents it.

A role whose target does not exist (a name no scope of the docstring knows) is a broken reference: it is logged as a
warning, which fails ``mkdocs build --strict``. A target that exists but has no page of its own (a private helper,
torch) is shown as code without a link.
"""

from __future__ import annotations

import builtins
import logging
import re
from typing import Any

import griffe

_log = logging.getLogger("mkdocs.plugins.lightning_interp.sphinx_roles")

ROLE = re.compile(r":(?:py:)?(class|func|data|mod|meth|attr|obj|exc|const):`([^`]+)`")
EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)
EXTERNAL = (*dir(builtins), "torch", "lightning", "numpy", "matplotlib", "torchmetrics", "torchvision", "typing")


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` seen from ``obj``'s scope, or None when no scope knows it."""
    if target.startswith("lightning_interp"):
        return target  # a full path: whether it exists is checked by _exists
    head, _, rest = target.partition(".")
    scope: Any = obj
    while scope is not None:
        try:
            path = scope.resolve(head)
        except Exception:
            path = None
        if path is not None:
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    return None


def _exists(obj: griffe.Object, path: str) -> bool:
    try:
        root = obj.package
        if path == root.path:
            return True
        if not path.startswith(root.path + "."):
            return True  # outside the package: not ours to check
        root.get_member(path[len(root.path) + 1 :])
    except Exception:
        return False
    return True


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the package into an optional cross-reference."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            value = ROLE.sub(lambda m: self._replace(obj, m), obj.docstring.value)
            # the package writes "Example:" (Google style allows it); griffe reads only "Examples:" as doctest blocks
            obj.docstring.value = EXAMPLE.sub(r"\1Examples:", value)
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            self._walk(member, seen)

    def _replace(self, obj: griffe.Object, match: re.Match) -> str:
        role, text = match.group(1), match.group(2).strip()
        short = text.startswith("~")
        target = text.lstrip("~.").removesuffix("()")
        title = target.rsplit(".", 1)[-1] if short else target
        if role in ("func", "meth"):
            title += "()" if not title.endswith(")") else ""
        if target.split(".")[0] in EXTERNAL:
            return f"`{title}`"
        path = _resolve(obj, target)
        if path is None or not _exists(obj, path):
            _log.warning(f"{obj.path}: the docstring's :{role}:`{text}` names nothing known there (a broken reference)")
            return f"`{title}`"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'
