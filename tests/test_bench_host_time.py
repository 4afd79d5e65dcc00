"""``python -m bench.host_time`` runs end to end and its split of a step adds up (not a timed
test: no number is judged against a goal here)."""

from __future__ import annotations

import sys

import pytest

import fusedopt
from bench import host_time


def test_host_time_rows_split_the_step(monkeypatch, capsys, tmp_path):
    if not fusedopt.backends()["cpu"].usable:
        pytest.skip("the cpu backend (fusedopt._C) is not built")
    argv = ["host_time", "--tensors", "3", "--repeats", "2", "--warmup", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    host_time.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["fp32", "amp"]
    for row in rows:
        step, per_tensor, plan, op_calls, cpu, theirs, theirs_per_tensor, theirs_cpu = map(
            float, row.split("|")[3:11]
        )
        # Each part is the fastest of its own timings, so it cannot exceed the fastest step
        # by more than the timer's jitter; both parts happen inside every step.
        assert 0 < plan < step and 0 < op_calls < step and theirs > 0
        assert per_tensor == pytest.approx(step / 3, abs=0.2)  # us/step is printed rounded
        # The least CPU time of a step is at most the CPU time, so the wall time, of the
        # fastest step, give or take the clocks' reads (thread_time is a system call, ~0.5
        # us or more, read after perf_counter at both ends): 3 us per step, of 3 tensors.
        assert 0 < cpu <= per_tensor + 1 and 0 < theirs_cpu <= theirs_per_tensor + 1
    (written,) = tmp_path.glob("host-time-cpu-*.md")
    assert [line for line in written.read_text().splitlines() if line.startswith("| 3 |")] == rows
