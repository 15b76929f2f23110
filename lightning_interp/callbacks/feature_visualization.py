"""FeatureVisualizationCallback: activation maximisation or DeepDream of chosen units, channels and classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_interp._logging import log_image, logging_step
from lightning_interp.callbacks._base import InterpCallback, class_name
from lightning_interp.callbacks._checks import check_arguments
from lightning_interp.methods import (
    PARAMETERIZATIONS,
    GeneratorCode,
    OutputTransform,
    VisualizationTarget,
    VisualizationTargetSpec,
    deep_dream,
    feature_visualization,
    get_module,
    module_name,
    parse_visualization_target,
    range_tensors,
    scores_from_output,
)
from lightning_interp.probe import ProbeSet
from lightning_interp.visualize import input_to_rgb, render_grid

VALUE_RANGES = ("probe", "probe_std")
_LR = {"optimize": 0.05, "dream": 0.02}

RangeOption = Union[Literal["probe", "probe_std"], tuple[Union[float, Sequence[float]], Union[float, Sequence[float]]]]  # noqa: UP007


@dataclass(frozen=True)
class ImageOptions:
    """How a feature visualisation's image is parameterised, mapped to the model's input range, transformed and
    scaled.

    Args:
        parameterization: ``"fourier"`` (a 1/f-scaled spectrum, as lucent does it) or ``"pixel"`` (plain pixels);
            or a :class:`~lightning_interp.methods.GeneratorCode`: optimise the code of your generator network
            (Nguyen et al. 2016), whose output the model sees as it is. Optimisation from noise only.
        decorrelate: ImageNet colour decorrelation (3-channel inputs only); optimisation from noise with
            ``"fourier"`` or ``"pixel"`` only.
        value_range: how the optimised image in [0, 1] is mapped per channel to what the model sees: ``"probe"``
            (the probe inputs' per-channel min..max), ``"probe_std"`` (mean -/+ sqrt(3) std) or ``(low, high)``,
            each a number or one number per channel. With a ``GeneratorCode``, only how its output is shown (mapped
            back to [0, 1] from this range).
        transforms: random pad / jitter / scale / rotation every step (DeepDream: random jitter); not with a
            ``GeneratorCode`` (its prior takes their place; the option is then not used).
        octaves: DeepDream's number of image sizes (1 for models that take one input size only).
        octave_scale: DeepDream's size ratio between successive octaves (>= 1).

    Example:
        >>> ImageOptions(parameterization="pixel", value_range=(0.0, [1.0, 1.0, 1.0])).value_range
        (0.0, (1.0, 1.0, 1.0))
    """

    parameterization: Literal["fourier", "pixel"] | GeneratorCode = "fourier"
    decorrelate: bool = True
    value_range: RangeOption = "probe"
    transforms: bool = True
    octaves: int = 3
    octave_scale: float = 1.4

    def __post_init__(self) -> None:
        if not isinstance(self.parameterization, GeneratorCode) and self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"ImageOptions(parameterization=...) must be one of {PARAMETERIZATIONS} ('fourier': a decorrelated "
                f"spectrum, as lucent; 'pixel': plain pixels) or a GeneratorCode (a generator network's code), got "
                f"{self.parameterization!r}."
            )
        for option in ("decorrelate", "transforms"):
            if not isinstance(getattr(self, option), bool):
                raise TypeError(f"ImageOptions({option}=...) must be True or False, got {getattr(self, option)!r}.")
        value_range = self.value_range
        if isinstance(value_range, str):
            if value_range not in VALUE_RANGES:
                raise ValueError(
                    f"ImageOptions(value_range=...) must be one of {VALUE_RANGES} or (low, high), got {value_range!r}: "
                    "'probe' maps images to the probe inputs' per-channel min..max, 'probe_std' to mean -/+ sqrt(3) "
                    "std."
                )
        elif not (isinstance(value_range, (tuple, list)) and len(value_range) == 2) or not all(
            _numbers(bound) for bound in value_range
        ):
            raise ValueError(
                "ImageOptions(value_range=...) must be 'probe', 'probe_std' or a (low, high) pair, each a number or "
                f"one number per channel, e.g. (0.0, 1.0) or ([-2.1, -2.0, -1.8], [2.2, 2.4, 2.6]); got "
                f"{value_range!r}."
            )
        else:  # lists (from YAML) as tuples: the options stay immutable and hashable
            pair = tuple(bound if isinstance(bound, (int, float, Tensor)) else tuple(bound) for bound in value_range)
            object.__setattr__(self, "value_range", pair)
        octaves = self.octaves
        if not isinstance(octaves, int) or isinstance(octaves, bool) or octaves < 1:
            raise ValueError(
                f"ImageOptions(octaves=...) must be a positive int (DeepDream's image sizes; 1 for models that take "
                f"one input size only), got {octaves!r}."
            )
        scale = self.octave_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 1.0 <= scale < float("inf"):
            raise ValueError(
                f"ImageOptions(octave_scale=...) is DeepDream's size ratio between octaves: a finite number >= 1 "
                f"(default 1.4), got {scale!r}."
            )


class FeatureVisualizationCallback(InterpCallback):
    """Log what chosen units, channels, layers or classes respond to, as images optimised for them.

    ``mode="optimize"`` (default): activation maximisation (Olah et al. 2017, as
    lucent does it) from noise, by :func:`~lightning_interp.methods.feature_visualization`:
    Adam on a decorrelated Fourier image (1/f-scaled spectrum, ImageNet colour
    decorrelation for 3 channels, none for 1), random pad / jitter / scale /
    rotation every step, ``num_images`` images per target from different
    noise. ``mode="dream"``: DeepDream on the first ``num_images`` probe
    samples, by :func:`~lightning_interp.methods.deep_dream`
    (``image.octaves`` sizes; the model must accept smaller inputs, else pass
    ``image=ImageOptions(octaves=1)``). How the image is parameterised, mapped,
    transformed and scaled is set by ``image=ImageOptions(...)``.

    Every run starts from the callback's own ``torch.Generator`` seeded with
    ``seed``: successive epochs start from the same noise and use the same
    transform draws, so their images are comparable, and the global RNG is never
    touched. The model runs in eval mode (every module's flag restored), in the
    trainer's precision context, on its device; gradients are taken with
    respect to the image only (``param.grad`` and BatchNorm statistics stay
    untouched).

    Value range: the optimised image lies in [0, 1] and is mapped per channel
    to ``low + (high - low) * image`` before the model sees it. By default
    (``ImageOptions(value_range="probe")``) ``low`` / ``high`` are the probe inputs'
    per-channel minimum and maximum: the identity for [0, 1] pixels, and for
    mean/std-normalised data exactly the normalised image of [0, 1] pixels
    (what lucent does with ImageNet's statistics), so the model sees inputs in
    its usual range. ``"probe_std"`` uses ``mean -/+ sqrt(3) std`` per channel
    (a uniform image then has the probe's mean and std), and ``(low, high)``
    gives them explicitly. The probe set is needed only for the input shape
    and these statistics (and DeepDream's starting images); no labels.

    Code space (Nguyen et al. 2016): ``image=ImageOptions(parameterization=GeneratorCode(G, code_shape, l2=...,
    clip=...))`` optimises a code ``z`` of your generator network ``G`` instead of an image, maximising the
    objective minus ``l2 * |z|^2``: the model sees ``G(z)`` as it is (``G`` returns (B, C, H, W) images in the
    model's input space), the value range only maps it back to [0, 1] for the picture, and no random transforms
    are applied. ``G`` is not part of the LightningModule: the callback holds it, moves it to the model's device
    at fit start (``G.to(pl_module.device)``, in place) and never changes it (eval mode inside, no gradient to
    its parameters, every flag restored); it is not saved in checkpoints, so pass it again when resuming.

    Logged under ``interp_<name>/`` at due validation epochs (every
    ``every_n_epochs``-th, default 5):

    - ``features`` (``dream`` in DeepDream mode): one grid, rows = targets,
      columns = the ``num_images`` images (DeepDream adds a first row of the
      probe samples), each row titled with its target and objective;
    - ``<target>/objective``: the objective reached, averaged over the
      ``num_images`` images (e.g. ``interp_featvis/class:2/objective``, or
      ``interp_featvis/class:disc/objective`` with ``class_names``).

    Cost per run: ``steps`` forward + backward passes of a batch of
    ``len(targets) * num_images`` images at the probe's size (DeepDream:
    ``steps`` passes of ``num_images`` images per target, over the octaves,
    and two more forwards per target), plus a final forward. On the quickstart
    model (4 classes, 32 x 32) at the defaults this is about 0.3 s on two CPU
    cores, every 5th epoch (BENCHMARKS.md, "Inside the network").

    The images of a batch are independent only if the model treats samples
    independently in eval mode: a ``BatchNorm`` with
    ``track_running_stats=False`` (batch statistics at eval too) mixes them, so
    a target's images then also depend on the other targets'; visualise one
    target per callback there.

    A target that gets no gradient at any step (a dead unit: 0 after a ReLU on
    every image tried) is warned about: its images would be the starting noise.

    Args:
        targets: ``"classes"`` (every output logit, at most ``max_classes``;
            the default), or a list of targets: ``"layer:channel"`` (the mean
            of one channel of a module's output, e.g. ``"net.3:5"``),
            ``"layer:channel:y:x"`` (one unit), ``"layer"`` (the layer's mean
            squared activation, the DeepDream objective) and ``("class", k)``
            or ``"class:k"`` (output logit ``k``).
        mode: ``"optimize"`` (from noise) or ``"dream"`` (DeepDream on probe samples).
        steps: gradient steps per run (the cost budget; DeepDream splits them over the octaves).
        lr: step size (default 0.05, Adam on the Fourier parameters; 0.02 of
            the value range per normalised step for DeepDream).
        num_images: images per target (columns): different starting noise, or
            different probe samples for DeepDream.
        image: how the image is parameterised, mapped to the input range, transformed and scaled
            (:class:`ImageOptions`: ``parameterization="fourier"``, ``decorrelate=True``, ``value_range="probe"``,
            ``transforms=True``, ``octaves=3``, ``octave_scale=1.4``); None for the defaults.
        seed: seed of the callback's generator, used afresh at every run.
        max_classes: most classes ``"classes"`` takes (the first ones).
        output_transform: picks the (B, K) logits out of the model's output (class targets).
        name: tag prefix; distinct names let two instances coexist.
        num_samples: probe samples (for the value range; DeepDream uses the first ``num_images``).
        every_n_epochs: run at every n-th validation epoch (default 5).
        **kwargs: ``probe``, ``data`` (its ``class_names`` are shown for class targets instead of ``class:k``, and
            name them in the tags: ``class:<name>/objective``), ``display`` (at fit end,
            ``interp_<name>/evolution`` shows the first image of every target at up to
            ``Display(evolution_columns=10)`` runs spread over training; 0: no strip),
            ``forward_fn`` (see :class:`~lightning_interp.callbacks.InterpCallback`).

    Example:
        >>> callback = FeatureVisualizationCallback(
        ...     targets=["net.3:5", ("class", 2)], steps=64, image=ImageOptions(parameterization="pixel")
        ... )
        >>> [target.label for target in callback.targets], callback.image.parameterization
        (['net.3:5', 'class:2'], 'pixel')
    """

    display_fields = ("background_drawing", "evolution_columns")

    sharded_support = True  # runs in lockstep under FSDP2 (see _sharding.py)

    def __init__(
        self,
        targets: str | Sequence[VisualizationTargetSpec] = "classes",
        *,
        mode: Literal["optimize", "dream"] = "optimize",
        steps: int = 128,
        lr: float | None = None,
        num_images: int = 1,
        image: ImageOptions | None = None,
        seed: int = 0,
        max_classes: int = 10,
        output_transform: OutputTransform | None = None,
        name: str = "featvis",
        num_samples: int = 32,
        every_n_epochs: int = 5,
        **kwargs: Any,
    ) -> None:
        check_arguments(mode=mode, steps=steps, num_images=num_images, max_classes=max_classes)
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 (or None for the mode's default), got {lr!r}.")
        if image is not None and not isinstance(image, ImageOptions):
            raise TypeError(
                f"image must be an ImageOptions or None, got {type(image).__name__}: write "
                "image=ImageOptions(value_range=(0.0, 1.0))."
            )
        if image is not None and isinstance(image.parameterization, GeneratorCode) and mode == "dream":
            raise ValueError(
                "FeatureVisualizationCallback(mode='dream') changes probe images, it has no code to optimise: use "
                "mode='optimize' with image=ImageOptions(parameterization=GeneratorCode(...))."
            )
        check_arguments(output_transform=output_transform, seed=seed)
        self.auto = isinstance(targets, str) and targets == "classes"
        parsed: list[VisualizationTarget] = []
        if not self.auto:
            specs = [targets] if isinstance(targets, str) else list(targets)
            if specs and len(specs) == 2 and specs[0] == "class" and isinstance(targets, tuple):
                specs = [targets]  # one ("class", k) tuple
            if not specs:
                raise ValueError("targets is empty: give 'classes' or a list of targets such as ['net.3:5'].")
            parsed = [parse_visualization_target(spec) for spec in specs]  # type: ignore[arg-type]
            labels = [target.label for target in parsed]
            if len(set(labels)) != len(labels):
                raise ValueError(f"targets lists a target twice: {labels}.")
        super().__init__(name=name, num_samples=num_samples, every_n_epochs=every_n_epochs, **kwargs)
        self.targets: list[VisualizationTarget] = parsed
        self.mode = mode
        self.steps = steps
        self.lr = _LR[mode] if lr is None else float(lr)
        self.num_images = num_images
        self.image = image if image is not None else ImageOptions()
        self.seed = seed
        self.max_classes = max_classes
        self.output_transform = output_transform
        self._range: tuple[Tensor, Tensor] | None = None
        self._history: list[tuple[int, Tensor]] = []  # (epoch, (T, C, H, W) first image per target), bounded

    # ------------------------------------------------------------------ checks
    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self._history = []
        if self.auto:  # chosen again on this fit's model
            self.targets = []

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        for target in self.targets:
            if target.layer is None:
                continue
            try:
                get_module(pl_module, target.layer)
            except ValueError as error:
                raise ValueError(f"FeatureVisualizationCallback target {target.label!r}: {error}") from None

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        inputs = probe.inputs
        if inputs.ndim != 4 or not inputs.is_floating_point():
            raise ValueError(
                "FeatureVisualizationCallback optimises images: it needs (B, C, H, W) floating-point inputs, but the "
                f"probe inputs have shape {tuple(inputs.shape)} and dtype {inputs.dtype}."
            )
        trace = self._trace(trainer, pl_module, self._example_input(pl_module, probe))
        classes = None
        if self.auto or any(target.kind == "class" for target in self.targets):
            try:
                classes = scores_from_output(trace.output, self.output_transform).shape[1]
            except (TypeError, ValueError) as error:
                raise ValueError(f"FeatureVisualizationCallback: class targets need class scores. {error}") from None
        if self.auto and not self.targets:
            assert classes is not None
            self.targets = [VisualizationTarget("class", index=k) for k in range(min(classes, self.max_classes))]
        for target in self.targets:
            self._check_target(pl_module, target, trace.calls, trace.shapes, classes)
        self._range = self._value_range(inputs)
        if self._code is not None:  # not part of the LightningModule: moved to its device here, at fit start
            self._code.generator.to(pl_module.device)

    def _check_target(
        self,
        pl_module: nn.Module,
        target: VisualizationTarget,
        calls: dict[str, int],
        shapes: dict[str, tuple[int, ...]],
        classes: int | None,
    ) -> None:
        where = f"FeatureVisualizationCallback target {target.label!r}"
        if target.kind == "class":
            assert classes is not None and target.index is not None
            if target.index >= classes:
                raise ValueError(
                    f"{where}: class index {target.index} is out of range, the model has {classes} outputs (classes "
                    f"0 to {classes - 1})."
                )
            return
        name = module_name(pl_module, str(target.layer)) or str(target.layer)
        if name not in calls:
            raise ValueError(f"{where}: the layer does not run in the model's forward pass; name a module it calls.")
        if name not in shapes:
            raise ValueError(f"{where}: the layer returns no tensor; name a module whose output is a tensor.")
        shape = shapes[name]
        if target.kind == "layer":
            return
        assert target.index is not None
        if len(shape) < 2 or target.index >= shape[1]:
            channels = shape[1] if len(shape) >= 2 else 0
            raise ValueError(
                f"{where}: channel {target.index} is out of range, the layer's output has shape {shape} "
                f"({channels} channels along dimension 1, so channels 0 to {channels - 1})."
            )
        if target.kind == "unit":
            assert target.y is not None and target.x is not None
            if len(shape) != 4 or target.y >= shape[2] or target.x >= shape[3]:
                raise ValueError(
                    f"{where}: a unit 'layer:channel:y:x' needs a (B, C, H, W) output with y < H and x < W; the "
                    f"layer's output has shape {shape}."
                )

    def _value_range(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        channels, shape, value_range = inputs.shape[1], tuple(inputs.shape), self.image.value_range
        if not isinstance(value_range, str):
            try:
                low, high = range_tensors(value_range, channels, torch.device("cpu"))  # type: ignore[arg-type]
            except ValueError as error:
                raise ValueError(f"FeatureVisualizationCallback: {error} (the probe inputs' shape: {shape}).") from None
            return low.reshape(-1), high.reshape(-1)
        x = inputs.detach().float()
        if value_range == "probe":
            low, high = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
        else:
            mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
            low, high = mean - 3**0.5 * std, mean + 3**0.5 * std
        flat = (high == low).nonzero().flatten().tolist()
        if flat:
            raise ValueError(
                f"FeatureVisualizationCallback: the probe inputs are constant in channel(s) {flat}, so "
                f"value_range={value_range!r} is empty there and those channels could not change. Pass "
                "image=ImageOptions(value_range=(low, high)) with the range your model's inputs take."
            )
        return low, high

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> None:
        """A two-step computation (one step per octave for DeepDream) on every target, logging nothing."""
        generator = torch.Generator().manual_seed(self.seed)  # a throwaway: the runs' own draws stay the same
        steps = 2 if self.mode == "optimize" else self.image.octaves
        self._compute(trainer, pl_module, probe, steps=steps, images=1, generator=generator)

    # ------------------------------------------------------------------ the run
    def _compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        probe: ProbeSet,
        *,
        steps: int,
        images: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(T, N, C, H, W) display images in [0, 1], (T, N) objectives, and the probe samples shown (DeepDream)."""
        assert self._range is not None
        low, high = self._range
        if self.mode == "optimize":
            # image j of every target with the other model inputs of probe sample j (a model of several inputs)
            bound = self._explained(pl_module, probe.subset(min(images, len(probe))))
            with self._model_context(trainer):
                result = feature_visualization(
                    bound,
                    self.targets,
                    image_shape=tuple(probe.inputs.shape[1:]),
                    steps=steps,
                    lr=self.lr,
                    generator=generator,
                    num_images=images,
                    value_range=(low, high),
                    parameterization=self.image.parameterization,
                    decorrelate=self.image.decorrelate,
                    transforms=None if self._code is not None else self.image.transforms,
                    output_transform=self.output_transform,
                )
            return result.rgb, result.objectives, None
        count = min(images, len(probe))
        start = self._probe_inputs(trainer, pl_module, probe.subset(count))
        pl_module = self._explained(pl_module, probe.subset(count))
        dreams, objectives = [], []
        for target in self.targets:
            with self._model_context(trainer):
                dream = deep_dream(
                    pl_module,
                    start,
                    target,
                    octaves=self.image.octaves,
                    octave_scale=self.image.octave_scale,
                    steps=steps,
                    lr=self.lr,
                    jitter=self.image.transforms,
                    value_range=(low, high),
                    generator=generator,
                    output_transform=self.output_transform,
                )
            dreams.append(dream.images)
            objectives.append(dream.objective)
        span = (high - low).clamp_min(1e-12).reshape(1, 1, -1, 1, 1)
        shown = ((torch.stack(dreams) - low.reshape(1, 1, -1, 1, 1)) / span).clamp(0, 1)
        original = ((start.detach().float().cpu() - low.reshape(1, -1, 1, 1)) / span[0]).clamp(0, 1)
        return shown, torch.stack(objectives), original

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        assert self.probe is not None
        generator = torch.Generator().manual_seed(self.seed)  # afresh each run: the same noise and draws every epoch
        shown, objectives, original = self._compute(
            trainer, pl_module, self.probe, steps=self.steps, images=self.num_images, generator=generator
        )
        values = objectives.mean(dim=1).tolist()
        scalars = {
            f"interp_{self.name}/{self._tag_name(t)}/objective": v for t, v in zip(self.targets, values, strict=True)
        }
        labels = [f"{self._row_name(t)}\nobj={v:.3g}" for t, v in zip(self.targets, values, strict=True)]
        self._remember(trainer.current_epoch, shown[:, 0])
        step, epoch = logging_step(trainer), trainer.current_epoch
        tag = f"interp_{self.name}/{'features' if self.mode == 'optimize' else 'dream'}"
        kind = "feature visualisation" if self.mode == "optimize" else "DeepDream"

        def draw() -> None:
            rows = [_tiles(images) for images in shown]
            row_labels = labels
            if original is not None:
                rows, row_labels = [_tiles(original), *rows], ["probe input", *labels]
            grid = render_grid(rows, row_labels=row_labels, title=f"{kind} (epoch {epoch})")
            log_image(trainer, tag, grid, step)

        self._submit(trainer, draw)
        return scalars

    @property
    def _code(self) -> GeneratorCode | None:
        code = self.image.parameterization
        return code if isinstance(code, GeneratorCode) else None

    def _tag_name(self, target: VisualizationTarget) -> str:
        """A target's part of its scalar tag: ``class:<name>`` for a class that ``class_names`` names (without a '/'),
        else the target's label (``class:2``, ``net.3:5``)."""
        if target.kind == "class" and target.index is not None:
            shown = class_name(self.class_names, target.index)
            return f"class:{shown}" if shown != str(target.index) else target.label
        return target.label

    def _row_name(self, target: VisualizationTarget) -> str:
        """A class target by its name where ``class_names`` gives one, else the target's label."""
        names = self.class_names
        if target.kind == "class" and names and target.index is not None and target.index < len(names):
            return class_name(names, target.index)
        return target.label

    # ------------------------------------------------------------------ evolution strip
    def _remember(self, epoch: int, images: Tensor) -> None:
        """Keep the first image of every target (CPU, a few KB) for the strip, at most ``2 * evolution_columns``."""
        if self.evolution_columns == 0:
            return
        # a float32 copy on the host (the images are there already: no transfer, and no read of their values)
        self._history.append((epoch, images.detach().to(device="cpu", dtype=torch.float32, copy=True)))
        if len(self._history) > 2 * self.evolution_columns:
            thinned = self._history[::2]
            if thinned[-1] is not self._history[-1]:
                thinned.append(self._history[-1])
            self._history = thinned

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``interp_<name>/evolution``: rows = targets, columns = up to ``evolution_columns`` runs."""
        if trainer.is_global_zero and self._history and self.evolution_columns > 0:
            history, step = list(self._history), self._summary_step(trainer)
            spaced = np.linspace(0, len(history) - 1, min(len(history), self.evolution_columns))
            chosen = [history[i] for i in sorted({round(i) for i in spaced})]
            rows = [[_tiles(images[t : t + 1])[0] for _, images in chosen] for t in range(chosen[-1][1].shape[0])]
            labels = [self._row_name(t) for t in self.targets][: len(rows)]
            titles = [f"epoch {epoch}" for epoch, _ in chosen]
            kind = "feature visualisation" if self.mode == "optimize" else "DeepDream"

            def job() -> None:
                grid = render_grid(rows, column_titles=titles, row_labels=labels, title=f"{kind} across training")
                log_image(trainer, f"interp_{self.name}/evolution", grid, step)

            self._submit(trainer, job)
        super().on_fit_end(trainer, pl_module)  # drains the worker

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["history"] = list(self._history)  # the seed is configuration: a resumed run takes the one given now
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._history = [(int(epoch), images.detach().cpu()) for epoch, images in state_dict.get("history", [])]


def _numbers(bound: object) -> bool:
    """A number, or a non-empty sequence of numbers (one per channel)."""
    if isinstance(bound, (int, float)) and not isinstance(bound, bool):
        return True
    if isinstance(bound, Tensor):
        return bound.numel() > 0 and not bound.dtype.is_complex
    return (
        isinstance(bound, Sequence)
        and not isinstance(bound, str)
        and len(bound) > 0
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bound)
    )


def _tiles(images: Tensor) -> list[np.ndarray]:
    """(N, C, H, W) images in [0, 1] -> N (H, W, 3) tiles: RGB as is, one channel grey, other counts min-max scaled."""
    if images.shape[1] == 3:
        return list(images.permute(0, 2, 3, 1).clamp(0, 1).numpy())
    if images.shape[1] == 1:
        return list(images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).clamp(0, 1).numpy())
    return list(input_to_rgb(images))


__all__ = ["FeatureVisualizationCallback", "ImageOptions"]
