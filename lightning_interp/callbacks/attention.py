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
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._maps import Explanation, LayerMapCallback, _GridData, is_token_input
from lightning_interp.methods import (
    MAX_PREFIX_TOKENS,
    TokenGrid,
    attention_entropy,
    attention_layers,
    attention_rollout,
    capture_attention,
    fuse_heads,
    get_module,
    is_attention_layer,
    module_name,
    plain_name,
    resolve_target,
    scores_from_output,
    token_grids,
)
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import input_to_rgb, map_tiles, render_grid

MAX_HEADS_SHOWN = 16  # heads drawn in a layer's heads picture (all of them are in the layer's mean)


_ATTENTION_NAMES = ("self_attention", "self_attn", "attention", "attn", "mha")


def short_layer_name(name: str) -> str:
    """A column title for an attention layer: its block's name, without the attention module's own name.

    Example:
        >>> short_layer_name("net.encoder.layers.encoder_layer_1.self_attention"), short_layer_name("net.blocks.3.attn")
        ('layer_1', 'blocks.3')
    """
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in _ATTENTION_NAMES:
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
    the probe samples through the model once, recomputes the attention weights
    of its attention layers inside forward hooks (from each layer's own input
    and projections: also for layers called with ``need_weights=False`` or on
    torch's fused path; the model is not changed, see
    :mod:`lightning_interp.methods.representation.attention`), and logs under ``interp_<name>/``:

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

    Supported attention layers: ``torch.nn.MultiheadAttention`` (in
    ``nn.TransformerEncoderLayer``, torchvision's ``VisionTransformer``, your
    own blocks) and timm's ``Attention`` (timm ViT, DeiT, ...). Attention is not
    explained per class, so there is no ``target`` option.

    Args:
        layers: attention layers to show: ``"auto"`` (the last one that runs)
            or dotted names (``model.named_modules()``). Rollout always runs
            through every attention layer in forward order.
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
        self._ran: list[str] = []  # every attention layer in forward order (the model's own names)
        self._query: int | str = "mean"  # the query in force: a token position, "mean" or "last"
        self._prefix = 0  # leading tokens (class, register) before the ones laid on the input
        self._grid: TokenGrid | None = None  # for images: how the tokens lie on the input
        self._count = 0  # tokens the attention layers see (their queries)

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for name in self.layers:
            module = get_module(pl_module, name)
            if not is_attention_layer(module):
                raise ValueError(
                    f"AttentionCallback: layer {name!r} is a {type(module).__name__}, not an attention layer "
                    "(torch.nn.MultiheadAttention or timm's Attention). Attention layers of this model: "
                    f"{[plain_name(n) for n in attention_layers(pl_module)] or 'none'}."
                )

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        example = self._example_input(pl_module, probe)
        trace = self._trace(trainer, pl_module, example)
        found = attention_layers(pl_module)
        self._ran = [name for name in trace.calls if name in found and trace.calls[name] == 1]
        if not self._ran and found:
            runs = {plain_name(name): trace.calls.get(name, 0) for name in found}
            raise ValueError(
                f"AttentionCallback: the attention layers of {type(pl_module).__name__} do not run exactly once per "
                f"forward pass (times each ran: {runs}): a layer shared across depths (ALBERT-style) or one that "
                "does not run has no single attention map to show. Use SaliencyCallback, GradCAMCallback or the "
                "representation callbacks for this model."
            )
        if not self._ran:
            raise ValueError(
                f"AttentionCallback found no attention layer in {type(pl_module).__name__} (torch.nn.MultiheadAttention"
                ", as in nn.TransformerEncoderLayer and torchvision's VisionTransformer, or timm's Attention). Models "
                "without one can use SaliencyCallback, GradCAMCallback or the representation callbacks."
            )
        if self.auto:
            self.layers = [plain_name(self._ran[-1])]
        for name in self.layers:
            if (module_name(pl_module, name) or name) not in self._ran:
                raise ValueError(
                    f"AttentionCallback: layer {name!r} does not run exactly once in a forward pass of the probe "
                    f"inputs; attention layers that do: {[plain_name(n) for n in self._ran]}."
                )
        two = self._device_inputs(trainer, pl_module, probe.inputs[:2])
        with self._model_context(trainer):  # the recomputation must reproduce each layer's output (once per fit)
            shapes, _ = capture_attention(pl_module, two, self._ran, reduce=lambda w: tuple(w.shape), verify=True)
        # the queries are the tokens; keys may add a learnt bias key or a zero key at the end (bias_k, add_zero_attn)
        shown = [module_name(pl_module, name) or name for name in self.layers]
        used = {name: shape for name, shape in shapes.items() if self.rollout or name in shown}
        tokens = {shape[-2] for shape in used.values()}
        extra = [plain_name(name) for name, shape in used.items() if shape[-1] != shape[-2]]
        modules = dict(pl_module.named_modules())
        other = [name for name, shape in used.items() if shape[-1] != shape[-2] + _extra_keys(modules[name])]
        if len(tokens) > 1 or other:
            raise ValueError(
                "AttentionCallback lays the attention of the layers on one token sequence, but their weights have "
                f"shapes {used} (batch, heads, queries, keys): layers over other sequences (cross-attention, pooling "
                "by attention) cannot be shown with them. Name layers over the input tokens in layers=[...] (and "
                "pass rollout=False, which runs through every layer)."
            )
        if self.rollout and extra:
            raise ValueError(
                f"AttentionCallback: the attention layers {extra} attend to keys beyond the tokens (bias_k or "
                "add_zero_attn), so rollout, which multiplies token-to-token attention through the layers, is not "
                "defined for them. Pass rollout=False."
            )
        self._layout(probe.inputs, tokens.pop(), token_grids(trace))

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
        if self.query == "auto":
            self._query = 0 if self._prefix > 0 else "mean"
        elif self.query in ("mean", "last"):
            self._query = self.query
        else:
            if self.query >= count:
                raise ValueError(f"AttentionCallback: query={self.query} but the layers see {count} tokens.")
            self._query = int(self.query)

    def _real_tokens(self, inputs: Tensor) -> Tensor:
        """(B, tokens) 1 for each token the layers see that is not padding (leading tokens included), else 0."""
        weights = torch.ones(inputs.shape[0], self._count, device=inputs.device)
        if self.pad_id is not None and is_token_input(inputs):
            weights[:, self._prefix :] = (inputs != self.pad_id).float()
        return weights

    def _query_weights(self, inputs: Tensor) -> Tensor:
        """(B, tokens) weight of each query token in the attention shown: one-hot at the chosen token (the last
        real one for ``"last"``), or the real tokens for the mean."""
        real = self._real_tokens(inputs)
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

    def _to_map(self, rows: Tensor, inputs: Tensor) -> Tensor:
        """Attention over the keys (B, ..., K) as maps over the inputs: (B, ..., H, W) for images, (B, ..., T).

        The leading class or register tokens and any keys after the tokens (bias_k, add_zero_attn) are left out.
        """
        patches = rows[..., self._prefix : self._count]
        if self._grid is None:
            if self.pad_id is not None and is_token_input(inputs):
                pad = (inputs == self.pad_id).reshape(inputs.shape[0], *([1] * (patches.ndim - 2)), -1)
                patches = patches.masked_fill(pad, 0.0)
            return patches
        lead = patches.shape[:-1]
        grid = patches.reshape(-1, 1, self._grid.height, self._grid.width)
        size = tuple(inputs.shape[-2:])
        grid = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        return grid.reshape(*lead, *size)

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        shown = [module_name(pl_module, name) or name for name in self.layers]
        queries, real = self._query_weights(inputs), self._real_tokens(inputs)

        def reduce(weights: Tensor) -> dict[str, Tensor]:  # in each layer's hook: keep only what is shown
            if weights.shape[-2] != self._count:  # a layer over another sequence (not shown): its entropy only
                return {"entropy": attention_entropy(weights)}
            kept = {"rows": self._query_rows(weights, queries), "entropy": attention_entropy(weights, real)}
            if self.rollout:
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
            maps[layer] = self._to_map(rows.mean(dim=1), inputs)
            titles[layer] = f"{short_layer_name(layer)}\nmean of heads"
            if self.heads:
                extra[layer] = self._to_map(rows[:, :MAX_HEADS_SHOWN], inputs)
        entropies = torch.stack([records[name]["entropy"].mean() for name in self._ran]).tolist()  # one transfer
        scalars.update({f"{plain_name(name)}/entropy": value for name, value in zip(self._ran, entropies, strict=True)})
        if self.rollout:
            rollout = attention_rollout([records[name]["fused"] for name in self._ran], residual=self.residual)
            maps["rollout"] = self._to_map(self._query_rows(rollout[:, None], queries)[:, 0], inputs)
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
        elif self.pad_id is not None and is_token_input(inputs):
            positions = (inputs != self.pad_id).sum(dim=1).float().clamp_min(1)
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
