"""fusedopt's side of each case: one step factory per backend.

Until the optimizer classes land, the step is written with the functional layer
(``fusedopt.ops``), doing exactly what an optimizer step does: in ``amp`` mode one
``grad_norm`` pass (norm of the unscaled grads + the inf check), the clip coefficient on the
device, one fused step that unscales, clips, updates the fp32 master and its moments and writes
the bf16 param, then the loss-scale update (``torch._amp_update_scale_``, as GradScaler does).
No host sync anywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fusedopt
from bench.cases import LOSS_SCALE, MAX_GRAD_NORM, Workload
from bench.peers import Unavailable
from bench.timing import Step
from fusedopt import ops

#: Backends too slow to time on real shapes (pure-Python loops, the Triton interpreter):
#: included only for tiny shapes or on request (``--slow-backends``).
SLOW_BACKENDS = ("reference",)


def backend_rows(device: torch.device, slow: bool) -> dict[str, str | None]:
    """Every backend -> None when it will be benchmarked on ``device``, else why not."""
    rows: dict[str, str | None] = {}
    for name, status in fusedopt.backends().items():
        if not status.usable:
            rows[name] = f"not usable: {status.reason}"
        elif device.type not in status.devices:
            rows[name] = f"does not serve {device.type} ({status.reason})"
        elif not slow and (name in SLOW_BACKENDS or (device.type == "cpu" and name == "triton")):
            rows[name] = (
                "slow backend, skipped (report: --slow-backends or --model tiny;"
                " microbenchmarks: FUSEDOPT_BENCH_SLOW=1)"
            )
        else:
            rows[name] = None
    return rows


def _clip_coef(total: Tensor, timm_form: bool) -> Tensor:
    """On-device clip coefficient: clip_grad_norm_'s ``min(1, max/(norm+1e-6))``, or timm
    Lamb's ``1 / max(1, norm/max)`` (a zero norm gives inf, clamped to 1)."""
    if timm_form:
        return torch.clamp(MAX_GRAD_NORM / total, max=1.0)
    return torch.clamp(MAX_GRAD_NORM / (total + 1e-6), max=1.0)


def make_fused(workload: Workload, backend: str) -> Step:
    """A fusedopt step of ``workload`` on ``backend`` (via ``fusedopt.ops``), fresh state."""
    device = workload.device
    try:
        fusedopt.resolve(backend, device)
    except RuntimeError as error:
        raise Unavailable(str(error)) from None
    opt, h = workload.optimizer, workload.hypers
    params = [p.detach() for p in workload.params]
    grads = workload.grads
    masters = workload.masters() if workload.amp else []
    base = masters or params  # states are fp32 and shaped like the (master) params
    zeros = lambda: [torch.zeros_like(t, dtype=torch.float32) for t in base]  # noqa: E731
    steps = [torch.zeros((), device=device) for _ in params]
    scale = torch.full((), LOSS_SCALE, device=device) if workload.amp else None
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    clipped = workload.amp or opt == "lamb"  # LAMB: timm's global clip is part of the algorithm
    common = dict(master_params=masters, grad_scale=scale, backend=backend)

    if opt in ("adamw", "adam"):
        m, v = zeros(), zeros()
        kw = dict(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                  weight_decay=h["weight_decay"], decoupled=opt == "adamw")  # fmt: skip

        def update(clip_coef, found_inf):
            ops.adamw_(params, grads, m, v, steps, **kw, **common,
                       clip_coef=clip_coef, found_inf=found_inf)  # fmt: skip
    elif opt == "lamb":
        m, v = zeros(), zeros()
        kw = dict(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                  weight_decay=h["weight_decay"])  # fmt: skip

        def update(clip_coef, found_inf):
            ops.lamb_(params, grads, m, v, steps, **kw, **common,
                      clip_coef=clip_coef, found_inf=found_inf)  # fmt: skip
    elif opt == "lion":
        m = zeros()
        kw = dict(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
                  weight_decay=h["weight_decay"])  # fmt: skip

        def update(clip_coef, found_inf):
            ops.lion_(params, grads, m, **kw, **common, clip_coef=clip_coef, found_inf=found_inf)
    elif opt == "sgd":
        bufs = zeros()
        kw = dict(lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])

        def update(clip_coef, found_inf):
            ops.sgd_(params, grads, bufs, steps, **kw, **common,
                     clip_coef=clip_coef, found_inf=found_inf)  # fmt: skip
    else:
        raise ValueError(f"no fusedopt step for optimizer {opt!r}")

    def step() -> None:
        if not clipped:
            update(None, None)
            return
        norm = ops.grad_norm(grads, grad_scale=scale, backend=backend)
        found_inf = norm.found_inf if workload.amp else None
        update(_clip_coef(norm.total, timm_form=opt == "lamb"), found_inf)
        if workload.amp:
            torch._amp_update_scale_(scale, tracker, norm.found_inf, 2.0, 0.5, 2000)

    return step
