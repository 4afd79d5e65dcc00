"""Triton backend checks that need a CUDA GPU (they skip cleanly without one): indexing of
tensors with 2^31 elements and more, no host sync in a step, CUDA-graph capture and replay,
and the step-count protocol over many chunks."""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import ops

pytestmark = pytest.mark.cuda

BIG = 2**31 + 4099  # past int32 indexing, and not a multiple of the chunk or the block


def _triton_ready():
    if not torch.cuda.is_available() or not fusedopt.backends()["triton"].usable:
        pytest.skip("needs a CUDA GPU and the triton backend")


def _adamw_lists(sizes, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(n, dt):
        return torch.randn(n, generator=g, device="cuda").to(dt)

    params = [randn(n, dtype) for n in sizes]
    return {
        "params": params,
        "grads": [randn(n, dtype) for n in sizes],
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "steps": [torch.zeros((), device="cuda") for _ in sizes],
    }


def _adamw(lists, backend, **kwargs):
    ops.adamw_(
        lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
        backend=backend, **kwargs,
    )  # fmt: skip


def test_tensors_of_2_pow_31_elements_and_more_index_correctly():
    _triton_ready()
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    x = torch.ones(BIG, dtype=torch.bfloat16, device="cuda")
    tail = torch.arange(1, 4100, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    x[-4099:] = tail
    x[2**31 - 1] = 3.0
    ops.scale_([x], torch.tensor(2.0, device="cuda"), backend="triton")
    assert torch.equal(x[-4099:], (tail.float() * 2).to(torch.bfloat16))
    assert x[2**31 - 1].item() == 6.0 and x[0].item() == 2.0 and x[2**30].item() == 2.0
    # grad_norm over the same tensor: sqrt(sum of squares), all in fp32, each element 2.
    total, _, found = ops.grad_norm([x[: 2**31 + 1]], backend="triton")
    assert found.item() == 0.0
    expected = (4.0 * (2**31 - 1) + 36.0 + 4.0) ** 0.5
    assert abs(total.item() - expected) / expected < 1e-5
    # SGD without momentum: p -= lr * g, checked past the 2^31 boundary.
    g = torch.ones_like(x)
    ops.sgd_([x], [g], lr=0.5, backend="triton")
    last = (tail[-1].float() * 2 - 0.5).to(torch.bfloat16)
    assert x[2**31 - 1].item() == 5.5 and x[-1].item() == last.item()
    del x, g
    torch.cuda.empty_cache()


def test_no_host_sync_in_a_step():
    """Every op, with device scalars, tensor lr, and a table rebuild (moved grads), runs under
    torch.cuda.set_sync_debug_mode("error")."""
    _triton_ready()
    sizes = [0, 1, 1000, 70000]
    lists = _adamw_lists(sizes)
    scalars = {
        "grad_scale": torch.tensor(2.0, device="cuda"),
        "clip_coef": torch.tensor(0.5, device="cuda"),
        "found_inf": torch.zeros((), device="cuda"),
    }
    lr = torch.tensor(1e-3, device="cuda")
    _adamw(lists, "triton", lr=lr, **scalars)  # warm-up: compiles the kernel
    ops.grad_norm(lists["grads"], per_tensor=True, backend="triton")
    ops.lamb_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
              lists["steps"], lr=lr, backend="triton", **scalars)  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            lists["grads"] = [g.clone() for g in lists["grads"]]  # new addresses: a rebuild
            _adamw(lists, "triton", lr=lr, **scalars)
            _adamw(lists, "triton", lr=1e-3 * (i + 1), **scalars)  # a float lr that changes
            norm = ops.grad_norm(lists["grads"], per_tensor=True, backend="triton")
            ops.scale_(lists["grads"], norm.total, norm.found_inf, backend="triton")
            ops.lamb_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                      lists["steps"], lr=lr, backend="triton", **scalars)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay_match_eager_steps():
    _triton_ready()
    sizes = [3, 1000, 70000, 0]
    graphed = _adamw_lists(sizes, seed=1)
    eager = {k: [t.clone() for t in v] for k, v in graphed.items()}
    lr = torch.tensor(1e-2, device="cuda")
    scale = torch.tensor(4.0, device="cuda")
    found_inf = torch.zeros((), device="cuda")
    kwargs = {"lr": lr, "grad_scale": scale, "found_inf": found_inf, "amsgrad": False}

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _adamw(graphed, "triton", **kwargs)  # warm-up: compile and build the tables
    torch.cuda.current_stream().wait_stream(side)
    _adamw(eager, "triton", **kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _adamw(graphed, "triton", **kwargs)
    for step in range(4):
        new_grads = _adamw_lists(sizes, seed=10 + step)["grads"]
        for g, new in zip(graphed["grads"], new_grads, strict=True):
            g.copy_(new)  # the graph reads the grads at their captured addresses
        eager["grads"] = [g.clone() for g in new_grads]
        found_inf.fill_(1.0 if step == 2 else 0.0)  # a skipped step, decided on the device
        graph.replay()
        _adamw(eager, "triton", **kwargs)
    torch.cuda.synchronize()
    for name in graphed:
        for a, b in zip(graphed[name], eager[name], strict=True):
            assert torch.equal(a, b), name
    assert [s.item() for s in graphed["steps"]] == [4.0] * len(sizes)  # 1 + 4 - 1 skipped


@pytest.mark.parametrize("op", ["adamw_", "lamb_", "sgd_"])
def test_step_counts_over_many_chunks(op):
    """The last chunk of a tensor to finish advances its step count exactly once, however the
    programs of its chunks interleave (hundreds of chunks per tensor)."""
    _triton_ready()
    sizes = [300 * 65536 + 17, 5, 65536 * 64]
    lists = _adamw_lists(sizes, seed=2)
    want = {k: [t.clone() for t in v] for k, v in lists.items()}
    for _ in range(5):
        for lst, backend in ((lists, "triton"), (want, "reference")):
            if op == "adamw_":
                _adamw(lst, backend, lr=1e-3)
            elif op == "lamb_":
                ops.lamb_(lst["params"], lst["grads"], lst["exp_avgs"], lst["exp_avg_sqs"],
                          lst["steps"], lr=1e-3, backend=backend)  # fmt: skip
            else:
                ops.sgd_(lst["params"], lst["grads"], lst["exp_avgs"], lst["steps"], lr=1e-3,
                         momentum=0.9, backend=backend)  # fmt: skip
    assert [s.item() for s in lists["steps"]] == [5.0] * len(sizes)
    for a, b in zip(lists["params"], want["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
