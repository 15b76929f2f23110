"""Attribution section: our gradient methods and Grad-CAM vs Captum and pytorch-grad-cam on the same inputs.

Two models with random weights (fixed seed, eval mode): ``mnist_cnn()`` on 1 x 28 x 28 images and ``cifar_resnet()``
on 3 x 32 x 32 images. The images are uniform in [0, 1] with one pixel set to 0 and one to 1 in every sample, so each
sample's value range equals the batch's (which makes SmoothGrad's noise definitions comparable, see below). The
targets are the predicted classes, computed once. Each comparison times ours and the peers side by side
(interleaved repeats, medians) and reports agreement as ``max|ours - peer| / max|peer|``:

- ``gradient`` vs Captum ``Saliency(model).attribute(x, target=t, abs=False)``;
- ``smoothgrad`` (16 samples, noise 0.15 x per-sample range, own generator) vs Captum ``NoiseTunnel(Saliency)``
  (``nt_type="smoothgrad"``, 16 samples, ``stdevs=0.15``). Captum's ``stdevs`` is one float per input tensor, not per
  sample; since every sample spans [0, 1] the two noise distributions are the same, but the draws are not (Captum
  draws from the global RNG, sample-major; ours from its generator, copy-major), so agreement is checked on single
  images with both RNGs seeded alike, where the noise tensors coincide bit for bit;
- ``integrated_gradients`` (32 steps, zero baseline) vs Captum ``IntegratedGradients``, both with
  ``riemann_trapezoid`` and both with ``gausslegendre`` (our default), same ``internal_batch_size``;
- ``grad_cam(..., upsample=True)`` vs Captum ``LayerGradCam`` (``relu_attributions=True``) +
  ``LayerAttribution.interpolate(..., "bilinear")`` and vs pytorch-grad-cam ``GradCAM`` with
  ``ClassifierOutputTarget`` targets (which min-max normalises each map and returns numpy: ours is normalised the
  same way per sample before comparing);
- one ``attribution_pass`` yielding gradient, input x gradient and Grad-CAM (one layer, then two) vs Captum's
  ``Saliency``, ``InputXGradient`` and ``LayerGradCam`` called one by one.

SmoothGrad and integrated gradients cost 16 and 32 forward/backward passes per image, so they run on the first
8 of the 64 images (128 and 256 images per call) to keep the section under about 90 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable

import _timing
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from lightning_interp.demo import cifar_resnet, mnist_cnn
from lightning_interp.methods import (
    attribution_pass,
    cam_from_activation,
    get_module,
    grad_cam,
    gradient,
    integrated_gradients,
    rank_correlation,
    smoothgrad,
)

N_SAMPLES = 16
NOISE_LEVEL = 0.15
N_STEPS = 32
TARGET_SINGLE_PASS = 2.0
MIN_REPEATS, MAX_REPEATS, ROUND_BUDGET_S = 5, 25, 4.0  # timed repeats per comparison (full runs)
NOISE_CHECK_IMAGES = 2  # single images on which the SmoothGrad noise of both libraries coincides exactly

# (name, constructor, input shape, Grad-CAM layer, two Grad-CAM layers for the single pass)
MODELS: tuple[tuple[str, Callable[[], nn.Module], tuple[int, ...], str, tuple[str, str]], ...] = (
    ("mnist_cnn", mnist_cnn, (1, 28, 28), "3", ("1", "3")),
    ("cifar_resnet", cifar_resnet, (3, 32, 32), "layer3", ("layer2", "layer3")),
)


def _images(batch: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Uniform [0, 1] images in which every sample spans exactly [0, 1] (per-sample range == global range)."""
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed))
    flat = x.view(batch, -1)
    flat[:, 0] = 0.0
    flat[:, -1] = 1.0
    return x


def _rel(ours: Tensor, peer: Tensor) -> float:
    """max|ours - peer| / max|peer|, in float64 (on the CPU)."""
    a, b = ours.detach().double().cpu(), peer.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _minmax(cam: Tensor) -> Tensor:
    """pytorch-grad-cam's per-map normalisation: (c - min) / (1e-7 + max(c - min))."""
    flat = cam.reshape(cam.shape[0], -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (1e-7 + flat.max(dim=1, keepdim=True).values)).reshape(cam.shape)


def _keeping(
    results: dict[str, object], times: dict[str, list[float]], key: str, fn: Callable[[], object]
) -> Callable[[], None]:
    """``fn`` that stores its last result (so agreement needs no extra call) and the duration of every call."""

    def call() -> None:
        _timing.synchronize()
        started = time.perf_counter()
        results[key] = fn()
        _timing.synchronize()
        times.setdefault(key, []).append(time.perf_counter() - started)

    return call


def _time(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, object], int, dict[str, list[float]]]:
    """Interleaved medians in ms, each function's last result, the number of timed repeats, and each timed call."""
    results: dict[str, object] = {}
    times: dict[str, list[float]] = {}
    wrapped = {key: _keeping(results, times, key, fn) for key, fn in fns.items()}
    seconds = _timing.interleaved_medians(wrapped, repeats=repeats)
    rounds = {key: values[1:] for key, values in times.items()}  # the first call of each is the warm-up
    return {key: 1000 * value for key, value in seconds.items()}, results, repeats, rounds


def _spread(rounds: dict[str, list[float]], ours: str, peer: str) -> tuple[float, float, float]:
    """Lowest and highest peer / ours ratio over the interleaved rounds (each round's calls run back to back), and
    a one-sided 95% upper confidence bound for the median ratio (:func:`_median_upper_bound`)."""
    ratios = [p / o for o, p in zip(rounds[ours], rounds[peer], strict=True)]
    return min(ratios), max(ratios), _median_upper_bound(ratios)


def _median_upper_bound(values: list[float], level: float = 0.95) -> float:
    """Distribution-free one-sided upper confidence bound for the median (binomial order statistic).

    The j-th largest value exceeds the median with probability ``1 - P(Binomial(n, 1/2) <= j - 1)``; the largest j
    whose miss probability stays within ``1 - level`` is used (j = 1, the maximum, for 5 to 7 rounds).
    """
    n, ordered = len(values), sorted(values)
    if 0.5**n > 1 - level:  # fewer than 5 rounds: even the maximum is no such bound
        return math.inf
    j, miss = 1, 0.5**n
    while miss + math.comb(n, j) * 0.5**n <= 1 - level:
        miss += math.comb(n, j) * 0.5**n
        j += 1
    return ordered[n - j]


def _model_rows(
    name: str,
    model: nn.Module,
    x: Tensor,
    layer: str,
    two_layers: tuple[str, str],
    multi_batch: int,
    quick: bool,
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    def row(
        method: str,
        peer: str,
        ours_ms: float,
        peer_ms: float,
        runs: int,
        spread: tuple[float, float, float],
        rel: float,
        note: str,
        same: bool,
    ) -> None:
        rows.append(
            {
                "model": name,
                "method": method,
                "peer": peer,
                "ours_ms": ours_ms,
                "peer_ms": peer_ms,
                "runs": runs,
                "ratio": peer_ms / ours_ms,
                "spread": f"{spread[0]:.2f}-{spread[1]:.2f}",
                "upper": spread[2],
                "rel": rel,
                "note": note,
                "same_method_vs_captum": same,
            }
        )

    with torch.no_grad():
        t = model(x).argmax(dim=1)  # the predicted classes, computed once
    size = tuple(x.shape[-2:])
    module = get_module(model, layer)

    # Repeats: about ROUND_BUDGET_S of timed rounds per comparison, predicted from the cost of one image's forward
    # and backward; cheap comparisons get many repeats (their medians are otherwise at the mercy of the machine's
    # load), the expensive IG rounds the minimum.
    gradient(model, x, t)
    started = time.perf_counter()
    gradient(model, x, t)
    pass_s = (time.perf_counter() - started) / len(x)

    def repeats(image_passes_per_round: int) -> int:
        if quick:
            return 1
        return max(MIN_REPEATS, min(MAX_REPEATS, round(ROUND_BUDGET_S / (pass_s * image_passes_per_round))))

    # plain gradient
    saliency = Saliency(model)
    ms, out, runs, rounds = _time(
        {
            "ours": lambda: gradient(model, x, t),
            "captum": lambda: saliency.attribute(x, target=t, abs=False),
        },
        repeats(2 * len(x)),
    )
    gradient_ms = ms
    row(
        "gradient",
        "Captum Saliency(abs=False)",
        ms["ours"],
        ms["captum"],
        runs,
        _spread(rounds, "ours", "captum"),
        _rel(out["ours"], out["captum"]),
        "",
        True,
    )

    # SmoothGrad: time on the multi-sample batch, agreement on single images with identical noise
    xs, ts = x[:multi_batch], t[:multi_batch]
    tunnel = NoiseTunnel(Saliency(model))
    std = NOISE_LEVEL * float(xs.max() - xs.min())  # == NOISE_LEVEL * each sample's range, by construction

    cpu_model = model if x.device.type == "cpu" else copy.deepcopy(model).cpu()
    cpu_tunnel = NoiseTunnel(Saliency(cpu_model))

    def ours_sg(inputs: Tensor, target: Tensor, seed: int, net: nn.Module = model) -> Tensor:
        g = torch.Generator(device=inputs.device).manual_seed(seed)
        return smoothgrad(net, inputs, target, n_samples=N_SAMPLES, noise_level=NOISE_LEVEL, generator=g)

    def captum_sg(inputs: Tensor, target: Tensor, nt: NoiseTunnel = tunnel) -> Tensor:
        return nt.attribute(inputs, nt_type="smoothgrad", nt_samples=N_SAMPLES, stdevs=std, target=target, abs=False)

    with torch.random.fork_rng():  # Captum draws from the global RNG; leave it as it was for the other sections
        torch.manual_seed(0)
        ms, _, runs, rounds = _time(
            {"ours": lambda: ours_sg(xs, ts, 0), "captum": lambda: captum_sg(xs, ts)},
            repeats(2 * N_SAMPLES * multi_batch),
        )
        rel = 0.0
        xc, tc = xs.cpu(), ts.cpu()  # identical noise needs the same RNG on both sides: checked on the CPU
        for i in range(min(NOISE_CHECK_IMAGES, multi_batch)):
            seed = 100 + i
            torch.manual_seed(seed)
            reference = captum_sg(xc[i : i + 1], tc[i : i + 1], cpu_tunnel)
            rel = max(rel, _rel(ours_sg(xc[i : i + 1], tc[i : i + 1], seed, cpu_model), reference))
    row(
        f"smoothgrad (n={N_SAMPLES}, {multi_batch} images)",
        "Captum NoiseTunnel(Saliency)",
        ms["ours"],
        ms["captum"],
        runs,
        _spread(rounds, "ours", "captum"),
        rel,
        f"same noise std; agreement on {NOISE_CHECK_IMAGES} single images with identical noise draws",
        True,
    )

    # integrated gradients, zero baseline, same internal batch size (two chunks of 16 steps)
    ibs = multi_batch * N_STEPS // 2
    ig = IntegratedGradients(model)

    def ours_ig(method: str) -> Tensor:
        return integrated_gradients(model, xs, ts, n_steps=N_STEPS, method=method, internal_batch_size=ibs)

    def captum_ig(method: str) -> Tensor:
        return ig.attribute(xs, baselines=0, target=ts, n_steps=N_STEPS, method=method, internal_batch_size=ibs)

    ms, out, runs, rounds = _time(
        {
            "ours_trapz": lambda: ours_ig("riemann_trapezoid"),
            "captum_trapz": lambda: captum_ig("riemann_trapezoid"),
            "ours_gl": lambda: ours_ig("gausslegendre"),
            "captum_gl": lambda: captum_ig("gausslegendre"),
        },
        repeats(4 * N_STEPS * multi_batch),
    )
    # Captum's trapezoid weights are 1/n (ends 1/(2n)) on nodes linspace(0, 1, n), summing to (n - 1)/n, not 1
    scaled = _rel(out["ours_trapz"] * ((N_STEPS - 1) / N_STEPS), out["captum_trapz"])
    row(
        f"integrated_gradients trapezoid (n={N_STEPS}, {multi_batch} images)",
        "Captum IntegratedGradients trapezoid",
        ms["ours_trapz"],
        ms["captum_trapz"],
        runs,
        _spread(rounds, "ours_trapz", "captum_trapz"),
        _rel(out["ours_trapz"], out["captum_trapz"]),
        f"Captum's trapezoid weights sum to (n-1)/n; ours x (n-1)/n vs Captum: {scaled:.2g}",
        True,
    )
    row(
        f"integrated_gradients gausslegendre (n={N_STEPS}, {multi_batch} images)",
        "Captum IntegratedGradients gausslegendre",
        ms["ours_gl"],
        ms["captum_gl"],
        runs,
        _spread(rounds, "ours_gl", "captum_gl"),
        _rel(out["ours_gl"], out["captum_gl"]),
        "",
        True,
    )

    # Grad-CAM, upsampled to the input size
    layer_cam = LayerGradCam(model, module)
    targets = [ClassifierOutputTarget(int(c)) for c in t]

    def captum_cam() -> Tensor:
        cam = layer_cam.attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")[:, 0]

    def pgc_cam() -> Tensor:
        with GradCAM(model=model, target_layers=[module]) as cam:  # hooks live only inside the call, as ours do
            return torch.from_numpy(cam(input_tensor=x, targets=targets))

    ms, out, runs, rounds = _time(
        {"ours": lambda: grad_cam(model, x, t, layer, upsample=True), "captum": captum_cam, "pgc": pgc_cam},
        repeats(3 * len(x)),
    )
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills param.grad
    cam_ms = ms
    row(
        f"grad_cam {layer!r}",
        "Captum LayerGradCam + interpolate",
        ms["ours"],
        ms["captum"],
        runs,
        _spread(rounds, "ours", "captum"),
        _rel(out["ours"], out["captum"]),
        "",
        True,
    )
    row(
        f"grad_cam {layer!r}",
        "pytorch-grad-cam GradCAM",
        ms["ours"],
        ms["pgc"],
        runs,
        _spread(rounds, "ours", "pgc"),
        _rel(_minmax(_minmax(out["ours"])), out["pgc"]),
        "ours min-max normalised twice per map, as pytorch-grad-cam does",
        False,
    )

    # one pass for gradient + input x gradient + Grad-CAM vs Captum's separate calls
    input_x_gradient = InputXGradient(model)
    for layers in ((layer,), two_layers):
        cams = [LayerGradCam(model, get_module(model, name)) for name in layers]

        def ours_pass(layers: tuple[str, ...] = layers) -> list[Tensor]:
            result = attribution_pass(model, x, t, layers=layers)
            grad = result.input_grad
            assert grad is not None
            maps = [
                cam_from_activation(a, g, output_size=size)
                for a, g in zip(result.activations, result.activation_grads, strict=True)
            ]
            return [grad, x * grad, *maps]

        def captum_calls(cams: list[LayerGradCam] = cams) -> list[Tensor]:
            grad = saliency.attribute(x, target=t, abs=False)
            ixg = input_x_gradient.attribute(x, target=t)
            maps = [
                LayerAttribution.interpolate(c.attribute(x, target=t, relu_attributions=True), size, "bilinear")[:, 0]
                for c in cams
            ]
            return [grad, ixg, *maps]

        ms, out, runs, rounds = _time({"ours": ours_pass, "captum": captum_calls}, repeats((3 + len(layers)) * len(x)))
        rel = max(_rel(a, b) for a, b in zip(out["ours"], out["captum"], strict=True))  # type: ignore[call-overload]
        note = "worst of the outputs"
        if len(layers) == 1:
            # Captum runs two full gradient passes plus one Grad-CAM pass (whose backward stops at the layer);
            # ours costs about one gradient pass: the ratio the work allows, from the rows above
            bound = (2 * gradient_ms["captum"] + cam_ms["captum"]) / gradient_ms["ours"]
            note += f"; work bound (2 Saliency + LayerGradCam) / our gradient = {bound:.2f}x"
        row(
            f"attribution_pass: gradient + input x gradient + Grad-CAM {', '.join(repr(n) for n in layers)}",
            f"Captum, {2 + len(layers)} separate calls",
            ms["ours"],
            ms["captum"],
            runs,
            _spread(rounds, "ours", "captum"),
            rel,
            note,
            False,
        )
    return rows


def _map_score_rows(device: str, quick: bool) -> list[list[object]]:
    """Our Spearman rank correlation of maps vs torchmetrics' on the same maps (the stability score)."""
    from torchmetrics.functional import spearman_corrcoef

    rows: list[list[object]] = []
    for side, ties in ((32, False), (224, False), (224, True)):
        if quick and side > 32:
            continue
        g = torch.Generator().manual_seed(side)
        a, b = torch.rand(8, side, side, generator=g), torch.rand(8, side, side, generator=g)
        if ties:  # ReLU'd, upsampled Grad-CAM maps have many equal values
            a, b = (a * 20).round().clamp_min(8), (b * 20).round().clamp_min(8)
        a, b = a.to(device), b.to(device)

        def theirs(a: Tensor = a, b: Tensor = b) -> Tensor:
            return spearman_corrcoef(a.reshape(8, -1).T.double(), b.reshape(8, -1).T.double())

        ms, out, runs, _ = _time(
            {"ours": lambda a=a, b=b: rank_correlation(a, b), "torchmetrics": theirs}, 1 if quick else 7
        )
        rows.append(
            [
                f"8 maps of {side} x {side}{', many ties' if ties else ''}",
                runs,
                ms["ours"],
                ms["torchmetrics"],
                ms["torchmetrics"] / ms["ours"],
                float((out["ours"].cpu().double() - out["torchmetrics"].cpu().double()).abs().max()),
            ]
        )
    return rows


COLUMNS = ("model", "method", "peer", "runs", "ours_ms", "peer_ms", "ratio", "spread", "rel", "note")
HEADER = ["model", "ours", "peer", "runs", "ours ms", "peer ms", "peer / ours", "per round", "max rel diff", "note"]


def comparison_table(rows: list[dict[str, object]]) -> str:
    """The markdown table of ours-vs-peer rows (the attribution and catalogue sections share it)."""
    return _timing.markdown_table(HEADER, [[r[key] for key in COLUMNS] for r in rows])


def run(quick: bool, device: str = "cpu") -> str:
    batch, multi_batch = (4, 2) if quick else (64, 8)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[dict[str, object]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
        for name, ctor, shape, layer, two_layers in MODELS:
            torch.manual_seed(0)
            model = ctor().eval().to(device)
            x = _images(batch, shape).to(device)
            rows += _model_rows(name, model, x, layer, two_layers, multi_batch, quick)
    score_rows = _map_score_rows(device, quick)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    table = comparison_table(rows)
    same = [r for r in rows if r["same_method_vs_captum"]]
    worst_same = min(same, key=lambda r: float(r["ratio"]))  # type: ignore[arg-type]
    single = [r for r in rows if str(r["method"]).startswith("attribution_pass")]
    worst_single = min(single, key=lambda r: float(r["ratio"]))  # type: ignore[arg-type]
    worst_single_ratio = float(worst_single["ratio"])  # type: ignore[arg-type]

    def describe(r: dict[str, object]) -> str:
        return f"{r['model']}, {r['method']} vs {r['peer']}: {float(r['ratio']):.2f}x"  # type: ignore[arg-type]

    slower = [r for r in same if float(r["ratio"]) < 1.0]  # type: ignore[arg-type]
    significant = [r for r in same if float(r["upper"]) < 1.0]  # type: ignore[arg-type]
    same_line = (
        f"- never slower than Captum on the same method: **{'MET' if not significant else 'MISSED'}**, judged as "
        "*not measurably slower*: for no same-method row is the one-sided 95% upper confidence bound of the "
        "median per-round ratio (a binomial order statistic of the back-to-back rounds) below 1.0x"
        f"{'' if not significant else ' - it is for ' + '; '.join(describe(r) for r in significant)}. "
        f"Worst median ratio: {describe(worst_same)}; {len(slower)} of {len(same)} same-method rows have a median "
        "below 1.0x. Both sides run the same forward and backward passes, so ratios near 1.0x are what the work "
        "allows, and the side that wins a given row changes from run to run; a strict 'every median >= 1.0x' is "
        f"{'met too' if not slower else 'not met in this run'}."
    )
    single_line = (
        f"- one `attribution_pass` at least {TARGET_SINGLE_PASS:.0f}x faster than Captum's separate calls: "
        f"**{'MET' if worst_single_ratio >= TARGET_SINGLE_PASS else 'MISSED'}** (worst: {describe(worst_single)})."
    )
    if worst_single_ratio < TARGET_SINGLE_PASS:
        single_line += (
            " Captum's separate calls are two full gradient passes plus Grad-CAM passes whose backward stops at the "
            "layer (nearly free for a late layer such as `layer3`), so the work allows only about "
            "(2 Saliency + LayerGradCam) / gradient, given in the note column; below that, timing noise."
        )

    lines = [
        "## Attribution vs peers",
        "",
        f"On the {device.upper()}. "
        "Random-weight `mnist_cnn()` (1 x 28 x 28, Grad-CAM layer `'3'`, the ReLU after conv2, 24 x 24; `'4'` is "
        f"the max-pool) and `cifar_resnet()` (3 x 32 x 32, Grad-CAM layer `'layer3'`, 8 x 8), eval mode, a batch of "
        f"{batch} uniform images (each spanning exactly [0, 1]), targets = predicted classes computed once. "
        f"SmoothGrad and integrated gradients run on the first {multi_batch} images ({N_SAMPLES} noisy copies, "
        f"{N_STEPS} steps, `internal_batch_size={multi_batch * N_STEPS // 2}` for both libraries; at 64 images one "
        "IG call on the ResNet takes seconds). Times are medians of *runs* interleaved repeats after one warm-up "
        f"round (full runs aim at about {ROUND_BUDGET_S:g} s of timed rounds per comparison, predicted from the "
        f"time of one gradient call, with {MIN_REPEATS} to {MAX_REPEATS} repeats). *peer / ours* > 1 means we are "
        "faster (ratio of the medians; *per round*: lowest and highest ratio of calls made back to back); "
        "*max rel diff* is `max|ours - peer| / max|peer|` (0 means bit-identical).",
        "",
        table,
        "",
        "Targets:",
        "",
        same_line,
        single_line,
        "",
        "Map scores: the stability score is a Spearman rank correlation per map, where torchmetrics has "
        "`spearman_corrcoef`; ours (`rank_correlation`, ties averaged, float64) is kept only if measurably faster:",
        "",
        _timing.markdown_table(
            ["maps", "runs", "ours ms", "torchmetrics ms", "torchmetrics / ours", "max abs diff"], score_rows
        ),
        "",
        "Notes:",
        "",
        "- SmoothGrad: Captum's `stdevs` is one absolute std per input tensor, ours is `noise_level` x each sample's "
        "range; the inputs are built so both give std 0.15. The noise draws differ on a batch, so agreement is "
        "measured on single images with the global RNG and our generator seeded alike (the noise tensors are then "
        "identical); on a batch only the noise-free expectation is shared, and Monte-Carlo error dominates.",
        "- Integrated gradients, trapezoid: Captum puts weights 1/n (1/(2n) at the ends) on the nodes "
        "linspace(0, 1, n), which sum to (n - 1)/n, so its attributions are (n - 1)/n = "
        f"{(N_STEPS - 1) / N_STEPS:.4f} of the trapezoid rule's: a completeness bias of -1/n of f(x) - f(0) on top of "
        "the discretisation error. Ours weights the same nodes by their spacing 1/(n - 1). After that scale factor "
        "the two agree to float32 rounding (note column).",
        "- pytorch-grad-cam differentiates a summed score with `loss.backward()`, so it also computes every "
        "parameter's gradient, and moves activations and gradients to numpy and resizes each map with cv2. It "
        "min-max normalises twice, `(c - min) / (1e-7 + max)` before its resize and again after: with random "
        "weights a raw map spans only ~1e-4, where the 1e-7 is not negligible (one normalisation of ours differs by "
        "~3e-3), so ours is normalised twice too; what remains is float32 rounding in numpy and cv2.",
        f"- Section runtime {elapsed:.0f} s; load average {load_before:.1f} before, {load_after:.1f} after "
        f"({os.cpu_count()} cores): other work on the machine inflates times, ratios are interleaved.",
    ]
    return "\n".join(lines)
