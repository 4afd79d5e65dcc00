"""``lion_``: Lion (Chen et al. 2023, lion-pytorch semantics, ``sign(0) = 0``), one launch
over every tensor.

Bytes per element: reads grad, param (or master) and exp_avg, writes param (and master) and
exp_avg. fp32: 20 B. bf16 with master weights: 2 + 4 + 4 read, 4 + 2 + 4 written = 20 B.
bf16 without: 10 B. No step counts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import hyper, load, skipped, slot, store
from .drivers import for_each_block, locate_step, param_args
from .layout import layout, prepare
from .multi_tensor import TableCache
from .registry import register

#: The table columns, named by the spec.
L = layout("lion_")


@triton.jit
def _lion_block(
    offs, mask, g, p, m_ptr, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
    COMPUTE: tl.constexpr,
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
def lion_kernel(
    table, chunks, lr_tensor, grad_scale, clip_coef, found_inf, WIDTH: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, LR_MODE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One program per chunk."""
    if not skipped(found_inf, HAS_FOUND_INF):
        _, row, start, end, lr = locate_step(table, chunks, lr_tensor, WIDTH, L.N_SLOTS, LR_MODE)
        beta1 = hyper(row, L.N_SLOTS, L.BETA1)
        beta2 = hyper(row, L.N_SLOTS, L.BETA2)
        weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
        # [note: hyperparameter rounding]
        if LR_MODE == 0:
            decay = (1.0 - lr * weight_decay).to(COMPUTE)
        else:
            decay = 1.0 - lr.to(COMPUTE) * weight_decay.to(COMPUTE)
        common = param_args(row, grad_scale, clip_coef, L.MASTER_PARAMS, P_DTYPE, G_DTYPE,
                            COMPUTE, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        args = (
            slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), lr.to(COMPUTE), decay,
            beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
            (1.0 - beta2).to(COMPUTE),
        )  # fmt: skip
        for_each_block(_lion_block, start, end, common, args, (COMPUTE,), COMPUTE, MASTER,
                       HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip


_TABLES = TableCache()


def lion_(*args) -> None:
    """One Lion step over every tensor in one launch (``fusedopt._contract``'s schema order)."""
    a = prepare("lion_", args, _TABLES)
    if a is not None:
        lion_kernel[(a.launch.n_chunks,)](
            a.launch.table, a.launch.chunks, *a.scalar_tensors, **a.options()
        )


register("lion_", lion_)
