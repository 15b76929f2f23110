"""ProbeSet: the fixed samples that callbacks explain every epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["BatchParser", "ParsedBatch", "ProbeSet", "parse_batch"]

INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values", "img")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")
MASK_KEYS = ("mask", "masks", "segmentation", "seg", "object_mask")


@dataclass
class ParsedBatch:
    """A batch split into inputs, optional integer labels and optional (B, H, W) masks."""

    inputs: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None


BatchParser = Callable[[Any], ParsedBatch | tuple]
"""A user function turning one batch into ``ParsedBatch`` or ``(inputs, labels, masks)``
(labels and masks may be None)."""


def _looks_like_labels(value: object, batch: int) -> bool:
    return (
        isinstance(value, Tensor)
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
        and value.ndim == 1
        and value.shape[0] == batch
    )


def _as_mask(value: object, inputs: Tensor) -> Tensor | None:
    """``value`` as (B, H, W) bool if it is a per-pixel mask matching the inputs' grid."""
    if not isinstance(value, Tensor) or inputs.ndim != 4 or value.shape[0] != inputs.shape[0]:
        return None
    spatial = tuple(inputs.shape[-2:])
    if value.ndim == 4 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim == 3 and tuple(value.shape[-2:]) == spatial:
        return value > 0.5 if value.is_floating_point() else value.bool()
    return None


def _describe(batch: object) -> str:
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "dict with keys " + ", ".join(repr(k) for k in batch)
    if isinstance(batch, (list, tuple)):
        return f"{type(batch).__name__} of " + ", ".join(_describe(item) for item in batch)
    return type(batch).__name__


def parse_batch(batch: Any, parser: BatchParser | None = None) -> ParsedBatch:
    """Split a dataloader batch into inputs, labels and masks.

    Understood without help: a bare tensor; ``(x, y)`` and ``(x, y, ...)``
    tuples or lists (a third item shaped like the inputs' grid is taken as the
    mask); dicts with keys such as ``image``/``input``/``x``,
    ``label``/``target``/``y`` and ``mask``. For anything else pass ``parser``.

    Raises:
        TypeError: the batch has another form; the message shows what was found.

    Example:
        >>> parsed = parse_batch((torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])))
        >>> parsed.inputs.shape, parsed.labels.tolist(), parsed.masks
        (torch.Size([2, 1, 4, 4]), [0, 1], None)
    """
    if parser is not None:
        result = parser(batch)
        if isinstance(result, ParsedBatch):
            return result
        if isinstance(result, Tensor):
            return ParsedBatch(result)
        items = [*list(result), None, None]
        return ParsedBatch(items[0], items[1], items[2])
    if isinstance(batch, Tensor):
        return ParsedBatch(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        inputs = batch[0]
        batch_size = inputs.shape[0]
        labels = batch[1] if len(batch) > 1 and _looks_like_labels(batch[1], batch_size) else None
        masks = next((m for m in (_as_mask(item, inputs) for item in batch[2:]) if m is not None), None)
        return ParsedBatch(inputs, labels, masks)
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in INPUT_KEYS if isinstance(batch.get(k), Tensor)), None)
        if inputs is not None:
            labels = next((batch[k] for k in LABEL_KEYS if _looks_like_labels(batch.get(k), inputs.shape[0])), None)
            masks = next((m for m in (_as_mask(batch.get(k), inputs) for k in MASK_KEYS) if m is not None), None)
            return ParsedBatch(inputs, labels, masks)
    raise TypeError(
        f"Cannot find the inputs in a batch of the form: {_describe(batch)}. Understood forms are a tensor, "
        f"(inputs, labels, ...) tuples and dicts with an input key {INPUT_KEYS}. "
        "Pass batch_parser=fn where fn(batch) returns (inputs, labels_or_None, masks_or_None), "
        "or build the probe yourself with ProbeSet(inputs, labels, masks)."
    )


class ProbeSet:
    """A fixed, small set of samples (with optional labels and masks) kept on the CPU.

    Callbacks explain the same probe samples at every validation epoch, so
    their maps can be compared across epochs; several callbacks can share one
    ``ProbeSet`` so their results line up. A callback stores its probe set in
    its ``state_dict``, so a resumed run uses the same samples.

    Args:
        inputs: (N, ...) samples.
        labels: optional (N,) integer class labels.
        masks: optional (N, H, W) ground-truth object masks: boolean, integer (non-zero is
            inside) or float (above 0.5 is inside).

    Example:
        >>> probe = ProbeSet(torch.zeros(4, 1, 8, 8), labels=torch.tensor([0, 1, 0, 1]))
        >>> len(probe), probe.has_labels, probe.has_masks
        (4, True, False)
    """

    def __init__(self, inputs: Tensor, labels: Tensor | None = None, masks: Tensor | None = None) -> None:
        if not isinstance(inputs, Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
            shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"ProbeSet inputs must be a non-empty (N, ...) tensor, got {shape}.")
        count = inputs.shape[0]
        with torch.inference_mode(False):
            self.inputs = inputs.detach().cpu().clone()
            self.labels = None if labels is None else torch.as_tensor(labels).detach().cpu().long().clone()
            self.masks = None if masks is None else torch.as_tensor(masks).detach().cpu().clone()
        if self.labels is not None and self.labels.shape != (count,):
            raise ValueError(f"labels must have shape ({count},), got {tuple(self.labels.shape)}.")
        if self.masks is not None:
            if self.masks.ndim == 4 and self.masks.shape[1] == 1:
                self.masks = self.masks[:, 0]
            if self.masks.ndim != 3 or self.masks.shape[0] != count:
                raise ValueError(f"masks must have shape ({count}, H, W), got {tuple(self.masks.shape)}.")
            self.masks = self.masks > 0.5 if self.masks.is_floating_point() else self.masks.bool()

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __repr__(self) -> str:
        return (
            f"ProbeSet(n={len(self)}, input_shape={tuple(self.inputs.shape[1:])}, "
            f"labels={self.has_labels}, masks={self.has_masks})"
        )

    @property
    def has_labels(self) -> bool:
        """Whether the probe samples carry class labels."""
        return self.labels is not None

    @property
    def has_masks(self) -> bool:
        """Whether the probe samples carry ground-truth object masks."""
        return self.masks is not None

    def subset(self, count: int) -> ProbeSet:
        """The first ``count`` samples as a new probe set."""
        return ProbeSet(
            self.inputs[:count],
            None if self.labels is None else self.labels[:count],
            None if self.masks is None else self.masks[:count],
        )

    def state_dict(self) -> dict[str, Tensor | None]:
        """Tensors to store in a checkpoint."""
        return {"inputs": self.inputs, "labels": self.labels, "masks": self.masks}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor | None]) -> ProbeSet:
        """Rebuild a probe set saved with :meth:`state_dict`."""
        inputs = state["inputs"]
        assert inputs is not None
        return cls(inputs, state.get("labels"), state.get("masks"))

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[Any],
        num_samples: int,
        *,
        stratify: bool = True,
        batch_parser: BatchParser | None = None,
        pool_factor: int = 8,
    ) -> ProbeSet:
        """Draw a probe set from an iterable of batches, deterministically.

        Reads batches until it holds ``pool_factor * num_samples`` candidates
        (or the data ends). With labels and ``stratify``, classes take turns
        in increasing class order, each giving its earliest unused sample, and
        the result is sorted by class; otherwise the first ``num_samples``.

        Example:
            >>> xs = torch.arange(12.0).reshape(6, 2)
            >>> ys = torch.tensor([0, 0, 0, 1, 1, 2])
            >>> ProbeSet.from_batches([(xs, ys)], 3).labels.tolist()
            [0, 1, 2]
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        parts: list[ParsedBatch] = []
        held = 0
        for batch in batches:
            parsed = parse_batch(batch, batch_parser)
            parts.append(ParsedBatch(*(None if t is None else t.detach().cpu() for t in vars(parsed).values())))
            held += parsed.inputs.shape[0]
            if held >= pool_factor * num_samples or (held >= num_samples and not stratify):
                break
        if not parts:
            raise ValueError("The dataloader yielded no batches, so there is nothing to draw probe samples from.")
        inputs = torch.cat([p.inputs for p in parts])
        labels = torch.cat([p.labels for p in parts]) if all(p.labels is not None for p in parts) else None
        masks = torch.cat([p.masks for p in parts]) if all(p.masks is not None for p in parts) else None
        if labels is not None and stratify:
            chosen = _stratified_indices(labels, num_samples)
        else:
            chosen = torch.arange(min(num_samples, inputs.shape[0]))
        return cls(inputs[chosen], None if labels is None else labels[chosen], None if masks is None else masks[chosen])

    @classmethod
    def from_dataloader(
        cls,
        dataloader: DataLoader | Iterable[Any],
        num_samples: int,
        *,
        stratify: bool = True,
        batch_parser: BatchParser | None = None,
    ) -> ProbeSet:
        """Draw a probe set from a dataloader without touching the global RNG.

        For a map-style dataset the samples are read in index order through a
        plain single-process loader with the same ``collate_fn``, so shuffling,
        worker processes and distributed samplers do not change which samples
        are drawn; other loaders are iterated as they are. Creating a loader
        iterator draws from torch's global RNG, so the draw runs inside
        ``torch.random.fork_rng``: training randomness is unaffected.

        Example:
            >>> data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20) % 4)
            >>> loader = DataLoader(data, batch_size=8, shuffle=True)
            >>> ProbeSet.from_dataloader(loader, 8).labels.tolist()
            [0, 0, 1, 1, 2, 2, 3, 3]
        """
        source: Iterable[Any] = dataloader
        if isinstance(dataloader, DataLoader) and _is_map_style(dataloader.dataset):
            source = DataLoader(
                dataloader.dataset,
                batch_size=dataloader.batch_size or 64,
                shuffle=False,
                num_workers=0,
                collate_fn=dataloader.collate_fn,
            )
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
            return cls.from_batches(source, num_samples, stratify=stratify, batch_parser=batch_parser)


def _is_map_style(dataset: Dataset | object) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _stratified_indices(labels: Tensor, count: int) -> Tensor:
    """Classes take turns, each giving its earliest unused sample; result sorted by class then position."""
    per_class = [torch.nonzero(labels == c).flatten() for c in labels.unique(sorted=True)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(count, labels.numel()):
        for indices in per_class:
            if depth < indices.numel() and len(chosen) < count:
                chosen.append(int(indices[depth]))
        depth += 1
    picked = torch.tensor(chosen, dtype=torch.long)
    order = torch.argsort(labels[picked] * labels.numel() + picked, stable=True)
    return picked[order]
