"""The timing core: step times, host time, the bandwidth ceiling, launch counts, extra memory.

* **Step time.** GPU: a CUDA event pair around each step, read after one final synchronize,
  so back-to-back steps are timed as the GPU runs them (host gaps included when the host is
  the bottleneck). CPU: ``time.perf_counter`` around each step. Warm-up steps come first (they
  allocate optimizer state, build launch tables, compile), then the median and the 20th/80th
  percentiles over the timed repeats.
* **Host time.** GPU: wall time to *issue* a step, with no synchronize (what the Python side
  and the dispatcher cost). CPU: process CPU time per step (all threads together), since the
  host *is* the device there.
* **Bandwidth ceiling.** Measured as STREAM does (McCalpin's four kernels, best rate of each
  over the repeats, the ceiling is the best of the four): ``copy`` c = a, ``scale`` b = s*c,
  ``add`` c = a + b, ``triad`` a = b + s*c, as torch ops on fp32 arrays far larger than the
  last-level cache (each >= 4x it), on the threads the steps use. The bytes are what crosses
  the memory bus: each array read, and each array written, counted once; on a CPU a store to
  a line that is not in the cache first reads that line (write-allocate: torch's stores are
  ordinary, not streaming), so a written array counts twice there, where STREAM itself counts
  it once (its own count is kept beside it, to compare with published STREAM results). A GPU
  writes whole sectors without reading them: written arrays count once there. A step's bytes
  are its compulsory bytes (``bench/traffic.py``); an in-place pass writes only lines it has
  just read, so it causes no write-allocate and its compulsory bytes are the bytes it moves:
  both sides of ``% ceiling`` count bus traffic, and a step above 100% would move bytes
  faster than the best STREAM kernel (a read-only pass may: STREAM has no pure-read kernel).
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
from pathlib import Path

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
class StreamKernel:
    """One STREAM kernel: how many fp32 arrays it reads and writes per element."""

    reads: int
    writes: int  # arrays written and not read by the kernel: write-allocated on a CPU

    def bytes_per_element(self, write_allocate: bool) -> int:
        """Bus bytes per element: each read array once, each written one once (twice with
        write-allocate: the line is read before it is written)."""
        return 4 * (self.reads + self.writes * (2 if write_allocate else 1))


#: STREAM's kernels (c = a; b = s*c; c = a + b; a = b + s*c), in the order it runs them.
STREAM_KERNELS = {
    "copy": StreamKernel(1, 1),
    "scale": StreamKernel(1, 1),
    "add": StreamKernel(2, 1),
    "triad": StreamKernel(2, 1),
}


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """The device's memory-bandwidth ceiling, GB/s (1e9 bytes/s) of bus traffic (module
    docstring): the best of the STREAM kernels, each at its best repeat."""

    gbps: float  # the ceiling: the best of ``kernels``
    kernel: str  # which kernel reached it
    kernels: dict[str, float]  # each kernel's best rate, bus bytes
    stream_count: dict[str, float]  # the same times with STREAM's own byte count
    write_allocate: bool  # whether written arrays count twice (CPU)
    nbytes: int  # size of one array
    threads: int  # torch CPU threads during the measurement
    rounds: int = 0  # timed rounds of the four kernels behind each best rate

    def merged(self, other: Ceiling) -> Ceiling:
        """Each kernel's best of two measurements (e.g. at the start and the end of a run, so
        that a busy moment during one does not lower the ceiling)."""
        rates = {k: max(v, other.kernels[k]) for k, v in self.kernels.items()}
        stream = {k: max(v, other.stream_count[k]) for k, v in self.stream_count.items()}
        kernel = max(rates, key=rates.__getitem__)
        return dataclasses.replace(
            self, gbps=rates[kernel], kernel=kernel, kernels=rates, stream_count=stream,
            rounds=self.rounds + other.rounds,
        )  # fmt: skip

    def describe(self) -> str:
        """One line for a report: the ceiling and how it was measured."""
        each = ", ".join(f"{k} {v:.1f}" for k, v in self.kernels.items())
        stream = ", ".join(f"{k} {v:.1f}" for k, v in self.stream_count.items())
        counted = (
            "a written array counted twice (write-allocate: its lines are read before they are "
            "written)"
            if self.write_allocate
            else "each array counted once"
        )
        return (
            f"{self.gbps:.1f} GB/s, the best of STREAM's kernels (GB/s: {each}; each its best "
            f"of {self.rounds} rounds) on fp32 arrays of {self.nbytes / 2**20:.0f} MiB, "
            f"{self.threads} threads, {counted}; STREAM's own count: {stream}"
        )


def last_level_cache_bytes() -> int | None:
    """The CPU's last-level cache size (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if size[-1:] in units and size[:-1].isdigit():
            sizes.append(int(size[:-1]) * units[size[-1]])
        elif size.isdigit():
            sizes.append(int(size))
    return max(sizes) if sizes else None


def ceiling_array_bytes(device: torch.device, quick: bool) -> int:
    """Size of one STREAM array: at least 4x the last-level cache (STREAM's rule), 128 MiB
    (256 without ``quick``) at the least on a CPU; 256 MiB (1 GiB) on a GPU (H200: 60 MB L2)."""
    if device.type == "cuda":
        return (256 if quick else 1024) * 2**20
    floor = (128 if quick else 256) * 2**20
    return max(floor, 4 * (last_level_cache_bytes() or 0))


def stream_ceiling(device: torch.device, nbytes: int, repeats: int = 10) -> Ceiling:
    """Measure the ceiling (module docstring) with arrays of ``nbytes`` each.

    Like STREAM, each repeat runs the four kernels in turn (so that a busy machine slows them
    alike) and each kernel keeps its fastest repeat; one warm-up round comes first.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    n = nbytes // 4
    # Filled, so every page is touched before timing (STREAM's initial values).
    a = torch.full((n,), 1.0, device=device)
    b = torch.full((n,), 2.0, device=device)
    c = torch.zeros(n, device=device)
    s = 3.0
    kernels: dict[str, Step] = {
        "copy": lambda: c.copy_(a),
        "scale": lambda: torch.mul(c, s, out=b),
        "add": lambda: torch.add(a, b, out=c),
        "triad": lambda: torch.add(b, c, alpha=s, out=a),
    }
    best = dict.fromkeys(kernels, float("inf"))
    for round_ in range(repeats + 1):
        for name, kernel in kernels.items():
            seconds = time_steps(kernel, device, warmup=0, repeats=1).times[0]
            if round_:  # the first round warms up
                best[name] = min(best[name], seconds)
    write_allocate = device.type == "cpu"
    rates = {
        k: STREAM_KERNELS[k].bytes_per_element(write_allocate) * n / t / 1e9
        for k, t in best.items()
    }
    stream = {k: STREAM_KERNELS[k].bytes_per_element(False) * n / t / 1e9 for k, t in best.items()}
    kernel = max(rates, key=rates.__getitem__)
    return Ceiling(
        rates[kernel], kernel, rates, stream, write_allocate, n * 4, torch.get_num_threads(),
        repeats,
    )  # fmt: skip


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
