"""CKA section: every pair of six layers at once (``cka_matrix``) vs one pair at a time (``linear_cka``, ckatorch).

The features come from a random six-layer ReLU network with noise added at every layer (widths 256 to 4096), so
neighbouring layers are similar and distant ones less so: the CKA values spread over (0, 1) rather than sitting at
0 or 1. Each case times, side by side (interleaved repeats, medians):

- the floor: forming the six full float64 Gram matrices of the centred features and nothing else;
- ours: ``cka_matrix(layers)`` (biased HSIC) and ``cka_matrix(layers, debiased=True)``;
- pairwise: the 15 pairs one by one with ``linear_cka`` (``form="auto"``), as pairwise libraries do;
- ckatorch: the same 15 pairs with ``ckatorch.cka_base(x, y, kernel="linear", unbiased=...)``, its only
  plain-tensor entry point (``ckatorch.CKA`` hooks two models and runs minibatch CKA; it has no all-pairs form).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from itertools import combinations

import _timing
import torch
from torch import Tensor

from lightning_interp.methods import cka_matrix, gram_dtype_for, linear_cka

FULL_SIZES = (256, 1024, 4096)
FULL_WIDTHS = (256, 512, 1024, 2048, 4096, 1024)
QUICK_SIZES = (64,)
QUICK_WIDTHS = (16, 32, 64, 128, 64, 32)
TARGET_SPEEDUP = 5.0


def _layers(n: int, widths: tuple[int, ...], seed: int = 0, latent: int = 64) -> list[Tensor]:
    """Float32 features of a random ReLU network: a decaying-spectrum latent input, noise added at every layer."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, latent, generator=g) * torch.logspace(0, -1.5, latent)
    layers = []
    for width in widths:
        pre = hidden @ (torch.randn(hidden.shape[1], width, generator=g) / hidden.shape[1] ** 0.5)
        hidden = torch.relu(pre / pre.std() + 0.3) + 0.6 * torch.randn(n, width, generator=g)
        layers.append(hidden)
    return layers


def _grams_only(layers: list[Tensor]) -> None:
    """The floor: each layer's centred Gram matrix, formed once in the device's Gram dtype (what any all-pairs
    method needs)."""
    for x in layers:
        x64 = x.double()
        x64 = (x64 - x64.mean(dim=0)).to(gram_dtype_for(x.device))
        _ = x64 @ x64.T


def _pairwise(layers: list[Tensor], pair_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """(L, L) matrix with a unit diagonal, filled one pair at a time."""
    count = len(layers)
    out = torch.eye(count, dtype=torch.float64, device=layers[0].device)
    for i, j in combinations(range(count), 2):
        out[i, j] = out[j, i] = pair_fn(layers[i], layers[j]).item()
    return out


def _ckatorch_pair(debiased: bool) -> Callable[[Tensor, Tensor], Tensor]:
    import ckatorch

    return lambda x, y: ckatorch.cka_base(x, y, kernel="linear", unbiased=debiased)


def _ours_pair(debiased: bool) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, y: linear_cka(x, y, debiased=debiased)


def _once(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """One timed call of each, in turn, without a warm-up (for the largest size, where a repeat costs a minute)."""
    times = {}
    for name, fn in fns.items():
        _timing.synchronize()
        start = time.perf_counter()
        fn()
        _timing.synchronize()
        times[name] = time.perf_counter() - start
    return times


def _case(
    n: int,
    widths: tuple[int, ...],
    repeats: int,
    debiased_peers: bool = True,
    with_ckatorch: bool = True,
    device: str = "cpu",
) -> list[list[object]]:
    """Rows (biased, debiased) for one n; ``repeats = 0``: one timed call each, no warm-up."""
    layers = [layer.to(device) for layer in _layers(n, widths)]
    results: dict[str, Tensor] = {}

    def keep(name: str, fn: Callable[[], Tensor]) -> Callable[[], None]:
        def call() -> None:
            results[name] = fn()

        return call

    fns: dict[str, Callable[[], object]] = {"floor": lambda: _grams_only(layers)}
    for debiased in (False, True):
        tag = "debiased" if debiased else "biased"
        fns[f"ours {tag}"] = keep(f"ours {tag}", lambda d=debiased: cka_matrix(layers, debiased=d))
        if debiased_peers or not debiased:
            fns[f"pairwise {tag}"] = keep(f"pairwise {tag}", lambda d=debiased: _pairwise(layers, _ours_pair(d)))
            if with_ckatorch:
                fns[f"ckatorch {tag}"] = keep(
                    f"ckatorch {tag}", lambda d=debiased: _pairwise(layers, _ckatorch_pair(d))
                )
    times = _timing.interleaved_medians(fns, repeats=repeats) if repeats > 0 else _once(fns)
    off_diagonal = ~torch.eye(len(layers), dtype=torch.bool)
    rows = []
    for debiased in (False, True):
        tag = "debiased" if debiased else "biased"
        ours = results[f"ours {tag}"]

        def peer(name: str, tag: str = tag, ours: Tensor = ours) -> tuple[object, str, str]:
            """(ms, ratio to ours, max abs difference to ours) of a pairwise method, or placeholders."""
            key = f"{name} {tag}"
            if key not in results:
                return "not run", "-", "-"
            ratio = f"{times[key] / times[f'ours {tag}']:.2f}"
            return times[key] * 1e3, ratio, f"{(ours - results[key]).abs().max().item():.1e}"

        (pair_ms, pair_ratio, pair_diff), (peer_ms, peer_ratio, peer_diff) = peer("pairwise"), peer("ckatorch")
        rows.append(
            [
                n,
                tag,
                repeats if repeats > 0 else "1, no warm-up",
                times["floor"] * 1e3,
                times[f"ours {tag}"] * 1e3,
                pair_ms,
                peer_ms,
                f"{times[f'ours {tag}'] / times['floor']:.2f}",
                pair_ratio,
                peer_ratio,
                f"{ours[off_diagonal].min().item():.2f}..{ours[off_diagonal].max().item():.2f}",
                pair_diff,
                peer_diff,
            ]
        )
    return rows


def run(quick: bool, device: str = "cpu") -> str:
    sizes, widths = (QUICK_SIZES, QUICK_WIDTHS) if quick else (FULL_SIZES, FULL_WIDTHS)
    rows = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for n in sizes:
        # keeps the section near two minutes on 2 cores: n = 1024 with the peers for the biased HSIC only; the
        # largest n with one timed call each, no warm-up (the smaller sizes warmed the code paths), and without
        # ckatorch, whose 15 pairs take one to two minutes there
        repeats = 1 if quick else (5 if n <= 256 else 2 if n <= 1024 else 0)
        if device == "cuda" and not quick:  # a GPU takes every size with repeats and every peer in seconds
            rows += _case(n, widths, 5, device=device)
        else:
            rows += _case(n, widths, repeats, debiased_peers=quick or n <= 256, with_ckatorch=quick or n <= 1024)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    header = [
        "n",
        "HSIC",
        "runs",
        "floor ms",
        "ours ms",
        "pairwise ms",
        "ckatorch ms",
        "ours / floor",
        "pairwise / ours",
        "ckatorch / ours",
        "CKA range",
        "max abs diff, pairwise",
        "max abs diff, ckatorch",
    ]
    biased = [row for row in rows if row[1] == "biased"]
    worst = min(float(row[8]) for row in biased)
    ceiling = [row[5] / row[3] for row in biased]  # pairwise / floor: what forming each full Gram once would give
    verdict = "MET" if worst >= TARGET_SPEEDUP else "MISSED"
    lines = [
        "## CKA",
        "",
        f"All {len(widths) * (len(widths) - 1) // 2} pairs of {len(widths)} layers of widths {list(widths)} "
        "(float32 features of a random ReLU network with noise at every layer, so the CKA values are spread out), "
        f"linear kernel, float64 sums, on the {device.upper()} (Gram products in "
        f"{str(gram_dtype_for(device)).replace('torch.', '')}, see `gram_dtype_for`). "
        "*floor*: forming the six full Gram matrices of the centred features alone "
        "(what a method that forms each full Gram matrix once cannot avoid). *ours*: `cka_matrix` (features centred "
        "once, only the upper triangle of each Gram formed, in strips of 256 rows for n > 512, then one product of "
        "the stacked triangles, so it can go below the floor). *pairwise*: `linear_cka` pair by pair "
        "(`form='auto'`: the Gram form when d1 + d2 > 2n, else the feature form), as pairwise libraries do. "
        "*ckatorch*: `ckatorch.cka_base(x, y, kernel='linear', unbiased=...)` pair by pair. Times are medians of "
        "*runs* interleaved repeats after one warm-up call each; at the largest n a single timed call each without a "
        "warm-up (the smaller sizes have warmed the code paths). To keep the section near two minutes on 2 cores, "
        "the pairwise methods run with the debiased HSIC only at the smallest n, and ckatorch is left out at the "
        "largest (each of its pairs forms both Gram matrices again and checks each for symmetry with "
        "`torch.allclose`; its 15 pairs take one to two minutes at n = 4096).",
        "",
        _timing.markdown_table(header, rows),
        "",
        f"Target: `cka_matrix` at least {TARGET_SPEEDUP:.0f}x faster than pairwise `linear_cka` at L = "
        f"{len(widths)} (biased): **{verdict}** (smallest pairwise / ours {worst:.2f}x; pairwise / floor, what forming "
        f"each full Gram matrix once and nothing else would give, {min(ceiling):.1f}x"
        f"{f' to {max(ceiling):.1f}x' if len(ceiling) > 1 else ''}"
        f"{' in a quick run, whose sizes mean nothing' if quick else ''}). "
        f"Section time {elapsed:.0f} s, 1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after (on a shared machine, a load above the core count "
        "inflates the times, most for many small multi-threaded ops).",
    ]
    return "\n".join(lines)
