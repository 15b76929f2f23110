"""trace_model: one dry forward that serves every automatic layer choice."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_interp.methods import auto_layers, spatial_layers, trace_model


class Twice(nn.Module):
    """Calls one block twice (its output is ambiguous) and a head once."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.pool(self.block(self.block(x))).flatten(1))


def test_trace_records_calls_shapes_order_and_output():
    model = Twice()
    trace = trace_model(model, torch.randn(5, 3, 8, 8))
    assert trace.calls == {"block": 2, "pool": 1, "head": 1}
    assert trace.order == ["block", "pool", "head"]
    assert trace.shapes == {"block": (1, 3, 8, 8), "pool": (1, 3, 1, 1), "head": (1, 2)}
    assert trace.ran_once() == ["pool", "head"]
    assert trace.input_shape == (3, 8, 8)
    assert isinstance(trace.output, torch.Tensor) and trace.output.shape == (1, 2)
    assert not trace.output.requires_grad


def test_trace_restores_modes_and_removes_hooks_even_when_the_model_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(3, 2))  # shape mismatch: raises
    model.train()
    with pytest.raises(RuntimeError):
        trace_model(model, torch.randn(2, 4))
    assert all(module.training for module in model.modules())
    assert all(not module._forward_hooks for module in model.modules())


@pytest.mark.parametrize(
    "factory",
    [
        lambda: torchvision.models.resnet18(weights=None, num_classes=3),
        lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=3),
    ],
    ids=["resnet18", "mobilenet_v3_small"],
)
def test_layer_choices_from_a_shared_trace_equal_their_own_dry_forwards(factory):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    trace = trace_model(model, x)
    assert len(calls) == 1
    assert spatial_layers(model, None, trace=trace) == spatial_layers(model, x)
    assert auto_layers(model, None, max_layers=4, trace=trace) == auto_layers(model, x, max_layers=4)
    assert len(calls) == 3, "the shared trace itself runs no forward"
    handle.remove()


def test_reshape_applies_to_token_shapes_from_the_trace():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):  # (B, 9, 4) tokens of a 3 x 3 grid
            return self.head(self.embed(x).mean(dim=1))

    def reshape(tokens):
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 3, 3)

    model = Tokens()
    trace = trace_model(model, torch.randn(2, 9, 4))
    assert spatial_layers(model, None, reshape=reshape, trace=trace) == [("embed", (1, 6, 3, 3))]
    assert spatial_layers(model, None, trace=trace) == []


def test_layer_choice_needs_an_input_or_a_trace():
    with pytest.raises(ValueError, match="trace"):
        spatial_layers(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="trace"):
        auto_layers(nn.Linear(2, 2), None)
