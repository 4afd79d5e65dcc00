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

``fp32``: fp32 params, grads and states, no loss scale, no clipping (LAMB keeps timm's default
global clip, part of the algorithm). ``amp``: bf16 params and grads, fp32 master weights and
states, a dynamic loss scale (grads divided by it, inf check, step skipped on overflow) and
global-norm clipping to 1.0, end to end. In ``amp`` every pass that reads the fp32 master
also reads the bf16 param (2 B), to adopt a value the user wrote into it since the last step
([note: master sync] in ``fusedopt/_contract.py``, on by default); ``master_sync=False``
saves those 2 B per pass (adamw_ 30, lamb_ 42, lion_ 22, sgd_ 22), and a write into the
params is then lost.
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
}


def passes(op: str, mode: str) -> tuple[Pass, ...]:
    """The passes of ``op`` in ``mode``: the clip/inf-check norm pass first when needed."""
    step = _STEP_PASSES[op]
    _, master, clipped = MODES[mode]
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
    param_dtype, _, _ = MODES[mode]
    low = torch.empty((), dtype=param_dtype).element_size()
    size = {"g": low, "lowp": low}  # grads arrive in the param dtype
    # p (or the master standing in for it) and every state are fp32 in both modes.
    total = 0
    for one in passes(op, mode):
        for role in (*one.reads, *one.writes):
            total += size.get(role, 4)
    return total
