"""The case registry: op x options x storage x tensor layout x scalars, and the backends.

A :class:`StepCase` names everything one step-op check needs; :func:`step_cases` lists the
matrix in tiers (full cross product where it is cheap, one representative elsewhere) so the
whole matrix fits the size budget under the Triton interpreter. Backends come from
``fusedopt._contract.BACKEND_NAMES``: a new backend is tested by existing here, no edit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

import fusedopt
from fusedopt._contract import BACKEND_NAMES

# ---------------------------------------------------------------------------------------------
# Backends and devices

DEVICES = ("cpu", "cuda")


def backend_usable(backend: str, device: str) -> tuple[bool, str]:
    """Whether ``backend`` runs on ``device`` here, and if not the reason fusedopt gives."""
    status = fusedopt.backends()[backend]
    if not status.usable:
        return False, f"backend {backend!r} is not usable: {status.reason}"
    if device not in status.devices:
        return False, f"backend {backend!r} does not serve {device} ({status.reason})"
    return True, status.reason


def backend_device_params(include_reference: bool = True) -> list:
    """``pytest.param((backend, device))`` for every backend x device; the cuda device carries
    the ``cuda`` marker, and a backend that cannot run there is skipped with fusedopt's reason.
    """
    out = []
    for device in DEVICES:
        for backend in BACKEND_NAMES:
            if backend == "reference" and not include_reference:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            # A GPU machine decides for itself; here a missing GPU is the cuda marker's skip.
            if device == "cpu" or torch.cuda.is_available():
                usable, reason = backend_usable(backend, device)
                if not usable:
                    marks.append(pytest.mark.skip(reason=reason))
            out.append(pytest.param((backend, device), marks=marks, id=f"{backend}-{device}"))
    return out


# ---------------------------------------------------------------------------------------------
# Storage: the dtypes of params, grads, states, and master weights


@dataclasses.dataclass(frozen=True)
class Storage:
    """How one call's tensors are stored (DESIGN.md §3)."""

    name: str
    param: torch.dtype
    grad: torch.dtype
    master: bool

    @property
    def state(self) -> torch.dtype:
        """States are fp32 whenever the update runs on fp32 values, else the param dtype."""
        return torch.float32 if self.master or self.param == torch.float32 else self.param

    @property
    def trajectory(self) -> bool:
        """fp32 values (fp32 params, or masters) are checked along a trajectory of steps; a
        low-precision param without masters step by step (DESIGN.md §5)."""
        return self.param == torch.float32 or self.master


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
STORAGES: dict[str, Storage] = {
    s.name: s
    for s in (
        Storage("fp32", FP32, FP32, False),
        Storage("bf16", BF16, BF16, False),
        Storage("fp16", FP16, FP16, False),
        Storage("bf16_master", BF16, BF16, True),
        Storage("fp16_master", FP16, FP16, True),
        Storage("bf16_fp32grad", BF16, FP32, False),
        Storage("bf16_master_fp32grad", BF16, FP32, True),
    )
}

# ---------------------------------------------------------------------------------------------
# Tensor layouts


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a list: its shape and how its memory is laid out.

    ``layout``: ``contiguous``; ``offset`` (a view one element into a larger storage, so its
    data pointer is not aligned to any vector width); ``channels_last`` (4-d, dense, not
    contiguous); ``transposed`` (2-d, dense, column-major: the transpose of a contiguous
    tensor). ``zero``: the param starts at exactly 0 (LAMB's ``|p| = 0`` branch).
    """

    shape: tuple[int, ...]
    layout: str = "contiguous"
    zero: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.shape} {self.layout}" + (" zero" if self.zero else "")


def _many(rows: int = 0) -> tuple[TensorSpec, ...]:
    # 160 tensors: more than a multi-tensor table row holds (110 in torch's CUDA kernels);
    # with ``rows``, matrices of rows 1..rows and the sizes as columns.
    sizes = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
    cols = [sizes[i % len(sizes)] + i // len(sizes) for i in range(160)]
    if rows:
        return tuple(TensorSpec((1 + i % rows, c)) for i, c in enumerate(cols))
    return tuple(TensorSpec((c,)) for c in cols)


#: ``mixed``, the workhorse: empty tensors, sizes off every vector width, offset views,
#: channels_last and a tensor spanning several 1024-blocks.
_MIXED = (
    TensorSpec((0,)),
    TensorSpec((1,)),
    TensorSpec((3,), zero=True),
    TensorSpec((33,), "offset"),
    TensorSpec((5, 7)),
    TensorSpec((2, 3, 5, 7), "channels_last"),
    TensorSpec((4, 0)),
    TensorSpec((1025,), "offset"),
    TensorSpec((3, 11), "offset"),
    TensorSpec((2, 4, 3, 3), "channels_last"),
)

#: Layout name -> tensor list.
LAYOUTS: dict[str, tuple[TensorSpec, ...]] = {
    "mixed": _MIXED,
    # "mixed" for ops with factored states ([note: factored layouts] in fusedopt/_contract.py),
    # which take row-major params only: its channels_last tensors contiguous, and a batched
    # 3-d offset view (factored over its last two dims).
    "rowmajor": (
        *(
            dataclasses.replace(t, layout="contiguous") if t.layout == "channels_last" else t
            for t in _MIXED
        ),
        TensorSpec((3, 40, 1)),
        TensorSpec((2, 3, 4), "offset"),
        TensorSpec(()),
    ),
    "many": _many(),
    # One tensor larger than a 65536-element chunk, then small ones after it.
    "big": (TensorSpec((70_001,), "offset"), TensorSpec((3,)), TensorSpec((257,))),
    # "mixed", "many" and "big" for ops that step matrices only (MATRIX_OPS): empty
    # matrices, a row and a column, wide and tall (Newton-Schulz transposes a tall one),
    # offset views, a transposed (column-major) matrix as the dense non-default layout.
    "matrices": (
        TensorSpec((0, 3)),
        TensorSpec((1, 1)),
        TensorSpec((1, 5)),
        TensorSpec((3, 1), zero=True),
        TensorSpec((3, 11), "offset"),
        TensorSpec((5, 7)),
        TensorSpec((4, 0)),
        TensorSpec((33, 31), "offset"),
        TensorSpec((17, 6), "transposed"),
        TensorSpec((6, 9), "transposed"),
    ),
    "many_matrices": _many(rows=4),
    "big_matrices": (
        TensorSpec((263, 267), "offset"),
        TensorSpec((3, 1)),
        TensorSpec((2, 257)),
    ),
}

#: Steps of a trajectory check per layout. Three steps cover step 1 (bias corrections, SGD's
#: first-step rule, zero states) and steady steps, with room for a skipped step between;
#: the large lists test the multi-tensor tables and chunking, for which two steps suffice.
LAYOUT_STEPS = {"mixed": 3, "rowmajor": 3, "many": 2, "big": 2, "matrices": 3,
                "many_matrices": 2, "big_matrices": 2}  # fmt: skip

#: Step ops whose params must be matrices (2-d): they run the ``*matrices`` layouts.
MATRIX_OPS = frozenset({"muon_"})
_MATRIX_LAYOUTS = {"mixed": "matrices", "many": "many_matrices", "big": "big_matrices"}


@dataclasses.dataclass(frozen=True)
class HostPasses:
    """A step op whose step runs torch ops between two elementwise passes (Muon: the
    Newton-Schulz GEMMs, in bf16): ``first`` (an op), ``middle`` (a ``fusedopt.reference.ops``
    function of the schema's arguments, which every backend's step runs as is), ``last`` (an
    op); ``handed``: the lists ``middle`` rewrites in place, from the first pass to the last.

    Why the matrix checks the passes, not the whole step against the float64 oracle: the
    middle is bf16 arithmetic, which no float64 oracle reproduces, and it is the same torch
    code on every backend (tests/test_optim_muon.py bounds it against torch.optim.Muon,
    [note: muon ns tolerance]). The passes are elementwise fp32 math, exact up to the
    table's terms; so the check compares the first pass's output (the handed lists, the
    middle's input) with the oracle's, runs the middle once on the backend's tensors and
    hands the oracle that very output (bf16 values, exact in float64), compares the last
    pass's output, and requires the whole op to equal the passes bit for bit."""

    first: str
    middle: str
    handed: tuple[str, ...]
    last: str


HOST_PASSES = {"muon_": HostPasses("muon_momentum_", "muon_newton_schulz", ("ns_buffers",),
                                   "muon_apply_")}  # fmt: skip


def op_layout(op: str, layout: str) -> str:
    """The layout an op runs a case on: the matrices' variant of ``layout`` for an op in
    MATRIX_OPS; ``rowmajor`` for ``mixed`` where the op has factored states (their params
    must be row-major); else ``layout``."""
    if op in MATRIX_OPS:
        return _MATRIX_LAYOUTS[layout]
    factored = any(t.layout in ("row", "col") for t in fusedopt.ops.STEP_OPS[op].states)
    return "rowmajor" if factored and layout == "mixed" else layout


#: Size budget: elements per tensor list. The Triton backend runs interpreted on CPU.
MAX_ELEMENTS = 100_000
for _name, _specs in LAYOUTS.items():
    assert sum(s.numel for s in _specs) <= MAX_ELEMENTS, f"layout {_name} exceeds the budget"


#: Written into the storage element just before every offset view: a kernel that writes out
#: of bounds (one element early) changes it. Check with ``sentinel_intact``.
SENTINEL = -96.5  # exact in fp16, bf16 and fp32


def allocate(spec: TensorSpec, values, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A tensor laid out as ``spec`` holding ``values`` (a tensor of ``spec.shape`` or a
    number); an offset view has SENTINEL in the element before it."""
    if spec.layout == "offset":
        base = torch.full((spec.numel + 1,), SENTINEL, dtype=dtype, device=device)
        out = base[1:].view(spec.shape)
    elif spec.layout == "transposed":
        out = torch.zeros(spec.shape[::-1], dtype=dtype, device=device).t()
    elif spec.layout == "channels_last":
        out = torch.zeros(spec.shape, dtype=dtype, device=device).to(
            memory_format=torch.channels_last
        )
    else:
        out = torch.zeros(spec.shape, dtype=dtype, device=device)
    out.copy_(values) if isinstance(values, torch.Tensor) else out.fill_(values)
    return out


def sentinel_intact(t: torch.Tensor) -> bool:
    """False if the element before an offset view ``t`` was written (True for non-views and
    views at the start of their storage, as a transposed tensor)."""
    return t._base is None or t.storage_offset() == 0 or t._base.view(-1)[0].item() == SENTINEL


# ---------------------------------------------------------------------------------------------
# Options of each op and the common scalars


@dataclasses.dataclass(frozen=True)
class OpOptions:
    """One configuration of a step op: hyperparameters (uniform) and flags."""

    op: str
    name: str
    hypers: tuple[tuple[str, float], ...]
    flags: tuple[tuple[str, bool], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.op}{self.name}"


def _options(op: str, name: str, flags: dict | None = None, **hypers: float) -> OpOptions:
    return OpOptions(op, name, tuple(hypers.items()), tuple((flags or {}).items()))


_ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
_ADAM_FLAGS = dict(decoupled=True, amsgrad=False, maximize=False, bias_correction=True)
_LAMB = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=1e-2)
_LAMB_FLAGS = dict(grad_averaging=True, bias_correction=True, trust_clip=False, always_adapt=False)
_ADAN = dict(lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=2e-2)
_SGD = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=1e-3)
# Schedule-Free AdamW: ckp1 and bias_correction2 are the group's per-step scalars (host-made
# by the class; constant here). ckp1 < 0.5 and >= 0.5 take the two forms of torch's lerp.
_SF_ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, ckp1=0.25,
                 bias_correction2=0.05)  # fmt: skip
# Muon: torch.optim.Muon's defaults (ns_* its quintic coefficients); lr_ratio is the class's
# adjust_lr_fn factor of a shape, any positive number to the op.
_MUON = dict(lr=2e-2, momentum=0.95, weight_decay=0.1, lr_ratio=1.0, ns_a=3.4445, ns_b=-4.775,
             ns_c=2.0315, ns_eps=1e-7, ns_steps=5.0)  # fmt: skip
_ADAFACTOR = dict(lr=1e-2, beta2_decay=-0.8, eps1=-1.0, eps2=1e-3, d=1.0, weight_decay=0.0)

#: Every option set of every step op. The first of each op is its default (used by the
#: tiers that vary something else).
OPTIONS: dict[str, list[OpOptions]] = {
    "adamw_": [
        _options("adamw_", "adamw", _ADAM_FLAGS, **_ADAM),
        _options("adamw_", "adam_l2", {**_ADAM_FLAGS, "decoupled": False}, **_ADAM),
        # beta2 = 0.9: v visibly decays between steps (0.999 cannot in bf16), so the max
        # of amsgrad differs from v also in the step-by-step low-precision checks.
        _options(
            "adamw_",
            "amsgrad_maximize",
            {**_ADAM_FLAGS, "amsgrad": True, "maximize": True},
            **{**_ADAM, "beta2": 0.9},
        ),
        _options(
            "adamw_", "no_bias_correction", {**_ADAM_FLAGS, "bias_correction": False}, **_ADAM
        ),
    ],
    "lamb_": [
        _options("lamb_", "wd", _LAMB_FLAGS, **_LAMB),
        _options("lamb_", "no_wd", _LAMB_FLAGS, **{**_LAMB, "weight_decay": 0.0}),
        _options("lamb_", "trust_clip", {**_LAMB_FLAGS, "trust_clip": True}, **_LAMB),
        _options(
            "lamb_",
            "always_adapt_no_wd",
            {**_LAMB_FLAGS, "always_adapt": True},
            **{**_LAMB, "weight_decay": 0.0},
        ),
        _options(
            "lamb_",
            "no_averaging_no_bias_correction",
            {**_LAMB_FLAGS, "grad_averaging": False, "bias_correction": False},
            **_LAMB,
        ),
    ],
    "lion_": [
        _options(
            "lion_", "wd", {"maximize": False}, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1
        ),
        _options(
            "lion_",
            "no_wd_maximize",
            {"maximize": True},
            lr=1e-2,
            beta1=0.95,
            beta2=0.98,
            weight_decay=0.0,
        ),
    ],
    "adan_": [
        _options("adan_", "prox_wd", {"no_prox": False}, **_ADAN),
        _options("adan_", "no_prox_wd", {"no_prox": True}, **_ADAN),
        _options("adan_", "no_wd", {"no_prox": False}, **{**_ADAN, "weight_decay": 0.0}),
    ],
    "schedulefree_adamw_": [
        _options("schedulefree_adamw_", "wd", {}, **_SF_ADAMW),
        _options(
            "schedulefree_adamw_",
            "no_wd_lerp_from_z",
            {},
            **{**_SF_ADAMW, "weight_decay": 0.0, "ckp1": 0.75, "bias_correction2": 0.9},
        ),
        # The first step: ckp1 = 1 (y = z exactly), bias_correction2 = 1 - beta2.
        _options(
            "schedulefree_adamw_",
            "first_step",
            {},
            **{**_SF_ADAMW, "ckp1": 1.0, "bias_correction2": 1 - 0.999},
        ),
    ],
    "sgd_": [
        _options("sgd_", "momentum", {"nesterov": False, "maximize": False}, **_SGD),
        _options(
            "sgd_",
            "plain",
            {"nesterov": False, "maximize": False},
            **{**_SGD, "momentum": 0.0, "weight_decay": 0.0},
        ),
        _options(
            "sgd_",
            "dampening_maximize",
            {"nesterov": False, "maximize": True},
            **{**_SGD, "dampening": 0.3},
        ),
        _options("sgd_", "nesterov", {"nesterov": True, "maximize": False}, **_SGD),
    ],
    "adafactor_": [
        # eps1 -1: torch's eps1=None (the eps of the param's dtype)
        _options("adafactor_", "default", {"maximize": False}, **_ADAFACTOR),
        # lr 0.5 > 1/sqrt(t) from t = 5: rho = 1/sqrt(t); d = 1 with rms(u) ~ 1: the clip acts
        _options(
            "adafactor_",
            "wd_maximize",
            {"maximize": True},
            **{**_ADAFACTOR, "lr": 0.5, "weight_decay": 0.1},
        ),
        # eps1 = 1e-3: eps1^2 = 1e-6 stays within fp16's range (a 1e-10 floor would let fp16
        # variances underflow to 0 and u blow up, in torch as here: fp16 needs a larger eps1)
        _options(
            "adafactor_",
            "eps_d",
            {"maximize": False},
            **{**_ADAFACTOR, "eps1": 1e-3, "eps2": 1e-2, "d": 1.5, "beta2_decay": -0.5},
        ),
    ],
    "muon_": [
        _options("muon_", "nesterov", {"nesterov": True}, **_MUON),
        # no decay (torch applies p*(1 - lr*0) all the same), lr_ratio != 1, fewer NS steps
        _options(
            "muon_",
            "plain_no_wd",
            {"nesterov": False},
            **{**_MUON, "weight_decay": 0.0, "lr_ratio": 0.4, "ns_steps": 3.0},
        ),
        # momentum 0.3 < 0.5: the other form of torch's lerp in both lerps
        _options("muon_", "low_momentum", {"nesterov": True}, **{**_MUON, "momentum": 0.3}),
    ],
}
STEP_OPS = tuple(OPTIONS)


@dataclasses.dataclass(frozen=True)
class Scalars:
    """The common scalars of a case (DESIGN.md §3).

    ``lr``: ``float``, ``tensor`` (0-d fp32 device tensor) or ``per_tensor`` (length-N
    tensor, with every other hyperparameter also differing per tensor, as param groups do).
    ``found_inf``: None, or the value of the device flag (0.0: a real step through the flag).
    """

    name: str
    grad_scale: float | None = None
    clip_coef: float | None = None
    found_inf: float | None = None
    lr: str = "float"


SCALARS: dict[str, Scalars] = {
    s.name: s
    for s in (
        # A loss-scaled, clipped AMP step: scale 2^10 unscales exactly; the flag is present.
        Scalars("amp", grad_scale=1024.0, clip_coef=0.5, found_inf=0.0),
        Scalars("plain"),
        # A scale that is not a power of two rounds on load; lr as a device scalar.
        Scalars("lr_tensor", grad_scale=3.0, lr="tensor"),
        Scalars("groups", clip_coef=0.75, lr="per_tensor"),
    )
}


def per_tensor_values(name: str, value: float, n: int, differ: bool) -> list[float]:
    """One value per tensor; with ``differ``, tensors alternate between two groups' values
    (for weight decay and momentum, the second group has none: LAMB's adapt-or-not and SGD's
    momentum-free tensors in a call with buffers)."""
    if not differ:
        return [value] * n
    second = {
        "lr": 2 * value,
        "beta1": 0.8,
        "beta2": 0.99,
        "beta3": 0.95,
        "eps": 1e-6,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "dampening": 0.5,
        "ckp1": 0.6,
        "bias_correction2": 0.5,
        "beta2_decay": -0.5,
        "eps1": 1e-10,
        "eps2": 1e-2,
        "d": 2.0,
        "lr_ratio": 0.5,
        # Newton-Schulz: the second group iterates fewer steps, same coefficients
        "ns_a": value,
        "ns_b": value,
        "ns_c": value,
        "ns_eps": 1e-6,
        "ns_steps": 2.0,
    }[name]
    return [value if i % 2 == 0 else second for i in range(n)]


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One check of a step op: options, storage, tensor layout and scalars."""

    options: OpOptions
    storage: Storage
    layout: str
    scalars: Scalars

    @property
    def op(self) -> str:
        return self.options.op

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return LAYOUTS[self.layout]

    @property
    def id(self) -> str:
        return f"{self.options.id}-{self.storage.name}-{self.layout}-{self.scalars.name}"

    def hyper(self, name: str) -> float:
        return dict(self.options.hypers)[name]

    def flag(self, name: str) -> bool:
        return dict(self.options.flags)[name]


#: Storages crossed with every option set; the others run each op's default only.
FULL_STORAGES = ("fp32", "bf16", "fp16", "bf16_master", "bf16_fp32grad")


def step_cases() -> list[StepCase]:
    """The step-op matrix, in tiers (sized for the Triton interpreter on a small CPU):

    1. every option set x FULL_STORAGES, on the ``mixed`` list, with AMP scalars; each op's
       default on the remaining storages;
    2. each op's default x {plain, lr tensor, per-tensor groups} x {fp32, bf16};
    3. each op's default on ``many`` (fp32) and ``big`` (bf16 with masters), AMP scalars.
    """
    cases = [
        StepCase(opt, STORAGES[storage], op_layout(op, "mixed"), SCALARS["amp"])
        for op in STEP_OPS
        for opt in OPTIONS[op]
        for storage in FULL_STORAGES
    ]
    for op in STEP_OPS:
        default = OPTIONS[op][0]
        mixed = op_layout(op, "mixed")
        for storage in STORAGES:
            if storage not in FULL_STORAGES:
                cases.append(StepCase(default, STORAGES[storage], mixed, SCALARS["amp"]))
        for scalars in ("plain", "lr_tensor", "groups"):
            for storage in ("fp32", "bf16"):
                cases.append(StepCase(default, STORAGES[storage], mixed, SCALARS[scalars]))
        many, big = op_layout(op, "many"), op_layout(op, "big")
        cases.append(StepCase(default, STORAGES["fp32"], many, SCALARS["amp"]))
        cases.append(StepCase(default, STORAGES["bf16_master"], big, SCALARS["amp"]))
    return cases


def found_inf_cases() -> list[StepCase]:
    """Each op's default x {fp32, bf16, bf16_master}: a set flag must be a bit-exact no-op."""
    return [
        StepCase(OPTIONS[op][0], STORAGES[s], op_layout(op, "mixed"), SCALARS["amp"])
        for op in STEP_OPS
        for s in ("fp32", "bf16", "bf16_master")
    ]


def params(cases: list, fn: Callable = lambda c: c.id) -> list:
    """``pytest.param`` per case, with its id."""
    return [pytest.param(c, id=fn(c)) for c in cases]


# ---------------------------------------------------------------------------------------------
# grad_norm and scale_


@dataclasses.dataclass(frozen=True)
class ListCase:
    """A check of ``grad_norm`` or ``scale_``: a tensor list of one dtype (or ``mixed``:
    fp32, bf16 and fp16 tensors in one list, which ``grad_norm`` accepts)."""

    dtype: str
    layout: str
    norm_type: float = 2.0
    per_tensor: bool = False
    grad_scale: float | None = None

    @property
    def id(self) -> str:
        norm = "inf" if self.norm_type == math.inf else "l2"
        extra = ("-per_tensor" if self.per_tensor else "") + (
            f"-scale{self.grad_scale:g}" if self.grad_scale else ""
        )
        return f"{self.dtype}-{self.layout}-{norm}{extra}"

    def dtype_of(self, i: int) -> torch.dtype:
        if self.dtype == "mixed":
            return (FP32, BF16, FP16)[i % 3]
        return {"fp32": FP32, "bf16": BF16, "fp16": FP16}[self.dtype]


def grad_norm_cases() -> list[ListCase]:
    """L2 and inf, with and without per-tensor norms and grad_scale, every dtype on ``mixed``;
    the many-tensor and big lists for fp32 and bf16."""
    cases = [
        ListCase(dtype, "mixed", norm, per, scale)
        for dtype in ("fp32", "bf16", "fp16", "mixed")
        for norm in (2.0, math.inf)
        for per, scale in ((False, None), (True, 3.0))
    ]
    cases += [
        ListCase(dtype, layout, norm, True, 1024.0)
        for dtype, layout in (("fp32", "many"), ("bf16", "big"))
        for norm in (2.0, math.inf)
    ]
    return cases


def scale_cases() -> list[ListCase]:
    """Every dtype on ``mixed``; ``many`` in fp32 and ``big`` in bf16."""
    return [ListCase(dtype, "mixed") for dtype in ("fp32", "bf16", "fp16")] + [
        ListCase("fp32", "many"),
        ListCase("bf16", "big"),
    ]
