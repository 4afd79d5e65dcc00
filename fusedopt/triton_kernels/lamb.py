"""``lamb_``: LAMB with timm's semantics (DESIGN.md §3); per-tensor norms of the params and
of the updates, and the trust ratio, all on the device, without a host sync. Also its two
passes as ops of their own, ``lamb_direction_`` and ``lamb_apply_`` ([note: multi-pass ops] in
DESIGN.md §2), so that sharded LAMB all-reduces the per-tensor sums between them.

The trust ratio of a tensor needs the norm of its whole update before any element of the
param may change, so LAMB cannot be one pass; it is three launches, whatever the tensor count:

1. ``lamb_norms_kernel`` (one program per chunk): for a tensor that adapts, the new
   moments and the update ``u`` and the chunk's partial sums of p² and u²; the tensor's last
   chunk advances its step count.
2. ``lamb_fold_kernel`` (one program per tensor): folds its chunks' partials in chunk order
   (deterministic) into ``sq_norms[t] = (sum p², sum u²)``. (1 and 2 are ``lamb_direction_``.)
3. ``lamb_apply_kernel`` (one program per chunk): the trust ratio from ``sq_norms``, then
   ``p -= lr * ratio * u`` (``lamb_apply_``).

Which pass stores the moments is decided per tensor, as in every backend ([note: lamb
passes] in csrc/include/fusedopt/math/lamb.h, which also argues why it is minimal). Bytes per
element (G grad, P param source: the fp32 master or the param, W param written back, S state
element):

* A tensor that adapts, with states in fp32 (fp32 params, or master weights): pass 1 reads
  g, p, m, v and writes m, v (G + P + 4S); pass 3 reads p, m, v, recomputes u from them, and
  writes p (P + 2S + W, plus 4 for the master). fp32: 24 + 16 = 40 B; bf16 with master:
  22 + 18 = 40 B.
* A tensor that adapts, with bf16/fp16 states (no master): pass 1 only reads g, p, m, v
  (G + P + 2S); pass 3 reads them again, recomputes the moments and the update, and writes
  m, v, p (G + P + 4S + W). bf16: 8 + 14 = 22 B.
* A tensor that does not adapt: pass 1 reads nothing; pass 3 is the whole step (fp32 28 B).

The per-chunk partials (8 B per 65536 elements) are negligible.

8-bit moments ([note: 8-bit states] in fusedopt/quant8.py; constexpr Q8) are never exact:
both passes walk a chunk by quantization blocks (``quant8.fold_q8_blocks``), pass 1 only
reads the codes (G + P + 2 + 8/256 B), pass 3 recomputes and requantizes them (G + P + 4 +
W + 16/256 B): the codes are written once per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, quant8
from .common import (
    BLOCK,
    bias_correction,
    div,
    finish_tensor,
    hyper,
    load,
    load_grad,
    load_param,
    locate_chunk,
    rounding_words,
    skipped,
    slot,
    sqrt,
    store,
    store_param,
    store_state,
    tensor_key,
)
from .drivers import fold_blocks, locate_step, param_args
from .layout import layout
from .multi_tensor import TableCache
from .passes import register_norm_passes

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
def _block_args(
    row, t, new_step, grad_scale, clip_coef, sr_key, P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, GRAD_AVERAGING: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    ALIGNED: tl.constexpr, Q8: tl.constexpr,
):  # fmt: skip
    """What a block of either pass takes: ``drivers.param_args``, the moment pointers (with
    Q8: the codes', then their scales') and the coefficients of the update."""
    if Q8:
        moments = (
            slot(row, L.EXP_AVGS, tl.int8, ALIGNED), slot(row, L.EXP_AVG_SQS, tl.uint8, ALIGNED),
            slot(row, L.EXP_AVG_SCALES, tl.float32, False),
            slot(row, L.EXP_AVG_SQ_SCALES, tl.float32, False),
        )  # fmt: skip
    else:
        moments = (
            slot(row, L.EXP_AVGS, S_DTYPE, ALIGNED), slot(row, L.EXP_AVG_SQS, S_DTYPE, ALIGNED),
        )  # fmt: skip
    return (
        param_args(row, t, grad_scale, clip_coef, sr_key, L.MASTER_PARAMS, P_DTYPE, G_DTYPE,
                   COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED),
        moments, _coefficients(row, new_step, COMPUTE, GRAD_AVERAGING, BIAS_CORRECTION),
    )  # fmt: skip


@triton.jit
def _q8_moments(offs, mask, blocks, g, moments, coefficients):
    """The new moments of a tile of quantization blocks from their 8-bit codes."""
    m_codes, v_codes, m_scales, v_scales = moments
    beta1, beta3, beta2, one_minus_beta2, _, _, _, _, _ = coefficients
    m = quant8.dequantize(m_codes, m_scales, blocks, offs, mask, True)
    v = quant8.dequantize(v_codes, v_scales, blocks, offs, mask, False)
    return _moments(g, m, v, beta1, beta3, beta2, one_minus_beta2)


@triton.jit
def _norms_block(
    offs, mask, sums, block_args, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, STATES_EXACT: tl.constexpr,
):  # fmt: skip
    """Pass 1 over BLOCK elements (``drivers.fold_blocks``): ``sums`` (of p², of u², per lane)
    plus this block's; the moments stored when STATES_EXACT."""
    (p_ptr, g_ptr, master_ptr, grad_scale, clip_coef), (m_ptr, v_ptr), coefficients = block_args
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
    w_acc, u_acc = sums
    return w_acc + p * p, u_acc + u * u


@triton.jit
def _norms_q8_block(
    offs, mask, blocks, sums, block_args, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
):  # fmt: skip
    """Pass 1 over a tile of quantization blocks (``quant8.fold_q8_blocks``) of 8-bit
    moments: as :func:`_norms_block`, the codes read only."""
    (p_ptr, g_ptr, master_ptr, grad_scale, clip_coef), moments, coefficients = block_args
    _, _, _, _, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay = coefficients
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  False)  # fmt: skip
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    m, v = _q8_moments(offs, mask, blocks, g, moments, coefficients)
    u = _update(m, v, p, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay)
    if mask is not None:
        u = tl.where(mask, u, 0.0)  # masked lanes: eps > 0 keeps u finite, but not 0
    w_acc, u_acc = sums
    return w_acc + p * p, u_acc + u * u


@triton.jit
def _adapts(row, ALWAYS_ADAPT: tl.constexpr):
    """Whether LAMB adapts this tensor's step (wd != 0 or ALWAYS_ADAPT)."""
    return (hyper(row, L.N_SLOTS, L.WEIGHT_DECAY) != 0.0) | ALWAYS_ADAPT


@triton.jit
def lamb_norms_kernel(
    table, chunks, counters, partials, grad_scale, clip_coef, found_inf, sr_key, row_lengths,
    WIDTH: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, GRAD_AVERAGING: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, ALWAYS_ADAPT: tl.constexpr, STATES_EXACT: tl.constexpr,
    ALIGNED: tl.constexpr, Q8: tl.constexpr, STATE_SR: tl.constexpr = False,
):  # fmt: skip
    """Pass 1, per chunk: for a tensor that adapts, the moments (stored when STATES_EXACT) and
    the partial sums of p² and u² (partials[2 * chunk], partials[2 * chunk + 1]; 0 for a
    tensor that does not adapt); the last chunk advances the step count. Q8: 8-bit moments,
    by quantization blocks (``row_lengths``: ``quant8``). STATE_SR (bf16 states
    of an SR call) changes nothing here: this pass stores exact (fp32/fp64) states only."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        step_ptr = slot(row, L.STEPS, tl.float32, False)
        new_step = tl.load(step_ptr) + 1.0
        end = tl.where(_adapts(row, ALWAYS_ADAPT), end, start)  # no elements: partials 0
        block_args = _block_args(row, t, new_step, grad_scale, clip_coef, sr_key, P_DTYPE,
                                 G_DTYPE, S_DTYPE, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                                 GRAD_AVERAGING, BIAS_CORRECTION, ALIGNED, Q8)  # fmt: skip
        if Q8:
            zeros = tl.zeros((quant8.TILE, quant8.QBLOCK), COMPUTE)
            w_acc, u_acc = quant8.fold_q8_blocks(
                _norms_q8_block, start, end, tl.load(row_lengths + t), (zeros, zeros),
                (block_args, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP), ALIGNED,
            )  # fmt: skip
            w_acc = tl.sum(w_acc, axis=0)
            u_acc = tl.sum(u_acc, axis=0)
        else:
            zeros = tl.zeros((BLOCK,), COMPUTE)
            w_acc, u_acc = fold_blocks(_norms_block, start, end, (zeros, zeros), (block_args,
                                       COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                                       STATES_EXACT))  # fmt: skip
        pid = tl.program_id(0)
        tl.store(partials + 2 * pid, tl.sum(w_acc, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(u_acc, axis=0))
        finish_tensor(counters, t, row, step_ptr, new_step)


@triton.jit
def lamb_fold_kernel(
    table, partials, sq_norms, found_inf, WIDTH: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):  # fmt: skip
    """Pass 2, per tensor: fold the chunk partials in chunk order into
    ``sq_norms[2t] = sum p²``, ``sq_norms[2t + 1] = sum u²``."""
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
        tl.store(sq_norms + 2 * t, tl.sum(w_acc, axis=0).to(COMPUTE))
        tl.store(sq_norms + 2 * t + 1, tl.sum(u_acc, axis=0).to(COMPUTE))


@triton.jit
def _trust_ratio(row, sq_norms, t, COMPUTE: tl.constexpr, TRUST_CLIP: tl.constexpr,
                 ALWAYS_ADAPT: tl.constexpr):  # fmt: skip
    """‖p‖/‖u‖ from ``sq_norms`` (1 where either is 0; clamped to 1 with TRUST_CLIP; 1 for a
    tensor that does not adapt)."""
    w_norm = sqrt(tl.load(sq_norms + 2 * t).to(COMPUTE))
    u_norm = sqrt(tl.load(sq_norms + 2 * t + 1).to(COMPUTE))
    ratio = tl.where((w_norm > 0) & (u_norm > 0), div(w_norm, u_norm), 1.0)
    if TRUST_CLIP:
        ratio = tl.minimum(ratio, 1.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(_adapts(row, ALWAYS_ADAPT), ratio, 1.0).to(COMPUTE)


@triton.jit
def _apply_block(
    offs, mask, carry, ratio, lr, two_pass, block_args, COMPUTE: tl.constexpr,
    MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    STATE_SR: tl.constexpr, state_key,
):  # fmt: skip
    """Pass 3 over BLOCK elements (``drivers.fold_blocks``; nothing carried). STATE_SR: the
    bf16 moments round stochastically with the elements' Philox words under ``state_key``
    (exp_avg word 1, exp_avg_sq word 2: [note: state dtype] in
    csrc/include/fusedopt/dtype.h)."""
    (p_ptr, g_ptr, master_ptr, grad_scale, clip_coef), (m_ptr, v_ptr), coefficients = block_args
    beta1, beta3, beta2, one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay = (
        coefficients
    )
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    if two_pass:  # pass 1 stored the exact moments: recompute u from them
        m = load(m_ptr, offs, mask, COMPUTE)
        v = load(v_ptr, offs, mask, COMPUTE)
    else:  # recompute the moments from the grad, then store them
        g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE,
                      HAS_CLIP, False)  # fmt: skip
        m, v = _moments(g, load(m_ptr, offs, mask, COMPUTE), load(v_ptr, offs, mask, COMPUTE),
                        beta1, beta3, beta2, one_minus_beta2)  # fmt: skip
        if STATE_SR:
            words = rounding_words(state_key, offs)
            store_state(m_ptr, offs, mask, m, words, 1)
            store_state(v_ptr, offs, mask, v, words, 2)
        else:
            store(m_ptr, offs, mask, m)
            store(v_ptr, offs, mask, v)
    u = _update(m, v, p, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay)
    store_param(p_ptr, master_ptr, offs, mask, p - lr * (u * ratio), MASTER)
    return carry


@triton.jit
def _apply_q8_block(
    offs, mask, blocks, carry, ratio, lr, block_args, COMPUTE: tl.constexpr,
    MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
):  # fmt: skip
    """Pass 3 over a tile of quantization blocks of 8-bit moments
    (``quant8.fold_q8_blocks``): the moments recomputed from the grad and requantized (their
    one write of the step), then p."""
    (p_ptr, g_ptr, master_ptr, grad_scale, clip_coef), moments, coefficients = block_args
    _, _, _, _, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay = coefficients
    m_codes, v_codes, m_scales, v_scales = moments
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  False)  # fmt: skip
    m, v = _q8_moments(offs, mask, blocks, g, moments, coefficients)
    quant8.requantize(m_codes, m_scales, blocks, m, offs, mask, True)
    quant8.requantize(v_codes, v_scales, blocks, v, offs, mask, False)
    u = _update(m, v, p, bc1, sqrt_bc2, eps, weight_decay, has_weight_decay)
    store_param(p_ptr, master_ptr, offs, mask, p - lr * (u * ratio), MASTER)
    return carry


@triton.jit
def lamb_apply_kernel(
    table, chunks, sq_norms, lr_tensor, grad_scale, clip_coef, found_inf, sr_key, row_lengths,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    LR_MODE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, GRAD_AVERAGING: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    TRUST_CLIP: tl.constexpr, ALWAYS_ADAPT: tl.constexpr, STATES_EXACT: tl.constexpr,
    ALIGNED: tl.constexpr, Q8: tl.constexpr, STATE_SR: tl.constexpr = False,
):  # fmt: skip
    """Pass 3, per chunk: p -= lr * (u * ratio), at the step count pass 1 advanced; STATE_SR:
    bf16 moments round stochastically (:func:`_apply_block`)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end, lr = locate_step(table, chunks, lr_tensor, WIDTH, L.N_SLOTS, LR_MODE)
        new_step = tl.load(slot(row, L.STEPS, tl.float32, False))
        ratio = _trust_ratio(row, sq_norms, t, COMPUTE, TRUST_CLIP, ALWAYS_ADAPT)
        two_pass = _adapts(row, ALWAYS_ADAPT) if STATES_EXACT else False  # [note: lamb passes]
        block_args = _block_args(row, t, new_step, grad_scale, clip_coef, sr_key, P_DTYPE,
                                 G_DTYPE, S_DTYPE, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                                 GRAD_AVERAGING, BIAS_CORRECTION, ALIGNED, Q8)  # fmt: skip
        nothing = tl.zeros((), tl.int32)
        if Q8:
            quant8.fold_q8_blocks(_apply_q8_block, start, end, tl.load(row_lengths + t), nothing,
                                  (ratio, lr.to(COMPUTE), block_args, COMPUTE, MASTER,
                                   HAS_GRAD_SCALE, HAS_CLIP), ALIGNED)  # fmt: skip
        elif STATE_SR:
            fold_blocks(_apply_block, start, end, nothing, (ratio, lr.to(COMPUTE), two_pass,
                        block_args, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP, STATE_SR,
                        tensor_key(sr_key, t)))  # fmt: skip
        else:
            fold_blocks(_apply_block, start, end, nothing, (ratio, lr.to(COMPUTE), two_pass,
                        block_args, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP, STATE_SR,
                        0))  # fmt: skip


_TABLES = TableCache()
_ROW_LENGTHS = quant8.RowLengths()


def _q8(a) -> bool:
    """Whether the call's moments are 8-bit (their scales given)."""
    return bool(a.named.get("exp_avg_scales"))


def _row_lengths(a) -> torch.Tensor | None:
    """The row lengths of a call with 8-bit moments (``quant8.RowLengths``), else None."""
    return _ROW_LENGTHS(a.params) if _q8(a) else None


def _options(a) -> dict:
    """The constexpr and launch options of the direction and apply kernels."""
    # [note: lamb passes]: the states hold opmath values exactly in fp32/fp64 storage
    # (whatever the param: [note: state dtype]); 8-bit codes are not exact
    exact = a.dtypes["S_DTYPE"] in (tl.float32, tl.float64)
    states_exact = exact and not _q8(a)
    return {
        "WIDTH": a.launch.width, **a.dtypes, "HAS_GRAD_SCALE": a.scalar_flags["HAS_GRAD_SCALE"],
        "HAS_CLIP": a.scalar_flags["HAS_CLIP"], "HAS_FOUND_INF": a.scalar_flags["HAS_FOUND_INF"],
        "GRAD_AVERAGING": a.grad_averaging, "BIAS_CORRECTION": a.bias_correction,
        "ALWAYS_ADAPT": a.always_adapt, "STATES_EXACT": states_exact,
        "ALIGNED": a.launch.aligned, "Q8": _q8(a), **common.LAUNCH_OPTIONS,
    }  # fmt: skip


def _direction(a, sq_norms: torch.Tensor) -> None:
    """Passes 1 and 2 (see the module docstring) into ``sq_norms``, zeros of shape [N, 2]."""
    launch = a.launch
    compute = sq_norms.dtype
    partials = torch.empty(2 * launch.n_chunks, dtype=compute, device=sq_norms.device)
    _, grad_scale_arg, clip_coef_arg, found_inf_arg, sr_key_arg = a.scalar_tensors
    lamb_norms_kernel[(launch.n_chunks,)](
        launch.table, launch.chunks, launch.counters, partials, grad_scale_arg, clip_coef_arg,
        found_inf_arg, sr_key_arg, _row_lengths(a), **_options(a),
    )  # fmt: skip
    lamb_fold_kernel[(len(a.params),)](
        launch.table, partials, sq_norms, found_inf_arg, WIDTH=launch.width,
        COMPUTE=a.dtypes["COMPUTE"], HAS_FOUND_INF=a.scalar_flags["HAS_FOUND_INF"],
        **common.LAUNCH_OPTIONS,
    )  # fmt: skip


def _apply(a, sq_norms: torch.Tensor) -> None:
    """Pass 3 (see the module docstring)."""
    lamb_apply_kernel[(a.launch.n_chunks,)](
        a.launch.table, a.launch.chunks, sq_norms, *a.scalar_tensors, _row_lengths(a),
        **_options(a),
        LR_MODE=a.scalar_flags["LR_MODE"], TRUST_CLIP=a.trust_clip,
    )  # fmt: skip


register_norm_passes("lamb_", "lamb_direction_", "lamb_apply_", _TABLES, _direction, _apply)
