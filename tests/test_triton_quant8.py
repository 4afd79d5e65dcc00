"""The Triton quantizer of the 8-bit states (fusedopt/triton_kernels/quant8.py; [note: 8-bit
states] in fusedopt/quant8.py), interpreted, against the definition: the code formulas
against the reference's tables, and |q| = the number of fp32 midpoints strictly below
|x / scale| (``torch.searchsorted``, as the reference counts them). The whole steps are
checked bit for bit in tests/test_state_bits.py; here the code of every value where a
quantizer that guesses the code could go wrong: on and next to each midpoint, and where the
guess from the inverse map steps to the next code."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fusedopt import quant8
from fusedopt.triton_kernels import quant8 as tq8

N = 4096


@triton.jit
def _codes_kernel(x_ptr, scale_ptr, out_ptr, n, SIGNED: tl.constexpr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q = tq8.quantize(x, tl.load(scale_ptr), SIGNED)
    tl.store(out_ptr + offs, q, mask=mask)


def _triton_codes(x: torch.Tensor, scale: float, signed: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.int32)
    scale_t = torch.tensor([scale], dtype=torch.float32)
    _codes_kernel[(triton.cdiv(len(x), N),)](x, scale_t, out, len(x), signed, N)
    return out


def _definition(x: torch.Tensor, scale: float, signed: bool) -> torch.Tensor:
    power, levels = (
        (quant8.P_SIGNED, quant8.LEVELS_SIGNED)
        if signed
        else (quant8.P_UNSIGNED, quant8.LEVELS_UNSIGNED)
    )
    _, mids = quant8._tables(signed, power, levels, torch.device("cpu"))
    y = x / torch.tensor(scale, dtype=torch.float32)
    magnitude = torch.searchsorted(mids, y.abs().contiguous(), side="left").to(torch.int32)
    return torch.where(y < 0, -magnitude, magnitude) if signed else magnitude


def _around(values: torch.Tensor, ulps: int) -> torch.Tensor:
    """fp32 ``values`` and their neighbours up to ``ulps`` ulps either side, within [0, 1]."""
    bits = values.to(torch.float32).view(torch.int32)
    steps = torch.arange(-ulps, ulps + 1, dtype=torch.int32)
    near = (bits[:, None] + steps[None, :]).reshape(-1).clamp(min=0).view(torch.float32)
    return near[(near >= 0) & (near <= 1)]


def _hard_values(signed: bool) -> torch.Tensor:
    """|y| in [0, 1] around every midpoint, around every point where floor(r * levels) steps
    (r = |y|^(1/power): the guess's edges, (k / levels)^power), the ends, subnormals, and a
    sample over the decades."""
    power, levels = (
        (quant8.P_SIGNED, quant8.LEVELS_SIGNED)
        if signed
        else (quant8.P_UNSIGNED, quant8.LEVELS_UNSIGNED)
    )
    _, mids = quant8._tables(signed, power, levels, torch.device("cpu"))
    edges = (torch.arange(levels + 1, dtype=torch.float64) / levels) ** power
    g = torch.Generator().manual_seed(0)
    sample = torch.exp(-torch.rand(20000, generator=g, dtype=torch.float64) * 80).float()
    tiny = torch.tensor([0.0, 1e-45, 1e-40, 1.2e-38, 1.0])
    return torch.cat([_around(mids, 6), _around(edges, 6), _around(tiny, 2), sample])


@triton.jit
def _formulas_kernel(codes_ptr, mids_ptr, SIGNED: tl.constexpr, N: tl.constexpr):
    k = tl.arange(0, N)
    tl.store(codes_ptr + k, tq8.code_value(k, SIGNED))
    tl.store(mids_ptr + k, tq8.midpoint(k, SIGNED))


@pytest.mark.parametrize("signed", [True, False])
def test_code_formulas_equal_the_tables(signed):
    """[note: q8 code formulas]: every code and midpoint the kernels compute is the
    reference's fp32 table entry, bit for bit."""
    power, levels = (
        (quant8.P_SIGNED, quant8.LEVELS_SIGNED)
        if signed
        else (quant8.P_UNSIGNED, quant8.LEVELS_UNSIGNED)
    )
    codes, mids = quant8._tables(signed, power, levels, torch.device("cpu"))
    got_codes, got_mids = torch.empty(256), torch.empty(256)
    _formulas_kernel[(1,)](got_codes, got_mids, signed, 256)
    assert torch.equal(got_codes[: levels + 1].view(torch.int32), codes.view(torch.int32))
    assert torch.equal(got_mids[:levels].view(torch.int32), mids.view(torch.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_counts_midpoints_below(signed):
    abs_y = _hard_values(signed)
    x = torch.cat([abs_y, -abs_y]) if signed else abs_y
    assert torch.equal(_triton_codes(x, 1.0, signed), _definition(x, 1.0, signed))


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, SIGNED: tl.constexpr):
    offs = tl.arange(0, 256)[None, :]
    blocks = (tl.zeros((1, 1), tl.int64), None)
    tl.store(out_ptr + offs, tq8.dequantize(codes_ptr, scales_ptr, blocks, offs, None, SIGNED))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale", [0.37, 3.0e-39, float("inf")])
def test_dequantize_equals_the_reference(signed, scale):
    """Every code of a block: the reference's values bit for bit (an int8 -128, which the
    reference's table does not reach, reads -0 as on the CPU: code 0, the sign bit set)."""
    if signed:
        codes = torch.arange(-128, 128, dtype=torch.int8)
    else:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    scales = torch.tensor([scale], dtype=torch.float32)
    got = torch.empty(256)
    _dequantize_kernel[(1,)](codes, scales, got, signed)
    valid = codes.to(torch.int32) > -128
    want = quant8.dequantize(codes[valid], scales)
    assert torch.equal(got[valid].view(torch.int32), want.view(torch.int32))
    if signed:
        assert torch.equal(got[:1].view(torch.int32), (-(torch.zeros(1) * scale)).view(torch.int32))


def _map(signed: bool) -> tuple[int, int, torch.Tensor]:
    power, levels = (
        (quant8.P_SIGNED, quant8.LEVELS_SIGNED)
        if signed
        else (quant8.P_UNSIGNED, quant8.LEVELS_UNSIGNED)
    )
    return power, levels, quant8._tables(signed, power, levels, torch.device("cpu"))[1]


@pytest.mark.parametrize("signed", [True, False])
def test_guess_needs_no_exact_root(signed):
    """[note: q8 guess]: every midpoint lies at least 0.159 inside its code interval in units
    of r * levels (r = |y|^(1/power)), and the count k + (mid[k] < |y|) with k =
    min(floor(r * levels), levels - 1) in fp32 is the definition's for roots off by a
    relative 2^-12 either way (the kernels' approximate square root errs by a few ulps)."""
    power, levels, mids = _map(signed)
    position = mids.double() ** (1 / power) * levels
    k = torch.arange(levels, dtype=torch.float64)
    assert min((position - k).min().item(), (k + 1 - position).min().item()) > 0.159
    abs_y = _hard_values(signed)
    want = torch.searchsorted(mids, abs_y, side="left")
    root = abs_y.double() ** (1 / power)
    for error in (-(2.0**-12), 0.0, 2.0**-12):
        r = (root * (1 + error)).float()
        guess = torch.clamp(r * levels, max=levels - 1).to(torch.int64)  # fp32 product, trunc
        assert torch.equal(guess + (mids[guess] < abs_y), want), error


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale", [0.3, 1.7e-3, 5.0e20, 3.0e-39])
def test_quantize_divides_as_the_reference(signed, scale):
    """Values near scale * midpoint under scales whose division is inexact (and a subnormal
    one): the code of the IEEE quotient, as the reference divides."""
    abs_y = _hard_values(signed)
    x = (abs_y.double() * scale).float()
    x = x[x.abs() <= torch.tensor(scale, dtype=torch.float32)]  # |x| <= the block's absmax
    x = torch.cat([x, -x]) if signed else x
    assert torch.equal(_triton_codes(x, scale, signed), _definition(x, scale, signed))


@pytest.mark.parametrize("scale", [0.0, float("inf"), float("nan")])
def test_unusable_scale_gives_code_zero(scale):
    x = torch.tensor([0.0, 0.5, -1.0, 3.0])
    for signed in (True, False):
        assert torch.equal(_triton_codes(x, scale, signed), torch.zeros(4, dtype=torch.int32))
