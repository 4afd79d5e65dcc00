"""Bytes per parameter that each benchmarked step must read and write: the one byte table.

Achieved bandwidth is ``bytes_per_param * numel / step_time``; the *same* count is used for
every implementation of a case (fusedopt, torch, timm...), so it is an *effective* bandwidth:
an implementation that moves more bytes than needed (torch's separate unscale, clip and
master-copy passes) shows up as a lower percentage, which is the point of the comparison.

The count is the compulsory traffic of the fewest passes the algorithm allows, each tensor
read once and written once per pass (DESIGN.md §3: "a pass over memory is the unit of cost"):

* a global-norm clip (and an AMP loss-scale's inf check) must see every grad before any update,
  so it costs one extra read of the grads (``fusedopt::grad_norm``);
* LAMB's trust ratio ``|p| / |u|`` must be known before ``p`` is written, so its step is two
  passes: (1) read p, g, m, v, write m, v, reduce |p| and |u|; (2) read p, m, v (to rebuild u),
  write p. With master weights "p" in the passes is the fp32 master and pass 2 also writes
  the low-precision param.

Per element, by op (storage sizes; ``P`` param, ``G`` grad, ``S`` state, ``M`` fp32 master):

| op (`fusedopt/_contract.py`) | mode   | reads            | writes        | B/param |
| ---                          | ---    | ---              | ---           | ---     |
| `adamw_` (Adam, AdamW)       | fp32   | p g m v   (16)   | p m v  (12)   | 28      |
| `adamw_`                     | amp    | g M p m v (16) + grad_norm g (2) | M m v p (14) | 32 |
| `lamb_` (+ timm's clip)      | fp32   | g; p g m v; p m v (4+16+12) | m v; p (8+4) | 44 |
| `lamb_`                      | amp    | g; M p g m v; M p m v (2+16+14) | m v; M p (8+6) | 46 |
| `lion_`                      | fp32   | p g m     (12)   | p m    (8)    | 20      |
| `lion_`                      | amp    | g M p m (12) + grad_norm g (2) | M m p (10) | 24 |
| `sgd_` (momentum)            | fp32   | p g buf   (12)   | p buf  (8)    | 20      |
| `sgd_` (momentum)            | amp    | g M p buf (12) + grad_norm g (2) | M buf p (10) | 24 |
| `schedulefree_adamw_`        | fp32   | y g z v   (16)   | y z v  (12)   | 28      |
| `schedulefree_adamw_`        | amp    | g M y z v (16) + grad_norm g (2) | M z v y (14) | 32 |
| `adafactor_` (matrices)      | fp32   | p g; g; p g (8+4+8) | p (4)      | 24      |
| `adafactor_` (matrices)      | amp    | g; M p g; g; M p g (2+8+2+8) | M p (6) | 26 |

Adafactor's factored second moments are R + C numbers per R x C matrix: ~0 bytes per element,
so the count is that of matrices (a vector's variance, read and written in pass 1 and read in
pass 3, adds 12 B per element of vectors: biases and norms, a small share of a model). Its
three passes ([note: adafactor passes] in csrc/include/fusedopt/math/adafactor.h): reduce
p² and the row/column sums of g², reduce u² (g again), apply.
| `muon_` (matrices)           | fp32   | g buf; p ns (8+6) | buf ns; p (6+4) | 24     |
| `muon_` (matrices)           | amp    | g buf; M p ns (6+8) + norm (2) | buf ns; M p (6+6) | 28 |

Muon (``muon_momentum_`` then ``muon_apply_``, [note: muon passes] in
``fusedopt/optim/muon.py``): ``ns`` is the bf16 Newton-Schulz buffer (2 B whatever the
mode). The count is the elementwise passes' only: the Newton-Schulz GEMMs read and write
the bf16 stacks ~3 x ns_steps times more (matrix-sized, compute-bound on a GPU, and a
function of the shapes, not a fixed B/param), and a model's vectors step AdamW's 28 / 32
B instead (GPT-2 small: 0.1% of its params).

``fp32``: fp32 params, grads and states, no loss scale, no clipping (LAMB keeps timm's default
global clip, part of the algorithm). ``amp``: bf16 params and grads, fp32 master weights and
states, a dynamic loss scale (grads divided by it, inf check, step skipped on overflow) and
global-norm clipping to 1.0, end to end. In ``amp`` every pass that reads the fp32 master
also reads the bf16 param (2 B), to adopt a value the user wrote into it since the last step
([note: master sync] in ``fusedopt/_contract.py``, on by default); ``master_sync=False``
saves those 2 B per pass (adamw_ 30, lamb_ 42, lion_ 22, sgd_ 22, schedulefree_adamw_ 30),
and a write into the params is then lost. Compact masters (``master_weights="compact"``,
[note: compact master]) read and write a 2-byte remainder where ``M`` is: 2 B less per master
access (adamw_ 28, lamb_ 40, lion_ 20, sgd_ 20, with the bf16 param always read, as with
master sync); so do Kahan masters (``master_weights="kahan"``, [note: kahan master]: a
2-byte compensation where ``M`` is), the same bytes. Schedule-Free AdamW moves what AdamW moves: its
params hold y, its two states are z and v (no first moment; no step count, its ckp1 and
bias correction arrive in the hyperparameter table); ``eval()``/``train()`` (a lerp of the
params towards z, outside the step) are not in the count.
"""

from __future__ import annotations

import dataclasses

import torch

#: The optimizers the benchmarks cover, and the fusedopt op each one runs.
OPTIMIZER_OPS = {
    "adamw": "adamw_",
    "adam": "adamw_",
    "lamb": "lamb_",
    "lion": "lion_",
    "sgd": "sgd_",
    "muon": "muon_",
    "schedulefree_adamw": "schedulefree_adamw_",
    "adafactor": "adafactor_",
}

#: Precision modes: (param dtype, master weights, loss scale + clipping).
MODES = {"fp32": (torch.float32, False, False), "amp": (torch.bfloat16, True, True)}


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass over memory: the tensor roles it reads and writes, per element."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]


# Roles: "p" the param (or, with master weights, the fp32 master, which stands in for it in
# the update), "g" the grad, state names, and "lowp" the low-precision param: read beside the
# master ([note: master sync]) and written as its rounding. The norm pass of clipping is added
# by ``passes`` when the mode clips.
_STEP_PASSES: dict[str, tuple[Pass, ...]] = {
    "adamw_": (Pass(("p", "g", "m", "v"), ("p", "m", "v")),),
    "lamb_": (
        Pass(("g",), ()),  # timm's global clip: always on (max_grad_norm=1.0 default)
        Pass(("p", "g", "m", "v"), ("m", "v")),  # moments, |p| and |u|
        Pass(("p", "m", "v"), ("p",)),  # rebuild u, apply the trust ratio
    ),
    "lion_": (Pass(("p", "g", "m"), ("p", "m")),),
    "sgd_": (Pass(("p", "g", "buf"), ("p", "buf")),),
    # Adan (csrc/cuda/adan.cu's header: fp32 44 B, bf16 without masters 22 B): not in the
    # timed report (OPTIMIZER_OPS), only in the memory table (bench/memory.py).
    "adan_": (Pass(("p", "g", "m", "v", "n", "npg"), ("p", "m", "v", "n", "npg")),),
    "muon_": (Pass(("g", "buf"), ("buf", "ns")), Pass(("p", "ns"), ("p",))),
    # y is the param ("p"); z the second sequence (csrc/cuda/schedulefree_adamw.cu: fp32 28 B).
    "schedulefree_adamw_": (Pass(("p", "g", "z", "v"), ("p", "z", "v")),),
    # Adafactor, as a model's matrices step (the factors are ~0 B per element; see the table)
    "adafactor_": (
        Pass(("p", "g"), ()),  # sum p², row and column sums of g² (the factors)
        Pass(("g",), ()),  # sum u² from the new factors
        Pass(("p", "g"), ("p",)),  # apply
    ),
}

#: Roles of a fixed size whatever the mode: Muon's bf16 Newton-Schulz buffer.
_FIXED_BYTES = {"ns": 2}

#: Roles that are not optimizer state: the param (or its master), the grad, the bf16 param.
_NOT_STATE = ("p", "g", "lowp", "ns")


def state_names(op: str) -> tuple[str, ...]:
    """The per-element state tensors of ``op``'s passes (e.g. ``("m", "v")`` for adamw_)."""
    names: list[str] = []
    for one in _STEP_PASSES[op]:
        for role in (*one.reads, *one.writes):
            if role not in _NOT_STATE and role not in names:
                names.append(role)
    return tuple(names)


def passes(op: str, mode: str) -> tuple[Pass, ...]:
    """The passes of ``op`` in ``mode``: the clip/inf-check norm pass first when needed."""
    _, master, clipped = MODES[mode]
    return step_passes(op, master=master, clipped=clipped)


def step_passes(op: str, *, master: bool, clipped: bool) -> tuple[Pass, ...]:
    """The passes of ``op`` with or without master weights and a clip/inf-check norm pass."""
    step = _STEP_PASSES[op]
    if clipped and op != "lamb_":  # LAMB's own clip pass already reads the grads
        step = (Pass(("g",), ()), *step)
    if master:
        # Every pass that reads the master reads the param too (master sync); the last pass
        # that writes the master also writes the rounded param.
        step = tuple(
            dataclasses.replace(s, reads=(*s.reads, "lowp")) if "p" in s.reads else s for s in step
        )
        last = max(i for i, s in enumerate(step) if "p" in s.writes)
        step = tuple(
            dataclasses.replace(s, writes=(*s.writes, "lowp")) if i == last else s
            for i, s in enumerate(step)
        )
    return step


def bytes_per_param(op: str, mode: str) -> int:
    """Compulsory bytes per parameter element of one step of ``op`` in ``mode`` (table above)."""
    param_dtype, master, clipped = MODES[mode]
    low = torch.empty((), dtype=param_dtype).element_size()
    # p (or the master standing in for it) and every state are fp32 in both modes.
    return step_bytes_per_param(op, param_bytes=low, state_bytes=4, master=master, clipped=clipped)


def step_bytes_per_param(
    op: str,
    *,
    param_bytes: int,
    state_bytes: int,
    master: bool,
    clipped: bool = False,
    master_bytes: int = 4,
    state_sizes: dict[str, int] | None = None,
) -> int:
    """Compulsory bytes per element of one step of ``op``, by the storage sizes it touches.

    ``param_bytes``: the param's (and grad's) element size; ``state_bytes``: each state's;
    ``master``: an fp32 master stands in for the param in the update (and the param is read
    beside it and written as its rounding). ``master_bytes``: the master's own storage, 4
    for an fp32 copy, 2 for a compact one (the int16 remainder read and written where the
    fp32 master is, beside the bf16 param: [note: compact master] in fusedopt/_contract.py;
    or a Kahan one, the 16-bit compensation: [note: kahan master]). ``state_sizes``: a
    state role's own size where it differs from ``state_bytes`` (an 8-bit state's 1 byte;
    its block absmaxes, 4 B per 256 elements, are not counted).
    A memory mode of issue #15 (bench/modes.py) is one choice of these sizes.
    """
    size = {"g": param_bytes, "lowp": param_bytes, "p": master_bytes if master else param_bytes,
            **_FIXED_BYTES, **(state_sizes or {})}  # fmt: skip
    total = 0
    for one in step_passes(op, master=master, clipped=clipped):
        for role in (*one.reads, *one.writes):
            total += size.get(role, state_bytes)
    return total
