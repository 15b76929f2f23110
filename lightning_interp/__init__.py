"""lightning-interp: training-time interpretability callbacks for PyTorch Lightning.

Add the callbacks to a ``Trainer``; at validation epochs they explain a fixed
probe set and log images and scalars (TensorBoard first), so you can watch
explanations evolve while the model trains. The maths lives in
:mod:`lightning_interp.methods` and works without Lightning.
"""

from lightning_interp.callbacks import (
    ActivationMapsCallback,
    AttentionCallback,
    CalibrationCallback,
    CAVOptions,
    ConceptCallback,
    DatasetBiasCallback,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    ImageOptions,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    TCAVTest,
    UncertaintyCallback,
    UnshardedWindow,
)
from lightning_interp.methods import DetectionTarget, SegmentationTarget
from lightning_interp.options import DataDescription, Display
from lightning_interp.probe import ProbeSet

__version__ = "0.2.0"

__all__ = [
    "ActivationMapsCallback",
    "AttentionCallback",
    "CAVOptions",
    "CalibrationCallback",
    "ConceptCallback",
    "DataDescription",
    "DatasetBiasCallback",
    "DetectionTarget",
    "Display",
    "ExplanationQualityCallback",
    "FeatureVisualizationCallback",
    "GradCAMCallback",
    "ImageOptions",
    "LinearProbeCallback",
    "ProbeSet",
    "ReportCallback",
    "RepresentationSimilarityCallback",
    "SaliencyCallback",
    "SegmentationTarget",
    "TCAVTest",
    "UncertaintyCallback",
    "UnshardedWindow",
    "__version__",
]
