"""``sgd_``: torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize), one
launch over every tensor.

Bytes per element: reads grad and param (or master), writes param (and master); with
momentum, reads and writes the momentum buffer too. fp32: 12 B, 20 B with momentum. bf16
with master weights and momentum: 2 + 4 + 4 read, 4 + 2 + 4 written = 20 B. Step counts
(with momentum only): 4 B per tensor; they decide torch's first-step rule ``buf = g``.
An 8-bit buffer ([note: 8-bit states] in fusedopt/quant8.py): 1 B read and written instead,
+ 8 B per 256 elements (its scale).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import quant8
from .common import hyper, load, slot, store_state
from .drivers import StepOp
from .layout import layout
from .registry import register

#: The table columns, named by the spec.
L = layout("sgd_")


@triton.jit
def _sgd_block(
    offs, mask, g, p, buf_ptr, lr, momentum, one_minus_dampening, weight_decay,
    has_weight_decay, first_step, use_momentum, COMPUTE: tl.constexpr, FLAGS: tl.constexpr,
    words=None,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores the
    buffer, returns the new param (``drivers.for_each_block`` loads g and p, stores p).
    ``words``: the elements' Philox words when a bf16 buffer rounds stochastically
    (``STATE_SR``; momentum_buffer: word 1, [note: state dtype] in
    csrc/include/fusedopt/dtype.h)."""
    HAS_MOMENTUM, NESTEROV = FLAGS
    # A zero decay adds nothing, not 0 * p (which would turn an infinite param into NaN).
    g = tl.where(has_weight_decay, g + weight_decay * p, g)
    # Compile-time test, then the run-time one ([note: sgd momentum 0] of the reference).
    if HAS_MOMENTUM:  # noqa: SIM102
        if use_momentum:
            buf = load(buf_ptr, offs, mask, COMPUTE)
            g, buf = _sgd_momentum(g, buf, momentum, one_minus_dampening, first_step, NESTEROV)
            store_state(buf_ptr, offs, mask, buf, words, 1)
    return p - lr * g


@triton.jit
def _sgd_momentum(g, buf, momentum, one_minus_dampening, first_step, NESTEROV: tl.constexpr):
    """The new buffer from the old one and the direction the step takes (g, decayed)."""
    buf = momentum * buf + one_minus_dampening * g
    buf = tl.where(first_step, g, buf)  # torch's first step: buf = g
    return (g + momentum * buf if NESTEROV else buf), buf


@triton.jit
def _sgd_q8_block(
    offs, mask, blocks, g, p, buf_codes, buf_scales, lr, momentum, one_minus_dampening,
    weight_decay, has_weight_decay, first_step, use_momentum, COMPUTE: tl.constexpr,
    FLAGS: tl.constexpr,
):  # fmt: skip
    """A tile of quantization blocks with an 8-bit buffer ([note: 8-bit states] in
    fusedopt/quant8.py; ``blocks``: ``quant8.fold_q8_blocks``): dequantized, stepped as
    :func:`_sgd_block` steps, requantized; a tensor whose momentum is 0 leaves its codes and
    scales as they are."""
    _, NESTEROV = FLAGS
    g = tl.where(has_weight_decay, g + weight_decay * p, g)
    if use_momentum:
        buf = quant8.dequantize(buf_codes, buf_scales, blocks, offs, mask, True)
        g, buf = _sgd_momentum(g, buf, momentum, one_minus_dampening, first_step, NESTEROV)
        quant8.requantize(buf_codes, buf_scales, blocks, buf, offs, mask, True)
    return p - lr * g


@triton.jit
def _sgd_scalars(row, lr, COMPUTE: tl.constexpr, FLAGS):
    """The tensor's scalars, new step count and whether it takes momentum."""
    HAS_MOMENTUM, _ = FLAGS
    new_step = tl.full((), 1.0, tl.float32)
    if HAS_MOMENTUM:
        new_step = tl.load(slot(row, L.STEPS, tl.float32, False)) + 1.0
    weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
    momentum = hyper(row, L.N_SLOTS, L.MOMENTUM)
    # [note: sgd momentum 0] (reference): a tensor with momentum 0 in a call with buffers
    # steps as plain SGD; its buffer and step count stay untouched.
    use_momentum = momentum != 0.0
    scalars = (
        lr.to(COMPUTE), momentum.to(COMPUTE),
        (1.0 - hyper(row, L.N_SLOTS, L.DAMPENING)).to(COMPUTE),
        weight_decay.to(COMPUTE), weight_decay != 0.0, new_step == 1.0, use_momentum,
    )  # fmt: skip
    return scalars, new_step, use_momentum


@triton.jit
def _sgd_prologue(row, lr, S_DTYPE, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The tensor's block args and new step count ([note: generic step kernel] in
    ``drivers``); the count advances only with momentum."""
    scalars, new_step, use_momentum = _sgd_scalars(row, lr, COMPUTE, FLAGS)
    buf_ptr = slot(row, L.MOMENTUM_BUFFERS, S_DTYPE, ALIGNED)
    return (buf_ptr,) + scalars, new_step, use_momentum  # noqa: RUF005 (no * in Triton)


@triton.jit
def _sgd_q8_prologue(row, lr, COMPUTE, LR_MODE, ALIGNED, FLAGS):
    """The block args of a call with 8-bit buffers (``quant8.q8_step_kernel``)."""
    scalars, new_step, use_momentum = _sgd_scalars(row, lr, COMPUTE, FLAGS)
    states = (
        slot(row, L.MOMENTUM_BUFFERS, tl.int8, ALIGNED),
        slot(row, L.MOMENTUM_BUFFER_SCALES, tl.float32, False),
    )  # fmt: skip
    return states + scalars, new_step, use_momentum


#: One SGD step over every tensor in one launch (``fusedopt._contract``'s schema order).
sgd_ = StepOp(
    "sgd_", _sgd_prologue, _sgd_block, ("HAS_MOMENTUM", "NESTEROV"),
    derived=lambda a: {"HAS_MOMENTUM": bool(a.momentum_buffers)},
    q8=quant8.Q8Launcher(_sgd_q8_prologue, _sgd_q8_block),
)  # fmt: skip


register("sgd_", sgd_)
