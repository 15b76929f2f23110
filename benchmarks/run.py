"""Run every benchmark in one process and write BENCHMARKS.md.

    pip install -e ".[bench]"
    python benchmarks/run.py                 # full sizes, several minutes on 2 CPU cores
    python benchmarks/run.py --quick         # tiny sizes, a smoke run (what CI may do)
    python benchmarks/run.py --only cka      # one section: overhead, attribution, cka, probes, scaling

Each section times our functions and the peers' side by side in this one
process (interleaved repeats, medians) and reports ratios and agreement.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing

SECTIONS = ("overhead", "attribution", "cka", "probes", "scaling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; numbers mean nothing, code paths run")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the report (default: BENCHMARKS.md, or BENCHMARKS.quick.md with --quick)",
    )
    args = parser.parse_args()
    chosen = args.only or list(SECTIONS)
    output = args.output or ("BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md")
    parts = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/run.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}. All times are medians of repeated runs in one process; "
        "ratios compare runs made side by side, so they carry over to other machines better than the times.",
        "",
        _timing.machine_description(),
        "",
    ]
    for name in chosen:
        module = __import__(f"bench_{name}")
        print(f"== {name}", flush=True)
        section = module.run(quick=args.quick)
        print(section, flush=True)
        parts += [section, ""]
    with open(output, "w") as handle:
        handle.write("\n".join(parts))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
