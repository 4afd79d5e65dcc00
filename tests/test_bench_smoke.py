"""The benchmark machinery runs end to end (not a timed test: no number is judged here).

``python -m bench.report`` on tiny shapes with the reference backend must produce a Markdown
table, CSV rows carrying the run's identity, and a PNG; the byte table and the model shape
lists must say what their docstrings say.
"""

from __future__ import annotations

import csv

import pytest
import torch

from bench import report, timing
from bench.cases import make_workload
from bench.fused import make_fused
from bench.peers import make_peer, peer_labels
from bench.shapes import model_shapes, numel
from bench.timing import STREAM_KERNELS, Ceiling, _percentile, profile_step, time_steps
from bench.traffic import bytes_per_param


@pytest.mark.parametrize(
    ("op", "mode", "expected"),
    [
        ("adamw_", "fp32", 28),  # read p g m v, write p m v
        # grad_norm g(2) + g(2) M m v + M m v (4 each) + bf16 p read (master sync) and written
        ("adamw_", "amp", 32),
        ("lamb_", "fp32", 44),  # clip g; p g m v -> m v; p m v -> p
        ("lamb_", "amp", 46),  # both passes that read the master read the bf16 p too
        ("lion_", "fp32", 20),
        ("lion_", "amp", 24),
        ("sgd_", "fp32", 20),
        ("sgd_", "amp", 24),
        ("schedulefree_adamw_", "fp32", 28),  # read y g z v, write y z v: AdamW's traffic
        ("schedulefree_adamw_", "amp", 32),
        ("adafactor_", "fp32", 24),  # p g (norms, factors); g (u²); p g -> p
        ("adafactor_", "amp", 26),  # clip g; M p g; g; M p g -> M p (bf16 g and p: 2 B)
    ],
)
def test_byte_table(op, mode, expected):
    assert bytes_per_param(op, mode) == expected


@pytest.mark.parametrize(
    ("op", "param_bytes", "state_bytes", "master", "expected"),
    [
        # the kernel headers' own counts (csrc/cuda/*.cu): bf16 everything without masters
        ("adamw_", 2, 2, False, 14),
        ("lion_", 2, 2, False, 10),
        ("adan_", 4, 4, False, 44),
        ("adan_", 2, 2, False, 22),
        ("schedulefree_adamw_", 4, 4, False, 28),
        ("schedulefree_adamw_", 2, 2, False, 14),
        # with a master: the master stands in for p, the bf16 p is read beside it and written
        ("adamw_", 2, 4, True, 30),
        ("sgd_", 2, 4, True, 22),
    ],
)
def test_byte_table_by_storage_size(op, param_bytes, state_bytes, master, expected):
    from bench.traffic import step_bytes_per_param

    got = step_bytes_per_param(op, param_bytes=param_bytes, state_bytes=state_bytes, master=master)
    assert got == expected


@pytest.mark.parametrize(("op", "expected"), [("adamw_", 28), ("lamb_", 40), ("lion_", 20),
                                              ("sgd_", 20)])  # fmt: skip
def test_byte_table_compact_master(op, expected):
    """Compact masters ([note: compact master]): the 2-byte remainder is read and written
    where the fp32 master is (amp: bf16 params, fp32 states, loss scale and clip)."""
    from bench.traffic import step_bytes_per_param

    got = step_bytes_per_param(op, param_bytes=2, state_bytes=4, master=True, clipped=True,
                               master_bytes=2)  # fmt: skip
    assert got == expected


def test_model_shapes_match_their_stated_sizes():
    gpt2, llama = model_shapes("gpt2"), model_shapes("llama1b")
    assert (len(gpt2), numel(gpt2)) == (148, 124_439_808)
    assert (len(llama), numel(llama)) == (147, 953_223_168)
    assert dict(gpt2)["wte"] == (50257, 768)
    assert dict(llama)["lm_head.weight"] == (32000, 2048)


def test_percentiles_interpolate():
    assert _percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert _percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    assert _percentile([7.0], 80) == 7.0


def test_timing_core_on_cpu():
    x = torch.zeros(1000)
    timed = time_steps(lambda: x.add_(1.0), torch.device("cpu"), warmup=2, repeats=3)
    assert len(timed.times) == 3 and x[0].item() == 5.0
    assert timed.p20 <= timed.median <= timed.p80
    prof = profile_step(lambda: x.add_(1.0).clone(), torch.device("cpu"))
    assert prof.launches == 2.0  # add_ and clone: two top-level op calls
    assert prof.extra_peak_bytes >= 4000  # the clone's 1000 floats
    ceiling = timing.stream_ceiling(torch.device("cpu"), 1 << 20, repeats=2)
    assert ceiling.gbps == max(ceiling.kernels.values()) > 0
    assert set(ceiling.kernels) == set(ceiling.stream_count) == set(STREAM_KERNELS)


def test_stream_ceiling_counts_bus_bytes(monkeypatch):
    """Each kernel's rate is its bus bytes over its fastest repeat: on a CPU a written array
    counts twice (write-allocate), in STREAM's own count once; the ceiling is the best."""
    # Fake timings: repeat r of kernel k takes SECONDS[k] * (1 + r) (the first call warms up).
    seconds = {"copy": 4.0, "scale": 2.0, "add": 3.0, "triad": 5.0}
    calls: list[str] = []

    def fake_time_steps(step, device, warmup, repeats):
        name = list(seconds)[len(calls) % 4]
        calls.append(name)
        nth = calls.count(name) - 1  # 0: the warm-up round
        return timing.StepTimes((seconds[name] * (1 + abs(nth - 1)),), (0.0,))

    monkeypatch.setattr(timing, "time_steps", fake_time_steps)
    n = 1000
    ceiling = timing.stream_ceiling(torch.device("cpu"), 4 * n, repeats=3)
    assert len(calls) == 4 * (3 + 1)
    bus = {"copy": 12, "scale": 12, "add": 16, "triad": 16}  # read, + written twice
    stream = {"copy": 8, "scale": 8, "add": 12, "triad": 12}  # read + written once
    for k in seconds:  # the best repeat is the second round, at seconds[k]
        assert ceiling.kernels[k] == pytest.approx(bus[k] * n / seconds[k] / 1e9)
        assert ceiling.stream_count[k] == pytest.approx(stream[k] * n / seconds[k] / 1e9)
    assert (ceiling.kernel, ceiling.write_allocate) == ("scale", True)
    assert ceiling.gbps == pytest.approx(12 * n / 2.0 / 1e9)
    assert "scale" in ceiling.describe() and "write-allocate" in ceiling.describe()
    # A second measurement: each kernel keeps its best, and the ceiling is the best of those.
    later = Ceiling(
        gbps=99.0, kernel="triad", kernels={"copy": 0.0, "scale": 0.0, "add": 0.0, "triad": 99.0},
        stream_count=dict.fromkeys(seconds, 0.0), write_allocate=True, nbytes=4 * n, threads=1,
        rounds=3,
    )  # fmt: skip
    both = ceiling.merged(later)
    assert (both.gbps, both.kernel, both.rounds) == (99.0, "triad", 6)
    assert both.kernels["scale"] == ceiling.kernels["scale"]


def test_report_percentages_are_of_the_stream_ceiling(tmp_path, monkeypatch):
    """Every row's % ceiling is its GB/s over the ceiling the run measured (a fixed fake one
    here, so that a percentage taken of anything else shows), grad_norm rows included."""
    fake = Ceiling(
        gbps=40.0, kernel="add", kernels={"copy": 30.0, "scale": 31.0, "add": 40.0, "triad": 39.0},
        stream_count={"copy": 20.0, "scale": 20.7, "add": 30.0, "triad": 29.3},
        write_allocate=True, nbytes=1 << 20, threads=1,
    )  # fmt: skip
    monkeypatch.setattr(report, "stream_ceiling", lambda device, nbytes: fake)
    argv = ["--device", "cpu", "--model", "tiny", "--optimizers", "adamw", "--warmup", "1",
            "--repeats", "2", "--quick", "--threads", "1", "--backends", "reference,cpu",
            "--out", str(tmp_path)]  # fmt: skip
    assert report.main(argv) == 0
    (csv_path,) = tmp_path.glob("cpu-tiny-*.csv")
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    assert {r["optimizer"] for r in rows} == {"adamw", "grad_norm"}
    norm_impls = {r["impl"] for r in rows if r["optimizer"] == "grad_norm"}
    assert {"fusedopt cpu", "torch get_total_norm"} <= norm_impls
    for r in rows:
        assert float(r["ceiling_gbps"]) == 40.0 and r["ceiling_kernel"] == "add"
        assert float(r["pct_ceiling"]) == pytest.approx(100 * float(r["gbps"]) / 40.0)
    assert fake.describe() in csv_path.with_suffix(".md").read_text()


def test_report_runs_end_to_end(tmp_path, capsys):
    argv = ["--device", "cpu", "--model", "tiny", "--optimizers", "adamw,lamb,sgd",
            "--warmup", "1", "--repeats", "2", "--quick", "--threads", "1", "--all-peers",
            "--backends", "reference,cpu",
            "--out", str(tmp_path)]  # fmt: skip
    assert report.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| optimizer | mode | implementation |" in stdout
    (csv_path,) = tmp_path.glob("cpu-tiny-*.csv")
    assert csv_path.with_suffix(".md").read_text() in stdout + "\n"
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {"device_name", "torch", "triton", "date", "commit", "ceiling_gbps"} <= set(rows[0])
    by_impl = {(r["optimizer"], r["mode"], r["impl"]): r for r in rows}
    for optimizer in ("adamw", "lamb", "sgd"):
        for mode in ("fp32", "amp"):
            ref = by_impl[(optimizer, mode, "fusedopt reference")]
            assert ref["status"] == "ok", ref["status"]
            assert float(ref["median_ms"]) > 0 and float(ref["pct_ceiling"]) > 0
    for key in [("adamw", "fp32", "torch fused"), ("adamw", "amp", "torch fused"),
                ("sgd", "fp32", "torch for-loop")]:  # fmt: skip
        assert by_impl[key]["status"] == "ok", by_impl[key]["status"]
    assert by_impl[("adamw", "fp32", "torch compiled")]["status"].startswith("skipped")
    assert not [r for r in rows if r["status"].startswith("error")]


@pytest.mark.parametrize("mode", ["fp32", "amp"])
@pytest.mark.parametrize(
    ("optimizer", "peer"),
    [("adamw", "torch fused"), ("adam", "torch fused"), ("sgd", "torch fused"),
     ("schedulefree_adamw", "schedulefree AdamWScheduleFree"),
     ("adafactor", "torch foreach")],  # torch has no fused Adafactor
)  # fmt: skip
def test_fusedopt_and_torch_rows_compute_the_same_step(optimizer, peer, mode):
    """The report compares like with like: the same hyperparameters, and in amp the same
    unscale + clip + master-weight update (SGD is not scale-invariant, so a wrong loss scale
    or clip coefficient shows)."""
    device = torch.device("cpu")
    ours = make_workload("tiny", optimizer, mode, device)
    theirs = make_workload("tiny", optimizer, mode, device)
    for workload in (ours, theirs):  # norm ~6.5 > max_grad_norm = 1: the clip is active
        torch._foreach_mul_(workload.grads, 100.0)
    if peer not in peer_labels(optimizer):
        pytest.skip(f"{peer} is not a peer here")
    ours_step, theirs_step = make_fused(ours, "reference"), make_peer(theirs, peer)
    # AdamWScheduleFree divides the grads it is given in place (the peer keeps its own copy,
    # bench/peers.py): its second step would see other grads, so one step is compared.
    for _ in range(1 if optimizer == "schedulefree_adamw" else 2):
        ours_step()
        theirs_step()
    # fp32: one fp32 computation in two operation orders; amp: the same, then one bf16 rounding.
    tol = dict(rtol=1e-5, atol=1e-6) if mode == "fp32" else dict(rtol=2**-8, atol=1e-6)
    for got, want in zip(ours.params, theirs.params, strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), **tol)


def test_lm_quality_runs_and_every_curve_learns(tmp_path):
    """bench.lm_quality on a tiny model: CSV columns, a Markdown row per curve, a PNG, and
    every curve's held-out loss falls from its step-0 value (ln 256 ~ 5.55 for a uniform
    guess) by a real amount in a dozen steps (peak lrs x5: the model is tiny)."""
    from bench import lm_quality
    from bench.modes import MEMORY_MODES

    argv = ["--steps", "12", "--width", "32", "--context", "16", "--batch", "8",
            "--eval-every", "4", "--eval-windows", "8", "--optimizers", "adamw,lion",
            "--lr-scale", "5",
            "--no-seed-spread", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert lm_quality.main(argv) == 0
    (csv_path,) = tmp_path.glob("lm-quality-*.csv")
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {"step", "optimizer", "mode", "impl", "train_loss", "eval_loss"} <= set(rows[0])
    assert {"device_name", "torch", "date", "commit", "backend"} <= set(rows[0])
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        curves.setdefault((r["impl"], r["optimizer"], r["mode"]), []).append(r)
    expected = {
        ("fusedopt", o, m)
        for o, op in (("adamw", "adamw_"), ("lion", "lion_"))
        for m, mode in MEMORY_MODES.items()
        if mode.applies(op)
    }
    assert set(curves) == expected | {("torch", "adamw", "fp32")}
    for key, curve in curves.items():
        evals = [float(r["eval_loss"]) for r in curve if r["eval_loss"]]
        assert [int(r["step"]) for r in curve] == list(range(13)), key
        assert len(evals) == 4, key  # steps 0, 4, 8, 12
        assert evals[-1] < evals[0] - 0.1, (key, evals)
    md = csv_path.with_suffix(".md").read_text()
    adamw_modes = sum(mode.applies("adamw_") for mode in MEMORY_MODES.values())
    assert md.count("| adamw |") == 1 + adamw_modes and "(reference)" in md


def test_memory_table_measures_each_mode_as_designed(tmp_path):
    """bench.memory on tiny shapes: every fusedopt optimizer x memory mode holds exactly its
    design's bytes per element (states in the mode's dtype, + 4 B with a master, 2 B with a
    compact one), torch's
    AdamW holds what fusedopt's does in the same mode, and the outputs are written."""
    from bench import memory
    from bench.modes import MEMORY_MODES

    assert memory.main(["--device", "cpu", "--model", "tiny", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("memory-cpu-tiny-*.csv")
    with open(csv_path) as f:
        rows = {(r["impl"], r["optimizer"], r["mode"]): r for r in csv.DictReader(f)}
    assert {"device_name", "torch", "triton", "date", "commit"} <= set(next(iter(rows.values())))
    for name in memory.OPTIMIZERS:
        for mode in MEMORY_MODES:
            if not MEMORY_MODES[mode].applies(memory.OPTIMIZERS[name][1]):
                assert ("fusedopt", name, mode) not in rows
                continue
            row = rows[("fusedopt", name, mode)]
            assert float(row["element_bytes"]) == float(row["expected_bytes"]), row
            assert int(row["traffic_bytes"]) > 0
    # AdamW: fp32 2 states x 4 B; bf16 + master: 4 B master + 2 x 4; bf16: 2 x 2 B.
    adamw = {m: float(rows[("fusedopt", "adamw", m)]["element_bytes"]) for m in MEMORY_MODES}
    assert adamw["bf16+master+8-bit states"] == 6.0  # 4 B master + 2 x 1 B codes (+ scales)
    # every op whose spec has 8-bit states has the mode (applicability from the spec): 4 B
    # master + 1 B codes per state
    eight_bit = {n: float(r["element_bytes"]) for (i, n, m), r in rows.items()
                 if i == "fusedopt" and m == "bf16+master+8-bit states"}  # fmt: skip
    assert eight_bit == {"adamw": 6.0, "adam": 6.0, "lamb": 6.0, "lion": 5.0, "sgd": 5.0}
    assert (adamw["fp32"], adamw["bf16+master"], adamw["bf16"]) == (8.0, 12.0, 4.0)
    assert adamw["bf16+compact master"] == 10.0  # 2 x 4 B states + the 2 B remainder
    assert adamw["bf16+kahan"] == 10.0  # 2 x 4 B states + the 2 B bf16 compensation
    for mode in ("fp32", "bf16"):
        torch_row, ours = rows[("torch", "adamw", mode)], rows[("fusedopt", "adamw", mode)]
        assert torch_row["element_bytes"] == ours["element_bytes"]
    md = csv_path.with_suffix(".md").read_text()
    assert "torchao AdamW8bit" in md and "bitsandbytes" in md
