"""Is an explanation any good? Faithfulness (deletion / insertion, removing the top pixels), complexity (sparseness),
robustness (max-sensitivity) and the end point of the model-randomisation sanity test, as pure functions.

Maps are (B, H, W), one value per pixel of (B, C, H, W) images (channels are
removed together). Every function returns one value per sample (or one curve
per sample), so callers can average or inspect them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.evaluation.map_metrics import rank_correlation
from lightning_interp.methods.model.core import OutputTransform, eager_forward, modes_preserved, scores_from_output
from lightning_interp.methods.model.tasks import target_scores

__all__ = [
    "QUALITY_COLUMNS",
    "REMOVAL_BASELINES",
    "average_drop",
    "cascading_randomization",
    "curve_auc",
    "increase_in_confidence",
    "masked_confidence",
    "max_sensitivity",
    "perturbation_curve",
    "rank_methods",
    "removal_baseline",
    "sanity_similarity",
    "sparseness",
    "target_probability",
    "top_fraction_drop",
]

REMOVAL_BASELINES = ("blur", "mean", "zero")
"""What a removed pixel becomes: the image blurred (Petsiuk et al. 2018), the image's per-channel mean, or zero."""


def removal_baseline(inputs: Tensor, baseline: str | Tensor = "blur", *, sigma: float | None = None) -> Tensor:
    """The image every removed pixel is replaced from, shaped like ``inputs`` (B, C, H, W).

    Args:
        inputs: images (B, C, H, W).
        baseline: ``"blur"`` (a Gaussian blur of the image: removing a pixel removes its detail, not its colour,
            so the result stays close to the images the model saw), ``"mean"`` (each image's per-channel mean),
            ``"zero"``, or a tensor broadcastable to ``inputs``.
        sigma: the blur's standard deviation in pixels (default ``max(1, max(H, W) / 16)``: 2 px at 32 x 32,
            14 px at 224 x 224).

    Example:
        >>> x = torch.rand(2, 3, 16, 16)
        >>> removal_baseline(x, "mean")[0, 0].std().item() < 1e-6, removal_baseline(x).shape
        (True, torch.Size([2, 3, 16, 16]))
    """
    if inputs.ndim != 4:
        raise ValueError(f"removal_baseline needs images (B, C, H, W), got {tuple(inputs.shape)}.")
    if isinstance(baseline, Tensor):
        return baseline.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if baseline != "blur":
        raise ValueError(f"baseline must be one of {REMOVAL_BASELINES} or a tensor, got {baseline!r}.")
    height, width = inputs.shape[-2:]
    sigma = max(1.0, max(height, width) / 16) if sigma is None else float(sigma)
    radius = max(1, min(math.ceil(3 * sigma), (min(height, width) - 1)))
    offsets = torch.arange(-radius, radius + 1, device=inputs.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(inputs.dtype)
    channels = inputs.shape[1]
    blurred = F.pad(inputs, (radius, radius, 0, 0), mode="reflect")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    blurred = F.pad(blurred, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def target_probability(scores: Tensor, target: Tensor, task: str = "multiclass") -> Tensor:
    """(B,) the model's probability of each sample's target: softmax (multi-class), sigmoid of the target side
    (binary), sigmoid of the label's score (multi-label), the raw output (regression).

    Example:
        >>> target_probability(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item()
        0.5
    """
    scores = scores.float()
    if task == "multiclass":
        return scores.softmax(dim=1).gather(1, target[:, None])[:, 0]
    if task in ("binary", "multilabel"):
        return torch.sigmoid(target_scores(scores, target, task))
    return target_scores(scores, target, task)


def _predict(
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    output_transform: OutputTransform | None,
    task: str,
    batch_size: int,
) -> Tensor:
    """Target probabilities of ``images`` in eval mode without gradients, ``batch_size`` images per forward."""
    parts = []
    with torch.no_grad(), modes_preserved(model), eager_forward():
        for start in range(0, images.shape[0], batch_size):
            scores = scores_from_output(model(images[start : start + batch_size]), output_transform)
            parts.append(target_probability(scores, target[start : start + batch_size], task))
    return torch.cat(parts)


def _check(inputs: Tensor, maps: Tensor) -> None:
    if inputs.ndim != 4 or maps.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(
            f"Need images (B, C, H, W) and one map per image (B, H, W); got {tuple(inputs.shape)} and "
            f"{tuple(maps.shape)}."
        )


def _as_target(target: Tensor | int, count: int, device: torch.device) -> Tensor:
    if isinstance(target, Tensor):
        return target.to(device).long().reshape(count)
    return torch.full((count,), int(target), dtype=torch.long, device=device)


def perturbation_curve(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: Tensor | int,
    *,
    mode: str = "deletion",
    steps: int = 16,
    baseline: str | Tensor = "blur",
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
    batch_size: int = 256,
) -> Tensor:
    """The target's probability as pixels are removed (deletion) or added (insertion) in the map's order.

    Deletion (Petsiuk et al. 2018; "pixel flipping", Samek et al. 2017)
    replaces the most relevant pixels first by the baseline, in ``steps``
    equal parts of the image, so a faithful map makes the probability fall
    fast (a low area under the curve). Insertion starts from the baseline and
    puts the most relevant pixels back first, so a faithful map makes it rise
    fast (a high area). Every step of every sample goes through the model in
    batches of ``batch_size``, in eval mode, without gradients; ties in the
    map keep the pixels' order (a stable sort).

    Args:
        model: the network; ``output_transform`` picks its (B, C) scores.
        inputs: images (B, C, H, W).
        maps: (B, H, W) relevance per pixel (higher: more relevant).
        target: the class whose probability is followed, (B,) or one int.
        mode: ``"deletion"`` or ``"insertion"``.
        steps: parts the pixels are removed / added in (the curve has ``steps + 1`` points).
        baseline: see :func:`removal_baseline`.
        output_transform: maps the model output to (B, C) scores.
        task: the output kind (``"multiclass"``, ``"binary"``, ``"multilabel"``, ``"regression"``).
        batch_size: images per forward pass.

    Returns:
        (B, steps + 1) float32: point k is after k / steps of the pixels are removed (added).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(4, 3, 8, 8)
        >>> perturbation_curve(net, x, torch.rand(4, 8, 8), 0, steps=4).shape
        torch.Size([4, 5])
    """
    _check(inputs, maps)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    batch, channels, height, width = inputs.shape
    pixels = height * width
    order = torch.argsort(maps.detach().reshape(batch, pixels).float(), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=order.device).expand(batch, -1))
    counts = torch.tensor([round(k * pixels / steps) for k in range(steps + 1)], device=inputs.device)
    # (steps + 1, B, H * W): whether each pixel is removed at step k (deletion) or still missing (insertion)
    removed = rank[None] < counts[:, None, None]
    if mode == "insertion":
        removed = ~removed
    source = inputs.detach()
    filler = removal_baseline(source, baseline)
    mask = removed.reshape(steps + 1, batch, 1, height, width)
    images = torch.where(mask, filler[None], source[None]).reshape((steps + 1) * batch, channels, height, width)
    targets = _as_target(target, batch, inputs.device).repeat(steps + 1)
    probabilities = _predict(model, images, targets, output_transform, task, batch_size)
    return probabilities.reshape(steps + 1, batch).T.contiguous()


def curve_auc(curve: Tensor) -> Tensor:
    """(B,) area under (B, K + 1) curves sampled evenly on [0, 1] (trapezoidal rule): the mean height.

    Example:
        >>> curve_auc(torch.tensor([[1.0, 0.5, 0.0]])).item()
        0.5
    """
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve_auc needs (B, K + 1) curves with at least two points, got {tuple(curve.shape)}.")
    values = curve.double()
    return (values[:, :-1] + values[:, 1:]).sum(dim=1) / (2 * (values.shape[1] - 1))


def top_fraction_drop(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: Tensor | int,
    *,
    fraction: float = 0.2,
    baseline: str | Tensor = "blur",
    generator: torch.Generator | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """The fall in the target's probability when the map's top ``fraction`` of pixels is removed, and when the same
    number of random pixels is (the chance level that tells whether the map's choice matters).

    Args:
        model: the network.
        inputs: images (B, C, H, W).
        maps: (B, H, W) relevance per pixel.
        target: the class followed, (B,) or one int.
        fraction: share of the pixels removed.
        baseline: see :func:`removal_baseline`.
        generator: draws the random pixels (default: a fresh generator seeded 0; the global RNG is never used).
        output_transform: maps the model output to (B, C) scores.
        task: the output kind.
        batch_size: images per forward pass.

    Returns:
        ``(top_drop, random_drop)``, each (B,) float32: probability before minus after.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        >>> top, random = top_fraction_drop(net, torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8), 1)
        >>> top.shape, random.shape
        (torch.Size([3]), torch.Size([3]))
    """
    _check(inputs, maps)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}.")
    batch, _, height, width = inputs.shape
    pixels = height * width
    removed = max(1, round(fraction * pixels))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    noise = torch.rand(batch, pixels, generator=generator, device=generator.device).to(inputs.device)
    orders = [
        torch.argsort(maps.detach().reshape(batch, pixels).float(), dim=1, descending=True, stable=True),
        torch.argsort(noise, dim=1),
    ]
    source = inputs.detach()
    filler = removal_baseline(source, baseline)
    variants = [source]
    for order in orders:
        mask = torch.zeros(batch, pixels, dtype=torch.bool, device=inputs.device)
        mask.scatter_(1, order[:, :removed], True)
        variants.append(torch.where(mask.reshape(batch, 1, height, width), filler, source))
    targets = _as_target(target, batch, inputs.device).repeat(3)
    probabilities = _predict(model, torch.cat(variants), targets, output_transform, task, batch_size)
    before, top, random = probabilities.reshape(3, batch)
    return before - top, before - random


def masked_confidence(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: Tensor | int,
    *,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """The target's probability on each image and on the image multiplied by its explanation map (Chattopadhay et
    al. 2018), the two numbers :func:`average_drop` and :func:`increase_in_confidence` compare.

    Each map is rescaled to [0, 1] per sample as pytorch-grad-cam's
    ``scale_cam_image`` does (``m - min``, then divided by ``1e-7 + max``: a
    constant map becomes 0) and multiplies every channel of its image, so the
    image keeps only what the map points at (0 elsewhere, in the model's input
    units).

    Args:
        model: the network (eval mode, no gradients, ``batch_size`` images per forward).
        inputs: images (B, C, H, W).
        maps: (B, H, W) relevance per pixel.
        target: the class followed, (B,) or one int.
        output_transform: maps the model output to (B, C) scores.
        task: the output kind (the probability is :func:`target_probability`'s).
        batch_size: images per forward pass.

    Returns:
        ``(original, masked)``: (B,) float32 probabilities of the target.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2, bias=False))
        >>> before, after = masked_confidence(net, torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4), 0)
        >>> after.tolist()  # a constant map keeps nothing: zero images, zero logits, probability 1/2
        [0.5, 0.5]
    """
    _check(inputs, maps)
    flat = maps.detach().reshape(maps.shape[0], -1).float()
    shifted = flat - flat.amin(dim=1, keepdim=True)
    scaled = (shifted / (1e-7 + shifted.amax(dim=1, keepdim=True))).reshape(maps.shape)
    source = inputs.detach()
    masked = source * scaled[:, None].to(device=source.device, dtype=source.dtype)
    targets = _as_target(target, inputs.shape[0], inputs.device).repeat(2)
    probabilities = _predict(model, torch.cat([source, masked]), targets, output_transform, task, batch_size)
    original, kept = probabilities.reshape(2, inputs.shape[0])
    return original, kept


def average_drop(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: Tensor | int,
    *,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
    batch_size: int = 256,
) -> Tensor:
    """(B,) the relative fall of the target's probability when the image is multiplied by its map,
    ``max(0, Y - O) / Y`` (:func:`masked_confidence`); their mean is the Average Drop of Chattopadhay et al. 2018
    (who report it in percent). Lower is better: the map keeps what the model needs.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        >>> x, keep_first = torch.ones(1, 1, 1, 2), torch.tensor([[[1.0, 0.0]]])
        >>> round(average_drop(net, x, keep_first, 0).item(), 6)  # logits (1, 0) stay (1, 0): no drop
        0.0
    """
    original, kept = masked_confidence(
        model, inputs, maps, target, output_transform=output_transform, task=task, batch_size=batch_size
    )
    return (original - kept).clamp_min(0) / original


def increase_in_confidence(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: Tensor | int,
    *,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
    batch_size: int = 256,
) -> Tensor:
    """(B,) 1.0 where the target's probability rises when the image is multiplied by its map (``O > Y``,
    :func:`masked_confidence`), else 0.0; their mean is the Increase in Confidence of Chattopadhay et al. 2018
    (in percent there). Higher is better.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> x, keep_first = torch.ones(1, 1, 1, 2), torch.tensor([[[1.0, 0.0]]])
        >>> increase_in_confidence(net, x, keep_first, 0).item()  # logits (1, 1) become (1, 0)
        1.0
    """
    original, kept = masked_confidence(
        model, inputs, maps, target, output_transform=output_transform, task=task, batch_size=batch_size
    )
    return (kept > original).float()


def sparseness(maps: Tensor) -> Tensor:
    """(B,) Gini index of each map's magnitudes (Chalasani et al. 2020): 0 for a uniform map, (n - 1) / n for a map
    with all its mass on one of n pixels. NaN for an all-zero map.

    Example:
        >>> one = torch.zeros(1, 4, 4); one[0, 0, 0] = 1.0
        >>> sparseness(torch.ones(1, 4, 4)).item(), sparseness(one).item()
        (0.0, 0.9375)
    """
    flat = maps.detach().reshape(maps.shape[0], -1).double().abs().sort(dim=1).values
    n = flat.shape[1]
    index = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device)
    return ((2 * index - n - 1) * flat).sum(dim=1) / (n * flat.sum(dim=1))


def sanity_similarity(maps: Tensor, reference_maps: Tensor) -> Tensor:
    """(B,) Spearman rank correlation between maps of the trained network and maps of the same samples on the network
    before training (the end point of the model-randomisation test, Adebayo et al. 2018).

    A method whose maps stay close to those of the untrained network (near 1)
    shows the input or the architecture, not what was learnt; a method that
    passes the test moves far from them (near 0). NaN for constant maps.

    Example:
        >>> now = torch.rand(2, 5, 5)
        >>> sanity_similarity(now, now).tolist()
        [1.0, 1.0]
    """
    if maps.shape != reference_maps.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and reference_maps {tuple(reference_maps.shape)} differ in shape.")
    return rank_correlation(maps, reference_maps.to(maps.device))


def max_sensitivity(
    explain: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    radius: float = 0.02,
    n_samples: int = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B,) the largest relative change of a map under small input noise (Yeh et al. 2019):
    ``max ||e(x + d) - e(x)|| / ||e(x)||`` over ``n_samples`` draws of ``d`` uniform in ``[-r, r]``, with ``r``
    ``radius`` times each image's value range. 0 for a map that ignores such noise.

    Args:
        explain: maps a batch of inputs to its (B, ...) explanations (the target fixed inside).
        inputs: the batch.
        radius: the noise amplitude as a share of each image's value range.
        n_samples: noise draws.
        generator: draws the noise (default: a fresh generator seeded 0; the global RNG is never used).

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> max_sensitivity(lambda batch: batch.sum(dim=1), x, radius=0.0).tolist()
        [0.0, 0.0]
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batch = inputs.shape[0]
    reference = explain(inputs).detach().reshape(batch, -1).double()
    norm = reference.norm(dim=1)
    spread = (inputs.reshape(batch, -1).amax(dim=1) - inputs.reshape(batch, -1).amin(dim=1)).reshape(
        batch, *([1] * (inputs.ndim - 1))
    )
    worst = torch.zeros(batch, dtype=torch.float64, device=inputs.device)
    for _ in range(n_samples):
        noise = torch.rand(inputs.shape, generator=generator, device=generator.device).to(inputs.device)
        perturbed = inputs + (2 * noise.to(inputs.dtype) - 1) * radius * spread
        change = (explain(perturbed).detach().reshape(batch, -1).double() - reference).norm(dim=1)
        worst = torch.maximum(worst, change / norm)
    return worst


def _parametrised_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules with parameters and ``reset_parameters``, in registration order (input side first)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if not list(module.children())
        and any(True for _ in module.parameters(recurse=False))
        and callable(getattr(module, "reset_parameters", None))
    ]


def cascading_randomization(
    model: nn.Module,
    explain: Callable[[nn.Module], Tensor],
    *,
    depth: int = 3,
    seed: int = 0,
    reference: Tensor | None = None,
) -> dict[str, Tensor]:
    """The cascading model-parameter randomisation test (Adebayo et al. 2018) on a copy of ``model``.

    The weights of the last ``depth`` parametrised layers are re-initialised
    one after the other, from the output towards the input (cumulatively, on a
    deep copy; ``model`` is never touched), and after each step the maps of
    the copy are compared with the maps of ``model``. A method whose maps stay
    similar while the top layers lose everything they learnt fails the test.

    Args:
        model: the trained network (left as it is).
        explain: maps a network to the (N, ...) maps of a fixed batch, e.g.
            ``lambda net: attribute("gradient", net, x, y).abs().sum(1)``.
        depth: how many layers, counted from the output, are randomised.
        seed: seeds the re-initialisation (the global RNG is saved and restored around it).
        reference: ``explain(model)`` when the caller has it already (saves one explanation).

    Returns:
        layer name -> (N,) Spearman rank correlation with the original maps after that layer (and all above it)
        was randomised, in the order randomised.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.rand(3, 4)
        >>> def saliency(m):
        ...     inputs = x.clone().requires_grad_(True)
        ...     return torch.autograd.grad(m(inputs)[:, 0].sum(), inputs)[0].abs()
        >>> list(cascading_randomization(net, saliency, depth=2))
        ['2', '0']
    """
    leaves = _parametrised_leaves(model)
    if not leaves:
        raise ValueError(f"{type(model).__name__} has no layer with parameters and reset_parameters() to randomise.")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}.")
    reference = (explain(model) if reference is None else reference).detach()
    randomized = copy.deepcopy(model)
    modules = dict(randomized.named_modules())
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    results: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, _ in reversed(leaves[-depth:]):
            modules[name].reset_parameters()
            maps = explain(randomized).detach()
            results[name] = rank_correlation(maps.reshape(maps.shape[0], -1), reference.reshape(maps.shape[0], -1))
    return results


QUALITY_COLUMNS: dict[str, tuple[str, bool | None]] = {
    "deletion_auc": ("deletion AUC ↓", False),
    "insertion_auc": ("insertion AUC ↑", True),
    "top_drop_gain": ("top vs random\ndrop ↑", True),
    "localization": ("localization ↑", True),
    "sanity_rank_correlation": ("similarity to the\nuntrained net's ↓", False),
    "sparseness": ("sparseness", None),
    "max_sensitivity": ("max-sensitivity ↓", False),
    "average_drop": ("average drop ↓", False),
    "increase_in_confidence": ("increase in\nconfidence ↑", True),
}

"""Per metric tag: its column title in the comparison table and whether higher is better (None: shown, not
ranked)."""


def rank_methods(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each method's mean rank (1 = best) over the ranked metrics it has a number for; NaN without any.

    Example:
        >>> rank_methods({"a": {"deletion_auc": 0.1, "insertion_auc": 0.9}, "b": {"deletion_auc": 0.3,
        ...               "insertion_auc": 0.8}})
        {'a': 1.0, 'b': 2.0}
    """
    ranks: dict[str, list[float]] = {key: [] for key in table}
    for metric, (_, higher) in QUALITY_COLUMNS.items():
        if higher is None:
            continue
        present = {key: row[metric] for key, row in table.items() if metric in row and not math.isnan(row[metric])}
        if len(present) < 2:
            continue
        ordered = sorted(present, key=lambda key: -present[key] if higher else present[key])
        for position, key in enumerate(ordered, start=1):
            ranks[key].append(float(position))
    return {key: sum(values) / len(values) if values else float("nan") for key, values in ranks.items()}
