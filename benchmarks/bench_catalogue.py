"""Method catalogue section: every registered attribution method not timed in the attribution section, against its
reference peer on the same batch.

The methods come from the registry (``lightning_interp.methods.registry.METHODS``); each one with a comparison here
gets a row per model, and the section lists the registered methods without a row and why (timed in the attribution
section, not defined for a model, no comparison written yet, or an error). Models and inputs as in the attribution
section: ``mnist_cnn()`` (1 x 28 x 28, CAM layer ``'3'``) and ``cifar_resnet()`` (3 x 32 x 32, CAM layer
``'layer3'``), random weights (fixed seed, eval mode), a batch of 64 uniform images (4 with ``--quick``), targets =
the predicted classes, computed once. Ours is called through the registry's function with its defaults unless a
row says otherwise; agreement is ``max|ours - peer| / max|peer|``.

- ``guided_backprop``, ``deconvnet`` vs Captum ``GuidedBackprop``, ``Deconvolution``. Captum's rules are hooks on
  ``nn.ReLU`` modules, and ``cifar_resnet``'s blocks call ``F.relu``: on that model both libraries run on a copy whose
  blocks call one ``nn.ReLU`` module per use (the same function, the same weights), and the note gives the agreement on
  the original model too, where Captum differentiates the functional ReLUs plainly.
- ``lrp`` (rule ``"epsilon"``, composite ``"epsilon_plus"``) vs zennit's ``Gradient`` attributor with the matching
  composite (for ``"epsilon"``, zennit's base layer map with ``Epsilon(1e-6)`` on every convolution and linear layer;
  ``EpsilonPlus`` for the composite), the output relevance being the target score. ``mnist_cnn`` needs no canonizer.
  ``cifar_resnet``'s blocks are not torchvision's, so zennit's ``ResNetCanonizer`` does not apply; the same canonisation
  is built from zennit's own parts: ``SequentialMergeBatchNorm`` (every BatchNorm follows its convolution among the
  leaves) and an ``AttributeCanonizer`` giving each block a ``zennit.layer.Sum`` for its residual addition, as zennit's
  ``ResNetBasicBlockCanonizer`` does for torchvision. zennit leaves a merged BatchNorm computing ``x / sqrt(1 + eps)``,
  so the ResNet's LRP rows run on a copy with BatchNorm ``eps = 0`` (the tests' trick), where both compute the same
  function. zennit registers its hooks and canonizers inside each timed call, as ours does.
- ``lrp`` composites ``"epsilon_gamma_box"`` (box [0, 1], the images' range) and ``"epsilon_alpha2_beta1"`` vs zennit's
  ``EpsilonGammaBox`` and ``EpsilonAlpha2Beta1`` with the same canonizers.
- ``deeplift`` through a softmax: the model followed by ``nn.Softmax(dim=1)``, on a copy whose last linear layer's
  weights are centred over the classes (the logits' sum never moves, where Captum's softmax rule and ours agree), vs
  Captum ``DeepLift``; timed on the batch, compared image by image on the first few (Captum's rule subtracts the mean
  over the whole batch tensor, not per sample).
- ``kernel_shap``'s exact mode (a 2 x 2 grid, 4 features, all 14 coalitions) vs Captum ``KernelShap`` with 14 sampled
  coalitions (the same forwards; not exact, so no agreement) and Captum ``ShapleyValues`` (exact, by permutations):
  the agreement is with the latter.
- ``deeplift`` vs Captum ``DeepLift``, both with a constant baseline of 0.5: at a zero input the random-init ResNet's
  activations are all zero (no convolution biases, BatchNorm at its initial statistics), where every Rescale multiplier
  is the ReLU's gradient and DeepLIFT degenerates to input x gradient. Captum's rules reach only ``nn.ReLU`` modules
  (the ResNet runs on the module copy, as above) and treat a max pool that directly follows an activation differently
  from ours (``mnist_cnn``'s conv2 -> ReLU -> MaxPool; with a linear layer between the two they agree exactly); the note
  gives both convergence deltas, ``max|sum(attributions) - (f(x) - f(x0))| / max|f(x) - f(x0)|``, from one more untimed
  call each. No peer has the RevealCancel rule: ``deeplift(rule="reveal_cancel")`` is timed in the same rounds and
  given in the note as its time and its ratio to our Rescale (a row of its own would count as "slower than the peer").
- ``grad_cam_plus_plus``, ``xgrad_cam``, ``layer_cam``, ``hires_cam``, ``eigen_cam``, ``score_cam`` vs
  pytorch-grad-cam's ``GradCAMPlusPlus``, ``XGradCAM``, ``LayerCAM``, ``HiResCAM``, ``EigenCAM``, ``ScoreCAM`` with
  ``ClassifierOutputTarget`` targets (hooks live only inside each call, as ours do). pytorch-grad-cam returns maps
  ReLU'd, min-max normalised, resized with cv2 and normalised again; ours (ReLU'd and upsampled, the defaults) is
  min-max normalised twice per map before comparing. Eigen-CAM's sign is arbitrary in pytorch-grad-cam (ours is fixed to
  agree with the mean activation): it is compared from one more untimed call without ReLU or upsampling, through the
  same post-processing, per map with the better of both signs; its rounds pause ``SETTLE_S`` (untimed) before each call,
  as pytorch-grad-cam's numpy SVDs leave BLAS threads spinning on the cores. Score-CAM runs one forward per channel and
  sample, so it runs on the first few images only (the row says how many), ours at its default ``internal_batch_size``
  (64), pytorch-grad-cam at its default batch of 16 (its tqdm progress bar is disabled).
- ``ablation_cam`` vs pytorch-grad-cam ``AblationCAM`` as the CAMs above, on the first few images (one forward per
  channel), both at their default of 32 copies per forward (ours ``internal_batch_size``; tqdm disabled);
  ``full_grad`` vs pytorch-grad-cam ``FullGrad`` (ours summed over the channels); ``guided_grad_cam`` vs Captum
  ``GuidedGradCam`` at the CAM layer with ``interpolate_mode="bilinear"``.
- ``smooth_grad_cam_plus_plus`` vs torchcam ``SmoothGradCAMpp`` with the same copies (SMOOTH_CAM_SAMPLES) and noise std,
  on the whole batch, timed on each side's own draws. torchcam takes its last copy's gradient and activation and
  ``sum(A * G3)`` (so the maps agree only on the tests' special case): the agreement is measured without noise, where
  Smooth Grad-CAM++ is Grad-CAM++, against pytorch-grad-cam ``GradCAMPlusPlus`` (ours min-max normalised twice).
- ``layer_gradient_x_activation``, ``layer_integrated_gradients``, ``layer_conductance`` at the CAM layer vs Captum's
  ``LayerGradientXActivation``, ``LayerIntegratedGradients``, ``LayerConductance`` (zero baseline, LAYER_STEPS
  Gauss-Legendre points, every point in one pass on both sides; the path methods on the first few images).
- ``cam`` vs torchcam ``CAM`` (``normalized=False``; ours with ``relu=False, upsample=False``, the same map), only on
  ``cifar_resnet``: CAM needs a global-average-pooled linear head, and ``mnist_cnn`` has none.
- ``noise_tunnel`` (around the gradient, SmoothGrad), ``smoothgrad_sq`` and ``vargrad`` vs Captum
  ``NoiseTunnel(Saliency)`` with the same kind, 16 copies and noise of std 0.15 (input units), on the first few
  images: timed on each side's own draws; the agreement comes from one more untimed call in which Captum's
  ``torch.normal`` returns our noise.
- When registered (they run from the registry like the others): ``occlusion`` vs Captum ``Occlusion`` with the same
  window, stride and zero baseline, once with Captum's default ``perturbations_per_eval=1`` and once with as many inputs
  per forward as ours (``PERTURBED_PER_FORWARD``, 64); ``lime`` and ``kernel_shap`` vs Captum ``Lime``
  (``SkLearnLinearRegression``, its default exponential cosine kernel of width 1) and ``KernelShap``, ``gradient_shap``
  vs Captum ``GradientShap`` (zero baseline, no noise), all with the same number of samples and features (a 4 x 4 grid
  of patches). These draw their samples from different RNGs, so agreement on the model is not defined; it is measured on
  a linear model on the same images, where both sides are exact. They run on the first few images (the row says how
  many); Captum's ``Lime`` and ``KernelShap`` explain one image at a time, with all of its samples in one forward (its
  fastest setting); as Eigen-CAM, their rounds pause ``SETTLE_S`` before each call (scikit-learn's BLAS threads). Ours
  runs at most 64 perturbed inputs per forward by default: with every perturbed input of 8 images in one forward (512 on
  ``cifar_resnet``) each activation (67 MB) lay above glibc's largest mmap threshold (32 MB) and was mapped afresh and
  zero-filled page by page on every call, which made ours 0.56-0.6x Captum's speed.
- ``deeplift_shap`` vs Captum ``DeepLiftShap`` with the same 8 seeded uniform reference images (the ResNet on the
  ``nn.ReLU``-module copy, as for ``deeplift``), on the first few images.
- ``feature_ablation``, ``feature_permutation`` and ``shapley_value_sampling`` (8 orderings) vs Captum
  ``FeatureAblation``, ``FeaturePermutation`` and ``ShapleyValueSampling`` on the same 4 x 4 grid of patches and zero
  baseline, Captum with ``perturbations_per_eval`` giving it as many inputs per forward as ours; Captum gets our batch
  permutations (``perm_func``) and feature orderings (``permutation_generator``), so agreement is on the same draws.

Timing as in the attribution section: interleaved repeats, medians, one warm-up call of each side; full runs aim at
about ``ROUND_BUDGET_S`` of timed rounds per comparison (predicted from one call of ours), with ``MIN_REPEATS`` to
``MAX_REPEATS`` repeats; ``--quick`` calls each side once, without warm-up. The section takes about 4 to 5 minutes on
2 CPU cores.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import os
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import _timing
import torch
import torch.nn.functional as F
from bench_attribution import _images, _keeping, _minmax, _rel, _spread, _time, comparison_table
from torch import Tensor, nn

from lightning_interp.demo import _BasicBlock, cifar_resnet, mnist_cnn
from lightning_interp.methods.perturbation.ablation import PERTURBED_PER_FORWARD
from lightning_interp.methods.registry import METHODS, MethodSpec

MIN_REPEATS, MAX_REPEATS, ROUND_BUDGET_S = 5, 25, 2.0  # timed repeats per comparison (full runs)
# Untimed pause before each call where numpy's BLAS threads (SVDs, scikit-learn) could steal torch's cores.
SETTLE_S = 0.1
DEEPLIFT_BASELINE = 0.5
DEEPLIFT_SHAP_BASELINES = 8  # DeepLiftShap: uniform reference images (seeded), each input explained against each

# (name, constructor, input shape, CAM layer)
MODELS: tuple[tuple[str, Callable[[], nn.Module], tuple[int, ...], str], ...] = (
    ("mnist_cnn", mnist_cnn, (1, 28, 28), "3"),
    ("cifar_resnet", cifar_resnet, (3, 32, 32), "layer3"),
)

# Methods that cost many forward passes per image run on the first few images: (full run, --quick).
FEW_IMAGES = {
    "score_cam": (4, 1),
    "occlusion": (8, 2),
    "lime": (8, 2),
    "kernel_shap": (8, 2),
    "gradient_shap": (4, 2),
    "noise_tunnel": (8, 2),
    "smoothgrad_sq": (8, 2),
    "vargrad": (8, 2),
    "ablation_cam": (4, 1),
    "feature_ablation": (8, 2),
    "feature_permutation": (8, 2),
    "shapley_value_sampling": (4, 2),
    "deeplift_shap": (8, 2),
    "layer_integrated_gradients": (8, 2),
    "layer_conductance": (8, 2),
}
PERTURBATION_SAMPLES = 64  # LIME and KernelSHAP coalitions per image
GRADIENT_SHAP_SAMPLES = 16
TUNNEL_SAMPLES, TUNNEL_STDEVS = 16, 0.15  # noise tunnels: copies per image and the noise in input units
OCCLUSION_WINDOW = 4  # our default on 28 x 28 and 32 x 32 images: ceil(min(H, W) / 8)
SHAPLEY_ORDERINGS = 8  # Shapley value sampling: orderings per image (the callbacks' default)
PATCH_GRID = 4  # LIME / KernelSHAP features: a 4 x 4 grid of square patches (our default)

LRP_RULES = (  # our rule / composite and zennit's
    ("epsilon", "zennit Gradient, Epsilon(1e-6) layer map"),
    ("epsilon_plus", "zennit EpsilonPlus"),
    ("epsilon_gamma_box", "zennit EpsilonGammaBox(low=0, high=1)"),
    ("epsilon_alpha2_beta1", "zennit EpsilonAlpha2Beta1"),
)
LAYER_STEPS = 32  # layer integrated gradients and conductance: path points (our default)
KERNEL_SHAP_EXACT_GRID = 2  # KernelSHAP's exact mode: a 2 x 2 grid, 4 features, all 14 coalitions
SMOOTH_CAM_SAMPLES = 4  # Smooth Grad-CAM++: noisy copies (torchcam's default), noise std TUNNEL_STDEVS

COVERED = {
    "gradient": "attribution section (vs Captum Saliency)",
    "input_x_gradient": "attribution section (vs Captum InputXGradient, within the attribution_pass rows)",
    "smoothgrad": "attribution section (vs Captum NoiseTunnel(Saliency))",
    "integrated_gradients": "attribution section (vs Captum IntegratedGradients)",
    "grad_cam": "attribution section (vs Captum LayerGradCam and pytorch-grad-cam GradCAM)",
}

PGC_CAMS = {
    "grad_cam_plus_plus": "GradCAMPlusPlus",
    "xgrad_cam": "XGradCAM",
    "layer_cam": "LayerCAM",
    "hires_cam": "HiResCAM",
    "eigen_cam": "EigenCAM",
    "score_cam": "ScoreCAM",
    "ablation_cam": "AblationCAM",
}


class NotCompared(Exception):
    """A method that has no row for a model, with the reason."""


@dataclass
class Setup:
    """One model and its batch, shared by the comparisons."""

    name: str
    model: nn.Module
    x: Tensor
    t: Tensor
    layer: str
    quick: bool

    def few(self, method: str) -> tuple[Tensor, Tensor]:
        """The first images (and targets) for an expensive method."""
        count = FEW_IMAGES[method][1 if self.quick else 0]
        return self.x[:count], self.t[:count]


Row = dict[str, object]
Measured = tuple[dict[str, float], dict[str, object], int, dict[str, list[float]]]


# ----------------------------------------------------------------------------------------------- timing


def _time_settled(fns: dict[str, Callable[[], object]], repeats: int, settle_s: float) -> Measured:
    """:func:`bench_attribution._time` with an untimed pause before each call (see ``interleaved_medians``)."""
    results: dict[str, object] = {}
    times: dict[str, list[float]] = {}
    wrapped = {key: _keeping(results, times, key, fn) for key, fn in fns.items()}
    seconds = _timing.interleaved_medians(wrapped, repeats=repeats, settle_s=settle_s)
    rounds = {key: values[1:] for key, values in times.items()}
    return {key: 1000 * value for key, value in seconds.items()}, results, repeats, rounds


def _one_call_each(fns: dict[str, Callable[[], object]], settle_s: float) -> Measured:
    """Each function called once, timed (``--quick``: the smoke test checks the agreement, not the times)."""
    results: dict[str, object] = {}
    times: dict[str, list[float]] = {}
    for key, fn in fns.items():
        if settle_s:
            time.sleep(settle_s)
        _keeping(results, times, key, fn)()
    return {key: 1000 * values[0] for key, values in times.items()}, results, 1, times


def _measure(fns: dict[str, Callable[[], object]], quick: bool, settle_s: float = 0.0) -> Measured:
    """Interleaved medians of ``fns`` (the first is ours), with the number of repeats predicted from one call; with
    ``quick``, one call of each and no warm-up (the times mean nothing there, the results give the agreement)."""
    if quick:
        return _one_call_each(fns, settle_s)
    started = time.perf_counter()
    next(iter(fns.values()))()
    round_s = (time.perf_counter() - started) * len(fns)
    repeats = max(MIN_REPEATS, min(MAX_REPEATS, round(ROUND_BUDGET_S / max(round_s, 1e-6))))
    if settle_s:
        return _time_settled(fns, repeats, settle_s)
    return _time(fns, repeats)


def _row(
    setup: Setup,
    method: str,
    peer: str,
    measured: Measured,
    peer_key: str,
    rel: float | str,
    note: str = "",
) -> Row:
    ms, _, runs, rounds = measured
    spread = _spread(rounds, "ours", peer_key)
    return {
        "model": setup.name,
        "method": method,
        "peer": peer,
        "ours_ms": ms["ours"],
        "peer_ms": ms[peer_key],
        "runs": runs,
        "ratio": ms[peer_key] / ms["ours"],
        "spread": f"{spread[0]:.2f}-{spread[1]:.2f}",
        "upper": spread[2],
        "rel": rel,
        "note": note,
    }


def _ours(spec: MethodSpec, model: nn.Module, x: Tensor, t: Tensor, layer: str | None, **options: object) -> Tensor:
    if spec.needs_layer:
        return spec.function(model, x, t, layer, **options)
    return spec.function(model, x, t, **options)


@contextlib.contextmanager
def _captum_rng() -> Iterator[None]:
    """Captum draws from the global RNG: seed it, and leave it as it was for the other sections."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


# ----------------------------------------------------------------------------------------------- model variants


def _block_with_relu_modules(self: nn.Module, x: Tensor) -> Tensor:
    out = self.relu_inner(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_out(out + self.shortcut(x))


def _relu_modules(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose residual blocks call one ``nn.ReLU`` module per use instead of ``F.relu`` (the same
    function and weights, but Captum's module hooks see every ReLU); None when no block calls ``F.relu``."""
    if not any(isinstance(module, _BasicBlock) for module in model.modules()):
        return None
    variant = copy.deepcopy(model)
    for module in variant.modules():
        if isinstance(module, _BasicBlock):
            module.relu_inner, module.relu_out = nn.ReLU(), nn.ReLU()
            module.forward = types.MethodType(_block_with_relu_modules, module)
    return variant


def _block_with_zennit_sum(self: nn.Module, x: Tensor) -> Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(self.canonizer_sum(torch.stack([out, self.shortcut(x)], dim=-1)))


def _zennit_block_attributes(name: str, module: nn.Module) -> dict[str, object] | None:
    """zennit ``AttributeCanonizer`` map: each residual block adds its branches with a ``zennit.layer.Sum``."""
    from zennit.layer import Sum

    if isinstance(module, _BasicBlock):
        return {"forward": types.MethodType(_block_with_zennit_sum, module), "canonizer_sum": Sum()}
    return None


def _zennit_canonizers(model: nn.Module) -> list[object]:
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm

    canonizers: list[object] = [SequentialMergeBatchNorm()]
    if any(isinstance(module, _BasicBlock) for module in model.modules()):
        canonizers.append(AttributeCanonizer(_zennit_block_attributes))
    return canonizers


def _without_batchnorm_eps(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm's eps set to 0 (zennit's merged BatchNorm is then exactly the identity)."""
    variant = copy.deepcopy(model)
    norms = [module for module in variant.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.eps = 0.0
    return variant


# ----------------------------------------------------------------------------------------------- comparisons


def _modified_backward(setup: Setup, method: str) -> list[Row]:
    from captum.attr import Deconvolution, GuidedBackprop

    spec = METHODS[method]
    peer_class = {"guided_backprop": GuidedBackprop, "deconvnet": Deconvolution}[method]
    x, t = setup.x, setup.t
    variant = _relu_modules(setup.model)
    model = setup.model if variant is None else variant
    peer = peer_class(model)
    measured = _measure(
        {"ours": lambda: _ours(spec, model, x, t, None), "peer": lambda: peer.attribute(x, target=t)}, setup.quick
    )
    _, out, _, _ = measured
    note = ""
    if variant is not None:
        original = _rel(_ours(spec, setup.model, x, t, None), peer_class(setup.model).attribute(x, target=t))
        note = (
            f"both on the copy with nn.ReLU modules in the blocks; on the original (F.relu, which Captum's hooks "
            f"miss): {original:.2g}"
        )
    return [
        _row(setup, method, f"Captum {peer_class.__name__}", measured, "peer", _rel(out["ours"], out["peer"]), note)
    ]


def _lrp(setup: Setup, method: str) -> list[Row]:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool, BatchNorm, Linear

    spec = METHODS[method]
    has_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in setup.model.modules())
    model = _without_batchnorm_eps(setup.model) if has_norms else setup.model
    x, t = setup.x, setup.t
    with torch.no_grad():
        one_hot = F.one_hot(t, model(x).shape[1]).to(x.dtype)

    def composite(rule: str) -> object:
        canonizers = _zennit_canonizers(model)
        if rule == "epsilon_plus":
            return EpsilonPlus(canonizers=canonizers)
        if rule == "epsilon_gamma_box":  # the box is the images' range, [0, 1] (our default bounds)
            box = torch.zeros(1, *x.shape[1:], device=x.device)
            return EpsilonGammaBox(low=box, high=box + 1, canonizers=canonizers)
        if rule == "epsilon_alpha2_beta1":
            return EpsilonAlpha2Beta1(canonizers=canonizers)
        layer_map = [(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()), (BatchNorm, Pass())]
        return LayerMapComposite([*layer_map, (Linear, Epsilon(1e-6))], canonizers=canonizers)

    def zennit(rule: str) -> Tensor:
        with Gradient(model=model, composite=composite(rule)) as attributor:
            _, relevance = attributor(x.detach().clone().requires_grad_(True), lambda output: one_hot * output)
        return relevance

    rows = []
    for rule, peer in LRP_RULES:
        measured = _measure(
            {
                "ours": lambda rule=rule: _ours(spec, model, x, t, None, rule=rule),
                "peer": lambda rule=rule: zennit(rule),
            },
            setup.quick,
        )
        _, out, _, _ = measured
        note = "canonizers: SequentialMergeBatchNorm + Sum per block; BatchNorm eps=0 copy" if has_norms else ""
        rows.append(
            _row(setup, f"{method} rule={rule!r}", peer, measured, "peer", _rel(out["ours"], out["peer"]), note)
        )
    return rows


def _deeplift(setup: Setup, method: str) -> list[Row]:
    from captum.attr import DeepLift

    spec = METHODS[method]
    x, t = setup.x, setup.t
    base = DEEPLIFT_BASELINE
    variant = _relu_modules(setup.model)
    model = setup.model if variant is None else variant
    peer = DeepLift(model)
    timed = {
        "ours": lambda: _ours(spec, model, x, t, None, baseline=base),
        "peer": lambda: peer.attribute(x, baselines=base, target=t),
    }
    if method == "deeplift":  # our RevealCancel rule, timed in the same rounds (no peer has it: in the note)
        timed["reveal_cancel"] = lambda: _ours(spec, model, x, t, None, baseline=base, rule="reveal_cancel")
    measured = _measure(timed, setup.quick)
    ms, out, _, _ = measured
    with torch.no_grad():
        change = (model(x) - model(torch.full_like(x, base))).gather(1, t[:, None])[:, 0].double()
    _, ours_delta = _ours(spec, model, x, t, None, baseline=base, return_convergence_delta=True)
    _, peer_delta = peer.attribute(x, baselines=base, target=t, return_convergence_delta=True)
    scale = float(change.abs().max())
    note = (
        f"convergence delta / max|f(x) - f(x0)|: ours {float(ours_delta.abs().max()) / scale:.1g}, "
        f"Captum {float(peer_delta.abs().max()) / scale:.1g}"
    )
    if "reveal_cancel" in ms:
        _, reveal_delta = _ours(
            spec, model, x, t, None, baseline=base, rule="reveal_cancel", return_convergence_delta=True
        )
        note += (
            f"; rule='reveal_cancel' {ms['reveal_cancel']:.1f} ms ({ms['reveal_cancel'] / ms['ours']:.2f}x our "
            f"rescale), delta {float(reveal_delta.abs().max()) / scale:.1g}"
        )
    if variant is not None:
        original = _rel(
            _ours(spec, setup.model, x, t, None, baseline=base),
            DeepLift(setup.model).attribute(x, baselines=base, target=t),
        )
        note += f"; both on the nn.ReLU-module copy; on the original (F.relu, which Captum misses): {original:.2g}"
    elif _pool_after_activation(model):
        note += (
            "; the difference is Captum's rule for a max pool right after an activation (ReLU -> MaxPool here; "
            "with a linear layer between them the two agree exactly)"
        )
    row = _row(
        setup,
        f"{method} (baseline {base:g})",
        "Captum DeepLift",
        measured,
        "peer",
        _rel(out["ours"], out["peer"]),
        note,
    )
    return [row, *_deeplift_softmax(setup, method, model)]


def _centred_softmax(model: nn.Module) -> nn.Module:
    """``model`` followed by ``nn.Softmax(dim=1)``, on a copy whose last linear layer's weights sum to zero over the
    classes: the logits' sum then never moves, where Captum's softmax rule and ours (the DeepLIFT paper's) agree."""
    variant = copy.deepcopy(model)
    head = [module for module in variant.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        head.weight -= head.weight.mean(dim=0, keepdim=True)
    return nn.Sequential(variant, nn.Softmax(dim=1)).eval()


def _deeplift_softmax(setup: Setup, method: str, model: nn.Module) -> list[Row]:
    """DeepLIFT of a model ending in ``nn.Softmax`` vs Captum ``DeepLift`` (its softmax rule), timed on the batch;
    agreement image by image (Captum subtracts the mean over the whole batch tensor, not per sample)."""
    from captum.attr import DeepLift

    spec = METHODS[method]
    x, t = setup.x, setup.t
    base = DEEPLIFT_BASELINE
    net = _centred_softmax(model)
    peer = DeepLift(net)
    measured = _measure(
        {
            "ours": lambda: _ours(spec, net, x, t, None, baseline=base),
            "peer": lambda: peer.attribute(x, baselines=base, target=t),
        },
        setup.quick,
    )
    count = 2 if setup.quick else 8
    rel = max(
        _rel(
            _ours(spec, net, x[i : i + 1], t[i : i + 1], None, baseline=base),
            peer.attribute(x[i : i + 1], baselines=base, target=t[i : i + 1]),
        )
        for i in range(count)
    )
    note = (
        f"the model + nn.Softmax, last linear layer centred over the classes; agreement on the first {count} images "
        "one at a time (Captum's softmax rule subtracts the mean over the whole batch tensor)"
    )
    if _pool_after_activation(model):
        note += "; differences: Captum's rule for a max pool right after an activation (see deeplift)"
    return [
        _row(setup, f"{method} (softmax output, baseline {base:g})", "Captum DeepLift", measured, "peer", rel, note)
    ]


def _pool_after_activation(model: nn.Module) -> bool:
    """Whether a max pool directly follows a ReLU among the model's leaf modules (in registration order)."""
    leaves = [module for module in model.modules() if not list(module.children())]
    return any(isinstance(a, nn.ReLU) and isinstance(b, nn.MaxPool2d) for a, b in itertools.pairwise(leaves))


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """pytorch-grad-cam's ScoreCAM prints a tqdm progress bar per image: disabled (it only makes the peer slower)."""
    import pytorch_grad_cam.ablation_cam as ablation_cam_module
    import pytorch_grad_cam.score_cam as score_cam_module
    import tqdm

    quiet = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    with mock.patch.object(score_cam_module, "tqdm", quiet), mock.patch.object(ablation_cam_module, "tqdm", quiet):
        yield


def _as_pytorch_grad_cam_shows(grid_maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """pytorch-grad-cam's post-processing of raw (B, h, w) maps: ReLU, min-max, bilinear resize, min-max."""
    resized = F.interpolate(_minmax(grid_maps.clamp_min(0))[:, None], size=size, mode="bilinear", align_corners=False)
    return _minmax(resized[:, 0])


def _pytorch_grad_cam(setup: Setup, method: str) -> list[Row]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = METHODS[method]
    model, layer = setup.model, setup.layer
    x, t = setup.few(method) if method in FEW_IMAGES else (setup.x, setup.t)
    module = dict(model.named_modules())[layer]
    peer_class = getattr(pytorch_grad_cam, PGC_CAMS[method])
    targets = [ClassifierOutputTarget(int(c)) for c in t]

    def peer() -> Tensor:
        with peer_class(model=model, target_layers=[module]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=targets))

    settle = SETTLE_S if method == "eigen_cam" else 0.0  # its numpy SVDs leave BLAS threads spinning
    with _quiet_tqdm():
        measured = _measure({"ours": lambda: _ours(spec, model, x, t, layer), "peer": peer}, setup.quick, settle)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills param.grad
    _, out, _, _ = measured
    theirs = out["peer"]
    assert isinstance(theirs, Tensor)
    note = "ours min-max normalised twice per map, as pytorch-grad-cam does"
    if method == "eigen_cam":
        raw = _ours(spec, model, x, t, layer, relu=False, upsample=False)
        size = tuple(x.shape[-2:])
        same = (_as_pytorch_grad_cam_shows(raw, size) - theirs).abs().flatten(1).amax(dim=1)
        flipped = (_as_pytorch_grad_cam_shows(-raw, size) - theirs).abs().flatten(1).amax(dim=1)
        rel: float | str = float(torch.minimum(same, flipped).max()) / float(theirs.abs().max())
        note = (
            f"per map with the better sign (pytorch-grad-cam's SVD sign is arbitrary; it differs from ours on "
            f"{int((flipped < same).sum())} of {len(x)} maps), from an untimed call without ReLU and upsampling"
        )
    else:
        rel = _rel(_minmax(_minmax(out["ours"])), theirs)  # type: ignore[arg-type]
    label = f"{method} {layer!r}"
    if method in FEW_IMAGES:
        label += f" ({len(x)} images)"
        ours_batch, batch = (32, 32) if method == "ablation_cam" else (64, 16)  # each side's default
        note += f"; ours internal_batch_size={ours_batch}, pytorch-grad-cam its batch of {batch}"
    return [_row(setup, label, f"pytorch-grad-cam {PGC_CAMS[method]}", measured, "peer", rel, note)]


def _torchcam(setup: Setup, method: str) -> list[Row]:
    from torchcam.methods import CAM

    spec = METHODS[method]
    model, layer, x, t = setup.model, setup.layer, setup.x, setup.t
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        _ours(spec, model, x[:1], t[:1], layer)
    except ValueError:
        raise NotCompared("not defined, the head is not global average pooling + one linear layer") from None
    classes = t.tolist()

    def peer() -> Tensor:
        with CAM(model, target_layer=layer, fc_layer=heads[-1]) as extractor:
            scores = model(x)
            return extractor(class_idx=classes, scores=scores, normalized=False)[0].detach()

    measured = _measure(
        {"ours": lambda: _ours(spec, model, x, t, layer, relu=False, upsample=False), "peer": peer}, setup.quick
    )
    _, out, _, _ = measured
    return [
        _row(
            setup,
            f"{method} {layer!r}",
            "torchcam CAM",
            measured,
            "peer",
            _rel(out["ours"], out["peer"]),
            "both without ReLU and upsampling (torchcam's raw map)",
        )
    ]


def _linear_model(x: Tensor) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10)).eval().to(x.device)


def _patch_mask(x: Tensor, grid: int = PATCH_GRID) -> Tensor:
    """(1, 1, H, W) ids of a ``grid`` x ``grid`` grid of square patches (default PATCH_GRID: our default features)."""
    height, width = x.shape[-2:]
    side = -(-min(height, width) // grid)
    rows = torch.arange(height, device=x.device) // side
    cols = torch.arange(width, device=x.device) // side
    return (rows[:, None] * -(-width // side) + cols[None, :]).reshape(1, 1, height, width)


def _occlusion(setup: Setup, method: str) -> list[Row]:
    from captum.attr import Occlusion

    spec = METHODS[method]
    model = setup.model
    x, t = setup.few(method)
    channels, height, width = x.shape[1:]
    win = OCCLUSION_WINDOW
    windows = (-(-(height - win) // win) + 1) * (-(-(width - win) // win) + 1)
    peer = Occlusion(model)

    def captum(per_eval: int) -> Tensor:
        return peer.attribute(
            x,
            sliding_window_shapes=(channels, win, win),
            strides=(channels, win, win),
            baselines=0.0,
            target=t,
            perturbations_per_eval=per_eval,
        )

    same_batching = max(1, PERTURBED_PER_FORWARD // len(x))  # windows per forward: ours' inputs per forward
    measured = _measure(
        {
            "ours": lambda: _ours(spec, model, x, t, None, window=win, stride=win, baseline=0.0),
            "one": lambda: captum(1),
            "all": lambda: captum(same_batching),
        },
        setup.quick,
    )
    _, out, _, _ = measured
    label = f"{method} {win} x {win}, stride {win} ({len(x)} images)"
    return [
        _row(
            setup,
            label,
            "Captum Occlusion, perturbations_per_eval=1 (default)",
            measured,
            "one",
            _rel(out["ours"], out["one"]),
            f"{windows} windows; ours: {PERTURBED_PER_FORWARD} occluded images per forward (its default)",
        ),
        _row(
            setup,
            label,
            f"Captum Occlusion, perturbations_per_eval={same_batching}",
            measured,
            "all",
            _rel(out["ours"], out["all"]),
            "the same batching as ours",
        ),
    ]


def _surrogate(setup: Setup, method: str) -> list[Row]:
    """LIME and KernelSHAP vs Captum's, with the same coalition count and features."""
    from captum._utils.models.linear_model import SkLearnLinearRegression
    from captum.attr import KernelShap, Lime

    spec = METHODS[method]
    model = setup.model
    x, t = setup.few(method)
    mask = _patch_mask(x)
    n = PERTURBATION_SAMPLES

    def ours(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        generator = torch.Generator(device=inputs.device).manual_seed(0)
        return _ours(spec, net, inputs, target, None, n_samples=n, feature_mask=mask, generator=generator)

    def captum(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        explainer = KernelShap(net) if method == "kernel_shap" else Lime(net, SkLearnLinearRegression())
        return explainer.attribute(
            inputs, target=target, baselines=0.0, feature_mask=mask, n_samples=n, perturbations_per_eval=n
        )

    with _captum_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure(
            {"ours": lambda: ours(model, x, t), "peer": lambda: captum(model, x, t)}, setup.quick, SETTLE_S
        )
        linear = _linear_model(x)
        with torch.no_grad():
            linear_t = linear(x).argmax(dim=1)
        linear_rel = _rel(ours(linear, x, linear_t), captum(linear, x, linear_t))
    peer = "Captum KernelShap" if method == "kernel_shap" else "Captum Lime (SkLearnLinearRegression)"
    note = (
        f"{int(mask.max()) + 1} patch features; on a linear model (both exact): {linear_rel:.2g}; Captum: one image "
        f"at a time, its {n} perturbations in one forward"
    )
    label = f"{method} (n_samples={n}, {len(x)} images)"
    rows = [_row(setup, label, peer, measured, "peer", "n/a (different draws)", note)]
    if method == "kernel_shap":
        rows += _kernel_shap_exact(setup, method)
    return rows


def _kernel_shap_exact(setup: Setup, method: str) -> list[Row]:
    """KernelSHAP's exact mode (every coalition once, few features) vs Captum ``KernelShap`` with as many coalitions
    (sampled) and Captum ``ShapleyValues`` (exact, by permutations): the agreement is with the exact one."""
    from captum.attr import KernelShap, ShapleyValues

    spec = METHODS[method]
    model = setup.model
    x, t = setup.few(method)
    mask = _patch_mask(x, KERNEL_SHAP_EXACT_GRID)
    features = int(mask.max()) + 1
    n = 2**features - 2  # every coalition but the empty and the full one: ours enumerates them

    def ours() -> Tensor:
        return _ours(spec, model, x, t, None, n_samples=n, feature_mask=mask, generator=torch.Generator())

    def kernel() -> Tensor:
        return KernelShap(model).attribute(
            x, target=t, baselines=0.0, feature_mask=mask, n_samples=n, perturbations_per_eval=n
        )

    def shapley() -> Tensor:  # F! orderings of F features, all of a sample's in a few forwards
        return ShapleyValues(model).attribute(
            x, target=t, baselines=0.0, feature_mask=mask, perturbations_per_eval=PERTURBED_PER_FORWARD
        )

    with _captum_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure({"ours": ours, "kernel": kernel, "exact": shapley}, setup.quick, SETTLE_S)
    _, out, _, _ = measured
    label = f"{method} exact ({features} features, {len(x)} images)"
    note = f"{n} coalitions, every one once (ours exact)"
    return [
        _row(setup, label, "Captum KernelShap, the same number of coalitions (sampled)", measured, "kernel",
             "n/a (sampled)", note + "; agreement with the exact values: the Captum ShapleyValues row (both exact)"),
        _row(setup, label, "Captum ShapleyValues (exact)", measured, "exact", _rel(out["ours"], out["exact"]),  # type: ignore[arg-type]
             note + f"; Captum's {features}! orderings"),
    ]  # fmt: skip


def _gradient_shap(setup: Setup, method: str) -> list[Row]:
    from captum.attr import GradientShap

    spec = METHODS[method]
    model = setup.model
    x, t = setup.few(method)
    n = GRADIENT_SHAP_SAMPLES
    references = torch.zeros(1, *x.shape[1:], device=x.device)

    def ours(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        generator = torch.Generator(device=inputs.device).manual_seed(0)
        return _ours(spec, net, inputs, target, None, n_samples=n, baselines=references, generator=generator)

    def captum(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        return GradientShap(net).attribute(inputs, baselines=references, n_samples=n, stdevs=0.0, target=target)

    with _captum_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure({"ours": lambda: ours(model, x, t), "peer": lambda: captum(model, x, t)}, setup.quick)
        linear = _linear_model(x)
        with torch.no_grad():
            linear_t = linear(x).argmax(dim=1)
        linear_rel = _rel(ours(linear, x, linear_t), captum(linear, x, linear_t))
    note = (
        f"zero baseline, no noise, all draws in one pass on both sides; on a linear model (both exact): "
        f"{linear_rel:.2g}"
    )
    label = f"{method} (n_samples={n}, {len(x)} images)"
    return [_row(setup, label, "Captum GradientShap", measured, "peer", "n/a (different draws)", note)]


def _noise_tunnel(setup: Setup, method: str) -> list[Row]:
    """Our noise tunnels around the gradient vs Captum ``NoiseTunnel(Saliency)`` with the same kind, copies and
    noise level; timed on each side's own draws, compared on the same noise (Captum's ``torch.normal`` replaced by
    ours in one more untimed call)."""
    from captum.attr import NoiseTunnel, Saliency

    spec = METHODS[method]
    model = setup.model
    x, t = setup.few(method)
    n, std = TUNNEL_SAMPLES, TUNNEL_STDEVS
    kind = {"smoothgrad_sq": "smoothgrad_sq", "vargrad": "vargrad"}.get(method, "smoothgrad")

    def ours(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        generator = torch.Generator(device=inputs.device).manual_seed(0)
        kind_option = {"kind": kind} if "kind" in spec.options else {}
        return _ours(spec, net, inputs, target, None, n_samples=n, stdevs=std, generator=generator, **kind_option)

    def captum(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        explainer = NoiseTunnel(Saliency(net))
        return explainer.attribute(inputs, nt_type=kind, nt_samples=n, stdevs=std, target=target, abs=False)

    def our_noise(inputs: Tensor) -> Tensor:  # the tunnel's draws, laid out as Captum's (each image's copies together)
        generator = torch.Generator(device=inputs.device).manual_seed(0)
        noise = torch.stack([torch.randn(inputs.shape, generator=generator, device=inputs.device) * std
                             for _ in range(n)])  # fmt: skip
        return noise.transpose(0, 1).reshape(-1, *inputs.shape[1:])

    with _captum_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure({"ours": lambda: ours(model, x, t), "peer": lambda: captum(model, x, t)}, setup.quick)
        noise = our_noise(x)
        with mock.patch.object(torch, "normal", lambda mean, stdev: noise.to(stdev.dtype)):
            same_noise = captum(model, x, t)
    note = f"noise std {std} (input units); agreement on the same noise, from one more untimed call"
    label = f"{method} (gradient, {kind}, n_samples={n}, {len(x)} images)"
    peer = f"Captum NoiseTunnel(Saliency, {kind})"
    return [_row(setup, label, peer, measured, "peer", _rel(ours(model, x, t), same_noise), note)]


def _full_grad(setup: Setup, method: str) -> list[Row]:
    """Ours vs pytorch-grad-cam ``FullGrad`` (every convolution's and BatchNorm's bias; both return maps in [0, 1]:
    ours summed over the input channels)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = METHODS[method]
    model, x, t = setup.model, setup.x, setup.t
    targets = [ClassifierOutputTarget(int(c)) for c in t]

    def peer() -> Tensor:
        with pytorch_grad_cam.FullGrad(model=model, target_layers=[]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=targets))

    measured = _measure({"ours": lambda: _ours(spec, model, x, t, None), "peer": peer}, setup.quick)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills param.grad
    _, out, _, _ = measured
    ours = out["ours"]
    assert isinstance(ours, Tensor)
    rel = _rel(ours.sum(dim=1), out["peer"])  # type: ignore[arg-type]
    return [_row(setup, method, "pytorch-grad-cam FullGrad", measured, "peer", rel, "ours summed over channels")]


def _guided_grad_cam(setup: Setup, method: str) -> list[Row]:
    """Ours vs Captum ``GuidedGradCam`` at the model's CAM layer, both with bilinear upsampling."""
    from captum.attr import GuidedGradCam

    spec = METHODS[method]
    x, t, layer = setup.x, setup.t, setup.layer
    variant = _relu_modules(setup.model)
    model = setup.model if variant is None else variant
    peer = GuidedGradCam(model, dict(model.named_modules())[layer])
    measured = _measure(
        {
            "ours": lambda: _ours(spec, model, x, t, None, cam_layer=layer),
            "peer": lambda: peer.attribute(x, target=t, interpolate_mode="bilinear"),
        },
        setup.quick,
    )
    _, out, _, _ = measured
    rel = _rel(out["ours"], out["peer"])  # type: ignore[arg-type]
    label = f"{method} {layer!r}"
    return [_row(setup, label, "Captum GuidedGradCam", measured, "peer", rel, "interpolate_mode='bilinear'")]


def _feature_groups(setup: Setup, method: str) -> list[Row]:
    """Feature ablation, feature permutation and Shapley value sampling vs Captum's on the same patch features; the
    random ones with Captum given our draws (``perm_func``, ``permutation_generator``), so agreement is defined."""
    from captum.attr import FeatureAblation, FeaturePermutation, ShapleyValueSampling

    from lightning_interp.methods.perturbation.features import _batch_permutations, _orderings

    spec = METHODS[method]
    model = setup.model
    x, t = setup.few(method)
    if method == "feature_permutation" and len(x) < 2:
        raise NotCompared("feature permutation needs 2 or more images")
    mask = _patch_mask(x)
    features = int(mask.max()) + 1
    n = SHAPLEY_ORDERINGS

    def generator(inputs: Tensor) -> torch.Generator:
        return torch.Generator(device=inputs.device).manual_seed(0)

    def ours(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        options: dict[str, object] = {"feature_mask": mask}
        if spec.stochastic:
            options["generator"] = generator(inputs)
        if method == "shapley_value_sampling":
            options["n_samples"] = n
        return _ours(spec, net, inputs, target, None, **options)

    def captum(net: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        per_eval = {"perturbations_per_eval": max(1, PERTURBED_PER_FORWARD // len(inputs))}  # ours: 64 per forward
        if method == "feature_ablation":
            return FeatureAblation(net).attribute(inputs, target=target, feature_mask=mask, baselines=0.0, **per_eval)
        if method == "feature_permutation":
            queue = iter(_batch_permutations(features, len(inputs), generator(inputs), inputs))
            explainer = FeaturePermutation(net, perm_func=lambda v, m: torch.where(m, v[next(queue)], v))
            return explainer.attribute(inputs, target=target, feature_mask=mask, **per_eval)
        orders = _orderings(n, features, generator(inputs), inputs).tolist()
        explainer = ShapleyValueSampling(net)
        explainer.permutation_generator = lambda count, samples: iter(orders)
        return explainer.attribute(inputs, target=target, feature_mask=mask, n_samples=n, baselines=0.0, **per_eval)

    with _captum_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure({"ours": lambda: ours(model, x, t), "peer": lambda: captum(model, x, t)}, setup.quick)
        agreement = _rel(ours(model, x, t), captum(model, x, t))
    peer = {
        "feature_ablation": "Captum FeatureAblation",
        "feature_permutation": "Captum FeaturePermutation (our permutations)",
        "shapley_value_sampling": "Captum ShapleyValueSampling (our orderings)",
    }[method]
    note = f"{features} patch features; Captum with as many inputs per forward as ours (64)"
    label = f"{method} ({f'n_samples={n}, ' if method == 'shapley_value_sampling' else ''}{len(x)} images)"
    return [_row(setup, label, peer, measured, "peer", agreement, note)]


def _deeplift_shap(setup: Setup, method: str) -> list[Row]:
    """DeepLiftShap vs Captum ``DeepLiftShap`` with the same DEEPLIFT_SHAP_BASELINES uniform reference images."""
    from captum.attr import DeepLiftShap

    spec = METHODS[method]
    x, t = setup.few(method)
    variant = _relu_modules(setup.model)
    model = setup.model if variant is None else variant
    references = torch.rand(
        DEEPLIFT_SHAP_BASELINES, *x.shape[1:], generator=torch.Generator().manual_seed(1), device="cpu"
    ).to(x.device)
    peer = DeepLiftShap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure(
            {
                "ours": lambda: _ours(spec, model, x, t, None, baselines=references),
                "peer": lambda: peer.attribute(x, baselines=references, target=t),
            },
            setup.quick,
        )
    _, out, _, _ = measured
    note = "both on the nn.ReLU-module copy" if variant is not None else ""
    if variant is None and _pool_after_activation(model):
        note = "differences: Captum's rule for a max pool right after an activation (see deeplift)"
    label = f"{method} ({DEEPLIFT_SHAP_BASELINES} baselines, {len(x)} images)"
    return [_row(setup, label, "Captum DeepLiftShap", measured, "peer", _rel(out["ours"], out["peer"]), note)]


def _layer(setup: Setup, method: str) -> list[Row]:
    """Layer attribution at the CAM layer vs Captum's ``Layer*`` of the same name, zero baseline, LAYER_STEPS points
    (Gauss-Legendre, both sides' default rule), every path point of the batch in one pass on both sides."""
    from captum.attr import LayerConductance, LayerGradientXActivation, LayerIntegratedGradients

    spec = METHODS[method]
    model, layer = setup.model, setup.layer
    x, t = setup.few(method) if method in FEW_IMAGES else (setup.x, setup.t)
    module = dict(model.named_modules())[layer]
    steps = {} if method == "layer_gradient_x_activation" else {"n_steps": LAYER_STEPS, "method": "gausslegendre"}
    peer_class = {
        "layer_gradient_x_activation": LayerGradientXActivation,
        "layer_integrated_gradients": LayerIntegratedGradients,
        "layer_conductance": LayerConductance,
    }[method]
    peer = peer_class(model, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure(
            {
                "ours": lambda: _ours(spec, model, x, t, layer, **steps),
                "peer": lambda: peer.attribute(x, target=t, **steps),
            },
            setup.quick,
        )
    _, out, _, _ = measured
    label = f"{method} {layer!r}" + (f" (n_steps={LAYER_STEPS}, {len(x)} images)" if steps else "")
    return [_row(setup, label, f"Captum {peer_class.__name__}", measured, "peer", _rel(out["ours"], out["peer"]))]  # type: ignore[arg-type]


def _smooth_grad_cam_plus_plus(setup: Setup, method: str) -> list[Row]:
    """Smooth Grad-CAM++ vs torchcam ``SmoothGradCAMpp`` with the same copies and noise, timed on each side's own
    draws. torchcam's weights differ from the paper's (the last copy's gradient in ReLU(dY/dA), ``sum(A * G3)`` for
    ``sum(A) * G3``), so the maps differ by design: agreement is measured without noise, where the paper's Smooth
    Grad-CAM++ is Grad-CAM++, against pytorch-grad-cam ``GradCAMPlusPlus`` (one more untimed call of each)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import SmoothGradCAMpp

    spec = METHODS[method]
    model, layer, x, t = setup.model, setup.layer, setup.x, setup.t
    n, std = SMOOTH_CAM_SAMPLES, TUNNEL_STDEVS
    classes = t.tolist()

    def ours(stdevs: float) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(0)
        return _ours(spec, model, x, t, layer, n_samples=n, stdevs=stdevs, generator=generator)

    def torchcam() -> Tensor:
        with SmoothGradCAMpp(model, layer, num_samples=n, std=std, input_shape=tuple(x.shape[1:])) as extractor:
            return extractor(class_idx=classes, scores=model(x))[0].detach()

    with _captum_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = _measure({"ours": lambda: ours(std), "peer": torchcam}, setup.quick)
        module = dict(model.named_modules())[layer]
        targets = [ClassifierOutputTarget(c) for c in classes]
        with pytorch_grad_cam.GradCAMPlusPlus(model=model, target_layers=[module]) as cam:
            noise_free = torch.from_numpy(cam(input_tensor=x, targets=targets))
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills param.grad
    rel = _rel(_minmax(_minmax(ours(0.0))), noise_free)
    note = (
        f"{n} copies, noise std {std} (input units); agreement without noise vs pytorch-grad-cam GradCAMPlusPlus "
        "(ours min-max normalised twice); torchcam's weights differ by design (docstring)"
    )
    return [_row(setup, f"{method} {layer!r} (n_samples={n})", "torchcam SmoothGradCAMpp", measured, "peer", rel, note)]


COMPARISONS: dict[str, Callable[[Setup, str], list[Row]]] = {
    "guided_backprop": _modified_backward,
    "deconvnet": _modified_backward,
    "lrp": _lrp,
    "deeplift": _deeplift,
    "deeplift_shap": _deeplift_shap,
    **{method: _pytorch_grad_cam for method in PGC_CAMS},
    "cam": _torchcam,
    "occlusion": _occlusion,
    "lime": _surrogate,
    "kernel_shap": _surrogate,
    "gradient_shap": _gradient_shap,
    "noise_tunnel": _noise_tunnel,
    "smoothgrad_sq": _noise_tunnel,
    "vargrad": _noise_tunnel,
    "full_grad": _full_grad,
    "guided_grad_cam": _guided_grad_cam,
    "feature_ablation": _feature_groups,
    "feature_permutation": _feature_groups,
    "shapley_value_sampling": _feature_groups,
    "smooth_grad_cam_plus_plus": _smooth_grad_cam_plus_plus,
    "layer_gradient_x_activation": _layer,
    "layer_integrated_gradients": _layer,
    "layer_conductance": _layer,
}
"""Method name -> its comparison; a registered method runs only if it is here (and not covered elsewhere)."""


# ----------------------------------------------------------------------------------------------- section


def run(quick: bool, device: str = "cpu") -> str:
    batch = 4 if quick else 64
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[Row] = []
    skipped: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
        warnings.filterwarnings("ignore", message=".*(hooks|inplace|in-place).*")
        for model_name, ctor, shape, layer in MODELS:
            torch.manual_seed(0)
            model = ctor().eval().to(device)
            x = _images(batch, shape).to(device)
            with torch.no_grad():
                t = model(x).argmax(dim=1)
            setup = Setup(model_name, model, x, t, layer, quick)
            for method in METHODS:
                if method in COVERED:
                    continue
                if method not in COMPARISONS:
                    skipped.setdefault(method, []).append("no comparison written yet")
                    continue
                try:
                    rows += COMPARISONS[method](setup, method)
                except NotCompared as reason:
                    skipped.setdefault(method, []).append(f"{model_name}: {reason}")
                except Exception as error:  # a method that fails is reported, and the other rows still run
                    traceback.print_exc(file=sys.stderr)
                    skipped.setdefault(method, []).append(f"{model_name}: failed ({type(error).__name__}: {error})")
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    table = comparison_table(rows)

    def describe(r: Row) -> str:
        return f"{r['model']}, {r['method']} vs {r['peer']}: {float(r['ratio']):.2f}x"  # type: ignore[arg-type]

    significant = [r for r in rows if float(r["upper"]) < 1.0]  # type: ignore[arg-type]
    slower = [r for r in rows if float(r["ratio"]) < 1.0]  # type: ignore[arg-type]
    worst = min(rows, key=lambda r: float(r["ratio"]), default=None)  # type: ignore[arg-type]
    target_line = (
        f"- never measurably slower than the reference peer: **{'MET' if not significant else 'MISSED'}**, judged "
        "as in the attribution section: for no row is the one-sided 95% upper confidence bound of the median "
        "per-round peer / ours ratio below 1.0x"
        f"{'' if not significant else ' - it is for ' + '; '.join(describe(r) for r in significant)}. "
        f"{len(slower)} of {len(rows)} rows have a median below 1.0x"
        f"{'' if worst is None else '; worst: ' + describe(worst)}."
    )
    if quick:
        target_line += " (`--quick`: one call of each side per row, no warm-up, so no row can be judged.)"

    covered = [method for method in METHODS if method in COVERED]
    without = [f"`{method}` ({COVERED[method]})" for method in covered]
    without += [f"`{method}` ({'; '.join(reasons)})" for method, reasons in skipped.items()]
    lines = [
        "## Method catalogue vs reference peers",
        "",
        f"On the {device.upper()}. Every registered attribution method not timed in the attribution section, against "
        "its reference implementation on the same inputs: random-weight `mnist_cnn()` (CAM layer `'3'`) and "
        f"`cifar_resnet()` (CAM layer `'layer3'`), eval mode, a batch of {batch} uniform images, targets = predicted "
        "classes computed once; methods that cost many forwards per image run on the first few (in the row). Times "
        f"are medians of *runs* interleaved repeats after one warm-up call each (full runs aim at about "
        f"{ROUND_BUDGET_S:g} s of timed rounds per comparison, {MIN_REPEATS} to {MAX_REPEATS} repeats). "
        "*peer / ours* > 1 means we are faster (*per round*: lowest and highest ratio of calls made back to back); "
        "*max rel diff* is `max|ours - peer| / max|peer|` after the normalisation the note names (0: bit-identical). "
        "How each peer is called is in the docstring of `benchmarks/bench_catalogue.py`.",
        "",
        table,
        "",
        "Targets:",
        "",
        target_line,
        "",
        f"Registered methods without a row here: {', '.join(without) if without else 'none'}.",
        "",
        f"Section runtime {elapsed:.0f} s; load average {load_before:.1f} before, {load_after:.1f} after "
        f"({os.cpu_count()} cores): other work on the machine inflates times, ratios are interleaved.",
    ]
    return "\n".join(lines)
