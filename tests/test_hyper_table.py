"""[note: hyper table] (fusedopt/_contract.py): hyperparameters travel as a small device table,
so an lr schedule rewrites that table and no backend rebuilds its tensor table; a CUDA graph
that captured a step replays with the table's current values.

Triton runs interpreted on the CPU here (tests/conftest.py); the CUDA backend's tensor-table
cache is checked on a GPU by tests/test_cuda_backend.py
(``test_float_lr_schedule_keeps_the_table_cached``) and its kernels by the emulated ctest.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import ops
from fusedopt.triton_kernels import multi_tensor

SHAPES = [(3, 5), (7,), (2, 2, 2), (4,)]
SCHEDULE = (1e-2, 7e-3, 3e-3, 5e-4)


def _model(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params, step: int) -> None:
    """New grad values in the same grad tensors (new tensors would move: a table rebuild)."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        p.grad = g if p.grad is None else p.grad.copy_(g)


def _optimizer(cls, params, backend):
    # Two groups with their own lr and betas: two rows of the table, one call.
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    return cls(groups, lr=SCHEDULE[0], backend=backend)


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion])
def test_lr_schedule_uploads_no_table_and_matches_the_reference(cls, count_calls):
    """An lr that changes every step (both groups, different values) rewrites the optimizer's
    hyperparameter table in place (same tensor, no new one) and uploads no Triton tensor
    table after the first step; the trajectory equals the reference backend's."""
    if not fusedopt.backends()["triton"].usable:
        pytest.skip("triton is not usable")
    params, twins = _model(), _model()
    opt = _optimizer(cls, params, "triton")
    ref = _optimizer(cls, twins, "reference")
    uploads = count_calls(multi_tensor, "_upload")
    tables, counts = [], []
    for step, lr in enumerate(SCHEDULE):
        for o in (opt, ref):
            for k, group in enumerate(o.param_groups):
                group["lr"] = lr * (1 + k)
        _grads(params, step)
        _grads(twins, step)
        opt.step()
        ref.step()
        (call,) = opt._step_out["plan"].calls
        tables.append(call.hyper_table)
        counts.append(uploads[0])
        assert call.hyper_table.tolist()[1][0] == lr * 2  # the schedule reached the table
    assert all(t is tables[0] for t in tables)
    assert counts[1:] == [counts[0]] * (len(SCHEDULE) - 1), counts
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_functional_lr_schedule_uploads_no_table(count_calls):
    """``fusedopt.ops`` keeps one hyperparameter table per call site and rewrites it when the
    values change: a float lr schedule through ``ops.adamw_`` uploads no tensor table after
    the first call, and each call applies its own lr (the reference backend agrees)."""
    if not fusedopt.backends()["triton"].usable:
        pytest.skip("triton is not usable")
    params, twins = _model(), _model()
    states = {id(p): [torch.zeros_like(p.data) for _ in range(2)] for p in params + twins}
    steps = {id(p): torch.zeros(()) for p in params + twins}
    uploads = count_calls(multi_tensor, "_upload")
    counts = []
    for step, lr in enumerate(SCHEDULE):
        _grads(params, step)
        _grads(twins, step)
        for ps, backend in ((params, "triton"), (twins, "reference")):
            ops.adamw_(
                [p.data for p in ps], [p.grad for p in ps], [states[id(p)][0] for p in ps],
                [states[id(p)][1] for p in ps], [steps[id(p)] for p in ps],
                lr=[lr, lr, 2 * lr, 2 * lr], weight_decay=0.1, backend=backend,
            )  # fmt: skip
        counts.append(uploads[0])
    assert counts[1:] == [counts[0]] * (len(SCHEDULE) - 1), counts
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_with_a_schedule(backend):
    """A step captured in a CUDA graph reads the hyperparameter table at each replay: a
    schedule written into the table between replays (no re-capture) gives the trajectory of
    eager steps with those lrs (the cpu backend's, to fp32 rounding)."""
    if not fusedopt.backends()[backend].usable:
        pytest.skip(f"{backend} is not usable")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]

    def lists(device):
        ps = [p.clone().to(device) for p in host]
        return {
            "params": ps, "grads": [g.to(device) for g in grads],
            "exp_avgs": [torch.zeros_like(p) for p in ps],
            "exp_avg_sqs": [torch.zeros_like(p) for p in ps],
            "steps": [torch.zeros((), device=device) for _ in ps],
        }  # fmt: skip

    def row(lr):  # lr, beta1, beta2, eps, weight_decay
        return [lr, 0.9, 0.999, 1e-8, 0.1]

    got, want = lists(dev), lists(torch.device("cpu"))
    hypers = torch.tensor([row(SCHEDULE[0])], dtype=torch.float64, device=dev)
    op = getattr(torch.ops.fusedopt, f"adamw_{backend}_")

    def step():
        op(
            got["params"], got["grads"], got["exp_avgs"], got["exp_avg_sqs"], [], [],
            got["steps"], hypers, [len(SHAPES)], True, False, False, True, None, None, None,
            None,
        )  # fmt: skip

    step()  # warm-up (compiles, caches the tables), outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for ps in (got, want):  # undo the warm-up and the capture: start again from step 0
        for name in ("exp_avgs", "exp_avg_sqs", "steps"):
            for t in ps[name]:
                t.zero_()
        for p, h in zip(ps["params"], host, strict=True):
            p.copy_(h)
    for lr in SCHEDULE:
        hypers.copy_(torch.tensor([row(lr)], dtype=torch.float64))
        graph.replay()
        ops.adamw_(
            want["params"], want["grads"], want["exp_avgs"], want["exp_avg_sqs"], want["steps"],
            lr=lr, weight_decay=0.1, backend="cpu",
        )  # fmt: skip
    torch.cuda.synchronize()
    assert [s.item() for s in got["steps"]] == [float(len(SCHEDULE))] * len(SHAPES)
    for a, b in zip(got["params"], want["params"], strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=1e-7)
