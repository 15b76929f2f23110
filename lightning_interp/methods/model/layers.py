"""Layer lookup: which sub-modules have spatial output, which get a gradient, and the automatic layer of the CAM
methods (the last spatial one whose output reaches the score)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    as_leaf,
    captured_outputs,
    eager_forward,
    get_module,
    gradients_enabled,
    modes_preserved,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.model.tokens import (
    TokenReshape,
    layer_layouts,
    token_grids,
)
from lightning_interp.methods.model.trace import ModelTrace, trace_model

__all__ = ["find_target_layer", "layers_with_patch_gradient", "spatial_layers"]

_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)


def spatial_layers(
    model: nn.Module,
    example_input: Tensor | None,
    *,
    reshape: TokenReshape | None = None,
    trace: ModelTrace | None = None,
    channels_last: bool = False,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and output shapes of the sub-modules with spatial output, in completion order.

    A dry forward (no gradients, eval mode, see :func:`trace_model`) records
    every module's output shape; a module counts when its output is
    (B, C, h, w) with h or w > 1 (3-D token outputs count through ``reshape``,
    tried on a zero tensor of the recorded shape, or without it through their
    :func:`token_grids` layout), it ran exactly once, so its
    output is unambiguous, and it is not Identity or Dropout (which only repeat
    their input in eval mode). A 4-D output counts only when its layout is
    known (:func:`~lightning_interp.methods.model.tokens.layer_layouts`): a
    channels-last (B, h, w, C) one only with ``channels_last`` (listed with
    its shape as (B, C, h, w), to be read through
    :func:`~lightning_interp.methods.model.tokens.channels_last_to_first`), one
    whose layout cannot be told never.

    Args:
        model: the network.
        example_input: one or more inputs (only the first is run); may be None when ``trace`` is given.
        reshape: turns token outputs (B, N, C) into (B, C, h, w).
        trace: a :class:`ModelTrace` of ``model`` made earlier, to skip the dry forward.
        channels_last: include the channels-last outputs (the caller permutes them to (B, C, h, w)).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> spatial_layers(net, torch.randn(1, 1, 5, 5))
        [('0', (1, 2, 3, 3)), ('1', (1, 2, 3, 3))]
    """
    if trace is None:
        if example_input is None:
            raise ValueError("spatial_layers needs an example_input or a trace.")
        trace = trace_model(model, example_input)
    modules = dict(model.named_modules())
    grids = token_grids(trace)
    token_counts = {trace.shapes[name][1] for name in grids}
    layouts = layer_layouts(model, trace)
    found: list[tuple[str, tuple[int, ...]]] = []
    for name in trace.ran_once():
        if isinstance(modules.get(name), _PASS_THROUGH):
            continue  # Identity and Dropout (in eval) repeat their input: the module before them is the layer
        shape = trace.shapes[name]
        if len(shape) == 4:
            if shape[0] != 1 or shape[2] in token_counts or shape[2] in _enclosing_token_counts(name, trace):
                continue  # not one map per sample (Swin's windows), or attention internals (batch, heads, tokens, ...)
            layout = layouts.get(name)
            if layout is None or (layout == "channels_last" and not channels_last):
                continue  # (B, h, w, C) read as (B, C, h, w): its channels would become the map's width
            if layout == "channels_last":
                shape = (shape[0], shape[3], shape[1], shape[2])
        to_grid = reshape if reshape is not None else grids.get(name)
        if len(shape) == 3 and to_grid is not None:
            try:
                shape = tuple(to_grid(torch.zeros(shape)).shape)
            except Exception:  # a module whose tokens do not form the grid
                continue
        if len(shape) == 4 and max(shape[-2:]) > 1:
            found.append((name, shape))
    return found


def _enclosing_token_counts(name: str, trace: ModelTrace) -> set[int]:
    """The token counts N of the (1, N, C) outputs and (B, N, C) inputs of the modules that contain module ``name``
    (a window attention whose (1, heads, N, N) attention matrix or bias is no image grid)."""
    parts = name.split(".")
    outer = [".".join(parts[:end]) for end in range(1, len(parts))]
    counts = {trace.shapes[parent][1] for parent in outer if len(trace.shapes.get(parent, ())) == 3}
    # and of their (B * windows, N, C) inputs: HF Swin's attention returns a tuple, its input holds the windows
    return counts | {trace.input_shapes[parent][1] for parent in outer if len(trace.input_shapes.get(parent, ())) == 3}


def layers_with_patch_gradient(
    model: nn.Module,
    inputs: Tensor,
    layers: dict[str, TokenReshape | None],
    *,
    target: Target = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> list[str]:
    """Which of ``layers`` have a non-zero gradient of the target score somewhere on their (patch) grid.

    In a vision transformer whose head reads the class token, the patch tokens
    of every output after the last block's attention (the block's MLP, its
    output, the final norm) reach the score through no path at all: their
    gradient, and every Grad-CAM map of them, is exactly zero. One forward and
    one backward on ``inputs`` tell those layers apart. When the score depends
    on no layer at all (a zero-initialised head, as in torchvision's
    ``VisionTransformer`` before training), the features the head reads stand
    in for it: the layers that reach them are the ones that will reach the
    score once the head has weights.

    Args:
        model: the network.
        inputs: a few samples (two suffice).
        layers: dotted name -> how its output becomes a (B, C, h, w) grid (None: it already is one).
        target: the explained class, as in :func:`grad_cam`.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        The names in ``layers`` order whose grid gradient is not zero everywhere.
    """
    names = list(layers)
    modules = [get_module(model, name) for name in names]
    with modes_preserved(model), eager_forward(), gradients_enabled(), _head_inputs(model) as heads:
        x = as_leaf(inputs) if inputs.is_floating_point() else inputs.detach().clone()
        with captured_outputs(modules) as outputs:
            output = model(x)
        raw = output_transform(output) if output_transform is not None else output
        scores = scores_from_output(raw, None)
        present = [  # one output per sample: not a relative position bias shared by the batch (HF Swin)
            (name, out)
            for name, out in zip(names, outputs, strict=True)
            if out is not None and out.ndim > 0 and out.shape[0] == x.shape[0]
        ]
        objectives = [target_scores(scores, resolve_target(target, scores, task), task).sum()]
        head_input = next((given for produced, given in heads if produced is raw), None)
        if head_input is not None:  # a zero-initialised head (torchvision's ViT) passes no gradient at all: then
            # the features the head reads tell which layers it can depend on (a fixed, sign-varying weighting:
            # a plain sum of a normalised vector is constant)
            flat = head_input.reshape(head_input.shape[0], -1)
            weights = torch.cos(torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype) * 1.618)
            objectives.append((flat * weights).sum())
        for objective in objectives:
            alive = _nonzero_grid_gradients(objective, present, layers)
            if alive:
                return [name for name in names if name in alive]
    return []


def _nonzero_grid_gradients(
    objective: Tensor, present: list[tuple[str, Tensor]], layers: dict[str, TokenReshape | None]
) -> set[str]:
    wrt = [(name, out) for name, out in present if out.requires_grad]
    if not wrt or not objective.requires_grad:
        return set()
    grads = torch.autograd.grad(objective, [out for _, out in wrt], allow_unused=True, retain_graph=True)
    alive = set()
    for (name, _), grad in zip(wrt, grads, strict=True):
        to_grid = layers[name]
        grid = to_grid(grad) if grad is not None and to_grid is not None and grad.ndim == 3 else grad
        if grid is not None and bool((grid != 0).any()):
            alive.add(name)
    return alive


@contextlib.contextmanager
def _head_inputs(model: nn.Module) -> Iterator[list[tuple[object, Tensor]]]:
    """Record (output, first tensor input) of every sub-module during the block, innermost first."""
    records: list[tuple[object, Tensor]] = []

    def hook(_module: nn.Module, args: tuple, output: object) -> None:
        if args and isinstance(args[0], Tensor):
            records.append((output, args[0]))

    handles = [module.register_forward_hook(hook) for name, module in model.named_modules() if name]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def find_target_layer(
    model: nn.Module,
    example_input: Tensor,
    *,
    reshape: TokenReshape | None = None,
    trace: ModelTrace | None = None,
    target: Target = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
    channels_last: bool = False,
) -> str:
    """The dotted name of the last module whose output has spatial extent (and, for tokens, gets a gradient).

    This is the usual Grad-CAM layer: for a ResNet it is ``layer4`` (the
    output of the last stage), for torchvision's MobileNet ``features``. For a
    vision transformer (token outputs, read through ``reshape`` or their
    :func:`token_grids` layout) it is the last layer of the residual stream's
    width (not a query/key/value or MLP hidden output) whose patch tokens
    receive a gradient (:func:`layers_with_patch_gradient`): with a class-token head,
    the last block's first norm (torchvision ``encoder_layer_<last>.ln_1``,
    timm ``blocks[-1].norm1``); with an average-pooled head, the final norm.

    Args:
        model: the network.
        example_input: one or more inputs; the first two are run.
        reshape: turns token outputs (B, N, C) into (B, C, h, w) (default: the known layouts).
        trace: a :class:`ModelTrace` of ``model`` made earlier, to skip the dry forward.
        target: the explained class for the gradient check of token layers, as in :func:`grad_cam`.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).
        channels_last: also consider channels-last (B, h, w, C) outputs (Swin's stages and final norm), which
            the caller must read through
            :func:`~lightning_interp.methods.model.tokens.channels_last_to_first`; without it they are passed over.

    Raises:
        ValueError: no module has spatial output (or none whose patch tokens get a gradient); the message says
            how to fix it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 2))
        >>> find_target_layer(net, torch.randn(1, 3, 16, 16))
        '1'
        >>> from torchvision.models import VisionTransformer
        >>> vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
        >>> find_target_layer(vit, torch.randn(2, 3, 32, 32))
        'encoder.layers.encoder_layer_1.ln_1'
    """
    trace = trace if trace is not None else trace_model(model, example_input)
    found = [name for name, _ in spatial_layers(model, None, reshape=reshape, trace=trace, channels_last=channels_last)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no sub-module with spatial output (batch, channels, h, w) with h or w > 1 "
            f"for inputs of shape {tuple(example_input.shape[1:])}, so Grad-CAM has nothing to weight. "
            "Use larger inputs, name a convolutional layer explicitly, pass reshape=... for token outputs, "
            "or use a saliency method instead."
        )
    if all(len(trace.shapes[name]) == 4 for name in found):
        return found[-1]
    grids = token_grids(trace)
    widths = [trace.shapes[name][-1] for name in found if len(trace.shapes[name]) == 3]
    width = max(set(widths), key=widths.count)  # the residual stream's: not q/k/v or MLP hidden outputs
    found = [name for name in found if len(trace.shapes[name]) == 4 or trace.shapes[name][-1] == width]
    layers = {name: (reshape or grids.get(name)) if len(trace.shapes[name]) == 3 else None for name in found}
    if isinstance(target, Tensor) and target.numel() > 1:
        target = target.reshape(-1)[:2]
    alive = layers_with_patch_gradient(
        model, example_input[:2], layers, target=target, output_transform=output_transform, task=task
    )
    if not alive:
        raise ValueError(
            f"No layer of {type(model).__name__} with a patch grid gets a gradient from the explained score, so every "
            f"Grad-CAM map would be zero. Candidates were: {', '.join(found[-6:])}. Check that the head depends on "
            "the patch tokens through a differentiable path."
        )
    return alive[-1]
