"""Global gradient norms and ``fusedopt.clip_grad_norm_`` (DESIGN.md §4).

:func:`total_norm` is the one place that turns a list of grads into a global norm: it groups
the grads by device (one ``fusedopt.ops.grad_norm`` launch per device), and adds up partial
norms across processes where the grads are shards of a larger whole: DTensor grads with a
``Shard`` placement (FSDP2) reduce over the mesh dimensions they are sharded on, and plain
grads reduce over ``process_group`` when a wrapper partitions params between ranks
(``ZeroRedundancyOptimizer``). The optimizers' ``max_grad_norm`` and :func:`clip_grad_norm_`
both use it, so both give the norm of the unsharded grads.

[note: one collective] Each reduction sends the squared norm (the norm itself for inf) and the
``found_inf`` flag in one tensor: summing (max for inf) both is right for both, and a rank that
found an inf makes every rank skip its step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from fusedopt import ops

if TYPE_CHECKING:
    from fusedopt.optim._plan import PlannedNorm

__all__ = ["clip_grad_norm_", "total_norm"]


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover (torch built without distributed)
    _DTensor = None


def _dtensor_type():
    return _DTensor


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or ``t`` itself."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _reduce_groups(t: Tensor, process_group) -> tuple:
    """The process groups over which ``t``'s local norm is a partial sum, in order."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        groups = []
        for dim, placement in enumerate(t.placements):
            if placement.is_partial():
                raise NotImplementedError(
                    "fusedopt: grads with a Partial placement are not supported; reduce them "
                    "first (FSDP2 gives Shard grads)"
                )
            if placement.is_shard():
                groups.append(t.device_mesh.get_group(dim))
        return tuple(groups)
    return (process_group,) if process_group is not None else ()


def total_norm(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    grad_scale: Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    _checked: bool = False,
    _planned: PlannedNorm | None = None,
) -> tuple[Tensor, Tensor]:
    """Global ``norm_type`` (2 or inf) norm of ``tensors / grad_scale`` and a found_inf flag.

    Returns two 0-d tensors on the first tensor's device (``grad_scale``'s device, else
    CPU, when there are none): the norm, fp64 when every tensor is fp64 (so that an fp64
    model's clip coefficient is fp64, [note: opmath scalars]), else fp32, and an fp32
    ``found_inf`` (non-zero if any element of any tensor, on any rank that takes part, is
    non-finite). No host sync. When ``process_group`` is given every rank of it must call
    this, even with no tensors (and with fp64 grads, every rank must hold some).

    ``_checked`` (internal): the caller guarantees that ``tensors`` are plain (no DTensor),
    dense tensors on one device (an optimizer's cached plan, [note: cached plan]), so no
    Python code runs per tensor: the norm is the same, in the same arithmetic.
    ``_planned`` (internal, with ``_checked``): the grads are a cached plan's, read in C++
    ([note: planned calls] in fusedopt/optim/_plan.py); ``tensors`` is then empty and its
    ``grad_norm`` takes the place of ``fusedopt.ops.grad_norm``'s.
    """
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"total_norm: norm_type must be 2.0 or inf, got {norm_type}")
    reduce_op = dist.ReduceOp.SUM if norm_type == 2.0 else dist.ReduceOp.MAX
    buckets: dict[tuple, list[Tensor]] = {}
    if _planned is not None:
        groups = (process_group,) if process_group is not None else ()
        buckets[(_planned.device, groups)] = _planned
    elif _checked and tensors:
        groups = (process_group,) if process_group is not None else ()
        buckets[(tensors[0].device, groups)] = list(tensors)
    for t in () if _checked else tensors:
        local = local_tensor(t)
        buckets.setdefault((local.device, _reduce_groups(t, process_group)), []).append(local)
    if process_group is not None and not any(groups for _, groups in buckets):
        # Every rank of the group must join the collective, with or without grads.
        buckets[(_home_device(tensors, grad_scale), (process_group,))] = []
    home = next(iter(buckets))[0] if buckets else _home_device(tensors, grad_scale)
    if _checked:  # the op's norm is fp64 exactly when every tensor is
        all_fp64 = None
    else:
        all_fp64 = bool(tensors) and all(local_tensor(t).dtype == torch.float64 for t in tensors)
    dtype = torch.float64 if all_fp64 else torch.float32
    parts, flags = [], []
    for (device, groups), local in buckets.items():
        scale = grad_scale.to(device) if grad_scale is not None else None
        if local is _planned:
            norm, _, found_inf = _planned.grad_norm(norm_type, scale)
            if all_fp64 is None:
                dtype = norm.dtype
            norm = norm.to(dtype)
        elif local:
            norm, _, found_inf = ops.grad_norm(
                local, norm_type, grad_scale=scale, backend=backend, _checked=_checked
            )
            if all_fp64 is None:
                dtype = norm.dtype
            norm = norm.to(dtype)
        else:
            norm, found_inf = (
                torch.zeros((), dtype=dtype, device=device),
                torch.zeros((), device=device),
            )
        value = norm.square() if norm_type == 2.0 else norm
        if groups:
            packed = torch.stack([value, found_inf.to(dtype)])  # [note: one collective]
            for group in groups:
                dist.all_reduce(packed, op=reduce_op, group=group)
            value, found_inf = packed[0], packed[1].float()
        parts.append(value.to(home))
        flags.append(found_inf.to(home))
    if not parts:
        return torch.zeros((), dtype=dtype, device=home), torch.zeros((), device=home)
    stacked = torch.stack(parts)
    norm = stacked.sum().sqrt() if norm_type == 2.0 else stacked.max()
    return norm, torch.stack(flags).sum()


def _home_device(tensors: Sequence[Tensor], grad_scale: Tensor | None) -> torch.device:
    if tensors:
        return local_tensor(tensors[0]).device
    return grad_scale.device if grad_scale is not None else torch.device("cpu")


def clip_coef(norm: Tensor, max_norm: float) -> Tensor:
    """torch's clip coefficient ``min(1, max_norm / (norm + 1e-6))``, on the device."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``, fused for ``norm_type`` 2 and inf.

    One ``grad_norm`` pass (fp32 accumulation, deterministic) and one ``scale_`` pass per
    device; the grads are multiplied by ``min(1, max_norm / (norm + 1e-6))`` as torch does.
    Returns the total norm as a 0-d tensor, fp64 when every grad is fp64, else fp32 (torch
    returns the grads' dtype); the grads are scaled by an fp32 coefficient (``scale_``
    takes an fp32 scale). Other
    norm types defer to torch. ``foreach`` is accepted and ignored. DTensor grads (FSDP2)
    give the norm of the whole, unsharded grads; ``process_group`` sums the norm over ranks
    that hold disjoint params (``ZeroRedundancyOptimizer``).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        if process_group is not None:
            raise ValueError("clip_grad_norm_: process_group needs norm_type 2.0 or inf")
        return torch.nn.utils.clip_grad_norm_(
            parameters, max_norm, norm_type, error_if_nonfinite, foreach
        )
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads and process_group is None:
        if not parameters:
            warnings.warn("clip_grad_norm_: no parameters, nothing to clip", stacklevel=2)
        return torch.zeros(())
    norm, _ = total_norm(grads, norm_type, process_group=process_group, backend=backend)
    if error_if_nonfinite and bool(torch.logical_or(norm.isnan(), norm.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    # scale_ takes an fp32 scale: clip_grad_norm_ keeps an fp32 coefficient (a known limit).
    coef = clip_coef(norm, float(max_norm)).float()
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        local = local_tensor(g)
        by_device.setdefault(local.device, []).append(local)
    for device, local in by_device.items():
        ops.scale_(local, coef.to(device), backend=backend)
    return norm
