"""The suite runs in one process: what a test changes in the process (torch's deterministic mode, the environment
that Lightning's ``seed_everything`` and launchers leave) must not reach the next test, or results depend on order."""

from __future__ import annotations

import sys
import textwrap

import pytest

INNER_TESTS = """
    import os

    import lightning.pytorch as pl
    import torch

    seen = {}


    def environment():
        return {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}  # pytest's own


    def test_changes_the_process():
        seen["environment"] = environment()
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        pl.seed_everything(3, workers=True, verbose=False)  # sets PL_GLOBAL_SEED and PL_SEED_WORKERS
        assert os.environ["PL_SEED_WORKERS"] == "1"
        os.environ["MASTER_PORT"] = "12910"
        os.environ.pop("HOME", None)
        torch.use_deterministic_algorithms(not seen["deterministic"])


    def test_finds_the_process_as_the_test_before_found_it():
        assert environment() == seen["environment"]
        assert torch.are_deterministic_algorithms_enabled() == seen["deterministic"]
"""


def test_a_tests_changes_to_the_process_do_not_reach_the_next_test(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import _restore_deterministic_algorithms, _restore_environment  # noqa: F401\n"
    )
    (tmp_path / "test_order.py").write_text(textwrap.dedent(INNER_TESTS))
    path = list(sys.path)
    try:  # the inner session puts tmp_path on sys.path and imports its two modules by their plain names
        status = pytest.main([str(tmp_path), "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-W", "ignore"])
    finally:
        sys.path[:] = path
        for name in ("conftest", "test_order"):
            module = sys.modules.get(name)
            if module is not None and str(tmp_path) in str(getattr(module, "__file__", "")):
                del sys.modules[name]
    assert status == pytest.ExitCode.OK
