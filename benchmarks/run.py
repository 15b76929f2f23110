"""Run every benchmark in one process and write BENCHMARKS.md.

    pip install -e ".[bench]"
    python benchmarks/run.py                 # full sizes, several minutes on 2 CPU cores
    python benchmarks/run.py --quick         # tiny sizes, a smoke run (what CI may do)
    python benchmarks/run.py --only cka      # one section (see SECTIONS below)
    python benchmarks/run.py --only sharded  # opt-in: collectives per validation under DDP, FSDP2, FSDP1, ZeRO
    python benchmarks/run.py --device cuda   # on the GPU (the default when CUDA is available)

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
import torch

SECTIONS = ("overhead", "cost", "attribution", "catalogue", "inside", "cka", "probes", "scaling", "sharded")
OPT_IN = ("sharded",)  # six 2-process training runs (minutes): only with --only sharded
# scaling measures host memory, sharded runs gloo processes: CPU only
GPU_SECTIONS = ("overhead", "cost", "attribution", "catalogue", "inside", "cka", "probes")
DEVICES = ("cpu", "cuda")
HEADER = (
    "# Benchmarks\n\n"
    "Written by `python benchmarks/run.py`. It keeps one part per device: a run on the CPU replaces the CPU part, "
    "a run with `--device cuda` the GPU part, so a GPU machine adds its tables next to those of the CPU machine. "
    "All times are medians of repeated runs in one process; ratios compare runs made side by side, so they carry "
    "over to other machines better than the times.\n"
)


def _marker(device: str, end: bool = False) -> str:
    return f"<!-- {'end of ' if end else ''}{device} part, written by benchmarks/run.py -->"


def merge_report(existing: str, device: str, part: str) -> str:
    """The report with ``device``'s part replaced by ``part`` and the other devices' parts kept.

    >>> report = merge_report("", "cpu", "cpu tables")
    >>> report = merge_report(report, "cuda", "gpu tables")
    >>> merge_report(report, "cpu", "new cpu tables").count("tables")
    2
    """
    parts = {}
    for name in DEVICES:
        start, end = _marker(name), _marker(name, end=True)
        if start in existing and end in existing:
            parts[name] = existing.split(start, 1)[1].split(end, 1)[0].strip("\n")
    parts[device] = part.strip("\n")
    body = [f"{_marker(name)}\n{parts[name]}\n{_marker(name, end=True)}" for name in DEVICES if name in parts]
    return HEADER + "\n" + "\n\n".join(body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; numbers mean nothing, code paths run")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models and the maths run (default: cuda when available); scaling runs on the CPU only",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the report (default: BENCHMARKS.md, or BENCHMARKS.quick.md with --quick)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    available = GPU_SECTIONS if args.device == "cuda" else SECTIONS
    default = [name for name in SECTIONS if name not in OPT_IN]
    chosen = [name for name in (args.only or default) if name in available]
    output = args.output or ("BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md")
    title = "GPU" if args.device == "cuda" else "CPU"
    parts = [
        f"# {title}",
        "",
        f"`python benchmarks/run.py{' --quick' if args.quick else ''} --device {args.device}` on "
        f"{datetime.date.today().isoformat()}.",
        "",
        _timing.machine_description(),
        "",
    ]
    for name in chosen:
        module = __import__(f"bench_{name}")
        print(f"== {name}", flush=True)
        section = module.run(quick=args.quick, device=args.device)
        print(section, flush=True)
        parts += [section, ""]
    existing = ""
    if os.path.exists(output):
        with open(output) as handle:
            existing = handle.read()
    with open(output, "w") as handle:
        handle.write(merge_report(existing, args.device, "\n".join(parts)))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
