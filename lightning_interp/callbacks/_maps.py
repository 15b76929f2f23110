"""MapCallback: the shared part of callbacks that log per-sample maps (saliency, Grad-CAM).

A subclass implements :meth:`MapCallback._explain`, which turns the probe set
into named (N, H, W) maps; scores, pictures, evolution strips and their state
live here, the schedule and probe handling in :class:`InterpCallback`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_interp._logging import log_image
from lightning_interp.callbacks._base import InterpCallback, _check_callable
from lightning_interp.methods._core import OutputTransform, modes_preserved, scores_from_output
from lightning_interp.methods.map_metrics import concentration, localization, pointing_game, rank_correlation
from lightning_interp.probe import BatchParser, ProbeSet
from lightning_interp.visualize import input_to_rgb, map_tiles, render_grid

TargetSpec = str | int

HISTORY_SIZE = 64  # longest side of the maps kept for evolution strips
MAX_GRID_ROWS = 32  # probe samples drawn in the per-epoch grid (scores cover all of them)


@dataclass
class Explanation:
    """What one run of a map callback produced on the probe set.

    Attributes:
        maps: name -> (N, H, W) float32 map on the CPU, in display order.
        scores: (N, C) class scores of the probe samples.
        target: (N,) explained class per sample.
        scalars: extra scalars by tag suffix (e.g. IG completeness error).
        signed: names of maps with meaningful sign (shown with a diverging colormap).
        titles: optional display titles of the maps (default: their names).
    """

    maps: dict[str, Tensor]
    scores: Tensor
    target: Tensor
    scalars: dict[str, float] = field(default_factory=dict)
    signed: set[str] = field(default_factory=set)
    titles: dict[str, str] = field(default_factory=dict)


class MapCallback(InterpCallback):
    """Base class of callbacks that log per-sample maps of a fixed probe set.

    Args:
        name: tag prefix (``interp/<name>/...``) and part of the checkpoint
            ``state_key``; give two instances different names.
        num_samples: probe samples to draw when ``probe`` is None.
        every_n_epochs: run at validation epochs whose number (1-based) is a
            multiple of this.
        target: ``"pred"`` (predicted class), ``"label"`` (needs labels) or a
            fixed class index.
        probe: a ready :class:`ProbeSet` (share one between callbacks so
            their rows line up), or None to draw one from the first
            validation dataloader.
        batch_parser: turns a batch of an unusual form into
            ``(inputs, labels, masks)``; see :func:`~lightning_interp.probe.parse_batch`.
        output_transform: picks the (B, C) class scores out of the model's
            output when it is not a plain tensor.
        class_names: names to show instead of class indices.
        cmap: matplotlib colormap of the heatmaps.
        evolution_samples: rows of the evolution strip logged at fit end (0 to skip).
        evolution_columns: about how many epochs the strip shows (evenly spaced).
    """

    def __init__(
        self,
        *,
        name: str,
        num_samples: int = 8,
        every_n_epochs: int = 1,
        target: TargetSpec = "pred",
        probe: ProbeSet | None = None,
        batch_parser: BatchParser | None = None,
        output_transform: OutputTransform | None = None,
        class_names: Sequence[str] | None = None,
        cmap: str = "inferno",
        evolution_samples: int = 4,
        evolution_columns: int = 10,
    ) -> None:
        if not (target in ("pred", "label") or (isinstance(target, int) and not isinstance(target, bool))):
            raise ValueError(f"target must be 'pred', 'label' or a class index (int), got {target!r}.")
        if isinstance(target, int) and target < 0:
            raise ValueError(f"A fixed target class must be >= 0, got {target}.")
        self.target = target
        super().__init__(
            name=name, num_samples=num_samples, every_n_epochs=every_n_epochs, probe=probe, batch_parser=batch_parser
        )
        if not isinstance(evolution_columns, int) or evolution_columns < 1:
            raise ValueError(f"evolution_columns must be a positive int, got {evolution_columns!r}.")
        if not isinstance(evolution_samples, int) or evolution_samples < 0:
            raise ValueError(f"evolution_samples must be an int >= 0, got {evolution_samples!r}.")
        _check_callable("output_transform", output_transform)
        if cmap not in matplotlib.colormaps:
            raise ValueError(f"Unknown matplotlib colormap {cmap!r}; try 'inferno', 'viridis', 'jet' or 'turbo'.")
        self.output_transform = output_transform
        self.class_names = list(class_names) if class_names is not None else None
        self.cmap = cmap
        self.evolution_samples = evolution_samples
        self.evolution_columns = evolution_columns
        self._previous: dict[str, Tensor] = {}
        self._history: list[tuple[int, dict[str, Tensor]]] = []

    def _explain(self, pl_module: pl.LightningModule, inputs: Tensor, target: Tensor | int | None) -> Explanation:
        raise NotImplementedError

    def _prepare(self, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """Check now, not at the first validation epoch, that the model's output gives class scores."""
        with modes_preserved(pl_module), torch.inference_mode(False), torch.no_grad():
            scores = scores_from_output(pl_module(self._example_input(pl_module, probe)), self.output_transform)
        if isinstance(self.target, int) and self.target >= scores.shape[1]:
            raise ValueError(f"target={self.target} is not a class index of this model ({scores.shape[1]} classes).")

    def _needs_labels(self) -> bool:
        return self.target == "label"

    def _labels_reason(self) -> str:
        return f"{type(self).__name__}(target='label') needs labels (use target='pred' otherwise)"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if trainer.is_global_zero and self._history and self.evolution_samples > 0 and self.probe is not None:
            for key in self._history[-1][1]:
                image = self._evolution_image(key)
                if image is not None:
                    log_image(trainer, f"interp/{self.name}/{key}/evolution", image, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(previous=dict(self._previous), history=list(self._history))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._previous = dict(state_dict.get("previous", {}))
        self._history = list(state_dict.get("history", []))

    def _target_for(self, probe: ProbeSet, device: torch.device) -> Tensor | int | None:
        if self.target == "pred":
            return None
        if self.target == "label":
            if probe.labels is None:
                raise ValueError(f"{type(self).__name__}(target='label') needs a probe set with labels.")
            return probe.labels.to(device)
        return int(self.target)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        probe = self.probe
        assert probe is not None
        inputs = self._probe_inputs(trainer, pl_module)
        with self._model_context(trainer):
            result = self._explain(pl_module, inputs, self._target_for(probe, inputs.device))
        broken = [key for key, maps in result.maps.items() if not torch.isfinite(maps).all()]
        if broken:
            rank_zero_warn(
                f"{type(self).__name__}: the maps of {broken} hold NaN or inf at epoch {trainer.current_epoch} "
                "(non-finite activations or gradients in the model); their scores are logged as NaN."
            )
        step = trainer.global_step
        scalars = self._scores(result, probe)
        scalars.update({f"interp/{self.name}/{k}": v for k, v in result.scalars.items()})
        log_image(trainer, f"interp/{self.name}/maps", self._grid_image(result, probe), step)
        self._remember(trainer.current_epoch, result.maps)
        return scalars

    def _scores(self, result: Explanation, probe: ProbeSet) -> dict[str, float]:
        scalars: dict[str, float] = {}
        for key, maps in result.maps.items():
            prefix = f"interp/{self.name}/{key}"
            positive = maps.clamp_min(0) if key in result.signed else maps
            scalars[f"{prefix}/concentration"] = _nanmean(concentration(positive))
            if key in self._previous and self._previous[key].shape == maps.shape:
                scalars[f"{prefix}/stability"] = _nanmean(rank_correlation(maps, self._previous[key]))
            if probe.masks is not None and tuple(probe.masks.shape[-2:]) == tuple(maps.shape[-2:]):
                scalars[f"{prefix}/localization"] = _nanmean(localization(positive, probe.masks))
                scalars[f"{prefix}/pointing_game"] = _nanmean(pointing_game(positive, probe.masks))
            self._previous[key] = maps.clone()
        return scalars

    def _row_label(self, index: int, label: int | None, pred: int, confidence: float, target: int) -> str:
        def show(c: int) -> str:
            return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else str(c)

        lines = [f"#{index}"]
        if label is not None:
            lines.append(f"label {show(label)}")
        lines.append(f"pred  {show(pred)} {confidence:.0%}")
        if target != pred:
            lines.append(f"shows {show(target)}")
        return "\n".join(lines)

    def _grid_image(self, result: Explanation, probe: ProbeSet) -> np.ndarray:
        probabilities = result.scores.float().softmax(dim=1).cpu()
        confidence, predicted = probabilities.max(dim=1)
        shown = min(len(probe), MAX_GRID_ROWS)  # scores use every sample; the picture stays readable and small
        inputs = probe.inputs[:shown]
        columns = [list(input_to_rgb(inputs))]
        for key, maps in result.maps.items():
            cmap = self._cmap_for(key, result)
            columns.append(map_tiles(inputs, maps[:shown], cmap=cmap, signed=key in result.signed))
        rows = [[column[i] for column in columns] for i in range(shown)]
        labels = [
            self._row_label(
                i,
                None if probe.labels is None else int(probe.labels[i]),
                int(predicted[i]),
                float(confidence[i]),
                int(result.target[i]),
            )
            for i in range(shown)
        ]
        titles = [result.titles.get(key, key) for key in result.maps]
        return render_grid(rows, column_titles=["input", *titles], row_labels=labels)

    def _cmap_for(self, key: str, result: Explanation) -> str:
        return "RdBu_r" if key in result.signed else self.cmap

    def _remember(self, epoch: int, maps: dict[str, Tensor]) -> None:
        """Keep a small copy of the first samples' maps for the evolution strip, bounded in length."""
        if self.evolution_samples == 0:
            return
        picks = self._evolution_indices()
        kept = {key: _shrink(m[picks]) for key, m in maps.items()}
        self._history.append((epoch, kept))
        if len(self._history) > 2 * self.evolution_columns:
            thinned = self._history[::2]
            if thinned[-1] is not self._history[-1]:
                thinned.append(self._history[-1])
            self._history = thinned

    def _evolution_indices(self) -> Tensor:
        """Probe rows shown in the evolution strip: evenly spread, so each class tends to appear."""
        assert self.probe is not None
        count = min(self.evolution_samples, len(self.probe))
        return torch.from_numpy(np.linspace(0, len(self.probe) - 1, count).round().astype(np.int64))

    def _evolution_image(self, key: str) -> np.ndarray | None:
        assert self.probe is not None
        entries = [(epoch, maps[key]) for epoch, maps in self._history if key in maps]
        if not entries:
            return None
        spaced = np.linspace(0, len(entries) - 1, min(len(entries), self.evolution_columns))
        chosen = [entries[i] for i in sorted({round(i) for i in spaced})]
        rows = self._evolution_indices()
        count = len(rows)
        inputs = self.probe.inputs[rows]
        size = tuple(chosen[-1][1].shape[-2:])
        small_inputs = _resize_inputs(inputs, size)
        columns = [list(input_to_rgb(small_inputs))]
        columns += [map_tiles(small_inputs, maps.float(), cmap=self.cmap) for _, maps in chosen]
        tiles = [[column[i] for column in columns] for i in range(count)]
        titles = ["input"] + [f"epoch {epoch}" for epoch, _ in chosen]
        return render_grid(tiles, column_titles=titles, title=f"{self.name}: {key}")


def _resize_inputs(inputs: Tensor, size: tuple[int, ...]) -> Tensor:
    if inputs.ndim != 4 or tuple(inputs.shape[-2:]) == size:
        return inputs
    return torch.nn.functional.interpolate(inputs.float(), size=size, mode="bilinear", align_corners=False)


def _shrink(maps: Tensor) -> Tensor:
    """A float16 copy at most HISTORY_SIZE pixels on its longest side."""
    maps = maps.detach().float().cpu()
    if maps.ndim == 3 and max(maps.shape[-2:]) > HISTORY_SIZE:
        scale = HISTORY_SIZE / max(maps.shape[-2:])
        size = (max(1, round(maps.shape[-2] * scale)), max(1, round(maps.shape[-1] * scale)))
        maps = torch.nn.functional.interpolate(maps[:, None], size=size, mode="area")[:, 0]
    return maps.half().clone()


def _nanmean(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else float("nan")
