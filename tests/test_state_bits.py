"""8-bit optimizer states ([note: 8-bit states] in fusedopt/quant8.py): the quantizer, every
op with 8-bit states (``adamw_``, ``lion_``, ``sgd_``, ``lamb_``: the spec's
``quantized_states``) on every backend that has them (bit for bit the reference), the
float64 oracle's bound, the optimizer classes (``state_bits=8``), state dicts and bad
input."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch

import fusedopt
from fusedopt import quant8
from fusedopt._contract import STEP_OPS
from fusedopt.optim import _state_bits
from fusedopt.reference import ops as ref

#: Backends whose adamw_ takes 8-bit states, each checked against the reference bit for bit
#: (cuda: csrc/tests/test_cuda_emulated.cpp when it has them).
Q8_BACKENDS = [b for b in ("cpu", "triton") if fusedopt.backends()[b].usable]

#: Param shapes: a 0-d param, a vector shorter than a block, a vector of 2.3 blocks, rows
#: shorter than a block, rows of 1.x blocks, a 3-d param, a row of exactly one block.
SHAPES = [(), (5,), (600,), (3, 7), (4, 300), (2, 3, 260), (2, 256)]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# The quantizer


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(4, 300), (1000,), (2, 3, 513), ()])
def test_quantize_error_within_half_a_code_step(signed, shape):
    """|dequantize(quantize(x)) - x| <= half the gap between the codes around x/scale, times
    the scale (+2 fp32 ulps), element by element, on values spanning 6 decades."""
    g = _seeded(1)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    if not signed:
        x = x.square()
    codes, scales = quant8.quantize(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    assert scales.shape == quant8.scale_shape(x.shape) and scales.dtype == torch.float32
    back = quant8.dequantize(codes, scales)
    bound = quant8.half_gap_bound(x, scales, signed)
    assert bool(((back.double() - x.double()).abs() <= bound).all())
    # the bound is not vacuous: it is far below the block's scale for most elements
    assert float(bound.median()) < 0.01 * float(scales.max())


def test_quantizer_rules():
    """Scale = absmax; the absmax element is exact; ties go to the smaller code; a zero block
    is zeros; a block with an inf or a NaN dequantizes to NaN with a canonical NaN scale;
    int8 codes stay within [-127, 127]."""
    x = torch.tensor([[0.0, -2.0, 1.0, 0.5]])
    codes, scales = quant8.quantize(x, True)
    assert scales.tolist() == [[2.0]]
    assert codes[0, 1].item() == -127
    assert quant8.dequantize(codes, scales)[0, 1].item() == -2.0
    _, mids = quant8._tables(True, quant8.P_SIGNED, quant8.LEVELS_SIGNED, x.device)
    tie = torch.tensor([[1.0, float(mids[10])]])  # |y| == mid[10] exactly
    assert quant8.quantize(tie, True)[0][0, 1].item() == 10
    zero_codes, zero_scales = quant8.quantize(torch.zeros(3, 10), False)
    assert not zero_codes.any() and not zero_scales.any()
    bad = torch.tensor([[1.0, float("inf"), 2.0], [1.0, float("nan"), 0.0]])
    c, s = quant8.quantize(bad, True)
    assert s[0, 0].item() == float("inf") and s[1, 0].view(torch.int32).item() == 0x7FC00000
    assert quant8.dequantize(c, s).isnan().all()


def test_blocks_are_rows_so_dim0_shards_quantize_alike():
    """A block never spans two rows: the codes and scales of a dim-0 shard are the shard of
    the whole param's (what lets an FSDP2 checkpoint reshard, [note: 8-bit states])."""
    x = torch.randn(6, 700, generator=_seeded(2))
    codes, scales = quant8.quantize(x, True)
    for part in (x[:2], x[2:5], x[5:]):
        c, s = quant8.quantize(part, True)
        lo = part.data_ptr() // 4 // 700 - x.data_ptr() // 4 // 700
        assert torch.equal(c, codes[lo : lo + len(part)])
        assert torch.equal(s, scales[lo : lo + len(part)])


def test_code_table_matches_cpp_definition():
    """The table is the products of exact fp64 operations, the same in C++ (quant8.h)."""
    table = quant8.code_table(True)
    assert table[0] == 0.0 and table[-1] == 1.0 and len(table) == 128
    assert table[3] == (3 / 127) * (3 / 127)
    assert len(quant8.code_table(False)) == 256


# ---------------------------------------------------------------------------------------
# The op


def _lists(shapes, dtype=torch.float32, master=None, seed=0, q8=True, op="adamw_"):
    """``op``'s lists with its 8-bit states (the spec's ``quantized_states``) holding a few
    steps' worth of moments: signed ones around 0.01, unsigned ones spanning 4 decades."""
    g = _seeded(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) * 0.1 for s in shapes]
    lists = {"params": params, "grads": grads}
    if STEP_OPS[op].steps != "none":
        lists["steps"] = [torch.tensor(3.0) for _ in shapes]
    state_dtype = torch.float32 if master else dtype
    for name, scales, signed in STEP_OPS[op].quantized_states:
        if signed:
            values = [torch.randn(s, generator=g) * 0.01 for s in shapes]
        else:
            values = [torch.rand(s, generator=g) * torch.exp(-10 * torch.rand(s, generator=g))
                      for s in shapes]  # fmt: skip
        if q8:
            pairs = [quant8.quantize(t, signed) for t in values]
            lists |= {name: [c for c, _ in pairs], scales: [s for _, s in pairs]}
        else:
            lists[name] = [t.to(state_dtype) for t in values]
    if master == "fp32":
        lists["master_params"] = [p.float() + 1e-4 for p in params]
    elif master == "compact":
        lists["master_params"] = [ref.split_master(p.float() + 1e-4)[1] for p in params]
        lists["params"] = [ref.split_master(p.float() + 1e-4)[0] for p in params]
    return lists


@dataclasses.dataclass(frozen=True)
class Q8Op:
    """An op with 8-bit states: its step's hyperparameters and the options it is run with."""

    hypers: dict
    options: dict[str, dict]
    optimizer: Callable[..., torch.optim.Optimizer]


_SCALED = {"grad_scale": torch.tensor(1024.0), "clip_coef": torch.tensor(0.5)}

#: Every op whose spec declares 8-bit states. The options: each flag and scalar path its
#: kernels branch on.
Q8_OPS = {
    "adamw_": Q8Op(
        {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1},
        {
            "adamw": {},
            "adam_l2": {"decoupled": False},
            "maximize": {"maximize": True},
            "no_bias_correction": {"bias_correction": False},
            "scaled": _SCALED,
            "lr_tensor": {"lr": torch.tensor(3e-3)},
        },
        lambda params, **kw: fusedopt.AdamW(params, lr=1e-2, **kw),
    ),
    "lion_": Q8Op(
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1},
        {
            "lion": {},
            "maximize": {"maximize": True},
            "scaled": _SCALED,
            "lr_tensor": {"lr": torch.tensor(3e-4)},
        },
        lambda params, **kw: fusedopt.Lion(params, lr=1e-3, weight_decay=0.1, **kw),
    ),
    "sgd_": Q8Op(
        {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1},
        {
            "sgd": {},
            "nesterov": {"nesterov": True, "dampening": 0.0},
            "maximize": {"maximize": True},
            "scaled": _SCALED,
            "lr_tensor": {"lr": torch.tensor(3e-3)},
            # a tensor whose momentum is 0 in a call with buffers keeps its codes and scales
            # ([note: sgd momentum 0]); per-tensor momenta, one group per param
            "momentum_0": {"momentum": [0.9, 0.0, 0.9, 0.0, 0.9, 0.0, 0.9]},
        },
        lambda params, **kw: fusedopt.SGD(params, lr=1e-2, momentum=0.9, **kw),
    ),
    "lamb_": Q8Op(
        {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1},
        {
            "lamb": {},
            "no_decay": {"weight_decay": 0.0},
            "always_adapt": {"weight_decay": 0.0, "always_adapt": True},
            "trust_clip": {"trust_clip": True, "grad_averaging": False},
            "scaled": _SCALED,
            "lr_tensor": {"lr": torch.tensor(3e-3)},
        },
        lambda params, **kw: fusedopt.LAMB(params, lr=1e-2, **kw),
    ),
}
assert set(Q8_OPS) == {op for op, spec in STEP_OPS.items() if spec.quantized_states}


def _step(lists, backend, op="adamw_", **kw):
    kw = {**Q8_OPS[op].hypers, **kw}
    getattr(fusedopt.ops, op)(**lists, backend=backend, **kw)


def _step_both(want, got, backend, op="adamw_", **kw):
    """One step of ``op`` on the reference (``want``) and on ``backend`` (``got``). LAMB's
    trust ratios come from reductions, whose order is the backend's (not bit for bit,
    [note: lamb passes]): its first pass runs on each, the sums agree to a few ulps, and
    both second passes take the backend's sums, so that everything else must be bit for
    bit (the 8-bit moments are written by the second pass only)."""
    if op != "lamb_":
        _step(want, "reference", op, **kw)
        _step(got, backend, op, **kw)
        return
    kw = {**Q8_OPS[op].hypers, **kw}
    want_sq = fusedopt.ops.lamb_direction_(**want, backend="reference", **kw)
    got_sq = fusedopt.ops.lamb_direction_(**got, backend=backend, **kw)
    torch.testing.assert_close(got_sq, want_sq, rtol=1e-5, atol=0.0)
    fusedopt.ops.lamb_apply_(**want, sq_norms=got_sq, backend="reference", **kw)
    fusedopt.ops.lamb_apply_(**got, sq_norms=got_sq, backend=backend, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(got, want):
    for name in want:
        for i, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
            a = a.view(torch.int16) if a.dtype in (torch.bfloat16, torch.float16) else a
            b = b.view(torch.int16) if b.dtype in (torch.bfloat16, torch.float16) else b
            assert torch.equal(_bits(a), _bits(b)), f"{name}[{i}] differs"


OP_OPTIONS = [(op, option) for op, case in Q8_OPS.items() for option in case.options]


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("op,option", OP_OPTIONS)
@pytest.mark.parametrize(
    "dtype,master",
    [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
     (torch.bfloat16, "fp32"), (torch.bfloat16, "compact")],
)  # fmt: skip
def test_backend_equals_reference_bit_for_bit(backend, op, option, dtype, master):
    """Codes, scales, params, masters and steps after 3 steps: the reference's, bit for bit."""
    first = option == next(iter(Q8_OPS[op].options))
    if not first and (dtype, master) != (torch.float32, None) and backend == "triton":
        pytest.skip("the interpreter is slow: options on fp32 only")
    want = _lists(SHAPES, dtype, master, op=op)
    got = copy.deepcopy(want)
    for _ in range(3):
        _step_both(want, got, backend, op, **Q8_OPS[op].options[option])
    _assert_same(got, want)
    if option == "momentum_0":  # [note: sgd momentum 0]: those buffers are as they were
        _assert_same({k: got[k][1::2] for k in ("momentum_buffers", "momentum_buffer_scales")},
                     {k: _lists(SHAPES, dtype, master, op=op)[k][1::2]
                      for k in ("momentum_buffers", "momentum_buffer_scales")})  # fmt: skip


def _midpoint_grads(scale: float) -> torch.Tensor:
    """Rows whose first element is ``scale`` (the block's absmax) and the rest the fp32
    values nearest ``mid[k] * scale`` and their neighbours one ulp away, every midpoint of
    the signed map, with both signs: where ``x / scale`` lands on a midpoint or next to it,
    so a backend that divided otherwise (``x * (1 / scale)``) or rounded a tie the other way
    would pick another code."""
    _, mids = quant8._tables(True, quant8.P_SIGNED, quant8.LEVELS_SIGNED, torch.device("cpu"))
    near = (mids.double() * scale).float()
    up = torch.nextafter(near, torch.tensor(float("inf")))
    down = torch.nextafter(near, torch.tensor(0.0))
    values = torch.cat([near, up, down, -near, -up])
    rows = values[: len(values) // 255 * 255].reshape(-1, 255)
    return torch.cat([torch.full((len(rows), 1), scale), rows], dim=1).contiguous()


@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_rounding_at_midpoints_equals_reference(backend):
    """With beta1 = beta2 = 0 the new first moment is the grad itself (0*m + 1*g, exact), so
    the grads choose what is quantized: values on and next to every midpoint, under scales
    whose division is inexact. Codes and scales bit for bit the reference's."""
    grads = [_midpoint_grads(s) for s in (0.3, 1.7e-3, 5.0)]
    lists = _lists([tuple(g.shape) for g in grads], seed=9)
    lists["grads"] = grads
    want = copy.deepcopy(lists)
    _step(want, "reference", beta1=0.0, beta2=0.0, weight_decay=0.0)
    _step(lists, backend, beta1=0.0, beta2=0.0, weight_decay=0.0)
    for m, g in zip(want["exp_avgs"], grads, strict=True):  # the reference quantized g itself
        assert torch.equal(m, quant8.quantize(g, True)[0])
    _assert_same(lists, want)


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("op", list(Q8_OPS))
def test_many_blocks_and_tensors(backend, op):
    """Work split across items (CPU: 256 blocks per item) and chunks (Triton: 2^16)."""
    shapes = [(70, 1100), (3,), (257, 256), (1, 1)] + [(2, 9)] * 5
    want = _lists(shapes, seed=5, op=op)
    got = copy.deepcopy(want)
    _step_both(want, got, backend, op)
    _assert_same(got, want)


#: Rows of whole blocks, more than a tile of them ([note: q8 tiles] in
#: fusedopt/triton_kernels/quant8.py: Triton's whole-block walk, 4 blocks at a time, then the
#: last ones on the general walk), beside rows that end in a short block.
WHOLE_BLOCK_SHAPES = [(5, 256), (2, 1024), (3, 300), (1536,)]


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("op", list(Q8_OPS))
@pytest.mark.parametrize(
    "dtype,master", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "fp32")]
)
def test_whole_blocks_equal_reference_bit_for_bit(backend, op, dtype, master):
    """Codes, scales, params and masters after 2 steps on rows of whole blocks."""
    want = _lists(WHOLE_BLOCK_SHAPES, dtype, master, seed=11, op=op)
    got = copy.deepcopy(want)
    for _ in range(2):
        _step_both(want, got, backend, op)
    _assert_same(got, want)


@pytest.mark.parametrize("backend", ["reference", *Q8_BACKENDS])
@pytest.mark.parametrize("op", list(Q8_OPS))
def test_found_inf_changes_nothing(backend, op):
    lists = _lists(SHAPES, op=op)
    before = copy.deepcopy(lists)
    _step(lists, backend, op, found_inf=torch.tensor(1.0))
    _assert_same(lists, before)


def _dequantized(q: dict, op: str) -> dict:
    """``q``'s lists with fp32 states: the 8-bit ones dequantized, no scales."""
    plain = {k: [t.clone() for t in v] for k, v in q.items()}
    for name, scales, _ in STEP_OPS[op].quantized_states:
        plain[name] = [quant8.dequantize(c, s) for c, s in zip(q[name], plain.pop(scales),
                                                                strict=True)]  # fmt: skip
    return plain


@pytest.mark.parametrize("op", list(Q8_OPS))
def test_reference_step_is_the_fp32_step_on_dequantized_states(op):
    """The 8-bit step is the plain fp32 step from the dequantized states: the param bit for
    bit, the new codes and scales the quantization of the fp32 step's new states."""
    q = _lists(SHAPES, seed=3, op=op)
    plain = _dequantized(q, op)
    _step(q, "reference", op)
    _step(plain, "reference", op)
    _assert_same({"params": q["params"]}, {"params": plain["params"]})
    for name, scales, signed in STEP_OPS[op].quantized_states:
        for i, value in enumerate(plain[name]):
            codes, absmax = quant8.quantize(value, signed)
            assert torch.equal(q[name][i], codes) and torch.equal(q[scales][i], absmax)


def test_quantization_error_against_float64_oracle():
    """From the same (dequantized) moments, the 8-bit step's new moments are within half a
    code step times the block scale of the float64 oracle's, plus the fp32 step's own
    rounding (a few ulps of the moment)."""
    q = _lists(SHAPES, seed=4)
    oracle = {
        "params": [p.double() for p in q["params"]], "grads": [g.double() for g in q["grads"]],
        "steps": [s.clone() for s in q["steps"]],
        "exp_avgs": [quant8.dequantize(c, s).double()
                     for c, s in zip(q["exp_avgs"], q["exp_avg_scales"], strict=True)],
        "exp_avg_sqs": [quant8.dequantize(c, s).double()
                        for c, s in zip(q["exp_avg_sqs"], q["exp_avg_sq_scales"], strict=True)],
    }  # fmt: skip
    _step(q, "reference")
    _step(oracle, "reference")
    for name, scales, signed in (
        ("exp_avgs", "exp_avg_scales", True),
        ("exp_avg_sqs", "exp_avg_sq_scales", False),
    ):
        for i, exact in enumerate(oracle[name]):
            got = quant8.dequantize(q[name][i], q[scales][i]).double()
            step_rounding = 4 * torch.finfo(torch.float32).eps * exact.abs()
            bound = quant8.half_gap_bound(exact.float(), q[scales][i], signed) + step_rounding
            assert bool(((got - exact).abs() <= bound).all()), f"{name}[{i}]"


@pytest.mark.parametrize("op", list(Q8_OPS))
def test_bad_input_is_refused_before_anything_changes(op):
    lists = _lists([(4, 300)], op=op)
    before = copy.deepcopy(lists)
    quantized = STEP_OPS[op].quantized_states
    name, scales, _ = quantized[0]
    cases = [
        ({scales: [torch.zeros(4, 1)]}, RuntimeError, "shape"),
        ({scales: [torch.zeros(4, 2, dtype=torch.float64)]}, TypeError, "dtype"),
        ({name: [torch.zeros(4, 300, dtype=torch.uint8)]}, TypeError, "int8"),
        ({name: [torch.zeros(300, 4, dtype=torch.int8).t()]}, RuntimeError,
         "layout|contiguous"),
        ({"params": [torch.zeros(4, 300, dtype=torch.float64)],
          "grads": [torch.zeros(4, 300, dtype=torch.float64)]}, TypeError, "float64"),
    ]  # fmt: skip
    if len(quantized) > 1:  # the scales of one 8-bit state but not the other's
        cases.append(({quantized[1][1]: []}, ValueError, "or none"))
    for backend in ("reference", *Q8_BACKENDS):
        for change, error, match in cases:
            with pytest.raises(error, match=match):
                _step({**lists, **change}, backend, op)
    _assert_same(lists, before)


# ---------------------------------------------------------------------------------------
# The optimizer classes


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 5))


def _train(opt, model, steps=20, seed=0):
    g = _seeded(seed)
    for _ in range(steps):
        x = torch.randn(32, 40, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("backend", ["reference", *Q8_BACKENDS])
@pytest.mark.parametrize("op", list(Q8_OPS))
def test_optimizer_state_and_bytes(backend, op):
    model = _model()
    opt = Q8_OPS[op].optimizer(model.parameters(), state_bits=8, backend=backend)
    _train(opt, model, steps=2)
    w = model[0].weight
    state = opt.state[w]
    quantized = _state_bits.quantized_keys(op)
    for key, (scale_key, signed) in quantized.items():
        assert state[key].dtype == (torch.int8 if signed else torch.uint8)
        assert state[scale_key].shape == (300, 1) and state[scale_key].dtype == torch.float32
    held = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    # 1 B per element + one fp32 scale per row, per 8-bit state
    assert held == len(quantized) * (w.numel() + 300 * 4)


def test_optimizer_trains_like_fp32_adamw():
    """20 steps of a small regression: the 8-bit run's loss within 1% of fp32 AdamW's, and
    each param's distance to the fp32 run under 5% of how far the fp32 run moved it. (The
    chosen maps give Adam's update direction ~1% relative error per step on real moments,
    bench/q8_maps.py; measured here: 1.4-2.7%. A linear map for v, P=1, sends small v to
    0 and its updates to m/eps.)"""
    a, b, start = _model(), _model(), _model()
    loss8 = _train(fusedopt.AdamW(a.parameters(), lr=1e-2, state_bits=8, backend="reference"), a)
    loss32 = _train(torch.optim.AdamW(b.parameters(), lr=1e-2), b)
    assert abs(loss8 - loss32) <= 0.01 * loss32
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters(), strict=True):
        assert float((p - q).norm()) < 0.05 * float((q - p0).norm())


@pytest.mark.parametrize("backend", ["reference", *Q8_BACKENDS])
@pytest.mark.parametrize("op", list(Q8_OPS))
def test_state_dict_round_trips_exactly(backend, op):
    model = _model()
    opt = Q8_OPS[op].optimizer(model.parameters(), state_bits=8, backend=backend)
    _train(opt, model, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    twin_model = copy.deepcopy(model)
    twin = Q8_OPS[op].optimizer(twin_model.parameters(), state_bits=8, backend=backend)
    twin.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert opt.state[p].keys() == twin.state[q].keys()
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], twin.state[q][k]) and (
                opt.state[p][k].dtype == twin.state[q][k].dtype
            )
    _train(opt, model, steps=2, seed=1)
    _train(twin, twin_model, steps=2, seed=1)
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("op", list(Q8_OPS))
def test_switching_state_bits_converts_at_the_next_step(op):
    model = _model()
    opt = Q8_OPS[op].optimizer(model.parameters(), backend="reference")
    _train(opt, model, steps=2)
    w = model[0].weight
    key, (scale_key, signed) = next(iter(_state_bits.quantized_keys(op).items()))
    m32 = opt.state[w][key].clone()
    opt.param_groups[0]["state_bits"] = 8
    _train(opt, model, steps=1)
    assert opt.state[w][key].dtype == (torch.int8 if signed else torch.uint8)
    opt.param_groups[0]["state_bits"] = None
    _train(opt, model, steps=1)
    assert opt.state[w][key].dtype == torch.float32 and scale_key not in opt.state[w]
    assert opt.state[w][key].shape == m32.shape
    # a state dict saved 8-bit loads into a default optimizer as dequantized fp32 states
    opt.param_groups[0]["state_bits"] = 8
    _train(opt, model, steps=1)
    saved = opt.state_dict()
    plain = Q8_OPS[op].optimizer(model.parameters(), backend="reference")
    plain.load_state_dict(saved)
    plain.param_groups[0]["state_bits"] = None
    codes, scales = opt.state[w][key], opt.state[w][scale_key]
    state = dict(plain.state[w])
    _state_bits.convert(state, op, False, torch.float32, w)  # what the step does first
    assert torch.equal(state[key], quant8.dequantize(codes, scales))
    _train(plain, model, steps=1)
    assert plain.state[w][key].dtype == torch.float32


@pytest.mark.parametrize("op", list(Q8_OPS))
def test_optimizer_bad_settings(op):
    model = _model()
    make = Q8_OPS[op].optimizer
    with pytest.raises(ValueError, match="state_bits"):
        make(model.parameters(), state_bits=4)
    if op == "adamw_":
        with pytest.raises(ValueError, match="amsgrad"):
            fusedopt.AdamW(model.parameters(), state_bits=8, amsgrad=True)
    p = torch.nn.Parameter(torch.zeros(300, 4).t())
    p.grad = torch.zeros_like(p)
    opt = make([p], state_bits=8, backend="reference")
    with pytest.raises(RuntimeError, match="contiguous"):
        opt.step()
    assert not opt.state[p]
    q = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    q.grad = torch.zeros_like(q)
    with pytest.raises(TypeError, match="fp32"):
        make([q], state_bits=8, backend="reference").step()


@pytest.mark.parametrize("backend", ["reference", *Q8_BACKENDS])
def test_sgd_without_momentum_keeps_no_state_whatever_state_bits(backend):
    """SGD with momentum 0 keeps no buffer (as torch), so ``state_bits=8`` has nothing to
    quantize: no error (a setting shared by groups with and without momentum holds for
    each), no state, the plain step bit for bit; momentum switched on later starts an
    8-bit buffer."""
    a, b = _model(), _model()
    eight = fusedopt.SGD(a.parameters(), lr=1e-2, state_bits=8, backend=backend)
    plain = fusedopt.SGD(b.parameters(), lr=1e-2, backend=backend)
    _train(eight, a, steps=2)
    _train(plain, b, steps=2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert not eight.state[p] and torch.equal(p, q)
    eight.param_groups[0]["momentum"] = 0.9
    _train(eight, a, steps=1)
    assert eight.state[a[0].weight]["momentum_buffer"].dtype == torch.int8
