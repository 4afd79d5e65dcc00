"""``adan_``: Adan (Xie et al. 2022, the official sail-sg Adan's conventions), one launch over
every tensor.

Bytes per element: reads grad, param (or master), exp_avg, exp_avg_sq, exp_avg_diff,
neg_pre_grad, writes param (and master) and the four states. fp32: 44 B. bf16 with master
weights: 2 + 4 + 16 read, 4 + 2 + 16 written = 44 B. bf16 without: 22 B. Step counts: 4 B per
tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import bias_correction, div, hyper, load, slot, sqrt, store
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("adan_")


@triton.jit
def _adan_block(
    offs, mask, g, p, m_ptr, n_ptr, v_ptr, npg_ptr, decay, prox, step_size, step_size_diff,
    beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, sqrt_bc3, eps,
    first, COMPUTE: tl.constexpr, FLAGS: tl.constexpr,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores the
    states, returns the new param (``drivers.for_each_block`` loads g and p first and stores
    p last). Each state is
    stored as soon as it is final, so that few values are live at once: with every store at
    the end the fp64 variant spilled 16 registers; loading the param last instead of first
    gave the unaligned fp16-master variant 3 spills and an 8-byte stack around the division
    calls (Triton 3.8, sm_90; tests/test_triton_static.py)."""
    (NO_PROX,) = FLAGS
    d = g + tl.where(first, -g, load(npg_ptr, offs, mask, COMPUTE))  # g - g_prev; 0 at step 1
    store(npg_ptr, offs, mask, -g)
    m = beta1 * load(m_ptr, offs, mask, COMPUTE) + one_minus_beta1 * g
    store(m_ptr, offs, mask, m)
    v = beta2 * load(v_ptr, offs, mask, COMPUTE) + one_minus_beta2 * d
    store(v_ptr, offs, mask, v)
    u = beta2 * d + g
    n = beta3 * load(n_ptr, offs, mask, COMPUTE) + one_minus_beta3 * u * u
    store(n_ptr, offs, mask, n)
    denom = div(sqrt(n), sqrt_bc3) + eps
    if NO_PROX:
        p = p * decay  # 1 for wd == 0: p * 1 == p exactly
    p = p - step_size * div(m, denom)
    p = p - step_size_diff * div(v, denom)
    if not NO_PROX:
        p = div(p, prox)  # 1 for wd == 0: p / 1 == p exactly
    return p


@triton.jit
def _adan_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args and new step count ([note: generic step kernel] in
    ``drivers``)."""
    new_step = tl.load(slot(row, L.STEPS, tl.float32, False)) + 1.0
    beta1 = hyper(row, L.N_SLOTS, L.BETA1)
    beta2 = hyper(row, L.N_SLOTS, L.BETA2)
    beta3 = hyper(row, L.N_SLOTS, L.BETA3)
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    bc1 = bias_correction(beta1, new_step, True)
    bc2 = bias_correction(beta2, new_step, True)
    bc3 = bias_correction(beta3, new_step, True)
    # [note: hyperparameter rounding]: float64 expressions for a Python lr, fp32 ones for
    # a tensor lr, exactly as the reference evaluates them.
    if LR_MODE == 0:
        decay = (1.0 - lr * weight_decay).to(COMPUTE)
        prox = (1.0 + lr * weight_decay).to(COMPUTE)
        step_size = (lr / bc1).to(COMPUTE)
        step_size_diff = (lr * beta2 / bc2).to(COMPUTE)
    else:
        lr_c = lr.to(COMPUTE)
        decay = 1.0 - lr_c * weight_decay.to(COMPUTE)
        prox = 1.0 + lr_c * weight_decay.to(COMPUTE)
        step_size = div(lr_c, bc1.to(COMPUTE))
        step_size_diff = div(lr_c * beta2.to(COMPUTE), bc2.to(COMPUTE))
    # [note: zero weight decay]: a zero decay is none, not 1 - lr*0 (NaN for lr = inf).
    has_weight_decay = weight_decay != 0.0
    decay = tl.where(has_weight_decay, decay, 1.0).to(COMPUTE)
    prox = tl.where(has_weight_decay, prox, 1.0).to(COMPUTE)
    args = (
        slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
        slot(row, L.EXP_AVG_DIFFS, S_DTYPE, ALIGNED),
        slot(row, L.NEG_PRE_GRADS, S_DTYPE, ALIGNED), decay, prox, step_size, step_size_diff,
        beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
        (1.0 - beta2).to(COMPUTE), beta3.to(COMPUTE), (1.0 - beta3).to(COMPUTE),
        tl.sqrt(bc3).to(COMPUTE), hyper(row, L.N_SLOTS, L.EPS).to(COMPUTE),
        new_step == 1.0,
    )  # fmt: skip
    return args, new_step, True


#: One Adan step over every tensor in one launch (``fusedopt._contract``'s schema order).
adan_ = StepOp("adan_", _adan_prologue, _adan_block, ("NO_PROX",))


register("adan_", adan_)
