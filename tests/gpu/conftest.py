"""GPU tests (marker ``cuda``): skipped without CUDA, part of the normal suite wherever a GPU is present.

``LIGHTNING_INTERP_TEST_DEVICE=cpu`` runs the same tests on the CPU (the 16-mixed case is skipped there), which
checks the tests' own logic on a machine without a GPU; it proves nothing about CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("LIGHTNING_INTERP_TEST_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE == "cuda" else DEVICE


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="needs a CUDA GPU (or LIGHTNING_INTERP_TEST_DEVICE=cpu to check the tests)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)
            if DEVICE == "cuda" and not torch.cuda.is_available():
                item.add_marker(skip)
