"""What is specific to the ``cpu`` backend (fusedopt._C): bit-exact agreement with the fp32
reference where both round every operation once, thread-count independence of reductions,
and the binding's own input checks (the ops called directly, bypassing ``fusedopt.ops``)."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import ops

pytestmark = pytest.mark.skipif(
    not fusedopt.backends()["cpu"].usable, reason="fusedopt._C is not built"
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Empty, shorter than a vector, odd, and spanning several 64K-element work items.
SIZES = (0, 1, 7, 33, 1000, 3 * 65536 + 5)


def _tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_matches_reference_bitwise(dtype):
    # One multiplication in opmath, one rounding: there is only one right answer.
    got, want = _tensors(dtype), _tensors(dtype)
    found_got, found_want = torch.zeros(()), torch.zeros(())
    ops.scale_(got, torch.tensor(1.7), found_got, backend="cpu")
    ops.scale_(want, torch.tensor(1.7), found_want, backend="reference")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert found_got.item() == 0.0
    got[4][10] = math.inf
    ops.scale_(got, torch.tensor(1.0), found_got, backend="cpu")
    assert found_got.item() == 1.0


def test_scale_mixed_dtypes_in_one_call():
    got = [torch.randn(100).to(d) for d in DTYPES]
    want = [t.clone() for t in got]
    ops.scale_(got, torch.tensor(0.3), backend="cpu")
    ops.scale_(want, torch.tensor(0.3), backend="reference")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Step ops against the float64 oracle (fusedopt.reference run on float64 copies).

F64 = torch.float64
# fp32 params and master weights, over a trajectory: each step rounds a handful of fp32
# operations per element (a few 6e-8 relative), and the float64 oracle does not; over
# STEPS steps the params drift from it by well under 1e-6 relative, plus states that
# start at 0 (atol).
FP32_TOL = {"rtol": 2e-6, "atol": 1e-7}
# bf16/fp16 storage without master weights, one step from identical inputs: the result is
# the fp32 math rounded once to storage, so it is within one storage ulp of the rounded
# oracle (2^-8 relative for bf16, 2^-11 for fp16).
LOW_TOL = {
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 1e-6},
}
STEPS = 4
SHAPES = [(0,), (1,), (7,), (33, 5), (1000,), (70001,)]


def _lists(op, dtype, master, seed=0, shapes=SHAPES, amsgrad=False, momentum=True):
    """Inputs for a step op: params, grads and states as the op expects them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    state_dtype = torch.float32 if master else dtype
    lists = {"params": params}
    if master:
        lists["master_params"] = [
            p.float() + 1e-3 * torch.randn(p.shape, generator=g) for p in params
        ]
        for p, m in zip(params, lists["master_params"], strict=True):
            p.copy_(m)  # param == master.to(dtype)

    def state(positive=False):
        out = [torch.randn(s, generator=g) for s in shapes]
        return [(t.abs() if positive else t).mul(0.1).to(state_dtype) for t in out]

    if op == "adamw_":
        lists.update(
            exp_avgs=state(), exp_avg_sqs=state(True), steps=[torch.tensor(2.0) for _ in shapes]
        )
        if amsgrad:
            lists["max_exp_avg_sqs"] = state(True)
    elif op == "lamb_":
        lists.update(
            exp_avgs=state(), exp_avg_sqs=state(True), steps=[torch.tensor(2.0) for _ in shapes]
        )
    elif op == "lion_":
        lists.update(exp_avgs=state())
    elif op == "sgd_" and momentum:
        lists.update(
            momentum_buffers=state(), steps=[torch.tensor(float(i % 2)) for i in range(len(shapes))]
        )
    return lists


def _grads(params, seed, dtype=None):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=g).mul(0.5).to(dtype or p.dtype) for p in params]


def _f64(lists):
    return {k: [t.to(F64) if k != "steps" else t.clone() for t in v] for k, v in lists.items()}


def _hypers(op, n):
    """Per-tensor hyperparameters that differ between tensors (two "param groups")."""
    pick = lambda a, b: [a if i % 2 == 0 else b for i in range(n)]  # noqa: E731
    if op == "adamw_":
        return dict(lr=pick(1e-2, 3e-3), beta1=pick(0.9, 0.8), beta2=pick(0.999, 0.99),
                    eps=pick(1e-8, 1e-6), weight_decay=pick(0.1, 0.0))  # fmt: skip
    if op == "lamb_":
        return dict(lr=pick(1e-2, 3e-3), beta1=pick(0.9, 0.8), beta2=pick(0.999, 0.99),
                    eps=pick(1e-6, 1e-5), weight_decay=pick(0.01, 0.0))  # fmt: skip
    if op == "lion_":
        return dict(lr=pick(1e-3, 3e-4), beta1=pick(0.9, 0.95), beta2=pick(0.99, 0.98),
                    weight_decay=pick(0.1, 0.0))  # fmt: skip
    return dict(lr=pick(1e-2, 3e-3), momentum=pick(0.9, 0.0), dampening=pick(0.1, 0.0),
                weight_decay=pick(1e-2, 0.0))  # fmt: skip


OP_FLAGS = {
    "adamw_": [
        dict(),
        dict(decoupled=False, maximize=True),
        dict(amsgrad=True),
        dict(bias_correction=False),
    ],
    "lamb_": [
        dict(),
        dict(trust_clip=True, grad_averaging=False),
        dict(always_adapt=True, bias_correction=False),
    ],
    "lion_": [dict(), dict(maximize=True)],
    "sgd_": [dict(), dict(nesterov=True, maximize=True)],
}
CASES = [(op, flags) for op, variants in OP_FLAGS.items() for flags in variants]


def _run(op, lists, grads, hypers, flags, backend, **scalars):
    fn = getattr(ops, op)
    kw = {
        k: v
        for k, v in lists.items()
        if k not in ("params", "exp_avgs", "exp_avg_sqs", "steps", "momentum_buffers")
    }
    args = [lists["params"], grads]
    if op in ("adamw_", "lamb_"):
        args += [lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"]]
    elif op == "lion_":
        args += [lists["exp_avgs"]]
    elif "momentum_buffers" in lists:
        args += [lists["momentum_buffers"], lists["steps"]]
    fn(*args, **kw, **hypers, **flags, **scalars, backend=backend)


def _excused_lion(lists64, grads64, hypers, flags):
    """Elements where Lion's sign(c) may legitimately flip: |c| within fp32 rounding of 0."""
    out = []
    for i, (m, g) in enumerate(zip(lists64["exp_avgs"], grads64, strict=True)):
        b1 = hypers["beta1"][i]
        c = b1 * m + (1 - b1) * (-g if flags.get("maximize") else g)
        out.append(c.abs() < 1e-6 * (m.abs() + g.abs() + 1e-30))
    return out


@pytest.mark.parametrize(("op", "flags"), CASES, ids=[f"{o}{f}" for o, f in CASES])
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16+master"])
def test_step_trajectory_matches_float64_oracle(op, flags, master):
    """fp32 params (or bf16 params with fp32 masters) over STEPS steps vs the float64 oracle."""
    dtype = torch.bfloat16 if master else torch.float32
    lists = _lists(op, dtype, master, amsgrad=flags.get("amsgrad", False))
    oracle = _f64({k: v for k, v in lists.items() if not (master and k == "params")})
    if master:
        oracle["params"] = [m.to(F64) for m in lists["master_params"]]
        del oracle["master_params"]
    hypers = _hypers(op, len(SHAPES))
    for step in range(STEPS):
        grads = _grads(lists["params"], step, dtype)
        scalars = (
            dict(grad_scale=torch.tensor(4.0), clip_coef=torch.tensor(0.75)) if step % 2 else {}
        )
        excused = (
            _excused_lion(oracle, [g.to(F64) for g in grads], hypers, flags)
            if op == "lion_"
            else None
        )
        _run(op, lists, grads, hypers, flags, "cpu", **scalars)
        _run(op, oracle, [g.to(F64) for g in grads], hypers, flags, "reference", **scalars)
        got_params = lists["master_params"] if master else lists["params"]
        for i, (a, b) in enumerate(zip(got_params, oracle["params"], strict=True)):
            keep = ~excused[i] if excused is not None else torch.ones_like(a, dtype=torch.bool)
            torch.testing.assert_close(
                a.to(F64)[keep],
                b[keep],
                **FP32_TOL,
                msg=lambda m, i=i, step=step: f"params[{i}], step {step}: {m}",
            )
            if excused is not None:  # continue from the oracle's values where sign(c) may differ
                a.copy_(torch.where(keep, a.to(F64), b))
        if master:
            for p, m in zip(lists["params"], lists["master_params"], strict=True):
                assert torch.equal(p, m.to(dtype)), "param must equal master.to(dtype) bit for bit"
        for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers"):
            for i, (a, b) in enumerate(zip(lists.get(name, []), oracle.get(name, []), strict=True)):
                torch.testing.assert_close(
                    a.to(F64), b, **FP32_TOL, msg=lambda m, i=i, n=name: f"{n}[{i}]: {m}"
                )
                if excused is not None:
                    a.copy_(b)
        for a, b in zip(lists.get("steps", []), oracle.get("steps", []), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("op", "flags"), CASES, ids=[f"{o}{f}" for o, f in CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", ["param", "fp32"])
def test_low_precision_step_matches_oracle(op, flags, dtype, grad_dtype):
    """bf16/fp16 storage (states in the param dtype), one step from identical inputs."""
    lists = _lists(op, dtype, False, amsgrad=flags.get("amsgrad", False))
    grads = _grads(lists["params"], 0, torch.float32 if grad_dtype == "fp32" else dtype)
    oracle = _f64(lists)
    hypers = _hypers(op, len(SHAPES))
    excused = (
        _excused_lion(oracle, [g.to(F64) for g in grads], hypers, flags) if op == "lion_" else None
    )
    _run(op, lists, grads, hypers, flags, "cpu", grad_scale=torch.tensor(2.0))
    _run(
        op,
        oracle,
        [g.to(F64) for g in grads],
        hypers,
        flags,
        "reference",
        grad_scale=torch.tensor(2.0),
    )
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers"):
        for i, (a, b) in enumerate(zip(lists.get(name, []), oracle.get(name, []), strict=True)):
            keep = (
                ~excused[i]
                if excused is not None and name == "params"
                else torch.ones_like(a, dtype=torch.bool)
            )
            torch.testing.assert_close(
                a.to(F64)[keep],
                b.to(dtype).to(F64)[keep],
                **LOW_TOL[dtype],
                msg=lambda m, i=i, n=name: f"{n}[{i}]: {m}",
            )


@pytest.mark.parametrize(("op", "flags"), CASES, ids=[f"{o}{f}" for o, f in CASES])
def test_float64_params_match_oracle(op, flags):
    lists = _lists(op, F64, False, amsgrad=flags.get("amsgrad", False))
    grads = _grads(lists["params"], 0)
    oracle = _f64(lists)
    hypers = _hypers(op, len(SHAPES))
    _run(op, lists, grads, hypers, flags, "cpu", clip_coef=torch.tensor(0.5))
    _run(op, oracle, grads, hypers, flags, "reference", clip_coef=torch.tensor(0.5))
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers"):
        for a, b in zip(lists.get(name, []), oracle.get(name, []), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("op", list(OP_FLAGS))
def test_found_inf_skips_everything_bitwise(op):
    lists = _lists(op, torch.bfloat16, True)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    grads = _grads(lists["params"], 0)
    _run(op, lists, grads, _hypers(op, len(SHAPES)), {}, "cpu", found_inf=torch.tensor(2.0))
    for name in lists:
        for a, b in zip(lists[name], before[name], strict=True):
            assert torch.equal(a, b), name


def test_lr_tensor_overrides_lr():
    lists, twin = _lists("adamw_", torch.float32, False), _lists("adamw_", torch.float32, False)
    grads = _grads(lists["params"], 0)
    n = len(SHAPES)
    hypers = _hypers("adamw_", n)
    per = torch.tensor([1e-2 * (i + 1) for i in range(n)])
    _run("adamw_", lists, grads, {**hypers, "lr": per}, {}, "cpu")
    _run("adamw_", twin, grads, {**hypers, "lr": [float(x) for x in per]}, {}, "cpu")
    for a, b in zip(lists["params"], twin["params"], strict=True):
        # lr read from an fp32 tensor is that fp32 value, widened: the same as the float
        # list holding those fp32 values.
        assert torch.equal(a, b)


def test_dense_layouts_and_odd_offsets():
    """channels_last params and views at odd storage offsets step like contiguous copies."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4 * 3 * 5 * 7, generator=g)
    cl = base.view(4, 3, 5, 7).to(memory_format=torch.channels_last)
    backing = torch.randn(1 + 1001, generator=g)
    odd = backing[1:]  # data pointer 4 bytes past the allocation: not vector-aligned
    params = [cl, odd]
    grads = [
        torch.randn(p.shape, generator=g).contiguous(memory_format=torch.channels_last)
        if p.dim() == 4
        else torch.randn(p.shape, generator=g)
        for p in params
    ]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    flat = [p.contiguous().clone() for p in params]
    flat_g = [x.contiguous() for x in grads]
    fm = [torch.zeros_like(p) for p in flat]
    fv = [torch.zeros_like(p) for p in flat]
    fs = [torch.zeros(()) for _ in flat]
    ops.adamw_(params, grads, m, v, steps, lr=1e-2, backend="cpu")
    ops.adamw_(flat, flat_g, fm, fv, fs, lr=1e-2, backend="cpu")
    for a, b in zip(params, flat, strict=True):
        assert torch.equal(a.contiguous(), b)
    assert cl.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------
# grad_norm


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm_matches_oracle_and_is_thread_count_independent(norm_type):
    tensors = []
    for i, d in enumerate(DTYPES[:3]):
        tensors += [t.to(d) for t in _tensors(torch.float32, seed=i)]
    scale = torch.tensor(8.0)
    got = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got[n] = ops.grad_norm(
                tensors, norm_type, per_tensor=True, grad_scale=scale, backend="cpu"
            )
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):  # the same bits for any thread count
        assert torch.equal(got[n].total, got[1].total)
        assert torch.equal(got[n].per_tensor, got[1].per_tensor)
    want = ops.grad_norm([t.to(F64) for t in tensors], norm_type, per_tensor=True,
                         grad_scale=scale, backend="reference")  # fmt: skip
    # L2: the largest tensor holds 3*65536+5 elements; fp32 lane sums of 32 terms per block,
    # combined in double, err by ~sqrt(32) * 6e-8 relative. inf: a max is exact.
    tol = {"rtol": 1e-6, "atol": 0} if norm_type == 2.0 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got[1].total.to(F64), want.total, **tol)
    torch.testing.assert_close(got[1].per_tensor.to(F64), want.per_tensor, **tol)
    assert got[1].found_inf.item() == 0.0


def test_grad_norm_flags_non_finite_and_propagates_nan():
    tensors = _tensors(torch.bfloat16)
    tensors[5][70000] = math.nan
    out = ops.grad_norm(tensors, per_tensor=True, backend="cpu")
    assert out.found_inf.item() == 1.0
    assert math.isnan(out.total.item()) and math.isnan(out.per_tensor[5].item())
    assert not math.isnan(out.per_tensor[4].item())
    inf_out = ops.grad_norm(tensors, math.inf, backend="cpu")
    assert math.isnan(inf_out.total.item())
    tensors[5][70000] = math.inf
    inf_out = ops.grad_norm(tensors, math.inf, backend="cpu")
    assert inf_out.total.item() == math.inf and inf_out.found_inf.item() == 1.0


def test_grad_norm_of_float64_tensors_is_float64():
    tensors = _tensors(F64)
    out = ops.grad_norm(tensors, per_tensor=True, backend="cpu")
    assert out.total.dtype == F64 and out.per_tensor.dtype == F64
    # Against the exactly rounded sum (math.fsum). Per element the sum sees at most
    # 32 lane adds and a 5-level lane tree (a block of 1024, csrc/cpu/reduce.h) + 64 block
    # adds (an item) + 4 item adds in sequence: relative error <= 105 * 2^-53 ~ 1.2e-14 on the
    # square, half that on the norm. (torch's own fp64 norm is 2.2e-14 off on these inputs,
    # which is why the oracle is not used here.)
    exact = math.sqrt(math.fsum(x * x for t in tensors for x in t.tolist()))
    assert out.total.item() == pytest.approx(exact, rel=1e-14, abs=0)
    last = math.sqrt(math.fsum(x * x for x in tensors[-1].tolist()))
    assert out.per_tensor[-1].item() == pytest.approx(last, rel=1e-14, abs=0)


# ---------------------------------------------------------------------------------------
# The binding's own checks: the registered op called directly, bypassing fusedopt.ops.


def _direct_adamw_args(n=3, dtype=torch.float32):
    params = [torch.randn(4, 5).to(dtype) for _ in range(n)]
    return dict(
        params=params, grads=[torch.randn(4, 5).to(dtype) for _ in range(n)],
        exp_avgs=[torch.zeros(4, 5, dtype=dtype) for _ in range(n)],
        exp_avg_sqs=[torch.zeros(4, 5, dtype=dtype) for _ in range(n)], max_exp_avg_sqs=[],
        exp_avg_scales=[], exp_avg_sq_scales=[],
        master_params=[], steps=[torch.zeros(()) for _ in range(n)],
        hypers=torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0]], dtype=F64), group_sizes=[n],
        decoupled=True, amsgrad=False, maximize=False, bias_correction=True, lr_tensor=None,
        grad_scale=None, clip_coef=None, found_inf=None,
    )  # fmt: skip


def _bad(change, error, match):
    args = _direct_adamw_args()
    change(args)
    before = [p.clone() for p in args["params"]]
    steps_before = [s.clone() for s in args["steps"]]
    with pytest.raises(error, match=match):
        torch.ops.fusedopt.adamw_cpu_(**args)
    # Nothing was touched before the error.
    for a, b in zip(args["params"], before, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(args["steps"], steps_before, strict=True):
        assert torch.equal(a, b)


BAD_INPUTS = {
    "grad dtype": (
        lambda a: a["grads"].__setitem__(2, a["grads"][2].half()),
        TypeError,
        r"grads\[2\] has dtype",
    ),
    "grad shape": (
        lambda a: a["grads"].__setitem__(1, torch.randn(5, 4)),
        RuntimeError,
        r"grads\[1\] has shape",
    ),
    "state dtype": (
        lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(4, 5, dtype=F64)),
        TypeError,
        r"exp_avgs\[0\] has dtype",
    ),
    "not dense": (
        lambda a: a["params"].__setitem__(1, torch.randn(4, 10)[:, ::2]),
        RuntimeError,
        r"params\[1\] is not dense",
    ),
    "layout": (
        lambda a: a["grads"].__setitem__(0, torch.randn(5, 4).t()),
        RuntimeError,
        r"grads\[0\] has strides",
    ),
    "length": (lambda a: a["exp_avg_sqs"].pop(), ValueError, r"exp_avg_sqs has 2 entries"),
    "group sizes": (
        lambda a: a.__setitem__("group_sizes", [2]),
        ValueError,
        r"group_sizes \[2\] must be counts >= 0 summing to 3",
    ),
    "group count": (
        lambda a: a.__setitem__("group_sizes", [1, 2]),
        ValueError,
        r"group_sizes has 2 entries for the 1 rows of hypers",
    ),
    "hypers width": (
        lambda a: a.__setitem__("hypers", a["hypers"][:, :4]),
        TypeError,
        r"hypers must be a float64 \[G, 5\] table",
    ),
    "hypers dtype": (
        lambda a: a.__setitem__("hypers", a["hypers"].float()),
        TypeError,
        r"hypers must be a float64 \[G, 5\] table",
    ),
    "int dtype": (
        lambda a: a["params"].__setitem__(0, torch.zeros(4, 5, dtype=torch.int32)),
        TypeError,
        r"params\[0\] has unsupported dtype",
    ),
    "param dtypes": (
        lambda a: a["params"].__setitem__(2, torch.zeros(4, 5, dtype=F64)),
        TypeError,
        r"params\[2\] has dtype .* one call takes one param dtype",
    ),
    "master for fp32": (
        lambda a: a.__setitem__("master_params", [torch.zeros(4, 5)] * 3),
        TypeError,
        r"master_params\[0\] given for a Float param",
    ),
    "scalar shape": (
        lambda a: a.__setitem__("grad_scale", torch.ones(2)),
        TypeError,
        r"grad_scale must be a one-element float32",
    ),
    "scalar dtype": (
        lambda a: a.__setitem__("found_inf", torch.zeros((), dtype=F64)),
        TypeError,
        r"found_inf must be a one-element float32",
    ),
    "step dtype": (
        lambda a: a["steps"].__setitem__(1, torch.zeros((), dtype=F64)),
        TypeError,
        r"steps\[1\] must be a one-element float32",
    ),
    "lr tensor": (
        lambda a: a.__setitem__("lr_tensor", torch.ones(2)),
        TypeError,
        r"lr_tensor must be float32, 0-d or of length 3",
    ),
    "amsgrad states": (
        lambda a: a.__setitem__("amsgrad", True),
        ValueError,
        r"max_exp_avg_sqs has 0 entries",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_binding_rejects_bad_input_before_touching_anything(case):
    _bad(*BAD_INPUTS[case])


def test_binding_rejects_bad_norm_type_and_mixed_lists():
    with pytest.raises(ValueError, match=r"norm_type must be 2\.0 or inf"):
        torch.ops.fusedopt.grad_norm_cpu([torch.ones(3)], 1.0, False, None)
    with pytest.raises(ValueError, match="pass both"):
        torch.ops.fusedopt.sgd_cpu_(
            [torch.ones(3)], [torch.ones(3)], [torch.ones(3)], [], [], [],
            torch.tensor([[0.1, 0.9, 0.0, 0.0]], dtype=F64), [1], False, False, None, None,
            None, None,
        )  # fmt: skip
    with pytest.raises(TypeError, match=r"tensors\[1\] has unsupported dtype"):
        torch.ops.fusedopt.scale_cpu_(
            [torch.ones(3), torch.ones(3, dtype=torch.int64)], torch.tensor(2.0), None
        )


# ---------------------------------------------------------------------------------------
# Agreement with the triton backend (interpreted on a CPU machine): the same fp32 math with
# pinned contraction, so one step may differ by a couple of ULPs at most (DESIGN.md §5).
# Measured: every case agrees bit for bit except LAMB's adapted params (the two backends sum
# the trust-ratio norms in different orders), which take the bound of [note: lamb tolerance]
# (csrc/tests/test_cuda_emulated.cpp) instead: since the sums are fp32 in both backends
# (``lamb_direction_``'s sq_norms; the cpu backend once rooted double sums, and agreed on
# these inputs by luck), one ULP of the ratio shows where an update cancels most of a param
# (measured: 64 ULPs on an element that the step takes from 0.0316 to 0.00066).

MAX_ULPS = 2


def _lamb_close(a: torch.Tensor, b: torch.Tensor, before: torch.Tensor, numel: int) -> bool:
    """[note: lamb tolerance]: a sum of n non-negative fp32 terms in any order is within
    (n - 1) u of the exact one, so a norm within n u / 2 + u and a ratio within n u + 3u; the
    cpu backend's chains are <= 32 lanes plus the rounding of its double sum to fp32. An
    adapted param x = p - lr * (u * r) then differs by delta * |x - p| plus a rounding of x in
    each backend."""
    u = 2.0**-24
    delta = (numel + 32 + 1 + 6) * u
    a, b, before = a.double(), b.double(), before.double()
    bound = delta * (b - before).abs() + 2 * u * torch.maximum(a.abs(), b.abs()) + 2.0**-149
    return bool(((a - b).abs() <= bound).all())


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp32 ULPs (units in the last place), via the ordered integer encoding."""

    def ordered(t):
        i = t.float().contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


def _triton_on_cpu() -> bool:
    status = fusedopt.backends()["triton"]
    return status.usable and "cpu" in status.devices


@pytest.mark.parametrize(("op", "flags"), CASES, ids=[f"{o}{f}" for o, f in CASES])
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16+master"])
def test_one_step_agrees_with_triton_to_a_couple_of_ulps(op, flags, master):
    if not _triton_on_cpu():
        pytest.skip("the triton backend is not usable on CPU tensors here (TRITON_INTERPRET=1?)")
    shapes = [(0,), (7,), (33, 5), (1000,)]
    dtype = torch.bfloat16 if master else torch.float32
    lists = _lists(op, dtype, master, shapes=shapes, amsgrad=flags.get("amsgrad", False))
    twin = {k: [t.clone() for t in v] for k, v in lists.items()}
    hypers = _hypers(op, len(shapes))
    grads = _grads(lists["params"], 0, dtype)
    scalars = dict(grad_scale=torch.tensor(3.0), clip_coef=torch.tensor(0.7))
    excused = None
    if op == "lion_":
        excused = _excused_lion(_f64(lists), [g.to(F64) for g in grads], hypers, flags)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    _run(op, lists, grads, hypers, flags, "cpu", **scalars)
    _run(op, twin, grads, hypers, flags, "triton", **scalars)
    for name in lists:
        if name == "params" and master:
            continue  # the bf16 param is master.to(bf16), checked through master_params
        for i, (a, b) in enumerate(zip(lists[name], twin[name], strict=True)):
            if name == "steps":
                assert torch.equal(a, b)
                continue
            adapts = hypers.get("weight_decay", [0.0] * len(shapes))[i] != 0 or flags.get(
                "always_adapt", False
            )
            if op == "lamb_" and name in ("params", "master_params") and adapts:
                assert _lamb_close(a, b, before[name][i], a.numel()), f"{name}[{i}]"
                continue
            d = _ulps(a, b)
            if excused is not None and name in ("params", "master_params"):
                d = d[~excused[i]]
            assert d.numel() == 0 or d.max() <= MAX_ULPS, f"{name}[{i}]: {d.max()} ULPs apart"


def test_grad_norm_agrees_with_triton():
    if not _triton_on_cpu():
        pytest.skip("the triton backend is not usable on CPU tensors here (TRITON_INTERPRET=1?)")
    tensors = [t.to(d) for d in (torch.float32, torch.bfloat16) for t in _tensors(d)[:5]]
    got = ops.grad_norm(tensors, per_tensor=True, grad_scale=torch.tensor(2.0), backend="cpu")
    other = ops.grad_norm(tensors, per_tensor=True, grad_scale=torch.tensor(2.0), backend="triton")
    # Both accumulate in fp32 (or better) in different fixed orders: a few ULPs apart for
    # 1000-element sums; inf norms and found_inf exactly equal.
    assert _ulps(got.total, other.total).max() <= 8
    assert _ulps(got.per_tensor, other.per_tensor).max() <= 8
    assert torch.equal(got.found_inf, other.found_inf)
