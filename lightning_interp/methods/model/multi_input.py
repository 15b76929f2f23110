"""Models of several inputs: Captum's tuple ``inputs`` and ``additional_forward_args`` for every registered method.

A model called as ``model(image, table, extra)`` is explained through the one
function of each method, written for one tensor, in one of three ways the
registry declares per method (:attr:`~lightning_interp.methods.MethodSpec.several_inputs`):

- ``"joint"``: the inputs are explained together, as Captum does. They are
  packed into one (B, D) matrix (each sample's values of every input, one after
  the other) and the method runs on the model called through an unpacking view,
  so a path (integrated gradients, DeepLIFT, GradientSHAP), noise, a coalition
  (KernelSHAP, LIME) or an ablated feature spans every input at once, and the
  attributions of all inputs together satisfy the method's completeness. The
  result is unpacked into one tensor per input, shaped like it.
- ``"each"``: the method perturbs one input at a time, the others at their
  values (occlusion's sliding windows, as Captum's ``Occlusion`` does for
  tuples): one result per input.
- ``"first"``: the method explains a layer (the CAM family): its map is sized to
  the first input, which is the image by convention, the others bound at their
  values: one map.

Tensors among ``additional_forward_args`` hold one row per sample and follow
their samples into every copy a method makes (``row r`` of a batch of copies is
sample ``r % B``); other values are passed as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.batching import segmented_columns
from lightning_interp.methods.model.inputs import BoundInputs

__all__ = ["SEVERAL_INPUTS", "InputLayout", "SeveralInputs", "attribute_several", "input_feature_masks", "input_shares"]

SeveralInputs = Literal["joint", "each", "first"]
SEVERAL_INPUTS: tuple[SeveralInputs, ...] = ("joint", "each", "first")

PER_INPUT_OPTIONS = ("baseline", "baselines", "feature_mask", "low", "high")
"""Options that describe the inputs themselves: with several inputs they are given as a tuple, one per input."""

_INPUT_SHAPED = ("gradient", "modified backward", "perturbation")  # families whose results are shaped like the inputs


class InputLayout:
    """How a tuple of (B, ...) tensors packs into one (B, D) matrix, each sample's values input after input, and
    back.

    Args:
        inputs: the tensors, each with the same batch size B; floating point (an integer input, e.g. token ids,
            cannot take a gradient or a path: pass it in ``additional_forward_args``).

    Example:
        >>> layout = InputLayout((torch.zeros(2, 3, 4, 4), torch.ones(2, 5)))
        >>> packed = layout.pack((torch.zeros(2, 3, 4, 4), torch.ones(2, 5)))
        >>> packed.shape, [tuple(part.shape) for part in layout.unpack(packed)]
        (torch.Size([2, 53]), [(2, 3, 4, 4), (2, 5)])
    """

    def __init__(self, inputs: Sequence[Tensor]) -> None:
        if not inputs or not all(isinstance(value, Tensor) for value in inputs):
            raise TypeError("Several inputs are given as a non-empty tuple of tensors, one row per sample in each.")
        batches = {tuple(value.shape[:1]) for value in inputs}
        if len(batches) != 1 or any(value.ndim < 1 for value in inputs):
            shapes = [tuple(value.shape) for value in inputs]
            raise ValueError(f"Every input must hold one row per sample, the same number of rows; got shapes {shapes}.")
        whole = [i for i, value in enumerate(inputs) if not value.is_floating_point()]
        if whole:
            raise ValueError(
                f"Input(s) {whole} of the tuple are not floating point ({[str(inputs[i].dtype) for i in whole]}); the "
                "methods move along, add noise to or take gradients of the explained inputs. Pass integer inputs "
                "(token ids, indices) in additional_forward_args, or explain their embeddings."
            )
        self.batch = inputs[0].shape[0]
        self.shapes = tuple(tuple(value.shape[1:]) for value in inputs)
        self.dtypes = tuple(value.dtype for value in inputs)
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        dtype = inputs[0].dtype
        for value in inputs[1:]:
            dtype = torch.promote_types(dtype, value.dtype)
        self.dtype = dtype

    @property
    def width(self) -> int:
        """D, the packed columns: every input's values per sample."""
        return sum(self.sizes)

    def pack(
        self, parts: Sequence[Tensor | float], *, name: str = "inputs", dtype: torch.dtype | None = None
    ) -> Tensor:
        """One (R, D) matrix of one value per input: each a (R, ...) tensor shaped like its input's samples (or
        broadcasting to that shape, e.g. (1, ...) or a number); R is 1 when every part is shared by all rows."""
        if not isinstance(parts, (tuple, list)) or len(parts) != len(self.shapes):
            raise ValueError(
                f"{name} must be a tuple of {len(self.shapes)} values, one per input (the model takes "
                f"{len(self.shapes)} inputs); got {type(parts).__name__}"
                f"{f' of {len(parts)}' if isinstance(parts, (tuple, list)) else ''}."
            )
        dtype = self.dtype if dtype is None else dtype
        tensors = [torch.as_tensor(part) for part in parts]
        rows = {
            value.shape[0] for value, shape in zip(tensors, self.shapes, strict=True) if value.ndim == len(shape) + 1
        }
        rows.discard(1)
        if len(rows) > 1:
            raise ValueError(f"The {name} of the inputs have different numbers of rows: {sorted(rows)}.")
        count = rows.pop() if rows else 1
        columns = []
        for index, (value, shape) in enumerate(zip(tensors, self.shapes, strict=True)):
            full = value if value.ndim == len(shape) + 1 else value.reshape(1, *value.shape)
            try:
                full = full.expand(count, *shape) if full.ndim == len(shape) + 1 else None
            except RuntimeError:
                full = None
            if full is None:
                raise ValueError(
                    f"The {name} of input {index} has shape {tuple(value.shape)}, which does not broadcast to that "
                    f"input's samples {shape} (with a leading row count of 1 or {count})."
                )
            columns.append(full.reshape(count, -1).to(dtype))
        device = next((value.device for value in tensors if value.numel()), None)
        return torch.cat([column.to(device) for column in columns], dim=1)

    def unpack(self, packed: Tensor) -> tuple[Tensor, ...]:
        """The inputs of a (M, D) packed batch, each (M, ...) in its own dtype (the gradient flows through)."""
        parts = torch.split(packed, list(self.sizes), dim=1)
        return tuple(
            part.reshape(packed.shape[0], *shape).to(dtype) if part.is_floating_point() else part.reshape(-1, *shape)
            for part, shape, dtype in zip(parts, self.shapes, self.dtypes, strict=True)
        )

    def unpack_like(self, packed: Tensor) -> tuple[Tensor, ...]:
        """Attributions of a (B, D) packed batch as one tensor per input, shaped like it, in its dtype."""
        return tuple(
            part.reshape(packed.shape[0], *shape).to(dtype)
            for part, shape, dtype in zip(
                torch.split(packed, list(self.sizes), dim=1), self.shapes, self.dtypes, strict=True
            )
        )


def _bound(
    model: nn.Module,
    inputs: Sequence[Tensor],
    explained: int | None,
    layout: InputLayout | None,
    arguments: Sequence[Any],
) -> BoundInputs:
    """``model`` called on a batch of copies of the samples: the explained input (``explained``, or all of them
    packed when None) from the batch, every other input and tensor argument from the samples, repeated per copy."""
    batch = inputs[0].shape[0]
    extras: dict[str, Tensor] = {}
    for position, value in enumerate(inputs):
        if position != explained and layout is None:
            extras[f"input{position}"] = value.detach()
    for position, value in enumerate(arguments):
        if isinstance(value, Tensor):
            if value.ndim == 0 or value.shape[0] != batch:
                raise ValueError(
                    f"additional_forward_args[{position}] is a tensor of shape {tuple(value.shape)}; a tensor there "
                    f"holds one row per sample ({batch}), so each copy of a sample gets its row. Pass a value shared "
                    "by every sample inside the model, or through a closure (lambda *xs: model(*xs, shared))."
                )
            extras[f"arg{position}"] = value.detach()

    def call(network: nn.Module, x: Tensor, **bound: Tensor) -> object:
        if layout is not None:
            parts = list(layout.unpack(x))
        else:
            parts = [x if position == explained else bound[f"input{position}"] for position in range(len(inputs))]
        rest = [bound.get(f"arg{position}", value) for position, value in enumerate(arguments)]
        return network(*parts, *rest)

    return BoundInputs(model, extras, forward_fn=call)


def _per_input(name: str, value: Any, count: int) -> Sequence[Any] | None:
    """The values of a per-input option, one per input, or None when the option is shared (a number, None)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None
    if isinstance(value, (tuple, list)) and len(value) == count:
        return value
    raise ValueError(
        f"With {count} inputs, {name} is given as a tuple of {count} values, one per input (a tensor shaped like "
        f"that input's samples, or a number), or as one number for all; got {type(value).__name__}"
        f"{f' of {len(value)}' if isinstance(value, (tuple, list)) else ''}."
    )


def _default_feature_mask(value: Tensor, patch_size: int | None) -> Tensor:
    """The features a perturbation method takes for one input when no mask is given: square patches of an image
    (B, C, H, W), shared by its channels, else every element on its own."""
    from lightning_interp.methods.perturbation.ablation import patch_feature_mask  # a method module: imported late

    if value.ndim == 4:
        height, width = value.shape[-2:]
        side = max(1, math.ceil(min(height, width) / 4)) if patch_size is None else patch_size
        return patch_feature_mask(height, width, side, value.device)
    return torch.arange(value[0].numel(), device=value.device).reshape(1, *value.shape[1:])


def input_feature_masks(
    inputs: Sequence[Tensor], feature_mask: Sequence[Tensor] | None = None, patch_size: int | None = None
) -> tuple[Tensor, ...]:
    """The features a joint perturbation method (LIME, KernelSHAP, feature ablation, ...) takes on each of several
    inputs: ``feature_mask`` (one mask per input) when given, else each image's square patches (``patch_size``, by
    default a quarter of its shorter side, shared by its channels) and each other input's elements, as
    :func:`attribute_several` numbers them (here per input, from 0), on the CPU.

    Example:
        >>> masks = input_feature_masks((torch.zeros(2, 3, 8, 8), torch.zeros(2, 5)))
        >>> [tuple(mask.shape) for mask in masks], int(masks[0].max()) + 1, masks[1].tolist()
        ([(1, 1, 8, 8), (1, 5)], 16, [[0, 1, 2, 3, 4]])
    """
    if feature_mask is not None:
        masks = _per_input("feature_mask", feature_mask, len(inputs))
        if masks is None:
            raise ValueError("feature_mask must be one mask per input.")
        return tuple(torch.as_tensor(mask).detach().cpu() for mask in masks)
    return tuple(_default_feature_mask(_shape_only(value), patch_size) for value in inputs)


def _shape_only(value: Tensor) -> Tensor:
    """A CPU tensor of ``value``'s shape that holds no data of its own (an expanded scalar), for shape-only helpers."""
    return torch.zeros((), dtype=value.dtype).expand(value.shape)


def input_shares(attributions: Sequence[Tensor], feature_masks: Sequence[Tensor | None] | None = None) -> Tensor:
    """Each input's share of the attribution mass, per sample: (inputs, B), the columns adding up to 1 (0 where a
    sample's attributions are all zero).

    An input's mass is the sum of its attributions' magnitudes. With ``feature_masks`` (one per input, broadcasting
    to its samples; see :func:`input_feature_masks`) each feature is counted once: a perturbation method gives every
    element of a feature the feature's value, so summing elements would count an image patch of 3 x 4 x 4 values 48
    times against a table's feature once.

    Example:
        >>> image = torch.full((1, 3, 2, 2), 0.5)  # one feature: every element carries its value, 0.5
        >>> table = torch.tensor([[0.5]])
        >>> input_shares((image, table)).flatten().tolist()  # per element: 12 values of 0.5 against 1
        [0.9230769230769231, 0.07692307692307693]
        >>> input_shares((image, table), (torch.zeros(1, 1, 2, 2, dtype=torch.long), None)).flatten().tolist()
        [0.5, 0.5]
    """
    masses = []
    for index, part in enumerate(attributions):
        values = part.detach().abs().double().reshape(part.shape[0], -1)
        mask = None if feature_masks is None else feature_masks[index]
        if mask is not None:  # weight each element by one over the size of its feature (within its sample)
            ids = torch.as_tensor(mask).detach().cpu().long()
            ids = ids.expand(ids.shape[0], *part.shape[1:]).reshape(ids.shape[0], -1)
            weights = torch.stack([_one_over_feature_size(row) for row in ids])
            values = values * weights.to(values.device)
        masses.append(values.sum(dim=1))
    mass = torch.stack(masses)
    return mass / mass.sum(dim=0).clamp_min(1e-300)


def _one_over_feature_size(ids: Tensor) -> Tensor:
    """For each element of a 1-D tensor of feature ids, one over the number of elements of its feature (float64)."""
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return 1.0 / counts.double()[inverse]


def _joint_options(
    layout: InputLayout, inputs: Sequence[Tensor], options: dict[str, Any], takes_mask: bool
) -> dict[str, Any]:
    """The options of a joint method for the packed batch: per-input values packed like the inputs, a baseline
    function called on the unpacked inputs, a default feature mask that numbers each input's features apart."""
    packed = dict(options)
    count = len(inputs)
    for name in PER_INPUT_OPTIONS:
        if name not in packed:
            continue
        value = packed[name]
        if callable(value) and not isinstance(value, Tensor):
            function = value

            def made(x: Tensor, function: Callable[..., Any] = function, name: str = name) -> Tensor:
                values = function(layout.unpack(x))
                return layout.pack(_per_input(name, values, count) or [values] * count, name=name)

            packed[name] = made
            continue
        values = _per_input(name, value, count)
        if values is None:
            continue
        if name == "feature_mask":
            packed[name] = layout.pack(values, name=name, dtype=torch.long)
        else:
            packed[name] = layout.pack(values, name=name)
    if "stdevs" in packed and isinstance(packed["stdevs"], (tuple, list)):
        raise ValueError(
            "With several inputs, stdevs is one number (the noise's standard deviation in every input's units); for "
            "noise scaled to each input's own range, pass noise_level instead."
        )
    if takes_mask and packed.get("feature_mask") is None:
        patch_size = packed.pop("patch_size", None)
        masks, offset = [], 0
        for value in inputs:
            mask = _default_feature_mask(value, patch_size)
            masks.append(mask + offset)
            offset += int(mask.max()) + 1
        packed["feature_mask"] = layout.pack(masks, name="feature_mask", dtype=torch.long)
    return packed


def attribute_several(
    spec: Any,
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    target: Any,
    layer: nn.Module | str | None,
    additional_forward_args: Sequence[Any] | None,
    options: Mapping[str, Any],
) -> Any:
    """Run the registered method ``spec`` on a model of several inputs (a tuple) or of extra forward arguments; see
    the module's docstring. Called by :func:`~lightning_interp.methods.attribute`.

    Returns:
        A tuple of attributions, one per input, shaped like it (``"joint"`` and ``"each"`` methods of the input
        families); the method's map (``"first"``) or layer attributions otherwise; with ``(result, delta)`` where
        the method returns a convergence delta.
    """
    arguments = tuple(additional_forward_args or ())
    layer_args = {"layer": layer} if spec.needs_layer else {}
    if isinstance(inputs, Tensor):
        return spec.function(_bound(model, (inputs,), 0, None, arguments), inputs, target, **layer_args, **options)
    inputs = tuple(inputs)
    count = len(inputs)
    mode = spec.several_inputs
    if mode == "first":
        chosen = {name: _first(name, value, count) for name, value in options.items()}
        view = _bound(model, inputs, 0, None, arguments)
        return spec.function(view, inputs[0], target, **layer_args, **chosen)
    if mode == "each":
        results = []
        for position, value in enumerate(inputs):
            chosen = {name: _one_of(name, option, position, count) for name, option in options.items()}
            view = _bound(model, inputs, position, None, arguments)
            results.append(spec.function(view, value, target, **layer_args, **chosen))
        return tuple(results)
    layout = InputLayout(inputs)
    packed = layout.pack(inputs)
    view = _bound(model, inputs, None, layout, arguments)
    with segmented_columns(layout.sizes):
        result = spec.function(
            view,
            packed,
            target,
            **layer_args,
            **_joint_options(layout, inputs, dict(options), "feature_mask" in spec.options),
        )
    if spec.family not in _INPUT_SHAPED:
        return result
    if isinstance(result, tuple):  # (attributions, convergence delta)
        return (layout.unpack_like(result[0]), *result[1:])
    return layout.unpack_like(result)


def _first(name: str, value: Any, count: int) -> Any:
    """A per-input option of a method that explains the first input only: its first value."""
    if name in PER_INPUT_OPTIONS:
        values = _per_input(name, value, count)
        return value if values is None else values[0]
    return value


def _one_of(name: str, value: Any, position: int, count: int) -> Any:
    """An option of a method run on one input at a time: a per-input option's value for that input; any option
    given as a list of one value per input is split too (e.g. occlusion's ``window=[8, 2]``)."""
    if name in PER_INPUT_OPTIONS:
        values = _per_input(name, value, count)
        return value if values is None else values[position]
    if isinstance(value, list) and len(value) == count:
        return value[position]
    return value
