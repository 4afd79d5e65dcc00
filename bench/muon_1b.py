"""Muon on the ~1B shape list: what a CPU measures honestly, and what needs the GPU (#16).

    python -m bench.muon_1b [--shrink 16] [--layers 1] [--repeats 3] [--threads N]
                            [--out bench/results]

A Muon step on the 1B list (``bench/shapes.py``: 953M params, 114 matrices in 4 shapes) is
the Newton-Schulz GEMMs, ~49 TFLOP of bf16 per step (table 1), the same for every
implementation; on the 2-core CPU VM that is ~2 minutes per step (GPT-2 small's 2.1 TFLOP
take 5.5 s there), and the fp32 workload (params, grads, momentum, the NS buffers) needs
~20 GB of the VM's 23. Its wall-clock rows are the GPU suite's (``bench/gpu_suite.sh``).
What does not need the GEMMs, measured here with the report's own rows
(``bench.report.run_case``: the same step factories, checks and columns):

1. **NS FLOPs** per shape group (computed: ``5 * (4 m^2 n + 2 m^3)`` per m x n matrix, m <= n,
   torch's three GEMMs per iteration);
2. **launches per step** (CPU top-level op calls) on the 1B list with every dim divided by
   ``--shrink``: the same 147 tensors in the same shape groups, which is what the counts
   depend on (fusedopt's grow with the distinct shapes, torch.optim.Muon's with the params);
3. **the elementwise part** on ``--layers`` decoder layers of the 1B list at full size: a Muon
   step with ``ns_steps=0`` (momentum, the bf16 cast and Frobenius normalization of the NS
   input, decay and update, the AdamW side, and in amp the unscale, clip and masters: all
   but the GEMMs) in fusedopt and in torch's composition, time and GB/s of the two fused
   passes' compulsory bytes (``bench/traffic.py``); heavyball's NS has its 5 steps fixed
   (``assert steps == 5``), so it has no such row. The 1B list's bytes per step are in the
   header, to set beside the FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from bench import cases, report
from bench.cases import make_workload
from bench.output import Row, git_commit, load_average
from bench.shapes import Shape, llama_1b, numel
from bench.timing import ceiling_array_bytes, stream_ceiling
from bench.traffic import bytes_per_param

MODES = ("fp32", "amp")


def newton_schulz_flops(shape: Shape, ns_steps: int = 5) -> int:
    """FLOPs of torch.optim.Muon's Newton-Schulz on one matrix (fusedopt's is the same
    chain): per iteration X X^T (2 m^2 n), the Gram update (2 m^3), the product with X
    (2 m^2 n), on the m x n orientation with m <= n."""
    m, n = sorted(shape)
    return ns_steps * (4 * m * m * n + 2 * m**3)


def shrunk(shapes: list[tuple[str, Shape]], factor: int) -> list[tuple[str, Shape]]:
    """Every dim divided by ``factor`` (at least 1): the same tensors and shape groups."""
    return [(name, tuple(max(1, d // factor) for d in shape)) for name, shape in shapes]


def decoder_layers(count: int) -> list[tuple[str, Shape]]:
    """The first ``count`` decoder layers of the 1B list, at full size (no embeddings)."""
    prefixes = tuple(f"layers.{i}." for i in range(count))
    return [(name, shape) for name, shape in llama_1b() if name.startswith(prefixes)]


@contextlib.contextmanager
def muon_hypers(**overrides) -> Iterator[None]:
    """The report's Muon hyperparameters with ``overrides``, for the rows made inside."""
    saved = cases.HYPERS["muon"]
    cases.HYPERS["muon"] = {**saved, **overrides}
    try:
        yield
    finally:
        cases.HYPERS["muon"] = saved


def run_rows(shapes, label_of_model: str, args, ceiling_gbps: float, skip=()) -> list[Row]:
    """The report's Muon rows (fusedopt cpu and every peer but the compiled ones) on
    ``shapes`` in both modes."""
    rows = []
    device = torch.device("cpu")
    for mode in MODES:
        workload = make_workload(label_of_model, "muon", mode, device, shapes=shapes)
        impls = report.implementations(workload, {"cpu": None}, "none", all_peers=True)
        for label, factory in impls:
            if label in skip:
                factory = skip[label]
            print(f"  {label_of_model} {mode}: {label}", file=sys.stderr, flush=True)
            rows.append(report.run_case(workload, label, factory, args, ceiling_gbps))
        del workload
    return rows


def flops_table() -> tuple[str, float]:
    groups = Counter(shape for _, shape in llama_1b() if len(shape) == 2)
    lines = ["| shape | matrices | NS GFLOP per matrix | NS TFLOP per step |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    total = 0
    for shape, count in groups.items():
        flops = newton_schulz_flops(shape)
        total += flops * count
        lines.append(f"| {shape[0]}x{shape[1]} | {count} | {flops / 1e9:,.1f} | "
                     f"{flops * count / 1e12:.2f} |")  # fmt: skip
    lines.append(f"| all | {sum(groups.values())} | | {total / 1e12:.2f} |")
    return "\n".join(lines), total / 1e12


def launches_table(rows: list[Row]) -> str:
    lines = ["| mode | implementation | CPU top-level op calls per step | status |",
             "| --- | --- | ---: | --- |"]  # fmt: skip
    for r in rows:
        value = f"{r.launches:g}" if r.ok else ""
        lines.append(f"| {r.mode} | {r.impl} | {value} | {'ok' if r.ok else r.status} |")
    return "\n".join(lines)


def time_table(rows: list[Row]) -> str:
    lines = ["| mode | implementation | median ms | p20 ms | p80 ms | B/param | GB/s | "
             "% ceiling | CPU ms/step | op calls/step |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.mode} | {r.impl} | *{r.status}* | | | | | | | |")
            continue
        lines.append(
            f"| {r.mode} | {r.impl} | {r.median_ms:.1f} | {r.p20_ms:.1f} | {r.p80_ms:.1f} | "
            f"{r.bytes_per_param} | {r.gbps:.1f} | {r.pct_ceiling:.1f} | {r.host_ms:.1f} | "
            f"{r.launches:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.muon_1b", description=__doc__)
    parser.add_argument("--shrink", type=int, default=16)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began, load_start = time.perf_counter(), load_average()
    ceiling = stream_ceiling(torch.device("cpu"), ceiling_array_bytes(torch.device("cpu"), True))
    full = llama_1b()
    flops, tflops = flops_table()
    small = shrunk(full, args.shrink)
    no_heavyball = {
        label: "not timed: heavyball's Newton-Schulz has its 5 steps fixed"
        for label in report.peer_labels("muon")
        if label.startswith("heavyball")
    }
    launch_rows = run_rows(small, f"llama1b/{args.shrink}", args, ceiling.gbps)
    layers = decoder_layers(args.layers)
    with muon_hypers(ns_steps=0):
        time_rows = run_rows(layers, f"llama1b {args.layers} layer(s)", args, ceiling.gbps,
                             skip=no_heavyball)  # fmt: skip
    load_end = load_average()
    bytes_line = ", ".join(
        f"{mode} {bytes_per_param('muon_', mode)} B/param = "
        f"{bytes_per_param('muon_', mode) * numel(full) / 1e9:.1f} GB"
        for mode in MODES
    )
    text = "\n".join([
        "# Muon on the ~1B shape list: what the CPU measures (`python -m bench.muon_1b`)",
        "",
        f"- 1B list: {numel(full):,} params in {len(full)} tensors; commit {git_commit()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; machine load (1-min) "
        f"{load_start:.1f} at start, {load_end:.1f} at end, on the 2-core VM shared with "
        "other jobs: times are noisy; CPU ms/step (process CPU time) is the steadier figure",
        f"- one Muon step of the 1B list: {tflops:.1f} TFLOP of bf16 Newton-Schulz GEMMs "
        f"(ns_steps=5) and the fused elementwise passes' {bytes_line} "
        "(`bench/traffic.py`); wall-clock of the whole step: GPU only (`bench/gpu_suite.sh`)",
        f"- bandwidth ceiling: {ceiling.describe()}",
        f"- wall time of this run: {time.perf_counter() - began:.0f} s",
        "",
        "## 1. Newton-Schulz FLOPs per step (computed)",
        "",
        flops,
        "",
        f"## 2. Launches per step: the 1B list with every dim / {args.shrink} (measured)",
        "",
        "Same 147 tensors in the same 4 matrix shapes as the 1B list; CPU top-level op calls "
        "of one step (`bench/timing.py: profile_step`), which count per call, not per "
        "element. fusedopt's Newton-Schulz is one `fusedopt::newton_schulz_` call per shape "
        "group, and its elementwise passes one op call each; its count also holds one "
        "`aten::select` per matrix (the matrix's view in its shape's bf16 stack, made at "
        "each step: host work, no kernel). torch.optim.Muon runs the iteration one matrix at "
        "a time (its GEMMs and normalization are calls per matrix), heavyball likewise.",
        "",
        launches_table(launch_rows),
        "",
        f"## 3. The elementwise part: {args.layers} decoder layer(s) of the 1B list at full "
        "size, ns_steps=0 (measured)",
        "",
        f"{numel(layers):,} params in {len(layers)} tensors. `ns_steps=0` leaves every part "
        "of the step but the GEMMs. B/param are the two fused passes' compulsory bytes; the "
        "normalization of the bf16 NS input (a norm and a scale per matrix, in both "
        "implementations) is in the time, not in the bytes, so GB/s understates both a bit.",
        "",
        time_table(time_rows),
        "",
    ])  # fmt: skip
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
        (args.out / f"muon-1b-cpu-{stamp}.md").write_text(text)
    bad = [r for r in launch_rows + time_rows if r.status.startswith("error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
