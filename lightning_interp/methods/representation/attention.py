"""Attention weights of transformer layers, captured wherever the model computes them, and attention rollout.

The weights are captured during one forward pass of the model, which is not
patched or changed. Three ways cover the implementations in use:

- ``torch.nn.functional.scaled_dot_product_attention`` (HF ``sdpa``
  attention, timm's fused attention and Swin windows, hand-written modules):
  a :class:`torch.overrides.TorchFunctionMode` sees each call and recomputes
  ``softmax(q k^T * scale + mask)`` from its own arguments (boolean or additive
  ``attn_mask``, ``is_causal``, ``scale``, ``enable_gqa``; dropout is off in
  eval mode), see :func:`sdpa_attention_weights`; with ``verify=True`` the
  output is rebuilt as ``weights @ v`` and checked against the real one;
- an explicit softmax over the last dimension of a 4-D (batch, heads,
  queries, keys) tensor (HF ``eager`` attention, timm's unfused path, Swin's
  window attention): the same mode records the softmax's own output
  (``torch.softmax``, ``F.softmax``, ``Tensor.softmax``, ``nn.Softmax``);
- ``torch.nn.MultiheadAttention`` and timm's ``Attention``, as before: a
  forward hook recomputes the weights from the inputs the layer was called
  with (for MHA by calling its own ``forward`` with ``need_weights=True``,
  for timm as ``softmax(q k^T / sqrt(d) + mask)`` from its ``qkv``
  projection, rebuilding the output and refusing a layer whose forward does
  more when ``verify=True``); calls inside these modules are not counted twice.

Each captured computation belongs to the innermost module running at the time
(a stack kept by forward pre- and post-hooks on every sub-module; a
``nn.Softmax`` module counts as its parent): the attention layer is the module
that computes attention, e.g. BERT's ``encoder.layer.0.attention.self``,
ViT's ``encoder.layer.0.attention.attention``, GPT-2's ``h.0.attn``, timm's
``blocks.0.attn``. Naming an outer module (a whole block) captures the
attention computed inside it, provided it computes attention once.

Window attention (Swin: timm's ``WindowAttention``, HF's ``SwinAttention``)
gives (batch x windows, heads, N, N) weights within each window, in shifted
windows in every other block. When the module runs inside a block with
``window_size`` and ``shift_size`` (timm's ``SwinTransformerBlock``, HF's
``SwinLayer``), the weights are laid back on the block's token grid: a (batch,
heads, h*w, h*w) matrix over the grid's tokens in row-major order, the window
partition and the cyclic shift undone, zero between tokens of different windows
(and between tokens the shift mask separates); padding tokens are left out.

Which layer is self- or cross-attention (:attr:`AttentionLayer.cross`) is read
from the call: queries and keys of different lengths, ``nn.MultiheadAttention``
called with a key that is not its query, an encoder sequence passed as a keyword
(``encoder_hidden_states``, ...), or a module named or marked as cross-attention
(``crossattention``, ``encoder_attn``, ``is_cross_attention``).
:func:`attention_stack` picks the self-attention of the encoder (or of the only
stack) and says whether rollout through it is defined.

The pass runs without gradients, in eval mode, and off torch's fused
transformer fast path (:func:`~lightning_interp.methods.model.core.transformer_slow_path`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_interp.methods.model.core import eager_forward, get_module, modes_preserved, module_name

__all__ = [
    "HEAD_FUSIONS",
    "AttentionLayer",
    "AttentionSource",
    "AttentionStack",
    "attention_entropy",
    "attention_layers",
    "attention_rollout",
    "attention_stack",
    "capture_attention",
    "find_attention_layers",
    "fuse_heads",
    "layer_attention",
    "sdpa_attention_weights",
]

HEAD_FUSIONS = ("mean", "max", "min")
"""How attention rollout combines the heads of a layer (Abnar & Zuidema 2020 use the mean)."""

AttentionSource = Literal["multihead_attention", "timm_attention", "scaled_dot_product_attention", "softmax"]
"""How a layer's weights are captured (see the module docs)."""

_MHA_PARAMETERS = inspect.signature(nn.MultiheadAttention.forward)


def _is_timm_attention(module: nn.Module) -> bool:
    """timm's plain ``Attention`` (one ``qkv`` projection, softmax attention): its own class, not a look-alike."""
    kind = type(module)
    return (
        kind.__name__ == "Attention"
        and kind.__module__.startswith("timm.")
        and isinstance(getattr(module, "qkv", None), nn.Linear)
    )


def is_attention_layer(module: nn.Module) -> bool:
    """Whether :func:`capture_attention` can recompute the weights of ``module``.

    Example:
        >>> is_attention_layer(nn.MultiheadAttention(8, 2)), is_attention_layer(nn.Linear(8, 8))
        (True, False)
    """
    return isinstance(module, nn.MultiheadAttention) or _is_timm_attention(module)


def attention_layers(model: nn.Module) -> list[str]:
    """Dotted names of the attention layers of ``model`` that :func:`capture_attention` supports, in module order.

    Example:
        >>> encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=2)
        >>> attention_layers(encoder)
        ['layers.0.self_attn', 'layers.1.self_attn']
    """
    return [name for name, module in model.named_modules() if name and is_attention_layer(module)]


def _mha_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    bound = _MHA_PARAMETERS.bind(module, *args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    call.pop("self")
    call.update(need_weights=True, average_attn_weights=False)
    output, weights = module.forward(**call)  # the module's own code, asked for the weights; no hooks run
    return weights, output


def _timm_attention(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    x = args[0] if args else kwargs["x"]
    attn_mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
    is_causal = bool(kwargs.get("is_causal", args[2] if len(args) > 2 else False))
    batch, tokens, _ = x.shape
    gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
    head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * module.num_heads))
    qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    logits = (q * module.scale) @ k.transpose(-2, -1)
    if is_causal:
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    weights = logits.softmax(dim=-1)
    output = (weights @ v).transpose(1, 2).reshape(batch, tokens, -1)
    output = module.norm(output) if hasattr(module, "norm") else output
    output = output * gate if gate is not None else output
    return weights, module.proj(output)


def layer_attention(module: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """The attention weights of one call of an attention layer, recomputed from its inputs and weights.

    Args:
        module: an ``nn.MultiheadAttention`` or a timm ``Attention``.
        args: the positional arguments of the call.
        kwargs: its keyword arguments.

    Returns:
        ``(weights, output)``: weights (B, heads, queries, keys), each row summing to one
        (zero rows where every key is masked), and the layer's output rebuilt from them.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> weights, output = layer_attention(attention, (x, x, x), {"need_weights": False})
        >>> tuple(weights.shape), bool(torch.allclose(output, attention(x, x, x)[0], atol=1e-6))
        ((3, 2, 5, 5), True)
    """
    kwargs = dict(kwargs or {})
    if isinstance(module, nn.MultiheadAttention):
        weights, output = _mha_attention(module, args, kwargs)
    elif _is_timm_attention(module):
        weights, output = _timm_attention(module, args, kwargs)
    else:
        raise TypeError(
            f"{type(module).__name__} is not an attention layer whose weights can be recomputed: use "
            "torch.nn.MultiheadAttention (also inside nn.TransformerEncoderLayer) or timm's Attention."
        )
    return torch.nan_to_num(weights.float(), nan=0.0), output


def _output_tensor(output: object) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _check_rebuilt(name: str, rebuilt: Tensor, real: Tensor | None, *, fused: bool = False) -> None:
    """Refuse a layer whose output the recomputed weights do not reproduce (its forward does more)."""
    if real is None or real.shape != rebuilt.shape:
        return
    reduced = torch.is_autocast_enabled() or real.dtype in (torch.float16, torch.bfloat16)
    real, rebuilt = real.detach().float(), rebuilt.detach().float()
    error = float((real - rebuilt).norm() / real.norm().clamp_min(1e-12))
    tolerance = 5e-2 if reduced else 1e-3  # half-precision products differ by rounding
    if error > tolerance:
        if fused:
            raise ValueError(
                f"The attention weights recomputed from the scaled_dot_product_attention call in layer {name!r} do "
                f"not reproduce its output (relative error {error:.2g}): the call uses options the recomputation "
                "does not know (dropout in training mode, a backend-specific argument?). Its weights cannot be "
                "shown faithfully; leave it out of layers=..."
            )
        raise ValueError(
            f"The attention weights recomputed for layer {name!r} do not reproduce its output (relative error "
            f"{error:.2g}): its forward does more than softmax(q k^T / sqrt(d) + mask) v with its own projections "
            "(rotary position embeddings, a relative position bias, a custom attention?). Its weights cannot be "
            "shown faithfully; leave it out of layers=..."
        )


def _sdpa_call(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> None:
    """The signature of ``torch.nn.functional.scaled_dot_product_attention``, to bind the arguments of a call."""


_SDPA_PARAMETERS = inspect.signature(_sdpa_call)


def _repeat_heads(tensor: Tensor, heads: int) -> Tensor:
    """Key or value heads repeated for grouped-query attention, as ``enable_gqa=True`` does."""
    if tensor.ndim < 3 or tensor.shape[-3] == heads:
        return tensor
    return tensor.repeat_interleave(heads // tensor.shape[-3], dim=-3)


def sdpa_attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The attention probabilities ``F.scaled_dot_product_attention`` uses, recomputed from its arguments.

    ``softmax(q k^T * scale + mask)`` in float32, with torch's conventions: a
    boolean ``attn_mask`` marks the keys that take part (True), a float one is
    added to the logits; ``is_causal`` keeps the lower triangle aligned at the
    top left; ``scale`` defaults to ``1 / sqrt(head dim)``; ``enable_gqa``
    repeats each key head for its group of query heads. Rows where every key is
    masked are zero (torch would give NaN there).

    Args:
        query: (..., queries, head dim).
        key: (..., keys, head dim).
        attn_mask: broadcastable to (..., queries, keys).
        is_causal: causal mask.
        scale: the logits' scale.
        enable_gqa: grouped-query attention (fewer key heads than query heads).

    Returns:
        (..., queries, keys) float32 weights; ``weights @ value`` is the call's output.

    Example:
        >>> q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
        >>> weights = sdpa_attention_weights(q, k, is_causal=True)
        >>> out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> bool(torch.allclose(weights @ v, out, atol=1e-5)), weights[0, 0, 0].tolist()
        (True, [1.0, 0.0, 0.0, 0.0, 0.0])
    """
    q, k = query.float(), key.float()
    if enable_gqa:
        k = _repeat_heads(k, q.shape[-3])
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = (q @ k.transpose(-2, -1)) * factor
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)


def _four_d(weights: Tensor) -> Tensor:
    """Weights as (batch, heads, queries, keys): a missing heads dimension added, extra ones merged into heads."""
    if weights.ndim == 2:
        return weights[None, None]
    if weights.ndim == 3:
        return weights[:, None]
    if weights.ndim > 4:
        return weights.reshape(weights.shape[0], -1, *weights.shape[-2:])
    return weights


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)  # type: ignore[call-overload]


def _windows_on_grid(
    weights: Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], *, pad_first: bool
) -> Tensor:
    """(B * windows, heads, N, N) window attention as (B, heads, h*w, h*w) over the grid's tokens (row-major).

    The windows tile the shifted (cyclic roll by ``-shift``) and padded grid row by row; ``pad_first``: padded
    before the shift (HF's ``SwinLayer``), else after it (timm's ``SwinTransformerBlock``). Pairs of tokens that
    the shift mask separates (the regions of a shifted window) and padding tokens are left out (zero).
    """
    (height, width), (win_h, win_w), (shift_h, shift_w) = grid, window, shift
    padded_h, padded_w = -(-height // win_h) * win_h, -(-width // win_w) * win_w
    device = weights.device

    def axis(size: int, padded: int, window_size: int, shift_size: int) -> tuple[Tensor, Tensor, Tensor]:
        position = torch.arange(padded, device=device)  # position in the shifted, padded frame
        if pad_first:
            source = (position + shift_size) % padded
            real = source < size
        else:
            real = position < size
            source = (position + shift_size) % size
        region = torch.zeros_like(position)
        if shift_size > 0:  # the regions of the shift mask: (0, -window), (-window, -shift), (-shift, None)
            region = (position >= padded - window_size).long() + (position >= padded - shift_size).long()
        return source, real, region

    rows, real_rows, region_rows = axis(height, padded_h, win_h, shift_h)
    columns, real_columns, region_columns = axis(width, padded_w, win_w, shift_w)
    index = rows[:, None] * width + columns[None, :]
    real = real_rows[:, None] & real_columns[None, :]
    region = region_rows[:, None] * 3 + region_columns[None, :]

    def partition(frame: Tensor) -> Tensor:  # (padded_h, padded_w) -> (windows, N), as window_partition
        return (
            frame.reshape(padded_h // win_h, win_h, padded_w // win_w, win_w).transpose(1, 2).reshape(-1, win_h * win_w)
        )

    index, real, region = partition(index), partition(real), partition(region)
    windows, tokens, count = index.shape[0], index.shape[1], height * width
    pairs = real[:, :, None] & real[:, None, :] & (region[:, :, None] == region[:, None, :])
    flat = (index[:, :, None] * count + index[:, None, :])[pairs]
    batch, heads = weights.shape[0] // windows, weights.shape[1]
    local = weights.reshape(batch, windows, heads, tokens, tokens).transpose(1, 2)
    dense = weights.new_zeros(batch, heads, count * count)
    dense[:, :, flat] = local[:, :, pairs]
    return dense.reshape(batch, heads, count, count)


_SDPA = torch.nn.functional.scaled_dot_product_attention
_SOFTMAX = frozenset({torch.softmax, torch.nn.functional.softmax, Tensor.softmax, torch.special.softmax})
_HELPERS = (nn.Softmax, nn.Identity)  # modules that compute no attention of their own: it counts as the parent's
_CROSS_NAMES = frozenset(
    {"crossattention", "cross_attn", "cross_attention", "encoder_attn", "multihead_attn", "encdecattention", "src_attn"}
)
_CROSS_KWARGS = ("encoder_hidden_states", "key_value_states", "cross_attention_states", "memory", "context")


@dataclass(eq=False)
class _Frame:
    """One running module call: its inputs and the attention computed inside it (attributed to it)."""

    module: nn.Module
    name: str
    args: tuple
    kwargs: dict
    events: list[_Event] = field(default_factory=list)


@dataclass
class _Event:
    weights: Tensor  # (B, heads, Q, K) float32, laid on the grid for window attention
    source: AttentionSource
    cross: bool
    grid: tuple[int, int] | None


def _same_tensor(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` are one tensor: the same object, or views of the same memory alike in shape, strides
    and dtype (a hook may pass a module a detached alias of its input: DeepSpeed ZeRO-3's does, query and key then
    being two objects for one tensor)."""
    if a is b:
        return True
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return False
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _is_cross(frame: _Frame, queries: int, keys: int) -> bool:
    """Whether the attention computed in ``frame``'s module takes its keys from another sequence."""
    module = frame.module
    if isinstance(module, nn.MultiheadAttention):
        try:
            bound = _MHA_PARAMETERS.bind(module, *frame.args, **frame.kwargs)
        except TypeError:
            return False
        return not _same_tensor(bound.arguments["key"], bound.arguments["query"])
    if _is_timm_attention(module):
        return False
    if queries != keys or getattr(module, "is_cross_attention", False) is True:
        return True
    kind = type(module).__name__.lower()
    if "cross" in kind or "encdec" in kind:
        return True
    if any(part.lower() in _CROSS_NAMES for part in frame.name.split(".")):
        return True
    return any(isinstance(frame.kwargs.get(key), Tensor) for key in _CROSS_KWARGS)


def _window_layout(frames: Sequence[_Frame], weights: Tensor) -> tuple[Tensor, tuple[int, int]] | None:
    """Window attention laid on its block's grid, when ``frames`` (outermost first) hold a Swin-style block."""
    block = next(
        (f for f in reversed(frames) if hasattr(f.module, "window_size") and hasattr(f.module, "shift_size")), None
    )
    if block is None:
        return None
    module = block.module
    dimensions = block.kwargs.get("input_dimensions")
    if dimensions is None and len(block.args) > 1 and isinstance(block.args[1], (tuple, list)):
        dimensions = block.args[1]  # HF SwinLayer(hidden_states, input_dimensions)
    if dimensions is not None:
        grid = _pair(dimensions)
    elif block.args and isinstance(block.args[0], Tensor) and block.args[0].ndim == 4:
        grid = (int(block.args[0].shape[1]), int(block.args[0].shape[2]))  # timm: (B, H, W, C)
    elif hasattr(module, "input_resolution"):
        grid = _pair(module.input_resolution)
    else:
        return None
    window, shift = _pair(module.window_size), _pair(module.shift_size)
    windows = -(-grid[0] // window[0]) * -(-grid[1] // window[1])
    tokens = window[0] * window[1]
    if weights.shape[-1] != tokens or weights.shape[-2] != tokens or weights.shape[0] % windows:
        return None
    pad_first = not type(module).__module__.startswith("timm.")  # timm shifts, then pads; HF pads, then shifts
    return _windows_on_grid(weights, grid, window, shift, pad_first=pad_first), grid


class _AttentionRecorder(TorchFunctionMode):
    """Keeps the stack of running modules and turns each attention computation into an event of its owner."""

    def __init__(
        self,
        model: nn.Module,
        targets: Mapping[nn.Module, str] | None,
        keep: Callable[[str, _Event], None],
        *,
        verify: bool,
    ) -> None:
        super().__init__()
        self.names: dict[nn.Module, str] = {}
        for name, module in model.named_modules():
            self.names.setdefault(module, name)
        self.targets = targets
        self.keep = keep
        self.verify = verify
        self.stack: list[_Frame] = []
        self.busy = False
        self.ran: dict[str, int] = {}  # target name -> calls of the module
        self.computed: dict[str, int] = {}  # owner name -> attention computations attributed to it
        self.handles: list[Any] = []

    def attach(self) -> None:
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._exit, with_kwargs=True, always_call=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append(_Frame(module, self.names[module], args, kwargs))

    def _exit(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        while self.stack and self.stack[-1].module is not module:  # frames an exception left behind
            self.stack.pop()
        if not self.stack:
            return
        frame = self.stack[-1]
        try:
            if (
                output is not None
                and is_attention_layer(module)
                and not self.busy
                and not any(is_attention_layer(f.module) for f in self.stack[:-1])
            ):
                self._known(frame, output)
        finally:
            self.stack.pop()
        if self.targets is not None and module in self.targets:
            name = self.targets[module]
            self.ran[name] = self.ran.get(name, 0) + 1
        if frame.events:
            name = self.targets[module] if self.targets is not None else frame.name
            self.computed[name] = self.computed.get(name, 0) + len(frame.events)
            self.keep(name, frame.events[0])

    def _owner(self, index: int) -> _Frame | None:
        """The frame the attention computed in ``self.stack[index]``'s module belongs to."""
        if self.targets is None:
            frame = self.stack[index]
            return frame if frame.name else None  # computed in the model's own forward: no layer to name
        return next((f for f in reversed(self.stack[: index + 1]) if f.module in self.targets), None)

    def _known(self, frame: _Frame, output: object) -> None:
        owner = self._owner(len(self.stack) - 1)
        if owner is None:
            return
        module = frame.module
        self.busy = True  # the recomputation's own softmax and attention calls are not the model's
        try:
            weights, rebuilt = layer_attention(module, frame.args, frame.kwargs)
        finally:
            self.busy = False
        mha = isinstance(module, nn.MultiheadAttention)
        if self.verify and not mha:  # MHA's own forward made them: nothing to check
            _check_rebuilt(frame.name, rebuilt, _output_tensor(output))
        cross = _is_cross(frame, weights.shape[-2], weights.shape[-1])
        source: AttentionSource = "multihead_attention" if mha else "timm_attention"
        owner.events.append(_Event(weights, source, cross, None))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)  # the mode is off inside: nested calls are not seen
        if self.stack and not self.busy and (func is _SDPA or func in _SOFTMAX):
            self.busy = True
            try:
                self._computed(func, args, kwargs, output)
            finally:
                self.busy = False
        return output

    def _computed(self, func: Any, args: tuple, kwargs: dict, output: object) -> None:
        index = len(self.stack) - 1
        while index >= 0 and isinstance(self.stack[index].module, _HELPERS):
            index -= 1
        if index < 0 or any(is_attention_layer(f.module) for f in self.stack):
            return  # inside nn.MultiheadAttention or timm's Attention: their hook recomputes the weights
        if func is not _SDPA:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if not (isinstance(output, Tensor) and output.ndim == 4 and dim in (-1, 3)):
                return
        owner = self._owner(index)
        if owner is None:
            return
        frame = self.stack[index]
        if func is _SDPA:
            call = _SDPA_PARAMETERS.bind(*args, **kwargs).arguments
            weights = sdpa_attention_weights(
                call["query"],
                call["key"],
                call.get("attn_mask"),
                is_causal=bool(call.get("is_causal", False)),
                scale=call.get("scale"),
                enable_gqa=bool(call.get("enable_gqa", False)),
            )
            if self.verify and isinstance(output, Tensor):
                value = call["value"].float()
                rebuilt = weights @ (_repeat_heads(value, weights.shape[-3]) if weights.ndim > 2 else value)
                _check_rebuilt(frame.name, rebuilt, output, fused=True)
            source: AttentionSource = "scaled_dot_product_attention"
        else:
            weights = output.detach().float()  # type: ignore[union-attr]
            source = "softmax"
        weights = _four_d(weights)
        grid = None
        laid = _window_layout(self.stack[: index + 1], weights)
        if laid is not None:
            weights, grid = laid
        owner.events.append(_Event(weights, source, _is_cross(frame, weights.shape[-2], weights.shape[-1]), grid))


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer seen in a forward pass (:func:`find_attention_layers`).

    Attributes:
        name: dotted module name (``model.named_modules()``): the module that computes the attention.
        source: how its weights are captured (see the module docs).
        cross: cross-attention: its keys come from another sequence than its queries.
        heads: attention heads.
        queries: query tokens (for window attention: the tokens of its grid).
        keys: key tokens (idem).
        grid: window attention (Swin): the (height, width) grid of tokens its weights are laid on; else None.
        container: the innermost ``nn.ModuleList`` or ``nn.Sequential`` that holds it (its stack of blocks), or
            None.
        calls: attention computations attributed to it in the pass (more than one: shared across depths, or a
            module that holds several attention layers).

    Example:
        >>> layer = AttentionLayer("blocks.0.attn", "scaled_dot_product_attention", False, 3, 17, 17)
        >>> layer.cross, layer.grid, layer.calls
        (False, None, 1)
    """

    name: str
    source: AttentionSource
    cross: bool
    heads: int
    queries: int
    keys: int
    grid: tuple[int, int] | None = None
    container: str | None = None
    calls: int = 1


def _container(name: str, modules: Mapping[str, nn.Module]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:end])
        if isinstance(modules.get(prefix), (nn.ModuleList, nn.Sequential)):
            return prefix
    return None


def _record(
    model: nn.Module,
    inputs: Tensor,
    targets: Mapping[nn.Module, str] | None,
    *,
    reduce: Callable[[Tensor], Any] | None,
    verify: bool,
    eval_mode: bool,
    forward: Callable[[nn.Module, Tensor], Any] | None,
) -> tuple[dict[str, Any], dict[str, AttentionLayer], _AttentionRecorder, Any]:
    """One forward pass that captures the attention of ``targets`` (None: of every module that computes some)."""
    records: dict[str, Any] = {}
    found: dict[str, AttentionLayer] = {}
    modules = dict(model.named_modules())

    def keep(name: str, event: _Event) -> None:
        if name in found:  # a later call of a layer that runs several times: the count says so
            return
        weights = event.weights
        records[name] = weights if reduce is None else reduce(weights)
        found[name] = AttentionLayer(
            name=name,
            source=event.source,
            cross=event.cross,
            heads=weights.shape[1],
            queries=weights.shape[-2],
            keys=weights.shape[-1],
            grid=event.grid,
            container=_container(name, modules),
        )

    recorder = _AttentionRecorder(model, targets, keep, verify=verify)
    recorder.attach()
    try:
        with torch.no_grad(), modes_preserved(model, eval_mode=eval_mode), eager_forward(), recorder:
            output = forward(model, inputs) if forward is not None else model(inputs)
    finally:
        recorder.detach()
    found = {name: replace(layer, calls=recorder.computed[name]) for name, layer in found.items()}
    return records, found, recorder, output


def find_attention_layers(
    model: nn.Module,
    inputs: Tensor,
    *,
    verify: bool = False,
    eval_mode: bool = True,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
) -> list[AttentionLayer]:
    """Every module that computes attention in a forward pass of ``inputs``, in the order they complete.

    Finds the layers of any implementation the capture knows (see the module
    docs): HF BERT, GPT-2, ViT, Swin (eager or ``sdpa``), timm, torch, your own
    modules calling ``F.scaled_dot_product_attention``. Unlike
    :func:`attention_layers` it runs the model (once, without gradients).

    Args:
        model: the network.
        inputs: (B, ...) inputs, on the model's device (one or two samples are enough).
        verify: check the recomputed weights against each layer's output (see :func:`capture_attention`).
        eval_mode: run the model in eval mode (Dropout off).
        forward: how to call the model, ``forward(model, inputs)``; default ``model(inputs)``.

    Returns:
        One :class:`AttentionLayer` per module (its first computation's shape), in forward order.

    Example:
        >>> decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, batch_first=True), num_layers=1)
        >>> memory = torch.randn(2, 7, 16)
        >>> found = find_attention_layers(decoder, torch.randn(2, 5, 16), forward=lambda m, x: m(x, memory))
        >>> [(layer.name, layer.cross, layer.queries, layer.keys) for layer in found]
        [('layers.0.self_attn', False, 5, 5), ('layers.0.multihead_attn', True, 5, 7)]
    """
    _, found, _, _ = _record(
        model, inputs, None, reduce=lambda weights: None, verify=verify, eval_mode=eval_mode, forward=forward
    )
    return list(found.values())


def capture_attention(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str] | None = None,
    *,
    reduce: Callable[[Tensor], Any] | None = None,
    verify: bool = False,
    eval_mode: bool = True,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
) -> tuple[dict[str, Any], Any]:
    """One forward pass of ``inputs`` that records the attention weights of each named layer.

    The forward runs without gradients, with every module's mode saved and
    restored, off torch's fused transformer fast path, and with the hooks and
    the function mode removed in ``finally``. Each layer must compute attention
    once in the pass.

    Args:
        model: the network.
        inputs: (B, ...) inputs, on the model's device.
        layers: dotted names of the modules that compute attention (or of a module around one, e.g. a block);
            None: every one (:func:`find_attention_layers`).
        reduce: applied to each layer's (B, heads, queries, keys) float32 weights as soon as they are captured, so
            only what is needed is kept (the full weights of every layer of a large model can be large); None
            keeps them. Window attention comes laid on its grid (see the module docs).
        verify: check that the weights reproduce each timm layer's real output and each
            ``scaled_dot_product_attention`` call's output (see the module docs).
        eval_mode: run the model in eval mode (Dropout off).
        forward: how to call the model, ``forward(model, inputs)``; default ``model(inputs)``.

    Returns:
        ``(records, output)``: layer name -> reduced weights, in the order the layers ran, and the model's output.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        >>> net = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> records, output = capture_attention(net, torch.randn(2, 6, 16))
        >>> {name: tuple(w.shape) for name, w in records.items()}
        {'layers.0.self_attn': (2, 4, 6, 6), 'layers.1.self_attn': (2, 4, 6, 6)}
    """
    options = {"reduce": reduce, "verify": verify, "eval_mode": eval_mode, "forward": forward}
    if layers is None:
        records, found, _, output = _record(model, inputs, None, **options)
        if not records:
            raise ValueError(
                f"{type(model).__name__} has no attention layer whose weights can be captured: no sub-module "
                "calls torch.nn.functional.scaled_dot_product_attention or a softmax over the keys of (batch, heads, "
                "queries, keys) scores, and none is a torch.nn.MultiheadAttention or timm's Attention."
            )
        repeated = [name for name, layer in found.items() if layer.calls > 1]
        if repeated:
            raise ValueError(
                f"The attention layers {repeated} computed attention more than once in one forward pass (shared "
                "weights?), so which call's weights to show is ambiguous; name the others in layers=..."
            )
        return records, output
    names = [module_name(model, name) or name for name in layers]
    targets: dict[nn.Module, str] = {}
    for name in names:
        targets[get_module(model, name)] = name
    records, found, recorder, output = _record(model, inputs, targets, **options)
    missing = [name for name in names if recorder.ran.get(name, 0) == 0]
    if missing:
        raise ValueError(
            f"The attention layers {missing} did not run in the forward pass (a branch the inputs do not take, or "
            "a fused kernel that bypasses them); leave them out of layers=..."
        )
    empty = [name for name in names if name not in found]
    if empty:
        try:
            there = [layer.name for layer in find_attention_layers(model, inputs, eval_mode=eval_mode, forward=forward)]
        except Exception:  # only for the message
            there = attention_layers(model)
        kinds = ", ".join(f"{name!r} is a {type(get_module(model, name)).__name__}" for name in empty)
        raise ValueError(
            f"Layer(s) {empty} compute no attention weights in the forward pass ({kinds}): not an attention layer "
            "(a module that calls scaled_dot_product_attention or a softmax over (batch, heads, queries, keys) "
            f"scores, torch.nn.MultiheadAttention or timm's Attention); attention layers of this model: "
            f"{there or 'none'}."
        )
    repeated = [name for name in names if found[name].calls > 1]
    if repeated:
        raise ValueError(
            f"The attention layers {repeated} computed attention more than once in one forward pass (shared weights, "
            "or a module holding several attention layers: name the inner ones), so which call's weights to show is "
            "ambiguous; leave them out of layers=..."
        )
    return records, output


@dataclass(frozen=True)
class AttentionStack:
    """Self-attention layers that attention rollout multiplies, and whether it may (:func:`attention_stack`).

    Attributes:
        layers: the self-attention layers, in forward order.
        refusal: None when rollout through ``layers`` is defined; else why it is not.

    Example:
        >>> AttentionStack(("layers.0.self_attn", "layers.1.self_attn"))
        AttentionStack(layers=('layers.0.self_attn', 'layers.1.self_attn'), refusal=None)
    """

    layers: tuple[str, ...]
    refusal: str | None = None


def _describe(run: Sequence[AttentionLayer]) -> str:
    size = f"{run[0].grid[0]}x{run[0].grid[1]} grid" if run[0].grid else f"{run[0].queries} tokens"
    where = run[0].name if len(run) == 1 else f"{run[0].name} to {run[-1].name}"
    return f"{size} in {where}"


def attention_stack(found: Sequence[AttentionLayer], layers: Sequence[str] | None = None) -> AttentionStack:
    """The self-attention layers of the encoder (or of the only stack), and whether rollout through them is defined.

    Cross-attention layers are never part of a stack. A ``nn.ModuleList`` or
    ``nn.Sequential`` of blocks that holds cross-attention is a decoder: its
    self-attention belongs to the encoder only when the model has no other
    (decoder-only models with cross-attention). Rollout multiplies the
    attention of consecutive layers over one token sequence, so it is defined
    when the layers form one run in forward order: no cross-attention or
    other stack between them, the same tokens in each (Swin stages merge
    patches between them: not multiplied), each computed once.

    Args:
        found: the model's attention layers in forward order (:func:`find_attention_layers`).
        layers: names of layers to check instead of the encoder's.

    Returns:
        An :class:`AttentionStack`; its ``refusal`` says why rollout is not defined, if it is not.

    Example:
        >>> model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=1, batch_first=True)
        >>> x = torch.randn(2, 5, 16)
        >>> found = find_attention_layers(model, x, forward=lambda m, inputs: m(inputs, inputs))
        >>> attention_stack(found).layers
        ('encoder.layers.0.self_attn', 'encoder.layers.1.self_attn')
        >>> mixed = attention_stack(found, ["encoder.layers.1.self_attn", "decoder.layers.0.self_attn"])
        >>> "different stacks (an encoder and a decoder)" in mixed.refusal
        True
    """
    by_name = {layer.name: layer for layer in found}
    if layers is not None:
        unknown = [name for name in layers if name not in by_name]
        if unknown:
            raise ValueError(f"{unknown} are not among the attention layers found: {list(by_name)}.")
        crossing = [name for name in layers if by_name[name].cross]
        if crossing:
            return AttentionStack(
                tuple(layers),
                f"{crossing} are cross-attention (keys from another sequence than the queries); rollout multiplies "
                "self-attention over one token sequence.",
            )
    decoders = {layer.container for layer in found if layer.cross and layer.container is not None}
    selves = [layer for layer in found if not layer.cross]
    if not selves:
        return AttentionStack((), "the model has cross-attention layers only; rollout multiplies self-attention.")
    # runs of consecutive self-attention layers over the same tokens, in the same kind of stack
    runs: list[list[AttentionLayer]] = []
    breaks: list[str] = []  # why each run after the first is apart from the one before
    previous: AttentionLayer | None = None
    between_cross = False
    for layer in found:
        if layer.cross:
            between_cross = True
            continue
        if previous is None:
            runs.append([layer])
        elif (layer.queries, layer.keys, layer.grid) != (previous.queries, previous.keys, previous.grid):
            runs.append([layer])
            breaks.append("tokens")
        elif (layer.container in decoders) != (previous.container in decoders):
            runs.append([layer])
            breaks.append("stacks")
        elif between_cross:
            runs.append([layer])
            breaks.append("cross")
        else:
            runs[-1].append(layer)
        previous, between_cross = layer, False
    run_of = {layer.name: i for i, run in enumerate(runs) for layer in run}
    if layers is None:
        chosen = [layer for layer in selves if layer.container not in decoders] or selves
    else:
        chosen = [by_name[name] for name in by_name if name in set(layers)]  # forward order
    names = tuple(layer.name for layer in chosen)
    indices = sorted({run_of[layer.name] for layer in chosen})
    shared = [layer.name for layer in chosen if layer.calls != 1]
    if shared:
        return AttentionStack(
            names,
            f"the layers {shared} compute attention more than once per forward pass (shared across depths), so "
            "rollout has no single order to multiply them in.",
        )
    if len(indices) == 1:
        return AttentionStack(names)
    parts = [[layer for layer in runs[i] if layer.name in names] for i in indices]
    reasons = {breaks[i - 1] for i in indices[1:]}
    if "tokens" in reasons:
        described = "; ".join(_describe(part) for part in parts)
        reason = (
            f"the self-attention layers run over different token sets ({described}: stages that merge patches, "
            "as Swin's, or another sequence), so their attention cannot be multiplied through to the input."
        )
    elif "stacks" in reasons:
        groups = " and ".join(str([layer.name for layer in part]) for part in parts)
        reason = (
            f"the layers {groups} belong to different stacks (an encoder and a decoder), so their attention cannot "
            "be multiplied through to the input."
        )
    else:
        groups = " and ".join(str([layer.name for layer in part]) for part in parts)
        reason = (
            f"cross-attention runs between the layers {groups} (a decoder's blocks mix in the encoder's sequence), "
            "so multiplying their self-attention alone would leave out where their tokens' information comes from."
        )
    return AttentionStack(names, reason)


def attention_rollout(weights: Sequence[Tensor], *, head_fusion: str = "mean", residual: bool = True) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each input token flows into each output token.

    Each layer's weights are fused over heads, mixed with the identity for the
    residual connection (``0.5 W + 0.5 I``, rows renormalised) and multiplied
    through the layers: ``R = W_L ... W_2 W_1``. Row ``i`` of ``R`` is the
    share of each input token in token ``i`` at the last layer.

    Args:
        weights: per layer, in forward order, (B, heads, T, T) weights, or (B, T, T) already fused over heads.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: add the identity for the residual connection (the paper's rollout); False multiplies the raw
            attention only.

    Returns:
        (B, T, T) rollout; rows sum to one.

    Example:
        >>> uniform = torch.full((1, 1, 2, 2), 0.5)
        >>> attention_rollout([uniform]).tolist()  # 0.5 * uniform + 0.5 * identity
        [[[0.75, 0.25], [0.25, 0.75]]]
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
    if not weights:
        raise ValueError("attention_rollout needs the weights of at least one layer.")
    result: Tensor | None = None
    for layer in weights:
        fused = fuse_heads(layer.float(), head_fusion) if layer.ndim == 4 else layer.float()
        if fused.shape[-1] != fused.shape[-2] or (result is not None and fused.shape != result.shape):
            raise ValueError(
                f"attention_rollout needs self-attention over one token sequence in every layer; got weights of "
                f"shape {tuple(layer.shape)} after {None if result is None else tuple(result.shape)}."
            )
        if residual:
            fused = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1], device=fused.device, dtype=fused.dtype)
        fused = fused / fused.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        result = fused if result is None else fused @ result
    assert result is not None
    return result


def fuse_heads(weights: Tensor, head_fusion: str) -> Tensor:
    """(B, heads, Q, K) weights combined over heads by ``"mean"``, ``"max"`` or ``"min"``: (B, Q, K).

    Example:
        >>> fuse_heads(torch.tensor([[[[0.25, 0.75]], [[0.5, 0.5]]]]), "max").tolist()
        [[[0.5, 0.75]]]
    """
    if head_fusion == "mean":
        return weights.mean(dim=1)
    return weights.amax(dim=1) if head_fusion == "max" else weights.amin(dim=1)


def attention_entropy(weights: Tensor, queries: Tensor | None = None) -> Tensor:
    """Entropy of each query's attention divided by that of uniform attention over the keys it can see.

    1 is uniform over the visible keys, 0 all on one. Keys a mask hides (weight
    exactly zero: padding, causal masks) do not count, so uniform attention over
    a padded sequence's real tokens reads 1; rows that see a single key (the
    first token under a causal mask) have no choice to make and are left out.

    Args:
        weights: (B, heads, queries, keys) attention weights.
        queries: optional (B, queries) weights of the query rows in the mean (0 leaves a row out, e.g. padding).

    Returns:
        (B,) mean over heads and queries (rows with no mass or a single visible key left out).

    Example:
        >>> attention_entropy(torch.full((1, 1, 3, 4), 0.25)).tolist()
        [1.0]
        >>> attention_entropy(torch.tensor([[[[0.5, 0.5, 0.0]]]])).tolist()  # two visible keys, uniform
        [1.0]
        >>> attention_entropy(torch.eye(4)[None, None]).tolist()
        [0.0]
    """
    p = weights.float().clamp_min(0)
    visible = (p > 0).sum(dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    normalised = torch.where(visible > 1, entropy / torch.log(visible.clamp_min(2).float()), torch.zeros_like(entropy))
    valid = ((p.sum(dim=-1) > 0.5) & (visible > 1)).float()  # a row that sees one key has no choice to make
    if queries is not None:
        valid = valid * queries.to(valid)[:, None, :]
    return (normalised * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1e-12)
