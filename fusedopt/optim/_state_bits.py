"""8-bit optimizer states in the optimizer classes (``state_bits=8``, a group key).

[note: 8-bit states] in fusedopt/quant8.py has the format. Here: which state keys of an op
are 8-bit and where their block absmaxes go, the checks a param must pass, and the
conversion of a param's states when its group's ``state_bits`` changed since they were made
(a group key set mid-run, or a state dict saved with the other setting): at the next step,
values are quantized, or codes dequantized, exactly as the step would.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from fusedopt import quant8
from fusedopt._contract import STATE_DTYPES, STEP_OPS
from fusedopt.clip import local_tensor
from fusedopt.optim._keys import SR_GROUP_KEY, STATE_DTYPE_KEY


@functools.cache
def quantized_keys(op: str) -> dict[str, tuple[str, bool]]:
    """state key -> (its scales' state key, signed) for the states of ``op`` that may be
    8-bit."""
    spec = STEP_OPS[op]
    key_of = {t.name: t.state_key for t in spec.states}
    return {
        key_of[name]: (key_of[scales], signed) for name, scales, signed in spec.quantized_states
    }


@functools.cache
def scale_keys(op: str) -> frozenset[str]:
    """The state keys of ``op`` that hold block absmaxes (fp32 whatever the param)."""
    return frozenset(scales for scales, _ in quantized_keys(op).values())


def eight_bit(group: dict[str, Any]) -> bool:
    """Whether ``group`` keeps 8-bit states."""
    return group.get("state_bits") == 8


def check_state_bits_value(group: dict[str, Any]) -> None:
    """A group's ``state_bits``: None (the default: states in the param's dtype, fp32 with
    masters) or 8; 8 only where the op has 8-bit states and without amsgrad."""
    bits = group.get("state_bits")
    if bits is None:
        return
    if bits != 8 or isinstance(bits, bool):
        raise ValueError(f"Invalid state_bits: {bits!r} (None or 8)")
    if group.get("amsgrad"):
        raise ValueError("state_bits=8 with amsgrad=True is not supported (max_exp_avg_sq "
                         "has no 8-bit form): use amsgrad=False or state_bits=None")  # fmt: skip


def check_state_dtype(group: dict[str, Any], op: str, params: Any = None) -> None:
    """A group's ``state_dtype`` ([note: state dtype] in csrc/include/fusedopt/dtype.h): None,
    or fp32, bf16 or fp16 where ``op`` declares ``state_dtypes``; not with ``state_bits=8``
    (8-bit codes are their own storage); not fp16 with ``stochastic_rounding`` (stochastic
    rounding stores bf16 only); not beside fp64 or complex params (``params``: the group's
    by default). A ValueError before any tensor is touched."""
    dtype = group.get(STATE_DTYPE_KEY)
    if dtype is None:
        return
    if dtype not in STATE_DTYPES or not isinstance(dtype, torch.dtype):
        raise ValueError(f"Invalid state_dtype: {dtype!r} (None, torch.float32, torch.bfloat16 "
                         "or torch.float16)")  # fmt: skip
    if not STEP_OPS[op].state_dtypes:
        raise ValueError(
            f"state_dtype is not supported by {op} yet: its states are fp32 with master "
            "weights, else in the param's dtype (use state_dtype=None)"
        )
    if eight_bit(group):
        raise ValueError(f"state_dtype={dtype} with state_bits=8: the moments are 8-bit codes; "
                         "use one of the two")  # fmt: skip
    if dtype == torch.float16 and group.get(SR_GROUP_KEY, False):
        raise ValueError("state_dtype=torch.float16 with stochastic_rounding=True is not "
                         "supported (stochastic rounding stores bf16 only): use torch.bfloat16 "
                         "states, or stochastic_rounding=False")  # fmt: skip
    for p in group.get("params", ()) if params is None else params:
        if local_tensor(p).dtype == torch.float64 or p.is_complex():
            raise ValueError(f"state_dtype={dtype} beside a {p.dtype} param (shape "
                             f"{tuple(p.shape)}): fp64 and complex params keep states of "
                             "their own dtype")  # fmt: skip


def state_dtype(group: dict[str, Any], op: str, param_dtype: torch.dtype,
                master: bool) -> torch.dtype:  # fmt: skip
    """The dtype of a param's float states: the group's ``state_dtype`` where ``op`` declares
    ``state_dtypes``, else (and for None) fp32 with master weights, else the param's."""
    dtype = group.get(STATE_DTYPE_KEY) if STEP_OPS[op].state_dtypes else None
    if dtype is None or param_dtype == torch.float64:
        return torch.float32 if master else param_dtype
    return dtype


def convert_dtype(state: dict, op: str, dtype: torch.dtype) -> None:
    """[note: state dtype]: the float states of ``op`` (not the step, masters or 8-bit codes
    and absmaxes) cast to ``dtype`` where they have another (a group key changed mid-run, a
    state dict saved with another one): rounded to nearest, as torch casts."""
    for t in STEP_OPS[op].states:
        if t.layout != "param" or not t.state_key:
            continue
        value = state.get(t.state_key)
        # Only between fp32, bf16 and fp16: an fp64 param's states are fp64 from the start,
        # and a param whose .data became fp64 after its states were made is refused by the
        # plan ([note: re-laid state] in _plan.py), not converted.
        if (isinstance(value, Tensor) and value.dtype in STATE_DTYPES and dtype in STATE_DTYPES
                and value.dtype != dtype):  # fmt: skip
            state[t.state_key] = value.to(dtype)


def check_param(where: str, p: Tensor, local_p: Tensor) -> None:
    """A param that may keep 8-bit states: fp32/bf16/fp16, real, contiguous; a DTensor
    (FSDP2) only where its shards hold whole blocks: replicated, or sharded on dims before
    the last one. A 1-D param sharded on dim 0 (FSDP2's biases and norms) is refused, since
    its shards cut blocks ([note: 8-bit states under FSDP2] in fusedopt/quant8.py)."""
    if local_p.dtype == torch.float64 or p.is_complex():
        raise TypeError(f"{where}: state_bits=8 needs fp32, bf16 or fp16 params; got {p.dtype}")
    if not local_p.is_contiguous():
        raise RuntimeError(
            f"{where}: state_bits=8 needs a contiguous param (its blocks are runs of the last "
            f"dimension in memory); got shape {tuple(p.shape)}, strides {local_p.stride()}"
        )
    if local_p is p:
        return
    for placement in p.placements:
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard have one
        if placement.is_replicate() or (dim is not None and dim % max(p.dim(), 1) < p.dim() - 1):
            continue
        raise ValueError(
            f"{where}: state_bits=8 on a DTensor param of shape {tuple(p.shape)} placed "
            f"{placement}: its shards would cut the 256-element blocks of its last dimension, "
            "so its 8-bit states would depend on the mesh. Put it in a param group with "
            "state_bits=None (FSDP2 shards 1-D params, biases and norms, on their only dim: "
            "[note: 8-bit states under FSDP2] in fusedopt/quant8.py)"
        )


def _as_param_state(
    p: Tensor, local: Tensor, shape: tuple[int, ...], stride: tuple[int, ...] | None = None
) -> Tensor:
    """``local`` (a state of ``p``'s local shard) as a state of ``p``: itself for a plain
    param; for a DTensor one, a DTensor of global ``shape`` (and ``stride``, contiguous by
    default) with ``p``'s mesh and placements, whose shards are the states of ``p``'s shards
    ([note: 8-bit states under FSDP2] in fusedopt/quant8.py: codes and scales shard on the
    same dims as the param)."""
    if local_tensor(p) is p:
        return local
    from torch.distributed.tensor import DTensor

    if stride is None:
        stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)  # fmt: skip


def empty_state(key: str, op: str, p: Tensor, dtype: torch.dtype) -> Tensor | None:
    """An uninitialised 8-bit state of ``p`` under ``key`` in ``dtype``: codes of the param's
    shape or absmaxes of :func:`quant8.scale_shape`, contiguous, a DTensor placed as ``p``
    when ``p`` is one; None when ``key`` is no 8-bit state or absmax key of ``op``."""
    if key in quantized_keys(op):
        shape_of = tuple
    elif key in scale_keys(op):
        shape_of = quant8.scale_shape
    else:
        return None
    local_p = local_tensor(p)
    local = torch.empty(shape_of(local_p.shape), dtype=dtype, device=local_p.device)
    return _as_param_state(p, local, shape_of(p.shape))


def convert(state: dict, op: str, q8: bool, dtype: torch.dtype, p: Tensor) -> None:
    """Make ``state``'s moments 8-bit (``q8``) or plain (``dtype``, in ``p``'s layout) if
    they are the other: quantized with fresh block absmaxes, or dequantized (the absmaxes
    dropped). States not made yet are left to be made. A DTensor param's states are
    converted shard by shard: its shards hold whole blocks (:func:`check_param`)."""
    local_p = local_tensor(p).detach()
    for key, (scales, signed) in quantized_keys(op).items():
        value = state.get(key)
        if value is None:
            state.pop(scales, None)
            continue
        if q8 and not quant8.is_quantized(value):
            local = local_tensor(value).detach().to(torch.float32)
            codes, absmax = quant8.quantize(local, signed)
            state[key] = _as_param_state(p, codes, tuple(p.shape))
            state[scales] = _as_param_state(p, absmax, quant8.scale_shape(p.shape))
        elif not q8 and quant8.is_quantized(value):
            values = quant8.dequantize(local_tensor(value), local_tensor(state.pop(scales)))
            local = torch.empty_like(local_p, dtype=dtype).copy_(values)
            state[key] = _as_param_state(p, local, tuple(p.shape), p.stride())
        elif not q8:
            state.pop(scales, None)


def new_state(key: str, op: str, p: Tensor) -> Tensor | None:
    """A fresh zero 8-bit state of ``p`` under ``key`` (codes or absmaxes; a DTensor placed as
    ``p`` when ``p`` is one), or None when ``key`` is no 8-bit state of ``op``."""
    quantized = quantized_keys(op)
    if key in quantized:
        dtype = quant8.SIGNED_DTYPE if quantized[key][1] else quant8.UNSIGNED_DTYPE
    elif key in scale_keys(op):
        dtype = torch.float32
    else:
        return None
    return empty_state(key, op, p, dtype).zero_()


def planned_dtype(key: str, op: str, q8: bool, dtype: torch.dtype) -> torch.dtype:
    """The dtype a state under ``key`` has in a call: codes and absmaxes in an 8-bit group,
    else ``dtype``."""
    if not q8:
        return dtype
    quantized = quantized_keys(op)
    if key in quantized:
        return quant8.SIGNED_DTYPE if quantized[key][1] else quant8.UNSIGNED_DTYPE
    if key in scale_keys(op):
        return torch.float32
    return dtype


def loaded_dtype(key: str, op: str, value: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a loaded state takes: codes stay codes and absmaxes fp32 (converted at the
    next step if the group's ``state_bits`` says otherwise), else ``dtype``."""
    if key in quantized_keys(op) and quant8.is_quantized(value):
        return value.dtype
    if key in scale_keys(op):
        return torch.float32
    return dtype


def with_scales(op: str, group: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, ...]:
    """A group's state ``keys`` and, in an 8-bit group, the block-absmax keys of those of
    them that ``op`` keeps 8-bit (the keys an optimizer's ``_state_keys`` returns)."""
    if not eight_bit(group):
        return keys
    quantized = quantized_keys(op)
    return (*keys, *(quantized[k][0] for k in keys if k in quantized))
