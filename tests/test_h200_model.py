"""The H200 model of every kernel (bench/h200_model.py, [note: h200 model]), no GPU needed.

Unit tests pin the model's arithmetic (occupancy by the sm_90 rules, the SASS loop reading,
Little's law). The model test compiles every CUDA and Triton kernel for sm_90 (cached by
source hash under ~/.cache/fusedopt-model, and in Triton's own cache) and fails when a change
drops a streaming kernel's aligned path below what the goals need (cuda >= 90%, triton >=
85% of copy bandwidth), except the kernels listed in KNOWN_BELOW with the reason; a listed
kernel that reaches its goal fails too, so that the list is kept true.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import h200_model as model

ROOT = Path(__file__).resolve().parents[1]

_ISSUE = ("issue-bound: bf16/fp16 storage without master weights moves 8 elements per 16-byte "
          "access, each with IEEE div/sqrt%s, more instructions per byte than 4 warp-"
          "instructions per clock deliver")  # fmt: skip
_FP16 = _ISSUE % " and fp16's exact conversion in integer code (fusedopt/dtype.h)"
_MUON_FP16 = ("issue-bound: fp16 storage without master weights moves 8 elements per 16-byte "
              "access, each through fp16's exact conversion in integer code (fusedopt/dtype.h) "
              "on every load and store (72.0%; 61.9% with Nesterov's re-rounded buffer)"
              )  # fmt: skip

_KAHAN_FP16 = ("issue-bound: fp16 params with Kahan masters ([note: kahan master]) convert "
               "param and compensation from fp16 on load and, on store, round the master to fp16, "
               "the remainder to fp16 and check the tie: five of fp16's exact conversions in "
               "integer code (fusedopt/dtype.h) per element, for a light update (SGD, Muon's "
               "apply) that has few other instructions to hide them in")  # fmt: skip

_LAMB_16BIT_STATES = ("issue-bound: LAMB's norms pass with 16-bit states reads the param, grad "
                      "and both 16-bit moments and stores nothing (lamb_apply_ writes inexact "
                      "moments once): a division and a square root per element for few bytes "
                      "moved")  # fmt: skip

_Q8 = ("issue-bound: 8-bit states ([note: q8 warps] in csrc/cuda/quant8.cuh) dequantize each "
       "state (a table read) and requantize it (an IEEE division, one or two IEEE square "
       "roots, a table read and a compare) per element, beside the op's own math; %s")  # fmt: skip
_Q8_16BIT = _Q8 % "bf16 params without masters move few bytes per element for all of it"
_Q8_FP16 = _Q8 % ("fp16 params without masters move few bytes per element and add fp16's "
                  "exact conversion in integer code (fusedopt/dtype.h)")  # fmt: skip
_Q8_KAHAN = _Q8 % "Kahan masters add the compensation's conversions and tie check per element"
_Q8_COMPACT = _Q8 % "compact masters add the join and split of the master per element"
_Q8_LAMB_NORMS = _Q8 % ("LAMB's norms pass only dequantizes, but it reads 10 B per fp32 element "
                        "(p, g and two codes), stores nothing, and LAMB's direction costs "
                        "IEEE divisions and a square root per element")  # fmt: skip
_TQ8 = ("issue-bound: 8-bit states ([note: q8 tiles] in fusedopt/triton_kernels/quant8.py) "
        "move 1 byte per state element, but every element still takes the op's IEEE divisions "
        "and square roots, a dequantization per state and, where the pass writes them, a "
        "requantization per state (an IEEE division by the block's absmax, the guess's "
        "approximate roots, one midpoint: [note: q8 guess])%s")  # fmt: skip

#: Streaming kernels predicted below their goal today, with the reason. Not a launch-config or
#: unroll issue (occupancy and bytes in flight are ample: see bench/results/h200_model.md);
#: the fix is fewer instructions per element (hardware fp16 conversion on the device, a
#: cheaper division), not attempted here. None of them is a goal's case (fp32 AdamW).
KNOWN_BELOW = {
    "cuda adamw [fp16,fp16,false,false]": _FP16,
    "cuda adamw [fp16,fp16,false,true]": _FP16,
    "cuda adan [fp16,fp16,false]": _FP16,
    "cuda adan [fp16,float,false]": _FP16,
    # lamb_norms_kernel's variants name the state storage first ([note: state dtype])
    "cuda lamb_norms_kernel [fp16,fp16,fp16,false]": _FP16,
    "cuda lamb_norms_kernel [fp16,fp16,float,false]": _FP16,
    "cuda lamb_norms_kernel [bf16,bf16,bf16,false]": _ISSUE % "",
    # 96.4% before the hyperparameter table ([note: hyper table]): reading the hyperparameters
    # through the row's pointer took this variant from 43 to 50 registers and its loop's
    # shortest path from 572 to 620 instructions (h200_model.csv); not investigated yet.
    "cuda lamb_norms_kernel [bf16,bf16,float,false]": _ISSUE % "",
    # 16-bit states beside fp32 params or masters ([note: state dtype]): the norms pass only
    # reads them (lamb_apply_ stores inexact moments once, [note: lamb passes]), so each
    # element's division and square root come with a few 16-bit loads and no store.
    "cuda lamb_norms_kernel [bf16,bf16,bf16,kahan]": _LAMB_16BIT_STATES,  # 74.1%
    "cuda lamb_norms_kernel [bf16,bf16,bf16,compact]": _LAMB_16BIT_STATES,  # 77.9%
    "cuda lamb_norms_kernel [bf16,bf16,float,kahan]": _LAMB_16BIT_STATES,  # 89.7%
    "cuda lamb_norms_kernel [fp16,float,float,false]": _LAMB_16BIT_STATES,  # 85.3%
    "cuda lamb_apply [fp16,fp16,false]": _FP16,
    "cuda lamb_apply [fp16,float,false]": _FP16,
    "cuda lion [fp16,fp16,false]": _FP16,
    "cuda sgd [fp16,fp16,false,false]": _FP16,
    "cuda schedulefree_adamw [fp16,fp16,false]": _FP16,  # 67.8% (as adamw's fp16 variants)
    "cuda schedulefree_adamw [fp16,float,false]": _FP16,  # 85.0%
    "triton grad_norm_partials [bf16]": "issue-bound: one bf16 stream, 8 elements per thread, "
    "upcast, scale and square-accumulate each: more instructions per byte than issue allows",
    "triton lamb_norms [bf16]": _ISSUE % "",
    # muon_momentum_ on fp16 without master weights (model, bench/results/h200_model.md):
    # no div/sqrt, but fp16's exact conversion in integer code for grad and buffer loads,
    # the buffer store and, with Nesterov, the stored buffer read back in registers.
    "cuda muon_apply [fp16,fp16,kahan]": _KAHAN_FP16,  # 65.3% (model, h200_model.md)
    "cuda muon_apply [fp16,float,kahan]": _KAHAN_FP16,  # 65.3%
    "cuda sgd [fp16,fp16,kahan,false]": _KAHAN_FP16,  # 53.1%
    "cuda sgd [fp16,float,kahan,false]": _KAHAN_FP16,  # 70.6%
    "cuda muon_momentum [fp16,fp16,false,false]": _MUON_FP16,
    "cuda muon_momentum [fp16,fp16,false,true]": _MUON_FP16,
    # 8-bit states (bench/results/h200_model.md): every variant of fp32 params and of 16-bit
    # params with fp32 masters is at its goal except LAMB's norms pass. sgd_q8's figures are
    # its momentum-0 path's (the loop's shortest: the codes are left as they are); with
    # momentum it requantizes the buffer as lion_q8 does its moment.
    "cuda adamw_q8 [fp16,fp16,false]": _Q8_FP16,  # 57.1%
    "cuda adamw_q8 [fp16,float,false]": _Q8_FP16,  # 76.7%
    "cuda adamw_q8 [fp16,fp16,kahan]": _Q8_KAHAN,  # 48.4%
    "cuda adamw_q8 [fp16,float,kahan]": _Q8_KAHAN,  # 59.4%
    "cuda adamw_q8 [bf16,bf16,false]": _Q8_16BIT,  # 83.9%
    "cuda adamw_q8 [bf16,bf16,kahan]": _Q8_KAHAN,  # 67.9%
    "cuda adamw_q8 [bf16,float,kahan]": _Q8_KAHAN,  # 79.7%
    "cuda adamw_q8 [bf16,bf16,compact]": _Q8_COMPACT,  # 88.8%
    "cuda lamb_q8_norms_kernel [fp16,fp16,false]": _Q8_LAMB_NORMS,  # 37.6%
    "cuda lamb_q8_norms_kernel [fp16,float,false]": _Q8_LAMB_NORMS,  # 56.7%
    "cuda lamb_q8_norms_kernel [fp16,fp16,true]": _Q8_LAMB_NORMS,  # 70.2%
    "cuda lamb_q8_norms_kernel [fp16,fp16,kahan]": _Q8_LAMB_NORMS,  # 40.4%
    "cuda lamb_q8_norms_kernel [fp16,float,kahan]": _Q8_LAMB_NORMS,  # 54.8%
    "cuda lamb_q8_norms_kernel [bf16,bf16,false]": _Q8_LAMB_NORMS,  # 46.8%
    "cuda lamb_q8_norms_kernel [bf16,float,false]": _Q8_LAMB_NORMS,  # 63.0%
    "cuda lamb_q8_norms_kernel [bf16,bf16,true]": _Q8_LAMB_NORMS,  # 78.9%
    "cuda lamb_q8_norms_kernel [bf16,bf16,kahan]": _Q8_LAMB_NORMS,  # 53.1%
    "cuda lamb_q8_norms_kernel [bf16,float,kahan]": _Q8_LAMB_NORMS,  # 67.0%
    "cuda lamb_q8_norms_kernel [bf16,bf16,compact]": _Q8_LAMB_NORMS,  # 56.2%
    "cuda lamb_q8_norms_kernel [bf16,float,compact]": _Q8_LAMB_NORMS,  # 70.5%
    "cuda lamb_q8_norms_kernel [float,float,false]": _Q8_LAMB_NORMS,  # 80.3%
    "cuda lamb_q8_apply [fp16,fp16,false]": _Q8_FP16,  # 53.1%
    "cuda lamb_q8_apply [fp16,float,false]": _Q8_FP16,  # 70.4%
    "cuda lamb_q8_apply [fp16,fp16,kahan]": _Q8_KAHAN,  # 46.1%
    "cuda lamb_q8_apply [fp16,float,kahan]": _Q8_KAHAN,  # 56.4%
    "cuda lamb_q8_apply [bf16,bf16,false]": _Q8_16BIT,  # 76.8%
    "cuda lamb_q8_apply [bf16,bf16,kahan]": _Q8_KAHAN,  # 64.1%
    "cuda lamb_q8_apply [bf16,float,kahan]": _Q8_KAHAN,  # 73.7%
    "cuda lamb_q8_apply [bf16,bf16,compact]": _Q8_COMPACT,  # 83.1%
    "cuda lion_q8 [fp16,fp16,false]": _Q8_FP16,  # 72.5%
    "cuda lion_q8 [fp16,fp16,kahan]": _Q8_KAHAN,  # 53.2%
    "cuda lion_q8 [fp16,float,kahan]": _Q8_KAHAN,  # 67.6%
    "cuda lion_q8 [bf16,bf16,kahan]": _Q8_KAHAN,  # 85.8%
    "cuda sgd_q8 [fp16,fp16,false]": _Q8_FP16,  # 85.4%
    "cuda sgd_q8 [fp16,fp16,kahan]": _Q8_KAHAN,  # 58.2%
    "cuda sgd_q8 [fp16,float,kahan]": _Q8_KAHAN,  # 74.6%
    # Triton's 8-bit states, modelled on their whole-block loops (8 elements per thread,
    # Triton 3.8, sm_90), block scales counted as 4 B per 256 elements (main_loop's
    # warp_words): predicted %.
    "triton adamw [q8_fp32]": _TQ8 % "",  # 82.8
    "triton adamw [q8_bf16]": _TQ8 % "; bf16 params and grads: 10 B per element",  # 49.6
    "triton lamb_apply [q8_fp32]": _TQ8 % ", six divisions per element",  # 75.3
    "triton lamb_apply [q8_bf16_master]": _TQ8 % ", six divisions per element",  # 79.0
    "triton lamb_apply [q8_bf16]": _TQ8 % "; bf16 params and grads",  # 45.7
    "triton lamb_norms [q8_fp32]": _TQ8 % "; LAMB's norms pass reads only",  # 80.2
    "triton lamb_norms [q8_bf16_master]": _TQ8 % "; LAMB's norms pass reads only",  # 72.6
    "triton lamb_norms [q8_bf16]": _TQ8 % "; reads only, bf16 params and grads",  # 44.7
    "triton lion [q8_bf16]": _TQ8 % "; bf16 params and grads: 6 B per element",  # 78.4
}


def test_occupancy_follows_the_sm90_rules():
    # 40 regs: 1280 per warp, 12 warps per 16K sub-partition -> 48 warps = 6 blocks of 256.
    occ = model.occupancy(40, 256, 0)
    assert (occ.blocks, occ.threads, occ.limiter) == (6, 1536, "regs")
    # 47 regs round up to 48: 10 warps per sub-partition -> 40 warps = 5 blocks.
    assert model.occupancy(47, 256, 0).threads == 1280
    assert model.occupancy(32, 256, 0) == model.Occupancy(8, 2048, "regs")
    assert model.occupancy(16, 32, 0).limiter == "blocks"  # 32 blocks of one warp
    assert model.occupancy(128, 128, 0).threads == 512  # 4 warps per sub-partition
    # 100 KB of shared memory (+1 KB reserved per block): 2 blocks in 228 KB.
    assert model.occupancy(32, 128, 100 * 1024) == model.Occupancy(2, 256, "smem")


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.64 R8, desc[UR4][R10.64] ;
        /*0030*/                   FCHK P0, R4, R5 ;
        /*0040*/               @!P0 BRA 0x80 ;
        /*0050*/                   MOV R12, R4 ;
        /*0060*/                   MOV R13, R5 ;
        /*0070*/                   CALL.REL.NOINC 0x200 ;
        /*0080*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0090*/                   STG.E.U16 desc[UR4][R14.64], R6 ;
        /*00a0*/               @P1 BRA 0x10 ;
        /*00b0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00c0*/               @P2 BRA 0xb0 ;
        /*00d0*/                   EXIT ;
"""


def test_main_loop_reads_bytes_and_fast_path_from_sass():
    loop = model.main_loop(SASS)
    assert loop is not None and loop.vector
    assert (loop.load_bytes, loop.store_bytes, loop.loads, loop.stores) == (24, 18, 2, 2)
    assert loop.instructions == 10  # 0x10..0xa0
    assert loop.path == 7  # the branch around the slow path (3 instructions) taken
    assert model.main_loop(SASS.replace(".128", ".64")).vector is False


def test_prediction_is_littles_law_and_issue():
    gpu = model.H200
    loop = model.Loop(16, 16, 1, 1, 10, 10, True)
    need = gpu.copy_gbps * gpu.dram_latency_ns / gpu.sms
    few = model.predict(model.Occupancy(1, 256, "smem"), loop)
    assert few.in_flight == 256 * 32
    assert few.predicted == pytest.approx(256 * 32 / need)
    assert few.predicted_2x_latency == pytest.approx(few.predicted / 2)
    assert model.predict(model.Occupancy(8, 2048, "regs"), loop).predicted == 1.0
    slow = model.predict(model.Occupancy(8, 2048, "regs"), dataclasses_replace(loop, path=5000))
    per_sm = gpu.copy_gbps / gpu.sms
    assert slow.issue_bound == pytest.approx(4 * gpu.clock_ghz * 32 * 32 / 5000 / per_sm)
    assert slow.predicted == slow.issue_bound < 1


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_below_goal_flags_a_starved_kernel():
    """Negative control for the goal check: a kernel with too little in flight is reported."""
    starved = model.predict(model.Occupancy(1, 128, "smem"), model.Loop(16, 0, 1, 0, 8, 8, True))
    row = model.KernelRow("cuda", "adamw", "float,float,false,false", True, 128, 255,
                          200 * 1024, model.Occupancy(1, 128, "smem"),
                          model.Loop(16, 0, 1, 0, 8, 8, True), starved)  # fmt: skip
    assert "cuda adamw [float,float,false,false]" in model.below_goal([row.csv_row()])


def test_a_streaming_kernel_without_its_loop_is_predicted_zero():
    """A step kernel whose SASS has no main loop (say the loop was lost) fails the goal."""
    no_loop = "/*0000*/ LDG.E R2, desc[UR4][R2.64] ;\n/*0010*/ EXIT ;"
    row = model._row("cuda", "adamw", "float,float,false,false", 256, 40, 0, no_loop, model.H200)
    assert row.streaming and row.pred.predicted == 0
    assert "cuda adamw [float,float,false,false]" in model.below_goal([row.csv_row()])
    table = model._row("cuda", "write_table_kernel", "-", 256, 10, 0, SASS, model.H200)
    assert not table.streaming and table.pred is None


def test_report_section_puts_measured_beside_predicted(tmp_path):
    from bench.output import Row

    table = tmp_path / "model.csv"
    with open(table, "w") as f:
        f.write("backend,kernel,variant,predicted_pct\n")
        f.write('cuda,adamw,"float,float,false,false",97.5\n')
    row = Row("llama1b", 10, 1, "adamw", "fp32", "fusedopt cuda", pct_ceiling=88.25)
    text = model.report_section([row], "cuda", table)
    line = next(x for x in text.splitlines() if x.startswith("| fusedopt cuda | fp32"))
    assert "97.5" in line and "88.2" in line
    assert "not measured" in model.report_section([row], "cpu", table)
    assert "No H200 model" in model.report_section([row], "cpu", tmp_path / "absent.csv")


def _toolchain_missing() -> str | None:
    static_spec = importlib.util.spec_from_file_location("_s", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(static_spec)
    static_spec.loader.exec_module(setup)
    if setup.find_cuda_home() is None:
        return "no CUDA toolkit (nvcc)"
    if importlib.util.find_spec("triton") is None:
        return "no Triton"
    if shutil.which("c++filt") is None:
        return "no c++filt"
    return None


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"the H200 model compiles for sm_90: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.h200_model", "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_kernel_is_modelled(rows):
    backends = {r["backend"] for r in rows}
    assert backends == {"cuda", "triton"}
    streaming = [r for r in rows if int(r["streaming"])]
    # Every step body of test_cuda_static.EXPECTED that streams, plus Triton's aligned ones.
    assert sum(r["backend"] == "cuda" for r in streaming) >= 80
    assert sum(r["backend"] == "triton" for r in streaming) >= 30
    for r in streaming:  # the model found the 128-bit main loop of every one
        assert r["vector_loop"] == 1 and r["load_bytes_per_thread"] > 0 and r["regs"] > 0, r


def test_streaming_kernels_predicted_to_reach_their_goal(rows):
    below = model.below_goal(rows)
    unexpected = {k: v for k, v in below.items() if k not in KNOWN_BELOW}
    assert not unexpected, f"predicted below the goal (cuda 90%, triton 85%): {unexpected}"
    fixed = [k for k in KNOWN_BELOW if k not in below]
    names = {f"{r['backend']} {r['kernel']} [{r['variant']}]" for r in rows}
    stale = [k for k in fixed if k not in names]
    assert not stale, f"KNOWN_BELOW names kernels that no longer exist: {stale}"
    assert not fixed, f"now predicted at their goal: remove from KNOWN_BELOW: {fixed}"


def test_goal_cases_are_predicted_at_full_bandwidth(rows):
    """fp32 AdamW, the goals' case, on both backends (and its 2x-latency margin)."""
    by_key = {(r["backend"], r["kernel"], r["variant"]): r for r in rows}
    for backend, variant in (("cuda", "float,float,false,false"), ("triton", "fp32")):
        r = by_key[(backend, "adamw", variant)]
        assert float(r["predicted_pct"]) >= 100 * model.GOALS[backend], r
        assert float(r["predicted_2x_latency_pct"]) >= 100 * model.GOALS[backend], r


def test_committed_table_matches_the_kernels(rows):
    """bench/results/h200_model.csv is regenerated when a kernel changes."""
    path = ROOT / "bench" / "results" / "h200_model.csv"
    with open(path) as f:
        committed = {(r["backend"], r["kernel"], r["variant"]): r for r in csv.DictReader(f)}
    fresh = {(r["backend"], r["kernel"], r["variant"]): r for r in rows}
    assert committed.keys() == fresh.keys()
    stale = [k for k in fresh if str(fresh[k]["predicted_pct"]) != committed[k]["predicted_pct"]
             or str(fresh[k]["regs"]) != committed[k]["regs"]]  # fmt: skip
    assert not stale, f"rerun `python -m bench.h200_model`: changed {stale[:5]}"
