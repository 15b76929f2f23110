"""RepresentationCallback: the shared part of callbacks that read layer outputs on the probe set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_interp.callbacks._base import InterpCallback, parse_layer_names, refuse_unknown_arguments, unwrapped
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.callbacks._context import active_context
from lightning_interp.callbacks._segmentation import derived_image_labels
from lightning_interp.methods import (
    TOKEN_POOLINGS,
    ModelTrace,
    attends_ahead,
    auto_layers,
    capture_features,
    capture_pooled_features,
    forward_chunk_size,
    get_module,
    module_name,
    plain_name,
)
from lightning_interp.options import DataDescription, Display
from lightning_interp.probe import ProbeSet


class RepresentationCallback(InterpCallback):
    """Resolves ``layers`` and captures their pooled outputs on the probe set.

    Args:
        name: tag prefix and checkpoint key.
        layers: ``"auto"`` (see :func:`~lightning_interp.methods.auto_layers`:
            the model's chain of top-level blocks, or up to ``max_layers``
            parameterised layers evenly spaced over depth, always including
            the last) or a list of dotted module names.
        max_layers: how many layers ``"auto"`` picks at most.
        max_features: per-layer feature bound; larger conv maps are average-pooled
            to a coarser grid (see :func:`~lightning_interp.methods.pool_features`).
        token_pooling: how a token layer's (batch, tokens, dim) output becomes one feature row per sample
            (:func:`~lightning_interp.methods.pool_tokens`; padding never counts): ``"cls"`` (the first token),
            ``"mean"`` (over the real tokens), ``"last"`` (the last real token), ``"flatten"`` (every token side
            by side), or ``"auto"``: for token-id inputs ``"last"`` when the model is causal (its layers do not
            look at later tokens, found on one probe sample at fit start) and ``"mean"`` otherwise, said in the
            log; for other inputs (vision transformers' patch tokens) as
            :func:`~lightning_interp.methods.pool_features` pools them.
        num_samples, every_n_epochs, probe, data, display, forward_fn: see
            :class:`InterpCallback`.
    """

    def __init__(
        self,
        *,
        name: str,
        layers: str | Sequence[str] = "auto",
        max_layers: int = 6,
        max_features: int = 4096,
        token_pooling: Literal["auto", "cls", "mean", "last", "flatten"] = "auto",
        num_samples: int,
        every_n_epochs: int = 1,
        probe: ProbeSet | None = None,
        data: DataDescription | None = None,
        display: Display | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
        **unknown: Any,
    ) -> None:
        refuse_unknown_arguments(self, unknown)  # a 0.1 name: what to write instead
        names = parse_layer_names(layers, "layers")
        check_arguments(max_layers=max_layers, max_features=max_features)
        if token_pooling != "auto" and token_pooling not in TOKEN_POOLINGS:
            raise ValueError(f"token_pooling must be 'auto' or one of {TOKEN_POOLINGS}, got {token_pooling!r}.")
        super().__init__(
            name=name,
            num_samples=num_samples,
            every_n_epochs=every_n_epochs,
            probe=probe,
            data=data,
            display=display,
            forward_fn=forward_fn,
        )
        self.layers: list[str] = names
        self.auto = not names
        self.max_layers = max_layers
        self.max_features = max_features
        self.token_pooling = token_pooling
        self._pooling: str | None = None  # the token pooling in force this fit (None: pool_features' own)
        self._chunk = 256  # samples per forward pass; chosen for the model and device at fit start

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        if self.auto:  # chosen again on this fit's model
            self.layers = []

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for name in self.layers if not self.auto else []:
            get_module(pl_module, name)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
        self._chunk = forward_chunk_size(trace, pl_module.device)
        if self.auto and not self.layers:
            chosen = auto_layers(pl_module, None, max_layers=self.max_layers, trace=trace)
            self.layers = [plain_name(name) for name in chosen]  # a compiled network's without '_orig_mod'

        self._pooling = self._token_pooling(pl_module, probe, trace)
        for layer in self.layers:
            name = module_name(pl_module, layer) or layer  # a compiled sub-module's layers run under '_orig_mod'
            if name not in trace.calls:
                raise ValueError(
                    f"{type(self).__name__}: layer {layer!r} does not run in a forward pass of the model on its probe "
                    "inputs, so it has no output to read. Name a module that forward() calls."
                )
            if name not in trace.shapes:
                raise ValueError(
                    f"{type(self).__name__}: layer {layer!r} returns no tensor (an nn.MultiheadAttention returns an "
                    "(output, weights) tuple, for instance), so there is no representation to read. Name a module "
                    "that returns a tensor: the block that contains it, or the layer after it (e.g. its norm)."
                )

    def _accept_probe(self, probe: ProbeSet) -> None:
        """A segmentation set's probe (class maps, no image labels) is labelled with the classes present in each
        image (multi-hot), said once in the log."""
        derived = derived_image_labels(probe, type(self).__name__) if self._needs_labels() else None
        if derived is not None:
            labels, note = derived
            rank_zero_info(note)
            labelled = ProbeSet(
                probe.all_inputs,
                labels,
                probe.masks,
                indices=probe.indices,
                extras=probe.extras,
                input_key=probe.input_key,
                class_maps=probe.class_maps,
            )
            labelled.source = probe.source
            probe = labelled
        super()._accept_probe(probe)

    def _token_pooling(self, pl_module: nn.Module, probe: ProbeSet, trace: ModelTrace) -> str | None:
        """The token pooling in force: the option, or for ``"auto"`` on token ids, ``"last"`` for a causal model
        and ``"mean"`` otherwise (said in the log, once per fit)."""
        if self.token_pooling != "auto":
            return self.token_pooling
        tokens = [
            layer for layer in self.layers if len(trace.shapes.get(module_name(pl_module, layer) or layer, ())) == 3
        ]
        if probe.inputs.ndim != 2 or probe.inputs.is_floating_point() or not tokens:
            return None
        real = probe.real_tokens(self.pad_id)
        counts = (real if real is not None else torch.ones_like(probe.inputs, dtype=torch.bool)).sum(dim=1)
        row = int(counts.argmax())
        if int(counts[row]) < 2:
            return "mean"
        one = probe.take([row])
        device = pl_module.device
        model = self._explained(pl_module, one)
        ids = one.inputs.to(device)
        causal = not attends_ahead(
            model, ids, module_name(pl_module, tokens[-1]) or tokens[-1], None if real is None else real[row : row + 1]
        )
        pooling = "last" if causal else "mean"
        context = (
            "the model is causal: its layers do not look at later tokens, so the last real token has read the text"
            if causal
            else "the model looks at every token"
        )
        rank_zero_info(
            f"{type(self).__name__}: token layers are pooled to one feature row per sample by "
            f"{'the last real token' if causal else 'the mean over the real tokens'} ({context}); padding never "
            "counts. Pass token_pooling='cls', 'mean', 'last' or 'flatten' to choose."
        )
        return pooling

    def _pooling_options(self, probe: ProbeSet) -> dict[str, Any]:
        """The token pooling arguments of the feature capture for ``probe``'s samples."""
        if self._pooling is None:
            return {}
        return {"token_pooling": self._pooling, "real_tokens": probe.real_tokens(self.pad_id)}

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Capture the layers on a few probe samples, as a run would."""
        sample = probe.subset(min(4, len(probe)))
        inputs = self._probe_inputs(trainer, pl_module, sample)
        with self._model_context(trainer):
            capture_features(
                self._explained(pl_module, sample),
                inputs,
                self.layers,
                max_features=self.max_features,
                batch_size=self._chunk,
                **self._pooling_options(sample),
            )

    def _features(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, shared: bool = True
    ) -> dict[str, Tensor]:
        """Pooled (N, D) float32 features of every layer on the probe set, on the model's device, in its precision.

        At a validation epoch, the representation callbacks of the trainer that are due share one forward pass
        over the union of their probe samples (their draws are nested, so the union is the largest set), each
        layer pooled to every callback's ``max_features``; the first one to ask computes for all.
        """
        context = active_context(trainer)
        if not shared or context is None:
            return self._own_features(trainer, pl_module)
        key = (id(unwrapped(pl_module)), id(self.forward_fn), trainer.state.fn, trainer.global_step)
        key += (trainer.current_epoch, trainer.sanity_checking, self._in_window(trainer))
        if key not in context.features:
            peers = [
                callback
                for callback in trainer.callbacks
                if isinstance(callback, RepresentationCallback)
                and callback.forward_fn is self.forward_fn  # called the same way: one forward serves them all
                and callback._call == self._call
                and callback._pooling == self._pooling
                and callback._prepared
                and callback.probe is not None
                and callback._is_due(trainer)
                # in the window rank zero alone computes; in lockstep every rank: one pass cannot serve both
                and callback._in_window(trainer) == self._in_window(trainer)
            ]
            if self not in peers:
                peers = [self]
            context.features.clear()  # only the current validation's features are kept
            context.features[key] = self._capture_for(trainer, pl_module, peers)
        computed = context.features[key]
        if id(self) not in computed:  # not in the group that was computed (e.g. prepared late): on its own
            return self._own_features(trainer, pl_module)
        return computed.pop(id(self))

    def _own_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        inputs = self._probe_inputs(trainer, pl_module)
        assert self.probe is not None
        with self._model_context(trainer):
            return capture_features(
                pl_module,
                inputs,
                self.layers,
                max_features=self.max_features,
                batch_size=self._chunk,
                **self._pooling_options(self.probe),
            )

    def _capture_for(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, peers: list[RepresentationCallback]
    ) -> dict[int, dict[str, Tensor]]:
        """One pass over the union of the peers' probe samples; each peer's layers, bounds and rows."""
        probes = [peer.probe for peer in peers]
        assert all(probe is not None for probe in probes)
        shapes = {_form(p) for p in probes}  # type: ignore[arg-type]
        if len(peers) == 1 or len(shapes) != 1:  # nothing to share (or samples of different forms)
            return {id(peer): peer._own_features(trainer, pl_module) for peer in peers}
        context = active_context(trainer)
        assert context is not None
        union_key = tuple((id(peer), id(peer.probe)) for peer in peers)
        if union_key not in context.unions:
            context.unions[union_key] = _union_of_probes(peers)
        union, rows = context.unions[union_key]
        inputs = self._device_inputs(trainer, pl_module, union.inputs)
        pl_module = self._explained(pl_module, union)
        requests: dict[str, list[int | None]] = {}
        for peer in peers:
            for layer in peer.layers:
                requests.setdefault(layer, [])
                if peer.max_features not in requests[layer]:
                    requests[layer].append(peer.max_features)
        with self._model_context(trainer):
            pooled = capture_pooled_features(
                pl_module,
                inputs,
                requests,
                batch_size=min(p._chunk for p in peers),
                **self._pooling_options(union),
            )
        result: dict[int, dict[str, Tensor]] = {}
        for peer in peers:
            index = rows[id(peer)].to(inputs.device)
            result[id(peer)] = {layer: pooled[(layer, peer.max_features)][index] for layer in peer.layers}
        return result

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["layers"] = list(self.layers)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.auto and state_dict.get("layers"):
            self.layers = list(state_dict["layers"])


def _form(probe: ProbeSet) -> tuple:
    """What must agree for samples of several probe sets to share one forward: their inputs' and other model
    inputs' shapes and dtypes."""
    extras = tuple((name, tuple(value.shape[1:]), value.dtype) for name, value in sorted(probe.extras.items()))
    inputs = tuple((tuple(value.shape[1:]), value.dtype) for value in probe.all_inputs)
    return inputs, probe.input_key, extras


def _union_of_probes(peers: list[RepresentationCallback]) -> tuple[ProbeSet, dict[int, Tensor]]:
    """The distinct samples of the peers' probe sets (a sample drawn by one scan is the same at the same index)
    as one probe set, and each peer's rows in it."""
    position: dict[tuple[int, int], int] = {}
    samples: list[tuple[ProbeSet, int]] = []
    rows: dict[int, Tensor] = {}
    for peer in peers:
        probe = peer.probe
        assert probe is not None
        if probe.source is not None and probe.indices is not None:
            keys = [(id(probe.source), int(index)) for index in probe.indices]
        else:
            keys = [(id(probe), row) for row in range(len(probe))]
        picked = []
        for row, key in enumerate(keys):
            if key not in position:
                position[key] = len(samples)
                samples.append((probe, row))
            picked.append(position[key])
        rows[id(peer)] = torch.tensor(picked, dtype=torch.long)
    first = samples[0][0]
    union = ProbeSet(
        tuple(
            torch.stack([probe.all_inputs[position][row] for probe, row in samples])
            for position in range(len(first.all_inputs))
        ),
        extras={name: torch.stack([probe.extras[name][row] for probe, row in samples]) for name in first.extras},
        input_key=first.input_key,
    )
    return union, rows
