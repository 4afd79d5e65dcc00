"""``fusedopt.ops``: the functional layer, one function per op.

Each function validates its inputs (raising before any tensor is touched), splits the tensor
lists into calls that a kernel can take in one launch (one device, one param dtype, one grad
dtype, master weights or not), packs the hyperparameters into a small table (one row per run
of tensors sharing their values, [note: hyper table] in ``fusedopt._contract``), picks a
backend (``fusedopt._backend.resolve``) and calls ``torch.ops.fusedopt.<op>_<backend>``.
"""

from __future__ import annotations

import collections
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import torch
from torch import Tensor

from fusedopt import _contract
from fusedopt._backend import resolve as _resolve_backend
from fusedopt._dense import is_dense, needs_twin, swap_in_row_twins, swap_in_twins, write_back
from fusedopt._validate import (
    LOW_PRECISION,
    PARAM_DTYPES,
    check_lengths,
    check_like,
    check_scalar,
    check_sr_key,
    check_state,
    check_tensor,
    per_tensor,
)

Hyper = float | Sequence[float]
#: A tensor list argument: one tensor per param.
Tensors = Sequence[Tensor]


def _resolve(backend: str, device: torch.device) -> str:
    return _resolve_device_type(backend, device.type)


@torch.compiler.assume_constant_result
def _resolve_device_type(backend: str, device_type: str) -> str:
    """``fusedopt._backend.resolve`` as a compile-time constant: it imports modules and reads
    the environment, which Dynamo cannot trace (a graph break in every compiled step); the
    choice is fixed for a device type anyway, so ``torch.compile`` bakes it into the graph."""
    return _resolve_backend(backend, torch.device(device_type))


class GradNorm(tuple):
    """``(total, per_tensor, found_inf)`` from :func:`grad_norm`, all on the device."""

    __slots__ = ()

    def __new__(cls, total: Tensor, per_tensor_norms: Tensor, found_inf: Tensor):
        return super().__new__(cls, (total, per_tensor_norms, found_inf))

    total = property(lambda self: self[0])
    per_tensor = property(lambda self: self[1])
    found_inf = property(lambda self: self[2])


def _single_device(op: str, tensors: Sequence[Tensor], what: str) -> torch.device:
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(
                f"{op}: {what}[{i}] is on {t.device} but {what}[0] is on {device}; "
                "one call takes tensors on one device"
            )
    return device


def scale_(
    tensors: Sequence[Tensor],
    scale: Tensor,
    found_inf: Tensor | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Multiply every tensor in place by the device scalar ``scale`` (computed in fp32).

    If ``found_inf`` is given it is set to 1.0 when any input element is non-finite (and is
    never cleared), as ``torch._amp_foreach_non_finite_check_and_unscale_`` does.
    """
    op = "scale_"
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        check_tensor(t, f"tensors[{i}]", op, dense=False)
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: tensors[{i}] has unsupported dtype {t.dtype}")
    if not tensors:
        return
    device = _single_device(op, tensors, "tensors")
    check_scalar(scale, "scale", op, device)
    check_scalar(found_inf, "found_inf", op, device)
    handle = _contract.op_handle(op, _resolve(backend, device))
    # [note: non-dense params] in fusedopt/_dense.py
    twins = swap_in_twins(tensors, [i for i, t in enumerate(tensors) if needs_twin(t)])
    handle(tensors, scale, found_inf)
    write_back(twins)


def grad_norm(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    per_tensor: bool = False,
    grad_scale: Tensor | None = None,
    backend: str = "auto",
    _checked: bool = False,
) -> GradNorm:
    """Global L2 (``norm_type=2``) or inf norm of ``tensors / grad_scale``, in fp32.

    Deterministic (a fixed-order reduction: the same bits on every run). Returns
    :class:`GradNorm` ``(total, per_tensor, found_inf)``: 0-d total norm, the per-tensor norms
    (shape ``[N]``, or ``[0]`` unless ``per_tensor``), and 1.0 in ``found_inf`` if any element
    is non-finite. Tensors may mix dtypes, but share one device.

    ``_checked`` (internal) skips the per-tensor checks in Python: the caller guarantees dense
    tensors of the supported dtypes on one device (an optimizer's cached plan, [note: cached
    plan] in fusedopt/optim/_plan.py); the op's own checks still run on every tensor.
    """
    op = "grad_norm"
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"{op}: norm_type must be 2.0 or inf, got {norm_type}")
    tensors = list(tensors)
    if _checked and tensors:
        device = tensors[0].device
        check_scalar(grad_scale, "grad_scale", op, device)
        handle = _contract.op_handle(op, _resolve(backend, device))
        return GradNorm(*handle(tensors, norm_type, per_tensor, grad_scale))
    for i, t in enumerate(tensors):
        check_tensor(t, f"tensors[{i}]", op, dense=False, read=True)
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: tensors[{i}] has unsupported dtype {t.dtype}")
    if not tensors:
        device = grad_scale.device if grad_scale is not None else torch.device("cpu")
        zero = torch.zeros((), device=device)
        return GradNorm(zero, torch.zeros((0,), device=device), zero.clone())
    device = _single_device(op, tensors, "tensors")
    check_scalar(grad_scale, "grad_scale", op, device)
    handle = _contract.op_handle(op, _resolve(backend, device))
    # Read only: any tensor that is not dense, overlapping ones too, is read through a twin.
    swap_in_twins(tensors, [i for i, t in enumerate(tensors) if not is_dense(t)])
    return GradNorm(*handle(tensors, norm_type, per_tensor, grad_scale))


#: The step ops' specs (``fusedopt._contract``): lists, hyperparameters and flags in schema
#: order.
STEP_OPS = _contract.STEP_OPS


def _master_dtype(op: str, i: int, param: Tensor, master: Tensor) -> torch.dtype:
    """The dtype ``master_params[i]`` must have: fp32, int16 (a compact master: the
    remainder of a bf16 param, [note: compact master] in ``fusedopt._contract``) or the
    param's own dtype (a Kahan master: its compensation, [note: kahan master])."""
    if master.dtype == param.dtype:
        return param.dtype
    if master.dtype != torch.int16:
        return torch.float32
    if param.dtype != torch.bfloat16:
        raise TypeError(
            f"{op}: master_params[{i}] is int16 (a compact master) beside a {param.dtype} "
            "param; compact masters are for bfloat16 params only (fp16 is not the top half "
            "of fp32): use fp32 master weights"
        )
    return torch.int16


def _validate_step(spec: _contract.StepOpSpec, lists: dict[str, list[Tensor]]) -> torch.device:
    op = spec.name
    params, grads = lists["params"], lists["grads"]
    check_lengths(op, len(params), lists, spec.optional_lists)
    for i, p in enumerate(params):
        check_tensor(p, f"params[{i}]", op)
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: params[{i}] has unsupported dtype {p.dtype}")
    device = _single_device(op, params, "params")
    masters = lists.get("master_params", [])
    factored_contiguous = any(t.layout in ("row", "col") for t in spec.states)
    # [note: 8-bit states] (fusedopt/quant8.py): states given with their block scales are 8-bit
    quantized = {}
    for name, scales, signed in spec.quantized_states:
        if lists[scales]:
            quantized[name] = (scales, signed)
            quantized[scales] = None
    quantized = {k: v for k, v in quantized.items() if v is not None}
    if quantized and not all(lists[scales] for _, scales, _ in spec.quantized_states):
        raise ValueError(
            f"{op}: 8-bit states take the block scales of every quantized state "
            f"({', '.join(s for _, s, _ in spec.quantized_states)}), or none"
        )
    scale_lists = {scales for scales, _ in quantized.values()}
    for i, p in enumerate(params):
        g = grads[i]
        check_like(g, p, f"grads[{i}]", op, None)
        if g.dtype not in (p.dtype, torch.float32):
            raise TypeError(
                f"{op}: grads[{i}] has dtype {g.dtype}; expected {p.dtype} (the param's) or fp32"
            )
        if masters:
            if p.dtype not in LOW_PRECISION:
                raise TypeError(
                    f"{op}: master_params[{i}] given for a {p.dtype} param; master weights "
                    "are for bf16/fp16 params"
                )
            check_like(
                masters[i], p, f"master_params[{i}]", op, _master_dtype(op, i, p, masters[i])
            )
        state_dtype = _state_dtype(spec, lists, quantized, i, p, bool(masters))
        for t in spec.states:
            if lists[t.name] and t.name not in quantized and t.name not in scale_lists:
                dtype = torch.bfloat16 if t.layout == "bf16" else state_dtype
                check_state(lists[t.name][i], p, t.layout, f"{t.name}[{i}]", op, dtype)
        for name, (scales, signed) in quantized.items():
            _check_quantized(op, i, p, g, lists[name][i], lists[scales][i], name, scales, signed)
        if factored_contiguous and _contract.factored(p.shape) and not p.is_contiguous():
            raise RuntimeError(
                f"{op}: params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) is not "
                "contiguous; a param with factored states is reduced over its last two dims, "
                "which the kernels walk in row-major order: pass .contiguous() tensors"
            )
        if factored_contiguous and _contract.factored(p.shape) and not g.is_contiguous():
            raise RuntimeError(f"{op}: grads[{i}] must be contiguous, as its param")
        if lists.get("steps"):
            s = lists["steps"][i]
            check_tensor(s, f"steps[{i}]", op)
            check_scalar(s, f"steps[{i}]", op, device)
    return device


def _state_dtype(
    spec: _contract.StepOpSpec, lists: dict, quantized: dict, i: int, p: Tensor, master: bool
) -> torch.dtype:
    """The dtype every float state of ``params[i]`` must have: fp32 with master weights, else
    the param's (DESIGN.md §3); where the op declares ``state_dtypes`` ([note: state dtype]
    in fusedopt/_contract.py), the dtype of the param's first float state instead, when it
    is fp32, bf16 or fp16 and the param is not fp64."""
    default = torch.float32 if master else p.dtype
    if not spec.state_dtypes or p.dtype == torch.float64:
        return default
    for t in spec.states:
        given = lists[t.name]
        # an empty state beside a non-empty param is a placeholder; an empty param's states
        # (an empty FSDP2 shard) are all empty and keep the call's dtype
        shaped = given and (given[i].numel() or p.numel() == 0)
        if t.layout == "param" and shaped and t.name not in quantized:
            dtype = given[i].dtype if isinstance(given[i], Tensor) else default
            return dtype if dtype in _contract.STATE_DTYPES else default
    return default


def _check_quantized(
    op: str, i: int, p: Tensor, g: Tensor, codes: Tensor, scales: Tensor, name: str,
    scales_name: str, signed: bool,
) -> None:  # fmt: skip
    """An 8-bit state of ``p`` ([note: 8-bit states] in fusedopt/quant8.py): int8 (signed) or
    uint8 codes of the param's shape and its fp32 block absmaxes, all contiguous (the blocks
    are runs of the last dimension in memory), on the param's device; fp64 params refused."""
    dtype = torch.int8 if signed else torch.uint8
    where = f"{name}[{i}]"
    if p.dtype == torch.float64:
        raise TypeError(f"{op}: params[{i}] is float64; 8-bit states are for fp32/bf16/fp16")
    if not p.is_contiguous() or not g.is_contiguous():
        raise RuntimeError(
            f"{op}: params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) or its grad is "
            "not contiguous; 8-bit states quantize runs of the last dimension, which the "
            "kernels walk in row-major order: pass .contiguous() tensors"
        )
    check_state(codes, p, "param", where, op, dtype)
    if not codes.is_contiguous():
        raise RuntimeError(f"{op}: {where} must be contiguous (8-bit codes)")
    check_state(scales, p, "block_scales", f"{scales_name}[{i}]", op, torch.float32)


def _lr_arguments(op: str, lr, n: int, device: torch.device):
    """``lr`` as (per-tensor floats, lr_tensor or None)."""
    if isinstance(lr, Tensor):
        if lr.dtype != torch.float32 or lr.dim() > 1 or lr.numel() not in (1, n):
            raise TypeError(
                f"{op}: a tensor lr must be float32, 0-d or of length {n}; got shape "
                f"{tuple(lr.shape)} and dtype {lr.dtype}"
            )
        if lr.device != device:
            raise RuntimeError(f"{op}: lr is on {lr.device} but the params are on {device}")
        return [0.0] * n, lr.reshape(()) if lr.numel() == 1 else lr
    return per_tensor(op, "lr", lr, n), None


def write_hyper_table(rows: Sequence[Sequence[float]], device: torch.device, table=None) -> Tensor:
    """A float64 ``[G, K]`` hyperparameter table holding ``rows`` on ``device``
    ([note: hyper table] in fusedopt._contract): ``table`` rewritten in place when it has that
    shape and device, else a new one. No host sync: on CUDA a non-blocking copy from pinned
    memory, ordered on the current stream after every kernel that read the old values; under
    CUDA-graph capture one captured fill per value (a replay writes the captured values);
    under ``torch.compile`` a new table (a constant of the graph)."""
    if torch.compiler.is_compiling():
        return torch.tensor(rows, dtype=torch.float64, device=device)
    shape = (len(rows), len(rows[0]))
    if table is None or tuple(table.shape) != shape or table.device != device:
        table = torch.empty(shape, dtype=torch.float64, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        for g, row in enumerate(rows):
            for k, value in enumerate(row):
                table[g, k].fill_(value)
        return table
    host = torch.tensor(rows, dtype=torch.float64)
    table.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
    return table


class StepHypers(Mapping):
    """A step call's hyperparameters in the op's form ([note: hyper table]): ``table``
    (float64 ``[G, K]`` on the params' device, holding ``rows``), ``group_sizes`` (row g is
    that of the next ``group_sizes[g]`` tensors) and ``lr_tensor`` (None, or 0-d / length-N
    fp32: overrides the lr column). Read as a mapping it gives each hyperparameter's
    per-tensor values (``lr``: ``lr_tensor`` when given), for code that wants lists."""

    __slots__ = ("group_sizes", "lr_tensor", "names", "rows", "table")

    def __init__(self, names, rows, group_sizes, lr_tensor, table) -> None:
        self.names, self.rows, self.group_sizes = tuple(names), rows, list(group_sizes)
        self.lr_tensor, self.table = lr_tensor, table

    def __getitem__(self, name: str):
        if name == "lr" and self.lr_tensor is not None:
            return self.lr_tensor
        k = self.names.index(name)
        return [
            row[k] for row, n in zip(self.rows, self.group_sizes, strict=True) for _ in range(n)
        ]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _runs(rows: Sequence[tuple]) -> tuple[list[tuple], list[int]]:
    """Runs of equal consecutive rows: (the distinct rows, their run lengths)."""
    unique, sizes = [], []
    for row in rows:
        if unique and unique[-1] == row:
            sizes[-1] += 1
        else:
            unique.append(row)
            sizes.append(1)
    return unique, sizes


def hyper_table(*columns: Sequence[float], device=None) -> tuple[Tensor, list[int]]:
    """Per-tensor hyperparameter lists (one list of N floats per hyperparameter, in the op's
    order, ``lr`` first) as the op contract's ``(hypers, group_sizes)``: a float64 ``[G, K]``
    table with one row per run of tensors with equal values ([note: hyper table]). For calling
    the registered ops directly; ``fusedopt.ops`` and the optimizers build theirs."""
    unique, sizes = _runs(list(zip(*columns, strict=True)))
    table = torch.tensor(unique, dtype=torch.float64, device=device)
    return table.reshape(len(unique), len(columns)), sizes


#: Hyperparameter tables of ``fusedopt.ops`` calls, one per call site (op, device, first
#: param, tensor count), rewritten in place when the values change (an lr schedule), so that
#: the backends' cached tensor tables, which hold the table's address, stay valid.
_TABLES: collections.OrderedDict[tuple, tuple[list, Tensor]] = collections.OrderedDict()
_MAX_TABLES = 64


def _site_table(key: tuple, rows: list[tuple], device: torch.device):
    """The call site's table of ``rows``' runs, and the run lengths."""
    unique, sizes = _runs(rows)
    if torch.compiler.is_compiling():  # no cache in a traced function (nor data_ptr in the key)
        return sizes, write_hyper_table(unique, device)
    cached = _TABLES.pop(key, None)
    if cached is not None and cached[0] == unique:
        table = cached[1]
    else:
        table = write_hyper_table(unique, device, cached[1] if cached else None)
    _TABLES[key] = (unique, table)
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return sizes, table


def step(
    op: str,
    lists: dict[str, Sequence[Tensor]],
    hypers: dict[str, Hyper | Tensor] | StepHypers,
    flags: dict[str, bool],
    *,
    grad_scale: Tensor | None = None,
    clip_coef: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str = "auto",
    inputs: dict[str, Tensor] | None = None,
    sr_key: Tensor | None = None,
    _checked: bool = False,
) -> Tensor | None:
    """Run the step op ``op`` (``adamw_``, ``lamb_``, ``lion_``, ``adan_``,
    ``schedulefree_adamw_``, ``sgd_``), or one
    pass of a multi-pass one (``lamb_direction_``, ``lamb_apply_``: ``_contract.PHASE_OPS``),
    over tensor lists.

    ``lists`` maps each list name of the op's schema to its tensors (optional ones may be
    omitted); ``hypers`` maps each hyperparameter to a float (all tensors) or one float per
    tensor (``lr`` may also be a 0-d or length-N fp32 device tensor), or is a
    :class:`StepHypers` table already in the op's form; ``flags`` the per-call switches. The
    lists are split into one backend call per (param dtype, grad dtype, master dtype or no
    master), each a single multi-tensor launch. A master is fp32, int16 beside a bf16
    param (a compact master, [note: compact master] in ``fusedopt._contract``) or of the
    param's own dtype (a Kahan compensation, [note: kahan master]).

    A pass takes its step op's lists, hyperparameters and flags, and its own per-call tensors
    in ``inputs`` (``sq_norms``: one row per tensor, in the order of ``lists``); it returns
    its output (``lamb_direction_``'s ``sq_norms``, rows in that order), else None.

    ``master_sync`` (a flag; True when omitted) makes every master param first adopt the value
    of a param written since the last step ([note: master sync] in ``fusedopt._contract``).

    ``sr_key`` (bf16 params without master weights only): round the param store
    stochastically, with the random bits keyed by ``sr_key`` = [seed, counter, id_0, ...,
    id_{N-1}] (int64, on the params' device; one id per param of ``lists``, in order). The op
    only reads it: the caller advances the counter between steps (the optimizers do, on the
    device). [note: stochastic rounding] in ``csrc/include/fusedopt/dtype.h``.

    ``_checked`` (internal) skips the per-tensor checks and the split: the optimizer classes
    check every grad themselves (to name the param), create or load every state in the
    param's layout, and pass one param dtype and one grad dtype per call, so redoing that
    work for ~4 tensors per param on every step would only cost time ([note: cached plan] in
    fusedopt/optim/_plan.py).
    """
    phase = _contract.PHASE_OPS.get(op)
    spec = phase.step if phase is not None else STEP_OPS[op]
    lists = {name: list(lists.get(name, ())) for name in spec.lists}
    n = len(lists["params"])
    if n == 0:
        return torch.zeros((0, 2)) if phase is not None and phase.returns else None
    # Non-dense params go through dense twins ([note: non-dense params] in fusedopt/_dense.py);
    # the optimizer classes swap theirs in themselves, at planned positions.
    written = tuple(name for name in spec.lists if name != "grads")
    twins = [] if _checked else swap_in_row_twins(lists, written)
    device = lists["params"][0].device if _checked else _validate_step(spec, lists)
    # [note: opmath scalars] fp64 params take grad_scale and clip_coef in fp64 as well.
    params = lists["params"]
    fp64 = all(p.dtype == torch.float64 for p in (params[:1] if _checked else params))
    check_scalar(grad_scale, "grad_scale", op, device, allow_fp64=fp64)
    check_scalar(clip_coef, "clip_coef", op, device, allow_fp64=fp64)
    check_scalar(found_inf, "found_inf", op, device)
    check_sr_key(sr_key, op, params, lists.get("master_params", ()),
                 spec.free_state_dtype(lists))  # fmt: skip
    handle = _contract.op_handle(op, _resolve(backend, device))
    extra = _phase_inputs(phase, inputs or {}, params, device)
    call_flags = [bool(flags[f]) for f in spec.flags]
    master_sync = bool(flags.get("master_sync", True))

    def call(call_lists, table, group_sizes, call_extra, lr_tensor, key) -> Tensor | None:
        return handle(
            *call_lists, table, group_sizes, *call_flags, *call_extra, lr_tensor, grad_scale,
            clip_coef, found_inf, master_sync, key,
        )  # fmt: skip

    if isinstance(hypers, StepHypers):  # the optimizers' cached table: one call as is
        out = call(
            [lists[name] for name in spec.lists],
            hypers.table,
            hypers.group_sizes,
            extra,
            hypers.lr_tensor,
            sr_key,
        )
        write_back(twins)
        return out
    lr_values, lr_tensor = _lr_arguments(op, hypers["lr"], n, device)
    columns = [lr_values] + [per_tensor(op, h, hypers[h], n) for h in spec.hypers[1:]]
    rows = list(zip(*columns, strict=True))
    out = None

    groups: dict[tuple, list[int]] = {}
    if _checked:
        groups[()] = list(range(n))
    else:
        masters = lists.get("master_params") or [None] * n
        for i, (p, g) in enumerate(zip(lists["params"], lists["grads"], strict=True)):
            master = None if masters[i] is None else masters[i].dtype
            states = tuple(lists[t.name][i].dtype for t in spec.states if lists[t.name])
            groups.setdefault((p.dtype, g.dtype, master, states), []).append(i)
    for index in groups.values():
        whole = len(index) == n

        def pick(seq, index=index, whole=whole):
            return list(seq) if whole or not seq else [seq[i] for i in index]

        group_lr_tensor = lr_tensor
        if lr_tensor is not None and lr_tensor.dim() == 1 and not whole:
            group_lr_tensor = lr_tensor[torch.tensor(index, device=device)]
        call_params = pick(params)
        key = (op, device, call_params[0].data_ptr(), len(call_params))
        sizes, table = _site_table(key, pick(rows), device)
        at = None if whole else torch.tensor(index, device=device)
        key = sr_key if sr_key is None or whole else torch.cat((sr_key[:2], sr_key[2:][at]))
        result = call(
            [pick(lists[name]) for name in spec.lists],
            table,
            sizes,
            [x if whole else x[at] for x in extra],
            group_lr_tensor,
            key,
        )
        if result is not None and whole:
            out = result
        elif result is not None:
            if out is None:
                fp64 = all(p.dtype == torch.float64 for p in params)
                out = result.new_zeros((n, *result.shape[1:]), dtype=_opmath(fp64))
            out[at] = result.to(out.dtype)
    write_back(twins)
    return out


def _opmath(fp64: bool) -> torch.dtype:
    return torch.float64 if fp64 else torch.float32


def _phase_inputs(phase, inputs: dict[str, Tensor], params: list[Tensor], device) -> list:
    """A pass's own tensors (``sq_norms``), checked: [N, 2] in the params' opmath, on their
    device, before any tensor is touched."""
    if phase is None:
        return []
    extra = []
    for name in phase.inputs:
        x = inputs.get(name)
        dtype = _opmath(all(p.dtype == torch.float64 for p in params))
        if not isinstance(x, Tensor) or x.shape != (len(params), 2) or x.dtype != dtype:
            got = f"shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, Tensor) else x
            raise TypeError(
                f"{phase.name}: {name} must be a {dtype} tensor of shape "
                f"({len(params)}, 2) (the output of {phase.step_op}'s first pass); got {got}"
            )
        if x.device != device:
            raise RuntimeError(
                f"{phase.name}: {name} is on {x.device} but the params are on {device}"
            )
        extra.append(x)
    return extra


class StepOptions(TypedDict, total=False):
    """The keyword arguments every public step wrapper ends with: ``master_params`` (one fp32
    master per bf16/fp16 param, or one int16 remainder per bf16 param: a compact master,
    [note: compact master] in ``fusedopt._contract``; or one compensation of the param's dtype
    per bf16/fp16 param: a Kahan master, [note: kahan master]; or none), ``master_sync`` ([note:
    master sync] in ``fusedopt._contract``; default True), the common device scalars ``grad_scale``,
    ``clip_coef`` and ``found_inf`` (default None), ``backend`` (default ``"auto"``) and
    ``sr_key`` (default None: stochastic rounding of bf16 params without master weights,
    :func:`step`)."""

    master_params: Sequence[Tensor]
    master_sync: bool
    sr_key: Tensor | None
    grad_scale: Tensor | None
    clip_coef: Tensor | None
    found_inf: Tensor | None
    backend: str


#: :class:`StepOptions`' defaults.
STEP_OPTION_DEFAULTS: dict = {
    "master_params": (), "master_sync": True, "grad_scale": None, "clip_coef": None,
    "found_inf": None, "backend": "auto", "sr_key": None,
}  # fmt: skip


def _step_from_arguments(op: str, arguments: dict) -> Tensor | None:
    """:func:`step` with the arguments of a public wrapper (its ``locals()``, the
    :class:`StepOptions` in ``options``), sorted into lists, hyperparameters and flags by the
    op's spec, so that no wrapper re-lists them.
    A list that a flag switches (``present_iff``) is passed only when the flag is set; steps
    that go with a list (``steps_with``) must be given with it or not at all."""
    unknown = set(arguments["options"]) - set(STEP_OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword arguments {sorted(unknown)}")
    arguments = {**STEP_OPTION_DEFAULTS, **arguments, **arguments["options"]}
    phase = _contract.PHASE_OPS.get(op)
    spec = phase.step if phase is not None else STEP_OPS[op]
    lists = {name: arguments[name] for name in spec.lists}
    for t in spec.tensor_lists:
        if t.present_iff is None:
            continue
        if not arguments[t.present_iff]:
            lists[t.name] = ()
        elif len(lists[t.name]) != len(lists["params"]):
            raise ValueError(f"{op}: {t.present_iff}=True needs one {t.name} tensor per param")
    if spec.steps_with is not None and bool(lists[spec.steps_with]) != bool(lists["steps"]):
        raise ValueError(f"{op}: pass both {spec.steps_with} and steps, or neither")
    return step(
        op,
        lists,
        {h: arguments[h] for h in spec.hypers},
        {f: arguments[f] for f in (*spec.flags, *(c.name for c in _contract.COMMON_FLAGS))},
        grad_scale=arguments["grad_scale"],
        clip_coef=arguments["clip_coef"],
        found_inf=arguments["found_inf"],
        backend=arguments["backend"],
        inputs={name: arguments[name] for name in (phase.inputs if phase else ())},
        sr_key=arguments["sr_key"],
    )


def _pass_op(
    op: str, step_op: Callable, doc: str, step_arguments: Callable[[dict], dict] = dict
) -> Callable:
    """The public wrapper of the pass ``op`` of ``step_op`` ([note: multi-pass ops] in
    DESIGN.md §2): it takes the step op's positional lists, then the pass's own inputs
    (``PHASE_OPS[op].inputs``), then the step op's keywords, bound, with their defaults, by
    the step op's signature (an unknown keyword is a ``TypeError``, as for the step op) and
    passed through ``step_arguments`` (the step op's own conversions); it returns what the
    pass returns."""
    spec = _contract.PHASE_OPS[op]
    step_signature = inspect.signature(step_op)
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    lists = [p for p in step_signature.parameters.values() if p.kind == positional]
    inputs = [inspect.Parameter(name, positional, annotation=Tensor) for name in spec.inputs]
    keywords = inspect.Parameter("keywords", inspect.Parameter.VAR_KEYWORD, annotation=Any)
    signature = inspect.Signature(
        [*lists, *inputs, keywords], return_annotation=Tensor if spec.returns else None
    )

    def run_pass(*args: Any, **kwargs: Any) -> Tensor | None:
        arguments = signature.bind(*args, **kwargs).arguments
        own = {name: arguments.pop(name) for name in spec.inputs}
        bound = step_signature.bind(**arguments.pop("keywords", {}), **arguments)
        bound.apply_defaults()
        return _step_from_arguments(op, {**step_arguments(bound.arguments), **own})

    run_pass.__name__ = run_pass.__qualname__ = op
    run_pass.__doc__ = doc
    run_pass.__signature__ = signature
    return run_pass


def adamw_(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: Tensors, *,
    lr: Hyper | Tensor, beta1: Hyper = 0.9, beta2: Hyper = 0.999, eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2, decoupled: bool = True, amsgrad: bool = False,
    maximize: bool = False, bias_correction: bool = True, max_exp_avg_sqs: Tensors = (),
    exp_avg_scales: Tensors = (), exp_avg_sq_scales: Tensors = (),
    **options: Unpack[StepOptions],
) -> None:  # fmt: skip
    """One Adam/AdamW step in place (``decoupled=False`` is Adam's L2 decay); fp32 math.

    8-bit states: ``exp_avgs`` int8 and ``exp_avg_sqs`` uint8 codes, with their fp32 block
    absmaxes in ``exp_avg_scales`` and ``exp_avg_sq_scales`` (``fusedopt.quant8``: the codes,
    the block shape, the exact rounding), dequantized, stepped and requantized in the one
    pass ([note: 8-bit states] in fusedopt/quant8.py)."""
    _step_from_arguments("adamw_", locals())


def lamb_(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: Tensors, *,
    lr: Hyper | Tensor, beta1: Hyper = 0.9, beta2: Hyper = 0.999, eps: Hyper = 1e-6,
    weight_decay: Hyper = 0.01, grad_averaging: bool = True, bias_correction: bool = True,
    trust_clip: bool = False, always_adapt: bool = False, exp_avg_scales: Tensors = (),
    exp_avg_sq_scales: Tensors = (), **options: Unpack[StepOptions],
) -> None:  # fmt: skip
    """One LAMB step in place (timm semantics; fold the global clip into ``clip_coef``).

    8-bit states as :func:`adamw_`'s (``exp_avg_scales``, ``exp_avg_sq_scales``); the codes
    are written once, by the second pass ([note: lamb passes])."""
    _step_from_arguments("lamb_", locals())


lamb_direction_ = _pass_op(
    "lamb_direction_",
    lamb_,
    """LAMB's first pass; takes :func:`lamb_`'s keywords, with its defaults. Advances
    ``steps`` and returns ``sq_norms`` [N, 2] (fp32; fp64 for fp64 params), the sums of p² and
    u² over each tensor that adapts (0 for the others), deterministic. Sum the rows over the
    shards of a sharded param (an all-reduce), then call :func:`lamb_apply_` with the same
    arguments; the two are :func:`lamb_`, bit for bit. ``lr`` is not read here.""",
)
lamb_apply_ = _pass_op(
    "lamb_apply_",
    lamb_,
    """LAMB's second pass, after :func:`lamb_direction_` with the same arguments (and
    :func:`lamb_`'s keywords): the trust ratio ``sqrt(sq_norms[i, 0]) / sqrt(sq_norms[i, 1])`` of
    each tensor, then ``p -= lr * ratio * u`` (fp32 math; fp64 for fp64 params). Reads
    ``steps``, writes none.""",
)


def lion_(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, *, lr: Hyper | Tensor,
    beta1: Hyper = 0.9, beta2: Hyper = 0.99, weight_decay: Hyper = 0.0, maximize: bool = False,
    exp_avg_scales: Tensors = (), **options: Unpack[StepOptions],
) -> None:  # fmt: skip
    """One Lion step in place (lion-pytorch semantics, ``sign(0) = 0``); fp32 math. 8-bit
    state: ``exp_avgs`` int8 codes with their fp32 block absmaxes in ``exp_avg_scales``
    ([note: 8-bit states] in fusedopt/quant8.py)."""
    _step_from_arguments("lion_", locals())


def adan_(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
    exp_avg_diffs: Tensors, neg_pre_grads: Tensors, steps: Tensors, *, lr: Hyper | Tensor,
    beta1: Hyper = 0.98, beta2: Hyper = 0.92, beta3: Hyper = 0.99, eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0, no_prox: bool = False, **options: Unpack[StepOptions],
) -> None:  # fmt: skip
    """One Adan step in place (the official Adan's conventions: betas are EMA weights,
    ``neg_pre_grads`` hold the previous step's ``-grad`` and are ignored at step 1;
    ``no_prox=False`` divides by ``1 + lr*weight_decay``); fp32 math."""
    _step_from_arguments("adan_", locals())


def schedulefree_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr: Hyper | Tensor,
    ckp1: Hyper,
    bias_correction2: Hyper,
    beta1: Hyper = 0.9,
    beta2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    **options: Unpack[StepOptions],
) -> None:
    """One Schedule-Free AdamW step in place (the schedulefree package's ``AdamWScheduleFree``):
    ``params`` hold y, ``zs`` the base sequence z. ``lr`` is the step's lr (warmup applied),
    ``ckp1`` the averaging weight ``weight / weight_sum`` and ``bias_correction2``
    ``1 - beta2**k``: the per-step scalars that ``fusedopt.ScheduleFreeAdamW`` computes on the
    host; fp32 math."""
    _step_from_arguments("schedulefree_adamw_", locals())


def sgd_(
    params: Tensors, grads: Tensors, momentum_buffers: Tensors = (), steps: Tensors = (), *,
    lr: Hyper | Tensor, momentum: Hyper = 0.0, dampening: Hyper = 0.0, weight_decay: Hyper = 0.0,
    nesterov: bool = False, maximize: bool = False, momentum_buffer_scales: Tensors = (),
    **options: Unpack[StepOptions],
) -> None:  # fmt: skip
    """One SGD step in place (torch.optim.SGD semantics); pass ``momentum_buffers`` and
    ``steps`` (both, or neither when momentum is 0); fp32 math. 8-bit buffers: int8 codes
    with their fp32 block absmaxes in ``momentum_buffer_scales`` ([note: 8-bit states] in
    fusedopt/quant8.py)."""
    _step_from_arguments("sgd_", locals())


def adafactor_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    row_vars: Sequence[Tensor],
    col_vars: Sequence[Tensor],
    variances: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: Hyper | Tensor = 1e-2,
    beta2_decay: Hyper = -0.8,
    eps1: Hyper | None = None,
    eps2: Hyper = 1e-3,
    d: Hyper = 1.0,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
    **options: Unpack[StepOptions],
) -> None:
    """One Adafactor step in place (torch.optim.Adafactor semantics; fp32 math, fp64 for fp64
    params). A param of two or more dims keeps ``row_vars[i]`` (its shape with the last dim
    1) and ``col_vars[i]`` (the second-to-last dim 1) and a ``(0,)`` placeholder in
    ``variances``; any other param keeps ``variances[i]`` (its shape) and placeholders in the
    other two ([note: factored layouts] in fusedopt._contract). ``eps1=None`` is torch's
    ``finfo(param dtype).eps``. Three passes: :func:`adafactor_norms_`, then
    :func:`adafactor_apply_` ([note: adafactor passes])."""
    _step_from_arguments("adafactor_", _adafactor_eps(locals()))


def _adafactor_eps(arguments: dict) -> dict:
    """``eps1=None`` as the op's ``eps1 < 0``: the eps of the update's dtype (the param's,
    fp32 with master weights)."""
    eps1 = arguments["eps1"]
    if eps1 is None:
        arguments["eps1"] = -1.0
    elif not isinstance(eps1, (int, float)):
        arguments["eps1"] = [-1.0 if e is None else e for e in eps1]
    return arguments


adafactor_norms_ = _pass_op(
    "adafactor_norms_",
    adafactor_,
    """Adafactor's reductions; takes :func:`adafactor_`'s keywords. Advances ``steps``,
    updates the second moments and returns ``sq_norms`` [N, 2] (fp32; fp64 for fp64
    params): ``sum(p²)`` and ``sum(u²)`` of the unclipped update of each tensor,
    deterministic. Then :func:`adafactor_apply_` with the same arguments.""",
    _adafactor_eps,
)
adafactor_apply_ = _pass_op(
    "adafactor_apply_",
    adafactor_,
    """Adafactor's update, after :func:`adafactor_norms_` with the same arguments: ``alpha``
    from ``sqrt(sq_norms[i, 0] / numel)``, the clip ``max(1, sqrt(sq_norms[i, 1] / numel) /
    d)``, then ``p = p*(1 - lr*wd) - alpha/clip * u``. Reads ``steps``, writes none.""",
    _adafactor_eps,
)


def muon_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    ns_buffers: Sequence[Tensor],
    *,
    lr: Hyper | Tensor,
    momentum: Hyper = 0.95,
    weight_decay: Hyper = 0.1,
    lr_ratio: Hyper = 1.0,
    ns_a: Hyper = 3.4445,
    ns_b: Hyper = -4.7750,
    ns_c: Hyper = 2.0315,
    ns_eps: Hyper = 1e-7,
    ns_steps: Hyper = 5,
    nesterov: bool = True,
    **options: Unpack[StepOptions],
) -> None:
    """One Muon step in place (torch.optim.Muon semantics) on 2-D params: the momentum pass,
    the bf16 Newton-Schulz iteration of each ``ns_buffers[i]`` (a bf16 scratch of the
    param's shape) one matrix at a time, and the apply pass, with ``p -= lr*lr_ratio*O``
    (``lr_ratio``: the ``adjust_lr_fn`` factor of the param's shape). ``fusedopt.Muon``
    batches the Newton-Schulz GEMMs over params of one shape instead; fp32 elementwise math."""
    _step_from_arguments("muon_", locals())


muon_momentum_ = _pass_op(
    "muon_momentum_",
    muon_,
    """Muon's first pass; takes :func:`muon_`'s keywords. ``buf = lerp(buf, g, 1-momentum)``
    and ``ns_buffers[i] = bf16(lerp(g, buf, momentum))`` (Nesterov) or ``bf16(buf)``.""",
)
muon_apply_ = _pass_op(
    "muon_apply_",
    muon_,
    """Muon's second pass; takes :func:`muon_`'s keywords. With the Newton-Schulz output O
    in ``ns_buffers``: ``p = p*(1 - lr*weight_decay) - lr*lr_ratio*O`` (fp32 math).""",
)
