"""Models of several inputs (tuple ``inputs``) and further forward arguments (``additional_forward_args``), held to
Captum's own classes called the same way, and to the properties the packing must keep (completeness over all the
inputs, noise scaled per input, each copy paired with its own sample's arguments)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_interp.methods import METHODS, Explainer, attribute, register_method

captum_attr = pytest.importorskip("captum.attr")


class ImageAndTable(nn.Module):
    """An image branch and a table branch joined before the head, with a per-sample scale as a third argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.table = nn.Linear(4, 4)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, image: Tensor, table: Tensor, scale: Tensor) -> Tensor:
        pooled = self.pool(self.relu1(self.conv(image))).flatten(1)
        return self.head(torch.cat([pooled, self.relu2(self.table(table)) * scale], dim=1))


@pytest.fixture
def case() -> tuple[nn.Module, tuple[Tensor, Tensor], Tensor, Tensor]:
    torch.manual_seed(0)
    model = ImageAndTable().double().eval()
    inputs = (torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64))
    scale = torch.tensor([[1.0], [2.5]], dtype=torch.float64)
    return model, inputs, scale, torch.tensor([0, 2])


def _max_difference(ours: tuple[Tensor, ...], theirs: tuple[Tensor, ...]) -> float:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
    return max(float((a - b.detach()).abs().max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize(
    ("name", "peer", "options", "peer_options"),
    [
        ("gradient", "Saliency", {}, {"abs": False}),
        ("input_x_gradient", "InputXGradient", {}, {}),
        ("integrated_gradients", "IntegratedGradients", {"n_steps": 16}, {"n_steps": 16}),
        ("deeplift", "DeepLift", {}, {}),
        ("guided_backprop", "GuidedBackprop", {}, {}),
        ("deconvnet", "Deconvolution", {}, {}),
    ],
)
def test_tuple_inputs_match_captum(case, name, peer, options, peer_options):
    model, inputs, scale, target = case
    ours = attribute(name, model, inputs, target, additional_forward_args=(scale,), **options)
    theirs = getattr(captum_attr, peer)(model).attribute(
        inputs, target=target, additional_forward_args=(scale,), **peer_options
    )
    assert isinstance(ours, tuple)
    assert _max_difference(ours, theirs) < 1e-9


def test_integrated_gradients_completeness_spans_every_input(case):
    """The path moves every input at once: the attributions of both inputs together sum to f(x) - f(baseline), and
    the convergence delta is Captum's."""
    model, inputs, scale, target = case
    baselines = (torch.full_like(inputs[0], 0.2), torch.full_like(inputs[1], -0.1))
    ours, delta = attribute(
        "integrated_gradients", model, inputs, target, additional_forward_args=(scale,), baseline=baselines,
        n_steps=64, return_convergence_delta=True,
    )  # fmt: skip
    _, peer_delta = captum_attr.IntegratedGradients(model).attribute(
        inputs, baselines=baselines, target=target, additional_forward_args=(scale,), n_steps=64,
        return_convergence_delta=True,
    )  # fmt: skip
    rows = torch.arange(2)
    change = model(*inputs, scale)[rows, target] - model(*baselines, scale)[rows, target]
    total = sum(part.flatten(1).sum(dim=1) for part in ours)
    assert torch.allclose(total - change.detach(), delta.double(), atol=1e-9)  # the delta of both inputs together
    assert torch.allclose(delta.double(), peer_delta.double(), atol=1e-9)
    assert bool((delta.abs() < 0.05 * change.detach().abs()).all())  # ReLU kinks: 64 steps leave a few percent


def test_deeplift_shap_with_a_distribution_of_baselines_per_input(case):
    model, inputs, scale, target = case
    torch.manual_seed(1)
    baselines = (torch.rand(3, 3, 6, 6, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64))
    ours = attribute("deeplift_shap", model, inputs, target, additional_forward_args=(scale,), baselines=baselines)
    theirs = captum_attr.DeepLiftShap(model).attribute(
        inputs, baselines=baselines, target=target, additional_forward_args=(scale,)
    )
    assert _max_difference(ours, theirs) < 1e-9


def _masks() -> tuple[Tensor, Tensor]:
    """Four features: the image's top and bottom halves, the table's first and last two columns."""
    return torch.arange(36).reshape(1, 1, 6, 6) // 18, torch.tensor([[2, 2, 3, 3]])


def test_feature_ablation_with_a_mask_per_input_matches_captum(case):
    model, inputs, scale, target = case
    ours = attribute("feature_ablation", model, inputs, target, additional_forward_args=(scale,), feature_mask=_masks())
    theirs = captum_attr.FeatureAblation(model).attribute(
        inputs, target=target, additional_forward_args=(scale,), feature_mask=_masks()
    )
    assert _max_difference(ours, theirs) < 1e-12


@pytest.mark.parametrize("name", ["kernel_shap", "shapley_value_sampling"])
def test_shapley_methods_over_features_of_both_inputs_are_exact(case, name):
    """With four features across the two inputs, both methods enumerate every coalition: Captum's exact
    ShapleyValues, over the same features."""
    model, inputs, scale, target = case
    ours = attribute(name, model, inputs, target, additional_forward_args=(scale,), feature_mask=_masks(), n_samples=64)
    exact = captum_attr.ShapleyValues(model).attribute(
        inputs, target=target, additional_forward_args=(scale,), feature_mask=_masks()
    )
    assert _max_difference(ours, exact) < 1e-7  # Captum returns ShapleyValues in float32


def test_the_default_features_number_each_inputs_features_apart(case):
    """Without a mask, an image's features are its 4 x 4 grid of patches (shared by the channels) and a table's are
    its columns, numbered after the image's: Captum's FeatureAblation given exactly those masks agrees."""
    model, inputs, scale, target = case
    ours = attribute("feature_ablation", model, inputs, target, additional_forward_args=(scale,), patch_size=3)
    rows, cols = torch.arange(6) // 3, torch.arange(6) // 3
    image_mask = (rows[:, None] * 2 + cols[None, :]).reshape(1, 1, 6, 6)
    table_mask = torch.arange(4).reshape(1, 4) + 4
    theirs = captum_attr.FeatureAblation(model).attribute(
        inputs, target=target, additional_forward_args=(scale,), feature_mask=(image_mask, table_mask)
    )
    assert _max_difference(ours, theirs) < 1e-12


def test_occlusion_slides_over_one_input_at_a_time_as_captum(case):
    model, _, scale, target = case

    class TwoImages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, left: Tensor, right: Tensor, scale: Tensor) -> Tensor:
            return self.net(left - right.mean(dim=1, keepdim=True), right.mean(dim=(2, 3)).repeat(1, 2), scale)

    two = TwoImages().eval()
    torch.manual_seed(2)
    images = (torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.rand(2, 2, 6, 6, dtype=torch.float64))
    ours = attribute("occlusion", two, images, target, additional_forward_args=(scale,), window=[3, 2], stride=[3, 2])
    theirs = captum_attr.Occlusion(two).attribute(
        images, sliding_window_shapes=((3, 3, 3), (2, 2, 2)), strides=((3, 3, 3), (2, 2, 2)), target=target,
        additional_forward_args=(scale,),
    )  # fmt: skip
    assert _max_difference(ours, theirs) < 1e-7  # Captum returns the second input's in float32


def test_noise_is_scaled_to_each_inputs_own_range():
    """VarGrad of f = sum(a**2) + sum(b**2) is 4 * sigma**2 at every value: sigma is 0.15 of each input's own range,
    not of the two inputs' values together (a table in the hundreds would drown the image in noise)."""

    class Squares(nn.Module):
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return (a**2).flatten(1).sum(dim=1, keepdim=True) + (b**2).sum(dim=1, keepdim=True)

    small = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    large = torch.linspace(0, 400, 8, dtype=torch.float64).reshape(1, 8)
    generator = torch.Generator().manual_seed(0)
    spread = attribute("vargrad", Squares(), (small, large), 0, n_samples=4000, noise_level=0.15, generator=generator)
    sigma_small, sigma_large = (part.mean().sqrt() / 2 for part in spread)
    assert float(sigma_small) == pytest.approx(0.15 * 1.0, rel=0.05)
    assert float(sigma_large) == pytest.approx(0.15 * 400.0, rel=0.05)


def test_each_copy_gets_its_own_samples_arguments():
    """Integrated gradients of one tensor with a per-sample argument equals, row by row, the method on the model with
    that sample's argument fixed: the path's copies are paired with their own sample's row."""

    class Scaled(nn.Module):
        def forward(self, x: Tensor, weights: Tensor) -> Tensor:
            return torch.tanh(x * weights).sum(dim=1, keepdim=True).repeat(1, 2) * torch.tensor([1.0, -1.0])

    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]], dtype=torch.float64)
    model = Scaled().double()

    class Fixed(nn.Module):
        def __init__(self, row: int) -> None:
            super().__init__()
            self.row = row

        def forward(self, z: Tensor) -> Tensor:
            return model(z, weights[self.row : self.row + 1])

    ours = attribute("integrated_gradients", model, x, 0, additional_forward_args=(weights,), internal_batch_size=3)
    for row in range(2):
        alone = attribute("integrated_gradients", Fixed(row), x[row : row + 1], 0)
        assert torch.allclose(ours[row : row + 1], alone, atol=1e-12)


@pytest.mark.parametrize("name", ["grad_cam", "score_cam", "ablation_cam"])
def test_a_cam_method_maps_the_first_input_with_the_others_at_their_values(case, name):
    """Score-CAM and Ablation-CAM run the model on many copies of one sample at a time: each copy gets that sample's
    table and scale, not the next sample's."""
    model, inputs, scale, target = case
    ours = attribute(name, model, inputs, target, layer="conv", additional_forward_args=(scale,))

    class ImageOnly(nn.Module):
        """One sample's model of its image alone: its table and scale fixed (broadcast to any number of copies)."""

        def __init__(self, row: int) -> None:
            super().__init__()
            self.conv = model.conv  # the same layer, so its name is the same
            self.row = row

        def forward(self, image: Tensor) -> Tensor:
            rows = image.shape[0]
            table = inputs[1][self.row : self.row + 1].expand(rows, -1)
            return model(image, table, scale[self.row : self.row + 1].expand(rows, -1))

    assert ours.shape == (2, 6, 6)
    for row in range(2):
        alone = attribute(name, ImageOnly(row), inputs[0][row : row + 1], target[row : row + 1], layer="conv")
        assert torch.allclose(ours[row : row + 1], alone, atol=1e-12)


def test_gradient_shap_pairs_each_draw_with_its_sample_in_chunks_of_any_size(case):
    model, inputs, scale, target = case
    results = [
        attribute(
            "gradient_shap", model, inputs, target, additional_forward_args=(scale,), n_samples=5, stdevs=0.1,
            generator=torch.Generator().manual_seed(3), internal_batch_size=size,
        )
        for size in (None, 1, 3)
    ]  # fmt: skip
    assert _max_difference(results[0], results[1]) < 1e-12
    assert _max_difference(results[0], results[2]) < 1e-12


def test_bad_several_inputs_are_refused_with_what_to_do(case):
    model, inputs, scale, target = case
    with pytest.raises(ValueError, match="additional_forward_args"):
        attribute("gradient", model, (inputs[0], torch.ones(2, 4, dtype=torch.long)), target)
    with pytest.raises(ValueError, match="tuple of 2 values, one per input"):
        attribute("integrated_gradients", model, inputs, target, additional_forward_args=(scale,), baseline=inputs[0])
    with pytest.raises(ValueError, match="one row per sample"):
        attribute("gradient", model, inputs, target, additional_forward_args=(scale[:1],))
    with pytest.raises(ValueError, match="same number of rows"):
        attribute("gradient", model, (inputs[0], inputs[1][:1]), target, additional_forward_args=(scale,))


def test_a_baseline_function_receives_the_tuple_and_returns_one_per_input(case):
    model, inputs, scale, target = case
    given = (inputs[0] * 0.5, inputs[1] * 0.25)
    from_function = attribute(
        "integrated_gradients", model, inputs, target, additional_forward_args=(scale,), n_steps=8,
        baseline=lambda xs: (xs[0] * 0.5, xs[1] * 0.25),
    )  # fmt: skip
    from_values = attribute(
        "integrated_gradients", model, inputs, target, additional_forward_args=(scale,), n_steps=8, baseline=given
    )
    assert _max_difference(from_function, from_values) < 1e-12


def test_the_explainer_gives_one_map_per_input_and_the_completeness_of_all_of_them(case):
    model, inputs, scale, target = case
    explainer = Explainer(["input_x_gradient", "integrated_gradients", ("grad_cam", {"layer": "conv"})])
    result = explainer(model, inputs, target, additional_forward_args=(scale,))
    maps = result.maps()
    assert [tuple(part.shape) for part in maps["integrated_gradients"]] == [(2, 6, 6), (2, 4)]
    assert maps["grad_cam@conv"].shape == (2, 6, 6)
    expected = captum_attr.InputXGradient(model).attribute(inputs, target=target, additional_forward_args=(scale,))
    assert _max_difference(result.attributions["input_x_gradient"], expected) < 1e-12
    assert result.target.tolist() == [0, 2]
    assert float(result.scalars["integrated_gradients/completeness_error"]) < 0.05  # over both inputs' sums


def test_a_perturbation_method_declared_by_a_user_sees_one_input_at_a_time(case):
    """A user's perturbation method may rely on its input's shape: by default it runs on each input in turn."""
    model, inputs, scale, target = case
    seen: list[tuple[int, ...]] = []

    @register_method("perturbation", "shape probe")
    def shape_probe(model, inputs, target=None):
        seen.append(tuple(inputs.shape))
        return torch.zeros_like(inputs)

    try:
        result = attribute("shape_probe", model, inputs, target, additional_forward_args=(scale,))
    finally:
        METHODS.pop("shape_probe")
    assert seen == [(2, 3, 6, 6), (2, 4)]
    assert [tuple(part.shape) for part in result] == [(2, 3, 6, 6), (2, 4)]


class IgnoresItsTable(nn.Module):
    """Two inputs, of which the model uses the image only: every method must give the table nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(self.pool(self.relu(self.conv(image))).flatten(1)) + 0.0 * table.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("name", [name for name, spec in METHODS.items() if spec.family != "layer"])
def test_every_method_takes_several_inputs_and_gives_an_ignored_input_nothing(name):
    """Every registered method takes a tuple: the input methods give one result per input, shaped like it, and the
    table the model ignores gets no attribution at all; the CAM family gives the image's map."""
    torch.manual_seed(0)
    model = IgnoresItsTable().double().eval()
    inputs = (torch.rand(3, 3, 8, 8, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64))
    spec = METHODS[name]
    options: dict[str, object] = {"layer": "conv"} if spec.needs_layer else {}
    if spec.stochastic:
        options["generator"] = torch.Generator().manual_seed(0)
    if name == "guided_grad_cam":
        options["cam_layer"] = "conv"
    if name in ("lime", "kernel_shap"):  # three features (the image's halves, the table): KernelSHAP is then exact
        options["feature_mask"] = (torch.arange(64).reshape(1, 1, 8, 8) // 32, torch.full((1, 5), 2))
    target = torch.tensor([0, 1, 2])
    if name == "occlusion":  # slides over images only, and says what to use for the table instead
        with pytest.raises(ValueError, match="feature_mask"):
            attribute(name, model, inputs, target, **options)
        return
    result = attribute(name, model, inputs, target, **options)
    if spec.several_inputs == "first":
        assert isinstance(result, Tensor) and result.shape[0] == 3 and result.shape[-2:] == (8, 8)
        return
    image_part, table_part = result
    assert image_part.shape == inputs[0].shape and table_part.shape == inputs[1].shape
    # LIME's weighted regression on sampled coalitions leaks a little to a feature without effect (as Captum's): a
    # bound, not zero; every other method gives it exactly nothing
    bound = 0.05 * float(image_part.abs().sum(dim=(1, 2, 3)).max()) if name == "lime" else 1e-9
    assert float(table_part.abs().max()) <= bound, f"{name} gives the ignored input {table_part}"
    assert float(image_part.abs().max()) > 0
