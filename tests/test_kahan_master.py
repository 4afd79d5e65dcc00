"""Kahan master weights (issue #15): [note: kahan master] in ``fusedopt/_contract.py``.

A 16-bit param plus a compensation of its own dtype stands for the fp32 master
``fp32(p) + fp32(c)``. Checked here: the split and join (reference and Triton) over a dense
sample; a step with Kahan masters is, on every backend and for every step op, exactly "join,
the fp32-master step, split" (tests/test_ops_matrix.py runs the op matrix the same way); the
optimizer option, its switches and state dicts; and what it is for: an update below half an
ulp of the param accumulates, where plain bf16 drops it, and a short run stays near the
fp32-master run (quantified beside optimi's Kahan summation when torch-optimi is installed).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from harness.tolerances import reduction_rtol
from optim_cases import (
    CASE_IDS,
    CASES,
    clone_params,
    make_model,
    random_grads,
    run_master_modes,
    usable_backends,
)
from test_compact_master import BACKENDS, STEP_OPS, N, sgd_step_with_masters
from test_master_sync import _bits, _op_call, _same

import fusedopt
from fusedopt import ops
from fusedopt.reference.ops import join_kahan, split_kahan
from fusedopt.triton_kernels import common

HALF = (torch.bfloat16, torch.float16)
#: Significant bits of the 16-bit dtypes (with the implicit one).
DIGITS = {torch.bfloat16: 8, torch.float16: 11}


def dense_values(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values around every finite 16-bit value of ``dtype``: the value itself, its
    midpoints with a neighbour (ties both ways), and random offsets within half an ulp; plus
    0, -0, infinities, NaN, and fp32 values that overflow the dtype."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float32)
    grid = grid[grid.isfinite()]
    up = torch.nextafter(grid.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
    step = (up - grid).nan_to_num(0.0)
    frac = torch.rand(grid.shape, generator=gen) - 0.5
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3e38, -7e4])
    return torch.cat([grid, grid + step / 2, grid + frac * step, grid + frac * step / 1000,
                      special])  # fmt: skip


def check_split(x: torch.Tensor, param: torch.Tensor, comp: torch.Tensor) -> None:
    """``param`` and ``comp`` are the Kahan form of fp32 ``x``: the param is ``x.to(dtype)``,
    the join takes the compensation back (never the param alone: no false "written"), and
    the joined value is within one ulp of the compensation of ``x`` (half an ulp from its
    rounding, one more step at a tie); 0 where ``x - param`` is not finite."""
    dtype = param.dtype
    assert comp.dtype == dtype
    assert torch.equal(_bits(param), _bits(x.to(dtype))) or bool(x.isnan().any())
    finite = param.isfinite()
    assert torch.equal(_bits(param[~x.isnan()]), _bits(x[~x.isnan()].to(dtype)))
    assert not comp[~finite].any()
    joined = join_kahan(param, comp)
    # (-0 + 0 is +0, which does not round to the -0 param: the join keeps the param's -0)
    total = torch.where(param == 0, param.float() + comp.float() * 1.0, param.float() + comp)
    total = torch.where((param == 0) & (comp == 0), param.float(), total)
    assert _same(joined[finite], total[finite])
    d = (x - param.float())[finite]
    ulp_c = d.abs() * 2.0 ** (1 - DIGITS[dtype])
    tiny = torch.finfo(dtype).smallest_normal * 2.0 ** (1 - DIGITS[dtype])  # c subnormal
    assert ((joined[finite] - x[finite]).abs() <= ulp_c + tiny).all()


@pytest.mark.parametrize("dtype", HALF)
def test_split_join_reference_dense(dtype):
    x = dense_values(dtype)
    check_split(x, *split_kahan(x, dtype))
    # The tie rule, bf16: x = p + d with p = 1 + 2^-7 (odd) and d = 2^-8 - 2^-18 (below half
    # an ulp: p is x's rounding); d rounds to 2^-8, and p + 2^-8 is a tie that rounds to the
    # even 1 + 2^-6: the compensation is moved to 2^-8 - 2^-16, one bf16 step toward zero.
    if dtype == torch.bfloat16:
        x = torch.tensor([1.0 + 2.0**-7 + 2.0**-8 - 2.0**-18])
        p, c = split_kahan(x, dtype)
        assert p.item() == 1.0 + 2.0**-7 and c.item() == 2.0**-8 - 2.0**-16
        assert join_kahan(p, c).item() == 1.0 + 2.0**-7 + 2.0**-8 - 2.0**-16


@triton.jit
def _split_join(x_ptr, p_ptr, c_ptr, j_ptr, BLOCK: tl.constexpr):
    """Triton's split_kahan, then join_kahan, over BLOCK fp32 values per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    param, comp = common.split_kahan(tl.load(x_ptr + offs), p_ptr.dtype.element_ty)
    tl.store(p_ptr + offs, param)
    tl.store(c_ptr + offs, comp)
    tl.store(j_ptr + offs, common.join_kahan(param, comp))


@pytest.mark.skipif(not fusedopt.backends()["triton"].usable, reason="needs Triton")
@pytest.mark.parametrize("dtype", HALF)
def test_split_join_triton_dense(dtype):
    """Triton's split_kahan/join_kahan (common.py; interpreted here) equal the reference's
    bit for bit over the dense sample (NaNs as NaNs)."""
    x = dense_values(dtype)
    block = 1 << 12
    x = torch.cat([x, torch.zeros(-x.numel() % block)])
    param, comp = torch.empty(x.shape, dtype=dtype), torch.empty(x.shape, dtype=dtype)
    joined = torch.empty_like(x)
    _split_join[(x.numel() // block,)](x, param, comp, joined, BLOCK=block)
    want_p, want_c = split_kahan(x, dtype)
    nan = x.isnan()
    assert torch.equal(_bits(param)[~nan], _bits(want_p)[~nan]) and param[nan].isnan().all()
    assert torch.equal(_bits(comp), _bits(want_c))
    assert _same(joined, join_kahan(want_p, want_c))


def test_join_of_a_written_param():
    """A value written into the param since the last step: where param + old compensation
    no longer rounds to it (a zero over a non-zero compensation), the param alone is the
    master; within half an ulp, the compensation stays (as a compact remainder)."""
    param = torch.tensor([0.0, 1.0, 2.0, float("inf"), float("nan")], dtype=torch.bfloat16)
    comp = torch.tensor([1e-3, 1e-3, 3e-3, 1.0, 0.0], dtype=torch.bfloat16)
    joined = join_kahan(param, comp)
    assert joined[0].item() == 0.0  # 1e-3 does not round to 0: dropped
    assert joined[1].item() == 1.0 + comp[1].float().item()  # below half an ulp of 1: kept
    assert joined[2].item() == 2.0 + comp[2].float().item()
    assert joined[3].item() == float("inf") and joined[4].isnan()


def _kahan_form(masters: list[torch.Tensor], dtype: torch.dtype, device):
    pairs = [split_kahan(m.cpu(), dtype) for m in masters]
    return [p.to(device) for p, _ in pairs], [c.to(device) for _, c in pairs]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_kahan_step_is_join_fp32_step_split(op, target, dtype):
    """Four steps (the second skipped by found_inf, the third with a zero and other values
    written into some params): with Kahan masters every step equals, bit for bit, the
    fp32-master step of the same backend from the joined master (``join_kahan``), split
    after (``split_kahan``), states included. Fails when a backend drops or misplaces the
    compensation, reads the param alone, or stores the compensation rounded otherwise."""
    backend, device = target
    gen = torch.Generator().manual_seed(5)
    masters = [torch.randn(N, generator=gen) * 0.5 for _ in range(2)]
    params, comps = _kahan_form(masters, dtype, device)
    lists, hypers, flags = _op_call(op, 2, device, gen)
    for step in range(4):
        grads = [torch.randn(N, generator=gen).to(device=device, dtype=dtype) for _ in params]
        if step == 2:
            for p in params:
                p[::7] = 0.0
                p[3::11] = torch.randn(p[3::11].shape, generator=gen).to(dtype)
        found_inf = torch.full((), float(step == 1), device=device)
        joined = [join_kahan(p, c) for p, c in zip(params, comps, strict=True)]
        fp32_params = [j.to(dtype) for j in joined]
        fp32_lists = {k: [t.clone() for t in v] for k, v in lists.items()}
        before = [t.clone() for t in params + comps]
        ops.step(op, dict(params=fp32_params, grads=grads, master_params=joined, **fp32_lists),
                 hypers, flags, found_inf=found_inf, backend=backend)  # fmt: skip
        ops.step(op, dict(params=params, grads=grads, master_params=comps, **lists), hypers,
                 flags, found_inf=found_inf, backend=backend)  # fmt: skip
        if step == 1:  # (the split of the join need not be the pair: fp32(p) + fp32(c)
            # may round, an fp16 c being far below p's last bit)
            assert all(_same(a, b) for a, b in zip(params + comps, before, strict=True))
            continue
        for p, c, m in zip(params, comps, joined, strict=True):
            want_p, want_c = split_kahan(m.cpu(), dtype)
            assert torch.equal(_bits(p.cpu()), _bits(want_p)), f"step {step}: param"
            assert torch.equal(_bits(c.cpu()), _bits(want_c)), f"step {step}: compensation"
        for name, got in lists.items():
            for a, b in zip(got, fp32_lists[name], strict=True):
                assert _same(a, b), name
        assert not torch.equal(_bits(params[0]), _bits(before[0]))


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_update_below_half_an_ulp_accumulates(target, dtype):
    """SGD with lr * g = 2^-10 on params at 1 (half an ulp: 2^-8 in bf16, 2^-11 in fp16...
    below it for bf16): plain 16-bit params never move, fp32 masters reach 1 - 100 * 2^-10,
    and Kahan masters too (their param + compensation within the compensation's precision of
    it, their param its rounding)."""
    backend, device = target
    lr, n = 2.0**-10 if dtype == torch.bfloat16 else 2.0**-13, 100
    sgd = dict(lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0)
    flags = dict(nesterov=False, maximize=False)
    plain = torch.ones(64, dtype=dtype, device=device)
    kahan, comp = torch.ones_like(plain), torch.zeros_like(plain)
    grad = torch.ones_like(plain)
    for _ in range(n):
        ops.step("sgd_", dict(params=[plain], grads=[grad]), sgd, flags, backend=backend)
        ops.step("sgd_", dict(params=[kahan], grads=[grad], master_params=[comp]), sgd, flags,
                 backend=backend)  # fmt: skip
    exact = 1.0 - n * lr
    assert (plain == 1.0).all()
    master = kahan.float() + comp.float()
    ulp = 2.0 ** (1 - DIGITS[dtype])
    assert ((master - exact).abs() <= n * ulp * ulp).all()  # each store: < 1 ulp of c
    assert _same(kahan, master.to(dtype))
    assert (kahan < 1.0).all()


# ---------------------------------------------------------------------------------------------
# The optimizer option: master_weights="kahan"

OPTIM_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in usable_backends()]


@pytest.mark.parametrize("backend", [b for b in OPTIM_BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_optimizer_kahan_backends_equal_reference(case, backend):
    """Every optimizer: four steps (one skipped) with Kahan masters on cpu/triton equal the
    reference backend's, bit for bit for elementwise optimizers (param, compensation, every
    state); where a per-tensor reduction takes part (LAMB's trust ratio, Adafactor's RMS,
    Muon's Newton-Schulz), the joined masters within the cross-backend reduction slack."""
    ref_params, ref = run_master_modes(case, "reference", ["kahan"] * 4)
    params, opt = run_master_modes(case, backend, ["kahan"] * 4)
    start = clone_params(make_model(), torch.bfloat16)
    exact = not case.name.startswith(("lamb", "adafactor", "muon"))
    k = 3  # steps that ran
    for p, q, p0 in zip(params, ref_params, start, strict=True):
        state, ref_state = opt.state[p], ref.state[q]
        assert set(state) == set(ref_state) and "kahan_comp" in state
        assert state["kahan_comp"].dtype == p.dtype
        got, want = (
            join_kahan(p.detach(), state["kahan_comp"]),
            join_kahan(q, ref_state["kahan_comp"]),
        )
        if exact:
            assert _same(p.detach(), q.detach())
            assert _same(got, want)
            for key, value in ref_state.items():
                assert _same(state[key], value), key
        else:
            # compare_backends' reduction slack (4 reductions of the tensor's size per step,
            # each backend off the exact value) on the distance moved, plus what the Kahan
            # store may then lose on each side (2 ulps of the compensation: 2^-14 |c| in bf16).
            slack = 2 * k * 4 * reduction_rtol(p.numel()) * (want - p0.float()).abs()
            comp = state["kahan_comp"].float().abs() + ref_state["kahan_comp"].float().abs()
            slack += k * 2.0**-6 * comp + 2 * k * 2.0**-24 * want.abs() + 1e-38
            assert ((got - want).abs() <= slack).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_optimizer_kahan_tracks_fp32_masters(case):
    """Four steps (one skipped) from the same bf16 params: the Kahan run's master
    (param + compensation) stays within k * 2^-15 of the fp32-master run's, relative to the
    master plus the distance moved (a store loses at most one ulp of the compensation,
    2^-15 |p| in bf16; the fp32 run's roundings are far below), while plain bf16 params are
    off by up to half a bf16 ulp, 2^-9 relative, more than ten times that."""
    fp32_params, fp32 = run_master_modes(case, "cpu", [True] * 4)
    params, opt = run_master_modes(case, "cpu", ["kahan"] * 4)
    start = clone_params(make_model(), torch.bfloat16)
    k = 3  # steps that ran
    worst = 0.0
    for p, q, p0 in zip(params, fp32_params, start, strict=True):
        master = fp32.state[q]["master_param"]
        joined = join_kahan(p.detach(), opt.state[p]["kahan_comp"])
        scale = master.abs() + (master - p0.float()).abs()
        bound = k * 2.0**-15 * scale + 1e-30
        worst = max(worst, float(((joined - master).abs() / (scale + 1e-30)).max()))
        assert ((joined - master).abs() <= bound).all()
    assert worst < 2.0**-9 / 10


def test_switching_master_kinds_and_state_dicts():
    """[note: master weights switched] with Kahan masters: fp32 -> kahan -> fp32 and kahan ->
    compact convert through the fp32 master (kahan to fp32 exactly; fp32 to kahan to the
    compensation's precision); off -> kahan starts from compensation 0; a Kahan state dict
    loads into an fp32-master optimizer and converts at the next step."""
    case = CASES[0]  # AdamW
    # off -> kahan: the same as a run that started with Kahan masters (compensation 0).
    a_params, a = run_master_modes(case, "cpu", [False, "kahan", "kahan", "kahan"])
    assert all(a.state[p]["kahan_comp"].dtype == torch.bfloat16 for p in a_params)
    # fp32 -> kahan -> fp32: the kahan stretch converts from and back to the fp32 master.
    params, opt = run_master_modes(case, "cpu", [True, "kahan", "kahan", True])
    for p in params:
        assert "kahan_comp" not in opt.state[p]
        assert _same(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))
    # kahan -> compact, and kahan -> fp32 exactly (no step in between: the conversion alone).
    params, opt = run_master_modes(case, "cpu", ["kahan"] * 3, 3)
    joined = {p: join_kahan(p.detach(), opt.state[p]["kahan_comp"]) for p in params}
    sd = opt.state_dict()
    assert "kahan_comp" in sd["state"][0]
    fp32_opt = case.cls(params, **{**case.kwargs, "master_weights": True, "backend": "cpu"})
    fp32_opt.load_state_dict(sd)
    assert fp32_opt.param_groups[0]["master_weights"] == "kahan"
    fp32_opt.param_groups[0]["master_weights"] = True
    for group in fp32_opt.param_groups:
        group["lr"] = 0.0
    random_grads(params, seed=99)
    fp32_opt.step()  # adamw with lr 0: the master does not move
    for p in params:
        assert _same(fp32_opt.state[p]["master_param"], joined[p])
        assert "kahan_comp" not in fp32_opt.state[p]


def test_kahan_fp16_and_refusals():
    """fp16 params take Kahan masters; fp32 params keep none (they are their own master);
    a compensation of another dtype is refused naming the problem."""
    p = torch.ones(5, dtype=torch.float16, requires_grad=True)
    q = torch.ones(5, dtype=torch.float32, requires_grad=True)
    opt = fusedopt.SGD([p, q], lr=2.0**-13, master_weights="kahan")
    for _ in range(10):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
    assert opt.state[p]["kahan_comp"].dtype == torch.float16 and (p < 1.0).all()
    assert "kahan_comp" not in opt.state[q]
    with pytest.raises(ValueError, match="Invalid master_weights"):
        fusedopt.AdamW([torch.zeros(3, requires_grad=True)], master_weights="kahan16")
    b = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="master_params"):
        sgd_step_with_masters(b, torch.zeros(4, dtype=torch.float16), "cpu")


def _decay_run(master_weights, steps: int = 100) -> torch.Tensor:
    """AdamW (lr 1e-3, weight decay 0.1: the param shrinks by 1e-4 per step, below half a
    bf16 ulp, 2^-9 relative at least) over bf16 params with zero grads (the Adam update is 0:
    only the decay acts); returns the final master (param + compensation for Kahan)."""
    p = torch.linspace(0.5, 4.0, 257).to(torch.bfloat16).requires_grad_()
    opt = fusedopt.AdamW([p], lr=1e-3, weight_decay=0.1, master_weights=master_weights)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    state = opt.state[p]
    if "kahan_comp" in state:
        return join_kahan(p.detach(), state["kahan_comp"])
    return state["master_param"] if "master_param" in state else p.detach().float()


def test_weight_decay_below_half_an_ulp_accumulates():
    """Decoupled weight decay of 1e-4 per step: plain bf16 params never move; Kahan masters
    follow the fp32 masters within the compensation's precision (k * 2^-15 relative).
    optimi's ``kahan_sum`` (when torch-optimi is installed) multiplies the bf16 param by the
    decay directly, outside the compensation, so its params never move either: the
    difference of [note: kahan master] design choice (1)."""
    start = torch.linspace(0.5, 4.0, 257).to(torch.bfloat16).float()
    fp32, kahan, plain = _decay_run(True), _decay_run("kahan"), _decay_run(False)
    assert torch.equal(plain, start)
    assert ((fp32 - start * (1 - 1e-4) ** 100).abs() <= 1e-5 * start).all()
    assert ((kahan - fp32).abs() <= 100 * 2.0**-15 * fp32.abs()).all()
    assert (kahan - fp32).abs().max() < (plain - fp32).abs().max() / 20
    optimi = pytest.importorskip("optimi")
    q = torch.linspace(0.5, 4.0, 257).to(torch.bfloat16).requires_grad_()
    opt = optimi.AdamW([q], lr=1e-3, weight_decay=0.1, kahan_sum=True, foreach=False)
    for _ in range(100):
        q.grad = torch.zeros_like(q)
        opt.step()
    assert torch.equal(q.detach().float(), start)  # the decay never reached the param
