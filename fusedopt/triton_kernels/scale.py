"""``scale_``: tensors *= scale, in place, with a non-finite check (one launch, any dtypes).

Bytes per element: reads the element and writes it back (2 x the storage size).

The tensors of one call may mix dtypes (the functional layer does not split ``scale_``), so
the table carries a dtype code per tensor and the kernel branches on it per program; only the
branches for dtypes present in the call are compiled (``HAS_*`` constexprs).
"""

from __future__ import annotations

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
    full_blocks_end,
    load,
    locate_chunk,
    nonfinite,
    slot,
    store,
    tail_block,
)
from .drivers import by_dtype
from .multi_tensor import TableCache, dtype_code_arguments
from .registry import register


@triton.jit
def _scale_block(ptr, offs, mask, scale_ptr, found_inf, COMPUTE: tl.constexpr, CHECK: tl.constexpr):
    x = load(ptr, offs, mask, COMPUTE)
    if CHECK:
        tl.store(found_inf, 1.0, mask=tl.max(nonfinite(x), axis=0) > 0)
    store(ptr, offs, mask, x * tl.load(scale_ptr).to(COMPUTE))


@triton.jit
def _scale_range(
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, row, start, end, scale_ptr, found_inf,
    CHECK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    ptr = slot(row, TENSORS, DTYPE, ALIGNED)
    full_end = full_blocks_end(start, end)
    for base in range(start, full_end, BLOCK):
        _scale_block(ptr, base + tl.arange(0, BLOCK), None, scale_ptr, found_inf, COMPUTE, CHECK)
    if full_end < end:
        offs, mask = tail_block(full_end, end)
        _scale_block(ptr, offs, mask, scale_ptr, found_inf, COMPUTE, CHECK)
    return ()  # by_dtype's result: none


@triton.jit
def scale_kernel(
    table, chunks, scale_ptr, found_inf, WIDTH: tl.constexpr, CHECK: tl.constexpr,
    HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
    HAS_F64: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    _, row, start, end = locate_chunk(chunks, table, WIDTH)
    code = column(row, MIXED_N_SLOTS, DTYPE_CODE)
    # The arguments are written in the call: in a tuple variable the constexprs (CHECK,
    # ALIGNED) would reach _scale_range as run-time values (Triton 3.8).
    by_dtype(_scale_range, code, (row, start, end, scale_ptr, found_inf, CHECK, ALIGNED), (),
             HAS_F32, HAS_BF16, HAS_F16, HAS_F64)  # fmt: skip


_TABLES = TableCache()


def scale_(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None) -> None:
    """``t *= scale`` for every tensor (fp32 math, fp64 for fp64), one launch; sets
    ``found_inf`` to 1.0 if any input element is non-finite (never clears it)."""
    if not tensors:
        return
    codes, flags = dtype_code_arguments(tensors)
    launch = _TABLES.launch([tensors], [codes], extra_key=tuple(flags.values()))
    scale_kernel[(launch.n_chunks,)](
        launch.table, launch.chunks, scale, found_inf if found_inf is not None else scale,
        WIDTH=launch.width, CHECK=found_inf is not None, **flags, ALIGNED=launch.aligned,
        **common.LAUNCH_OPTIONS,
    )  # fmt: skip


register("scale_", scale_)
