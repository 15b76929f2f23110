"""Launching the 2-process CPU runs of the sharded-strategy tests (``sharded_run.py``, ``sharded_all_run.py``): each
a subprocess that Lightning re-launches for rank 1, bounded by a timeout that kills its whole process group (and a
process-group timeout inside), so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEVICES = 2
TIMEOUT_S = 300  # a run takes 15-30 s alone on two free cores, several times that when the cores are shared
PER_EXTRA_RUN_S = 60  # each further run in the same launch (``launch_plan``): no start-up, a few seconds on free cores
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Run:
    """A finished run: its exit status, its output and each rank's report (``OUT_DIR/rank<r>.pt``)."""

    returncode: int
    output: str
    reports: dict[int, dict]

    def check(self) -> None:
        assert sorted(self.reports) == list(range(DEVICES)), self.output[-6000:]
        # every rank wrote its report at the end of its run; an abort after that, at interpreter exit (a gloo pair
        # torn down mid-exit: "terminate called without an active exception"), is no failure of the run
        aborted_at_exit = "terminate called without an active exception" in self.output[-2000:]
        assert self.returncode == 0 or aborted_at_exit, self.output[-6000:]


def launch(script: Path, root: Path, strategy: str, *extra_args: str, timeout: float = TIMEOUT_S) -> Run:
    """Run ``script STRATEGY ROOT *extra_args`` on ``DEVICES`` CPU processes, its reports under ``root``; once more
    if the rendezvous port was taken by another process meanwhile (Lightning picks a free one, which may not stay
    free)."""
    run = _launch_once(script, root, strategy, *extra_args, timeout=timeout)
    if run.returncode != 0 and "Address already in use" in run.output and not run.reports:
        run = _launch_once(script, root, strategy, *extra_args, timeout=timeout)
    return run


def _launch_once(script: Path, root: Path, strategy: str, *extra_args: str, timeout: float) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(script), strategy, str(root), *extra_args]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # kill the rank Lightning spawned too, not only the launcher
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the {strategy} run did not finish within {timeout:.0f} s (hang?); its output:\n{output[-6000:]}")
    return Run(process.returncode, output, reports_in(root))


def reports_in(root: Path) -> dict[int, dict]:
    """The ranks' reports under ``root`` (``rank<r>.pt``), by rank; a rank that wrote none is missing."""
    paths = {rank: root / f"rank{rank}.pt" for rank in range(DEVICES)}
    return {rank: torch.load(path, weights_only=False) for rank, path in paths.items() if path.exists()}


def launch_plan(script: Path, root: Path, plan: list[tuple[str, ...]]) -> dict[tuple[str, ...], Run]:
    """The runs of ``plan`` (each a strategy and the script's flags) one after the other in one launch (the script's
    ``--then``), by their tuples. Starting two processes that import torch and Lightning costs more than these tiny
    runs, so a module launches once. A run whose ranks both wrote their reports finished, whatever a later run of the
    launch did; the launch's exit status and output are every run's."""
    (strategy, *first), *later = plan
    args = [*first]
    for run in later:
        args += ["--then", *run]
    timeout = TIMEOUT_S + PER_EXTRA_RUN_S * len(later)
    launched = launch(script, root, strategy, *args, timeout=timeout)
    runs = {}
    for index, key in enumerate(plan):
        reports = reports_in(root / f"then{index}" if index else root)
        finished = index < len(plan) - 1 and sorted(reports) == list(range(DEVICES))
        runs[key] = Run(0 if finished else launched.returncode, launched.output, reports)
    return runs
