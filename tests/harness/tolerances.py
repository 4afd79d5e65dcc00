"""The tolerance table: how far a backend may be from the float64 oracle, per storage dtype.

Every entry carries its reason. Nothing here is tuned to make a backend pass: the numbers are
derived from unit roundoffs and operation counts, and a backend outside them has a bug (or
computes a different formula), which is to be reported, not excused.

A comparison of ``got`` against the oracle's ``want`` (both upcast to float64) passes where

    |got - want| <= k * (rtol * |want| + cancel * terms) + atol

elementwise, with ``k`` the number of steps taken from identical inputs (1 for per-step
checks, the step index along a trajectory: rounding errors of earlier steps are carried
forward) and ``terms`` the size of the terms that produced the value: every update is
``new = a*old + b`` (moments) or ``new = a*old - lr*u`` (params), and where the two terms
nearly cancel the result keeps the absolute rounding error of the terms, whose size is at
most ``|old| + |new|``; along a trajectory, the largest such size of any step so far.
"""

from __future__ import annotations

import dataclasses
import math

import torch

#: Unit roundoff ``u`` (half an ulp of 1.0) of each dtype: round-to-nearest errs by at most
#: ``u * |x|`` for a normal x.
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
U32 = UNIT_ROUNDOFF[torch.float32]

#: Roundings of one element in one fp32 step, counted generously over the longest update
#: (load, unscale, clip, negate, decay, two moments of three ops each, sqrt, bias-correction
#: division, eps, division, lr, subtraction, store): ~16. Twice that covers error
#: amplification by the ops with a condition number of ~2 (the subtractions).
FP32_OPS_PER_STEP = 32


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed error of one stored value after one step from identical inputs."""

    rtol: float  # relative to the value itself
    cancel: float  # relative to the value before the step: cancellation
    atol: float  # absolute floor: values below the dtype's normal range
    reason: str


#: THE table, keyed by the dtype of the values compared (the storage dtype of a param or
#: state; fp32 for masters and fp32 states).
def _fp32_math_stored_in(dtype: torch.dtype, atol: float, reason: str) -> Tolerance:
    """fp32 math (FP32_OPS_PER_STEP roundings) whose result is stored in ``dtype``: half of
    its ulp (its unit roundoff; 0 for fp32, whose roundings are among those counted) more."""
    storage = UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else 0.0
    fp32 = FP32_OPS_PER_STEP * U32
    return Tolerance(rtol=storage + fp32, cancel=fp32, atol=atol, reason=reason)


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: _fp32_math_stored_in(
        torch.float32,
        atol=0.0,
        reason=(
            "fp32 math and fp32 storage: ~32 roundings of 2^-24 per element per step; a "
            "difference of nearly equal terms (m = b1*m + (1-b1)*g near 0) keeps the absolute "
            "error of its terms, whose size is the old value's."
        ),
    ),
    torch.bfloat16: _fp32_math_stored_in(
        torch.bfloat16,
        atol=0.0,
        reason=(
            "fp32 math rounded once to bf16 (round to nearest): half a bf16 ulp (u = 2^-8 "
            "relative) plus the fp32 error before the rounding, which may push a value near a "
            "midpoint to the neighbouring bf16 value. Truncation (error up to a whole ulp) "
            "fails. bf16 has fp32's exponent range: no subnormal floor."
        ),
    ),
    torch.float16: _fp32_math_stored_in(
        torch.float16,
        atol=2.0**-24,
        reason=(
            "fp32 math rounded once to fp16: half an fp16 ulp (u = 2^-11 relative) plus the "
            "fp32 error before the rounding, as for bf16. atol: below 2^-14 fp16 is subnormal "
            "with an absolute spacing of 2^-24, so half of it plus fp32 error near it "
            "(exp_avg_sq = (1-b2)*g^2 gets there for |g| < ~0.1)."
        ),
    ),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance of values stored in ``dtype`` (fp64 values are compared as fp32)."""
    return TOLERANCES[torch.float32 if dtype == torch.float64 else dtype]


def reduction_rtol(n: int) -> float:
    """Relative tolerance of an fp32 sum of ``n`` squares (an L2 norm), any summation order.

    Each partial sum rounds once; for a serial loop the errors are a random walk of ~sqrt(n)
    roundings of the running sum, a tree sums fewer. 4*sqrt(n) roundings (+8 for the load,
    unscale, square, sqrt and the final combination) bounds every order a kernel may use;
    the square root halves the relative error of the sum, which we keep as margin.
    """
    return U32 * (8 + 4 * math.sqrt(max(n, 1)))


#: The inf norm is a max of |g / grad_scale|: exact but for the one rounding of the division.
INF_NORM_RTOL = 2 * U32

#: The same pinned fp32 math on two backends: equal but for the rounding of host-computed
#: constants (``1 - beta`` in double vs fp32); a couple of ULPs of the stored value per step.
CROSS_BACKEND_MAX_ULPS = 2


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two tensors of one float dtype.

    The bit patterns are mapped to integers that order like the floats they encode (negative
    floats below -0 = +0), so adjacent floats are 1 apart, also across zero and binades.
    """
    if a.dtype != b.dtype or not a.is_floating_point():
        raise TypeError(
            f"ulp_distance needs two tensors of one float dtype, got {a.dtype}, {b.dtype}"
        )
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    sign_mask = {8: 2**63 - 1, 4: 2**31 - 1, 2: 2**15 - 1}[a.element_size()]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(ints).to(torch.int64)
        magnitude = bits & sign_mask
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()
