"""The goals of issue 8, judged from the measured rows: met, missed, or not measured (and why).

These are benchmark results, never timed tests: a missed goal is reported, not failed.
"""

from __future__ import annotations

import dataclasses

from bench.output import Row, RunInfo


@dataclasses.dataclass
class Goal:
    """One goal: what it asks, what this run measured, and the verdict."""

    goal: str
    target: str
    measured: str
    verdict: str  # "met", "missed", or "not measured"


@dataclasses.dataclass
class ScalingRow:
    """Launches (or CPU op calls) per step of one implementation at one tensor count."""

    impl: str
    mode: str
    tensors: int
    launches: float | None
    status: str = "ok"


def _find(rows: list[Row], optimizer: str, mode: str, impl: str) -> Row | None:
    return next((r for r in rows if (r.optimizer, r.mode, r.impl) == (optimizer, mode, impl)), None)


def _unmeasured(row: Row | None, impl: str, backends: dict[str, str | None]) -> str | None:
    """Why ``row`` has no numbers (None when it has them)."""
    if row is None:
        reason = backends.get(impl.removeprefix("fusedopt "))
        return f"{impl}: {reason or 'not in this run'}"
    if not row.ok:
        return f"{impl}: {row.status}"
    return None


def _bandwidth_goal(rows, info, backends, model, backend, target) -> Goal:
    goal = f"fp32 AdamW, 1B mix, fusedopt {backend}, H200"
    want = f">= {target}% of the bandwidth ceiling"
    if info.device != "cuda" or model != "llama1b":
        return Goal(goal, want, "needs --device cuda --model llama1b", "not measured")
    row = _find(rows, "adamw", "fp32", f"fusedopt {backend}")
    missing = _unmeasured(row, f"fusedopt {backend}", backends)
    if missing:
        return Goal(goal, want, missing, "not measured")
    measured = f"{row.pct_ceiling:.1f}% ({row.gbps:.0f} of {info.ceiling_gbps:.0f} GB/s)"
    if "H200" not in info.device_name:
        measured += f" on {info.device_name}, not an H200"
    return Goal(goal, want, measured, "met" if row.pct_ceiling >= target else "missed")


def _speedup_goal(rows, info, backends, device_type, impls, mode, target, against, label):
    """fusedopt's best of ``impls`` vs the fastest peer (or ``against`` only) of adamw/mode."""
    goal = label
    want = f">= {target}x " + (against or "the fastest torch composition")
    if info.device != device_type:
        return Goal(goal, want, f"needs --device {device_type}", "not measured")
    found = [r for r in (_find(rows, "adamw", mode, i) for i in impls) if r and r.ok]
    if not found:
        reasons = "; ".join(
            _unmeasured(_find(rows, "adamw", mode, i), i, backends) or "" for i in impls
        )
        return Goal(goal, want, reasons, "not measured")
    best = min(found, key=lambda r: r.median_ms)
    if against:
        peer = _find(rows, "adamw", mode, against)
        missing = _unmeasured(peer, against, backends)
        if missing:
            return Goal(goal, want, missing, "not measured")
        ratio = peer.median_ms / best.median_ms
    else:
        if best.vs_best_peer is None:
            return Goal(goal, want, "no torch peer ran", "not measured")
        ratio = best.vs_best_peer
    measured = f"{ratio:.2f}x ({best.impl} {best.median_ms:.3f} ms)"
    return Goal(goal, want, measured, "met" if ratio >= target else "missed")


def _launch_goal(scaling: list[ScalingRow], device: str) -> Goal:
    goal = "constant launches per step, whatever the tensor count"
    if device == "cpu":
        goal += " (CPU: top-level op calls, the analogue)"
    want = "same count at few and many tensors (every kernel backend, fp32 and amp)"
    # The reference backend is the oracle, a Python loop inside one op: not a kernel backend.
    fused = [s for s in scaling if s.impl.startswith("fusedopt") and "reference" not in s.impl]
    if not fused:
        return Goal(goal, want, "no fusedopt backend ran", "not measured")
    parts, constant = [], True
    for impl in dict.fromkeys(s.impl for s in fused):
        for mode in dict.fromkeys(s.mode for s in fused):
            counts = [s for s in fused if (s.impl, s.mode) == (impl, mode)]
            if any(s.launches is None for s in counts):
                return Goal(goal, want, f"{impl} {mode}: {counts[0].status}", "not measured")
            text = " -> ".join(f"{s.launches:g}@{s.tensors}" for s in counts)
            parts.append(f"{impl} {mode}: {text}")
            constant &= len({s.launches for s in counts}) == 1
    return Goal(goal, want, "; ".join(parts), "met" if constant else "missed")


def evaluate(
    rows: list[Row],
    info: RunInfo,
    model: str,
    scaling: list[ScalingRow],
    backends: dict[str, str | None],
) -> list[Goal]:
    """Every goal of issue 8, judged on this run (``backends``: why a backend did not run)."""
    return [
        _bandwidth_goal(rows, info, backends, model, "cuda", 90),
        _bandwidth_goal(rows, info, backends, model, "triton", 85),
        _speedup_goal(
            rows, info, backends, "cuda", ("fusedopt cuda", "fusedopt triton"), "amp", 1.5, None,
            "bf16 + fp32 master + loss scale + clip, end to end (GPU)",
        ),
        _launch_goal(scaling, info.device),
        _speedup_goal(
            rows, info, backends, "cpu", ("fusedopt cpu",), "fp32", 1.0, "torch fused",
            "CPU fp32 AdamW vs torch.optim.AdamW(fused=True)",
        ),
        _speedup_goal(
            rows, info, backends, "cpu", ("fusedopt cpu",), "amp", 2.0, None,
            "CPU bf16 + fp32 master + clip vs torch's composition",
        ),
    ]  # fmt: skip


def markdown(goals: list[Goal]) -> str:
    """The goals as a Markdown table."""
    lines = ["| goal | target | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {g.goal} | {g.target} | {g.measured} | **{g.verdict}** |" for g in goals]
    return "\n".join(lines)
