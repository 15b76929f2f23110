"""Pure-torch interpretability functions, usable without Lightning.

Attribution methods share one signature, ``fn(model, inputs, target, **options)``,
where ``target`` is a class index, a LongTensor of shape (B,) or None for the
predicted class.
"""

from lightning_interp.methods._core import (
    ForwardWith,
    PassResult,
    attribution_pass,
    get_module,
    modes_preserved,
    module_name,
)
from lightning_interp.methods.attribution import (
    gradient,
    input_x_gradient,
    integrated_gradients,
    integration_points,
    smoothgrad,
)
from lightning_interp.methods.features import (
    auto_layers,
    capture_features,
    capture_pooled_features,
    forward_chunk_size,
    pool_features,
)
from lightning_interp.methods.gradcam import (
    TokenGrid,
    cam_from_activation,
    find_target_layer,
    grad_cam,
    layers_with_patch_gradient,
    spatial_layers,
    token_grids,
)
from lightning_interp.methods.map_metrics import (
    attribution_to_map,
    concentration,
    localization,
    pointing_game,
    rank_correlation,
)
from lightning_interp.methods.probes import (
    PROBE_SOLVERS,
    ProbeResult,
    RegressionProbeResult,
    linear_probe_accuracy,
    linear_probe_r2,
    multilabel_probe_accuracy,
    stratified_split,
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

ATTRIBUTION_METHODS = {
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
}
"""The input-attribution methods by name; all share ``fn(model, inputs, target, **options)``."""

__all__ = [
    "ATTRIBUTION_METHODS",
    "PROBE_SOLVERS",
    "TASKS",
    "ForwardWith",
    "MinibatchCKA",
    "ModelTrace",
    "PassResult",
    "ProbeResult",
    "RegressionProbeResult",
    "TokenGrid",
    "attribution_pass",
    "attribution_to_map",
    "auto_layers",
    "cam_from_activation",
    "capture_features",
    "capture_pooled_features",
    "center_gram",
    "cka_matrix",
    "concentration",
    "find_target_layer",
    "forward_chunk_size",
    "get_module",
    "grad_cam",
    "gradient",
    "gram_dtype_for",
    "infer_task",
    "input_x_gradient",
    "integrated_gradients",
    "integration_points",
    "label_kind",
    "label_rdm",
    "layers_with_patch_gradient",
    "linear_cka",
    "linear_probe_accuracy",
    "linear_probe_r2",
    "localization",
    "modes_preserved",
    "module_name",
    "multilabel_probe_accuracy",
    "normalized_grams",
    "pointing_game",
    "pool_features",
    "prediction_and_confidence",
    "rank_correlation",
    "rbf_cka",
    "rdm",
    "rsa",
    "rsa_matrix",
    "smoothgrad",
    "spatial_layers",
    "stratified_split",
    "target_scores",
    "token_grids",
    "trace_model",
]
