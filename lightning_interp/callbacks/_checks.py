"""Argument checks of the callbacks, from one table: each argument name is checked the same way wherever it
appears, with one message.

A callback calls ``check_arguments(task=task, num_samples=num_samples, ...)`` once in ``__init__``; the rule of
every name it passes is in :data:`ARGUMENTS` (a name missing there is a programming error, raised as such).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_interp.methods import (
    CHANNEL_REDUCTIONS,
    HEAD_FUSIONS,
    PROBE_SOLVERS,
    RDM_METRICS,
    RSA_METHODS,
    TASKS,
)

__all__ = ["ARGUMENTS", "MOVED_IN_0_2", "check_arguments", "refuse_moved_arguments"]


@dataclass(frozen=True)
class IntAtLeast:
    """An int (not a bool) >= ``minimum``; ``why`` is added to the message."""

    minimum: int = 1
    why: str = ""

    def __call__(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            what = "a positive int" if self.minimum == 1 else f"an int >= {self.minimum}"
            why = f" ({self.why})" if self.why else ""
            raise ValueError(f"{name} must be {what}{why}, got {value!r}.")


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: Sequence[Any]
    why: str = ""

    def __call__(self, name: str, value: Any) -> None:
        if value not in self.choices:
            why = f" ({self.why})" if self.why else ""
            raise ValueError(f"{name} must be one of {tuple(self.choices)}{why}, got {value!r}.")


@dataclass(frozen=True)
class CallableOrNone:
    def __call__(self, name: str, value: Any) -> None:
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {type(value).__name__}.")


@dataclass(frozen=True)
class Between:
    """A number in the open interval (``low``, ``high``)."""

    low: float
    high: float

    def __call__(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low < value < self.high:
            raise ValueError(f"{name} must lie in ({self.low:g}, {self.high:g}), got {value!r}.")


ARGUMENTS: dict[str, Callable[[str, Any], None]] = {
    # what to run on
    "num_samples": IntAtLeast(1),
    "every_n_epochs": IntAtLeast(1),
    "max_layers": IntAtLeast(1),
    "max_features": IntAtLeast(1),
    "max_classes": IntAtLeast(1),
    "internal_batch_size": IntAtLeast(1),
    "explain_samples": IntAtLeast(1),
    "head_samples": IntAtLeast(1),
    "steps": IntAtLeast(1),
    "num_images": IntAtLeast(1),
    "passes": IntAtLeast(2, "the epistemic part compares stochastic passes"),
    "n_bins": IntAtLeast(2),
    "seed": IntAtLeast(0, "a generator seed"),
    # what the output is and what to explain
    "task": OneOf(("auto", *TASKS)),
    "channel_reduction": OneOf(CHANNEL_REDUCTIONS),
    "solver": OneOf(PROBE_SOLVERS),
    "rdm_metric": OneOf(RDM_METRICS),
    "rsa_method": OneOf(RSA_METHODS),
    "head_fusion": OneOf(HEAD_FUSIONS),
    "output_kind": OneOf(
        ("logits", "evidential"), "'logits': MC dropout; 'evidential': the output is Dirichlet evidence"
    ),
    "mode": OneOf(("optimize", "dream"), "'optimize' from noise, 'dream' on probe images"),
    "test_fraction": Between(0.0, 1.0),
    "border_fraction": Between(0.0, 0.5),
    # functions the user gives
    "output_transform": CallableOrNone(),
    "forward_fn": CallableOrNone(),
}
"""The rule of every checked argument, by name."""


def check_arguments(**values: Any) -> None:
    """Check each ``name=value`` against its rule in :data:`ARGUMENTS`.

    Example:
        >>> check_arguments(task="auto", num_samples=8)
        >>> check_arguments(task="multi")
        Traceback (most recent call last):
        ...
        ValueError: task must be one of ('auto', 'multiclass', 'binary', 'multilabel', 'regression'), got 'multi'.
    """
    for name, value in values.items():
        ARGUMENTS[name](name, value)


_DATA = "data=DataDescription({name}=...)"
_DISPLAY = "display=Display({name}=...)"
MOVED_IN_0_2: dict[str, str] = {
    **{name: _DATA for name in ("class_names", "vocabulary", "decode", "pad_id", "feature_names", "batch_parser")},
    **{
        name: _DISPLAY
        for name in ("cmap", "evolution_samples", "evolution_columns", "rows_per_image", "background_drawing")
    },
    "smoothgrad_samples": 'methods={{..., "smoothgrad": {{"n_samples": ...}}}}',
    "noise_level": 'methods={{..., "smoothgrad": {{"noise_level": ...}}}}',
    "ig_steps": 'methods={{..., "integrated_gradients": {{"n_steps": ...}}}}',
    "attribution": "methods=<the method's name>",
    "attribution_options": "methods={{<the method's name>: {{option: value}}}}",
    "attribution_samples": "num_samples=...",
    "explain": "methods=<the method's name>",
    "explain_options": "methods={{<the method's name>: {{option: value}}}}",
    "n_samples": "passes=... (the dropout passes)",
    "steps": 'metrics={{"deletion": {{"steps": ...}}, "insertion": {{"steps": ...}}, ...}}',
    "baseline": 'metrics={{"deletion": {{"baseline": ...}}, "insertion": {{"baseline": ...}}, ...}}',
    "fraction": 'metrics={{..., "top_drop": {{"fraction": ...}}}}',
    "robustness_radius": 'metrics={{..., "robustness": {{"radius": ...}}}}',
    "robustness_samples": 'metrics={{..., "robustness": {{"samples": ...}}}}',
    "cascading": 'metrics={{..., "cascading": {{"depth": ...}}}}',
    **{name: "test=TCAVTest({name}=...)" for name in ("n_random", "random_set_size", "alpha", "equal_var")},
    "min_cav_accuracy": "cav=CAVOptions(min_accuracy=...)",
    "test_fraction": "cav=CAVOptions(test_fraction=...)",
    "l2": "cav=CAVOptions(l2=...)",
    "batch_size": "nothing: the callback chooses its forward chunk for the model and device",
    **{
        name: "image=ImageOptions({name}=...)"
        for name in ("value_range", "parameterization", "decorrelate", "transforms", "octaves", "octave_scale")
    },
}
"""Arguments of 0.1 that 0.2 moved, and what to write instead (a callback that still takes the name is not
concerned)."""


def refuse_moved_arguments(kind: type, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise a TypeError saying what to write instead for each 0.1 argument in ``given`` that ``kind`` no longer
    takes (``accepted``: the names its constructor takes, through its ``**kwargs`` chain).

    Example:
        >>> refuse_moved_arguments(object, ["class_names"], [])
        Traceback (most recent call last):
        ...
        TypeError: object(class_names=...) moved in lightning-interp 0.2: write data=DataDescription(class_names=...)...
    """
    accepted = set(accepted)
    moved = [name for name in given if name in MOVED_IN_0_2 and name not in accepted]
    if moved:
        hints = "; ".join(f"{kind.__name__}({name}=...) moved in lightning-interp 0.2: write "
                          f"{MOVED_IN_0_2[name].format(name=name)}" for name in moved)  # fmt: skip
        raise TypeError(f"{hints} (see CHANGELOG.md).")
