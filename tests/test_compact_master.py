"""Compact master weights (issue #15): [note: compact master] in ``fusedopt/_contract.py``.

A bf16 param plus an int16 remainder *is* the fp32 master: the split and join are exact over
every fp32 bit pattern (a dense sample here, all 2^32 in ctest's test_convert), and a step
with compact masters equals the step with fp32 masters bit for bit (master, states), the
param being the master rounded to nearest with ties away from zero (so ``master.to(bf16)``
except at exact ties), on every backend, over several steps with a skipped one.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from harness.cases import backend_device_params
from optim_cases import (
    CASE_IDS,
    CASES,
    random_grads,
    run_master_modes,
    usable_backends,
)
from test_master_sync import _bits, _op_call, _same

import fusedopt
from fusedopt import ops
from fusedopt.reference.ops import join_master, split_master
from fusedopt.triton_kernels import common

BACKENDS = [b for b in backend_device_params() if b.values[0][0] in ("reference", "cpu", "triton")]
STEP_OPS = ("adamw_", "lamb_", "lion_", "adan_", "sgd_")
N = 1029  # not a multiple of any vector width; crosses a Triton block


def dense_fp32_bits() -> torch.Tensor:
    """fp32 values (int64 bit patterns) covering every upper half (bf16 value) with the low
    halves where the split's cases change (0, 1, 0x7FFF, 0x8000 (the tie), 0x8001, 0xFFFF)
    and a few random ones: every sign, zero, subnormal, infinity and NaN class."""
    gen = torch.Generator().manual_seed(0)
    edges = [0, 1, 2, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF]
    lows = torch.tensor(edges + torch.randint(0, 1 << 16, (7,), generator=gen).tolist())
    high = torch.arange(1 << 16, dtype=torch.int64)
    return ((high[:, None] << 16) | lows[None, :]).reshape(-1)


def as_fp32(bits: torch.Tensor) -> torch.Tensor:
    return (
        (bits - (bits >= 1 << 31).to(torch.int64) * (1 << 32)).to(torch.int32).view(torch.float32)
    )


def rounded_half_away(master: torch.Tensor) -> torch.Tensor:
    """The compact param of an fp32 master, computed apart from split_master: nearest bf16,
    ties away from zero; NaN -> 0x7FC0."""
    lo = master.to(torch.bfloat16)  # nearest even; differs only at ties
    u = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    tie = (u & 0xFFFF) == 0x8000
    away = as_fp32(((u >> 16) + 1) << 16).to(torch.bfloat16)
    out = torch.where(tie & ~master.isnan(), away, lo)
    out[master.isnan()] = float("nan")
    return out


def check_split(master: torch.Tensor, param: torch.Tensor, remainder: torch.Tensor) -> None:
    """``param`` and ``remainder`` are the compact form of ``master``: the join gives the
    master back bit for bit (a NaN: a NaN), the param is its nearest bf16 with ties away
    from zero, and it is ``master.to(bf16)`` except at exact ties."""
    assert remainder.dtype == torch.int16 and param.dtype == torch.bfloat16
    assert _same(join_master(param, remainder), master)
    assert _same(param, rounded_half_away(master))
    nan = master.isnan()
    u = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    even_tie = ((u & 0xFFFF) == 0x8000) & ((u >> 16) % 2 == 0) & ~nan
    differs = _bits(param) != _bits(master.to(torch.bfloat16))
    assert torch.equal(differs & ~nan, even_tie)


def test_split_join_reference_dense():
    """The reference split/join over the dense sample (~1M patterns), and the hand-checked
    edges: ties both ways, -0, the largest finite value (rounds to inf and back), NaN."""
    master = as_fp32(dense_fp32_bits())
    check_split(master, *split_master(master))
    cases = {  # master bits: (param bits, remainder)
        0x3F808000: (0x3F81, -0x8000),  # tie, even upper: away from zero (RNE: 0x3F80)
        0x3F818000: (0x3F82, -0x8000),  # tie, odd upper: up as RNE
        0xBF808000: (0xBF81, -0x8000),  # negative tie: away from zero
        0x80000000: (0x8000, 0),  # -0
        0x7F7FFFFF: (0x7F80, -1),  # max finite -> +inf param, joins back
        0x00007FFF: (0x0000, 0x7FFF),  # subnormal below half: +0 param
    }
    for bits, (want_p, want_r) in cases.items():
        m = as_fp32(torch.tensor([bits]))
        p, r = split_master(m)
        assert int(_bits(p).item()) & 0xFFFF == want_p, hex(bits)
        assert int(r.item()) == want_r, hex(bits)
        assert _same(join_master(p, r), m)


@triton.jit
def _split_join(m_ptr, p_ptr, r_ptr, j_ptr, BLOCK: tl.constexpr):
    """Triton's split_master, then join_master, over BLOCK fp32 masters per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    param, remainder = common.split_master(tl.load(m_ptr + offs))
    tl.store(p_ptr + offs, param)
    tl.store(r_ptr + offs, remainder)
    tl.store(j_ptr + offs, common.join_master(param, remainder))


@pytest.mark.skipif(not fusedopt.backends()["triton"].usable, reason="needs Triton")
def test_split_join_triton_dense():
    """Triton's split_master/join_master (common.py; interpreted here) equal the reference's
    over the dense sample, bit for bit: param, remainder and joined master."""
    master = as_fp32(dense_fp32_bits())
    param = torch.empty(master.shape, dtype=torch.bfloat16)
    remainder = torch.empty(master.shape, dtype=torch.int16)
    joined = torch.empty_like(master)
    block = 1 << 14
    _split_join[(master.numel() // block,)](master, param, remainder, joined, BLOCK=block)
    want_p, want_r = split_master(master)
    assert torch.equal(_bits(param), _bits(want_p))
    assert torch.equal(remainder, want_r)
    assert _same(joined, master)
    check_split(master, param, remainder)


def test_join_of_a_written_param_rounds_to_it():
    """A write into the param keeps the old remainder: the joined master rounds back to the
    written value (within half a bf16 ulp of it), and a remainder that does not fit it (a
    negative one beside a zero, a positive one beside an infinity, anything beside a NaN) is
    dropped, the written value taken exactly."""
    values = torch.tensor([0.0, -0.0, 1.0, -3.5, float("inf"), -float("inf"), float("nan")])
    param = values.to(torch.bfloat16).repeat_interleave(4)
    remainder = torch.tensor([-0x8000, -1, 1, 0x7FFF] * len(values), dtype=torch.int16)
    master = join_master(param, remainder)
    assert not master[~param.isnan()].isnan().any()
    assert _same(split_master(master)[0], param)
    misfit = ((param == 0) & (remainder < 0)) | (param.isinf() & (remainder > 0))
    assert _same(master[misfit], param[misfit].float())


def sgd_step_with_masters(param: torch.Tensor, master: torch.Tensor, backend: str) -> None:
    """One momentum-free ``sgd_`` call on ``param`` with ``master`` as its master_params
    entry, whose dtype says the master kind (the refusal tests: a kind that does not fit)."""
    ops.step("sgd_", dict(params=[param], grads=[param.clone()], master_params=[master]),
             dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0),
             dict(nesterov=False, maximize=False), backend=backend)  # fmt: skip


def test_fp16_compact_master_is_refused():
    p = torch.zeros(4, dtype=torch.float16)
    with pytest.raises(TypeError, match="compact masters are for bfloat16"):
        sgd_step_with_masters(p, torch.zeros(4, dtype=torch.int16), "reference")


def _edge_masters(gen: torch.Generator) -> torch.Tensor:
    """fp32 masters with bf16 edge values: exact ties both ways (even and odd upper halves,
    both signs), +-0, subnormals, values just below a power of two, large values."""
    m = torch.randn(N, generator=gen)
    u = m.view(torch.int32).clone()
    u[0:40:2] = (u[0:40:2] & ~0x1FFFF) | 0x8000  # even upper half, exact tie
    u[1:40:2] = (u[1:40:2] & ~0x1FFFF) | 0x18000  # odd upper half, exact tie
    m = u.view(torch.float32)
    m[40], m[41] = 0.0, -0.0
    m[42], m[43] = 1e-39, -3e-40  # fp32 subnormals (bf16 has them too)
    m[44] = torch.tensor(0x3F7FFFFF, dtype=torch.int32).view(torch.float32)  # 1 - 2^-24
    m[45] = -torch.tensor(0x3F7F8000, dtype=torch.int32).view(torch.float32)  # tie below -1
    m[46] = -1.0e18  # large, but LAMB's sum of squares stays finite
    return m


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_compact_steps_equal_fp32_master_steps(op, target):
    """Four steps, the first with lr 0 (the masters, exact ties among them, stay as they
    are), the second skipped by found_inf: with compact masters the joined master
    and every state equal those of the fp32-master run bit for bit, and the param is the
    compact rounding of that master (the fp32 run's param except at exact ties)."""
    backend, device = target
    gen = torch.Generator().manual_seed(5)
    masters = [_edge_masters(gen).to(device) for _ in range(2)]
    params = [m.to(torch.bfloat16) for m in masters]
    split = [split_master(m.cpu()) for m in masters]
    compact_params = [p.to(device) for p, _ in split]
    remainders = [r.to(device) for _, r in split]
    lists, hypers, flags = _op_call(op, 2, device, gen)
    compact_lists = {k: [t.clone() for t in v] for k, v in lists.items()}
    for step in range(4):
        grads = [torch.randn(N, generator=gen).to(device=device, dtype=torch.bfloat16)
                 for _ in masters]  # fmt: skip
        found_inf = torch.full((), float(step == 1), device=device)
        # lr 0 first: every master keeps its value, so the store meets the exact ties.
        step_hypers = {**hypers, "lr": 0.0} if step == 0 else hypers
        ops.step(op, dict(params=params, grads=grads, master_params=masters, **lists),
                 step_hypers, flags, found_inf=found_inf, backend=backend)  # fmt: skip
        ops.step(op, dict(params=compact_params, grads=grads, master_params=remainders,
                          **compact_lists), step_hypers, flags, found_inf=found_inf,
                 backend=backend)  # fmt: skip
        for m, cp, r in zip(masters, compact_params, remainders, strict=True):
            check_split(m.cpu(), cp.cpu(), r.cpu())
            assert _same(join_master(cp, r), m)
        for name, got in compact_lists.items():
            for a, b in zip(got, lists[name], strict=True):
                assert _same(a, b), name


# ---------------------------------------------------------------------------------------------
# The optimizer option: master_weights="compact"

OPTIM_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in usable_backends()]


def _tie_masters(opt) -> None:
    """Make every 5th fp32 master an exact tie with an even upper half (the param its
    ``to(bf16)``, as after a step): where the compact param differs from the fp32 one."""
    for group in opt.param_groups:
        for p in group["params"]:
            master = opt.state[p]["master_param"]
            bits = master.view(torch.int32)
            bits[..., ::5] = (bits[..., ::5] & ~0x1FFFF) | 0x8000
            p.data.copy_(master)


def _optim_run(case, backend: str, modes: list, steps: int = 4, ties: bool = False):
    """``run_master_modes`` of bf16 params; with ``ties``, step 1 has lr 0 and starts from
    masters with exact ties (``_tie_masters``, fp32 masters after step 0)."""
    lrs: list[float] = []

    def set_lr(opt, k: int) -> None:
        if not lrs:
            lrs.append(opt.param_groups[0]["lr"])
        if ties and k == 1:
            _tie_masters(opt)
        for group in opt.param_groups:
            group["lr"] = 0.0 if ties and k == 1 else lrs[0]

    return run_master_modes(case, backend, modes, steps, before_step=set_lr)


def _master_of(opt, p: torch.Tensor) -> torch.Tensor:
    state = opt.state[p]
    if "master_remainder" in state:
        return join_master(p, state["master_remainder"])
    return state["master_param"]


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_optimizer_compact_equals_fp32_masters(case, backend):
    """Every optimizer, every backend: four steps (one skipped) with compact masters equal
    the fp32-master run bit for bit: the joined master, every state and step count; the
    param is the compact rounding of the master."""
    ref_params, ref = _optim_run(case, backend, [True] * 4)
    params, opt = _optim_run(case, backend, ["compact"] * 4)
    tied_ref_params, tied_ref = _optim_run(case, backend, [True, True], 2, ties=True)
    tied_params, tied = _optim_run(case, backend, [True, "compact"], 2, ties=True)
    for p, q in zip(tied_params, tied_ref_params, strict=True):
        master = tied_ref.state[q]["master_param"]
        assert _same(_master_of(tied, p), master)
        check_split(master, p.detach(), tied.state[p]["master_remainder"])
        # the ties are there, rounded away; Schedule-Free's lr-0 step is not the identity
        # (y still moves towards z by ckp1), so it plants none
        if case.cls is not fusedopt.ScheduleFreeAdamW:
            assert not torch.equal(_bits(p), _bits(q))
    for p, q in zip(params, ref_params, strict=True):
        assert set(opt.state[p]) == set(ref.state[q]) - {"master_param"} | {"master_remainder"}
        assert opt.state[p]["master_remainder"].dtype == torch.int16
        master = ref.state[q]["master_param"]
        assert _same(_master_of(opt, p), master)
        check_split(master, p.detach(), opt.state[p]["master_remainder"])
        for key, value in ref.state[q].items():
            if key != "master_param":
                assert _same(opt.state[p][key], value), key


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("adamw", "lamb", "lion")],
                         ids=lambda c: c.name)  # fmt: skip
def test_switching_master_modes_mid_run_is_exact(case):
    """fp32 -> compact -> fp32 (and off -> compact) mid-run: the run equals the one that never
    switched, bit for bit, params included (the switches rewrite a param only at exact ties,
    and back)."""
    ref_params, ref = _optim_run(case, "cpu", [True] * 4, ties=True)
    params, opt = _optim_run(case, "cpu", [True, "compact", "compact", True], ties=True)
    for p, q in zip(params, ref_params, strict=True):
        assert "master_remainder" not in opt.state[p]
        assert _same(p.detach(), q.detach())
        for key, value in ref.state[q].items():
            assert _same(opt.state[p][key], value), key
    # From no master: the master is made from the param (remainder 0), as an fp32 one is.
    fp32_params, fp32 = _optim_run(case, "cpu", [False, True, True, True])
    params, opt = _optim_run(case, "cpu", [False, "compact", "compact", "compact"])
    for p, q in zip(params, fp32_params, strict=True):
        assert _same(_master_of(opt, p), fp32.state[q]["master_param"])


def test_state_dict_converts_between_fp32_and_compact():
    """A compact state dict (``master_remainder``) loads into an optimizer that then steps
    with fp32 masters, and an fp32 one into a compact one, exactly: the next step equals the
    unconverted run. (As in torch, a loaded dict brings its groups' settings: the mode is set
    after the load.)"""
    case = CASES[0]  # AdamW
    ref_params, ref = _optim_run(case, "cpu", [True] * 3, 3)
    params, opt = _optim_run(case, "cpu", ["compact"] * 3, 3)
    assert "master_remainder" in opt.state_dict()["state"][0]
    # compact -> fp32: a fresh fp32-master optimizer over the compact run's params.
    fp32_opt = case.cls(params, **{**case.kwargs, "master_weights": True, "backend": "cpu"})
    fp32_opt.load_state_dict(opt.state_dict())
    assert fp32_opt.param_groups[0]["master_weights"] == "compact"
    fp32_opt.param_groups[0]["master_weights"] = True
    # fp32 -> compact, over the fp32 run's params.
    compact = case.cls(ref_params, **{**case.kwargs, "master_weights": "compact",
                                      "backend": "cpu"})  # fmt: skip
    compact.load_state_dict(ref.state_dict())
    compact.param_groups[0]["master_weights"] = "compact"
    random_grads(params, seed=99)
    random_grads(ref_params, seed=99)
    fp32_opt.step()
    compact.step()
    for p, q in zip(params, ref_params, strict=True):
        assert _same(fp32_opt.state[p]["master_param"], _master_of(compact, q))
        assert _same(p.detach(), fp32_opt.state[p]["master_param"].to(torch.bfloat16))
        check_split(fp32_opt.state[p]["master_param"], q.detach(),
                    compact.state[q]["master_remainder"])  # fmt: skip


def test_compact_refuses_fp16_params():
    with pytest.raises(ValueError, match=r"compact.*bfloat16"):
        fusedopt.AdamW([torch.zeros(3, dtype=torch.float16, requires_grad=True)],
                       master_weights="compact")  # fmt: skip
    with pytest.raises(ValueError, match="Invalid master_weights"):
        fusedopt.AdamW([torch.zeros(3, requires_grad=True)], master_weights="fp8")
    p = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    opt = fusedopt.SGD([p], lr=0.1, master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["master_param"].clone())
    opt.param_groups[0]["master_weights"] = "compact"
    with pytest.raises(ValueError, match=r"compact.*bfloat16"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert torch.equal(opt.state[p]["master_param"], before[1])


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_compact_master_adopts_written_params(op, target):
    """[note: master sync] with compact masters: a value written into the param is adopted
    joined with the old remainder, whatever ``master_sync`` says. A step skipped by
    found_inf changes nothing; a step with lr 0 (the master unchanged by the update) then
    leaves the written param as written, its master ``join_master(written, old remainder)``
    (a remainder that does not fit the written value dropped: a zero over a negative one)."""
    backend, device = target
    gen = torch.Generator().manual_seed(7)
    master = torch.randn(N, generator=gen)
    param, remainder = (t.to(device) for t in split_master(master))
    written = param.clone()
    written[::5] = torch.randn(written[::5].shape, generator=gen).to(torch.bfloat16)
    written[1::10] = 0.0
    remainder[1::10] = -5  # a zero written over a negative remainder: taken exactly
    want = join_master(written, remainder)
    grads = [torch.randn(N, generator=gen).to(device=device, dtype=torch.bfloat16)]
    lists, hypers, flags = _op_call(op, 1, device, gen)
    for sync in (True, False):
        param.copy_(written)
        before = param.clone(), remainder.clone()
        ops.step(op, dict(params=[param], grads=grads, master_params=[remainder], **lists),
                 hypers, {**flags, "master_sync": sync}, found_inf=torch.ones((), device=device),
                 backend=backend)  # fmt: skip
        assert torch.equal(_bits(param), _bits(before[0]))
        assert torch.equal(remainder, before[1])
    ops.step(op, dict(params=[param], grads=grads, master_params=[remainder], **lists),
             {**hypers, "lr": 0.0}, {**flags, "master_sync": False}, backend=backend)  # fmt: skip
    assert _same(join_master(param, remainder), want)
    assert torch.equal(_bits(param), _bits(written))
    assert not remainder[1::10].any()


def test_ops_split_a_call_by_master_dtype():
    """``fusedopt.ops`` takes fp32 and compact masters in one list (one backend call each):
    the same as two calls."""
    gen = torch.Generator().manual_seed(9)
    masters = [torch.randn(N, generator=gen) for _ in range(2)]
    grads = [torch.randn(N, generator=gen).to(torch.bfloat16) for _ in range(2)]
    hypers = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0)
    flags = dict(nesterov=False, maximize=False)
    compact_param, remainder = split_master(masters[1])
    params = [masters[0].to(torch.bfloat16), compact_param]
    lists = dict(params=params, grads=grads, master_params=[masters[0], remainder])
    alone = [masters[0].clone()], [compact_param.clone()], [remainder.clone()]
    fp32_param = params[0].clone()
    ops.step("sgd_", lists, hypers, flags, backend="cpu")
    ops.step("sgd_", dict(params=[fp32_param], grads=grads[:1], master_params=alone[0]),
             hypers, flags, backend="cpu")  # fmt: skip
    ops.step("sgd_", dict(params=alone[1], grads=grads[1:], master_params=alone[2]), hypers,
             flags, backend="cpu")  # fmt: skip
    assert _same(masters[0], alone[0][0])
    assert _same(join_master(params[1], remainder), join_master(alone[1][0], alone[2][0]))
