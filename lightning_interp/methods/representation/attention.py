"""Attention weights of transformer layers, recomputed from each layer's own input, and attention rollout.

The weights are not read from the model's forward: ``nn.TransformerEncoderLayer``
and torchvision's ``VisionTransformer`` call their ``nn.MultiheadAttention``
with ``need_weights=False`` (the fused scaled-dot-product path, which never
forms the weights), and timm's ``Attention`` uses the fused path by default. A
forward hook on each attention layer takes the inputs the layer was called
with and recomputes the weights outside the model, so nothing about the model
is patched or changed: for ``nn.MultiheadAttention`` by calling the module's
own ``forward`` (no hooks) with ``need_weights=True`` on those inputs, for
timm's ``Attention`` as ``softmax(q k^T / sqrt(d) + mask)`` from its ``qkv``
projection and norms. For timm the hook also rebuilds the layer's output from
those weights and checks it against the real output (:func:`capture_attention`
with ``verify=True``): a layer whose forward does more than this (rotary
position embeddings, a relative position bias) is refused instead of explained
wrongly. The pass runs off torch's fused transformer fast path
(:func:`~lightning_interp.methods.model.core.transformer_slow_path`).

Supported layers: ``torch.nn.MultiheadAttention`` (any ``batch_first``,
separate key/value sizes, ``bias_k``/``add_zero_attn``, padding and attention
masks, ``is_causal``) and timm's ``Attention`` (``timm.models.vision_transformer``:
ViT, DeiT, DINOv2-style blocks; ``qk_norm``, gates and head-dim options).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import eager_forward, get_module, modes_preserved, module_name

__all__ = [
    "HEAD_FUSIONS",
    "attention_entropy",
    "attention_layers",
    "attention_rollout",
    "capture_attention",
    "fuse_heads",
    "layer_attention",
]

HEAD_FUSIONS = ("mean", "max", "min")
"""How attention rollout combines the heads of a layer (Abnar & Zuidema 2020 use the mean)."""

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


def _check_rebuilt(name: str, rebuilt: Tensor, real: Tensor | None) -> None:
    """Refuse a layer whose output the recomputed weights do not reproduce (its forward does more)."""
    if real is None or real.shape != rebuilt.shape:
        return
    reduced = torch.is_autocast_enabled() or real.dtype in (torch.float16, torch.bfloat16)
    real, rebuilt = real.detach().float(), rebuilt.detach().float()
    error = float((real - rebuilt).norm() / real.norm().clamp_min(1e-12))
    tolerance = 5e-2 if reduced else 1e-3  # half-precision products differ by rounding
    if error > tolerance:
        raise ValueError(
            f"The attention weights recomputed for layer {name!r} do not reproduce its output (relative error "
            f"{error:.2g}): its forward does more than softmax(q k^T / sqrt(d) + mask) v with its own projections "
            "(rotary position embeddings, a relative position bias, a custom attention?). Its weights cannot be "
            "shown faithfully; leave it out of layers=..."
        )


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
    restored, off torch's fused transformer fast path, and with the hooks
    removed in ``finally``. Each layer must run once in the pass.

    Args:
        model: the network.
        inputs: (B, ...) inputs, on the model's device.
        layers: dotted names of attention layers; None: every supported one (:func:`attention_layers`).
        reduce: applied to each layer's (B, heads, queries, keys) float32 weights inside its hook, so only what
            is needed is kept (the full weights of every layer of a large model can be large); None keeps them.
        verify: check that the weights reproduce each timm layer's real output (see the module docs).
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
    names = attention_layers(model) if layers is None else [module_name(model, name) or name for name in layers]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no attention layer whose weights can be recomputed "
            "(torch.nn.MultiheadAttention, as in nn.TransformerEncoderLayer and torchvision's VisionTransformer, or "
            "timm's Attention)."
        )
    modules = {}
    for name in names:
        module = get_module(model, name)
        if not is_attention_layer(module):
            raise ValueError(
                f"Layer {name!r} is a {type(module).__name__}, not an attention layer whose weights can be "
                "recomputed (torch.nn.MultiheadAttention or timm's Attention); attention layers of this model: "
                f"{attention_layers(model) or 'none'}."
            )
        modules[module] = name
    records: dict[str, Any] = {}
    calls: dict[str, int] = dict.fromkeys(names, 0)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        name = modules[module]
        calls[name] += 1
        weights, rebuilt = layer_attention(module, args, kwargs)
        if verify and not isinstance(module, nn.MultiheadAttention):  # MHA's own forward made them: nothing to check
            _check_rebuilt(name, rebuilt, _output_tensor(output))
        records[name] = weights if reduce is None else reduce(weights)

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in modules]
    try:
        with torch.no_grad(), modes_preserved(model, eval_mode=eval_mode), eager_forward():
            output = forward(model, inputs) if forward is not None else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, count in calls.items() if count == 0]
    repeated = [name for name, count in calls.items() if count > 1]
    if missing:
        raise ValueError(
            f"The attention layers {missing} did not run in the forward pass (a branch the inputs do not take, or "
            "a fused kernel that bypasses them); leave them out of layers=..."
        )
    if repeated:
        raise ValueError(
            f"The attention layers {repeated} ran more than once in one forward pass (shared weights?), so which "
            "call's weights to show is ambiguous; leave them out of layers=..."
        )
    return records, output


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
