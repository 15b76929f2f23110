"""DeepLIFT's RevealCancel through shape-only ops between a linear layer and its nonlinearity (issue 30).

A reshape, permute or slice moves the elements of a linear layer's output without changing them, so the positive and
negative parts of its change move with them. Checked by summation-to-delta, by RevealCancel differing from Rescale (the
rule really ran), by invariance against the same function written without the shape op (a linear layer whose output
already has the final layout, its weights copied), and by the refusals of what the rule cannot follow.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import deeplift, deeplift_shap


class Between(nn.Module):
    """``head(flatten(activation(op(layer(x)))))``: ``op`` sits between the linear layer and its nonlinearity."""

    def __init__(self, layer: nn.Module, op: Callable, activation: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.layer, self.op, self.activation, self.head = layer, op, activation, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.activation(self.op(self.layer(x))), 1))


class Gated(nn.Module):
    """One linear layer, its output chunked in two: ``head(cat(relu(a), tanh(b)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.layer(x).chunk(2, dim=1)
        return self.head(torch.cat([torch.relu(a), torch.tanh(b)], dim=1))


class TokensInTheBatch(nn.Module):
    """A layer on every token of (B, 4, 5) inputs with the tokens merged into the batch (a (4B, 5) matrix), its output
    split back into samples before the nonlinearity; ``merged=False``: the layer on (B, 4, 5) directly."""

    def __init__(self, merged: bool = True) -> None:
        super().__init__()
        self.merged, self.layer, self.head = merged, nn.Linear(5, 12), nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer(x.reshape(-1, 5)).reshape(x.shape[0], 4, 12) if self.merged else self.layer(x)
        return self.head(torch.relu(z).flatten(1))


class RowsSplit(nn.Module):
    """Each sample's 12 pre-activations as two rows of 6 (2B rows: the inputs' and the baselines' halves stay apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.layer(x).reshape(-1, 6)).reshape(x.shape[0], 12))


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    models = {
        "conv_flatten_relu": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.ReLU(), nn.Linear(48, 3)), (2, 6, 6)),
        "linear_view_relu": (
            Between(nn.Linear(5, 12), lambda z: z.view(z.size(0), 3, 4), nn.ReLU(), nn.Linear(12, 3)),
            (5,),
        ),
        "linear_unflatten_relu_conv": (
            nn.Sequential(
                nn.Linear(5, 32),
                nn.Unflatten(1, (2, 4, 4)),
                nn.ReLU(),
                nn.Conv2d(2, 3, 3, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(48, 3),
            ),
            (5,),
        ),
        "conv_channels_last_tanh": (
            Between(nn.Conv2d(2, 3, 3), lambda z: z.permute(0, 2, 3, 1), nn.Tanh(), nn.Linear(48, 3)),
            (2, 6, 6),
        ),
        "linear_reshape_transpose_slice_sigmoid": (
            Between(
                nn.Linear(5, 12), lambda z: z.reshape(-1, 3, 4).transpose(1, 2)[:, 1:], nn.Sigmoid(), nn.Linear(9, 3)
            ),
            (5,),
        ),
        "linear_chunk": (Gated(), (5,)),
        "linear_expand_relu": (  # the batch size written in the call: the inputs' half is read by position
            Between(nn.Linear(5, 12), lambda z: z[:, None].expand(z.shape[0], 2, 12), nn.ReLU(), nn.Linear(24, 3)),
            (5,),
        ),
        "linear_gather_relu": (  # the same index for every sample: followed
            Between(
                nn.Linear(5, 12),
                lambda z: z.gather(1, torch.tensor([[11, 0, 5, 5, 2, 7]]).expand(z.shape[0], -1)),
                nn.ReLU(),
                nn.Linear(6, 3),
            ),
            (5,),
        ),
        "tokens_merged_into_the_batch": (TokensInTheBatch(), (4, 5)),
        "linear_rows_split": (RowsSplit(), (5,)),
        "linear_unflatten_batchnorm_relu": (  # a generator's head: Linear -> channels -> BatchNorm -> ReLU
            nn.Sequential(
                nn.Linear(5, 32),
                nn.Unflatten(1, (2, 4, 4)),
                nn.BatchNorm2d(2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(32, 3),
            ),
            (5,),
        ),
        "conv_flatten_batchnorm_tanh": (
            nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.BatchNorm1d(48), nn.Tanh(), nn.Linear(48, 3)),
            (2, 6, 6),
        ),
    }
    model, shape = models[name]
    for module in model.modules():  # running statistics, and negative scales that swap the signs of the terms
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    return model.double().eval(), shape


@pytest.mark.parametrize(
    "name",
    [
        "conv_flatten_relu",
        "linear_view_relu",
        "linear_unflatten_relu_conv",
        "conv_channels_last_tanh",
        "linear_reshape_transpose_slice_sigmoid",
        "linear_chunk",
        "linear_expand_relu",
        "linear_gather_relu",
        "tokens_merged_into_the_batch",
        "linear_rows_split",
        "linear_unflatten_batchnorm_relu",
        "conv_flatten_batchnorm_tanh",
    ],
)
def test_reveal_cancel_through_a_shape_op_sums_to_the_change_of_the_score(name):
    model, shape = _model(name)
    generator = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(4, *shape, generator=generator, dtype=torch.float64)
    baseline = torch.randn(4, *shape, generator=generator, dtype=torch.float64)
    reveal, delta = deeplift(model, x, 1, baseline=baseline, rule="reveal_cancel", return_convergence_delta=True)
    with torch.no_grad():
        change = model(x)[:, 1] - model(baseline)[:, 1]
    assert change.abs().max() > 1e-2  # something to attribute
    assert (reveal.reshape(4, -1).sum(dim=1) - change).abs().max() < 1e-10
    assert delta.abs().max() < 1e-10
    rescale = deeplift(model, x, 1, baseline=baseline, rule="rescale")
    assert (reveal - rescale).abs().max() > 1e-4  # RevealCancel ran (positive and negative terms cancel here)


def _conv_as_matrix(conv: nn.Conv2d, shape: tuple[int, ...]) -> nn.Linear:
    """The convolution as a dense layer on the flattened input: column j is the conv of the j-th basis image."""
    size = torch.Size(shape).numel()
    with torch.no_grad():
        columns = F.conv2d(torch.eye(size, dtype=conv.weight.dtype).reshape(size, *shape), conv.weight)
        dense = nn.Linear(size, columns[0].numel()).to(conv.weight.dtype)
        dense.weight.copy_(columns.reshape(size, -1).T)
        dense.bias.copy_(conv.bias.repeat_interleave(columns[0, 0].numel()))
    return dense


def _pair(name: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """A model with a shape op between a linear layer and its nonlinearity, and the same function without it."""
    model, shape = _model(name)
    if name == "conv_flatten_relu":
        dense = _conv_as_matrix(model[0], shape)
        return model, nn.Sequential(nn.Flatten(), dense, nn.ReLU(), model[3]).eval(), shape
    if name in ("linear_view_relu", "linear_rows_split"):  # (3, 4) or (2, 6) -> flatten: the layer's own order
        return model, nn.Sequential(model.layer, nn.ReLU(), model.head).eval(), shape
    if name == "tokens_merged_into_the_batch":
        plain = TokensInTheBatch(merged=False).double()
        plain.load_state_dict(model.state_dict())
        return model, plain.eval(), shape
    if name in ("linear_reshape_transpose_slice_sigmoid", "linear_gather_relu"):  # output k is layer output order[k]
        order = torch.arange(12).reshape(3, 4).transpose(0, 1)[1:].flatten()
        if name == "linear_gather_relu":
            order = torch.tensor([11, 0, 5, 5, 2, 7])
        reordered = nn.Linear(5, len(order)).double()
        with torch.no_grad():
            reordered.weight.copy_(model.layer.weight[order])
            reordered.bias.copy_(model.layer.bias[order])
        return model, nn.Sequential(reordered, model.activation, model.head).eval(), shape
    if name == "linear_expand_relu":  # each output twice: a layer with every row twice
        doubled = nn.Linear(5, 24).double()
        with torch.no_grad():
            doubled.weight.copy_(model.layer.weight.repeat(2, 1))
            doubled.bias.copy_(model.layer.bias.repeat(2))
        return model, nn.Sequential(doubled, nn.ReLU(), model.head).eval(), shape
    assert name == "linear_chunk"
    halves = [nn.Linear(5, 6).double() for _ in range(2)]
    with torch.no_grad():
        for half, rows in zip(halves, (slice(0, 6), slice(6, 12)), strict=True):
            half.weight.copy_(model.layer.weight[rows])
            half.bias.copy_(model.layer.bias[rows])

    class TwoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = halves[0], halves[1], model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1))

    return model, TwoLayers().eval(), shape


@pytest.mark.parametrize(
    "name",
    [
        "conv_flatten_relu",
        "linear_view_relu",
        "linear_reshape_transpose_slice_sigmoid",
        "linear_chunk",
        "linear_expand_relu",
        "linear_gather_relu",
        "tokens_merged_into_the_batch",
        "linear_rows_split",
    ],
)
def test_reveal_cancel_does_not_depend_on_the_layout_between_the_layer_and_its_nonlinearity(name):
    reshaped, plain, shape = _pair(name)
    generator = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    baseline = torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(reshaped(x), plain(x), rtol=1e-12, atol=1e-12)  # the same function
    for target in range(3):
        ours = deeplift(reshaped, x, target, baseline=baseline, rule="reveal_cancel")
        expected = deeplift(plain, x, target, baseline=baseline, rule="reveal_cancel")
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        if name in ("linear_view_relu", "linear_rows_split"):  # the same arithmetic in the same order, views aside
            assert torch.equal(ours, expected)


class Unfollowed(nn.Module):
    def __init__(self, op: Callable) -> None:
        super().__init__()
        self.layer, self.op, self.head = nn.Linear(5, 12), op, nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.op(self.layer(x))).reshape(x.shape[0], 12))


def _unsqueezed(z: torch.Tensor) -> torch.Tensor:
    return z.unsqueeze_(1)


def _sorted(z: torch.Tensor) -> torch.Tensor:
    """Each row in the order of its own values: an input and its baseline no longer line up element by element."""
    return z[torch.arange(z.shape[0])[:, None], z.detach().argsort(dim=1)]


@pytest.mark.parametrize(
    ("op", "message", "samples_kept"),
    [
        (lambda z: z * 2, r"by mul in module 'Unfollowed'", True),
        (lambda z: torch.cat([z[:, :6], z[:, 6:]], dim=1), r"by cat in module 'Unfollowed'", True),
        (_unsqueezed, r"by in-place unsqueeze in module 'Unfollowed'", True),
        (lambda z: (z * 2).view(z.shape[0], 3, 4), r"by mul in module 'Unfollowed'", True),  # named through the view
        (lambda z: z.transpose(0, 1).transpose(0, 1), r"transpose in module 'Unfollowed', which does not keep", True),
        # the model itself pairs inputs and baselines wrongly: no model for DeepLIFT, whatever the rule
        (lambda z: z.reshape(-1, 8), r"reshape in module 'Unfollowed', which leaves no inputs' and baselines'", False),
        (
            lambda z: z.roll(1),
            r"roll in module 'Unfollowed', which does not keep the inputs' and the baselines'",
            False,
        ),
        (_sorted, r"by indexing in module 'Unfollowed', which does not keep", False),
    ],
)
def test_reveal_cancel_names_the_op_it_cannot_follow(op, message, samples_kept):
    model = Unfollowed(op).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=rf"RevealCancel .* calls relu in module 'Unfollowed' .*{message}.*rule='rescale'"
    ):
        deeplift(model, x, 0, rule="reveal_cancel")
    if samples_kept:
        _, delta = deeplift(model, x, 0, rule="rescale", return_convergence_delta=True)  # Rescale takes it
        assert delta.abs().max() < 1e-10


class ReadTwice(nn.Module):
    """The layer's output is read by a slice and by a constant shift before its own nonlinearity."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer(x)
        first, shifted = torch.sigmoid(z[:, :2]), torch.tanh(z + 1)
        return self.head(torch.relu(z)) + first.sum(dim=1, keepdim=True) + shifted.sum(dim=1, keepdim=True)


def test_reading_a_layers_output_leaves_its_terms_for_the_next_nonlinearity():
    torch.manual_seed(3)
    model = ReadTwice().double()
    x, baseline = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    _, delta = deeplift(model, x, 1, baseline=baseline, rule="reveal_cancel", return_convergence_delta=True)
    assert delta.abs().max() < 1e-10


class WrittenInPlace(nn.Module):
    """A linear layer's output, then an in-place write the terms recorded at the layer would not see."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case, self.first, self.layer, self.head = case, nn.Linear(5, 5), nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(x))
        z = self.layer(hidden)
        if self.case == "base_of_a_view":  # the view's values change with its base
            view = z.view(z.shape[0], 3, 4)
            z.mul_(2)
            z = view
        elif self.case == "the_layers_input":
            hidden.mul_(2)
        elif self.case == "added_onto":  # hidden += layer(.): hidden's own change is overwritten
            hidden = x.repeat(1, 3)[:, :12].clone()  # no linear layer made it: its own change is one term each
            hidden += z
            z = hidden
        return self.head(torch.relu(z).reshape(x.shape[0], 12))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("base_of_a_view", r"then written in place \(itself or a tensor sharing its memory\)"),
        ("the_layers_input", r"whose input was written in place before this nonlinearity"),
        ("added_onto", r"by in-place add in module 'WrittenInPlace'"),
    ],
)
def test_reveal_cancel_refuses_terms_an_in_place_write_made_stale(case, message):
    torch.manual_seed(4)
    model = WrittenInPlace(case).double()
    with pytest.raises(ValueError, match=rf"calls relu in module 'WrittenInPlace' on a tensor .*{message}"):
        deeplift(model, torch.randn(3, 5, dtype=torch.float64), 0, rule="reveal_cancel")


def test_deeplift_shap_takes_reveal_cancel_through_a_flatten():
    model, shape = _model("conv_flatten_relu")
    x, references = torch.randn(3, *shape, dtype=torch.float64), torch.randn(4, *shape, dtype=torch.float64)
    shap, delta = deeplift_shap(model, x, 2, baselines=references, rule="reveal_cancel", return_convergence_delta=True)
    each = [deeplift(model, x, 2, baseline=r.expand_as(x), rule="reveal_cancel") for r in references]
    torch.testing.assert_close(shap, torch.stack(each).mean(dim=0), rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-10
