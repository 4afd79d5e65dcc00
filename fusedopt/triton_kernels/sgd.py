"""``sgd_``: torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize), one
launch over every tensor.

Bytes per element: reads grad and param (or master), writes param (and master); with
momentum, reads and writes the momentum buffer too. fp32: 12 B, 20 B with momentum. bf16
with master weights and momentum: 2 + 4 + 4 read, 4 + 2 + 4 written = 20 B. Step counts
(with momentum only): 4 B per tensor; they decide torch's first-step rule ``buf = g``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import finish_tensor, hyper, learning_rate, load, locate_chunk, skipped, slot, store
from .drivers import for_each_block, param_args
from .layout import layout, prepare
from .multi_tensor import TableCache
from .registry import register

#: The table columns, named by the spec.
L = layout("sgd_")


@triton.jit
def _sgd_block(
    offs, mask, g, p, buf_ptr, lr, momentum, one_minus_dampening, weight_decay,
    has_weight_decay, first_step, use_momentum, COMPUTE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
):  # fmt: skip
    """The update of BLOCK elements, in the reference's order of operations: stores the
    buffer, returns the new param (``drivers.for_each_block`` loads g and p, stores p)."""
    # A zero decay adds nothing, not 0 * p (which would turn an infinite param into NaN).
    g = tl.where(has_weight_decay, g + weight_decay * p, g)
    # Compile-time test, then the run-time one ([note: sgd momentum 0] of the reference).
    if HAS_MOMENTUM:  # noqa: SIM102
        if use_momentum:
            buf = momentum * load(buf_ptr, offs, mask, COMPUTE) + one_minus_dampening * g
            buf = tl.where(first_step, g, buf)  # torch's first step: buf = g
            store(buf_ptr, offs, mask, buf)
            g = g + momentum * buf if NESTEROV else buf
    return p - lr * g


@triton.jit
def sgd_kernel(
    table, chunks, counters, lr_tensor, grad_scale, clip_coef, found_inf,
    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr, MASTER: tl.constexpr, LR_MODE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """One program per chunk; with momentum, the last-finishing chunk advances the step."""
    if not skipped(found_inf, HAS_FOUND_INF):
        # locate_chunk, not drivers.locate_step: the lr is read late (in `args`); read first,
        # it cost the fp64 variant an 8-byte stack (Triton 3.8, sm_90; test_triton_static.py).
        t, row, start, end = locate_chunk(chunks, table, WIDTH)
        step_ptr = slot(row, L.STEPS, tl.float32, False)
        new_step = tl.full((), 1.0, tl.float32)
        if HAS_MOMENTUM:
            new_step = tl.load(step_ptr) + 1.0
        weight_decay = hyper(row, L.N_SLOTS, L.WEIGHT_DECAY)
        momentum = hyper(row, L.N_SLOTS, L.MOMENTUM)
        # [note: sgd momentum 0] (reference): a tensor with momentum 0 in a call with buffers
        # steps as plain SGD; its buffer and step count stay untouched.
        use_momentum = momentum != 0.0
        common = param_args(row, grad_scale, clip_coef, L.MASTER_PARAMS, P_DTYPE, G_DTYPE,
                            COMPUTE, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        args = (
            slot(row, L.MOMENTUM_BUFFERS, S_DTYPE, ALIGNED),
            learning_rate(row, lr_tensor, t, L.N_SLOTS, LR_MODE).to(COMPUTE),
            momentum.to(COMPUTE), (1.0 - hyper(row, L.N_SLOTS, L.DAMPENING)).to(COMPUTE),
            weight_decay.to(COMPUTE), weight_decay != 0.0, new_step == 1.0, use_momentum,
        )  # fmt: skip
        for_each_block(_sgd_block, start, end, common, args, (COMPUTE, HAS_MOMENTUM, NESTEROV),
                       COMPUTE, MASTER, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip
        if HAS_MOMENTUM:  # noqa: SIM102
            if use_momentum:  # the same for every chunk of the tensor
                finish_tensor(counters, t, row, step_ptr, new_step)


_TABLES = TableCache()


def sgd_(*args) -> None:
    """One SGD step over every tensor in one launch (``fusedopt._contract``'s schema order)."""
    a = prepare("sgd_", args, _TABLES)
    if a is not None:
        sgd_kernel[(a.launch.n_chunks,)](
            a.launch.table, a.launch.chunks, a.launch.counters, *a.scalar_tensors,
            HAS_MOMENTUM=bool(a.momentum_buffers), **a.options(),
        )  # fmt: skip


register("sgd_", sgd_)
