"""Microbenchmarks (pytest-benchmark): each op on each usable backend, beside torch.

    pytest bench/test_microbench.py                  # not collected by the main test run
    FUSEDOPT_BENCH_MODEL=gpt2 pytest bench/test_microbench.py --benchmark-columns=median

The workload is one GPT-2 small transformer block (12 tensors, 7.1M params) unless
``FUSEDOPT_BENCH_MODEL`` names a model of ``bench/shapes.py``; the device is the GPU when one
is visible. Every result carries its bytes per parameter and achieved GB/s in ``extra_info``.
Backends that cannot run here are skipped with the reason; the slow ones (reference, and
interpreted Triton) only run with ``FUSEDOPT_BENCH_SLOW=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.cases import LOSS_SCALE, make_workload
from bench.fused import backend_rows, make_fused
from bench.peers import Unavailable, make_peer
from bench.shapes import model_shapes
from bench.timing import Step, synchronize
from fusedopt import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = os.environ.get("FUSEDOPT_BENCH_MODEL", "gpt2-block")
SHAPES = model_shapes("gpt2")[2:14] if MODEL == "gpt2-block" else model_shapes(MODEL)
BACKENDS = backend_rows(DEVICE, slow=os.environ.get("FUSEDOPT_BENCH_SLOW") == "1")
ROUNDS = 20 if DEVICE.type == "cuda" else 5

STEP_CASES = [(o, m) for o in ("adamw", "lamb", "lion", "sgd") for m in ("fp32", "amp")]
#: The peers of each optimizer worth a microbenchmark (the report has them all).
PEERS = {
    "adamw": ("torch foreach", "torch fused"),
    "sgd": ("torch foreach", "torch fused"),
    "lamb": ("timm Lamb",),
    "lion": ("lion-pytorch Lion",),
}
PEER_CASES = [(o, m, peer) for o, m in STEP_CASES for peer in PEERS[o]]


def _run(benchmark, step: Step, nbytes: int) -> None:
    """Time ``step`` (synchronized on GPU) and record bytes and GB/s beside the times."""

    def synced() -> None:
        step()
        synchronize(DEVICE)

    benchmark.pedantic(synced, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


def _backend_or_skip(backend: str) -> None:
    if BACKENDS[backend] is not None:
        pytest.skip(f"fusedopt {backend}: {BACKENDS[backend]}")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("optimizer", "mode"), STEP_CASES)
def test_step_fusedopt(benchmark, optimizer, mode, backend):
    _backend_or_skip(backend)
    workload = make_workload(MODEL, optimizer, mode, DEVICE, shapes=SHAPES)
    step = make_fused(workload, backend)
    _run(benchmark, step, workload.bytes_per_param * workload.numel)


@pytest.mark.parametrize(("optimizer", "mode", "peer"), PEER_CASES)
def test_step_peer(benchmark, optimizer, mode, peer):
    workload = make_workload(MODEL, optimizer, mode, DEVICE, shapes=SHAPES)
    try:
        step = make_peer(workload, peer)
    except Unavailable as why:
        pytest.skip(str(why))
    _run(benchmark, step, workload.bytes_per_param * workload.numel)


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    mode = "fp32" if dtype == torch.float32 else "amp"
    return make_workload(MODEL, "sgd", mode, DEVICE, shapes=SHAPES).grads


@pytest.mark.parametrize("impl", [*BACKENDS, "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_norm(benchmark, impl, dtype):
    """Global L2 norm of the grads, divided by the loss scale: reads each grad once."""
    grads = _grads(dtype)
    scale = torch.full((), LOSS_SCALE, device=DEVICE)
    if impl == "torch":  # torch's fastest equivalent: foreach norms, then the norm of those
        step = lambda: torch.nn.utils.get_total_norm(grads, foreach=True) / scale  # noqa: E731
    else:
        _backend_or_skip(impl)
        step = lambda: ops.grad_norm(grads, grad_scale=scale, backend=impl)  # noqa: E731
    _run(benchmark, step, sum(g.numel() * g.element_size() for g in grads))


@pytest.mark.parametrize("impl", [*BACKENDS, "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scale(benchmark, impl, dtype):
    """In-place ``t *= s`` with an inf check: reads and writes each element once."""
    grads = _grads(dtype)
    scale = torch.ones((), device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)
    if impl == "torch":  # GradScaler's unscale kernel: the same inf check + multiply
        step = lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale)  # noqa: E731
    else:
        _backend_or_skip(impl)
        step = lambda: ops.scale_(grads, scale, found_inf, backend=impl)  # noqa: E731
    _run(benchmark, step, 2 * sum(g.numel() * g.element_size() for g in grads))
