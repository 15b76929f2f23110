"""Models called as their data loaders feed them: the explained tensor together with the sample's other inputs.

A HuggingFace model is called as ``model(input_ids=ids, attention_mask=mask, token_type_ids=types)``; the
methods explain one tensor (the ids, or the pixels) and call the model on batches of *copies* of the samples
(SmoothGrad's noisy copies, integrated gradients' path points, perturbed copies), copy after copy: row ``r`` of
such a batch is a copy of sample ``r % B``. :class:`BoundInputs` is the model called that way, with each copy
given its sample's other inputs, so no method needs to know about them; :func:`keyword_inputs` says, from a
forward's signature, which of a batch's keys it takes, as HuggingFace's own ``Trainer`` decides which columns to
pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.methods.model.core import ForwardWith, logits_of

__all__ = ["BoundInputs", "for_rows", "keyword_inputs", "next_token_scores", "real_tokens"]


def keyword_inputs(forward: Callable[..., Any], keys: Iterable[str], *, skip: int = 0) -> tuple[str, ...]:
    """The ``keys`` that ``forward`` takes as keyword arguments: its named parameters, or every key when it takes
    only ``**kwargs`` (a module that passes a batch on whole); a named parameter list with ``**kwargs`` as well (a
    HuggingFace model's forward) takes its named parameters only.

    Args:
        forward: a callable (a module's ``forward``, or a ``forward_fn``).
        keys: the names on offer (a batch's keys).
        skip: leading positional parameters that are not on offer (``forward_fn(model, inputs, ...)``: 2).

    Example:
        >>> def forward(input_ids, attention_mask=None, **kwargs): ...
        >>> keyword_inputs(forward, ["attention_mask", "idx"])
        ('attention_mask',)
        >>> keyword_inputs(lambda **batch: None, ["attention_mask", "idx"])
        ('attention_mask', 'idx')
    """
    try:
        parameters = list(inspect.signature(forward).parameters.values())[skip:]
    except (TypeError, ValueError):  # a builtin without a signature: nothing by name
        return ()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters)
    if open_ended and not named:
        return tuple(keys)
    return tuple(key for key in keys if key in named)


class BoundInputs(ForwardWith):
    """``model`` called on a batch of copies of some samples, each copy with its sample's other inputs.

    ``BoundInputs(model, extras, input_key="input_ids")(x)`` calls
    ``model(input_ids=x, **extras)``, where ``extras`` holds (B, ...) tensors of
    the B samples explained (``attention_mask``, ``token_type_ids``, ...) and
    ``x`` has M = k * B rows, copies of the samples copy after copy (the
    methods' convention), so each extra is repeated k times. A batch whose rows
    are not whole copies of the B samples is refused, never paired with the
    wrong rows. Layer names, parameters and modes stay the model's own.

    Args:
        model: the network.
        extras: the samples' other inputs, by keyword, each (B, ...) on the model's device.
        input_key: the keyword of the explained tensor; None passes it positionally.
        forward_fn: call ``forward_fn(model, x, **extras)`` instead (a user's own way to call the model).
        next_token: the model is a causal language model whose output (its ``logits``) scores the next token at
            every position, (M, T, V): return each row's scores at its last real token (the last 1 of its
            ``attention_mask``, else position T - 1), (M, V): the prediction of the token after the text.

    Example:
        >>> class Masked(nn.Module):
        ...     def forward(self, input_ids, attention_mask):
        ...         return (input_ids * attention_mask).float().sum(dim=1, keepdim=True)
        >>> ids, mask = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [1, 1]])
        >>> bound = BoundInputs(Masked(), {"attention_mask": mask}, input_key="input_ids")
        >>> bound(torch.cat([ids, ids])).flatten().tolist()  # two copies of the two samples
        [1.0, 7.0, 1.0, 7.0]
    """

    def __init__(
        self,
        model: nn.Module,
        extras: Mapping[str, Tensor],
        *,
        input_key: str | None = None,
        forward_fn: Callable[..., Any] | None = None,
        next_token: bool = False,
    ) -> None:
        super().__init__(model, _bound_forward)
        counts = {name: value.shape[0] for name, value in extras.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"The extra inputs must have one row per sample each; their rows: {counts}.")
        object.__setattr__(self, "extras", dict(extras))
        object.__setattr__(self, "input_key", input_key)
        object.__setattr__(self, "call", forward_fn)
        object.__setattr__(self, "samples", next(iter(counts.values()), None))
        object.__setattr__(self, "next_token", next_token)

    def forward(self, inputs: Tensor) -> object:
        return _bound_forward(self, inputs)

    def rows(self, index: slice | Tensor) -> BoundInputs:
        """The same call for a subset of the samples (``index`` into the B rows: a slice or indices)."""
        extras = {name: value[index] for name, value in self.extras.items()}
        return BoundInputs(
            self.model, extras, input_key=self.input_key, forward_fn=self.call, next_token=self.next_token
        )


def for_rows(model: nn.Module, rows: slice | Tensor) -> nn.Module:
    """``model`` for the samples at ``rows`` of a batch: a :class:`BoundInputs` view re-bound to those samples'
    other inputs, any other model as it is. Functions that run a batch in chunks call each chunk's rows this way.

    Example:
        >>> bound = BoundInputs(nn.Identity(), {"mask": torch.arange(4)})
        >>> for_rows(bound, slice(1, 3)).extras["mask"].tolist()
        [1, 2]
    """
    if isinstance(model, BoundInputs) and model.samples is not None:
        return model.rows(rows)
    return model


def _bound_forward(view: BoundInputs, inputs: Tensor) -> object:
    extras = view.extras
    samples = view.samples
    if samples is not None and inputs.shape[0] != samples:
        if inputs.shape[0] % samples:
            raise ValueError(
                f"A batch of {inputs.shape[0]} rows cannot be paired with the other model inputs "
                f"({', '.join(extras)}) of {samples} samples: the rows must be whole copies of the samples, copy "
                "after copy."
            )
        times = inputs.shape[0] // samples
        extras = {name: value.repeat(times, *([1] * (value.ndim - 1))) for name, value in extras.items()}
    if view.call is not None:
        output = view.call(view.model, inputs, **extras)
    elif view.input_key is not None:
        output = view.model(**{view.input_key: inputs}, **extras)
    else:
        output = view.model(inputs, **extras)
    return next_token_scores(output, extras.get("attention_mask")) if view.next_token else output


def next_token_scores(output: object, attention_mask: Tensor | None = None) -> Tensor:
    """A causal language model's scores of the token after each text: its (B, T, V) logits (or ``output.logits``)
    at each row's last real token, (B, V).

    Args:
        output: the model's output: (B, T, V) logits, or an object with them as ``logits``.
        attention_mask: optional (B, T), 1 at the real tokens (padding on either side); None: the last position.

    Example:
        >>> logits = torch.arange(12.0).reshape(1, 3, 4)  # three positions, four tokens
        >>> next_token_scores(logits, torch.tensor([[1, 1, 0]])).tolist()  # the last real token is the second
        [[4.0, 5.0, 6.0, 7.0]]
    """
    logits = logits_of(output)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Next-token scores need (batch, tokens, vocabulary) logits, got {shape}.")
    rows = torch.arange(logits.shape[0], device=logits.device)
    if attention_mask is None:
        return logits[:, -1]
    positions = torch.arange(logits.shape[1], device=logits.device)
    last = torch.where(attention_mask.to(logits.device) != 0, positions, -1).amax(dim=1).clamp_min(0)
    return logits[rows, last]


def real_tokens(ids: Tensor, attention_mask: Tensor | None = None, pad_id: int | None = None) -> Tensor | None:
    """(B, T) bool, True at the tokens that are not padding: the attention mask where there is one, else the ids
    that are not ``pad_id``; None when neither says (every token is real).

    Example:
        >>> real_tokens(torch.tensor([[5, 6, 0]]), pad_id=0).tolist()
        [[True, True, False]]
    """
    if attention_mask is not None:
        return attention_mask.reshape(ids.shape) != 0
    if pad_id is not None:
        return ids != pad_id
    return None
