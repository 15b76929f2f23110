"""Pure-torch interpretability functions, usable without Lightning.

Attribution methods share one signature, ``fn(model, inputs, target, **options)``,
where ``target`` is a class index, a LongTensor of shape (B,) or None for the
predicted class (CAM methods add ``layer``). Every one is declared once in
:mod:`lightning_interp.methods.registry`: ``attribute(name, model, inputs,
target, **options)`` calls any of them and ``available_methods()`` lists them.
"""

from lightning_interp.methods._core import (
    ForwardWith,
    PassResult,
    attribution_pass,
    get_module,
    modes_preserved,
    module_name,
)
from lightning_interp.methods.activations import (
    ActivationStatistics,
    activation_maps,
    activation_statistics,
    most_active_channels,
)
from lightning_interp.methods.attribution import (
    gradient,
    input_x_gradient,
    integrated_gradients,
    integration_points,
    smoothgrad,
)
from lightning_interp.methods.deeplift import deeplift
from lightning_interp.methods.features import (
    auto_layers,
    capture_features,
    capture_pooled_features,
    forward_chunk_size,
    pool_features,
)
from lightning_interp.methods.gradcam import (
    GRADIENT_CAMS,
    TokenGrid,
    cam,
    cam_from_activation,
    eigen_cam,
    find_target_layer,
    grad_cam,
    grad_cam_plus_plus,
    hires_cam,
    layer_cam,
    layers_with_patch_gradient,
    score_cam,
    spatial_layers,
    token_grids,
    xgrad_cam,
)
from lightning_interp.methods.lrp import LRP_COMPOSITES, LRP_RULES, lrp, lrp_rules
from lightning_interp.methods.map_metrics import (
    attribution_to_map,
    concentration,
    localization,
    pointing_game,
    rank_correlation,
)
from lightning_interp.methods.modified import RELU_RULES, deconvnet, guided_backprop, relu_rule
from lightning_interp.methods.perturbation import gradient_shap, kernel_shap, lime, occlusion, patch_feature_mask
from lightning_interp.methods.probes import (
    PROBE_SOLVERS,
    ProbeResult,
    RegressionProbeResult,
    linear_probe_accuracy,
    linear_probe_r2,
    multilabel_probe_accuracy,
    stratified_split,
)
from lightning_interp.methods.registry import (
    FAMILIES,
    METHODS,
    MethodSpec,
    attribute,
    available_methods,
    method_spec,
)
from lightning_interp.methods.similarity import (
    MinibatchCKA,
    center_gram,
    cka_matrix,
    gram_dtype_for,
    label_rdm,
    linear_cka,
    normalized_grams,
    rbf_cka,
    rdm,
    rsa,
    rsa_matrix,
)
from lightning_interp.methods.tasks import TASKS, infer_task, label_kind, prediction_and_confidence, target_scores
from lightning_interp.methods.trace import ModelTrace, trace_model

ATTRIBUTION_METHODS = {name: METHODS[name].function for name in available_methods() if not METHODS[name].needs_layer}
"""The input-attribution methods by name (from the registry); all share ``fn(model, inputs, target, **options)``."""

__all__ = [
    "ATTRIBUTION_METHODS",
    "FAMILIES",
    "GRADIENT_CAMS",
    "LRP_COMPOSITES",
    "LRP_RULES",
    "METHODS",
    "PROBE_SOLVERS",
    "RELU_RULES",
    "TASKS",
    "ActivationStatistics",
    "ForwardWith",
    "MethodSpec",
    "MinibatchCKA",
    "ModelTrace",
    "PassResult",
    "ProbeResult",
    "RegressionProbeResult",
    "TokenGrid",
    "activation_maps",
    "activation_statistics",
    "attribute",
    "attribution_pass",
    "attribution_to_map",
    "auto_layers",
    "available_methods",
    "cam",
    "cam_from_activation",
    "capture_features",
    "capture_pooled_features",
    "center_gram",
    "cka_matrix",
    "concentration",
    "deconvnet",
    "deeplift",
    "eigen_cam",
    "find_target_layer",
    "forward_chunk_size",
    "get_module",
    "grad_cam",
    "grad_cam_plus_plus",
    "gradient",
    "gradient_shap",
    "gram_dtype_for",
    "guided_backprop",
    "hires_cam",
    "infer_task",
    "input_x_gradient",
    "integrated_gradients",
    "integration_points",
    "kernel_shap",
    "label_kind",
    "label_rdm",
    "layer_cam",
    "layers_with_patch_gradient",
    "lime",
    "linear_cka",
    "linear_probe_accuracy",
    "linear_probe_r2",
    "localization",
    "lrp",
    "lrp_rules",
    "method_spec",
    "modes_preserved",
    "module_name",
    "most_active_channels",
    "multilabel_probe_accuracy",
    "normalized_grams",
    "occlusion",
    "patch_feature_mask",
    "pointing_game",
    "pool_features",
    "prediction_and_confidence",
    "rank_correlation",
    "rbf_cka",
    "rdm",
    "relu_rule",
    "rsa",
    "rsa_matrix",
    "score_cam",
    "smoothgrad",
    "spatial_layers",
    "stratified_split",
    "target_scores",
    "token_grids",
    "trace_model",
    "xgrad_cam",
]
