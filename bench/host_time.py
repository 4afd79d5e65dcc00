"""Host time per optimizer step against the tensor count (issue #14 item 5).

``python -m bench.host_time [--tensors 10 150 1000 10000] [--repeats 50] [--numel 4]``

Every tensor holds ``--numel`` elements (default 4), so the kernels' own work is negligible and
a step's CPU time is its host time: the Python and C++ bookkeeping per tensor and per step.
Rows: fusedopt's AdamW on the ``cpu`` backend (``fp32``; ``amp``: bf16 params with master
weights, ``max_grad_norm`` and ``fusedopt.GradScaler``, as in ``bench/fused.py``) beside
``torch.optim.AdamW(fused=True)`` (``amp``: torch's composition of the same step,
``bench/peers.py``). fusedopt's step is also split: ``plan`` is ``_step_plan`` (the cached
plan's per-step check and the grads lists, [note: cached plan]), ``op calls`` the step ops
(``_run``, or ``_run_planned`` for a cached plan's calls, [note: planned calls]: the
dispatcher's conversion of the lists, the op's validation, the kernel), and the
step's remainder (the norm pass, the hyperparameter lists, the scaler) is the difference.
Each number is the **minimum** over ``--repeats`` timed steps (after a warm-up; above 150
tensors, ``repeats * 150 / tensors`` steps, at least 20), each part's minimum taken apart: the
machine is shared, and the minimum is the run least disturbed by others. ``CPU us/tensor`` is
the least CPU time of the stepping thread (``time.thread_time``) a step took, per tensor: the
host work without the time the thread waited for a core, which on a loaded 2-core machine
the wall-clock minimum of a 10-30 ms step rarely escapes (other processes' cache traffic
still counts in both). Prints a Markdown
table; ``--out DIR`` also writes it, with the commit and the load average at the start and
the end, to ``DIR/host-time-cpu-<UTC date and time>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cases import make_workload
from bench.fused import make_fused
from bench.output import git_commit, load_average
from bench.peers import make_peer


def min_step_seconds(step, warmup: int, repeats: int) -> tuple[float, float]:
    """The fastest of ``repeats`` calls of ``step`` (after ``warmup`` calls) and the least
    CPU time of this thread one took, in seconds."""
    for _ in range(warmup):
        step()
    best = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        step()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.thread_time() - start_cpu)
    return best, best_cpu


def _timed(method: Callable, spent: list[float]) -> Callable:
    """``method``, adding the seconds each call takes to ``spent[0]``."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    return timed


def min_split_seconds(step, opt, warmup: int, repeats: int) -> tuple[float, float, float, float]:
    """The fastest step, the fastest ``_step_plan``, the fastest op calls (``_run`` and
    ``_run_planned``, summed over a step's calls) of ``repeats`` steps of ``opt`` and the
    least CPU time of this thread a step took, in seconds, each a minimum apart."""
    plan_spent, run_spent = [0.0], [0.0]
    opt._step_plan = _timed(opt._step_plan, plan_spent)  # instance attributes: this run only
    opt._run = _timed(opt._run, run_spent)
    opt._run_planned = _timed(opt._run_planned, run_spent)  # [note: planned calls]
    for _ in range(warmup):
        step()
    best = [float("inf")] * 4
    for _ in range(repeats):
        plan_spent[0] = run_spent[0] = 0.0
        start, start_cpu = time.perf_counter(), time.thread_time()
        step()
        cpu = time.thread_time() - start_cpu
        spent = (time.perf_counter() - start, plan_spent[0], run_spent[0], cpu)
        best = [min(b, s) for b, s in zip(best, spent, strict=True)]
    return best[0], best[1], best[2], best[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 150, 1000, 10000])
    parser.add_argument("--modes", nargs="+", default=["fp32", "amp"])
    parser.add_argument("--numel", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    load_start = load_average()
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    emit(f"torch {torch.__version__}, cpu, {args.numel} elements per tensor, "
         f"min of {args.repeats} steps\n")  # fmt: skip
    emit("| tensors | mode | fusedopt host us/step | us/tensor | of which plan us | op calls us "
         "| CPU us/tensor | torch fused host us/step | us/tensor | CPU us/tensor |")  # fmt: skip
    emit("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.tensors:
        shapes = [(f"t{i}", (args.numel,)) for i in range(n)]
        for mode in args.modes:
            repeats = max(20, args.repeats * 150 // max(n, 150))
            workload = make_workload("host", "adamw", mode, device, shapes=shapes)
            step = make_fused(workload, "cpu")
            opt = step.__self__ if hasattr(step, "__self__") else step.optimizer
            ours, plan, run, ours_cpu = min_split_seconds(step, opt, args.warmup, repeats)
            workload = make_workload("host", "adamw", mode, device, shapes=shapes)
            peer = make_peer(workload, "torch fused")
            theirs, theirs_cpu = min_step_seconds(peer, args.warmup, repeats)
            emit(f"| {n} | {mode} | {ours * 1e6:.0f} | {ours * 1e6 / n:.2f} | {plan * 1e6:.0f} "
                 f"| {run * 1e6:.0f} | {ours_cpu * 1e6 / n:.2f} | {theirs * 1e6:.0f} "
                 f"| {theirs * 1e6 / n:.2f} | {theirs_cpu * 1e6 / n:.2f} |")  # fmt: skip
    if args.out is not None:
        now = datetime.datetime.now(datetime.UTC)
        path = args.out / f"host-time-cpu-{now:%Y-%m-%dT%H%M%SZ}.md"
        header = (f"`python -m bench.host_time`, {now:%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
                  f"load average {load_start:.1f} at the start, {load_average():.1f} at the "
                  "end (2-core CPU VM, shared)\n\n")  # fmt: skip
        path.write_text(header + "\n".join(lines) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
