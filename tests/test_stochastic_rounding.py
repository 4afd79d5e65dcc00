"""Stochastic rounding of the bf16 param store (issue #15; [note: stochastic rounding] in
csrc/include/fusedopt/dtype.h): Philox4x32-10 on Random123's known-answer vectors in every
implementation (the C++ one in csrc/tests/test_convert.cpp), the rounding itself, whole
steps of every optimizer bit for bit across backends, unbiasedness and the stall that it
cures (with derived bounds), bad input, and resume from a state dict."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import triton
import triton.language as tl

import fusedopt
from fusedopt import ops
from fusedopt.reference import philox
from fusedopt.triton_kernels import common
from tests.optim_cases import CASE_IDS, CASES, clone_params, make_model, usable_backends

BACKENDS = [b for b in usable_backends() if b in ("reference", "cpu", "triton")]

#: Random123's kat_vectors for philox4x32 10: (counter, key, output).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# ----------------------------------------------------------------- (1) Philox KATs


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_reference_philox_known_answers(counter, key, expected):
    words = philox.philox4x32_10(*(torch.tensor(c) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _philox_kernel(seed_ptr, counter_ptr, out_ptr):
    lanes = tl.arange(0, 4)
    c = [tl.load(counter_ptr + 4 * lanes + k).to(tl.uint32) for k in range(4)]
    words = tl.philox(tl.load(seed_ptr), c[0], c[1], c[2], c[3])
    for k in tl.static_range(4):
        tl.store(out_ptr + 4 * lanes + k, words[k].to(tl.int64))


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_triton_philox_known_answers(counter, key, expected):
    """``tl.philox`` (what ``common.rounding_bits`` calls) is Random123's Philox4x32-10, with
    the seed's low word as k0: interpreted here, the same code compiled on a GPU."""
    seed = torch.tensor([_int64(key[0] | key[1] << 32)], dtype=torch.int64)
    counters = torch.tensor(list(counter) * 4, dtype=torch.int64)
    out = torch.zeros(16, dtype=torch.int64)
    _philox_kernel[(1,)](seed, counters, out)
    for lane in range(4):
        assert tuple(int(w) & 0xFFFFFFFF for w in out[4 * lane : 4 * lane + 4]) == expected


@triton.jit
def _rounding_kernel(key_ptr, x_ptr, offs_ptr, bits_ptr, out_ptr, N: tl.constexpr):
    lanes = tl.arange(0, N)
    offs = tl.load(offs_ptr + lanes)
    key = (tl.load(key_ptr), tl.load(key_ptr + 1), tl.load(key_ptr + 2))
    bits = common.rounding_bits(key, offs)
    tl.store(bits_ptr + lanes, bits.to(tl.int64))
    x = tl.load(x_ptr + lanes)
    tl.store(out_ptr + lanes, common.round_to(x, tl.bfloat16, common.STOCHASTIC, bits))


def _edge_floats() -> torch.Tensor:
    """fp32 values around every edge of SR: zeros, subnormals, binade ends, the largest
    finite bf16 and RNE's overflow threshold, infinities and NaNs, both signs."""
    bits = [0, 1, 0xABCD, 0x007FFFFF, 0x00800000, 0x3F800000, 0x3F80ABCD, 0x3FFFFFFF,
            0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000,
            0x7F800001, 0x7FFFFFFF]  # fmt: skip
    bits += [b | 0x80000000 for b in bits]
    return torch.tensor([_int64(b) if b < 1 << 31 else b - (1 << 32) for b in bits],
                        dtype=torch.int32).view(torch.float32)  # fmt: skip


def test_triton_rounding_equals_the_reference():
    """``common.rounding_bits`` and SR in ``round_to`` against the reference's, bit for bit:
    element indices above 2^32, a seed above 2^32, random values and every edge value."""
    gen = torch.Generator().manual_seed(3)
    edges = _edge_floats()
    n = 64
    x = torch.cat([edges, torch.randn(n - len(edges), generator=gen) * 100]).float()
    offs = torch.cat([torch.arange(n // 2), (1 << 33) + 5 + torch.arange(n // 2)]).long()
    key = torch.tensor([_int64(0xDEADBEEF12345678), 77, 9], dtype=torch.int64)
    bits = torch.zeros(n, dtype=torch.int64)
    out = torch.zeros(n, dtype=torch.bfloat16)
    _rounding_kernel[(1,)](key, x, offs, bits, out, N=n)
    want_bits = philox.rounding_bits(int(key[0]), 77, 9, offs)
    assert torch.equal(bits, want_bits)
    want = philox.float_to_bf16_stochastic(x, want_bits)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_reference_rounding_carries_with_the_low_half_probability():
    """For every 16-bit random value: exactly ``low16`` of the 2^16 round up (so SR is exact
    in expectation over the bits), both signs, subnormal, binade crossing; and the edges
    as chosen (csrc/tests/test_convert.cpp checks the C++ function alike)."""
    r = torch.arange(1 << 16)
    for u in (0x3F80ABCD, 0xBF80ABCD, 0x0000ABCD, 0x3FFFFFFF):
        x = torch.tensor([u if u < 1 << 31 else u - (1 << 32)], dtype=torch.int32)
        x = x.view(torch.float32).expand(1 << 16)
        got = philox.float_to_bf16_stochastic(x, r).view(torch.int16).long() & 0xFFFF
        assert set(got.unique().tolist()) <= {u >> 16, (u >> 16) + 1}
        assert int((got == (u >> 16) + 1).sum()) == u & 0xFFFF
    edges = _edge_floats()
    for random in (0, 0x7FFF, 0x8000, 0xFFFF):
        got = philox.float_to_bf16_stochastic(
            edges, torch.full_like(edges, random, dtype=torch.int64)
        )
        rne = edges.to(torch.bfloat16)
        nan = edges.isnan()
        assert torch.equal(
            got[nan].view(torch.int16), torch.full((int(nan.sum()),), 0x7FC0, dtype=torch.int16)
        )
        # never an infinity where round to nearest stays finite; infinities stay
        assert not (got[~nan].isinf() & ~rne[~nan].isinf()).any()
        assert torch.equal(got[edges.isinf()], rne[edges.isinf()])


# ----------------------------------------------------------------- (2) whole steps


def _run(case, backend: str, steps: int, sr: bool = True, seed: int = 123, opt=None):
    """bf16 params of the small model stepped ``steps`` times with seeded grads; returns the
    params and the optimizer."""
    params = clone_params(make_model(), torch.bfloat16)
    if opt is None:
        opt = case.cls(params, **case.kwargs, stochastic_rounding=sr, backend=backend)
        opt.sr_seed = seed
    for s in range(steps):
        gen = torch.Generator().manual_seed(100 + s)
        for k, p in enumerate(params):
            p.grad = None if k == 4 else torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    return params, opt


def _bits(tensors) -> list[torch.Tensor]:
    return [t.detach().view(torch.int16).clone() for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_whole_step_is_bit_identical_across_backends(case):
    """Every optimizer (its op, and its passes) with SR: params and every state bit for bit
    the reference's on cpu and triton, after three steps; and not the RNE run's (the test
    cannot pass with SR silently off)."""
    want, ref = _run(case, "reference", 3)
    rne, _ = _run(case, "reference", 3, sr=False)
    assert any(not torch.equal(a, b) for a, b in zip(_bits(want), _bits(rne), strict=True))
    for backend in BACKENDS:
        if backend == "reference":
            continue
        got, opt = _run(case, backend, 3)
        for k, (a, b) in enumerate(zip(_bits(got), _bits(want), strict=True)):
            assert torch.equal(a, b), f"{backend}: param {k}"
        for p, q in zip(got, want, strict=True):
            for key, value in ref.state[q].items():
                other = opt.state[p][key]
                assert torch.equal(other, value), f"{backend}: state {key}"


def test_functional_ops_split_calls_keep_each_params_stream():
    """``fusedopt.ops`` splits a mixed list into calls (here bf16 params with bf16 and with fp32
    grads): each param keeps its own id's bits, as in one call; the key is not written."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (70,), (3, 4)]
    params = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    key = torch.tensor([99, 4, 30, 31, 32], dtype=torch.int64)
    for backend in BACKENDS:
        whole = [p.clone() for p in params]
        ops.sgd_(whole, [g.bfloat16() for g in grads], lr=0.1, sr_key=key, backend=backend)
        split = [p.clone() for p in params]
        mixed = [g.bfloat16() if k != 1 else g.bfloat16().float() for k, g in enumerate(grads)]
        ops.sgd_(split, mixed, lr=0.1, sr_key=key, backend=backend)
        for a, b in zip(whole, split, strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), backend
    # the ops read the key and never write it: the caller advances the counter
    assert key.tolist() == [99, 4, 30, 31, 32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_entries_draw_the_whole_params_bits(backend):
    """[note: sharded stochastic rounding] (fusedopt/optim/_plan.py): a key entry ``id |
    first << 32`` makes a tensor draw the bits of elements ``first, first + 1, ...`` of the
    param ``id``: shards stepped apart (FSDP2's dim-0 shards, uneven, one empty) give the
    whole param's bits, whatever the cut; an entry without the high word is the whole param
    (unsharded bits unchanged). Odd sizes and offsets: the vector paths' tails and edges."""
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(9, 131, generator=gen).bfloat16()
    grad = (torch.randn(9, 131, generator=gen) * 1e-3).bfloat16()
    whole = param.clone()
    ops.sgd_([whole], [grad], lr=0.1, sr_key=torch.tensor([7, 3, 40]), backend=backend)
    for rows in ([5, 4], [3, 3, 3], [9, 0], [1, 7, 1]):
        shards = [p.clone() for p in param.split(rows)]
        firsts = [131 * r for r in itertools.accumulate([0, *rows[:-1]])]
        key = torch.tensor([7, 3, *(40 | first << 32 for first in firsts)])
        ops.sgd_(shards, list(grad.split(rows)), lr=0.1, sr_key=key, backend=backend)
        got = torch.cat(shards)
        assert torch.equal(got.view(torch.int16), whole.view(torch.int16)), (backend, rows)
    # counted from each shard's own start instead (the bits before the fix): not the same
    shards = [p.clone() for p in param.split([5, 4])]
    ops.sgd_(shards, list(grad.split([5, 4])), lr=0.1, sr_key=torch.tensor([7, 3, 40, 40]),
             backend=backend)  # fmt: skip
    assert not torch.equal(torch.cat(shards).view(torch.int16), whole.view(torch.int16))


# ----------------------------------------------------------------- (3) statistics


def _hoeffding(width: float, count: int, failure: float = 1e-9) -> float:
    """The t with P(|mean - E mean| >= t) <= ``failure`` for the mean of ``count`` independent
    values in an interval of ``width`` (Hoeffding: 2 exp(-2 count t^2 / width^2))."""
    return width * math.sqrt(math.log(2 / failure) / (2 * count))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", [0.3, 0.75, 0.1])
def test_unbiased(backend, fraction):
    """One SGD step that moves 1.5 (bf16) by ``fraction`` of its ulp on 2^15 elements (each
    its own Philox counter): the mean of the stored params equals the exact 1.5 - update
    within Hoeffding's bound for a 1e-9 failure probability (each stored value is one of
    the two neighbours, an interval of one ulp); round to nearest is off by
    min(f, 1 - f) ulp, far outside it."""
    n, ulp = 1 << 15, 2.0**-7  # bf16's ulp in [1, 2); 1.5 - f * ulp stays there
    update = fraction * ulp
    params = [torch.full((n,), 1.5, dtype=torch.bfloat16)]
    grads = [torch.full((n,), 1.0, dtype=torch.bfloat16)]
    key = torch.tensor([2024, 1, 0], dtype=torch.int64)
    ops.sgd_(params, grads, lr=update, sr_key=key, backend=backend)
    mean = params[0].double().mean().item()
    bound = _hoeffding(ulp, n)
    assert abs(mean - (1.5 - update)) <= bound, (mean, 1.5 - update, bound)
    rne = [torch.full((n,), 1.5, dtype=torch.bfloat16)]
    ops.sgd_(rne, grads, lr=update, backend=backend)
    rne_error = abs(rne[0].double().mean().item() - (1.5 - update))
    assert rne_error > 4 * bound  # so this test fails where SR is plain rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_rne_stalls_where_sr_moves(backend):
    """SGD on bf16 params at 1.0 with an update of 2^-10, a quarter of the ulp below 1
    (2^-8): to nearest, 1 - 2^-10 rounds back to 1, so 20 steps leave every param at 1.0;
    with SR the params move by 20 * 2^-10 in expectation. The mean of the final values over
    m elements is a sum of m*K bounded martingale increments (each step's rounding error:
    zero mean given the past, in an interval of one ulp <= 2^-8, divided by m), so by
    Azuma-Hoeffding it is within 2^-8 * sqrt(K ln(2/1e-9) / (2m)) of 1 - K*2^-10."""
    m, steps, update = 4096, 20, 2.0**-10
    rne = [torch.ones(m, dtype=torch.bfloat16)]
    sr = [torch.ones(m, dtype=torch.bfloat16)]
    grads = [torch.ones(m, dtype=torch.bfloat16)]
    for s in range(steps):
        ops.sgd_(rne, grads, lr=update, backend=backend)
        key = torch.tensor([7, s, 3], dtype=torch.int64)  # the counter advances per step
        ops.sgd_(sr, grads, lr=update, sr_key=key, backend=backend)
    assert torch.equal(rne[0], torch.ones(m, dtype=torch.bfloat16))
    bound = 2.0**-8 * math.sqrt(steps * math.log(2 / 1e-9) / (2 * m))
    mean = sr[0].double().mean().item()
    assert abs(mean - (1 - steps * update)) <= bound, (mean, 1 - steps * update, bound)


# ----------------------------------------------------------------- (4) bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(master_weights=True), "master weights"),
        (dict(master_weights="compact"), "master weights"),
    ],
)
def test_constructor_refuses_masters(kwargs, match):
    params = clone_params(make_model(), torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        fusedopt.AdamW(params, stochastic_rounding=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_constructor_and_add_param_group_refuse_other_dtypes(dtype):
    params = clone_params(make_model(), dtype)
    with pytest.raises(ValueError, match="bf16 params without master weights"):
        fusedopt.SGD(params, lr=0.1, stochastic_rounding=True)
    opt = fusedopt.SGD(clone_params(make_model(), torch.bfloat16), lr=0.1, stochastic_rounding=True)
    with pytest.raises(ValueError, match="bf16 params without master weights"):
        opt.add_param_group({"params": params})
    assert len(opt.param_groups) == 1


def test_step_refuses_a_group_switched_to_masters_before_touching_anything():
    params = clone_params(make_model(), torch.bfloat16)
    opt = fusedopt.AdamW(params, stochastic_rounding=True, backend="reference")
    for p in params:
        p.grad = torch.ones_like(p)
    before = _bits(params)
    opt.param_groups[0]["master_weights"] = True
    with pytest.raises(ValueError, match="master weights"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_bits(params), before, strict=True))
    assert not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make_key,dtype,masters,error,match",
    [
        (lambda n: torch.zeros(n + 2, dtype=torch.int32), torch.bfloat16, False, TypeError,
         "int64 vector of length"),
        (lambda n: torch.zeros(n + 1, dtype=torch.int64), torch.bfloat16, False, TypeError,
         "int64 vector of length"),
        (lambda n: torch.zeros(n + 2, 2, dtype=torch.int64)[:, 0], torch.bfloat16, False, TypeError,
         "int64 vector of length"),
        (lambda n: torch.zeros(n + 2, dtype=torch.int64), torch.float32, False, TypeError,
         "bfloat16 params without master weights"),
        (lambda n: torch.zeros(n + 2, dtype=torch.int64), torch.bfloat16, True, TypeError,
         "bfloat16 params without master weights"),
    ],
)  # fmt: skip
def test_op_refuses_a_bad_sr_key(backend, make_key, dtype, masters, error, match):
    """Each backend's op (called directly, past ``fusedopt.ops``) refuses a bad sr_key
    before any tensor changes."""
    n = 3
    params = [torch.randn(5).to(dtype) for _ in range(n)]
    grads = [torch.randn(5).to(dtype) for _ in range(n)]
    bufs = [torch.zeros(5, dtype=torch.float32 if masters else dtype) for _ in range(n)]
    master = [p.float() for p in params] if masters else []
    steps = [torch.zeros(()) for _ in range(n)]
    before = [p.clone() for p in params]
    hypers, sizes = ops.hyper_table([0.1] * n, [0.9] * n, [0.0] * n, [0.0] * n)
    op = getattr(torch.ops.fusedopt, f"sgd_{backend}_")
    with pytest.raises(error, match=match):
        # [] after the buffers: no momentum_buffer_scales (not 8-bit)
        op(params, grads, bufs, [], master, steps, hypers, sizes, False, False, None, None,
           None, None, True, make_key(n))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert all(float(s) == 0 for s in steps)


# ----------------------------------------------------------------- (5) resume, skips


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("adamw", "lion", "sgd_momentum",
                                                                "muon", "lamb")],
                         ids=lambda c: c.name)  # fmt: skip
@pytest.mark.parametrize("groups_only", [False, True], ids=["top_level", "groups_only"])
def test_resume_from_state_dict_is_bit_identical(case, backend, groups_only):
    """N steps == k steps, state_dict, load into a fresh optimizer (another seed), N - k
    steps: params and states bit for bit; the state dict holds seed and counter, at its top
    level and in each SR group. ``groups_only``: the top-level entry dropped, as DCP's
    get_optimizer_state_dict does (it keeps state and param_groups only)."""
    n, k = 5, 2
    want, _ = _run(case, backend, n, seed=555)
    params, opt = _run(case, backend, k, seed=555)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["stochastic_rounding"] == {"seed": 555, "counter": k}
    assert all((g["sr_seed"], g["sr_counter"]) == (555, k) for g in saved["param_groups"])
    if groups_only:
        del saved["stochastic_rounding"]
    fresh = case.cls(params, **case.kwargs, stochastic_rounding=True, backend=backend)
    fresh.sr_seed = 1  # overwritten by the load
    fresh.load_state_dict(saved)
    assert not any("sr_seed" in g or "sr_counter" in g for g in fresh.param_groups)
    s0 = k
    for s in range(s0, n):
        gen = torch.Generator().manual_seed(100 + s)
        for j, p in enumerate(params):
            p.grad = None if j == 4 else torch.randn(p.shape, generator=gen).bfloat16()
        fresh.step()
    for a, b in zip(_bits(params), _bits(want), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_leaves_the_counter(backend):
    """A step that ``found_inf`` skips (GradScaler's protocol) changes nothing, its SR counter
    included: skip-then-run draws the bits of the run alone."""
    case = next(c for c in CASES if c.name == "adamw")
    want, opt_a = _run(case, backend, 2)
    params, opt = _run(case, backend, 1)
    for p in params:
        p.grad = torch.ones_like(p)
    before = _bits(params)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(_bits(params), before, strict=True))
    assert opt.state_dict()["stochastic_rounding"]["counter"] == 1
    gen = torch.Generator().manual_seed(101)
    for j, p in enumerate(params):
        p.grad = None if j == 4 else torch.randn(p.shape, generator=gen).bfloat16()
    opt.step()
    for a, b in zip(_bits(params), _bits(want), strict=True):
        assert torch.equal(a, b)
    assert opt_a.state_dict()["stochastic_rounding"]["counter"] == 2
