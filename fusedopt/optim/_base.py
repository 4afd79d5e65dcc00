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

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from fusedopt import ops
from fusedopt._contract import STEP_OPS, has_state
from fusedopt._dense import dense_stride, state_for, state_like, swap_in_twins, write_back
from fusedopt._validate import LOW_PRECISION, PARAM_DTYPES, check_like, check_tensor
from fusedopt.clip import clip_coef as torch_clip_coef
from fusedopt.clip import local_tensor, total_norm
from fusedopt.ops import StepHypers
from fusedopt.ops import _resolve as resolve_backend
from fusedopt.optim import _state_bits
from fusedopt.optim._keys import (
    COMPACT,
    KAHAN,
    KAHAN_KEY,
    MASTER_KEY,
    MASTER_KEYS,
    REMAINDER_KEY,
    SR_COUNTER_KEY,
    SR_GROUP_KEY,
    SR_SEED_KEY,
    STEP_KEY,
    TORCH_ONLY_KEYS,
)
from fusedopt.optim._plan import (
    PlanMixin,
    _Plan,
    call_hypers,
    check_stochastic_rounding,
    native_calls,
)
from fusedopt.optim._state_dict import StateDictMixin
from fusedopt.reference.ops import join_kahan, join_master, split_kahan, split_master


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


#: What a constructor's ``params`` takes: tensors, or param-group dicts.
Params = Iterable[Tensor] | Iterable[dict[str, Any]]
#: The seed of stochastic rounding: 63 bits, so that it fits an int64 tensor.
_SEED_MASK = (1 << 63) - 1

#: Constructor arguments that are the optimizer's, not defaults of its groups.
_NOT_GROUP_KEYS = ("self", "params", "grad_norm_group")


def _check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        return  # a device lr is not read on the host (no sync)
    check_nonnegative("lr", lr, "learning rate")


class FusedOptimizer(PlanMixin, StateDictMixin, torch.optim.Optimizer):
    """Base of ``fusedopt.AdamW``, ``Adam``, ``LAMB``, ``Lion`` and ``SGD``.

    Subclasses set :attr:`OP` (:attr:`STATE_LISTS` follows from it) and override
    :meth:`_check_group`, :meth:`_state_keys`, :meth:`_hypers` and :meth:`_flags`.

    Common keyword arguments (also group keys):

    * ``master_weights``: bf16/fp16 params get an fp32 copy in ``state["master_param"]``; the
      step updates the master and its fp32 states and writes ``master.to(param.dtype)`` into
      the param, in one pass. On fp32 and fp64 params it does nothing: they are their own
      master (no copy is kept and the states stay in the param's dtype). It may be switched
      on or off mid-run (``group["master_weights"] = ...``, or a loaded state dict that says
      otherwise): the next step creates the master from the param, or drops it, and casts
      the param's states (fp32 with a master, the param's dtype without)
      [note: master weights switched]. ``master_weights="compact"`` (bf16 params only; fp16
      raises) keeps only the 16 low bits of each fp32 master, as int16, in
      ``state["master_remainder"]``: param and remainder together are the fp32 master, 2
      bytes per param instead of 4, and the step is bit for bit the fp32-master step; the
      param is the master rounded to nearest with ties away from zero (``master.to(bf16)``
      but at exact ties), and a value written into the param is always adopted, joined with
      the old remainder (within half an ulp) [note: compact master] in
      ``fusedopt/_contract.py``. ``master_weights="kahan"`` (bf16 and fp16 params) keeps,
      beside the param, a compensation of the param's own dtype in ``state["kahan_comp"]``:
      the step reads the master as ``fp32(param) + fp32(comp)`` and writes ``param =
      round(x)``, ``comp = round(x - param)``, so an update far below half an ulp of the
      param still accumulates (2 bytes per param; the states stay fp32) [note: kahan
      master]. Switching between False, True, "compact" and "kahan" converts at the next
      step (exactly, except into "kahan", which keeps the compensation's precision).
    * ``master_sync`` (default True): with master weights, a value written into a param
      between steps (``model.load_state_dict``, a re-initialisation, ``p.clamp_()``) is
      adopted by its master at the next step, element by element (the param's bits differ
      from the rounded master's), instead of being overwritten from the stale master; a step
      skipped by ``found_inf`` adopts nothing. ``False`` skips that check (2 bytes per
      element less to read): then writes into the params are lost, as in Apex, Transformer
      Engine and DeepSpeed. [note: master sync] in ``fusedopt/_contract.py``.
    * ``stochastic_rounding`` (default False; bf16 params without master weights only, else
      a ValueError at construction, ``add_param_group`` or the step, before anything
      changes): the param store rounds stochastically instead of to nearest, so updates
      below half a bf16 ulp move the params in expectation instead of being lost. The random
      bits are Philox4x32-10's, keyed by (``sr_seed``, the optimizer's SR step counter, the
      param's index in the optimizer's param order, the element): the same bits on every
      backend, reproducible, and resumed by ``load_state_dict`` (the state dict's
      ``"stochastic_rounding"`` entry holds seed and counter). ``sr_seed`` (an attribute)
      is ``torch.initial_seed()`` at construction (63 bits); set it before the first step
      to choose another. The counter lives on the device and advances by one per step that
      runs (not when ``found_inf`` skips it): no host sync. [note: stochastic rounding] in
      ``csrc/include/fusedopt/dtype.h``.
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
    #: state key -> the op's tensor-list name, for every state key the class may keep: the
    #: op spec's state keys (``fusedopt._contract``), set from :attr:`OP` for each subclass.
    STATE_LISTS: ClassVar[dict[str, str]]
    _step_supports_amp_scaling = True  # [note: GradScaler protocol]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "OP" in cls.__dict__:
            cls.STATE_LISTS = STEP_OPS[cls.OP].state_keys

    #: Step complex params as real views, as torch does ([note: complex params]).
    STEPS_COMPLEX: ClassVar[bool] = False

    def __init__(
        self,
        params: Params,
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
        self.sr_seed = torch.initial_seed() & _SEED_MASK  # [note: stochastic rounding]
        # The [seed, counter] of stochastic rounding per device (int64, advanced on the
        # device), and the counter a first one starts from (a loaded state dict's).
        self._sr_keys: dict[torch.device, Tensor] = {}
        self._sr_start = 0
        # What a step leaves behind: last_grad_norm, found_inf for fusedopt's scaler, and
        # its plan for the next step ([note: no setattr in step], [note: cached plan]).
        self._step_out: dict[str, Any] = {}
        super().__init__(params, defaults)

    def _init_from_arguments(self, arguments: dict[str, Any], **changed: Any) -> None:
        """:meth:`__init__` from a subclass constructor's ``locals()`` (taken first thing):
        every argument but ``self``, ``params`` and ``grad_norm_group`` is a group default, as
        given or as ``changed`` (a value the constructor normalises). The constructors keep
        explicit signatures (torch's names and defaults, for IDEs and ``inspect``: a drop-in
        test checks them) and share this body."""
        defaults = {
            name: value for name, value in arguments.items()
            if name not in _NOT_GROUP_KEYS and not name.startswith("__")  # __class__ (super())
        }  # fmt: skip
        defaults.update(changed)
        FusedOptimizer.__init__(self, arguments["params"], defaults, arguments["grad_norm_group"])

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

    def _call_op(self, flags: dict[str, bool]) -> str:
        """The step op of a call with these flags: :attr:`OP` (``fusedopt.Muon`` runs
        ``adamw_`` too, for its non-matrix params)."""
        return self.OP

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

    def _uses_planned_calls(self) -> bool:
        """Whether a cached plan's calls run as planned calls ([note: planned calls]): not
        for a class that overrides :meth:`_run` (LAMB steps per group)."""
        return type(self)._run is FusedOptimizer._run

    def _run_planned(
        self,
        call: Tensor,
        hypers: StepHypers,
        grad_scale: Tensor | None,
        clip_coef: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """Run the planned op call ``call`` (``fusedopt._C``'s handle of its lists) with this
        step's grads, hyperparameters and scalars ([note: planned calls])."""
        native_calls()[1](
            call, hypers.table, hypers.group_sizes, hypers.lr_tensor, grad_scale, clip_coef,
            found_inf,
        )  # fmt: skip

    # ----------------------------------------------------------------- groups
    @classmethod
    def _check_common(cls, group: dict[str, Any]) -> None:
        _check_lr(group["lr"])
        _state_bits.check_state_dtype(group, cls.OP)  # [note: state dtype]
        master_weights = group.get("master_weights", False)
        if isinstance(master_weights, str) and master_weights not in (COMPACT, KAHAN):
            raise ValueError(
                f"Invalid master_weights: {master_weights!r} (False, True, {COMPACT!r} or "
                f"{KAHAN!r})"
            )
        if master_weights == COMPACT:
            for p in group.get("params", ()):  # (the defaults have none)
                if p.dtype == torch.float16:
                    raise ValueError(
                        "master_weights='compact' needs bfloat16 params (fp16 is not the top "
                        "half of fp32); got a float16 param: use master_weights=True for it, "
                        "in a group of its own"
                    )
        check_stochastic_rounding(group)
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
        self._forget_plan()  # [note: cached plan]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in TORCH_ONLY_KEYS:  # torch's __setstate__ adds differentiable
                    group.setdefault(key, value)
        self.__dict__.setdefault("_step_out", {})
        self.__dict__.setdefault("grad_norm_group", None)
        self.__dict__.setdefault("sr_seed", torch.initial_seed() & _SEED_MASK)
        self.__dict__.setdefault("_sr_keys", {})
        self.__dict__.setdefault("_sr_start", 0)
        self._forget_plan()  # [note: cached plan]

    # ----------------------------------------------------------------- step
    def _param_name(self, group_index: int, index: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        name = f"'{names[index]}' " if names else ""
        return f"param {name}(group {group_index}, index {index})"

    def _uses_master(self, group: dict[str, Any], param: Tensor) -> bool:
        return bool(group["master_weights"]) and param.dtype in LOW_PRECISION

    def _master_key(self, group: dict[str, Any], param: Tensor) -> str | None:
        """The state key of ``param``'s master: ``master_param`` (fp32), ``master_remainder``
        (compact, [note: compact master] in fusedopt/_contract.py), ``kahan_comp`` (Kahan,
        [note: kahan master]) or None (no master). Raises for a compact master of an fp16
        param."""
        if not self._uses_master(group, param):
            return None
        if group["master_weights"] == KAHAN:
            return KAHAN_KEY
        if group["master_weights"] != COMPACT:
            return MASTER_KEY
        if param.dtype != torch.bfloat16:
            raise ValueError(
                f"fusedopt.{type(self).__name__}: master_weights='compact' needs bfloat16 "
                f"params, got a {param.dtype} one (fp16 is not the top half of fp32): use "
                "master_weights=True for it, in a group of its own"
            )
        return REMAINDER_KEY

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
        master_key = self._master_key(group, p)
        master = master_key is not None
        dtype = _state_bits.state_dtype(group, self.OP, p.dtype, master)
        free = STEP_OPS[self.OP].state_dtypes  # [note: state dtype]
        if p.dtype in LOW_PRECISION:
            # An op with free state dtypes casts its states to the group's below, once.
            fixed = frozenset(state) if free else _state_bits.scale_keys(self.OP)
            self._switch_master(state, master, p.dtype, fixed)
            self._convert_master(state, master_key, p, bool(group.get("master_sync", True)))
        if free and not _state_bits.eight_bit(group):
            _state_bits.convert_dtype(state, self.OP, dtype)
        if master_key == MASTER_KEY and MASTER_KEY not in state:
            state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
        if master_key == REMAINDER_KEY and REMAINDER_KEY not in state:
            # The master of a param without one is the param itself: remainder 0.
            state[REMAINDER_KEY] = torch.zeros_like(
                p, dtype=torch.int16, memory_format=torch.preserve_format
            )
        if master_key == KAHAN_KEY and KAHAN_KEY not in state:
            # Likewise: compensation 0, in the param's dtype ([note: kahan master]).
            state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        q8 = _state_bits.eight_bit(group)  # [note: 8-bit states] in fusedopt/quant8.py
        if q8 or _state_bits.scale_keys(self.OP) & state.keys():
            _state_bits.convert(state, self.OP, q8, dtype, p)
        layouts = STEP_OPS[self.OP].state_layouts
        for key in self._state_keys(group):
            if key in state or not has_state(layouts.get(key, "param"), p.shape):
                continue
            quantized = _state_bits.new_state(key, self.OP, p) if q8 else None
            if quantized is not None:
                state[key] = quantized
            elif key == STEP_KEY:
                state[key] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
            elif layouts.get(key, "param") == "param":
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            else:  # [note: factored layouts] in fusedopt/_contract.py
                state[key] = state_for(p, layouts[key], dtype).zero_()
        return state

    @staticmethod
    def _switch_master(
        state: dict, master: bool, param_dtype: torch.dtype, fixed: frozenset = frozenset()
    ) -> None:
        """[note: master weights switched] ``master_weights`` of a bf16/fp16 param changed
        since its states were made (set on the group mid-run, or a state dict saved with the
        other setting): drop the master when off (the param, ``master.to(dtype)`` or what the
        user wrote since, goes on from its own value), and cast the states that are in the
        other setting's dtype to this one's (fp32 with a master, else the param's). The
        master itself is made by the caller, from the param. States of any other dtype are
        left for the plan's check to report. Runs only when a step plans (a change of
        ``master_weights`` changes the group signature: [note: cached plan]). The keys in
        ``fixed`` keep their dtype (the fp32 absmaxes of 8-bit states)."""
        if not master:
            for key in MASTER_KEYS:
                state.pop(key, None)
        dtype, other = (torch.float32, param_dtype) if master else (param_dtype, torch.float32)
        for key, t in state.items():
            if (
                key not in (STEP_KEY, *MASTER_KEYS)
                and key not in fixed
                and isinstance(t, Tensor)
                and t.dtype == other
            ):
                state[key] = t.to(dtype)

    @staticmethod
    def _convert_master(state: dict, master_key: str | None, p: Tensor, sync: bool) -> None:
        """[note: master weights switched] between fp32, compact ([note: compact master] in
        fusedopt/_contract.py) and Kahan ([note: kahan master]) masters, through the fp32
        master each stands for: an fp32 one (after [note: master sync]'s adoption of a
        written param, when ``sync``), a compact one joined (``join_master``), a Kahan one
        joined (``join_kahan``); then kept as fp32 (the param rewritten as
        ``master.to(dtype)``), split into param and remainder (``split_master``: the param
        changes only at exact ties) or into param and compensation (``split_kahan``: the
        param is ``master.to(dtype)``). The next step then adopts nothing. From Kahan to fp32
        or compact is exact (the master is the fp32 sum); to Kahan keeps the master to the
        compensation's precision (8 more significant bits for bf16, 11 for fp16), not all 24."""
        if master_key is None:
            return
        old = [key for key in MASTER_KEYS if key in state and key != master_key]
        if not old:
            return
        param = p.detach()
        value = state.pop(old[0])
        if old[0] == MASTER_KEY:
            master = value
            if sync:
                written = master.to(param.dtype).view(torch.int16) != param.view(torch.int16)
                master = torch.where(written, param.to(torch.float32), master)
        elif old[0] == REMAINDER_KEY:
            master = join_master(param, value)
        else:
            master = join_kahan(param, value)
        if master_key == MASTER_KEY:
            state[MASTER_KEY] = master
            param.copy_(master)
        elif master_key == REMAINDER_KEY:
            rounded, state[REMAINDER_KEY] = split_master(master)
            param.copy_(rounded)
        else:
            rounded, state[KAHAN_KEY] = split_kahan(master, param.dtype)
            param.copy_(rounded)

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
        # grads None: a cached plan keeps this step's grads in C++ ([note: planned calls]).
        plan, grads, call_grads = self._step_plan()
        try:
            self._step_with(plan, grads, call_grads, grad_scale, found_inf, detect_inf)
        finally:
            plan.release()  # [note: step grads] in csrc/bindings.cpp

    def _step_with(
        self,
        plan: _Plan,
        grads: list[Tensor] | None,
        call_grads: list[list[Tensor]] | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        detect_inf: bool,
    ) -> None:
        """The step of ``_fused_step`` once planned: the norm pass, then the op calls."""
        coef = None
        max_norm = self.param_groups[0]["max_grad_norm"] if self.param_groups else None
        if max_norm is not None or detect_inf:
            backend = self.param_groups[0]["backend"]
            planned = None if grads is not None else plan.planned_norm(backend)
            if grads is None and planned is None:
                grads, call_grads = plan.python_grads()
            if grad_scale is not None and (grads or planned):
                device = planned.device if planned else local_tensor(grads[0]).device
                grad_scale = grad_scale.to(device)
            norm, norm_found_inf = total_norm(
                grads if grads is not None else [],
                2.0,
                grad_scale=grad_scale,
                process_group=self.grad_norm_group,
                backend=backend,
                _checked=plan.checked_grads,
                _planned=planned,
            )
            self._step_out["last_grad_norm"] = norm
            if detect_inf:  # [note: found_inf from the norm pass]
                found_inf = norm_found_inf if found_inf is None else found_inf + norm_found_inf
                self._step_out["found_inf"] = found_inf
            if max_norm is not None:
                coef = self._clip_coef(norm, float(max_norm))

        group_hypers: dict[int, dict[str, Any]] = {}
        for ci, call in enumerate(plan.calls):
            device = call.device
            scalars = {
                "grad_scale": grad_scale.to(device) if grad_scale is not None else None,
                "clip_coef": coef.to(device) if coef is not None else None,
                "found_inf": found_inf.to(device) if found_inf is not None else None,
            }
            if call.sr_key is not None:  # [note: stochastic rounding]
                call.sr_key[:2].copy_(self._sr_state(device))
                scalars["sr_key"] = call.sr_key
            runs = []
            for gi, count in call.group_runs:
                if gi not in group_hypers:
                    group_hypers[gi] = self._hypers(self.param_groups[gi])
                runs.append((group_hypers[gi], count))
            hypers = call_hypers(call, runs, STEP_OPS[self._call_op(call.flags)].hypers)
            if (
                call.native is not None
                and self._uses_planned_calls()
                and resolve_backend(call.backend, device) == call.native_backend
            ):  # [note: planned calls] in fusedopt/optim/_plan.py
                self._run_planned(call.native, hypers, **scalars)
                continue
            if call_grads is None:
                grads, call_grads = plan.python_grads()
            lists = {**call.lists, "grads": call_grads[ci]}
            twins = []
            if call.twins:  # [note: non-dense params] in fusedopt/_dense.py
                lists["params"] = list(lists["params"])
                twins = swap_in_twins(lists["params"], call.twins)
            self._run(
                lists, hypers, call.flags, call.params, call.group_runs,
                backend=call.backend, **scalars,
            )  # fmt: skip
            write_back(twins)
        self._advance_sr(found_inf)
        self._after_step(found_inf)

    def _sr_state(self, device: torch.device) -> Tensor:
        """The [seed, counter] of stochastic rounding on ``device`` (int64), made at first use
        from another device's (a device copy, no host sync) or from ``sr_seed`` and the
        counter a loaded state dict gave ([note: stochastic rounding])."""
        state = self._sr_keys.get(device)
        if state is None:
            if self._sr_keys:
                state = next(iter(self._sr_keys.values())).to(device, copy=True)
            else:
                state = torch.tensor([self.sr_seed, self._sr_start], dtype=torch.int64,
                                     device=device)  # fmt: skip
            self._sr_keys[device] = state
        return state

    def _advance_sr(self, found_inf: Tensor | None) -> None:
        """Advance every device's SR counter by one, on the device, unless ``found_inf`` says
        the step was skipped: a skipped step changes nothing, its counter included."""
        for device, state in self._sr_keys.items():
            if found_inf is None:
                state[1:].add_(1)
            else:
                state[1:].add_((found_inf.to(device) == 0).to(torch.int64))

    def _sr_counter(self) -> int:
        """The SR step counter (a host read: for ``state_dict``)."""
        if not self._sr_keys:
            return self._sr_start
        return int(next(iter(self._sr_keys.values()))[1])

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``; with stochastic rounding in any group, also
        ``"stochastic_rounding": {"seed", "counter"}`` (plain ints), which
        ``load_state_dict`` restores, so that a resumed run draws the same bits
        ([note: stochastic rounding] in ``csrc/include/fusedopt/dtype.h``)."""
        saved = super().state_dict()
        if any(group.get(SR_GROUP_KEY) for group in self.param_groups):
            seed, counter = int(self.sr_seed), self._sr_counter()
            saved[SR_GROUP_KEY] = {"seed": seed, "counter": counter}
            for group in saved["param_groups"]:  # for DCP, which keeps groups only
                if group.get(SR_GROUP_KEY):
                    group[SR_SEED_KEY], group[SR_COUNTER_KEY] = seed, counter
        return saved

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
