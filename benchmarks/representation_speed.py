"""Speed of the representation estimators on this machine (not a test; prints a table).

    python benchmarks/representation_speed.py            # n = 1024, six layers, d = 512..4096
    python benchmarks/representation_speed.py --quick    # tiny sizes, seconds (a smoke run)

Reports medians over repeats of: forming the six Gram matrices alone; the
all-pairs CKA matrix from them (biased and debiased); the same 15 pairs
computed one pair at a time with ``linear_cka``, as pairwise libraries do; and
a logistic / ridge linear probe on a 1024 x 4096 feature matrix.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_interp.methods import cka_matrix, linear_cka, linear_probe_accuracy


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, widths, probe_shape = (1024, [512, 1024, 2048, 4096, 2048, 512], (1024, 4096))
    if args.quick:
        n, widths, probe_shape, args.repeats = 64, [16, 32, 64, 32, 16, 8], (64, 128), 1
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 32, generator=g)
    layers = [base @ torch.randn(32, d, generator=g) + 0.5 * torch.randn(n, d, generator=g) for d in widths]

    def grams_only() -> None:
        for x in layers:
            x64 = x.double() - x.double().mean(dim=0)
            _ = x64 @ x64.T

    def pairwise() -> None:
        for i in range(len(layers)):
            for j in range(i + 1, len(layers)):
                linear_cka(layers[i], layers[j])

    features = torch.randn(*probe_shape, generator=g)
    labels = (features[:, :8] @ torch.randn(8, 10, generator=g)).argmax(dim=1)
    rows = [
        ("6 centred Gram matrices (float64), the floor", median_seconds(grams_only, args.repeats)),
        ("cka_matrix, 6 layers, biased", median_seconds(lambda: cka_matrix(layers), args.repeats)),
        ("cka_matrix, 6 layers, debiased", median_seconds(lambda: cka_matrix(layers, debiased=True), args.repeats)),
        ("15 pairs one by one with linear_cka", median_seconds(pairwise, args.repeats)),
        (
            f"logistic probe {probe_shape[0]} x {probe_shape[1]}",
            median_seconds(lambda: linear_probe_accuracy(features, labels), args.repeats),
        ),
        (
            f"ridge probe {probe_shape[0]} x {probe_shape[1]}",
            median_seconds(lambda: linear_probe_accuracy(features, labels, solver="ridge"), args.repeats),
        ),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {n}, widths = {widths}")
    for name, seconds in rows:
        print(f"{name:<48} {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
