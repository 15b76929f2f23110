"""Install footprint: wall time, download and size of a fresh venv for an install command of the README.

Not a section of ``benchmarks/run.py`` (each run downloads up to gigabytes); run it by hand from the repository root:

    python benchmarks/install_footprint.py                  # pip install -e .  (PyPI's torch: the CUDA build on Linux)
    python benchmarks/install_footprint.py --extra test     # pip install -e ".[test]"
    python benchmarks/install_footprint.py --first "torch torchvision --index-url https://download.pytorch.org/whl/cpu"

``--first`` is a ``pip install`` run before the project's (the CPU build of torch from PyTorch's CPU index, which
``pip install -e .`` then keeps). Every pip call gets ``--no-cache-dir``, so the times include the downloads;
``--pypi-only`` adds ``--isolated`` (pip ignores the user's configuration and ``PIP_*`` variables, such as a local
mirror). The venv is made with the Python that runs this script, in a temporary folder removed at the end unless
``--keep``. The time depends on the network and the disk; the size and the download do not.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DOWNLOAD = re.compile(r"^\s*Downloading \S+ \(([\d.]+) (kB|MB|GB)\)", re.MULTILINE)
_UNIT = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


def pip_steps(
    project: str, extra: str | None = None, first: str | None = None, pypi_only: bool = False
) -> list[list[str]]:
    """The ``pip install`` argument lists to run in order: ``first`` (if any), then the project in editable mode.

    Args:
        project: Path of the project to install.
        extra: Optional extra of the project (``"test"``).
        first: Arguments of a ``pip install`` run before the project's, as one shell-quoted string.
        pypi_only: Add ``--isolated`` to each call (ignore the user's pip configuration and ``PIP_*`` variables).

    Returns:
        One argument list per call, each starting with ``--no-cache-dir``.

    >>> pip_steps("/repo", extra="test", first="torch --index-url https://example.org/cpu")
    [['--no-cache-dir', 'torch', '--index-url', 'https://example.org/cpu'], ['--no-cache-dir', '-e', '/repo[test]']]
    """
    common = ["--no-cache-dir", *(["--isolated"] if pypi_only else [])]
    steps = [[*common, *shlex.split(first)]] if first else []
    steps.append([*common, "-e", f"{project}[{extra}]" if extra else project])
    return steps


def downloaded_bytes(pip_output: str) -> float:
    """Bytes that pip reported downloading (its ``Downloading name (12.3 MB)`` lines; local files not counted).

    Args:
        pip_output: What ``pip install`` printed.

    Returns:
        The sum of the sizes, in bytes (pip's decimal units).

    >>> downloaded_bytes("Collecting torch\\n  Downloading torch-2.14.1-cp311-none.whl (554.6 MB)\\n")
    554600000.0
    """
    return sum(float(size) * _UNIT[unit] for size, unit in _DOWNLOAD.findall(pip_output))


def _du(path: Path) -> str:
    return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def measure(steps: Sequence[Sequence[str]], venv: Path) -> dict[str, str]:
    """Make a venv at ``venv``, run the pip steps in it, and report wall time, download, size and the torch build."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    start, output = time.perf_counter(), ""
    for step in steps:
        done = subprocess.run([python, "-m", "pip", "install", *step], capture_output=True, text=True)
        output += done.stdout + done.stderr
        if done.returncode:
            raise SystemExit(f"pip install {shlex.join(step)} failed:\n{output[-4000:]}")
    wall = time.perf_counter() - start
    probe = "import torch; print(torch.__version__, torch.version.cuda)"
    torch_build = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip()
    return {
        "wall": f"{wall:.0f} s",
        "downloaded": f"{downloaded_bytes(output) / 1e9:.2f} GB",
        "venv (du -sh)": _du(venv),
        "nvidia/ (du -sh)": _du(p) if (p := next(venv.glob("lib/python*/site-packages/nvidia"), None)) else "-",
        "torch, CUDA": torch_build or "- (no torch)",
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra", help='an extra of the project, e.g. "test"')
    parser.add_argument("--first", help="arguments of a pip install run before the project's (one quoted string)")
    parser.add_argument("--pypi-only", action="store_true", help="pip --isolated: ignore user pip config and PIP_*")
    parser.add_argument("--project", default=str(ROOT), help="the project to install (default: this repository)")
    parser.add_argument("--keep", metavar="DIR", help="make the venv at DIR and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    steps = pip_steps(args.project, args.extra, args.first, args.pypi_only)
    for step in steps:
        print("pip install", shlex.join(step))
    if args.keep:
        result = measure(steps, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="install-footprint-") as tmp:
            result = measure(steps, Path(tmp) / "venv")
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
