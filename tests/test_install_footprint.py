"""benchmarks/install_footprint.py: the pip calls it makes and the download it reads from pip's output (no network)."""

from __future__ import annotations

import doctest
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def footprint():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import install_footprint
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return install_footprint


def test_the_cpu_build_is_installed_before_the_project_so_pip_keeps_it(footprint):
    steps = footprint.pip_steps(
        "/repo", extra="test", first="torch torchvision --index-url 'https://download.pytorch.org/whl/cpu'"
    )
    assert steps == [
        ["--no-cache-dir", "torch", "torchvision", "--index-url", "https://download.pytorch.org/whl/cpu"],
        ["--no-cache-dir", "-e", "/repo[test]"],
    ]


@pytest.mark.parametrize("pypi_only", [False, True])
def test_every_call_skips_the_cache_and_only_pypi_only_isolates(footprint, pypi_only):
    steps = footprint.pip_steps("/repo", first="torch", pypi_only=pypi_only)
    assert len(steps) == 2
    for step in steps:
        assert step[0] == "--no-cache-dir"
        assert ("--isolated" in step) is pypi_only
    assert footprint.pip_steps("/repo") == [["--no-cache-dir", "-e", "/repo"]]


def test_downloaded_bytes_sums_pips_downloads_and_skips_local_files(footprint):
    pip_output = """\
Processing /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
Collecting torchvision==0.28.0
  Downloading torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl (7.7 MB)
     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 7.7/7.7 MB 98.6 MB/s eta 0:00:00
Collecting filelock (from torch==2.13.0+cpu)
  Downloading filelock-4.3.2-py3-none-any.whl (148 kB)
Collecting nvidia-cudnn-cu13==9.24.0.43 (from torch>=2.2->lightning-interp==0.2.0)
  Downloading nvidia_cudnn_cu13-9.24.0.43-py3-none-manylinux_2_27_x86_64.whl (1.2 GB)
"""
    assert footprint.downloaded_bytes(pip_output) == pytest.approx(7.7e6 + 148e3 + 1.2e9)
    assert footprint.downloaded_bytes("Requirement already satisfied: torch>=2.2") == 0


def test_the_doctests_of_the_script_pass(footprint):
    result = doctest.testmod(footprint)
    assert result.attempted >= 2
    assert result.failed == 0
