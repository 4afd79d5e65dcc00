"""The timing core: step times, host time, copy bandwidth, launch counts and extra memory.

* **Step time.** GPU: a CUDA event pair around each step, read after one final synchronize,
  so back-to-back steps are timed as the GPU runs them (host gaps included when the host is
  the bottleneck). CPU: ``time.perf_counter`` around each step. Warm-up steps come first (they
  allocate optimizer state, build launch tables, compile), then the median and the 20th/80th
  percentiles over the timed repeats.
* **Host time.** GPU: wall time to *issue* a step, with no synchronize (what the Python side
  and the dispatcher cost). CPU: process CPU time per step (all threads together), since the
  host *is* the device there.
* **Copy bandwidth.** ``dst.copy_(src)`` over buffers far larger than the last-level cache,
  counted as bytes read plus bytes written. Measured in the same run as the steps, because
  absolute numbers hold for one machine only. On CPUs, stores to ``dst`` first read the line
  (write-allocate), so ``copy_`` moves ~1.5x what it is credited with; an in-place
  read-modify-write (``x.mul_(1)``) has no such overhead, which is why in-place optimizer steps
  may exceed 100% of copy bandwidth on a CPU. Both are measured; the copy is the headline.
* **Launches per step.** GPU: device activities (kernels, memcpys, memsets) recorded by
  ``torch.profiler``. CPU: top-level dispatcher op calls (``aten::*`` / ``fusedopt::*`` ops
  not nested inside another op), the CPU analogue of a launch.
* **Extra peak memory.** GPU: ``torch.cuda.max_memory_allocated()`` during one step minus the
  allocation before it. CPU: the peak of the running sum of the CPU allocations and frees that
  ``torch.profiler(profile_memory=True)`` records during one step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

Step = Callable[[], object]

_DEVICE_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` to finish its queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Per-step wall times and host times of the timed repeats, in seconds."""

    times: tuple[float, ...]
    host: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p20(self) -> float:
        return _percentile(list(self.times), 20)

    @property
    def p80(self) -> float:
        return _percentile(list(self.times), 80)

    @property
    def host_median(self) -> float:
        return statistics.median(self.host)


def time_steps(step: Step, device: torch.device, warmup: int, repeats: int) -> StepTimes:
    """Run ``step`` ``warmup`` times, then time ``repeats`` steps (module docstring)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        step()
    synchronize(device)
    host: list[float] = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            issued = time.perf_counter()
            step()
            host.append(time.perf_counter() - issued)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            step()
            times.append(time.perf_counter() - wall0)
            host.append(time.process_time() - cpu0)
    return StepTimes(tuple(times), tuple(host))


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Reference bandwidths of the device, GB/s (1e9 bytes/s), read + written bytes."""

    copy_gbps: float
    inplace_gbps: float
    nbytes: int  # size of one buffer


def _best_rate(fn: Step, device: torch.device, moved: int, repeats: int) -> float:
    times = time_steps(fn, device, warmup=1, repeats=repeats).times
    return moved / statistics.median(times) / 1e9


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> Bandwidth:
    """Measure ``dst.copy_(src)`` and in-place ``x.mul_(1)`` on fp32 buffers of ``nbytes``."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)  # zeros: pages are touched before timing
    copy = _best_rate(lambda: dst.copy_(src), device, 2 * n * 4, repeats)
    inplace = _best_rate(lambda: dst.mul_(1.0), device, 2 * n * 4, repeats)
    return Bandwidth(copy, inplace, n * 4)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop chatter on fd 2 (restored even on error)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _is_op(event) -> bool:
    return event.name.startswith(("aten::", "fusedopt::"))


def _top_level_ops(events) -> int:
    count = 0
    for event in events:
        if not _is_op(event) or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        parent = event.cpu_parent
        while parent is not None and not _is_op(parent):
            parent = parent.cpu_parent
        count += parent is None
    return count


def _cpu_peak_bytes(kineto_events) -> int:
    """Peak of the running allocation total from the profiler's [memory] events."""
    deltas = sorted(
        (e.start_ns(), e.nbytes())
        for e in kineto_events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one profiled step shows: launches (or op calls) and extra peak memory."""

    launches: float
    launches_what: str  # "gpu kernels+memcpy/memset" or "cpu top-level op calls"
    extra_peak_bytes: int | None


def profile_step(step: Step, device: torch.device, steps: int = 2) -> Profile:
    """Count launches (GPU) or top-level op calls (CPU) per step, and the extra peak memory.

    ``step`` must already be warm (state allocated, kernels compiled).
    """
    synchronize(device)
    if device.type == "cuda":
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with _quiet_stderr(), profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
        kineto = prof.profiler.kineto_results.events()
        launches = sum(
            1
            for e in kineto
            if e.device_type() == torch.autograd.DeviceType.CUDA
            and e.activity_type() in _DEVICE_ACTIVITIES
        )
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        return Profile(launches / steps, "gpu kernels+memcpy/memset", extra)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    ops = _top_level_ops(prof.events())
    peak = _cpu_peak_bytes(prof.profiler.kineto_results.events())
    return Profile(float(ops), "cpu top-level op calls", peak)
