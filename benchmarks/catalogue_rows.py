"""Re-measure chosen rows of the catalogue section (``bench_catalogue.py``) at its full sizes, optionally in CPU time.

    python benchmarks/catalogue_rows.py smooth_grad_cam_plus_plus,lrp            # both models, wall time
    python benchmarks/catalogue_rows.py ablation_cam --models cifar_resnet --cpu-time

``--cpu-time`` times the process's CPU time with one torch thread instead of wall time: on a machine shared with other
work (a load average far above the cores), wall times of interleaved calls still swing by 2x, while the CPU time each
side spends is what the comparison is about. It does not show what a second thread gains either side.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", help="comma-separated registry names (keys of bench_catalogue.COMPARISONS)")
    parser.add_argument("--models", default="mnist_cnn,cifar_resnet", help="comma-separated model names")
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time, one torch thread")
    args = parser.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
        time.perf_counter = time.process_time  # read by _timing and bench_attribution at call time
    import bench_catalogue as catalogue
    from bench_attribution import _images

    warnings.filterwarnings("ignore")
    for name, ctor, shape, layer in catalogue.MODELS:
        if name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        model = ctor().eval()
        x = _images(64, shape)
        with torch.no_grad():
            t = model(x).argmax(dim=1)
        setup = catalogue.Setup(name, model, x, t, layer, quick=False)
        for method in args.methods.split(","):
            try:
                rows = catalogue.COMPARISONS[method](setup, method)
            except catalogue.NotCompared as reason:
                print(f"| {name} | {method} | not compared: {reason} |")
                continue
            for r in rows:
                rel = r["rel"] if isinstance(r["rel"], str) else f"{r['rel']:.2g}"
                print(
                    f"| {name} | {r['method']} | {r['peer']} | {r['runs']} | {r['ours_ms']:.1f} | {r['peer_ms']:.1f} "
                    f"| {r['ratio']:.2f} | {r['spread']} | {rel} |",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
