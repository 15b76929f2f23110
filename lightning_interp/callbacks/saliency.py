"""SaliencyCallback: input-attribution maps of a fixed probe set at every validation epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_interp.callbacks._maps import Explanation, MapCallback
from lightning_interp.methods._core import attribution_pass
from lightning_interp.methods.attribution import integrated_gradients, smoothgrad
from lightning_interp.methods.map_metrics import CHANNEL_REDUCTIONS, attribution_to_map
from lightning_interp.probe import ProbeSet

SALIENCY_METHODS = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients")
_TITLES = {
    "gradient": "gradient",
    "input_x_gradient": "input × grad",
    "smoothgrad": "SmoothGrad",
    "integrated_gradients": "integ. grads",
}


class SaliencyCallback(MapCallback):
    """Log saliency maps of a fixed probe set, with scores that track how they change.

    At each due validation epoch (never in the sanity check) the callback
    explains its probe samples with every method in ``methods`` and logs, under
    ``interp/<name>/``:

    - ``maps``: an image grid, one row per probe sample (label, prediction and
      confidence on the left), the input and then one heatmap overlay per method;
    - ``<method>/concentration``: share of attribution mass in the top 10% of pixels;
    - ``<method>/stability``: mean Spearman rank correlation with the maps of
      the previous run (from the second run on);
    - ``<method>/localization`` and ``<method>/pointing_game`` when the probe
      set has object masks;
    - ``integrated_gradients/completeness_error``: mean |sum of attributions -
      (f(x) - f(baseline))| relative to mean |f(x) - f(baseline)|;
    - at fit end, ``<method>/evolution``: the maps of a few samples across epochs.

    ``gradient`` and ``input_x_gradient`` share one forward and one backward.
    SmoothGrad noise comes from the callback's own generator on the model's
    device, re-seeded each run, so the global and CUDA RNGs (and thus
    training) are untouched and epochs are compared on the same noise.

    Args:
        methods: any of ``"gradient"``, ``"input_x_gradient"``, ``"smoothgrad"``,
            ``"integrated_gradients"``.
        channel_reduction: how (B, C, H, W) attributions become one map:
            ``"abs_sum"``, ``"abs_max"`` or ``"sum"`` (signed, diverging colormap).
        smoothgrad_samples: noisy copies per sample for SmoothGrad.
        noise_level: SmoothGrad noise std as a fraction of each input's range.
        ig_steps: integration points for integrated gradients.
        internal_batch_size: most inputs per forward pass for SmoothGrad and IG.
        seed: seed of the callback's SmoothGrad generator.
        name: tag prefix; distinct names let two instances coexist.
        **kwargs: shared options of :class:`~lightning_interp.callbacks._base.MapCallback`
            (``num_samples``, ``every_n_epochs``, ``target``, ``probe``, ...).

    Example:
        >>> callback = SaliencyCallback(methods=("gradient", "smoothgrad"), num_samples=8)
        >>> callback.methods
        ('gradient', 'smoothgrad')
    """

    def __init__(
        self,
        methods: str | Sequence[str] = ("gradient", "integrated_gradients"),
        *,
        channel_reduction: str = "abs_sum",
        smoothgrad_samples: int = 16,
        noise_level: float = 0.15,
        ig_steps: int = 32,
        internal_batch_size: int = 512,
        seed: int = 0,
        name: str = "saliency",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if isinstance(methods, str):
            methods = (methods,)
        unknown = [m for m in methods if m not in SALIENCY_METHODS]
        if unknown or not methods:
            raise ValueError(f"Unknown saliency method(s) {unknown or list(methods)}; choose from {SALIENCY_METHODS}.")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods lists a method twice: {list(methods)}.")
        if channel_reduction not in CHANNEL_REDUCTIONS:
            raise ValueError(f"channel_reduction must be one of {CHANNEL_REDUCTIONS}, got {channel_reduction!r}.")
        for option, value in (("smoothgrad_samples", smoothgrad_samples), ("ig_steps", ig_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive int, got {value!r}.")
        if not isinstance(internal_batch_size, int) or internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be a positive int, got {internal_batch_size!r}.")
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}.")
        self.methods = tuple(methods)
        self.channel_reduction = channel_reduction
        self.smoothgrad_samples = smoothgrad_samples
        self.noise_level = noise_level
        self.ig_steps = ig_steps
        self.internal_batch_size = internal_batch_size
        self.seed = seed

    def _zero_map_reason(self, key: str) -> str:
        return (
            "the gradient of the target score with respect to every input value is zero (saturated outputs, dead "
            "ReLUs, or inputs the score does not depend on)."
        )

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        try:
            super()._trial(trainer, pl_module, probe)
        except Exception as error:
            text = str(error)
            if probe.inputs.is_floating_point() or not any(word in text for word in ("indices", "Long", "scalar type")):
                raise
            # integer pixels work (they are attributed as floats); integer token ids into an embedding do not
            raise ValueError(
                f"SaliencyCallback attributes to the input, and the model failed on its {probe.inputs.dtype} probe "
                "inputs made float (token ids into an nn.Embedding?). Attribution at an embedding output is not "
                "supported yet; for such models use GradCAMCallback on a layer, or the representation callbacks."
            ) from error

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        transform = self.output_transform
        first = attribution_pass(pl_module, inputs, target, output_transform=transform, task=self.output_task)
        assert first.input_grad is not None
        attributions: dict[str, Tensor] = {}
        scalars: dict[str, float] = {}
        for method in self.methods:
            if method == "gradient":
                attributions[method] = first.input_grad
            elif method == "input_x_gradient":
                attributions[method] = first.inputs * first.input_grad
            elif method == "smoothgrad":  # noise drawn where the model is, by the callback's own generator
                generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
                attributions[method] = smoothgrad(
                    pl_module,
                    inputs,
                    first.target,
                    noise_level=self.noise_level,
                    n_samples=self.smoothgrad_samples,
                    generator=generator,
                    internal_batch_size=self.internal_batch_size,
                    output_transform=transform,
                    task=self.output_task,
                )
            else:
                attr, delta = integrated_gradients(
                    pl_module,
                    inputs,
                    first.target,
                    n_steps=self.ig_steps,
                    internal_batch_size=self.internal_batch_size,
                    return_convergence_delta=True,
                    output_transform=transform,
                    task=self.output_task,
                )
                attributions[method] = attr
                difference = attr.reshape(attr.shape[0], -1).double().sum(dim=1) - delta
                scalars[f"{method}/completeness_error"] = float(
                    delta.abs().mean() / difference.abs().mean().clamp_min(1e-12)
                )
        maps = {key: attribution_to_map(value, self.channel_reduction) for key, value in attributions.items()}
        signed = set(maps) if self.channel_reduction == "sum" else set()
        return Explanation(
            maps=maps,
            scores=first.scores,
            target=first.target,
            scalars=scalars,
            signed=signed,
            titles={key: _TITLES[key] for key in maps},
        )
