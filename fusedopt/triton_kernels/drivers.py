"""The traversal the kernels share, written once: for the step kernels the program's tensor,
chunk and lr (``locate_step``), the arguments every block function takes first (param, grad,
master, grad_scale, clip_coef) and the loop over a chunk's blocks; for the mixed-dtype
kernels (scale_, grad_norm) the choice of a row's dtype.

An elementwise op's Triton kernel is :func:`step_kernel`, written once, specialised by the
op's block function (the per-element update of BLOCK elements, ``_<op>_block``) and its
prologue (the per-tensor scalars from its table row, ``_<op>_prologue``); :class:`StepOp`
launches it. Both functions are ``tl.constexpr`` arguments (jit functions pass as
constexprs): Triton inlines them, so the compiled kernel is the one a hand-written kernel
gives (the same SASS: [note: generic step kernel]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import triton
import triton.language as tl

from fusedopt._contract import STEP_OPS

from .common import (
    BLOCK,
    finish_tensor,
    full_blocks_end,
    learning_rate,
    load_grad,
    load_param,
    load_scalar,
    locate_chunk,
    master_or_key,
    rounding_words,
    skipped,
    slot,
    store_param,
    tail_block,
    tensor_key,
)
from .layout import StepArguments, layout, prepare
from .multi_tensor import TableCache

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
    row, t, grad_scale, clip_coef, sr_key, MASTER_PARAMS: tl.constexpr, P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """What every step block takes first: the param, grad and master pointers of tensor
    ``t``'s table row (its rounding key instead of the master with MASTER_STOCHASTIC:
    ``common.master_or_key``), then grad_scale and clip_coef in the compute dtype (1 when
    absent)."""
    return (
        slot(row, PARAMS, P_DTYPE, ALIGNED), slot(row, GRADS, G_DTYPE, ALIGNED),
        master_or_key(row, t, sr_key, MASTER_PARAMS, MASTER, ALIGNED),
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
    MAXIMIZE: tl.constexpr, STATE_SR: tl.constexpr, state_key,
):  # fmt: skip
    """Load the grad (unscaled, clipped, negated for MAXIMIZE) and the param (its master with
    MASTER), let ``BLOCK_FN(offs, mask, g, p, *args, *flags)`` update the op's states and
    return the new param, store it (and its master). With STATE_SR, BLOCK_FN also takes the
    elements' Philox words under ``state_key`` for its bf16 state stores ([note: state
    dtype] in csrc/include/fusedopt/dtype.h)."""
    p_ptr, g_ptr, master_ptr, grad_scale, clip_coef = common
    g = load_grad(g_ptr, offs, mask, grad_scale, clip_coef, COMPUTE, HAS_GRAD_SCALE, HAS_CLIP,
                  MAXIMIZE)  # fmt: skip
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER, COMPUTE)
    if STATE_SR:
        p = BLOCK_FN(offs, mask, g, p, *args, *flags, rounding_words(state_key, offs))
    else:
        p = BLOCK_FN(offs, mask, g, p, *args, *flags)
    store_param(p_ptr, master_ptr, offs, mask, p, MASTER)
    return carry


@triton.jit
def for_each_block(
    BLOCK_FN: tl.constexpr, start, end, common, args, flags, COMPUTE: tl.constexpr,
    MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    MAXIMIZE: tl.constexpr, STATE_SR: tl.constexpr = False, state_key=0,
):  # fmt: skip
    """The elementwise step of the elements [start, end) of one tensor (``common`` from
    ``param_args``): :func:`fold_blocks` over ``_step_block``, which loads g and p, calls
    ``BLOCK_FN`` and stores p."""
    nothing = tl.zeros((), tl.int32)  # an elementwise step hands nothing on (folded away)
    fold_blocks(_step_block, start, end, nothing, (BLOCK_FN, common, args, flags, COMPUTE,
                MASTER, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE, STATE_SR, state_key))  # fmt: skip


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


# [note: generic step kernel] Every elementwise step op (adamw_, sgd_, lion_, adan_,
# schedulefree_adamw_) runs this one kernel; an op brings two jit functions, passed as
# constexprs and inlined:
#   PROLOGUE(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS) -> (args, new_step, advance):
#       from the tensor's table row and its lr (``learning_rate``, read by the kernel: float64
#       for LR_MODE 0, fp32 otherwise, which the prologue rounds per
#       [note: hyperparameter rounding]), reads the tensor's hyperparameters and returns the
#       block's run-time args, the tensor's new step count and whether this tensor's count
#       advances (both unused without STEPS). The parameters after ``lr`` are the kernel's
#       constexprs passed on, and stay compile-time in the called function unannotated (Triton
#       specialises a called jit function on its constexpr arguments);
#   BLOCK_FN(offs, mask, g, p, *args, COMPUTE, FLAGS) -> new p (``for_each_block``).
# FLAGS is the op's own flags as one constexpr tuple of bools (``StepOp.flags`` names them),
# unpacked inside the two functions (``DECOUPLED, AMSGRAD, _ = FLAGS``): the values stay
# compile-time. (A tuple *variable* built inside a kernel from constexpr arguments passes them
# as run-time values, and one holding a dtype does not compile, Triton 3.8; a constexpr tuple
# argument and its unpacking are compile-time, and ``(a, *FLAGS)`` is not supported.)
# Compiled for sm_90 (Triton 3.8), every variant of tests/triton_static_compile.py keeps the
# register count, SASS instruction count, stack and global accesses it had as five
# hand-written kernels, except (none of it in a main loop: bench/results/h200_model.csv):
# sgd_'s master-weight variants re-read the step pointer for finish_tensor (8 more
# instructions, 2-3 fewer registers), sgd_bf16 takes 46 registers instead of 47, and adan_'s
# master-weight variants 8 more instructions and 119 / 117 registers instead of 120 / 116
# (the same allocation unit of 8). Reading the lr in the kernel rather than in each prologue
# (sgd_'s read it last) left every variant's SASS as it was but sgd_'s, whose registers,
# stack and instruction counts stayed too (the same instructions, a few in another order).


@triton.jit
def step_kernel(
    table, chunks, counters, lr_tensor, grad_scale, clip_coef, found_inf, sr_key,
    PROLOGUE: tl.constexpr, BLOCK_FN: tl.constexpr, FLAGS: tl.constexpr,
    N_SLOTS: tl.constexpr, MASTER_SLOT: tl.constexpr, STEP_SLOT: tl.constexpr,
    STEPS: tl.constexpr,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, LR_MODE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, STATE_SR: tl.constexpr = False,
):  # fmt: skip
    """One program per chunk of an elementwise step op ([note: generic step kernel]); with
    STEPS, the tensor's last-finishing chunk advances its step count (when ``advance``).
    STATE_SR: the bf16 states round stochastically with tensor ``t``'s key ([note: state
    dtype] in csrc/include/fusedopt/dtype.h)."""
    if not skipped(found_inf, HAS_FOUND_INF):
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        # param_args before the prologue: after it, the unaligned bf16-master adamw_ variant
        # took 110 registers instead of 96, the unaligned fp32 and bf16 ones 94 instead of 92
        # (Triton 3.8, sm_90); before it, every variant is as hand-written.
        common = param_args(row, t, grad_scale, clip_coef, sr_key, MASTER_SLOT, P_DTYPE,
                            G_DTYPE, COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP,
                            ALIGNED)  # fmt: skip
        lr = learning_rate(row, lr_tensor, t, N_SLOTS, LR_MODE)
        args, new_step, advance = PROLOGUE(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS)
        if STATE_SR:
            for_each_block(BLOCK_FN, start, end, common, args, (COMPUTE, FLAGS), COMPUTE,
                           MASTER, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE, STATE_SR,
                           tensor_key(sr_key, t))  # fmt: skip
        else:
            for_each_block(BLOCK_FN, start, end, common, args, (COMPUTE, FLAGS), COMPUTE,
                           MASTER, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip
        # Nested ifs: compile-time, then run-time (the same for every chunk of the tensor).
        if STEPS:  # noqa: SIM102
            if advance:
                # The step pointer is read again here rather than kept from the prologue:
                # kept live across the loops, it cost the bf16 master-weight unaligned adamw_
                # an 8-byte stack and a spill with Triton 3.6's ptxas (CUDA 12.8), around the
                # IEEE division calls. tests/test_triton_static.py.
                finish_tensor(counters, t, row, slot(row, STEP_SLOT, tl.float32, False), new_step)


@dataclasses.dataclass
class StepOp:
    """An elementwise step op on :func:`step_kernel`: calling it runs one step over every
    tensor in one launch (``fusedopt._contract``'s schema order)."""

    op: str
    prologue: triton.JITFunction
    block_fn: triton.JITFunction
    #: The op's flags in FLAGS order (upper case): the spec's (``MAXIMIZE`` apart, a common
    #: argument of the kernel) and the ``derived`` ones.
    flags: tuple[str, ...] = ()
    #: Flags computed from the call's arguments (e.g. sgd_'s HAS_MOMENTUM).
    derived: Callable[[StepArguments], dict[str, bool]] = lambda a: {}
    #: The launcher of calls with 8-bit states (``quant8.Q8Launcher``), where the op has them.
    q8: Callable | None = None

    def __post_init__(self) -> None:
        self.layout = layout(self.op)
        self.tables = TableCache()

    def constexprs(self, steps: bool, **flags: bool) -> dict:
        """The op's constexprs of :func:`step_kernel` for the flag values ``flags`` (by upper
        case name, ``MAXIMIZE`` among them where the op has it)."""
        return {
            "PROLOGUE": self.prologue, "BLOCK_FN": self.block_fn,
            "FLAGS": tuple(bool(flags[name]) for name in self.flags),
            "N_SLOTS": self.layout.N_SLOTS, "MASTER_SLOT": self.layout.MASTER_PARAMS,
            "STEP_SLOT": getattr(self.layout, "STEPS", tl.constexpr(0)), "STEPS": steps,
            "MAXIMIZE": bool(flags.get("MAXIMIZE", False)),
        }  # fmt: skip

    def __call__(self, *args) -> None:
        a = prepare(self.op, args, self.tables)
        if a is None:
            return
        flags = {**a.flags, **self.derived(a)}
        if any(a.named.get(scales) for _, scales, _ in STEP_OPS[self.op].quantized_states):
            if self.q8 is None:
                raise NotImplementedError(
                    f"{self.op}: 8-bit states are not implemented on the triton backend yet "
                    "([note: 8-bit states] in fusedopt/quant8.py)"
                )
            self.q8(self, a, flags)
            return
        options = {k: v for k, v in a.options().items() if k not in a.flags}
        step_kernel[(a.launch.n_chunks,)](
            a.launch.table, a.launch.chunks, a.launch.counters, *a.scalar_tensors,
            **self.constexprs(bool(a.named.get("steps")), **flags), **options,
        )  # fmt: skip
