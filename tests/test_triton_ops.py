"""Quick equivalence of the triton backend with the reference backend (fp32 math both), on
small inputs, for every op and option. Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py)
and natively on a GPU. The shared harness (tests/harness) adds the float64-oracle matrix.

Tolerances: both backends compute the same fp32 expressions in the same order, with IEEE
division and square root and no contraction ([note: hyperparameter rounding] in
fusedopt/triton_kernels/common.py); the one deliberate difference is the bias correction (float64
``exp(t*log(beta))`` against Python's ``beta**t``, a few float64 ulps apart), which can move
an fp32 result by one ulp. So elementwise results must agree to 2 fp32 ulps, or exactly in
storage dtype up to one ulp of that dtype; reductions (norms) to a size-derived tolerance.
"""

from __future__ import annotations

import pytest
import torch
from harness.cases import MATRIX_OPS, STORAGES

import fusedopt
from fusedopt import ops

if not fusedopt.backends()["triton"].usable:
    pytest.skip("triton backend not usable here", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.bfloat16, torch.float16)


def close(
    got: torch.Tensor,
    want: torch.Tensor,
    before: torch.Tensor | None = None,
    change_rtol: float | None = None,
) -> None:
    """Elementwise agreement within 2 units in the last place of the storage dtype, of the
    value and (when ``before`` is given) of the change from ``before``: an update computed one
    ulp apart moves the result by an ulp *of the update*, which is larger than an ulp of the
    result where the update cancels most of the value. Needed because torch's CPU fp32
    ``sqrt`` (the reference's) is not correctly rounded: measured, 528 of 70000 values differ
    by one ulp from IEEE ``sqrt``. ``change_rtol`` replaces 2 ulps for the change where the
    update depends on a reduction (LAMB's trust ratio)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.numel() == 0:
        return
    eps, tiny = torch.finfo(got.dtype).eps, torch.finfo(got.dtype).tiny
    a, b = got.double(), want.double()
    allowed = 2 * eps * b.abs() + 2 * tiny
    if before is not None:
        allowed = allowed + (change_rtol or 2 * eps) * (b - before.double()).abs()
    bad = ~((a - b).abs() <= allowed) & ~(a.isnan() & b.isnan())
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} differ, e.g. at {bad.nonzero()[0].tolist()}: "
        f"{a[bad][:3].tolist()} vs {b[bad][:3].tolist()}"
    )


def rand(sizes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dtype).to(DEVICE) for n in sizes]


def clone(ts):
    return [t.clone() for t in ts]


SIZES = [0, 1, 7, 33, 1000, 4099]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale_matches_reference_exactly(dtype):
    ts = rand(SIZES, dtype)
    want = clone(ts)
    fi, fi_want = torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE)
    scale = torch.tensor(1.7, device=DEVICE)
    ops.scale_(ts, scale, fi, backend="triton")
    ops.scale_(want, scale, fi_want, backend="reference")
    for a, b in zip(ts, want, strict=True):
        assert torch.equal(a, b)
    assert fi.item() == 0.0
    ts[4][17] = float("nan")
    ops.scale_(ts, torch.ones((), device=DEVICE), fi, backend="triton")
    assert fi.item() == 1.0
    ops.scale_(ts, torch.ones((), device=DEVICE), fi, backend="triton")
    assert fi.item() == 1.0  # never cleared


def test_scale_mixed_dtypes_one_call_and_chunk_boundaries():
    ts = rand([70000], torch.bfloat16) + rand([5, 0], torch.float32, 1) + rand([9], torch.float64)
    ts.append(torch.randn(300).half().to(DEVICE)[1:])  # a view at an odd offset: unaligned path
    want = clone(ts)
    scale = torch.tensor(0.3, device=DEVICE)
    ops.scale_(ts, scale, None, backend="triton")
    ops.scale_(want, scale, None, backend="reference")
    for a, b in zip(ts, want, strict=True):
        assert torch.equal(a, b)
    ts[0][65537] = float("inf")  # second chunk of the big tensor
    fi = torch.zeros((), device=DEVICE)
    ops.scale_(ts, scale, fi, backend="triton")
    assert fi.item() == 1.0


# ---- step ops -------------------------------------------------------------------------------

STATES = {  # op -> (state lists, kwargs flag that needs max_exp_avg_sqs)
    "adamw_": ("exp_avgs", "exp_avg_sqs"),
    "lamb_": ("exp_avgs", "exp_avg_sqs"),
    "lion_": ("exp_avgs",),
    "adan_": ("exp_avgs", "exp_avg_sqs", "exp_avg_diffs", "neg_pre_grads"),
    "schedulefree_adamw_": ("zs", "exp_avg_sqs"),
    "sgd_": ("momentum_buffers",),
    # vectors only here (1-d sizes): a variance each, (0,) factors; the factored params are
    # covered by the op matrix (tests/harness) and tests/test_optim_adafactor.py
    "adafactor_": ("variances",),
    "muon_": ("momentum_buffers", "ns_buffers"),
}
HAS_STEPS = {"adamw_": True, "lamb_": True, "lion_": False, "adan_": True,
             "schedulefree_adamw_": False, "sgd_": True, "adafactor_": True,
             "muon_": False}  # fmt: skip
#: Hyperparameters an op requires besides lr, for the tests that pass only lr.
REQUIRED = {"schedulefree_adamw_": {"ckp1": 0.25, "bias_correction2": 0.05}}


def shapes(op, sizes):
    """The tensors' shapes of ``op`` for the sizes of a test: themselves, or for an op that
    steps matrices only (MATRIX_OPS, Muon) matrices of 1 to 3 rows (wide, a row, a column
    of 1) with the size as columns: the same zero, odd and chunk-crossing sizes."""
    return [(1 + n % 3, n) for n in sizes] if op in MATRIX_OPS else list(sizes)


def make_lists(op, sizes, dtype, grad_dtype, master, *, amsgrad=False, seed=0, steps=True):
    """Params, grads, states (positive where a square is kept), masters and step counts;
    a ``bf16`` state layout (Muon's ns_buffers) is bfloat16 whatever the params."""
    g = torch.Generator().manual_seed(seed)
    sizes = shapes(op, sizes)
    bf16_states = {t.name for t in ops.STEP_OPS[op].states if t.layout == "bf16"}

    def randn(n, dt, scale=1.0):
        return (torch.randn(n, generator=g) * scale).to(dt).to(DEVICE)

    state_dtype = torch.float32 if master else dtype
    params = [randn(n, dtype) for n in sizes]
    lists = {
        "params": params,
        "grads": [randn(n, grad_dtype) for n in sizes],
        "master_params": [p.float() for p in params] if master else [],
    }
    for name in STATES[op] if steps else ():
        square = name.endswith("sqs") or name == "variances"
        values = [randn(n, torch.float32, 0.1) for n in sizes]
        dt = torch.bfloat16 if name in bf16_states else state_dtype
        lists[name] = [(v.abs() if square else v).to(dt) for v in values]
    if amsgrad:
        lists["max_exp_avg_sqs"] = [v.clone() for v in lists["exp_avg_sqs"]]
    if op == "adafactor_":  # [note: factored layouts]: a vector has no factors
        for name in ("row_vars", "col_vars"):
            lists[name] = [torch.zeros(0, dtype=state_dtype, device=DEVICE) for _ in sizes]
    if HAS_STEPS[op] and steps:
        lists["steps"] = [torch.tensor(float(i % 3), device=DEVICE) for i in range(len(sizes))]
    return lists


def run_op(op, lists, backend, **kwargs):
    fn = getattr(ops, op)
    positional = {"adamw_": ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"),
                  "lamb_": ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"),
                  "lion_": ("params", "grads", "exp_avgs"),
                  "adan_": ("params", "grads"),
                   "schedulefree_adamw_": ("params", "grads"),
                   "sgd_": ("params", "grads"),
                   "adafactor_": ("params", "grads", "row_vars", "col_vars", "variances",
                                  "steps"),
                   "muon_": ("params", "grads", "momentum_buffers", "ns_buffers")}[op]  # fmt: skip
    rest = {k: v for k, v in lists.items() if k not in positional}
    kwargs = {**REQUIRED.get(op, {}), **kwargs}
    fn(*(lists[k] for k in positional), **rest, **kwargs, backend=backend)


def compare_lists(op, got, want, initial, dtype, sizes, n_steps):
    """Every list of ``got`` against ``want`` (see ``close``)."""
    # LAMB's update scales with its trust ratio, a quotient of two norms that the kernel and
    # torch sum in different orders: its relative error is at most twice a norm's.
    change_rtol = None
    if op in ("lamb_", "adafactor_"):  # Adafactor: alpha / clip, from two norms likewise
        change_rtol = 2 * torch.finfo(dtype).eps + 2 * n_steps * norm_tolerance(sizes)
    for name in got:
        for i, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
            try:
                close(a, b, initial[name][i], change_rtol)
            except AssertionError as error:
                raise AssertionError(f"{op} {name}[{i}] differs") from error


def compare_step(op, sizes, dtype, grad_dtype=None, master=False, n_steps=1, **kwargs):
    """Run ``n_steps`` steps with triton and reference from identical inputs; compare every
    list (params, states, masters, steps)."""
    grad_dtype = grad_dtype or dtype
    amsgrad = kwargs.get("amsgrad", False)
    steps = kwargs.pop("steps", True)
    got = make_lists(op, sizes, dtype, grad_dtype, master, amsgrad=amsgrad, steps=steps)
    want = {k: clone(v) for k, v in got.items()}
    initial = {k: clone(v) for k, v in got.items()}
    for _ in range(n_steps):
        run_op(op, got, "triton", **kwargs)
        run_op(op, want, "reference", **kwargs)
    compare_lists(op, got, want, initial, dtype, sizes, n_steps)
    if master:
        for p, m in zip(got["params"], got["master_params"], strict=True):
            assert torch.equal(p, m.to(p.dtype))
    return got


def scalars(grad_scale=None, clip_coef=None, found_inf=None):
    return {
        k: torch.tensor(v, device=DEVICE)
        for k, v in dict(grad_scale=grad_scale, clip_coef=clip_coef, found_inf=found_inf).items()
        if v is not None
    }


ADAMW_OPTIONS = [
    {},
    {"amsgrad": True},
    {"decoupled": False, "weight_decay": 0.1},
    {"maximize": True, "bias_correction": False},
    {"weight_decay": [0.0, 0.1, 0.2, 0.0, 0.05, 0.3], "beta1": [0.9, 0.8, 0.9, 0.5, 0.9, 0.9]},
]
#: (param, grad, master): every storage of the op matrix (tests/harness/cases.py), and fp64.
DTYPES = [(s.param, s.grad, s.master) for s in STORAGES.values()] + [
    (torch.float64, torch.float64, False)
]


SGD_OPTIONS = [
    {"steps": False},  # no momentum: no buffers, no step counts
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"momentum": 0.8, "dampening": 0.3, "maximize": True},
    {"momentum": [0.9, 0.0, 0.5, 0.9, 0.9, 0.7], "weight_decay": [0.0, 0.1, 0.0, 0.2, 0, 0]},
]
LION_OPTIONS = [
    {},
    {"weight_decay": 0.1, "maximize": True},
    {"beta1": [0.9, 0.5, 0.9, 0.95, 0.9, 0.0], "weight_decay": [0.0, 0.1, 0.2, 0.0, 0.3, 1]},
]
ADAN_OPTIONS = [
    {},
    {"weight_decay": 0.02, "no_prox": True},
    {"beta3": [0.99, 0.9, 0.99, 0.95, 0.99, 0.5], "weight_decay": [0.0, 0.1, 0.2, 0.0, 0.3, 1]},
]
SCHEDULEFREE_ADAMW_OPTIONS = [
    {},
    {"weight_decay": 0.1, "ckp1": 0.75, "bias_correction2": 0.9},  # torch's lerp from z
    {"ckp1": [1.0, 0.25, 0.5, 0.75, 0.1, 0.0], "weight_decay": [0.0, 0.1, 0.2, 0.0, 0.3, 1]},
]
LAMB_OPTIONS = [
    {},
    {"trust_clip": True, "weight_decay": 0.1},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0, "always_adapt": True, "grad_averaging": False},
    {"bias_correction": False, "weight_decay": [0.0, 0.1, 0.0, 0.2, 0.01, 0.0]},
]
ADAFACTOR_OPTIONS = [
    {},
    {"weight_decay": 0.1, "maximize": True, "d": 1.5},
    {"eps1": 1e-10, "eps2": 1e-2, "beta2_decay": [-0.8, -0.5, -0.8, -0.3, -0.8, -1.0]},
]
# Muon: triton and reference run the same Newton-Schulz code (fusedopt.reference.ops,
# bf16 torch GEMMs) between passes that compute the same fp32 expressions; the passes agree
# bit for bit when the momentum buffers do (its bf16 input then is the same), so `close`'s
# 2 ulps hold for the whole step. (The float64-oracle check of the passes is the op matrix.)
MUON_OPTIONS = [
    {},
    {"nesterov": False, "weight_decay": 0.0, "lr_ratio": 0.4, "ns_steps": 3},
    {"momentum": [0.95, 0.3, 0.9, 0.0, 0.5, 0.95], "weight_decay": [0.0, 0.1, 0.2, 0, 0.3, 1]},
]
OPTIONS = {
    "adafactor_": ADAFACTOR_OPTIONS,
    "muon_": MUON_OPTIONS,
    "adamw_": ADAMW_OPTIONS,
    "sgd_": SGD_OPTIONS,
    "lion_": LION_OPTIONS,
    "adan_": ADAN_OPTIONS,
    "schedulefree_adamw_": SCHEDULEFREE_ADAMW_OPTIONS,
    "lamb_": LAMB_OPTIONS,
}
STEP_OPS = list(OPTIONS)
CASES = [(op, o) for op, options in OPTIONS.items() for o in options]


#: Known, not a kernel bug of Adan's: in fp64 this check (2 ulps of the change) fails for adan_,
#: measured with one step from random states (1000 elements): at t = 3, 278 params differ, up
#: to 3.8e-13 of the change, because common.bias_correction takes beta**t as
#: exp(t*log(beta)), a few fp64 ulps off pow (1 - 0.99**3 off by 3.7e-15 relative; fp32
#: rounds it away; AdamW's betas happen to round the same at these steps); at t = 1 and 2,
#: 1-2 params differ by ~1e-15 of the change: Adan's update is two rounded terms that
#: partly cancel, so a one-ulp difference in one term (torch's fp64 sqrt, [note: reference
#: sqrt]) exceeds 2 ulps of the net change. The ops matrix checks fp64 adan_ with its own
#: tolerance model. Strict where it was measured (interpreted, on the CPU), so that an
#: unexpected pass is noticed; not verified compiled on a GPU (libdevice exp/log, CUDA sqrt).
_FP64_BIAS_CORRECTION = pytest.mark.xfail(
    strict=DEVICE == "cpu", reason="triton fp64 bias correction via exp/log, a few ulps off beta**t"
)


@pytest.mark.parametrize(("op", "options"), CASES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_step(op, options, dtypes, request):
    dtype, grad_dtype, master = dtypes
    if op == "adan_" and dtype == torch.float64:
        request.applymarker(_FP64_BIAS_CORRECTION)
    n_steps = 3 if dtype in (torch.float32, torch.float64) or master else 1
    compare_step(op, SIZES, dtype, grad_dtype, master, n_steps, lr=1e-2, **options)


@pytest.mark.parametrize("op", STEP_OPS)
def test_common_scalars_and_lr_tensors(op):
    n = len(SIZES)
    for lr in (torch.tensor(0.01, device=DEVICE), torch.linspace(1e-3, 1e-2, n, device=DEVICE)):
        compare_step(op, SIZES, torch.float32, n_steps=2, lr=lr,
                     **scalars(grad_scale=1024.0, clip_coef=0.25, found_inf=0.0))  # fmt: skip
        compare_step(op, SIZES, torch.bfloat16, master=True, lr=lr,
                     **scalars(grad_scale=8.0, clip_coef=0.5))  # fmt: skip


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("flag", [1.0, 2.0])
def test_found_inf_leaves_everything_bit_identical(op, flag):
    lists = make_lists(op, SIZES, torch.bfloat16, torch.bfloat16, True)
    before = {k: clone(v) for k, v in lists.items()}
    run_op(op, lists, "triton", lr=0.1, **scalars(found_inf=flag))
    for name, tensors in lists.items():
        for a, b in zip(tensors, before[name], strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("op", STEP_OPS)
def test_many_tensors_and_chunk_boundaries(op):
    compare_step(op, [70000, 3, 0, 65536, 65537], torch.float32, n_steps=2, lr=1e-2)
    sizes = [(i * 37) % 101 for i in range(150)]
    compare_step(op, sizes, torch.bfloat16, master=True, n_steps=2, lr=1e-2)


@pytest.mark.parametrize("op", STEP_OPS)
def test_moved_grads_rebuild_the_table(op):
    """Grads set to None come back at new addresses; the cached table must follow."""
    got = make_lists(op, SIZES, torch.float32, torch.float32, False)
    want = {k: clone(v) for k, v in got.items()}
    initial = {k: clone(v) for k, v in got.items()}
    for seed in range(3):
        grads = rand(shapes(op, SIZES), torch.float32, seed=10 + seed)
        got["grads"], want["grads"] = grads, clone(grads)
        run_op(op, got, "triton", lr=1e-2)
        run_op(op, want, "reference", lr=1e-2)
    compare_lists(op, got, want, initial, torch.float32, SIZES, 3)


def test_unaligned_views():
    base = [torch.randn(n + 1).to(DEVICE) for n in SIZES]
    lists = make_lists("adamw_", SIZES, torch.float32, torch.float32, False)
    for i, b in enumerate(base):
        lists["grads"][i] = b[1:]  # 4-byte offset: the generic (non-128-bit) path
    want = {k: clone(v) for k, v in lists.items()}
    initial = {k: clone(v) for k, v in lists.items()}
    run_op("adamw_", lists, "triton", lr=1e-2)
    run_op("adamw_", want, "reference", lr=1e-2)
    for name in lists:
        for a, b, c in zip(lists[name], want[name], initial[name], strict=True):
            close(a, b, c)


# ---- grad_norm --------------------------------------------------------------------------------


def norm_tolerance(sizes) -> float:
    """Relative error bound of the kernel's fp32 sum of squares: every term is positive, so
    the relative error is at most (depth of the summation) x eps: CHUNK/BLOCK sequential
    adds per lane, log2(BLOCK) in the lane tree, two folds of at most log2(256) + their
    sequential lengths, plus the square root's half ulp. The float64 oracle is exact enough."""
    from fusedopt.triton_kernels.multi_tensor import BLOCK, CHUNK

    n_chunks = sum(max(1, -(-n // CHUNK)) for n in sizes)
    depth = CHUNK // BLOCK + 10 + 2 * (8 + max(1, n_chunks // 256)) + len(sizes) // 256 + 1
    return depth * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,), (torch.bfloat16,), (torch.float16,), (torch.float64,),
     (torch.bfloat16, torch.float32, torch.float16)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("scaled", [False, True])
def test_grad_norm_against_float64(dtypes, norm_type, scaled):
    sizes = [0, 1, 7, 1000, 70000, 33]
    ts = [rand([n], dtypes[i % len(dtypes)], seed=i)[0] for i, n in enumerate(sizes)]
    grad_scale = torch.tensor(8.0, device=DEVICE) if scaled else None
    total, per, found = ops.grad_norm(ts, norm_type, per_tensor=True, grad_scale=grad_scale,
                                      backend="triton")  # fmt: skip
    exact = ops.grad_norm([t.double() for t in ts], norm_type, per_tensor=True,
                          grad_scale=grad_scale, backend="reference")  # fmt: skip
    all_fp64 = dtypes == (torch.float64,)
    assert total.dtype == per.dtype == (torch.float64 if all_fp64 else torch.float32)
    assert per.shape == (len(sizes),) and found.dtype == torch.float32 and found.item() == 0.0
    # inf norm: exact (max of exactly scaled values: a division by a power of two).
    tol = 0.0 if norm_type == float("inf") else norm_tolerance(sizes)
    if all_fp64:
        tol = tol * 1e-8
    torch.testing.assert_close(total.double(), exact[0], rtol=tol, atol=0)
    torch.testing.assert_close(per.double(), exact[1], rtol=tol, atol=0)
    again = ops.grad_norm(ts, norm_type, per_tensor=True, grad_scale=grad_scale, backend="triton")
    assert torch.equal(again[0], total) and torch.equal(again[1], per)  # deterministic
    no_per = ops.grad_norm(ts, norm_type, grad_scale=grad_scale, backend="triton")
    assert no_per[1].shape == (0,) and torch.equal(no_per[0], total)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_grad_norm_non_finite(norm_type, bad):
    ts = rand([10, 70000, 5], torch.bfloat16)
    ts[1][66000] = bad
    total, per, found = ops.grad_norm(ts, norm_type, per_tensor=True, backend="triton")
    want = ops.grad_norm(ts, norm_type, per_tensor=True, backend="reference")
    assert found.item() == 1.0
    torch.testing.assert_close(total, want[0], equal_nan=True)
    assert per[1].isnan() == want[1][1].isnan() and per[0].isfinite() and per[2].isfinite()


def test_grad_norm_many_tensors():
    sizes = [(i * 37) % 101 for i in range(300)]
    ts = [rand([n], torch.float32, seed=i)[0] for i, n in enumerate(sizes)]
    total, per, _ = ops.grad_norm(ts, per_tensor=True, backend="triton")
    exact = ops.grad_norm([t.double() for t in ts], per_tensor=True, backend="reference")
    torch.testing.assert_close(total.double(), exact[0], rtol=norm_tolerance(sizes), atol=0)
    torch.testing.assert_close(per.double(), exact[1], rtol=norm_tolerance(sizes), atol=0)


# ---- tables -----------------------------------------------------------------------------------


def test_table_cache_rebuilds_only_what_moved():
    from fusedopt.triton_kernels.multi_tensor import CHUNK, TableCache

    cache = TableCache()
    params = rand([0, 5, CHUNK + 3], torch.float32)
    grads = rand([0, 5, CHUNK + 3], torch.float32, seed=1)
    steps = list(torch.zeros(3, device=DEVICE))  # views 4 bytes apart: read as scalars
    first = cache.launch([params, grads, steps], [[0.1] * 3], scalar_lists=(2,))
    assert first.aligned and first.n_chunks == 1 + 1 + 2
    assert first.chunks.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1]]
    row = first.table[2].tolist()
    assert row[:3] == [CHUNK + 3, 2, 2]  # numel, first chunk, chunk count
    assert row[3:6] == [t.data_ptr() for t in (params[2], grads[2], steps[2])]
    again = cache.launch([params, grads, steps], [[0.1] * 3], scalar_lists=(2,))
    assert again.table is first.table and again.chunks is first.chunks  # nothing re-uploaded
    moved = [g.clone() for g in grads]
    rebuilt = cache.launch([params, moved, steps], [[0.1] * 3], scalar_lists=(2,))
    assert rebuilt.table is not first.table and rebuilt.chunks is first.chunks
    assert rebuilt.table[1, 4].item() == moved[1].data_ptr()
    new_lr = cache.launch([params, moved, steps], [[0.2] * 3], scalar_lists=(2,))
    assert new_lr.table is not rebuilt.table
    assert new_lr.table[0, 6].view(torch.float64).item() == 0.2
    odd = [moved[0], torch.zeros(6, device=DEVICE)[1:], moved[2]]  # 4 bytes in: no 128-bit path
    assert not cache.launch([params, odd, steps], [[0.2] * 3], scalar_lists=(2,)).aligned
