"""The cached plan of a fusedopt step: which op calls a step makes, with which tensors, and
the per-step check that the last step's calls still hold ([note: cached plan]). A mixin of
:class:`fusedopt.optim._base.FusedOptimizer`; the states it re-lays ([note: re-laid state])
are made there.
"""

from __future__ import annotations

import functools
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fusedopt._contract import STEP_OPS, has_state, state_shape
from fusedopt._dense import dense_stride, state_like, state_stride
from fusedopt.clip import local_tensor
from fusedopt.ops import StepHypers, write_hyper_table
from fusedopt.ops import _resolve as resolve_backend
from fusedopt.optim import _state_bits
from fusedopt.optim._keys import (
    KAHAN_KEY,
    MASTER_KEY,
    REMAINDER_KEY,
    SR_GROUP_KEY,
    STATE_DTYPE_KEY,
    STEP_KEY,
)


def check_stochastic_rounding(group: dict[str, Any], params: Any = None) -> None:
    """``stochastic_rounding=True`` needs bf16 params without master weights ([note:
    stochastic rounding] in csrc/include/fusedopt/dtype.h): a ValueError naming the problem,
    before any tensor is touched. ``params``: the group's by default."""
    if not group.get(SR_GROUP_KEY, False):
        return
    if group.get(STATE_DTYPE_KEY) == torch.bfloat16:
        # [note: state dtype]: bf16 states round stochastically; every other 16-bit store of
        # the step must too, or be exact: fp32 and master-weight params, bf16 ones without.
        for p in group.get("params", ()) if params is None else params:
            if local_tensor(p).dtype == torch.float16 and not group.get("master_weights"):
                raise ValueError(
                    "stochastic_rounding=True rounds bf16 stores only; a float16 param of "
                    f"shape {tuple(p.shape)} without master weights would be rounded to "
                    "nearest: give it master weights, or a group of its own"
                )
        return
    if group.get("master_weights", False):
        raise ValueError(
            "stochastic_rounding=True is for bf16 params without master weights; this group "
            f"has master_weights={group['master_weights']!r} (the master is already exact: "
            "its rounding to the param is not an update that could be lost)"
        )
    for p in group.get("params", ()) if params is None else params:
        if local_tensor(p).dtype != torch.bfloat16:
            raise ValueError(
                "stochastic_rounding=True is for bf16 params without master weights; got a "
                f"{local_tensor(p).dtype} param of shape {tuple(p.shape)}: put it in a group "
                "of its own without stochastic_rounding"
            )


def sr_first_element(p: Tensor, where: str) -> int:
    """The index, in the whole param, of the first element of ``p``'s local shard: 0 for a
    plain param; for a DTensor, its shard's offset, which the step's ``sr_key`` carries.

    [note: sharded stochastic rounding] The random bits of an element are drawn by its index
    in the param ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h). The kernels
    see a DTensor's local shard, and counted in it, a shard would draw other bits than the
    same element of the unsharded param: a run's bits would change with the mesh, and a
    checkpoint resumed on another mesh would not go on as the run would have. So each
    tensor's ``sr_key`` entry is ``stream id | first << 32``, ``first`` the index of the
    shard's first element in the whole param, which every backend adds to the element
    index (``rounding_key`` in csrc/include/fusedopt/philox.h, ``rounding_bits`` in Triton's
    common.py, ``round_stochastic`` in the reference); 0 unsharded, so unsharded bits are
    what they were. That needs the shard to be one run of the param's elements in memory
    order (FSDP2's dim-0 shards of a contiguous param are); any other DTensor param is
    refused with ``stochastic_rounding=True`` (ValueError naming it, before any tensor is
    touched), as is a sharded param of more than 2^31 elements (the offset must fit the
    entry's high word).
    """
    if local_tensor(p) is p:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(p.shape)
    # A shard is one run when every placement replicates, or shards (evenly or not, not
    # strided) a dim whose predecessors all have size 1: decided from the placements and the
    # global shape, so that every rank decides alike (one with an empty shard too).
    run = p.is_contiguous() and local_tensor(p).is_contiguous()
    for placement in p.placements:
        if placement.is_replicate():
            continue
        dim = getattr(placement, "dim", None)
        strided = type(placement).__name__ != "Shard"  # _StridedShard: interleaved pieces
        run &= dim is not None and not strided and all(n == 1 for n in shape[: dim % len(shape)])
    if not run:
        raise ValueError(
            f"{where}: stochastic_rounding=True on a DTensor param of shape {shape} placed "
            f"{tuple(p.placements)}: its local shard is not one run of the param's elements, "
            "so its random bits would depend on the mesh ([note: sharded stochastic "
            "rounding] in fusedopt/optim/_plan.py); shard it on dim 0 (FSDP2) or put it in a "
            "group without stochastic_rounding"
        )
    _, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    stride = torch.empty(shape, device="meta").stride()
    first = sum(o * st for o, st in zip(offset, stride, strict=True))
    if p.numel() > 1 << 31:  # the whole param's size: every rank decides alike
        raise ValueError(
            f"{where}: stochastic_rounding=True on a DTensor param of {p.numel()} elements: "
            "a sharded param holds at most 2^31 ([note: sharded stochastic rounding])"
        )
    return first


class PlanMixin:
    """Plans a step's op calls and reuses them while nothing they were built from changed."""

    def _step_plan(self) -> tuple[_Plan, list[Tensor], list[list[Tensor]]]:
        """The op calls of this step, the grads in param order (for the norm pass) and each
        call's local grads: the last step's plan when it still holds ([note: cached plan]),
        else a new one from the full checks."""
        # Under torch.compile the plan is traced away, and a cache written by the traced code
        # would only make Dynamo guard on it and recompile every step. Under a dispatch mode
        # (make_fx, FakeTensorMode, functionalization) the step is being traced too: a
        # cached plan's ops (plan_call_step) mutate tensors their schemas do not show, which
        # a tracer would record as pure ([note: planned calls]), so neither plans for reuse.
        compiling = _tracing()
        plan = None if compiling else self._step_out.get("plan")
        if plan is not None:
            matched = self._match_plan(plan)
            if matched is not None:
                return (plan, *matched)
        entries = self._collect()
        for gi, i, p, _, local_p, _ in entries:  # raises before any change: a compact fp16
            group = self.param_groups[gi]  # master, a param that cannot keep 8-bit states
            self._master_key(group, p)
            if _state_bits.eight_bit(group):
                _state_bits.check_param(f"fusedopt.{type(self).__name__}: "
                                        f"{self._param_name(gi, i)}", p, local_p)  # fmt: skip
            # [note: stochastic rounding]: bf16 without masters (a group key or a param's
            # dtype may have changed since the group was added)
            check_stochastic_rounding(group, (p,))
            _state_bits.check_state_dtype(group, self.OP, (p,))  # [note: state dtype]
            if group.get(SR_GROUP_KEY, False):  # [note: sharded stochastic rounding]
                sr_first_element(p, f"fusedopt.{type(self).__name__}: "
                                    f"{self._param_name(gi, i)}")  # fmt: skip
        for gi, _, p, *_ in entries:
            self._init_state(self.param_groups[gi], p)
        plan = self._plan(entries)
        if not compiling:
            if plan.reusable:
                self._step_out["plan"] = plan
            else:
                self._step_out.pop("plan", None)
        call_grads: list[list[Tensor]] = [[] for _ in plan.calls]
        for (*_, local_g), ci in zip(entries, plan.call_of_entry, strict=True):
            call_grads[ci].append(local_g)
        # The norm pass reads the grads as the step does: a complex grad as its real view.
        norm_grads = [local_g if g.is_complex() else g for _, _, _, g, _, local_g in entries]
        return plan, norm_grads, call_grads

    def _call_flags(self, group: dict[str, Any]) -> dict[str, bool]:
        """The op's per-call flags for ``group``: the class's, ``master_sync`` and
        ``stochastic_rounding`` (a call rounds all its params alike: [note: stochastic
        rounding] in csrc/include/fusedopt/dtype.h)."""
        return {
            **self._flags(group), "master_sync": bool(group.get("master_sync", True)),
            SR_GROUP_KEY: bool(group.get(SR_GROUP_KEY, False)),
        }  # fmt: skip

    def _group_signature(self, group: dict[str, Any]) -> tuple:
        """What decides how a group's params are called: flags, state keys, master weights,
        backend."""
        flags = self._call_flags(group)
        return (tuple(sorted(flags.items())), self._state_keys(group),
                _master_mode(group["master_weights"]), group["backend"],
                group.get(STATE_DTYPE_KEY))  # fmt: skip

    def _match_plan(
        self, plan: _Plan
    ) -> tuple[list[Tensor], list[list[Tensor]]] | tuple[None, None] | None:
        """The grads of this step (in param order, and per call) if ``plan`` still holds, else
        None; ``(None, None)`` where they stay in C++: every call of the plan is a planned
        call and its norm pass may be ([note: planned calls]; :meth:`_Plan.python_grads`
        hands them to Python if the step needs them after all).

        [note: cached plan] Grouping the params into calls and checking every state tensor
        against its param costs ~10 us per param in Python, ~1.5 ms per step for GPT-2's 148
        tensors: more than the whole step of ``torch.optim.AdamW(fused=True)`` (0.6 ms) and,
        on a GPU, more than the kernels of a model that size. So a step reuses the last one's
        calls when nothing they were built from changed: the same groups with the same
        flags, state keys, master weights and backend; the same params, each with the dtype,
        shape, device and strides it had, and a grad again with the dtype, shape, device and
        strides it had (dense: the param's, or its dense twin's [note: non-dense params]); the
        same state dict and state tensor objects. A complex or sharded param, or a grad the
        step must copy into its param's layout, is planned afresh at every step.

        What the optimizer itself changes forgets the plan where it changes it
        (:meth:`_forget_plan`: ``add_param_group``, ``load_state_dict`` and ``__setstate__``;
        states are made, cast or re-laid, and master weights made or dropped, only while a
        step plans, which replaces the plan). What a user can change without telling the
        optimizer is checked every step, as cheaply as it can be:

        * per tensor, in C++ (``plan_grads`` in ``csrc/bindings.cpp``, one call holding the
          params): each planned param's dtype, shape, device and strides (a ``.data`` swap),
          whether it has a grad (set or dropped) and that grad's dtype, shape, layout, device
          and strides, read from the param in C++; it returns the grads. ~60 ns per tensor,
          nearly all of it the dispatcher wrapping the returned grads for Python. Without
          ``fusedopt._C`` the same check runs in Python, as whole-list comparisons of
          ``(dtype, shape, layout, device)`` tuples and strides (~1 us per tensor);
        * per group, in Python: its signature (flags, state keys, master weights, backend:
          what ``group["amsgrad"] = True`` or ``group["master_weights"] = False`` changes);
        * by identity, in C (``plan_state_matches`` in ``csrc/bindings.cpp``, one call):
          each group's params list, element by element (``group["params"]`` edited by
          hand), and the state, since a user may replace it by hand (torch users do:
          ``opt.state[p]["exp_avg"] = t``, ``opt.state[p] = {...}``): ``self.state``'s keys
          and values, in order, against the plan's snapshot (no lookup by param: a tensor's
          ``__hash__`` is a Python call), and every planned state tensor, one dict lookup
          per state key. A pointer comparison per entry: ~0.05 us per AdamW param at 10,000
          params, where the same comparisons in Python (one ``map`` over ``operator.is_``
          per list, ~15-30 ns per entry with the objects warm, kept as the fallback without
          ``fusedopt._C``) touched every param's, state dict's and state tensor's Python
          object: ~0.17 us per param at 10,000 (2-core CPU VM).

        A load, a new group or a state replaced by hand makes a new plan, with the full
        checks. Not covered, as in torch: resizing or ``set_()`` on a state tensor in place.
        Measured by ``bench/host_time.py`` (issue #14 item 5): at 1,000 tensors the plan costs
        ~1.1 us per tensor with the per-tensor part in Python, ~0.2 with the grads' check in
        C++ and the identity checks in Python, ~0.08 with both in C (2-core CPU VM).
        """
        if (
            plan.state is not self.state
            or len(plan.group_params) != len(self.param_groups)
            or len(self.state) != len(plan.state_keys)
        ):
            return None
        native = plan.native_check
        if native is not None and type(self.param_groups) is list:  # (the C check takes lists)
            if not native.state_matches(
                self.state, plan.state_keys, plan.state_values, plan.state_tensors,
                self.param_groups, plan.group_params,
            ):  # fmt: skip
                return None
        elif not self._state_matches(plan):
            return None
        for group, signature in zip(self.param_groups, plan.signatures, strict=True):
            if self._group_signature(group) != signature:
                return None
        if plan.grads_stay_native and self._uses_planned_calls():
            return (None, None) if plan.grads(return_grads=False) is not None else None
        grads = plan.grads()
        if grads is None:
            return None
        return grads, plan.call_grads(grads)

    def _state_matches(self, plan: _Plan) -> bool:
        """The identity part of :meth:`_match_plan` in Python, where ``fusedopt._C`` is not
        built: each group's params list and the state, one ``map`` over ``operator.is_`` per
        list."""
        for group, params in zip(self.param_groups, plan.group_params, strict=True):
            group_params = group["params"]
            if len(group_params) != len(params) or not all(map(is_, group_params, params)):
                return False
        if not (
            all(map(is_, self.state.keys(), plan.state_keys))
            and all(map(is_, self.state.values(), plan.state_values))
        ):
            return False
        for key, dicts, tensors in plan.state_tensors:
            try:
                if not all(map(is_, map(itemgetter(key), dicts), tensors)):
                    return False
            except KeyError:
                return False
        return True

    def _forget_plan(self) -> None:
        """Drop the cached plan: the optimizer changed what it was built from
        ([note: cached plan])."""
        self._step_out.pop("plan", None)

    def _plan(self, entries: list[tuple]) -> _Plan:
        """Group the params into op calls, one per (device, param dtype, grad dtype, flags,
        state keys, master weights or not, backend); check each state tensor still fits
        ([note: checked once]), re-laid if its param's layout changed ([note: re-laid state])."""
        plan = _Plan(self.state)
        # What the per-step check compares is recorded only where a plan may be cached: under
        # torch.compile none is, and the recording (attrgetter, map) would break the graph.
        record = not _tracing()
        calls: dict[tuple, int] = {}
        planned_states: dict[str, tuple[list[dict], list[Tensor]]] = {}
        per_group: dict[int, tuple] = {}
        strided = torch.strided
        layouts = STEP_OPS[self.OP].state_layouts
        for gi, i, p, g, local_p, local_g in entries:
            info = per_group.get(gi)
            if info is None:
                group = self.param_groups[gi]
                signature = self._group_signature(group)
                keys = signature[1]
                names = tuple(self.STATE_LISTS[k] for k in keys)
                info = per_group[gi] = (group, keys, names, self._call_flags(group), signature)
            group, keys, names, flags, signature = info
            master_key = self._master_key(group, p)
            master = master_key is not None
            key = (local_p.device, local_p.dtype, local_g.dtype, master_key, signature)
            ci = calls.get(key)
            if ci is None:
                ci = calls[key] = len(plan.calls)
                plan.calls.append(_Call(local_p.device, group["backend"], flags, names, master))
            state = self.state[p]
            # A DTensor: its states are DTensors too. (local_p is also another tensor for a
            # complex param: its real view, [note: complex params].)
            sharded = local_tensor(p) is not p
            slot_keys = (*keys, master_key) if master else keys
            # The states' layout: the param's, or its dense twin's [note: non-dense params].
            layout = (local_p.shape, dense_stride(local_p), local_p.device)
            dtype = _state_bits.state_dtype(group, self.OP, local_p.dtype, master)
            q8 = _state_bits.eight_bit(group)  # [note: 8-bit states] in fusedopt/quant8.py
            # [note: factored layouts]: a state the param does not keep is a placeholder
            used = [k for k in slot_keys if has_state(layouts.get(k, "param"), local_p.shape)]
            for k in used:
                t = local_tensor(state[k]) if sharded else state[k]
                t = torch.view_as_real(t) if t.is_complex() else t  # as local_p
                k_layout = layout
                if layouts.get(k, "param") != "param":  # [note: factored layouts]
                    shape = state_shape(layouts[k], local_p.shape)
                    k_layout = (shape, state_stride(local_p, layouts[k]), local_p.device)
                k_dtype = _state_bits.planned_dtype(k, self.OP, q8, dtype)
                if not _fits(t, k_layout, k, k_dtype):
                    state[k] = self._relaid_state(gi, i, p, k, t, k_layout, k_dtype)
            local_states = [
                (local_tensor(state[k]) if sharded else state[k])
                if k in used
                else torch.empty(0, dtype=dtype, device=local_p.device)
                for k in keys
            ]
            if p.is_complex():
                local_states = [
                    torch.view_as_real(t) if t.is_complex() else t for t in local_states
                ]
            masters = [local_tensor(state[master_key])] if master else []
            call = plan.calls[ci]
            call.add(gi, p, local_p, local_states, masters)
            if layout[1] != local_p.stride():
                call.twins.append(len(call.params) - 1)
            plan.call_of_entry.append(ci)
            # Reusable by later steps only when every grad passed _collect's fast check as is
            # ([note: cached plan] repeats that check) and nothing is sharded.
            plan.reusable &= (
                not sharded and local_g is g and g.layout == strided and g.stride() == layout[1]
            )
            if record:
                plan.stepped.append(p)
                for k in used:
                    dicts, tensors = planned_states.setdefault(k, ([], []))
                    dicts.append(state)
                    tensors.append(state[k])
        for gi, group in enumerate(self.param_groups):
            plan.group_params.append(list(group["params"]))
            plan.signatures.append(
                per_group[gi][4] if gi in per_group else self._group_signature(group)
            )
        if any(call.flags[SR_GROUP_KEY] for call in plan.calls):
            # Each param's stream id: its index in the optimizer's param order (over every
            # group, as state_dict() numbers them), stable across backends, call splits and
            # a resume ([note: stochastic rounding] in csrc/include/fusedopt/dtype.h); a
            # shard's offset in its param above it ([note: sharded stochastic rounding]).
            order = {id(p): k for k, p in enumerate(p for g in self.param_groups
                                                    for p in g["params"])}  # fmt: skip
            for call in plan.calls:
                if call.flags[SR_GROUP_KEY]:
                    ids = [0, 0, *(order[id(p)] | sr_first_element(p, "sr_key") << 32
                                   for p in call.params)]  # fmt: skip
                    call.sr_key = torch.tensor(ids, dtype=torch.int64, device=call.device)
        if record:
            plan.seal(planned_states, self.OP)
        return plan

    def _relaid_state(
        self, gi: int, i: int, p: Tensor, key: str, t: Tensor, layout: tuple, dtype: torch.dtype
    ) -> Tensor:
        """The state ``t`` (local) of ``p`` under ``key``, which no longer fits ``layout``,
        re-laid to it.

        [note: re-laid state] ``model.to(memory_format=torch.channels_last)``, or any swap of
        ``p.data`` for a tensor of the same shape in another memory layout, leaves the states
        in the old one; torch.optim goes on stepping (its ops pair elements by logical index).
        The kernels pair them by position, so the states are copied into the param's new
        layout, element for element by logical index (``empty_like(p).copy_(state)``), once,
        when the step plans again (the plan compares strides each step, [note: cached
        plan]). A state set by hand in another layout is re-laid the same way, and so are the
        states of a non-dense param made or loaded in torch's layout for it, which is not its
        contiguous twin's (``state_like``, [note: non-dense params] in fusedopt/_dense.py).
        A state whose shape, device or dtype no longer fits has no such meaning: that
        raises, saying what changed, before anything is touched.
        """
        shape, _, device = layout
        if key == STEP_KEY:
            problem = f"holds {t.numel()} numbers, {t.dtype}, on {t.device}"
            problem += f"; a step count is one float32 number on {device}"
        elif t.shape != shape:
            problem = f"has shape {tuple(t.shape)} but the param now has {tuple(shape)}"
            if tuple(shape) != tuple(p.shape):  # [note: factored layouts]
                problem = f"has shape {tuple(t.shape)} but the param now needs {tuple(shape)}"
        elif t.device != device:
            problem = f"is on {t.device} but the param now is on {device}"
        elif t.dtype != dtype and not _master_dtype(key, t):
            problem = f"has dtype {t.dtype} but the param needs {dtype} states"
        elif tuple(shape) != tuple(p.shape):  # a factored state ([note: factored layouts])
            return torch.empty(shape, dtype=t.dtype, device=device).copy_(self.state[p][key])
        else:
            return state_like(p, self.state[p][key].dtype).copy_(self.state[p][key])
        raise RuntimeError(
            f"fusedopt.{type(self).__name__}: state {key!r} of {self._param_name(gi, i)} no "
            f"longer fits it: it {problem}; was the param's .data, or the state, replaced by "
            "hand? Load states with load_state_dict"
        )


def _tracing() -> bool:
    """Whether the step is being traced: by torch.compile, or under a dispatch mode (make_fx,
    FakeTensorMode, functionalization). Then no plan is cached or reused."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


#: What the Python per-step check compares of each grad, and of each stepped param, besides
#: their strides, where ``fusedopt._C`` is not built ([note: cached plan]): one C-level call
#: per tensor. (A grad's layout, since a sparse grad has no strides; a param's is covered by
#: its strides, which a sparse one lacks.)
_GRAD = attrgetter("grad")
_GRAD_META = attrgetter("dtype", "shape", "layout", "device")
_PARAM_META = attrgetter("dtype", "shape", "device")


@functools.cache
def native_calls() -> tuple[Any, Any] | None:
    """``fusedopt._C``'s ``plan_call`` and ``plan_call_step`` ([note: planned calls]), or None
    where ``_C`` is not built; the C++ callables, as in :func:`_native_check`."""
    ns = torch.ops.fusedopt
    if not hasattr(ns, "plan_call_step"):
        return None
    return ns.plan_call.default._op, ns.plan_call_step.default._op


class NativeCheck(NamedTuple):
    """``fusedopt._C``'s part of the per-step check ([note: cached plan]): the ops' ``_op``
    (the C++ callable, without ``OpOverload.__call__``'s Python frame) and the module's
    state check."""

    record: Any  # plan_record(params) -> record
    grads: Any  # plan_grads(record, return_grads) -> (matched, grads)
    grad_norm: Any  # plan_grad_norm(record, backend, norm_type, grad_scale) -> GradNorm
    release: Any  # plan_release(record): drops the grads plan_grads held for the step
    state_matches: Any  # plan_state_matches(state, keys, values, tensors, groups, params)


@functools.cache
def _native_check() -> NativeCheck | None:
    """``fusedopt._C``'s per-step check, or None where ``_C`` is not built."""
    ns = torch.ops.fusedopt
    if not hasattr(ns, "plan_release"):
        return None
    from fusedopt import _C

    return NativeCheck(
        ns.plan_record.default._op, ns.plan_grads.default._op, ns.plan_grad_norm.default._op,
        ns.plan_release.default._op, _C.plan_state_matches,
    )  # fmt: skip


class _Plan:
    """The op calls of one step, and what they were built from ([note: cached plan]): lists
    that the per-step check compares whole, and the C++ record of the params and grads."""

    __slots__ = ("call_index", "call_of_entry", "calls", "grad_meta", "grad_strides",
                 "grads_stay_native", "group_params", "idle", "native_check", "param_meta",
                 "param_strides", "record", "reusable", "signatures", "state", "state_keys",
                 "state_tensors", "state_values", "stepped")  # fmt: skip

    def __init__(self, state: dict) -> None:
        self.state = state
        self.calls: list[_Call] = []
        self.call_of_entry: list[int] = []  # the call of each stepped param, in param order
        self.call_index: list[list[int]] = []  # per call: its params' positions in stepped
        self.group_params: list[list[Tensor]] = []  # per group: its params list, as planned
        self.signatures: list[tuple] = []  # per group: its _group_signature
        self.stepped: list[Tensor] = []  # the params with a grad, in param order
        # The per-tensor check: fusedopt._C's ops and the record plan_grads compares ...
        self.record: Tensor | None = None
        self.native_check: NativeCheck | None = None
        # ... and whether a step may leave its grads in C++: every call is a planned call
        # and the grads are those of checked_grads ([note: planned calls]).
        self.grads_stay_native = False
        # ... or, without _C, the params without a grad and what the Python check compares.
        self.idle: list[Tensor] = []
        self.grad_meta: list[tuple] = []  # _GRAD_META of each stepped param's grad
        self.grad_strides: list[tuple[int, ...]] = []
        self.param_meta: list[tuple] = []  # _PARAM_META of each stepped param
        self.param_strides: list[tuple[int, ...]] = []
        # Per state key: (the key, the stepped params' state dicts that hold it, their
        # tensors under it).
        self.state_tensors: list[tuple[str, list[dict], list[Tensor]]] = []
        self.state_keys: tuple = ()  # self.state's keys and values, in order
        self.state_values: tuple = ()
        self.reusable = True

    @property
    def checked_grads(self) -> bool:
        """The step's grads are plain (no DTensor), dense tensors on one device, as the norm
        pass's ``_checked`` path needs: in a plan that may be reused every grad passed
        ``_collect``'s fast check (dense, the param's strides) and none is sharded."""
        return self.reusable and len({call.device for call in self.calls}) == 1

    def seal(self, planned_states: dict[str, tuple[list[dict], list[Tensor]]], op: str) -> None:
        """Finish the plan once every param is planned: each call's positions, the state
        snapshot, and (if it may be reused) what the per-tensor check compares and the op
        ``op``'s planned calls ([note: planned calls])."""
        self.call_index = [[] for _ in self.calls]
        for position, ci in enumerate(self.call_of_entry):
            self.call_index[ci].append(position)
        self.state_tensors = [
            (key, dicts, tensors) for key, (dicts, tensors) in planned_states.items()
        ]
        self.state_keys = tuple(self.state.keys())
        self.state_values = tuple(self.state.values())
        planned = [p for params in self.group_params for p in params]
        # A sharded param without a grad: the op would see the DTensor (and a sharded one
        # with a grad already made the plan single-use).
        self.reusable &= all(map(is_, map(local_tensor, planned), planned))
        if not self.reusable:
            return
        native = _native_check()
        if native is not None:
            self.native_check = native
            self.record = native.record(planned)
            for call, positions in zip(self.calls, self.call_index, strict=True):
                call.plan_native(op, self.record, positions)
            self.grads_stay_native = self.checked_grads and all(
                call.native is not None for call in self.calls
            )
            return
        stepped = set(map(id, self.stepped))
        self.idle = [p for p in planned if id(p) not in stepped]
        grads = list(map(_GRAD, self.stepped))
        self.grad_meta = list(map(_GRAD_META, grads))
        self.grad_strides = list(map(Tensor.stride, grads))
        self.param_meta = list(map(_PARAM_META, self.stepped))
        self.param_strides = list(map(Tensor.stride, self.stepped))

    @property
    def device(self) -> torch.device | None:
        """The device of every call, where they share one."""
        devices = {call.device for call in self.calls}
        return devices.pop() if len(devices) == 1 else None

    def grads(self, return_grads: bool = True) -> list[Tensor] | None:
        """The stepped params' grads, in order, if every planned param and grad is as the
        plan recorded (the per-tensor part of [note: cached plan]); else None. With
        ``return_grads`` false (only with ``fusedopt._C``), an empty list when they are:
        the step's planned calls and norm pass read them in C++ ([note: planned calls])."""
        if self.record is not None:
            matched, grads = self.native_check.grads(self.record, return_grads)
            return grads if matched else None
        if not all(map(is_, map(_GRAD, self.idle), repeat(None))):
            return None
        grads = list(map(_GRAD, self.stepped))
        try:
            if (
                list(map(_GRAD_META, grads)) != self.grad_meta
                or list(map(Tensor.stride, grads)) != self.grad_strides
                or list(map(_PARAM_META, self.stepped)) != self.param_meta
                or list(map(Tensor.stride, self.stepped)) != self.param_strides
            ):
                return None
        except (AttributeError, TypeError):  # a grad is None now
            return None
        return grads

    def release(self) -> None:
        """The step's end: ``fusedopt._C`` drops the grads ``plan_grads`` held for it
        ([note: step grads] in csrc/bindings.cpp)."""
        if self.record is not None:
            self.native_check.release(self.record)

    def call_grads(self, grads: list[Tensor]) -> list[list[Tensor]]:
        """Each call's grads, from the stepped params' ``grads`` in param order."""
        if len(self.calls) == 1:
            return [grads]
        return [list(map(grads.__getitem__, index)) for index in self.call_index]

    def python_grads(self) -> tuple[list[Tensor], list[list[Tensor]]]:
        """The step's grads, in param order and per call, for a step that
        :meth:`PlanMixin._match_plan` left them in C++ and that needs them after all (a call
        whose backend no longer resolves as planned, a norm pass on another backend):
        plan_grads found them as recorded this step, and no user code ran since."""
        grads = self.grads()
        if grads is None:
            raise RuntimeError("fusedopt: the grads changed during the step")
        return grads, self.call_grads(grads)

    def planned_norm(self, backend: str) -> PlannedNorm | None:
        """The norm pass over this step's grads in C++ (``plan_grad_norm``) where the plan
        keeps them there and ``backend`` resolves to the ``fusedopt._C`` backend of their
        device; else None (the norm pass takes the grads' list)."""
        device = self.device
        if not self.grads_stay_native or device is None:
            return None
        try:
            resolved = resolve_backend(backend, device)
        except (RuntimeError, ValueError):  # ops.grad_norm raises it, naming it
            return None
        if resolved != device.type or resolved not in ("cpu", "cuda"):
            return None
        return PlannedNorm(self.native_check.grad_norm, self.record, resolved, device)


class PlannedNorm:
    """The ``grad_norm`` pass over a cached plan's grads, read in C++ (``plan_grad_norm``):
    for :func:`fusedopt.clip.total_norm`'s ``_planned``."""

    __slots__ = ("backend", "device", "op", "record")

    def __init__(self, op: Any, record: Tensor, backend: str, device: torch.device) -> None:
        self.op, self.record, self.backend, self.device = op, record, backend, device

    def grad_norm(self, norm_type: float, grad_scale: Tensor | None) -> tuple[Tensor, ...]:
        """``fusedopt.ops.grad_norm``'s ``(total, per_tensor, found_inf)`` over the grads."""
        return self.op(self.record, self.backend, norm_type, grad_scale)


class _Call:
    """The tensor lists of one op call but the grads (new every step), filled param by param."""

    __slots__ = ("backend", "device", "flags", "group_runs", "hyper_rows", "hyper_table", "lists",
                 "master", "native", "native_backend", "params", "sr_key", "state_lists",
                 "twins")  # fmt: skip

    def __init__(
        self, device: torch.device, backend: str, flags: dict[str, bool],
        names: tuple[str, ...], master: bool,
    ) -> None:  # fmt: skip
        self.device, self.backend, self.flags, self.master = device, backend, flags, master
        self.params: list[Tensor] = []
        self.lists: dict[str, list[Tensor]] = {name: [] for name in ("params", *names)}
        self.state_lists = [self.lists[name] for name in names]
        if master:
            self.lists["master_params"] = []
        self.group_runs: list[list[int]] = []  # [group index, count]: runs of one group's params
        self.twins: list[int] = []  # positions of non-dense params [note: non-dense params]
        # The call's hyperparameter table and the values it holds ([note: hyper table]).
        self.hyper_rows: list[tuple[float, ...]] | None = None
        self.hyper_table: Tensor | None = None
        # The call's lists kept in C++ and the backend they run on ([note: planned calls]).
        self.native: Tensor | None = None
        self.native_backend: str | None = None
        # [seed, counter, each param's stream id] with stochastic rounding, else None: the
        # ids are written once, seed and counter before each step ([note: stochastic
        # rounding] in csrc/include/fusedopt/dtype.h).
        self.sr_key: Tensor | None = None

    def plan_native(self, op: str, record: Tensor, positions: list[int]) -> None:
        """[note: planned calls] A cached plan's call hands its lists to ``fusedopt._C``
        once (``plan_call`` in ``csrc/bindings.cpp``), and each step passes the handle, the
        hyperparameter table and the scalars (``plan_call_step``), which takes this step's
        grads from the plan's record (``plan_grads`` holds the ones it checked, in param
        order; ``positions`` are this call's among them: [note: step grads] in
        ``csrc/bindings.cpp``) and calls the op's implementation with its every check. The
        dispatcher then converts no list: passing ~5 lists of tensors (params, grads,
        states, masters, steps) cost ~0.7 us per param at 10,000 params (perf, 2-core CPU
        VM), each tensor wrapped, key-read, autograd-checked and copied out of the boxed
        stack again. When every call of a plan is planned, the step's grads never reach
        Python: ``plan_grads`` returns none, and the norm pass (clipping, fusedopt's scaler)
        reads them from the record too (``plan_grad_norm``, :meth:`_Plan.planned_norm`);
        handing 10,000 grads to Python and back cost ~0.1 us per param, and the norm op's
        list as much again. Only for the backends of ``_C`` (cpu, cuda), a reusable plan
        (its grads are the params' ``.grad``, none sharded or complex), a call without dense
        twins ([note: non-dense params]) and a class that does not override ``_run``
        (LAMB's runs per group); the step checks that the backend still resolves the same.
        Like ``plan_grads`` it is no op of the contract, and it mutates tensors its schema
        does not show: fine in eager mode, but a step that is traced (torch.compile, or any
        dispatch mode: make_fx, FakeTensorMode) never uses or makes a cached plan
        (:func:`_tracing`), so it never meets these ops."""
        native = native_calls()
        if native is None or self.twins or not STEP_OPS[op].cpp_launcher:
            return  # (muon_ has no C++ launcher for the whole step: its passes have theirs)
        if self.flags.get(SR_GROUP_KEY):
            return  # its sr_key is a per-step argument that plan_call_step does not take
        try:
            backend = resolve_backend(self.backend, self.device)
        except (RuntimeError, ValueError):  # the step's op call raises it, naming it
            return
        if backend not in ("cpu", "cuda"):
            return
        spec = STEP_OPS[op]
        lists = [[] if name == "grads" else self.lists.get(name, []) for name in spec.lists]
        flags = [int(bool(self.flags[name])) for name in spec.flags]
        flags.append(int(bool(self.flags.get("master_sync", True))))  # the common flags
        tensors = [t for tensors in lists for t in tensors]
        self.native = native[0](
            op, backend, tensors, list(map(len, lists)), flags, record, positions
        )  # (record, positions: the grads plan_grads holds, [note: step grads])
        self.native_backend = backend

    def add(self, gi: int, p, local_p, local_states, masters) -> None:
        self.params.append(p)
        self.lists["params"].append(local_p)
        for target, t in zip(self.state_lists, local_states, strict=True):
            target.append(t)
        if self.master:
            self.lists["master_params"].append(masters[0])
        if self.group_runs and self.group_runs[-1][0] == gi:
            self.group_runs[-1][1] += 1
        else:
            self.group_runs.append([gi, 1])


def _fits(t: Tensor, layout: tuple, key: str, dtype: torch.dtype) -> bool:
    """A state tensor still pairs with its param (``layout``: its shape, strides, device):
    what the kernels rely on ([note: checked once])."""
    shape, stride, device = layout
    if key == STEP_KEY:
        return t.numel() == 1 and t.dtype == torch.float32 and t.device == device
    return (
        t.shape == shape
        and t.stride() == stride
        and t.device == device
        and (t.dtype == dtype or _master_dtype(key, t))
    )


def _master_dtype(key: str, t: Tensor) -> bool:
    """Whether ``t`` has the dtype of a master under ``key``: fp32, the int16 remainders
    of a compact master ([note: compact master] in fusedopt/_contract.py), or a 16-bit Kahan
    compensation ([note: kahan master]; made and loaded in its param's dtype)."""
    return (
        (key == MASTER_KEY and t.dtype == torch.float32)
        or (key == REMAINDER_KEY and t.dtype == torch.int16)
        or (key == KAHAN_KEY and t.dtype in (torch.bfloat16, torch.float16))
    )


def _master_mode(value: Any) -> bool | str:
    """A group's ``master_weights`` as the plan tells modes apart: False, True, "compact",
    "kahan"."""
    return value if isinstance(value, str) else bool(value)


def call_hypers(call: _Call, runs: list, names: tuple[str, ...]) -> StepHypers:
    """The call's hyperparameters, from runs ``(group hypers, count)`` of params sharing a
    group's values: one table row per run, kept in the plan and rewritten (no host sync) only
    when a value changed, so that an lr schedule costs G x K float comparisons per step and
    leaves the backends' tensor tables cached ([note: hyper table] in fusedopt._contract). A
    tensor lr stays on the device: one shared tensor is passed as is (CUDA-graph friendly),
    mixed ones become a vector."""
    rows = [tuple(0.0 if isinstance(h[k], Tensor) else float(h[k]) for k in names) for h, _ in runs]
    if rows != call.hyper_rows:
        call.hyper_table = write_hyper_table(rows, call.device, call.hyper_table)
        call.hyper_rows = rows
    lrs = [(h["lr"], count) for h, count in runs]
    if not any(isinstance(v, Tensor) for v, _ in lrs):
        lr_tensor = None
    elif len(lrs) == 1 or all(v is lrs[0][0] for v, _ in lrs):
        lr_tensor = _device_lr(lrs[0][0], call.device)
    else:
        lr_tensor = torch.cat(
            [
                _device_lr(v, call.device).reshape(1).expand(count)
                if isinstance(v, Tensor)
                else torch.full((count,), float(v), device=call.device)
                for v, count in lrs
            ]
        )
    return StepHypers(names, rows, [count for _, count in runs], lr_tensor, call.hyper_table)


def _device_lr(lr: Tensor, device: torch.device) -> Tensor:
    return lr.detach().reshape(()).to(device=device, dtype=torch.float32)
