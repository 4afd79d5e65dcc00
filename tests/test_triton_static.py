"""Static GPU checks of the Triton kernels, no GPU needed (DESIGN.md §5): every kernel variant
compiles for sm_90; the aligned path issues 128-bit global loads and stores (``LDG.E.128`` /
``STG.E.128``) for every data stream; nothing spills to local memory.

The compile runs in a subprocess (tests/triton_static_compile.py) with TRITON_INTERPRET
unset, because tests/conftest.py sets it on CPU machines and ``@triton.jit`` then returns
interpreted functions. Negative control: the same kernels compiled without the alignment
hints (ALIGNED=False) must show no 128-bit access at all, so the check below is known to
fail when the vectorised path is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# kernel prefix -> (data streams read, streams written), for the variants compiled with every
# option on (AMSGrad, momentum, ...). A master-weight variant reads one stream more (the
# 16-bit param, compared with the rounded master: [note: master sync]) and, if it writes
# params, writes one more (the rounded param beside the fp32 master).
STREAMS = {
    "scale_": (1, 1),
    "grad_norm_partials_": (1, 0),
    "adamw_": (5, 4),  # param/master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq
    "sgd_": (3, 2),  # param/master, grad, momentum buffer
    "lion_": (3, 2),  # param/master, grad, exp_avg
    "adan_": (6, 5),  # param/master, grad, exp_avg, exp_avg_sq, exp_avg_diff, neg_pre_grad
    "schedulefree_adamw_": (4, 3),  # y (param/master), grad, z, exp_avg_sq
    "lamb_norms_": (4, 2),  # pass 1 with fp32 states: stores the moments
    "lamb_apply_": (3, 1),  # pass 3 with fp32 states: re-reads p, m, v (two-pass tensors)
    "adafactor_apply_": (2, 1),  # param/master, grad (the factors are per row and column)
    "muon_momentum_": (2, 2),  # grad, buffer; buffer, bf16 ns (reads no param)
    "muon_apply_": (2, 1),  # param/master, bf16 ns; param/master
}
# 8-bit states ([note: q8 tiles] in fusedopt/triton_kernels/quant8.py): the whole-block path
# reads p and g (and the master) with 128-bit accesses, the codes with 64-bit ones (8 per
# thread); (128-bit streams read, written; code streams written), every option on.
Q8_STREAMS = {
    "adamw_q8_": (2, 1, 2),  # param/master, grad; exp_avg and exp_avg_sq codes
    "sgd_q8_": (2, 1, 1),  # momentum buffer codes
    "lion_q8_": (2, 1, 1),  # exp_avg codes
    "lamb_norms_q8_": (2, 0, 0),  # pass 1 reads the codes only
    "lamb_apply_q8_": (2, 1, 2),  # pass 3 requantizes the moments
}
Q8_CASES = ("fp32", "bf16_master", "bf16")
#: Kernels that read no param (so a master variant reads no 16-bit param beside it).
READS_NO_PARAM = ("muon_momentum_",)
# Passes with low-precision states (module docstring of fusedopt/triton_kernels/lamb.py).
LAMB_LOW_PRECISION = {"lamb_norms_": (4, 0), "lamb_apply_": (4, 3)}
WRITES_PARAMS = (
    "adamw_",
    "sgd_",
    "lion_",
    "adan_",
    "schedulefree_adamw_",
    "lamb_apply_",
    "adafactor_apply_",
    "muon_apply_",
)
# A compact master (bf16 param + int16 remainder, [note: compact master]) reads and writes
# the same streams as an fp32 one: "master" in its name counts them alike; so does a Kahan
# master (a 16-bit compensation beside the param, [note: kahan master]).
ELEMENTWISE_CASES = ("fp32", "bf16", "bf16_master_fp32grad", "fp16_master",
                     "bf16_compact_master", "bf16_kahan_master", "fp16_kahan_master",
                     "fp64")  # fmt: skip


@pytest.fixture(scope="module")
def report() -> dict:
    if not os.path.exists(CUOBJDUMP):
        pytest.skip(f"no cuobjdump in the Triton wheel ({CUOBJDUMP})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_static_compile.py")],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def expected_streams(name: str) -> tuple[int, int] | None:
    for prefix, (reads, writes, _) in Q8_STREAMS.items():
        if name.startswith(prefix) and name[len(prefix) :] in Q8_CASES:
            master = "master" in name  # a master variant reads the 16-bit param too
            return reads + master, writes + int(master and writes > 0)
    for prefix, streams in STREAMS.items():
        if name.startswith(prefix):
            case = name[len(prefix) :]
            if prefix in LAMB_LOW_PRECISION and case == "bf16":
                return LAMB_LOW_PRECISION[prefix]
            if case in ELEMENTWISE_CASES:
                reads, writes = streams
                master = "master" in case
                reads_param = master and prefix not in READS_NO_PARAM
                return reads + reads_param, writes + int(master and prefix in WRITES_PARAMS)
    return None


def test_every_kernel_compiles_for_sm90(report):
    kernels = {"scale", "grad_norm_partials", "grad_norm_tensor_norms", "grad_norm_total",
               "adamw", "sgd", "lion", "adan", "schedulefree_adamw", "lamb_norms",
               "lamb_apply", "lamb_fold", "adafactor_partials", "adafactor_updates",
               "adafactor_columns", "adafactor_fold", "adafactor_apply", "adafactor_floor",
               "muon_momentum", "muon_apply"}  # fmt: skip
    for kernel in kernels:
        assert any(name.startswith(kernel) for name in report), kernel
    # [note: state dtype]: AdamW, SGD, Lion and LAMB (both passes) with states of their own
    # dtype, bf16 ones stochastic
    for op in ("adamw", "sgd", "lion", "lamb_norms", "lamb_apply"):
        assert sum(name.startswith(f"{op}_states_") for name in report) == 3, op
        # [note: 8-bit states] (fusedopt/quant8.py): fp32, bf16 with fp32 masters, bf16
        for case in ("fp32", "bf16_master", "bf16"):
            assert f"{op}_q8_{case}" in report, (op, case)
    for case in ELEMENTWISE_CASES:
        for op in ("adamw", "sgd", "lion", "adan", "schedulefree_adamw", "lamb_norms",
                   "lamb_apply", "adafactor_partials", "adafactor_updates", "adafactor_apply",
                   "muon_momentum", "muon_apply"):  # fmt: skip
            assert f"{op}_{case}" in report


#: Kernels known to spill, each with the reason; a listed kernel that stops spilling fails, so
#: that the list stays true. The bf16 compact-master build of adafactor_apply ([note: compact
#: master]: the join and split keep the param bits and the remainder live beside the loop's
#: state) spills 3 values (8-byte stack; Triton 3.8, sm_90). (adafactor_norms, one program per
#: tensor, spilled 15 values in fp32, fp16-master and compact-master builds; its chunked
#: replacement, adafactor_partials, spills in none, once a vector's lerp weight and eps are
#: computed inside its branch: hoisted above the loop, its bf16 build spilled 3 values.)
#: The bf16 Kahan-master build of adafactor_apply ([note: kahan master]: param and
#: compensation live beside the loop's state) spills as the compact one (3 values, 8-byte
#: stack; measured on the merge with the chunked Adafactor); every other Kahan build is clean.
#: The unaligned build of AdamW's 8-bit-state kernel with bf16 params and fp32 masters (its
#: general walk only, [note: q8 tiles]) spills 2 values (8-byte stack, 128 registers) since
#: the guess's roots are approximate ([note: q8 guess]; with IEEE roots it took no stack);
#: the aligned build, 228 registers, is clean.
KNOWN_SPILLS = {
    "adafactor_apply_bf16_compact_master",
    "adafactor_apply_bf16_kahan_master",
    "adamw_q8_bf16_master_unaligned",
}


def test_no_spills_no_local_memory(report):
    for name, r in report.items():
        clean = r["spills"] == 0 and r["local"] == 0 and r["stack"] == 0
        assert clean != (name in KNOWN_SPILLS), (name, r)


def test_aligned_path_is_128_bit_for_every_stream(report):
    checked = 0
    for name, r in report.items():
        streams = expected_streams(name)
        if streams is None or name.endswith("_unaligned"):
            continue
        reads, writes = streams
        assert r["ldg128"] >= reads, (name, r)
        assert r["stg128"] >= writes, (name, r)
        checked += 1
    assert checked >= 25


def test_q8_codes_are_stored_8_bytes_at_a_time(report):
    """The whole-block path of the 8-bit states stores each code stream with 64-bit accesses
    (8 codes per thread, [note: q8 tiles]); without the alignment hints, with bytes."""
    for prefix, (_, _, code_writes) in Q8_STREAMS.items():
        for case in Q8_CASES:
            assert report[prefix + case]["stg64"] >= code_writes, prefix + case
    assert report["adamw_q8_fp32_unaligned"]["stg64"] == 0


def test_negative_control_without_alignment_hints_has_no_128_bit_access(report):
    controls = [name for name in report if name.endswith("_unaligned")]
    assert len(controls) >= 5
    for name in controls:
        assert report[name]["ldg128"] == 0 and report[name]["stg128"] == 0, name
        aligned = report[name.removesuffix("_unaligned")]
        assert aligned["ldg128"] > 0 and aligned["stg128"] > 0, name
