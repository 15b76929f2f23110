"""Layer-wise relevance propagation (Bach et al. 2015) as rules attached to layer types for one call.

The target score is the relevance at the output; every layer passes relevance
down so that (up to the stabiliser and the biases) it is conserved: the input
relevance of a sample sums to its explained score. The rules, for a layer
``z = W x + b`` with relevance ``R`` at its output (``x+``, ``W+``: positive
parts; ``x-``, ``W-``: negative parts):

- ``"epsilon"``: ``R_in = x * W^T (R / (z + eps sign z))`` (LRP-0 at ``epsilon=0``);
- ``"zplus"``: only the positive contributions ``x+ W+ + x- W-`` (alpha=1, beta=0);
  deep Taylor decomposition of a ReLU network is LRP with this rule;
- ``"alpha_beta"``: ``alpha`` times the positive minus ``beta`` times the negative
  contributions (``alpha - beta = 1``);
- ``"gamma"``: the generalised gamma rule, positive contributions raised by ``gamma``;
- composites for CNNs: ``"epsilon_plus"`` (z+ on convolutions, epsilon on linear
  layers) and ``"epsilon_plus_flat"`` (the same with the flat rule on the first layer).

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

Supported parameterised layers: ``Linear``, ``Conv1d/2d/3d`` and BatchNorm
after one of them. A model with another layer that has parameters
(LayerNorm, Embedding, attention, transposed convolutions, ...) is refused
before the forward pass, naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_interp.methods._core import (
    OutputTransform,
    Target,
    as_leaf,
    eager_forward,
    gradients_enabled,
    modes_preserved,
    resolve_target,
    scores_from_output,
)
from lightning_interp.methods._rules import (
    ADDITIONS,
    IN_PLACE,
    OTHER_ACTIVATIONS,
    RELUS,
    SQUASHES,
    running_modules,
    write_back,
)
from lightning_interp.methods.registry import register_method
from lightning_interp.methods.tasks import target_scores

__all__ = ["LRP_COMPOSITES", "LRP_RULES", "lrp", "lrp_rules"]

LRP_RULES = ("epsilon", "gamma", "alpha_beta", "zplus")
"""Rules applied to every convolution and linear layer."""

LRP_COMPOSITES = ("epsilon_plus", "epsilon_plus_flat")
"""Rules per layer type for CNNs: z+ on convolutions and epsilon on linear layers (flat on the first layer)."""

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
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


@dataclass
class _Settings:
    rule: str
    epsilon: float
    stabilizer: float
    gamma: float
    alpha: float
    beta: float


@dataclass
class _LayerCall:
    """One call of a convolution or linear layer, and the BatchNorm merged into it (if one follows)."""

    module: nn.Module
    rule: str
    batchnorm: nn.Module | None = None

    def parameters(self) -> tuple[Tensor, Tensor]:
        weight = self.module.weight.detach()
        bias = self.module.bias
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias.detach()
        norm = self.batchnorm
        if norm is None:
            return weight, bias
        mean, var = norm.running_mean, norm.running_var
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach()
        shift = -mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias.detach()
        return weight * scale.reshape(-1, *([1] * (weight.ndim - 1))), bias * scale + shift

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if isinstance(self.module, nn.Linear):
            return F.linear(x, weight, bias)
        return self.module._conv_forward(x, weight, bias)  # the layer's own padding mode, stride, groups


def _relevance_through(call: _LayerCall, x: Tensor, relevance: Tensor, settings: _Settings) -> Tensor:
    """The rule of ``call`` applied to one layer: relevance at its output -> relevance at its input."""
    weight, bias = call.parameters()
    eps = settings.stabilizer  # the epsilon rule's own epsilon is settings.epsilon

    def pulled(parts: list[tuple[Tensor, Tensor, Tensor]], scale: list[Tensor]) -> list[Tensor]:
        """Each part's input times the gradient of its output pulled back with ``scale``."""
        leaves = [part.detach().requires_grad_(True) for part, _, _ in parts]
        outputs = [call.apply(leaf, w, b) for leaf, (_, w, b) in zip(leaves, parts, strict=True)]
        grads = torch.autograd.grad(outputs, leaves, scale)
        return [leaf.detach() * grad for leaf, grad in zip(leaves, grads, strict=True)]

    if call.rule == "flat":
        ones = torch.ones_like(x).requires_grad_(True)
        z = call.apply(ones, torch.ones_like(weight), torch.zeros_like(bias))
        return torch.autograd.grad(z, ones, _share(relevance, z.detach(), eps))[0]
    if call.rule == "epsilon":
        z = call.apply(x, weight, bias)
        return pulled([(x, weight, bias)], [_share(relevance, z, settings.epsilon)])[0]
    positive, negative = x.clamp(min=0), x.clamp(max=0)
    w_plus, w_minus = weight.clamp(min=0), weight.clamp(max=0)
    no_bias = torch.zeros_like(bias)
    if call.rule == "zplus" or call.rule == "alpha_beta":
        up = [(positive, w_plus, bias.clamp(min=0)), (negative, w_minus, no_bias)]
        z_up = sum(call.apply(*part) for part in up)
        r_up = sum(pulled(up, [_share(relevance, z_up, eps)] * 2))
        if call.rule == "zplus":
            return r_up
        down = [(positive, w_minus, bias.clamp(max=0)), (negative, w_plus, no_bias)]
        z_down = sum(call.apply(*part) for part in down)
        r_down = sum(pulled(down, [_share(relevance, z_down, eps)] * 2))
        return settings.alpha * r_up - settings.beta * r_down
    # gamma (generalised to inputs of both signs): raise the contributions that agree with the output's sign
    gamma = settings.gamma
    z = call.apply(x, weight, bias)
    raised_plus = (weight + gamma * w_plus, bias + gamma * bias.clamp(min=0))
    raised_minus = (weight + gamma * w_minus, bias + gamma * bias.clamp(max=0))
    up = [(positive, *raised_plus), (negative, raised_minus[0], no_bias)]
    down = [(positive, *raised_minus), (negative, raised_plus[0], no_bias)]
    z_up = sum(call.apply(*part) for part in up)
    z_down = sum(call.apply(*part) for part in down)
    scale_up = (z > 0).to(z.dtype) * _share(relevance, z_up, eps)
    scale_down = (z < 0).to(z.dtype) * _share(relevance, z_down, eps)
    return sum(pulled(up, [scale_up] * 2)) + sum(pulled(down, [scale_down] * 2))


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
                f"LRP has rules for Linear, Conv1d/2d/3d and BatchNorm after one of them; {where} has parameters "
                f"({', '.join(own)}) and no rule. Use a gradient method (integrated_gradients, input_x_gradient) "
                "or a CAM method for this model."
            )


def _layer_rule(rule: str, module: nn.Module, first: bool) -> str:
    if rule in LRP_RULES:
        return rule
    if first and rule == "epsilon_plus_flat":
        return "flat"
    return "zplus" if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "epsilon"


@contextlib.contextmanager
def lrp_rules(
    model: nn.Module,
    rule: str = "epsilon",
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
) -> Iterator[None]:
    """Inside the block, the backward pass of ``model`` propagates relevance by the LRP ``rule``.

    Forward hooks on the convolution, linear and BatchNorm layers and a
    :class:`~torch.overrides.TorchFunctionMode` for activations, pooling and
    residual additions; every hook is removed when the block ends or raises.
    Run the forward pass inside the block; the backward may come after it.
    The gradient that arrives at the input is its relevance (not multiplied by the input).

    Args:
        model: the network (see the module docstring for the layers it may have).
        rule: one of :data:`LRP_RULES` or :data:`LRP_COMPOSITES`.
        epsilon: the epsilon rule's epsilon.
        gamma: the gamma rule's factor on positive contributions.
        alpha: the alpha-beta rule's weight on positive contributions.
        beta: the alpha-beta rule's weight on negative contributions (``alpha - beta = 1``).
        stabilizer: added to the denominators of the other rules and of pooling and sums (zennit's ``stabilizer``).

    Raises:
        ValueError: an unknown rule, bad parameters, a layer without a rule, or a BatchNorm that does not follow
            a convolution or linear layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
        >>> x = torch.rand(2, 3, requires_grad=True)
        >>> with lrp_rules(net, "epsilon", epsilon=0.0):
        ...     out = net(x)
        >>> (relevance,) = torch.autograd.grad(out, x, out)
        >>> torch.allclose(relevance.sum(dim=1), out[:, 0])
        True
    """
    if rule not in LRP_RULES + LRP_COMPOSITES:
        raise ValueError(f"rule must be one of {LRP_RULES + LRP_COMPOSITES}, got {rule!r}.")
    if epsilon < 0 or gamma < 0 or stabilizer < 0:
        raise ValueError(f"epsilon, gamma and stabilizer must be >= 0, got {epsilon}, {gamma}, {stabilizer}.")
    if rule == "alpha_beta" and (alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-9):
        raise ValueError(f"The alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}.")
    _check_layers(model)
    settings = _Settings(rule, epsilon, stabilizer, gamma, alpha, beta)
    produced: dict[int, tuple[Tensor, _LayerCall]] = {}
    handles = []

    def weighted_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        call = _LayerCall(module, _layer_rule(rule, module, first=not produced))
        result = _Rule.apply(args[0], output, lambda x, relevance: _relevance_through(call, x, relevance, settings))
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
    "modified backward", "LRP",
    cost="1 forward + 1 backward (+ 1 to 5 layer recomputations per layer, by rule)",
    reference="zennit rules and composites",
)  # fmt: skip
def lrp(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    rule: str = "epsilon",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
    output_transform: OutputTransform | None = None,
    task: str = "multiclass",
) -> Tensor:
    """Layer-wise relevance propagation of the target score to the input (one forward, one backward).

    The relevance at the output is the explained score (the target logit;
    for a binary model the logit of the explained side), so without biases
    and at ``epsilon=0`` a sample's input relevance sums to it. Rules and
    supported layers: see the module docstring.

    Args:
        model: the network: convolutions, linear layers, BatchNorm after them, activations, pooling, residual sums.
        inputs: (B, ...) batch.
        target: class index, LongTensor (B,), or None for the prediction.
        rule: ``"epsilon"``, ``"gamma"``, ``"alpha_beta"``, ``"zplus"`` on every layer, or the CNN composites
            ``"epsilon_plus"`` / ``"epsilon_plus_flat"``.
        epsilon: the epsilon rule's epsilon (LRP-0 at 0).
        gamma: the gamma rule's factor.
        alpha: the alpha-beta rule's positive weight.
        beta: the alpha-beta rule's negative weight.
        stabilizer: the other rules' (and pooling's and sums') denominator stabiliser, as zennit's.
        output_transform: selects or reshapes the model's output to (B, C) scores; it runs outside the rules with
            its plain gradient, so it should not rescale (a softmax would start from the probability's gradient).
        task: the output kind (see :mod:`lightning_interp.methods.tasks`).

    Returns:
        Relevance shaped like ``inputs``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3, bias=False))
        >>> x = torch.rand(4, 1, 4, 4)
        >>> relevance = lrp(net, x, target=0, epsilon=0.0)
        >>> torch.allclose(relevance.sum(dim=(1, 2, 3)), net(x)[:, 0], atol=1e-5)
        True
    """
    with modes_preserved(model), eager_forward(), gradients_enabled():
        x = as_leaf(inputs)
        with lrp_rules(model, rule, epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta, stabilizer=stabilizer):
            output = model(x)
        scores = scores_from_output(output, output_transform)
        index = resolve_target(target, scores, task)
        picked = scores.detach().requires_grad_(True)
        (selection,) = torch.autograd.grad(target_scores(picked, index, task).sum(), picked)
        (relevance,) = torch.autograd.grad(scores, x, selection * scores.detach())
    return relevance.detach().to(inputs.dtype) if inputs.is_floating_point() else relevance.detach()
