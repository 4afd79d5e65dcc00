"""``adafactor_``: Adafactor with torch.optim.Adafactor's semantics (DESIGN.md §3), and its
passes as ops, ``adafactor_norms_`` and ``adafactor_apply_`` ([note: adafactor passes] in
csrc/include/fusedopt/math/adafactor.h; [note: factored layouts] in fusedopt/_contract.py).

Launches, whatever the tensor count. Each reduction runs over chunks ([note: adafactor sums]
in csrc/include/fusedopt/math/adafactor.h: a factored tensor's chunks are runs of whole rows,
about ``CHUNK`` elements; a vector's the ``CHUNK``-element ones), so a large matrix is
reduced by many programs:

1. ``adafactor_partials_kernel``, one program per reduction chunk: sum p² of the chunk; a
   factored chunk's row sums of g² (complete: its rows are whole) and column partials (its
   rows), in float64 scratch; a vector's new variance and sum u².
2. ``adafactor_columns_kernel``, one program per (tensor, ``BLOCK`` columns): the column
   partials in chunk order, folded into the column factor; the tensor's first program also
   folds the row sums into the row factor and then writes the floored row means.
3. ``adafactor_updates_kernel``, one program per reduction chunk of a factored tensor: sum u²
   from the factors as stored.
4. ``adafactor_fold_kernel``, one program per tensor: its chunks' partials in chunk order, in
   float64, into ``sq_norms[t]``; it also advances the step count (every earlier program
   used ``count + 1``).
5. ``adafactor_floor_kernel``, one program per tensor: the floors again, into scratch.
6. ``adafactor_apply_kernel``, one program per chunk: ``p = p*(1 - lr*wd) - (alpha/clip)*u``
   with ``alpha`` and ``clip`` from ``sq_norms`` (float64) and u recomputed as launch 3 did.

Launches 1-4 are ``adafactor_norms_``, 5-6 ``adafactor_apply_``. Sums within a program run
in ``tl.sum``'s tree (Triton's own bits, not the CPU's: within the harness's derived
tolerance); across programs in chunk order, no float atomics. Bytes per element, fp32 (G
grad, P param read, W param written; factors, row sums and column partials ~0): launch 1
reads p and g twice (rows, then columns: the second time from cache), launch 3 reads g, launch
6 reads g, p, writes p: 24 B from memory (vector 28 B), as math/adafactor.h counts.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    BLOCK,
    CHUNK,
    div,
    full_blocks_end,
    hyper,
    learning_rate,
    load,
    load_grad,
    load_param,
    load_scalar,
    locate_chunk,
    master_or_key,
    round_to,
    skipped,
    slot,
    sqrt,
    store,
    store_param,
    tail_block,
)
from .layout import layout
from .multi_tensor import TableCache
from .passes import register_norm_passes

#: The table columns, named by the spec.
L = layout("adafactor_")
#: Tiles of a factored tensor: ROWS x COLS elements.
ROWS: tl.constexpr = tl.constexpr(8)
COLS: tl.constexpr = tl.constexpr(64)
#: Columns of the per-tensor table ``dims`` (int64): rows, cols (0, 0: not factored), the
#: tensor's first floor, first row sum and first column partial in the scratch vectors, its
#: first reduction chunk and its reduction chunk count (``_plan`` writes them; ``_dim``
#: reads one).
DIMS: tl.constexpr = tl.constexpr(8)
D_ROWS: tl.constexpr = tl.constexpr(0)
D_COLS: tl.constexpr = tl.constexpr(1)
D_FLOOR: tl.constexpr = tl.constexpr(2)
D_ROW_SUM: tl.constexpr = tl.constexpr(3)
D_COL_PARTIAL: tl.constexpr = tl.constexpr(4)
D_FIRST_RCHUNK: tl.constexpr = tl.constexpr(5)
D_RCHUNKS: tl.constexpr = tl.constexpr(6)


@triton.jit
def _dim(dims, t, COLUMN: tl.constexpr):
    """Column COLUMN (``D_*``) of tensor t's row of ``dims``."""
    return tl.load(dims + DIMS * t + COLUMN)


@triton.jit
def _factors(table, dims, t, WIDTH: tl.constexpr):
    """Tensor t's table row and its factor dims, rows and cols (0, 0: not factored)."""
    return table + t.to(tl.int64) * WIDTH, _dim(dims, t, D_ROWS), _dim(dims, t, D_COLS)


@triton.jit
def _locate_rchunk(rchunks, table, dims, WIDTH: tl.constexpr):
    """This program's reduction chunk q: its tensor t, its index k among t's reduction
    chunks, t's table row and factor dims (``_factors``)."""
    q = tl.program_id(0)
    t = tl.load(rchunks + 2 * q)
    row, rows, cols = _factors(table, dims, t, WIDTH)
    return q, t, tl.load(rchunks + 2 * q + 1), row, rows, cols


@triton.jit
def _lerp(v, x, w):
    """torch.lerp(v, x, w): v + w*(x - v) for |w| < 0.5, else x - (x - v)*(1 - w)."""
    diff = x - v
    return tl.where((w < 0.5) & (w > -0.5), v + w * diff, x - diff * (1.0 - w))


@triton.jit
def _eps1(row, DTYPE_EPS: tl.constexpr):
    """eps1 in float64; < 0 stands for torch's None: the eps of the param dtype."""
    eps1 = hyper(row, L.N_SLOTS, L.EPS1)
    return tl.where(eps1 < 0.0, DTYPE_EPS, eps1)


@triton.jit
def _update(g, v, eps1_sq):
    """u = g / sqrt(max(v, eps1^2)) (NaN stays NaN)."""
    return div(g, sqrt(tl.where(v < eps1_sq, eps1_sq, v)))


@triton.jit
def _row_floor(row_ptr, b, rows, eps1, COMPUTE: tl.constexpr):
    """max(mean of batch b's row factor as stored, eps1), in one fixed order."""
    acc = tl.zeros((BLOCK,), COMPUTE)
    for r0 in range(0, rows, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        acc += load(row_ptr, b * rows + r, r < rows, COMPUTE)
    mean = div(tl.sum(acc, axis=0), rows.to(COMPUTE))
    return tl.where(mean < eps1, eps1, mean)


@triton.jit
def _row_chunk(k, rows, cols):
    """Reduction chunk k of a factored tensor (math/adafactor.h adafactor_row_chunk): its
    batch and its rows [first, last), counted across batches."""
    chunk = tl.full((), CHUNK, cols.dtype)  # a tensor: the interpreter cannot divide CHUNK
    per = tl.maximum(chunk // cols, 1)  # adafactor_rows_per_chunk
    per_batch = (rows + per - 1) // per
    b = k // per_batch
    first = b * rows + (k - b * per_batch) * per
    return b, first, b * rows + tl.minimum((k - b * per_batch) * per + per, rows)


@triton.jit
def _step_weight(row):
    """(count + 1) ** beta2_decay in float64: the lerp weight of this step (the count is
    advanced by the last launch of adafactor_norms_)."""
    new_step = tl.load(slot(row, L.STEPS, tl.float32, False)) + 1.0
    return tl.exp(hyper(row, L.N_SLOTS, L.BETA2_DECAY) * tl.log(new_step.to(tl.float64)))


@triton.jit
def _grad_squares(g_ptr, r, c, last, cols, gs, cc, COMPUTE: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                  MAXIMIZE: tl.constexpr):  # fmt: skip
    """g² over the tile of rows ``r`` (below ``last``) and columns ``c`` (below ``cols``) of a
    row-major matrix, 0 outside it: a term of the row sums and of the column partials."""
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    mask = (r[:, None] < last) & (c[None, :] < cols)
    g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)
    return g * g


@triton.jit
def adafactor_partials_kernel(
    table, rchunks, dims, row_sums, col_partials, chunk_sums, grad_scale, clip_coef, found_inf,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
    DTYPE_EPS: tl.constexpr,
):  # fmt: skip
    """Launch 1, per reduction chunk (see the module)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        q, t, k, row, rows, cols = _locate_rchunk(rchunks, table, dims, WIDTH)
        numel = tl.load(row)
        p_ptr = slot(row, L.PARAMS, P_DTYPE, False)
        g_ptr = slot(row, L.GRADS, G_DTYPE, False)
        master_ptr = slot(row, L.MASTER_PARAMS, tl.float32, False)
        gs = load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE)
        cc = load_scalar(clip_coef, HAS_CLIP, COMPUTE)
        first = rows * 0  # int64, as both branches define it
        last = rows * 0
        if rows == 0:
            start = k * CHUNK
            end = tl.minimum(start + CHUNK, numel)
        else:
            _, first, last = _row_chunk(k, rows, cols)
            start = first * cols
            end = last * cols
        p_acc = tl.zeros((BLOCK,), COMPUTE)
        u_acc = tl.zeros((BLOCK,), COMPUTE)
        for base in range(start, end, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < end
            p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
            p_acc += p * p
            if rows == 0:  # a vector or scalar: its variance, and u, in this pass
                # computed here, not above the loop: hoisted, the bf16 build spilled 3 values
                # (sm_90)
                weight = _step_weight(row).to(COMPUTE)
                eps1_64 = _eps1(row, DTYPE_EPS)
                v_ptr = slot(row, L.VARIANCES, S_DTYPE, False)
                g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                              MAXIMIZE)  # fmt: skip
                v = _lerp(load(v_ptr, offs, mask, COMPUTE), g * g, weight)
                store(v_ptr, offs, mask, v)
                v = round_to(v, S_DTYPE).to(COMPUTE)  # as stored
                u = tl.where(mask, _update(g, v, (eps1_64 * eps1_64).to(COMPUTE)), 0.0)
                u_acc += u * u
        tl.store(chunk_sums + 2 * q, tl.sum(p_acc, axis=0).to(tl.float64))
        tl.store(chunk_sums + 2 * q + 1, tl.sum(u_acc, axis=0).to(tl.float64))
        if rows > 0:
            # row sums: tiles of ROWS whole rows (complete in this chunk)
            sums = row_sums + _dim(dims, t, D_ROW_SUM)
            for r0 in range(first, last, ROWS):
                r = r0 + tl.arange(0, ROWS)
                acc = tl.zeros((ROWS, COLS), COMPUTE)
                for c0 in range(0, cols, COLS):
                    c = c0 + tl.arange(0, COLS)
                    acc += _grad_squares(g_ptr, r, c, last, cols, gs, cc, COMPUTE,
                                         HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip
                tl.store(sums + r, tl.sum(acc, axis=1).to(tl.float64), mask=r < last)
            # column chunk_sums of this chunk: tiles of COLS columns, its rows in order
            part = col_partials + _dim(dims, t, D_COL_PARTIAL) + (k * cols).to(tl.int64)
            for c0 in range(0, cols, COLS):
                c = c0 + tl.arange(0, COLS)
                acc = tl.zeros((ROWS, COLS), COMPUTE)
                for r0 in range(first, last, ROWS):
                    r = r0 + tl.arange(0, ROWS)
                    acc += _grad_squares(g_ptr, r, c, last, cols, gs, cc, COMPUTE,
                                         HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip
                tl.store(part + c, tl.sum(acc, axis=0).to(tl.float64), mask=c < cols)


@triton.jit
def adafactor_columns_kernel(
    table, dims, row_sums, col_partials, floors, found_inf, WIDTH: tl.constexpr,
    S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    DTYPE_EPS: tl.constexpr,
):  # fmt: skip
    """Launch 2, per (tensor, BLOCK columns): the factors (see the module)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t = tl.program_id(0)
        y = tl.program_id(1)
        row, rows, cols = _factors(table, dims, t, WIDTH)
        if rows > 0:
            n_chunks = _dim(dims, t, D_RCHUNKS)
            batches = tl.load(row) // (rows * cols)
            per_batch = n_chunks // tl.maximum(batches, 1)
            weight = _step_weight(row).to(COMPUTE)
            c_ptr = slot(row, L.COL_VARS, S_DTYPE, False)
            j = y * BLOCK + tl.arange(0, BLOCK)
            mask = j < batches * cols
            b = j // cols
            part = (
                col_partials + _dim(dims, t, D_COL_PARTIAL) + (b * per_batch * cols + j - b * cols)
            )
            acc = tl.zeros((BLOCK,), tl.float64)
            for k in range(0, per_batch):
                acc += tl.load(part + k * cols, mask=mask, other=0.0)
            mean = (acc / rows.to(tl.float64)).to(COMPUTE)
            store(c_ptr, j, mask, _lerp(load(c_ptr, j, mask, COMPUTE), mean, weight))
            if y == 0:
                r_ptr = slot(row, L.ROW_VARS, S_DTYPE, False)
                sums = row_sums + _dim(dims, t, D_ROW_SUM)
                for r0 in range(0, batches * rows, BLOCK):
                    r = r0 + tl.arange(0, BLOCK)
                    rmask = r < batches * rows
                    row_mean = tl.load(sums + r, mask=rmask, other=0.0) / cols.to(tl.float64)
                    old = load(r_ptr, r, rmask, COMPUTE)
                    store(r_ptr, r, rmask, _lerp(old, row_mean.to(COMPUTE), weight))
                tl.debug_barrier()  # the row factors as stored, by every thread of the program
                eps1 = _eps1(row, DTYPE_EPS).to(COMPUTE)
                first = _dim(dims, t, D_FLOOR)
                for batch in range(0, batches):
                    floor = _row_floor(r_ptr, batch, rows, eps1, COMPUTE)
                    tl.store(floors + first + batch, floor)


@triton.jit
def adafactor_updates_kernel(
    table, rchunks, dims, floors, chunk_sums, grad_scale, clip_coef, found_inf,
    WIDTH: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, DTYPE_EPS: tl.constexpr,
):  # fmt: skip
    """Launch 3, per reduction chunk of a factored tensor: its sum u² (see the module)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        q, t, k, row, rows, cols = _locate_rchunk(rchunks, table, dims, WIDTH)
        if rows > 0:
            b, first, last = _row_chunk(k, rows, cols)
            g_ptr = slot(row, L.GRADS, G_DTYPE, False)
            r_ptr = slot(row, L.ROW_VARS, S_DTYPE, False)
            c_ptr = slot(row, L.COL_VARS, S_DTYPE, False)
            gs = load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE)
            cc = load_scalar(clip_coef, HAS_CLIP, COMPUTE)
            eps1_64 = _eps1(row, DTYPE_EPS)
            eps1_sq = (eps1_64 * eps1_64).to(COMPUTE)
            floor = load(floors, _dim(dims, t, D_FLOOR) + b, None, COMPUTE)
            u_tile = tl.zeros((ROWS, COLS), COMPUTE)
            for r0 in range(first, last, ROWS):
                r = r0 + tl.arange(0, ROWS)
                rv = load(r_ptr, r, r < last, COMPUTE)
                for c0 in range(0, cols, COLS):
                    c = c0 + tl.arange(0, COLS)
                    cv = load(c_ptr, b * cols + c, c < cols, COMPUTE)
                    offs = r[:, None].to(tl.int64) * cols + c[None, :]
                    mask = (r[:, None] < last) & (c[None, :] < cols)
                    g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE,
                                  HAS_CLIP, MAXIMIZE)  # fmt: skip
                    v = div(rv[:, None] * cv[None, :], floor)
                    u = tl.where(mask, _update(g, v, eps1_sq), 0.0)
                    u_tile += u * u
            tl.store(chunk_sums + 2 * q + 1, tl.sum(tl.sum(u_tile, axis=1), axis=0).to(tl.float64))


@triton.jit
def adafactor_fold_kernel(
    table, dims, chunk_sums, sq_norms, found_inf, WIDTH: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):  # fmt: skip
    """Launch 4, per tensor: sq_norms[t] from its rchunks' chunk_sums; the new step count."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t = tl.program_id(0)
        row = table + t.to(tl.int64) * WIDTH
        first = _dim(dims, t, D_FIRST_RCHUNK)
        n_chunks = _dim(dims, t, D_RCHUNKS)
        p_acc = tl.zeros((BLOCK,), tl.float64)
        u_acc = tl.zeros((BLOCK,), tl.float64)
        for k0 in range(0, n_chunks, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            mask = k < n_chunks
            p_acc += tl.load(chunk_sums + 2 * (first + k), mask=mask, other=0.0)
            u_acc += tl.load(chunk_sums + 2 * (first + k) + 1, mask=mask, other=0.0)
        tl.store(sq_norms + 2 * t, tl.sum(p_acc, axis=0).to(sq_norms.dtype.element_ty))
        tl.store(sq_norms + 2 * t + 1, tl.sum(u_acc, axis=0).to(sq_norms.dtype.element_ty))
        step_ptr = slot(row, L.STEPS, tl.float32, False)
        tl.store(step_ptr, tl.load(step_ptr) + 1.0)  # every program that read it is done


@triton.jit
def adafactor_floor_kernel(
    table, dims, floors, found_inf, WIDTH: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, DTYPE_EPS: tl.constexpr,
):  # fmt: skip
    """Launch 5, per tensor: floors[dims[t, 2] + b] = max(mean of batch b's row factor, eps1)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t = tl.program_id(0)
        row, rows, cols = _factors(table, dims, t, WIDTH)
        if rows > 0:
            first = _dim(dims, t, D_FLOOR)
            eps1 = _eps1(row, DTYPE_EPS).to(COMPUTE)
            r_ptr = slot(row, L.ROW_VARS, S_DTYPE, False)
            for b in range(0, tl.load(row) // (rows * cols)):
                tl.store(floors + first + b, _row_floor(r_ptr, b, rows, eps1, COMPUTE))


@triton.jit
def _apply_block(offs, mask, rows, cols, floor_ptr, p_ptr, g_ptr, master_ptr, r_ptr, c_ptr,
                 v_ptr, gs, cc, eps1_sq, decay, has_decay, step_size, COMPUTE: tl.constexpr,
                 MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                 MAXIMIZE: tl.constexpr):  # fmt: skip
    g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    if rows > 0:
        r = offs // cols
        b = r // rows
        c = offs - r * cols
        floor = load(floor_ptr, b, mask, COMPUTE)  # masked-off lanes: 0, never stored
        v = div(load(r_ptr, r, mask, COMPUTE) * load(c_ptr, b * cols + c, mask, COMPUTE), floor)
    else:
        v = load(v_ptr, offs, mask, COMPUTE)
    u = _update(g, v, eps1_sq)
    p = tl.where(has_decay, p * decay, p)
    store_param(p_ptr, master_ptr, offs, mask, p - step_size * u, MASTER)


@triton.jit
def adafactor_apply_kernel(
    table, chunks, dims, floors, sq_norms, lr_tensor, grad_scale, clip_coef, found_inf, sr_key,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, LR_MODE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, DTYPE_EPS: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Launch 3, per chunk: p = p*(1 - lr*wd) - (alpha/clip) * u."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        step = tl.load(slot(row, L.STEPS, tl.float32, False)).to(tl.float64)
        lr = learning_rate(row, lr_tensor, t, L.N_SLOTS, LR_MODE).to(tl.float64)
        numel = tl.load(row).to(tl.float64)
        # alpha / clip in float64 (math/adafactor.h adafactor_step_size)
        rho = tl.minimum(lr, 1.0 / tl.sqrt(step))
        root_n = tl.sqrt(numel)
        param_rms = tl.sqrt(tl.load(sq_norms + 2 * t).to(tl.float64)) / root_n
        alpha = tl.where(param_rms > hyper(row, L.N_SLOTS, L.EPS2), param_rms,
                         hyper(row, L.N_SLOTS, L.EPS2)) * rho  # fmt: skip
        update_rms = tl.sqrt(tl.load(sq_norms + 2 * t + 1).to(tl.float64)) / (
            root_n * hyper(row, L.N_SLOTS, L.D)
        )
        step_size = (alpha / tl.where(update_rms > 1.0, update_rms, 1.0)).to(COMPUTE)
        weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
        decay = (1.0 - lr * weight_decay).to(COMPUTE)
        eps1_64 = _eps1(row, DTYPE_EPS)
        rows = _dim(dims, t, D_ROWS)
        cols = _dim(dims, t, D_COLS)
        args = (
            rows, cols, floors + _dim(dims, t, D_FLOOR),
            slot(row, L.PARAMS, P_DTYPE, ALIGNED), slot(row, L.GRADS, G_DTYPE, ALIGNED),
            master_or_key(row, t, sr_key, L.MASTER_PARAMS, MASTER, ALIGNED),
            slot(row, L.ROW_VARS, S_DTYPE, False), slot(row, L.COL_VARS, S_DTYPE, False),
            slot(row, L.VARIANCES, S_DTYPE, ALIGNED),
            load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE),
            load_scalar(clip_coef, HAS_CLIP, COMPUTE), (eps1_64 * eps1_64).to(COMPUTE),
            decay, weight_decay != 0.0, step_size,
        )  # fmt: skip
        full_end = full_blocks_end(start, end)
        for base in range(start, full_end, BLOCK):
            _apply_block(base + tl.arange(0, BLOCK), None, *args, COMPUTE, MASTER,
                         HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip
        if full_end < end:
            offs, mask = tail_block(full_end, end)
            _apply_block(offs, mask, *args, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                         MAXIMIZE)  # fmt: skip


_TABLES = TableCache()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A call's per-tensor table ``dims`` ([n, DIMS] int64: see DIMS), its reduction chunks
    (``chunks``: [n_chunks, 2] int64, tensor and chunk index) and the sizes of its scratch
    vectors, by the call's shapes."""

    dims: torch.Tensor
    chunks: torch.Tensor
    n_floors: int
    n_row_sums: int
    n_col_partials: int
    max_column_tiles: int
    n_chunks: int


_PLANS: dict[tuple, _Plan] = {}


def _rows_per_chunk(cols: int) -> int:
    """math/adafactor.h adafactor_rows_per_chunk: whole rows, about CHUNK elements."""
    return max(CHUNK.value // cols, 1)


def _plan(params) -> _Plan:
    key = (params[0].device, tuple(tuple(p.shape) for p in params))
    plan = _PLANS.get(key)
    if plan is None:
        values, chunks = [], []
        floors = row_sums = col_partials = tiles = 0
        for t, p in enumerate(params):
            numel = p.numel()
            rows, cols = (p.shape[-2], p.shape[-1]) if p.dim() >= 2 else (0, 0)
            if numel == 0:
                n = 0
            elif rows == 0:
                n = -(-numel // CHUNK.value)
            else:
                n = numel // (rows * cols) * -(-rows // _rows_per_chunk(cols))
            values.append((rows, cols, floors, row_sums, col_partials, len(chunks), n, 0))
            chunks += [(t, k) for k in range(n)]
            if rows and numel:
                batches = numel // (rows * cols)
                floors += batches
                row_sums += batches * rows
                col_partials += n * cols
                tiles = max(tiles, -(-batches * cols // BLOCK.value))
        device = params[0].device
        plan = _PLANS[key] = _Plan(
            torch.tensor(values, dtype=torch.int64).to(device),
            torch.tensor(chunks or [(0, 0)], dtype=torch.int64).reshape(-1, 2).to(device),
            max(floors, 1), max(row_sums, 1), max(col_partials, 1), tiles, len(chunks),
        )  # fmt: skip
        if len(_PLANS) > 64:
            _PLANS.pop(next(iter(_PLANS)))
    return plan


def _check_row_major(a) -> None:
    for i, p in enumerate(a.params):
        if p.dim() >= 2 and not p.is_contiguous():
            raise RuntimeError(f"adafactor_triton_: params[{i}] (shape {tuple(p.shape)}, "
                               f"strides {p.stride()}) is not contiguous; a param with "
                               "factored states must be row-major")  # fmt: skip


def _dtype_eps(a) -> float:
    """eps1 = None: the eps of the dtype the update runs on (fp32 with master weights)."""
    return torch.finfo(torch.float32 if a.master_params else a.params[0].dtype).eps


def _common(a) -> dict:
    return {
        "WIDTH": a.launch.width, **a.dtypes, "HAS_GRAD_SCALE": a.scalar_flags["HAS_GRAD_SCALE"],
        "HAS_CLIP": a.scalar_flags["HAS_CLIP"], "HAS_FOUND_INF": a.scalar_flags["HAS_FOUND_INF"],
        "MAXIMIZE": a.maximize, "DTYPE_EPS": _dtype_eps(a),
        **common.LAUNCH_OPTIONS,
    }  # fmt: skip


def _norms(a, sq_norms: torch.Tensor) -> None:
    _check_row_major(a)
    plan = _plan(a.params)
    device = sq_norms.device
    n_chunks = plan.n_chunks
    _, grad_scale_arg, clip_coef_arg, found_inf_arg, _ = a.scalar_tensors
    f64 = torch.float64
    row_sums = torch.empty(plan.n_row_sums, dtype=f64, device=device)
    col_partials = torch.empty(plan.n_col_partials, dtype=f64, device=device)
    partials = torch.empty(2 * max(n_chunks, 1), dtype=f64, device=device)
    floors = torch.empty(plan.n_floors, dtype=sq_norms.dtype, device=device)
    common_args = _common(a)
    if n_chunks:
        adafactor_partials_kernel[(n_chunks,)](
            a.launch.table, plan.chunks, plan.dims, row_sums, col_partials, partials,
            grad_scale_arg, clip_coef_arg, found_inf_arg, **common_args,
        )  # fmt: skip
    if plan.max_column_tiles:
        adafactor_columns_kernel[(len(a.params), plan.max_column_tiles)](
            a.launch.table, plan.dims, row_sums, col_partials, floors, found_inf_arg,
            WIDTH=a.launch.width, S_DTYPE=a.dtypes["S_DTYPE"], COMPUTE=a.dtypes["COMPUTE"],
            HAS_FOUND_INF=a.scalar_flags["HAS_FOUND_INF"], DTYPE_EPS=_dtype_eps(a),
            **common.LAUNCH_OPTIONS,
        )  # fmt: skip
        adafactor_updates_kernel[(n_chunks,)](
            a.launch.table, plan.chunks, plan.dims, floors, partials, grad_scale_arg,
            clip_coef_arg, found_inf_arg, WIDTH=a.launch.width, G_DTYPE=a.dtypes["G_DTYPE"],
            S_DTYPE=a.dtypes["S_DTYPE"], COMPUTE=a.dtypes["COMPUTE"],
            HAS_GRAD_SCALE=a.scalar_flags["HAS_GRAD_SCALE"],
            HAS_CLIP=a.scalar_flags["HAS_CLIP"], HAS_FOUND_INF=a.scalar_flags["HAS_FOUND_INF"],
            MAXIMIZE=a.maximize, DTYPE_EPS=_dtype_eps(a), **common.LAUNCH_OPTIONS,
        )  # fmt: skip
    adafactor_fold_kernel[(len(a.params),)](
        a.launch.table, plan.dims, partials, sq_norms, found_inf_arg, WIDTH=a.launch.width,
        HAS_FOUND_INF=a.scalar_flags["HAS_FOUND_INF"], **common.LAUNCH_OPTIONS,
    )  # fmt: skip


def _apply(a, sq_norms: torch.Tensor) -> None:
    _check_row_major(a)
    plan = _plan(a.params)
    floors = torch.empty(plan.n_floors, dtype=sq_norms.dtype, device=sq_norms.device)
    found_inf_arg = a.scalar_tensors[3]
    adafactor_floor_kernel[(len(a.params),)](
        a.launch.table, plan.dims, floors, found_inf_arg, WIDTH=a.launch.width,
        S_DTYPE=a.dtypes["S_DTYPE"], COMPUTE=a.dtypes["COMPUTE"],
        HAS_FOUND_INF=a.scalar_flags["HAS_FOUND_INF"],
        DTYPE_EPS=_dtype_eps(a), **common.LAUNCH_OPTIONS,
    )  # fmt: skip
    adafactor_apply_kernel[(a.launch.n_chunks,)](
        a.launch.table, a.launch.chunks, plan.dims, floors, sq_norms, *a.scalar_tensors,
        **_common(a), LR_MODE=a.scalar_flags["LR_MODE"], ALIGNED=a.launch.aligned,
    )  # fmt: skip


register_norm_passes("adafactor_", "adafactor_norms_", "adafactor_apply_", _TABLES, _norms, _apply)
