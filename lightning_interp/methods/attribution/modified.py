"""Modified backward passes: guided backpropagation and deconvnet, as rules on the ReLUs for one call.

A rule replaces the gradient a ReLU passes back. It is applied to every ReLU
the forward pass calls, module (``nn.ReLU``, in place or not) or functional
(``F.relu``, ``torch.relu``, ``Tensor.relu``), through a
:class:`torch.overrides.TorchFunctionMode` active only during the call: no
module is replaced, no attribute is set, no parameter is touched, and nothing
is left behind when the call ends or raises. An in-place ReLU gets an
out-of-place result under the rule (every standard model uses the returned
tensor). Other piecewise or smooth activations (GELU, SiLU, ELU, LeakyReLU,
...) have no rule: a network that calls one is refused, naming the function
and the module that called it. Sigmoid and tanh pass their plain gradient,
as in Captum.

- ``guided_backprop`` (Springenberg et al. 2015): a ReLU passes back
  ``relu(grad_out) * (x > 0)``: only positive gradients, only where it was active.
- ``deconvnet`` (Zeiler and Fergus 2014): a ReLU passes back ``relu(grad_out)``,
  whatever its input was. With a :class:`~lightning_interp.methods.NeuronTarget` it is the paper's
  reconstruction of one feature map (section 2.1): every other activation of the layer set to zero, the
  chosen map's strongest activation (``keep="top"``, the default, as the paper's figures) or the whole map
  (``keep="map"``) passed down through the attached deconvnet: unpooling with the max-pool switches,
  rectification, transposed filters. The backward pass of the network under this rule *is* that deconvnet
  (max-pool's backward puts a value back where the maximum came from, a convolution's backward is the
  transposed convolution with the same filters, biases play no part), so the reconstruction is the backward
  pass of the top signal: the layer's output masked to the kept activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_interp.methods.attribution._rules import OTHER_ACTIVATIONS, RELUS, running_modules, where_running
from lightning_interp.methods.attribution.gradient import gradient
from lightning_interp.methods.model.core import ForwardWith, OutputTransform, Target
from lightning_interp.methods.model.neuron import NeuronScores, NeuronTarget, bind_neuron
from lightning_interp.methods.registry import register_method

__all__ = ["DECONV_KEEPS", "RELU_RULES", "DeconvKeep", "deconvnet", "deconvnet_signal", "guided_backprop", "relu_rule"]

RELU_RULES = ("guided_backprop", "deconvnet")

DeconvKeep = Literal["top", "map", "gradient"]
DECONV_KEEPS: tuple[str, ...] = ("top", "map", "gradient")


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.ops.aten.threshold_backward(grad.clamp_min(0), x, 0)  # fused: ReLU's own backward


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.clamp_min(0)


class _ReluRuleMode(TorchFunctionMode):
    def __init__(self, function: type[torch.autograd.Function], names: dict[nn.Module, str], stack: list) -> None:
        super().__init__()
        self.function = function
        self.names = names
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        if func in RELUS:
            return self.function.apply(args[0])
        if func in OTHER_ACTIVATIONS:
            where = where_running(self.names, self.stack)
            raise ValueError(
                f"This rule set (guided backprop / deconvnet) has a rule for ReLU only, and the model calls "
                f"{OTHER_ACTIVATIONS[func]}{where}: its backward pass would be neither guided nor plain. Use a "
                "gradient method (gradient, integrated_gradients) or a CAM method for this model."
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rule(model: nn.Module, rule: str) -> Iterator[None]:
    """Apply ``rule`` (:data:`RELU_RULES`) to every ReLU ``model`` calls inside the block; nothing outlives it.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Linear(2, 1))
        >>> x = torch.randn(3, 2, requires_grad=True)
        >>> with relu_rule(net, "deconvnet"):
        ...     net(x).sum().backward()
        >>> x.grad.shape
        torch.Size([3, 2])
    """
    if rule not in RELU_RULES:
        raise ValueError(f"rule must be one of {RELU_RULES}, got {rule!r}.")
    function = _GuidedReLU if rule == "guided_backprop" else _DeconvReLU
    with running_modules(model) as (names, stack), _ReluRuleMode(function, names, stack):
        yield


def _modified_gradient(
    rule: str,
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    output_transform: OutputTransform | None,
    task: str,
) -> Tensor:
    with relu_rule(model, rule):  # the plain gradient, with the rule on every ReLU
        return gradient(model, inputs, target, output_transform=output_transform, task=task)


@register_method(
    "modified backward", "guided\nbackprop", sensitivity=True,
    cost="1 forward + 1 backward", reference="Captum GuidedBackprop",
)  # fmt: skip
def guided_backprop(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015): the gradient with every ReLU passing back only positive
    gradients, only where it was active. One forward and one backward.

    Args:
        model: the network (ReLU activations; see the module docstring for the others).
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> guided_backprop(net, torch.randn(5, 3), 1).shape
        torch.Size([5, 3])
    """
    return _modified_gradient("guided_backprop", model, inputs, target, output_transform, task)


@register_method(
    "modified backward", "deconvnet", sensitivity=True,
    cost="1 forward + 1 backward", reference="Captum Deconvolution",
)  # fmt: skip
def deconvnet(
    model: nn.Module,
    inputs: Tensor,
    target: Target | NeuronTarget = None,
    *,
    keep: DeconvKeep | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Deconvnet (Zeiler and Fergus 2014): the gradient with every ReLU passing back ``relu(grad_out)`` whatever
    its input was. One forward and one backward.

    With ``target=NeuronTarget(layer, channel)`` it is the paper's partial input reconstruction from one feature
    map (section 2.1): the layer's other activations set to zero and the kept ones passed down through the
    deconvnet (unpooling with the switches, rectification, transposed filters) to the input. The forward stops
    at the layer.

    .. math::

        R(x) = D_x\bigl(a_\\ell(x) \\odot m\bigr), \\qquad
        m = \\mathbb{1}[\text{the kept activations of the chosen map}]

    where :math:`D_x` is the network's backward pass at ``x`` with the deconvnet rule on every ReLU.

    Args:
        model: the network (ReLU activations; see the module docstring for the others).
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction; or a
            :class:`~lightning_interp.methods.NeuronTarget`: the feature map (an index ``(c,)``), a single unit
            (a full index) or the whole layer (``()``) to reconstruct from.
        keep: with a NeuronTarget, which activations of the selected block are passed down: ``"top"`` (the
            default: each sample's strongest activation, the paper's figures), ``"map"`` (the whole map, with its
            activations) or ``"gradient"`` (not the paper's reconstruction: the deconvnet backward of the unit's
            reduced activation, ones over the map for ``reduce="sum"``, as Captum's ``NeuronDeconvolution``).
            None with a class target (given there, it is refused).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> deconvnet(net, torch.randn(5, 3), 1).shape
        torch.Size([5, 3])
        >>> conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> deconvnet(conv, torch.randn(1, 1, 6, 6), NeuronTarget("2", 0)).shape  # channel 0's top activation
        torch.Size([1, 1, 6, 6])
    """
    if keep is not None and keep not in DECONV_KEEPS:
        raise ValueError(f"keep must be one of {DECONV_KEEPS} (or None: 'top' for a NeuronTarget), got {keep!r}.")
    model, target, output_transform, task = bind_neuron(model, target, output_transform, task)  # a NeuronTarget
    if not isinstance(model, NeuronScores):  # a class score: the plain deconvnet backward of it
        if keep is not None:
            raise ValueError(
                f"deconvnet(keep={keep!r}) reconstructs from a feature map of a layer: give "
                "target=NeuronTarget(layer, channel) (or SaliencyCallback(target=NeuronTarget(...))); with a class "
                "target leave keep=None."
            )
        return _modified_gradient("deconvnet", model, inputs, target, output_transform, task)
    kept = keep or "top"
    if kept == "gradient":  # the deconvnet backward of the unit's reduced activation (Captum's NeuronDeconvolution)
        return _modified_gradient("deconvnet", model, inputs, 0, None, "regression")
    neuron = model
    shown: Literal["top", "map"] = kept

    def reconstruction_score(_inner: nn.Module, x: Tensor) -> Tensor:
        activation = neuron.activation(x)  # the forward stops at the layer
        signal = deconvnet_signal(activation.detach(), neuron.neuron.units, shown)
        # d score / d activation = signal: the backward pass carries the top signal down
        return (signal * activation).reshape(activation.shape[0], -1).sum(dim=1, keepdim=True)

    with relu_rule(model, "deconvnet"):
        return gradient(ForwardWith(model, reconstruction_score), inputs, 0, task="regression")


def deconvnet_signal(activation: Tensor, index: tuple[int, ...], keep: Literal["top", "map"] = "top") -> Tensor:
    """Zeiler and Fergus's top signal: ``activation`` (B, ...) with every value outside ``activation[:, *index]``
    set to zero, and inside it only each sample's strongest value (``keep="top"``; the first of ties) or all
    of them (``keep="map"``).

    Example:
        >>> a = torch.tensor([[[1.0, 3.0], [2.0, 0.5]]])  # (B=1, C=2, 2)
        >>> deconvnet_signal(a, (0,)).tolist(), deconvnet_signal(a, (1,), "map").tolist()
        ([[[0.0, 3.0], [0.0, 0.0]]], [[[0.0, 0.0], [2.0, 0.5]]])
    """
    where = (slice(None), *index)
    block = activation[where]
    signal = torch.zeros_like(activation)
    if keep == "map":
        signal[where] = block
        return signal
    flat = block.reshape(block.shape[0], -1)
    strongest = flat.argmax(dim=1, keepdim=True)
    signal[where] = torch.zeros_like(flat).scatter(1, strongest, flat.gather(1, strongest)).reshape(block.shape)
    return signal
