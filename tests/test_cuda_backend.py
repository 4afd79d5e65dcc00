"""What is specific to the ``cuda`` backend (csrc/cuda/): agreement with the ``cpu`` backend
(the same math headers, pinned contraction), the vector and scalar paths agreeing bit for bit,
deterministic reductions, tensors of 2^31 elements and more, no host syncs, CUDA-graph
capture and replay, one launch per op whatever the tensor count, and the device-table cache.

Every test here needs a GPU (``cuda`` marker: skipped cleanly without one). The oracle
matrix of the shared harness covers the semantics; this file covers the machinery, and (last
section) runs Muon's passes, Adafactor and Schedule-Free AdamW on cuda against the oracles
their own test files use on the CPU backends.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import _contract, ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not fusedopt.backends()["cuda"].usable,
        reason=f"cuda backend unusable: {fusedopt.backends()['cuda'].reason}",
    ),
]

STEP_OPS = ("adamw_", "lamb_", "lion_", "sgd_")
STATES = {
    "adamw_": ("exp_avgs", "exp_avg_sqs"),
    "lamb_": ("exp_avgs", "exp_avg_sqs"),
    "lion_": ("exp_avgs",),
    "sgd_": ("momentum_buffers",),
}
HAS_STEPS = {"adamw_": True, "lamb_": True, "lion_": False, "sgd_": True}
HYPERS = {
    "adamw_": dict(lr=1e-2, weight_decay=0.1),
    "lamb_": dict(lr=1e-2, weight_decay=0.1),
    "lion_": dict(lr=1e-3, weight_decay=0.1),
    "sgd_": dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
}
# (param dtype, grad dtype, master weights): every storage combination of DESIGN.md §3.
COMBOS = [
    (torch.float32, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.float16, True),
    (torch.float16, torch.float32, False),
    (torch.float64, torch.float64, False),
]
# Empty, shorter than one vector, odd, and spanning several 64K-element work items.
SIZES = (0, 1, 7, 33, 1000, 3 * 65536 + 5)
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


def _map(x, fn):
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_map(v, fn) for v in x]
    return fn(x)


def make_case(op, dtype, grad_dtype, master, sizes=SIZES, seed=0, device="cuda"):
    """One call's tensors, built on the CPU from a seed, then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    state_dtype = torch.float32 if master else dtype
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    case = {
        "params": params,
        "grads": [torch.randn(n, generator=g).to(grad_dtype) for n in sizes],
        "states": {
            s: [torch.rand(n, generator=g).to(state_dtype) for n in sizes] for s in STATES[op]
        },
        "master_params": [p.float() for p in params] if master else [],
        # 0: the first call takes SGD's first-step rule (buf = g), the next ones do not.
        "steps": [torch.zeros(()) for _ in sizes] if HAS_STEPS[op] else [],
    }
    return _map(case, lambda t: t.to(device))


def run_step(op, case, backend, **extra):
    args = [case["params"], case["grads"], *case["states"].values()]
    if HAS_STEPS[op]:
        args.append(case["steps"])
    kwargs = {**HYPERS[op], **extra}
    getattr(ops, op)(*args, master_params=case["master_params"], backend=backend, **kwargs)


def flat(case) -> list[torch.Tensor]:
    return [t for v in case.values() for t in (flat(v) if isinstance(v, dict) else v)]


def assert_ulps(got, want, max_ulps: int, what: str, slack: torch.Tensor | None = None) -> None:
    """|got - want| <= max_ulps units in the last place of want (in want's dtype), plus an
    optional per-element ``slack``."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    tiny = torch.finfo(want.dtype).tiny
    ulp = torch.pow(2.0, torch.floor(torch.log2(w.abs().clamp(min=tiny))) - MANTISSA[want.dtype])
    bound = max_ulps * ulp + (0 if slack is None else slack.cpu())
    ok = ((g - w).abs() <= bound) | (g == w) | (g.isnan() & w.isnan())
    assert bool(ok.all()), f"{what}: {int((~ok).sum())} elements beyond {max_ulps} ulps"


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize(
    "combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}-{'master' if c[2] else 'plain'}"
)
def test_step_matches_cpu_backend(op, combo):
    # Same headers, pinned contraction, IEEE sqrt and division on both: the only expected
    # difference is double pow() in the bias corrections (CUDA's is not correctly rounded),
    # which can move an fp32 scalar by 1 ulp: 2 ulps per element. Two steps, to cover the SGD
    # first-step rule. LAMB's trust ratio also comes from norms summed in another order
    # (relative error up to ~sqrt(n) * eps32), which scales the param update lr*r*u; its
    # params get that share of their own update on top (one step, so the update is known).
    dtype, grad_dtype, master = combo
    got = make_case(op, dtype, grad_dtype, master)
    want = make_case(op, dtype, grad_dtype, master, device="cpu")
    before = _map(want, torch.clone)
    scalars = dict(grad_scale=torch.tensor(2.0), clip_coef=torch.tensor(0.5))
    for _ in range(1 if op == "lamb_" else 2):
        run_step(op, got, "cuda", **_map(scalars, lambda t: t.cuda()))
        run_step(op, want, "cpu", **scalars)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    ratio_error = 4 * math.sqrt(max(SIZES)) * torch.finfo(opmath).eps
    for name in want:
        for i, (a, b, b0) in enumerate(zip(flat({0: got[name]}), flat({0: want[name]}),
                                           flat({0: before[name]}), strict=True)):  # fmt: skip
            slack = None
            if op == "lamb_" and name in ("params", "master_params"):
                slack = ratio_error * (b.double() - b0.double()).abs()
            assert_ulps(a, b, 2, f"{op} {name}[{i}]", slack)


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_views_match_aligned_bitwise(op, dtype):
    """Views at an odd element offset take the scalar path; the math is the same, so the
    bits must be too."""
    aligned = make_case(op, dtype, dtype, False)

    def shifted(t):
        buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buffer[1:].view(t.shape)
        view.copy_(t)
        return view

    unaligned = _map(aligned, shifted)
    assert all(t.data_ptr() % 16 for t in unaligned["params"] if t.numel())
    run_step(op, aligned, "cuda")
    run_step(op, unaligned, "cuda")
    for a, b in zip(flat(aligned), flat(unaligned), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", STEP_OPS)
def test_found_inf_changes_nothing(op):
    case = make_case(op, torch.bfloat16, torch.float32, True)
    before = _map(case, torch.clone)
    run_step(op, case, "cuda", found_inf=torch.tensor(2.0, device="cuda"))
    for a, b in zip(flat(case), flat(before), strict=True):
        assert torch.equal(a, b)


def test_sgd_momentum_zero_tensors_step_plain():
    """[note: sgd momentum 0]: in a call with buffers, a tensor whose momentum is 0 steps as
    momentum-free SGD and leaves its buffer and step count alone."""
    case = make_case("sgd_", torch.float32, torch.float32, False)
    want = _map(case, lambda t: t.cpu())
    momentum = [0.9 if i % 2 else 0.0 for i in range(len(SIZES))]
    before = _map(case, torch.clone)
    for backend, c in (("cuda", case), ("reference", want)):
        for _ in range(2):
            ops.sgd_(c["params"], c["grads"], c["states"]["momentum_buffers"], c["steps"],
                     lr=1e-2, momentum=momentum, dampening=0.1, backend=backend)  # fmt: skip
    for i, m in enumerate(momentum):
        buf, step = case["states"]["momentum_buffers"][i], case["steps"][i]
        if m == 0.0:
            assert torch.equal(buf, before["states"]["momentum_buffers"][i])
            assert step.item() == 0.0
        else:
            assert step.item() == 2.0
        for name in ("params",):
            assert_ulps(case[name][i], want[name][i], 2, f"sgd_ {name}[{i}]")
        assert_ulps(buf, want["states"]["momentum_buffers"][i], 2, f"buf[{i}]")


def test_grad_norm_matches_cpu_and_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    tensors = [torch.randn(n, generator=gen).to(dtypes[i % 4]) for i, n in enumerate(SIZES * 3)]
    gpu = [t.cuda() for t in tensors]
    scale = torch.tensor(4.0)
    for norm_type in (2.0, math.inf):
        want = ops.grad_norm(tensors, norm_type, per_tensor=True, grad_scale=scale, backend="cpu")
        runs = [
            ops.grad_norm(gpu, norm_type, per_tensor=True, grad_scale=scale.cuda(), backend="cuda")
            for _ in range(3)
        ]
        for run in runs[1:]:  # the same bits on every run
            assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))
        total, per, found_inf = (t.cpu() for t in runs[0])
        # Different (both fixed) summation orders: error grows like sqrt(n) * eps.
        rtol = 4 * math.sqrt(max(SIZES)) * torch.finfo(torch.float32).eps
        torch.testing.assert_close(total, want.total, rtol=rtol, atol=0)
        torch.testing.assert_close(per, want.per_tensor, rtol=rtol, atol=0)
        assert found_inf.item() == 0.0
    gpu[4][3] = math.nan
    assert ops.grad_norm(gpu, backend="cuda").found_inf.item() == 1.0


def test_scale_mixed_dtypes_and_found_inf():
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    cpu = [torch.randn(n).to(dtypes[i % 4]) for i, n in enumerate(SIZES)]
    gpu = [t.cuda() for t in cpu]
    found = torch.zeros((), device="cuda")
    ops.scale_(gpu, torch.tensor(0.37, device="cuda"), found, backend="cuda")
    ops.scale_(cpu, torch.tensor(0.37), backend="cpu")
    for a, b in zip(gpu, cpu, strict=True):
        assert torch.equal(a.cpu(), b)  # one multiplication, one rounding
    assert found.item() == 0.0
    gpu[5][-1] = math.inf  # the scalar tail of the last chunk
    ops.scale_(gpu, torch.tensor(1.0, device="cuda"), found, backend="cuda")
    assert found.item() == 1.0


def _all_ops_on_device_scalars(n_tensors: int = 5):
    """Closures calling every cuda op directly (the binding, no functional layer), with every
    scalar a device tensor, as a capturable training step would."""
    dev = "cuda"
    scalars = dict(
        lr_tensor=torch.tensor(1e-3, device=dev),
        grad_scale=torch.tensor(2.0, device=dev),
        clip_coef=torch.tensor(0.5, device=dev),
        found_inf=torch.zeros((), device=dev),
    )
    sizes = SIZES[:n_tensors]
    calls = []
    for op in STEP_OPS:
        case = make_case(op, torch.bfloat16, torch.float32, True, sizes=sizes)
        n = len(sizes)
        ones, wd = [1.0] * n, [0.01] * n
        handle = _contract.op_handle(op, "cuda")
        p, g, m = case["params"], case["grads"], case["master_params"]
        st, steps = list(case["states"].values()), case["steps"]
        sc = tuple(scalars.values())
        if op == "adamw_":
            hypers = ops.hyper_table(ones, [0.9] * n, [0.999] * n, [1e-8] * n, wd, device=dev)
            args = (p, g, *st, [], [], [], m, steps, *hypers, True, False, False, True, *sc)
        elif op == "lamb_":
            hypers = ops.hyper_table(ones, [0.9] * n, [0.999] * n, [1e-6] * n, wd, device=dev)
            args = (p, g, *st, m, steps, *hypers, True, True, False, False, *sc)
        elif op == "lion_":
            hypers = ops.hyper_table(ones, [0.9] * n, [0.99] * n, wd, device=dev)
            args = (p, g, *st, m, *hypers, False, *sc)
        else:
            hypers = ops.hyper_table(ones, [0.9] * n, [0.0] * n, wd, device=dev)
            args = (p, g, *st, m, steps, *hypers, True, False, *sc)
        calls.append((op, case, lambda handle=handle, args=args: handle(*args)))
    grads = [torch.randn(n, device=dev).to(torch.bfloat16) for n in sizes]
    norm = _contract.op_handle("grad_norm", "cuda")
    calls.append(("grad_norm", {}, lambda: norm(grads, 2.0, True, scalars["grad_scale"])))
    scale = _contract.op_handle("scale_", "cuda")
    calls.append(("scale_", {}, lambda: scale(grads, scalars["clip_coef"], scalars["found_inf"])))
    return calls


def test_no_host_sync():
    calls = _all_ops_on_device_scalars()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # a cold table (upload) and a cached one
            for _, _, call in calls:
                call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", STEP_OPS)
def test_cuda_graph_capture_and_replay(op):
    """A captured step replays exactly as eager steps, also after eager calls on other
    tensors have rewritten the table cache in between."""
    graphed = make_case(op, torch.bfloat16, torch.float32, True)
    eager = _map(graphed, torch.clone)
    lr = torch.tensor(3e-3, device="cuda")
    found_inf = torch.zeros((), device="cuda")

    def step(case):
        run_step(op, case, "cuda", lr=lr, found_inf=found_inf)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graphed)  # warm-up outside the capture, as torch's docs ask
    torch.cuda.current_stream().wait_stream(side)
    step(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed)
    other = make_case(op, torch.bfloat16, torch.float32, True, seed=7)
    for k in range(3):
        lr.fill_(1e-3 * (k + 1))  # a device lr changes between replays
        graph.replay()
        step(eager)
        run_step(op, other, "cuda", lr=lr)  # other tables through the cache
    found_inf.fill_(1.0)
    graph.replay()  # skipped
    torch.cuda.synchronize()
    for a, b in zip(flat(graphed), flat(eager), strict=True):
        assert torch.equal(a, b)


def _kernel_launches(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and "Memcpy" not in e.name
        and "Memset" not in e.name
    ]


@pytest.mark.parametrize("op", STEP_OPS)
def test_launches_do_not_grow_with_tensor_count(op):
    """2 tensors or 600 (torch's and Apex's kernel-argument tables stop at ~110): the same
    kernels, once each, when the table is cached; a new table adds only its upload."""
    counts = {}
    for n in (2, 600):
        case = make_case(
            op, torch.bfloat16, torch.bfloat16, False, sizes=[1000 + i for i in range(n)]
        )
        cold = _kernel_launches(lambda case=case: run_step(op, case, "cuda"))
        warm = _kernel_launches(lambda case=case: run_step(op, case, "cuda"))
        uploads = [k for k in cold if "write_table" in k]
        row_bytes = 96  # sizeof(Row), csrc/cuda/common.cuh (7 slots, 3 words, 2 ints, aligned)
        # (none when an earlier test left an identical table, same addresses, in the cache)
        assert len(uploads) <= math.ceil((8 * (n + 1) + row_bytes * n) / (30 * 1024))
        assert sorted(k for k in cold if "write_table" not in k) == sorted(warm)
        counts[n] = sorted(warm)
    assert counts[2] == counts[600]
    assert len(counts[2]) == {"adamw_": 2, "lamb_": 4, "lion_": 1, "sgd_": 2}[op]


@pytest.mark.parametrize("op", STEP_OPS)
def test_float_lr_schedule_keeps_the_table_cached(op):
    """[note: hyper table] (fusedopt/_contract.py): a new float lr each step rewrites the
    hyperparameter table, not the tensor table: no table upload after the first step; the lr
    it applies is the new one."""
    got = make_case(op, torch.float32, torch.float32, False)
    want = make_case(op, torch.float32, torch.float32, False, device="cpu")
    launches = []
    for k, lr in enumerate((1e-2, 5e-3, 2.5e-3)):
        launches.append(_kernel_launches(lambda lr=lr: run_step(op, got, "cuda", lr=lr)))
        run_step(op, want, "cpu", lr=lr)
        if k:
            assert not [name for name in launches[-1] if "write_table" in name], launches
    # LAMB's params also carry its trust ratio's summation-order error (see
    # test_step_matches_cpu_backend); step_lr is shared, so its states suffice here.
    names = ("states",) if op == "lamb_" else tuple(want)
    for name in names:
        for a, b in zip(flat({0: got[name]}), flat({0: want[name]}), strict=True):
            assert_ulps(a, b, 2, f"{op} {name} after 3 lrs")


def test_two_to_the_31_elements():
    """64-bit indexing: a bf16 tensor of 2^31 + 13 elements, checked on both sides of
    element 2^31 and at its very end (the scalar tail), for scale_, grad_norm and adamw_."""
    n = 2**31 + 13
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    probe = torch.tensor([0, 2**31 - 1, 2**31, n - 1])
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    x[probe.cuda()] = torch.tensor([1.5, 2.5, 3.5, 4.5], dtype=torch.bfloat16, device="cuda")
    ops.scale_([x], torch.tensor(2.0, device="cuda"), backend="cuda")
    assert x[probe.cuda()].float().tolist() == [3.0, 5.0, 7.0, 9.0]
    assert x[2**31 + 1].item() == 2.0
    norm = ops.grad_norm([x], math.inf, backend="cuda")
    assert norm.total.item() == 9.0
    x.fill_(1.0)
    assert math.isclose(ops.grad_norm([x], backend="cuda").total.item(), math.sqrt(n), rel_tol=1e-6)

    # adamw_: the tail of the huge tensor must step exactly like the same values alone.
    g = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    tail = slice(2**31 - 100, n)
    alone = [t[tail].clone() for t in (x, g, m, v)]
    steps = [torch.zeros((), device="cuda")]
    ops.adamw_([x], [g], [m], [v], steps, lr=1e-2, backend="cuda")
    ops.adamw_([alone[0]], [alone[1]], [alone[2]], [alone[3]], [torch.zeros((), device="cuda")],
               lr=1e-2, backend="cuda")  # fmt: skip
    for big, small in zip((x, m, v), (alone[0], alone[2], alone[3]), strict=True):
        assert torch.equal(big[tail], small)
    assert steps[0].item() == 1.0


# ---------------------------------------------------------------------------------------------
# The optimizers of issue #16 on cuda, each against the oracle its own test file uses on the
# CPU backends, with that file's inputs and tolerance (imported, so the two cannot drift).


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("momentum", [0.95, 0.3])
@pytest.mark.parametrize("storage", range(4), ids=["fp32", "fp64", "bf16-master", "fp16-master"])
def test_muon_passes_equal_the_reference_bit_for_bit(storage, momentum, nesterov):
    """muon_momentum_ then muon_apply_ on cuda leave the reference's bits (the same math
    headers as the cpu backend, which tests/test_optim_muon.py proves bit for bit): grad
    scale, clip, per-tensor lr, decay and lr ratio, both lerp forms, masters."""
    from test_optim_muon import PASS_STORAGES, _pass_tensors

    dtype, master = PASS_STORAGES[storage]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    runs = {}
    for backend, device in (("reference", "cpu"), ("cuda", "cuda")):
        t = _map(_pass_tensors(dtype, master, seed=3), lambda x, d=device: x.to(d))
        kwargs = dict(
            lr=[2e-2, 3e-2, 2e-2], momentum=momentum, weight_decay=[0.1, 0.0, 0.1],
            lr_ratio=[1.5, 1.0, 0.5], nesterov=nesterov,
            grad_scale=torch.tensor(4.0, dtype=opmath, device=device),
            clip_coef=torch.tensor(0.75, dtype=opmath, device=device), backend=backend,
        )  # fmt: skip
        ops.muon_momentum_(**t, **kwargs)
        ops.muon_apply_(**t, **kwargs)
        runs[backend] = t
    for key, tensors in runs["reference"].items():
        for k, (want, got) in enumerate(zip(tensors, runs["cuda"][key], strict=True)):
            got = got.cpu()
            if dtype == torch.float64:
                # The reference's fp64 FMA rounds twice (reference.ops._fma), CUDA's once:
                # the bound test_optim_muon.py derives for the cpu backend.
                bound = 2.0**-52 * want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=f"{key}[{k}]")
                continue
            assert torch.equal(want.view(-1).view(torch.uint8), got.view(-1).view(torch.uint8)), (
                f"{key}[{k}]"
            )


@pytest.mark.parametrize("config", ["default", "wd_maximize", "eps_d_decay"])
def test_adafactor_trajectory_equals_torch_in_float64(config):
    """25 steps of fusedopt.Adafactor on cuda against torch.optim.Adafactor on the CPU, fp64
    params (matrices, batched 3-d, a column and a row matrix, vectors, a scalar): the
    tolerance of test_optim_adafactor.py (float64 rounding in two orders of operations; a
    CUDA fp64 pow may be an ulp off, 1e-16 relative, far inside it)."""
    from test_optim_adafactor import CONFIGS, _grads, _params, _run

    grads = _grads(25)
    ours = [p.cuda() for p in _params()]
    theirs = _params()
    opt = _run(fusedopt.Adafactor, ours, _map(grads, torch.Tensor.cuda), **CONFIGS[config],
               backend="cuda")  # fmt: skip
    ref = _run(torch.optim.Adafactor, theirs, grads, **CONFIGS[config])
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-12, atol=1e-14)
        mine, torchs = opt.state[p], ref.state[q]
        for key in torchs:
            torch.testing.assert_close(mine[key].cpu(), torchs[key], rtol=1e-12, atol=1e-20,
                                       msg=key)  # fmt: skip


def test_adafactor_chunked_reductions_equal_torch_in_float64():
    """Params of several reduction chunks ([note: adafactor sums]): the cuda kernels' row,
    column and sum-of-squares folds over chunks give torch's trajectory to float64 rounding
    (test_optim_adafactor.py's shapes, inputs and tolerance)."""
    from test_optim_adafactor import assert_chunked_trajectory_is_torchs

    assert_chunked_trajectory_is_torchs("cuda", "cuda")


def test_schedulefree_trajectory_equals_the_anchor():
    """40 steps of fusedopt.ScheduleFreeAdamW on cuda beside schedulefree's AdamWScheduleFree
    on the CPU (two groups, warmup, r, weight_lr_power, decay; eval()/train() switches every
    9 steps): test_optim_schedulefree.py's inputs, checks and fp32 tolerance (the same math
    in another order of operations)."""
    pytest.importorskip("schedulefree")
    from test_optim_schedulefree import _assert_same_run, run_with_switches

    _assert_same_run(*run_with_switches("cuda", "cuda"), "train, end")


@pytest.mark.parametrize("op", ["adamw_", "lion_", "sgd_", "lamb_"])
@pytest.mark.parametrize(
    "dtype,master", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "fp32")]
)
def test_8bit_states_equal_the_reference_bit_for_bit(op, dtype, master):
    """[note: 8-bit states] on cuda, every op that has them (``lamb_`` included: refused on
    cuda until issue #15 gave it its kernels): three steps of each option of
    test_state_bits.py's Q8_OPS, with its inputs; codes, scales, params, masters and steps
    bit for bit the reference's. ``lamb_`` runs as its two passes: the sums within a few
    ulps of the reference's (another summation order), both apply passes on the cuda sums
    (test_state_bits._step_both's protocol)."""
    from test_state_bits import Q8_OPS, SHAPES, _assert_same, _lists

    def on_cuda(x):
        return _map(x, lambda v: v.cuda() if isinstance(v, torch.Tensor) else v)

    for options in Q8_OPS[op].options.values():
        kw = {**Q8_OPS[op].hypers, **options}
        want = _lists(SHAPES, dtype, master, op=op)
        got = on_cuda(want)
        for _ in range(3):
            if op != "lamb_":
                getattr(ops, op)(**want, backend="reference", **kw)
                getattr(ops, op)(**got, backend="cuda", **on_cuda(kw))
                continue
            want_sq = ops.lamb_direction_(**want, backend="reference", **kw)
            got_sq = ops.lamb_direction_(**got, backend="cuda", **on_cuda(kw))
            torch.testing.assert_close(got_sq.cpu(), want_sq, rtol=1e-5, atol=0.0)
            ops.lamb_apply_(**want, sq_norms=got_sq.cpu(), backend="reference", **kw)
            ops.lamb_apply_(**got, sq_norms=got_sq, backend="cuda", **on_cuda(kw))
        _assert_same(_map(got, torch.Tensor.cpu), want)
