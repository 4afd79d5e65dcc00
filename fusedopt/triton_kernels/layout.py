"""A step op's table layout and arguments, derived from its spec (``fusedopt._contract``).

The tensor table of a step call has one address column per tensor list, in schema order, then
the address of the tensor's row in the call's hyperparameter table (``multi_tensor``;
[note: hyper table] in ``fusedopt._contract``). :func:`layout` names the slots and the
hyperparameter table's columns as constexprs, so that kernels read
``slot(row, L.EXP_AVGS, ...)`` and ``hyper(row, L.N_SLOTS, L.BETA1)`` instead of bare
numbers; :func:`bind` turns a call's positional arguments (schema order) into the lists,
hyperparameter rows, flags and common scalars a launch needs, so that no wrapper re-lists the
schema.
"""

from __future__ import annotations

import dataclasses
import types

import torch
import triton.language as tl
from torch import Tensor

from fusedopt import _contract
from fusedopt._validate import check_sr_key

from . import common
from .multi_tensor import Launch, TableCache, dtype_arguments, scalar_arguments


def layout(op: str) -> types.ModuleType:
    """The constexpr column names of ``op``'s tables: each tensor list's slot (``PARAMS``,
    ``GRADS``, ``EXP_AVGS``..., ``MASTER_PARAMS``, ``STEPS``), ``N_SLOTS``, and each
    hyperparameter's column in the hyperparameter table (``LR``, ``BETA1``...).

    A module object, because jit code may read the attributes of a module global (and only
    constexpr or module globals)."""
    spec = _contract.STEP_OPS[op]
    names = types.ModuleType(f"{op}layout", f"Table columns of {op} (triton_kernels.layout).")
    for k, name in enumerate(spec.lists):
        setattr(names, name.upper(), tl.constexpr(k))
    names.N_SLOTS = tl.constexpr(len(spec.lists))
    for k, name in enumerate(spec.hypers):
        setattr(names, name.upper(), tl.constexpr(k))
    return names


@dataclasses.dataclass
class StepArguments:
    """A step call's arguments, sorted by the op's spec."""

    named: dict[str, object]  # every argument by its schema name
    lists: list[list[Tensor]]  # the tensor lists, in schema order (table slots)
    hyper_rows: list[int]  # each tensor's row address in the hyperparameter table
    flags: dict[str, bool]  # the per-call flags as constexpr kernel arguments (upper case)
    scalars: tuple[Tensor | None, ...]  # lr_tensor, grad_scale, clip_coef, found_inf, sr_key
    step_slots: tuple[int, ...]  # slots read as scalars (the step counts)
    # Set by ``prepare``:
    dtypes: dict | None = None  # P_DTYPE, G_DTYPE, S_DTYPE, COMPUTE, MASTER constexprs
    launch: Launch | None = None
    scalar_tensors: list[Tensor] | None = None  # the common scalars as kernel arguments
    scalar_flags: dict | None = None  # LR_MODE, HAS_GRAD_SCALE, HAS_CLIP, HAS_FOUND_INF

    def options(self) -> dict:
        """The constexpr and launch options every step kernel of the call takes: WIDTH, the
        dtypes, the common scalars' flags, the op's flags, ALIGNED and LAUNCH_OPTIONS."""
        return {
            "WIDTH": self.launch.width, **self.dtypes, **self.scalar_flags, **self.flags,
            "ALIGNED": self.launch.aligned, **common.LAUNCH_OPTIONS,
        }  # fmt: skip

    def __getattr__(self, name: str):
        try:
            return self.__dict__["named"][name]
        except KeyError:
            raise AttributeError(name) from None


def bind(op: str, args: tuple) -> StepArguments:
    """``op``'s positional arguments (the schema order) by name; the common flags
    (``master_sync``) may be left out, then they take their schema default."""
    spec = _contract.STEP_OPS[op]
    names = (*spec.lists, "hypers", "group_sizes", *spec.flags, *_contract.COMMON_SCALARS)
    defaults = {f.name: f.default for f in _contract.COMMON_FLAGS}  # schema defaults
    defaults[_contract.SR_KEY] = None
    if not len(names) <= len(args) <= len(names) + len(defaults):
        raise TypeError(f"{op}: expected {len(names)} to {len(names) + len(defaults)} "
                        f"arguments, got {len(args)}")  # fmt: skip
    named = {**dict(zip(names, args[: len(names)], strict=True)), **defaults}
    named.update(zip(defaults, args[len(names) :], strict=False))
    return StepArguments(
        named,
        [named[n] for n in spec.lists],
        _hyper_rows(op, named["hypers"], named["group_sizes"], named["params"]),
        {f.upper(): bool(named[f]) for f in spec.flags},
        tuple(named[s] for s in (*_contract.COMMON_SCALARS, _contract.SR_KEY)),
        tuple(k for k, t in enumerate(spec.tensor_lists) if t.role == "step"),
    )


def prepare(op: str, args: tuple, tables: TableCache) -> StepArguments | None:
    """Bind ``args`` (:func:`bind`), then build the call's tables (cached in ``tables``) and
    the kernel arguments every step kernel takes; None when the call has no params."""
    a = bind(op, args)
    if not a.params:
        return None
    spec = _contract.STEP_OPS[op]
    if spec.steps_with is not None and bool(a.named[spec.steps_with]) != bool(a.steps):
        raise ValueError(f"{op}: {spec.steps_with} and steps must both be given or both be empty")
    compact = bool(a.master_params) and a.master_params[0].dtype == torch.int16
    state_dtype = spec.free_state_dtype(a.named)
    check_sr_key(a.sr_key, op, a.params, a.master_params, state_dtype)
    kahan = bool(a.master_params) and a.master_params[0].dtype == a.params[0].dtype
    a.dtypes = dtype_arguments(a.params, a.grads, bool(a.master_params), a.master_sync, compact,
                               kahan, a.sr_key is not None, state_dtype,
                               spec.state_dtypes)  # fmt: skip
    a.launch = tables.launch(
        a.lists,
        extra_key=(tuple(map(str, a.dtypes.values())),),
        scalar_lists=a.step_slots,
        hyper_rows=a.hyper_rows,
    )
    a.scalar_tensors, a.scalar_flags = scalar_arguments(a.launch.table, *a.scalars)
    return a


def _hyper_rows(op: str, hypers: Tensor, group_sizes: list[int], params: list[Tensor]) -> list[int]:
    """The address of each tensor's row in the hyperparameter table, after checking the
    table's form ([note: hyper table] in ``fusedopt._contract``)."""
    k, n = len(_contract.STEP_OPS[op].hypers), len(params)
    shape = tuple(hypers.shape)
    if hypers.dtype != torch.float64 or len(shape) != 2 or shape[1] != k or hypers.stride(1) != 1:
        raise ValueError(f"{op}: hypers must be a float64 [G, {k}] table with unit column "
                         f"stride, got {hypers.dtype} {shape}")  # fmt: skip
    if params and hypers.device != params[0].device:
        raise ValueError(f"{op}: hypers is on {hypers.device}, the params on {params[0].device}")
    if len(group_sizes) != shape[0] or sum(group_sizes) != n or min(group_sizes, default=0) < 0:
        raise ValueError(f"{op}: group_sizes {list(group_sizes)} must be {shape[0]} counts "
                         f">= 0 summing to {n}")  # fmt: skip
    base, stride = hypers.data_ptr(), hypers.stride(0) * hypers.element_size()
    return [base + g * stride for g, count in enumerate(group_sizes) for _ in range(count)]
