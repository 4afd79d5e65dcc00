"""Test-session set-up: Triton runs interpreted on CPU-only machines, and tests marked
``cuda`` skip cleanly where no GPU is visible (they run unchanged on a GPU)."""

from __future__ import annotations

import os

# Must happen before anything imports triton: @triton.jit reads it when a kernel is defined.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        # The marker, not `"cuda" in item.keywords`: keywords also hold every parent node's
        # name, so a checkout folder named "cuda" would skip the whole suite.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
