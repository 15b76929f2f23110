"""GradCAMCallback: Grad-CAM heatmaps of a fixed probe set at every validation epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_interp.callbacks._base import unwrapped
from lightning_interp.callbacks._layouts import check_layer_layout, declared_layout, grid_shape, layout_reshape
from lightning_interp.callbacks._maps import Explanation, LayerMapCallback
from lightning_interp.methods import (
    MANAGED_OPTIONS,
    METHODS,
    Explainer,
    LayerLayout,
    MethodsArg,
    TokenReshape,
    dense_output,
    find_target_layer,
    get_module,
    layer_layouts,
    layers_with_patch_gradient,
    module_name,
    parse_methods,
    plain_name,
    spatial_layers,
    token_grids,
)
from lightning_interp.probe import ProbeSet


class GradCAMCallback(LayerMapCallback):
    """Log Grad-CAM heatmaps (Selvaraju et al. 2017), and any CAM method, of a fixed probe set for one or more layers.

    Every gradient-based CAM method (Grad-CAM, Grad-CAM++, XGrad-CAM,
    Layer-CAM, HiRes-CAM, Eigen-CAM) on every layer comes from one forward and
    one backward pass; Score-CAM and CAM run on their own. At each due
    validation epoch the callback logs, under ``interp_<name>/``:

    - ``maps``: an image grid, one row per probe sample, the input and then one
      overlay per method and layer (upsampled bilinearly to the input size);
    - ``<layer>/concentration``, ``<layer>/stability`` and, with object masks,
      ``<layer>/localization`` (share of the map's mass inside the mask) and
      ``<layer>/pointing_game`` (whether the peak lies inside the mask), for
      Grad-CAM; ``<layer>/<method>/...`` for the other methods;
    - at fit end, ``<layer>/evolution`` (``<layer>/<method>/evolution``): the
      maps of a few samples across epochs.

    Args:
        layer: ``"auto"`` (the last module whose output still has spatial
            extent, found by a dry forward; for a vision transformer the last
            one whose patch tokens get a gradient, e.g. the last block's first
            norm), a dotted module name such as ``"features.6"``, or a list of
            names.
        methods: CAM methods of the registry
            (:func:`~lightning_interp.methods.available_methods` ``("cam")``):
            a name, a list of names, or a ``{name: {option: value}}`` mapping,
            e.g. ``{"grad_cam": None, "score_cam": {"internal_batch_size": 128}}``.
            Every method runs at every layer, through one
            :class:`~lightning_interp.methods.Explainer` built at fit start.
        relu: keep only positive evidence, as in the paper.
        reshape: turns token outputs (B, N, C) of a vision transformer into
            (B, C, h, w). Not needed for torchvision's and timm's layouts
            (class, distillation and register tokens before a patch grid),
            which are read from the model. It applies to token layers only;
            a 4-D layer's layout is ``layer_layout``'s.
        layer_layout: how the 4-D outputs of the named layers are laid out:
            ``"auto"`` (detected from the model, see
            :func:`~lightning_interp.methods.model.tokens.layer_layouts`:
            Swin's stages and norms, the norms and MLPs inside ConvNeXt blocks
            are channels-last), ``"channels_first"`` (batch, channels, h, w),
            ``"channels_last"`` (batch, h, w, channels: read permuted), or a
            ``{layer: layout}`` dict for some of them. A layer whose layout
            cannot be detected is refused until it is named here; with
            ``layer="auto"`` such layers are passed over, and this must stay
            ``"auto"``.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: shared options of :class:`~lightning_interp.callbacks.MapCallback`
            (``num_samples``, ``every_n_epochs``, ``target``, ``probe``, ...).

    Example:
        >>> GradCAMCallback(layer=["layer3", "layer4"]).layers
        ['layer3', 'layer4']
    """

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        layer: str | Sequence[str] = "auto",
        *,
        methods: MethodsArg = ("grad_cam",),
        relu: bool = True,
        reshape: TokenReshape | None = None,
        layer_layout: LayerLayout | Mapping[str, LayerLayout] = "auto",
        name: str = "gradcam",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self._choose_layers(layer, "layer")
        check_layer_layout(layer_layout, self.layers, "GradCAMCallback")
        self.layer_layout = dict(layer_layout) if isinstance(layer_layout, Mapping) else layer_layout
        parsed = parse_methods(
            methods,
            allowed=[name for name, spec in METHODS.items() if spec.family == "cam"],  # as declared now
            owner="GradCAMCallback",
            elsewhere="SaliencyCallback(methods=...)",
            layer_option=False,
            managed=(*MANAGED_OPTIONS, "relu", "reshape"),
        )
        self.methods = tuple(parsed)
        self.method_options = {method: options for method, options in parsed.items() if options}
        self.relu = relu
        self.reshape = reshape
        self._reshapes: dict[str, TokenReshape | None] = {}  # per layer: to (B, C, h, w) (tokens, channels-last)
        self._tokens: dict[str, bool] = {}  # per layer: whether its output is tokens (B, N, C)

    def _zero_map_reason(self, key: str) -> str:
        cause = (
            "Grad-CAM keeps positive evidence only (relu=True), and the gradient-weighted activations of this layer "
            "are zero or negative at every position of every probe sample (relu=False shows the signed map)"
            if self.relu
            else "the layer's activations or their gradients are zero"
        )
        if not self._tokens.get(key.split("/")[0], False):
            return f"{cause}."
        return (
            f"{cause}; or the layer's patch tokens get no gradient at all (in a vision transformer whose head reads "
            "the class token, no patch token after the last block's attention reaches the score: choose the last "
            "block's first norm, which layer='auto' picks). A head initialised to zero (torchvision's ViT) gives "
            "zero maps until training moves it."
        )

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for name in self.layers:
            get_module(pl_module, name)

    def _before_the_segmentation_head(self, chosen: str, found: dict[str, tuple[int, ...]], output: object) -> str:
        """For a segmentation model, the automatic layer is the last spatial one; when that is the classifier head
        (its channels are the classes: Grad-CAM of the logits themselves), the last spatial layer before the head's
        class-score layers instead (the features the head reads)."""
        dense = dense_output(output) if self.segmentation is not None else None
        names = list(found)
        real = next((name for name in names if plain_name(name) == chosen), None)
        if dense is None or real is None or found[real][1] != dense.shape[1]:
            return chosen
        earlier = [name for name in names[: names.index(real)] if found[name][1] != dense.shape[1]]
        return plain_name(earlier[-1]) if earlier else chosen

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        super()._prepare(trainer, pl_module, probe)
        example = self._example_input(pl_module, probe)
        trace = self._trace(trainer, pl_module, example)
        found = dict(spatial_layers(pl_module, None, reshape=self.reshape, trace=trace, channels_last=True))
        grids = token_grids(trace)
        layouts = layer_layouts(pl_module, trace)
        if self.auto:
            if not found:
                raise ValueError(
                    f"GradCAMCallback(layer='auto') found no sub-module of {type(unwrapped(pl_module)).__name__} "
                    f"whose output has spatial extent for inputs of shape {tuple(probe.inputs.shape[1:])}. Grad-CAM "
                    "needs a (batch, channels, h, w) layer with h or w > 1: name one with layer='...', pass "
                    "reshape=... for token outputs, or use SaliencyCallback instead."
                )
            two = self._device_inputs(trainer, pl_module, probe.inputs[:2]).to(example.dtype)
            self.layers = [  # named as the user would, also for a compiled network ('_orig_mod' left out)
                plain_name(
                    find_target_layer(
                        self._explained(pl_module, probe.subset(two.shape[0])),
                        two,
                        reshape=self.reshape,
                        trace=trace,
                        target=self._target_for(probe.subset(min(2, len(probe))), two.device),
                        output_transform=self.output_transform,
                        task=self.output_task,
                        channels_last=True,
                    )
                )
            ]
            self.layers = [self._before_the_segmentation_head(self.layers[0], found, trace.output)]
        real = {name: module_name(pl_module, name) or name for name in self.layers}  # compiled: under '_orig_mod'
        reshapes: dict[str, TokenReshape | None] = {}
        for name in self.layers:
            shape = trace.shapes.get(real[name], ())
            declared = declared_layout(self.layer_layout, name)
            if len(shape) == 3 and declared == "auto":
                reshapes[name] = self.reshape or grids.get(real[name])
            elif trace.calls.get(real[name], 0) == 1:  # a 4-D layer: permuted when channels-last; refused if unknown
                reshapes[name] = layout_reshape(
                    real[name], trace, layouts, declared=declared, owner="GradCAMCallback", shown=name
                )
            spatial = (
                real[name] in found
                if declared == "auto"
                else trace.calls.get(real[name], 0) == 1 and max(grid_shape(shape, reshapes.get(name))[-2:]) > 1
            )
            if not spatial and trace.calls.get(real[name], 0) == 0:
                raise ValueError(
                    f"GradCAMCallback cannot use layer {name!r}: it does not run in a forward pass of the model on "
                    "its probe inputs (a branch the model does not use, or one of an input the probe does not hold). "
                    f"Layers that qualify (deepest last): {', '.join(list(found)[-6:]) or 'none'}."
                )
            if not spatial:
                raise ValueError(
                    f"GradCAMCallback cannot use layer {name!r}: its output is not a (batch, channels, h, w) map "
                    "with spatial extent (nor vision-transformer tokens of a known layout; pass reshape=... for "
                    "others), or the module runs more than once per forward pass. Layers that qualify (deepest "
                    f"last): {', '.join(list(found)[-6:]) or 'none'}."
                )
        self._refuse_layers_blind_to_the_first_input(trainer, pl_module, probe, self.layers, automatic=self.auto)
        self._tokens = {name: len(trace.shapes[real[name]]) == 3 for name in self.layers}
        self._reshapes = reshapes
        tokens = {real[name]: self._reshapes[name] for name in self.layers if self._tokens[name]}
        if tokens and not self.auto:  # a named token layer whose patch tokens never reach the score: refuse now
            two = self._device_inputs(trainer, pl_module, probe.inputs[:2]).to(example.dtype)
            target = self._target_for(probe.subset(min(2, len(probe))), two.device)
            alive = layers_with_patch_gradient(
                self._explained(pl_module, probe.subset(two.shape[0])),
                two,
                tokens,
                target=target,
                output_transform=self.output_transform,
                task=self.output_task,
            )
            dead = [name for name in self.layers if self._tokens[name] and real[name] not in alive]
            if dead:
                suggestion = find_target_layer(
                    self._explained(pl_module, probe.subset(two.shape[0])),
                    two,
                    reshape=self.reshape,
                    trace=trace,
                    target=target,
                    output_transform=self.output_transform,
                    task=self.output_task,
                    channels_last=True,
                )
                raise ValueError(
                    f"GradCAMCallback: the patch tokens of {dead} do not reach the model's score (in a vision "
                    "transformer whose head reads the class token, nothing after the last block's attention does), "
                    f"so every map of them would be zero. Use a layer before that point, e.g. "
                    f"{plain_name(suggestion)!r} (what layer='auto' picks)."
                )

    def explainer(self) -> Explainer:
        """The :class:`~lightning_interp.methods.Explainer` a run calls: every method at every layer (the layers and
        token layouts resolved at fit start), the output kind in force, ``relu`` and ``output_transform``. Its key
        ``f"{method}@{layer}"`` is logged as ``layer`` (Grad-CAM) or ``layer/method``."""
        return Explainer(
            {method: self.method_options.get(method) for method in self.methods},
            layers=self.layers,
            task=self.output_task,
            output_transform=self.output_transform,
            relu=self.relu,
            reshapes={layer: reshape for layer, reshape in self._reshapes.items() if reshape is not None},
        )

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        result = self.explainer()(pl_module, inputs, target)
        maps: dict[str, Tensor] = {}
        titles: dict[str, str] = {}
        several = len(self.methods) > 1
        for method, layer in self._entries():
            key = layer if method == "grad_cam" else f"{layer}/{method}"
            titles[key] = f"{METHODS[method].title}\n{layer}" if several else layer
            maps[key] = result.attributions[f"{method}@{layer}"]
        signed = set() if self.relu else set(maps)
        return Explanation(maps=maps, scores=result.scores, target=result.target, signed=signed, titles=titles)

    def _entries(self) -> list[tuple[str, str]]:
        """(method, layer) of every map, in display order: per method, every layer."""
        return [(method, layer) for method in self.methods for layer in self.layers]
