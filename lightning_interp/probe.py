"""ProbeSet: the fixed samples that callbacks explain every epoch."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Subset,
    TensorDataset,
)

from lightning_interp._lightning import user_sampler
from lightning_interp.methods.model.detection import box_masks
from lightning_interp.methods.model.tasks import label_kind

__all__ = [
    "BatchParser",
    "ParsedBatch",
    "ProbeSet",
    "ValidationScan",
    "dataset_labels",
    "labels_of_the_data",
    "parse_batch",
    "sampled_indices",
    "scannable",
    "split_inputs",
]

INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values", "img", "input_ids", "tokens")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")
MASK_KEYS = ("mask", "masks", "segmentation", "seg", "object_mask")
CLASS_MAP_KEYS = ("class_map", "class_maps", "label_map", "semantic", "semantic_mask")
"""Dict keys read as segmentation class maps: (B, H, W) integer class indices (see :func:`parse_batch`)."""


@dataclass
class ParsedBatch:
    """A batch split into inputs, optional labels ((B,) or (B, K)) and optional (B, H, W) masks; for a dict batch
    also the key of the inputs and the batch's other per-sample tensors (``attention_mask``, ``token_type_ids``,
    ...), the model's other inputs; for a model of several inputs (``model(image, table)``) the inputs after the
    first, passed after it in that order."""

    inputs: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None
    extras: dict[str, Tensor] | None = None
    input_key: str | None = None
    class_maps: Tensor | None = None
    more_inputs: tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (tuple, list)):  # a parser's (image, table): the first, and the others after it
            first, *more = split_inputs(self.inputs)
            self.inputs, self.more_inputs = first, (*more, *self.more_inputs)

    def to_host(self) -> ParsedBatch:
        """A copy with every tensor detached, on the CPU."""

        def host(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.detach().cpu().clone()

        extras = None if self.extras is None else {name: host(value) for name, value in self.extras.items()}
        return ParsedBatch(
            host(self.inputs),  # type: ignore[arg-type]
            host(self.labels),
            host(self.masks),
            extras,
            self.input_key,
            host(self.class_maps),
            tuple(host(value) for value in self.more_inputs),  # type: ignore[misc]
        )


BatchParser = Callable[[Any], ParsedBatch | tuple]
"""A user function turning one batch into ``ParsedBatch``, ``(inputs, labels, masks)`` or ``(inputs, labels, masks,
class_maps)`` (any but the inputs may be None; class maps: (B, H, W) integer class indices of a segmentation set;
inputs: a tensor, or a tuple of tensors for a model of several inputs, ``model(*inputs)``)."""


def split_inputs(value: Sequence[Any]) -> tuple[Tensor, ...]:
    """The inputs of a model of several inputs, ``(image, table, ...)``: tensors of one row per sample each, the
    same number of rows.

    Raises:
        ValueError: an item is not a tensor, or the inputs hold different numbers of rows.

    Example:
        >>> [tuple(part.shape) for part in split_inputs((torch.zeros(2, 1, 4, 4), torch.zeros(2, 5)))]
        [(2, 1, 4, 4), (2, 5)]
    """
    parts = tuple(value)
    if not parts or not all(isinstance(part, Tensor) and part.ndim >= 1 for part in parts):
        found = [_describe(part) for part in parts]
        raise ValueError(
            f"The inputs of a model of several inputs are a tuple of (batch, ...) tensors, one per model argument; got "
            f"{found}."
        )
    rows = [part.shape[0] for part in parts]
    if len(set(rows)) != 1:
        raise ValueError(
            f"The several inputs of a batch hold different numbers of samples {rows} (shapes "
            f"{[tuple(part.shape) for part in parts]}); each must hold one row per sample."
        )
    return parts


def _is_several_inputs(value: object) -> bool:
    """Whether a batch's first item holds a model's several inputs: a tuple or list of (B, ...) tensors."""
    return (
        isinstance(value, (tuple, list))
        and len(value) > 0
        and all(isinstance(part, Tensor) and part.ndim >= 1 for part in value)
        and len({part.shape[0] for part in value}) == 1
    )


def _looks_like_labels(value: object, inputs: Tensor) -> bool:
    """Class indices (B,), 0/1 or regression targets (B,), or one-hot / multi-hot / multi-output targets (B, K);
    not a (B, T) tensor shaped like (B, T) inputs (an attention mask or a second input of a sequence model)."""
    return (
        isinstance(value, Tensor)
        and not value.is_complex()
        and value.ndim in (1, 2)
        and value.shape[0] == inputs.shape[0]
        and not (value.ndim == 2 and inputs.ndim == 2 and value.shape == inputs.shape)
    )


def as_labels(value: Tensor) -> Tensor:
    """Labels as kept in a probe set, on the CPU: integers and booleans as int64, other numbers as float32, and a
    (N, 1) column as (N,).

    Example:
        >>> as_labels(torch.tensor([[True], [False]])).tolist()
        [1, 0]
    """
    labels = value.detach().cpu()
    labels = labels.float() if labels.is_floating_point() else labels.long()
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels


def _as_mask(value: object, inputs: Tensor) -> Tensor | None:
    """``value`` as (B, H, W) bool if it is a per-pixel mask matching the inputs' grid, or as (B, T) for token,
    feature or signal inputs (B, T) / (B, C, T) when it is a boolean (B, T) tensor (an integer attention mask is not
    an object mask)."""
    if not isinstance(value, Tensor) or value.shape[:1] != inputs.shape[:1]:
        return None
    if inputs.ndim in (2, 3):
        sequence = value.dtype == torch.bool and value.ndim == 2 and value.shape[1] == inputs.shape[-1]
        return value if sequence else None
    if inputs.ndim != 4:
        return None
    spatial = tuple(inputs.shape[-2:])
    if value.ndim == 4 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim == 3 and tuple(value.shape[-2:]) == spatial:
        return value > 0.5 if value.is_floating_point() else value.bool()
    return None


def _is_tuple_attention_mask(batch: Sequence[Any], inputs: Tensor, labels: Tensor | None) -> bool:
    """Whether a tuple batch's second item is the attention mask of its token ids, as in ``(input_ids,
    attention_mask, labels)`` (HuggingFace's order, e.g. a ``TensorDataset``): integer (not boolean: a boolean
    (B, T) tensor is an object mask) 0/1 values shaped like integer (B, T) inputs, with labels after it."""
    if len(batch) < 3 or labels is None or labels is batch[1]:
        return False
    mask = batch[1]
    return (
        isinstance(mask, Tensor)
        and inputs.ndim == 2
        and not inputs.is_floating_point()
        and not inputs.is_complex()
        and mask.shape == inputs.shape
        and mask.dtype != torch.bool
        and not mask.is_floating_point()
        and bool(((mask == 0) | (mask == 1)).all())
    )


def _as_class_map(value: object, inputs: Tensor, *, binary: bool = True) -> Tensor | None:
    """``value`` as (B, H, W) int64 if it is a segmentation class map on the inputs' grid: an integer (not boolean)
    (B, H, W) or (B, 1, H, W) tensor; with ``binary=False`` only one holding a value above 1 (an integer tensor of 0
    and 1 under a mask key stays an object mask)."""
    if not isinstance(value, Tensor) or inputs.ndim != 4 or value.shape[:1] != inputs.shape[:1]:
        return None
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        return None
    if value.ndim == 4 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 3 or tuple(value.shape[-2:]) != tuple(inputs.shape[-2:]):
        return None
    if not binary and (value.numel() == 0 or int(value.max()) <= 1):
        return None
    return value.long()


def _warn_about_mask_grid(items: Iterable[object], inputs: Tensor, what: str = "a batch item") -> None:
    """Warn about the first item shaped like per-pixel masks (batch, h, w) / (batch, 1, h, w) on another grid."""
    for item in items:
        if not isinstance(item, Tensor) or item.shape[:1] != inputs.shape[:1]:
            continue
        if item.ndim == 3 or (item.ndim == 4 and item.shape[1] == 1):
            warnings.warn(
                f"{what} of shape {tuple(item.shape)} looks like masks, but masks must be (batch, H, W) or "
                f"(batch, 1, H, W) on the inputs' grid {tuple(inputs.shape[-2:])} to score where a map points "
                "(localization, pointing game), so it is left out. Resize masks to the inputs (nearest "
                "neighbour) in the dataset to have those scores.",
                stacklevel=3,
            )
            return


def _warn_about_flat_inputs(batch: Sequence[Any], inputs: Tensor, labels: Tensor | None) -> None:
    """Warn when a flat ``(image, table, label)`` batch looks like a model's several inputs: the item read as labels
    is a float (B, F) tensor and a later item is integer (B,) class indices, which would then be left out."""
    if labels is None or labels is not batch[1] or not labels.is_floating_point() or labels.ndim != 2:
        return
    later = [
        item
        for item in batch[2:]
        if isinstance(item, Tensor) and item.ndim == 1 and item.shape[0] == inputs.shape[0]
        and not item.is_floating_point() and item.dtype != torch.bool
    ]  # fmt: skip
    if later:
        warnings.warn(
            f"A batch of the form {_describe(batch)}: its second item, a float {tuple(labels.shape)} tensor, is read "
            "as the labels (one-hot, soft or several values per sample), and the integer (batch,) item after it is "
            "left out. If the model takes several inputs, nest them in the batch, ((image, table), label): the flat "
            "form reads as (inputs, labels, masks).",
            stacklevel=3,
        )


def _is_detection_targets(value: object) -> bool:
    """Whether ``value`` is a detection set's targets: a list (or tuple) of dicts, one per image, with ``boxes``."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(item, Mapping) and isinstance(item.get("boxes"), Tensor) for item in value)
    )


def _detection_batch(batch: Sequence[Any]) -> ParsedBatch:
    """A detection batch ``(images, targets)`` (torchvision's collate, ``tuple(zip(*samples))``): the images
    stacked into (B, C, H, W) inputs, and each image's ground-truth boxes as its (B, H, W) mask (the union of its
    boxes); no labels (an image holds several objects)."""
    images, targets = batch[0], batch[1]
    if isinstance(images, Tensor):
        shapes = {tuple(images.shape[1:])}
    elif isinstance(images, (list, tuple)) and all(isinstance(image, Tensor) for image in images):
        shapes = {tuple(image.shape) for image in images}
    else:
        raise TypeError(f"A detection batch's images must be a list of (C, H, W) tensors, got {_describe(images)}.")
    count = images.shape[0] if isinstance(images, Tensor) else len(images)
    if count != len(targets) or any(len(shape) != 3 for shape in shapes):
        raise ValueError(
            f"A detection batch (images, targets) needs one (C, H, W) image per target dict; got {count} images of "
            f"shapes {sorted(shapes)[:4]} and {len(targets)} target dicts."
        )
    if len(shapes) > 1:
        raise ValueError(
            f"The images of this detection batch have different sizes ({sorted(shapes)[:4]}); the callbacks explain "
            "the probe images as one (N, C, H, W) batch. Resize the validation images to one size in the dataset, "
            "or give the callbacks probe=ProbeSet(images_of_one_size, masks=box_masks) (box_masks from "
            "lightning_interp.methods turns boxes into masks)."
        )
    inputs = images if isinstance(images, Tensor) else torch.stack(list(images))
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    masks = []
    for target in targets:
        boxes = target["boxes"].detach().reshape(-1, 4).cpu()
        masks.append(box_masks(boxes, size).any(dim=0) if boxes.shape[0] else torch.zeros(size, dtype=torch.bool))
    return ParsedBatch(inputs, None, torch.stack(masks))


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
    tuples or lists (the labels are the first later item of shape (B,) or
    (B, K), not shaped like (B, T) inputs, so ``(ids, attention_mask, y)``
    works, and its integer 0/1 second item is the model's ``attention_mask``
    where its ``forward`` takes one; an item shaped like the inputs' grid is
    taken as the mask); dicts
    with keys such as ``image``/``input``/``x``, ``label``/``target``/``y``
    and ``mask``. For anything else pass ``parser``.

    Segmentation batches: an integer (B, H, W) (or (B, 1, H, W)) tensor on the
    inputs' grid is a *class map* (one class index per pixel, kept as int64,
    never binarised) when it is the second item of a tuple (``(image,
    class_map)``), under a key of ``CLASS_MAP_KEYS`` or a label key, or under
    a mask key with a value above 1. Boolean, float and 0/1 masks under the
    mask keys (or after the labels in a tuple) stay object masks.

    Detection batches: ``(images, targets)`` with a list of (C, H, W) images (or a (B, C, H, W) tensor) and a
    list of target dicts with ``boxes`` (torchvision's form): the images of one size are stacked, and each image's
    ground-truth boxes become its mask (their union); images of different sizes are refused.

    Models of several inputs (``model(image, table)``): ``((image, table), labels, ...)``, the inputs as a tuple
    or list first; the first is ``inputs`` (labels and masks are read against it), the others ``more_inputs``. A flat
    ``(image, table, labels)`` cannot be told from ``(inputs, labels, masks)``: nest the inputs in the dataset, or
    give a ``batch_parser`` that returns ``((image, table), labels, masks)``.

    Raises:
        TypeError: the batch has another form; the message shows what was found.

    Example:
        >>> parsed = parse_batch((torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])))
        >>> parsed.inputs.shape, parsed.labels.tolist(), parsed.masks
        (torch.Size([2, 1, 4, 4]), [0, 1], None)
        >>> two = parse_batch(((torch.zeros(2, 1, 4, 4), torch.zeros(2, 5)), torch.tensor([0, 1])))
        >>> two.inputs.shape, [tuple(more.shape) for more in two.more_inputs], two.labels.tolist()
        (torch.Size([2, 1, 4, 4]), [(2, 5)], [0, 1])
    """
    if isinstance(batch, ParsedBatch):
        return batch
    if parser is not None:
        result = parser(batch)
        if isinstance(result, ParsedBatch):
            return result
        if isinstance(result, Tensor):
            return ParsedBatch(result)
        items = [*list(result), None, None, None]
        return ParsedBatch(items[0], items[1], items[2], class_maps=items[3])
    if isinstance(batch, Tensor):
        return ParsedBatch(batch)
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and _is_detection_targets(batch[1]):
        return _detection_batch(batch)
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and _is_several_inputs(batch[0]):
        # ((image, table), labels, ...): a model of several inputs; the rest is read against the first input
        first, *more = batch[0]
        parsed = parse_batch((first, *batch[1:]))
        parsed.more_inputs = tuple(more)
        return parsed
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        inputs = batch[0]
        # the first item after the inputs that can be labels: (x, y, ...), or (ids, attention_mask, y)
        labels = next((item for item in batch[1:] if _looks_like_labels(item, inputs)), None)
        # a segmentation batch (image, class_map): an integer (B, H, W) map where the labels would be
        class_maps = _as_class_map(batch[1], inputs) if len(batch) > 1 else None
        masks = next((m for m in (_as_mask(item, inputs) for item in batch[2:]) if m is not None), None)
        if masks is None and class_maps is None and inputs.ndim == 4:
            _warn_about_mask_grid(batch[2:], inputs)
        extras = {"attention_mask": batch[1]} if _is_tuple_attention_mask(batch, inputs, labels) else None
        _warn_about_flat_inputs(batch, inputs, labels)
        return ParsedBatch(inputs, labels, masks, extras, class_maps=class_maps)
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if isinstance(batch.get(k), Tensor)), None)
        if key is not None:
            inputs = batch[key]
            labels = next((batch[k] for k in LABEL_KEYS if _looks_like_labels(batch.get(k), inputs)), None)
            found = [(k, _as_class_map(batch.get(k), inputs)) for k in (*CLASS_MAP_KEYS, *LABEL_KEYS)]
            found += [(k, _as_class_map(batch.get(k), inputs, binary=False)) for k in MASK_KEYS]
            map_key, class_maps = next(((k, m) for k, m in found if m is not None), (None, None))
            masks = next(
                (m for m in (_as_mask(batch.get(k), inputs) for k in MASK_KEYS if k != map_key) if m is not None), None
            )
            given = next((k for k in MASK_KEYS if isinstance(batch.get(k), Tensor) and k != map_key), None)
            if masks is None and given is not None and inputs.ndim == 4:
                _warn_about_mask_grid([batch[given]], inputs, f"batch[{given!r}]")
            # the model's other inputs: every other per-sample tensor (the model's forward decides which it takes)
            extras = {
                str(k): v
                for k, v in batch.items()
                if k != key
                and k not in LABEL_KEYS
                and k not in MASK_KEYS
                and k not in CLASS_MAP_KEYS
                and isinstance(v, Tensor)
                and v.ndim >= 1
                and v.shape[0] == inputs.shape[0]
            }
            return ParsedBatch(inputs, labels, masks, extras or None, str(key), class_maps)
    raise TypeError(
        f"Cannot find the inputs in a batch of the form: {_describe(batch)}. Understood forms are a tensor, "
        f"(inputs, labels, ...) tuples and dicts with an input key {INPUT_KEYS}. "
        "A model of several inputs takes ((image, table), labels, ...) batches. "
        "Pass data=DataDescription(batch_parser=fn) to the callback, where fn(batch) returns "
        "(inputs, labels_or_None, masks_or_None) (inputs: a tensor, or a tuple of them for several inputs), "
        "or build the probe yourself with ProbeSet(inputs, labels, masks)."
    )


class ProbeSet:
    """A fixed, small set of samples (with optional labels and masks) kept on the CPU.

    Callbacks explain the same probe samples at every validation epoch, so
    their maps can be compared across epochs; several callbacks can share one
    ``ProbeSet`` so their results line up. A callback stores its probe set in
    its ``state_dict``, so a resumed run uses the same samples: when the
    samples came from an indexable dataset, as their dataset indices and a
    per-sample fingerprint (a few bytes each, re-read and checked on resume),
    otherwise as the inputs themselves, in their own dtype.

    Args:
        inputs: (N, ...) samples; for a model of several inputs (``model(image, table)``) a tuple of them, one per
            model argument in order: the first is :attr:`inputs` (what labels, masks and pictures are read
            against), the others :attr:`more_inputs`.
        labels: optional labels: (N,) class indices, 0/1 or real values, or
            (N, K) one-hot, soft, multi-hot or real-valued rows (integers and
            booleans kept as int64, other numbers as float32; (N, 1) becomes (N,)).
        masks: optional (N, H, W) ground-truth object masks (or (N, T) for token, feature and
            signal inputs: which tokens, features or time steps hold the evidence): boolean, integer (non-zero is
            inside) or float (above 0.5 is inside).
        class_maps: optional (N, H, W) integer class maps of a segmentation set (one class index per pixel, e.g.
            255 for unlabelled pixels), kept as int64: the map callbacks score each map against the mask of the
            class it explains, and the representation callbacks derive multi-hot image labels from them.
        indices: optional (N,) dataset indices of the samples (set by the draws from a dataloader).
        extras: the model's other inputs, by keyword, each (N, ...): a dict batch's ``attention_mask``,
            ``token_type_ids``, ... (set by the draws from dict batches). The callbacks pass the ones the model's
            ``forward`` takes (see :func:`~lightning_interp.methods.keyword_inputs`) with every call.
        input_key: the keyword of ``inputs`` in the model's ``forward`` (``"input_ids"``, ``"pixel_values"``):
            the dict batch's key they came from.

    Example:
        >>> probe = ProbeSet(torch.zeros(4, 1, 8, 8), labels=torch.tensor([0, 1, 0, 1]))
        >>> len(probe), probe.has_labels, probe.has_masks
        (4, True, False)
        >>> ids, mask = torch.tensor([[7, 8, 0], [9, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
        >>> text = ProbeSet(ids, extras={"attention_mask": mask}, input_key="input_ids")
        >>> text.real_tokens().tolist()
        [[True, True, False], [True, False, False]]
        >>> two = ProbeSet((torch.zeros(4, 1, 8, 8), torch.zeros(4, 5)), labels=torch.tensor([0, 1, 0, 1]))
        >>> two.inputs.shape, [tuple(more.shape) for more in two.more_inputs]
        (torch.Size([4, 1, 8, 8]), [(4, 5)])
    """

    def __init__(
        self,
        inputs: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
        masks: Tensor | None = None,
        *,
        indices: Tensor | None = None,
        extras: Mapping[str, Tensor] | None = None,
        input_key: str | None = None,
        class_maps: Tensor | None = None,
    ) -> None:
        more: tuple[Tensor, ...] = ()
        if isinstance(inputs, (tuple, list)):
            inputs, *others = split_inputs(inputs)
            more = tuple(others)
        if not isinstance(inputs, Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
            shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"ProbeSet inputs must be a non-empty (N, ...) tensor (or a tuple of them), got {shape}.")
        count = inputs.shape[0]
        with torch.inference_mode(False):
            self.inputs = inputs.detach().cpu().clone()
            self.more_inputs: tuple[Tensor, ...] = tuple(value.detach().cpu().clone() for value in more)
            """The model's inputs after the first, for a model of several inputs (empty otherwise)."""
            self.labels = None if labels is None else as_labels(torch.as_tensor(labels)).clone()
            self.masks = None if masks is None else torch.as_tensor(masks).detach().cpu().clone()
            self.indices = None if indices is None else torch.as_tensor(indices).detach().cpu().long().clone()
            self.class_maps = None if class_maps is None else torch.as_tensor(class_maps).detach().cpu().clone()
            self.extras: dict[str, Tensor] = {
                str(name): torch.as_tensor(value).detach().cpu().clone() for name, value in (extras or {}).items()
            }
        self.input_key = input_key
        self.source: object | None = None  # the ValidationScan that read the samples, if one did
        wrong = {name: tuple(value.shape) for name, value in self.extras.items() if value.shape[:1] != (count,)}
        if wrong:
            raise ValueError(f"extras must hold one row per sample ({count}), got shapes {wrong}.")
        if input_key is not None and not isinstance(input_key, str):
            raise TypeError(f"input_key must be a string or None, got {type(input_key).__name__}.")
        if self.indices is not None and self.indices.shape != (count,):
            raise ValueError(f"indices must have shape ({count},), got {tuple(self.indices.shape)}.")
        if self.labels is not None and (self.labels.ndim not in (1, 2) or self.labels.shape[0] != count):
            raise ValueError(
                f"labels must have shape ({count},) (class indices, 0/1 or values) or ({count}, K) (one-hot, multi-hot "
                f"or several values per sample), got {tuple(self.labels.shape)}."
            )
        if self.masks is not None:
            if self.masks.ndim == 4 and self.masks.shape[1] == 1:
                self.masks = self.masks[:, 0]
            sequence = self.masks.ndim == 2 and self.inputs.ndim in (2, 3) and self.masks.shape[1] == inputs.shape[-1]
            if not (self.masks.ndim == 3 or sequence) or self.masks.shape[0] != count:
                raise ValueError(
                    f"masks must have shape ({count}, H, W) for images, or ({count}, {inputs.shape[-1]}) (one flag "
                    f"per token, feature or time step) for inputs of shape {tuple(inputs.shape)}; got "
                    f"{tuple(self.masks.shape)}."
                )
            self.masks = self.masks > 0.5 if self.masks.is_floating_point() else self.masks.bool()
        if self.class_maps is not None:
            if self.class_maps.ndim == 4 and self.class_maps.shape[1] == 1:
                self.class_maps = self.class_maps[:, 0]
            maps = self.class_maps
            if maps.ndim != 3 or maps.shape[0] != count or maps.is_floating_point() or maps.dtype == torch.bool:
                raise ValueError(
                    f"class_maps must be ({count}, H, W) integer class indices (one per pixel), got "
                    f"{tuple(maps.shape)} {maps.dtype}; boolean object masks go in masks=..."
                )
            self.class_maps = maps.long()

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def all_inputs(self) -> tuple[Tensor, ...]:
        """Every model input of the samples, in the model's order: ``(inputs, *more_inputs)``."""
        return (self.inputs, *self.more_inputs)

    def __repr__(self) -> str:
        shapes = [tuple(value.shape[1:]) for value in self.all_inputs]
        return (
            f"ProbeSet(n={len(self)}, input_shape={shapes[0] if len(shapes) == 1 else shapes}, "
            f"labels={self.has_labels}, masks={self.has_masks}"
            + (", class_maps=True)" if self.class_maps is not None else ")")
        )

    @property
    def has_labels(self) -> bool:
        """Whether the probe samples carry labels (of any kind, see the class docstring)."""
        return self.labels is not None

    @property
    def has_masks(self) -> bool:
        """Whether the probe samples carry ground-truth object masks."""
        return self.masks is not None

    @property
    def has_class_maps(self) -> bool:
        """Whether the probe samples carry segmentation class maps."""
        return self.class_maps is not None

    def subset(self, count: int) -> ProbeSet:
        """The first ``count`` samples as a new probe set."""
        return self.take(slice(0, count))

    def take(self, rows: slice | Tensor | list[int]) -> ProbeSet:
        """The samples at ``rows`` (a slice or row indices), with their labels, masks and other inputs.

        Example:
            >>> ProbeSet(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2])).take([2, 0]).labels.tolist()
            [2, 0]
        """
        index = torch.as_tensor(rows, dtype=torch.long) if isinstance(rows, list) else rows
        probe = ProbeSet(
            tuple(value[index] for value in self.all_inputs) if self.more_inputs else self.inputs[index],
            None if self.labels is None else self.labels[index],
            None if self.masks is None else self.masks[index],
            indices=None if self.indices is None else self.indices[index],
            extras={name: value[index] for name, value in self.extras.items()},
            input_key=self.input_key,
            class_maps=None if self.class_maps is None else self.class_maps[index],
        )
        probe.source = self.source
        return probe

    def real_tokens(self, pad_id: int | None = None) -> Tensor | None:
        """(N, T) bool, True at the tokens that are not padding, for token-id inputs (integer (N, T)): the
        ``attention_mask`` among the model's other inputs where there is one, else the ids that are not
        ``pad_id``; None for other inputs, or when neither says (every token is real)."""
        if self.inputs.ndim != 2 or self.inputs.is_floating_point():
            return None
        mask = self.extras.get("attention_mask")
        if mask is not None and mask.shape == self.inputs.shape:
            return mask != 0
        return None if pad_id is None else self.inputs != pad_id

    def fingerprint(self) -> Tensor:
        """Per-sample (sum, sum of squares) of the inputs in float64: (N, 2), cheap to store and to compare.

        Example:
            >>> ProbeSet(torch.ones(2, 3)).fingerprint().tolist()
            [[3.0, 3.0], [3.0, 3.0]]
        """
        values = torch.cat([value.detach().reshape(len(self), -1).double() for value in self.all_inputs], dim=1)
        return torch.stack([values.sum(dim=1), values.square().sum(dim=1)], dim=1)

    def matches(self, fingerprint: Tensor) -> bool:
        """Whether these inputs have the given :meth:`fingerprint` (relative tolerance 1e-6)."""
        mine = self.fingerprint()
        return mine.shape == fingerprint.shape and bool(
            torch.allclose(mine, fingerprint.double(), rtol=1e-6, atol=1e-9)
        )

    def state_dict(self, *, by_index: bool = False) -> dict[str, Any]:
        """What a checkpoint needs to bring these samples back.

        Args:
            by_index: store the dataset indices and a fingerprint instead of the
                tensors (only when the samples have indices): the samples are
                re-read from the dataset and checked on resume.
        """
        if by_index and self.indices is not None:
            return {"indices": self.indices, "fingerprint": self.fingerprint(), "labels": self.labels}
        state = {"inputs": self.inputs, "labels": self.labels, "masks": self.masks, "indices": self.indices}
        if self.more_inputs:
            state["more_inputs"] = self.more_inputs
        if self.extras or self.input_key is not None:
            state.update(extras=dict(self.extras), input_key=self.input_key)
        if self.class_maps is not None:
            state["class_maps"] = self.class_maps
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ProbeSet:
        """Rebuild a probe set saved with :meth:`state_dict` (with its tensors; a state saved ``by_index`` is re-read
        with :meth:`ValidationScan.load` instead)."""
        inputs = state.get("inputs")
        if inputs is None:
            raise ValueError(
                "This probe state holds dataset indices, not samples: re-read them with "
                "ValidationScan.load(state['indices']) and check them with ProbeSet.matches(state['fingerprint'])."
            )
        more = tuple(state.get("more_inputs") or ())
        return cls(
            (inputs, *more) if more else inputs,
            state.get("labels"),
            state.get("masks"),
            indices=state.get("indices"),
            extras=state.get("extras"),
            input_key=state.get("input_key"),
            class_maps=state.get("class_maps"),
        )

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
            parts.append(parsed.to_host())
            held += parsed.inputs.shape[0]
            if held >= pool_factor * num_samples or (held >= num_samples and not stratify):
                break
        if not parts:
            raise ValueError("The dataloader yielded no batches, so there is nothing to draw probe samples from.")
        rows = [_sample(p, row) for p in parts for row in range(p.inputs.shape[0])]
        probe = _probe_of(rows, parts[0].input_key)
        labels = probe.labels
        if labels is not None and stratify:
            chosen = _stratified_indices(labels, num_samples)
        else:
            chosen = torch.arange(min(num_samples, len(probe)))
        return probe.take(chosen)

    @classmethod
    def from_dataloader(
        cls,
        dataloader: DataLoader | Iterable[Any],
        num_samples: int,
        *,
        stratify: bool = True,
        batch_parser: BatchParser | None = None,
        limit_batches: int | float | None = None,
    ) -> ProbeSet:
        """Draw a probe set from the samples a dataloader validates on, deterministically.

        For a map-style dataset (see :class:`ValidationScan`) the candidates
        are exactly the indices the loader's sampler yields within
        ``limit_batches`` (a validation split given as
        ``SubsetRandomSampler(val_indices)`` is honoured; workers and
        distributed samplers do not change the draw, nor does shuffling when
        ``limit_batches`` covers the whole loader: with fewer batches, a
        shuffled loader's candidates are those of one epoch's first batches,
        drawn at that moment), the classes are balanced
        over all of them, and only the chosen samples are loaded; the probe
        set records their dataset indices. Other loaders (iterable datasets)
        are iterated as they are: a one-shot stream is consumed, so the
        callbacks instead take their probe from the batches the trainer loads.
        The global RNG is left as it was.

        Args:
            dataloader: a DataLoader, or any iterable of batches.
            num_samples: how many samples to draw.
            stratify: balance the classes (with labels).
            batch_parser: turns a batch into ``(inputs, labels, masks)``.
            limit_batches: Lightning's ``limit_val_batches`` for the loader.

        Example:
            >>> data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20) % 4)
            >>> loader = DataLoader(data, batch_size=8, shuffle=True)
            >>> ProbeSet.from_dataloader(loader, 8).labels.tolist()
            [0, 0, 1, 1, 2, 2, 3, 3]
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if scannable(dataloader):
            with torch.inference_mode(False):
                scan = ValidationScan(dataloader, limit_batches=limit_batches, batch_parser=batch_parser)
                if len(scan) == 0:
                    raise ValueError(
                        "The dataloader yields no samples, so there is nothing to draw probe samples from."
                    )
                return scan.load(scan.select(num_samples, stratify=stratify))
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
            return cls.from_batches(dataloader, num_samples, stratify=stratify, batch_parser=batch_parser)


def _is_map_style(dataset: Dataset | object) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, IterableDataset)


def scannable(loader: object) -> bool:
    """Whether a :class:`ValidationScan` can read ``loader``: a DataLoader with automatic batching over a
    map-style dataset. Other loaders (iterable datasets, streams) can only be read by iterating them."""
    return isinstance(loader, DataLoader) and _is_map_style(loader.dataset) and loader.batch_sampler is not None


LABEL_ATTRIBUTES = ("targets", "labels")
PASS_CACHE_BYTES = 256 * 2**20  # a label pass keeps the samples it reads up to this size, so none is read twice


def dataset_labels(dataset: object) -> Tensor | None:
    """The integer label of every sample as the dataset itself lists it, or None when it lists none.

    Understood: a ``targets`` or ``labels`` attribute with one integer per
    sample (torchvision's ``ImageFolder``, ``MNIST``, ``CIFAR10``, ...), a
    ``TensorDataset`` whose second tensor holds integer labels, and
    ``Subset`` / ``ConcatDataset`` of those. A dataset with a
    ``target_transform`` gives None: its samples carry transformed labels.

    Example:
        >>> from torch.utils.data import Subset, TensorDataset
        >>> data = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 3, 0]))
        >>> dataset_labels(Subset(data, [2, 3])).tolist()
        [3, 0]
    """
    if isinstance(dataset, Subset):
        base = dataset_labels(dataset.dataset)
        return None if base is None else base[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else torch.cat(parts)  # type: ignore[arg-type]
    if getattr(dataset, "target_transform", None) is not None:
        return None
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    candidates: list[object] = []
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        candidates.append(dataset.tensors[1])
    candidates += [getattr(dataset, name, None) for name in LABEL_ATTRIBUTES]
    for values in candidates:
        if values is None or isinstance(values, (str, bytes)):
            continue
        try:
            labels = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            continue
        if (
            labels.ndim == 1
            and labels.numel() == size
            and not labels.is_floating_point()
            and labels.dtype != torch.bool
        ):
            return labels.long()
    return None


def _batch_count(total: int, limit: int | float | None) -> int:
    """Batches Lightning validates of ``total`` for ``limit_val_batches=limit``."""
    if limit is None:
        return total
    if isinstance(limit, int) and not isinstance(limit, bool):  # a batch count (1 means one batch)
        return max(0, min(limit, total))
    fraction = float(limit)  # a fraction (1.0 means all)
    if fraction >= 1:
        return total
    return max(1, int(total * fraction)) if fraction > 0 else 0


def _sampler_generators(loader: DataLoader) -> list[torch.Generator]:
    """The torch generators a loader's samplers draw from (their state is restored after a scan)."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    wrapped = user_sampler(sampler)  # inside Lightning's distributed wrapper
    owners = [loader, loader.sampler, loader.batch_sampler, sampler, wrapped]
    found: list[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def sampled_indices(loader: DataLoader, limit_batches: int | float | None = None) -> Tensor:
    """The dataset indices a map-style loader yields in one epoch within ``limit_batches``, ascending.

    The loader's batch sampler is iterated once (no sample is loaded) with
    the global RNG and the samplers' own generators restored afterwards, so
    neither training nor the loader's next epoch changes. A
    ``DistributedSampler`` stands for every rank's share: the validation set
    as a whole.

    Args:
        loader: a DataLoader over a map-style dataset with automatic batching.
        limit_batches: Lightning's ``limit_val_batches`` (a batch count, a fraction, or None for all).

    Example:
        >>> from torch.utils.data import SubsetRandomSampler, TensorDataset
        >>> data = TensorDataset(torch.arange(10.0))
        >>> loader = DataLoader(data, batch_size=2, sampler=SubsetRandomSampler([7, 1, 4]))
        >>> sampled_indices(loader).tolist()
        [1, 4, 7]
    """
    if loader.batch_sampler is None:
        raise ValueError("sampled_indices needs a DataLoader with automatic batching (batch_size set).")
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", loader.sampler)
    wanted = _batch_count(len(batch_sampler), limit_batches)
    states = [(generator, generator.get_state()) for generator in _sampler_generators(loader)]
    chosen: list[int] = []
    try:
        with torch.random.fork_rng(devices=[]):
            if isinstance(sampler, DistributedSampler):  # the trainer validates every rank's share
                chosen = _distributed_indices(sampler, wanted * (loader.batch_size or 1))
            else:
                for count, batch in enumerate(batch_sampler):
                    if count >= wanted:
                        break
                    chosen.extend(int(index) for index in batch)
    finally:
        for generator, state in states:
            generator.set_state(state)
    return torch.tensor(sorted(set(chosen)), dtype=torch.long)


def _distributed_indices(sampler: DistributedSampler, per_rank: int) -> list[int]:
    """The dataset indices every rank's copy of ``sampler`` yields first (``per_rank`` each), together.

    Lightning's ``DistributedSamplerWrapper`` shards the positions of a user's sampler (its ``dataset`` lists
    them); one realisation of that sampler's order maps the positions to dataset indices, as every rank sees it.
    """
    wrapped = user_sampler(sampler)
    order = [int(index) for index in wrapped] if wrapped is not None else None
    chosen: list[int] = []
    for rank in range(sampler.num_replicas):
        shard = copy.copy(sampler)
        shard.rank = rank
        positions = list(DistributedSampler.__iter__(shard))[:per_rank]  # the base class: no re-listing of the order
        chosen.extend(order[p] if order is not None else int(p) for p in positions)
    return chosen


class ValidationScan:
    """The samples a loader validates on, with their labels, found while loading as few samples as possible.

    Candidates are the dataset indices the loader's sampler yields within
    Lightning's batch limit (:func:`sampled_indices`); labels come from the
    dataset's own list (:func:`dataset_labels`) when it has one and no
    ``batch_parser`` could change them, otherwise from one pass over the
    candidates (which keeps the samples it reads, up to 256 MiB, so the
    chosen ones are not read again). :meth:`select` then picks a
    class-stratified, deterministic set from all candidates, and :meth:`load`
    reads only the chosen samples, remembering them, so several callbacks
    drawing from one scan read each sample once.

    Args:
        loader: a DataLoader over a map-style dataset with automatic batching.
        limit_batches: Lightning's ``limit_val_batches``.
        batch_parser: turns a collated batch into ``(inputs, labels, masks)``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(30, 3), torch.arange(30) // 10)  # class-sorted
        >>> scan = ValidationScan(DataLoader(data, batch_size=8))
        >>> probe = scan.load(scan.select(6))
        >>> probe.labels.tolist(), probe.indices.tolist()
        ([0, 0, 1, 1, 2, 2], [0, 1, 10, 11, 20, 21])
    """

    def __init__(
        self,
        loader: DataLoader,
        *,
        limit_batches: int | float | None = None,
        batch_parser: BatchParser | None = None,
    ) -> None:
        if not scannable(loader):
            raise ValueError("ValidationScan needs a DataLoader over a map-style dataset with a batch_size.")
        self.dataset = loader.dataset
        self.collate_fn = loader.collate_fn
        self.batch_size = loader.batch_size or 1
        self.num_workers = loader.num_workers
        self.batch_parser = batch_parser
        self.indices = sampled_indices(loader, limit_batches)
        self._samples: dict[int, _Sample] = {}
        self._input_key: str | None = None
        listed = None if batch_parser is not None else dataset_labels(self.dataset)
        if listed is not None:
            self.labels: Tensor | None = listed[self.indices]
            self.labels_from = "the dataset's label list"
        else:
            self.labels = self._label_pass()
            self.labels_from = "one pass over the validation samples"

    def __len__(self) -> int:
        return self.indices.numel()

    def select(self, num_samples: int, *, stratify: bool = True) -> Tensor:
        """``num_samples`` dataset indices: classes take turns, each giving its earliest unused candidate.

        A smaller draw is a subset of a larger one (they share the turn
        order), so callbacks with different ``num_samples`` explain nested
        sets. Sorted by class, then index; without labels (or ``stratify``),
        the first candidates.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if self.labels is None or not stratify:
            return self.indices[:num_samples].clone()
        return self.indices[_stratified_indices(self.labels, num_samples)]

    def load(self, indices: Tensor) -> ProbeSet:
        """The samples at these dataset indices, read through the loader's ``collate_fn`` and the batch parser."""
        wanted = [int(i) for i in torch.as_tensor(indices).reshape(-1)]
        missing = [i for i in dict.fromkeys(wanted) if i not in self._samples]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            self._remember(chunk, self.collate_fn([self.dataset[i] for i in chunk]))
        probe = _probe_of([self._samples[i] for i in wanted], self._input_key, indices=torch.tensor(wanted))
        probe.source = self  # samples with the same index in probe sets of one scan are the same sample
        return probe

    def _remember(self, chunk: list[int], batch: Any) -> ParsedBatch:
        parsed = parse_batch(batch, self.batch_parser)
        if parsed.inputs.shape[0] != len(chunk):
            raise ValueError(
                f"A batch of {len(chunk)} samples parsed into {parsed.inputs.shape[0]} inputs; the batch_parser must "
                "return one input per sample."
            )
        self._input_key = parsed.input_key
        for row, index in enumerate(chunk):
            self._samples[index] = _sample(parsed, row)
        return parsed

    def _label_pass(self) -> Tensor | None:
        """Labels of every candidate from one read; keeps the samples while they fit in PASS_CACHE_BYTES."""
        subset = Subset(self.dataset, self.indices.tolist())
        reader = DataLoader(
            subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=self.collate_fn
        )
        labels: list[Tensor] = []
        kept, position, keep = 0, 0, True
        with torch.random.fork_rng(devices=[]):  # creating a loader iterator draws a seed from the global RNG
            for batch in reader:
                chunk = self.indices[position : position + self.batch_size].tolist()
                parsed = self._remember(chunk, batch) if keep else parse_batch(batch, self.batch_parser)
                position += len(chunk)
                if keep:
                    kept += sum(value.element_size() * value.numel() for value in (parsed.inputs, *parsed.more_inputs))
                    if kept > PASS_CACHE_BYTES:
                        keep = False
                        self._samples.clear()
                if parsed.labels is None:
                    return None
                labels.append(as_labels(parsed.labels))
        return torch.cat(labels) if labels else None


_Sample = tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor], Tensor | None, tuple[Tensor, ...]]
"""One sample of a parsed batch: inputs, label, mask, the model's other inputs by keyword, class map and the inputs
after the first (a model of several inputs), on the CPU."""


def _sample(parsed: ParsedBatch, row: int) -> _Sample:
    return (
        parsed.inputs[row].detach().cpu().clone(),
        None if parsed.labels is None else as_labels(parsed.labels[row : row + 1])[0].clone(),
        None if parsed.masks is None else parsed.masks[row].detach().cpu().clone(),
        {name: value[row].detach().cpu().clone() for name, value in (parsed.extras or {}).items()},
        None if parsed.class_maps is None else parsed.class_maps[row].detach().cpu().clone(),
        tuple(value[row].detach().cpu().clone() for value in parsed.more_inputs),
    )


def _probe_of(samples: list[_Sample], input_key: str | None, *, indices: Tensor | None = None) -> ProbeSet:
    """A probe set of single samples. Token samples padded per batch to different lengths (a dynamic-padding
    collate) are padded on the right to the longest, with the attention mask (and every other input of the
    same length) set to zero there, so the model sees what it saw in its batch."""
    names = set(samples[0][3])
    if any(set(sample[3]) != names for sample in samples):
        raise ValueError("The probe samples carry different model inputs (batch keys); every batch needs the same.")
    if len({len(sample[5]) for sample in samples}) > 1:
        raise ValueError("The probe samples carry different numbers of model inputs; every batch needs the same.")
    lengths = {sample[0].shape for sample in samples}
    if len(lengths) > 1:
        _check_paddable(samples, lengths)
    longest = max(sample[0].shape[-1] for sample in samples)
    inputs = torch.stack([_padded(sample[0], longest) for sample in samples])
    labels = None if any(s[1] is None for s in samples) else torch.stack([s[1] for s in samples])  # type: ignore[misc]
    masks = None if any(s[2] is None for s in samples) else torch.stack([s[2] for s in samples])  # type: ignore[misc]
    extras = {
        name: torch.stack([_padded(s[3][name], longest, s[0].shape[-1]) for s in samples]) for name in sorted(names)
    }
    class_maps = None if any(s[4] is None for s in samples) else torch.stack([s[4] for s in samples])  # type: ignore[misc]
    more = tuple(
        torch.stack([_padded(s[5][position], longest, s[0].shape[-1]) for s in samples])
        for position in range(len(samples[0][5]))
    )
    return ProbeSet(
        (inputs, *more) if more else inputs,
        labels,
        masks,
        indices=indices,
        extras=extras,
        input_key=input_key,
        class_maps=class_maps,
    )


def _check_paddable(samples: list[_Sample], lengths: set[torch.Size]) -> None:
    first = samples[0]
    tokens = all(s[0].ndim == 1 and not s[0].is_floating_point() for s in samples)
    if not tokens or "attention_mask" not in first[3] or any(s[2] is not None for s in samples):
        raise ValueError(
            f"The probe samples have different shapes ({sorted(tuple(shape) for shape in lengths)[:4]}), as batches "
            "padded to their own longest sample give. Token ids are padded to one length only with an "
            "'attention_mask' in the batches (so the model ignores the padding); otherwise pad every sample to one "
            "length in the dataset or the collate function, or give probe=ProbeSet(...)."
        )


def _padded(value: Tensor, length: int, own: int | None = None) -> Tensor:
    """``value`` padded with zeros on the right to ``length`` along its last dimension when that dimension is the
    sample's token length ``own`` (or ``own`` is None: the ids themselves)."""
    size = value.shape[-1] if value.ndim else None
    if size is None or size == length or (own is not None and size != own):
        return value
    return torch.nn.functional.pad(value, (0, length - size))


def labels_of_the_data(probe: ProbeSet) -> Tensor | None:
    """The labels to read the kind of labels from: those of every sample the probe was drawn from, when the
    probe came from a :class:`ValidationScan` that read them, else the probe's own. A few probe samples can look
    one-hot where the data is multi-label (samples with two labels are rarer), or hold only some of the values.

    Example:
        >>> labels_of_the_data(ProbeSet(torch.zeros(2, 3), torch.tensor([0, 1]))).tolist()
        [0, 1]
    """
    scanned = getattr(probe.source, "labels", None)
    return scanned if isinstance(scanned, Tensor) and probe.labels is not None else probe.labels


def strata(labels: Tensor) -> Tensor:
    """The group of each sample: its class (class indices; the most likely class of one-hot or soft rows), its
    first positive label (multi-hot rows; rows without any after every label), or for real values the rank of
    its (first) value. Sorting by it puts class blocks together and values in order.

    Example:
        >>> strata(torch.tensor([[0, 1], [1, 1], [0, 0]])).tolist()
        [1, 0, 2]
        >>> strata(torch.tensor([0.9, 0.1, 0.5, 0.3])).tolist()
        [3, 0, 2, 1]
    """
    kind = label_kind(labels)
    if kind == "class":
        return labels.round().long()
    if kind in ("one_hot", "soft"):
        return labels.argmax(dim=1)
    if kind == "multi_hot":
        positive = labels != 0
        return torch.where(positive.any(dim=1), positive.long().argmax(dim=1), labels.shape[1])
    values = labels.reshape(labels.shape[0], -1)[:, 0]
    rank = torch.empty_like(values, dtype=torch.long)
    rank[torch.argsort(values, stable=True)] = torch.arange(values.numel())
    return rank


def _spread_order(rank: Tensor) -> Tensor:
    """Bit-reversed ranks (van der Corput order): the lowest ``k`` of them spread over the whole range of ranks for
    every ``k``, so draws of different sizes from real-valued labels are nested and cover the values' range."""
    bits = max(1, int(rank.max()).bit_length()) if rank.numel() else 1
    reversed_rank = torch.zeros_like(rank)
    for bit in range(bits):
        reversed_rank |= ((rank >> bit) & 1) << (bits - 1 - bit)
    return reversed_rank


def _stratified_indices(labels: Tensor, count: int) -> Tensor:
    """Groups (:func:`strata`) take turns, each giving its earliest unused sample (real values: in an order that
    spreads over their range); result sorted by group then position."""
    groups = strata(labels)
    turns = _spread_order(groups) if label_kind(labels) == "continuous" else groups
    per_class = [torch.nonzero(turns == c).flatten() for c in turns.unique(sorted=True)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(count, groups.numel()):
        for indices in per_class:
            if depth < indices.numel() and len(chosen) < count:
                chosen.append(int(indices[depth]))
        depth += 1
    picked = torch.tensor(chosen, dtype=torch.long)
    order = torch.argsort(groups[picked] * groups.numel() + picked, stable=True)
    return picked[order]
