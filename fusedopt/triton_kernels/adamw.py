"""``adamw_``: Adam (L2 decay) / AdamW (decoupled decay), one launch over every tensor.

Bytes per element (G grad, P param, S state size): reads grad, param (or master), exp_avg,
exp_avg_sq, writes param (and master), exp_avg, exp_avg_sq; AMSGrad adds a read and a write
of max_exp_avg_sq. fp32: 28 B (36 with AMSGrad). bf16 with master weights: 2 + 4 + 8 read,
4 + 2 + 8 written = 28 B. bf16 without: 14 B. Step counts: 4 B per tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import bias_correction, div, hyper, load, maximum, slot, sqrt, store
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("adamw_")


@triton.jit
def _adamw_block(
    offs, mask, g, p, m_ptr, v_ptr, vmax_ptr, decay, step_size, beta1, one_minus_beta1, beta2,
    one_minus_beta2, sqrt_bc2, eps, weight_decay, has_weight_decay, COMPUTE: tl.constexpr,
    FLAGS: tl.constexpr,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores the
    states, returns the new param (``drivers.for_each_block`` loads g and p, stores p)."""
    DECOUPLED, AMSGRAD, _ = FLAGS
    if DECOUPLED:
        p = p * decay  # 1 for wd == 0: p * 1 == p exactly
    else:
        # [note: zero weight decay]: no 0 * p term (an infinite param would give NaN).
        g = tl.where(has_weight_decay, g + weight_decay * p, g)
    m = beta1 * load(m_ptr, offs, mask, COMPUTE) + one_minus_beta1 * g
    v = beta2 * load(v_ptr, offs, mask, COMPUTE) + one_minus_beta2 * g * g
    v_hat = v
    if AMSGRAD:
        v_hat = maximum(load(vmax_ptr, offs, mask, COMPUTE), v)
        store(vmax_ptr, offs, mask, v_hat)
    denom = div(sqrt(v_hat), sqrt_bc2) + eps
    p = p - div(step_size * m, denom)
    store(m_ptr, offs, mask, m)
    store(v_ptr, offs, mask, v)
    return p


@triton.jit
def _adamw_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args and new step count ([note: generic step kernel] in
    ``drivers``)."""
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
    args = (
        slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
        slot(row, L.MAX_EXP_AVG_SQS, S_DTYPE, ALIGNED), decay, step_size, beta1.to(COMPUTE),
        (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE), (1.0 - beta2).to(COMPUTE),
        tl.sqrt(bc2).to(COMPUTE), hyper(row, L.N_SLOTS, L.EPS).to(COMPUTE),
        weight_decay.to(COMPUTE), has_weight_decay,
    )  # fmt: skip
    return args, new_step, True


#: One Adam/AdamW step over every tensor in one launch (``fusedopt._contract``'s schema order).
adamw_ = StepOp(
    "adamw_", _adamw_prologue, _adamw_block, ("DECOUPLED", "AMSGRAD", "BIAS_CORRECTION")
)


register("adamw_", adamw_)
