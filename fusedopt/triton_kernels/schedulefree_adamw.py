"""``schedulefree_adamw_``: Schedule-Free AdamW (Defazio et al. 2024; the schedulefree
package's ``AdamWScheduleFree``), one launch over every tensor.

Bytes per element: reads grad, y (the param, or its master), z and exp_avg_sq, writes y (and
the master), z and exp_avg_sq. fp32: 28 B. bf16 with master weights: 2 + 4 + 8 read (+2 for
master_sync's param read), 4 + 2 + 8 written = 28 B (30). bf16 without: 14 B. No step counts:
the group's count k lives on the host, which computes ``ckp1`` and ``bias_correction2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import div, hyper, load, slot, sqrt, store
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("schedulefree_adamw_")


@triton.jit
def _schedulefree_adamw_block(
    offs, mask, g, y, z_ptr, v_ptr, beta2, one_minus_beta2, bias_correction2, eps,
    weight_decay, decays, lerp_from_y, ckp1, one_minus_ckp1, y_step, lr, COMPUTE: tl.constexpr,
    FLAGS: tl.constexpr,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores z and v,
    returns the new y (``drivers.for_each_block`` loads g and y, stores y)."""
    v = beta2 * load(v_ptr, offs, mask, COMPUTE) + one_minus_beta2 * g * g
    store(v_ptr, offs, mask, v)
    u = div(g, sqrt(div(v, bias_correction2)) + eps)
    u = tl.where(decays, u + weight_decay * y, u)  # [note: zero weight decay]
    z = load(z_ptr, offs, mask, COMPUTE)
    # torch's lerp: from y where |ckp1| < 0.5, else from z (one choice per tensor).
    y = tl.where(lerp_from_y, y + ckp1 * (z - y), z - (z - y) * one_minus_ckp1)
    y = y + y_step * u
    store(z_ptr, offs, mask, z - lr * u)
    return y


@triton.jit
def _schedulefree_adamw_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args ([note: generic step kernel] in ``drivers``); no step count."""
    beta1 = hyper(row, L.N_SLOTS, L.BETA1)
    beta2 = hyper(row, L.N_SLOTS, L.BETA2)
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    ckp1 = hyper(row, L.N_SLOTS, L.CKP1)
    # [note: hyperparameter rounding]: float64 expressions for a Python lr, fp32 ones for
    # a tensor lr, exactly as the reference evaluates them.
    if LR_MODE == 0:
        y_step = (lr * (beta1 * (1.0 - ckp1) - 1.0)).to(COMPUTE)
    else:
        y_step = lr.to(COMPUTE) * (beta1 * (1.0 - ckp1) - 1.0).to(COMPUTE)
    args = (
        slot(row, L.ZS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
        beta2.to(COMPUTE), (1.0 - beta2).to(COMPUTE),
        hyper(row, L.N_SLOTS, L.BIAS_CORRECTION2).to(COMPUTE),
        hyper(row, L.N_SLOTS, L.EPS).to(COMPUTE), weight_decay.to(COMPUTE),
        weight_decay != 0.0, tl.abs(ckp1) < 0.5, ckp1.to(COMPUTE),
        (1.0 - ckp1).to(COMPUTE), y_step, lr.to(COMPUTE),
    )  # fmt: skip
    return args, 0.0, False


#: One Schedule-Free AdamW step over every tensor in one launch (``fusedopt._contract``'s
#: schema order).
schedulefree_adamw_ = StepOp(
    "schedulefree_adamw_", _schedulefree_adamw_prologue, _schedulefree_adamw_block
)


register("schedulefree_adamw_", schedulefree_adamw_)
