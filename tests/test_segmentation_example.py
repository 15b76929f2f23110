"""The offline segmentation example: its maps fall inside the explained class's mask."""

from __future__ import annotations

import warnings

import pytest
import torch

from examples.segmentation import main


def _inside_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    positive = maps.clamp_min(0).reshape(maps.shape[0], -1)
    return (positive * masks.reshape(masks.shape[0], -1)).sum(dim=1) / positive.sum(dim=1).clamp_min(1e-12)


@pytest.mark.slow
def test_segmentation_example_maps_fall_inside_the_explained_class_mask(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, callbacks = main(
            ["--epochs", "4", "--train-size", "640", "--val-size", "32", "--logdir", str(tmp_path)]
        )
    saliency, gradcam = callbacks
    probe = saliency.probe
    assert probe is not None and probe.class_maps is not None
    model = trainer.lightning_module.eval()
    with torch.no_grad():
        predicted = model(probe.inputs).argmax(dim=1)
    # the explained class, found independently: the largest predicted class other than the background
    areas = torch.stack([(predicted == c).sum(dim=(1, 2)) for c in range(1, 5)], dim=1)
    explained = areas.argmax(dim=1) + 1
    masks = probe.class_maps == explained[:, None, None]
    right = masks.flatten(1).any(dim=1)  # samples whose explained class is really there
    assert int(right.sum()) >= 2  # a few epochs on a CPU: the shape's class is not always right yet
    uniform = masks.float().flatten(1).mean(dim=1)[right]  # a uniform map's share inside the mask
    assert float(uniform.mean()) < 0.3
    inside = _inside_share(gradcam.last_maps["net.features.5"], masks)[right]
    assert float(inside.mean()) > 2.5 * float(uniform.mean()), (inside, uniform)
    assert set(saliency.last_maps) == {"gradient", "smoothgrad"}  # plain gradients are still diffuse this early
    objects = probe.class_maps > 0  # every sample: the maps fall on the shape, whatever class it is given
    share = objects.float().flatten(1).mean(dim=1).mean()
    assert float(_inside_share(gradcam.last_maps["net.features.5"], objects).mean()) > 2.5 * float(share)
    logged = trainer.callback_metrics
    assert float(logged["interp_gradcam/net.features.5/localization"]) > 2.5 * float(uniform.mean())
