"""The traversal the kernels share, written once: for the step kernels the program's tensor,
chunk and lr (``locate_step``), the arguments every block function takes first (param, grad,
master, grad_scale, clip_coef) and the loop over a chunk's blocks; for the mixed-dtype
kernels (scale_, grad_norm) the choice of a row's dtype.

An op's Triton kernel is then its block function (the per-element update of BLOCK elements,
``_<op>_block``), its prologue (the per-tensor scalars from its table row) and one call to
:func:`for_each_block`. The block function is a ``tl.constexpr`` argument of the driver
(jit functions pass as constexprs): Triton inlines it, so the compiled kernel is the one a
hand-written loop gives (the same SASS properties: tests/test_triton_static.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    BLOCK,
    full_blocks_end,
    learning_rate,
    load_grad,
    load_param,
    load_scalar,
    locate_chunk,
    slot,
    store_param,
    tail_block,
)

#: The param and grad slots of every step op's table (the spec lists them first).
PARAMS: tl.constexpr = tl.constexpr(0)
GRADS: tl.constexpr = tl.constexpr(1)


@triton.jit
def locate_step(
    table, chunks, lr_tensor, WIDTH: tl.constexpr, N_SLOTS: tl.constexpr,
    LR_MODE: tl.constexpr,
):  # fmt: skip
    """What a step program finds first: its tensor ``t``, the tensor's table row, the element
    range [start, end) of its chunk (``common.locate_chunk``) and the tensor's lr
    (``common.learning_rate``: float64 or fp32 by LR_MODE; the caller rounds it per
    [note: hyperparameter rounding])."""
    t, row, start, end = locate_chunk(chunks, table, WIDTH)
    return t, row, start, end, learning_rate(row, lr_tensor, t, N_SLOTS, LR_MODE)


@triton.jit
def param_args(
    row, grad_scale, clip_coef, MASTER_PARAMS: tl.constexpr, P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """What every step block takes first: the param, grad and master pointers of a table
    row, then grad_scale and clip_coef in the compute dtype (1 when absent)."""
    return (
        slot(row, PARAMS, P_DTYPE, ALIGNED), slot(row, GRADS, G_DTYPE, ALIGNED),
        slot(row, MASTER_PARAMS, tl.float32, ALIGNED),
        load_scalar(grad_scale, HAS_GRAD_SCALE, COMPUTE), load_scalar(clip_coef, HAS_CLIP, COMPUTE),
    )  # fmt: skip


@triton.jit
def fold_blocks(BLOCK_FN: tl.constexpr, start, end, carry, args):
    """``carry = BLOCK_FN(offs, mask, carry, *args)`` over the elements [start, end) of one
    tensor, in order: the whole BLOCKs unmasked (``mask`` None, a compile-time branch in
    ``load``), then the partial last block masked (``tail_block``); returns ``carry``. The
    carry is what a block hands the next: sums for a reduction (LAMB's norms pass), a
    placeholder for an elementwise step (:func:`for_each_block`)."""
    full_end = full_blocks_end(start, end)
    for base in range(start, full_end, BLOCK):
        carry = BLOCK_FN(base + tl.arange(0, BLOCK), None, carry, *args)
    if full_end < end:
        offs, mask = tail_block(full_end, end)
        carry = BLOCK_FN(offs, mask, carry, *args)
    return carry


@triton.jit
def _step_block(
    offs, mask, carry, BLOCK_FN: tl.constexpr, common, args, flags, COMPUTE: tl.constexpr,
    MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """Load the grad (unscaled, clipped, negated for MAXIMIZE) and the param (its master with
    MASTER), let ``BLOCK_FN(offs, mask, g, p, *args, *flags)`` update the op's states and
    return the new param, store it (and its master)."""
    p_ptr, g_ptr, master_ptr, grad_scale, clip_coef = common
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  MAXIMIZE)  # fmt: skip
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    p = BLOCK_FN(offs, mask, g, p, *args, *flags)
    store_param(p_ptr, master_ptr, offs, mask, p, MASTER)
    return carry


@triton.jit
def for_each_block(
    BLOCK_FN: tl.constexpr, start, end, common, args, flags, COMPUTE: tl.constexpr,
    MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """The elementwise step of the elements [start, end) of one tensor (``common`` from
    ``param_args``): :func:`fold_blocks` over ``_step_block``, which loads g and p, calls
    ``BLOCK_FN`` and stores p."""
    nothing = tl.zeros((), tl.int32)  # an elementwise step hands nothing on (folded away)
    fold_blocks(_step_block, start, end, nothing, (BLOCK_FN, common, args, flags, COMPUTE,
                MASTER, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE))  # fmt: skip


@triton.jit
def _if_code(
    RANGE_FN: tl.constexpr, code, CODE: tl.constexpr, HAS: tl.constexpr, DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, args, result,
):  # fmt: skip
    # Nested ifs: the outer one is resolved at compile time (constexpr), the inner at run time.
    if HAS:  # noqa: SIM102
        if code == CODE:
            result = RANGE_FN(DTYPE, COMPUTE, *args)
    return result


@triton.jit
def by_dtype(
    RANGE_FN: tl.constexpr, code, args, result, HAS_F32: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr, HAS_F64: tl.constexpr,
):  # fmt: skip
    """``RANGE_FN(DTYPE, COMPUTE, *args)`` for the storage dtype that a mixed-dtype row's
    ``code`` names (``multi_tensor.dtype_code_arguments``), compiled only for the dtypes the
    launch has (HAS_*); its result, ``result`` if none ran."""
    result = _if_code(RANGE_FN, code, 0.0, HAS_F32, tl.float32, tl.float32, args, result)
    result = _if_code(RANGE_FN, code, 1.0, HAS_BF16, tl.bfloat16, tl.float32, args, result)
    result = _if_code(RANGE_FN, code, 2.0, HAS_F16, tl.float16, tl.float32, args, result)
    return _if_code(RANGE_FN, code, 3.0, HAS_F64, tl.float64, tl.float64, args, result)
