"""The op contract: the schema of every fusedopt op, declared once.

Every backend registers its own copy of each op as ``fusedopt::<op>_<backend>[_]`` (the
dispatcher picks kernels by device, not by backend, so each backend needs its own op name);
the schemas below are shared, so all backends take exactly the same arguments. The C++
extension only *implements* these ops (``TORCH_LIBRARY_IMPL``); the definitions live here so
that they exist even when ``fusedopt._C`` is not built. DESIGN.md §3 summarises this table.

Conventions common to every op (see [note: common scalars]):

* Tensor lists are aligned: ``params[i]``, ``grads[i]``, ``exp_avgs[i]``... belong to the same
  parameter. All tensors of one call share one device. Within one call all params share one
  dtype, all grads share one dtype (the param dtype or fp32), and ``master_params`` is either
  empty (no master weights), one fp32 tensor per param, or, beside bf16 params, one int16
  remainder per param ([note: compact master]), or one compensation of the param's own
  dtype per bf16/fp16 param ([note: kahan master]). The functional layer
  (``fusedopt.ops``) splits a user's lists into such calls.
* Hyperparameters are a small device table, ``Tensor hypers`` (float64 ``[G, K]``, one row per
  group of tensors, the columns in the spec's ``hypers`` order, ``lr`` first, on the params'
  device) and ``int[] group_sizes`` (G counts summing to N: row g holds the hyperparameters
  of the next ``group_sizes[g]`` tensors), so that one launch covers every param group
  ([note: hyper table]). Flags that change the code path (``amsgrad``, ``nesterov``...) are
  per call.
* ``lr_tensor``: when given, overrides the ``lr`` column; a 0-d fp32 tensor (one lr for all
  tensors) or a 1-d fp32 tensor of length N, on the params' device.
* ``steps``: one 0-d fp32 tensor per param on the params' device (torch's layout). The op
  adds 1 to each, unless ``found_inf`` is non-zero, then uses the new value ``t``. Bias
  corrections ``1 - beta**t`` are computed in float64.
* ``grad_scale``: 0-d fp32 (or fp64 when the params are fp64); every grad is divided by it on
  load (never written back).
* ``clip_coef``: 0-d fp32 (or fp64 when the params are fp64); every grad is multiplied by it on
  load, after the division.
* ``found_inf``: 0-d fp32; when non-zero the whole op is a no-op: params, master params,
  states and steps stay bit-identical.
* ``master_sync`` (after the common scalars, default True): see [note: master sync].
* ``sr_key`` (every step op's last argument, default None): the key of stochastic rounding of
  the param store of bf16 params without master weights, an int64 vector [seed, counter,
  id_0, ..., id_{N-1}] on the params' device, read only ([note: stochastic rounding] in
  csrc/include/fusedopt/dtype.h).

[note: common scalars] Order of operations on a grad element, in opmath (fp32; fp64 for
fp64 storage): ``g = grad; g = g / grad_scale; g = g * clip_coef; if maximize: g = -g``.

[note: opmath scalars] ``grad_scale`` and ``clip_coef`` are read in opmath: an fp64 call takes
them as fp64 (an fp32 one is widened, exactly; the C++ backends widen it before the launch, so
their kernels read one value of the opmath type), so that an fp64 model's clip coefficient is
not rounded to fp32. ``found_inf`` and ``lr_tensor`` stay fp32. DESIGN.md §3.

[note: master sync] With master weights a step reads the fp32 master, not the param, and
writes ``master.to(param.dtype)`` into the param. A value written into the param between
steps (``load_state_dict`` of the model, re-initialising a layer, ``p.clamp_()``) would be
lost: the next step would rebuild the param from the stale master. So with
``master_sync=True`` every element of a step first compares the param's bits with the bits of
its rounded master, and where they differ takes the param's value (widened to fp32) as the
master before the update. Bits, not values: a param written to ``+0`` over a ``-0`` master,
or to a NaN of other bits, is adopted; an unchanged NaN is not. An element the user did not
touch keeps its master's extra precision. It costs one read of the param (2 bytes per
element). With ``found_inf`` set nothing is adopted either (the step changes nothing; the
next step adopts). LAMB adopts in both passes alike, so ``|p|`` of the trust ratio is the
norm of the adopted master. ``master_sync=False`` is the old behaviour (Apex's, TE's,
DeepSpeed's): the master alone is the truth. Without master params the flag does nothing.

[note: compact master] A compact master (``master_weights="compact"``, bf16 params only)
keeps, beside the bf16 param, the 16 low bits of the fp32 master as an int16 *remainder*, so
that param and remainder together are the fp32 master: 2 bytes per param instead of 4. It is
signalled by the dtype of ``master_params`` (int16 beside a bf16 param; no schema changes).
Layout, in 32-bit integer arithmetic on the fp32 bits u of the master:
``param_bits = (u + 0x8000) >> 16`` and ``remainder = int16(u & 0xFFFF)`` (split), and
``u = (param_bits << 16) + remainder`` (join, the remainder sign-extended). The param is the
master rounded to nearest, *ties away from zero* (the carry of ``+ 0x8000`` adds to the
magnitude; the sign bit is apart), and ``master - param`` is then within
``[-0x8000, 0x7FFF]`` units of the master's last place: an int16. Round to nearest *even*
cannot be kept: for an even param 2^16 + 1 fp32 values round to it (both ties), one more
than 16 bits can name; any 16-bit scheme loses one of them or rounds a tie the other way.
So the master (and every state and the update) is bit for bit the fp32 master's, and the
param equals ``master.to(bfloat16)`` except where the master's low 16 bits are exactly
0x8000 and its upper half is even (a tie, one fp32 value in 2^17): there the param is the
other neighbour, equally near. Edge cases: a NaN master stores the param's NaN
(``float_to_bf16``'s 0x7FC0) and remainder 0, and a NaN param joins to its widened value; a
remainder that does not fit its param (negative beside a zero, positive beside an infinity:
it would cross the sign or make a NaN) can only follow a write into the param and is
dropped: the param's value is taken exactly. The master is derived from the param, so
[note: master sync] has one meaning here whatever ``master_sync`` says: a value written into
the param is adopted joined with the old remainder, i.e. within half a bf16 ulp of the
written value (and rounding back to it), at no cost (the param is read anyway). A step
skipped by ``found_inf`` writes nothing. fp16 is not the top half of fp32: compact masters
are refused for fp16 params. Implemented once per backend in the shared master path:
``split_master``/``join_master`` (csrc/include/fusedopt/dtype.h; Triton ``common.py``;
``fusedopt.reference.ops``), used by ``load_param``/``store_param`` (csrc/cuda/step.cuh),
``for_each_block`` (csrc/cpu/step.h), the Triton driver and ``_load_param``/``_store_param``.

[note: kahan master] A Kahan master (``master_weights="kahan"``, bf16 or fp16 params) keeps,
beside the 16-bit param, a *compensation* c of the param's own dtype (``state["kahan_comp"]``),
and the master is ``x = fp32(p) + fp32(c)``, summed in fp32. It is a third kind of master
beside fp32 and compact ones, signalled by the dtype of ``master_params`` (the param's; no
schema changes), and lives in the same shared master path (load_param/store_param,
for_each_block, the Triton driver, ``_load_param``/``_store_param``), so every step op gets
it from one place. The store writes ``p = round(x)`` (to nearest even: ``x.to(dtype)``) and
``c = round(x - p)`` (``x - p`` is exact in fp32; 0 where it is not finite: an infinite or
NaN x), so p + c carries about 16 significant bits for bf16 (22 for fp16) instead of 8
(11): an update below half an ulp of the param, which plain bf16 rounds away at every step,
accumulates in c until it moves p (tests/test_kahan_master.py). The load takes
``fp32(p) + fp32(c)`` only where that sum rounds back to p; elsewhere the param alone.
That is this mode's [note: master sync], whatever ``master_sync`` says and at no cost (the
param is read anyway): a value written into the param since the last step (a zero, a
re-initialisation) no longer rounds to itself with the stale compensation added, except
within half an ulp of the written value, where the compensation is kept (as compact masters
keep their remainder). So that the store never trips this test, a compensation that rounded
to exactly half an ulp beside an odd param (p + c a tie that rounds to the other
neighbour) is moved one step toward zero (``c.bits - 1``): a loss of one ulp of c, once in
about 2^10 stores. States stay fp32 as with every master kind (the memory table counts 2 B
per param for the master instead of 4). Design choices: (1) the compensation is part of the
master, not of the update: the whole update, weight decay, LAMB's trust ratio, Lion's sign
and Schedule-Free's interpolation, is computed from the compensated fp32 value, and only the
two stores round. optimi (``kahan_sum=True``) places it in the update instead: ``c += u``
(rounded to bf16), ``p_old = p; p += c`` (rounded), ``c += p_old - p`` (rounded); its
decoupled weight decay multiplies the bf16 param directly (uncompensated), and its states are
bf16. For a small update the two agree to the compensation's precision; where |u| >> |c| the
extra rounding of ``c + u`` loses 2^-9 |u|, and a decay ``lr * wd`` below 2^-9 never reaches
an optimi param, while here it accumulates (tests/test_kahan_master.py). Measured by
bench/kahan.py (AdamW, lr 1e-3, 200 steps, 4096 bf16 params, the same bf16 grads): the
final master's RMS error against the fp32-master run, relative to the RMS distance moved,
is 1.2e-4 with Kahan masters, 1.8e-2 with optimi's kahan_sum (7.3e-2 with weight decay 0.1;
its bf16 states count in that too), 1.3e-1 for plain bf16, 0 for compact masters. (2) Kahan
rather than a wider master (compact, fp32): same 2 B as compact but for fp16 too, and
rounding to nearest even keeps ``param == x.to(dtype)`` exactly. The oracle is the reference
backend in plain torch (``join_kahan``/``split_kahan``), which cpu, triton and (emulated)
cuda equal bit for bit.

[note: hyper table] Hyperparameters travel as a device table of G rows (one per run of
tensors sharing their values, typically one per param group), not as per-tensor lists: the
caller (an optimizer's cached plan, ``fusedopt.ops``) keeps the table and rewrites its few
values when a schedule changes them, so the backends' tensor tables, which hold the address
of each tensor's row (not its values), stay cached across an lr schedule, a CUDA graph that
captured a step reads the current values at each replay, and the dispatcher converts G
counts per call instead of K floats per tensor. float64, because the kernels evaluate
``1 - beta`` and the bias corrections in float64 ([note: hyperparameter rounding] in
``fusedopt/triton_kernels/common.py``). The group structure is an ``int[]`` of G run
lengths rather than a per-tensor index (``int[]`` of N: a conversion per tensor again) or a
CPU index tensor (beside CUDA tensors it would keep ``torch.compile``'s CUDA graphs off).
One op's columns change at every step: ``schedulefree_adamw_``'s ``ckp1`` and
``bias_correction2`` (host arithmetic of its optimizer's schedule), so its table is rewritten
at every step (G x 7 float64 values, one host-to-device copy); the tensor tables stay cached.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch

NAMESPACE = "fusedopt"

#: Every backend's name, in the order ``backend="auto"`` prefers them for a device.
BACKEND_NAMES: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")

#: The device scalars every step op takes last, in schema order ([note: common scalars]).
COMMON_SCALARS: tuple[str, ...] = ("lr_tensor", "grad_scale", "clip_coef", "found_inf")

#: Roles of a step op's tensor lists, in the order every step op's schema lists them.
ROLES: tuple[str, ...] = ("param", "grad", "state", "master", "step")


@dataclasses.dataclass(frozen=True)
class TensorListSpec:
    """One tensor list of a step op: one tensor per param (or none, where ``optional``).

    ``layout`` is the shape/dtype rule of a state (:data:`STATE_LAYOUTS`, :func:`state_shape`):
    ``"param"`` is the param's shape and strides; ``"row"``, ``"col"`` and ``"unfactored"``
    are Adafactor's factored second moments ([note: factored layouts]); these take fp32 with
    master weights, else the param's dtype. ``"bf16"`` is the param's shape and strides in
    bfloat16 whatever the param's dtype (Muon's Newton-Schulz buffer, [note: muon passes]).
    ``"block_scales"`` is the fp32 absmax of each 256-element block of the 8-bit state
    ``scales_of`` names (shape ``(*shape[:-1], ceil(shape[-1]/256))``, contiguous: [note: 8-bit
    states] in fusedopt/quant8.py); given (non-empty) iff that state is 8-bit in this call.
    ``quantized``: a ``"param"`` state that may hold 8-bit codes instead of values,
    ``"signed"`` (int8) or ``"unsigned"`` (uint8), contiguous, when its scales are given.
    """

    name: str  # the schema's argument name ("exp_avgs")
    role: str  # one of ROLES
    mutable: bool  # written by the op: an alias annotation ``Tensor(x!)[]`` in the schema
    optional: bool = False  # may be empty (absent)
    state_key: str | None = None  # its key in torch's per-param optimizer state
    layout: str = "param"
    #: a flag that decides presence: the list is given iff the flag is set (``amsgrad``)
    present_iff: str | None = None
    #: "signed" (int8) or "unsigned" (uint8): the codes this state holds when 8-bit
    quantized: str | None = None
    #: a "block_scales" list: the state whose block absmaxes it holds
    scales_of: str | None = None


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """A per-call ``bool`` of a step op; ``default`` is the default of the C++ call struct."""

    name: str
    default: bool = False


#: The flags every step op ends with, after the common scalars, each with a schema default so
#: that positional callers of the older schema still fit ([note: master sync]).
COMMON_FLAGS: tuple[FlagSpec, ...] = (FlagSpec("master_sync", True),)

#: The optional tensor every step op ends with, after the common flags, with a schema default
#: so that positional callers of the older schema still fit: the key of stochastic rounding,
#: [seed, counter, one id per param] (int64), or None: round to nearest ([note: stochastic
#: rounding] in csrc/include/fusedopt/dtype.h).
SR_KEY = "sr_key"

#: The arguments that carry a step op's hyperparameters, after its tensor lists, in schema
#: order ([note: hyper table]).
HYPER_ARGUMENTS: tuple[str, ...] = ("Tensor hypers", "int[] group_sizes")


#: The dtypes an op's float states may have where it declares ``state_dtypes`` (the values of
#: the ``state_dtype`` group key besides None): [note: state dtype].
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class StepOpSpec:
    """A step op: its tensor lists (params, grads, states, master_params, steps), its
    hyperparameters (``lr`` first: the columns of ``hypers``, [note: hyper table]), its
    per-call flags, the
    :data:`COMMON_SCALARS` and the :data:`COMMON_FLAGS`, in that schema order. Everything
    else (the schema string, ``fusedopt.ops``' packing, the Triton and C++ slot and
    hyperparameter indices, the optimizers' state keys) is derived from it; see DESIGN.md
    "How to add an op"."""

    name: str  # "adamw_"
    doc: str  # the semantics, one paragraph (DESIGN.md §3 has the full contract)
    states: tuple[TensorListSpec, ...]
    hypers: tuple[str, ...]
    flag_specs: tuple[FlagSpec, ...]
    #: the C++ stem: ``<cpp>Call`` in launch.h, ``FUSEDOPT_<CPP upper>_*`` macros
    cpp: str
    steps: str = "required"  # "required", "optional" (empty or one per param) or "none"
    #: with optional steps: the list that is given iff the steps are (sgd's momentum buffers)
    steps_with: str | None = None
    #: whether C++ has one launcher for the whole step (``FUSEDOPT_STEP_OPS``). False: the
    #: step runs torch ops between its passes (Muon's Newton-Schulz GEMMs), so C++ implements
    #: the passes only and every backend's step op is a Python composition of them ([note:
    #: muon passes] in fusedopt/optim/muon.py)
    cpp_launcher: bool = True
    #: whether the op's float states (layout ``"param"``, not 8-bit) may be fp32, bf16 or
    #: fp16 whatever the param's dtype (the ``state_dtype`` group key): [note: state dtype].
    #: False: fp32 with master weights, else the param's dtype.
    state_dtypes: bool = False

    @property
    def tensor_lists(self) -> tuple[TensorListSpec, ...]:
        """Every tensor list, in schema order."""
        lists = [
            TensorListSpec("params", "param", True),
            TensorListSpec("grads", "grad", False),
            *self.states,
            TensorListSpec("master_params", "master", True, True, "master_param"),
        ]
        if self.steps != "none":
            lists.append(TensorListSpec("steps", "step", True, self.steps == "optional", "step"))
        return tuple(lists)

    @property
    def lists(self) -> tuple[str, ...]:
        """The list names, in schema order."""
        return tuple(t.name for t in self.tensor_lists)

    @property
    def optional_lists(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensor_lists if t.optional)

    @property
    def state_lists(self) -> tuple[str, ...]:
        """The per-param states (same layout as the param: fp32 with masters, else its dtype)."""
        return tuple(t.name for t in self.states)

    @property
    def flags(self) -> tuple[str, ...]:
        """The flag names, in schema order."""
        return tuple(f.name for f in self.flag_specs)

    @property
    def state_layouts(self) -> dict[str, str]:
        """torch's state key -> the state's layout ([note: factored layouts])."""
        return {t.state_key: t.layout for t in self.states if t.state_key}

    def free_state_dtype(self, lists: Mapping) -> torch.dtype | None:
        """The storage dtype of a call's float states (its first float ``"param"``-layout
        state list given, in ``lists`` by name) where the op declares ``state_dtypes``; None
        otherwise or without one. One per call ([note: state dtype] in
        csrc/include/fusedopt/dtype.h)."""
        if not self.state_dtypes:
            return None
        for t in self.states:
            given = lists.get(t.name)
            if t.layout == "param" and given and given[0].is_floating_point():
                return given[0].dtype
        return None

    @property
    def quantized_states(self) -> tuple[tuple[str, str, bool], ...]:
        """The states that may be 8-bit: (state list, its scales list, signed) ([note: 8-bit
        states] in fusedopt/quant8.py). A call's states are 8-bit iff the scales are given."""
        scales = {t.scales_of: t.name for t in self.states if t.scales_of}
        return tuple(
            (t.name, scales[t.name], t.quantized == "signed")
            for t in self.states
            if t.quantized and t.name in scales
        )

    @property
    def state_keys(self) -> dict[str, str]:
        """torch's state key -> list name, for the optimizer classes (steps first, then the
        states; master weights are handled apart: ``fusedopt.optim._base.MASTER_KEY``)."""
        lists = [t for t in self.tensor_lists if t.role == "step"] + list(self.states)
        return {t.state_key: t.name for t in lists if t.state_key}

    def schema(self) -> str:
        """The schema template (``{name}`` stands for the backend's op name)."""
        return "{name}(" + ", ".join(self._arguments()) + ") -> ()"

    def _arguments(self) -> list[str]:
        aliases = _aliases(self.tensor_lists)
        args = [
            f"Tensor({aliases[t.name]}!)[] {t.name}" if t.mutable else f"Tensor[] {t.name}"
            for t in self.tensor_lists
        ]
        args += list(HYPER_ARGUMENTS)
        args += [f"bool {f}" for f in self.flags]
        args += [f"Tensor? {s}" for s in COMMON_SCALARS]
        args += [f"bool {f.name}={f.default}" for f in COMMON_FLAGS]
        args.append(f"Tensor? {SR_KEY}=None")
        return args


#: Elements per block of an 8-bit state: a run within one row of the last dimension
#: ([note: 8-bit states] in fusedopt/quant8.py).
QUANT_BLOCK = 256

#: The shape rules of a state list ([note: factored layouts]).
STATE_LAYOUTS: tuple[str, ...] = ("param", "row", "col", "unfactored", "bf16", "block_scales")


def factored(shape: Sequence[int]) -> bool:
    """Whether a param of ``shape`` keeps factored (row and column) second moments: it has two
    or more dims (torch.optim.Adafactor's ``grad.dim() > 1``)."""
    return len(shape) >= 2


def has_state(layout: str, shape: Sequence[int]) -> bool:
    """Whether a param of ``shape`` keeps a state of ``layout`` (else the op's lists hold a
    ``(0,)`` placeholder for it, and the optimizer's state has no such key:
    [note: factored layouts])."""
    if layout in ("row", "col"):
        return factored(shape)
    return layout in ("param", "bf16", "block_scales") or not factored(shape)


def state_shape(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of a state of ``layout`` for a param of ``shape``.

    [note: factored layouts] Adafactor keeps, for a param of two or more dims, a row factor
    (``"row"``: the param's shape with the last dim 1, torch's ``row_var``) and a column factor
    (``"col"``: the second-to-last dim 1, ``col_var``), both reduced over the last two dims
    with any leading dims batched; for a vector or scalar param, an elementwise ``variance``
    (``"unfactored"``: the param's shape). A state list is aligned with the params like any
    other, so a param that has no such state (a vector's ``row_var``, a matrix's
    ``variance``) holds a placeholder of shape ``(0,)`` there: the op skips it, and the
    optimizers put it in the op's lists only (their state, and so their state dicts, have
    only the keys a param uses, as torch's: ``has_state``). The
    factored states are contiguous in their own shape (they are R + C numbers, not R x C);
    ``"param"``, ``"bf16"`` and ``"unfactored"`` states take the param's (dense) strides."""
    shape = tuple(shape)
    if layout in ("param", "bf16"):  # "bf16": the param's shape, its dtype fixed
        return shape
    if layout == "unfactored":
        return (0,) if factored(shape) else shape
    if layout == "row":
        return (*shape[:-1], 1) if factored(shape) else (0,)
    if layout == "col":
        return (*shape[:-2], 1, shape[-1]) if factored(shape) else (0,)
    if layout == "block_scales":  # [note: 8-bit states] in fusedopt/quant8.py
        return (1,) if not shape else (*shape[:-1], -(-shape[-1] // QUANT_BLOCK))
    raise ValueError(f"unknown state layout {layout!r}; known: {', '.join(STATE_LAYOUTS)}")


def _aliases(lists: Sequence[TensorListSpec]) -> dict[str, str]:
    """Alias letters of the mutable lists: params a, states b, c, d..., master_params e,
    steps f (states past the third continue after f)."""
    fixed = {"param": "a", "master": "e", "step": "f"}
    state_letters = "bcd" + "ghijklmnopqrstuvwxyz"
    aliases, k = {}, 0
    for t in lists:
        if not t.mutable:
            continue
        if t.role in fixed:
            aliases[t.name] = fixed[t.role]
        else:
            aliases[t.name], k = state_letters[k], k + 1
    return aliases


def _state(name: str, key: str, **kwargs) -> TensorListSpec:
    return TensorListSpec(name, "state", True, state_key=key, **kwargs)


def _scales(of: str, key: str) -> tuple[TensorListSpec]:
    """The block-scales list of the state list ``of`` (state key ``key``): ``<key>_scales``,
    empty unless this call's states are 8-bit ([note: 8-bit states] in fusedopt/quant8.py).
    Scales lists follow an op's other states, so its older positional lists keep their
    places."""
    return (
        _state(f"{key}_scales", f"{key}_scale", optional=True, layout="block_scales",
               scales_of=of),
    )  # fmt: skip


#: Every step op, declared once.
STEP_OPS: dict[str, StepOpSpec] = {
    spec.name: spec
    for spec in (
        StepOpSpec(
            "adamw_",
            cpp="AdamW",
            state_dtypes=True,
            doc="Adam / AdamW. decoupled=True: p *= 1 - lr*wd; decoupled=False (Adam): "
            "g += wd*p. max_exp_avg_sqs is empty unless amsgrad. 8-bit states: exp_avgs int8 "
            "and exp_avg_sqs uint8 codes with their fp32 block absmaxes in exp_avg_scales and "
            "exp_avg_sq_scales (else both empty), dequantized, stepped and requantized "
            "([note: 8-bit states] in fusedopt/quant8.py).",
            states=(
                _state("exp_avgs", "exp_avg", quantized="signed"),
                _state("exp_avg_sqs", "exp_avg_sq", quantized="unsigned"),
                _state("max_exp_avg_sqs", "max_exp_avg_sq", optional=True, present_iff="amsgrad"),
                *_scales("exp_avgs", "exp_avg"),
                *_scales("exp_avg_sqs", "exp_avg_sq"),
            ),
            hypers=("lr", "beta1", "beta2", "eps", "weight_decay"),
            flag_specs=(
                FlagSpec("decoupled", True),
                FlagSpec("amsgrad"),
                FlagSpec("maximize"),
                FlagSpec("bias_correction", True),
            ),
        ),
        StepOpSpec(
            "lamb_",
            cpp="Lamb",
            state_dtypes=True,
            doc="LAMB, timm semantics. The global clip g /= max(1, |g|/max_grad_norm) arrives "
            "folded into clip_coef (the functional layer computes it with grad_norm), so the "
            "op itself sees only the common scalars.",
            states=(
                _state("exp_avgs", "exp_avg", quantized="signed"),
                _state("exp_avg_sqs", "exp_avg_sq", quantized="unsigned"),
                *_scales("exp_avgs", "exp_avg"),
                *_scales("exp_avg_sqs", "exp_avg_sq"),
            ),
            hypers=("lr", "beta1", "beta2", "eps", "weight_decay"),
            flag_specs=(
                FlagSpec("grad_averaging", True),
                FlagSpec("bias_correction", True),
                FlagSpec("trust_clip"),
                FlagSpec("always_adapt"),
            ),
        ),
        StepOpSpec(
            "lion_",
            cpp="Lion",
            state_dtypes=True,
            doc="Lion (lion-pytorch): p *= 1 - lr*wd; p -= lr*sign(b1*m + (1-b1)*g); "
            "m = b2*m + (1-b2)*g.",
            states=(
                _state("exp_avgs", "exp_avg", quantized="signed"),
                *_scales("exp_avgs", "exp_avg"),
            ),
            hypers=("lr", "beta1", "beta2", "weight_decay"),
            flag_specs=(FlagSpec("maximize"),),
            steps="none",
        ),
        StepOpSpec(
            "adan_",
            cpp="Adan",
            doc="Adan (Xie et al. 2022; the official sail-sg Adan's conventions: betas are the "
            "EMA weights, (0.98, 0.92, 0.99)). d = g - g_prev (0 at step 1); m = b1*m + (1-b1)*g; "
            "v = b2*v + (1-b2)*d; n = b3*n + (1-b3)*(g + b2*d)^2; "
            "u = (m/bc1 + b2*v/bc2) / (sqrt(n)/sqrt(bc3) + eps); no_prox: p = p*(1-lr*wd) - lr*u, "
            "else p = (p - lr*u) / (1+lr*wd). neg_pre_grads keeps -g (the official state).",
            states=(
                _state("exp_avgs", "exp_avg"),
                _state("exp_avg_sqs", "exp_avg_sq"),
                _state("exp_avg_diffs", "exp_avg_diff"),
                _state("neg_pre_grads", "neg_pre_grad"),
            ),
            hypers=("lr", "beta1", "beta2", "beta3", "eps", "weight_decay"),
            flag_specs=(FlagSpec("no_prox"),),
        ),
        StepOpSpec(
            "schedulefree_adamw_",
            cpp="ScheduleFreeAdamW",
            doc="Schedule-Free AdamW (Defazio et al. 2024; the schedulefree package's "
            "AdamWScheduleFree): params hold y, zs the base sequence z. v = b2*v + (1-b2)*g*g; "
            "u = g / (sqrt(v / bias_correction2) + eps) (+ wd*y where wd != 0); "
            "y = lerp(y, z, ckp1) + lr*(b1*(1-ckp1) - 1)*u; z -= lr*u. lr (warmup applied), "
            "ckp1 and bias_correction2 are the group's per-step scalars, computed by the caller "
            "on the host from its step count k, lr_max and weight_sum (no step counts here).",
            states=(_state("zs", "z"), _state("exp_avg_sqs", "exp_avg_sq")),
            hypers=("lr", "beta1", "beta2", "eps", "weight_decay", "ckp1", "bias_correction2"),
            flag_specs=(),
            steps="none",
        ),
        StepOpSpec(
            "sgd_",
            cpp="Sgd",
            state_dtypes=True,
            doc="SGD (torch.optim.SGD). momentum_buffers and steps are both empty (no momentum in "
            "this call: every momentum value is 0) or both of length N. A param whose step "
            "count is 0 before this step takes buf = g (torch's first-step rule); a skipped "
            "step does not count. A tensor whose momentum is 0 in a call with buffers steps "
            "as p -= lr*g (torch's momentum-free SGD: no dampening) and leaves its buffer and "
            "step untouched.",
            states=(
                _state("momentum_buffers", "momentum_buffer", optional=True, quantized="signed"),
                *_scales("momentum_buffers", "momentum_buffer"),
            ),
            hypers=("lr", "momentum", "dampening", "weight_decay"),
            flag_specs=(FlagSpec("nesterov"), FlagSpec("maximize")),
            steps="optional",
            steps_with="momentum_buffers",
        ),
        StepOpSpec(
            "adafactor_",
            cpp="Adafactor",
            doc="Adafactor (torch.optim.Adafactor). t = step + 1; w = t**beta2_decay; "
            "rho = min(lr, 1/sqrt(t)); alpha = max(eps2, rms(p)) * rho (p before the decay); "
            "a param of 2+ dims: row_var = lerp(row_var, mean(g^2, -1), w), col_var likewise "
            "over dim -2, v = row_var*col_var / max(mean(row_var, -2), eps1); else "
            "variance = lerp(variance, g^2, w), v = variance; u = g / sqrt(max(v, eps1^2)); "
            "p *= 1 - lr*wd (wd != 0); p -= alpha / max(1, rms(u)/d) * u. eps1 < 0 stands for "
            "torch's eps1=None: finfo(dtype).eps of the update's dtype (the param's, fp32 with "
            "master weights). A param holds a (0,) placeholder in the "
            "lists it has no state in ([note: factored layouts]).",
            states=(
                _state("row_vars", "row_var", layout="row"),
                _state("col_vars", "col_var", layout="col"),
                _state("variances", "variance", layout="unfactored"),
            ),
            hypers=("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay"),
            flag_specs=(FlagSpec("maximize"),),
        ),
        StepOpSpec(
            "muon_",
            cpp="Muon",
            doc="Muon (torch.optim.Muon) on 2-D params: buf = lerp(buf, g, 1-momentum); "
            "u = lerp(g, buf, momentum) if nesterov else buf; ns_buffers = bf16(u); O = "
            "Newton-Schulz(ns_buffers) (ns_steps quintic steps (ns_a, ns_b, ns_c) in bf16 on "
            "u/max(|u|_F, ns_eps), transposed when rows > cols); p = p*(1 - lr*wd) - "
            "lr*lr_ratio*O. lr_ratio is the shape's adjust_lr_fn factor. The passes "
            "muon_momentum_ and muon_apply_ are the elementwise parts; the optimizer runs the "
            "Newton-Schulz GEMMs between them, batched over params of one shape.",
            states=(
                _state("momentum_buffers", "momentum_buffer"),
                TensorListSpec("ns_buffers", "state", True, layout="bf16"),
            ),
            hypers=(
                "lr",
                "momentum",
                "weight_decay",
                "lr_ratio",
                "ns_a",
                "ns_b",
                "ns_c",
                "ns_eps",
                "ns_steps",
            ),
            flag_specs=(FlagSpec("nesterov", True),),
            steps="none",
            cpp_launcher=False,
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class PhaseOpSpec:
    """One pass of a multi-pass step op, exposed as an op of its own, so that a caller can
    run code between the passes (LAMB's all-reduce of per-tensor norms over a mesh, [note:
    sharded LAMB] in fusedopt/optim/lamb.py). It takes its step op's arguments, in the step
    op's schema order, with ``inputs`` (per-call ``Tensor`` arguments) after the flags, and
    returns ``returns``. ``read_only``: the step op's mutable lists that this pass does not
    write (one pass advances the steps; the others read the advanced counts). Running the passes in
    order with the same arguments is the step op, bit for bit ([note: multi-pass ops] in
    DESIGN.md §2)."""

    name: str  # "lamb_direction_"
    step_op: str  # "lamb_"
    doc: str
    inputs: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()

    @property
    def step(self) -> StepOpSpec:
        return STEP_OPS[self.step_op]

    @property
    def input_index(self) -> int:
        """The position of ``inputs`` among the positional arguments (after the flags)."""
        s = self.step
        return len(s.tensor_lists) + len(HYPER_ARGUMENTS) + len(s.flags)

    def schema(self) -> str:
        """The schema template: the step op's, with the inputs, the returns and the lists
        this pass does not write without their alias annotation."""
        args = self.step._arguments()
        for name in self.read_only:
            args = [re.sub(rf"^Tensor\(\w!\)\[\] {name}$", f"Tensor[] {name}", a) for a in args]
        k = self.input_index
        args[k:k] = [f"Tensor {name}" for name in self.inputs]
        returns = ", ".join(f"Tensor {name}" for name in self.returns)
        return "{name}(" + ", ".join(args) + f") -> ({returns})"


def norm_passes(step_op: str, norms: str, norms_doc: str, apply: str, apply_doc: str,
                apply_read_only: tuple[str, ...]) -> tuple[PhaseOpSpec, PhaseOpSpec]:  # fmt: skip
    """The two passes of a step op with per-tensor sums of squares between a reduction and an
    apply (LAMB, Adafactor; Triton's ``register_norm_passes`` registers the same pair): the
    norms pass advances the steps, reads params and masters only and returns ``sq_norms``
    ``[N, 2]``; the apply pass takes them, its ``apply_read_only`` lists unwritten."""
    return (
        PhaseOpSpec(
            norms,
            step_op=step_op,
            doc=norms_doc,
            returns=("sq_norms",),
            read_only=("params", "master_params"),
        ),
        PhaseOpSpec(
            apply, step_op=step_op, doc=apply_doc, inputs=("sq_norms",), read_only=apply_read_only
        ),
    )


#: LAMB's passes ([note: multi-pass ops] in DESIGN.md §2; [note: lamb passes] in
#: csrc/include/fusedopt/math/lamb.h).
LAMB_DIRECTION, LAMB_APPLY = norm_passes(
    "lamb_",
    "lamb_direction_",
    "LAMB's first pass: advances the steps and, for each tensor that adapts "
    "(wd != 0 or always_adapt), computes the new moments and the update u and returns "
    "sq_norms [N, 2] in opmath (fp64 for fp64 params, else fp32): sum(p^2), sum(u^2) "
    "of its elements, deterministic; 0 for a tensor that does not adapt and when "
    "found_inf skips the step. The new moments are stored here when they are exact "
    "in storage (fp32/fp64 states) and the tensor adapts; else lamb_apply_ stores "
    "them. lr is not read.",
    "lamb_apply_",
    "LAMB's second pass, after lamb_direction_ with the same arguments: the trust "
    "ratio of each tensor from sq_norms (summed over the shards of a sharded param by "
    "the caller), then p -= lr * ratio * u, u recomputed from the moments "
    "lamb_direction_ stored, or from the grad and the old moments (then stored here). "
    "Reads the advanced steps; writes none.",
    apply_read_only=("steps",),
)

#: Adafactor's passes ([note: adafactor passes] in DESIGN.md §2 and
#: csrc/include/fusedopt/math/adafactor.h).
ADAFACTOR_NORMS, ADAFACTOR_APPLY = norm_passes(
    "adafactor_",
    "adafactor_norms_",
    "Adafactor's reductions: advances the steps, folds g^2 into the second moments "
    "(row and column sums of each factored param, elementwise for the others) and returns "
    "sq_norms [N, 2] in opmath (fp64 for fp64 params, else fp32): sum(p^2) (p before the "
    "decay) and sum(u^2) of the unclipped update, deterministic; 0 when found_inf skips "
    "the step. lr is not read.",
    "adafactor_apply_",
    "Adafactor's last pass, after adafactor_norms_ with the same arguments: alpha and "
    "the update clip of each tensor from sq_norms, then p = p*(1 - lr*wd) - alpha/denom * u, "
    "u recomputed from the new second moments. Reads the advanced steps and the second "
    "moments; writes the params (and masters) only.",
    apply_read_only=("steps", "row_vars", "col_vars", "variances"),
)

#: Muon's elementwise passes ([note: muon passes] in fusedopt/optim/muon.py); the
#: optimizer runs the Newton-Schulz GEMMs between them.
MUON_MOMENTUM = PhaseOpSpec(
    "muon_momentum_",
    step_op="muon_",
    doc="Muon's first pass: buf = lerp(buf, g, 1 - momentum) (torch's lerp), and the "
    "Newton-Schulz input ns_buffers = bf16(lerp(g, buf, momentum)) with nesterov, else "
    "bf16(buf). Reads g (unscaled, clipped) and buf; writes buf and ns_buffers; nothing when "
    "found_inf is set.",
    read_only=("params", "master_params"),
)
MUON_APPLY = PhaseOpSpec(
    "muon_apply_",
    step_op="muon_",
    doc="Muon's second pass, after the Newton-Schulz iteration wrote its output O into "
    "ns_buffers: p = p*(1 - lr*wd), then p -= (lr*lr_ratio)*O (the decay applied even for "
    "wd = 0, as torch.optim.Muon). Reads p (its master) and ns_buffers; writes p (and its "
    "master); nothing when found_inf is set.",
    read_only=("momentum_buffers", "ns_buffers"),
)

#: The passes of the multi-pass step ops, each an op.
PHASE_OPS: dict[str, PhaseOpSpec] = {
    p.name: p
    for p in (
        LAMB_DIRECTION,
        LAMB_APPLY,
        ADAFACTOR_NORMS,
        ADAFACTOR_APPLY,
        MUON_MOMENTUM,
        MUON_APPLY,
    )
}

#: op name -> schema template. ``{name}`` is replaced by the backend-specific op name.
#: In-place ops end in ``_``; the backend suffix goes before it (``adamw_cuda_``).
SCHEMAS: dict[str, str] = {
    # tensors *= scale (opmath, rounded to storage). found_inf, when given, is set to 1.0
    # if any element of the input is non-finite; it is never cleared (as torch's amp check).
    "scale_": "{name}(Tensor(a!)[] tensors, Tensor scale, Tensor(b!)? found_inf) -> ()",
    # Global norm of the tensors (each divided by the fp32 grad_scale first), accumulated in
    # fp32 for every storage dtype (fp64, with fp64 outputs, if every tensor is fp64),
    # deterministic. norm_type is 2.0 or
    # inf. Returns (total_norm 0-d, per_tensor_norms [N] if per_tensor else [0],
    # found_inf 0-d: 1.0 if any element is non-finite, else 0.0).
    "grad_norm": (
        "{name}(Tensor[] tensors, float norm_type, bool per_tensor, Tensor? grad_scale)"
        " -> (Tensor total_norm, Tensor per_tensor_norms, Tensor found_inf)"
    ),
    # The step ops: derived from STEP_OPS.
    **{op: spec.schema() for op, spec in STEP_OPS.items()},
    # The passes of multi-pass step ops: derived from PHASE_OPS.
    **{op: spec.schema() for op, spec in PHASE_OPS.items()},
}

OP_NAMES: tuple[str, ...] = tuple(SCHEMAS)


def op_name(op: str, backend: str) -> str:
    """The registered name of ``op`` for ``backend``: ``adamw_`` + ``cuda`` -> ``adamw_cuda_``."""
    if op not in SCHEMAS:
        raise ValueError(f"unknown fusedopt op {op!r}; known: {', '.join(OP_NAMES)}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKEND_NAMES)}")
    return f"{op[:-1]}_{backend}_" if op.endswith("_") else f"{op}_{backend}"


def op_handle(op: str, backend: str) -> torch._ops.OpOverloadPacket:
    """``torch.ops.fusedopt.<op_name(op, backend)>``."""
    return getattr(getattr(torch.ops, NAMESPACE), op_name(op, backend))


def _fake_grad_norm(tensors, norm_type, per_tensor, grad_scale):
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = (
        torch.float64
        if tensors and all(t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )
    n = len(tensors) if per_tensor else 0
    return (
        torch.empty((), dtype=dtype, device=device),
        torch.empty((n,), dtype=dtype, device=device),
        torch.empty((), dtype=torch.float32, device=device),
    )


def _fake_inplace(*args, **kwargs):
    return None


def _fake_sq_norms(params, *args, **kwargs):
    """sq_norms [N, 2] in the params' opmath (lamb_direction_, adafactor_norms_)."""
    dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((len(params), 2), dtype=dtype, device=device)


_FAKES = {
    "grad_norm": _fake_grad_norm,
    "lamb_direction_": _fake_sq_norms,
    "adafactor_norms_": _fake_sq_norms,
}

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def _define_all() -> None:
    for op, template in SCHEMAS.items():
        fake = _FAKES.get(op, _fake_inplace)
        for backend in BACKEND_NAMES:
            name = op_name(op, backend)
            _LIBRARY.define(template.format(name=name))
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)


_define_all()


def register_composite(op: str, backend: str, dispatch_key: str, fn) -> None:
    """Implement ``op`` of ``backend`` for ``dispatch_key`` in Python with ``fn``: a step op
    that the backend runs as its pass ops with torch ops between them (``muon_`` on cpu and
    cuda: fusedopt._C implements its passes, [note: muon passes])."""
    torch.library.impl(f"{NAMESPACE}::{op_name(op, backend)}", dispatch_key, fn, lib=_LIBRARY)
