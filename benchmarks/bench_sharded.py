"""Sharded strategies section: what the callbacks' work costs in collectives per validation, per strategy and mode.

Each configuration is one 2-process CPU run of ``tests/callbacks/sharded_run.py`` (gloo; the tiny CNN; Saliency with
gradient, SmoothGrad and integrated gradients, Grad-CAM, a linear probe and representation similarity), the same
runs the tests make. A callback placed before the interp callbacks and one after them count the collectives that
``torch.distributed`` is called for during the callbacks' epoch-end work at each validation (``tests/callbacks/
collectives.py``), and time it; the table shows rank 0 at the last validation. On 2 CPU processes the times say how
the modes compare, not what a GPU cluster would take: a gather there moves far more bytes over a faster link.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import _timing
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "callbacks", "sharded_run.py")
TIMEOUT_S = 600
CONFIGURATIONS = (  # (strategy, extra arguments, how the callbacks work)
    ("ddp", (), "rank 0 alone (whole parameters)"),
    ("deepspeed2", (), "rank 0 alone (whole parameters)"),
    ("fsdp2", (), "lockstep"),
    ("fsdp2", ("--window",), "unsharded window (UnshardedWindow(); Grad-CAM with cam too)"),
    ("fsdp1", (), "lockstep, through the FSDP1 root"),
    ("deepspeed3", (), "lockstep"),
)
GATHERS = ("all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather")
LABELS = {"ddp": "DDP", "deepspeed2": "DeepSpeed ZeRO-2", "fsdp2": "FSDP2", "fsdp1": "FSDP1", "deepspeed3": "ZeRO-3"}


def _launch(strategy: str, extra: tuple[str, ...], root: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    command = [sys.executable, SCRIPT, strategy, root, *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    path = os.path.join(root, "rank0.pt")
    if done.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return torch.load(path, weights_only=False)


def run(quick: bool, device: str = "cpu") -> str:
    rows = []
    for strategy, extra, mode in CONFIGURATIONS:
        if strategy.startswith("deepspeed"):
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                rows.append([LABELS[strategy], mode, "not run: pip install -e '.[sharded]'", "", "", "", ""])
                continue
        with tempfile.TemporaryDirectory() as root:
            report = _launch(strategy, extra, root)
        calls = report["collectives"][-1]
        gathers = sum(calls.get(name, 0) for name in GATHERS)
        reductions = sum(count for name, count in calls.items() if "reduce_scatter" in name)
        broadcasts = sum(count for name, count in calls.items() if name.startswith("broadcast"))
        rows.append(
            [
                LABELS[strategy],
                mode,
                "not seen" if strategy == "deepspeed3" else gathers,
                calls.get("all_reduce", 0),
                broadcasts,
                reductions,
                f"{report['work_seconds'][-1]:.2f}",
            ]
        )
    header = [
        "strategy",
        "the callbacks' work",
        "all-gathers",
        "all-reduces",
        "broadcasts",
        "reduce-scatters",
        "epoch-end work, s (rank 0)",
    ]
    lines = [
        "## Sharded strategies: collectives per validation (CPU, 2 processes)",
        "",
        "Rank 0's calls of `torch.distributed` during the four core callbacks' epoch-end work at one validation "
        "(the tiny CNN: three convolutions and a linear layer, four parameter groups under `fully_shard`), from one "
        "2-process CPU run each of `tests/callbacks/sharded_run.py`. All-reduces are the failure checks of lockstep "
        "(one per forward pass of the roots, one at the end) and of the window (one per run); broadcasts are the "
        "scalars' (one per callback). No configuration reduces a gradient. DeepSpeed gathers ZeRO-3's parameters "
        "through function references it takes at start-up (and `distributed_c10d` directly), which the counter, "
        "replacing `torch.distributed`'s attributes, does not see: its row counts the other calls only.",
        "",
        _timing.markdown_table(header, rows),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
