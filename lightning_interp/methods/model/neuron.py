"""Neuron targets: explain a unit or a channel of a layer instead of an output class.

Captum's Neuron* methods (``NeuronGradient``, ``NeuronIntegratedGradients``, ...) explain one number per sample
that is not an output of the model but the activation of a *neuron*: an element of a layer's output, or a block of
it (a channel) summed or averaged. Here that is a target kind: a :class:`NeuronTarget` given as ``target`` to the
gradient family (``gradient``, ``input_x_gradient``, ``smoothgrad``, ``integrated_gradients``, ``gradient_shap``
and the noise tunnels; ``deconvnet``, for which it is Zeiler and Fergus's reconstruction from that feature map) or
to ``SaliencyCallback``. The model then runs as :class:`NeuronScores`: its forward
stops where the layer returns, and the "score" (B, 1) is the selected unit's activation (explained as a
one-output regression, target 0).

Everything here is pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from lightning_interp.methods.model.core import ForwardWith, OutputTransform, Target, get_module

__all__ = ["NEURON_REDUCTIONS", "NeuronReduce", "NeuronScores", "NeuronTarget", "bind_neuron"]

NeuronReduce = Literal["sum", "mean"]
NEURON_REDUCTIONS: tuple[str, ...] = ("sum", "mean")


@dataclass(frozen=True)
class NeuronTarget:
    """A unit of a layer to explain: ``layer``'s output at ``index`` (per sample), reduced over what is left.

    ``index`` indexes the layer's output without its batch dimension: a full index (``(c, h, w)`` of a
    (B, C, H, W) output, ``(j,)`` of a (B, D) one) selects one unit; a shorter one (``(c,)``) selects a block
    (channel ``c``), whose activations are summed (Captum's ``neuron_selector`` with slices) or averaged
    (``reduce="mean"``). The layer's first output in the forward pass is used.

    Attributes:
        layer: the dotted name of the layer (``model.named_modules()``).
        index: an int (the first dimension) or a tuple of ints, each in ``[0, size)``.
        reduce: ``"sum"`` or ``"mean"`` over the dimensions ``index`` leaves free.

    Example:
        >>> import torch
        >>> from lightning_interp.methods import gradient
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> unit = NeuronTarget(layer="0", index=2)
        >>> torch.allclose(gradient(net, torch.randn(5, 3), unit), net[0].weight[2].expand(5, 3))
        True
    """

    layer: str
    index: int | tuple[int, ...] = ()
    reduce: NeuronReduce = "sum"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"layer must be a dotted module name such as 'features.3', got {self.layer!r}.")
        index = (self.index,) if isinstance(self.index, int) and not isinstance(self.index, bool) else self.index
        if isinstance(index, list):
            index = tuple(index)
        if not isinstance(index, tuple) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in index):
            raise ValueError(f"index must be an int >= 0 or a tuple of them, got {self.index!r}.")
        object.__setattr__(self, "index", index)
        if self.reduce not in NEURON_REDUCTIONS:
            raise ValueError(f"reduce must be one of {NEURON_REDUCTIONS}, got {self.reduce!r}.")

    @property
    def units(self) -> tuple[int, ...]:
        """``index`` as a tuple."""
        assert isinstance(self.index, tuple)
        return self.index

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise a ValueError unless ``index`` fits a layer output of ``shape`` (batch first).

        Example:
            >>> NeuronTarget("conv", (3,)).check((2, 8, 5, 5))
            >>> NeuronTarget("conv", (8,)).check((2, 8, 5, 5))
            Traceback (most recent call last):
            ...
            ValueError: NeuronTarget index (8,) does not fit layer 'conv', whose output is (2, 8, 5, 5) ...
        """
        sizes = tuple(shape[1:])
        if len(self.units) > len(sizes) or any(i >= size for i, size in zip(self.units, sizes, strict=False)):
            raise ValueError(
                f"NeuronTarget index {self.units} does not fit layer {self.layer!r}, whose output is {tuple(shape)} "
                f"(batch first): give at most {len(sizes)} indices, each below {sizes}."
            )

    def select(self, output: Tensor) -> Tensor:
        """The (B, 1) activation of the unit in a layer output (B, ...).

        Example:
            >>> import torch
            >>> NeuronTarget("conv", 1, reduce="mean").select(torch.arange(8.0).reshape(1, 2, 2, 2)).tolist()
            [[5.5]]
        """
        self.check(tuple(output.shape))
        picked = output[(slice(None), *self.units)].reshape(output.shape[0], -1)
        value = picked.sum(dim=1) if self.reduce == "sum" else picked.mean(dim=1)
        return value[:, None]

    def bind(self, model: nn.Module) -> NeuronScores:
        """``model`` as a function whose (B, 1) output is this unit's activation (:class:`NeuronScores`)."""
        return NeuronScores(model, self)


class _LayerReached(Exception):
    """Raised by the hook where the explained layer returns: the rest of the forward is not needed."""


class NeuronScores(ForwardWith):
    """``model`` seen as the function ``inputs -> (B, 1)`` activation of a :class:`NeuronTarget`.

    The forward runs up to the layer (a forward hook captures its output and stops the pass there, so the layers
    after it are not computed), then selects the unit. Layer names, parameters and modes stay the model's own, so
    every method runs on it as on a one-output regression (target 0).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten())
        >>> NeuronScores(net, NeuronTarget("1", (2, 0, 0)))(torch.randn(4, 1, 5, 5)).shape
        torch.Size([4, 1])
    """

    def __init__(self, model: nn.Module, target: NeuronTarget) -> None:
        super().__init__(model, lambda inner, inputs: _neuron_forward(inner, inputs, self))
        object.__setattr__(self, "neuron", target)
        object.__setattr__(self, "unit", get_module(model, target.layer))

    def forward(self, inputs: Tensor) -> Tensor:
        return _neuron_forward(self.model, inputs, self)

    def activation(self, inputs: Tensor) -> Tensor:
        """The layer's whole output (B, ...) on ``inputs`` (the forward stops there), its index checked.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten())
            >>> NeuronScores(net, NeuronTarget("1", 2)).activation(torch.randn(4, 1, 5, 5)).shape
            torch.Size([4, 3, 3, 3])
        """
        output = _layer_output(self.model, inputs, self)
        self.neuron.check(tuple(output.shape))
        return output


def _neuron_forward(model: nn.Module, inputs: Tensor, view: NeuronScores) -> Tensor:
    return view.neuron.select(_layer_output(model, inputs, view))


def _layer_output(model: nn.Module, inputs: Tensor, view: NeuronScores) -> Tensor:
    captured: list[object] = []

    def hook(_module: nn.Module, _args: object, output: object) -> None:
        captured.append(output)
        raise _LayerReached

    handle = view.unit.register_forward_hook(hook)
    try:
        model(inputs)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    neuron: NeuronTarget = view.neuron
    if not captured:
        raise RuntimeError(f"NeuronTarget: layer {neuron.layer!r} was not called in the forward pass.")
    output = captured[0]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"NeuronTarget: layer {neuron.layer!r} returned {type(output).__name__}, not a tensor; choose a layer "
            "that returns one tensor."
        )
    return output


def bind_neuron(
    model: nn.Module, target: Target | NeuronTarget, output_transform: OutputTransform | None, task: str
) -> tuple[nn.Module, Target, OutputTransform | None, str]:
    """For a :class:`NeuronTarget`: the model as :class:`NeuronScores`, target 0, no output transform and task
    ``"regression"``; anything else is returned as it is. The gradient family calls it first.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> model, target, _, task = bind_neuron(net, NeuronTarget("0", 1), None, "multiclass")
        >>> type(model).__name__, target, task
        ('NeuronScores', 0, 'regression')
    """
    if not isinstance(target, NeuronTarget):
        return model, target, output_transform, task
    return target.bind(model), 0, None, "regression"
