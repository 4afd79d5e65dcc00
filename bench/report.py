"""The main job: how fast fusedopt is, beside torch, on real models' parameter lists.

    python -m bench.report [--device cpu|cuda] [--model gpt2|llama1b|tiny] [--quick]
                           [--compile-peers [none|adamw|muon|all]] [--slow-backends]
                           [--optimizers adamw,lamb,...] [--modes fp32,amp] [--no-norm]
                           [--out bench/results]

For each optimizer x precision mode (``fp32``; ``amp`` = bf16 params + fp32 master + loss
scale + clipping, see ``bench/traffic.py``) it times every usable fusedopt backend on the
device and the peers of DESIGN.md §6 (``bench/peers.py``), and the ``grad_norm`` pass alone
(``bench/norm.py``); each as GB/s and % of the bandwidth ceiling measured in the same run
(``bench/timing.py``: STREAM's kernels, bus bytes). It then prints a Markdown table and
writes ``<device>-<model>-<stamp>.{csv,md,png}`` under ``--out``. Defaults: ``cuda`` when a GPU
is visible (model ``llama1b``, compiled AdamW peers), else ``cpu`` (model ``gpt2``, compiled
peers opt-in: Inductor takes minutes to compile them on a small CPU). Exit status 1 when any
implementation raised an error (the row says which), so CI notices.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import goals as goals_mod
from bench import h200_model
from bench.cases import LOSS_SCALE, Workload, make_workload
from bench.fused import backend_rows, make_fused
from bench.norm import NORM_MODES, norm_rows
from bench.output import (
    Row,
    RunInfo,
    fill_relative,
    load_average,
    markdown_table,
    write_csv,
    write_plot,
)
from bench.peers import COMPILED_PEERS, Unavailable, make_peer, peer_labels
from bench.shapes import MODELS, model_shapes, numel
from bench.timing import (
    Step,
    ceiling_array_bytes,
    profile_step,
    stream_ceiling,
    time_steps,
)
from bench.traffic import MODES, OPTIMIZER_OPS
from fusedopt._contract import BACKEND_NAMES

ALL_OPTIMIZERS = tuple(OPTIMIZER_OPS)
#: Tensor counts of the launch-scaling check (same per-tensor size, 1000 elements); --quick
#: uses the smaller pair (parsing the profile of a 512-tensor torch step takes seconds).
SCALING_COUNTS = {False: (8, 512), True: (4, 64)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n")[0]
    )
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if gpu else "cpu")
    parser.add_argument("--model", choices=tuple(MODELS), default=None,
                        help="shape list (default: llama1b on cuda, gpt2 on cpu)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for development")
    parser.add_argument("--compile-peers", nargs="?", const="all", default=None,
                        choices=("none", "adamw", "muon", "all"),
                        help="torch.compile'd peers: for which optimizers (bare flag: all; "
                             "default: adamw on cuda, none on cpu)")  # fmt: skip
    parser.add_argument(
        "--slow-backends",
        action="store_true",
        help="also time the reference backend (and interpreted Triton on cpu)",
    )
    parser.add_argument(
        "--all-peers",
        action="store_true",
        help="on cpu, also time torch's for-loop step (default on cuda; on a small CPU it only "
        "repeats foreach's numbers, slowly)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated fusedopt backends to time (default: every usable one)",
    )
    parser.add_argument(
        "--peers",
        default=None,
        help="comma-separated peer rows to time, by label (default: all; e.g. 'torch fused,"
        "heavyball MuonAdamW eager'); the others are listed as not selected",
    )
    parser.add_argument("--optimizers", default=",".join(ALL_OPTIMIZERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="grad_norm rows: the norm pass alone, per mode (bench/norm.py)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not gpu:
        parser.error("--device cuda: no CUDA device is visible")
    args.model = args.model or ("llama1b" if args.device == "cuda" else "gpt2")
    args.all_peers = args.all_peers or args.device == "cuda"
    args.peers = None if args.peers is None else [x for x in args.peers.split(",") if x]
    if args.compile_peers is None:
        args.compile_peers = "adamw" if args.device == "cuda" else "none"
    lists = [("optimizers", ALL_OPTIMIZERS), ("modes", tuple(MODES))]
    if args.backends is not None:
        lists.append(("backends", BACKEND_NAMES))
    for name, known in lists:
        chosen = [x for x in getattr(args, name).split(",") if x]
        bad = [x for x in chosen if x not in known]
        if bad or not chosen:
            parser.error(f"--{name}: unknown {bad or 'empty list'}; known: {', '.join(known)}")
        setattr(args, name, chosen)
    cuda = args.device == "cuda"
    defaults = {(False, False): (1, 3), (False, True): (1, 2), (True, False): (3, 20),
                (True, True): (2, 5)}[(cuda, args.quick)]  # fmt: skip
    args.warmup = defaults[0] if args.warmup is None else args.warmup
    args.repeats = defaults[1] if args.repeats is None else args.repeats
    return args


class Progress:
    """A plain-text progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.done, self.width = total, 0, width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, what: str) -> None:
        filled = self.width * self.done // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {what}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        self.show("done")
        if self.tty:
            sys.stderr.write("\n")


def _release(device: torch.device, collect: bool = False) -> None:
    """Return freed memory to the device; ``collect`` also runs the (slow) cycle collector."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def implementations(
    workload: Workload,
    backends: dict[str, str | None],
    compile_for: str,
    all_peers: bool,
    peers: list[str] | None = None,
) -> list[tuple[str, Callable[[], Step] | str]]:
    """(label, factory or the reason it is skipped) of every row of a case; ``peers``: the
    peer labels to time (None: all)."""
    impls: list[tuple[str, Callable[[], Step] | str]] = []
    for backend, why_not in backends.items():
        if why_not is None:  # the others are listed once, with the reason, above the table
            impls.append((f"fusedopt {backend}", lambda b=backend: make_fused(workload, b)))
    for label in peer_labels(workload.optimizer):
        if label == "torch for-loop" and workload.amp:
            continue  # the amp composition is only as fast as its step: foreach/fused suffice
        if peers is not None and label not in peers:
            impls.append((label, "not selected (--peers)"))
            continue
        if label == "torch for-loop" and not all_peers:
            impls.append((label, "skipped on cpu: pass --all-peers"))
            continue
        if label in COMPILED_PEERS and compile_for not in ("all", workload.optimizer):
            impls.append((label, "skipped: pass --compile-peers (slow to compile here)"))
            continue
        impls.append((label, lambda lab=label: make_peer(workload, lab)))
    return impls


def run_case(
    workload: Workload,
    label: str,
    factory: Callable[[], Step] | str,
    args: argparse.Namespace,
    ceiling_gbps: float,
) -> Row:
    """Time one implementation of one case; a row with a status when it cannot run."""
    device = workload.device
    row = Row(
        workload.model, workload.numel, len(workload.params), workload.optimizer,
        workload.mode, label, bytes_per_param=workload.bytes_per_param,
    )  # fmt: skip
    if isinstance(factory, str):
        row.status = factory
        return row
    step = None
    compiled = label in COMPILED_PEERS
    try:
        step = factory()
        warmup = args.warmup + (2 if compiled else 0)  # compile + recompile
        timed = time_steps(step, device, warmup, args.repeats)
        before = fingerprint(watched_tensors(step, workload))  # [note: every row steps]
        prof = profile_step(step, device)
        idle = why_no_work(step, workload, before)
    except Unavailable as why:
        row.status = str(why)
        return row
    except Exception as error:  # a broken implementation is a row, not the end of the run
        row.status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return row
    finally:
        del step
        if compiled:
            torch._dynamo.reset()
        _release(device)
    if idle:
        row.status = f"error: {idle}"
        return row
    row.median_ms, row.p20_ms, row.p80_ms = (t * 1e3 for t in (timed.median, timed.p20, timed.p80))
    row.gbps = workload.bytes_per_param * workload.numel / timed.median / 1e9
    row.pct_ceiling = 100.0 * row.gbps / ceiling_gbps
    row.host_ms = timed.host_median * 1e3
    row.launches, row.launches_what = prof.launches, prof.launches_what
    if prof.extra_peak_bytes is not None:
        row.extra_peak_mib = prof.extra_peak_bytes / 2**20
    row.warmup, row.repeats = warmup, args.repeats
    return row


# [note: every row steps] A row's time counts only if each step it timed did the step's work.
# Two ways a step can do less and look fast: an optimizer that stepped nothing (heavyball's
# Muon consumed the grads at the warm-up step, and every timed step returned at once: 0.06 ms
# for GPT-2 small) and a GradScaler that skipped steps (inf or NaN grads). So after the timed
# steps run_case checks, for every row:
# * the tensors a step must move (a step factory's ``step.watched()``: the fp32 masters of the
#   amp rows; otherwise the params) all changed during the profiled step(s), the last it ran:
#   the first 4096 elements of each non-empty one, compared before and after (an update
#   below an fp32 ulp of a weight does not happen with the report's hyperparameters; the
#   bf16 params of an amp row are not watched, since SGD's clipped update is below half
#   their ulp);
# * a GradScaler (``step.scaler``) still holds LOSS_SCALE: it halves the scale at each step
#   it skips and doubles it only after 2000 clean steps in a row (growth_interval), more than
#   a row runs, so log2(LOSS_SCALE / scale) is the count of skipped steps.
# A row that fails either is an error row, without a time (tests/test_bench_smoke.py).
#: Elements of each watched tensor compared before and after the profiled steps.
FINGERPRINT_ELEMS = 4096


def watched_tensors(step: Step, workload: Workload) -> list[torch.Tensor]:
    """The tensors ``step`` must change at every step ([note: every row steps])."""
    watched = getattr(step, "watched", None)
    return list(watched()) if watched is not None else list(workload.params)


def fingerprint(tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """A copy of the first FINGERPRINT_ELEMS elements of each tensor (None: empty)."""
    return [t.detach().reshape(-1)[:FINGERPRINT_ELEMS].clone() if t.numel() else None
            for t in tensors]  # fmt: skip


def why_no_work(step: Step, workload: Workload, before: list) -> str | None:
    """Why the last steps of ``step`` did not all do their work, or None when they did."""
    after = fingerprint(watched_tensors(step, workload))
    unchanged = [i for i, (b, a) in enumerate(zip(before, after, strict=True))
                 if b is not None and torch.equal(a, b)]  # fmt: skip
    if unchanged:
        names = ", ".join(workload.names[i] if len(after) == len(workload.names) else str(i)
                          for i in unchanged[:3])  # fmt: skip
        return (
            f"{len(unchanged)} of {sum(b is not None for b in before)} watched tensors "
            f"unchanged by the profiled step ({names}): a step that did no work"
        )
    scaler = getattr(step, "scaler", None)
    if scaler is not None and scaler.get_scale() != LOSS_SCALE:
        skipped = round(math.log2(LOSS_SCALE / scaler.get_scale()))
        return (
            f"the GradScaler skipped {skipped} steps (inf/NaN grads; scale "
            f"{scaler.get_scale():g}, was {LOSS_SCALE:g})"
        )
    return None


def launch_scaling(
    device: torch.device, backends: dict[str, str | None], modes: list[str], quick: bool
) -> list[goals_mod.ScalingRow]:
    """AdamW launches per step at a few and at many tensors, fusedopt vs torch fused.

    The reference backend is left out: it is a Python loop inside one op, not a kernel.
    """
    kernel_backends = [b for b, why in backends.items() if why is None and b != "reference"]
    rows = []
    for mode in modes:
        for count in SCALING_COUNTS[quick]:
            shapes = [(f"t{i}", (1000,)) for i in range(count)]
            workload = make_workload(f"{count}x1000", "adamw", mode, device, shapes=shapes)
            impls = [(f"fusedopt {b}", lambda w=workload, b=b: make_fused(w, b))
                     for b in kernel_backends]  # fmt: skip
            impls.append(("torch fused", lambda w=workload: make_peer(w, "torch fused")))
            for label, factory in impls:
                try:
                    step = factory()
                    step()  # warm: state, tables
                    launches = profile_step(step, device).launches
                    rows.append(goals_mod.ScalingRow(label, mode, count, launches))
                except Exception as error:
                    status = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    rows.append(goals_mod.ScalingRow(label, mode, count, None, status))
            del workload
            _release(device)
    return rows


def _scaling_table(scaling: list[goals_mod.ScalingRow], what: str) -> str:
    lines = [f"| implementation | mode | tensors | {what} per step |", "| --- | --- | --- | --- |"]
    for s in scaling:
        value = f"{s.launches:g}" if s.launches is not None else f"*{s.status}*"
        lines.append(f"| {s.impl} | {s.mode} | {s.tensors} | {value} |")
    return "\n".join(lines)


def render(args, info: RunInfo, backends, rows, scaling, goals, wall_s: float) -> str:
    """The whole report as Markdown."""
    shapes = model_shapes(args.model)
    what = "GPU kernels+memcpy/memset" if info.device == "cuda" else "CPU top-level op calls"
    backend_lines = [
        f"- `{b}`: {'benchmarked' if why is None else why}" for b, why in backends.items()
    ]
    # fmt: off
    return "\n".join([
        f"# fusedopt benchmark: {args.model} on {info.device_name}",
        "",
        f"- model `{args.model}`: {numel(shapes):,} params in {len(shapes)} tensors "
        "(`bench/shapes.py`)",
        f"- device `{info.device}` ({info.device_name}, {info.threads} threads), torch "
        f"{info.torch}, Triton {info.triton}, commit {info.commit}, {info.date}",
        f"- bandwidth ceiling (same run): {info.ceiling_how} (`bench/timing.py`)",
        f"- warmup {args.warmup}, repeats {args.repeats} (compiled peers: +2 warmup); "
        f"wall time of this run {wall_s:.0f} s",
        f"- machine load (1-min load average): {info.load_start:.1f} at start, "
        f"{info.load_end:.1f} at end, on {info.cpus} CPUs",
        *([f"- **Warning: the machine was busy when this run began (load {info.load_start:.1f}"
           f" on {info.cpus} CPUs): other processes competed for the cores and the memory"
           " bandwidth, so these numbers, absolute and relative, are unreliable.**"]
          if info.busy else []),
        "",
        "Backends:",
        *backend_lines,
        "",
        markdown_table(rows),
        "",
        "Columns: step time median and 20th/80th percentiles; B/param = compulsory bytes per "
        "parameter of the case (`bench/traffic.py`, the same for every implementation, so GB/s "
        "is *effective* bandwidth and `% ceiling` its share of the bandwidth ceiling above: "
        "both count bytes that cross the memory bus, and an in-place pass moves exactly its "
        "compulsory bytes, so a step at 100% would run at the measured STREAM rate); "
        "`grad_norm` rows: the global L2 norm of the model's grads alone (fp32 grads; amp: "
        "bf16 grads divided by the loss scale, the norm pass of an amp step), B/param = the "
        "grad read once (`bench/norm.py`); "
        "`x best peer` = fastest non-fusedopt median / this median; launches/step = "
        f"{what}; host ms/step = "
        + ("time to issue a step, no sync" if info.device == "cuda"
           else "process CPU time per step, all threads")
        + "; extra peak MiB = memory allocated during a step beyond what existed before it. "
        "`amp` rows of torch are its composition: upcast grads to fp32 masters, "
        "GradScaler.unscale_, clip_grad_norm_(1.0), GradScaler.step + update, copy masters to "
        "the bf16 params.",
        "",
        "## Launches vs tensor count (AdamW, 1000 elements per tensor)",
        "",
        _scaling_table(scaling, what),
        "",
        "## Goals",
        "",
        goals_mod.markdown(goals),
        "",
        "## H200 model vs measured (AdamW step kernel, `bench/results/h200_model.md`)",
        "",
        h200_model.report_section(rows, info.device),
        "",
    ])
    # fmt: on


def main(argv: list[str] | None = None) -> int:
    """Run the report; return the exit status (1 when an implementation errored)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    began, load_start = time.perf_counter(), load_average()
    device = torch.device(args.device)
    if args.model == "tiny":
        args.slow_backends = True  # tiny shapes: every backend is quick enough
    backends = backend_rows(device, args.slow_backends)
    for name in backends:
        if args.backends is not None and name not in args.backends:
            backends[name] = backends[name] or "not selected (--backends)"
    ceiling = stream_ceiling(device, ceiling_array_bytes(device, args.quick))
    info = RunInfo.collect(device, ceiling, load_start)

    cases = [(o, m) for o in args.optimizers for m in args.modes]
    planned = {
        case: len(implementations(
            Workload(args.model, *case, device, [], [], []), backends, args.compile_peers,
            args.all_peers, args.peers,
        ))
        for case in cases
    }  # fmt: skip
    progress = Progress(sum(planned.values()))
    rows: list[Row] = []
    for optimizer, mode in cases:
        progress.show(f"{optimizer} {mode}: making the workload")
        workload = make_workload(args.model, optimizer, mode, device)
        for label, factory in implementations(
            workload, backends, args.compile_peers, args.all_peers, args.peers
        ):
            progress.show(f"{optimizer} {mode}: {label}")
            rows.append(run_case(workload, label, factory, args, ceiling.gbps))
            progress.advance()
        del workload
        _release(device, collect=True)
    if args.norm:
        progress.show("grad_norm rows")
        norm_modes = [m for m in args.modes if m in NORM_MODES]
        rows += norm_rows(args.model, device, backends, norm_modes, args.warmup, args.repeats,
                          ceiling.gbps)  # fmt: skip
        _release(device, collect=True)
    progress.show("launch scaling")
    scaling = launch_scaling(device, backends, args.modes, args.quick)

    info.load_end = load_average()
    # The ceiling again, each kernel keeping its best of both: a busy moment during one
    # measurement must not lower it (the percentages are recomputed against the best).
    progress.show("bandwidth ceiling, again")
    ceiling = ceiling.merged(stream_ceiling(device, ceiling_array_bytes(device, args.quick)))
    info.ceiling_gbps, info.ceiling_kernel = ceiling.gbps, ceiling.kernel
    info.ceiling_how = ceiling.describe()
    for row in rows:
        if row.gbps is not None:
            row.pct_ceiling = 100.0 * row.gbps / ceiling.gbps
    progress.close()
    fill_relative(rows)
    goals = goals_mod.evaluate(rows, info, args.model, scaling, backends)
    wall = time.perf_counter() - began
    text = render(args, info, backends, rows, scaling, goals, wall)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{info.device}-{args.model}-{info.date.replace(':', '')}"
    write_csv(stem.with_suffix(".csv"), info, rows)
    stem.with_suffix(".md").write_text(text)
    write_plot(stem.with_suffix(".png"), info, rows, f"fusedopt vs torch: {args.model}")
    print(f"wrote {stem}.csv, .md, .png ({wall:.0f} s)", file=sys.stderr)
    return 1 if any(r.status.startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
