"""Layer-wise relevance propagation (Bach et al. 2015) as rules attached to layer types for one call.

The target score is the relevance at the output; every layer passes relevance
down so that (up to the stabiliser and the biases) it is conserved: the input
relevance of a sample sums to its explained score. A rule is an
:class:`LRPRule` object; for a layer ``z = W x + b`` with relevance ``R`` at
its output (``x+``, ``W+``: positive parts; ``x-``, ``W-``: negative parts):

- :class:`Epsilon` (``"epsilon"``): ``R_in = x * W^T (R / (z + eps sign z))`` (LRP-0 at ``epsilon=0``);
- :class:`ZPlus` (``"zplus"``): only the positive contributions ``x+ W+ + x- W-`` (alpha=1, beta=0);
  deep Taylor decomposition of a ReLU network is LRP with this rule;
- :class:`AlphaBeta` (``"alpha_beta"``): ``alpha`` times the positive minus ``beta`` times the negative
  contributions (``alpha - beta = 1``);
- :class:`Gamma` (``"gamma"``): the generalised gamma rule, positive contributions raised by ``gamma``;
- :class:`Flat`, :class:`WSquare`: relevance spread by ``1`` or ``W²`` regardless of the input (first layers);
- :class:`ZBox`: the box rule for an input bounded by ``low <= x <= high`` (first layer, Montavon et al. 2017).

The rules that use the bias take ``bias=False`` for their bias-free variant
(zennit's ``zero_params="bias"``).

An :class:`LRPComposite` gives different layers different rules: by dotted
module name, by module type, and for the first layer; a plain mapping
``{name or type: rule}`` is one too. The named composites for CNNs are
zennit's, by its names (:data:`LRP_COMPOSITES`), each with epsilon on linear
layers: ``"epsilon_plus"`` (z+ on convolutions), ``"epsilon_alpha2_beta1"``
(alpha=2, beta=1 on convolutions), their ``"..._flat"`` variants (the flat
rule on the first layer) and ``"epsilon_gamma_box"`` (gamma on convolutions,
the box rule on the first layer, bounded by :func:`lrp`'s ``low`` and
``high``: [0, 1] by default). zennit gives the box to the first layer only
when it is a convolution; here it is the first layer whatever its kind.
"Convolutions" includes transposed ones. A rule of one's own subclasses
:class:`LRPRule` and maps the relevance at an :class:`LRPLayer`'s output to
its input.

The other layers, as in zennit's composites: elementwise activations pass
relevance unchanged; average pooling (``AvgPool``, ``AdaptiveAvgPool``,
``Tensor.mean``) and residual additions (``a + b`` of two same-shaped
activations) split it in proportion to their inputs; max pooling sends it to
the maximum (its gradient); a BatchNorm that directly follows a convolution
or linear layer is merged into that layer for the computation (the module is
not touched). Simple Taylor decomposition is :func:`input_x_gradient`. Other
operations keep their gradient, as in zennit: a product or quotient by a
constant (input normalisation inside ``forward``), a difference of two
activations or a gating product breaks conservation there.

Supported parameterised layers: ``Linear``, ``Conv1d/2d/3d``,
``ConvTranspose1d/2d/3d`` (with the output padding of each call) and
BatchNorm after one of them. A model with another layer that has parameters
(LayerNorm, Embedding, attention, ...) is refused before the forward pass,
naming it.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_interp.methods.attribution._rules import (
    ADDITIONS,
    IN_PLACE,
    OTHER_ACTIVATIONS,
    RELUS,
    SQUASHES,
    running_modules,
    write_back,
)
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    as_leaf,
    eager_forward,
    get_module,
    gradients_enabled,
    modes_preserved,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.registry import register_method

__all__ = [
    "LRP_COMPOSITES",
    "LRP_RULES",
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "LRPComposite",
    "LRPLayer",
    "LRPRule",
    "LRPRuleName",
    "WSquare",
    "ZBox",
    "ZPlus",
    "lrp",
    "lrp_rules",
]

LRP_RULES = ("epsilon", "gamma", "alpha_beta", "zplus")
"""Rules applied to every convolution and linear layer."""

LRP_COMPOSITES = (
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
)
"""zennit's composites for CNNs, by zennit's names: epsilon on linear layers; on convolutions (transposed ones too) z+
(``epsilon_plus``), gamma (``epsilon_gamma_box``) or alpha=2, beta=1 (``epsilon_alpha2_beta1``); on the first layer
the flat rule (``..._flat``) or the box rule (``epsilon_gamma_box``, bounds ``low`` / ``high``)."""

LRPRuleName = Literal[
    "epsilon",
    "gamma",
    "alpha_beta",
    "zplus",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
]
"""The names :func:`lrp` accepts for ``rule``: :data:`LRP_RULES` and :data:`LRP_COMPOSITES`."""

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ALL_CONVOLUTIONS = (*_CONVOLUTIONS, *_TRANSPOSED)  # zennit's ``Convolution``, what the composites map
_WEIGHTED = (nn.Linear, *_ALL_CONVOLUTIONS)
_TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVERAGES = frozenset(
    {
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        torch.mean,
        torch.Tensor.mean,
    }
)
_PASS = RELUS | frozenset(OTHER_ACTIVATIONS) | frozenset(SQUASHES)


def _stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)``, with sign(0) = 1 (zennit's stabiliser)."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _share(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``relevance / stabilised z``, and 0 where that is 0 / 0 (``epsilon=0`` at an output of exactly 0)."""
    denominator = _stabilize(z, epsilon)
    return torch.where(denominator == 0, torch.zeros_like(relevance), relevance / denominator)


def _non_negative(rule: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ValueError(f"{rule} needs {key} >= 0, got {value}.")


def _with_bias(layer: LRPLayer, bias: bool) -> LRPLayer:
    return layer if bias else layer.without_bias()


@dataclass(frozen=True, eq=False)
class LRPLayer:
    """One call of a convolution or linear layer, as an :class:`LRPRule` sees it.

    Attributes:
        module: the ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d`` that ran (rules must not
            modify it).
        weight: its weight, detached, with the BatchNorm that follows it (if one does) merged in.
        bias: its bias likewise, zeros where the layer has none.
        output_padding: for a transposed convolution, the output padding of this call (an ``output_size`` given to
            its forward may choose one other than the module's); None for the other layers.

    Example:
        >>> layer = LRPLayer(nn.Linear(2, 1), torch.tensor([[1.0, -2.0]]), torch.tensor([0.5]))
        >>> layer.forward(torch.tensor([[3.0, 1.0]]), layer.weight, layer.bias)
        tensor([[1.5000]])
        >>> layer.gradient(torch.zeros(1, 2), torch.tensor([[2.0]]), layer.weight.clamp(min=0))
        tensor([[2., 0.]])
    """

    module: nn.Module
    weight: Tensor
    bias: Tensor
    output_padding: tuple[int, ...] | None = None

    def without_bias(self) -> LRPLayer:
        """The same layer call with a zero bias (zennit's ``zero_params="bias"``, after the BatchNorm merge).

        Example:
            >>> LRPLayer(nn.Linear(2, 1), torch.ones(1, 2), torch.tensor([0.5])).without_bias().bias
            tensor([0.])
        """
        return replace(self, bias=torch.zeros_like(self.bias))

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's operation (its stride, padding, groups, ...) on ``x`` with ``weight`` and ``bias``.

        Args:
            x: an input shaped like the layer's.
            weight: shaped like :attr:`weight` (e.g. its positive part).
            bias: shaped like :attr:`bias`, or None for no bias.
        """
        module = self.module
        if isinstance(module, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(module, _TRANSPOSED):
            padding = module.output_padding if self.output_padding is None else self.output_padding
            transposed = _TRANSPOSED_FUNCTIONS[len(module.kernel_size)]
            return transposed(x, weight, bias, module.stride, module.padding, padding, module.groups, module.dilation)
        return module._conv_forward(x, weight, bias)  # the layer's own padding mode, stride, groups

    def gradient(self, x: Tensor, scale: Tensor, weight: Tensor) -> Tensor:
        """The gradient of ``(scale * forward(x, weight)).sum()`` with respect to ``x``: the transposed layer with
        ``weight`` applied to ``scale``, shaped like ``x`` (the layer is linear, so ``x`` only gives the shape).

        Args:
            x: an input shaped like the layer's.
            scale: shaped like the layer's output (typically the relevance divided by a stabilised output).
            weight: the weight to transpose.
        """
        module = self.module
        if isinstance(module, nn.Linear):  # what autograd computes for F.linear, without running the layer first
            return scale.matmul(weight)
        if isinstance(module, _CONVOLUTIONS) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            # the input gradient of the convolution, directly: autograd's own op, without the forward it would need
            grad, _, _ = torch.ops.aten.convolution_backward(
                scale, x, weight, None, module.stride, module.padding, module.dilation, False,
                [0] * len(module.kernel_size), module.groups, [True, False, False],
            )  # fmt: skip
            return grad
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.forward(leaf, weight), leaf, scale)
        return grad


class LRPRule(abc.ABC):
    """How relevance passes one convolution or linear layer; subclass it and define :meth:`propagate`.

    A rule is a small stateless object: :func:`lrp` calls it on every layer it is given to, during the backward
    pass of the one call. The built-in rules are :class:`Epsilon`, :class:`ZPlus`, :class:`AlphaBeta`,
    :class:`Gamma`, :class:`Flat`, :class:`WSquare` and :class:`ZBox`.

    Example:
        >>> class Zero(LRPRule):  # LRP-0, written out
        ...     def propagate(self, layer, x, relevance):
        ...         z = layer.forward(x, layer.weight, layer.bias)
        ...         return x * layer.gradient(x, relevance / z, layer.weight)
        >>> net = nn.Sequential(nn.Linear(3, 1, bias=False))
        >>> x = torch.rand(2, 3)
        >>> torch.allclose(lrp(net, x, 0, rule=Zero()).sum(dim=1), net(x)[:, 0])
        True
    """

    @abc.abstractmethod
    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        """The relevance at the layer's input.

        Args:
            layer: the layer call: its module and its (BatchNorm-merged) weight and bias.
            x: the layer's input, detached.
            relevance: the relevance at the layer's output, shaped like it.

        Returns:
            A tensor shaped like ``x``.
        """


@dataclass(frozen=True)
class Epsilon(LRPRule):
    """The epsilon rule: ``R_in = x * W^T (R / (z + epsilon * sign z))``, sign(0) = 1; LRP-0 at ``epsilon=0``.

    Args:
        epsilon: added to the denominator with the output's sign (also a parameter of the rule, not only a
            stabiliser: a larger one absorbs the relevance of weak outputs). A 0 / 0 gives 0.
        bias: whether the layer's bias (with a merged BatchNorm's shift) takes part; ``False`` is the bias-free
            variant (zennit's ``zero_params="bias"``), which conserves relevance through the layer.

    Example:
        >>> lrp(nn.Linear(3, 2), torch.rand(4, 3), 0, rule=Epsilon(0.25)).shape
        torch.Size([4, 3])
        >>> linear, x = nn.Linear(3, 1), torch.rand(2, 3)  # LRP-0 leaves the bias's share b out ...
        >>> torch.allclose(lrp(linear, x, 0, rule=Epsilon(0.0)).sum(1), linear(x)[:, 0] - linear.bias, atol=1e-6)
        True
        >>> torch.allclose(lrp(linear, x, 0, rule=Epsilon(0.0, bias=False)).sum(1), linear(x)[:, 0])  # ... not here
        True
    """

    epsilon: float = 1e-6
    bias: bool = True

    def __post_init__(self) -> None:
        _non_negative("The epsilon rule", epsilon=self.epsilon)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        layer = _with_bias(layer, self.bias)
        z = layer.forward(x, layer.weight, layer.bias)
        return x * layer.gradient(x, _share(relevance, z, self.epsilon), layer.weight)


def _positive_and_negative(layer: LRPLayer, x: Tensor, relevance: Tensor, stabilizer: float, up: bool) -> Tensor:
    """The relevance of the contributions that raise (``up``) or lower the output: ``x+ W+ + x- W-`` with the
    positive part of the bias, or ``x+ W- + x- W+`` with its negative part."""
    w_plus, w_minus = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    if not up:
        w_plus, w_minus = w_minus, w_plus
    x_plus, x_minus = x.clamp(min=0), x.clamp(max=0)
    bias = layer.bias.clamp(min=0) if up else layer.bias.clamp(max=0)
    z = layer.forward(x_plus, w_plus, bias) + layer.forward(x_minus, w_minus)
    scale = _share(relevance, z, stabilizer)
    return x_plus * layer.gradient(x, scale, w_plus) + x_minus * layer.gradient(x, scale, w_minus)


@dataclass(frozen=True)
class ZPlus(LRPRule):
    """The z+ rule: only the positive contributions ``x+ W+ + x- W-`` (alpha=1, beta=0), as zennit's ``ZPlus``.

    Args:
        stabilizer: added to the denominator with its sign.
        bias: whether the layer's bias (with a merged BatchNorm's shift) takes part; ``False`` is the bias-free
            variant (zennit's ``zero_params="bias"``), which conserves relevance through the layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
        >>> bool((lrp(net, torch.rand(2, 3), 0, rule=ZPlus()) >= 0).all())  # positive input and score: positive
        True
    """

    stabilizer: float = 1e-6
    bias: bool = True

    def __post_init__(self) -> None:
        _non_negative("The z+ rule", stabilizer=self.stabilizer)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        return _positive_and_negative(_with_bias(layer, self.bias), x, relevance, self.stabilizer, up=True)


@dataclass(frozen=True)
class AlphaBeta(LRPRule):
    """The alpha-beta rule: ``alpha`` times the relevance of the positive contributions minus ``beta`` times that
    of the negative ones, each normalised on its own.

    Args:
        alpha: weight of the positive contributions, >= 0.
        beta: weight of the negative contributions, >= 0, with ``alpha - beta = 1``.
        stabilizer: added to the denominators with their sign.
        bias: whether the layer's bias (with a merged BatchNorm's shift) takes part; ``False`` is the bias-free
            variant (zennit's ``zero_params="bias"``), which conserves relevance through the layer.

    Example:
        >>> AlphaBeta(1.0, 0.0)
        AlphaBeta(alpha=1.0, beta=0.0, stabilizer=1e-06, bias=True)
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    bias: bool = True

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(
                f"The alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1, got {self.alpha}, {self.beta}."
            )
        _non_negative("The alpha-beta rule", stabilizer=self.stabilizer)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        layer = _with_bias(layer, self.bias)
        up = _positive_and_negative(layer, x, relevance, self.stabilizer, up=True)
        down = _positive_and_negative(layer, x, relevance, self.stabilizer, up=False)
        return self.alpha * up - self.beta * down


@dataclass(frozen=True)
class Gamma(LRPRule):
    """The generalised gamma rule (inputs of both signs, as zennit's ``Gamma``): the contributions that agree with
    the sign of the output are raised by ``gamma`` times their positive (or, for a negative output, negative) part.

    Args:
        gamma: how much to favour the contributions of the output's sign (0: LRP-0, large: towards z+).
        stabilizer: added to the denominators with their sign.
        bias: whether the layer's bias (with a merged BatchNorm's shift) takes part; ``False`` is the bias-free
            variant (zennit's ``zero_params="bias"``): the favoured sign is still that of the layer's real output.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2))
        >>> lrp(net, torch.rand(4, 2, 8), 1, rule=Gamma(0.5)).shape
        torch.Size([4, 2, 8])
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6
    bias: bool = True

    def __post_init__(self) -> None:
        _non_negative("The gamma rule", gamma=self.gamma, stabilizer=self.stabilizer)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        z = layer.forward(x, layer.weight, layer.bias)  # the output's sign, with its bias also when bias=False (zennit)
        layer = _with_bias(layer, self.bias)
        gamma, weight, bias = self.gamma, layer.weight, layer.bias
        w_up, b_up = weight + gamma * weight.clamp(min=0), bias + gamma * bias.clamp(min=0)
        w_down, b_down = weight + gamma * weight.clamp(max=0), bias + gamma * bias.clamp(max=0)
        x_plus, x_minus = x.clamp(min=0), x.clamp(max=0)
        z_up = layer.forward(x_plus, w_up, b_up) + layer.forward(x_minus, w_down)
        z_down = layer.forward(x_plus, w_down, b_down) + layer.forward(x_minus, w_up)
        scale_up = (z > 0).to(z.dtype) * _share(relevance, z_up, self.stabilizer)
        scale_down = (z < 0).to(z.dtype) * _share(relevance, z_down, self.stabilizer)
        return (x_plus * layer.gradient(x, scale_up, w_up) + x_minus * layer.gradient(x, scale_up, w_down)) + (
            x_plus * layer.gradient(x, scale_down, w_down) + x_minus * layer.gradient(x, scale_down, w_up)
        )


def _spread(
    layer: LRPLayer, x: Tensor, relevance: Tensor, weight: Tensor, stabilizer: float, bias: Tensor | None = None
) -> Tensor:
    """Relevance spread over the receptive field in proportion to ``weight``, whatever the input; ``bias`` (if given)
    only enlarges the denominator."""
    ones = torch.ones_like(x)
    z = layer.forward(ones, weight, bias)
    return layer.gradient(ones, _share(relevance, z, stabilizer), weight)


@dataclass(frozen=True)
class Flat(LRPRule):
    """The flat rule: an output's relevance spread evenly over its receptive field (the input and the weights
    ignored; the bias too), as zennit's ``Flat``. For a first layer.

    Args:
        stabilizer: added to the denominator.

    Example:
        >>> lrp(nn.Linear(4, 1), torch.rand(1, 4), 0, rule=Flat()).std().item() < 1e-6
        True
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _non_negative("The flat rule", stabilizer=self.stabilizer)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        return _spread(layer, x, relevance, torch.ones_like(layer.weight), self.stabilizer)


@dataclass(frozen=True)
class WSquare(LRPRule):
    """The w² rule (Montavon et al. 2017): ``R_in_i = sum_j W_ji² / (sum_k W_jk²) R_j``, for a first layer whose
    input is unbounded. The bias is left out, as in the paper (zennit's ``WSquare(zero_params=["bias"])``).

    Args:
        stabilizer: added to the denominator.
        bias: add the squared bias to the denominator (``sum_k W_jk² + b_j²``, zennit's ``WSquare()``); the share
            it takes is absorbed.

    Example:
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 3.0]]))
        >>> lrp(layer, torch.tensor([[5.0, 1.0]]), 0, rule=WSquare(0.0))  # the score 8 split 1 : 9
        tensor([[0.8000, 7.2000]])
    """

    stabilizer: float = 1e-6
    bias: bool = False

    def __post_init__(self) -> None:
        _non_negative("The w² rule", stabilizer=self.stabilizer)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        bias = layer.bias**2 if self.bias else None
        return _spread(layer, x, relevance, layer.weight**2, self.stabilizer, bias)


@dataclass(frozen=True, eq=False)
class ZBox(LRPRule):
    """The z^B (box) rule (Montavon et al. 2017) for a first layer whose input lies in ``[low, high]``:
    ``R_in = x * W^T s - low * W+^T s - high * W-^T s`` with ``s = R / z_box`` and
    ``z_box = W x - W+ low - W- high`` (the bias cancels). Conserves relevance, and is non-negative for ``x`` in
    the box and a non-negative ``R``.

    Args:
        low: the lowest possible input value: a float, or a tensor that broadcasts to the input (per channel:
            shape ``(C, 1, 1)`` or ``(1, C, 1, 1)`` for images).
        high: the highest possible input value, likewise.
        stabilizer: added to the denominator with its sign.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> low, high = torch.tensor([-2.0, -1.5, -1.8])[:, None, None], torch.tensor([2.2, 2.4, 2.6])[:, None, None]
        >>> rule = LRPComposite(first_layer=ZBox(low, high), default=Epsilon())
        >>> lrp(net, torch.rand(1, 3, 4, 4), 0, rule=rule).shape
        torch.Size([1, 3, 4, 4])
    """

    low: float | Tensor
    high: float | Tensor
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        low, high = torch.as_tensor(self.low), torch.as_tensor(self.high)
        try:
            ordered = bool((low <= high).all())
        except RuntimeError as error:
            raise ValueError(f"ZBox's low and high do not broadcast together: {error}") from None
        if not ordered:
            raise ValueError(f"ZBox needs low <= high, got {self.low} and {self.high}.")
        _non_negative("The box rule", stabilizer=self.stabilizer)

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        low, high = (torch.broadcast_to(torch.as_tensor(b).to(x), x.shape).contiguous() for b in (self.low, self.high))
        weight = layer.weight
        w_plus, w_minus = weight.clamp(min=0), weight.clamp(max=0)
        z = layer.forward(x, weight) - layer.forward(low, w_plus) - layer.forward(high, w_minus)
        scale = _share(relevance, z, self.stabilizer)
        return (
            x * layer.gradient(x, scale, weight)
            - low * layer.gradient(x, scale, w_plus)
            - high * layer.gradient(x, scale, w_minus)
        )


@dataclass(frozen=True, eq=False)
class _InputBox(ZBox):
    """The box rule of ``rule="epsilon_gamma_box"``: refuses a first-layer input outside the box, since the bounds
    came from the keywords (or the [0, 1] default), not from a rule the user built."""

    defaulted: bool = False

    def propagate(self, layer: LRPLayer, x: Tensor, relevance: Tensor) -> Tensor:
        low, high = (torch.as_tensor(b).to(x) for b in (self.low, self.high))
        slack = 1e-5 * max(1.0, float(low.abs().max()), float(high.abs().max()))  # rounding of normalised bounds
        outside = (x < low - slack) | (x > high + slack)
        if bool(outside.any()):
            spans = f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
            found = f"its input spans {spans} ({int(outside.sum())} values outside)"
            how = (
                "pass low= and high=, the lowest and highest values the first layer can see: for images normalised "
                "as (x - mean) / std, low = (0 - mean) / std and high = (1 - mean) / std, per channel shaped (C, 1, 1)"
            )
            if self.defaulted:
                raise ValueError(
                    f"rule='epsilon_gamma_box' applies the box rule to the first layer with the input range [0, 1] by "
                    f"default, and {found}: {how}."
                )
            raise ValueError(
                f"rule='epsilon_gamma_box' applies the box rule to the first layer with the low and high given, and "
                f"{found}: the box must hold every input; {how}."
            )
        return super().propagate(layer, x, relevance)


_RuleKey = Union[str, type, tuple]  # noqa: UP007 (runtime alias, Python 3.10)


class LRPComposite:
    """Rules for the layers of one model: by dotted module name, by module type, for the first layer, or a default.

    The rule of a convolution or linear layer is, in order: the rule of its own name; ``first_layer`` if it is
    the first such layer the forward pass calls; the rule of the deepest named module that contains it (a
    name such as ``"features"`` covers every layer inside); the rule of its type (its own class first, then its
    base classes, then virtual ones); else ``default``. Names win over types. Names are checked against the model
    when :func:`lrp` runs: an unknown one is a ``ValueError`` that lists the closest names. A plain mapping
    ``{name or type: rule}`` passed as :func:`lrp`'s ``rule`` is this composite with its string keys as
    ``by_name`` and its types (or tuples of types) as ``by_type``.

    Args:
        by_type: rules by module class (or tuple of classes): ``nn.Linear``, ``nn.Conv2d``, a subclass, a base.
        by_name: rules by dotted module name, as in ``model.named_modules()``.
        first_layer: the rule for the first convolution or linear layer called (e.g. :class:`ZBox`,
            :class:`Flat`), unless that layer's own name has a rule.
        default: the rule of a layer nothing else matches.

    Raises:
        TypeError: a key that is neither a string nor a class, or a rule that is not an :class:`LRPRule`.
        ValueError: a type that can be no convolution or linear layer (``nn.ReLU``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
        >>> composite = LRPComposite(first_layer=ZBox(0.0, 1.0), by_type={nn.Linear: Epsilon(0.25)})
        >>> lrp(net, torch.rand(4, 1, 4, 4), 0, rule=composite).shape
        torch.Size([4, 1, 4, 4])
        >>> lrp(net, torch.rand(4, 1, 4, 4), 0, rule={"0": ZBox(0.0, 1.0), nn.Linear: Epsilon()}).shape
        torch.Size([4, 1, 4, 4])
    """

    def __init__(
        self,
        *,
        by_type: Mapping[type | tuple[type, ...], LRPRule] | None = None,
        by_name: Mapping[str, LRPRule] | None = None,
        first_layer: LRPRule | None = None,
        default: LRPRule | None = None,
    ) -> None:
        types: dict[type, LRPRule] = {}
        for key, rule in (by_type or {}).items():
            for cls in key if isinstance(key, tuple) else (key,):
                if not isinstance(cls, type):
                    raise TypeError(f"by_type keys must be module classes or tuples of them, got {cls!r}.")
                if not (issubclass(cls, _WEIGHTED) or any(issubclass(weighted, cls) for weighted in _WEIGHTED)):
                    raise ValueError(
                        f"LRP rules apply to Linear and Conv1d/2d/3d layers (and their subclasses); no such layer is "
                        f"a {cls.__name__}. The other layers' propagation is fixed (see the lrp module docstring)."
                    )
                types[cls] = _checked_rule(rule, cls.__name__)
        names: dict[str, LRPRule] = {}
        for name, rule in (by_name or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"by_name keys must be dotted module names, got {name!r}.")
            names[name] = _checked_rule(rule, repr(name))
        self.by_type: Mapping[type, LRPRule] = MappingProxyType(types)
        self.by_name: Mapping[str, LRPRule] = MappingProxyType(names)
        self.first_layer = None if first_layer is None else _checked_rule(first_layer, "first_layer")
        self.default = Epsilon() if default is None else _checked_rule(default, "default")

    @classmethod
    def from_mapping(cls, rules: Mapping[_RuleKey, LRPRule]) -> LRPComposite:
        """The composite of a ``{name or type: rule}`` mapping (string keys are names; the default is Epsilon()).

        Example:
            >>> LRPComposite.from_mapping({"features.0": Flat(), nn.Linear: Epsilon(0.1)}).by_name["features.0"]
            Flat(stabilizer=1e-06)
        """
        by_name = {key: rule for key, rule in rules.items() if isinstance(key, str)}
        by_type = {key: rule for key, rule in rules.items() if not isinstance(key, str)}
        return cls(by_type=by_type, by_name=by_name)

    def __repr__(self) -> str:
        types = {cls.__name__: rule for cls, rule in self.by_type.items()}
        return (
            f"LRPComposite(by_type={types}, by_name={dict(self.by_name)}, first_layer={self.first_layer!r}, "
            f"default={self.default!r})"
        )

    def _for_model(self, model: nn.Module) -> Callable[[nn.Module, bool], LRPRule]:
        """The rule of each call of a layer of ``model`` (the layer, whether it is the first call); names checked."""
        exact: dict[nn.Module, LRPRule] = {}
        scoped: dict[nn.Module, LRPRule] = {}
        for name in sorted(self.by_name, key=lambda name: name.count(".")):  # containers before their contents
            module = get_module(model, name)
            layers = [inner for inner in module.modules() if isinstance(inner, _WEIGHTED)]
            if not layers:
                raise ValueError(
                    f"The LRP rule for {name!r} has no layer to act on: {name!r} ({type(module).__name__}) is no "
                    "convolution or linear layer and holds none. Name a Linear or Conv1d/2d/3d layer or a module "
                    "that contains some."
                )
            if isinstance(module, _WEIGHTED):
                exact[module] = self.by_name[name]
            for layer in layers:
                scoped[layer] = self.by_name[name]

        def rule_for(module: nn.Module, first: bool) -> LRPRule:
            if module in exact:
                return exact[module]
            if first and self.first_layer is not None:
                return self.first_layer
            if module in scoped:
                return scoped[module]
            return self._type_rule(module) or self.default

        return rule_for

    def _type_rule(self, module: nn.Module) -> LRPRule | None:
        for cls in type(module).__mro__:
            if cls in self.by_type:
                return self.by_type[cls]
        return next((rule for cls, rule in self.by_type.items() if isinstance(module, cls)), None)  # virtual bases


def _checked_rule(rule: object, where: str) -> LRPRule:
    if not isinstance(rule, LRPRule):
        hint = (
            " (the names such as 'epsilon' are for lrp's rule alone; use Epsilon() here)"
            if isinstance(rule, str)
            else ""
        )
        raise TypeError(f"The LRP rule for {where} must be an LRPRule, got {rule!r}{hint}.")
    return rule


@dataclass
class _LayerCall:
    """One call of a convolution or linear layer, and the BatchNorm merged into it (if one follows)."""

    module: nn.Module
    output_padding: tuple[int, ...] | None = None
    batchnorm: nn.Module | None = field(default=None)

    def layer(self) -> LRPLayer:
        module = self.module
        weight = module.weight.detach()
        transposed = isinstance(module, _TRANSPOSED)
        channels = weight.shape[1] * module.groups if transposed else weight.shape[0]
        bias = module.bias
        bias = torch.zeros(channels, dtype=weight.dtype, device=weight.device) if bias is None else bias.detach()
        norm = self.batchnorm
        if norm is None:
            return LRPLayer(module, weight, bias, self.output_padding)
        mean, var = norm.running_mean, norm.running_var
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach()
        shift = -mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias.detach()
        if transposed:  # weight (in, out / groups, ...): output channel g * out / groups + j is [g-th inputs, j]
            groups, kernel = module.groups, weight.shape[2:]
            grouped = weight.reshape(groups, -1, weight.shape[1], *kernel)
            merged = grouped * scale.reshape(groups, 1, -1, *([1] * len(kernel)))
            return LRPLayer(module, merged.reshape(weight.shape), bias * scale + shift, self.output_padding)
        merged = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        return LRPLayer(module, merged, bias * scale + shift, self.output_padding)


class _Rule(torch.autograd.Function):
    """Identity on the forward value of a layer; the backward maps relevance with ``backward_fn`` to the input."""

    @staticmethod
    def forward(ctx, x: Tensor, output: Tensor, backward_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.backward_fn = backward_fn
        ctx.save_for_backward(x)  # as a convolution saves its input: writing it in place later is an error
        return output.detach().clone()

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            return ctx.backward_fn(x.detach(), relevance), None, None


class _Pass(torch.autograd.Function):
    """An elementwise map (activation, merged BatchNorm) whose output relevance goes to its input unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, output: Tensor) -> Tensor:  # type: ignore[override]
        return output.detach().clone()

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return relevance, None


class _Proportional(torch.autograd.Function):
    """A linear parameter-free map (average, sum) that splits relevance in proportion to each input's share."""

    @staticmethod
    def forward(ctx, function: Callable[..., Tensor], epsilon: float, copy: bool, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.function, ctx.epsilon = function, epsilon
        saved = [t.detach().clone() if copy else t.detach() for t in inputs]  # an in-place sum writes its input
        ctx.save_for_backward(*saved)
        return function(*saved)

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            z = ctx.function(*leaves)
            grads = torch.autograd.grad(z, leaves, _share(relevance, z.detach(), ctx.epsilon))
        return (None, None, None, *[leaf.detach() * grad for leaf, grad in zip(leaves, grads, strict=True)])


class _FunctionalRules(TorchFunctionMode):
    def __init__(self, stabilizer: float) -> None:
        super().__init__()
        self.epsilon = stabilizer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        if func in _PASS and isinstance(args[0], Tensor) and args[0].requires_grad:
            copy = args[0].detach().clone()  # an in-place call acts on the copy ...
            return write_back(func, args[0], _Pass.apply(args[0], func(copy, *args[1:], **kwargs)))
        if func in _AVERAGES and isinstance(args[0], Tensor) and args[0].requires_grad:
            rest = args[1:]
            return _Proportional.apply(lambda t: func(t, *rest, **kwargs), self.epsilon, False, args[0])
        if func in ADDITIONS and len(args) == 2 and not kwargs and _two_activations(*args):
            return write_back(
                func, args[0], _Proportional.apply(torch.add, self.epsilon, func in IN_PLACE, args[0], args[1])
            )
        return func(*args, **kwargs)


def _output_padding(module: nn.Module, x: Tensor, output: Tensor) -> tuple[int, ...] | None:
    """The output padding a transposed convolution's call used (from its input and output sizes: an ``output_size``
    given to its forward chooses it); None for the other layers."""
    if not isinstance(module, _TRANSPOSED):
        return None
    dims = len(module.kernel_size)
    return tuple(
        size_out - ((size_in - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1)
        for size_in, size_out, stride, pad, dilation, kernel in zip(
            x.shape[-dims:],
            output.shape[-dims:],
            module.stride,
            module.padding,
            module.dilation,
            module.kernel_size,
            strict=True,
        )
    )


def _two_activations(a: object, b: object) -> bool:
    """Two same-shaped computed tensors that carry relevance (a residual connection), not a parameter or a constant."""
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.shape == b.shape
        and a.requires_grad
        and b.requires_grad
        and not isinstance(a, nn.Parameter)
        and not isinstance(b, nn.Parameter)
    )


def _check_layers(model: nn.Module) -> None:
    """Refuse, before any forward, a model with a parameterised layer no rule covers."""
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and module.running_mean is None:
            raise ValueError(
                f"LRP merges a BatchNorm into the layer before it with its running statistics, and {name!r} keeps "
                "none (track_running_stats=False). Use a gradient method (integrated_gradients) for this model."
            )
        if isinstance(module, (*_WEIGHTED, *_BATCHNORMS)):
            continue
        own = [key for key, _ in module.named_parameters(recurse=False)]
        if own:
            where = f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
            raise ValueError(
                "LRP has rules for Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and BatchNorm after one of them; "
                f"{where} has parameters ({', '.join(own)}) and no rule. Use a gradient method (integrated_gradients, "
                "input_x_gradient) or a CAM method for this model."
            )


_DEFAULTS = {"epsilon": 1e-6, "gamma": 0.25, "alpha": 2.0, "beta": 1.0, "bias": True}
_ALPHA2_BETA1 = ("epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat")


def _resolve_rule(
    rule: object,
    epsilon: float,
    gamma: float,
    alpha: float,
    beta: float,
    stabilizer: float,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
    bias: bool = True,
) -> LRPComposite:
    """The composite of ``rule``: a name (with the keyword parameters), a rule, a composite or a mapping."""
    boxed = low is not None or high is not None
    if isinstance(rule, str):
        if rule not in LRP_RULES + LRP_COMPOSITES:
            raise ValueError(
                f"rule must be one of {LRP_RULES + LRP_COMPOSITES}, an LRPRule, an LRPComposite or a mapping "
                f"{{module name or type: LRPRule}}, got {rule!r}."
            )
        if epsilon < 0 or gamma < 0 or stabilizer < 0:
            raise ValueError(f"epsilon, gamma and stabilizer must be >= 0, got {epsilon}, {gamma}, {stabilizer}.")
        if boxed and rule != "epsilon_gamma_box":
            raise ValueError(
                f"low and high are the input box of rule='epsilon_gamma_box'; rule={rule!r} has no box rule (for a box "
                "on the first layer with other rules, give LRPComposite(first_layer=ZBox(low, high), ...))."
            )
        if rule in _ALPHA2_BETA1 and (alpha, beta) != (2.0, 1.0):
            raise ValueError(
                f"rule={rule!r} is alpha=2, beta=1 on convolutions (zennit's composite of that name), got alpha={alpha}"
                f", beta={beta}; for others give LRPComposite(by_type={{nn.Conv2d: AlphaBeta({alpha}, {beta}), ...}})."
            )
        if rule == "epsilon":
            return LRPComposite(default=Epsilon(epsilon, bias))
        if rule == "zplus":
            return LRPComposite(default=ZPlus(stabilizer, bias))
        if rule == "alpha_beta":
            return LRPComposite(default=AlphaBeta(alpha, beta, stabilizer, bias))
        if rule == "gamma":
            return LRPComposite(default=Gamma(gamma, stabilizer, bias))
        convolution = {
            "epsilon_plus": ZPlus(stabilizer, bias),
            "epsilon_plus_flat": ZPlus(stabilizer, bias),
            "epsilon_gamma_box": Gamma(gamma, stabilizer, bias),
            "epsilon_alpha2_beta1": AlphaBeta(2.0, 1.0, stabilizer, bias),
            "epsilon_alpha2_beta1_flat": AlphaBeta(2.0, 1.0, stabilizer, bias),
        }[rule]
        first_layer: LRPRule | None = Flat(stabilizer) if rule.endswith("_flat") else None
        if rule == "epsilon_gamma_box":
            if (low is None) != (high is None):
                raise ValueError(
                    "rule='epsilon_gamma_box' needs both bounds of the first layer's input, low and high (or neither "
                    f"for [0, 1]), got low={low!r}, high={high!r}."
                )
            first_layer = _InputBox(0.0 if low is None else low, 1.0 if high is None else high, stabilizer, not boxed)
        return LRPComposite(
            by_type={_ALL_CONVOLUTIONS: convolution, nn.Linear: Epsilon(epsilon, bias)},
            first_layer=first_layer,
            default=Epsilon(epsilon, bias),
        )
    _non_negative("LRP", stabilizer=stabilizer)
    given = {"epsilon": epsilon, "gamma": gamma, "alpha": alpha, "beta": beta, "bias": bias}
    changed = [key for key, value in given.items() if value != _DEFAULTS[key]] + (["low", "high"] if boxed else [])
    if changed:
        raise ValueError(
            f"{', '.join(changed)} only configure{'s' if len(changed) == 1 else ''} the named rules (rule='epsilon', "
            f"...); with rule={rule!r} give them to the rule objects instead, e.g. Epsilon(0.25), Gamma(0.5), "
            "AlphaBeta(1.0, 0.0), Epsilon(bias=False), ZBox(low, high)."
        )
    if isinstance(rule, LRPComposite):
        return rule
    if isinstance(rule, LRPRule):
        return LRPComposite(default=rule)
    if isinstance(rule, Mapping):
        return LRPComposite.from_mapping(rule)
    raise TypeError(
        f"rule must be one of {LRP_RULES + LRP_COMPOSITES}, an LRPRule, an LRPComposite or a mapping "
        f"{{module name or type: LRPRule}}, got {type(rule).__name__}."
    )


@contextlib.contextmanager
def lrp_rules(
    model: nn.Module,
    rule: LRPRuleName | LRPRule | LRPComposite | Mapping[str | type | tuple[type, ...], LRPRule] = "epsilon",
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
    bias: bool = True,
) -> Iterator[None]:
    """Inside the block, the backward pass of ``model`` propagates relevance by the LRP ``rule``.

    Forward hooks on the convolution, linear and BatchNorm layers and a
    :class:`~torch.overrides.TorchFunctionMode` for activations, pooling and
    residual additions; every hook is removed when the block ends or raises.
    Run the forward pass inside the block; the backward may come after it.
    The gradient that arrives at the input is its relevance (not multiplied by the input).

    Args:
        model: the network (see the module docstring for the layers it may have).
        rule: one of :data:`LRP_RULES` or :data:`LRP_COMPOSITES` (configured by the keywords below), an
            :class:`LRPRule` for every layer, an :class:`LRPComposite`, or a mapping ``{name or type: rule}``.
        epsilon: the epsilon rule's epsilon (named rules only).
        gamma: the gamma rule's factor on positive contributions (named rules only).
        alpha: the alpha-beta rule's weight on positive contributions (named rules only).
        beta: the alpha-beta rule's weight on negative contributions, ``alpha - beta = 1`` (named rules only).
        stabilizer: added to the denominators of pooling and sums, and of the named rules other than epsilon
            (zennit's ``stabilizer``).
        low: the lowest value the first layer's input can take (``rule="epsilon_gamma_box"`` only; see :func:`lrp`).
        high: the highest, likewise.
        bias: False for the bias-free variants of the named rules (zennit's ``zero_params="bias"``).

    Raises:
        ValueError: an unknown rule or layer name, bad parameters, a layer without a rule, or a BatchNorm that does
            not follow a convolution or linear layer.
        TypeError: a ``rule`` of another kind.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
        >>> x = torch.rand(2, 3, requires_grad=True)
        >>> with lrp_rules(net, "epsilon", epsilon=0.0):
        ...     out = net(x)
        >>> (relevance,) = torch.autograd.grad(out, x, out)
        >>> torch.allclose(relevance.sum(dim=1), out[:, 0])
        True
    """
    composite = _resolve_rule(rule, epsilon, gamma, alpha, beta, stabilizer, low, high, bias)
    _check_layers(model)
    rule_for = composite._for_model(model)
    produced: dict[int, tuple[Tensor, _LayerCall]] = {}
    handles = []

    def weighted_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        call, layer_rule = _LayerCall(module, _output_padding(module, args[0], output)), rule_for(module, not produced)

        def backward(x: Tensor, relevance: Tensor) -> Tensor:
            result = layer_rule.propagate(call.layer(), x, relevance)
            if not isinstance(result, Tensor) or result.shape != x.shape:
                shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
                raise ValueError(
                    f"The LRP rule {layer_rule!r} of module {names[module]!r} returned {shape}, not a tensor shaped "
                    f"like the layer's input {tuple(x.shape)}."
                )
            return result.detach()

        result = _Rule.apply(args[0], output, backward)
        produced[id(result)] = (result, call)  # the tensor is kept, so its id is not reused during the call
        return result

    def batchnorm_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        source = produced.get(id(args[0]))
        if source is None or source[1].batchnorm is not None:
            raise ValueError(
                f"LRP merges a BatchNorm into the convolution or linear layer right before it; {names[module]!r} "
                "follows something else (an activation, an addition, another BatchNorm). Use a gradient method "
                "(integrated_gradients, input_x_gradient) or a CAM method for this model."
            )
        source[1].batchnorm = module
        return _Pass.apply(args[0], output)

    try:
        with running_modules(model) as (names, _):
            for module in model.modules():
                if isinstance(module, _WEIGHTED):
                    handles.append(module.register_forward_hook(weighted_hook))
                elif isinstance(module, _BATCHNORMS):
                    handles.append(module.register_forward_hook(batchnorm_hook))
            with _FunctionalRules(stabilizer):
                yield
    finally:
        for handle in handles:
            handle.remove()


@register_method(
    "modified backward", "LRP", scalars=("completeness_error",),
    cost="1 forward + 1 backward (+ 1 to 5 layer recomputations per layer, by rule)",
    reference="zennit rules and composites",
)  # fmt: skip
def lrp(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    rule: LRPRuleName | LRPRule | LRPComposite | Mapping[str | type | tuple[type, ...], LRPRule] = "epsilon",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
    bias: bool = True,
    return_convergence_delta: bool = False,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """Layer-wise relevance propagation of the target score to the input (one forward, one backward).

    The relevance at the output is the explained score (the target logit;
    for a binary model the logit of the explained side), so without biases
    and at ``epsilon=0`` a sample's input relevance sums to it. Rules and
    supported layers: see the module docstring.

    Args:
        model: the network: convolutions, linear layers, BatchNorm after them, activations, pooling, residual sums.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        rule: ``"epsilon"``, ``"gamma"``, ``"alpha_beta"``, ``"zplus"`` on every layer, or one of zennit's CNN
            composites :data:`LRP_COMPOSITES` (``"epsilon_plus"``, ``"epsilon_gamma_box"``, ...; configured by the
            keywords below); or an :class:`LRPRule` (e.g. ``Epsilon(0.25)``) for every layer; or an
            :class:`LRPComposite`; or a mapping ``{dotted name or module type: LRPRule}`` (names win over types,
            other layers get ``Epsilon()``).
        epsilon: the epsilon rule's epsilon, LRP-0 at 0 (named rules only: rule objects carry their own).
        gamma: the gamma rule's factor (named rules only).
        alpha: the alpha-beta rule's positive weight (named rules only).
        beta: the alpha-beta rule's negative weight (named rules only).
        stabilizer: the denominator stabiliser of pooling and sums, and of the named rules other than epsilon,
            as zennit's.
        low: for ``rule="epsilon_gamma_box"``: the lowest value the first layer's input can take, a float or a
            tensor that broadcasts to it (per channel: shape ``(C, 1, 1)``). Without ``low`` and ``high`` the box is
            [0, 1] (raw images). For normalised inputs ``(x - mean) / std`` give ``(0 - mean) / std`` and
            ``(1 - mean) / std``. An input outside the box is refused: the bounds are wrong there.
        high: the highest value, likewise.
        bias: False for the bias-free variants of the named rules (zennit's ``zero_params="bias"``): the biases
            (and merged BatchNorm shifts) take no share of the relevance. Rule objects take ``bias=`` themselves.
        return_convergence_delta: also return, per sample, the conservation residual
            ``sum(relevance) - explained score`` (float64): 0 for a bias-free ReLU network under LRP-0 or z+ on
            non-negative inputs; the share the biases and epsilon absorb otherwise.
        output_transform: selects or reshapes the model's output to (B, C) scores; it runs outside the rules with
            its plain gradient, so it should not rescale (a softmax would start from the probability's gradient).
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Relevance shaped like ``inputs``; with ``return_convergence_delta`` a tuple ``(relevance, delta)`` where
        ``delta`` has shape (B,).

    Raises:
        ValueError: an unknown rule name or module name (with the closest names), ``epsilon`` ... ``bias`` given
            with a rule object, ``low`` / ``high`` with a rule other than ``"epsilon_gamma_box"`` or an input outside
            them, or a layer LRP has no rule for.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3, bias=False))
        >>> x = torch.rand(4, 1, 4, 4)
        >>> relevance = lrp(net, x, target=0, epsilon=0.0)
        >>> torch.allclose(relevance.sum(dim=(1, 2, 3)), net(x)[:, 0], atol=1e-5)
        True
        >>> relevance = lrp(net, x, target=0, rule={"0": ZBox(0.0, 1.0), nn.Linear: Epsilon(0.0)})
        >>> torch.allclose(relevance.sum(dim=(1, 2, 3)), net(x)[:, 0], atol=1e-5)
        True
        >>> mean, std = torch.tensor([0.5]), torch.tensor([0.25])  # normalised inputs: the box of (x - mean) / std
        >>> low, high = ((0 - mean) / std)[:, None, None], ((1 - mean) / std)[:, None, None]
        >>> relevance, delta = lrp(
        ...     net, (x - 0.5) / 0.25, 0, rule="epsilon_gamma_box", low=low, high=high, return_convergence_delta=True
        ... )
        >>> delta.shape
        torch.Size([4])
    """
    with modes_preserved(model), eager_forward(), gradients_enabled():
        x = as_leaf(inputs)
        keywords = {"epsilon": epsilon, "gamma": gamma, "alpha": alpha, "beta": beta, "stabilizer": stabilizer}
        with lrp_rules(model, rule, **keywords, low=low, high=high, bias=bias):
            output = model(x)
        scores = scores_from_output(output, output_transform)
        index = resolve_target(target, scores, task)
        picked = scores.detach().requires_grad_(True)
        (selection,) = torch.autograd.grad(target_scores(picked, index, task).sum(), picked)
        explained = selection * scores.detach()  # the relevance at the output: the explained score
        (relevance,) = torch.autograd.grad(scores, x, explained)
    result = relevance.detach().to(inputs.dtype) if inputs.is_floating_point() else relevance.detach()
    if not return_convergence_delta:
        return result
    batch = relevance.shape[0]
    total = relevance.detach().reshape(batch, -1).double().sum(dim=1)
    return result, total - explained.reshape(batch, -1).double().sum(dim=1)
