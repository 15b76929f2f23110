"""The ``layer_layout`` option of the callbacks that read 4-D layers (Grad-CAM, activation maps): checked at
construction, and resolved per layer at fit start from what the model trace tells
(:func:`~lightning_interp.methods.layer_layouts`)."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_interp.methods import (
    LAYER_LAYOUTS,
    ChannelsLayout,
    LayerLayout,
    ModelTrace,
    TokenReshape,
    channels_last_to_first,
)

__all__ = ["check_layer_layout", "declared_layout", "grid_shape", "layout_reshape"]


def layout_reshape(
    name: str,
    trace: ModelTrace,
    layouts: dict[str, ChannelsLayout | None],
    *,
    declared: LayerLayout = "auto",
    owner: str,
    shown: str | None = None,
) -> TokenReshape | None:
    """How the 4-D output of module ``name`` becomes (B, C, h, w): :func:`channels_last_to_first` for a channels-last
    one, None for a channels-first one; by ``declared``, or detected (``layouts``) when it is ``"auto"``.

    Raises:
        ValueError: the detected layout cannot be told (the message names ``layer_layout``), or ``declared`` names a
            layout for an output that is not 4-D.
    """
    shown = shown or name
    shape = trace.shapes.get(name, ())
    if declared not in LAYER_LAYOUTS:
        raise ValueError(f"{owner}: layer_layout for {shown!r} must be one of {LAYER_LAYOUTS}, got {declared!r}.")
    if len(shape) != 4:
        if declared != "auto":
            raise ValueError(
                f"{owner}: layer_layout={declared!r} for layer {shown!r}, but its output is {tuple(shape[1:])} per "
                "sample, not a 4-D (channels, h, w) or (h, w, channels) map. Give a layout only for 4-D layers."
            )
        return None
    layout = layouts.get(name) if declared == "auto" else declared
    if layout is None:
        raise ValueError(
            f"{owner}: cannot tell whether layer {shown!r}, whose output is {tuple(shape[1:])} per sample, is "
            "(channels, h, w) or channels-last (h, w, channels) (as Swin's and ConvNeXt blocks' norms give): "
            "neither its class, its input nor its sub-modules say, and reading it the wrong way turns rows into "
            f"channels. Pass layer_layout='channels_last' or 'channels_first' (or {{{shown!r}: ...}}) to say which."
        )
    return channels_last_to_first if layout == "channels_last" else None


def grid_shape(shape: tuple[int, ...], reshape: TokenReshape | None) -> tuple[int, ...]:
    """The (B, C, h, w) shape of a 4-D output read through ``reshape`` (None or :func:`channels_last_to_first`)."""
    return (shape[0], shape[3], shape[1], shape[2]) if reshape is channels_last_to_first else tuple(shape)


def check_layer_layout(layer_layout: object, layers: list[str], owner: str) -> None:
    """Check a callback's ``layer_layout`` argument against its named ``layers`` (``[]``: ``"auto"``)."""
    if isinstance(layer_layout, str):
        if layer_layout not in LAYER_LAYOUTS:
            raise ValueError(
                f"{owner}: layer_layout must be one of {LAYER_LAYOUTS} or a {{layer: layout}} dict, "
                f"got {layer_layout!r}."
            )
        if layer_layout != "auto" and not layers:
            raise ValueError(
                f"{owner}: layer_layout={layer_layout!r} says how named layers are laid out, but the layers are "
                "chosen automatically (their layout is then detected). Name the layers, or leave layer_layout='auto'."
            )
        return
    if isinstance(layer_layout, Mapping):
        bad = {
            key: value for key, value in layer_layout.items() if value not in LAYER_LAYOUTS or not isinstance(key, str)
        }
        if bad:
            raise ValueError(
                f"{owner}: layer_layout maps layer names to one of {LAYER_LAYOUTS}, e.g. "
                f"{{'net.norm': 'channels_last'}}; got {bad}."
            )
        unknown = sorted(set(layer_layout) - set(layers))
        if unknown:
            raise ValueError(
                f"{owner}: layer_layout names {unknown}, which are not among the named layers {layers or 'auto'}. "
                "Give layouts only for layers you name."
            )
        return
    raise TypeError(
        f"{owner}: layer_layout must be 'auto', 'channels_first', 'channels_last' or a {{layer: layout}} dict, got "
        f"{type(layer_layout).__name__}."
    )


def declared_layout(layer_layout: LayerLayout | Mapping[str, LayerLayout], layer: str) -> LayerLayout:
    """The layout a (checked) ``layer_layout`` argument gives ``layer``."""
    return layer_layout if isinstance(layer_layout, str) else layer_layout.get(layer, "auto")
