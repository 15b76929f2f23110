"""What the modified-backward methods share: the elementwise activations they recognise and the running module.

Guided backprop, deconvnet, LRP and DeepLIFT change the backward pass of
some operations for the duration of one call, through a
:class:`torch.overrides.TorchFunctionMode` (functional calls, whatever module
makes them) and forward hooks (modules with parameters). Both are removed in
``finally``; no module is replaced and no attribute or parameter is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
"""Every way a ReLU is called (``nn.ReLU`` calls ``F.relu``)."""

OTHER_ACTIVATIONS = {
    F.gelu: "GELU",
    F.silu: "SiLU",
    F.elu: "ELU",
    F.selu: "SELU",
    F.celu: "CELU",
    F.leaky_relu: "LeakyReLU",
    F.prelu: "PReLU",
    F.softplus: "Softplus",
    F.mish: "Mish",
    F.hardswish: "Hardswish",
    F.relu6: "ReLU6",
    F.hardtanh: "Hardtanh",
}
"""Elementwise activations other than ReLU, sigmoid and tanh, by the name of their module."""

SQUASHES = {
    torch.sigmoid: "Sigmoid",
    torch.Tensor.sigmoid: "Sigmoid",
    F.sigmoid: "Sigmoid",
    torch.tanh: "Tanh",
    torch.Tensor.tanh: "Tanh",
    F.tanh: "Tanh",
}
"""Sigmoid and tanh, however they are called."""

ADDITIONS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__})
"""Tensor additions (a residual connection's ``out += identity`` arrives as ``Tensor.add_``)."""


@contextlib.contextmanager
def running_modules(model: nn.Module) -> Iterator[tuple[dict[nn.Module, str], list[nn.Module]]]:
    """Track which module is running during the block (to name it in a refusal); hooks removed in ``finally``.

    Yields ``(names, stack)``: each module's dotted name, and the modules whose forward is under way, innermost last.
    """
    names = {module: name or type(model).__name__ for name, module in model.named_modules()}
    stack: list[nn.Module] = []
    handles = []

    def enter(module: nn.Module, _args: object) -> None:
        stack.append(module)

    def leave(_module: nn.Module, _args: object, _output: object) -> None:
        if stack:
            stack.pop()

    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        yield names, stack
    finally:
        for handle in handles:
            handle.remove()


def where_running(names: dict[nn.Module, str], stack: list[nn.Module]) -> str:
    """`` in module 'a.b'`` for the innermost running module, or an empty string."""
    return f" in module {names.get(stack[-1], '?')!r}" if stack else ""


IN_PLACE = frozenset(
    {
        F.relu_,
        torch.relu_,
        torch.Tensor.relu_,
        torch.Tensor.sigmoid_,
        torch.Tensor.tanh_,
        torch.Tensor.add_,
        torch.Tensor.__iadd__,
    }
)
"""In-place calls a model may make as statements (``h.relu_()``, ``x.add_(shortcut)``), result unused."""


def write_back(function: object, modified: Tensor, result: Tensor) -> Tensor:
    """After a rule computed ``result`` out of place: for an in-place ``function``, write it into the tensor the call
    modifies (so a model that ignores the returned value still sees it) and return that tensor; else ``result``."""
    if function not in IN_PLACE:
        return result
    with torch._C.DisableTorchFunction():
        return modified.copy_(result)
