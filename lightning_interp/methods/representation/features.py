"""Capture layer outputs (representations) of a model on a set of inputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.model.core import eager_forward, get_module, modes_preserved
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.model.trace import ModelTrace, trace_model

__all__ = [
    "TOKEN_POOLINGS",
    "TokenPooling",
    "attends_ahead",
    "auto_layers",
    "capture_features",
    "capture_pooled_features",
    "forward_chunk_size",
    "pool_features",
    "pool_tokens",
    "transformer_stack",
]

TokenPooling = Literal["cls", "mean", "last", "flatten"]
"""How a token layer's (B, T, D) output becomes one (B, D) feature row per sample: its first token (``"cls"``), the
mean over its real tokens (``"mean"``), its last real token (``"last"``, what a causal model has read the whole
text at) or every token side by side (``"flatten"``, then bounded by ``max_features``)."""

TOKEN_POOLINGS: tuple[str, ...] = ("cls", "mean", "last", "flatten")
"""The values of :data:`TokenPooling`."""


def pool_tokens(tokens: Tensor, how: str, real: Tensor | None = None) -> Tensor:
    """One feature row per sample from token outputs (B, T, D), padding left out.

    Args:
        tokens: (B, T, D) outputs of a token layer.
        how: ``"cls"``, ``"mean"``, ``"last"`` or ``"flatten"`` (see :data:`TokenPooling`).
        real: optional (B, T) bool, True at the real tokens (not padding); None: every token is real.

    Returns:
        (B, D) for ``"cls"``, ``"mean"`` and ``"last"``; (B, T * D) for ``"flatten"`` (padding set to zero).

    Example:
        >>> tokens = torch.tensor([[[1.0], [3.0], [9.0]]])
        >>> real = torch.tensor([[True, True, False]])
        >>> [pool_tokens(tokens, how, real).tolist() for how in ("cls", "mean", "last")]
        [[[1.0]], [[2.0]], [[3.0]]]
    """
    if how not in TOKEN_POOLINGS:
        raise ValueError(f"token pooling must be one of {TOKEN_POOLINGS}, got {how!r}.")
    if tokens.ndim != 3:
        raise ValueError(f"pool_tokens takes (batch, tokens, dim) outputs, got {tuple(tokens.shape)}.")
    values = tokens.float()
    keep = None if real is None else real.to(device=values.device, dtype=torch.bool)
    if how == "cls":
        return values[:, 0]
    if how == "flatten":
        return (values if keep is None else values * keep[..., None]).reshape(values.shape[0], -1)
    if how == "mean":
        if keep is None:
            return values.mean(dim=1)
        weights = keep[..., None].to(values.dtype)
        return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    positions = torch.arange(values.shape[1], device=values.device)
    last = torch.full((values.shape[0],), values.shape[1] - 1, device=values.device, dtype=torch.long)
    if keep is not None:  # the last real token, wherever the padding is (right or left)
        last = torch.where(keep, positions, -1).amax(dim=1).clamp_min(0)
    return values[torch.arange(values.shape[0], device=values.device), last]


@torch.no_grad()
def attends_ahead(model: nn.Module, ids: Tensor, layer: str, real: Tensor | None = None) -> bool:
    """Whether the output of ``layer`` at a token depends on later tokens (a bidirectional encoder) or not (a causal
    model): one sample's last real token is changed and the outputs at the tokens before it compared.

    Args:
        model: the network, called as ``model(ids)`` (a :class:`~lightning_interp.methods.BoundInputs` view for
            models that take an attention mask).
        ids: (1, T) token ids of one sample, with at least two real tokens.
        layer: a layer with (1, T, D) outputs.
        real: optional (1, T) bool, True at the real tokens.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        >>> attends_ahead(net, torch.tensor([[1, 2, 3]]), "1")  # each token on its own
        False
    """
    keep = torch.ones_like(ids, dtype=torch.bool) if real is None else real.reshape(ids.shape).bool()
    positions = keep[0].nonzero().flatten()
    if positions.numel() < 2:
        raise ValueError("attends_ahead needs a sample with at least two real tokens.")
    last = int(positions[-1])
    changed = ids.clone()
    changed[0, last] = ids[0, positions[0]] if ids[0, positions[0]] != ids[0, last] else ids[0, last] + 1
    before = capture_features(model, ids, [layer], max_features=None)[layer]
    after = capture_features(model, changed, [layer], max_features=None)[layer]
    width = before.shape[1] // ids.shape[1]
    earlier = slice(0, last * width)
    return not torch.allclose(before[:, earlier], after[:, earlier], rtol=1e-4, atol=1e-5)


_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)


def pool_features(activation: Tensor, max_features: int | None = 4096) -> Tensor:
    """Flatten a batch of activations to (B, D) with D at most ``max_features``.

    Spatial maps (B, C, H, W) are average-pooled to a square grid s x s, with
    s starting at min(H, W) and halving (down to 1) until ``C * s * s <= max_features``;
    token sequences (B, N, C) are averaged over tokens when ``N * C`` is too
    large. Other tensors are flattened, and if still too wide, average-pooled
    along the feature axis into ``max_features`` bins. Pooling keeps the
    representation's geometry far better than random sub-sampling and costs
    nothing to store.

    Args:
        activation: (B, ...) layer output.
        max_features: bound on D; None keeps everything.

    Example:
        >>> pool_features(torch.randn(2, 64, 16, 16), max_features=4096).shape  # 64 x 8 x 8
        torch.Size([2, 4096])
    """
    a = activation.detach()
    batch = a.shape[0]
    if max_features is None or a[0].numel() <= max_features:
        return a.reshape(batch, -1)
    if a.ndim == 4:
        size = min(a.shape[-2:])
        while size > 1 and a.shape[1] * size * size > max_features:
            size = max(1, size // 2)
        a = F.adaptive_avg_pool2d(a.float(), size)
    elif a.ndim == 3:
        a = a.float().mean(dim=1)
    flat = a.reshape(batch, -1)
    if flat.shape[1] > max_features:
        flat = F.adaptive_avg_pool1d(flat.float()[:, None], max_features)[:, 0]
    return flat


@torch.no_grad()
def capture_features(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[nn.Module | str],
    *,
    batch_size: int = 256,
    max_features: int | None = 4096,
    eval_mode: bool = True,
    device: torch.device | str | None = None,
    token_pooling: TokenPooling | None = None,
    real_tokens: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run ``inputs`` through ``model`` in chunks and return each layer's pooled output.

    Forward passes run without gradients, with every module's mode saved and
    restored and the hooks removed in ``finally``. Each layer's output is
    pooled and copied inside its hook, so a later in-place operation (an
    ``nn.ReLU(inplace=True)`` after the layer) cannot change what is kept.
    Everything stays on the model's device: inputs are moved there chunk by
    chunk (asynchronously from pinned memory), and the features are returned
    there unless ``device`` says otherwise.

    Args:
        model: the network, called as ``model(chunk)``.
        inputs: (N, ...) samples, on any device (chunks are moved to the model's device).
        layers: modules or dotted names.
        batch_size: samples per forward pass.
        max_features: per-layer bound on the feature size, see :func:`pool_features`.
        eval_mode: run the model in eval mode.
        device: where to return the features; None (the default) keeps them on the model's device.
        token_pooling: how (batch, tokens, dim) outputs become one row per sample (:func:`pool_tokens`) before
            ``max_features`` bounds them; None pools them as :func:`pool_features` does.
        real_tokens: optional (N, T) bool, True at the real tokens (not padding), for ``token_pooling``.

    Returns:
        layer name (the dotted name for module objects) -> (N, D) float32 tensor.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> {k: v.shape for k, v in capture_features(net, torch.randn(7, 3), ["0", "2"]).items()}
        {'0': torch.Size([7, 5]), '2': torch.Size([7, 2])}
    """
    found = [get_module(model, layer) for layer in layers]
    qualified = {module: name for name, module in model.named_modules()}
    names = [layer if isinstance(layer, str) else qualified.get(layer, str(layer)) for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"Each layer must appear once, got {names}.")
    pooled = capture_pooled_features(
        model,
        inputs,
        {name: (max_features,) for name in names},
        batch_size=batch_size,
        eval_mode=eval_mode,
        modules=dict(zip(names, found, strict=True)),
        token_pooling=token_pooling,
        real_tokens=real_tokens,
    )
    features = {name: pooled[(name, max_features)] for name in names}
    if device is not None:
        features = {name: value.to(device) for name, value in features.items()}
    return features


@torch.no_grad()
def capture_pooled_features(
    model: nn.Module,
    inputs: Tensor,
    requests: Mapping[str, Sequence[int | None]],
    *,
    batch_size: int = 256,
    eval_mode: bool = True,
    modules: Mapping[str, nn.Module] | None = None,
    token_pooling: TokenPooling | None = None,
    real_tokens: Tensor | None = None,
) -> dict[tuple[str, int | None], Tensor]:
    """One chunked forward pass giving each named layer's output pooled to every requested bound.

    Several consumers of one model's features (a linear probe at 2048
    features per layer, CKA at 4096) share this single pass.

    Args:
        model: the network, called as ``model(chunk)``.
        inputs: (N, ...) samples, on any device.
        requests: dotted layer name -> the ``max_features`` bounds wanted for it.
        batch_size: samples per forward pass.
        eval_mode: run the model in eval mode.
        modules: the modules of the names, when already looked up.
        token_pooling: how (batch, tokens, dim) outputs become one row per sample (:func:`pool_tokens`); None
            pools them as :func:`pool_features` does.
        real_tokens: optional (N, T) bool, True at the real tokens (not padding), for ``token_pooling``.

    Returns:
        (layer name, bound) -> (N, D) float32 tensor on the model's device.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> out = capture_pooled_features(net, torch.randn(3, 1, 8, 8), {"1": (36, None)})  # 4 x 3 x 3, 4 x 6 x 6
        >>> out[("1", 36)].shape, out[("1", None)].shape
        (torch.Size([3, 36]), torch.Size([3, 144]))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if inputs.shape[0] == 0:
        raise ValueError("capture_features needs at least one input sample.")
    names = list(requests)
    found = [modules[name] if modules is not None else get_module(model, name) for name in names]
    model_device = next((p.device for p in model.parameters()), inputs.device)
    parts: dict[tuple[str, int | None], list[Tensor]] = {(n, b): [] for n in names for b in dict.fromkeys(requests[n])}
    latest: dict[str, dict[int | None, Tensor]] = {}
    handles = []
    if token_pooling is not None and token_pooling not in TOKEN_POOLINGS:
        raise ValueError(f"token_pooling must be None or one of {TOKEN_POOLINGS}, got {token_pooling!r}.")
    chunk_real: list[Tensor | None] = [None]  # the real tokens of the chunk running

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
                output = output[0]  # a block that returns (hidden states, ...)
            if isinstance(output, Tensor):  # pool (and copy) now: a later in-place op must not change it
                kept = {}
                if token_pooling is not None and output.ndim == 3:
                    real = chunk_real[0]
                    if real is not None and real.shape[1] != output.shape[1]:
                        raise ValueError(
                            f"Layer {name!r} gives {output.shape[1]} tokens per sample, but the inputs have "
                            f"{real.shape[1]}: its outputs cannot be pooled over the real tokens."
                        )
                    output = pool_tokens(output, token_pooling, real)
                for bound in dict.fromkeys(requests[name]):
                    pooled = pool_features(output, bound).float()
                    kept[bound] = pooled.clone() if _shares_memory(pooled, output) else pooled
                latest[name] = kept

        return hook

    with modes_preserved(model, eval_mode=eval_mode), eager_forward(), torch.inference_mode(False):
        try:
            for name, module in zip(names, found, strict=True):
                handles.append(module.register_forward_hook(make_hook(name)))
            for start in range(0, inputs.shape[0], batch_size):
                latest.clear()
                chunk = inputs[start : start + batch_size]
                if real_tokens is not None:
                    chunk_real[0] = real_tokens[start : start + batch_size].to(model_device)
                moved = chunk.to(model_device, non_blocking=chunk.is_pinned())
                bound = for_rows(model, slice(start, start + batch_size)) if chunk.shape[0] < inputs.shape[0] else model
                bound(moved.clone() if moved.device == chunk.device else moved)  # never an inference tensor
                for name in names:
                    if name not in latest:
                        raise RuntimeError(f"Layer {name!r} produced no tensor output during the forward pass.")
                    for bound, value in latest[name].items():
                        parts[(name, bound)].append(value)
        finally:
            for handle in handles:
                handle.remove()
        return {key: torch.cat(chunks) for key, chunks in parts.items()}


CHUNK_ACTIVATION_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}  # the largest activation of one forward chunk
CHUNK_LIMITS = {"cpu": (8, 256), "cuda": (8, 1024)}


def forward_chunk_size(trace: ModelTrace, device: torch.device | str) -> int:
    """Samples per forward pass for feature capture: as many as keep the largest activation near a budget.

    On the CPU, chunks whose largest layer output stays within about 16 MiB
    (cache-sized) run fastest: for the MNIST CNN of the examples 64 samples
    a pass took 335 ms for 1024 samples against 467 ms at 256. On a GPU the
    budget is 512 MiB. The result is a power of two between the device's limits.

    Example:
        >>> trace = trace_model(nn.Sequential(nn.Conv2d(1, 64, 3)), torch.randn(1, 1, 26, 26))  # 64 x 24 x 24 floats
        >>> forward_chunk_size(trace, "cpu")
        64
    """
    kind = torch.device(device).type
    budget = CHUNK_ACTIVATION_BYTES.get(kind, CHUNK_ACTIVATION_BYTES["cuda"])
    low, high = CHUNK_LIMITS.get(kind, CHUNK_LIMITS["cuda"])
    sizes = [math.prod(shape[1:]) for shape in trace.shapes.values()] or [1]
    per_sample = 4 * max(max(sizes), 1)
    fitting = max(1, budget // per_sample)
    return int(min(high, max(low, 2 ** int(math.log2(fitting)))))


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def auto_layers(
    model: nn.Module, example_input: Tensor | None, *, max_layers: int = 6, trace: ModelTrace | None = None
) -> list[str]:
    """A spread of layers over the depth of ``model`` for representation analysis.

    A dry forward (eval mode, no gradients, first sample only; see
    :func:`~lightning_interp.methods.trace_model`) records, in execution
    order, every module that owns parameters itself (convolutions, linear
    layers, ...), ran exactly once and gave one output row per sample (not a
    position embedding of the sequence), leaving out normalisation layers. When
    the model's top-level children form a chain of blocks, their outputs are
    used instead (the usual "one point per stage" view). In a transformer (a
    stack of two or more blocks of one class giving (1, tokens, dim)
    outputs, see :func:`transformer_stack`) they are the embeddings' output
    and each block's, not the query, key and value projections inside the
    blocks. Up to ``max_layers`` are chosen evenly spaced, always keeping the
    last.

    Args:
        model: the network.
        example_input: one or more inputs (only the first is run); may be None when ``trace`` is given.
        max_layers: most layers to return.
        trace: a :class:`~lightning_interp.methods.ModelTrace` of ``model`` made earlier, to skip the dry forward.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> auto_layers(net, torch.randn(1, 4))
        ['0', '2', '4']
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be positive, got {max_layers}.")
    if trace is None:
        if example_input is None:
            raise ValueError("auto_layers needs an example_input or a trace.")
        trace = trace_model(model, example_input)
    modules = dict(model.named_modules())
    # one output row per sample: a position embedding called on arange(T) gives (T, D), the same for every sample
    once = [name for name in trace.ran_once() if trace.shapes.get(name, (0,))[:1] == (1,)]
    weighted = [
        name
        for name in once
        if any(True for _ in modules[name].parameters(recurse=False)) and not isinstance(modules[name], _NORMALISATION)
    ]
    stack = transformer_stack(model, trace)
    if stack:  # a transformer: the output of its embeddings and of each block, not the projections inside them
        return evenly_spaced(stack, max_layers)
    blocks = _chained_blocks(model, once)
    candidates = blocks if len(blocks) >= min(3, len(weighted)) and blocks else weighted
    if not candidates:
        raise ValueError(
            f"Found no layer with parameters in {type(model).__name__} that runs exactly once per forward pass; "
            "name the layers explicitly (dotted names from model.named_modules())."
        )
    return evenly_spaced(candidates, max_layers)


def transformer_stack(model: nn.Module, trace: ModelTrace) -> list[str]:
    """The layers whose outputs a transformer's representations are read at: the output of its embeddings (the
    last (1, T, D) output before the first block) and of each block of its longest stack of blocks (two or more
    children of one container, of one class, each running once with a (1, T, D) output), in forward order;
    ``[]`` for a model without such a stack.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        >>> net = nn.Sequential(nn.Embedding(10, 8), nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))
        >>> transformer_stack(net, trace_model(net, torch.tensor([[1, 2, 3]])))
        ['0', '1.layers.0', '1.layers.1', '1.layers.2']
    """
    best: list[str] = []
    for prefix, container in model.named_modules():
        children = list(container.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        names = [f"{prefix}.{name}" if prefix else name for name, _ in children]
        ran = all(trace.calls.get(n) == 1 and len(trace.shapes.get(n, ())) == 3 for n in names)
        if ran and len(names) > len(best):
            best = names
    if not best:
        return []
    order = list(trace.order)
    blocks = sorted(best, key=order.index)
    inside = tuple(f"{name}." for name in best)
    shape = trace.shapes[blocks[0]]
    before = [
        name
        for name in order[: order.index(blocks[0])]
        if trace.shapes.get(name) == shape and trace.calls.get(name) == 1 and not name.startswith(inside)
    ]
    return before[-1:] + blocks


def evenly_spaced(names: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``names`` evenly spaced over the list, always keeping the last.

    Example:
        >>> evenly_spaced(["a", "b", "c", "d", "e"], 3)
        ['a', 'c', 'e']
    """
    if len(names) <= count:
        return names
    if count == 1:
        return names[-1:]
    picks = torch.linspace(0, len(names) - 1, count).round().long().unique().tolist()
    return [names[i] for i in picks]


def _chained_blocks(model: nn.Module, ran_once: list[str]) -> list[str]:
    """Names of the deepest container whose children form the main chain of blocks, if any.

    Descends through wrappers with a single child (e.g. a LightningModule
    holding ``self.net``) to the first module with several children; returns
    those children that ran once, hold parameters and are not pass-throughs.
    """
    prefix, module = "", model
    while True:
        children = [(name, child) for name, child in module.named_children()]
        with_params = [(n, c) for n, c in children if any(True for _ in c.parameters())]
        if len(with_params) == 1 and len(list(with_params[0][1].children())) > 0:
            name, module = with_params[0]
            prefix = f"{prefix}{name}."
            continue
        break
    ran = set(ran_once)
    return [
        f"{prefix}{name}"
        for name, child in children
        if f"{prefix}{name}" in ran
        and any(True for _ in child.parameters())
        and not isinstance(child, (*_PASS_THROUGH, *_NORMALISATION))
    ]
