"""Options every callback shares, grouped: what the data is (:class:`DataDescription`) and how pictures look
(:class:`Display`).

A :class:`DataDescription` is given once: pass it to one lightning-interp
callback and every other one in the same ``Trainer`` that has none uses it
(when several different ones are given, each callback keeps its own and those
without one get none). A :class:`Display` is per callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import matplotlib

from lightning_interp.probe import BatchParser

__all__ = ["DataDescription", "Display"]


def _names(names: Sequence[str] | None, option: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{option} must be a list of strings, got {names!r}.")
    return tuple(names)


@dataclass(frozen=True)
class DataDescription:
    """What the validation data is, for the pictures, the tags and reading batches.

    Args:
        class_names: one name per class, shown (and used in per-class tags where it has no '/') instead of the
            index.
        vocabulary: token inputs (integer ids, (N, T)): the string of each id, ``vocabulary[id]``; the grids then
            show the text.
        decode: token inputs: a function from one id to its string (instead of ``vocabulary``).
        pad_id: token inputs: the padding id, hidden in the pictures and given zero map values.
        feature_names: feature-vector inputs (N, F): one name per feature, written above the heat rows.
        batch_parser: turns a batch of an unusual form into ``(inputs, labels, masks)``; see
            :func:`~lightning_interp.probe.parse_batch`.
        input_names: a model of several inputs (``model(image, table)``): one name per input, in the model's order,
            used in the tags of each input's maps and scores (``interp_<name>/maps_table``,
            ``.../share_table``); default ``input0``, ``input1``, ...

    Example:
        >>> DataDescription(class_names=["cat", "dog"]).class_names
        ('cat', 'dog')
    """

    class_names: Sequence[str] | None = None
    vocabulary: Sequence[str] | None = None
    decode: Callable[[int], str] | None = None
    pad_id: int | None = None
    feature_names: Sequence[str] | None = None
    batch_parser: BatchParser | None = None
    input_names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", _names(self.class_names, "class_names"))
        object.__setattr__(self, "vocabulary", _names(self.vocabulary, "vocabulary"))
        object.__setattr__(self, "feature_names", _names(self.feature_names, "feature_names"))
        object.__setattr__(self, "input_names", _names(self.input_names, "input_names"))
        names = self.input_names or ()
        if any(not name or "/" in name for name in names) or len(set(names)) != len(names):
            raise ValueError(
                f"input_names must be distinct non-empty names without '/' (they go in tags), got {names}."
            )
        for option in ("decode", "batch_parser"):
            value = getattr(self, option)
            if value is not None and not callable(value):
                raise TypeError(f"{option} must be callable or None, got {type(value).__name__}.")
        if self.vocabulary is not None and self.decode is not None:
            raise ValueError("Give vocabulary=... or decode=..., not both: both turn token ids into strings.")
        pad_id = self.pad_id
        if pad_id is not None and (not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0):
            raise ValueError(f"pad_id must be None or a token id (an int >= 0), got {pad_id!r}.")


@dataclass(frozen=True)
class Display:
    """How a callback's pictures look and are drawn.

    Args:
        cmap: matplotlib colormap of the heatmaps (None: the callback's own, ``"inferno"`` for maps,
            ``"viridis"`` for activations).
        evolution_samples: rows of the evolution strip logged at fit end (0 to skip).
        evolution_columns: about how many epochs an evolution strip shows, evenly spaced (feature visualisation:
            0 skips its strip).
        rows_per_image: probe rows per grid image. ``"auto"`` (the default): 2 for grids drawn row by row (images,
            feature vectors, signals), so each image stays legible at the size of a TensorBoard Time Series card, and
            one image for token text (900 px wide, shown at the card's width whatever its rows); an int splits
            every grid into images of that many rows, ``interp_<name>/maps/rows_1-2``, ..., drawn compact (a grid
            of no more rows keeps the plain tag ``interp_<name>/maps``); None logs one grid per run,
            ``interp_<name>/maps`` (legible in the Images tab or at "actual image size").
        background_drawing: draw and log images on the run's background thread (the default), so training waits
            only for the computation and the scalars; False draws them inline (the same images, for debugging).

    Example:
        >>> Display().rows_per_image, Display(rows_per_image=None).rows_per_image
        ('auto', None)
    """

    cmap: str | None = None
    evolution_samples: int = 4
    evolution_columns: int = 10
    rows_per_image: int | Literal["auto"] | None = "auto"
    background_drawing: bool = True

    def __post_init__(self) -> None:
        if self.cmap is not None and self.cmap not in matplotlib.colormaps:
            raise ValueError(f"Unknown matplotlib colormap {self.cmap!r}; try 'inferno', 'viridis', 'jet' or 'turbo'.")
        for option in ("evolution_samples", "evolution_columns"):
            value: Any = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{option} must be an int >= 0, got {value!r}.")
        rows = self.rows_per_image
        if rows is not None and rows != "auto" and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise ValueError(f"rows_per_image must be 'auto', None or a positive int, got {rows!r}.")
        if not isinstance(self.background_drawing, bool):
            raise TypeError(f"background_drawing must be True or False, got {self.background_drawing!r}.")
