"""``adafactor_``: Adafactor with torch.optim.Adafactor's semantics (DESIGN.md §3), and its
passes as ops, ``adafactor_norms_`` and ``adafactor_apply_`` ([note: adafactor passes] in
csrc/include/fusedopt/math/adafactor.h; [note: factored layouts] in fusedopt/_contract.py).

Launches, whatever the tensor count:

1. ``adafactor_norms_kernel``, one program per tensor: advances its step, sums p², folds the
   row and column sums of g² of a factored tensor into its row and column factors (or g²
   into a vector's variance), then sums u² from the factors as stored: ``sq_norms[t]``. A
   program owns its whole tensor, so every sum has one fixed order (tiles of the tensor in
   row-major order, lanes folded by ``tl.sum``) and no partials or atomics are needed.
2. ``adafactor_floor_kernel``, one program per tensor: the floored mean of each batch's row
   factor, into a scratch vector (the same function as launch 1 uses, so the same bits).
3. ``adafactor_apply_kernel``, one program per chunk: ``p = p*(1 - lr*wd) - (alpha/clip)*u``
   with ``alpha`` and ``clip`` from ``sq_norms`` (float64) and u recomputed as launch 1 did.

Launches 1 and 2 are ``adafactor_norms_`` and the start of ``adafactor_apply_``. Bytes per
element, fp32 (G grad, P param read, W param written; factors ~0): launch 1 reads g, p and g
again for a factored tensor (12 B; a vector reads and writes its variance: 16 B), launch 3
reads g, p, writes p (12 B): 24 B (vector 28 B), as math/adafactor.h counts.

Known cost, not measured on a GPU: launch 1 gives a tensor one program, so a large matrix is
reduced by one program (one SM) while the others idle; the chunked alternative needs
per-chunk row and column partials and a fold per factor (the CUDA design to come).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    BLOCK,
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
#: Tiles of a factored tensor: ROWS x COLS elements. sm_90 build of the norms kernel (fp32):
#: 16 x 64 spilled 20 values, 8 x 64 15 (a 24-byte stack), 8 x 32 9 (stack 24 still; bf16 16):
#: the stack comes from the calls (IEEE division, fp64 exp/log) with the loop state live, not
#: from the tiles; KNOWN_SPILLS in tests/test_triton_static.py.
ROWS: tl.constexpr = tl.constexpr(8)
COLS: tl.constexpr = tl.constexpr(64)


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
def adafactor_norms_kernel(
    table, dims, sq_norms, grad_scale, clip_coef, found_inf, WIDTH: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
    DTYPE_EPS: tl.constexpr,
):  # fmt: skip
    """Launch 1, per tensor: the step, the second moments and sq_norms[t] (see the module)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t = tl.program_id(0)
        row = table + t.to(tl.int64) * WIDTH
        numel = tl.load(row)
        step_ptr = slot(row, L.STEPS, tl.float32, False)
        new_step = tl.load(step_ptr) + 1.0
        tl.store(step_ptr, new_step)  # this program alone reads the count
        weight = tl.exp(hyper(row, L.N_SLOTS, L.BETA2_DECAY) * tl.log(new_step.to(tl.float64)))
        weight = weight.to(COMPUTE)
        eps1_64 = _eps1(row, DTYPE_EPS)
        eps1, eps1_sq = eps1_64.to(COMPUTE), (eps1_64 * eps1_64).to(COMPUTE)
        p_ptr = slot(row, L.PARAMS, P_DTYPE, False)
        g_ptr = slot(row, L.GRADS, G_DTYPE, False)
        master_ptr = slot(row, L.MASTER_PARAMS, tl.float32, False)
        gs = load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE)
        cc = load_scalar(clip_coef, HAS_CLIP, COMPUTE)
        rows = tl.load(dims + 3 * t)
        cols = tl.load(dims + 3 * t + 1)
        p_acc = tl.zeros((BLOCK,), COMPUTE)
        u_acc = tl.zeros((BLOCK,), COMPUTE)
        for base in range(0, numel, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < numel
            p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
            p_acc += p * p
            if rows == 0:  # a vector or scalar: its variance, and u, in this pass
                v_ptr = slot(row, L.VARIANCES, S_DTYPE, False)
                g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                              MAXIMIZE)  # fmt: skip
                v = _lerp(load(v_ptr, offs, mask, COMPUTE), g * g, weight)
                store(v_ptr, offs, mask, v)
                v = round_to(v, S_DTYPE).to(COMPUTE)  # as stored
                u = tl.where(mask, _update(g, v, eps1_sq), 0.0)
                u_acc += u * u
        u_sum = tl.sum(u_acc, axis=0)
        p_sum = tl.sum(p_acc, axis=0)  # folded here: its lanes would stay live (spills)
        if rows > 0:
            r_ptr = slot(row, L.ROW_VARS, S_DTYPE, False)
            c_ptr = slot(row, L.COL_VARS, S_DTYPE, False)
            matrix = rows * cols
            batches = numel // matrix
            total_rows = batches * rows
            # row factors: tiles of ROWS whole rows, in column order
            for r0 in range(0, total_rows, ROWS):
                r = r0 + tl.arange(0, ROWS)
                acc = tl.zeros((ROWS, COLS), COMPUTE)
                for c0 in range(0, cols, COLS):
                    c = c0 + tl.arange(0, COLS)
                    offs = r[:, None].to(tl.int64) * cols + c[None, :]
                    mask = (r[:, None] < total_rows) & (c[None, :] < cols)
                    g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE,
                                  HAS_CLIP, MAXIMIZE)  # fmt: skip
                    acc += g * g
                mean = div(tl.sum(acc, axis=1), cols.to(COMPUTE))
                old = load(r_ptr, r, r < total_rows, COMPUTE)
                store(r_ptr, r, r < total_rows, _lerp(old, mean, weight))
            # column factors: per batch, tiles of COLS columns, in row order
            for b in range(0, batches):
                for c0 in range(0, cols, COLS):
                    c = c0 + tl.arange(0, COLS)
                    acc = tl.zeros((ROWS, COLS), COMPUTE)
                    for r0 in range(0, rows, ROWS):
                        r = r0 + tl.arange(0, ROWS)
                        offs = b * matrix + r[:, None].to(tl.int64) * cols + c[None, :]
                        mask = (r[:, None] < rows) & (c[None, :] < cols)
                        g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE,
                                      HAS_CLIP, MAXIMIZE)  # fmt: skip
                        acc += g * g
                    mean = div(tl.sum(acc, axis=0), rows.to(COMPUTE))
                    old = load(c_ptr, b * cols + c, c < cols, COMPUTE)
                    store(c_ptr, b * cols + c, c < cols, _lerp(old, mean, weight))
            tl.debug_barrier()  # the factors as stored, by every thread of the program
            u_tile = tl.zeros((ROWS, COLS), COMPUTE)
            for b in range(0, batches):
                floor = _row_floor(r_ptr, b, rows, eps1, COMPUTE)
                for r0 in range(0, rows, ROWS):
                    r = r0 + tl.arange(0, ROWS)
                    rv = load(r_ptr, b * rows + r, r < rows, COMPUTE)
                    for c0 in range(0, cols, COLS):
                        c = c0 + tl.arange(0, COLS)
                        cv = load(c_ptr, b * cols + c, c < cols, COMPUTE)
                        offs = b * matrix + r[:, None].to(tl.int64) * cols + c[None, :]
                        mask = (r[:, None] < rows) & (c[None, :] < cols)
                        g = load_grad(g_ptr, offs, mask, gs, cc, COMPUTE, HAS_GRAD_SCALE,
                                      HAS_CLIP, MAXIMIZE)  # fmt: skip
                        v = div(rv[:, None] * cv[None, :], floor)
                        u = tl.where(mask, _update(g, v, eps1_sq), 0.0)
                        u_tile += u * u
            u_sum = tl.sum(tl.sum(u_tile, axis=1), axis=0)
        tl.store(sq_norms + 2 * t, p_sum)
        tl.store(sq_norms + 2 * t + 1, u_sum)


@triton.jit
def adafactor_floor_kernel(
    table, dims, floors, found_inf, WIDTH: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, DTYPE_EPS: tl.constexpr,
):  # fmt: skip
    """Launch 2, per tensor: floors[dims[t, 2] + b] = max(mean of batch b's row factor, eps1)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t = tl.program_id(0)
        row = table + t.to(tl.int64) * WIDTH
        rows = tl.load(dims + 3 * t)
        if rows > 0:
            cols = tl.load(dims + 3 * t + 1)
            first = tl.load(dims + 3 * t + 2)
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
        rows = tl.load(dims + 3 * t)
        cols = tl.load(dims + 3 * t + 1)
        args = (
            rows, cols, floors + tl.load(dims + 3 * t + 2),
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
#: (rows, cols, first floor) per tensor, and the floor count, by the call's shapes.
_DIMS: dict[tuple, tuple[torch.Tensor, int]] = {}


def _dims(params) -> tuple[torch.Tensor, int]:
    """int64 [N, 3]: each tensor's (rows, cols) (0, 0 when not factored) and the offset of
    its first batch's floor in the scratch vector; and the vector's length."""
    key = (params[0].device, tuple(tuple(p.shape) for p in params))
    cached = _DIMS.get(key)
    if cached is None:
        values, first = [], 0
        for p in params:
            if p.dim() >= 2:
                rows, cols = p.shape[-2], p.shape[-1]
                values.append((rows, cols, first))
                first += p.numel() // (rows * cols) if rows * cols else 0
            else:
                values.append((0, 0, first))
        dims = torch.tensor(values, dtype=torch.int64).to(params[0].device)
        cached = _DIMS[key] = (dims, max(first, 1))
        if len(_DIMS) > 64:
            _DIMS.pop(next(iter(_DIMS)))
    return cached


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
    dims, _ = _dims(a.params)
    _, grad_scale_arg, clip_coef_arg, found_inf_arg, _ = a.scalar_tensors
    adafactor_norms_kernel[(len(a.params),)](
        a.launch.table, dims, sq_norms, grad_scale_arg, clip_coef_arg, found_inf_arg,
        **_common(a),
    )  # fmt: skip


def _apply(a, sq_norms: torch.Tensor) -> None:
    _check_row_major(a)
    dims, n_floors = _dims(a.params)
    compute = sq_norms.dtype
    floors = torch.empty(n_floors, dtype=compute, device=sq_norms.device)
    found_inf_arg = a.scalar_tensors[3]
    adafactor_floor_kernel[(len(a.params),)](
        a.launch.table, dims, floors, found_inf_arg, WIDTH=a.launch.width,
        S_DTYPE=a.dtypes["S_DTYPE"], COMPUTE=a.dtypes["COMPUTE"],
        HAS_FOUND_INF=a.scalar_flags["HAS_FOUND_INF"],
        DTYPE_EPS=_dtype_eps(a), **common.LAUNCH_OPTIONS,
    )  # fmt: skip
    adafactor_apply_kernel[(a.launch.n_chunks,)](
        a.launch.table, a.launch.chunks, dims, floors, sq_norms, *a.scalar_tensors,
        **_common(a), LR_MODE=a.scalar_flags["LR_MODE"], ALIGNED=a.launch.aligned,
    )  # fmt: skip


register_norm_passes("adafactor_", "adafactor_norms_", "adafactor_apply_", _TABLES, _norms, _apply)
