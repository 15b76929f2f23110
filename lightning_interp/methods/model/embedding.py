"""Attribution at an embedding: a model on token ids seen as a function of its embedding layer's output.

Token ids are not differentiable, so gradient methods attribute to the output
of the embedding layer instead: :class:`LayerInput` is the model called on
the ids, with that layer's output replaced by a given tensor, so every
input-attribution method can run on the (B, T, D) embeddings as on any
continuous input. A per-token score is then the sum over the embedding
dimension (signed, or of magnitudes).

The methods batch copies of the probe samples copy after copy (row ``r`` of a
forward is a copy of sample ``r % B``: SmoothGrad's noisy copies, integrated
gradients' path points, DeepLIFT's input and baseline), so the ids that go with
a batch of M embeddings are the ids repeated ``M / B`` times; a batch in which
M is not a multiple of B is refused rather than paired with the wrong ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import ForwardWith, get_module, modes_preserved

__all__ = ["LayerInput", "find_input_embedding", "layer_output", "token_scores"]


def find_input_embedding(
    model: nn.Module, inputs: Tensor, forward: Callable[[nn.Module, Tensor], object] | None = None
) -> str:
    """The dotted name of the first ``nn.Embedding`` that is called on the model's input tensor itself.

    Args:
        model: the network.
        inputs: a few token-id inputs (B, T).
        forward: how to call the model, ``forward(model, inputs)``; default ``model(inputs)``.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> find_input_embedding(net, torch.tensor([[1, 2, 3]]))
        '0'
    """
    names = {module: name for name, module in model.named_modules() if name and isinstance(module, nn.Embedding)}
    found: list[str] = []

    def hook(module: nn.Module, args: tuple) -> None:
        given = args[0] if args else None
        if (
            isinstance(given, Tensor)
            and given.shape == inputs.shape
            and (given is inputs or torch.equal(given, inputs))
        ):
            found.append(names[module])

    handles = [module.register_forward_pre_hook(hook) for module in names]
    try:
        with torch.no_grad(), modes_preserved(model):
            forward(model, inputs) if forward is not None else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise ValueError(
            f"No nn.Embedding of {type(model).__name__} is called on the model's input ids "
            f"({len(names)} embedding layer(s): {list(names.values())[:6]}). Name the layer whose output to "
            "attribute to with input_layer='<dotted name>'."
        )
    return found[0]


def layer_output(
    model: nn.Module, layer: str, inputs: Tensor, forward: Callable[[nn.Module, Tensor], object] | None = None
) -> Tensor:
    """The output of ``layer`` when ``model`` runs on ``inputs`` (eval mode, no gradients), detached.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> layer_output(net, "0", torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 4])
    """
    module = get_module(model, layer)
    kept: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, output: kept.append(output.detach()))
    try:
        with torch.no_grad(), modes_preserved(model):
            forward(model, inputs) if forward is not None else model(inputs)
    finally:
        handle.remove()
    if len(kept) != 1 or not isinstance(kept[0], Tensor):
        raise ValueError(f"Layer {layer!r} must return one tensor once per forward pass; it ran {len(kept)} time(s).")
    return kept[0]


class LayerInput(ForwardWith):
    """``model(ids)`` with the output of ``layer`` replaced by the tensor it is called on.

    ``LayerInput(model, layer, ids)(embeddings)`` runs the model on ``ids``
    (repeated to the number of rows of ``embeddings``, copy after copy), and
    where ``layer`` would return its output, returns ``embeddings`` instead: the
    model as a function of that layer's output, for any attribution method.
    Layer names, parameters and modes stay the model's own.

    Args:
        model: the network on ids (or a :class:`ForwardWith` view of it).
        layer: dotted name of the layer whose output is replaced (usually the token embedding).
        ids: the (B, ...) ids of the samples explained.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> view = LayerInput(net, "0", ids)
        >>> embedded = layer_output(net, "0", ids)
        >>> torch.allclose(view(embedded), net(ids)), view(torch.cat([embedded, embedded])).shape
        (True, torch.Size([2, 2]))
    """

    def __init__(self, model: nn.Module, layer: str, ids: Tensor) -> None:
        super().__init__(model, _replaced_forward)
        object.__setattr__(self, "layer", get_module(model, layer))
        object.__setattr__(self, "layer_name", layer)
        object.__setattr__(self, "ids", ids)

    def forward(self, inputs: Tensor) -> object:
        return _replaced_forward(self, inputs)


def _replaced_forward(view: LayerInput, embeddings: Tensor) -> object:
    samples = view.ids.shape[0]
    rows = embeddings.shape[0]
    if rows % samples:
        raise ValueError(
            f"A batch of {rows} embeddings cannot be paired with the ids of {samples} samples: attribution at "
            f"{view.layer_name!r} needs methods that batch whole copies of the samples (the gradient and "
            "modified-backward families)."
        )
    ids = view.ids.repeat(rows // samples, *([1] * (view.ids.ndim - 1)))

    def replace(_module: nn.Module, _args: object, output: object) -> Tensor:
        if not isinstance(output, Tensor) or output.shape != embeddings.shape:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"Layer {view.layer_name!r} returned {shape} for these ids, but the embeddings given have shape "
                f"{tuple(embeddings.shape)}."
            )
        return embeddings.to(output.dtype)

    handle = view.layer.register_forward_hook(replace)
    try:
        model = view.model
        return model(ids)
    finally:
        handle.remove()


def token_scores(
    attributions: Tensor, keep: Tensor | None = None, *, signed: bool = False, sensitivity: bool = False
) -> Tensor:
    """One score per token from (B, T, D) attributions at an embedding.

    Contributions (input × gradient, integrated gradients, DeepLIFT, LRP) are
    summed over D: the token's share of the output change (integrated
    gradients: a sample's scores add up to ``f(x) - f(baseline)``), where
    dimensions that push both ways cancel as they do in the model; shown as
    the magnitude, or ``signed``. Sensitivities (a gradient: how fast the
    score changes along each dimension) have no meaningful sum, so a token
    gets the L2 norm of its vector (never signed).

    Args:
        attributions: (B, T, D) attributions.
        keep: (B, T) bool, False where the score is set to zero (padding).
        signed: keep the sign of a contribution's sum (else its magnitude).
        sensitivity: the attributions are a gradient: take the norm.

    Example:
        >>> a = torch.tensor([[[1.0, -3.0], [3.0, 4.0]]])
        >>> token_scores(a).tolist(), token_scores(a, signed=True).tolist(), token_scores(a, sensitivity=True).tolist()
        ([[2.0, 7.0]], [[-2.0, 7.0]], [[3.1622776985168457, 5.0]])
    """
    values = attributions.detach().float()
    if sensitivity:
        scores = values.norm(dim=-1)
    else:
        scores = values.sum(dim=-1)
        scores = scores if signed else scores.abs()
    return scores if keep is None else scores * keep.to(scores.dtype)
