"""The one base class of fusedopt's optimizers: groups, state, master weights, validation,
clipping and the GradScaler protocol, written once. Each algorithm module only declares its
defaults, hyperparameter checks, state keys, per-tensor hyperparameters and call flags.

A step:

1. collect the params that have a grad and check every one (dtype, shape, device, sparse,
   complex) before anything is touched; errors name the param;
2. create missing state (lazily, as torch does);
3. if a norm is needed (``max_grad_norm``, LAMB's global clip, or fusedopt's own scaler asking
   for ``found_inf``), one ``grad_norm`` pass over all grads: the norm of the *unscaled*
   grads, and the ``found_inf`` flag [note: found_inf from the norm pass];
4. one step op per (device, param and grad dtypes, call flags, state lists, master weights
   or not), with ``grad_scale``, ``clip_coef`` and ``found_inf`` as device scalars: no host
   sync anywhere. Steps 1, 2 and the grouping are reused from the last step while nothing
   they depend on changed [note: cached plan].

[note: GradScaler protocol] ``torch.amp.GradScaler.step`` sets the attributes ``grad_scale``
(the scale times any value the user preset, or None after ``unscale_``) and ``found_inf``,
calls ``step()`` and deletes them. So the class must not define ``grad_scale``: the scaler
reads ``getattr(opt, "grad_scale", 1)`` to fold in a preset value (gradient accumulation).
Without any scaler, ``opt.grad_scale = n`` set by the user stays until deleted and divides the
grads on load: that is how accumulating ``n`` micro-batches of summed grads becomes a mean at
no extra pass.

[note: found_inf from the norm pass] fusedopt's own scaler (``fusedopt.GradScaler``) does not
run torch's inf-check pass (which reads *and writes* every grad). It sets
``_fusedopt_detect_inf``; the optimizer then runs the ``grad_norm`` pass (read only) even when
it does not clip, takes ``found_inf`` from it, skips the step on the device when it is set,
and leaves the flag in ``_step_out["found_inf"]`` for the scaler's ``update()``. The step op
cannot find the flag itself: it would have written some params before it met the inf. So a
loss-scaled, clipped step reads the grads exactly twice (norm, step), as does an unclipped one.

[note: no setattr in step] ``step()`` never assigns an attribute of the optimizer: what it
leaves behind (``last_grad_norm``, ``found_inf`` for the scaler, its plan for the next
step) goes into the dict ``_step_out``, made in ``__init__``. torch 2.11's Dynamo wraps an
optimizer without attribute mutation tracking (``OptimizerVariable`` gets no
``AttributeMutationExisting``; torch 2.13 and 2.14 give it one), so any ``self.x = ...``
inside a compiled ``step()`` fails there with "Attempted setattr on a user-defined object
that does not have an AttributeMutation mutation_type"; an item stored into a dict
attribute traces on every version.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from fusedopt import ops
from fusedopt._dense import dense_stride, state_like, swap_in_twins, write_back
from fusedopt._validate import LOW_PRECISION, PARAM_DTYPES, check_like, check_tensor
from fusedopt.clip import clip_coef as torch_clip_coef
from fusedopt.clip import local_tensor, total_norm

#: State keys that hold a 0-d step count; every other state tensor pairs with its param.
STEP_KEY = "step"
MASTER_KEY = "master_param"

#: torch group keys that mean nothing to fusedopt (always fused): dropped on load.
_TORCH_ONLY_KEYS = ("foreach", "fused", "differentiable")


def check_nonnegative(name: str, value: Any, label: str | None = None) -> None:
    """torch's check: ``ValueError("Invalid <label>: <value>")`` unless ``0 <= value``."""
    if not value >= 0.0:
        raise ValueError(f"Invalid {label or name}: {value}")


def check_betas(betas: Any, inclusive_upper: bool = False) -> None:
    """torch's checks on ``betas``: two values, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        upper_ok = beta <= 1.0 if inclusive_upper else beta < 1.0
        if not (beta >= 0.0 and upper_ok):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def _check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        return  # a device lr is not read on the host (no sync)
    check_nonnegative("lr", lr, "learning rate")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of ``fusedopt.AdamW``, ``Adam``, ``LAMB``, ``Lion`` and ``SGD``.

    Subclasses set :attr:`OP` and :attr:`STATE_LISTS` and override :meth:`_check_group`,
    :meth:`_state_keys`, :meth:`_hypers` and :meth:`_flags`.

    Common keyword arguments (also group keys):

    * ``master_weights``: bf16/fp16 params get an fp32 copy in ``state["master_param"]``; the
      step updates the master and its fp32 states and writes ``master.to(param.dtype)`` into
      the param, in one pass. On fp32 and fp64 params it does nothing: they are their own
      master (no copy is kept and the states stay in the param's dtype). It may be switched
      on or off mid-run (``group["master_weights"] = ...``, or a loaded state dict that says
      otherwise): the next step creates the master from the param, or drops it, and casts
      the param's states (fp32 with a master, the param's dtype without)
      [note: master weights switched].
    * ``master_sync`` (default True): with master weights, a value written into a param
      between steps (``model.load_state_dict``, a re-initialisation, ``p.clamp_()``) is
      adopted by its master at the next step, element by element (the param's bits differ
      from the rounded master's), instead of being overwritten from the stale master; a step
      skipped by ``found_inf`` adopts nothing. ``False`` skips that check (2 bytes per
      element less to read): then writes into the params are lost, as in Apex, Transformer
      Engine and DeepSpeed. [note: master sync] in ``fusedopt/_contract.py``.
    * ``max_grad_norm``: clip the global L2 norm of all grads of all groups inside ``step()``
      (``torch.nn.utils.clip_grad_norm_``'s coefficient). The pre-clip norm stays on the
      device in :attr:`last_grad_norm`. One value for the whole optimizer: every group must
      have the same.
    * ``capturable``: accepted (torch's name); every fusedopt step is capturable, since step
      counts and the common scalars live on the device and nothing syncs with the host.
    * ``backend``: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
    * ``grad_norm_group`` (constructor only): a process group across which the params are
      partitioned (ZeroRedundancyOptimizer); the clip norm sums over it. Every rank must step.
    """

    #: The ``fusedopt.ops`` step op this class calls.
    OP: ClassVar[str]
    #: state key -> the op's tensor-list name, for every state key the class may keep.
    STATE_LISTS: ClassVar[dict[str, str]]
    _step_supports_amp_scaling = True  # [note: GradScaler protocol]
    #: Step complex params as real views, as torch does ([note: complex params]).
    STEPS_COMPLEX: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        grad_norm_group: Any = None,
    ) -> None:
        foreach, fused = defaults.pop("foreach", None), defaults.pop("fused", None)
        # accepted for torch compatibility (fusedopt is always fused), with torch's check
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if defaults.pop("differentiable", False):
            raise ValueError(
                f"{type(self).__name__}: differentiable=True is not supported: fused kernels "
                "update in place and have no autograd formula"
            )
        self._check_group(defaults)
        self._check_common(defaults)
        self.grad_norm_group = grad_norm_group
        # What a step leaves behind: last_grad_norm, found_inf for fusedopt's scaler, and
        # its plan for the next step ([note: no setattr in step], [note: cached plan]).
        self._step_out: dict[str, Any] = {}
        super().__init__(params, defaults)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The global norm of the last step's unscaled grads (before clipping), a 0-d fp32
        device tensor (fp64 when every grad is fp64); None until a step computes one (needs a
        clip or fusedopt's scaler)."""
        return self._step_out.get("last_grad_norm")

    # ----------------------------------------------------------------- declarations
    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        """Raise ValueError (torch's messages) for invalid hyperparameters."""
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state keys a param of ``group`` needs (besides ``master_param``)."""
        raise NotImplementedError

    def _hypers(self, group: dict[str, Any]) -> dict[str, Any]:
        """The op's per-tensor hyperparameters for ``group``: name -> float (lr may be a Tensor)."""
        raise NotImplementedError

    def _flags(self, group: dict[str, Any]) -> dict[str, bool]:
        """The op's per-call flags for ``group``."""
        raise NotImplementedError

    def _clip_coef(self, norm: Tensor, max_grad_norm: float) -> Tensor:
        """The clip coefficient for the global ``norm``: torch's ``clip_grad_norm_`` form."""
        return torch_clip_coef(norm, max_grad_norm)

    def _fix_loaded_state(self, group: dict[str, Any], param: Tensor, state: dict) -> None:
        """Complete a state loaded from a foreign state dict (e.g. torch's SGD has no step)."""

    def _fix_loaded_group(self, group: dict[str, Any], states: dict[Tensor, dict]) -> None:
        """Complete a loaded group and its params' states (``states``: param -> state, for
        the params that have one); called after every check passed, before any change."""
        for p, state in states.items():
            self._fix_loaded_state(group, p, state)

    def _after_step(self, found_inf: Tensor | None) -> None:
        """Called at the end of every ``step()`` with the step's ``found_inf`` (None: none)."""

    def _run(
        self,
        lists: dict[str, list[Tensor]],
        hypers: dict[str, Any],
        flags: dict[str, bool],
        params: list[Tensor],
        group_runs: list[list[int]],
        **scalars: Any,
    ) -> None:
        """Run one op call; ``params`` are the (possibly DTensor) params of ``lists``, in runs
        of ``[group index, count]``."""
        ops.step(self.OP, lists, hypers, flags, **scalars, _checked=True)

    # ----------------------------------------------------------------- groups
    @staticmethod
    def _check_common(group: dict[str, Any]) -> None:
        _check_lr(group["lr"])
        max_norm = group.get("max_grad_norm")
        if max_norm is not None and not max_norm > 0.0:
            raise ValueError(f"Invalid max_grad_norm: {max_norm} (must be > 0 or None)")
        backend = group.get("backend", "auto")
        from fusedopt._contract import BACKEND_NAMES

        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose auto or {BACKEND_NAMES}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, plus fusedopt's hyperparameter checks."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            self._check_common(group)
            first = self.param_groups[0].get("max_grad_norm")
            if group.get("max_grad_norm") != first:
                raise ValueError(
                    f"max_grad_norm is one global clip: every group must have the same, got "
                    f"{group.get('max_grad_norm')} and {first}"
                )
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in _TORCH_ONLY_KEYS:  # torch's __setstate__ adds differentiable
                    group.setdefault(key, value)
        self.__dict__.setdefault("_step_out", {})
        self.__dict__.setdefault("grad_norm_group", None)
        self._step_out.pop("plan", None)  # [note: cached plan]

    # ----------------------------------------------------------------- step
    def _param_name(self, group_index: int, index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        name = f"'{names[index]}' " if names else ""
        return f"param {name}(group {group_index}, index {index})"

    def _uses_master(self, group: dict[str, Any], param: Tensor) -> bool:
        return bool(group["master_weights"]) and param.dtype in LOW_PRECISION

    def _collect(self) -> list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]]:
        """Every (group index, index, param, grad, local param, local grad) to step, all checked
        before anything changes. The common case (a grad with its param's shape, strides,
        device and dtype) is recognised in a few attribute reads; anything else goes through
        the full checks, which raise naming the param."""
        found = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                local_p, local_g = local_tensor(p), local_tensor(g)
                if local_p.is_complex() and self.STEPS_COMPLEX:
                    local_p, local_g = self._real_views(gi, i, local_p, local_g)
                if not (
                    local_p.dtype in PARAM_DTYPES
                    and local_g.layout == torch.strided
                    and local_g.shape == local_p.shape
                    and local_g.device == local_p.device
                    and (local_g.dtype == local_p.dtype or local_g.dtype == torch.float32)
                    and local_p.is_contiguous()
                    and local_g.is_contiguous()
                ):
                    local_g = self._check_grad(gi, i, local_p, local_g)
                found.append((gi, i, p, g, local_p, local_g))
        return found

    def _real_views(self, gi: int, i: int, p: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """[note: complex params] torch steps a complex param, its grad and every state as
        ``torch.view_as_real`` views: real and imaginary parts are elements like any other
        (Adam's ``v`` holds re² and im² apart, not |z|²). The states stay complex (in the
        state dict too); only the op sees the views. Such a param is planned afresh at
        every step ([note: cached plan] matches the complex grad, not its view)."""
        if g.dtype != p.dtype or g.layout != torch.strided:
            where, name = f"fusedopt.{type(self).__name__}", self._param_name(gi, i)
            raise TypeError(
                f"{where}: the grad of {name} is {g.dtype} ({g.layout}); a {p.dtype} param "
                "needs a dense grad of its own dtype"
            )
        return torch.view_as_real(p), torch.view_as_real(g)

    def _check_grad(self, gi: int, i: int, local_p: Tensor, local_g: Tensor) -> Tensor:
        """Check an uncommon grad, naming the param; returns the grad to step with.

        A real, strided grad of the right shape whose memory layout differs from the param's
        (say a contiguous grad set by hand on a channels_last param; autograd gives grads the
        param's layout) is copied into the param's layout: torch accepts it, and the kernels
        pair elements by position. That copy is the only extra pass, and only in this case.
        A param that is not dense is stepped through a dense twin, whose layout its grad is
        given ([note: non-dense params] in fusedopt/_dense.py).
        """
        where, name = f"fusedopt.{type(self).__name__}", self._param_name(gi, i)
        if local_p.is_complex():  # only where the class has no complex semantics
            raise TypeError(
                f"{where}: {name} is complex ({local_p.dtype}); {type(self).__name__} steps "
                "real params only (AdamW, Adam and SGD step complex ones, as torch does)"
            )
        if local_p.dtype not in PARAM_DTYPES:
            raise TypeError(f"{where}: {name} has unsupported dtype {local_p.dtype}")
        check_tensor(local_p, name, where, dense=False)
        if (
            local_g.layout == torch.strided
            and not local_g.is_complex()
            and local_g.shape == local_p.shape
            and local_g.device == local_p.device
            and local_g.stride() != dense_stride(local_p)
        ):
            local_g = state_like(local_p, local_g.dtype).copy_(local_g)
        check_like(local_g, local_p, f"the grad of {name}", where, None)
        if local_g.dtype not in (local_p.dtype, torch.float32):
            raise TypeError(
                f"{where}: the grad of {name} has dtype {local_g.dtype}; expected "
                f"{local_p.dtype} (the param's) or torch.float32"
            )
        return local_g

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        """Create the missing state of ``p``.

        [note: checked once] Every state tensor is made here or by ``load_state_dict`` with
        the param's shape, device, memory layout and the contract's dtype, so the step op
        is called with ``_checked=True`` (grads and params are checked in ``_collect``).
        """
        state = self.state[p]
        master = self._uses_master(group, p)
        dtype = torch.float32 if master else p.dtype
        if p.dtype in LOW_PRECISION:
            self._switch_master(state, master, p.dtype)
        if master and MASTER_KEY not in state:
            state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
        for key in self._state_keys(group):
            if key in state:
                continue
            if key == STEP_KEY:
                state[key] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
            else:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _switch_master(state: dict, master: bool, param_dtype: torch.dtype) -> None:
        """[note: master weights switched] ``master_weights`` of a bf16/fp16 param changed
        since its states were made (set on the group mid-run, or a state dict saved with the
        other setting): drop the master when off (the param, ``master.to(dtype)`` or what the
        user wrote since, goes on from its own value), and cast the states that are in the
        other setting's dtype to this one's (fp32 with a master, else the param's). The
        master itself is made by the caller, from the param. States of any other dtype are
        left for the plan's check to report. Runs only when a step plans (a change of
        ``master_weights`` changes the group signature: [note: cached plan])."""
        if not master:
            state.pop(MASTER_KEY, None)
        dtype, other = (torch.float32, param_dtype) if master else (param_dtype, torch.float32)
        for key, t in state.items():
            if key not in (STEP_KEY, MASTER_KEY) and isinstance(t, Tensor) and t.dtype == other:
                state[key] = t.to(dtype)

    def _scalar_attribute(self, name: str) -> Tensor | None:
        value = self.__dict__.get(name)
        if value is None or isinstance(value, Tensor):
            return value
        return torch.tensor(float(value), dtype=torch.float32)

    @torch.no_grad()
    def _fused_step(self) -> None:
        grad_scale = self._scalar_attribute("grad_scale")  # [note: GradScaler protocol]
        found_inf = self._scalar_attribute("found_inf")
        detect_inf = bool(self.__dict__.get("_fusedopt_detect_inf", False))
        plan, grads, call_grads = self._step_plan()

        coef = None
        max_norm = self.param_groups[0]["max_grad_norm"] if self.param_groups else None
        if max_norm is not None or detect_inf:
            if grad_scale is not None and grads:
                grad_scale = grad_scale.to(local_tensor(grads[0]).device)
            norm, norm_found_inf = total_norm(
                grads,
                2.0,
                grad_scale=grad_scale,
                process_group=self.grad_norm_group,
                backend=self.param_groups[0]["backend"],
            )
            self._step_out["last_grad_norm"] = norm
            if detect_inf:  # [note: found_inf from the norm pass]
                found_inf = norm_found_inf if found_inf is None else found_inf + norm_found_inf
                self._step_out["found_inf"] = found_inf
            if max_norm is not None:
                coef = self._clip_coef(norm, float(max_norm))

        group_hypers: dict[int, dict[str, Any]] = {}
        for call, local_grads in zip(plan.calls, call_grads, strict=True):
            device = call.device
            scalars = {
                "grad_scale": grad_scale.to(device) if grad_scale is not None else None,
                "clip_coef": coef.to(device) if coef is not None else None,
                "found_inf": found_inf.to(device) if found_inf is not None else None,
            }
            runs = []
            for gi, count in call.group_runs:
                if gi not in group_hypers:
                    group_hypers[gi] = self._hypers(self.param_groups[gi])
                runs.append((group_hypers[gi], count))
            lists = {**call.lists, "grads": local_grads}
            hypers = _merge_hypers(runs, device)
            twins = []
            if call.twins:  # [note: non-dense params] in fusedopt/_dense.py
                lists["params"] = list(lists["params"])
                twins = swap_in_twins(lists["params"], call.twins)
            self._run(
                lists, hypers, call.flags, call.params, call.group_runs,
                backend=call.backend, **scalars,
            )  # fmt: skip
            write_back(twins)
        self._after_step(found_inf)

    def _step_plan(self) -> tuple[_Plan, list[Tensor], list[list[Tensor]]]:
        """The op calls of this step, the grads in param order (for the norm pass) and each
        call's local grads: the last step's plan when it still holds ([note: cached plan]),
        else a new one from the full checks."""
        # Under torch.compile the plan is traced away, and a cache written by the traced code
        # would only make Dynamo guard on it and recompile every step.
        compiling = torch.compiler.is_compiling()
        plan = None if compiling else self._step_out.get("plan")
        if plan is not None:
            matched = self._match_plan(plan)
            if matched is not None:
                return (plan, *matched)
        entries = self._collect()
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
        """The op's per-call flags for ``group``: the class's, and ``master_sync``."""
        return {**self._flags(group), "master_sync": bool(group.get("master_sync", True))}

    def _group_signature(self, group: dict[str, Any]) -> tuple:
        """What decides how a group's params are called: flags, state keys, master weights,
        backend."""
        flags = self._call_flags(group)
        return (tuple(sorted(flags.items())), self._state_keys(group),
                bool(group["master_weights"]), group["backend"])  # fmt: skip

    def _match_plan(self, plan: _Plan) -> tuple[list[Tensor], list[list[Tensor]]] | None:
        """The grads of this step if ``plan`` still holds, else None.

        [note: cached plan] Grouping the params into calls and checking every state tensor
        against its param costs ~10 us per param in Python, ~1.5 ms per step for GPT-2's 148
        tensors: more than the whole step of ``torch.optim.AdamW(fused=True)`` (0.6 ms) and,
        on a GPU, more than the kernels of a model that size. So a step reuses the last one's
        calls when nothing they were built from changed: the same groups with the same
        flags, state keys, master weights and backend; the same params, each with the dtype,
        shape, device and strides it had, and a grad again with the dtype, shape, device and
        strides it had (dense: the param's, or its dense twin's [note: non-dense params]); the
        same state dict and state tensor objects. A load, a new group or a state replaced by
        hand makes a new plan, with the full checks. Per param that is a few attribute reads
        and identity tests. Not covered, as in torch: resizing or ``set_()`` on a state tensor
        in place.
        """
        if plan.state is not self.state or len(plan.groups) != len(self.param_groups):
            return None
        grads: list[Tensor] = []
        call_grads: list[list[Tensor]] = [[] for _ in plan.calls]
        state_of = self.state.get
        strided = torch.strided
        for group, (signature, slots) in zip(self.param_groups, plan.groups, strict=True):
            params = group["params"]
            if len(params) != len(slots) or self._group_signature(group) != signature:
                return None
            for p, slot in zip(params, slots, strict=True):
                g = p.grad
                if slot is None:
                    if g is None:
                        continue
                    return None
                param, shape, stride, dtype, grad_dtype, device, state, tensors, ci, p_stride = slot
                if (
                    g is None
                    or p is not param
                    or g.dtype != grad_dtype
                    or p.dtype != dtype
                    or g.shape != shape
                    or p.shape != shape
                    or g.device != device
                    or p.device != device
                    or g.layout != strided
                    or g.stride() != stride
                    or p.stride() != p_stride
                    or state_of(p) is not state
                ):
                    return None
                for key, t in tensors:
                    if state.get(key) is not t:
                        return None
                grads.append(g)
                call_grads[ci].append(g)
        return grads, call_grads

    def _plan(self, entries: list[tuple]) -> _Plan:
        """Group the params into op calls, one per (device, param dtype, grad dtype, flags,
        state keys, master weights or not, backend); check each state tensor still fits
        ([note: checked once]), re-laid if its param's layout changed ([note: re-laid state])."""
        plan = _Plan(self.state, len(self.param_groups))
        calls: dict[tuple, int] = {}
        per_group: dict[int, tuple] = {}
        strided = torch.strided
        for gi, i, p, g, local_p, local_g in entries:
            info = per_group.get(gi)
            if info is None:
                group = self.param_groups[gi]
                signature = self._group_signature(group)
                keys = signature[1]
                names = tuple(self.STATE_LISTS[k] for k in keys)
                info = per_group[gi] = (group, keys, names, self._call_flags(group), signature)
            group, keys, names, flags, signature = info
            master = self._uses_master(group, p)
            key = (local_p.device, local_p.dtype, local_g.dtype, master, signature)
            ci = calls.get(key)
            if ci is None:
                ci = calls[key] = len(plan.calls)
                plan.calls.append(_Call(local_p.device, group["backend"], flags, names, master))
            state = self.state[p]
            # A DTensor: its states are DTensors too. (local_p is also another tensor for a
            # complex param: its real view, [note: complex params].)
            sharded = local_tensor(p) is not p
            slot_keys = (*keys, MASTER_KEY) if master else keys
            # The states' layout: the param's, or its dense twin's [note: non-dense params].
            layout = (local_p.shape, dense_stride(local_p), local_p.device)
            dtype = torch.float32 if master else local_p.dtype
            for k in slot_keys:
                t = local_tensor(state[k]) if sharded else state[k]
                t = torch.view_as_real(t) if t.is_complex() else t  # as local_p
                if not _fits(t, layout, k, dtype):
                    state[k] = self._relaid_state(gi, i, p, k, t, layout, dtype)
            local_states = [local_tensor(state[k]) if sharded else state[k] for k in keys]
            if p.is_complex():
                local_states = [
                    torch.view_as_real(t) if t.is_complex() else t for t in local_states
                ]
            masters = [local_tensor(state[MASTER_KEY])] if master else []
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
            slots = plan.groups[gi][1]
            slots.extend([None] * (i - len(slots)))
            slots.append(_Slot(
                p, layout[0], layout[1], p.dtype, g.dtype, layout[2], state,
                tuple((k, state[k]) for k in slot_keys), ci, local_p.stride(),
            ))  # fmt: skip
        for gi, group in enumerate(self.param_groups):
            slots = plan.groups[gi][1]
            slots.extend([None] * (len(group["params"]) - len(slots)))
            signature = per_group[gi][4] if gi in per_group else self._group_signature(group)
            plan.groups[gi] = (signature, slots)
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
        elif t.device != device:
            problem = f"is on {t.device} but the param now is on {device}"
        elif t.dtype != dtype and not (key == MASTER_KEY and t.dtype == torch.float32):
            problem = f"has dtype {t.dtype} but the param needs {dtype} states"
        else:
            return state_like(p, self.state[p][key].dtype).copy_(self.state[p][key])
        raise RuntimeError(
            f"fusedopt.{type(self).__name__}: state {key!r} of {self._param_name(gi, i)} no "
            f"longer fits it: it {problem}; was the param's .data, or the state, replaced by "
            "hand? Load states with load_state_dict"
        )

    def step(self, closure: Any = None) -> Any:
        """One optimizer step over every param that has a grad; returns ``closure()``'s loss.

        Reads ``grad_scale`` / ``found_inf`` attributes when a GradScaler set them
        ([note: GradScaler protocol]); makes no host sync.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fused_step()
        return loss

    # ----------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, checked first and cast to fusedopt's state dtypes.

        Accepts torch.optim state dicts of the same algorithm. Every mismatch (group or param
        counts, an unknown state key, a state tensor whose shape does not fit its param, an
        invalid hyperparameter) raises naming the param before anything changes. Moments are
        fp32 when the param is fp32 or keeps a master copy, else in the param's dtype; steps
        become 0-d fp32 tensors on the param's device.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        # Deep-copied as torch does: a tensor lr (or any group value) of the source optimizer
        # must not be shared with this one, or a scheduler's in-place update of one would
        # change the other.
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        new_groups, id_map = [], {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group (group {gi}) that doesn't "
                    "match the size of optimizer's group"
                )
            new_group = {k: v for k, v in saved.items() if k != "params"}
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]
            for key, value in self.defaults.items():
                new_group.setdefault(key, value)
            for key in _TORCH_ONLY_KEYS:
                new_group.pop(key, None)
            try:
                self._check_group(new_group)
                self._check_common(new_group)
            except ValueError as error:
                raise ValueError(f"loaded state dict, param group {gi}: {error}") from None
            new_groups.append(new_group)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                id_map[pid] = (gi, i, p)
        if len({g.get("max_grad_norm") for g in new_groups}) > 1:
            raise ValueError("loaded state dict: groups have different max_grad_norm")

        new_state: dict[Tensor, dict[str, Any]] = {}
        for pid, saved_state in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"loaded state dict has state for unknown param id {pid!r}")
            gi, i, p = id_map[pid]
            new_state[p] = self._cast_state(new_groups[gi], p, saved_state, gi, i)
        for group in new_groups:
            self._fix_loaded_group(
                group, {p: new_state[p] for p in group["params"] if p in new_state}
            )
        state: defaultdict = defaultdict(dict)
        state.update(new_state)
        self.__setstate__({"state": state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _cast_state(self, group, p: Tensor, saved: dict, gi: int, i: int) -> dict[str, Any]:
        """Check one param's saved state and cast it to this optimizer's layout."""
        where = f"loaded state dict, {self._param_name(gi, i)}"
        allowed = set(self.STATE_LISTS) | {MASTER_KEY}
        unknown = set(saved) - allowed
        if unknown:
            raise ValueError(
                f"{where}: unknown state keys {sorted(unknown)} for {type(self).__name__} "
                f"(expected some of {sorted(allowed)})"
            )
        master = self._uses_master(group, p)
        if MASTER_KEY in saved and not master and p.dtype in LOW_PRECISION:
            # Saved with master weights, loaded without: [note: master weights switched].
            saved = {k: v for k, v in saved.items() if k != MASTER_KEY}
        if MASTER_KEY in saved and not master:
            raise ValueError(
                f"{where}: has a master_param but the param is {p.dtype} with "
                f"master_weights={group['master_weights']}"
            )
        device = local_tensor(p).device
        out: dict[str, Any] = {}
        for key, value in saved.items():
            if key == STEP_KEY:
                value = torch.as_tensor(value)
                if value.numel() != 1:
                    raise ValueError(f"{where}: step must hold one number, has shape {value.shape}")
                # A copy, as every other state: two optimizers never advance one count.
                value = value.detach().reshape(())
                out[key] = value.to(dtype=torch.float32, device=device, copy=True)
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: state {key!r} must be a tensor, got {type(value)}")
            if value.shape != p.shape:
                raise ValueError(
                    f"{where}: state {key!r} has shape {tuple(value.shape)} but the param has "
                    f"{tuple(p.shape)}"
                )
            dtype = torch.float32 if (master or key == MASTER_KEY) else p.dtype
            # In the param's memory layout, whatever the saved one: the step pairs elements
            # by position ([note: checked once] in _init_state).
            out[key] = torch.empty_like(p, dtype=dtype).copy_(value.detach())
        return out


class _Slot(NamedTuple):
    """One stepped param of a plan: what it and its grad looked like, its state dict and state
    tensors, and its call. A tuple, so that the per-step check unpacks it at tuple speed."""

    param: Tensor
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    grad_dtype: torch.dtype
    device: torch.device
    state: dict
    tensors: tuple[tuple[str, Tensor], ...]  # (state key, tensor) for every key it steps
    call: int  # index into _Plan.calls
    param_stride: tuple[int, ...]  # the param's own: stride above unless it is not dense


class _Plan:
    """The op calls of one step, and what they were built from ([note: cached plan])."""

    __slots__ = ("call_of_entry", "calls", "groups", "reusable", "state")

    def __init__(self, state: dict, num_groups: int) -> None:
        self.state = state
        self.calls: list[_Call] = []
        self.call_of_entry: list[int] = []  # the call of each stepped param, in param order
        # Per group: (its _group_signature, one _Slot per param, None where it had no grad).
        self.groups: list[tuple[tuple | None, list[_Slot | None]]] = [
            (None, []) for _ in range(num_groups)
        ]
        self.reusable = True


class _Call:
    """The tensor lists of one op call but the grads (new every step), filled param by param."""

    __slots__ = ("backend", "device", "flags", "group_runs", "lists", "master", "params",
                 "state_lists", "twins")  # fmt: skip

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
        and (t.dtype == dtype or (key == MASTER_KEY and t.dtype == torch.float32))
    )


def _merge_hypers(runs: list[list], device: torch.device) -> dict[str, Any]:
    """One list per hyperparameter, from runs of params sharing a group's values; a tensor lr
    stays on the device: one shared tensor is passed as is (CUDA-graph friendly), mixed ones
    become a vector."""
    merged: dict[str, Any] = {}
    for name in runs[0][0]:
        values = [(hypers[name], count) for hypers, count in runs]
        if name != "lr" or not any(isinstance(v, Tensor) for v, _ in values):
            merged[name] = [float(v) for v, count in values for _ in range(count)]
        elif len(values) == 1 or all(v is values[0][0] for v, _ in values):
            merged[name] = _device_lr(values[0][0], device)
        else:
            merged[name] = torch.cat(
                [
                    _device_lr(v, device).reshape(1).expand(count)
                    if isinstance(v, Tensor)
                    else torch.full((count,), float(v), device=device)
                    for v, count in values
                ]
            )
    return merged


def _device_lr(lr: Tensor, device: torch.device) -> Tensor:
    return lr.detach().reshape(()).to(device=device, dtype=torch.float32)
