"""Device helpers shared by every Triton kernel: table access, loads and stores, the common
scalars. Written once; the op kernels differ only in their update math.

[note: interpreter upcast] Under ``TRITON_INTERPRET=1`` bf16 values are raw bits, so every
load is converted to the compute dtype at once (``load``) and nothing is computed in storage
dtypes.

[note: interpreter bf16 rounding] The interpreter converts fp32 to bf16 by truncation (its
``cast_impl`` passes no rounding mode), while the GPU and torch round to nearest even. Under
the interpreter ``store`` therefore rounds bf16 itself, with integer ops on the fp32 bits
(add 0x7FFF plus the lowest kept bit, keep the high half; NaN stays a quiet NaN); compiled
kernels use the hardware conversion (``cvt.rn.bf16.f32``).

[note: interpreter bf16 widening] The interpreter also widens bf16 to fp32 wrongly for
subnormals (torch 2.14.1, Triton 3.8: 9.18e-41 became 0, 1.01e-39 became 4.41e-39), so under
the interpreter ``widen`` (and ``load``) widens bf16 by its bits (``bits << 16``, exact);
compiled kernels use the hardware conversion, which is the same exact widening.

[note: hyperparameter rounding] The reference evaluates hyperparameter expressions such as
``1 - beta1`` or ``lr / bc1`` in Python float64 and rounds the result to fp32 when it meets a
tensor; a tensor lr instead makes them fp32 expressions. The kernels evaluate the same
expressions in the same precision (float64 scalars from the table, explicit ``.to(fp32)``),
so that they round as the reference does. Per-element math is fp32 (fp64 for fp64 params),
with floating-point contraction off (``enable_fp_fusion=False`` at launch) and IEEE division
and square root (``div_rn``, ``sqrt_rn``), again as the reference rounds.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from . import multi_tensor

# The table layout's constants, as constexprs (jit code reads only constexpr globals).
CHUNK = tl.constexpr(multi_tensor.CHUNK)
BLOCK = tl.constexpr(multi_tensor.BLOCK)
HEADER = tl.constexpr(multi_tensor.HEADER)
#: The MASTER constexpr of a step kernel that adopts written params ([note: master sync]).
MASTER_SYNCED = tl.constexpr(multi_tensor.MASTER_SYNCED)
#: The MASTER constexpr of a step kernel with compact masters ([note: compact master]).
MASTER_COMPACT = tl.constexpr(multi_tensor.MASTER_COMPACT)
#: The MASTER constexpr of a step kernel without masters whose bf16 param store rounds
#: stochastically ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h).
MASTER_STOCHASTIC = tl.constexpr(multi_tensor.MASTER_STOCHASTIC)
#: The MASTER constexpr of a step kernel with Kahan masters ([note: kahan master]).
MASTER_KAHAN = tl.constexpr(multi_tensor.MASTER_KAHAN)

#: The table of the mixed-dtype ops (scale_, grad_norm): one slot, the tensors, and one
#: float64 column, the dtype code (``multi_tensor.dtype_code_arguments``). The step
#: ops' columns come from their spec (``layout``).
TENSORS: tl.constexpr = tl.constexpr(0)
MIXED_N_SLOTS: tl.constexpr = tl.constexpr(1)
DTYPE_CODE: tl.constexpr = tl.constexpr(0)

#: True under TRITON_INTERPRET=1 ([note: interpreter bf16 rounding]).
INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

#: Launch options every kernel uses ([note: hyperparameter rounding]).
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


@triton.jit
def locate_chunk(chunks, table, WIDTH: tl.constexpr):
    """This program's tensor index, its table row, and its element range [start, end)."""
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    c = tl.load(chunks + 2 * pid + 1)
    row = table + t.to(tl.int64) * WIDTH
    numel = tl.load(row)
    start = c.to(tl.int64) * CHUNK  # int64: tensors of 2^31 elements and more
    end = tl.minimum(start + CHUNK, numel)
    return t, row, start, end


@triton.jit
def slot(row, SLOT: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer of list ``SLOT`` in a table row; 16-byte aligned when ALIGNED."""
    ptr = tl.load(row + HEADER + SLOT).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def hyper(row, N_SLOTS: tl.constexpr, K: tl.constexpr):
    """Hyperparameter ``K`` of a step op's table row, float64: column K of the row of the
    hyperparameter table whose address follows the slots ([note: hyper table] in
    ``fusedopt._contract``)."""
    return tl.load(tl.load(row + HEADER + N_SLOTS).to(tl.pointer_type(tl.float64)) + K)


@triton.jit
def column(row, N_SLOTS: tl.constexpr, K: tl.constexpr):
    """Float64 column ``K`` after the slots of a table row (the mixed-dtype ops' dtype code)."""
    return tl.load(row + HEADER + N_SLOTS + K).to(tl.float64, bitcast=True)


@triton.jit
def widen(x, COMPUTE: tl.constexpr):
    """``x`` in the compute dtype, exactly ([note: interpreter bf16 widening])."""
    if INTERPRETING and x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(COMPUTE)
    else:
        return x.to(COMPUTE)


@triton.jit
def load(ptr, offs, mask, COMPUTE: tl.constexpr):
    """Load and upcast at once ([note: interpreter upcast]); masked-off lanes read 0."""
    if mask is None:  # noqa: SIM108  (a compile-time branch: no mask, no `other`)
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return widen(x, COMPUTE)


#: Store rounding modes ([note: store rounding] in csrc/include/fusedopt/dtype.h): the
#: ``ROUNDING`` constexpr of ``round_to`` and ``store``: round to nearest even, or
#: stochastically (bf16 only, with 16 random bits per element: [note: stochastic rounding]).
NEAREST_EVEN: tl.constexpr = tl.constexpr(0)
STOCHASTIC: tl.constexpr = tl.constexpr(1)


@triton.jit
def rounding_words(key, offs):
    """The four Philox4x32-10 words (uint32) of the elements ``offs`` of the tensor keyed by
    ``key`` (see :func:`rounding_bits`); one evaluation serves every store of an element:
    the param's bits are the top half of word 0, state slot k's the top half of word k + 1
    ([note: state dtype] in csrc/include/fusedopt/dtype.h)."""
    seed, counter, tensor = key
    # tensor: the sr_key entry, stream id | first element << 32 ([note: sharded stochastic
    # rounding] in fusedopt/optim/_plan.py): the element counted in the whole param
    e = offs.to(tl.int64) + ((tensor >> 32) & 0xFFFFFFFF)
    c0 = (e & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((e >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0) + (tensor & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (counter & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def tensor_key(sr_key, t):
    """Tensor ``t``'s rounding key (seed, counter, its entry: stream id | first element << 32)
    from ``sr_key`` = [seed, counter, entry_0, ...] ([note: stochastic rounding])."""
    return (tl.load(sr_key), tl.load(sr_key + 1), tl.load(sr_key + 2 + t))


@triton.jit
def store_state(ptr, offs, mask, x, words, WORD: tl.constexpr):
    """Store a state: rounded to nearest, or, with the element's Philox ``words`` (not
    None: a bf16 state of an SR call, [note: state dtype]), stochastically with the top half
    of word ``WORD`` (state slot k: k + 1)."""
    if words is None:
        store(ptr, offs, mask, x)
    else:
        # round_stochastic directly: a static_assert that the element type is bf16 (as
        # round_to's) fails on this pointer when compiled (Triton 3.8, sm_90; it prints as
        # bf16, derived from the prologue's S_DTYPE), not interpreted. dtype_arguments sets
        # STATE_SR for bf16 states only.
        tl.store(ptr + offs, round_stochastic(x, words[WORD] >> 16), mask=mask)


@triton.jit
def rounding_bits(key, offs):
    """The 16 random bits (uint32) of the elements ``offs`` of the tensor keyed by ``key`` =
    (seed, counter, tensor entry), int64 scalars ([note: stochastic rounding] in
    csrc/include/fusedopt/dtype.h): the top half of the first word of Philox4x32-10 with key
    (seed low, seed high) and counter (element low, element high, tensor id, counter).
    ``tl.philox`` is the standard Philox4x32-10 (its rounds are Random123's; it splits the
    seed low word first): it gives Random123's known-answer vectors, compiled and
    interpreted (tests/test_stochastic_rounding.py)."""
    r0, _, _, _ = rounding_words(key, offs)
    return r0 >> 16


@triton.jit
def round_stochastic(x, random):
    """fp32 ``x`` rounded to bf16 with the 16 random bits ``random`` (uint32) per element: the
    carry of (bits + random) out of the low half; NaN -> 0x7FC0; never an infinity where
    round to nearest stays finite (saturates at 0x7F7F) ([note: stochastic rounding])."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    rounded = (bits + random) >> 16
    overflow = (magnitude < 0x7F7F8000) & ((rounded & 0x7FFF) == 0x7F80)
    rounded = tl.where(overflow, ((bits >> 16) & 0x8000) | 0x7F7F, rounded)
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, ROUNDING: tl.constexpr = NEAREST_EVEN, random=None):
    """``x`` rounded to ``DTYPE`` as ``ROUNDING`` says: to nearest even ([note: interpreter
    bf16 rounding]), or with STOCHASTIC to bf16 with the 16 bits ``random`` per element."""
    if ROUNDING == STOCHASTIC:
        tl.static_assert(tl.bfloat16 == DTYPE, "stochastic rounding stores bf16 only")
        return round_stochastic(x, random)
    elif INTERPRETING and DTYPE == tl.bfloat16:  # noqa: SIM300
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def store(ptr, offs, mask, x, ROUNDING: tl.constexpr = NEAREST_EVEN, random=None):
    """Round to the pointer's dtype (``round_to``) and store."""
    tl.store(ptr + offs, round_to(x, ptr.dtype.element_ty, ROUNDING, random), mask=mask)


@triton.jit
def load_grad(
    g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """[note: common scalars] of ``fusedopt._contract``: g / grad_scale * clip_coef, negated
    for maximize, in the compute dtype."""
    g = load(g_ptr, offs, mask, COMPUTE)
    if HAS_GRAD_SCALE:
        g = div(g, grad_scale)
    if HAS_CLIP:
        g = g * clip_coef
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def load_scalar(ptr, PRESENT: tl.constexpr, COMPUTE: tl.constexpr):
    """A device scalar (grad_scale, clip_coef) in the compute dtype; 1 when absent."""
    if PRESENT:
        return tl.load(ptr).to(COMPUTE)
    else:
        return tl.full((), 1.0, COMPUTE)


@triton.jit
def skipped(found_inf, HAS_FOUND_INF: tl.constexpr):
    """True when found_inf is given and non-zero: the whole step is a no-op."""
    if HAS_FOUND_INF:
        return tl.load(found_inf) != 0.0
    else:
        return False


@triton.jit
def learning_rate(row, lr_tensor, t, N_SLOTS: tl.constexpr, LR_MODE: tl.constexpr):
    """The tensor's lr: float64 from the table (LR_MODE 0), or fp32 from ``lr_tensor``,
    0-d (LR_MODE 1) or one per tensor (LR_MODE 2). Callers cast per
    [note: hyperparameter rounding]."""
    if LR_MODE == 0:
        return hyper(row, N_SLOTS, 0)
    elif LR_MODE == 1:
        return tl.load(lr_tensor)
    else:
        return tl.load(lr_tensor + t)


@triton.jit
def bias_correction(beta, t, ENABLED: tl.constexpr):
    """``1 - beta**t`` in float64 (beta float64, t the new step count)."""
    if ENABLED:
        # exp(t log beta) in float64: within a few float64 ulps of pow, far below fp32's.
        return 1.0 - tl.exp(t.to(tl.float64) * tl.log(beta))
    else:
        return tl.full((), 1.0, tl.float64)


@triton.jit
def finish_tensor(counters, t, row, step_ptr, new_step):
    """Count this chunk done; the tensor's last chunk to finish stores the new step count.

    Every program of a tensor reads the old step before its ``atomic_add`` (acq_rel), so the
    program that sees the count reach ``n_chunks - 1`` knows that all reads are done and may
    write: one launch, no race, no float atomics. It resets the counter for the next call
    (and for CUDA-graph replays).
    """
    n_chunks = tl.load(row + 2).to(tl.int32)
    done = tl.atomic_add(counters + t, 1, sem="acq_rel")
    if done == n_chunks - 1:
        tl.store(step_ptr, new_step)
        tl.atomic_xchg(counters + t, 0)


@triton.jit
def tail_block(full_end, end):
    """Offsets and mask of the last, partial block [full_end, end). The mask compares int32
    lane indices, not int64 offsets: 64-bit compares cost registers (measured for sm_90: the Lion
    master-weight kernel took 80 registers and spilled to an 8-byte stack with int64 masks;
    64 registers and no stack with int32 ones)."""
    lanes = tl.arange(0, BLOCK)
    return full_end + lanes, lanes < (end - full_end).to(tl.int32)


@triton.jit
def full_blocks_end(start, end):
    """End of the unmasked part of [start, end): whole BLOCKs only."""
    return start + (end - start) // BLOCK * BLOCK


@triton.jit
def div(a, b):
    """IEEE division (``div_rn`` for fp32; fp64 division is always IEEE)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def sqrt(x):
    """IEEE square root (``sqrt_rn`` for fp32; fp64 square root is always IEEE)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def maximum(a, b):
    """``torch.maximum``: NaN propagates."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def join_master(param, remainder):
    """[note: compact master] in fusedopt._contract: the fp32 master of bf16 ``param`` and its
    int16 ``remainder``, ``(param bits << 16) + remainder``; a NaN param, or a remainder that
    does not fit the param (only after a write into it), gives the param's value."""
    high = param.to(tl.uint16, bitcast=True).to(tl.uint32)
    r = remainder.to(tl.int32)
    magnitude = high & 0x7FFF
    misfit = (magnitude > 0x7F80) | ((magnitude == 0) & (r < 0))
    misfit = misfit | ((magnitude == 0x7F80) & (r > 0))
    joined = (high << 16) + r.to(tl.uint32, bitcast=True)
    return tl.where(misfit, high << 16, joined).to(tl.float32, bitcast=True)


@triton.jit
def split_master(x):
    """[note: compact master]: fp32 ``x`` as its bf16 param (to nearest, ties away from zero:
    ``(bits + 0x8000) >> 16``) and int16 remainder (the low 16 bits); a NaN gives 0x7FC0 and
    remainder 0."""
    u = x.to(tl.uint32, bitcast=True)
    nan = x != x
    high = tl.where(nan, 0x7FC0, (u + 0x8000) >> 16)
    low = tl.where(nan, 0, u & 0xFFFF)
    param = high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return param, low.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def master_or_key(row, t, sr_key, MASTER_SLOT: tl.constexpr, MASTER: tl.constexpr,
                  ALIGNED: tl.constexpr):  # fmt: skip
    """What a step kernel hands ``load_param``/``store_param`` as ``master_ptr``: the master
    slot's pointer, or with MASTER_STOCHASTIC tensor ``t``'s rounding key (seed, counter,
    its id) from ``sr_key`` = [seed, counter, id_0, ...] ([note: stochastic rounding])."""
    if MASTER == MASTER_STOCHASTIC:
        return tensor_key(sr_key, t)
    else:
        return slot(row, MASTER_SLOT, tl.float32, ALIGNED)


@triton.jit
def join_kahan(param, compensation):
    """[note: kahan master] in fusedopt._contract: the fp32 master of 16-bit ``param`` and its
    ``compensation``, their fp32 sum where it rounds to the param, else the param alone (a
    value written into it since)."""
    p = widen(param, tl.float32)
    x = p + widen(compensation, tl.float32)
    rounded = round_to(x, param.dtype)
    written = rounded.to(tl.int16, bitcast=True) != param.to(tl.int16, bitcast=True)
    return tl.where(written, p, x)


@triton.jit
def split_kahan(x, DTYPE: tl.constexpr):
    """[note: kahan master]: fp32 ``x`` as its 16-bit param ``round(x)`` and compensation
    ``round(x - param)`` (0 where not finite), one step toward zero at a tie that would round
    param + compensation off the param."""
    param = round_to(x, DTYPE)
    p = widen(param, tl.float32)
    d = x - p
    c = round_to(tl.where(d - d == 0.0, d, 0.0), DTYPE)
    p_bits = param.to(tl.int16, bitcast=True)
    c_bits = c.to(tl.int16, bitcast=True)
    tie = round_to(p + widen(c, tl.float32), DTYPE).to(tl.int16, bitcast=True) != p_bits
    tie = tie & ((c_bits & 0x7FFF) != 0)
    c = tl.where(tie, c_bits - 1, c_bits).to(tl.int16).to(DTYPE, bitcast=True)
    return param, c


@triton.jit
def _load_beside(p_ptr, q_ptr, offs, mask):
    """The raw 16-bit param and the raw 16-bit buffer beside it (a compact master's
    remainder, a Kahan master's compensation), 0 where masked."""
    if mask is None:  # a compile-time branch, as in `load`
        return tl.load(p_ptr + offs), tl.load(q_ptr + offs)
    else:
        return tl.load(p_ptr + offs, mask=mask, other=0), tl.load(q_ptr + offs, mask=mask, other=0)


@triton.jit
def load_param(p_ptr, master_ptr, offs, mask, MASTER: tl.constexpr, COMPUTE: tl.constexpr):
    """The param in the compute dtype: its fp32 master copy when MASTER, else itself. With
    MASTER == MASTER_SYNCED, an element whose param bits differ from its rounded master's
    takes the param's value ([note: master sync] in fusedopt._contract): one more 16-bit
    read per element. With MASTER == MASTER_COMPACT, ``master_ptr`` points at int16
    remainders and the master is joined from param and remainder ([note: compact master]);
    with MASTER_KAHAN, at compensations of the param's dtype ([note: kahan master])."""
    if MASTER == MASTER_KAHAN:
        raw, compensation = _load_beside(p_ptr, master_ptr.to(p_ptr.dtype), offs, mask)
        return join_kahan(raw, compensation).to(COMPUTE)
    elif MASTER == MASTER_COMPACT:
        r_ptr = master_ptr.to(tl.pointer_type(tl.int16))
        raw, remainder = _load_beside(p_ptr, r_ptr, offs, mask)
        return join_master(raw, remainder).to(COMPUTE)
    elif MASTER == MASTER_STOCHASTIC:  # no master: the param itself
        return load(p_ptr, offs, mask, COMPUTE)
    elif MASTER:
        x = load(master_ptr, offs, mask, COMPUTE)
        if MASTER == MASTER_SYNCED:
            if mask is None:  # a compile-time branch, as in `load`
                raw = tl.load(p_ptr + offs)
            else:
                raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
            rounded = round_to(x, p_ptr.dtype.element_ty)
            written = rounded.to(tl.int16, bitcast=True) != raw.to(tl.int16, bitcast=True)
            x = tl.where(written, widen(raw, COMPUTE), x)
        return x
    else:
        return load(p_ptr, offs, mask, COMPUTE)


@triton.jit
def store_param(p_ptr, master_ptr, offs, mask, p, MASTER: tl.constexpr):
    """Store the updated param; with MASTER, the fp32 master and the rounded param both, so
    that ``param == master.to(param.dtype)`` bit for bit; with MASTER_COMPACT, the param and
    remainder of ``split_master`` ([note: compact master]); with MASTER_KAHAN, the param and
    compensation of ``split_kahan`` ([note: kahan master]); with MASTER_STOCHASTIC,
    ``master_ptr`` is the tensor's rounding key (``master_or_key``) and the bf16 param is
    rounded stochastically ([note: stochastic rounding])."""
    if MASTER == MASTER_STOCHASTIC:
        store(p_ptr, offs, mask, p, STOCHASTIC, rounding_bits(master_ptr, offs))
    elif MASTER == MASTER_KAHAN:
        param, compensation = split_kahan(p, p_ptr.dtype.element_ty)
        tl.store(p_ptr + offs, param, mask=mask)
        tl.store(master_ptr.to(p_ptr.dtype) + offs, compensation, mask=mask)
    elif MASTER == MASTER_COMPACT:
        param, remainder = split_master(p)
        tl.store(p_ptr + offs, param, mask=mask)
        tl.store(master_ptr.to(tl.pointer_type(tl.int16)) + offs, remainder, mask=mask)
    else:
        if MASTER:
            store(master_ptr, offs, mask, p)
        store(p_ptr, offs, mask, p)


@triton.jit
def nonfinite(x):
    """1 where x is inf or NaN, else 0 (int32)."""
    return ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
