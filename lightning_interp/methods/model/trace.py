"""One dry forward that records what every sub-module of a model returns.

Automatic layer choices (Grad-CAM's spatial layers, the representation
layers) and the check that a model returns class scores all need the same
information: which modules run, how often, and the shape of what they
return. :func:`trace_model` collects it in one forward pass, so several
callbacks on one model pay for one pass, not one each.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import eager_forward, modes_preserved
from lightning_interp.methods.model.inputs import for_rows

__all__ = ["ModelTrace", "trace_model"]


@dataclass
class ModelTrace:
    """What one dry forward of a model saw.

    Attributes:
        order: dotted names of the sub-modules that returned a tensor, in the
            order they first completed (a module completes after its children).
        calls: name -> how many times the module ran in the pass (every
            sub-module that ran, tensor output or not).
        shapes: name -> shape of the module's first tensor output.
        output: the model's own output (computed without gradients).
        input_shape: shape of the example input the pass ran on.
        sources: name -> where the first tensor argument of the module's first
            call came from: the name of the module that returned that very
            tensor (the outermost one, when several returned it), ``""`` for the
            model's input, absent when it was made between modules (a
            ``permute`` or ``reshape`` in a ``forward``). Layout detection
            (:func:`~lightning_interp.methods.model.tokens.layer_layouts`) reads it.
        input_shapes: name -> shape of that first tensor argument.
    """

    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output: object = None
    input_shape: tuple[int, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def ran_once(self) -> list[str]:
        """Names in ``order`` of the modules that ran exactly once (their output is unambiguous)."""
        return [name for name in self.order if self.calls[name] == 1]


def trace_model(model: nn.Module, example_input: Tensor) -> ModelTrace:
    """Run the first sample of ``example_input`` through ``model`` once and record every sub-module.

    The pass runs in eval mode (every module's flag restored afterwards),
    without gradients and outside inference mode; the hooks are removed in
    ``finally``, also when the model raises.

    Args:
        model: the network, called as ``model(example)``.
        example_input: one or more inputs; only the first is run.

    Returns:
        A :class:`ModelTrace`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
        >>> trace = trace_model(net, torch.randn(5, 1, 4, 4))
        >>> trace.order, trace.shapes["0"], tuple(trace.output.shape)
        (['0', '1', '2', '3'], (1, 2, 2, 2), (1, 3))
    """
    names = {module: name for name, module in model.named_modules() if name}
    trace = ModelTrace(input_shape=tuple(example_input.shape[1:]))
    handles = []
    producers: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (the tensor, who returned it), held weakly

    def source_of(tensor: Tensor) -> str | None:
        entry = producers.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def pre_hook(module: nn.Module, args: tuple) -> None:
        name = names[module]
        first = next((arg for arg in args if isinstance(arg, Tensor)), None)
        if name in trace.input_shapes or first is None or first.is_nested:
            return
        trace.input_shapes[name] = tuple(first.shape)
        source = source_of(first)
        if source is not None:
            trace.sources[name] = source

    def hook(module: nn.Module, _args: object, output: object) -> None:
        name = names[module]
        trace.calls[name] = trace.calls.get(name, 0) + 1
        if isinstance(output, Tensor) and not output.is_nested:
            producers[id(output)] = (weakref.ref(output), name)  # a parent returning it too overrides the child
            if name not in trace.shapes:
                trace.order.append(name)
                trace.shapes[name] = tuple(output.shape)

    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        with modes_preserved(model), eager_forward(), torch.inference_mode(False), torch.no_grad():
            example = example_input[:1].detach().clone()  # no_grad: nothing to detach
            producers[id(example)] = (weakref.ref(example), "")
            trace.output = for_rows(model, slice(0, 1))(example)  # a bound view: the first sample's other inputs
    finally:
        for handle in handles:
            handle.remove()
    return trace
