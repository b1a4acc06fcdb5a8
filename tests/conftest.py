"""Shared test set-up: Triton runs on the CPU through its interpreter (STYLE.md §6).

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at the
top of the first file pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Parallel test workers on 2 cores: one thread each (two 2-thread processes run ~10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
