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
    row, start, end, scale_ptr, found_inf, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
    CHECK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    ptr = slot(row, TENSORS, DTYPE, ALIGNED)
    full_end = full_blocks_end(start, end)
    for base in range(start, full_end, BLOCK):
        _scale_block(ptr, base + tl.arange(0, BLOCK), None, scale_ptr, found_inf, COMPUTE, CHECK)
    if full_end < end:
        offs, mask = tail_block(full_end, end)
        _scale_block(ptr, offs, mask, scale_ptr, found_inf, COMPUTE, CHECK)


@triton.jit
def scale_kernel(
    table, chunks, scale_ptr, found_inf, WIDTH: tl.constexpr, CHECK: tl.constexpr,
    HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
    HAS_F64: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    _, row, start, end = locate_chunk(chunks, table, WIDTH)
    code = column(row, MIXED_N_SLOTS, DTYPE_CODE)
    # Nested ifs: the outer one is resolved at compile time (constexpr), the inner at run time.
    if HAS_F32:  # noqa: SIM102
        if code == 0.0:
            _scale_range(row, start, end, scale_ptr, found_inf, tl.float32, tl.float32, CHECK,
                         ALIGNED)  # fmt: skip
    if HAS_BF16:  # noqa: SIM102
        if code == 1.0:
            _scale_range(row, start, end, scale_ptr, found_inf, tl.bfloat16, tl.float32, CHECK,
                         ALIGNED)  # fmt: skip
    if HAS_F16:  # noqa: SIM102
        if code == 2.0:
            _scale_range(row, start, end, scale_ptr, found_inf, tl.float16, tl.float32, CHECK,
                         ALIGNED)  # fmt: skip
    if HAS_F64:  # noqa: SIM102
        if code == 3.0:
            _scale_range(row, start, end, scale_ptr, found_inf, tl.float64, tl.float64, CHECK,
                         ALIGNED)  # fmt: skip


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
