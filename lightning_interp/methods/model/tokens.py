"""Token layouts of vision transformers: how a (B, N, C) output becomes a (B, C, h, w) grid.

The layouts of torchvision's and timm's vision transformers (class, distillation and register tokens before a
patch grid) and channels-last (B, h, w, C) outputs are read from a model trace; CAM methods, activation maps and
attention use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from lightning_interp.methods.model.trace import ModelTrace

__all__ = ["MAX_PREFIX_TOKENS", "TokenGrid", "TokenReshape", "token_grids"]

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


def _channels_last_outputs(trace: ModelTrace) -> set[str]:
    """Names of 4-D outputs that are an earlier (1, C, h, w) output's grid channels-last: (1, h, w, C)."""
    seen: set[tuple[int, int, int]] = set()  # (C, h, w) of the channels-first outputs so far
    found = set()
    for name in trace.order:
        shape = trace.shapes[name]
        if len(shape) != 4:
            continue
        if (shape[3], shape[1], shape[2]) in seen and shape[1] != shape[3]:
            found.add(name)
        else:
            seen.add((shape[1], shape[2], shape[3]))
    return found


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
