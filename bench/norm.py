"""grad_norm on its own, and what it adds to an AMP step: rows of the report, and a script.

The norm pass reads every grad once and writes nothing, so its bytes are the grads' storage
bytes (4 per element fp32, 2 bf16) and its roofline is the read bandwidth.

* **Report rows** (:func:`norm_rows`, ``python -m bench.report``): ``grad_norm`` in two modes,
  ``fp32`` (fp32 grads) and ``amp`` (bf16 grads scaled by the loss scale, the norm of the
  unscaled grads: the pass an AMP step runs), each benchmarked fusedopt backend beside torch's
  ``torch.nn.utils.get_total_norm`` (foreach) on the same grads, as they are (unscaling them
  first would write them).
* **Script** (issue 17): ``python -m bench.norm [--threads 2] [--repeats 9] [--quick]``
  prints the bandwidth ceiling (``bench/timing.py``), ``grad_norm`` GB/s on 30 tensors of 4M
  elements in fp32 and bf16 (fusedopt cpu vs torch), and GPT-2 small's AMP AdamW step (bf16
  params and grads, fp32 master weights) without clipping, with ``max_grad_norm=1.0``, and
  with ``fusedopt.GradScaler`` too (the report's ``amp`` row), as ms, GB/s of compulsory
  bytes (``bench/traffic.py``) and % of the ceiling. Contenders alternate step by step and
  each reports its fastest and its median step, so a busy machine slows them alike; the
  machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

import fusedopt
from bench.cases import LOSS_SCALE, MAX_GRAD_NORM, make_workload
from bench.output import Row, load_average
from bench.shapes import model_shapes
from bench.shapes import numel as shape_numel
from bench.timing import (
    Step,
    StepTimes,
    ceiling_array_bytes,
    profile_step,
    stream_ceiling,
    time_steps,
)
from bench.traffic import bytes_per_param
from fusedopt import ops

#: The report's norm modes: grad dtype, and whether the grads carry the loss scale.
NORM_MODES = {"fp32": (torch.float32, False), "amp": (torch.bfloat16, True)}


def _norm_step(grads: list[torch.Tensor], label: str, scale: torch.Tensor | None) -> Step:
    """One norm pass over ``grads``: fusedopt ``<backend>`` or torch's get_total_norm."""
    if label == "torch get_total_norm":
        return lambda: torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    backend = label.removeprefix("fusedopt ")
    return lambda: ops.grad_norm(grads, 2.0, grad_scale=scale, backend=backend)


def norm_rows(
    model: str,
    device: torch.device,
    backends: dict[str, str | None],
    modes: list[str],
    warmup: int,
    repeats: int,
    ceiling_gbps: float,
) -> list[Row]:
    """``grad_norm`` rows (optimizer ``grad_norm``) of the report, one per mode and
    implementation, with GB/s of grads read and its share of the ceiling."""
    rows = []
    for mode in modes:
        dtype, scaled = NORM_MODES[mode]
        # The amp workload's grads are bf16 times the loss scale; fp32's are plain fp32.
        workload = make_workload(model, "adamw", mode, device)
        grads = [g.to(dtype) for g in workload.grads]
        del workload
        scale = torch.tensor(LOSS_SCALE, device=device) if scaled else None
        numel = sum(g.numel() for g in grads)
        bytes_per_elem = grads[0].element_size()
        labels = [f"fusedopt {b}" for b, why in backends.items() if why is None]
        labels.append("torch get_total_norm")
        for label in labels:
            row = Row(
                model, numel, len(grads), "grad_norm", mode, label,
                bytes_per_param=bytes_per_elem,
            )  # fmt: skip
            try:
                step = _norm_step(grads, label, scale)
                timed = time_steps(step, device, warmup, repeats)
                prof = profile_step(step, device)
            except Exception as error:  # a broken implementation is a row, not the end
                row.status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                rows.append(row)
                continue
            row.median_ms, row.p20_ms, row.p80_ms = (
                t * 1e3 for t in (timed.median, timed.p20, timed.p80)
            )
            row.gbps = bytes_per_elem * numel / timed.median / 1e9
            row.pct_ceiling = 100.0 * row.gbps / ceiling_gbps
            row.host_ms = timed.host_median * 1e3
            row.launches, row.launches_what = prof.launches, prof.launches_what
            if prof.extra_peak_bytes is not None:
                row.extra_peak_mib = prof.extra_peak_bytes / 2**20
            row.warmup, row.repeats = warmup, repeats
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# The script.


def alternate(contenders: dict[str, Step], device: torch.device, repeats: int) -> dict:
    """StepTimes of each contender, timed in alternation after one warm-up call each."""
    for step in contenders.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    hosts: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, step in contenders.items():
            one = time_steps(step, device, warmup=0, repeats=1)
            times[name] += one.times
            hosts[name] += one.host
    return {name: StepTimes(tuple(times[name]), tuple(hosts[name])) for name in contenders}


def _lists(count: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(numel, generator=gen).to(dtype) for _ in range(count)]


def amp_steps(model: str, device: torch.device) -> dict[str, tuple[Step, int]]:
    """fusedopt.AdamW on the model's bf16 params with fp32 master weights, three ways, each
    with its own params and state: (step, compulsory bytes per param)."""
    one_pass = bytes_per_param("adamw_", "amp") - 2  # less the norm pass's bf16 grad read
    out: dict[str, tuple[Step, int]] = {}
    for name, clip, scaler in (
        ("amp AdamW", False, False),
        ("amp AdamW + max_grad_norm", True, False),
        ("amp AdamW + max_grad_norm + GradScaler", True, True),
    ):
        workload = make_workload(model, "adamw", "amp", device)
        if not scaler:  # unscaled grads: the workload's carry the loss scale
            for g in workload.grads:
                g.div_(LOSS_SCALE)
        for p, g in zip(workload.params, workload.grads, strict=True):
            p.grad = g
        kwargs = dict(workload.hypers, master_weights=True, backend="cpu")
        if clip:
            kwargs["max_grad_norm"] = MAX_GRAD_NORM
        opt = fusedopt.AdamW(workload.params, **kwargs)
        if scaler:
            amp = fusedopt.GradScaler(device.type, init_scale=LOSS_SCALE)
            amp.scale(torch.ones((), device=device))

            def step(opt=opt, amp=amp) -> None:
                amp.step(opt)
                amp.update()

        else:
            step = opt.step
        # Without a scaler nothing needs the norm pass: the step is one pass (28 B/param).
        out[name] = (step, bytes_per_param("adamw_", "amp") if clip or scaler else one_pass)
    return out


def _line(name: str, timed: StepTimes, nbytes: float, ceiling: float) -> str:
    best, median = min(timed.times), timed.median
    return (
        f"| {name} | {best * 1e3:.2f} | {median * 1e3:.2f} | {nbytes / best / 1e9:.1f} | "
        f"{nbytes / median / 1e9:.1f} | {100 * nbytes / best / 1e9 / ceiling:.0f}% |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.norm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: keep)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per contender")
    parser.add_argument("--model", default="gpt2", help="shape list of the AMP step")
    parser.add_argument("--tensors", type=int, default=30, help="tensors of the norm lists")
    parser.add_argument("--numel", type=int, default=4 << 20, help="elements per tensor")
    parser.add_argument("--quick", action="store_true", help="smaller ceiling arrays")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # fusedopt's cpu backend follows torch's setting
    device = torch.device("cpu")
    load = load_average()
    ceiling = stream_ceiling(device, ceiling_array_bytes(device, args.quick))
    results: list[tuple[str, StepTimes, float]] = []  # (case, times, bytes per call)
    for dtype in (torch.float32, torch.bfloat16):
        grads = _lists(args.tensors, args.numel, dtype)
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        contenders: dict[str, Callable[[], object]] = {
            "fusedopt cpu": lambda g=grads: ops.grad_norm(g, backend="cpu"),
            "torch get_total_norm": lambda g=grads: torch.nn.utils.get_total_norm(g),
        }
        what = f"grad_norm {args.tensors} x {args.numel:,} {str(dtype)[6:]}"
        for name, t in alternate(contenders, device, args.repeats).items():
            results.append((f"{what}, {name}", t, nbytes))
        del grads
    steps = amp_steps(args.model, device)
    numel = shape_numel(model_shapes(args.model))
    timed = alternate({name: step for name, (step, _) in steps.items()}, device, args.repeats)
    for name, t in timed.items():
        per_param = steps[name][1]
        results.append((f"{args.model} {name} ({per_param} B/param)", t, per_param * numel))
    del steps
    # The ceiling again, each kernel keeping its best of both (bench/report.py does the same).
    ceiling = ceiling.merged(stream_ceiling(device, ceiling_array_bytes(device, args.quick)))
    print(f"# grad_norm and the AMP step, {torch.get_num_threads()} threads")
    print(
        f"\nload average {load:.2f} at start, {load_average():.2f} at end, on {os.cpu_count()} CPUs"
    )
    print(f"ceiling (measured at the start and the end): {ceiling.describe()}\n")
    header = "| case | best ms | median ms | GB/s best | GB/s median | % ceiling (best) |"
    print(header + "\n|" + " --- |" * 6)
    for name, t, nbytes in results:
        print(_line(name, t, nbytes, ceiling.gbps))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"\n{stamp}")


if __name__ == "__main__":
    main()
