"""``adamw_``: Adam (L2 decay) / AdamW (decoupled decay), one launch over every tensor.

Bytes per element (G grad, P param, S state size): reads grad, param (or master), exp_avg,
exp_avg_sq, writes param (and master), exp_avg, exp_avg_sq; AMSGrad adds a read and a write
of max_exp_avg_sq. fp32: 28 B (36 with AMSGrad). bf16 with master weights: 2 + 4 + 8 read,
4 + 2 + 8 written = 28 B. bf16 without: 14 B. Step counts: 4 B per tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import quant8
from .common import bias_correction, div, hyper, load, maximum, slot, sqrt, store_state
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("adamw_")


@triton.jit
def _adamw_moments(
    g, p, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay,
    has_weight_decay, DECOUPLED: tl.constexpr,
):  # fmt: skip
    """The decayed param and the new moments, in the reference's order of operations."""
    if DECOUPLED:
        p = p * decay  # 1 for wd == 0: p * 1 == p exactly
    else:
        # [note: zero weight decay]: no 0 * p term (an infinite param would give NaN).
        g = tl.where(has_weight_decay, g + weight_decay * p, g)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    return p, m, v


@triton.jit
def _adamw_block(
    offs, mask, g, p, m_ptr, v_ptr, vmax_ptr, decay, step_size, beta1, one_minus_beta1, beta2,
    one_minus_beta2, sqrt_bc2, eps, weight_decay, has_weight_decay, COMPUTE: tl.constexpr,
    FLAGS: tl.constexpr, words=None,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores the
    states, returns the new param (``drivers.for_each_block`` loads g and p, stores p).
    ``words``: the elements' Philox words when the bf16 states round stochastically
    (``STATE_SR``; exp_avg, exp_avg_sq, max_exp_avg_sq: words 1, 2, 3, [note: state dtype]
    in csrc/include/fusedopt/dtype.h)."""
    DECOUPLED, AMSGRAD, _ = FLAGS
    m = load(m_ptr, offs, mask, COMPUTE)
    v = load(v_ptr, offs, mask, COMPUTE)
    p, m, v = _adamw_moments(g, p, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                             weight_decay, has_weight_decay, DECOUPLED)  # fmt: skip
    v_hat = v
    if AMSGRAD:
        v_hat = maximum(load(vmax_ptr, offs, mask, COMPUTE), v)
        store_state(vmax_ptr, offs, mask, v_hat, words, 3)
    denom = div(sqrt(v_hat), sqrt_bc2) + eps
    p = p - div(step_size * m, denom)
    store_state(m_ptr, offs, mask, m, words, 1)
    store_state(v_ptr, offs, mask, v, words, 2)
    return p


@triton.jit
def _adamw_q8_block(
    offs, mask, blocks, g, p, m_codes, v_codes, m_scales, v_scales, decay, step_size,
    beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, weight_decay,
    has_weight_decay, COMPUTE: tl.constexpr, FLAGS: tl.constexpr,
):  # fmt: skip
    """A tile of quantization blocks with 8-bit moments ([note: 8-bit states] in
    fusedopt/quant8.py; ``blocks``: ``quant8.fold_q8_blocks``): dequantized, stepped as
    :func:`_adamw_block` steps (no amsgrad), requantized with the blocks' new absmaxes."""
    DECOUPLED, _, _ = FLAGS
    m = quant8.dequantize(m_codes, m_scales, blocks, offs, mask, True)
    v = quant8.dequantize(v_codes, v_scales, blocks, offs, mask, False)
    p, m, v = _adamw_moments(g, p, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                             weight_decay, has_weight_decay, DECOUPLED)  # fmt: skip
    denom = div(sqrt(v), sqrt_bc2) + eps
    p = p - div(step_size * m, denom)
    quant8.requantize(m_codes, m_scales, blocks, m, offs, mask, True)
    quant8.requantize(v_codes, v_scales, blocks, v, offs, mask, False)
    return p


@triton.jit
def _adamw_scalars(row, lr, COMPUTE: tl.constexpr, LR_MODE: tl.constexpr, FLAGS):
    """The tensor's new step count and per-tensor scalars, from its table row and lr."""
    _, _, BIAS_CORRECTION = FLAGS
    new_step = tl.load(slot(row, L.STEPS, tl.float32, False)) + 1.0
    beta1 = hyper(row, L.N_SLOTS, L.BETA1)
    beta2 = hyper(row, L.N_SLOTS, L.BETA2)
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    bc1 = bias_correction(beta1, new_step, BIAS_CORRECTION)
    bc2 = bias_correction(beta2, new_step, BIAS_CORRECTION)
    # [note: hyperparameter rounding]: float64 expressions for a Python lr, fp32 ones for
    # a tensor lr, exactly as the reference evaluates them.
    has_weight_decay = weight_decay != 0.0
    if LR_MODE == 0:
        decay = (1.0 - lr * weight_decay).to(COMPUTE)
        step_size = (lr / bc1).to(COMPUTE)
    else:
        lr_c = lr.to(COMPUTE)
        decay = 1.0 - lr_c * weight_decay.to(COMPUTE)
        step_size = div(lr_c, bc1.to(COMPUTE))
    # [note: zero weight decay]: a zero decay is none, not 1 - lr*0 (NaN for lr = inf).
    decay = tl.where(has_weight_decay, decay, 1.0).to(COMPUTE)
    scalars = (
        decay, step_size, beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
        (1.0 - beta2).to(COMPUTE), tl.sqrt(bc2).to(COMPUTE),
        hyper(row, L.N_SLOTS, L.EPS).to(COMPUTE), weight_decay.to(COMPUTE), has_weight_decay,
    )  # fmt: skip
    return new_step, scalars


@triton.jit
def _adamw_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args and new step count ([note: generic step kernel] in
    ``drivers``)."""
    new_step, scalars = _adamw_scalars(row, lr, COMPUTE, LR_MODE, FLAGS)
    states = (
        slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
        slot(row, L.MAX_EXP_AVG_SQS, S_DTYPE, ALIGNED),
    )  # fmt: skip
    return states + scalars, new_step, True


@triton.jit
def _adamw_q8_prologue(row, lr, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The block args of a call with 8-bit states: code and scale pointers, then the
    scalars (``quant8.q8_step_kernel``)."""
    new_step, scalars = _adamw_scalars(row, lr, COMPUTE, LR_MODE, FLAGS)
    states = (
        slot(row, L.EXP_AVGS, tl.int8, ALIGNED), slot(row, L.EXP_AVG_SQS, tl.uint8, ALIGNED),
        slot(row, L.EXP_AVG_SCALES, tl.float32, False),
        slot(row, L.EXP_AVG_SQ_SCALES, tl.float32, False),
    )  # fmt: skip
    return states + scalars, new_step, True


#: One Adam/AdamW step over every tensor in one launch (``fusedopt._contract``'s schema order).
adamw_ = StepOp(
    "adamw_", _adamw_prologue, _adamw_block, ("DECOUPLED", "AMSGRAD", "BIAS_CORRECTION"),
    q8=quant8.Q8Launcher(_adamw_q8_prologue, _adamw_q8_block),
)  # fmt: skip


register("adamw_", adamw_)
