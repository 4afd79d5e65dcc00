"""``lamb_``: LAMB with timm's semantics (DESIGN.md §3); per-tensor norms of the params and
of the updates, and the trust ratio, all on the device, without a host sync.

The trust ratio of a tensor needs the norm of its whole update before any element of the
param may change, so LAMB cannot be one pass; it is three launches, whatever the tensor count:

1. ``lamb_norms_kernel`` (one program per chunk): computes the new moments and the update
   ``u``, and writes each chunk's partial sums of p² and u².
2. ``lamb_trust_ratio_kernel`` (one program per tensor): folds its chunks' partials in chunk
   order (deterministic) into ‖p‖ and ‖u‖ and writes the trust ratio.
3. ``lamb_update_kernel`` (one program per chunk): ``p -= lr * ratio * u``; the tensor's last
   chunk advances its step count.

Bytes per element (G grad, P param source: the fp32 master or the param, W param written
back, S state element):

* States in fp32 (fp32 params, or master weights): phase 1 reads g, p, m, v and writes m, v
  (G + P + 4S); phase 3 reads p, m, v, recomputes u from them, and writes p (P + 2S + W,
  plus 4 for the master). fp32: 24 + 16 = 40 B; bf16 with master: 22 + 18 = 40 B.
* States in bf16/fp16 (no master): phase 1 only reads g, p, m, v (G + P + 2S); phase 3
  reads them again, recomputes the moments and the update, and writes m, v, p
  (G + P + 4S + W). bf16: 8 + 14 = 22 B.

Why minimal: the one-pass floor (read g, p, m, v; write p, m, v: fp32 28 B) is out of reach,
since no element of p may be written before ‖u‖ is known, so some data is read twice. In
phase 3 the update is needed again; it can come from (a) a stored copy of u (phase 1 writes
4 B, phase 3 reads 4 B, plus p), (b) recomputation from the stored new moments (re-read m, v:
2S) or (c) recomputation from the grad and old moments (re-read g, m, v: G + 2S, with the
state writes moved to phase 3). For fp32 states (a) and (b) cost the same 8 B and (b) needs
no scratch buffer; (c) costs G more. For low-precision states (b) would recompute u from
*rounded* moments and disagree with the update whose norm was taken, so (c) is the exact
choice there and (a) would cost 2 B more (fp32 u: 8 B against G + 2S - 2S = 6 B for bf16,
since (c) also saves phase 1's state writes). Each variant moves the fewest bytes that are
exact. The per-chunk partials (8 B per 65536 elements) are negligible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    BLOCK,
    bias_correction,
    div,
    finish_tensor,
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
    sqrt,
    store,
    store_param,
    tail_block,
)
from .layout import layout, prepare
from .multi_tensor import TableCache
from .registry import register

#: The table columns, named by the spec.
L = layout("lamb_")
#: Partials folded per iteration by the trust-ratio kernel.
FOLD_BLOCK: tl.constexpr = tl.constexpr(256)


@triton.jit
def _moments(g, m, v, beta1, beta3, beta2, one_minus_beta2):
    """New first and second moments, in the reference's order of operations."""
    return beta1 * m + beta3 * g, beta2 * v + one_minus_beta2 * g * g


@triton.jit
def _update(m, v, p, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay):
    """u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * p (no decay term when wd == 0)."""
    u = div(div(m, bc1), div(sqrt(v), sqrt_bc2) + eps)
    return tl.where(has_weight_decay, u + weight_decay * p, u)


@triton.jit
def _coefficients(row, new_step, COMPUTE: tl.constexpr, GRAD_AVERAGING: tl.constexpr,
                  BIAS_CORRECTION: tl.constexpr):  # fmt: skip
    """The per-tensor scalars of the update ([note: hyperparameter rounding])."""
    beta1 = hyper(row, L.N_SLOTS, L.BETA1)
    beta2 = hyper(row, L.N_SLOTS, L.BETA2)
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    beta3 = (1.0 - beta1).to(COMPUTE) if GRAD_AVERAGING else tl.full((), 1.0, COMPUTE)
    bc1 = bias_correction(beta1, new_step, BIAS_CORRECTION)
    bc2 = bias_correction(beta2, new_step, BIAS_CORRECTION)
    return (
        beta1.to(COMPUTE), beta3, beta2.to(COMPUTE), (1.0 - beta2).to(COMPUTE),
        bc1.to(COMPUTE), tl.sqrt(bc2).to(COMPUTE), hyper(row, L.N_SLOTS, L.EPS).to(COMPUTE),
        weight_decay.to(COMPUTE), weight_decay != 0.0,
    )  # fmt: skip


@triton.jit
def _norms_block(
    offs, mask, w_acc, u_acc, p_ptr, g_ptr, m_ptr, v_ptr, master_ptr, grad_scale, clip_coef,
    coefficients, COMPUTE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, STATES_EXACT: tl.constexpr,
):  # fmt: skip
    beta1, beta3, beta2, one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay = (
        coefficients
    )
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  False)  # fmt: skip
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    m, v = _moments(g, load(m_ptr, offs, mask, COMPUTE), load(v_ptr, offs, mask, COMPUTE),
                    beta1, beta3, beta2, one_minus_beta2)  # fmt: skip
    u = _update(m, v, p, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay)
    if STATES_EXACT:
        store(m_ptr, offs, mask, m)
        store(v_ptr, offs, mask, v)
    if mask is not None:
        u = tl.where(mask, u, 0.0)  # masked lanes: eps > 0 keeps u finite, but not 0
    return w_acc + p * p, u_acc + u * u


@triton.jit
def lamb_norms_kernel(
    table, chunks, partials, grad_scale, clip_coef, found_inf, WIDTH: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, GRAD_AVERAGING: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, STATES_EXACT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Phase 1, per chunk: the moments (stored when STATES_EXACT) and the partial sums of p²
    and u² (partials[2 * chunk], partials[2 * chunk + 1])."""
    if not skipped(found_inf, HAS_FOUND_INF):
        _, row, start, end = locate_chunk(chunks, table, WIDTH)
        new_step = tl.load(slot(row, L.STEPS, tl.float32, False)) + 1.0
        args = (
            slot(row, L.PARAMS, P_DTYPE, ALIGNED), slot(row, L.GRADS, G_DTYPE, ALIGNED),
            slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
            slot(row, L.MASTER_PARAMS, tl.float32, ALIGNED),
            load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE),
            load_scalar(clip_coef, HAS_CLIP, COMPUTE),
            _coefficients(row, new_step, COMPUTE, GRAD_AVERAGING, BIAS_CORRECTION),
        )  # fmt: skip
        w_acc = tl.zeros((BLOCK,), COMPUTE)
        u_acc = tl.zeros((BLOCK,), COMPUTE)
        full_end = full_blocks_end(start, end)
        for base in range(start, full_end, BLOCK):
            w_acc, u_acc = _norms_block(base + tl.arange(0, BLOCK), None, w_acc, u_acc, *args,
                                        COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                                        STATES_EXACT)  # fmt: skip
        if full_end < end:
            offs, mask = tail_block(full_end, end)
            w_acc, u_acc = _norms_block(offs, mask, w_acc, u_acc, *args, COMPUTE, MASTER,
                                        HAS_GRAD_SCALE, HAS_CLIP, STATES_EXACT)  # fmt: skip
        pid = tl.program_id(0)
        tl.store(partials + 2 * pid, tl.sum(w_acc, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(u_acc, axis=0))


@triton.jit
def lamb_trust_ratio_kernel(
    table, partials, ratios, found_inf, WIDTH: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, TRUST_CLIP: tl.constexpr, ALWAYS_ADAPT: tl.constexpr,
):  # fmt: skip
    """Phase 2, per tensor: fold the chunk partials in chunk order; the trust ratio
    ‖p‖/‖u‖ (1 where either is 0; clamped to 1 with TRUST_CLIP; 1 unless wd != 0 or
    ALWAYS_ADAPT)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t = tl.program_id(0)
        row = table + t.to(tl.int64) * WIDTH
        first = tl.load(row + 1)
        n = tl.load(row + 2)
        w_acc = tl.zeros((FOLD_BLOCK,), COMPUTE)
        u_acc = tl.zeros((FOLD_BLOCK,), COMPUTE)
        for base in range(0, n, FOLD_BLOCK):
            offs = base + tl.arange(0, FOLD_BLOCK)
            idx = 2 * (first + offs)
            w_acc += tl.load(partials + idx, mask=offs < n, other=0.0)
            u_acc += tl.load(partials + idx + 1, mask=offs < n, other=0.0)
        w_norm = sqrt(tl.sum(w_acc, axis=0))
        u_norm = sqrt(tl.sum(u_acc, axis=0))
        ratio = tl.where((w_norm > 0) & (u_norm > 0), div(w_norm, u_norm), 1.0)
        if TRUST_CLIP:
            ratio = tl.minimum(ratio, 1.0, propagate_nan=tl.PropagateNan.ALL)
        if not ALWAYS_ADAPT:
            ratio = tl.where(hyper(row, L.N_SLOTS, L.WEIGHT_DECAY) != 0.0, ratio, 1.0)
        tl.store(ratios + t, ratio.to(COMPUTE))


@triton.jit
def _update_block(
    offs, mask, ratio, lr, p_ptr, g_ptr, m_ptr, v_ptr, master_ptr, grad_scale, clip_coef,
    coefficients, COMPUTE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, STATES_EXACT: tl.constexpr,
):  # fmt: skip
    beta1, beta3, beta2, one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay = (
        coefficients
    )
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    if STATES_EXACT:  # phase 1 stored the fp32 moments: recompute u from them
        m = load(m_ptr, offs, mask, COMPUTE)
        v = load(v_ptr, offs, mask, COMPUTE)
    else:  # low-precision states: recompute the moments from the grad, then store them
        g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE,
                      HAS_CLIP, False)  # fmt: skip
        m, v = _moments(g, load(m_ptr, offs, mask, COMPUTE), load(v_ptr, offs, mask, COMPUTE),
                        beta1, beta3, beta2, one_minus_beta2)  # fmt: skip
        store(m_ptr, offs, mask, m)
        store(v_ptr, offs, mask, v)
    u = _update(m, v, p, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay)
    store_param(p_ptr, master_ptr, offs, mask, p - lr * (u * ratio), MASTER)


@triton.jit
def lamb_update_kernel(
    table, chunks, counters, ratios, lr_tensor, grad_scale, clip_coef, found_inf,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    LR_MODE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, GRAD_AVERAGING: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    STATES_EXACT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Phase 3, per chunk: p -= lr * (u * ratio); the last chunk advances the step count."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        step_ptr = slot(row, L.STEPS, tl.float32, False)
        new_step = tl.load(step_ptr) + 1.0
        ratio = tl.load(ratios + t)
        lr = learning_rate(row, lr_tensor, t, L.N_SLOTS, LR_MODE).to(COMPUTE)
        args = (
            slot(row, L.PARAMS, P_DTYPE, ALIGNED), slot(row, L.GRADS, G_DTYPE, ALIGNED),
            slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
            slot(row, L.MASTER_PARAMS, tl.float32, ALIGNED),
            load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE),
            load_scalar(clip_coef, HAS_CLIP, COMPUTE),
            _coefficients(row, new_step, COMPUTE, GRAD_AVERAGING, BIAS_CORRECTION),
        )  # fmt: skip
        full_end = full_blocks_end(start, end)
        for base in range(start, full_end, BLOCK):
            _update_block(base + tl.arange(0, BLOCK), None, ratio, lr, *args, COMPUTE, MASTER,
                          HAS_GRAD_SCALE, HAS_CLIP, STATES_EXACT)  # fmt: skip
        if full_end < end:
            offs, mask = tail_block(full_end, end)
            _update_block(offs, mask, ratio, lr, *args, COMPUTE, MASTER, HAS_GRAD_SCALE,
                          HAS_CLIP, STATES_EXACT)  # fmt: skip
        finish_tensor(counters, t, row, step_ptr, new_step)


_TABLES = TableCache()


def lamb_(*args) -> None:
    """One LAMB step over every tensor in three launches (see the module docstring)."""
    a = prepare("lamb_", args, _TABLES)
    if a is None:
        return
    params, dtypes, launch, scalars, flags = (
        a.params,
        a.dtypes,
        a.launch,
        a.scalar_tensors,
        a.scalar_flags,
    )
    compute = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    device = params[0].device
    partials = torch.empty(2 * launch.n_chunks, dtype=compute, device=device)
    ratios = torch.empty(len(params), dtype=compute, device=device)
    # The moments are exact in storage when they are fp32 (or fp64): see the module docstring.
    states_exact = bool(a.master_params) or params[0].dtype in (torch.float32, torch.float64)
    options = {
        "WIDTH": launch.width, **dtypes, "HAS_GRAD_SCALE": flags["HAS_GRAD_SCALE"],
        "HAS_CLIP": flags["HAS_CLIP"], "HAS_FOUND_INF": flags["HAS_FOUND_INF"],
        "GRAD_AVERAGING": a.grad_averaging, "BIAS_CORRECTION": a.bias_correction,
        "STATES_EXACT": states_exact, "ALIGNED": launch.aligned, **common.LAUNCH_OPTIONS,
    }  # fmt: skip
    _, grad_scale_arg, clip_coef_arg, found_inf_arg = scalars
    lamb_norms_kernel[(launch.n_chunks,)](
        launch.table, launch.chunks, partials, grad_scale_arg, clip_coef_arg, found_inf_arg,
        **options,
    )  # fmt: skip
    lamb_trust_ratio_kernel[(len(params),)](
        launch.table, partials, ratios, found_inf_arg, WIDTH=launch.width,
        COMPUTE=dtypes["COMPUTE"], HAS_FOUND_INF=flags["HAS_FOUND_INF"],
        TRUST_CLIP=a.trust_clip, ALWAYS_ADAPT=a.always_adapt, **common.LAUNCH_OPTIONS,
    )  # fmt: skip
    lamb_update_kernel[(launch.n_chunks,)](
        launch.table, launch.chunks, launch.counters, ratios, *scalars, **options,
        LR_MODE=flags["LR_MODE"],
    )  # fmt: skip


register("lamb_", lamb_)
