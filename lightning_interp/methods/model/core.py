"""Shared machinery for the attribution methods: isolation, targets, one pass.

Everything here is pure torch. The public functions in this package are thin
wrappers around :func:`attribution_pass`, which runs one forward and one
backward and returns every quantity the methods need.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.tasks import target_scores

Target = Union[int, Tensor, None]  # noqa: UP007 (runtime alias, Python 3.10)
"""An attribution target: a class index, a LongTensor of shape (B,), or None
for the predicted class."""

OutputTransform = Callable[[object], Tensor]
"""Turns whatever the model returns into a (B, num_classes) score tensor."""

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
"""Dropout module types (subclasses included): what MC dropout and :func:`dropout_active` switch to train mode."""

_DROPOUT_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("dropout_active", default=False)


@contextlib.contextmanager
def dropout_active() -> Iterator[None]:
    """Inside the block, :func:`modes_preserved` leaves the dropout modules in train mode (every other module in
    eval mode): any method then explains one stochastic sub-network, as MC dropout samples them. Use it inside a
    private RNG fork, or the dropout masks consume the global RNG.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with dropout_active(), modes_preserved(net):
        ...     net[0].training, net[1].training
        (False, True)
    """
    token = _DROPOUT_ACTIVE.set(True)
    try:
        yield
    finally:
        _DROPOUT_ACTIVE.reset(token)


@contextlib.contextmanager
def modes_preserved(model: nn.Module, *, eval_mode: bool = True) -> Iterator[None]:
    """Save every module's ``training`` flag, optionally switch to eval, restore.

    Flags are restored per module (not with ``model.train()``), so a model
    with frozen sub-modules in eval mode keeps them that way.

    Args:
        model: the module tree to protect.
        eval_mode: put every module in eval mode inside the block.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> net[1].train()
        Dropout(p=0.5, inplace=False)
        >>> with modes_preserved(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        if eval_mode:
            for module, flag in saved:
                if flag:  # touch only what changes: nn.Module.__setattr__ is slow, and validation is already in eval
                    module.training = False
            if _DROPOUT_ACTIVE.get():  # MC dropout of an explanation (see dropout_active)
                for module, _ in saved:
                    if isinstance(module, DROPOUT_TYPES):
                        module.training = True
        yield
    finally:
        for module, flag in saved:
            if module.training != flag:
                module.training = flag


@contextlib.contextmanager
def eager_forward() -> Iterator[None]:
    """Run ``torch.compile``d modules eagerly inside the block: the same weights through the original code.

    Forward hooks registered after a module's first compiled call never fire in
    its compiled graph, so layer captures (Grad-CAM, features) would see
    nothing; ``torch.compiler.set_stance("force_eager")`` runs the original
    Python code instead (no recompilation, no change to the compiled cache). A
    no-op on torch versions without it (before 2.6) and inside a compiled region.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        with transformer_slow_path():
            yield
        return
    with set_stance("force_eager"), transformer_slow_path():
        yield


@contextlib.contextmanager
def transformer_slow_path() -> Iterator[None]:
    """Keep ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` off torch's
    fused "fast path" inside the block (part of :func:`eager_forward`).

    In eval mode without gradients that path may run a whole encoder layer in
    one kernel without calling its attention module (no hook sees the layer),
    and ``nn.TransformerEncoder`` turns a padded batch into nested tensors,
    whose layer outputs have no shape to capture. The step-by-step path is the
    one every gradient pass takes anyway, so what the callbacks show comes
    from one computation; it differs from the fast path only at padded
    positions, which the nested path sets to zero (a model that pools over the
    padding as well would see other numbers in its own validation).
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Enable autograd even inside ``torch.no_grad()`` or ``inference_mode()``.

    Lightning validates under ``no_grad`` during ``fit`` and under
    ``inference_mode`` in ``validate``/``test``; tensors that need gradients
    must be made outside inference mode, which this block guarantees.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def as_leaf(inputs: Tensor) -> Tensor:
    """A fresh float leaf tensor with ``requires_grad`` (never an inference tensor)."""
    x = inputs.detach().clone()
    if not x.is_floating_point():
        x = x.float()
    return x.requires_grad_(True)


def module_name(model: nn.Module, layer: str) -> str | None:
    """The dotted name in ``model.named_modules()`` of the sub-module ``layer`` names, or None.

    The names of a ``torch.compile``d sub-module's layers run through its
    ``_orig_mod`` (FSDP1's through ``_fsdp_wrapped_module``, activation
    checkpointing's through ``_checkpoint_wrapped_module``); the name without
    them (the one the user wrote) is accepted too, and names the innermost
    module of that name (the layer itself, not its wrapper).

    Example:
        >>> net = nn.Sequential(torch.compile(nn.Sequential(nn.Linear(2, 2))))
        >>> module_name(net, "0.0")
        '0._orig_mod.0'
    """
    names = [name for name, _ in model.named_modules() if name]
    if layer in names:  # an FSDP1 unit or a checkpoint wrapper of that name: the layer inside it
        known = set(names)
        while inner := next((f"{layer}.{s}" for s in LAYER_WRAPPER_SEGMENTS if f"{layer}.{s}" in known), None):
            layer = inner
        return layer
    return {plain_name(name): name for name in names}.get(layer)


WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Name segments that wrappers insert: ``torch.compile``, FSDP1 (``FullyShardedDataParallel``) and
``checkpoint_wrapper`` (activation checkpointing)."""

LAYER_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""The segments of wrappers that take their layer's own name: an FSDP1 unit ``net.0`` holds the layer
``net.0._fsdp_wrapped_module`` (a compiled module's name still names the compiled module)."""


def plain_name(name: str) -> str:
    """A module name without the segments ``torch.compile``, FSDP and activation checkpointing insert (the name a
    user writes).

    Example:
        >>> plain_name("net._orig_mod.layer4")
        'net.layer4'
        >>> plain_name("_fsdp_wrapped_module.net.3._fsdp_wrapped_module._checkpoint_wrapped_module")
        'net.3'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def get_module(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """Return ``layer`` itself or the sub-module of ``model`` with that dotted name.

    Raises:
        ValueError: the name is not a sub-module; the message lists the closest
            real names.
        TypeError: ``layer`` is neither a module nor a string.
    """
    if isinstance(layer, nn.Module):
        return layer
    if not isinstance(layer, str):
        raise TypeError(
            f"A layer must be an nn.Module or a dotted name such as 'features.3', got {type(layer).__name__}."
        )
    modules = dict(model.named_modules())
    real = module_name(model, layer)
    if real is not None:
        return modules[real]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(repr(n) for n in close)}." if close else ""
    sample = ", ".join(repr(n) for n in names[:12])
    raise ValueError(
        f"Layer {layer!r} is not a sub-module of {type(model).__name__}.{hint} "
        f"Names come from model.named_modules(); the first ones are: {sample}."
    )


def scores_from_output(output: object, output_transform: OutputTransform | None) -> Tensor:
    """The (B, C) score tensor of a model output, with a clear error otherwise.

    Without ``output_transform``, an output with ``logits`` (a HuggingFace ``ModelOutput``, a dict with that key)
    gives those.

    Example:
        >>> scores_from_output({"logits": torch.zeros(2, 3), "loss": None}, None).shape
        torch.Size([2, 3])
    """
    scores = output_transform(output) if output_transform is not None else logits_of(output)
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"The model returned {type(scores).__name__}, not a tensor of class scores. "
            "Pass output_transform=... to pick the (batch, classes) logits out of it, "
            "e.g. output_transform=lambda out: out[0] for a tuple, or lambda out: out['logits'] for a dict."
        )
    if scores.ndim == 1:
        scores = scores.unsqueeze(1)
    if scores.ndim == 4 and output_transform is None:
        raise ValueError(
            f"Expected class scores of shape (batch, classes), got {tuple(scores.shape)}: dense (batch, classes, H, "
            "W) scores, a segmentation output. Explain a class over a region: target, transform = "
            "segmentation_target(model, inputs, class_index, region='predicted') (lightning_interp.methods), then "
            "pass target and output_transform=transform to the method; the map callbacks do this themselves "
            "(target=SegmentationTarget(...))."
        )
    if scores.ndim != 2:
        raise ValueError(
            f"Expected class scores of shape (batch, classes), got {tuple(scores.shape)}. "
            "Pass output_transform=... to reduce the model's output to that shape."
        )
    return scores


def logits_of(output: object) -> object:
    """``output.logits`` (or ``output["logits"]``) where the output carries a tensor under that name (HuggingFace's
    ``ModelOutput``), a mapping's ``"out"`` (torchvision's segmentation models: ``{"out": ..., "aux": ...}``),
    else the output itself.

    Example:
        >>> logits_of({"out": torch.zeros(1, 3, 2, 2), "aux": torch.zeros(1, 3, 2, 2)}).shape
        torch.Size([1, 3, 2, 2])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if not isinstance(logits, Tensor):
            logits = output.get("out")
    else:
        logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else output


class ForwardWith(nn.Module):
    """``model`` called as ``forward_fn(model, inputs)``, with the same sub-modules under the same names.

    For models whose ``forward`` does not take the inputs tensor alone (a
    LightningModule whose ``forward`` takes the whole batch, a text model
    called with keyword arguments): every method runs ``ForwardWith(model,
    fn)(inputs)``, while layer names, parameters and modes stay the model's own
    (nothing is registered as a child, so ``"net.3"`` still names ``model.net[3]``).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> wrapped = ForwardWith(net, lambda model, x: model(x[:, :3]))
        >>> wrapped(torch.zeros(4, 5)).shape, [name for name, _ in wrapped.named_modules()]
        (torch.Size([4, 2]), ['', '0'])
    """

    def __init__(self, model: nn.Module, forward_fn: Callable[[nn.Module, Tensor], object]) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a child: names stay the model's own
        object.__setattr__(self, "forward_fn", forward_fn)

    def forward(self, inputs: Tensor) -> object:
        return self.forward_fn(self.model, inputs)

    def named_modules(self, *args: object, **kwargs: object) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        return self.model.named_modules(*args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)  # device, dtype, hparams, ... of the model itself


def resolve_target(target: Target, scores: Tensor, task: str = "multiclass") -> Tensor:
    """Turn a target spec into a LongTensor with one explained index per sample.

    ``None`` means the prediction: the argmax for multiclass and multi-label
    scores, the predicted side (1 if the logit > 0, else 0) for a binary model,
    and the only output of a one-output regression (a regression with several
    outputs needs an explicit index). See :mod:`lightning_interp.methods.model.tasks`.
    """
    batch, classes = scores.shape
    if task == "binary":
        classes = 2  # target 0 and 1: the two sides of the one logit
    if target is None:
        if task == "binary":
            index = (scores.detach()[:, 0] > 0).long()
        elif task == "regression":
            if classes != 1:
                raise ValueError(
                    f"A regression with {classes} outputs: say which output to explain with a fixed target index "
                    f"(0 to {classes - 1})."
                )
            index = torch.zeros(batch, dtype=torch.long, device=scores.device)
        else:
            index = scores.detach().argmax(dim=1)
    elif isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < classes:
            raise ValueError(f"target indices must lie in [0, {classes - 1}], got {target}.")
        index = torch.full((batch,), target, dtype=torch.long, device=scores.device)
    elif isinstance(target, Tensor):
        reusable = target.shape == (batch,) and target.device == scores.device and not target.is_inference()
        if reusable and _RESOLVED.get(id(target)) is target:
            return target  # resolved and checked by this function already (an attribution's steps reuse it)
        if target.numel() not in (1, batch):
            raise ValueError(f"target has {target.numel()} entries but the batch has {batch} samples.")
        # clone: the target may come from inference mode, and inference tensors cannot join autograd
        index = target.to(device=scores.device, dtype=torch.long).reshape(-1).clone()
        if index.numel() == 1 and batch != 1:
            index = index.expand(batch)
        if target.numel():  # where the target is (a label on the host: no wait for the device)
            low, high = (int(value) for value in torch.aminmax(target.detach().reshape(-1)))
            if low < 0 or high >= classes:
                raise ValueError(f"target indices must lie in [0, {classes - 1}], got {target.reshape(-1).tolist()}.")
    else:
        raise TypeError(f"target must be an int, a LongTensor of shape (B,) or None, got {type(target).__name__}.")
    _RESOLVED[id(index)] = index
    return index


_RESOLVED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
"""The indices :func:`resolve_target` returned, while they live: given back to it, they need no second check."""


def repeat_target(index: Tensor, times: int) -> Tensor:
    """``index.repeat(times)`` for the copies of a batch (noisy samples, integration steps): an index that
    :func:`resolve_target` checked stays checked, so the copies' passes do not read it back from the device."""
    return checked_like(index, index.repeat(times))


def checked_like(source: Tensor, derived: Tensor) -> Tensor:
    """``derived`` (a copy, view or repeat of the index ``source``), marked as checked when ``source`` was."""
    if _RESOLVED.get(id(source)) is source:
        _RESOLVED[id(derived)] = derived
    return derived


class _CapturedOutputs(list):
    """The recorded outputs of :func:`captured_outputs` (a list, one per module), and whether any was written."""

    versions: list[int | None]

    def overwritten(self) -> bool:
        """Whether an output handed on uncopied (``copy=False``) was written in place after it was recorded."""
        return any(
            version is not None and out is not None and out._version != version
            for out, version in zip(self, self.versions, strict=True)
        )


@contextlib.contextmanager
def captured_outputs(modules: Sequence[nn.Module], *, copy: bool = True) -> Iterator[_CapturedOutputs]:
    """Record the (last) output of each module during the block; hooks removed in ``finally``.

    The rest of the network receives a copy of each recorded output, so an
    in-place operation after the layer (``nn.ReLU(inplace=True)``) changes the
    copy and the recorded tensor stays the layer's own output, as do the
    gradients taken with respect to it. With ``copy=False`` it receives the
    output itself (no copy's memory and time), and ``overwritten()`` of the
    yielded list says, after the block, whether anything wrote into a recorded
    output (its version counter moved): then the recording is not the layer's
    output, and the block must run again with copies.
    """
    outputs = _CapturedOutputs([None] * len(modules))
    outputs.versions = [None] * len(modules)
    handles = []

    def make_hook(slot: int) -> Callable:
        def hook(_module: nn.Module, _args: object, output: object) -> Tensor | None:
            if not isinstance(output, Tensor):
                return None
            outputs[slot] = output
            if not copy:
                outputs.versions[slot] = output._version
                return None
            return output.clone()  # what the next module sees (and may overwrite in place)

        return hook

    try:
        for slot, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(slot)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _wrt_names(input_gradient: bool, layers: Sequence[nn.Module | str]) -> list[str]:
    names = [f"layer {layer!r}" if isinstance(layer, str) else f"layer {type(layer).__name__}" for layer in layers]
    return (["the input"] if input_gradient else []) + names


@dataclass
class PassResult:
    """Everything one forward and one backward on a batch yields.

    Attributes:
        inputs: the (detached) inputs the pass ran on.
        scores: (B, C) class scores, detached.
        target: (B,) class indices the gradients were taken for.
        input_grad: d score / d input, same shape as ``inputs`` (or None).
        activations: detached outputs of each requested layer, in order.
        activation_grads: d score / d activation for each requested layer.
    """

    inputs: Tensor
    scores: Tensor
    target: Tensor
    input_grad: Tensor | None
    activations: list[Tensor] = field(default_factory=list)
    activation_grads: list[Tensor] = field(default_factory=list)


def attribution_pass(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    layers: Sequence[nn.Module | str] = (),
    input_gradient: bool = True,
    output_transform: OutputTransform | None = None,
    eval_mode: bool = True,
    task: str = "multiclass",
    copy_outputs: bool = True,
) -> PassResult:
    """One forward and one backward that serve several methods at once.

    The gradient of the target scores with respect to the inputs (for plain
    gradient and input x gradient) and with respect to the outputs of every
    layer in ``layers`` (for Grad-CAM) come from a single
    ``torch.autograd.grad`` call. ``param.grad`` is never touched, hooks live
    only inside the call, and every module's mode is restored.

    Args:
        model: the network; called as ``model(inputs)``.
        inputs: a batch, (B, ...).
        target: class index, LongTensor (B,), or None for the predicted class.
        layers: modules or dotted names whose outputs to differentiate.
        input_gradient: also return d score / d input.
        output_transform: maps the model output to (B, C) scores.
        eval_mode: run the model in eval mode (Dropout off, BatchNorm frozen).
        task: the output kind (:data:`~lightning_interp.methods.TASKS`): which index ``target=None``
            picks and, for a binary model, the sign of the explained logit.
        copy_outputs: hand the rest of the network a copy of each layer's output (see
            :func:`captured_outputs`); False hands on the output itself, and runs the pass again with copies when
            something after a layer wrote into its output in place (worth it only where that is known not to happen).

    Returns:
        A :class:`PassResult`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        >>> out = attribution_pass(net, torch.randn(4, 1, 6, 6), layers=["1"])
        >>> out.input_grad.shape, out.activation_grads[0].shape
        (torch.Size([4, 1, 6, 6]), torch.Size([4, 2, 4, 4]))
    """
    modules = [get_module(model, layer) for layer in layers]
    with modes_preserved(model, eval_mode=eval_mode), eager_forward(), gradients_enabled():
        # The input is a leaf that requires grad even when only layer gradients are wanted, so that
        # layers after frozen parts of the network (or a fully frozen network) still get gradients.
        x = as_leaf(inputs) if input_gradient or inputs.is_floating_point() else inputs.detach().clone()
        with captured_outputs(modules, copy=copy_outputs) as outputs:
            scores = scores_from_output(model(x), output_transform)
        if outputs.overwritten():  # written in place after the layer: its recording is not the layer's output
            with captured_outputs(modules) as outputs:
                scores = scores_from_output(model(x), output_transform)
        missing = [str(layers[i]) for i, out in enumerate(outputs) if out is None]
        if missing:
            raise RuntimeError(
                f"Layer(s) {missing} produced no tensor output during the forward pass; "
                "choose modules that are called in forward() and return a tensor."
            )
        index = resolve_target(target, scores, task)
        selected = target_scores(scores, index, task).sum()
        wrt: list[Tensor] = ([x] if input_gradient else []) + [out for out in outputs if out is not None]
        names = _wrt_names(input_gradient, layers)
        detached = [name for name, t in zip(names, wrt, strict=True) if not t.requires_grad]
        if not selected.requires_grad or detached:
            what = ", ".join(detached) if selected.requires_grad else "the model's scores"
            raise RuntimeError(
                f"{what} does not require a gradient: it is computed under torch.no_grad() or inside a reentrant "
                "checkpoint (torch.utils.checkpoint with use_reentrant=True), or from integer inputs only (token "
                "ids: differentiable layers need a float input, such as an embedding output). Explain a layer "
                "outside that part."
            )
        grads = torch.autograd.grad(selected, wrt, allow_unused=True)
        unconnected = [name for name, g in zip(names, grads, strict=True) if g is None]
        if unconnected:
            raise RuntimeError(
                f"The target scores do not depend on {', '.join(unconnected)} through a differentiable path: part of "
                "the model runs under torch.no_grad() or a reentrant checkpoint, or detaches its input (.detach(), "
                "a frozen feature extractor), or does not use that input at all (a model of several inputs that "
                "ignores one). Its gradient, and every map built on it, would be zero everywhere. "
                "Explain a layer after that part instead (e.g. GradCAMCallback on the first layer that has a gradient)."
            )
    input_grad = grads[0].detach() if input_gradient else None
    layer_grads = grads[1:] if input_gradient else grads
    return PassResult(
        inputs=x.detach(),
        scores=scores.detach(),
        target=index,
        input_grad=input_grad,
        activations=[out.detach() for out in outputs if out is not None],
        activation_grads=[g.detach() for g in layer_grads],
    )
