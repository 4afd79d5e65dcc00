"""``lion_``: Lion (Chen et al. 2023, lion-pytorch semantics, ``sign(0) = 0``), one launch
over every tensor.

Bytes per element: reads grad, param (or master) and exp_avg, writes param (and master) and
exp_avg. fp32: 20 B. bf16 with master weights: 2 + 4 + 4 read, 4 + 2 + 4 written = 20 B.
bf16 without: 10 B. No step counts.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import (
    BLOCK,
    full_blocks_end,
    hyper,
    learning_rate,
    load,
    load_grad,
    load_param,
    load_scalar,
    locate_chunk,
    skipped,
    slot,
    store,
    store_param,
    tail_block,
)
from .multi_tensor import TableCache, dtype_arguments, scalar_arguments
from .registry import register

# Table slots: params 0, grads 1, exp_avgs 2, master_params 3.
# Hyperparameter columns: lr 0, beta1 1, beta2 2, weight_decay 3.
N_SLOTS: tl.constexpr = tl.constexpr(4)


@triton.jit
def _lion_block(
    offs, mask, p_ptr, g_ptr, m_ptr, master_ptr, grad_scale, clip_coef, lr, decay, beta1,
    one_minus_beta1, beta2, one_minus_beta2, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations."""
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  MAXIMIZE)  # fmt: skip
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    m = load(m_ptr, offs, mask, COMPUTE)
    p = p * decay
    c = beta1 * m + one_minus_beta1 * g
    sign = (c > 0).to(COMPUTE) - (c < 0).to(COMPUTE)  # torch.sign: 0 for ±0 (and for NaN)
    p = p - lr * sign
    store(m_ptr, offs, mask, beta2 * m + one_minus_beta2 * g)
    store_param(p_ptr, master_ptr, offs, mask, p, MASTER)


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
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        lr = learning_rate(row, lr_tensor, t, N_SLOTS, LR_MODE)
        beta1 = hyper(row, N_SLOTS, 1)
        beta2 = hyper(row, N_SLOTS, 2)
        weight_decay = hyper(row, N_SLOTS, 3)
        # [note: hyperparameter rounding]
        if LR_MODE == 0:
            decay = (1.0 - lr * weight_decay).to(COMPUTE)
        else:
            decay = 1.0 - lr.to(COMPUTE) * weight_decay.to(COMPUTE)
        args = (
            slot(row, 0, P_DTYPE, ALIGNED), slot(row, 1, G_DTYPE, ALIGNED),
            slot(row, 2, S_DTYPE, ALIGNED), slot(row, 3, tl.float32, ALIGNED),
            load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE),
            load_scalar(clip_coef, HAS_CLIP, COMPUTE), lr.to(COMPUTE), decay,
            beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
            (1.0 - beta2).to(COMPUTE),
        )  # fmt: skip
        full_end = full_blocks_end(start, end)
        for base in range(start, full_end, BLOCK):
            _lion_block(base + tl.arange(0, BLOCK), None, *args, COMPUTE, MASTER,
                        HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip
        if full_end < end:
            offs, mask = tail_block(full_end, end)
            _lion_block(offs, mask, *args, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                        MAXIMIZE)  # fmt: skip


_TABLES = TableCache()


def lion_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    master_params: list[Tensor], lr: list[float], beta1: list[float], beta2: list[float],
    weight_decay: list[float], maximize: bool, lr_tensor: Tensor | None,
    grad_scale: Tensor | None, clip_coef: Tensor | None, found_inf: Tensor | None,
    master_sync: bool = True,
) -> None:  # fmt: skip
    """One Lion step over every tensor in one launch (see ``fusedopt._contract``)."""
    if not params:
        return
    lists = [params, grads, exp_avgs, master_params]
    dtypes = dtype_arguments(params, grads, bool(master_params), master_sync)
    launch = _TABLES.launch(
        lists, [lr, beta1, beta2, weight_decay], (tuple(map(str, dtypes.values())),)
    )
    scalars, flags = scalar_arguments(launch.table, lr_tensor, grad_scale, clip_coef, found_inf)
    lion_kernel[(launch.n_chunks,)](
        launch.table, launch.chunks, *scalars, WIDTH=launch.width, **dtypes, **flags,
        MAXIMIZE=maximize, ALIGNED=launch.aligned, **common.LAUNCH_OPTIONS,
    )  # fmt: skip


register("lion_", lion_)
