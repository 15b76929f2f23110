"""ActivationMapsCallback: what the units of chosen layers respond to, and how many are dead, every validation epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._base import InterpCallback, parse_layer_names, unwrapped
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._layouts import check_layer_layout, declared_layout, grid_shape, layout_reshape
from lightning_interp.methods import (
    LayerLayout,
    TokenReshape,
    activation_maps,
    auto_layers,
    evenly_spaced,
    forward_chunk_size,
    get_module,
    layer_layouts,
    module_name,
    most_active_channels,
    plain_name,
    spatial_layers,
    token_grids,
)
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import colorize, input_to_rgb, render_grid

MAX_ROWS = 16  # probe samples drawn in a layer's grid (the scalars use every probe sample)
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
)
"""Elementwise activation modules: an automatic layer followed by one shows the activation's output instead."""

ChannelsOption = int | Sequence[int] | Mapping[str, Sequence[int]]


@dataclass
class _LayerPicture:
    """What one layer's grid is drawn from (CPU tensors only, for the drawing thread)."""

    layer: str
    maps: Tensor  # (rows, 1 + k, h, w): the channel mean, then the shown channels
    channels: list[int]
    total: int
    dead: list[bool]


class ActivationMapsCallback(InterpCallback):
    """Log the feature maps of chosen layers on a fixed probe set, and how many of their units are dead.

    At each due validation epoch one no-grad forward pass of the probe set
    (eval mode, every module's flag restored, hooks removed afterwards)
    captures each layer's whole output on the model's device. Logged under
    ``interp_<name>/``:

    - ``<layer>/maps``: an image grid per layer, one row per probe sample (up to
      16): the input, the mean over all channels, then the shown channels.
      Each column is scaled by its largest magnitude over the shown samples at
      that epoch (zero is dark; a column with negative values is drawn with a
      diverging map), so rows compare; the column title gives the scale;
    - ``<layer>/dead_fraction``: share of the layer's units (channels) that are
      never positive on any probe sample at any position (after a ReLU they pass
      nothing on);
    - ``<layer>/mean_activation``: mean of every output value;
    - ``<layer>/sparsity``: share of output values that are not positive.

    The shown channels are fixed at the first run (the ``channels`` most active
    on the probe set, by mean activation, or the ones named), kept in the
    checkpoint, so TensorBoard's step slider shows the same units across epochs.

    Args:
        layers: ``"auto"`` (up to ``max_layers`` layers with spatial output
            spread over depth, each shown after its activation function when one
            follows it: for a plain CNN the ReLU outputs of its convolutions),
            a dotted module name or a list of names. A named layer without
            spatial extent (a (B, C) output) gets the scalars but no grid.
        channels: how many of the most active channels to show (an int), the
            same channel indices for every layer (a list), or per layer
            (``{"net.4": [0, 3]}``).
        num_samples: probe samples (the scalars use all of them).
        max_layers: most layers picked by ``"auto"``.
        layer_layout: how the 4-D outputs of the named layers are laid out:
            ``"auto"`` (detected from the model, see
            :func:`~lightning_interp.methods.model.tokens.layer_layouts`:
            Swin's stages and norms, the norms and MLPs inside ConvNeXt blocks
            are channels-last), ``"channels_first"`` (batch, channels, h, w),
            ``"channels_last"`` (batch, h, w, channels: shown permuted, so the
            columns are channels, not rows), or a ``{layer: layout}`` dict for
            some of them. A named layer whose layout cannot be detected is
            refused until it is named here; ``"auto"`` layers skip such layers,
            and this must then stay ``"auto"``.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: ``every_n_epochs``, ``probe``, ``data``,
            ``display``, ``forward_fn`` (see
            :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> ActivationMapsCallback(layers=["net.4", "net.7"], channels=6).channels
        6
    """

    default_cmap = "viridis"  # activations are non-negative maps, not evidence
    display_fields = ("background_drawing", "cmap")

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        layers: str | Sequence[str] = "auto",
        *,
        channels: ChannelsOption = 8,
        num_samples: int = 8,
        max_layers: int = 4,
        layer_layout: LayerLayout | Mapping[str, LayerLayout] = "auto",
        name: str = "activations",
        **kwargs: Any,
    ) -> None:
        names = parse_layer_names(layers, "layers")
        _check_channels(channels, names)
        check_layer_layout(layer_layout, names, "ActivationMapsCallback")
        check_arguments(max_layers=max_layers)
        super().__init__(name=name, num_samples=num_samples, **kwargs)
        self.layers: list[str] = names
        self.auto = not names
        self.channels = channels
        self.max_layers = max_layers
        self.layer_layout = dict(layer_layout) if isinstance(layer_layout, Mapping) else layer_layout
        self._shown: dict[str, list[int]] = {}  # per layer: the channels in the grid, fixed at the first run
        self._reshapes: dict[str, TokenReshape] = {}  # token layers: their grid; channels-last layers: permuted
        self._spatial: dict[str, bool] = {}
        self._chunk = 256

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._shown = {}
        if self.auto:  # chosen again on this fit's model
            self.layers = []

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for layer in self.layers if not self.auto else []:
            get_module(pl_module, layer)
        if isinstance(self.channels, Mapping):
            for layer in self.channels:
                get_module(pl_module, layer)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
        self._chunk = forward_chunk_size(trace, pl_module.device)
        grids = token_grids(trace)
        found = dict(spatial_layers(pl_module, None, trace=trace, channels_last=True))  # shapes as (B, C, h, w)
        layouts = layer_layouts(pl_module, trace)
        self._reshapes = {}
        if self.auto and not self.layers:
            self.layers = [plain_name(name) for name in _automatic_layers(pl_module, trace, found, self.max_layers)]
            model = type(unwrapped(pl_module)).__name__
            if not self.layers:
                raise ValueError(
                    f"ActivationMapsCallback(layers='auto') found no sub-module of {model} whose output has spatial "
                    f"extent for inputs of shape {tuple(probe.inputs.shape[1:])}. Name the layers to read with "
                    "layers=[...] (a (batch, channels) layer gets the dead-unit scalars, no grid)."
                )
        if isinstance(self.channels, Mapping):
            unread = sorted(set(self.channels) - set(self.layers))
            if unread:
                raise ValueError(
                    f"ActivationMapsCallback: channels names layers {unread} that are not among layers={self.layers}."
                )
        for layer in self.layers:
            real = module_name(pl_module, layer) or layer  # a compiled network's layers run under '_orig_mod'
            if trace.calls.get(real, 0) == 0:
                raise ValueError(
                    f"ActivationMapsCallback: layer {layer!r} does not run in a forward pass of the model on its probe "
                    "inputs, so it has no output to show. Name a module that forward() calls."
                )
            if real not in trace.shapes:
                raise ValueError(
                    f"ActivationMapsCallback: layer {layer!r} returns no tensor (an nn.MultiheadAttention returns an "
                    "(output, weights) tuple, for instance). Name a module that returns a tensor."
                )
            if trace.calls[real] > 1:
                raise ValueError(
                    f"ActivationMapsCallback: layer {layer!r} runs {trace.calls[real]} times per forward pass (a "
                    "module used twice, e.g. one ReLU shared by several blocks), so its output is ambiguous. Name a "
                    "module that runs once, e.g. the block that contains it."
                )
            shape = found.get(real, trace.shapes[real])
            declared = declared_layout(self.layer_layout, layer)
            if real in grids and real in found and declared == "auto":
                self._reshapes[layer] = grids[real]
            self._spatial[layer] = real in found
            to_grid = layout_reshape(
                real, trace, layouts, declared=declared, owner="ActivationMapsCallback", shown=layer
            )
            if to_grid is not None:  # channels-last: its channels are the last dimension
                self._reshapes[layer] = to_grid
            if declared != "auto":
                shape = grid_shape(trace.shapes[real], to_grid)
                self._spatial[layer] = max(shape[-2:]) > 1
            count = shape[1] if len(shape) >= 2 else 1
            wanted = self._wanted(layer)
            if wanted is not None:
                bad = [c for c in wanted if c >= count]
                if bad:
                    raise ValueError(
                        f"ActivationMapsCallback: layer {layer!r} has {count} channels (output shape "
                        f"{tuple(shape[1:])} per sample), so channels {bad} do not exist. Use indices below {count}."
                    )

    def _wanted(self, layer: str) -> list[int] | None:
        """The channels named for ``layer``, or None when the most active ones are chosen."""
        if isinstance(self.channels, int):
            return None
        if isinstance(self.channels, Mapping):
            return list(self.channels.get(layer, []))
        return list(self.channels)

    def _maps(self, pl_module: pl.LightningModule, inputs: Tensor) -> dict[str, Tensor]:
        real = {layer: module_name(pl_module, layer) or layer for layer in self.layers}
        reshape = {real[layer]: grid for layer, grid in self._reshapes.items()}
        maps = activation_maps(pl_module, inputs, list(real.values()), reshape=reshape, batch_size=self._chunk)
        return {layer: maps[real[layer]] for layer in self.layers}

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        sample = probe.subset(min(2, len(probe)))
        inputs = self._probe_inputs(trainer, pl_module, sample)
        with self._model_context(trainer):
            maps = self._maps(self._explained(pl_module, sample), inputs)
        shared = [layer for layer, values in maps.items() if values.shape[0] != inputs.shape[0]]
        if shared:
            raise ValueError(
                f"ActivationMapsCallback: layers {shared} give one output for the whole batch of {inputs.shape[0]} "
                "samples, not one per sample (a position bias or table shared by every input); name layers whose "
                "output follows the samples."
            )

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        probe = self.probe
        assert probe is not None
        inputs = self._probe_inputs(trainer, pl_module)
        with self._model_context(trainer):
            maps = self._maps(pl_module, inputs)
        shown_rows = min(len(probe), MAX_ROWS)
        summaries, pictures = [], []
        for layer, values in maps.items():
            units = values.transpose(0, 1).reshape(values.shape[1], -1)  # (C, N * positions)
            dead = units.amax(dim=1) <= 0
            summaries.append(
                torch.stack([dead.float().mean(), units.mean(), (units <= 0).float().mean(), units.isfinite().all()])
            )
            if layer not in self._shown:  # fixed at the first run: the slider then shows the same units
                wanted = self._wanted(layer)
                self._shown[layer] = (
                    wanted if wanted is not None else most_active_channels(values, self.channels).tolist()
                )  # type: ignore[arg-type]
            if self._spatial.get(layer, False):
                chosen = torch.tensor(self._shown[layer], dtype=torch.long, device=values.device)
                rows = values[:shown_rows]
                stack = torch.cat([rows.mean(dim=1, keepdim=True), rows.index_select(1, chosen)], dim=1)
                pictures.append((layer, stack, dead.index_select(0, chosen), dead.numel()))
        numbers, shown_dead, stacks = _to_host(summaries, [p[2] for p in pictures], [p[1] for p in pictures])
        scalars: dict[str, float] = {}
        for layer, (dead_fraction, mean, sparsity, finite) in zip(maps, numbers, strict=True):
            if not finite:
                self._warn(
                    f"ActivationMapsCallback: layer {layer!r} output NaN or inf on the probe set at epoch "
                    f"{trainer.current_epoch}; its mean activation is NaN and its dead-unit count may be wrong."
                )
            prefix = f"interp_{self.name}/{layer}"
            scalars[f"{prefix}/dead_fraction"] = dead_fraction
            scalars[f"{prefix}/mean_activation"] = mean
            scalars[f"{prefix}/sparsity"] = sparsity
        step = logging_step(trainer)
        inputs_shown = probe.inputs[:shown_rows]
        labels = _row_labels(probe, shown_rows, self.class_names)
        for (layer, _, _, total), stack, dead in zip(pictures, stacks, shown_dead, strict=True):
            picture = _LayerPicture(
                layer=layer, maps=stack, channels=list(self._shown[layer]), total=int(total), dead=dead
            )

            def draw(picture: _LayerPicture = picture) -> None:
                image = _layer_grid(picture, inputs_shown, labels, self.cmap)
                log_image(trainer, f"interp_{self.name}/{picture.layer}/maps", image, step)

            self._submit(trainer, draw)
        return scalars

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["layers"] = list(self.layers)
        state["shown_channels"] = {layer: list(channels) for layer, channels in self._shown.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.auto and state_dict.get("layers"):
            self.layers = list(state_dict["layers"])
        self._shown = {layer: list(channels) for layer, channels in state_dict.get("shown_channels", {}).items()}


def _check_channels(channels: object, layers: list[str]) -> None:
    def indices(value: object) -> bool:
        return (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and len(value) > 0
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)
            and len(set(value)) == len(value)
        )

    if isinstance(channels, int) and not isinstance(channels, bool):
        if channels < 1:
            raise ValueError(f"channels must be a positive int (how many to show), got {channels}.")
        return
    if isinstance(channels, Mapping):
        for layer, value in channels.items():
            if not isinstance(layer, str) or not indices(value):
                raise ValueError(
                    "channels as a dict maps layer names to lists of distinct channel indices >= 0, e.g. "
                    f"{{'net.4': [0, 3]}}; got {layer!r}: {value!r}."
                )
        if layers:
            missing = [layer for layer in layers if layer not in channels]
            if missing:
                raise ValueError(f"channels names no channels for layers {missing}; give every layer a list.")
        return
    if not indices(channels):
        raise ValueError(
            "channels must be how many of the most active channels to show (an int), a list of distinct channel "
            f"indices >= 0, or a dict of such lists per layer; got {channels!r}."
        )


def _automatic_layers(model: nn.Module, trace: Any, found: dict[str, tuple[int, ...]], max_layers: int) -> list[str]:
    """Spatial layers spread over depth (the representation layers that keep spatial extent), each moved to the
    activation function that directly follows it, if any."""
    modules = dict(model.named_modules())
    try:
        candidates = [name for name in auto_layers(model, None, max_layers=10_000, trace=trace) if name in found]
    except ValueError:
        candidates = []
    if not candidates:  # no parameterised spatial layer runs once: any spatial layer that is not an activation
        candidates = [name for name in found if not isinstance(modules.get(name), ACTIVATIONS)]
    order = trace.order
    moved = []
    for name in candidates:
        position = order.index(name)
        following = order[position + 1] if position + 1 < len(order) else None
        if (
            following is not None
            and isinstance(modules.get(following), ACTIVATIONS)
            and following in found
            and trace.shapes[following] == trace.shapes[name]
            and not following.startswith(f"{name}.")
        ):
            name = following
        moved.append(name)
    return evenly_spaced(list(dict.fromkeys(moved)), max_layers)


def _to_host(
    summaries: list[Tensor], dead: list[Tensor], stacks: list[Tensor]
) -> tuple[list[list[float]], list[list[bool]], list[Tensor]]:
    """Everything a run shows, in one transfer from the device: the (4,) summaries of each layer as numbers, the
    (k,) dead flags of each layer's shown channels as bools, and the pictures' stacks as float32 host tensors."""
    if not summaries:
        return [], [], []
    parts = [torch.stack(summaries).double().flatten(), *(flags.double() for flags in dead)]
    parts += [stack.double().flatten() for stack in stacks]  # float32 (or lower) values: exact in float64
    host = torch.cat(parts).cpu()
    small = sum(part.numel() for part in parts[: 1 + len(dead)])
    values = host[:small].tolist()  # the numbers, read once
    numbers = [values[4 * i : 4 * i + 4] for i in range(len(summaries))]
    start, flags = 4 * len(summaries), []
    for part in dead:
        flags.append([bool(flag) for flag in values[start : start + part.numel()]])
        start += part.numel()
    pictures = []
    for stack in stacks:
        pictures.append(host[start : start + stack.numel()].reshape(stack.shape).float())
        start += stack.numel()
    return numbers, flags, pictures


def _row_labels(probe: ProbeSet, rows: int, class_names: Sequence[str] | None) -> list[str]:
    labels = probe.labels
    values = (
        labels[:rows].tolist() if labels is not None and labels.ndim == 1 and not labels.is_floating_point() else None
    )  # read once, not per row
    texts = []
    for i in range(rows):
        text = f"#{i}"
        if values is not None:
            value = int(values[i])
            name = class_names[value] if class_names and 0 <= value < len(class_names) else str(value)
            text += f"\nlabel {name}"
        texts.append(text)
    return texts


def _layer_grid(picture: _LayerPicture, inputs: Tensor, labels: list[str], cmap: str) -> np.ndarray:
    """One layer's grid: input, channel mean, then each shown channel; each column on its own scale."""
    images = input_to_rgb(inputs)
    size = images.shape[1:3]
    maps = picture.maps
    if tuple(maps.shape[-2:]) != tuple(size):  # nearest: each unit stays a visible block
        maps = F.interpolate(maps, size=size, mode="nearest")
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    columns = [list(images)]
    titles = ["input"]
    names = ["mean"] + [
        f"ch {c}" + (" (dead)" if dead else "") for c, dead in zip(picture.channels, picture.dead, strict=True)
    ]
    for column, title in enumerate(names):
        values = maps[:, column]
        scale = float(values.abs().max())
        signed = bool((values < 0).any())
        normalised = (values / max(scale, 1e-12)).numpy()
        colors = colorize(normalised, "RdBu_r" if signed else cmap, signed=signed)
        columns.append(list(colors))
        titles.append(f"{title}\nmax {scale:.2g}")
    rows = [[column[i] for column in columns] for i in range(len(images))]
    title = f"{picture.layer}: {len(picture.channels)} of {picture.total} channels"
    return render_grid(rows, column_titles=titles, row_labels=labels, title=title)
