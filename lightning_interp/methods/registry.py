"""Every attribution method, declared once: what it is, what it needs, how to call it.

The callbacks, the contract tests and the benchmarks read this registry;
nothing else keeps a list of methods. ``attribute(name, model, inputs, target,
**options)`` calls any of them; ``available_methods()`` lists them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_interp.methods._core import Target
from lightning_interp.methods.attribution import gradient, input_x_gradient, integrated_gradients, smoothgrad
from lightning_interp.methods.deeplift import deeplift
from lightning_interp.methods.gradcam import (
    cam,
    eigen_cam,
    grad_cam,
    grad_cam_plus_plus,
    hires_cam,
    layer_cam,
    score_cam,
    xgrad_cam,
)
from lightning_interp.methods.lrp import lrp
from lightning_interp.methods.modified import deconvnet, guided_backprop
from lightning_interp.methods.perturbation import gradient_shap, kernel_shap, lime, occlusion

__all__ = ["FAMILIES", "METHODS", "MethodSpec", "attribute", "available_methods", "method_spec"]

FAMILIES = ("gradient", "modified backward", "perturbation", "cam")


@dataclass(frozen=True)
class MethodSpec:
    """What one attribution method is and needs.

    Attributes:
        name: the canonical snake_case name (equal to the function's name).
        family: ``"gradient"``, ``"modified backward"``, ``"perturbation"`` or ``"cam"``.
        function: ``fn(model, inputs, target, **options)`` (CAM methods: ``fn(model, inputs, target, layer, ...)``).
        title: a short column title for pictures (a line break where one line would be too wide).
        needs_layer: takes ``layer=`` and returns (B, H, W) maps (else maps shaped like the inputs).
        stochastic: draws random numbers from a ``generator=`` it accepts (the callbacks always pass their own;
            a direct call without one draws from the global RNG).
        shared_pass: can be served from the one forward and backward of ``attribution_pass`` that several
            methods share (the input gradient, or a layer's activation and gradient).
        scalars: extra scalars a callback logs for it (tag suffixes).
        sensitivity: returns how sensitive the score is to each input value (a gradient, guided or not), not each
            value's contribution to it (input × gradient, integrated gradients, LRP relevance, ...): at an
            embedding, a token's score is then the norm of its vector rather than its sum.
        cost: forward and backward passes per probe sample at the default options (for the docs).
        reference: the implementation its tests compare it with.
    """

    name: str
    family: str
    function: Callable[..., Tensor]
    title: str
    needs_layer: bool = False
    stochastic: bool = False
    shared_pass: bool = False
    scalars: tuple[str, ...] = ()
    sensitivity: bool = False
    cost: str = ""
    reference: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the function takes besides model, inputs, target (and layer)."""
        skip = {"model", "inputs", "target", "layer"}
        return tuple(name for name in inspect.signature(self.function).parameters if name not in skip)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "gradient", "gradient", gradient, "gradient", shared_pass=True, sensitivity=True,
            cost="1 forward + 1 backward", reference="Captum Saliency (abs=False)",
        ),
        MethodSpec(
            "input_x_gradient", "gradient", input_x_gradient, "input × grad", shared_pass=True,
            cost="1 forward + 1 backward", reference="Captum InputXGradient",
        ),
        MethodSpec(
            "smoothgrad", "gradient", smoothgrad, "SmoothGrad", stochastic=True, sensitivity=True,
            cost="n_samples (16) forwards + backwards", reference="Captum NoiseTunnel(Saliency), same noise",
        ),
        MethodSpec(
            "integrated_gradients", "gradient", integrated_gradients, "integ. grads",
            scalars=("completeness_error",), cost="n_steps (32) forwards + backwards",
            reference="Captum IntegratedGradients",
        ),
        MethodSpec(
            "gradient_shap", "gradient", gradient_shap, "GradientSHAP", stochastic=True,
            cost="n_samples (16) forwards + backwards", reference="Captum GradientShap, same draws",
        ),
        MethodSpec(
            "guided_backprop", "modified backward", guided_backprop, "guided\nbackprop", sensitivity=True,
            cost="1 forward + 1 backward", reference="Captum GuidedBackprop",
        ),
        MethodSpec(
            "deconvnet", "modified backward", deconvnet, "deconvnet", sensitivity=True,
            cost="1 forward + 1 backward", reference="Captum Deconvolution",
        ),
        MethodSpec(
            "lrp", "modified backward", lrp, "LRP",
            cost="1 forward + 1 backward (+ 1 to 5 layer recomputations per layer, by rule)",
            reference="zennit rules and composites",
        ),
        MethodSpec(
            "deeplift", "modified backward", deeplift, "DeepLIFT", scalars=("completeness_error",),
            cost="1 forward + 1 backward of 2 samples (input and baseline)", reference="Captum DeepLift",
        ),
        MethodSpec(
            "occlusion", "perturbation", occlusion, "occlusion",
            cost="1 + one forward per window (65 for the default 8 x 8 grid), no backward",
            reference="Captum Occlusion",
        ),
        MethodSpec(
            "lime", "perturbation", lime, "LIME", stochastic=True,
            cost="n_samples + 1 (129) forwards, no backward", reference="Captum Lime, same coalitions",
        ),
        MethodSpec(
            "kernel_shap", "perturbation", kernel_shap, "KernelSHAP", stochastic=True,
            cost="n_samples + 2 (130) forwards, no backward", reference="Captum KernelShap, same coalitions",
        ),
        MethodSpec(
            "grad_cam", "cam", grad_cam, "Grad-CAM", needs_layer=True, shared_pass=True,
            cost="1 forward + 1 backward", reference="Captum LayerGradCam, pytorch-grad-cam GradCAM",
        ),
        MethodSpec(
            "grad_cam_plus_plus", "cam", grad_cam_plus_plus, "Grad-CAM++", needs_layer=True, shared_pass=True,
            cost="1 forward + 1 backward", reference="pytorch-grad-cam GradCAMPlusPlus",
        ),
        MethodSpec(
            "xgrad_cam", "cam", xgrad_cam, "XGrad-CAM", needs_layer=True, shared_pass=True,
            cost="1 forward + 1 backward", reference="pytorch-grad-cam XGradCAM",
        ),
        MethodSpec(
            "layer_cam", "cam", layer_cam, "Layer-CAM", needs_layer=True, shared_pass=True,
            cost="1 forward + 1 backward", reference="pytorch-grad-cam LayerCAM",
        ),
        MethodSpec(
            "hires_cam", "cam", hires_cam, "HiRes-CAM", needs_layer=True, shared_pass=True,
            cost="1 forward + 1 backward", reference="pytorch-grad-cam HiResCAM",
        ),
        MethodSpec(
            "eigen_cam", "cam", eigen_cam, "Eigen-CAM", needs_layer=True, shared_pass=True,
            cost="1 forward (an SVD per sample)", reference="pytorch-grad-cam EigenCAM (sign fixed)",
        ),
        MethodSpec(
            "score_cam", "cam", score_cam, "Score-CAM", needs_layer=True,
            cost="1 forward per channel of the layer (512 for a ResNet's layer4)",
            reference="pytorch-grad-cam ScoreCAM",
        ),
        MethodSpec(
            "cam", "cam", cam, "CAM", needs_layer=True,
            cost="1 forward (needs a global-average-pooled linear head)", reference="torchcam CAM",
        ),
    )
}  # fmt: skip
"""Every registered method by name."""


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``, with the known names in the error otherwise.

    Example:
        >>> method_spec("grad_cam").family
        'cam'
    """
    if name not in METHODS:
        raise ValueError(f"Unknown attribution method {name!r}; the registered ones are: {', '.join(METHODS)}.")
    return METHODS[name]


def check_method_options(
    name: str, options: Mapping[str, object] | None, *, managed: Sequence[str] = (), layer: bool = True
) -> MethodSpec:
    """The :class:`MethodSpec` of ``name`` after checking that it takes every option in ``options`` (``layer`` for a
    CAM method, unless ``layer=False``: the caller sets the layers itself); ``managed`` options, set by the caller
    itself, are refused too. Raises with the accepted ones.

    Example:
        >>> check_method_options("grad_cam", {"layer": "net.4"}).needs_layer
        True
    """
    spec = method_spec(name)
    accepted = [option for option in spec.options if option not in managed]
    if spec.needs_layer and layer:
        accepted = ["layer", *accepted]
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        takes = f"its options are: {', '.join(accepted)}" if accepted else "it takes none here"
        raise TypeError(f"{name} takes no option(s) {unknown} here; {takes}.")
    return spec


def available_methods(family: str | None = None) -> dict[str, str]:
    """The registered methods, name -> family, optionally of one family only.

    Example:
        >>> list(available_methods("gradient"))
        ['gradient', 'input_x_gradient', 'smoothgrad', 'integrated_gradients', 'gradient_shap']
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    return {name: spec.family for name, spec in METHODS.items() if family in (None, spec.family)}


def attribute(
    method: str,
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    layer: nn.Module | str | None = None,
    **options: object,
) -> Tensor:
    """Explain ``inputs`` with the registered method ``method``.

    Input-attribution methods return attributions shaped like ``inputs``;
    CAM methods take ``layer=`` (a module or dotted name; None picks the
    automatic layer) and return (B, H, W) maps, unnormalised, upsampled to the
    input size. Options are the method's own keyword arguments
    (``METHODS[method].options``).

    Args:
        method: a name from :func:`available_methods`.
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        layer: for CAM methods, the layer to explain.
        **options: the method's options, e.g. ``n_samples=8`` for SmoothGrad.

    Raises:
        ValueError: an unknown method, or ``layer`` given to a method without one.
        TypeError: an option the method does not take (the message lists those it does).

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> attribute("gradient", net, x).shape, attribute("grad_cam", net, x, layer="1").shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 8]))
    """
    spec = method_spec(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"{method} takes no option(s) {unknown}; its options are: {', '.join(spec.options)}.")
    if spec.needs_layer:
        return spec.function(model, inputs, target, layer, **options)
    if layer is not None:
        raise ValueError(f"{method} attributes to the input and takes no layer; CAM methods take one.")
    return spec.function(model, inputs, target, **options)
