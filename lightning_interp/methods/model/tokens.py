"""Token layouts of vision transformers: how a (B, N, C) output becomes a (B, C, h, w) grid; and which 4-D outputs
are channels-last (B, h, w, C).

The layouts of torchvision's and timm's vision transformers (class, distillation and register tokens before a
patch grid) and of channels-last outputs (Swin, ConvNeXt blocks, timm NHWC blocks) are read from the model and a
trace of it; CAM methods, activation maps and attention use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from lightning_interp.methods.model.trace import ModelTrace

__all__ = [
    "LAYER_LAYOUTS",
    "MAX_PREFIX_TOKENS",
    "ChannelsLayout",
    "LayerLayout",
    "TokenGrid",
    "TokenReshape",
    "channels_last_layers",
    "channels_last_to_first",
    "layer_layouts",
    "token_grids",
]

TokenReshape = Callable[[Tensor], Tensor]
"""Turns token outputs (B, N, C) of a vision transformer into (B, C, h, w)."""


MAX_PREFIX_TOKENS = 32  # class, distillation and register tokens in front of the patch tokens (DINOv2: 1 + 4)


@dataclass(frozen=True)
class TokenGrid:
    """Token outputs (B, N, C) laid out as ``prefix`` leading tokens (class, distillation, register tokens) and
    then an ``height`` x ``width`` grid of patch tokens in row-major order, the layout of torchvision's and timm's
    vision transformers; calling it gives the patch grid as (B, C, height, width).

    Example:
        >>> import torch
        >>> grid = TokenGrid(prefix=1, height=2, width=3)
        >>> grid(torch.zeros(4, 7, 16)).shape
        torch.Size([4, 16, 2, 3])
    """

    prefix: int
    height: int
    width: int

    def __call__(self, tokens: Tensor) -> Tensor:
        count = self.prefix + self.height * self.width
        if tokens.ndim != 3 or tokens.shape[1] != count:
            raise ValueError(
                f"Expected tokens of shape (batch, {count}, channels) ({self.prefix} leading token(s) and a "
                f"{self.height}x{self.width} patch grid), got {tuple(tokens.shape)}."
            )
        patches = tokens[:, self.prefix :]
        return patches.reshape(tokens.shape[0], self.height, self.width, tokens.shape[2]).permute(0, 3, 1, 2)


def token_grids(trace: ModelTrace) -> dict[str, TokenGrid]:
    """The token layout of every (1, N, C) output of a traced vision transformer, by module name.

    A module's output counts as tokens when an earlier module (the patch
    embedding: the last 4-D output before the first tokens) gave a
    (1, C, h, w) grid and the token count N is ``h * w``
    plus at most :data:`MAX_PREFIX_TOKENS` leading tokens. Without such a grid
    (a patch embedding that is not a convolution), the grid is read from the
    input's height and width: the fewest leading tokens that leave a patch grid
    of the input's aspect ratio that divides it.

    Example:
        >>> import torch
        >>> from torchvision.models import VisionTransformer
        >>> from lightning_interp.methods import trace_model
        >>> vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
        >>> token_grids(trace_model(vit, torch.zeros(1, 3, 32, 32)))["encoder.layers.encoder_layer_0"]
        TokenGrid(prefix=1, height=4, width=4)
    """
    grids: dict[str, TokenGrid] = {}
    patch_grid: tuple[int, int] | None = None
    for name in trace.order:
        shape = trace.shapes[name]
        if len(shape) == 4 and patch_grid is not None and tuple(shape[1:3]) == patch_grid:
            continue  # the same grid channels-last (B, h, w, C), as timm's dynamic_img_size patch embedding gives
        if len(shape) == 4 and shape[-2] * shape[-1] > 1 and not grids:  # the grid of the first tokens stays
            patch_grid = (shape[-2], shape[-1])
        elif len(shape) == 3:
            grid = _grid_for(shape[1], patch_grid, trace.input_shape)
            if grid is not None:
                grids[name] = grid
    return grids


def _grid_for(tokens: int, patch_grid: tuple[int, int] | None, input_shape: tuple[int, ...]) -> TokenGrid | None:
    if patch_grid is not None:
        prefix = tokens - patch_grid[0] * patch_grid[1]
        return TokenGrid(prefix, *patch_grid) if 0 <= prefix <= MAX_PREFIX_TOKENS else None
    if len(input_shape) != 3:
        return None
    height, width = input_shape[-2:]
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 2) + 1):
        rows = round(((tokens - prefix) * height / width) ** 0.5)
        if rows < 2 or (tokens - prefix) % rows:
            continue
        columns = (tokens - prefix) // rows
        if height % rows == 0 and width % columns == 0 and height // rows == width // columns:
            return TokenGrid(prefix, rows, columns)
    return None


ChannelsLayout = Literal["channels_first", "channels_last"]
"""Where a 4-D output keeps its channels: (B, C, h, w) (``"channels_first"``) or (B, h, w, C) (``"channels_last"``)."""

LayerLayout = Literal["auto", "channels_first", "channels_last"]
"""A layer's layout as a user names it: ``"auto"`` (detected from the model, see :func:`layer_layouts`) or one of
:data:`ChannelsLayout`."""

LAYER_LAYOUTS: tuple[str, ...] = ("auto", "channels_first", "channels_last")


def channels_last_to_first(tensor: Tensor) -> Tensor:
    """A channels-last (B, h, w, C) tensor as (B, C, h, w): the ``reshape`` of a channels-last layer.

    Example:
        >>> import torch
        >>> channels_last_to_first(torch.zeros(2, 4, 5, 16)).shape
        torch.Size([2, 16, 4, 5])
    """
    if tensor.ndim != 4:
        raise ValueError(f"Expected a channels-last (batch, h, w, channels) tensor, got shape {tuple(tensor.shape)}.")
    return tensor.permute(0, 3, 1, 2)


_CHANNELS_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
"""Modules whose 4-D output is (B, C, h, w) by definition (2-D convolutions, batch/instance/group norms, pooling)."""

_LAST_DIM_FORWARDS = tuple(cls.forward for cls in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if cls is not None)
"""The forwards of torch's norms over the last dimension (a subclass that keeps them does too)."""

_LAYOUT_KEEPING_NAMES = frozenset({"DropPath", "StochasticDepth", "Identity", "Dropout", "AlphaDropout"})


def _class_layout(module: nn.Module | None, shape: tuple[int, ...]) -> ChannelsLayout | None:
    """The layout ``module``'s class fixes for its 4-D output ``shape``, or None when its class says nothing."""
    if module is None:
        return None
    names = [cls.__name__ for cls in type(module).__mro__ if cls is not object]
    if any(name.lower().endswith("2d") for name in names):  # LayerNorm2d, BatchNormAct2d, ...: (B, C, h, w) by name
        return "channels_first"
    if isinstance(module, nn.Linear):  # works over the last dimension, whatever the forward around it
        return "channels_last" if shape[-1] == module.out_features else None
    if type(module).__name__ == "Permute" and isinstance(getattr(module, "dims", None), list | tuple):
        dims = list(module.dims)  # torchvision's Permute
        return {(0, 2, 3, 1): "channels_last", (0, 3, 1, 2): "channels_first"}.get(tuple(dims))  # type: ignore[return-value]
    if isinstance(module, _CHANNELS_FIRST_TYPES):
        return "channels_first"
    normalized = getattr(module, "normalized_shape", None)
    if isinstance(normalized, tuple | list) and len(normalized) == 1:  # a LayerNorm or RMSNorm over one dimension
        width = int(normalized[0])
        if type(module).forward in _LAST_DIM_FORWARDS:  # torch's own: it normalises the last dimension
            return "channels_last" if shape[-1] == width else None
        # an own forward (timm's LayerNorm, a permuting norm): its weight fits only the dimension it normalises
        if shape[-1] == width != shape[1]:
            return "channels_last"
        if shape[1] == width != shape[-1]:
            return "channels_first"
    return None


def _keeps_layout(module: nn.Module | None) -> bool:
    """Whether ``module`` works elementwise (activations, Identity, Dropout, DropPath): its output's layout is its
    input's, even when the shape cannot tell."""
    if module is None:
        return False
    if type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention):
        return True
    return any(cls.__name__ in _LAYOUT_KEEPING_NAMES for cls in type(module).__mro__)


def layer_layouts(model: nn.Module, trace: ModelTrace) -> dict[str, ChannelsLayout | None]:
    """The layout of every 4-D output of a traced model: ``"channels_first"`` (B, C, h, w), ``"channels_last"``
    (B, h, w, C), or None where it cannot be told.

    The evidence, strongest first, for each module in completion order:

    1. its class: 2-D convolutions, batch/instance/group norms, pooling and
       classes named ``...2d`` (timm's and torchvision's ``LayerNorm2d``,
       ``BatchNormAct2d``) give (B, C, h, w); an ``nn.Linear``, torch's own
       ``nn.LayerNorm`` / ``nn.RMSNorm`` over the last dimension, or a norm
       subclass whose one-dimensional weight fits only the last dimension,
       work over the last dimension: (B, h, w, C); torchvision's ``Permute``
       by its ``dims``;
    2. its input, when the output has the input's shape and the input's layout
       is known (an activation, Dropout, a window attention); unless the three
       non-batch sizes are equal, where only elementwise modules
       (activations, Identity, Dropout, DropPath) count;
    3. its sub-modules (a block, a stage, ``nn.Sequential``): the layout shared
       by every sub-module with a known layout and the same output shape;
    4. the grids seen so far: an output whose channels-first reading
       (C, h, w) repeats a known grid, or whose channels-last reading does (not
       both);
    5. otherwise, channels-first (the convention of the CNN layers this
       library reads), unless the output could as well be channels-last: its
       three sizes equal, or only its channels-last reading has the input
       image's aspect ratio. Those are told by the modules that take the
       output as it is, by their class as in 1 (an ``nn.LayerNorm`` or
       ``nn.Linear`` reading it), or else are None: read neither way.

    Args:
        model: the traced network (names as in ``trace``).
        trace: a :class:`~lightning_interp.methods.model.trace.ModelTrace` of ``model``.

    Returns:
        module name -> layout, for every module whose first output is 4-D.

    Example:
        >>> import torch
        >>> from torchvision.models.swin_transformer import SwinTransformer
        >>> from lightning_interp.methods import trace_model
        >>> swin = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=3)
        >>> layouts = layer_layouts(swin, trace_model(swin, torch.randn(1, 3, 32, 32)))
        >>> layouts["features.0.0"], layouts["norm"], layouts["permute"]
        ('channels_first', 'channels_last', 'channels_first')
    """
    modules = dict(model.named_modules())
    layouts: dict[str, ChannelsLayout | None] = {}
    grids: set[tuple[int, int, int]] = set()  # (C, h, w) of every output whose layout is known
    if len(trace.input_shape) == 3:
        grids.add(tuple(trace.input_shape))  # type: ignore[arg-type]
    for name in trace.order:
        shape = trace.shapes[name]
        if len(shape) != 4:
            continue
        layout = _layout_of(name, shape, modules.get(name), trace, layouts, grids)
        layouts[name] = layout
        if layout == "channels_first":
            grids.add((shape[1], shape[2], shape[3]))
        elif layout == "channels_last":
            grids.add((shape[3], shape[1], shape[2]))
    for name, layout in layouts.items():  # still unknown: what the modules that read it unchanged take it for
        if layout is None:
            layouts[name] = _consumers_layout(name, trace, modules)
    return layouts


def _consumers_layout(name: str, trace: ModelTrace, modules: dict[str, nn.Module]) -> ChannelsLayout | None:
    shape = trace.shapes[name]
    readers = [reader for reader, source in trace.sources.items() if source == name]
    votes = {_class_layout(modules.get(reader), shape) for reader in readers if trace.input_shapes[reader] == shape}
    votes.discard(None)
    return votes.pop() if len(votes) == 1 else None


def _layout_of(
    name: str,
    shape: tuple[int, ...],
    module: nn.Module | None,
    trace: ModelTrace,
    known: dict[str, ChannelsLayout | None],
    grids: set[tuple[int, int, int]],
) -> ChannelsLayout | None:
    cube = shape[1] == shape[2] == shape[3]  # (C, h, w) and (h, w, C) read alike: only firm evidence counts
    by_class = _class_layout(module, shape)
    if by_class is not None:
        return by_class
    source = trace.sources.get(name)
    if source is not None and trace.input_shapes.get(name) == shape:
        from_input = _input_layout(source, shape, trace, known)
        if from_input is not None and (not cube or _keeps_layout(module)):
            return from_input
    inner = {known[child] for child in known if child.startswith(f"{name}.") and trace.shapes[child] == shape}
    inner.discard(None)
    if len(inner) == 1:
        return inner.pop()
    if inner:
        return None  # sub-modules of this shape in both layouts
    first, last = (shape[1], shape[2], shape[3]) in grids, (shape[3], shape[1], shape[2]) in grids
    if first != last:
        return "channels_first" if first else "channels_last"
    if cube:
        return None
    if len(trace.input_shape) == 3:
        height, width = trace.input_shape[1:]
        if shape[1] * width == shape[2] * height and shape[2] * width != shape[3] * height:
            return None  # only the channels-last reading has the image's aspect ratio: a guess either way
    return "channels_first"


def _input_layout(
    source: str, shape: tuple[int, ...], trace: ModelTrace, known: dict[str, ChannelsLayout | None]
) -> ChannelsLayout | None:
    if source == "":
        return "channels_first" if len(trace.input_shape) == 3 else None  # the model's own image input
    return known.get(source)


def channels_last_layers(model: nn.Module, trace: ModelTrace) -> set[str]:
    """Names of the modules whose 4-D output is channels-last (B, h, w, C), as :func:`layer_layouts` tells them.

    Example:
        >>> import torch
        >>> from torchvision.models.swin_transformer import SwinTransformer
        >>> from lightning_interp.methods import trace_model
        >>> swin = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=3)
        >>> found = channels_last_layers(swin, trace_model(swin, torch.randn(1, 3, 32, 32)))
        >>> "norm" in found, "features.0.0" in found
        (True, False)
    """
    return {name for name, layout in layer_layouts(model, trace).items() if layout == "channels_last"}
