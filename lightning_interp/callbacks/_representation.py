"""RepresentationCallback: the shared part of callbacks that read layer outputs on the probe set."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from torch import Tensor

from lightning_interp.callbacks._base import InterpCallback, parse_layer_names
from lightning_interp.methods._core import get_module
from lightning_interp.methods.features import auto_layers, capture_features
from lightning_interp.probe import BatchParser, ProbeSet


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
        num_samples, every_n_epochs, probe, batch_parser, background_drawing: see :class:`InterpCallback`.
    """

    def __init__(
        self,
        *,
        name: str,
        layers: str | Sequence[str] = "auto",
        max_layers: int = 6,
        max_features: int = 4096,
        num_samples: int,
        every_n_epochs: int = 1,
        probe: ProbeSet | None = None,
        batch_parser: BatchParser | None = None,
        background_drawing: bool = True,
    ) -> None:
        names = parse_layer_names(layers, "layers")
        for option, value in (("max_layers", max_layers), ("max_features", max_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option} must be a positive int, got {value!r}.")
        super().__init__(
            name=name,
            num_samples=num_samples,
            every_n_epochs=every_n_epochs,
            probe=probe,
            batch_parser=batch_parser,
            background_drawing=background_drawing,
        )
        self.layers: list[str] = names
        self.auto = not names
        self.max_layers = max_layers
        self.max_features = max_features

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        if self.auto:  # chosen again on this fit's model
            self.layers = []

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for name in self.layers if not self.auto else []:
            get_module(pl_module, name)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        if self.auto and not self.layers:
            trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
            self.layers = auto_layers(pl_module, None, max_layers=self.max_layers, trace=trace)

    def _features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Pooled (N, D) float32 features of every layer on the probe set, on the model's device, in its precision."""
        inputs = self._probe_inputs(trainer, pl_module)
        with self._model_context(trainer):
            return capture_features(pl_module, inputs, self.layers, max_features=self.max_features)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["layers"] = list(self.layers)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.auto and state_dict.get("layers"):
            self.layers = list(state_dict["layers"])
