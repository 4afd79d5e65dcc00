"""8-bit states in Triton: the block-wise quantizer of ``fusedopt/quant8.py`` and the step
kernel that walks quantization blocks ([note: 8-bit states] there has the format).

A program still takes one 2^16-element chunk of a tensor (the shared chunk table), but walks
it by quantization blocks, not by BLOCK-element runs: it owns the blocks whose *first*
element lies in its chunk (a block that starts near the chunk's end runs on into the next
chunk, whose program skips it), so every block has one owner and its absmax is one
``tl.max`` over QBLOCK = 256 lanes. A block is a run of up to 256 elements of one row (the
param's last dim, ``row_lengths[t]``), so lanes past the row's end are masked. An iteration
takes TILE blocks at once ([note: q8 tiles]).

Per element: the op's bytes with 1-byte moments, plus 4 B per block for each scale read and
written (AdamW, fp32 params: 4 + 4 + 1 + 1 read, 4 + 1 + 1 written = 16 B + 16/256).

[note: q8 tiles] An iteration is a [TILE, QBLOCK] tile of TILE = 4 consecutive blocks: 8
elements per thread at 4 warps, as the other step kernels' BLOCK of 1024 (two 128-bit
accesses per fp32 stream, one per 16-bit stream, 8 bytes per code stream); a block's absmax
is a max along the tile's rows. Two walks (:func:`fold_q8_blocks`):

* **Whole blocks** (the vector path): in a tensor whose row length is a multiple of 256
  every block is whole and block b is the elements [256 b, 256 b + 256) of the tensor, so
  the offsets ``b * 256 + lane`` need no mask and are multiples of 256: with 16-byte aligned
  pointers (the ALIGNED constexpr of every step kernel: every address of the call) Triton
  emits 128-bit accesses for p, g and the master, 64-bit ones for the codes. The tile's
  rows are all in the chunk, up to the last whole tile; its remaining blocks (fewer than
  TILE, the tensor's last chunk only) take the general walk.
* **General**: each row of the tile finds its block's row and start, lanes past the row's
  end and rows past the chunk's last block are masked (``valid``: their scales are neither
  read nor written).

The choice is per tensor, at run time (``row_length % 256``, the same for every program of
the tensor), not a constexpr per call: one tensor with short rows (a conv kernel's last dim
of 3, a 1-D param of 50257) would otherwise send every tensor of the call down the masked
path. The price is the block function compiled twice (compile time and code size; registers
and spills: tests/test_triton_static.py).

[note: q8 code formulas] The kernels read no code table: a code's magnitude and the midpoint
above it are computed from k, as an exact integer numerator (k^2, 2k^2 + 2k + 1, k^4,
k^4 + (k + 1)^4: below 2^53) in fp64 times the fp64 reciprocal of the denominator (127^2,
2 * 127^2, 255^4, 2 * 255^4), rounded once to fp32. Each equals the reference's fp32 table
entry for every k (tests/test_triton_quant8.py; the fp32 products k^2 * fp32(1 / 127^2) miss
22 of the 128 signed codes, whence fp64). Why: a table is a gather per element from global
memory, 4 bytes each through L1, which an LDG of the main loop cannot tell from the streams
(the H200 model, bench/h200_model.py, counts it as DRAM traffic), and which held the 64-bit
addresses of 8 elements per state in registers; a formula is 3 to 5 instructions (integer
products, two conversions, one fp64 product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt import quant8

from .common import (
    div,
    finish_tensor,
    learning_rate,
    load_grad,
    load_param,
    locate_chunk,
    skipped,
    slot,
    store_param,
)
from .drivers import StepOp, param_args
from .layout import StepArguments

QBLOCK: tl.constexpr = tl.constexpr(quant8.BLOCK)
#: Quantization blocks per iteration ([note: q8 tiles]).
TILE: tl.constexpr = tl.constexpr(4)
LEVELS_SIGNED: tl.constexpr = tl.constexpr(quant8.LEVELS_SIGNED)
LEVELS_UNSIGNED: tl.constexpr = tl.constexpr(quant8.LEVELS_UNSIGNED)
#: The maps' powers: :func:`code_magnitude` inverts them with one or two square roots, the
#: code formulas ([note: q8 code formulas]) are theirs.
P_SIGNED: tl.constexpr = tl.constexpr(quant8.P_SIGNED)
P_UNSIGNED: tl.constexpr = tl.constexpr(quant8.P_UNSIGNED)
assert (quant8.P_SIGNED, quant8.P_UNSIGNED) == (2, 4), "the code formulas are for powers 2, 4"
#: The fp64 reciprocals of the code formulas' denominators: 127^2, 2 * 127^2, 255^4, 2 * 255^4.
SIGNED_CODE_SCALE: tl.constexpr = tl.constexpr(1.0 / quant8.LEVELS_SIGNED**2)
SIGNED_MID_SCALE: tl.constexpr = tl.constexpr(1.0 / (2 * quant8.LEVELS_SIGNED**2))
UNSIGNED_CODE_SCALE: tl.constexpr = tl.constexpr(1.0 / quant8.LEVELS_UNSIGNED**4)
UNSIGNED_MID_SCALE: tl.constexpr = tl.constexpr(1.0 / (2 * quant8.LEVELS_UNSIGNED**4))
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _exactly_scaled(numerator, SCALE: tl.constexpr):
    """fp32(numerator * SCALE): an exact integer numerator (below 2^53) in fp64 times the fp64
    reciprocal SCALE, rounded once ([note: q8 code formulas])."""
    return (numerator.to(tl.float64) * SCALE).to(tl.float32)


@triton.jit
def code_value(k, SIGNED: tl.constexpr):
    """The fp32 magnitude of code k (int32 in [0, levels]): the reference's table entry
    (``quant8.code_table`` in fp32), as k^2 / 127^2 or k^4 / 255^4
    ([note: q8 code formulas])."""
    if SIGNED:
        return _exactly_scaled(k * k, SIGNED_CODE_SCALE)
    else:
        square = (k * k).to(tl.int64)
        return _exactly_scaled(square * square, UNSIGNED_CODE_SCALE)


@triton.jit
def midpoint(k, SIGNED: tl.constexpr):
    """The fp32 midpoint above code k (int32 in [0, levels - 1]): the reference's, as
    (k^2 + (k + 1)^2) / (2 * 127^2) = (2k^2 + 2k + 1) / (2 * 127^2), or (k^4 + (k + 1)^4) /
    (2 * 255^4) ([note: q8 code formulas])."""
    if SIGNED:
        return _exactly_scaled(2 * k * (k + 1) + 1, SIGNED_MID_SCALE)
    else:
        low = (k * k).to(tl.int64)
        high = ((k + 1) * (k + 1)).to(tl.int64)
        return _exactly_scaled(low * low + high * high, UNSIGNED_MID_SCALE)


@triton.jit
def load_scales(scales_ptr, blocks):
    """The scales of a tile's blocks ``blocks = (b, valid)``, [TILE, 1]; 0 where not valid
    (``valid`` None: every row is a block)."""
    b, valid = blocks
    if valid is None:  # a compile-time branch, as in common.load
        return tl.load(scales_ptr + b)
    else:
        return tl.load(scales_ptr + b, mask=valid, other=0.0)


@triton.jit
def dequantize(codes_ptr, scales_ptr, blocks, offs, mask, SIGNED: tl.constexpr):
    """The fp32 values of a tile's codes: ``code[|q|] * scale``, negated for q < 0 (an int8
    code -128, never written, reads 0 past the 127 levels, as on the CPU)."""
    if mask is None:  # noqa: SIM108
        q = tl.load(codes_ptr + offs)
    else:
        q = tl.load(codes_ptr + offs, mask=mask, other=0)
    q = q.to(tl.int32)
    scale = load_scales(scales_ptr, blocks)
    if SIGNED:
        # code_value(|q|) from q * q, whatever the sign; & 0x3FFF keeps 0..127^2 and takes
        # -128's 2^14 to 0 (code 0 past the 127 levels, as on the CPU); the sign goes on as
        # the sign bit, which is IEEE negation. Instead of |q|, a select for -128 and one for
        # the sign: lamb_norms_q8_fp32's whole-block loop (sm_90, 8 elements per thread) went
        # from 724 to 690 instructions on its shortest path (the H200 model, block scales
        # then counted as 4 B per thread: 83.8% -> 87.9%; 80.2% with them per block).
        value = _exactly_scaled((q * q) & 0x3FFF, SIGNED_CODE_SCALE) * scale
        sign = (q >> 31) << 31
        return (value.to(tl.int32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)
    else:
        return code_value(q, False) * scale


@triton.jit
def block_absmax(x, mask):
    """Each block's scale as the reference takes it, [TILE, 1]: the largest |x| (fp32) over
    the block's lanes (``mask``; None: all), the canonical NaN 0x7FC00000 if any is NaN. One
    integer max: the bits of |x| order as the values do, and every NaN above infinity."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        bits = tl.where(mask, bits, 0)
    top = tl.max(bits, axis=1, keep_dims=True)
    return tl.where(top > 0x7F800000, 0x7FC00000, top).to(tl.float32, bitcast=True)


@triton.jit
def code_magnitude(abs_y, SIGNED: tl.constexpr):
    """|q| of |y| in [0, 1] (the |x / scale| of a usable scale): the number of the map's
    midpoints strictly below it, from a guess that needs one midpoint, as the CPU's block
    quantizer finds it (csrc/cpu/q8_block.h): with r = |y|^(1/power) and k = floor(r *
    levels) clamped to levels - 1, the count is k or k + 1, so it is k + (mid[k] < |y|);
    above 1 (masked lanes) k is clamped and the count is levels. The binary search it
    replaces took 8 midpoints per element. (A NaN, only on a masked lane, gives some k;
    nothing is read with it.)

    [note: q8 guess] The roots are the hardware's approximate square root (``tl.sqrt``:
    sqrt.approx.f32, one MUFU.SQRT on sm_90, within a few ulps), not IEEE ones (``sqrt_rn``:
    about 10 instructions on the fast path, a call on the slow one). The guess needs no exact
    root: the midpoint between codes k and k + 1 lies in (k, k + 1) in units of r * levels,
    at least 0.159 from either end (the unsigned map's first, at 0.841; the signed map's
    nearest is 0.293 from an end), so k + (mid[k] < |y|) is the count for any r * levels
    within 0.159 of the true one: a relative error below 0.159 / 255 = 2^-10.7 of r, a
    thousand times what the approximate root (and the product with levels) err by.
    tests/test_triton_quant8.py checks the margin and the count with roots off by 2^-12
    either way; the interpreter takes exact roots, with which csrc/tests/test_q8_block.cpp
    checks the guess on every fp32 |y| in [0, 1]. Measured (Triton 3.8, sm_90,
    adamw_q8_fp32's whole-block loop, 8 elements per thread): 1322 instructions on the
    shortest path with IEEE roots, 1102 with these (the model's 74% of copy bandwidth ->
    90%: bench/h200_model.py)."""
    if SIGNED:
        root = tl.sqrt(abs_y)
        k = tl.minimum(root * LEVELS_SIGNED, LEVELS_SIGNED - 1).to(tl.int32)
    else:
        root = tl.sqrt(tl.sqrt(abs_y))
        k = tl.minimum(root * LEVELS_UNSIGNED, LEVELS_UNSIGNED - 1).to(tl.int32)
    return k + (midpoint(k, SIGNED) < abs_y).to(tl.int32)


@triton.jit
def quantize(x, scale, SIGNED: tl.constexpr):
    """The codes (int32) of x in a block of ``scale``: |q| = the number of midpoints strictly
    below |x / scale| (:func:`code_magnitude`); 0 where the scale is 0 or not finite."""
    usable = (scale > 0.0) & (scale <= FLT_MAX)
    y = div(x, tl.where(usable, scale, 1.0))
    abs_y = tl.where(usable, tl.abs(y), 0.0)  # |q| = 0: mid[0] > 0
    q = code_magnitude(abs_y, SIGNED)
    if SIGNED:
        q = tl.where(y < 0.0, -q, q)
    return q


@triton.jit
def requantize(codes_ptr, scales_ptr, blocks, x, offs, mask, SIGNED: tl.constexpr):
    """Store x, rounded to fp32 as the reference quantizes it, as the new codes and absmaxes
    of a tile's blocks ``blocks = (b, valid)``."""
    b, valid = blocks
    x = x.to(tl.float32)
    scale = block_absmax(x, mask)
    q = quantize(x, scale, SIGNED)
    tl.store(codes_ptr + offs, q.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(scales_ptr + b, scale, mask=valid)


@triton.jit
def _first_block(offset, row_length, blocks_per_row):
    """The first block (index within the tensor) whose first element is at or after
    ``offset``; a block starts every QBLOCK elements from each row's start."""
    row = offset // row_length
    within = offset - row * row_length
    return row * blocks_per_row + (within + QBLOCK - 1) // QBLOCK


@triton.jit
def fold_q8_blocks(BLOCK_FN: tl.constexpr, start, end, row_length, carry, args,
                   ALIGNED: tl.constexpr):  # fmt: skip
    """``carry = BLOCK_FN(offs, mask, blocks, carry, *args)`` over the quantization blocks of
    one tensor (rows of ``row_length``) whose first element lies in [start, end), in order,
    TILE blocks at a time ([note: q8 tiles]): ``offs``/``mask`` are the tile's [TILE,
    QBLOCK] elements (``mask`` None: all), ``blocks = (b, valid)`` its blocks' indices
    within the tensor and which rows are blocks, [TILE, 1] (``valid`` None: all). Returns
    ``carry`` (sums for a reduction, LAMB's norms pass; a placeholder otherwise)."""
    row_length = tl.maximum(row_length, 1)
    per_row = (row_length + QBLOCK - 1) // QBLOCK
    first = _first_block(start, row_length, per_row)
    last = _first_block(end, row_length, per_row)
    lanes = tl.arange(0, QBLOCK)[None, :]
    rows = tl.arange(0, TILE)[:, None]
    # Nested ifs: the outer one is resolved at compile time, the inner at run time.
    if ALIGNED:  # noqa: SIM102
        if row_length % QBLOCK == 0:  # whole blocks: block b at b * QBLOCK, no mask
            whole_end = first + (last - first) // TILE * TILE
            for b0 in range(first, whole_end, TILE):
                b = b0 + rows
                carry = BLOCK_FN(b * QBLOCK + lanes, None, (b, None), carry, *args)
            first = whole_end
    for b0 in range(first, last, TILE):
        b = b0 + rows
        valid = b < last
        r = b // per_row
        begin = r * row_length + (b - r * per_row) * QBLOCK
        length = tl.minimum(begin + QBLOCK, (r + 1) * row_length) - begin
        mask = (lanes < length.to(tl.int32)) & valid
        carry = BLOCK_FN(begin + lanes, mask, (b, valid), carry, *args)
    return carry


@triton.jit
def _q8_step_block(
    offs, mask, blocks, carry, BLOCK_FN: tl.constexpr, common, args,
    COMPUTE: tl.constexpr, FLAGS: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """Load g and p of a tile (:func:`fold_q8_blocks`), ``p = BLOCK_FN(offs, mask, blocks, g,
    p, *args, COMPUTE, FLAGS)``, store p."""
    p_ptr, g_ptr, master_ptr, scale_g, clip = common
    g = load_grad(g_ptr, offs, mask, scale_g, clip, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  MAXIMIZE)  # fmt: skip
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    p = BLOCK_FN(offs, mask, blocks, g, p, *args, COMPUTE, FLAGS)
    store_param(p_ptr, master_ptr, offs, mask, p, MASTER)
    return carry


@triton.jit
def q8_step_kernel(
    table, chunks, counters, row_lengths, lr_tensor, grad_scale, clip_coef, found_inf,
    sr_key, PROLOGUE: tl.constexpr, BLOCK_FN: tl.constexpr, FLAGS: tl.constexpr,
    N_SLOTS: tl.constexpr, MASTER_SLOT: tl.constexpr, STEP_SLOT: tl.constexpr,
    WIDTH: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    LR_MODE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One program per chunk of a step op with 8-bit states: the quantization blocks that
    start in the chunk, a tile at a time (:func:`fold_q8_blocks`), each loaded (g, p), handed
    to ``BLOCK_FN(offs, mask, blocks, g, p, *args, COMPUTE, FLAGS)`` (which
    dequantizes, steps and requantizes the op's states and returns the new p) and stored; the
    tensor's last chunk advances its step count (when the prologue says ``advance``). The
    prologue's ``PROLOGUE(row, lr, COMPUTE, LR_MODE, ALIGNED, FLAGS) -> (args, new_step,
    advance)`` gives the code pointers 16-byte aligned with ALIGNED."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        common = param_args(row, t, grad_scale, clip_coef, sr_key, MASTER_SLOT, P_DTYPE,
                            G_DTYPE, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                            ALIGNED)  # fmt: skip
        lr = learning_rate(row, lr_tensor, t, N_SLOTS, LR_MODE)
        args, new_step, advance = PROLOGUE(row, lr, COMPUTE, LR_MODE, ALIGNED, FLAGS)
        nothing = tl.zeros((), tl.int32)
        fold_q8_blocks(_q8_step_block, start, end, tl.load(row_lengths + t), nothing,
                       (BLOCK_FN, common, args, COMPUTE, FLAGS, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                        MAXIMIZE), ALIGNED)  # fmt: skip
        if advance:
            finish_tensor(counters, t, row, slot(row, STEP_SLOT, tl.float32, False), new_step)


class RowLengths:
    """Each param's last dim (1 for a 0-d param), int64 on the params' device; cached by the
    shapes (the last call's only), so a step makes no host-to-device copy."""

    def __init__(self) -> None:
        self._cached: dict[tuple, torch.Tensor] = {}

    def __call__(self, params: list[torch.Tensor]) -> torch.Tensor:
        key = (params[0].device, tuple(tuple(p.shape) for p in params))
        lengths = self._cached.get(key)
        if lengths is None:
            values = [p.shape[-1] if p.dim() else 1 for p in params]
            lengths = torch.tensor(values, dtype=torch.int64, device=params[0].device)
            self._cached = {key: lengths}
        return lengths


class Q8Launcher:
    """Launches :func:`q8_step_kernel` for a step op's call with 8-bit states: the op's
    ``prologue(row, lr, COMPUTE, LR_MODE, ALIGNED, FLAGS) -> (args, new_step, advance)``
    and ``block_fn`` (see the kernel)."""

    def __init__(self, prologue: triton.JITFunction, block_fn: triton.JITFunction) -> None:
        self.prologue, self.block_fn = prologue, block_fn
        self.row_lengths = RowLengths()

    def __call__(self, op: StepOp, a: StepArguments, flags: dict[str, bool]) -> None:
        options = {k: v for k, v in a.options().items() if k not in a.flags and k != "S_DTYPE"}
        constexprs = op.constexprs(True, **flags)
        constexprs.pop("STEPS")
        constexprs |= {"PROLOGUE": self.prologue, "BLOCK_FN": self.block_fn}
        q8_step_kernel[(a.launch.n_chunks,)](
            a.launch.table, a.launch.chunks, a.launch.counters, self.row_lengths(a.params),
            *a.scalar_tensors, **constexprs, **options,
        )  # fmt: skip
