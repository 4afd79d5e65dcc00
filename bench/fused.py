"""fusedopt's side of each case: the user-facing optimizer classes, one per backend.

``fp32``: ``fusedopt.<Optimizer>(params, **hypers, backend=b).step``. ``amp``: the same class
on the bf16 params with ``master_weights=True`` and ``max_grad_norm=1.0`` (LAMB: its own
default global clip), driven by ``fusedopt.GradScaler``: ``scaler.step(opt)`` hands the loss
scale to the optimizer, whose ``grad_norm`` pass yields both the clip norm and ``found_inf``,
then one fused step unscales, clips, updates the fp32 master and its moments and writes the
bf16 param; ``scaler.update()`` is torch's. Two passes over the grads, no host sync.
"""

from __future__ import annotations

import torch

import fusedopt
from bench.cases import LOSS_SCALE, MAX_GRAD_NORM, Workload
from bench.peers import Unavailable
from bench.timing import Step

#: Backends too slow to time on real shapes (pure-Python loops, the Triton interpreter):
#: included only for tiny shapes or on request (``--slow-backends``).
SLOW_BACKENDS = ("reference",)

#: fusedopt's class for each benchmarked optimizer.
CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": fusedopt.AdamW,
    "adam": fusedopt.Adam,
    "lamb": fusedopt.LAMB,
    "lion": fusedopt.Lion,
    "sgd": fusedopt.SGD,
    "muon": fusedopt.Muon,
    "schedulefree_adamw": fusedopt.ScheduleFreeAdamW,
    "adafactor": fusedopt.Adafactor,
}


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


def make_fused(workload: Workload, backend: str) -> Step:
    """A fusedopt optimizer step of ``workload`` on ``backend``, with fresh state."""
    device = workload.device
    try:
        fusedopt.resolve(backend, device)
    except RuntimeError as error:
        raise Unavailable(str(error)) from None
    for p, g in zip(workload.params, workload.grads, strict=True):
        p.grad = g
    kwargs = dict(workload.hypers, backend=backend)
    if workload.amp:
        kwargs["master_weights"] = True
        if workload.optimizer != "lamb":  # LAMB clips by default (timm's max_grad_norm=1.0)
            kwargs["max_grad_norm"] = MAX_GRAD_NORM
    opt = CLASSES[workload.optimizer](workload.params, **kwargs)
    if not workload.amp:
        return opt.step
    scaler = fusedopt.GradScaler(device.type, init_scale=LOSS_SCALE)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor on the device

    def step() -> None:
        scaler.step(opt)
        scaler.update()

    step.optimizer = opt  # what bench/host_time.py times apart
    # What bench/report.py checks after timing ([note: every row steps]): the fp32 masters
    # (created by the first step) move at every step, and the scaler skipped none.
    step.watched = lambda: [opt.state[p]["master_param"] for p in workload.params]
    step.scaler = scaler
    return step
