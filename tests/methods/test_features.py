"""Feature capture for representation analysis: pool_features, capture_features, auto_layers, normalized_grams.

Expected values come from computations written here: pooling by reshape-and-mean or by
``F.adaptive_avg_pool2d`` on a grid size worked out by hand, forward hooks registered by the test, and
numpy float64 CKA formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from lightning_interp.methods.representation.features import auto_layers, capture_features, pool_features
from lightning_interp.methods.representation.similarity import normalized_grams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


# ---------------------------------------------------------------- helpers


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, kind), f"{kind} left on {name!r}"
    assert not module_globals._global_forward_hooks
    assert not module_globals._global_forward_pre_hooks
    assert not module_globals._global_backward_hooks


def _hooked_outputs(model: nn.Module, x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """Eval-mode outputs of ``modules``, recorded (and cloned at once) by forward hooks written here."""
    saved = [(module, module.training) for module in model.modules()]
    recorded: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(slot: int):
        def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
            recorded[slot] = output.detach().clone()

        return hook

    try:
        for slot, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(slot)))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in saved:
            module.training = flag
    return [recorded[slot] for slot in range(len(modules))]


def _block_pool2d(a: torch.Tensor, s: int) -> torch.Tensor:
    """Average an (B, C, H, W) map over non-overlapping (H/s, W/s) blocks (H, W divisible by s)."""
    b, c, h, w = a.shape
    return a.reshape(b, c, s, h // s, s, w // s).mean(dim=(3, 5))


class FeatNet(nn.Module):
    """Conv net with BatchNorm, Dropout, an unused layer and an ``explode`` switch that makes forward raise."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),  # (B, 8, 8, 8): 512 features
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 2, 3, padding=1),  # (B, 2, 8, 8): 128 features
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(2, 5))
        self.unused = nn.Linear(2, 2)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if self.explode:
            raise RuntimeError("boom inside forward")
        return self.head(features)


def _featnet(seed: int = 0) -> FeatNet:
    torch.manual_seed(seed)
    model = FeatNet()
    with torch.no_grad():  # non-trivial running stats: train-mode BatchNorm then gives different outputs
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


def _mixed_modes(model: FeatNet) -> dict[str, bool]:
    """A mode pattern that model.train()/model.eval() cannot restore."""
    model.train()
    model.features.eval()
    model.features[1].train()
    model.head[2].eval()
    return _modes(model)


def _images(batch: int = 10, seed: int = 1, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, **kwargs)


LAYERS = ["features.0", "features.3", "head.3"]


def _expected_featnet(model: FeatNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What capture_features(model, x, LAYERS, max_features=128) must return, from hand-written hooks.

    features.0 is (B, 8, 8, 8) = 512 > 128: s = 8 gives 512, s = 4 gives 8 * 16 = 128 <= 128, so a 4 x 4 grid.
    features.3 is (B, 2, 8, 8) = 128: already small, flattened. head.3 is (B, 5): unchanged.
    """
    conv0, conv3, linear = _hooked_outputs(model, x, [model.get_submodule(name) for name in LAYERS])
    return {
        "features.0": _block_pool2d(conv0, 4).flatten(1),
        "features.3": conv3.flatten(1),
        "head.3": linear,
    }


def _assert_features_equal(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(result) == list(expected)
    for name, value in expected.items():
        assert result[name].shape == value.shape, name
        torch.testing.assert_close(result[name], value.float(), rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- pool_features


@pytest.mark.parametrize(
    ("channels", "size", "max_features", "grid"),
    [
        (64, 16, 4096, 8),  # 64*256 = 16384 > 4096; s = 8: 4096 <= 4096
        (3, 32, 1000, 16),  # 3*1024 = 3072 > 1000; s = 16: 768
        (5, 12, 200, 6),  # 720 > 200; s = 6: 180
        (16, 7, 100, 1),  # 784; s = 3: 144 > 100; s = 1: 16
        (10, 9, 50, 2),  # 810; s = 4: 160 > 50; s = 2: 40
        (2, 8, 100, 4),  # 128 > 100; s = 4: 32 (halving from H, not the largest s with 2 s^2 <= 100, which is 7)
    ],
)
def test_pool_features_conv_map_is_average_pooled_to_the_halved_grid(channels, size, max_features, grid):
    torch.manual_seed(0)
    a = torch.randn(3, channels, size, size)
    out = pool_features(a, max_features=max_features)
    assert out.shape == (3, channels * grid * grid)
    assert out.shape[1] <= max_features
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(a, grid).reshape(3, -1))
    if size % grid == 0:  # exact blocks: check against plain block means too
        torch.testing.assert_close(out, _block_pool2d(a, grid).reshape(3, -1))


def test_pool_features_non_square_map_pools_to_a_square_grid():
    # H = 6 <= W = 10: 4*60 = 240 > 100; s = 6: 144 > 100; s = 3: 36
    torch.manual_seed(0)
    a = torch.randn(2, 4, 6, 10)
    out = pool_features(a, max_features=100)
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(a, 3).reshape(2, -1))


def test_pool_features_docstring_example_shape():
    assert pool_features(torch.randn(2, 64, 16, 16), max_features=4096).shape == (2, 4096)


@pytest.mark.parametrize(
    "shape", [(4, 3, 8, 8), (4, 192), (4, 12, 16), (4, 2, 3, 4, 8), (4, 1, 1, 192)], ids=lambda s: "x".join(map(str, s))
)
def test_pool_features_small_tensors_are_only_flattened(shape):
    torch.manual_seed(0)
    a = torch.randn(*shape, requires_grad=True)
    out = pool_features(a, max_features=192)
    assert out.shape == (4, 192)
    assert torch.equal(out, a.detach().reshape(4, -1))
    assert not out.requires_grad


@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (2, 1000, 70), (2, 50000)])
def test_pool_features_max_features_none_keeps_everything(shape):
    torch.manual_seed(0)
    a = torch.randn(*shape)
    out = pool_features(a, max_features=None)
    assert torch.equal(out, a.reshape(2, -1))


def test_pool_features_tokens_are_averaged_over_tokens_when_too_large():
    torch.manual_seed(0)
    tokens = torch.randn(3, 50, 16)  # 800 > 100
    out = pool_features(tokens, max_features=100)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, tokens.sum(dim=1) / 50)


def test_pool_features_wide_tokens_are_averaged_then_binned():
    torch.manual_seed(0)
    tokens = torch.randn(2, 10, 300)  # token mean has 300 > 100 features: bins of 3
    out = pool_features(tokens, max_features=100)
    assert out.shape == (2, 100)
    torch.testing.assert_close(out, tokens.mean(dim=1).reshape(2, 100, 3).mean(dim=2))


def test_pool_features_wide_flat_tensor_is_binned_into_exactly_max_features_block_means():
    torch.manual_seed(0)
    flat = torch.randn(3, 60)
    out = pool_features(flat, max_features=12)
    assert out.shape == (3, 12)
    expected = torch.stack([flat[:, 5 * i : 5 * i + 5].mean(dim=1) for i in range(12)], dim=1)
    torch.testing.assert_close(out, expected)


def test_pool_features_uneven_bins_follow_adaptive_pooling_boundaries():
    # bin i covers [floor(i L / M), ceil((i + 1) L / M)) of the L = 10 features, M = 4 bins
    flat = torch.arange(20, dtype=torch.float32).reshape(2, 10) ** 2
    out = pool_features(flat, max_features=4)
    bins = [(math.floor(i * 10 / 4), math.ceil((i + 1) * 10 / 4)) for i in range(4)]
    assert bins == [(0, 3), (2, 5), (5, 8), (7, 10)]
    expected = torch.stack([flat[:, lo:hi].mean(dim=1) for lo, hi in bins], dim=1)
    torch.testing.assert_close(out, expected)


def test_pool_features_higher_rank_tensor_is_flattened_then_binned():
    torch.manual_seed(0)
    a = torch.randn(2, 2, 3, 4, 5)  # 120 features, 30 bins of 4 consecutive flattened entries
    out = pool_features(a, max_features=30)
    torch.testing.assert_close(out, a.reshape(2, 30, 4).mean(dim=2))


def test_pool_features_conv_map_with_more_channels_than_max_features():
    torch.manual_seed(0)
    a = torch.randn(2, 40, 4, 4)  # even a 1 x 1 grid gives 40 > 10: spatial means, then 10 bins of 4 channels
    out = pool_features(a, max_features=10)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, a.mean(dim=(2, 3)).reshape(2, 10, 4).mean(dim=2))


@pytest.mark.parametrize("max_features", [1, 7, 64, 100, 512, 4096])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 16, 31, 31), (2, 128, 14, 14), (2, 33, 20), (2, 9000)])
def test_pool_features_never_exceeds_max_features(shape, max_features):
    out = pool_features(torch.randn(*shape), max_features=max_features)
    assert out.ndim == 2 and out.shape[0] == 2
    assert 1 <= out.shape[1] <= max_features


# ---------------------------------------------------------------- capture_features


def test_capture_features_matches_hand_written_hooks_for_dotted_names():
    model, x = _featnet(), _images()
    expected = _expected_featnet(model, x)
    result = capture_features(model, x, LAYERS, max_features=128)
    _assert_features_equal(result, expected)
    for value in result.values():
        assert value.dtype == torch.float32 and value.device.type == "cpu"  # the model's device


def test_capture_features_accepts_module_objects_keyed_by_their_dotted_name():
    model, x = _featnet(), _images()
    expected = _expected_featnet(model, x)
    modules = [model.features[0], model.features[3], model.head[3]]
    result = capture_features(model, x, modules, max_features=128)
    assert list(result) == LAYERS
    for name in LAYERS:
        torch.testing.assert_close(result[name], expected[name], rtol=1e-5, atol=1e-6)


def test_capture_features_module_objects_with_equal_repr_are_not_merged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(7, 3)
    result = capture_features(net, x, [net[1], net[3]])
    assert all(value.shape[0] == 7 for value in result.values())
    assert len(result) == 2


def test_capture_features_is_not_corrupted_by_a_later_in_place_op():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(7, 3)
    (expected,) = _hooked_outputs(net, x, [net[1]])
    assert (expected < 0).any()  # otherwise the ReLU would change nothing
    result = capture_features(net, x, ["1"])
    torch.testing.assert_close(result["1"], expected)


@pytest.mark.parametrize("batch_size", [1, 3, 10, 256])
def test_capture_features_chunking_gives_the_same_result(batch_size):
    model, x = _featnet(), _images(batch=10)
    expected = _expected_featnet(model, x)
    result = capture_features(model, x, LAYERS, batch_size=batch_size, max_features=128)
    _assert_features_equal(result, expected)


def test_capture_features_three_chunks_equal_one_chunk():
    model, x = _featnet(), _images(batch=10)
    chunked = capture_features(model, x, LAYERS, batch_size=3, max_features=128)
    whole = capture_features(model, x, LAYERS, batch_size=10, max_features=128)
    for name in LAYERS:
        assert chunked[name].shape[0] == 10
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-6)


def test_capture_features_rejects_non_positive_batch_size():
    model = _featnet()
    with pytest.raises(ValueError, match="batch_size"):
        capture_features(model, _images(), LAYERS, batch_size=0)


def test_capture_features_max_features_none_keeps_full_maps():
    model, x = _featnet(), _images(batch=4)
    (conv0,) = _hooked_outputs(model, x, [model.features[0]])
    result = capture_features(model, x, ["features.0"], max_features=None)
    torch.testing.assert_close(result["features.0"], conv0.flatten(1))


def test_capture_features_leaves_no_hooks_and_restores_mixed_modes():
    model = _featnet()
    modes = _mixed_modes(model)
    capture_features(model, _images(), LAYERS, batch_size=3)
    _assert_no_hooks(model)
    assert _modes(model) == modes


def test_capture_features_exception_in_forward_leaves_no_hooks_and_restores_modes():
    model = _featnet()
    modes = _mixed_modes(model)
    model.explode = True
    with pytest.raises(RuntimeError, match="boom inside forward"):
        capture_features(model, _images(), ["features.0"])
    _assert_no_hooks(model)
    assert _modes(model) == modes
    model.explode = False  # and the model is usable afterwards
    _assert_features_equal(
        capture_features(model, _images(), LAYERS, max_features=128), _expected_featnet(model, _images())
    )


def test_capture_features_batchnorm_stats_and_inputs_unchanged_in_train_mode():
    model, x = _featnet(), _images()
    expected = _expected_featnet(model, x)  # eval-mode reference
    model.train()
    buffers = {key: b.clone() for key, b in model.named_buffers()}
    x_before = x.clone()
    result = capture_features(model, x, LAYERS, batch_size=4, max_features=128)
    assert all(module.training for module in model.modules())
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    assert torch.equal(x, x_before)
    _assert_features_equal(result, expected)  # ran in eval mode: train-mode BatchNorm would differ


def test_capture_features_works_under_no_grad():
    model, x = _featnet(), _images()
    expected = _expected_featnet(model, x)
    with torch.no_grad():
        result = capture_features(model, x, LAYERS, batch_size=3, max_features=128)
    assert torch.is_grad_enabled()
    _assert_features_equal(result, expected)


def test_capture_features_works_under_inference_mode_with_inference_inputs():
    model = _featnet()
    expected = _expected_featnet(model, _images())
    with torch.inference_mode():
        x = _images()
        assert x.is_inference()
        result = capture_features(model, x, LAYERS, batch_size=3, max_features=128)
        assert torch.is_inference_mode_enabled()
    _assert_features_equal(result, expected)
    _assert_no_hooks(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_capture_features_are_float32_on_the_models_device_or_where_asked(device, dtype):
    model = _featnet().to(device=device, dtype=dtype)
    x = _images(dtype=dtype)  # on the CPU: chunks must be moved to the model's device
    result = capture_features(model, x, LAYERS, batch_size=4, max_features=128)
    on_cpu = capture_features(model, x, LAYERS, batch_size=4, max_features=128, device="cpu")
    expected = _expected_featnet(model, x.to(device))
    for name in LAYERS:
        assert result[name].dtype == torch.float32, name
        assert result[name].device.type == device, name
        assert on_cpu[name].device.type == "cpu", name
        assert not result[name].requires_grad
        torch.testing.assert_close(result[name], expected[name].float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(on_cpu[name], expected[name].float().cpu(), rtol=1e-4, atol=1e-5)


def test_capture_features_unknown_name_suggests_the_closest():
    model = _featnet()
    with pytest.raises(ValueError, match=r"featurs\.3") as excinfo:
        capture_features(model, _images(), ["featurs.3"])
    assert "'features.3'" in str(excinfo.value)
    _assert_no_hooks(model)


def test_capture_features_layer_that_does_not_run_raises():
    model = _featnet()
    modes = _mixed_modes(model)
    with pytest.raises(RuntimeError, match="unused"):
        capture_features(model, _images(), ["features.0", "unused"])
    _assert_no_hooks(model)
    assert _modes(model) == modes


# ---------------------------------------------------------------- auto_layers


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def test_auto_layers_resnet18_picks_one_point_per_stage(resnet18):
    x = torch.randn(2, 3, 32, 32)
    assert auto_layers(resnet18, x, max_layers=6) == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_auto_layers_resnet18_fewer_layers_is_an_ordered_subset_keeping_the_last(resnet18):
    stages = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    picked = auto_layers(resnet18, torch.randn(2, 3, 32, 32), max_layers=3)
    assert len(picked) == 3
    assert picked[-1] == "fc"
    assert set(picked) <= set(stages)
    assert picked == sorted(picked, key=stages.index)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.drop(self.act(self.fc2(self.act(self.fc1(x))))))


def test_auto_layers_plain_mlp_gives_its_linear_layers():
    assert auto_layers(MLP(), torch.randn(3, 4)) == ["fc1", "fc2", "fc3"]
    sequential = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert auto_layers(sequential, torch.randn(3, 4)) == ["0", "2", "4"]


class Wrapper(nn.Module):
    """A LightningModule-like holder: one child with parameters (``net``) and a parameterless loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_auto_layers_descends_through_a_single_child_wrapper():
    model = Wrapper()
    picked = auto_layers(model, torch.randn(2, 4))
    assert picked == ["net.0", "net.2", "net.4"]
    modules = dict(model.named_modules())
    assert all(name in modules for name in picked)


class NormNet(nn.Module):
    """Normalisation layers everywhere; the top-level chain (encoder, head) is too short, so leaves are used."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(4, 8),
            nn.LayerNorm(8),
            nn.Linear(8, 8),
            nn.BatchNorm1d(8),
            nn.Linear(8, 6),
            nn.GroupNorm(2, 6),
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            nn.Sequential(
                nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)
            ),
            ["0", "2", "5"],
        ),
        (NormNet(), ["encoder.0", "encoder.2", "encoder.4", "head"]),
    ],
    ids=["top-level-chain", "leaf-layers"],
)
def test_auto_layers_never_picks_normalisation_layers(model, expected):
    picked = auto_layers(model, torch.randn(3, 4), max_layers=20)
    modules = dict(model.named_modules())
    assert not any(
        isinstance(modules[name], (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) for name in picked
    )
    assert picked == expected


class SharedNet(nn.Module):
    """``shared`` runs twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.last = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.first(x)))))))


class SharedLeafNet(nn.Module):
    """Leaf-level candidates (the top-level chain is too short) with a layer reused inside ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"a": nn.Linear(4, 8), "b": nn.Linear(8, 8), "c": nn.Linear(8, 8)})
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body["b"]
        return self.head(self.body["c"](b(b(self.body["a"](x)))))


@pytest.mark.parametrize(
    ("model", "expected"),
    [(SharedNet(), ["first", "last"]), (SharedLeafNet(), ["body.a", "body.c", "head"])],
    ids=["top-level", "leaf"],
)
def test_auto_layers_never_picks_a_module_called_twice(model, expected):
    picked = auto_layers(model, torch.randn(2, 4), max_layers=20)
    assert "shared" not in picked and "body.b" not in picked
    assert picked == expected


class Deep(nn.Module):
    def __init__(self, depth: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.extra = nn.Linear(4, 4)  # a second top-level child with parameters: no single-child descent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.extra(x)


@pytest.mark.parametrize("max_layers", [2, 3, 4, 5, 7, 10, 11, 12, 20])
def test_auto_layers_always_ends_with_the_last_candidate(max_layers):
    candidates = [f"layers.{i}" for i in range(10)] + ["extra"]
    picked = auto_layers(Deep(), torch.randn(2, 4), max_layers=max_layers)
    assert picked[-1] == "extra"
    assert len(picked) == min(max_layers, len(candidates))
    assert set(picked) <= set(candidates)
    assert picked == sorted(picked, key=candidates.index)  # in execution order, no repeats
    assert len(set(picked)) == len(picked)


def test_auto_layers_single_layer_is_the_last_candidate(resnet18):
    assert auto_layers(MLP(), torch.randn(2, 4), max_layers=1) == ["fc3"]
    assert auto_layers(resnet18, torch.randn(1, 3, 32, 32), max_layers=1) == ["fc"]


def test_auto_layers_rejects_non_positive_max_layers():
    with pytest.raises(ValueError, match="max_layers"):
        auto_layers(MLP(), torch.randn(2, 4), max_layers=0)


def test_auto_layers_leaves_no_hooks_restores_modes_and_batchnorm_stats():
    model = _featnet()
    modes = _mixed_modes(model)
    buffers = {key: b.clone() for key, b in model.named_buffers()}
    x = _images(batch=4)
    x_before = x.clone()
    picked = auto_layers(model, x)
    assert picked == ["features.0", "features.3", "head.3"]  # chain (features, head) too short: leaf layers
    _assert_no_hooks(model)
    assert _modes(model) == modes
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    assert torch.equal(x, x_before)


def test_auto_layers_exception_in_forward_leaves_no_hooks_and_restores_modes():
    model = _featnet()
    modes = _mixed_modes(model)
    model.explode = True
    with pytest.raises(RuntimeError, match="boom inside forward"):
        auto_layers(model, _images(batch=2))
    _assert_no_hooks(model)
    assert _modes(model) == modes


def test_auto_layers_works_under_inference_mode():
    model = MLP()
    with torch.inference_mode():
        picked = auto_layers(model, torch.randn(2, 4))
    assert picked == ["fc1", "fc2", "fc3"]
    _assert_no_hooks(model)


@pytest.mark.parametrize(
    "model", [nn.Sequential(nn.ReLU(), nn.Flatten()), nn.Identity()], ids=["parameterless-sequential", "identity"]
)
def test_auto_layers_model_without_parameters_raises(model):
    with pytest.raises(ValueError, match="name the layers explicitly"):
        auto_layers(model, torch.randn(2, 4))
    _assert_no_hooks(model)


# ---------------------------------------------------------------- normalized_grams


def np_linear_cka_biased(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC = tr(K H L H) / (n - 1)^2 on linear kernels of the raw features, normalised."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k: np.ndarray, m: np.ndarray) -> float:
        return float(np.trace(k @ h @ m @ h)) / (n - 1) ** 2

    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m))


def np_linear_cka_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC of Song et al. (2012) on zero-diagonal linear kernels of the raw features, normalised."""
    n = x.shape[0]
    one = np.ones(n)

    def hsic(k: np.ndarray, m: np.ndarray) -> float:
        kt, mt = k.copy(), m.copy()
        np.fill_diagonal(kt, 0.0)
        np.fill_diagonal(mt, 0.0)
        term1 = np.trace(kt @ mt)
        term2 = (one @ kt @ one) * (one @ mt @ one) / ((n - 1) * (n - 2))
        term3 = 2.0 / (n - 2) * (one @ kt @ mt @ one)
        return float(term1 + term2 - term3) / (n * (n - 3))

    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m))


def _layers(n: int = 12, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 5, generator=generator)
    b = torch.tanh(a @ torch.randn(5, 7, generator=generator)) + 0.3 * torch.randn(n, 7, generator=generator)
    c = torch.randn(n, 2, 3, 3, generator=generator) + 4.0  # 4-D and off-centre
    d = torch.randn(n, 40, generator=generator)  # more features than samples
    return [a, b, c, d]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.double().reshape(t.shape[0], -1).numpy()


@pytest.mark.parametrize("debiased", [False, True])
def test_normalized_grams_rows_have_unit_norm(debiased):
    layers = _layers()
    grams = normalized_grams(layers, debiased=debiased)
    assert grams.shape == (4, 12 * 12)
    assert grams.dtype == torch.float64
    np.testing.assert_allclose(np.linalg.norm(grams.numpy(), axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_normalized_grams_inner_products_are_linear_cka(debiased):
    layers = _layers()
    grams = normalized_grams(layers, debiased=debiased).numpy()
    reference = np_linear_cka_unbiased if debiased else np_linear_cka_biased
    for i, x in enumerate(layers):
        for j, y in enumerate(layers):
            expected = reference(_numpy(x), _numpy(y))
            np.testing.assert_allclose(grams[i] @ grams[j], expected, rtol=1e-9, atol=1e-12, err_msg=f"{i}, {j}")


def test_normalized_grams_debiased_differs_from_biased_when_features_outnumber_samples():
    # guards against the two references (and the two modes) coinciding by accident
    layers = _layers()
    biased = normalized_grams(layers).numpy()
    unbiased = normalized_grams(layers, debiased=True).numpy()
    assert abs(biased[0] @ biased[3] - unbiased[0] @ unbiased[3]) > 1e-3


def test_normalized_grams_dict_keeps_the_order():
    layers = _layers()
    from_list = normalized_grams([layers[2], layers[0]])
    from_dict = normalized_grams({"c": layers[2], "a": layers[0]})
    torch.testing.assert_close(from_dict, from_list, rtol=0, atol=0)
    np.testing.assert_allclose(
        from_dict[0].numpy() @ from_dict[1].numpy(), np_linear_cka_biased(_numpy(layers[2]), _numpy(layers[0]))
    )


@pytest.mark.parametrize("debiased", [False, True])
def test_normalized_grams_constant_layer_gives_a_nan_row_and_a_warning(debiased):
    a, b, _, _ = _layers()
    constant = torch.full((12, 6), 3.5)
    with pytest.warns(RuntimeWarning, match="constant"):
        grams = normalized_grams({"a": a, "flat": constant, "b": b}, debiased=debiased)
    assert grams[1].isnan().all()
    assert grams[[0, 2]].isfinite().all()
    np.testing.assert_allclose(np.linalg.norm(grams[[0, 2]].numpy(), axis=1), 1.0, rtol=1e-12)


def test_capture_features_refuses_a_layer_named_twice():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="once"):
        capture_features(net, torch.randn(5, 3), ["1", net[1]])


def test_forward_chunk_size_keeps_the_largest_activation_near_the_device_budget():
    from lightning_interp.methods import trace_model
    from lightning_interp.methods.representation.features import forward_chunk_size

    small = trace_model(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4))
    assert forward_chunk_size(small, "cpu") == 256 and forward_chunk_size(small, "cuda") == 1024  # the caps
    big = trace_model(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1)), torch.randn(1, 3, 224, 224))  # 12.8 MB
    assert forward_chunk_size(big, "cpu") == 8  # the floor: one sample alone is near the 16 MiB budget
    assert forward_chunk_size(big, "cuda") == 32  # 512 MiB / 12.8 MB = 41 -> 32
    mnist = trace_model(nn.Sequential(nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)), torch.randn(1, 1, 28, 28))
    assert forward_chunk_size(mnist, "cpu") == 64  # 147 KB a sample: the fastest chunk measured on 2 cores
