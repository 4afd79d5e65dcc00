"""Report rows and their three outputs: a Markdown table, CSV rows, and a PNG plot."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from bench.timing import Ceiling

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class RunInfo:
    """What identifies a run: where, with what, when, on which commit."""

    device: str
    device_name: str
    torch: str
    triton: str
    date: str
    commit: str
    # The bandwidth ceiling of the same run (bench/timing.py): GB/s, the STREAM kernel that
    # reached it, and how it was measured (one line).
    ceiling_gbps: float
    ceiling_kernel: str
    ceiling_how: str
    threads: int
    cpus: int
    # 1-minute load average when the run began and ended: how busy the machine was. A load
    # above the cores' count means other processes competed for cores and memory bandwidth.
    load_start: float
    load_end: float = float("nan")

    @classmethod
    def collect(cls, device: torch.device, ceiling: Ceiling, load_start: float) -> RunInfo:
        return cls(
            device=device.type,
            device_name=device_name(device),
            torch=torch.__version__,
            triton=_triton_version(),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            commit=git_commit(),
            ceiling_gbps=ceiling.gbps,
            ceiling_kernel=ceiling.kernel,
            ceiling_how=ceiling.describe(),
            threads=torch.get_num_threads(),
            cpus=os.cpu_count() or 1,
            load_start=load_start,
        )

    @property
    def busy(self) -> bool:
        """Other work shared the machine: more than half the CPUs were busy when we began."""
        return self.load_start > 0.5 * self.cpus


def load_average() -> float:
    """The 1-minute load average, or NaN where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short hash of HEAD (``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclasses.dataclass
class Row:
    """One implementation of one case. Numbers are None when it did not run (see status)."""

    model: str
    numel: int
    tensors: int
    optimizer: str
    mode: str
    impl: str
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    bytes_per_param: int | None = None
    gbps: float | None = None
    pct_ceiling: float | None = None  # gbps as a share of RunInfo.ceiling_gbps
    vs_best_peer: float | None = None
    launches: float | None = None
    launches_what: str = ""
    host_ms: float | None = None
    extra_peak_mib: float | None = None
    warmup: int = 0
    repeats: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_fusedopt(self) -> bool:
        return self.impl.startswith("fusedopt")


def fill_relative(rows: list[Row]) -> None:
    """Set ``vs_best_peer``: the fastest peer's median over this row's, per case (>1 = faster)."""
    cases: dict[tuple, list[Row]] = {}
    for row in rows:
        cases.setdefault((row.model, row.optimizer, row.mode), []).append(row)
    for case in cases.values():
        peers = [r.median_ms for r in case if r.ok and not r.is_fusedopt]
        if not peers:
            continue
        for row in case:
            if row.ok:
                row.vs_best_peer = min(peers) / row.median_ms


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


COLUMNS = (
    "optimizer", "mode", "implementation", "median ms", "p20 ms", "p80 ms", "B/param",
    "GB/s", "% ceiling", "x best peer", "launches/step", "host ms/step", "extra peak MiB",
)  # fmt: skip


def markdown_table(rows: list[Row]) -> str:
    """The results as a Markdown table; rows that did not run show their status instead."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        if not r.ok:
            cells = [r.optimizer, r.mode, r.impl, f"*{r.status}*"] + [""] * (len(COLUMNS) - 4)
        else:
            cells = [
                r.optimizer, r.mode, r.impl, _fmt(r.median_ms, 3), _fmt(r.p20_ms, 3),
                _fmt(r.p80_ms, 3), str(r.bytes_per_param), _fmt(r.gbps, 1), _fmt(r.pct_ceiling, 1),
                _fmt(r.vs_best_peer), _fmt(r.launches, 1), _fmt(r.host_ms, 3),
                _fmt(r.extra_peak_mib, 1),
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, info: RunInfo, rows: list[Row]) -> None:
    """One CSV row per result, each carrying the run's identity (device, versions, commit)."""
    meta = dataclasses.asdict(info)
    fields = list(meta) + [f.name for f in dataclasses.fields(Row)]
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **dataclasses.asdict(row)})


def write_plot(path: Path, info: RunInfo, rows: list[Row], title: str) -> None:
    """Horizontal bars of % of the bandwidth ceiling per (optimizer, mode, implementation)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shown = [r for r in rows if r.ok and r.pct_ceiling is not None]
    labels = [f"{r.optimizer} {r.mode} | {r.impl}" for r in shown]
    values = [r.pct_ceiling for r in shown]
    colors = ["tab:orange" if r.is_fusedopt else "tab:blue" for r in shown]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.26 * max(1, len(shown))))
    ax.barh(range(len(shown)), values, color=colors)
    legend = [Patch(color="tab:orange", label="fusedopt"), Patch(color="tab:blue", label="peers")]
    ax.legend(handles=legend, loc="lower right", fontsize=7)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(100, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"% of the bandwidth ceiling ({info.ceiling_gbps:.1f} GB/s, STREAM, same run)")
    ax.set_title(f"{title}\n{info.device_name}, torch {info.torch}, {info.date}", fontsize=9)
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.0f}", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
