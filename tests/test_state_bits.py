"""8-bit optimizer states ([note: 8-bit states] in fusedopt/quant8.py): the quantizer, the
``adamw_`` op on every backend that has them (bit for bit the reference), the float64
oracle's bound, the optimizer classes (``state_bits=8``), state dicts and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedopt
from fusedopt import quant8
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


def _lists(shapes, dtype=torch.float32, master=None, seed=0, q8=True):
    """adamw_ lists with 8-bit states holding a few steps' worth of moments."""
    g = _seeded(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) * 0.1 for s in shapes]
    m = [torch.randn(s, generator=g) * 0.01 for s in shapes]
    v = [torch.rand(s, generator=g) * torch.exp(-10 * torch.rand(s, generator=g)) for s in shapes]
    lists = {"params": params, "grads": grads, "steps": [torch.tensor(3.0) for _ in shapes]}
    if q8:
        mq = [quant8.quantize(t, True) for t in m]
        vq = [quant8.quantize(t, False) for t in v]
        lists |= {
            "exp_avgs": [c for c, _ in mq], "exp_avg_scales": [s for _, s in mq],
            "exp_avg_sqs": [c for c, _ in vq], "exp_avg_sq_scales": [s for _, s in vq],
        }  # fmt: skip
    else:
        state_dtype = torch.float32 if master else dtype
        lists |= {"exp_avgs": [t.to(state_dtype) for t in m],
                  "exp_avg_sqs": [t.to(state_dtype) for t in v]}  # fmt: skip
    if master == "fp32":
        lists["master_params"] = [p.float() + 1e-4 for p in params]
    elif master == "compact":
        lists["master_params"] = [ref.split_master(p.float() + 1e-4)[1] for p in params]
        lists["params"] = [ref.split_master(p.float() + 1e-4)[0] for p in params]
    return lists


def _step(lists, backend, **kw):
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, **kw}
    fusedopt.ops.adamw_(**lists, backend=backend, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(got, want):
    for name in want:
        for i, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
            a = a.view(torch.int16) if a.dtype in (torch.bfloat16, torch.float16) else a
            b = b.view(torch.int16) if b.dtype in (torch.bfloat16, torch.float16) else b
            assert torch.equal(_bits(a), _bits(b)), f"{name}[{i}] differs"


OPTIONS = {
    "adamw": {},
    "adam_l2": {"decoupled": False},
    "maximize": {"maximize": True},
    "no_bias_correction": {"bias_correction": False},
    "scaled": {"grad_scale": torch.tensor(1024.0), "clip_coef": torch.tensor(0.5)},
    "lr_tensor": {"lr": torch.tensor(3e-3)},
}


@pytest.mark.parametrize("backend", Q8_BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize(
    "dtype,master",
    [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
     (torch.bfloat16, "fp32"), (torch.bfloat16, "compact")],
)  # fmt: skip
def test_backend_equals_reference_bit_for_bit(backend, option, dtype, master):
    """Codes, scales, params, masters and steps after 3 steps: the reference's, bit for bit."""
    if option != "adamw" and (dtype, master) != (torch.float32, None) and backend == "triton":
        pytest.skip("the interpreter is slow: options on fp32 only")
    want = _lists(SHAPES, dtype, master)
    got = copy.deepcopy(want)
    for _ in range(3):
        _step(want, "reference", **OPTIONS[option])
        _step(got, backend, **OPTIONS[option])
    _assert_same(got, want)


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
def test_many_blocks_and_tensors(backend):
    """Work split across items (CPU: 256 blocks per item) and chunks (Triton: 2^16)."""
    shapes = [(70, 1100), (3,), (257, 256), (1, 1)] + [(2, 9)] * 5
    want = _lists(shapes, seed=5)
    got = copy.deepcopy(want)
    _step(want, "reference")
    _step(got, backend)
    _assert_same(got, want)


@pytest.mark.parametrize("backend", ["reference", *Q8_BACKENDS])
def test_found_inf_changes_nothing(backend):
    lists = _lists(SHAPES)
    before = copy.deepcopy(lists)
    _step(lists, backend, found_inf=torch.tensor(1.0))
    _assert_same(lists, before)


def test_reference_step_is_the_fp32_step_on_dequantized_states():
    """The 8-bit step is the plain fp32 step from the dequantized moments: the param bit for
    bit, the new codes and scales the quantization of the fp32 step's new moments."""
    q = _lists(SHAPES, seed=3)
    plain = {
        "params": [p.clone() for p in q["params"]], "grads": q["grads"],
        "steps": [s.clone() for s in q["steps"]],
        "exp_avgs": [quant8.dequantize(c, s)
                     for c, s in zip(q["exp_avgs"], q["exp_avg_scales"], strict=True)],
        "exp_avg_sqs": [quant8.dequantize(c, s)
                        for c, s in zip(q["exp_avg_sqs"], q["exp_avg_sq_scales"], strict=True)],
    }  # fmt: skip
    _step(q, "reference")
    _step(plain, "reference")
    _assert_same({"params": q["params"]}, {"params": plain["params"]})
    for i, (m, v) in enumerate(zip(plain["exp_avgs"], plain["exp_avg_sqs"], strict=True)):
        cm, sm = quant8.quantize(m, True)
        cv, sv = quant8.quantize(v, False)
        assert torch.equal(q["exp_avgs"][i], cm) and torch.equal(q["exp_avg_scales"][i], sm)
        assert torch.equal(q["exp_avg_sqs"][i], cv) and torch.equal(q["exp_avg_sq_scales"][i], sv)


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


def test_bad_input_is_refused_before_anything_changes():
    lists = _lists([(4, 300)])
    before = copy.deepcopy(lists)
    cases = [
        ({"exp_avg_sq_scales": []}, ValueError, "or none"),
        ({"exp_avg_scales": [torch.zeros(4, 1)]}, RuntimeError, "shape"),
        ({"exp_avg_scales": [torch.zeros(4, 2, dtype=torch.float64)]}, TypeError, "dtype"),
        ({"exp_avgs": [torch.zeros(4, 300, dtype=torch.uint8)]}, TypeError, "int8"),
        ({"exp_avgs": [torch.zeros(300, 4, dtype=torch.int8).t()]}, RuntimeError,
         "layout|contiguous"),
        ({"params": [torch.zeros(4, 300, dtype=torch.float64)],
          "grads": [torch.zeros(4, 300, dtype=torch.float64)]}, TypeError, "float64"),
    ]  # fmt: skip
    for backend in ("reference", *Q8_BACKENDS):
        for change, error, match in cases:
            with pytest.raises(error, match=match):
                _step({**lists, **change}, backend)
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
def test_optimizer_state_and_bytes(backend):
    model = _model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, state_bits=8, backend=backend)
    _train(opt, model, steps=2)
    w = model[0].weight
    state = opt.state[w]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg_scale"].shape == (300, 1) == state["exp_avg_sq_scale"].shape
    held = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert held == w.numel() * 2 + 300 * 8  # 2 B per element + 2 fp32 scales per row


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
def test_state_dict_round_trips_exactly(backend):
    model = _model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, state_bits=8, backend=backend)
    _train(opt, model, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    twin_model = copy.deepcopy(model)
    twin = fusedopt.AdamW(twin_model.parameters(), lr=1e-2, state_bits=8, backend=backend)
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


def test_switching_state_bits_converts_at_the_next_step():
    model = _model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, backend="reference")
    _train(opt, model, steps=2)
    w = model[0].weight
    m32 = opt.state[w]["exp_avg"].clone()
    opt.param_groups[0]["state_bits"] = 8
    _train(opt, model, steps=1)
    assert opt.state[w]["exp_avg"].dtype == torch.int8
    opt.param_groups[0]["state_bits"] = None
    _train(opt, model, steps=1)
    assert opt.state[w]["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in opt.state[w]
    assert opt.state[w]["exp_avg"].shape == m32.shape
    # a state dict saved 8-bit loads into a default optimizer as dequantized fp32 states
    opt.param_groups[0]["state_bits"] = 8
    _train(opt, model, steps=1)
    saved = opt.state_dict()
    plain = fusedopt.AdamW(model.parameters(), lr=1e-2, backend="reference")
    plain.load_state_dict(saved)
    plain.param_groups[0]["state_bits"] = None
    codes, scales = opt.state[w]["exp_avg"], opt.state[w]["exp_avg_scale"]
    state = dict(plain.state[w])
    _state_bits.convert(state, "adamw_", False, torch.float32, w)  # what the step does first
    assert torch.equal(state["exp_avg"], quant8.dequantize(codes, scales))
    _train(plain, model, steps=1)
    assert plain.state[w]["exp_avg"].dtype == torch.float32


def test_optimizer_bad_settings():
    model = _model()
    with pytest.raises(ValueError, match="state_bits"):
        fusedopt.AdamW(model.parameters(), state_bits=4)
    with pytest.raises(ValueError, match="amsgrad"):
        fusedopt.AdamW(model.parameters(), state_bits=8, amsgrad=True)
    p = torch.nn.Parameter(torch.zeros(300, 4).t())
    p.grad = torch.zeros_like(p)
    opt = fusedopt.AdamW([p], state_bits=8, backend="reference")
    with pytest.raises(RuntimeError, match="contiguous"):
        opt.step()
    assert not opt.state[p]
    q = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    q.grad = torch.zeros_like(q)
    with pytest.raises(TypeError, match="fp32"):
        fusedopt.AdamW([q], state_bits=8, backend="reference").step()
