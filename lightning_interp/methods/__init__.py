"""Pure-torch interpretability functions, usable without Lightning.

Attribution methods share one signature, ``fn(model, inputs, target, **options)``,
where ``target`` is a class index, a LongTensor of shape (B,) or None for the
predicted class.
"""

from lightning_interp.methods._core import PassResult, attribution_pass, get_module, modes_preserved
from lightning_interp.methods.attribution import (
    gradient,
    input_x_gradient,
    integrated_gradients,
    integration_points,
    smoothgrad,
)
from lightning_interp.methods.gradcam import cam_from_activation, find_target_layer, grad_cam, spatial_layers
from lightning_interp.methods.map_metrics import (
    attribution_to_map,
    concentration,
    localization,
    pointing_game,
    rank_correlation,
)

ATTRIBUTION_METHODS = {
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
}
"""The input-attribution methods by name; all share ``fn(model, inputs, target, **options)``."""

__all__ = [
    "ATTRIBUTION_METHODS",
    "PassResult",
    "attribution_pass",
    "attribution_to_map",
    "cam_from_activation",
    "concentration",
    "find_target_layer",
    "get_module",
    "grad_cam",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "integration_points",
    "localization",
    "modes_preserved",
    "pointing_game",
    "rank_correlation",
    "smoothgrad",
    "spatial_layers",
]
