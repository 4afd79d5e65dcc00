"""``lion_``: Lion (Chen et al. 2023, lion-pytorch semantics, ``sign(0) = 0``), one launch
over every tensor.

Bytes per element: reads grad, param (or master) and exp_avg, writes param (and master) and
exp_avg. fp32: 20 B. bf16 with master weights: 2 + 4 + 4 read, 4 + 2 + 4 written = 20 B.
bf16 without: 10 B. No step counts. 8-bit exp_avg ([note: 8-bit states] in
fusedopt/quant8.py): 1 B read and written instead, + 8 B per 256 elements (its scale).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import quant8
from .common import hyper, load, slot, store_state
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("lion_")


@triton.jit
def _lion_update(g, p, m, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, COMPUTE):
    """The new (param, moment), in the reference's order of operations."""
    p = p * decay
    c = beta1 * m + one_minus_beta1 * g
    sign = (c > 0).to(COMPUTE) - (c < 0).to(COMPUTE)  # torch.sign: 0 for ±0 (and for NaN)
    return p - lr * sign, beta2 * m + one_minus_beta2 * g


@triton.jit
def _lion_block(
    offs, mask, g, p, m_ptr, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
    COMPUTE: tl.constexpr, FLAGS: tl.constexpr, words=None,
):  # fmt: skip
    """The update of BLOCK elements: stores the moment, returns the new param
    (``drivers.for_each_block`` loads g and p, stores p). ``words``: the elements' Philox
    words when a bf16 moment rounds stochastically (``STATE_SR``; exp_avg: word 1, [note:
    state dtype] in csrc/include/fusedopt/dtype.h)."""
    m = load(m_ptr, offs, mask, COMPUTE)
    p, m = _lion_update(g, p, m, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        COMPUTE)  # fmt: skip
    store_state(m_ptr, offs, mask, m, words, 1)
    return p


@triton.jit
def _lion_q8_block(
    offs, mask, blocks, g, p, m_codes, m_scales, lr, decay, beta1, one_minus_beta1, beta2,
    one_minus_beta2, COMPUTE: tl.constexpr, FLAGS: tl.constexpr,
):  # fmt: skip
    """A tile of quantization blocks with an 8-bit moment ([note: 8-bit states] in
    fusedopt/quant8.py; ``blocks``: ``quant8.fold_q8_blocks``): dequantized, stepped as
    :func:`_lion_block` steps, requantized."""
    m = quant8.dequantize(m_codes, m_scales, blocks, offs, mask, True)
    p, m = _lion_update(g, p, m, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        COMPUTE)  # fmt: skip
    quant8.requantize(m_codes, m_scales, blocks, m, offs, mask, True)
    return p


@triton.jit
def _lion_scalars(row, lr, COMPUTE: tl.constexpr, LR_MODE: tl.constexpr):
    """The tensor's scalars, from its table row and lr."""
    beta1 = hyper(row, L.N_SLOTS, L.BETA1)
    beta2 = hyper(row, L.N_SLOTS, L.BETA2)
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    # [note: hyperparameter rounding]
    if LR_MODE == 0:
        decay = (1.0 - lr * weight_decay).to(COMPUTE)
    else:
        decay = 1.0 - lr.to(COMPUTE) * weight_decay.to(COMPUTE)
    return (
        lr.to(COMPUTE), decay, beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
        (1.0 - beta2).to(COMPUTE),
    )  # fmt: skip


@triton.jit
def _lion_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args ([note: generic step kernel] in ``drivers``); no step count."""
    m_ptr = slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED)
    return (m_ptr,) + _lion_scalars(row, lr, COMPUTE, LR_MODE), 0.0, False  # noqa: RUF005 (no * in Triton)


@triton.jit
def _lion_q8_prologue(row, lr, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The block args of a call with an 8-bit moment (``quant8.q8_step_kernel``)."""
    states = (slot(row, L.EXP_AVGS, tl.int8, ALIGNED),
              slot(row, L.EXP_AVG_SCALES, tl.float32, False))  # fmt: skip
    return states + _lion_scalars(row, lr, COMPUTE, LR_MODE), 0.0, False


#: One Lion step over every tensor in one launch (``fusedopt._contract``'s schema order).
lion_ = StepOp("lion_", _lion_prologue, _lion_block,
               q8=quant8.Q8Launcher(_lion_q8_prologue, _lion_q8_block))  # fmt: skip


register("lion_", lion_)
