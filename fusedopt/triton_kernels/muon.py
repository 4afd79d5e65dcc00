"""``muon_momentum_`` and ``muon_apply_``: Muon's two elementwise passes (torch.optim.Muon's
arithmetic), each one launch over every tensor; the Newton-Schulz GEMMs run between them
in torch ([note: muon passes] in fusedopt/optim/muon.py).

Bytes per element. ``muon_momentum_`` reads grad and buffer, writes buffer and the bf16
Newton-Schulz input: fp32 4 + 4 + 4 + 2 = 14 B; bf16 with master weights (fp32 buffer)
2 + 4 + 4 + 2 = 12 B; bf16 without 8 B. ``muon_apply_`` reads the param (or master) and
the bf16 output, writes the param (and master): fp32 4 + 2 + 4 = 10 B; bf16 with masters
4 + 2 (+2 master sync) + 2 + 4 + 2 = 14-16 B; bf16 without 6 B. No step counts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    hyper,
    learning_rate,
    load,
    load_grad,
    load_param,
    load_scalar,
    locate_chunk,
    round_to,
    skipped,
    slot,
    store,
    store_param,
)
from .drivers import fold_blocks
from .layout import layout, prepare
from .multi_tensor import TableCache
from .registry import register

#: The table columns, named by the spec.
L = layout("muon_")


@triton.jit
def lerp(start, end, weight):
    """torch.lerp as its vectorised CPU kernel ([note: muon lerp] in
    csrc/include/fusedopt/math/muon.h): one FMA, ``w*(end - start) + start`` for |w| < 0.5,
    else ``(w - 1)*(end - start) + end``."""
    small = tl.abs(weight) < 0.5
    coeff = tl.where(small, weight, weight - 1.0)
    return tl.fma(coeff, end - start, tl.where(small, start, end))


@triton.jit
def _momentum_block(
    offs, mask, carry, args, COMPUTE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, NESTEROV: tl.constexpr,
):  # fmt: skip
    """The momentum pass of BLOCK elements (a ``fold_blocks`` block; ``carry`` unused)."""
    g_ptr, buf_ptr, ns_ptr, grad_scale, clip_coef, w_buf, w_nesterov = args
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  False)  # fmt: skip
    # the Nesterov lerp reads the stored (rounded) buffer, as torch's: rounded in registers,
    # not re-read (the re-read cost fp64 5 spilled registers on sm_90)
    stored = round_to(lerp(load(buf_ptr, offs, mask, COMPUTE), g, w_buf), buf_ptr.dtype.element_ty)
    tl.store(buf_ptr + offs, stored, mask=mask)
    buf = stored.to(COMPUTE)
    if NESTEROV:
        store(ns_ptr, offs, mask, lerp(g, buf, w_nesterov))
    else:
        store(ns_ptr, offs, mask, buf)
    return carry


@triton.jit
def _apply_block(offs, mask, carry, args, COMPUTE: tl.constexpr, MASTER: tl.constexpr):
    """The apply pass of BLOCK elements (a ``fold_blocks`` block; ``carry`` unused)."""
    p_ptr, master_ptr, ns_ptr, decay, step = args
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    update = load(ns_ptr, offs, mask, COMPUTE)
    store_param(p_ptr, master_ptr, offs, mask, tl.fma(step, update, p * decay), MASTER)
    return carry


#: The passes of :func:`muon_pass_kernel`, its PASS.
MOMENTUM_PASS: tl.constexpr = tl.constexpr(0)
APPLY_PASS: tl.constexpr = tl.constexpr(1)


@triton.jit
def muon_pass_kernel(
    table, chunks, lr_tensor, grad_scale, clip_coef, found_inf, PASS: tl.constexpr,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, LR_MODE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    NESTEROV: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One program per chunk of one pass: MOMENTUM_PASS, the momentum buffer and the
    Newton-Schulz input; APPLY_PASS, p = p*(1 - lr*wd), then p += -(lr*lr_ratio) * O."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        nothing = tl.zeros((), tl.int32)  # the passes hand nothing on (folded away)
        if PASS == MOMENTUM_PASS:
            momentum = hyper(row, L.N_SLOTS, L.MOMENTUM)
            # torch's Python floats: 1 - momentum in float64, then rounded to the compute dtype
            w_buf = (1.0 - momentum).to(COMPUTE)
            w_nesterov = momentum.to(COMPUTE)
            args = (
                slot(row, L.GRADS, G_DTYPE, ALIGNED),
                slot(row, L.MOMENTUM_BUFFERS, S_DTYPE, ALIGNED),
                slot(row, L.NS_BUFFERS, tl.bfloat16, ALIGNED),
                load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE),
                load_scalar(clip_coef, HAS_CLIP, COMPUTE), w_buf, w_nesterov,
            )  # fmt: skip
            fold_blocks(_momentum_block, start, end, nothing,
                        (args, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP, NESTEROV))  # fmt: skip
        else:
            # torch's Python floats: both factors in float64 (a tensor lr too: torch reads it
            # with .item()), rounded once to the compute dtype
            lr = learning_rate(row, lr_tensor, t, L.N_SLOTS, LR_MODE).to(tl.float64)
            decay = (1.0 - lr * hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)).to(COMPUTE)
            step = (-(lr * hyper(row, L.N_SLOTS, L.LR_RATIO))).to(COMPUTE)
            args = (
                slot(row, L.PARAMS, P_DTYPE, ALIGNED),
                slot(row, L.MASTER_PARAMS, tl.float32, ALIGNED),
                slot(row, L.NS_BUFFERS, tl.bfloat16, ALIGNED), decay, step,
            )  # fmt: skip
            fold_blocks(_apply_block, start, end, nothing, (args, COMPUTE, MASTER))


_TABLES = TableCache()


def _launch(pass_: int, args) -> None:
    a = prepare("muon_", args, _TABLES)
    if a is not None:
        muon_pass_kernel[(a.launch.n_chunks,)](
            a.launch.table, a.launch.chunks, *a.scalar_tensors, PASS=pass_, **a.options()
        )


def muon_momentum_(*args) -> None:
    """Muon's first pass over every tensor in one launch (the schema order)."""
    _launch(MOMENTUM_PASS, args)


def muon_apply_(*args) -> None:
    """Muon's second pass over every tensor in one launch (the schema order)."""
    _launch(APPLY_PASS, args)


def muon_(*args) -> None:
    """Muon (the passes, with the reference's per-matrix Newton-Schulz between them)."""
    from fusedopt.reference.ops import muon_newton_schulz

    muon_momentum_(*args)
    muon_newton_schulz(*args)
    muon_apply_(*args)


register("muon_momentum_", muon_momentum_)
register("muon_apply_", muon_apply_)
register("muon_", muon_)
