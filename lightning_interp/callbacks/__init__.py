"""Lightning callbacks, one per file; each is a thin wrapper around ``lightning_interp.methods``."""

from lightning_interp.callbacks._base import InterpCallback
from lightning_interp.callbacks._maps import MapCallback
from lightning_interp.callbacks.activation_maps import ActivationMapsCallback
from lightning_interp.callbacks.attention import AttentionCallback
from lightning_interp.callbacks.calibration import CalibrationCallback
from lightning_interp.callbacks.concept import CAVOptions, ConceptCallback, TCAVTest
from lightning_interp.callbacks.dataset_bias import DatasetBiasCallback
from lightning_interp.callbacks.explanation_quality import ExplanationQualityCallback
from lightning_interp.callbacks.feature_visualization import FeatureVisualizationCallback, ImageOptions
from lightning_interp.callbacks.gradcam import GradCAMCallback
from lightning_interp.callbacks.linear_probe import LinearProbeCallback
from lightning_interp.callbacks.report import ReportCallback
from lightning_interp.callbacks.saliency import SaliencyCallback
from lightning_interp.callbacks.similarity import RepresentationSimilarityCallback
from lightning_interp.callbacks.uncertainty import UncertaintyCallback
from lightning_interp.callbacks.unsharded_window import UnshardedWindow

__all__ = [
    "ActivationMapsCallback",
    "AttentionCallback",
    "CAVOptions",
    "CalibrationCallback",
    "ConceptCallback",
    "DatasetBiasCallback",
    "ExplanationQualityCallback",
    "FeatureVisualizationCallback",
    "GradCAMCallback",
    "ImageOptions",
    "InterpCallback",
    "LinearProbeCallback",
    "MapCallback",
    "ReportCallback",
    "RepresentationSimilarityCallback",
    "SaliencyCallback",
    "TCAVTest",
    "UncertaintyCallback",
    "UnshardedWindow",
]
