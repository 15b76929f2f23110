"""AttentionCallback: attention maps and attention rollout of a transformer's probe samples at validation epochs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_interp._logging import log_image
from lightning_interp.callbacks._base import unwrapped
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._maps import Explanation, LayerMapCallback, _GridData, is_token_input
from lightning_interp.methods import (
    MAX_PREFIX_TOKENS,
    AttentionLayer,
    TokenGrid,
    attention_entropy,
    attention_rollout,
    attention_stack,
    capture_attention,
    find_attention_layers,
    fuse_heads,
    get_module,
    module_name,
    plain_name,
    resolve_target,
    scores_from_output,
    token_grids,
)
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import input_to_rgb, map_tiles, render_grid

MAX_HEADS_SHOWN = 16  # heads drawn in a layer's heads picture (all of them are in the layer's mean)


_ATTENTION_NAMES = ("self_attention", "self_attn", "attention", "attn", "mha", "self")


def short_layer_name(name: str) -> str:
    """A column title for an attention layer: its block's name, without the attention module's own name.

    Example:
        >>> short_layer_name("net.encoder.layers.encoder_layer_1.self_attention"), short_layer_name("net.blocks.3.attn")
        ('layer_1', 'blocks.3')
        >>> short_layer_name("model.bert.encoder.layer.1.attention.self")  # HF: BertAttention.self
        'layer.1'
    """
    parts = name.split(".")
    while len(parts) > 1 and parts[-1] in _ATTENTION_NAMES:
        parts = parts[:-1]
    if parts[-1].isdigit() and len(parts) > 1:
        return ".".join(parts[-2:])
    numbered = re.search(r"layer_?\d+$", parts[-1])  # torchvision's "encoder_layer_2": "layer_2"
    return numbered.group(0) if numbered else parts[-1]


def _extra_keys(module: torch.nn.Module) -> int:
    """Keys an attention layer adds after the tokens: ``nn.MultiheadAttention``'s ``bias_k`` and zero key."""
    if isinstance(module, torch.nn.MultiheadAttention):
        return int(module.bias_k is not None) + int(module.add_zero_attn)
    return 0


class AttentionCallback(LayerMapCallback):
    """Log what a transformer's attention looks at, per probe sample, and attention rollout to the input.

    At each due validation epoch (never in the sanity check) the callback runs
    the probe samples through the model once and captures the attention
    probabilities wherever the model computes them: ``F.scaled_dot_product_attention``
    calls (recomputed from their arguments), explicit softmax attention (HF
    ``eager``), ``nn.MultiheadAttention`` and timm's ``Attention`` (recomputed
    from each layer's input, also with ``need_weights=False`` or on torch's
    fused path); the model is not changed, see
    :mod:`lightning_interp.methods.representation.attention`. It logs under ``interp_<name>/``:

    - ``maps``: one row per probe sample (label, prediction and confidence at
      the left): the input, the attention of each shown layer (mean over heads)
      and the rollout, over the image like Grad-CAM maps (patch tokens laid on
      their grid) or, for token ids, as the text with coloured tokens;
    - ``<layer>/heads``: the first few samples' attention in each head of the layer;
    - ``<layer>/entropy``: mean entropy of the layer's attention rows divided
      by that of uniform attention over the tokens each row can see (1 =
      uniform, 0 = all on one token; padding does not count): does attention
      sharpen during training?
    - ``rollout/concentration`` and ``<layer>/concentration``: share of the
      map's mass in its top 10% of positions; ``.../stability`` from the second
      run; ``.../localization`` and ``.../pointing_game`` with object masks;
    - at fit end, ``<map>/evolution`` strips, as the other map callbacks.

    Which token's attention is shown (``query``): ``"auto"`` takes the class
    token where the model has leading tokens before its patches or input
    tokens (ViT's class token), else the mean over all (non-padding) tokens (a
    model that pools its output); an int names a token position (``0`` for a
    ``[CLS]`` id at the start of the ids); ``"last"`` the last non-padding
    token (a causal model that reads its last token: under a causal mask the
    mean over tokens favours the first ones, which every row sees); ``"mean"``
    the mean.

    Supported models: any whose attention goes through one of those paths:
    ``nn.TransformerEncoderLayer`` and ``nn.Transformer``, torchvision's and
    timm's vision transformers, HF BERT, RoBERTa, DistilBERT, GPT-2, ViT, DeiT
    (``eager`` or ``sdpa`` attention), timm's and HF's Swin (window attention
    laid back on the stage's token grid), your own modules. Attention is not
    explained per class, so there is no ``target`` option. For HF models pass
    ``forward_fn`` (e.g. ``lambda model, ids: model(input_ids=ids,
    attention_mask=(ids != pad).long()).logits``) or ``output_transform``.

    Which layers: the self-attention layers of the encoder (of the only stack
    in encoder-only and decoder-only models; the encoder of an encoder-decoder
    such as ``nn.Transformer``, whose decoder blocks hold cross-attention; see
    :func:`~lightning_interp.methods.attention_stack`). Cross-attention is
    shown only when named in ``layers``. Rollout multiplies the encoder's
    self-attention in forward order; where that is not defined (Swin, whose
    stages run over different token grids) the callback refuses it before
    training and says why: pass ``rollout=False``.

    Args:
        layers: attention layers to show: ``"auto"`` (the encoder's last
            self-attention layer) or dotted names (``model.named_modules()``) of
            the modules that compute attention (cross-attention included).
            Rollout always runs through the encoder's self-attention layers.
        heads: log each shown layer's per-head picture.
        head_samples: probe samples in the per-head pictures.
        rollout: compute attention rollout (Abnar & Zuidema 2020).
        residual: rollout with the residual identity (``0.5 W + 0.5 I``), as in the paper.
        head_fusion: how rollout combines a layer's heads: ``"mean"``, ``"max"`` or ``"min"``.
        query: ``"auto"``, ``"mean"``, ``"last"`` or a token position (see above).
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: shared options of :class:`~lightning_interp.callbacks._maps.MapCallback`
            (``num_samples``, ``every_n_epochs``, ``probe``, ``data`` (vocabulary, padding), ``display``, ...).

    Example:
        >>> callback = AttentionCallback(head_fusion="max", num_samples=4)
        >>> callback.layers, callback.head_fusion
        ([], 'max')
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        layers: str | Sequence[str] = "auto",
        *,
        heads: bool = True,
        head_samples: int = 4,
        rollout: bool = True,
        residual: bool = True,
        head_fusion: Literal["mean", "max", "min"] = "mean",
        query: Literal["auto", "mean", "last"] | int = "auto",
        name: str = "attention",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("target", "pred") != "pred":  # LightningCLI passes the inherited default: that one is fine
            raise TypeError(
                "AttentionCallback has no target option: attention weights do not depend on the class explained. "
                "For class-specific maps of a transformer use SaliencyCallback or GradCAMCallback."
            )
        super().__init__(name=name, **kwargs)
        self._choose_layers(layers, "layers")
        check_arguments(head_fusion=head_fusion, head_samples=head_samples)
        if not (
            query in ("auto", "mean", "last") or (isinstance(query, int) and not isinstance(query, bool) and query >= 0)
        ):
            raise ValueError(f"query must be 'auto', 'mean', 'last' or a token position (an int >= 0), got {query!r}.")
        for option, value in (("heads", heads), ("rollout", rollout), ("residual", residual)):
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be True or False, got {value!r}.")
        self.heads = heads
        self.head_samples = head_samples
        self.rollout = rollout
        self.residual = residual
        self.head_fusion = head_fusion
        self.query = query
        self._ran: list[str] = []  # the captured attention layers in forward order (the model's own names)
        self._rollout_layers: list[str] = []  # the encoder's self-attention layers rollout multiplies
        self._found: list[AttentionLayer] = []  # every attention layer of the model, in forward order
        self._query: int | str = "mean"  # the query in force: a token position, "mean" or "last"
        self._prefix = 0  # leading tokens (class, register) before the ones laid on the input
        self._grid: TokenGrid | None = None  # for images: how the tokens lie on the input
        self._count = 0  # tokens the attention layers see (their queries)

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for name in self.layers:  # that they compute attention is checked on a forward pass, in _prepare
            get_module(pl_module, name)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        example = self._example_input(pl_module, probe)
        trace = self._trace(trainer, pl_module, example)
        sample = probe.subset(min(2, len(probe)))
        two = self._device_inputs(trainer, pl_module, sample.inputs)
        with self._model_context(trainer):  # the recomputed weights must reproduce each call's output (once per fit)
            found = find_attention_layers(self._explained(pl_module, sample), two, verify=True)
        model = type(unwrapped(pl_module)).__name__
        if not found:
            raise ValueError(
                f"AttentionCallback found no attention layer in {model}: no sub-module computes attention in a "
                "forward pass of the probe inputs (a call of torch.nn.functional.scaled_dot_product_attention, a "
                "softmax over (batch, heads, queries, keys) scores, torch.nn.MultiheadAttention or timm's Attention). "
                "Models without one can use SaliencyCallback, GradCAMCallback or the representation callbacks."
            )
        once = [layer for layer in found if layer.calls == 1]
        if not once:
            runs = {plain_name(layer.name): layer.calls for layer in found}
            raise ValueError(
                f"AttentionCallback: the attention layers of {model} do not compute attention exactly once per "
                f"forward pass (times each did: {runs}): a layer shared across depths (ALBERT-style) has no single "
                "attention map to show. Use SaliencyCallback, GradCAMCallback or the representation callbacks for "
                "this model."
            )
        self._found = found
        by_name = {layer.name: layer for layer in once}
        stack = attention_stack(once)
        if self.auto:
            if not stack.layers:
                crossing = [plain_name(layer.name) for layer in once]
                raise ValueError(
                    f"AttentionCallback: {model} has cross-attention layers only ({crossing}); name the ones to show "
                    "in layers=[...] and pass rollout=False."
                )
            self.layers = [plain_name(stack.layers[-1])]
        shown = []
        for name in self.layers:
            real = module_name(pl_module, name) or name
            if real not in by_name:
                if any(layer.name == real for layer in found):
                    raise ValueError(
                        f"AttentionCallback: layer {name!r} computes attention more than once in a forward pass of "
                        f"the probe inputs; attention layers that compute it once: {[plain_name(n) for n in by_name]}."
                    )
                raise ValueError(
                    f"AttentionCallback: layer {name!r} is a {type(get_module(pl_module, name)).__name__}, not an "
                    "attention layer: it computes no attention weights in a forward pass of the probe inputs (name "
                    "the module that does, e.g. BERT's attention.self, not its block). Attention layers of this "
                    f"model: {[plain_name(layer.name) for layer in found]}."
                )
            shown.append(real)
        if self.rollout and stack.refusal is not None:
            raise ValueError(
                f"AttentionCallback: attention rollout is not defined for {model}: {stack.refusal} Pass rollout=False "
                "(the attention maps of the layers are shown without it)."
            )
        self._rollout_layers = list(stack.layers) if self.rollout else []
        wanted = {*stack.layers, *shown}  # the encoder's layers (rollout, entropy) and the shown ones
        self._ran = [layer.name for layer in once if layer.name in wanted]
        # the queries are the tokens; keys may add a learnt bias key or a zero key at the end (bias_k, add_zero_attn)
        used = {
            layer.name: (layer.queries, layer.keys)
            for layer in once
            if layer.name in shown or layer.name in self._rollout_layers
        }
        tokens = {queries for queries, _ in used.values()}
        extra = [plain_name(name) for name, (queries, keys) in used.items() if keys != queries]
        modules = dict(pl_module.named_modules())
        other = [name for name, (queries, keys) in used.items() if keys != queries + _extra_keys(modules[name])]
        if len(tokens) > 1 or other:
            raise ValueError(
                "AttentionCallback lays the attention of the layers on one token sequence, but their weights have "
                f"(queries, keys) {used}: layers over other sequences (cross-attention with another length, pooling "
                "by attention, another stage) cannot be shown with them. Name layers over the input tokens in "
                "layers=[...] (and pass rollout=False, which runs through the encoder's layers)."
            )
        if self.rollout and any(name in extra for name in map(plain_name, self._rollout_layers)):
            raise ValueError(
                f"AttentionCallback: the attention layers {extra} attend to keys beyond the tokens (bias_k or "
                "add_zero_attn), so rollout, which multiplies token-to-token attention through the layers, is not "
                "defined for them. Pass rollout=False."
            )
        windows = {name: TokenGrid(0, *by_name[name].grid) for name in used if by_name[name].grid is not None}
        self._layout(probe.inputs, tokens.pop(), {**windows, **token_grids(trace)})

    def _layout(self, inputs: Tensor, count: int, grids: dict[str, TokenGrid]) -> None:
        """How ``count`` tokens lie on the inputs: a patch grid for images, one token per position otherwise."""
        self._grid, self._count = None, count
        if inputs.ndim == 4:
            grid = next((g for g in grids.values() if g.prefix + g.height * g.width == count), None)
            if grid is None:
                raise ValueError(
                    f"AttentionCallback: cannot lay the {count} tokens of the attention layers on the image inputs "
                    f"{tuple(inputs.shape[1:])}: no patch grid of the model has that many tokens (plus at most "
                    f"{MAX_PREFIX_TOKENS} class or register tokens)."
                )
            self._grid, self._prefix = grid, grid.prefix
        else:
            length = inputs.shape[-1]
            self._prefix = count - length
            if not 0 <= self._prefix <= MAX_PREFIX_TOKENS:
                raise ValueError(
                    f"AttentionCallback: the attention layers see {count} tokens, but the inputs have {length} "
                    "positions; the callback lays one token on each input position (after up to "
                    f"{MAX_PREFIX_TOKENS} leading class tokens). Models that merge positions into patches of a "
                    "sequence are not supported yet."
                )
        if self.query == "auto":  # a causal language model reads its next token at its last one
            self._query = 0 if self._prefix > 0 else "last" if self._call and self._call.next_token else "mean"
        elif self.query in ("mean", "last"):
            self._query = self.query
        else:
            if self.query >= count:
                raise ValueError(f"AttentionCallback: query={self.query} but the layers see {count} tokens.")
            self._query = int(self.query)

    def _token_weights(self, real: Tensor | None, inputs: Tensor) -> Tensor:
        """(B, tokens) 1 for each token the layers see that is not padding (leading tokens included), else 0;
        ``real``: (B, T) bool at the input tokens, or None (no padding)."""
        weights = torch.ones(inputs.shape[0], self._count, device=inputs.device)
        if real is not None:
            weights[:, self._prefix :] = real.float()
        return weights

    def _query_weights(self, real: Tensor, inputs: Tensor) -> Tensor:
        """(B, tokens) weight of each query token in the attention shown: one-hot at the chosen token (the last
        real one for ``"last"``), or the real tokens (``real``, from :meth:`_token_weights`) for the mean."""
        if self._query == "mean":
            return real
        if self._query == "last":  # the last token that is not padding (padding at the end)
            index = (real.cumsum(dim=1) * real).argmax(dim=1)
        else:
            index = torch.full((inputs.shape[0],), int(self._query), device=inputs.device)
        return torch.nn.functional.one_hot(index, self._count).float()

    def _query_rows(self, weights: Tensor, queries: Tensor) -> Tensor:
        """(B, heads, keys): the attention of the query token, or the mean over the (non-padding) queries."""
        q = queries[:, None, :, None]
        return (weights * q).sum(dim=2) / q.sum(dim=2).clamp_min(1e-12)

    def _to_map(self, rows: Tensor, inputs: Tensor, real: Tensor | None = None) -> Tensor:
        """Attention over the keys (B, ..., K) as maps over the inputs: (B, ..., H, W) for images, (B, ..., T)
        with zero at the padding (``real``: (B, T) bool, True at the real tokens).

        The leading class or register tokens and any keys after the tokens (bias_k, add_zero_attn) are left out.
        """
        patches = rows[..., self._prefix : self._count]
        if self._grid is None:
            if real is not None:
                pad = ~real.reshape(inputs.shape[0], *([1] * (patches.ndim - 2)), -1)
                patches = patches.masked_fill(pad, 0.0)
            return patches
        lead = patches.shape[:-1]
        grid = patches.reshape(-1, 1, self._grid.height, self._grid.width)
        size = tuple(inputs.shape[-2:])
        grid = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        return grid.reshape(*lead, *size)

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        shown = [module_name(pl_module, name) or name for name in self.layers]
        padding = self._real_tokens(pl_module, inputs)  # the attention mask the model receives, or the padding id
        real = self._token_weights(padding, inputs)
        queries = self._query_weights(real, inputs)

        def reduce(weights: Tensor) -> dict[str, Tensor]:  # in each layer's hook: keep only what is shown
            if weights.shape[-2] != self._count:  # a layer over another sequence (not shown): its entropy only
                return {"entropy": attention_entropy(weights)}
            kept = {"rows": self._query_rows(weights, queries), "entropy": attention_entropy(weights, real)}
            if self.rollout:  # only the rollout layers' are used
                kept["fused"] = fuse_heads(weights, self.head_fusion)
            return kept

        records, output = capture_attention(pl_module, inputs, self._ran, reduce=reduce)
        scores = scores_from_output(output, self.output_transform)
        maps: dict[str, Tensor] = {}
        titles: dict[str, str] = {}
        extra: dict[str, Tensor] = {}
        scalars: dict[str, float] = {}
        for layer, name in zip(self.layers, shown, strict=True):
            rows = records[name]["rows"]
            maps[layer] = self._to_map(rows.mean(dim=1), inputs, padding)
            titles[layer] = f"{short_layer_name(layer)}\nmean of heads"
            if self.heads:
                extra[layer] = self._to_map(rows[:, :MAX_HEADS_SHOWN], inputs, padding)
        entropies = torch.stack([records[name]["entropy"].mean() for name in self._ran]).tolist()  # one transfer
        scalars.update({f"{plain_name(name)}/entropy": value for name, value in zip(self._ran, entropies, strict=True)})
        if self.rollout:
            fused = [records[name]["fused"] for name in self._rollout_layers]
            rollout = attention_rollout(fused, residual=self.residual)
            maps["rollout"] = self._to_map(self._query_rows(rollout[:, None], queries)[:, 0], inputs, padding)
            titles["rollout"] = "rollout" + (f"\n{self.head_fusion} of heads" if self.head_fusion != "mean" else "")
        return Explanation(
            maps=maps,
            scores=scores,
            target=resolve_target(None, scores.detach(), self.output_task),
            scalars=scalars,
            titles=titles,
            extra=extra,
        )

    def _display_floor(self, inputs: Tensor) -> Tensor:
        """Attention is a share of one: each sample's maps are drawn on a scale of at least twice the uniform share
        (1 / positions), so attention spread evenly shows at half strength, not as full colour."""
        if self._grid is not None:
            positions = torch.full((inputs.shape[0],), float(self._grid.height * self._grid.width))
        elif is_token_input(inputs):  # the pictures' ids: -1 at the padding the attention mask marks
            shown = (inputs >= 0) & (inputs != (-1 if self.pad_id is None else self.pad_id))
            positions = shown.sum(dim=1).float().clamp_min(1)
        else:
            positions = torch.full((inputs.shape[0],), float(inputs.shape[-1]))
        return 2.0 / positions

    def _log_grids(self, trainer: pl.Trainer, picture: _GridData, step: int) -> None:
        super()._log_grids(trainer, picture, step)
        for layer, heads in picture.extra.items():
            log_image(trainer, f"interp_{self.name}/{layer}/heads", self._heads_image(picture, layer, heads), step)

    def _heads_image(self, picture: _GridData, layer: str, heads: Tensor) -> np.ndarray:
        """The first samples' attention per head of ``layer``: (samples, heads) tiles, or lines of tokens."""
        count = min(self.head_samples, heads.shape[0])
        inputs = picture.inputs[:count]
        titles = [f"head {h}" for h in range(heads.shape[1])]
        drawn = self._rows_image(
            inputs,
            {text: heads[:count, h] for h, text in enumerate(titles)},
            [f"#{i}" for i in range(count)],
            title=f"{short_layer_name(layer)}: attention per head",
        )
        if drawn is not None:
            return drawn
        columns = [list(input_to_rgb(inputs))]
        floor = self._display_floor(inputs)
        columns += [map_tiles(inputs, heads[:count, h], cmap=self.cmap, floor=floor) for h in range(heads.shape[1])]
        tiles = [list(row) for row in zip(*columns, strict=True)]
        return render_grid(
            tiles,
            column_titles=["input", *titles],
            row_labels=[f"#{i}" for i in range(count)],
            title=f"{short_layer_name(layer)}: attention per head",
        )
