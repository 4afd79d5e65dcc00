"""Params that are not dense (strided views such as ``base[:, ::2]``) and the layout every
state of a param has: written once, used by the optimizer classes and by ``fusedopt.ops``.

[note: non-dense params] The kernels walk each tensor as one dense block and pair elements by
position, so a param that is a strided view (``nn.Parameter(base[:, ::2])``, a transposed then
sliced weight) cannot be passed to them as is. torch.optim steps such params, so fusedopt does
too, through a *dense twin*: a contiguous copy of ``p`` (one gather), which the op updates, and
``p.copy_(twin)`` (one scatter) writes back, in the same step. The twin, and
every state and master of a non-dense param, is contiguous (:func:`dense_stride`,
:func:`state_like`), because autograd gives such a param a contiguous grad: so the grad pairs
with them as it comes, and the cached plan holds from step to step. (torch's
``zeros_like(p, memory_format=torch.preserve_format)`` would give a transposed view's states
column-major strides and a channels_last slice channels_last ones; the optimizer re-lays
states made or loaded that way once, when it plans, [note: re-laid state] in
``fusedopt/optim/_plan.py``.) ``fusedopt.ops`` takes what its caller passes: there any tensor
of a non-dense param's row (grad, state, master) not in the twin's layout is twinned too, and
written back if the op writes it.

Cost: two extra passes over the non-dense params only (a read and a write each), plus one
temporary of each of their sizes during the op. Dense params pay nothing: the optimizer finds
the non-dense ones when it plans ([note: cached plan] in ``fusedopt/optim/_plan.py``) and keeps
their positions per op call, so a steady step of a model without any pays one empty-list test
per call. A strided path in every kernel of every backend would avoid the two passes, at the
cost of a second traversal in each; non-dense params are rare (views made by hand) and
small next to a model, so the twin is the better trade.

The twin is written back even when ``found_inf`` makes the op skip: it then holds the param's
own values, so the param stays bit for bit what it was. LAMB's per-tensor norms are taken over
the twin, which is the whole param. A tensor whose elements overlap in memory (``expand``ed,
stride 0) is refused wherever it would be written: an in-place update of it is ill-defined
(torch.optim raises, or with ``fused=True`` writes out of bounds); one that is only read (a
grad, ``grad_norm``'s input) is read through a twin.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one block of memory, in some order."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    sizes_strides = sorted(
        (stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1
    )
    expected = 1
    for stride, size in sizes_strides:
        if stride != expected:
            return False
        expected *= size
    return True


def dense_stride(t: Tensor) -> tuple[int, ...]:
    """The strides of every state of a param ``t``: its own when it is dense, else contiguous
    ones (its dense twin's)."""
    if is_dense(t):
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def state_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor of ``dtype`` in the layout of ``t``'s states (and its twin's)."""
    if is_dense(t):
        return torch.empty_like(t, dtype=dtype)
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def state_for(t: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
    """An uninitialised state of ``t`` in ``layout`` ([note: factored layouts] in
    fusedopt._contract): :func:`state_like` where the state has the param's shape
    (``"param"``, ``"unfactored"`` on a vector), else contiguous in its own shape."""
    from fusedopt._contract import state_shape

    shape = state_shape(layout, t.shape)
    if shape == tuple(t.shape) and layout in ("param", "unfactored"):
        return state_like(t, dtype)
    return torch.empty(shape, dtype=dtype, device=t.device)


def state_stride(t: Tensor, layout: str) -> tuple[int, ...]:
    """The strides of ``t``'s state in ``layout``: :func:`dense_stride` where it has the
    param's shape, else contiguous ones."""
    from fusedopt._contract import state_shape

    shape = state_shape(layout, t.shape)
    if shape == tuple(t.shape) and layout in ("param", "unfactored"):
        return dense_stride(t)
    return torch.empty(shape, device="meta").stride()


def overlaps(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: False when its dims, sorted by stride,
    each step past everything the smaller ones span (true of every view made by slicing,
    transposing or permuting a tensor); True for ``expand`` (stride 0) and the like."""
    if t.numel() <= 1:
        return False
    span = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True)):
        if size == 1:
            continue
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def needs_twin(t: Tensor) -> bool:
    """A strided tensor the kernels cannot take as is, but a dense twin can stand in for."""
    return not is_dense(t) and not overlaps(t)


def swap_in_twins(tensors: list[Tensor], positions: Iterable[int]) -> list[tuple[Tensor, Tensor]]:
    """Replace ``tensors[i]`` for each of ``positions`` by its dense twin, in place; returns
    the (tensor, twin) pairs for :func:`write_back`."""
    pairs = []
    for i in positions:
        t = tensors[i]
        tensors[i] = twin = state_like(t, t.dtype).copy_(t)
        pairs.append((t, twin))
    return pairs


def swap_in_row_twins(
    lists: dict[str, list[Tensor]], written: Sequence[str]
) -> list[tuple[Tensor, Tensor]]:
    """``fusedopt.ops``'s lists, aligned on ``lists["params"]``: for each param that
    :func:`needs_twin`, replace it and each tensor of its row not already in its
    :func:`dense_stride` layout by a dense twin, in place; returns the (tensor, twin) pairs of
    the lists named in ``written`` (those the op writes) for :func:`write_back`.

    Anything that could not pair with the param (another shape or device, not a real strided
    tensor, an overlapping tensor the op would write) is left as it is, for the validation to
    name before any tensor is touched."""
    pairs: list[tuple[Tensor, Tensor]] = []
    for i, p in enumerate(lists["params"]):
        if not isinstance(p, Tensor) or p.layout != torch.strided or not needs_twin(p):
            continue
        stride = dense_stride(p)
        for name, tensors in lists.items():
            t = tensors[i] if i < len(tensors) else None
            if not (
                isinstance(t, Tensor)
                and t.layout == torch.strided
                and not t.is_complex()
                and t.shape == p.shape
                and t.device == p.device
                and t.stride() != stride
                and not (name in written and overlaps(t))
            ):
                continue
            tensors[i] = twin = state_like(p, t.dtype).copy_(t)
            if name in written:
                pairs.append((t, twin))
    return pairs


def write_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Copy each twin back into the tensor it stood in for."""
    for t, twin in pairs:
        t.copy_(twin)
