"""``lion_``: Lion (Chen et al. 2023, lion-pytorch semantics, ``sign(0) = 0``), one launch
over every tensor.

Bytes per element: reads grad, param (or master) and exp_avg, writes param (and master) and
exp_avg. fp32: 20 B. bf16 with master weights: 2 + 4 + 4 read, 4 + 2 + 4 written = 20 B.
bf16 without: 10 B. No step counts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import hyper, load, slot, store
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("lion_")


@triton.jit
def _lion_block(
    offs, mask, g, p, m_ptr, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
    COMPUTE: tl.constexpr, FLAGS: tl.constexpr,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores the
    moment, returns the new param (``drivers.for_each_block`` loads g and p, stores p)."""
    m = load(m_ptr, offs, mask, COMPUTE)
    p = p * decay
    c = beta1 * m + one_minus_beta1 * g
    sign = (c > 0).to(COMPUTE) - (c < 0).to(COMPUTE)  # torch.sign: 0 for ±0 (and for NaN)
    p = p - lr * sign
    store(m_ptr, offs, mask, beta2 * m + one_minus_beta2 * g)
    return p


@triton.jit
def _lion_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args ([note: generic step kernel] in ``drivers``); no step count."""
    beta1 = hyper(row, L.N_SLOTS, L.BETA1)
    beta2 = hyper(row, L.N_SLOTS, L.BETA2)
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    # [note: hyperparameter rounding]
    if LR_MODE == 0:
        decay = (1.0 - lr * weight_decay).to(COMPUTE)
    else:
        decay = 1.0 - lr.to(COMPUTE) * weight_decay.to(COMPUTE)
    args = (
        slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), lr.to(COMPUTE), decay,
        beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
        (1.0 - beta2).to(COMPUTE),
    )  # fmt: skip
    return args, 0.0, False


#: One Lion step over every tensor in one launch (``fusedopt._contract``'s schema order).
lion_ = StepOp("lion_", _lion_prologue, _lion_block)


register("lion_", lion_)
