"""The state dtype independent of the param dtype (issue #15; [note: state dtype] in
csrc/include/fusedopt/dtype.h): the float states of AdamW, Adam, LAMB, Lion and SGD stored as
fp32, bf16 or fp16 beside fp32 params or 16-bit params with masters, bf16 ones rounded
stochastically in an SR step. Whole steps bit for bit across backends (CUDA:
csrc/tests/test_cuda_emulated.cpp's kStateStorages), the stall of a round-to-nearest bf16
state with a decay close to 1 that stochastic rounding cures (a derived bound), bad input,
and state dicts."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch

import fusedopt
from fusedopt import ops
from tests.optim_cases import CASES, clone_params, make_model, run_master_modes, usable_backends

BACKENDS = [b for b in usable_backends() if b in ("reference", "cpu", "triton")]
#: The optimizer cases of the ops that declare ``state_dtypes`` (tests/optim_cases.py).
STATE_CASES = {
    c.name: c
    for c in CASES
    if c.name in ("adamw", "adamw_amsgrad_maximize", "adam_l2", "lamb", "lamb_trust_clip",
                  "lion", "sgd_momentum", "sgd_nesterov")
}  # fmt: skip
#: The float states' keys of those ops.
FLOAT_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

#: (case, param dtype, master_weights, state dtype, stochastic_rounding)
STORAGES = [
    ("adamw", torch.float32, False, torch.bfloat16, False),
    ("adamw", torch.float32, False, torch.bfloat16, True),
    ("adam_l2", torch.float32, False, torch.float16, False),
    ("adamw_amsgrad_maximize", torch.float32, False, torch.bfloat16, True),
    ("adamw", torch.bfloat16, True, torch.bfloat16, True),
    ("adamw_amsgrad_maximize", torch.bfloat16, True, torch.float16, False),
    ("adam_l2", torch.bfloat16, "compact", torch.bfloat16, True),
    ("adamw", torch.float16, "kahan", torch.bfloat16, False),
    ("adamw", torch.bfloat16, False, torch.float32, True),
    ("lion", torch.float32, False, torch.bfloat16, True),
    ("lion", torch.float32, False, torch.float16, False),
    ("lion", torch.bfloat16, True, torch.bfloat16, True),
    ("lion", torch.bfloat16, False, torch.float32, True),
    ("sgd_momentum", torch.float32, False, torch.bfloat16, True),
    ("sgd_nesterov", torch.float32, False, torch.float16, False),
    ("sgd_momentum", torch.bfloat16, "compact", torch.bfloat16, True),
    ("sgd_momentum", torch.bfloat16, False, torch.float32, False),
    ("lamb", torch.float32, False, torch.bfloat16, True),
    ("lamb_trust_clip", torch.float32, False, torch.float16, False),
    ("lamb", torch.bfloat16, True, torch.bfloat16, True),
    ("lamb_trust_clip", torch.bfloat16, "kahan", torch.bfloat16, False),
    ("lamb", torch.bfloat16, False, torch.float32, True),
]


def _id(storage) -> str:
    name, p, master, s, sr = storage
    short = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    mode = {False: "", True: "+master", "compact": "+compact", "kahan": "+kahan"}[master]
    return f"{name}-{short[p]}{mode}-states_{short[s]}{'-sr' if sr else ''}"


def _run(storage, backend: str, sr: bool | None = None):
    """4 steps of the shared model (step 2 skipped by found_inf) with the storage's params,
    masters and states (``run_master_modes``); the SR seed fixed."""
    name, dtype, master, state_dtype, stochastic = storage
    stochastic = stochastic if sr is None else sr
    kwargs = dict(state_dtype=state_dtype, stochastic_rounding=stochastic)
    case = dataclasses.replace(STATE_CASES[name], kwargs={**STATE_CASES[name].kwargs, **kwargs})

    def seed(opt, k):
        if k == 0:
            opt.sr_seed = 2026

    return run_master_modes(case, backend, [master] * 4, dtype=dtype, before_step=seed)


def _state_bits(opt, params, bits: bool = True) -> list[torch.Tensor]:
    """Every per-param state but the step, 16-bit ones as their int16 bits (``bits``)."""
    out = []
    for p in params:
        for key, t in sorted(opt.state[p].items()):
            if key != "step":
                as_bits = bits and t.element_size() == 2
                out.append(t.detach().view(torch.int16) if as_bits else t.detach().clone())
    return out


@pytest.mark.parametrize("storage", STORAGES, ids=_id)
def test_whole_step_is_bit_identical_across_backends(storage):
    """Params, masters and every state the reference's bit for bit on cpu and triton after
    four steps; the moments in the requested dtype; an SR run differs from the RNE run (the
    test cannot pass with SR of the states silently off) and so does a run with states of
    the default dtype (nor with the key ignored)."""
    name, dtype, master, state_dtype, sr = storage
    want_params, want = _run(storage, "reference")
    for p in want_params:
        for key in FLOAT_STATES:
            if key in want.state[p]:
                assert want.state[p][key].dtype == state_dtype, key
    want_bits = _state_bits(want, want_params)
    default = (name, dtype, master, None, sr and (dtype, master) == (torch.bfloat16, False))
    other_params, other = _run(default, "reference")
    # the params, and the states' values (Lion's params see the moment through a sign only)
    want_values = [*want_params, *(t.float() for t in _state_bits(want, want_params, False))]
    other_values = [*other_params, *(t.float() for t in _state_bits(other, other_params, False))]
    assert any(not torch.equal(a, b) for a, b in zip(want_values, other_values, strict=True))
    if sr:
        rne_params, rne = _run(storage, "reference", sr=False)
        rne_all = [*rne_params, *_state_bits(rne, rne_params)]
        want_all = [*want_params, *want_bits]
        assert any(not torch.equal(a, b) for a, b in zip(rne_all, want_all, strict=True))
    lamb = name.startswith("lamb")
    for backend in BACKENDS:
        if backend == "reference":
            continue
        params, opt = _run(storage, backend)
        for k, (a, b) in enumerate(zip(params, want_params, strict=True)):
            if lamb:
                assert _lamb_close(a, b, STATE_CASES[name].kwargs["lr"]), f"{backend}: param {k}"
                continue
            assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                               b.view(torch.int16) if b.element_size() == 2 else b), (
                f"{backend}: param {k}")  # fmt: skip
        for p, q in zip(params, want_params, strict=True):
            for key, b in sorted(want.state[q].items()):
                a = opt.state[p][key]
                if lamb and key == "master_param":
                    assert _lamb_close(a, b, STATE_CASES[name].kwargs["lr"]), backend
                elif key != "step":
                    assert a.dtype == b.dtype, (backend, key)
                    assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                                       b.view(torch.int16) if b.element_size() == 2 else b), (
                        f"{backend}: {key}")  # fmt: skip


def _lamb_close(a: torch.Tensor, b: torch.Tensor, lr: float, steps: int = 3) -> bool:
    """LAMB's params (and masters) after ``steps`` applied steps on two backends: their
    trust ratios differ by the order of the norms' sums ([note: lamb tolerance],
    tests/test_cpu_backend.py's ``_lamb_close``: a relative delta = (n + 39) u for a tensor of
    n elements), while every moment is bit for bit (checked apart). A step moves a param by
    lr * r * u with ||r u|| = ||p|| (r <= ||p|| / ||u|| with trust_clip), so one element by
    at most lr ||p_k||, and ||p_k|| <= ||p_N|| / (1 - lr)^(N - k) <= ||p_N|| / (1 - lr)^steps;
    each step's difference is then at most delta lr ||p_k|| plus a rounding of the stored
    value on each side (one ulp of its dtype, eps |x|), and the differences add up."""
    u, eps = 2.0**-24, torch.finfo(b.dtype).eps  # the stored dtype's ulp at 1
    a, b = a.detach().double(), b.detach().double()
    delta = (b.numel() + 39) * u
    norm = b.norm().item() / (1 - lr) ** steps
    bound = steps * (delta * lr * norm + eps * torch.maximum(a.abs(), b.abs())) + 2.0**-149
    return bool(((a - b).abs() <= bound).all())


def _zeros_like(t: torch.Tensor) -> list[torch.Tensor]:
    return [torch.zeros_like(t)]


#: op -> one step with zero grads of fp32 params ``p`` that multiplies the bf16 state ``s``
#: by 0.999 (AdamW's and LAMB's exp_avg_sq at beta2 = 0.999, Lion's exp_avg at beta2 =
#: 0.999, SGD's momentum buffer at momentum 0.999 past its first step), nothing else
#: decaying it; ``n`` the step counts (1 at the start: SGD's first-step rule is behind).
DECAY_STEPS = {
    "adamw_": lambda p, g, s, n, key, backend: ops.adamw_(
        p, g, _zeros_like(s[0]), s, n, lr=1e-3, beta2=0.999, weight_decay=0.0, sr_key=key,
        backend=backend),
    "lamb_": lambda p, g, s, n, key, backend: ops.lamb_(
        p, g, _zeros_like(s[0]), s, n, lr=1e-3, beta2=0.999, weight_decay=0.0, sr_key=key,
        backend=backend),
    "lion_": lambda p, g, s, n, key, backend: ops.lion_(
        p, g, s, lr=1e-3, beta2=0.999, sr_key=key, backend=backend),
    "sgd_": lambda p, g, s, n, key, backend: ops.sgd_(
        p, g, s, n, lr=1e-3, momentum=0.999, sr_key=key, backend=backend),
}  # fmt: skip


def _decay(op: str, backend: str, steps: int, m: int, sr: bool) -> torch.Tensor:
    """``steps`` steps of ``op`` (:data:`DECAY_STEPS`) on fp32 params whose bf16 state
    starts at 1.0: the final state."""
    params = [torch.ones(m)]
    grads = [torch.zeros(m)]
    state = [torch.ones(m, dtype=torch.bfloat16)]
    counts = [torch.ones(())]
    for s in range(steps):
        key = torch.tensor([31337, s, 4], dtype=torch.int64) if sr else None
        DECAY_STEPS[op](params, grads, state, counts, key, backend)
    return state[0]


@pytest.mark.parametrize("op", list(DECAY_STEPS))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_bf16_state_stalls_to_nearest_and_decays_stochastically(backend, op):
    """A bf16 state at 1.0 decayed by 0.999 a step with zero grads (AdamW's and LAMB's
    ``exp_avg_sq``, Lion's ``exp_avg``, SGD's ``momentum_buffer``): to nearest, 0.999 * 1
    is 2^-10 below 1, a quarter of the bf16 gap below 1 (2^-8), so it rounds back to 1.0 and
    N steps leave exactly the same bits (the stall). With stochastic rounding it decays.

    The bound. Per element, v_{k+1} = SR(a v_k) with a = fp32(0.999) and the product rounded
    once in fp32 (relative error <= 2^-24). Write e_{k+1} = v_{k+1} - fl(a v_k): given the
    past, E[e_{k+1}] = 0 (SR is unbiased) and e_{k+1} lies in the gap between the two bf16
    neighbours of fl(a v_k), of width <= 2^-8 while v_k <= 1 (which SR keeps: a v_k < 1).
    Then v_N = a^N + sum_k a^(N-1-k) e_{k+1} + r with the fp32 product errors |r| <= N 2^-24.
    The mean over m elements (each element its own Philox counter) is a^N + r' plus a sum of
    m N martingale differences e/m scaled by a^j, of widths 2^-8 a^j / m, so by
    Azuma-Hoeffding P(|mean - a^N - r'| >= t) <= 2 exp(-2 t^2 / W) with
    W = 2^-16 S / m, S = sum_{j<N} a^(2j) = (1 - a^(2N)) / (1 - a^2). For a failure
    probability of 1e-9: t = 2^-8 sqrt(S ln(2e9) / (2 m)). Against the exact 0.999^N the
    bound adds N 2^-24 and |a^N - 0.999^N| <= N |a - 0.999|."""
    steps, m = 300, 4096
    rne = _decay(op, backend, steps, m, sr=False)
    assert torch.equal(rne.view(torch.int16), torch.ones(m, dtype=torch.bfloat16).view(torch.int16))
    v = _decay(op, backend, steps, m, sr=True)
    a = torch.tensor(0.999, dtype=torch.float32).item()
    s_sum = (1 - a ** (2 * steps)) / (1 - a * a)
    bound = 2.0**-8 * math.sqrt(s_sum * math.log(2e9) / (2 * m))
    bound += steps * 2.0**-24 + steps * abs(a - 0.999)
    exact = 0.999**steps
    mean = v.double().mean().item()
    assert abs(mean - exact) <= bound, (mean, exact, bound)
    assert 1.0 - exact > 50 * bound  # the bound separates the decay from the stall at 1.0


@pytest.mark.parametrize("op", list(DECAY_STEPS))
def test_triton_decay_is_the_references(op):
    """The interpreted Triton kernel is too slow for 300 steps of 4096 elements: it draws
    the reference's bits over 20 steps (the stall and the decay above then hold for it)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton is not usable here")
    for sr in (False, True):
        got, want = _decay(op, "triton", 20, 256, sr), _decay(op, "reference", 20, 256, sr)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), sr


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(state_dtype=torch.float64), "Invalid state_dtype"),
        (dict(state_dtype="bfloat16"), "Invalid state_dtype"),
        (dict(state_dtype=torch.int8), "Invalid state_dtype"),
        (dict(state_dtype=torch.bfloat16, state_bits=8), "state_bits=8"),
        (dict(state_dtype=torch.float16, stochastic_rounding=True), "float16"),
    ],
)
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.LAMB, fusedopt.Lion, fusedopt.SGD])
def test_constructor_refuses(cls, kwargs, match):
    params = clone_params(make_model(), torch.float32)
    with pytest.raises(ValueError, match=match):
        cls(params, **kwargs)


def test_refused_before_any_tensor_is_touched():
    """A group whose state_dtype cannot be honoured raises at add_param_group or at the step
    (fp64 params; an op without free state dtypes; fp16 params without masters under SR of
    bf16 states), and a refused step changes nothing."""
    with pytest.raises(ValueError, match="float64"):
        fusedopt.AdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))],
                       state_dtype=torch.bfloat16)  # fmt: skip
    adan = fusedopt.Adan([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="not supported by adan_"):
        adan.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                              "state_dtype": torch.bfloat16})  # fmt: skip
    for cls in (fusedopt.LAMB, fusedopt.Lion, fusedopt.SGD):
        with pytest.raises(ValueError, match="float64"):
            cls([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))],
                state_dtype=torch.bfloat16)  # fmt: skip
    with pytest.raises(ValueError, match="float16 param"):
        fusedopt.AdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))],
                       state_dtype=torch.bfloat16, stochastic_rounding=True)  # fmt: skip
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedopt.AdamW([p], state_dtype=torch.bfloat16, backend="reference")
    p.grad = torch.ones(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    weights = p.detach().clone()
    p.data = p.data.double()
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        opt.step()
    assert torch.equal(p.detach().float(), weights)
    assert all(torch.equal(before[k], opt.state[p][k]) for k in before)


#: op -> (its float state lists, a call of it on fp32 params ``p`` with the float states
#: ``states`` (one list per state slot: AdamW's two, three with AMSGrad, LAMB's two,
#: Lion's one, SGD's one) and ``sr_key``).
STATE_CALLS = {
    "adamw_": (2, lambda p, g, states, steps, key, backend: ops.adamw_(
        p, g, *states[:2], steps, max_exp_avg_sqs=states[2] if len(states) > 2 else (),
        amsgrad=len(states) > 2, lr=0.1, sr_key=key, backend=backend)),
    "lamb_": (2, lambda p, g, states, steps, key, backend: ops.lamb_(
        p, g, *states, steps, lr=0.1, sr_key=key, backend=backend)),
    "lion_": (1, lambda p, g, states, steps, key, backend: ops.lion_(
        p, g, *states, lr=0.1, sr_key=key, backend=backend)),
    "sgd_": (1, lambda p, g, states, steps, key, backend: ops.sgd_(
        p, g, *states, steps, lr=0.1, momentum=0.9, sr_key=key, backend=backend)),
}  # fmt: skip


@pytest.mark.parametrize("op", list(STATE_CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_entries_draw_the_whole_params_state_bits(backend, op):
    """[note: sharded stochastic rounding] with [note: state dtype]: a key entry ``id | first
    << 32`` moves the element index of every store's Philox counter, the bf16 states' (their
    own streams, AMSGrad's third included) as the param's: dim-0 shards of an fp32 param
    with bf16 SR states (uneven, one empty; odd sizes for the vector tails), stepped
    apart, give the whole param's states bit for bit; counted from each shard's own start
    they do not. Every op with free state dtypes, AdamW with AMSGrad."""
    gen = torch.Generator().manual_seed(6)
    param = torch.randn(7, 67, generator=gen)
    grad = torch.randn(7, 67, generator=gen)
    n, call = STATE_CALLS[op]
    n += op == "adamw_"  # AMSGrad's third state
    moments = [(torch.rand(7, 67, generator=gen) * 1e-2).bfloat16() for _ in range(n)]

    def step(rows, entries):
        ps, gs = list(param.clone().split(rows)), list(grad.split(rows))
        ms = [list(m.clone().split(rows)) for m in moments]
        steps = [torch.full((), 3.0) for _ in rows]
        key = torch.tensor([11, 5, *entries])
        call(ps, gs, ms, steps, key, backend)
        return [torch.cat(m).view(torch.int16) for m in ms]

    whole = step([7], [40])
    for rows in ([4, 3], [2, 2, 3], [7, 0], [1, 5, 1]):
        firsts = [67 * r for r in itertools.accumulate([0, *rows[:-1]])]
        got = step(rows, [40 | first << 32 for first in firsts])
        for k, (a, b) in enumerate(zip(got, whole, strict=True)):
            assert torch.equal(a, b), (backend, rows, k)
    unsharded = step([4, 3], [40, 40])
    assert not all(torch.equal(a, b) for a, b in zip(unsharded, whole, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_refuses_bad_states(backend):
    """The functional op: an sr_key beside fp16 states, beside fp32 params with fp32 states,
    and states of two dtypes for one param; nothing written. (The backends' own checks:
    test_backend_ops_refuse_bad_states.)"""
    p, g = [torch.ones(4)], [torch.ones(4)]
    steps = [torch.zeros(())]
    key = torch.tensor([1, 0, 0], dtype=torch.int64)
    half = [torch.zeros(4, dtype=torch.float16)]
    with pytest.raises(TypeError, match="float16 states"):
        ops.adamw_(p, g, half, [torch.zeros(4, dtype=torch.float16)], steps, lr=0.1,
                   sr_key=key, backend=backend)  # fmt: skip
    with pytest.raises(TypeError, match="sr_key"):
        ops.adamw_(p, g, [torch.zeros(4)], [torch.zeros(4)], steps, lr=0.1, sr_key=key,
                   backend=backend)  # fmt: skip
    with pytest.raises(TypeError, match="exp_avg_sqs"):
        ops.adamw_(p, g, [torch.zeros(4, dtype=torch.bfloat16)], half, steps, lr=0.1,
                   backend=backend)  # fmt: skip
    assert torch.equal(p[0], torch.ones(4)) and steps[0].item() == 0


@pytest.mark.parametrize("op", ["lamb_", "lion_", "sgd_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ops_refuse_bad_states(backend, op):
    """LAMB's, Lion's and SGD's functional ops as AdamW's (test_op_refuses_bad_states): an
    sr_key beside fp16 states or beside fp32 states of fp32 params, and (LAMB) states of two
    dtypes for one param, refused with nothing written; an sr_key beside bf16 states of fp32
    params taken."""
    n, call = STATE_CALLS[op]
    key = torch.tensor([1, 0, 0], dtype=torch.int64)

    def run(dtypes, sr_key):
        p, steps = [torch.ones(4)], [torch.ones(())]
        states = [[torch.zeros(4, dtype=d)] for d in dtypes]
        before = [s[0].clone() for s in states]
        try:
            call(p, [torch.ones(4)], states, steps, sr_key, backend)
        except (TypeError, RuntimeError):
            assert torch.equal(p[0], torch.ones(4)) and steps[0].item() == 1
            assert all(torch.equal(s[0], b) for s, b in zip(states, before, strict=True))
            raise
        return p[0]

    with pytest.raises(TypeError, match="float16 states"):
        run([torch.float16] * n, key)
    with pytest.raises(TypeError, match="sr_key"):
        run([torch.float32] * n, key)
    if n == 2:
        with pytest.raises(TypeError, match="exp_avg_sqs"):
            run([torch.bfloat16, torch.float16], None)
    assert not torch.equal(run([torch.bfloat16] * n, key), torch.ones(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_ops_refuse_bad_states(backend):
    """Each backend's registered op checks the same itself (the C++ ``StepArguments``,
    Triton's ``layout.prepare``, the reference's wrapper): an sr_key beside fp16 states or
    beside fp32 states of fp32 params is refused, beside bf16 states of fp32 params taken."""
    from fusedopt import _contract

    handle = _contract.op_handle("adamw_", backend)
    table, sizes = ops.hyper_table([0.1], [0.9], [0.999], [1e-8], [0.0])
    key = torch.tensor([1, 0, 0], dtype=torch.int64)

    def call(p, dtype):
        states = [[torch.zeros(4, dtype=dtype)] for _ in range(2)]
        handle(p, [torch.ones(4)], *states, [], [], [], [], [torch.zeros(())], table, sizes,
               True, False, False, True, None, None, None, None, True, key)  # fmt: skip

    for dtype, match in ((torch.float16, "float16 states"), (torch.float32, "bfloat16 states")):
        p = [torch.ones(4)]
        with pytest.raises((TypeError, RuntimeError), match=match):
            call(p, dtype)
        assert torch.equal(p[0], torch.ones(4))
    p = [torch.ones(4)]
    call(p, torch.bfloat16)
    assert not torch.equal(p[0], torch.ones(4))


@pytest.mark.parametrize("name", ["adamw", "lamb", "lion", "sgd_momentum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend, name):
    """bf16 states are saved as bf16 and load back bit for bit (and the SR run resumes
    bit for bit)."""
    storage = (name, torch.float32, False, torch.bfloat16, True)
    params, opt = _run(storage, backend)
    saved = copy.deepcopy(opt.state_dict())
    keys = [k for k in FLOAT_STATES if k in opt.state[params[0]]]
    assert keys
    for p in params:
        assert all(opt.state[p][k].dtype == torch.bfloat16 for k in keys)
    for st in saved["state"].values():
        assert all(st[k].dtype == torch.bfloat16 for k in keys)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    case = STATE_CASES[name]
    fresh = case.cls(twin, **case.kwargs, state_dtype=torch.bfloat16, stochastic_rounding=True,
                     backend=backend)  # fmt: skip
    fresh.load_state_dict(saved)
    assert all(
        torch.equal(a, b) for a, b in zip(_state_bits(fresh, twin), _state_bits(opt, params),
                                          strict=True)
    )  # fmt: skip
    for k in range(2):
        for ps in (params, twin):
            gen = torch.Generator().manual_seed(50 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(_state_bits(fresh, twin), _state_bits(opt, params),
                                          strict=True)
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_conversion(backend):
    """A state dict with fp32 states loaded into a bf16-state optimizer: the load converts
    them (round to nearest, as ``Tensor.to``, as torch casts a loaded state to its param's
    dtype), and the optimizer steps on exactly as one whose states were cast by hand."""
    # torch.optim.AdamW's fp32 states into a bf16-state optimizer: the group keeps its
    # state_dtype (the saved groups have none), the states take it at the load
    model = make_model()
    source = clone_params(model, torch.float32)
    torch_opt = torch.optim.AdamW(source, lr=1e-2, weight_decay=0.1)
    for k in range(2):
        gen = torch.Generator().manual_seed(60 + k)
        for p in source:
            p.grad = torch.randn(p.shape, generator=gen)
        torch_opt.step()
    saved = copy.deepcopy(torch_opt.state_dict())
    loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in source]
    hand_params = [torch.nn.Parameter(p.detach().clone()) for p in source]
    kwargs = dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, backend=backend)
    loaded = fusedopt.AdamW(loaded_params, **kwargs)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["state_dtype"] == torch.bfloat16
    stepped = [p for p in loaded_params if p in loaded.state]
    assert stepped and all(loaded.state[p]["exp_avg"].dtype == torch.bfloat16 for p in stepped)
    by_hand = fusedopt.AdamW(hand_params, **kwargs)
    for p, q in zip(hand_params, source, strict=True):
        if q in torch_opt.state:
            by_hand.state[p] = {
                k: v.to(torch.float32 if k == "step" else torch.bfloat16)
                for k, v in torch_opt.state[q].items()
            }
    for ps in (loaded_params, hand_params):
        gen = torch.Generator().manual_seed(77)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
    loaded.step()
    by_hand.step()
    assert all(loaded.state[p]["exp_avg"].dtype == torch.bfloat16 for p in stepped)
    assert all(torch.equal(a, b) for a, b in zip(loaded_params, hand_params, strict=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(_state_bits(loaded, loaded_params), _state_bits(by_hand, hand_params),
                        strict=True)
    )  # fmt: skip
