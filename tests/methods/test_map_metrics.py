"""Map scores against scipy and analytic cases."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_interp.methods import (
    attribution_to_map,
    concentration,
    localization,
    pointing_game,
    rank_correlation,
)
from lightning_interp.methods.evaluation.map_metrics import ranks

stats = pytest.importorskip("scipy.stats")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [
        float(stats.spearmanr(x.reshape(-1).double().numpy(), y.reshape(-1).double().numpy()).statistic)
        for x, y in zip(a, b, strict=True)
    ]


def test_rank_correlation_matches_scipy_on_continuous_maps():
    torch.manual_seed(0)
    a = torch.randn(5, 7, 9)
    b = a + torch.randn(5, 7, 9) * torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0])[:, None, None]
    result = rank_correlation(a, b)
    assert result.shape == (5,) and result.dtype == torch.float64
    torch.testing.assert_close(result, torch.tensor(_spearman(a, b), dtype=torch.float64), rtol=0, atol=1e-12)


def test_rank_correlation_matches_scipy_with_many_ties():
    torch.manual_seed(1)
    a = torch.randint(0, 4, (6, 8, 8)).float()  # heavy ties
    b = torch.randint(0, 3, (6, 8, 8)).float() + (a > 1).float()
    torch.testing.assert_close(
        rank_correlation(a, b), torch.tensor(_spearman(a, b), dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_rank_correlation_identical_reversed_and_monotone():
    torch.manual_seed(2)
    a = torch.rand(3, 4, 5)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(rank_correlation(a, a), ones)
    torch.testing.assert_close(rank_correlation(a, -a), -ones)
    torch.testing.assert_close(rank_correlation(a, torch.exp(5 * a)), ones)  # only the order matters


def test_rank_correlation_of_constant_map_is_nan_and_shapes_must_match():
    result = rank_correlation(torch.ones(1, 3, 3), torch.rand(1, 3, 3))
    assert math.isnan(result.item())
    with pytest.raises(ValueError, match="same shape"):
        rank_correlation(torch.rand(2, 3, 3), torch.rand(2, 3, 4))


def test_ranks_match_scipy_rankdata_per_row():
    torch.manual_seed(3)
    values = torch.randint(0, 5, (4, 30)).double()
    expected = torch.tensor(stats.rankdata(values.numpy(), axis=1), dtype=torch.float64)
    torch.testing.assert_close(ranks(values), expected)


@pytest.mark.parametrize(("size", "top_fraction"), [(100, 0.1), (16, 0.25), (50, 1.0)])
def test_concentration_of_uniform_map_is_top_fraction(size, top_fraction):
    maps = torch.full((2, size), 3.0)
    torch.testing.assert_close(concentration(maps, top_fraction), torch.full((2,), top_fraction, dtype=torch.float64))


def test_concentration_of_one_hot_map_is_one_and_uses_magnitudes():
    maps = torch.zeros(2, 10, 10)
    maps[0, 3, 4] = 2.0
    maps[1, 0, 0] = -5.0  # sign does not matter
    torch.testing.assert_close(concentration(maps, 0.05), torch.ones(2, dtype=torch.float64))


def test_concentration_reference_formula():
    torch.manual_seed(4)
    maps = torch.randn(3, 20)
    result = concentration(maps, 0.2)
    flat = maps.double().abs()
    expected = flat.sort(dim=1, descending=True).values[:, :4].sum(dim=1) / flat.sum(dim=1)
    torch.testing.assert_close(result, expected)


def test_concentration_rejects_bad_fraction():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_fraction"):
            concentration(torch.rand(1, 4, 4), bad)


def test_localization_of_uniform_map_is_mask_area_fraction():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :2, :] = True  # 16 / 64
    masks[1, 2:5, 3:6] = True  # 9 / 64
    result = localization(torch.ones(2, 8, 8), masks)
    torch.testing.assert_close(result, torch.tensor([16 / 64, 9 / 64], dtype=torch.float64))


def test_localization_of_map_inside_mask_is_one_and_ignores_negative_values():
    masks = torch.zeros(1, 6, 6, dtype=torch.bool)
    masks[0, 1:3, 1:4] = True
    torch.manual_seed(5)
    maps = torch.rand(1, 6, 6) * masks
    maps_with_negatives = torch.where(masks, maps, -torch.rand(1, 6, 6))
    torch.testing.assert_close(localization(maps, masks), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(localization(maps_with_negatives, masks), torch.ones(1, dtype=torch.float64))


def test_localization_reference_formula_and_integer_masks():
    torch.manual_seed(6)
    maps = torch.randn(3, 5, 5)
    masks = torch.randint(0, 2, (3, 5, 5))
    positive = maps.double().clamp_min(0)
    expected = (positive * masks).sum(dim=(1, 2)) / positive.sum(dim=(1, 2))
    torch.testing.assert_close(localization(maps, masks), expected)


def test_pointing_game_hits_and_misses():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, 0, 0] = True
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1.0  # peak in mask: hit
    maps[1, 3, 3] = 1.0  # peak outside: miss
    maps[2, 0, 0], maps[2, 2, 2] = 1.0, 2.0  # mass in the mask but peak outside: miss
    result = pointing_game(maps, masks)
    assert result.dtype == torch.float64
    assert result.tolist() == [1.0, 0.0, 0.0]


def test_attribution_to_map_reductions():
    attributions = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.5]]]])  # (1, 2, 1, 2)
    assert attribution_to_map(attributions).tolist() == [[[4.0, 2.5]]]
    assert attribution_to_map(attributions, "abs_max").tolist() == [[[3.0, 2.0]]]
    assert attribution_to_map(attributions, "sum").tolist() == [[[-2.0, -1.5]]]
    flat = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    out = attribution_to_map(flat)
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 2.0]]
    assert attribution_to_map(flat, "sum").tolist() == [[-1.0, 2.0]]
    with pytest.raises(ValueError, match="abs_sum"):
        attribution_to_map(attributions, "mean")
