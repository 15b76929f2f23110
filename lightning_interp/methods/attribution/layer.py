"""Layer attribution: how much each value of a named layer's output contributes to the target score.

Captum's Layer* family: the attributions have the shape of the layer's output (B, ...), not of the inputs.
Every function here is ``fn(model, inputs, target, layer, **options)``, declared in the registry's ``"layer"``
family (``attribute(name, model, inputs, target, layer=...)``):

- :func:`layer_gradient_x_activation`: the layer's activation times the gradient of the score with respect to it;
- :func:`layer_integrated_gradients`: integrated gradients in the layer's output space, from the activation of
  the baseline input to the activation of the input (the model as a function of that layer's output);
- :func:`layer_conductance`: integrated gradients of the *input* path, seen through the layer (Dhamdhere et al.
  2018): the sum over path steps of the change of the layer's output times the score's gradient there.

The model runs in eval mode; modes are restored, ``param.grad`` is never touched and no hook outlives a call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_interp.methods.attribution.gradient import _chunk_copies, integrated_gradients, integration_points
from lightning_interp.methods.model.batching import accumulation_dtype, clean_scores, fixed_target
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    attribution_pass,
    get_module,
    repeat_target,
)
from lightning_interp.methods.model.embedding import LayerInput, layer_output
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.registry import register_method

__all__ = ["layer_conductance", "layer_gradient_x_activation", "layer_integrated_gradients"]


def _layer_name(model: nn.Module, layer: nn.Module | str | None) -> str:
    """The dotted name of ``layer`` in ``model`` (checked), refusing None: layer attribution needs a layer."""
    if layer is None:
        raise ValueError("Layer attribution needs layer=... (a dotted module name such as 'features.3', or a module).")
    module = get_module(model, layer)  # a wrong name fails here, with the closest names
    if isinstance(layer, str):
        return layer
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"The module {type(layer).__name__} given as layer is not a sub-module of the model.")


def _outside_inference(inputs: Tensor) -> Tensor:
    """A detached copy made outside inference mode (it joins autograd graphs later)."""
    with torch.inference_mode(False):
        return inputs.detach().clone()


@register_method(
    "layer", "layer\ngrad × act",
    cost="1 forward + 1 backward", reference="Captum LayerGradientXActivation",
)  # fmt: skip
def layer_gradient_x_activation(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    multiply_by_inputs: bool = True,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """The layer's activation times the gradient of the target score with respect to it, elementwise.

    Args:
        model: the network, called as ``model(inputs)``.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        layer: the layer (a dotted name or the module) whose output is attributed.
        multiply_by_inputs: multiply by the activation (False: the layer gradient alone, Captum's
            ``LayerGradientXActivation(multiply_by_inputs=False)``).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like the layer's output (B, ...).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> attr = layer_gradient_x_activation(net, x, 1, "0")
        >>> torch.allclose(attr, net[0](x) * net[1].weight[1])  # each hidden unit's contribution to output 1
        True
    """
    name = _layer_name(model, layer)
    result = attribution_pass(
        model, inputs, target, layers=[name], input_gradient=False, output_transform=output_transform, task=task
    )
    activation, grad = result.activations[0], result.activation_grads[0]
    return activation * grad if multiply_by_inputs else grad


@register_method(
    "layer", "layer IG",
    cost="2 forwards + n_steps (32) forwards + backwards", reference="Captum LayerIntegratedGradients",
)  # fmt: skip
def layer_integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    baseline: Tensor | float | None = None,
    n_steps: int = 32,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    multiply_by_inputs: bool = True,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrated gradients at a layer's output (Captum's ``LayerIntegratedGradients``).

    The model is seen as a function of the layer's output ``y``; the path runs straight from ``y(baseline)`` to
    ``y(inputs)`` and the attributions are ``(y(x) - y(baseline))`` times the path-averaged gradient. Token ids
    work: give the embedding layer, and an integer ``baseline`` (e.g. the padding id).

    Args:
        model: the network.
        inputs: (B, ...) batch (floats, or integer token ids).
        target: class index, LongTensor (B,), or None for the predicted class.
        layer: the layer (a dotted name or the module) whose output is attributed.
        baseline: the reference *input* (a tensor broadcastable to ``inputs`` or a scalar; default zeros), whose
            layer output starts the path.
        n_steps: number of integration points.
        method: integration rule (:func:`~lightning_interp.methods.integration_points`).
        internal_batch_size: at most this many interpolated inputs per pass.
        return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(baseline))``.
        multiply_by_inputs: multiply by ``y(x) - y(baseline)`` (False: the averaged layer gradient alone).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like the layer's output; with ``return_convergence_delta`` a tuple
        ``(attributions, delta)``, ``delta`` of shape (B,).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> attr, delta = layer_integrated_gradients(net, torch.randn(3, 4), 0, "1", return_convergence_delta=True)
        >>> attr.shape, bool(delta.abs().max() < 1e-4)
        (torch.Size([3, 8]), True)
    """
    name = _layer_name(model, layer)
    x = _outside_inference(inputs)
    if baseline is None:
        base = torch.zeros_like(x)
    else:
        base = torch.as_tensor(baseline, device=x.device).to(x.dtype).expand_as(x).clone()
    index = fixed_target(model, x, target, output_transform, task)
    start, end = layer_output(model, name, base), layer_output(model, name, x)
    if not end.is_floating_point():
        raise ValueError(f"Layer {name!r} returns {end.dtype} values: integrated gradients need a float output.")
    return integrated_gradients(
        LayerInput(model, name, x),
        _outside_inference(end),
        index,
        baseline=_outside_inference(start),
        n_steps=n_steps,
        method=method,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=return_convergence_delta,
        multiply_by_inputs=multiply_by_inputs,
        output_transform=output_transform,
        task=task,
    )


@register_method(
    "layer", "conductance",
    cost="n_steps + 1 (33) forwards + backwards", reference="Captum LayerConductance",
)  # fmt: skip
def layer_conductance(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    layer: nn.Module | str | None = None,
    *,
    baseline: Tensor | float | None = None,
    n_steps: int = 32,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """Conductance of each value of a layer's output (Dhamdhere et al. 2018; Captum's ``LayerConductance``).

    Along the straight input path from ``baseline`` to ``inputs`` at the ``n_steps + 1`` points ``a_0 < ... <
    a_n`` of ``method``, a layer value's conductance is ``sum_k (y(a_{k+1}) - y(a_k)) * dF/dy(a_k)``: the flow of
    the input's integrated gradients through that value. Summed over the layer, it approximates ``f(x) -
    f(baseline)`` when every path from the input to the output crosses the layer.

    Args:
        model: the network.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the predicted class.
        layer: the layer (a dotted name or the module) whose output is attributed.
        baseline: the reference input (tensor broadcastable to ``inputs`` or a scalar; default zeros).
        n_steps: the path has ``n_steps + 1`` points (Captum's convention).
        method: where the points lie (:func:`~lightning_interp.methods.integration_points`; only the nodes are
            used, as in Captum).
        internal_batch_size: at most this many path inputs per pass.
        return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(baseline))``.
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like the layer's output; with ``return_convergence_delta`` a tuple
        ``(attributions, delta)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> attr, delta = layer_conductance(net, torch.randn(3, 4), 1, "1", n_steps=64, return_convergence_delta=True)
        >>> attr.shape, bool(delta.abs().max() < 0.05)
        (torch.Size([3, 6]), True)
    """
    name = _layer_name(model, layer)
    x = _outside_inference(inputs)
    x = x if x.is_floating_point() else x.float()
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    base = base.expand_as(x)
    batch = x.shape[0]
    index = fixed_target(model, x, target, output_transform, task)
    nodes, _ = integration_points(n_steps + 1, method)
    chunk = _chunk_copies(internal_batch_size, batch, n_steps + 1)
    diff = x - base
    total: Tensor | None = None
    previous: tuple[Tensor, Tensor] | None = None  # the last point's layer output and gradient, for the next chunk
    for start in range(0, n_steps + 1, chunk):
        alphas = nodes[start : start + chunk].to(device=x.device, dtype=x.dtype)
        steps = alphas.numel()
        shape = (steps, *([1] * x.ndim))
        path = (base.unsqueeze(0) + alphas.reshape(shape) * diff.unsqueeze(0)).reshape(steps * batch, *x.shape[1:])
        result = attribution_pass(
            model,
            path,
            repeat_target(index, steps),
            layers=[name],
            input_gradient=False,
            output_transform=output_transform,
            task=task,
        )
        values = result.activations[0]
        dtype = accumulation_dtype(values)
        values = values.reshape(steps, batch, *values.shape[1:]).to(dtype)
        grads = result.activation_grads[0].reshape(values.shape).to(dtype)
        if previous is not None:
            values, grads = torch.cat([previous[0][None], values]), torch.cat([previous[1][None], grads])
        part = ((values[1:] - values[:-1]) * grads[:-1]).sum(dim=0)
        total = part if total is None else total + part
        previous = (values[-1], grads[-1])
    assert total is not None and previous is not None
    attributions = total.to(result.activations[0].dtype)
    if not return_convergence_delta:
        return attributions
    with torch.no_grad():
        end_scores = clean_scores(model, torch.cat([x, base]), output_transform)
    chosen = target_scores(end_scores, torch.cat([index, index]), task).double()
    delta = attributions.reshape(batch, -1).double().sum(dim=1) - (chosen[:batch] - chosen[batch:])
    return attributions, delta
