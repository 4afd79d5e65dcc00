"""The benchmark machinery runs end to end (not a timed test: no number is judged here).

``python -m bench.report`` on tiny shapes with the reference backend must produce a Markdown
table, CSV rows carrying the run's identity, and a PNG; the byte table and the model shape
lists must say what their docstrings say.
"""

from __future__ import annotations

import csv
import math

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
    """bench.lm_quality on a tiny model, two curves at a time (the --jobs path): CSV columns,
    a Markdown row per curve, a PNG, and every curve's held-out loss falls from its step-0
    value (ln 256 ~ 5.55 for a uniform guess) by a real amount in a dozen steps (peak lrs
    x5: the model is tiny). SGD brings a torch anchor; every mode that applies runs."""
    from bench import lm_quality
    from bench.modes import MEMORY_MODES

    optimizers = ("adamw", "sgd")
    argv = ["--steps", "12", "--width", "32", "--context", "16", "--batch", "8",
            "--eval-every", "4", "--eval-windows", "8", "--optimizers", ",".join(optimizers),
            "--lr-scale", "5", "--jobs", "2",
            "--no-seed-spread", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert lm_quality.main(argv) == 0
    (csv_path,) = tmp_path.glob("lm-quality-*.csv")
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {"step", "optimizer", "mode", "impl", "train_loss", "eval_loss"} <= set(rows[0])
    assert {"device_name", "torch", "date", "commit", "backend", "jobs"} <= set(rows[0])
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        curves.setdefault((r["impl"], r["optimizer"], r["mode"]), []).append(r)
    expected = {
        ("fusedopt", o, m)
        for o in optimizers
        for m, mode in MEMORY_MODES.items()
        if mode.applies(lm_quality.CLASSES[o])
    }
    assert ("fusedopt", "sgd", "bf16+SR") in expected
    assert ("fusedopt", "sgd", "bf16+master+8-bit states") in expected  # an 8-bit momentum
    assert set(curves) == expected | {("torch", o, "fp32") for o in optimizers}
    for key, curve in curves.items():
        evals = [float(r["eval_loss"]) for r in curve if r["eval_loss"]]
        assert [int(r["step"]) for r in curve] == list(range(13)), key
        assert len(evals) == 4, key  # steps 0, 4, 8, 12
        assert evals[-1] < evals[0] - 0.1, (key, evals)
    md = csv_path.with_suffix(".md").read_text()
    adamw_modes = sum(mode.applies(lm_quality.CLASSES["adamw"]) for mode in MEMORY_MODES.values())
    assert md.count("| adamw |") == 1 + adamw_modes and "(reference)" in md
    assert "PARTIAL" not in md


def test_lm_quality_paired_seeds(tmp_path):
    """--seeds 2: the judged modes and their reference are trained again with the next seed
    (the CSV holds both seeds' rows), the table gives each judged mode's paired mean +- 2 SE
    over 2 seeds and its verdict; a mode that is not judged is trained once. The verdict:
    [note: paired seeds]."""
    from bench import lm_quality

    argv = ["--steps", "6", "--width", "32", "--context", "16", "--batch", "8",
            "--eval-every", "3", "--eval-windows", "8", "--optimizers", "sgd", "--modes",
            "bf16+master,bf16,fp32", "--seeds", "2", "--out", str(tmp_path)]  # fmt: skip
    assert lm_quality.main(argv) == 0
    (csv_path,) = tmp_path.glob("lm-quality-*.csv")
    with open(csv_path) as f:
        seeds: dict[tuple, set] = {}
        for r in csv.DictReader(f):
            seeds.setdefault((r["impl"], r["mode"]), set()).add(r["seed"])
    assert seeds == {("fusedopt", "bf16+master"): {"0", "1"}, ("fusedopt", "bf16"): {"0", "1"},
                     ("fusedopt", "fp32"): {"0"}, ("torch", "fp32"): {"0"}}  # fmt: skip
    (line,) = [x for x in csv_path.with_suffix(".md").read_text().splitlines()
               if x.startswith("| sgd | fusedopt | bf16 |")]  # fmt: skip
    assert line.split(" | ")[7].endswith("(2)")  # the paired column: mean +- 2 SE (n)
    # the verdict: mean within, conclusive when mean +- 2 SE is on one side of the margin
    m = lm_quality.MARGIN_NATS
    assert lm_quality.paired_verdict([0.0, 0.002, 0.001])[2:] == (True, True)
    assert lm_quality.paired_verdict([m + 0.1, m + 0.11, m + 0.12])[2:] == (False, True)
    assert lm_quality.paired_verdict([-0.1, m, 0.1])[2:] == (True, False)


def test_lm_quality_lr_sweep_and_divergence(tmp_path):
    """The lr sanity sweep writes one row per peak lr, and a curve whose loss stops being
    finite ends there, as NaN, instead of failing the run (SGD at lr 1e4 diverges)."""
    from bench import lm_quality

    argv = ["--lr-sweep", "--steps", "4", "--width", "32", "--context", "16", "--batch", "8",
            "--eval-windows", "8", "--optimizers", "sgd", "--out", str(tmp_path)]  # fmt: skip
    assert lm_quality.main(argv) == 0
    (md,) = tmp_path.glob("lm-lr-sweep-*.md")
    assert md.read_text().count("| sgd |") == len(lm_quality.LR_SWEEP["sgd"])
    cfg = lm_quality.Config(steps=4, width=32, context=16, batch=8, eval_windows=8, warmup=1)
    rows, _ = lm_quality.train_job((lm_quality.Run("sgd", "fp32", "fusedopt"), cfg, 1e4))
    assert math.isnan(rows[-1]["eval_loss"]) and len(rows) <= cfg.steps + 1


def test_mode_applicability_comes_from_the_op_spec():
    """[note: mode applicability]: a mode applies where the class takes its arguments, and
    8-bit states only where the op's spec declares quantized states; the 8-bit bytes and
    traffic count the states the spec quantizes."""
    import fusedopt
    from bench.modes import MEMORY_MODES, quantized_roles

    eight = MEMORY_MODES["bf16+master+8-bit states"]
    assert eight.applies(fusedopt.AdamW) and eight.applies(fusedopt.Adam)

    class AdanWithBits(fusedopt.Adan):  # takes state_bits, but adan_ declares no 8-bit state
        def __init__(self, params, state_bits=None, **kwargs):
            super().__init__(params, **kwargs)

    assert not eight.applies(AdanWithBits) and MEMORY_MODES["bf16"].applies(AdanWithBits)
    assert not MEMORY_MODES["bf16+SR"].applies(torch.optim.AdamW)  # no stochastic_rounding
    assert quantized_roles("adamw_") == ("m", "v") and quantized_roles("adan_") == ()
    assert eight.expected_state_bytes("adamw_") == 6  # 4 B master + 2 x 1 B codes
    assert eight.traffic("adamw_") == 18  # g 2 + M 4 + p 2 + m v 1+1, written M m v p
    sr = MEMORY_MODES["bf16+SR"]
    assert sr.kwargs["stochastic_rounding"] is True and sr.expected_state_bytes("adamw_") == 4
    # [note: state dtype]: the bf16-state modes apply where the class takes state_dtype
    sd32, sd_master = MEMORY_MODES["fp32+bf16 states"], MEMORY_MODES["bf16+master+bf16 states"]
    assert sd32.applies(fusedopt.AdamW) and not sd32.applies(torch.optim.AdamW)
    assert sd32.expected_state_bytes("adamw_") == 4  # 2 x 2 B; the fp32 param is the model's
    assert sd_master.expected_state_bytes("adamw_") == 8  # 4 B master + 2 x 2 B
    assert sd_master.traffic("adamw_") == 22  # read g p 2+2 M 4 m v 2+2, written M m v p


def test_memory_table_measures_each_mode_as_designed(tmp_path):
    """bench.memory on tiny shapes: every fusedopt optimizer x memory mode that applies holds
    exactly its design's bytes per element (states in the mode's dtype, 1 B where 8-bit,
    + 4 B with a master, 2 B with a compact or Kahan one), torch's AdamW holds what
    fusedopt's does in the same mode, every row is timed against the ceiling, the peers
    that are installed are measured, bitsandbytes computed, and the outputs are written."""
    from bench import memory
    from bench.modes import MEMORY_MODES

    argv = ["--device", "cpu", "--model", "tiny", "--repeats", "1", "--quick-ceiling",
            "--out", str(tmp_path)]  # fmt: skip
    assert memory.main(argv) == 0
    (csv_path,) = tmp_path.glob("memory-cpu-tiny-*.csv")
    with open(csv_path) as f:
        rows = {(r["impl"], r["optimizer"], r["mode"]): r for r in csv.DictReader(f)}
    assert {"device_name", "torch", "triton", "date", "commit"} <= set(next(iter(rows.values())))
    assert float(next(iter(rows.values()))["ceiling_gbps"]) > 0
    for name, (cls, _, _) in memory.OPTIMIZERS.items():
        for mode in MEMORY_MODES:
            if not MEMORY_MODES[mode].applies(cls):
                assert ("fusedopt", name, mode) not in rows
                continue
            row = rows[("fusedopt", name, mode)]
            assert float(row["element_bytes"]) == float(row["expected_bytes"]), row
            assert int(row["traffic_bytes"]) > 0
            assert float(row["pct_ceiling"]) > 0 and float(row["step_ms"]) > 0
    # AdamW: fp32 2 states x 4 B; bf16 + master: 4 B master + 2 x 4; bf16: 2 x 2 B.
    adamw = {m: float(rows[("fusedopt", "adamw", m)]["element_bytes"]) for m in MEMORY_MODES}
    assert adamw["bf16+master+8-bit states"] == 6.0  # 4 B master + 2 x 1 B codes (+ scales)
    assert adamw["fp32+bf16 states"] == 4.0 and adamw["bf16+master+bf16 states"] == 8.0
    # every op whose spec has 8-bit states has the mode (applicability from the spec): 4 B
    # master + 1 B codes per state
    eight_bit = {n: float(r["element_bytes"]) for (i, n, m), r in rows.items()
                 if i == "fusedopt" and m == "bf16+master+8-bit states"}  # fmt: skip
    assert eight_bit == {"adamw": 6.0, "adam": 6.0, "lamb": 6.0, "lion": 5.0, "sgd": 5.0}
    assert (adamw["fp32"], adamw["bf16+master"], adamw["bf16"]) == (8.0, 12.0, 4.0)
    assert adamw["bf16+compact master"] == 10.0  # 2 x 4 B states + the 2 B remainder
    assert adamw["bf16+kahan"] == 10.0  # 2 x 4 B states + the 2 B bf16 compensation
    assert adamw["bf16+SR"] == 4.0  # 2 x 2 B bf16 states, no master
    for mode in ("fp32", "bf16"):
        torch_row, ours = rows[("torch", "adamw", mode)], rows[("fusedopt", "adamw", mode)]
        assert torch_row["element_bytes"] == ours["element_bytes"]
    # bitsandbytes, computed: every tiny tensor is under min_8bit_size, so fp32 states.
    assert float(rows[("bitsandbytes AdamW8bit / Adam8bit (computed)", "adamw",
                       "fp32 params, 8-bit states, 256-blocks")]["state_bytes"]) == 8.0  # fmt: skip
    try:
        import optimi  # noqa: F401
    except ImportError:
        pass
    else:  # torch-optimi's Kahan AdamW on bf16: m, v and the compensation, 2 B each
        kahan = [r for k, r in rows.items() if k[0].startswith("torch-optimi AdamW")]
        assert [float(r["element_bytes"]) for r in kahan] == [6.0]
    md = csv_path.with_suffix(".md").read_text()
    assert "torchao AdamW8bit" in md and "bitsandbytes" in md and "% of ceiling" in md


def _run_rows(workload, impls):
    """run_case over (label, factory) pairs of ``workload``, quick settings."""
    import argparse

    args = argparse.Namespace(warmup=1, repeats=2)
    return {label: report.run_case(workload, label, factory, args, 1.0) for label, factory in impls}


@pytest.mark.parametrize("mode", ["fp32", "amp"])
@pytest.mark.parametrize("optimizer", report.ALL_OPTIMIZERS)
def test_every_row_does_its_steps_work(optimizer, mode):
    """[note: every row steps]: on tiny shapes every fusedopt and peer row of every optimizer
    (compiled peers aside: Inductor takes minutes here) passes run_case's checks: each
    watched tensor moves and no GradScaler skips a step (the tiny model's amp rows of torch
    fused and heavyball looked fast enough to be skipped steps; they are not)."""
    workload = make_workload("tiny", optimizer, mode, torch.device("cpu"))
    impls = report.implementations(workload, {"cpu": None}, "none", all_peers=True)
    for label, row in _run_rows(workload, impls).items():
        if row.status.startswith(("skipped", "peer not installed")):
            continue
        assert row.status == "ok", (label, row.status)
        assert row.median_ms > 0


def _with_inf_grads_for(calls: int, make_step, workload):
    """A factory of ``make_step(workload)`` whose first ``calls`` steps see an inf grad."""
    grad, clean = workload.grads[1], workload.grads[1][0, 0].item()

    def factory():
        inner, count = make_step(workload), [0]

        def step():
            count[0] += 1
            grad[0, 0] = float("inf") if count[0] <= calls else clean
            inner()

        step.watched, step.scaler = inner.watched, inner.scaler
        return step

    return factory


@pytest.mark.parametrize("impl", ["fusedopt cpu", "torch fused"])
def test_a_row_with_skipped_steps_is_an_error(impl):
    """Two inf steps out of the row's four: the profiled step moves the masters, but the
    scale tells that the GradScaler skipped two, and the row says so without a time."""
    workload = make_workload("tiny", "adamw", "amp", torch.device("cpu"))
    make = (lambda w: make_fused(w, "cpu")) if impl == "fusedopt cpu" else (
        lambda w: make_peer(w, "torch fused"))  # fmt: skip
    (row,) = _run_rows(workload, [(impl, _with_inf_grads_for(2, make, workload))]).values()
    assert row.status.startswith("error: the GradScaler skipped 2 steps"), row.status
    assert row.median_ms is None


@pytest.mark.parametrize("mode", ["fp32", "amp"])
def test_a_step_that_does_no_work_is_an_error(mode):
    """A step that works once and then returns at once (heavyball's Muon consumed its grads
    so) is an error row, in fp32 (params watched) and amp (masters watched)."""
    workload = make_workload("tiny", "adamw", mode, torch.device("cpu"))

    def factory():
        inner, count = make_fused(workload, "cpu"), [0]

        def step():
            count[0] += 1
            if count[0] == 1:
                inner()

        if mode == "amp":
            step.watched, step.scaler = inner.watched, inner.scaler
        return step

    (row,) = _run_rows(workload, [("lazy", factory)]).values()
    assert row.status.startswith("error: 4 of 4 watched tensors unchanged"), row.status
    assert "did no work" in row.status and row.median_ms is None


def test_peers_flag_times_only_the_named_peers():
    args = report.parse_args(["--device", "cpu", "--peers", "torch fused"])
    workload = make_workload("tiny", "adamw", "fp32", torch.device("cpu"))
    impls = dict(report.implementations(workload, {"cpu": None}, "none", True, args.peers))
    assert callable(impls["fusedopt cpu"]) and callable(impls["torch fused"])
    assert impls["torch foreach"] == "not selected (--peers)"


def test_muon_1b_counts():
    """bench.muon_1b's computed parts: torch's three GEMMs per Newton-Schulz iteration on the
    m x n orientation with m <= n; the shrunk list keeps the 1B list's tensors and shape
    groups; a decoder layer is 7 matrices and 2 norms."""
    from collections import Counter

    from bench.muon_1b import decoder_layers, newton_schulz_flops, shrunk
    from bench.shapes import llama_1b

    assert newton_schulz_flops((2048, 2048)) == 5 * 6 * 2048**3
    assert newton_schulz_flops((5632, 2048)) == newton_schulz_flops((2048, 5632))
    assert newton_schulz_flops((3, 5), ns_steps=1) == 4 * 9 * 5 + 2 * 27
    full, small = llama_1b(), shrunk(llama_1b(), 16)
    assert [n for n, _ in small] == [n for n, _ in full]
    groups = lambda shapes: sorted(Counter(s for _, s in shapes if len(s) == 2).values())  # noqa: E731
    assert groups(small) == groups(full) == [2, 16, 32, 64]
    layer = decoder_layers(1)
    assert len(layer) == 9 and numel(layer) == 51_384_320


def test_bnb_state_bytes_follows_its_allocation_rule():
    """bitsandbytes' rule as bench.memory computes it: a uint8 code per element and an fp32
    absmax per 256 (rounded up) for a param of >= 4096 elements, fp32 states under that."""
    from bench.memory import bnb_state_bytes

    assert bnb_state_bytes([("w", (4096,))], 2) == 2 * (4096 + 4 * 16) / 4096
    assert bnb_state_bytes([("w", (4097,))], 1) == (4097 + 4 * 17) / 4097
    assert bnb_state_bytes([("b", (4095,))], 2) == 8.0
