"""DeepLIFT (Shrikumar et al. 2017) for one call: the Linear rule, and Rescale or RevealCancel on the nonlinearities.

The inputs and the baseline run through the model in one batch ``[x; x0]``.
Linear layers (convolutions, linear, BatchNorm in eval mode, average pooling,
additions) keep their gradient: that is the paper's Linear rule (section
3.5.1), the multiplier of ``y = sum_i w_i x_i + b`` to ``x_i`` being ``w_i``
(the bias is the same for the input and the baseline: it has no change).
The elementwise nonlinearities ``y = g(x)`` take one of two rules (``rule=``):

- ``"rescale"`` (section 3.5.2): the multiplier ``(g(x) - g(x0)) / (x - x0)``
  instead of the derivative (the derivative where ``|x - x0| < 1e-10``);
  Captum's ``DeepLift``.
- ``"reveal_cancel"`` (section 3.5.3): the change of the nonlinearity's input
  is split into the sums ``dx+`` and ``dx-`` of the positive and of the
  negative terms ``w_i dx_i`` of the linear layer before it, and each part gets
  its own multiplier ``m+ = dy+ / dx+``, ``m- = dy- / dx-``, with
  ``dy+ = (g(x0 + dx+) - g(x0)) / 2 + (g(x0 + dx- + dx+) - g(x0 + dx-)) / 2``
  and ``dy-`` likewise; the two multipliers go back through the linear layer by
  the sign of each term (the Linear rule with separate positive and negative
  parts; an input that did not change takes their mean). A positive and a
  negative contribution that cancel (the paper's ``min(i1, i2)``, Figure 3)
  each get credit, where Rescale and the gradient give one of them none. The
  linear part found before a nonlinearity is a linear or convolutional layer,
  optionally followed by an eval-mode BatchNorm (its scale, negative or not,
  applied to each term), and sums of such parts and of other tensors (a
  residual ``relu(bn(conv(x)) + x)``: the identity's change is one term per
  element), and shape-only ops on them (``nn.Flatten``, ``nn.Unflatten``,
  ``view``, ``reshape``, ``flatten``, ``squeeze``, ``permute``, ``transpose``,
  ``mT``, indexing and slicing, ``narrow``, ``select``, ``index_select``,
  ``chunk``, ``split``, ``unbind``, ``expand``, ``repeat``, ``tile``,
  ``flip``, ``roll``, ``unfold``, ``gather``): each element of their output is
  an element of their input, so its terms are that element's (a reshape of
  ``dx+`` and ``dx-`` is the split of the reshaped change). Which element is
  read by running the op on a tensor of positions, and the op must keep the
  inputs' and the baselines' halves of the batch apart and aligned: the batch
  first, or merged with the next dimension (a layer applied to
  ``x.flatten(0,1)``, reshaped back), not reordered by values. A nonlinearity
  whose input is anything else (another nonlinearity, a product,
  ``torch.cat``, a dtype cast, an op that mixes inputs with baselines, a
  tensor written in place after the linear layer, or the layer's input written
  in place before the nonlinearity) is refused, naming the nonlinearity's
  module and the op that broke the chain: use ``"rescale"`` there.
  Where all the terms into a nonlinearity have one sign, RevealCancel is
  Rescale. The ``deeplift`` package (kundajelab) applies RevealCancel after
  dense layers and Rescale after convolutions by default; here one rule holds
  for every nonlinearity.

Max pooling distributes its change of output to the maxima of the input and
of the baseline (Captum's rule, accumulated where windows overlap), under
either rule. The attributions ``(x - x0) * multiplier`` of a sample then sum
to ``f(x) - f(x0)`` (summation-to-delta) under either rule;
``return_convergence_delta`` reports the residual.

Softmax and log-softmax, at the end of the model or inside it, take the
DeepLIFT paper's softmax adjustment (Shrikumar et al. 2017, section 3.6: the
logits' contributions less their mean over the classes, as softmax ignores a
constant added to every logit) in the form of a rule that keeps
summation-to-delta: ``softmax(z) = softmax(u)`` with the centred logits
``u = z - mean(z)``; the centring is linear, and the Rescale multiplier
``(y(x) - y(x0)) / (u(x) - u(x0))`` goes back per class, so the multiplier of
``z`` is that of ``u`` less its mean over the classes. Captum's ``DeepLift``
divides by the change of ``z`` instead of ``u`` (and takes the mean over the
whole batch tensor): its map is ours times ``du_t / dz_t`` for one sample,
equal where the logits' sum does not move, and its attributions do not sum to
the probability's change. To explain the logits instead, as the paper
prefers, explain a model without the final softmax.

Rules reach every way an activation is called (``nn.ReLU``, ``F.relu``,
``torch.sigmoid``, ``nn.GELU``, ``clamp`` as a ReLU, ``F.softmax``, ...)
through a :class:`torch.overrides.TorchFunctionMode` active only during the
call; no module is touched. Other nonlinearities that are not elementwise
(layer or group normalisation, attention) have no Rescale rule: a model that
calls one is refused, naming the module; so are adaptive max pooling and a
softmax over the batch dimension. Other
elementwise operations between two activations (products, ``exp``) keep
their gradient: the residual ``return_convergence_delta`` reports shows it. The model must keep the batch on the
first dimension (the two halves of the batch are matched by position).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

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
    where_running,
    write_back,
)
from lightning_interp.methods.model.batching import (
    BaselineFn,
    accumulation_dtype,
    baseline_of,
    fixed_target,
    row_chunks,
    row_limit,
)
from lightning_interp.methods.model.core import (
    OutputTransform,
    Target,
    as_leaf,
    eager_forward,
    gradients_enabled,
    modes_preserved,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods.model.inputs import for_rows
from lightning_interp.methods.model.tasks import target_scores
from lightning_interp.methods.registry import register_method

__all__ = ["DeepLiftRule", "deeplift", "deeplift_shap"]

DeepLiftRule = Literal["rescale", "reveal_cancel"]
"""DeepLIFT's rule for elementwise nonlinearities (Shrikumar et al. 2017, sections 3.5.2 and 3.5.3)."""
RULES: tuple[DeepLiftRule, ...] = ("rescale", "reveal_cancel")

_EPS = 1e-10  # Captum's threshold below which a difference counts as none
_CLAMPS = frozenset({torch.clamp, torch.Tensor.clamp, torch.clamp_min, torch.Tensor.clamp_min, torch.clip})
_ELEMENTWISE = RELUS | frozenset(OTHER_ACTIVATIONS) | frozenset(SQUASHES) | _CLAMPS
_MAX_POOLS = frozenset({F.max_pool1d, F.max_pool2d, F.max_pool3d})
_SOFTMAXES = frozenset(
    {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
)
_NOT_ELEMENTWISE = {
    F.layer_norm: "layer normalisation",
    F.group_norm: "group normalisation",
    F.instance_norm: "instance normalisation",
    F.local_response_norm: "local response normalisation",
    F.adaptive_max_pool1d: "adaptive max pooling",
    F.adaptive_max_pool2d: "adaptive max pooling",
    F.adaptive_max_pool3d: "adaptive max pooling",
    F.scaled_dot_product_attention: "attention",
    F.multi_head_attention_forward: "attention",
}


def _check_rule(rule: object) -> None:
    if rule not in RULES:
        raise ValueError(f"DeepLIFT's rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}.")


def _halves(t: Tensor) -> Tensor:
    """``t[:B] - t[B:]`` for both halves of a ``[x; x0]`` batch."""
    first, second = t.chunk(2)
    return torch.cat([first - second, first - second])


class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, function: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        copy = x.detach().clone()  # in place on the copy, if the call was in place; saved, as the call may write x
        y = function(copy.clone())
        ctx.function = function
        ctx.save_for_backward(copy, y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (derivative,) = torch.autograd.grad(ctx.function(leaf.clone()), leaf, grad)
        delta_in, delta_out = _halves(x), _halves(y)
        # <=: in float16 the threshold rounds to 0, and exact zeros must still take the derivative
        return torch.where(delta_in.abs() <= _EPS, derivative, grad * delta_out / delta_in), None


class _SoftmaxRescale(torch.autograd.Function):
    """Softmax (or log-softmax) ``y = g(z)`` along ``dim``: as ``g`` ignores a constant added to ``z``, it is
    ``g(u)`` of the centred logits ``u = z - mean(z)``; the centring is linear and keeps its gradient, and the Rescale
    multiplier ``grad * (y(x) - y(x0)) / (u(x) - u(x0))`` goes back per element (the derivative where
    ``|u(x) - u(x0)| <= 1e-10``). The multiplier of ``z`` is then that of ``u`` less its mean along ``dim``."""

    @staticmethod
    def forward(ctx, x: Tensor, function: Callable[[Tensor], Tensor], dim: int) -> Tensor:  # type: ignore[override]
        y = function(x.detach())
        ctx.function, ctx.dim = function, dim
        ctx.save_for_backward(x.detach(), y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (derivative,) = torch.autograd.grad(ctx.function(leaf), leaf, grad)
        work = torch.promote_types(y.dtype, x.dtype)
        centred = x.to(work) - x.to(work).mean(dim=ctx.dim, keepdim=True)
        delta_in, delta_out = _halves(centred), _halves(y.to(work))
        grad, derivative = grad.to(work), derivative.to(work)
        rescaled = torch.where(delta_in.abs() <= _EPS, derivative, grad * delta_out / delta_in)
        return (rescaled - rescaled.mean(dim=ctx.dim, keepdim=True)).to(x.dtype), None, None


def _softmax_dim(args: tuple, kwargs: dict) -> int:
    """The dimension a softmax call normalises, as the call resolves it (``dim=None``: PyTorch's implicit rule)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    ndim = args[0].ndim
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1  # torch.nn.functional._get_softmax_dim, without its warning
    return dim % max(ndim, 1)


def _spread(values: Tensor, indices: Tensor, like: Tensor) -> Tensor:
    """Add each pooled value to the input position it came from (a max-unpool that accumulates overlaps)."""
    flat = torch.zeros(like.shape[0], like.shape[1], like[0, 0].numel(), dtype=values.dtype, device=values.device)
    flat.scatter_add_(2, indices.flatten(2), values.flatten(2))
    return flat.reshape(like.shape)


class _MaxPoolRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:  # type: ignore[override]
        y, indices = pool(x.detach())
        ctx.save_for_backward(x, y, indices)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, y, indices = ctx.saved_tensors
        output, reference = y.chunk(2)
        larger = torch.maximum(output, reference)
        delta_out = torch.cat([larger - reference, output - larger])  # each half's maxima carry a part
        first, second = _spread(grad * delta_out, indices, x).chunk(2)
        moved = torch.cat([first + second, first + second])
        delta_in = _halves(x)
        derivative = _spread(grad, indices, x)
        return torch.where(delta_in.abs() <= _EPS, derivative, moved / delta_in), None


_LINEAR = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})
_BATCH_NORMS = frozenset({F.batch_norm})
Split = Callable[[list[Tensor], list[Tensor]], tuple[Tensor, Tensor]]


class _Terms(NamedTuple):
    """How a tensor ``z`` is a linear function of earlier tensors (``sources``), as the positive and negative parts of
    its change: ``split(p, n) = (dz+, dz-)``, the sums of the positive and of the negative terms ``w_i dx_i``, from the
    positive and negative parts ``p``, ``n`` of each source's change ``dx`` (differentiable: the multipliers of
    ``dz+`` and ``dz-`` go back to the sources through it). ``versions``: the sources' version counters when they
    were read, so a source written in place before the nonlinearity is noticed."""

    sources: tuple[Tensor, ...]
    split: Split
    versions: tuple[int, ...]


def _linear_terms(func: Callable[..., Tensor], args: tuple, kwargs: dict) -> _Terms:
    """The terms of ``F.linear`` / ``F.conv*d``: ``dz+ = W+ p + W- n``, ``dz- = W- p + W+ n`` (``W+``, ``W-``: the
    positive and negative weights, same stride, padding and groups). The bias is the same for the input and the
    baseline and has no change to split."""
    rest, options = list(args[1:]), {key: value for key, value in kwargs.items() if key != "bias"}
    weight = options.pop("weight") if "weight" in options else rest.pop(0)
    if rest:
        rest[0] = None  # the bias, by position
    positive, negative = weight.detach().clamp(min=0), weight.detach().clamp(max=0)

    def split(p: list[Tensor], n: list[Tensor]) -> tuple[Tensor, Tensor]:
        def apply(u: Tensor, w: Tensor) -> Tensor:
            return func(u, w, *rest, **options)

        return apply(p[0], positive) + apply(n[0], negative), apply(p[0], negative) + apply(n[0], positive)

    return _Terms((args[0],), split, (args[0]._version,))


def _batch_norm_terms(terms: _Terms, args: tuple, kwargs: dict) -> _Terms | None:
    """A BatchNorm in eval mode after a linear layer: ``a z + b`` per channel, so its terms are the layer's scaled by
    ``a`` (a negative ``a`` swaps the signs). None in training mode (the statistics of the batch)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    mean, var = bound.get("running_mean"), bound.get("running_var")
    if bound.get("training", False) or mean is None or var is None:
        return None
    scale = (var.detach() + bound.get("eps", 1e-5)).rsqrt()
    if bound.get("weight") is not None:
        scale = scale * bound["weight"].detach()
    shape = [1, -1] + [1] * (args[0].ndim - 2)
    up, down = scale.clamp(min=0).reshape(shape), scale.clamp(max=0).reshape(shape)

    def split(p: list[Tensor], n: list[Tensor]) -> tuple[Tensor, Tensor]:
        plus, minus = terms.split(p, n)
        return up * plus + down * minus, down * plus + up * minus

    return _Terms(terms.sources, split, terms.versions)


def _identity_terms(t: Tensor) -> _Terms:
    return _Terms((t,), lambda p, n: (p[0], n[0]), (t._version,))


def _sum_terms(first: _Terms, second: _Terms) -> _Terms:
    """Terms of ``a + b``: the terms of both."""
    count = len(first.sources)

    def split(p: list[Tensor], n: list[Tensor]) -> tuple[Tensor, Tensor]:
        (plus_a, minus_a), (plus_b, minus_b) = first.split(p[:count], n[:count]), second.split(p[count:], n[count:])
        return plus_a + plus_b, minus_a + minus_b

    return _Terms(first.sources + second.sources, split, first.versions + second.versions)


# Shape-only ops: each element of the result is an element of the input, so the positive and negative parts of the
# result's change are those of the input, re-indexed the same way (the split commutes with them).
_RESHAPES = frozenset(
    {
        torch.flatten, torch.Tensor.flatten, torch.unflatten, torch.Tensor.unflatten, torch.reshape,
        torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.view_as, torch.Tensor.reshape_as, torch.squeeze,
        torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze, torch.ravel, torch.Tensor.ravel,
        torch.Tensor.contiguous, torch.clone, torch.Tensor.clone,
    }
)  # fmt: skip
"""Row-major reshapes (and copies): flat position k stays k, so the inputs' and the baselines' halves stay halves
wherever the result's first size is even (the batch first, or merged with the next dimension)."""
_REINDEXES = frozenset(
    {
        torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose, torch.swapaxes,
        torch.Tensor.swapaxes, torch.swapdims, torch.Tensor.swapdims, torch.movedim, torch.Tensor.movedim,
        torch.moveaxis, torch.Tensor.moveaxis, torch.t, torch.Tensor.t, torch.Tensor.mT.__get__,
        torch.Tensor.__getitem__, torch.narrow, torch.Tensor.narrow, torch.select, torch.Tensor.select,
        torch.index_select, torch.Tensor.index_select, torch.flip, torch.Tensor.flip, torch.roll, torch.Tensor.roll,
        torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.repeat, torch.tile, torch.Tensor.tile,
        torch.Tensor.unfold, torch.chunk, torch.Tensor.chunk, torch.split, torch.Tensor.split, torch.tensor_split,
        torch.Tensor.tensor_split, torch.unbind, torch.Tensor.unbind, torch.gather, torch.Tensor.gather,
        torch.take_along_dim, torch.Tensor.take_along_dim,
    }
)  # fmt: skip
"""Other ops that only move, select or repeat elements: which input element each output element is, is read by
running the op on a tensor of positions."""
Reindex = Callable[[Tensor], Tensor]


def _name(func: object) -> str:
    """The op's name as the user wrote it (``mT`` for the property, not its ``__get__``)."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    name = name[3:-2] if name.startswith("__i") and name.endswith("__") else name.strip("_")  # __iadd__: add
    return {"getitem": "indexing", "setitem": "an indexed assignment"}.get(name, name)


def _reindexing(
    func: Callable[..., object], args: tuple, kwargs: dict, outputs: tuple[Tensor, ...]
) -> list[Reindex] | str:
    """For a shape-only ``func`` on ``args[0]``, a ``[x; x0]`` batch, with these ``outputs``: per output, the same
    re-indexing of the inputs' half of ``args[0]`` into the inputs' half of the output, or why there is none.

    The split is made on the inputs' half (the change ``x - x0`` of each element), so the op must keep the two
    halves apart and aligned: the first half of each output (along its first dimension) made only of elements of the
    inputs' half, and the second half of the same elements of the baselines' half. A reshape that keeps the batch
    first does; so does one that merges the batch with the next dimension, as the halves stay contiguous."""
    first, rest = args[0], args[1:]
    if any(output.dtype != first.dtype for output in outputs):
        return "reinterprets the values as another dtype"
    if first.ndim == 0 or any(output.ndim == 0 or output.shape[0] % 2 for output in outputs):
        return (
            f"leaves no inputs' and baselines' halves on the first dimension (shape {tuple(first.shape)} to "
            f"{tuple(outputs[0].shape)}, the inputs and the baselines as one batch)"
        )
    if func in _RESHAPES:  # row-major: flat position k stays k, so halves stay halves when the first size is even
        shape = outputs[0].shape
        return [lambda t: t.reshape(shape[0] // 2, *shape[1:])]
    positions = torch.arange(first.numel(), device=first.device).reshape(first.shape)
    try:
        mapped = func(positions, *rest, **kwargs)
    except (RuntimeError, IndexError, ValueError, TypeError) as error:  # an op that refuses integer tensors
        return f"could not be traced on the positions of its input ({error})"
    mapped = tuple(mapped) if isinstance(mapped, (tuple, list)) else (mapped,)
    total = first.numel() // 2  # positions below it: the inputs' half
    for each, output in zip(mapped, outputs, strict=True):
        inputs, baselines = each.chunk(2)
        if each.shape != output.shape or not (bool((inputs < total).all()) and torch.equal(baselines, inputs + total)):
            return (
                "does not keep the inputs' and the baselines' halves of the batch apart and aligned (each output "
                "element of an input must sit where the same element of its baseline does, one half further)"
            )
    try:  # the same call on the inputs' half, where it picks the same elements (sizes in the call can differ)
        direct = func(positions[: first.shape[0] // 2], *rest, **kwargs)
        direct = tuple(direct) if isinstance(direct, (tuple, list)) else (direct,)
        same = all(torch.equal(d, each.chunk(2)[0]) for d, each in zip(direct, mapped, strict=True))
    except (RuntimeError, IndexError, ValueError, TypeError):
        same = False
    if same:
        single = len(mapped) == 1

        def call(k: int) -> Reindex:
            def apply(t: Tensor) -> Tensor:
                result = func(t, *rest, **kwargs)
                return result if single else result[k]

            return apply

        return [call(k) for k in range(len(mapped))]
    indices = [each.chunk(2)[0] for each in mapped]  # the positions themselves
    return [lambda t, index=index: torch.take(t, index) for index in indices]


def _reindexed_terms(terms: _Terms, reindex: Reindex) -> _Terms:
    """Terms of a shape-only op's output: the input's, re-indexed (``reshape(dz+)`` is the ``dz+`` of the reshape)."""

    def split(p: list[Tensor], n: list[Tensor]) -> tuple[Tensor, Tensor]:
        plus, minus = terms.split(p, n)
        return reindex(plus), reindex(minus)

    return _Terms(terms.sources, split, terms.versions)


def _derivative(function: Callable[[Tensor], Tensor], at: Tensor) -> Tensor:
    """The derivative of an elementwise ``function`` at each element of ``at``."""
    with torch.enable_grad():
        leaf = at.detach().requires_grad_(True)
        (derivative,) = torch.autograd.grad(function(leaf.clone()), leaf, torch.ones_like(leaf))
    return derivative


class _RevealCancel(torch.autograd.Function):
    """``y = g(z)`` for an elementwise ``g`` whose input ``z`` is a linear function of ``sources`` (``terms``): the
    RevealCancel rule (Shrikumar et al. 2017, section 3.5.3) on the positive and negative parts ``dz+``, ``dz-`` of
    ``z``'s change, and the Linear rule (3.5.1) back to the sources; no gradient goes to ``z`` itself.

    ``dy+ = (g(z0 + dz+) - g(z0)) / 2 + (g(z0 + dz- + dz+) - g(z0 + dz-)) / 2``, ``dy-`` likewise, and the
    multipliers ``m+ = dy+ / dz+``, ``m- = dy- / dz-`` (their limits ``(g'(z0) + g'(z0 + dz-)) / 2`` and
    ``(g'(z0) + g'(z0 + dz+)) / 2`` where ``|dz+|`` or ``|dz-|`` is at most 1e-10). A source element whose change is
    positive takes ``W+ m+ + W- m-``, a negative one ``W- m+ + W+ m-``, one that did not change
    ``W (m+ + m-) / 2`` (the paper's choice, and the ``deeplift`` package's).
    """

    @staticmethod
    def forward(ctx, z: Tensor, function: Callable[[Tensor], Tensor], split: Split, *sources: Tensor) -> Tensor:  # type: ignore[override]
        copy = z.detach().clone()
        y = function(copy.clone())
        ctx.function, ctx.split = function, split
        ctx.save_for_backward(copy, y, *(source.detach() for source in sources))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, y, *sources = ctx.saved_tensors
        function = ctx.function
        changes = [source.chunk(2)[0] - source.chunk(2)[1] for source in sources]  # the inputs' half: B rows
        positive = [change.clamp(min=0).requires_grad_(True) for change in changes]
        negative = [change.clamp(max=0).requires_grad_(True) for change in changes]
        with torch.enable_grad():
            plus_graph, minus_graph = ctx.split(positive, negative)
        plus, minus = plus_graph.detach(), minus_graph.detach()
        reference, output = z.chunk(2)[1], y.chunk(2)[0]
        slope = _derivative(function, reference)
        with torch.no_grad():
            at_reference, at_plus = function(reference.clone()), function(reference + plus)
            at_minus = function(reference + minus)
            dy_plus = 0.5 * (at_plus - at_reference) + 0.5 * (output - at_minus)
            dy_minus = 0.5 * (at_minus - at_reference) + 0.5 * (output - at_plus)
            limit_plus = 0.5 * (slope + _derivative(function, reference + minus))
            limit_minus = 0.5 * (slope + _derivative(function, reference + plus))
            m_plus = torch.where(plus.abs() <= _EPS, limit_plus, dy_plus / plus)
            m_minus = torch.where(minus.abs() <= _EPS, limit_minus, dy_minus / minus)
        halves = []
        for index, part in enumerate(grad.chunk(2)):  # each half of the batch passes its own gradient back
            back = torch.autograd.grad(
                (plus_graph, minus_graph), [*positive, *negative], (part * m_plus, part * m_minus),
                retain_graph=index == 0, allow_unused=True,
            )  # fmt: skip
            halves.append(back)
        grads = []
        for k, change in enumerate(changes):
            both = []
            for back in halves:
                up, down = back[k], back[len(changes) + k]
                up = torch.zeros_like(change) if up is None else up
                down = torch.zeros_like(change) if down is None else down
                both.append(torch.where(change > 0, up, torch.where(change < 0, down, 0.5 * (up + down))))
            grads.append(torch.cat(both))
        return None, None, None, *grads


class _RescaleMode(TorchFunctionMode):
    def __init__(self, names: dict[nn.Module, str], stack: list[nn.Module], rule: DeepLiftRule = "rescale") -> None:
        super().__init__()
        self.names, self.stack, self.rule = names, stack, rule
        # id -> (the tensor, kept alive so its id is not reused; its version counter then; its terms)
        self.terms: dict[int, tuple[Tensor, int, _Terms]] = {}
        self.lost: dict[int, tuple[Tensor, str]] = {}  # id -> (the tensor, the op that made it no linear function)

    def _terms_of(self, t: object) -> _Terms | None:
        if not isinstance(t, Tensor):
            return None
        entry = self.terms.get(id(t))
        if entry is None or entry[0] is not t or entry[1] != t._version:
            return None  # not recorded, or written in place since (itself, or a view sharing its memory)
        return entry[2]

    def _remember(self, t: Tensor, terms: _Terms) -> None:
        self.terms[id(t)] = (t, t._version, terms)

    def _lost(self, t: object) -> str | None:
        if not isinstance(t, Tensor):
            return None
        entry = self.lost.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def _lose(self, t: object, why: str) -> None:
        if isinstance(t, Tensor) and t.requires_grad:
            self.lost[id(t)] = (t, why)

    def _known(self, args: tuple) -> dict[int, _Terms]:
        """The terms of the call's tensor arguments (and of those in a list argument), read before the call runs (an
        in-place call changes the version they were recorded at)."""
        known = {}
        for arg in args:
            for t in arg if isinstance(arg, (tuple, list)) else (arg,):
                if (terms := self._terms_of(t)) is not None:
                    known[id(t)] = terms
        return known

    def _record(self, func, args: tuple, kwargs: dict, result: object, known: dict[int, _Terms]) -> object:
        """For RevealCancel: remember how ``result`` is a linear function of earlier tensors, where it is one, and
        what made it stop being one where a tensor that was is changed by an op this rule does not follow. ``known``:
        the arguments' terms before the call."""
        first = args[0] if args else None
        if isinstance(first, (tuple, list)) and isinstance(result, Tensor):  # torch.cat, torch.stack: not followed
            if known:
                self._lose(result, f"{_name(func)}{where_running(self.names, self.stack)}")
            return result
        if not isinstance(first, Tensor):
            return result
        recorded = known.get(id(first))
        if func in _RESHAPES or func in _REINDEXES:
            outputs = tuple(result) if isinstance(result, (tuple, list)) else (result,)
            if not all(isinstance(output, Tensor) for output in outputs):
                return result
            if recorded is not None:
                reindexes = _reindexing(func, args, kwargs, outputs)
                if isinstance(reindexes, str):
                    why = f"{_name(func)}{where_running(self.names, self.stack)}, which {reindexes}"
                    for output in outputs:
                        self._lose(output, why)
                else:
                    for output, reindex in zip(outputs, reindexes, strict=True):
                        self._remember(output, _reindexed_terms(recorded, reindex))
            elif (why := self._lost(first)) is not None:
                for output in outputs:
                    self._lose(output, why)
            return result
        terms = None
        if isinstance(result, Tensor) and first.requires_grad:
            terms = self._linear_part(func, args, kwargs, first, result, known)
        name = getattr(func, "__name__", "")
        in_place = func in IN_PLACE or name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
        in_place = in_place or (name.startswith("__i") and name.endswith("__"))  # x *= 2
        if in_place:
            self.terms.pop(id(first), None)  # written in place: no longer what was recorded
        if terms is not None:
            self._remember(result, terms)
        elif known and (in_place or (isinstance(result, Tensor) and result is not first)):
            where = where_running(self.names, self.stack)
            self._lose(first if in_place else result, f"{'in-place ' if in_place else ''}{_name(func)}{where}")
        return result

    def _linear_part(
        self, func, args: tuple, kwargs: dict, first: Tensor, result: Tensor, known: dict[int, _Terms]
    ) -> _Terms | None:
        terms = None
        if func in _LINEAR:
            terms = _linear_terms(func, args, kwargs)
        elif func in _BATCH_NORMS and (recorded := known.get(id(first))) is not None:
            terms = _batch_norm_terms(recorded, args, kwargs)
        elif func in ADDITIONS and len(args) == 2 and kwargs.get("alpha", 1) == 1:
            other, own = args[1], known.get(id(first))
            if result is first and own is None:
                return None  # first += other onto a tensor with no terms: first's own change is overwritten
            if isinstance(other, Tensor) and other.requires_grad and other.shape == first.shape == result.shape:
                terms = _sum_terms(own or _identity_terms(first), known.get(id(other)) or _identity_terms(other))
            elif isinstance(other, (int, float)) or (isinstance(other, Tensor) and other.numel() == 1):
                terms = own  # a constant shift: no term of its own
        return terms

    def _reveal_cancel(self, func, args: tuple, kwargs: dict) -> Tensor:
        terms, why = self._terms_of(args[0]), self._lost(args[0])
        if why is not None:
            why = f"computed from such a layer's output by {why}"
        elif terms is None and (entry := self.terms.get(id(args[0]))) is not None and entry[0] is args[0]:
            why = "computed by such a layer, then written in place (itself or a tensor sharing its memory)"
        elif terms is not None and any(s._version != v for s, v in zip(terms.sources, terms.versions, strict=True)):
            terms, why = None, "computed by such a layer whose input was written in place before this nonlinearity"
        if terms is None:
            lead = (
                "DeepLIFT's RevealCancel rule splits the input of a nonlinearity into the positive and negative "
                "contributions of the linear layer before it"
            )
            name, where = getattr(func, "__name__", func), where_running(self.names, self.stack)
            if why is not None:
                raise ValueError(
                    f"{lead}, but the model calls {name}{where} on a tensor {why}: RevealCancel follows linear and "
                    "convolutional layers, eval-mode BatchNorm, sums, and shape-only ops that keep the batch first "
                    "(view, reshape, flatten, unflatten, squeeze, permute, transpose, indexing, narrow, chunk, split, "
                    "expand, repeat, flip, roll, gather), with no in-place write in between. Move that op after the "
                    "nonlinearity, keep the batch on the first dimension, or use rule='rescale' for this model."
                )
            raise ValueError(
                f"{lead}, but the model calls {name} on a tensor that no linear or convolutional layer (optionally "
                f"followed by an eval-mode BatchNorm, sums and shape-only ops such as a reshape, flatten or permute) "
                f"computed{where}. Use rule='rescale' for this model."
            )
        rest = args[1:]
        result = _RevealCancel.apply(args[0], lambda t: func(t, *rest, **kwargs), terms.split, *terms.sources)
        return write_back(func, args[0], result)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        if func in _ELEMENTWISE and isinstance(args[0], Tensor) and args[0].requires_grad:
            if self.rule == "reveal_cancel":
                result = self._reveal_cancel(func, args, kwargs)
                if func in IN_PLACE:
                    self.terms.pop(id(args[0]), None)
                return result
            rest = args[1:]
            return write_back(func, args[0], _Rescale.apply(args[0], lambda t: func(t, *rest, **kwargs)))
        if func in _MAX_POOLS and isinstance(args[0], Tensor) and args[0].requires_grad:
            options = {**kwargs, "return_indices": True}
            rest = args[1:]
            if len(rest) >= 6:  # return_indices given by position
                rest = rest[:5]
            values = _MaxPoolRescale.apply(args[0], lambda t: func(t, *rest, **options))
            if kwargs.get("return_indices") or (len(args) >= 7 and args[6]):
                return values, func(args[0].detach(), *rest, **options)[1]
            return values
        if func in _SOFTMAXES and isinstance(args[0], Tensor) and args[0].requires_grad:
            dim = _softmax_dim(args, kwargs)
            if dim == 0:
                raise ValueError(
                    f"The model calls a softmax over the batch dimension{where_running(self.names, self.stack)}; "
                    "DeepLIFT runs the inputs and baselines as one batch and needs the batch left alone."
                )
            rest = args[1:]
            return _SoftmaxRescale.apply(args[0], lambda t: func(t, *rest, **kwargs), dim)
        if func in _NOT_ELEMENTWISE:
            raise ValueError(
                f"DeepLIFT's Rescale rule is for elementwise nonlinearities and max pooling; the model calls "
                f"{_NOT_ELEMENTWISE[func]}{where_running(self.names, self.stack)}, which has no rule. Use "
                "integrated_gradients or gradient_shap for this model."
            )
        if self.rule != "reveal_cancel":
            return func(*args, **kwargs)
        known = self._known(args)
        return self._record(func, args, kwargs, func(*args, **kwargs), known)


@register_method(
    "modified backward", "DeepLIFT", scalars=("completeness_error",),
    cost="1 forward + 1 backward of 2 samples (input and baseline)", reference="Captum DeepLift",
)  # fmt: skip
def deeplift(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    baseline: Tensor | float | BaselineFn | None = None,
    rule: DeepLiftRule = "rescale",
    return_convergence_delta: bool = False,
    multiply_by_inputs: bool = True,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """DeepLIFT attributions against a baseline: one forward and one backward of 2B samples.

    The Linear rule on linear layers, and ``rule`` on the elementwise nonlinearities (see the module docstring).

    Args:
        model: the network (elementwise activations, softmax, max pooling and linear layers; see the module
            docstring).
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        baseline: the reference input: a tensor broadcastable to ``inputs`` or a scalar; None = zeros; or a function
            of the inputs returning one (called once, on a detached copy of the inputs).
        rule: ``"rescale"`` (Captum's DeepLift) or ``"reveal_cancel"``: positive and negative contributions into
            each nonlinearity get their own multipliers; every nonlinearity must then follow a linear or
            convolutional layer, directly or through an eval-mode BatchNorm, sums and shape-only ops such as
            ``nn.Flatten``, ``view`` or ``permute`` (see the module docstring). Costs up to 3 more evaluations of each
            nonlinearity and 2 of each linear layer before one, in the backward.
        return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(baseline))`` (of the
            attributions multiplied by ``x - baseline``, whatever ``multiply_by_inputs``).
        multiply_by_inputs: multiply the multipliers by ``x - baseline`` (the contributions); False returns the
            multipliers alone (Captum's ``multiply_by_inputs=False``).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``; with ``return_convergence_delta`` a tuple ``(attributions, delta)``
        where ``delta`` has shape (B,).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> x = torch.randn(4, 3)
        >>> attributions, delta = deeplift(net, x, target=1, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-5)
        True
        >>> classifier = nn.Sequential(net, nn.Softmax(dim=1))  # the probabilities' change, summed exactly
        >>> _, delta = deeplift(classifier.double(), x.double(), target=1, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-12)
        True
        >>> minimum = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():  # min(a, b) = a - relu(a - b) for a, b >= 0 (the paper's Figure 3)
        ...     _ = minimum[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
        ...     _ = minimum[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        >>> deeplift(minimum, torch.tensor([[3.0, 1.0]]), 0, rule="reveal_cancel")  # both inputs share the credit
        tensor([[0.5000, 0.5000]])
        >>> deeplift(minimum, torch.tensor([[3.0, 1.0]]), 0)  # Rescale: all to the smaller one
        tensor([[0., 1.]])
        >>> head = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.ReLU(), nn.Linear(8, 1)).double()
        >>> x = torch.randn(2, 1, 4, 4, dtype=torch.float64)  # RevealCancel through the flatten
        >>> _, delta = deeplift(head, x, 0, rule="reveal_cancel", return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-12)
        True
    """
    _check_rule(rule)
    batch = inputs.shape[0]
    x = inputs.detach() if inputs.is_floating_point() else inputs.detach().float()
    baseline = baseline_of(baseline, x)
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    base = base.expand_as(x)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise ValueError(
                f"DeepLIFT runs the inputs and baselines as one batch, and BatchNorm {name!r} keeps no running "
                "statistics (track_running_stats=False): it would mix them. Use integrated_gradients for this model."
            )
    with modes_preserved(model), eager_forward(), gradients_enabled():
        both = as_leaf(torch.cat([x, base]))
        with running_modules(model) as (names, stack), _RescaleMode(names, stack, rule):
            output = model(both)
        scores = scores_from_output(output, output_transform)  # outside the rules: a softmax there is the user's
        if scores.shape[0] != 2 * batch:
            raise ValueError(
                f"The model returned {scores.shape[0]} score rows for the {2 * batch} inputs and baselines; DeepLIFT "
                "needs one row per input, batch first."
            )
        index = resolve_target(target, scores[:batch].detach(), task)  # the inputs' half of the one forward
        chosen = target_scores(scores, index.repeat(2), task)
        (grad,) = torch.autograd.grad(chosen.sum(), both)
    multipliers = grad[:batch].to(x.dtype).detach()
    attributions = ((x - base) * multipliers).detach()
    result = attributions if multiply_by_inputs else multipliers
    if not return_convergence_delta:
        return result
    change = (chosen[:batch] - chosen[batch:]).detach().double()
    return result, attributions.reshape(batch, -1).double().sum(dim=1) - change


@register_method(
    "modified backward", "DeepLiftShap", scalars=("completeness_error",),
    cost="1 forward + 1 backward of 2 K samples (the input against each of K baselines)",
    reference="Captum DeepLiftShap",
)  # fmt: skip
def deeplift_shap(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    baselines: Tensor | float | BaselineFn | None = None,
    rule: DeepLiftRule = "rescale",
    return_convergence_delta: bool = False,
    multiply_by_inputs: bool = True,
    internal_batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor | tuple[Tensor, Tensor]:
    """DeepLiftShap: DeepLIFT averaged over a distribution of baselines (Lundberg & Lee 2017).

    Each input is explained by :func:`deeplift` against every one of the K
    reference inputs in ``baselines`` and the K attributions are averaged:
    Captum's ``DeepLiftShap``. With ``multiply_by_inputs`` the average of
    ``(x - r_k) * m_k``, so a sample's attributions sum to
    ``f(x) - mean_k f(r_k)``; without, the average of the multipliers ``m_k``.
    The target is fixed on the clean inputs.

    Args:
        model: the network (as for :func:`deeplift`).
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        baselines: the reference inputs, a (K, ...) tensor whose trailing
            dimensions broadcast to one input's (e.g. a sample of training
            images); a scalar for one constant reference; None for zeros; or a
            function of the inputs returning one of those (called once, on a
            detached copy of the inputs).
        rule: DeepLIFT's rule for the nonlinearities, ``"rescale"`` or
            ``"reveal_cancel"`` (see :func:`deeplift`).
        return_convergence_delta: also return, per sample,
            ``sum(attributions) - (f(x) - mean_k f(r_k))`` of the multiplied
            attributions: the mean over the baselines of the B x K residuals
            Captum returns.
        multiply_by_inputs: average ``(x - r_k) * m_k`` (the contributions);
            False averages the multipliers alone (Captum's ``multiply_by_inputs=False``).
        internal_batch_size: at most this many (input, baseline) pairs per
            pass, of ``2 *`` that many samples (default: all ``B * K`` at once).
        output_transform: maps the model's output to (B, C) scores.
        task: the output kind (see :mod:`lightning_interp.methods.model.tasks`).

    Returns:
        Attributions shaped like ``inputs``; with ``return_convergence_delta``
        a tuple ``(attributions, delta)`` where ``delta`` has shape (B,).

    Raises:
        ValueError: ``baselines`` does not fit the inputs, or the model has no
            DeepLIFT rule (see :func:`deeplift`).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
        >>> x, references = torch.randn(4, 3).double(), torch.randn(6, 3).double()
        >>> attributions, delta = deeplift_shap(net, x, 1, baselines=references, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-12)  # sums to f(x) - mean f(r)
        True
    """
    from lightning_interp.methods.attribution.gradient import reference_inputs

    _check_rule(rule)
    x = inputs.detach() if inputs.is_floating_point() else inputs.detach().float()
    batch = x.shape[0]
    references = reference_inputs(baselines, x)  # (K, ...)
    count = references.shape[0]
    index = fixed_target(model, x, target, output_transform, task)
    pairs = batch * count  # flat rows: sample-major, then baseline (Captum's order)
    results, deltas = [], []
    for start, end in row_chunks(pairs, row_limit(internal_batch_size, pairs)):
        rows = torch.arange(start, end, device=x.device)
        sample, reference = rows // count, rows % count
        result, delta = deeplift(
            for_rows(model, sample), x[sample], index[sample], baseline=references[reference], rule=rule,
            return_convergence_delta=True, multiply_by_inputs=multiply_by_inputs,
            output_transform=output_transform, task=task,
        )  # fmt: skip
        results.append(result.to(accumulation_dtype(x)))
        deltas.append(delta)
    attributions = torch.cat(results).reshape(batch, count, *x.shape[1:]).mean(dim=1).to(x.dtype)
    if not return_convergence_delta:
        return attributions
    return attributions, torch.cat(deltas).reshape(batch, count).mean(dim=1)
