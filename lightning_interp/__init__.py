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
    ConceptCallback,
    DatasetBiasCallback,
    ExplanationQualityCallback,
    FeatureVisualizationCallback,
    GradCAMCallback,
    LinearProbeCallback,
    ReportCallback,
    RepresentationSimilarityCallback,
    SaliencyCallback,
    UncertaintyCallback,
)
from lightning_interp.probe import ProbeSet

__version__ = "0.1.0"

__all__ = [
    "ActivationMapsCallback",
    "AttentionCallback",
    "CalibrationCallback",
    "ConceptCallback",
    "DatasetBiasCallback",
    "ExplanationQualityCallback",
    "FeatureVisualizationCallback",
    "GradCAMCallback",
    "LinearProbeCallback",
    "ProbeSet",
    "ReportCallback",
    "RepresentationSimilarityCallback",
    "SaliencyCallback",
    "UncertaintyCallback",
    "__version__",
]
