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


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only the K-th of N interleaved parts of the collected tests (0 <= K < N): "
        "bench/gpu_suite.sh runs N pytest processes side by side, so that Triton's JIT "
        "compiles, single-threaded per process, use N cores of the GPU machine",
    )


def _select_shard(config, items):
    spec = config.getoption("--shard")
    if spec is None:
        return
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes K/N, got {spec!r}") from None
    if not 0 <= k < n:
        raise pytest.UsageError(f"--shard {spec}: need 0 <= K < N")
    # Interleaved, not contiguous: neighbouring tests share kernel variants, so each shard
    # gets a fair part of the compile work.
    keep = [item for i, item in enumerate(items) if i % n == k]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % n != k])
    items[:] = keep


#: The class tests that compare a trajectory with the fp64 oracle's (``Case.no_oracle_trajectory``).
ORACLE_TRAJECTORY_TESTS = (
    "test_fp32_trajectory_matches_oracle_and_torch",
    "test_master_weights_trajectory",
    "test_low_precision_step_by_step",
)


def _skip_what_a_case_cannot_run(items):
    """An oracle-trajectory test of a case that has none is skipped with the reason."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("case")
        if case is None or not hasattr(case, "no_oracle_trajectory"):
            continue
        reason = case.no_oracle_trajectory if item.originalname in ORACLE_TRAJECTORY_TESTS else None
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_modifyitems(config, items):
    _select_shard(config, items)
    _skip_what_a_case_cannot_run(items)
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        # The marker, not `"cuda" in item.keywords`: keywords also hold every parent node's
        # name, so a checkout folder named "cuda" would skip the whole suite.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(owner, name)`` wraps ``owner.name`` for the test and returns a one-element
    list holding how many times it was called since (a list, so the caller reads it live)."""

    def install(owner, name: str) -> list[int]:
        count = [0]
        real = getattr(owner, name)

        def counting(*args, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
        return count

    return install
