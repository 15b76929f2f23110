"""Activation maximisation and DeepDream: known optima, trained models, isolation, targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_interp.demo import ImageClassifier, shapes_cnn
from lightning_interp.methods.representation.feature_visualization import (
    VisualizationTarget,
    deep_dream,
    feature_visualization,
    fourier_image,
    parse_visualization_target,
    random_transforms,
)
from tests.conftest import BatchNormDropoutNet, quiet_trainer, tiny_datamodule


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _patterns(size: int = 16) -> dict[str, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).float()
    square = (((yy - size / 2).abs() < size / 4) & ((xx - size / 2).abs() < size / 4)).float()
    half = (xx < size / 2).float()
    return {"disc": disc * 2 - 1, "square": square * 2 - 1, "half": half * 2 - 1}


def _linear_unit(pattern: torch.Tensor) -> nn.Module:
    """A unit whose logit is <pattern, x>: the optimum over [0, 1] images is 1 where the pattern is +1, 0 where -1."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(pattern.numel(), 1))
    with torch.no_grad():
        net[1].weight.copy_(pattern.reshape(1, -1))
        net[1].bias.zero_()
    return net


@pytest.mark.parametrize(
    ("channels", "options"),
    [
        pytest.param("grey", {}, id="rgb-grey-pattern-defaults"),
        pytest.param("colour", {"decorrelate": False}, id="rgb-colour-pattern-no-colour-decorrelation"),
        pytest.param("mono", {}, id="one-channel"),
        pytest.param("grey", {"transforms": False, "parameterization": "pixel"}, id="pixels-no-transforms"),
    ],
)
def test_linear_unit_optimum_correlates_with_its_weight_pattern(channels, options):
    p = _patterns()
    pattern = {
        "grey": torch.stack([p["disc"]] * 3),
        "colour": torch.stack([p["disc"], p["square"], p["half"]]),
        "mono": p["square"][None],
    }[channels]
    net = _linear_unit(pattern)
    result = feature_visualization(net, ("class", 0), image_shape=tuple(pattern.shape), steps=128, **options)
    image = result.rgb[0, 0]  # in [0, 1], before the mapping to the value range ((0, 1) here: the same)
    assert _pearson(image, pattern) > 0.9
    assert result.objectives[0, 0] > result.history[0, 0, 0] + 10


def test_conv_channel_target_with_kernel_the_size_of_the_input():
    pattern = torch.stack([_patterns()["disc"]] * 3)
    conv = nn.Conv2d(3, 2, 16)
    with torch.no_grad():
        conv.weight[1].copy_(pattern)
        conv.weight[0].copy_(-pattern)  # the other channel wants the opposite picture
        conv.bias.zero_()
    net = nn.Sequential(conv, nn.Flatten())
    result = feature_visualization(net, ["0:1", "0:0:0:0"], image_shape=(3, 16, 16), steps=128)
    assert _pearson(result.rgb[0, 0], pattern) > 0.9
    assert _pearson(result.rgb[1, 0], -pattern) > 0.9


def test_value_range_maps_the_image_into_the_data_range():
    pattern = _patterns()["disc"][None]
    net = _linear_unit(pattern)
    low, high = -2.0, 3.0
    result = feature_visualization(net, ("class", 0), image_shape=(1, 16, 16), steps=16, value_range=(low, high))
    assert torch.allclose(result.images, low + (high - low) * result.rgb, atol=1e-5)
    assert result.images.min() >= low and result.images.max() <= high
    # the objective reported is the model's own on the returned images
    assert torch.allclose(result.objectives[0], net(result.images[0]).detach()[:, 0], atol=1e-3)


def test_class_objective_rises_on_the_trained_quickstart_model(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(shapes_cnn(num_classes=4, width=16), lr=3e-3)  # the quickstart's model, 16 px images
    trainer = quiet_trainer(tmp_path, max_epochs=4, logger=False)
    trainer.fit(model, datamodule=tiny_datamodule(train_size=1024, val_size=64, batch_size=32))
    assert trainer.callback_metrics["val_acc"] > 0.35  # it learned something (chance: 0.25)
    result = feature_visualization(
        model, [("class", k) for k in range(4)], image_shape=(3, 16, 16), steps=48, num_images=2
    )
    first, last = result.history[0], result.history[-1]
    assert result.history.shape == (48, 4, 2)
    rise = last - first
    assert bool((rise > 0.5).all()), rise
    assert bool((result.objectives > first + 0.5).all())


def test_same_seed_same_images_and_nothing_else_changes():
    net = BatchNormDropoutNet()
    net.train()
    net.features[1].eval()  # a frozen BatchNorm: its flag must come back as it was, not as train()
    net(torch.rand(8, 3, 16, 16))  # non-trivial running statistics
    net.head[3].weight.grad = torch.full_like(net.head[3].weight, 0.25)  # a gradient being accumulated
    flags = [m.training for m in net.modules()]
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()

    def run(seed: int):
        return feature_visualization(
            net,
            ["features.4:2", "features.3", ("class", 1)],
            image_shape=(3, 16, 16),
            steps=6,
            num_images=2,
            generator=torch.Generator().manual_seed(seed),
        )

    one, two, other = run(3), run(3), run(4)
    assert torch.equal(one.images, two.images) and torch.equal(one.history, two.history)
    assert not torch.equal(one.images, other.images)
    assert not torch.equal(one.images[:, 0], one.images[:, 1])  # the columns start from different noise
    dream = [
        deep_dream(net, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), "features.4", steps=6)
        for _ in range(2)
    ]
    assert torch.equal(dream[0].images, dream[1].images)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG advanced"
    assert [m.training for m in net.modules()] == flags
    for key, value in net.state_dict().items():
        assert torch.equal(value, buffers[key]), f"{key} changed"
    assert torch.equal(net.head[3].weight.grad, torch.full_like(net.head[3].weight, 0.25))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "head.3.weight")


def test_deep_dream_amplifies_the_layer():
    torch.manual_seed(0)
    net = BatchNormDropoutNet().eval()
    image = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    captured = {}
    handle = net.features[4].register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))

    def mean_square(x):
        with torch.no_grad():
            net(x)
        return captured["out"].pow(2).mean(dim=(1, 2, 3))

    try:
        dream = deep_dream(net, image, "features.4", octaves=3, steps=12, value_range=(0.0, 1.0))
        assert dream.images.shape == image.shape
        before, after = mean_square(image), mean_square(dream.images)
    finally:
        handle.remove()
    assert bool((after > 1.2 * before).all()), (before, after)
    assert torch.allclose(dream.objective, after, rtol=1e-4) and torch.allclose(dream.initial_objective, before)
    assert dream.images.min() >= 0 and dream.images.max() <= 1
    assert not net.features[4]._forward_hooks  # our hooks are gone


def test_works_inside_inference_mode_and_autocast():
    net = BatchNormDropoutNet().eval()
    with torch.inference_mode():
        result = feature_visualization(net, ["features.0:1"], image_shape=(3, 16, 16), steps=3)
        dream = deep_dream(net, torch.rand(1, 3, 16, 16), "features.4", steps=3)
    assert result.history[-1].isfinite().all() and dream.images.isfinite().all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = feature_visualization(net, [("class", 0)], image_shape=(3, 16, 16), steps=3)
    assert result.images.dtype == torch.float32 and result.objectives.isfinite().all()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("net.3:5", VisualizationTarget("channel", "net.3", 5)),
        ("net.3:5:2:1", VisualizationTarget("unit", "net.3", 5, 2, 1)),
        ("features", VisualizationTarget("layer", "features")),
        (("class", 2), VisualizationTarget("class", index=2)),
        (["class", 0], VisualizationTarget("class", index=0)),
        ("class:7", VisualizationTarget("class", index=7)),
    ],
)
def test_parse_targets(spec, expected):
    assert parse_visualization_target(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("net.3:-1", "must be >= 0"),
        ("net.3:a", "must be an integer"),
        ("net.3:1:2", "numbers after the layer name"),
        (":3", "names no layer"),
        (("klass", 2), "tuple target must be"),
        (("class", -2), "must be >= 0"),
        (3, "must be a string or a tuple"),
    ],
)
def test_bad_targets_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_visualization_target(spec)


def test_out_of_range_targets_on_the_model_raise():
    net = BatchNormDropoutNet()
    with pytest.raises(ValueError, match="out of range"):
        feature_visualization(net, ["features.0:6"], image_shape=(3, 16, 16), steps=1)
    with pytest.raises(ValueError, match="4 outputs"):
        feature_visualization(net, [("class", 4)], image_shape=(3, 16, 16), steps=1)
    with pytest.raises(ValueError, match="not a sub-module"):
        feature_visualization(net, ["features.9:0"], image_shape=(3, 16, 16), steps=1)


def test_parameterisation_and_transforms_shapes():
    param = fourier_image((2, 1, 15, 17), generator=torch.Generator().manual_seed(0))
    image = param.image()
    assert image.shape == (2, 1, 15, 17) and image.min() >= 0 and image.max() <= 1
    assert random_transforms(image, [2, 1, 0, 3, 1, 0]).shape == image.shape


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """(y, x) centroid of a (H, W) non-negative image."""
    ys, xs = torch.meshgrid(torch.arange(image.shape[0]), torch.arange(image.shape[1]), indexing="ij")
    total = image.sum()
    return torch.stack([(ys * image).sum() / total, (xs * image).sum() / total])


@pytest.mark.parametrize("shape", [(32, 32), (32, 128), (96, 24)])
def test_random_transforms_rotate_in_pixels_and_keep_the_centre_on_any_aspect_ratio(shape):
    """Two dots on a horizontal line; after a centred draw with a 10 degree rotation and no zoom, the line between
    them is turned by 10 degrees (not sheared), its length kept, and its midpoint stays at the image centre."""
    from lightning_interp.methods.representation.feature_visualization import _ANGLES, _SCALES, _transform_sizes

    h, w = shape
    half = min(h, w) // 4
    cy, cx = h / 2 - 0.5, w / 2 - 0.5
    image = torch.zeros(1, 1, h, w)
    for sign in (-1, 1):  # 2 x 2 dots, symmetric about the centre
        x = int(cx + sign * half - 0.5)
        image[0, 0, int(cy - 0.5) : int(cy - 0.5) + 2, x : x + 2] = 1.0
    _, j1_h, j2_h = _transform_sizes(h)
    _, j1_w, j2_w = _transform_sizes(w)
    assert j1_h % 2 == j2_h % 2 == j1_w % 2 == j2_w % 2 == 0  # even jitters: the centred draw exists
    draw = [j1_w // 2, j1_h // 2, _SCALES.index(1.0), _ANGLES.index(10.0), j2_w // 2, j2_h // 2]
    out = 2 * (random_transforms(0.5 + 0.5 * image, draw)[0, 0] - 0.5)  # the pad value 0.5 becomes 0
    left, right = out.clone(), out.clone()
    left[:, int(cx) + 1 :] = 0
    right[:, : int(cx) + 1] = 0
    a, b = _centroid(left.clamp_min(0)), _centroid(right.clamp_min(0))
    dy, dx = (b - a).tolist()
    angle = math.degrees(math.atan2(dy, dx))
    assert abs(abs(angle) - 10.0) < 1.0, angle
    assert abs(math.hypot(dy, dx) - 2 * half) < 1.0
    middle = ((a + b) / 2).tolist()
    assert abs(middle[0] - cy) < 0.6 and abs(middle[1] - cx) < 0.6, (middle, (cy, cx))


def test_deep_dream_on_a_fixed_size_model_says_to_use_one_octave():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ValueError, match="Pass octaves=1"):
        deep_dream(net, torch.rand(2, 3, 16, 16), "1", octaves=3, steps=6)
    dream = deep_dream(net, torch.rand(2, 3, 16, 16), "1", octaves=1, steps=6)
    assert dream.objective.mean() > dream.initial_objective.mean()


def test_targets_accept_numpy_integers_and_refuse_empty_fields():
    import numpy as np

    assert parse_visualization_target(("class", np.int64(2))).index == 2
    with pytest.raises(ValueError, match="empty field"):
        parse_visualization_target("net.3:1:")
