"""``python -m bench.host_time`` runs end to end and its split of a step adds up (not a timed
test: no number is judged against a goal here)."""

from __future__ import annotations

import sys

import pytest

import fusedopt
from bench import host_time


def test_host_time_rows_split_the_step(monkeypatch, capsys):
    if not fusedopt.backends()["cpu"].usable:
        pytest.skip("the cpu backend (fusedopt._C) is not built")
    argv = ["host_time", "--tensors", "3", "--repeats", "2", "--warmup", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    host_time.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["fp32", "amp"]
    for row in rows:
        step, per_tensor, plan, op_calls, theirs, _ = map(float, row.split("|")[3:9])
        # Each part is the fastest of its own timings, so it cannot exceed the fastest step
        # by more than the timer's jitter; both parts happen inside every step.
        assert 0 < plan < step and 0 < op_calls < step and theirs > 0
        assert per_tensor == pytest.approx(step / 3, abs=0.2)  # us/step is printed rounded
