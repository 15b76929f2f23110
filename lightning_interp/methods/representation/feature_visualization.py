"""Feature visualisation: activation maximisation (Olah et al. 2017) and DeepDream, in pure torch.

Activation maximisation looks for an input that drives a chosen unit, channel,
layer or class logit as high as it goes, by gradient ascent on an *image
parameterisation* rather than on raw pixels. Following lucent (the PyTorch
port of lucid), the image is

1. a spectrum in a decorrelated Fourier basis, scaled by ``1 / f`` so every
   spatial frequency starts with equal energy (:func:`fourier_image`),
2. mapped through the square root of ImageNet's colour correlation matrix
   (3-channel inputs only; one channel or other counts skip this step) and a
   sigmoid to ``[0, 1]`` (:func:`to_valid_rgb`),
3. jittered, padded, scaled and rotated at random at every step
   (:func:`random_transforms`, lucent's ``standard_transforms`` with the
   shifts in proportion to the image side), so the optimum is robust to small
   changes instead of an adversarial high-frequency pattern,
4. mapped affinely into the data's value range, ``low + (high - low) * image``
   (per channel), before the model sees it.

Every random draw (starting noise, transforms, DeepDream's jitter) comes from a
``torch.Generator`` that the caller passes; the global RNG is never touched.
The model runs in eval mode with every module's ``training`` flag restored,
gradients are taken with :func:`torch.autograd.grad` with respect to the image
parameters only (no ``param.grad`` is written) and autocast, if active, applies
to the model's forward only: the parameterisation stays in float32.

A generator network's code space is a third parameterisation (Nguyen et al. 2016, "Synthesizing the preferred
inputs for neurons in neural networks via deep generator networks"): with ``parameterization=GeneratorCode(G,
code_shape)`` the image is ``G(z)`` and gradient ascent runs on the code ``z``, maximising the objective minus
``l2 * |z|^2`` (the code optionally clipped to a range after every step). The model sees ``G(z)`` as it is (the
generator makes images in the model's input space), so the result is always in the generator's range; no random
transforms are applied (the generator's prior takes their place). The generator's parameters are never changed:
they get no gradient (``requires_grad`` off for the call and restored), its modules run in eval mode with every
``training`` flag restored.

Targets (see :func:`parse_visualization_target`):

* ``"layer:channel"``: the mean over positions of channel ``channel`` of the
  module's output (dimension 1: channels of ``(B, C, ...)``, features of ``(B, D)``);
* ``"layer:channel:y:x"``: one unit of a ``(B, C, H, W)`` output;
* ``"layer"``: the mean squared activation of the whole layer (the DeepDream
  objective, lucent's ``objectives.deepdream``);
* ``("class", k)`` (or ``"class:k"``): the model's output logit ``k``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.methods.model.core import (
    OutputTransform,
    eager_forward,
    get_module,
    gradients_enabled,
    modes_preserved,
    scores_from_output,
)

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "DeepDreamResult",
    "FeatureVisualizationResult",
    "GeneratorCode",
    "ImageParameterization",
    "VisualizationTarget",
    "VisualizationTargetSpec",
    "deep_dream",
    "feature_visualization",
    "fourier_image",
    "parse_visualization_target",
    "pixel_image",
    "random_transforms",
    "range_tensors",
    "target_objective",
    "to_valid_rgb",
]

COLOR_CORRELATION_SVD_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float32
)
"""Square root of ImageNet's colour correlation matrix (lucid / lucent): decorrelated colours -> RGB."""

_COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()

PARAMETERIZATIONS = ("fourier", "pixel")

# lucent's standard_transforms at its default 128-pixel image: pad 12, jitter 8, scales 0.9..1.1, rotations of
# -10..10 degrees (0 five times more often), jitter 4; the shifts here are in proportion to the image side.
_PAD, _JITTER1, _JITTER2, _REFERENCE_SIDE = 12, 8, 4, 128
_SCALES = tuple(1 + (i - 5) / 50.0 for i in range(11))
_ANGLES = tuple(float(a) for a in list(range(-10, 11)) + 5 * [0])

ValueRange = tuple[Union[float, Sequence[float], Tensor], Union[float, Sequence[float], Tensor]]  # noqa: UP007
"""``(low, high)``: the input value range, each a float or one value per channel."""

VisualizationTargetSpec = Union[str, tuple[str, int], "VisualizationTarget"]
"""A target as written by a user: ``"layer:channel"``, ``"layer:channel:y:x"``, ``"layer"``, ``("class", k)``."""


# ---------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class VisualizationTarget:
    """What to maximise.

    Attributes:
        kind: ``"channel"`` (mean of one channel), ``"unit"`` (one position of
            one channel), ``"layer"`` (mean squared activation of the layer) or
            ``"class"`` (an output logit).
        layer: dotted module name (None for ``"class"``).
        index: the channel, or the class index (None for ``"layer"``).
        y: row of a ``"unit"`` target.
        x: column of a ``"unit"`` target.
    """

    kind: str
    layer: str | None = None
    index: int | None = None
    y: int | None = None
    x: int | None = None

    @property
    def label(self) -> str:
        """The target written back as a string (used in titles and tags), e.g. ``"net.3:5"`` or ``"class:2"``."""
        if self.kind == "class":
            return f"class:{self.index}"
        if self.kind == "layer":
            return str(self.layer)
        if self.kind == "channel":
            return f"{self.layer}:{self.index}"
        return f"{self.layer}:{self.index}:{self.y}:{self.x}"


_FORMS = (
    "'layer:channel' (e.g. 'net.3:5', the mean of channel 5 of module net.3's output), 'layer:channel:y:x' "
    "(one unit), 'layer' (the mean squared activation of the whole layer) or ('class', k) / 'class:k' "
    "(the model's output logit k)"
)
_INT = re.compile(r"^\s*-?\d+\s*$")


def parse_visualization_target(spec: VisualizationTargetSpec) -> VisualizationTarget:
    """Read a target as written by a user into a :class:`VisualizationTarget`.

    Args:
        spec: ``"layer:channel"``, ``"layer:channel:y:x"``, ``"layer"``,
            ``("class", k)`` (a list ``["class", k]`` as from a YAML config
            too), ``"class:k"``, or a :class:`VisualizationTarget`.

    Returns:
        The parsed target.

    Raises:
        ValueError: the form is unknown, a number is not a non-negative
            integer, or the layer name is empty; the message says which forms
            exist.

    Example:
        >>> parse_visualization_target("net.3:5")
        VisualizationTarget(kind='channel', layer='net.3', index=5, y=None, x=None)
        >>> parse_visualization_target(("class", 2)).label
        'class:2'
    """
    if isinstance(spec, VisualizationTarget):
        return spec
    if isinstance(spec, (tuple, list)):
        if len(spec) == 2 and spec[0] == "class":
            return VisualizationTarget("class", index=_index(spec[1], "class index", spec))
        raise ValueError(f"Unknown visualisation target {spec!r}: a tuple target must be ('class', k). Use {_FORMS}.")
    if not isinstance(spec, str):
        raise ValueError(
            f"A visualisation target must be a string or a tuple, got {type(spec).__name__}. Use {_FORMS}."
        )
    parts = spec.split(":")
    layer, numbers = parts[0].strip(), parts[1:]
    if any(not number.strip() for number in numbers):
        raise ValueError(f"Visualisation target {spec!r} has an empty field between ':'s. Use {_FORMS}.")
    if not layer:
        raise ValueError(f"Visualisation target {spec!r} names no layer before ':'. Use {_FORMS}.")
    if layer == "class":
        if len(numbers) != 1:
            raise ValueError(f"Visualisation target {spec!r}: a class target is 'class:k' with one index k.")
        return VisualizationTarget("class", index=_index(numbers[0], "class index", spec))
    if not numbers:
        return VisualizationTarget("layer", layer=layer)
    if len(numbers) == 1:
        return VisualizationTarget("channel", layer=layer, index=_index(numbers[0], "channel", spec))
    if len(numbers) == 3:
        channel, y, x = (_index(n, what, spec) for n, what in zip(numbers, ("channel", "y", "x"), strict=True))
        return VisualizationTarget("unit", layer=layer, index=channel, y=y, x=x)
    raise ValueError(
        f"Visualisation target {spec!r} has {len(numbers)} numbers after the layer name; use {_FORMS} "
        "(a unit needs channel, y and x: 'layer:channel:y:x')."
    )


def _index(value: object, what: str, spec: object) -> int:
    if isinstance(value, str) and _INT.match(value):
        value = int(value)
    elif not isinstance(value, (bool, str)):
        with contextlib.suppress(TypeError):  # numpy and torch integers
            value = operator.index(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"Visualisation target {spec!r}: the {what} must be an integer, got {value!r}. Use {_FORMS}.")
    if value < 0:
        raise ValueError(
            f"Visualisation target {spec!r}: the {what} must be >= 0, got {value} (indices count from 0; negative "
            "indices from the end are not supported)."
        )
    return value


def target_objective(target: VisualizationTarget, activation: Tensor) -> Tensor:
    """The objective of each sample, shape (B,), float32: the layer output (or logits for a class target) read out.

    Args:
        target: what to read.
        activation: the layer's output ``(B, C, ...)`` (the ``(B, K)`` scores
            for a ``"class"`` target).

    Example:
        >>> a = torch.arange(8.0).reshape(1, 2, 2, 2)
        >>> target_objective(parse_visualization_target("m:1"), a), target_objective(parse_visualization_target("m"), a)
        (tensor([5.5000]), tensor([17.5000]))
    """
    a = activation.to(torch.float32, copy=True)  # a copy: a later in-place op of the model cannot change it
    if target.kind == "layer":
        return a.pow(2).reshape(a.shape[0], -1).mean(dim=1)
    if a.ndim < 2 or target.index is None or target.index >= a.shape[1]:
        size = a.shape[1] if a.ndim >= 2 else "no"
        raise ValueError(
            f"Visualisation target {target.label!r}: index {target.index} is out of range for an output of shape "
            f"{tuple(a.shape)} ({size} channels along dimension 1)."
        )
    selected = a[:, target.index]
    if target.kind == "unit":
        if a.ndim != 4 or target.y >= a.shape[2] or target.x >= a.shape[3]:  # type: ignore[operator]
            raise ValueError(
                f"Visualisation target {target.label!r}: a unit target needs a (B, C, H, W) output with y < H and "
                f"x < W; the output has shape {tuple(a.shape)}."
            )
        return selected[:, target.y, target.x]
    return selected.reshape(a.shape[0], -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------------- parameterisation
class ImageParameterization:
    """An image as a function of a float32 parameter tensor: ``image()`` gives (B, C, H, W) values in [0, 1].

    Attributes:
        params: the leaf tensor that gradient ascent changes.
        shape: (B, C, H, W) of the image.
        kind: ``"fourier"`` or ``"pixel"``.
        decorrelate: whether colours are decorrelated (3 channels only).
    """

    def __init__(
        self, params: Tensor, shape: tuple[int, int, int, int], kind: str, decorrelate: bool, scale: Tensor | None
    ) -> None:
        self.params = params
        self.shape = shape
        self.kind = kind
        self.decorrelate = decorrelate
        self._scale = scale

    def image(self) -> Tensor:
        """The image in [0, 1], float32, differentiable with respect to :attr:`params`."""
        if self.kind == "fourier":
            assert self._scale is not None
            spectrum = torch.view_as_complex(self._scale * self.params)
            raw = torch.fft.irfftn(spectrum, s=self.shape[2:], dim=(-2, -1), norm="ortho") / 4.0  # lucent's "magic"
        else:
            raw = self.params
        return to_valid_rgb(raw, decorrelate=self.decorrelate)


def _frequencies(height: int, width: int) -> Tensor:
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return (fx * fx + fy * fy).sqrt()


def fourier_image(
    shape: Sequence[int],
    *,
    sd: float = 0.01,
    decay_power: float = 1.0,
    decorrelate: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ImageParameterization:
    """Lucent's ``fft_image`` + ``to_valid_rgb``: a 1/f-scaled spectrum, colour-decorrelated, through a sigmoid.

    The starting spectrum is Gaussian noise of standard deviation ``sd``,
    drawn from ``generator`` on the CPU (so every device starts from the same
    noise), then moved to ``device``.

    Args:
        shape: (B, C, H, W).
        sd: standard deviation of the starting spectrum.
        decay_power: the spectrum is scaled by ``1 / max(f, 1/max(H, W)) ** decay_power``.
        decorrelate: map colours through :data:`COLOR_CORRELATION_SVD_SQRT` (3 channels only; ignored otherwise).
        generator: source of the starting noise (a fresh one seeded with 0 when None).
        device: where the parameters live.

    Example:
        >>> param = fourier_image((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
        >>> image = param.image()
        >>> image.shape, bool(image.min() >= 0), bool(image.max() <= 1)
        (torch.Size([2, 3, 16, 16]), True, True)
    """
    b, c, h, w = _image_shape(shape)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    freqs = _frequencies(h, w)
    scale = (1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power)[None, None, ..., None].to(torch.float32)
    noise = torch.randn((b, c, *freqs.shape, 2), generator=generator, dtype=torch.float32) * sd
    params = noise.to(device).requires_grad_(True)
    return ImageParameterization(params, (b, c, h, w), "fourier", decorrelate and c == 3, scale.to(device))


def pixel_image(
    shape: Sequence[int],
    *,
    sd: float = 0.01,
    decorrelate: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ImageParameterization:
    """Plain pixels (through the same colour decorrelation and sigmoid), for comparison with :func:`fourier_image`.

    Example:
        >>> pixel_image((1, 1, 8, 8)).image().shape
        torch.Size([1, 1, 8, 8])
    """
    b, c, h, w = _image_shape(shape)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    noise = torch.randn((b, c, h, w), generator=generator, dtype=torch.float32) * sd
    return ImageParameterization(
        noise.to(device).requires_grad_(True), (b, c, h, w), "pixel", decorrelate and c == 3, None
    )


@functools.lru_cache(maxsize=8)
def _color_matrix(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The colour decorrelation matrix on ``device`` in ``dtype`` (kept: do not modify it in place; never an
    inference tensor, so a pass that records gradients can use it whichever mode made it)."""
    with torch.inference_mode(False):
        return _COLOR_MATRIX.to(device=device, dtype=dtype).clone()


def to_valid_rgb(image: Tensor, *, decorrelate: bool = True) -> Tensor:
    """Decorrelated colours to RGB (3 channels, when ``decorrelate``), then a sigmoid to [0, 1].

    Example:
        >>> to_valid_rgb(torch.zeros(1, 3, 2, 2)).unique().tolist()
        [0.5]
    """
    if decorrelate and image.shape[1] == 3:
        matrix = _color_matrix(image.device, image.dtype)  # copied to the device once, not at every step
        image = torch.einsum("bchw,dc->bdhw", image, matrix)
    return torch.sigmoid(image)


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    dims = tuple(int(s) for s in shape)
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"An image shape is (B, C, H, W) with positive sizes, got {tuple(shape)}.")
    return dims  # type: ignore[return-value]


def _transform_sizes(side: int) -> tuple[int, int, int]:
    """Pad and the two jitters along an axis of ``side`` pixels, scaled from lucent's 12 / 8 / 4 at 128 pixels.

    The jitters are even, so that the final centre crop is exact and the shifts average to zero (an odd jitter
    would bias every image by half a pixel)."""
    pad, first, second = (max(1, math.ceil(side * n / _REFERENCE_SIDE)) for n in (_PAD, _JITTER1, _JITTER2))
    return pad, first + first % 2, second + second % 2


def _transform_draws(steps: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(steps, 6) draws, on the CPU: x and y shifts of the first jitter, scale index, angle index, x and y shifts of
    the second; each axis's shifts sized from that axis."""
    _, j1_h, j2_h = _transform_sizes(height)
    _, j1_w, j2_w = _transform_sizes(width)
    return torch.stack(
        [
            torch.randint(j1_w + 1, (steps,), generator=generator),
            torch.randint(j1_h + 1, (steps,), generator=generator),
            torch.randint(len(_SCALES), (steps,), generator=generator),
            torch.randint(len(_ANGLES), (steps,), generator=generator),
            torch.randint(j2_w + 1, (steps,), generator=generator),
            torch.randint(j2_h + 1, (steps,), generator=generator),
        ],
        dim=1,
    )


def random_transforms(image: Tensor, draw: Sequence[int]) -> Tensor:
    """Random pad, jitter, zoom and rotation in the spirit of lucent's ``standard_transforms``, at the input's size.

    Pad with 0.5 (by 12/128 of each axis), crop at a random shift (jitter of
    8/128 of the axis, rounded up to even), zoom by one of 0.9 ... 1.1 and
    rotate by one of -10 ... 10 degrees about the centre (one ``affine_grid``,
    a true rotation in pixels also on non-square images), crop at a second
    random shift (4/128, even), then take the centre at the input's size.
    Unlike lucent, which resizes and lets the image grow, the output keeps the
    input's frame (the model may need it), so the effective translation is the
    jitter, up to about +-5% of each axis, and the shifts average to zero.

    Args:
        image: (B, C, H, W) in [0, 1].
        draw: six integers, as one row of the private ``_transform_draws`` (shifts, scale and angle indices).

    Example:
        >>> random_transforms(torch.rand(2, 3, 16, 16), [1, 0, 5, 3, 1, 1]).shape
        torch.Size([2, 3, 16, 16])
    """
    b, _, h, w = image.shape
    pad_h, j1_h, j2_h = _transform_sizes(h)
    pad_w, j1_w, j2_w = _transform_sizes(w)
    x1, y1, scale_index, angle_index, x2, y2 = (int(v) for v in draw)
    out = F.pad(image, (pad_w, pad_w, pad_h, pad_h), mode="constant", value=0.5)
    size_h, size_w = out.shape[2] - j1_h, out.shape[3] - j1_w
    out = out[:, :, y1 : y1 + size_h, x1 : x1 + size_w]
    scale, angle = _SCALES[scale_index], math.radians(_ANGLES[angle_index])
    if scale != 1.0 or angle != 0.0:
        # affine_grid works in [-1, 1] coordinates per axis: a rotation in pixels needs the aspect ratio
        ratio = out.shape[2] / out.shape[3]  # height / width
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin * ratio, 0.0], [sin / ratio, cos, 0.0]], dtype=out.dtype, device=out.device)
        grid = F.affine_grid(theta.expand(b, 2, 3), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    size_h, size_w = out.shape[2] - j2_h, out.shape[3] - j2_w
    out = out[:, :, y2 : y2 + size_h, x2 : x2 + size_w]
    top, left = (out.shape[2] - h) // 2, (out.shape[3] - w) // 2
    return out[:, :, top : top + h, left : left + w]


def range_tensors(value_range: ValueRange, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A ``(low, high)`` value range as two (C,) tensors on ``device``, checked: one value or one per channel, and
    ``low <= high`` everywhere (a flat channel is refused).

    Example:
        >>> low, high = range_tensors((0.0, [1.0, 2.0]), 2, torch.device("cpu"))
        >>> low.flatten().tolist(), high.flatten().tolist()
        ([0.0, 0.0], [1.0, 2.0])
    """
    low, high = (torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1) for v in value_range)
    for name, value in (("low", low), ("high", high)):
        if value.numel() not in (1, channels):
            raise ValueError(
                f"value_range {name} has {value.numel()} values; give one float or one value per channel ({channels})."
            )
    # checked from one read of both (a range on the device is read once, not once per check)
    lows, highs = torch.stack([low.expand(channels), high.expand(channels)]).tolist()
    if any(h < lo for lo, h in zip(lows, highs, strict=True)):
        raise ValueError(
            f"value_range needs low <= high in every channel, got low={low.tolist()}, high={high.tolist()}."
        )
    flat = [channel for channel, (lo, h) in enumerate(zip(lows, highs, strict=True)) if h - lo == 0]
    low, high = low.to(device), high.to(device)
    if flat:
        warnings.warn(
            f"value_range is empty (low == high) in channel(s) {flat}: the image cannot change there, so those "
            "channels are not optimised. Give a wider range (a channel constant over the probe set gives this).",
            stacklevel=3,
        )
    shape = (1, -1, 1, 1)
    return low.expand(channels).reshape(shape).clone(), high.expand(channels).reshape(shape).clone()


@dataclass(frozen=True, eq=False)
class GeneratorCode:
    """A generator network's code space as the image parameterisation (Nguyen et al. 2016): the image is
    ``generator(z)``, and gradient ascent maximises ``objective(model(generator(z))) - l2 * |z|^2`` over ``z``.

    The generator is the user's network, not part of the explained model: it must return ``(B, C, H, W)`` images
    in the model's input space for ``(B, *code_shape)`` codes, and live on the model's device
    (:class:`~lightning_interp.callbacks.FeatureVisualizationCallback` moves it there at fit start; the functional
    API refuses a generator elsewhere). Its parameters are never changed and get no ``.grad``.

    Attributes:
        generator: the network ``z -> image``.
        code_shape: the shape of one code, without the batch dimension (an int for a vector).
        l2: the weight of the L2 penalty ``l2 * |z|^2`` (>= 0; the default 0.01 keeps an unbounded objective,
            e.g. a linear unit, from running away).
        clip: ``(low, high)``: the code is clipped to this range after every step (Nguyen et al. clip their
            fc6 codes to ``[0, 3 std]`` of the codes of real images); None clips nothing.
        sd: the starting code is Gaussian noise of this standard deviation (drawn from the run's generator;
            clipped to ``clip`` when given); 0 starts from the zero code.

    Example:
        >>> decoder = nn.Sequential(nn.Linear(4, 3 * 8 * 8), nn.Unflatten(1, (3, 8, 8)))
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> code = GeneratorCode(decoder, code_shape=4, clip=(-3.0, 3.0))
        >>> result = feature_visualization(net, "class:1", image_shape=(3, 8, 8), steps=4, parameterization=code)
        >>> result.images.shape, result.codes.shape
        (torch.Size([1, 1, 3, 8, 8]), torch.Size([1, 1, 4]))
    """

    generator: nn.Module
    code_shape: tuple[int, ...]
    l2: float = 0.01
    clip: tuple[float, float] | None = None
    sd: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.generator, nn.Module):
            raise TypeError(
                f"GeneratorCode(generator=...) must be an nn.Module (z -> image), got {type(self.generator).__name__}."
            )
        shape = self.code_shape
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
        if (
            not isinstance(shape, (tuple, list, torch.Size))
            or not shape
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
        ):
            raise ValueError(
                f"GeneratorCode(code_shape=...) is the shape of one code without the batch dimension: a positive int "
                f"or a tuple of them, e.g. 128 or (128,); got {self.code_shape!r}."
            )
        object.__setattr__(self, "code_shape", tuple(int(n) for n in shape))
        for name in ("l2", "sd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"GeneratorCode({name}=...) must be a finite number >= 0, got {value!r}.")
        if self.clip is not None:
            clip = self.clip
            if (
                not isinstance(clip, (tuple, list))
                or len(clip) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in clip)
                or not clip[0] < clip[1]
            ):
                raise ValueError(
                    f"GeneratorCode(clip=...) must be None or (low, high) numbers with low < high, got {clip!r}."
                )
            object.__setattr__(self, "clip", (float(clip[0]), float(clip[1])))


@contextlib.contextmanager
def _generator_frozen(code: GeneratorCode | None) -> Iterator[None]:
    """The generator in eval mode with no parameter requiring grad inside the block; flags and modes restored."""
    if code is None:
        yield
        return
    saved = [(parameter, parameter.requires_grad) for parameter in code.generator.parameters()]
    with modes_preserved(code.generator):
        try:
            for parameter, flag in saved:
                if flag:
                    parameter.requires_grad_(False)
            yield
        finally:
            for parameter, flag in saved:
                if flag:
                    parameter.requires_grad_(True)


def _initial_code(code: GeneratorCode, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """The starting codes (batch, *code_shape), float32 on ``device``, drawn on the CPU; the generator checked to
    live on the model's device."""
    where = next((p.device for p in code.generator.parameters()), None)
    if where is not None and where != device:
        raise ValueError(
            f"GeneratorCode: the generator's parameters are on {where}, the model's on {device}; move it with "
            f"generator.to({str(device)!r}) (FeatureVisualizationCallback does this at fit start)."
        )
    z = torch.randn((batch, *code.code_shape), generator=generator, dtype=torch.float32) * code.sd
    if code.clip is not None:
        z = z.clamp(*code.clip)
    return z.to(device).requires_grad_(True)


def _generated(code: GeneratorCode, z: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """``generator(z)``, checked to be (B, *image_shape) images."""
    parameter = next((p for p in code.generator.parameters() if p.is_floating_point()), None)
    out = code.generator(z if parameter is None else z.to(parameter.dtype))
    expected = (z.shape[0], *image_shape)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        found = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"GeneratorCode: the generator returns {found} for codes of shape {tuple(z.shape)}; it must return "
            f"images of the model's input shape {expected} (batch, C, H, W) in the model's input space."
        )
    return out


# ---------------------------------------------------------------------------------------------------- the computation
@contextlib.contextmanager
def _float32_region(device: torch.device) -> Iterator[None]:
    """Autocast off (the parameterisation and transforms stay float32 under AMP)."""
    try:
        context = torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know: nothing to turn off
        context = contextlib.nullcontext()
    with context:
        yield


@contextlib.contextmanager
def _objectives_hooked(
    model: nn.Module, targets: Sequence[VisualizationTarget], rows: Sequence[slice]
) -> Iterator[dict[int, Tensor]]:
    """Hooks that read each layer target's objective (per row) during a forward; removed in ``finally``."""
    readings: dict[int, Tensor] = {}
    by_module: dict[nn.Module, list[int]] = {}
    for i, target in enumerate(targets):
        if target.kind != "class":
            by_module.setdefault(get_module(model, str(target.layer)), []).append(i)
    handles = []

    def make_hook(indices: list[int]) -> Callable:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Visualisation target {targets[indices[0]].label!r}: the layer returns "
                    f"{type(output).__name__}, not a tensor; name a module that returns a tensor."
                )
            for i in indices:
                if i not in readings:  # a module that runs twice: its first output
                    readings[i] = target_objective(targets[i], output[rows[i]])

        return hook

    try:
        for module, indices in by_module.items():
            handles.append(module.register_forward_hook(make_hook(indices)))
        yield readings
    finally:
        for handle in handles:
            handle.remove()


def _objectives(
    model: nn.Module,
    inputs: Tensor,
    targets: Sequence[VisualizationTarget],
    rows: Sequence[slice],
    output_transform: OutputTransform | None,
) -> list[Tensor]:
    """One forward of ``inputs``; each target's (rows,) objective values."""
    with _objectives_hooked(model, targets, rows) as readings:
        output = model(inputs)
        for i, target in enumerate(targets):
            if target.kind == "class":
                scores = scores_from_output(output, output_transform)
                if target.index >= scores.shape[1]:  # type: ignore[operator]
                    raise ValueError(
                        f"Visualisation target {target.label!r}: the model has {scores.shape[1]} outputs (classes 0 "
                        f"to {scores.shape[1] - 1})."
                    )
                readings[i] = scores[rows[i], target.index].float()
    missing = [targets[i].label for i in range(len(targets)) if i not in readings]
    if missing:
        raise ValueError(f"Visualisation targets {missing}: the layer did not run in the model's forward pass.")
    return [readings[i] for i in range(len(targets))]


def _input_dtype(model: nn.Module) -> torch.dtype:
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    return parameter.dtype if parameter is not None else torch.float32


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass
class FeatureVisualizationResult:
    """What :func:`feature_visualization` returns (all on the CPU, float32).

    Attributes:
        images: (T, N, C, H, W) optimised images in the model's input range
            (what the model sees, without the random transforms).
        rgb: (T, N, C, H, W) the same images in [0, 1], before the mapping to
            the input range: the picture to show.
        objectives: (T, N) each target's objective on its final image.
        history: (steps, T, N) the objective at each step (on that step's
            transformed image, before the update).
        targets: the parsed targets, in order (rows of the tensors above).
        codes: (T, N, *code_shape) the optimised codes with a :class:`GeneratorCode` (``images`` is the generator's
            output on them); None otherwise.
    """

    images: Tensor
    rgb: Tensor
    objectives: Tensor
    history: Tensor
    targets: list[VisualizationTarget]
    codes: Tensor | None = None


def feature_visualization(
    model: nn.Module,
    targets: Sequence[VisualizationTargetSpec] | VisualizationTargetSpec,
    *,
    image_shape: Sequence[int],
    steps: int = 128,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    num_images: int = 1,
    value_range: ValueRange = (0.0, 1.0),
    parameterization: Literal["fourier", "pixel"] | GeneratorCode = "fourier",
    decorrelate: bool = True,
    transforms: bool | None = None,
    output_transform: OutputTransform | None = None,
) -> FeatureVisualizationResult:
    """Activation maximisation: optimise an image for each target by gradient ascent (Adam) on its parameterisation.

    All ``T x num_images`` images are optimised together, one forward and one
    gradient per step (each image's objective depends on that image only: the
    model is in eval mode). Cost: ``steps`` forward + backward passes of a
    batch of ``T * num_images`` images of ``image_shape``, plus one forward for
    the final objectives.

    Args:
        model: the network, called as ``model(inputs)``; put in eval mode for
            the call, every module's ``training`` flag restored afterwards.
        targets: one target or a list (see :func:`parse_visualization_target`).
        image_shape: (C, H, W) of the model's inputs.
        steps: gradient-ascent steps.
        lr: Adam's learning rate on the parameters.
        generator: the source of every random draw (starting noise and
            transforms); a fresh one seeded with 0 when None. The global RNG is
            never used, so the same generator state gives the same images.
        num_images: images per target, from different starting noise.
        value_range: ``(low, high)``, floats or one value per channel: the
            image in [0, 1] is mapped to ``low + (high - low) * image`` before
            the model sees it (the data's range; (0, 1) for plain pixels). With a
            :class:`GeneratorCode` the model sees the generator's output as it is, and the range maps it back
            to [0, 1] for ``rgb`` only (clamped).
        parameterization: ``"fourier"`` (decorrelated 1/f spectrum, the
            default), ``"pixel"``, or a :class:`GeneratorCode` (optimise a generator network's code).
        decorrelate: decorrelate colours with ImageNet's colour correlation (3 channels only; not with a
            :class:`GeneratorCode`).
        transforms: apply the random pad / jitter / scale / rotation at every
            step (turn off for models without any spatial invariance). None (the default): on for
            ``"fourier"`` and ``"pixel"``, off for a :class:`GeneratorCode`, which refuses True.
        output_transform: picks the (B, K) logits out of what the model returns (class targets).

    Returns:
        A :class:`FeatureVisualizationResult`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> result = feature_visualization(net, ["0:1", ("class", 2)], image_shape=(3, 16, 16), steps=8)
        >>> result.images.shape, result.history.shape
        (torch.Size([2, 1, 3, 16, 16]), torch.Size([8, 2, 1]))
    """
    parsed = [parse_visualization_target(t) for t in _as_list(targets)]
    if not parsed:
        raise ValueError("feature_visualization needs at least one target.")
    _check_count("steps", steps)
    _check_count("num_images", num_images)
    code = parameterization if isinstance(parameterization, GeneratorCode) else None
    if code is None and parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS} or a GeneratorCode, got {parameterization!r}."
        )
    if code is not None and transforms:
        raise ValueError(
            "feature_visualization: a GeneratorCode optimises the generator's code, and the model sees its output as "
            "it is; the random transforms are for image parameterisations. Leave transforms=None (or False)."
        )
    transforms = code is None if transforms is None else transforms
    if len(tuple(image_shape)) != 3:
        raise ValueError(
            f"feature_visualization makes images: image_shape must be (C, H, W), got {tuple(image_shape)}."
        )
    c, h, w = (int(s) for s in image_shape)
    device, dtype = _device_of(model), _input_dtype(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batch = len(parsed) * num_images
    rows = [slice(i * num_images, (i + 1) * num_images) for i in range(len(parsed))]
    with modes_preserved(model), eager_forward(), gradients_enabled(), _generator_frozen(code):
        # tensors made here: never inference ones
        if code is None:
            make = fourier_image if parameterization == "fourier" else pixel_image
            param = make((batch, c, h, w), decorrelate=decorrelate, generator=generator, device=device)
            leaf = param.params
        else:
            leaf = _initial_code(code, batch, generator, device)
        draws = _transform_draws(steps, h, w, generator).tolist() if transforms else None
        low, high = range_tensors(value_range, c, device)

        def render() -> tuple[Tensor, Tensor]:
            """The image the model sees (float32) and the picture in [0, 1], from the current parameters."""
            with _float32_region(device):
                if code is not None:
                    seen = _generated(code, leaf, (c, h, w)).float()
                    return seen, ((seen - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
                shown = param.image()
                return low + (high - low) * shown, shown

        history: list[Tensor] = []
        m = torch.zeros_like(leaf)
        v = torch.zeros_like(leaf)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        reached = torch.zeros(batch, dtype=torch.bool, device=device)  # images whose gradient was ever non-zero
        for step in range(steps):
            if code is not None:
                inputs = render()[0].to(dtype)
            else:
                with _float32_region(device):
                    image = param.image()
                    if draws is not None:
                        image = random_transforms(image, draws[step])
                    inputs = (low + (high - low) * image).to(dtype)
            values = _objectives(model, inputs, parsed, rows, output_transform)
            total = torch.stack([value.sum() for value in values]).sum()
            (grad,) = torch.autograd.grad(total, [leaf])
            reached |= _per_image_nonzero(grad, batch)  # the objective's own gradient (the penalty's is not a sign)
            with torch.no_grad():  # Adam ascent on our own parameters (no optimizer: nothing global is touched)
                if code is not None and code.l2 > 0:
                    grad = grad - 2 * code.l2 * leaf  # d/dz of -l2 |z|^2
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** (step + 1))
                v_hat = v / (1 - beta2 ** (step + 1))
                leaf.add_(lr * m_hat / (v_hat.sqrt() + eps))
                if code is not None and code.clip is not None:
                    leaf.clamp_(*code.clip)
            history.append(torch.stack([value.detach() for value in values]))
        with torch.no_grad():
            images, rgb = render()
            final = torch.stack(_objectives(model, images.to(dtype), parsed, rows, output_transform))
    shape = (len(parsed), num_images, c, h, w)
    moved = _to_host(
        images.detach().reshape(shape),
        rgb.detach().reshape(shape),
        final.float(),
        torch.stack(history).float(),
        reached.reshape(len(parsed), num_images).any(dim=1),
        *([] if code is None else [leaf.detach().reshape(len(parsed), num_images, *code.code_shape)]),
    )
    images, rgb, objectives, history_values, reached_any = moved[:5]
    _warn_unreached(parsed, reached_any.tolist())
    return FeatureVisualizationResult(
        images=images,
        rgb=rgb,
        objectives=objectives,
        history=history_values,
        targets=parsed,
        codes=moved[5] if code is not None else None,
    )


@dataclass
class DeepDreamResult:
    """What :func:`deep_dream` returns (on the CPU, float32).

    Attributes:
        images: the dreamed images, the input's shape, in the input's value space.
        initial_objective: (B,) the target's objective on the original images.
        objective: (B,) the objective on the dreamed images.
        target: the parsed target.
    """

    images: Tensor
    initial_objective: Tensor
    objective: Tensor
    target: VisualizationTarget


def deep_dream(
    model: nn.Module,
    image: Tensor,
    layer: VisualizationTargetSpec,
    *,
    octaves: int = 3,
    octave_scale: float = 1.4,
    steps: int = 30,
    lr: float = 0.02,
    jitter: bool = True,
    value_range: ValueRange | None = None,
    generator: torch.Generator | None = None,
    output_transform: OutputTransform | None = None,
) -> DeepDreamResult:
    """DeepDream (Mordvintsev et al. 2015): amplify what a layer sees in an image, over octaves.

    Gradient ascent on the pixels of ``image`` itself, maximising the mean
    squared activation of ``layer`` (or any target of
    :func:`parse_visualization_target`), with normalised gradient steps and a
    random roll (jitter) each step. Octaves: the image is processed at
    ``octaves`` sizes from ``side / octave_scale ** (octaves - 1)`` up to full
    size, the detail found at one size carried to the next, so patterns
    appear at several scales. The model therefore runs on smaller inputs too:
    a network that needs one input size (a Flatten + Linear head) takes
    ``octaves=1``. Cost: ``steps`` forward + backward passes in all (split over
    the octaves, smaller images first) plus two forwards for the objectives.

    Args:
        model: the network; eval mode for the call, every flag restored.
        image: (B, C, H, W) starting images, in the model's input space.
        layer: a layer name (mean squared activation), or another target.
        octaves: number of sizes.
        octave_scale: size ratio of successive octaves.
        steps: gradient steps in all, split evenly over the octaves.
        lr: step size, as a share of the value range (of each channel's range
            in ``image`` when ``value_range`` is None) per normalised step.
        jitter: roll the image by a random shift (up to 1/8 of the side) each step.
        value_range: ``(low, high)`` to clamp the image to (floats or per
            channel); None clamps nothing.
        generator: source of the jitter draws (a fresh one seeded with 0 when None).
        output_transform: picks the logits out of the output (class targets).

    Returns:
        A :class:`DeepDreamResult`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> dream = deep_dream(net, torch.rand(2, 3, 16, 16), "1", steps=6)
        >>> dream.images.shape, bool((dream.objective > dream.initial_objective).all())
        (torch.Size([2, 3, 16, 16]), True)
    """
    target = parse_visualization_target(layer)
    _check_count("octaves", octaves)
    _check_count("steps", steps)
    if not octave_scale >= 1.0:
        raise ValueError(f"octave_scale must be >= 1, got {octave_scale}.")
    if not isinstance(image, Tensor) or image.ndim != 4:
        raise ValueError(f"deep_dream takes (B, C, H, W) images, got {getattr(image, 'shape', type(image))}.")
    device, dtype = _device_of(model), _input_dtype(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with gradients_enabled():  # every tensor made outside inference mode: they join autograd below
        base = image.detach().to(device=device, dtype=torch.float32).clone()
        ranges = None if value_range is None else range_tensors(value_range, base.shape[1], device)
        span = (base.amax(dim=(0, 2, 3), keepdim=True) - base.amin(dim=(0, 2, 3), keepdim=True)).clamp_min(1e-6)
    b, c, h, w = base.shape
    rows = [slice(0, b)]
    low, high = ranges if ranges is not None else (None, None)
    if low is not None and high is not None:
        span = high - low
    sizes = [(max(1, round(h / octave_scale**k)), max(1, round(w / octave_scale**k))) for k in range(octaves)][::-1]
    per_octave = [steps // octaves + (1 if k >= octaves - steps % octaves else 0) for k in range(octaves)]
    shifts = torch.rand((steps, 2), generator=generator).tolist() if jitter else None

    def objective(x: Tensor) -> Tensor:
        return _objectives(model, x.to(dtype), [target], rows, output_transform)[0]

    with modes_preserved(model), eager_forward(), gradients_enabled():
        with torch.no_grad():
            initial = objective(base)
        detail = torch.zeros((b, c, *sizes[0]), device=device)
        reached = torch.zeros(b, dtype=torch.bool, device=device)
        x = base
        done = 0
        for size, count in zip(sizes, per_octave, strict=True):
            with _float32_region(device):
                octave_base = base if size == (h, w) else F.interpolate(base, size=size, mode="bilinear")
                if detail.shape[-2:] != octave_base.shape[-2:]:
                    detail = F.interpolate(detail, size=size, mode="bilinear")
            x = (octave_base + detail).detach()
            reach = max(1, max(size) // 8)
            for _ in range(count):
                dy, dx = (0, 0) if shifts is None else (int(s * (2 * reach + 1)) - reach for s in shifts[done])
                done += 1
                rolled = torch.roll(x, shifts=(dy, dx), dims=(2, 3)).requires_grad_(True)
                try:
                    (grad,) = torch.autograd.grad(objective(rolled).sum(), [rolled])
                except RuntimeError as error:
                    if size == (h, w):
                        raise
                    raise ValueError(
                        f"deep_dream: the model fails on the octave's smaller {size[0]}x{size[1]} images ({error}); "
                        "it probably needs its input size (a fixed-size head). Pass octaves=1."
                    ) from error
                reached |= _per_image_nonzero(grad, b)
                with torch.no_grad():
                    grad = torch.roll(grad.float(), shifts=(-dy, -dx), dims=(2, 3))
                    grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                    x = x + lr * span * grad
                    if low is not None and high is not None:
                        x = torch.maximum(torch.minimum(x, high), low)
            detail = (x - octave_base).detach()
        with torch.no_grad():
            final = objective(x)
    images, initial_objective, objective, reached_any = _to_host(
        x.detach().float(), initial.float(), final.float(), reached.any().reshape(1)
    )
    _warn_unreached([target], reached_any.tolist())
    return DeepDreamResult(images=images, initial_objective=initial_objective, objective=objective, target=target)


def _per_image_nonzero(grad: Tensor, batch: int) -> Tensor:
    """(batch,) whether each image's slice of a gradient has a non-zero entry (parameters are batch-first)."""
    return grad.reshape(batch, -1).abs().amax(dim=1) > 0


def _to_host(*tensors: Tensor) -> list[Tensor]:
    """The tensors on the CPU, in one transfer per dtype (a bool tensor travels as 0.0 / 1.0 with the floats)."""
    moved: list[Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        dtype = torch.float32 if tensor.dtype == torch.bool else tensor.dtype
        groups.setdefault(dtype, []).append(i)
    for dtype, members in groups.items():
        host = torch.cat([tensors[i].to(dtype).flatten() for i in members]).cpu()
        for i, part in zip(members, host.split([tensors[i].numel() for i in members]), strict=True):
            part = part.reshape(tensors[i].shape)
            moved[i] = part > 0 if tensors[i].dtype == torch.bool else part
    return [tensor for tensor in moved if tensor is not None]


def _warn_unreached(targets: Sequence[VisualizationTarget], reached: Sequence[bool]) -> None:
    """Warn about targets whose images never received a gradient: they show the starting image, not the target."""
    dead = [target.label for target, ok in zip(targets, reached, strict=True) if not ok]
    if dead:
        warnings.warn(
            f"Visualisation target(s) {dead} got no gradient at any step: the unit is inactive (e.g. 0 after a ReLU) "
            "on every image tried, so its images are the starting image, not a picture of the target. Pick a live "
            "channel (ActivationMapsCallback's dead_fraction and '(dead)' titles show dead ones) or the layer "
            "before the activation.",
            stacklevel=3,
        )


def _as_list(targets: Sequence[VisualizationTargetSpec] | VisualizationTargetSpec) -> list[VisualizationTargetSpec]:
    if isinstance(targets, (str, VisualizationTarget)):
        return [targets]
    if isinstance(targets, tuple) and len(targets) == 2 and targets[0] == "class":
        return [targets]  # type: ignore[list-item]
    return list(targets)  # type: ignore[arg-type]


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
