"""``grad_norm``: global L2 / inf norm of a tensor list (each divided by grad_scale first),
per-tensor norms and a non-finite flag; fp32 accumulation (fp64 if every tensor is fp64).

Bytes per element: one read of the tensor (its storage size); nothing is written per
element. Three launches, whatever the tensor count:

1. ``chunk_partials_kernel`` (one program per chunk): the chunk's sum of squares (or max of
   absolute values) and its count of non-finite elements.
2. ``tensor_norms_kernel`` (one program per tensor): folds the tensor's chunk partials in
   chunk order into its norm.
3. ``total_norm_kernel`` (one program): folds the per-tensor values in tensor order into the
   total norm and found_inf.

Deterministic: every reduction has a fixed shape and order (``tl.sum``/``tl.max`` over a
fixed BLOCK, loops in index order), and there are no float atomics, so the same inputs give
the same bits on every run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import (
    BLOCK,
    DTYPE_CODE,
    MIXED_N_SLOTS,
    TENSORS,
    column,
    div,
    full_blocks_end,
    load,
    locate_chunk,
    maximum,
    nonfinite,
    slot,
    sqrt,
    tail_block,
)
from .drivers import by_dtype
from .multi_tensor import TableCache, dtype_code_arguments
from .registry import register

#: Partials folded per iteration by the reduction kernels.
FOLD_BLOCK = tl.constexpr(256)


@triton.jit
def _accumulate(acc, bad, x, grad_scale, INF_NORM: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    bad += nonfinite(x)
    if HAS_GRAD_SCALE:
        x = div(x, grad_scale)
    if INF_NORM:
        acc = maximum(acc, tl.abs(x))
    else:
        acc += x * x
    return acc, bad


@triton.jit
def _reduce(acc, INF_NORM: tl.constexpr):
    """The sum of a block, or for the inf norm its max with NaN propagated as the reference's
    norm(inf) does (tl.max drops NaN)."""
    if INF_NORM:
        total = tl.max(acc, axis=0)
        total = tl.where(tl.max((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), total)
    else:
        total = tl.sum(acc, axis=0)
    return total


@triton.jit
def _norm_range(
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, row, start, end, grad_scale, ACC: tl.constexpr,
    INF_NORM: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """The partial norm of [start, end) and its count of non-finite elements, accumulated in
    ACC whatever the storage DTYPE (``by_dtype``'s COMPUTE is not used)."""
    ptr = slot(row, TENSORS, DTYPE, ALIGNED)
    acc = tl.zeros((BLOCK,), ACC)
    bad = tl.zeros((BLOCK,), tl.int32)
    full_end = full_blocks_end(start, end)
    for base in range(start, full_end, BLOCK):
        x = load(ptr, base + tl.arange(0, BLOCK), None, ACC)
        acc, bad = _accumulate(acc, bad, x, grad_scale, INF_NORM, HAS_GRAD_SCALE)
    if full_end < end:
        offs, mask = tail_block(full_end, end)
        x = load(ptr, offs, mask, ACC)  # masked lanes read 0: neutral for both norms
        acc, bad = _accumulate(acc, bad, x, grad_scale, INF_NORM, HAS_GRAD_SCALE)
    return _reduce(acc, INF_NORM), tl.sum(bad, axis=0)


@triton.jit
def chunk_partials_kernel(
    table, chunks, partials, bad_counts, grad_scale, WIDTH: tl.constexpr, ACC: tl.constexpr,
    INF_NORM: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_F32: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr, HAS_F64: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """Per chunk: sum of squares (or max |x|) of x / grad_scale, and non-finite count."""
    _, row, start, end = locate_chunk(chunks, table, WIDTH)
    code = column(row, MIXED_N_SLOTS, DTYPE_CODE)
    scale = tl.load(grad_scale).to(ACC) if HAS_GRAD_SCALE else tl.full((), 1.0, ACC)
    partial = tl.full((), 0.0, ACC)
    bad = tl.full((), 0, tl.int32)
    # The arguments are written in the call: a tuple variable that holds a dtype does not
    # compile (Triton 3.8: "'dtype' object has no attribute 'type'"), and its other
    # constexprs would reach _norm_range as run-time values.
    partial, bad = by_dtype(_norm_range, code,
                            (row, start, end, scale, ACC, INF_NORM, HAS_GRAD_SCALE, ALIGNED),
                            (partial, bad), HAS_F32, HAS_BF16, HAS_F16, HAS_F64)  # fmt: skip
    pid = tl.program_id(0)
    tl.store(partials + pid, partial)
    tl.store(bad_counts + pid, bad)


@triton.jit
def fold(values, counts, first, n, INF_NORM: tl.constexpr, ACC: tl.constexpr):
    """Fold values[first:first+n] (and their counts) in index order: sum, or NaN-propagating
    max for the inf norm."""
    acc = tl.zeros((FOLD_BLOCK,), ACC)
    bad = tl.zeros((FOLD_BLOCK,), tl.int32)
    for base in range(0, n, FOLD_BLOCK):
        offs = base + tl.arange(0, FOLD_BLOCK)
        mask = offs < n
        x = tl.load(values + first + offs, mask=mask, other=0.0)
        bad += tl.load(counts + first + offs, mask=mask, other=0)
        acc = maximum(acc, x) if INF_NORM else acc + x
    return _reduce(acc, INF_NORM), tl.sum(bad, axis=0)


@triton.jit
def tensor_norms_kernel(
    table, partials, bad_counts, tensor_values, tensor_bad, norms, WIDTH: tl.constexpr,
    INF_NORM: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per tensor: fold its chunks' partials; write its squared (or inf) norm and its norm."""
    t = tl.program_id(0)
    row = table + t.to(tl.int64) * WIDTH
    first = tl.load(row + 1)
    n = tl.load(row + 2)
    value, bad = fold(partials, bad_counts, first, n, INF_NORM, ACC)
    tl.store(tensor_values + t, value)
    tl.store(tensor_bad + t, bad)
    tl.store(norms + t, value if INF_NORM else sqrt(value))


@triton.jit
def total_norm_kernel(
    tensor_values, tensor_bad, n_tensors, total, found_inf, INF_NORM: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """One program: the total norm and found_inf from the per-tensor values."""
    value, bad = fold(tensor_values, tensor_bad, 0, n_tensors, INF_NORM, ACC)
    tl.store(total, value if INF_NORM else sqrt(value))
    tl.store(found_inf, tl.where(bad > 0, 1.0, 0.0))


_TABLES = TableCache()


def grad_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool, grad_scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(total norm, per-tensor norms or [0], found_inf) of ``tensors / grad_scale``."""
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"grad_norm supports norm_type 2.0 and inf, got {norm_type}")
    inf_norm = norm_type == math.inf
    if not tensors:
        device = grad_scale.device if grad_scale is not None else torch.device("cpu")
        zero = torch.zeros((), device=device)
        return zero, torch.zeros((0,), device=device), zero.clone()
    device = tensors[0].device
    all_fp64 = all(t.dtype == torch.float64 for t in tensors)
    acc = torch.float64 if all_fp64 else torch.float32
    acc_tl = tl.float64 if all_fp64 else tl.float32
    codes, flags = dtype_code_arguments(tensors)
    launch = _TABLES.launch([tensors], [codes], extra_key=tuple(flags.values()))
    n = len(tensors)
    partials = torch.empty(launch.n_chunks, dtype=acc, device=device)
    bad_counts = torch.empty(launch.n_chunks, dtype=torch.int32, device=device)
    tensor_values = torch.empty(n, dtype=acc, device=device)
    tensor_bad = torch.empty(n, dtype=torch.int32, device=device)
    norms = torch.empty(n, dtype=acc, device=device)
    total = torch.empty((), dtype=acc, device=device)
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    chunk_partials_kernel[(launch.n_chunks,)](
        launch.table, launch.chunks, partials, bad_counts,
        grad_scale if grad_scale is not None else partials, WIDTH=launch.width, ACC=acc_tl,
        INF_NORM=inf_norm, HAS_GRAD_SCALE=grad_scale is not None, **flags,
        ALIGNED=launch.aligned, **common.LAUNCH_OPTIONS,
    )  # fmt: skip
    tensor_norms_kernel[(n,)](
        launch.table, partials, bad_counts, tensor_values, tensor_bad, norms,
        WIDTH=launch.width, INF_NORM=inf_norm, ACC=acc_tl, **common.LAUNCH_OPTIONS,
    )  # fmt: skip
    total_norm_kernel[(1,)](
        tensor_values, tensor_bad, n, total, found_inf, INF_NORM=inf_norm, ACC=acc_tl,
        **common.LAUNCH_OPTIONS,
    )  # fmt: skip
    return total, norms if per_tensor else norms.new_zeros((0,)), found_inf


register("grad_norm", grad_norm)
