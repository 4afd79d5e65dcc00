"""Compile every Triton kernel variant ahead of time for sm_90 and report what its SASS does.

Run as a script (``python tests/triton_static_compile.py``) in a process where
TRITON_INTERPRET is unset (``@triton.jit`` returns interpreted functions otherwise); prints
one JSON object: variant name -> {"ldg128", "stg128", "stg64", "ldg", "stg", "local",
"stack", "spills"}. tests/test_triton_static.py runs it and asserts on the numbers. No GPU needed:
Triton compiles for a GPUTarget, and the cuobjdump shipped in Triton's wheel disassembles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fusedopt.triton_kernels import (  # noqa: E402
    adafactor,
    adamw,
    adan,
    drivers,
    grad_norm,
    lamb,
    lion,
    multi_tensor,
    muon,
    quant8,
    scale,
    schedulefree_adamw,
    sgd,
)
from fusedopt.triton_kernels.common import LAUNCH_OPTIONS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

#: Types of the non-constexpr arguments, by name (everything else is an fp32 pointer).
ARG_TYPES = {
    "table": "*i64",
    "chunks": "*i32",
    "counters": "*i32",
    "bad_counts": "*i32",
    "tensor_bad": "*i32",
    "n_tensors": "i32",
    "dims": "*i64",  # adafactor: (rows, cols, first floor, ...) per tensor
    "rchunks": "*i64",  # adafactor: its reduction chunks (tensor, chunk)
    "row_sums": "*fp64",
    "col_partials": "*fp64",
    "chunk_sums": "*fp64",
    "sr_key": "*i64",  # [note: stochastic rounding]: [seed, counter, one id per tensor]
    "row_lengths": "*i64",  # 8-bit states: each param's last dim ([note: 8-bit states])
}

F32, BF16, F16, F64 = tl.float32, tl.bfloat16, tl.float16, tl.float64


def step_dtypes(p, g, master):
    """Constexprs of a step kernel; master-weight cases adopt written params (the default,
    MASTER_SYNCED: [note: master sync] in fusedopt/_contract.py); ``master="compact"``:
    compact masters (MASTER_COMPACT, [note: compact master]); ``master="kahan"``: Kahan
    masters (MASTER_KAHAN, [note: kahan master])."""
    s = F32 if master else p
    mode = multi_tensor.MASTER_SYNCED if master else multi_tensor.NO_MASTER
    if master == "compact":
        mode = multi_tensor.MASTER_COMPACT
    if master == "kahan":
        mode = multi_tensor.MASTER_KAHAN
    return {"P_DTYPE": p, "G_DTYPE": g, "S_DTYPE": s, "COMPUTE": F64 if p == F64 else F32,
            "MASTER": mode}  # fmt: skip


SCALARS = {"LR_MODE": 2, "HAS_GRAD_SCALE": True, "HAS_CLIP": True, "HAS_FOUND_INF": True}


def variants():
    """(name, kernel, constexprs): the aligned variants the test checks for 128-bit access,
    plus the others that must compile."""
    out = []
    only = {"HAS_F32": False, "HAS_BF16": False, "HAS_F16": False, "HAS_F64": False}
    for name, flag in (("fp32", "HAS_F32"), ("bf16", "HAS_BF16")):
        out.append((f"scale_{name}", scale.scale_kernel,
                    {"WIDTH": 5, "CHECK": True, **only, flag: True}))  # fmt: skip
        out.append((f"grad_norm_partials_{name}", grad_norm.chunk_partials_kernel,
                    {"WIDTH": 5, "ACC": F32, "INF_NORM": False, "HAS_GRAD_SCALE": True,
                     **only, flag: True}))  # fmt: skip
    out.append(("scale_all_dtypes", scale.scale_kernel,
                {"WIDTH": 5, "CHECK": True, **{k: True for k in only}}))  # fmt: skip
    out.append(("grad_norm_partials_inf_all", grad_norm.chunk_partials_kernel,
                {"WIDTH": 5, "ACC": F32, "INF_NORM": True, "HAS_GRAD_SCALE": True,
                 **{k: True for k in only}}))  # fmt: skip
    out.append(("grad_norm_tensor_norms", grad_norm.tensor_norms_kernel,
                {"WIDTH": 5, "INF_NORM": False, "ACC": F32}))  # fmt: skip
    out.append(("grad_norm_total", grad_norm.total_norm_kernel, {"INF_NORM": False, "ACC": F32}))
    dtype_cases = {
        "fp32": step_dtypes(F32, F32, False),
        "bf16": step_dtypes(BF16, BF16, False),
        "bf16_master_fp32grad": step_dtypes(BF16, F32, True),
        "fp16_master": step_dtypes(F16, F16, True),
        "bf16_compact_master": step_dtypes(BF16, BF16, "compact"),
        "bf16_kahan_master": step_dtypes(BF16, F32, "kahan"),
        "fp16_kahan_master": step_dtypes(F16, F16, "kahan"),
        "fp64": step_dtypes(F64, F64, False),
    }
    for case, dtypes in dtype_cases.items():
        base = {**dtypes, **SCALARS}
        # STATE_SR ([note: state dtype]): a constexpr with a default, which a launch binds but
        # an ASTSource must be given (else it is compiled as a run-time argument).
        step = lambda op, width, steps, base=base, **flags: (  # noqa: E731
            drivers.step_kernel,
            {"WIDTH": width, **base, "STATE_SR": False, **op.constexprs(steps, **flags)},
        )
        out.append((f"adamw_{case}", *step(adamw.adamw_, 11, True, DECOUPLED=True, AMSGRAD=True,
                                           MAXIMIZE=True, BIAS_CORRECTION=True)))  # fmt: skip
        out.append((f"sgd_{case}", *step(sgd.sgd_, 9, True, HAS_MOMENTUM=True, NESTEROV=True,
                                         MAXIMIZE=True)))  # fmt: skip
        out.append((f"lion_{case}", *step(lion.lion_, 8, False, MAXIMIZE=True)))
        out.append((f"adan_{case}", *step(adan.adan_, 12, True, NO_PROX=False)))
        out.append((f"schedulefree_adamw_{case}",
                    *step(schedulefree_adamw.schedulefree_adamw_, 9, False)))  # fmt: skip
        # Muon's passes: slots params, grads, momentum_buffers, ns_buffers, master_params
        for pass_name, pass_ in (("momentum", muon.MOMENTUM_PASS), ("apply", muon.APPLY_PASS)):
            out.append((f"muon_{pass_name}_{case}", muon.muon_pass_kernel,
                        {"WIDTH": 9, **base, "NESTEROV": True, "PASS": pass_}))  # fmt: skip
        exact = dtypes["MASTER"] or dtypes["P_DTYPE"] in (F32, F64)
        lamb_base = {"WIDTH": 10, **dtypes, "HAS_GRAD_SCALE": True, "HAS_CLIP": True,
                     "HAS_FOUND_INF": True, "GRAD_AVERAGING": True, "BIAS_CORRECTION": True,
                     "ALWAYS_ADAPT": False, "STATES_EXACT": exact, "Q8": False,
                     "STATE_SR": False}  # fmt: skip
        out.append((f"lamb_norms_{case}", lamb.lamb_norms_kernel, lamb_base))
        # WIDTH = 3 + 7 slots + 1 (the hyperparameter row)
        adafactor_base = {"WIDTH": 11, **dtypes, "HAS_GRAD_SCALE": True, "HAS_CLIP": True,
                          "HAS_FOUND_INF": True, "MAXIMIZE": True,
                          "DTYPE_EPS": 2.0**-23}  # fmt: skip
        out.append((f"adafactor_partials_{case}", adafactor.adafactor_partials_kernel,
                    adafactor_base))  # fmt: skip
        out.append(
            (
                f"adafactor_updates_{case}",
                adafactor.adafactor_updates_kernel,
                {k: v for k, v in adafactor_base.items() if k not in ("P_DTYPE", "MASTER")},
            )
        )
        out.append((f"adafactor_apply_{case}", adafactor.adafactor_apply_kernel,
                    {**adafactor_base, "LR_MODE": 0, "ALIGNED": True}))  # fmt: skip
        out.append((f"lamb_apply_{case}", lamb.lamb_apply_kernel,
                    {**lamb_base, "LR_MODE": 0, "TRUST_CLIP": True}))  # fmt: skip
    out.append(("adafactor_floor", adafactor.adafactor_floor_kernel,
                {"WIDTH": 11, "S_DTYPE": F32, "COMPUTE": F32, "HAS_FOUND_INF": True,
                 "DTYPE_EPS": 2.0**-23}))  # fmt: skip
    out.append(("adafactor_columns", adafactor.adafactor_columns_kernel,
                {"WIDTH": 11, "S_DTYPE": F32, "COMPUTE": F32, "HAS_FOUND_INF": True,
                 "DTYPE_EPS": 2.0**-23}))  # fmt: skip
    out.append(("adafactor_fold", adafactor.adafactor_fold_kernel,
                {"WIDTH": 11, "HAS_FOUND_INF": True}))  # fmt: skip
    out.append(("lamb_fold", lamb.lamb_fold_kernel,
                {"WIDTH": 10, "COMPUTE": F32, "HAS_FOUND_INF": True}))  # fmt: skip
    # [note: state dtype]: the states of AdamW, SGD, Lion and LAMB in their own dtype; bf16
    # ones rounded stochastically (STATE_SR: the state pointers come from the prologue's
    # S_DTYPE, a path the interpreter does not check: a static_assert there failed only when
    # compiled). 16-bit states are not exact: LAMB's one-pass path.
    for case, dtypes, extra in (
        ("fp32_bf16_sr", step_dtypes(F32, F32, False), {"S_DTYPE": BF16, "STATE_SR": True}),
        ("bf16_master_bf16_sr", step_dtypes(BF16, F32, True),
         {"S_DTYPE": BF16, "STATE_SR": True}),
        ("fp32_fp16", step_dtypes(F32, F32, False), {"S_DTYPE": F16, "STATE_SR": False}),
    ):  # fmt: skip
        for name, op, width, steps, flags in (
            ("adamw", adamw.adamw_, 11, True,
             dict(DECOUPLED=True, AMSGRAD=True, MAXIMIZE=True, BIAS_CORRECTION=True)),
            ("sgd", sgd.sgd_, 9, True, dict(HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=True)),
            ("lion", lion.lion_, 8, False, dict(MAXIMIZE=True)),
        ):  # fmt: skip
            out.append((f"{name}_states_{case}", drivers.step_kernel,
                        {"WIDTH": width, **dtypes, **SCALARS, **op.constexprs(steps, **flags),
                         **extra}))  # fmt: skip
        lamb_states = {"WIDTH": 10, **dtypes, "HAS_GRAD_SCALE": True, "HAS_CLIP": True,
                       "HAS_FOUND_INF": True, "GRAD_AVERAGING": True, "BIAS_CORRECTION": True,
                       "ALWAYS_ADAPT": False, "STATES_EXACT": False, "Q8": False,
                       **extra}  # fmt: skip
        out.append((f"lamb_norms_states_{case}", lamb.lamb_norms_kernel, lamb_states))
        out.append((f"lamb_apply_states_{case}", lamb.lamb_apply_kernel,
                    {**lamb_states, "LR_MODE": 0, "TRUST_CLIP": True}))  # fmt: skip
    out += q8_variants()
    return out


#: The dtype cases of the 8-bit-state kernels ([note: 8-bit states] in fusedopt/quant8.py).
Q8_CASES = {
    "fp32": step_dtypes(F32, F32, False),
    "bf16_master": step_dtypes(BF16, BF16, True),
    "bf16": step_dtypes(BF16, BF16, False),
}


def q8_variants():
    """The kernels of the ops with 8-bit states (``<op>_q8_<case>``): quant8.q8_step_kernel as
    Q8Launcher launches it for AdamW, SGD and Lion, LAMB's two passes with Q8; every option
    on that 8-bit states allow (no AMSGrad)."""
    out = []
    for case, dtypes in Q8_CASES.items():
        dtypes = {k: v for k, v in dtypes.items() if k != "S_DTYPE"}
        for name, op, flags in (
            ("adamw", adamw.adamw_, dict(DECOUPLED=True, AMSGRAD=False, MAXIMIZE=True,
                                         BIAS_CORRECTION=True)),
            ("sgd", sgd.sgd_, dict(HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=True)),
            ("lion", lion.lion_, dict(MAXIMIZE=True)),
        ):  # fmt: skip
            constexprs = op.constexprs(True, **flags)
            constexprs.pop("STEPS")
            constexprs |= {"PROLOGUE": op.q8.prologue, "BLOCK_FN": op.q8.block_fn}
            width = multi_tensor.HEADER + op.layout.N_SLOTS + 1
            out.append((f"{name}_q8_{case}", quant8.q8_step_kernel,
                        {"WIDTH": width, **dtypes, **SCALARS, **constexprs}))  # fmt: skip
        lamb_q8 = {"WIDTH": multi_tensor.HEADER + lamb.L.N_SLOTS + 1, **dtypes, "S_DTYPE": F32,
                   "HAS_GRAD_SCALE": True, "HAS_CLIP": True, "HAS_FOUND_INF": True,
                   "GRAD_AVERAGING": True, "BIAS_CORRECTION": True, "ALWAYS_ADAPT": False,
                   "STATES_EXACT": False, "Q8": True, "STATE_SR": False}  # fmt: skip
        out.append((f"lamb_norms_q8_{case}", lamb.lamb_norms_kernel, lamb_q8))
        out.append((f"lamb_apply_q8_{case}", lamb.lamb_apply_kernel,
                    {**lamb_q8, "LR_MODE": 0, "TRUST_CLIP": True}))  # fmt: skip
    return out


def compile_variant(kernel, constexprs):
    """The cubin of ``kernel`` for sm_90 with ``constexprs`` (launch options as at run time)."""
    signature = {
        name: "constexpr" if name in constexprs else ARG_TYPES.get(name, "*fp32")
        for name in kernel.arg_names
    }
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options=dict(LAUNCH_OPTIONS))
    return compiled.asm["cubin"]


def analyse(cubin: bytes, workdir: str, name: str) -> dict:
    path = os.path.join(workdir, f"{name}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True).stdout
    usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {
        "ldg128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
        "stg128": len(re.findall(r"\bSTG\.E\.128\b", sass)),
        "stg64": len(re.findall(r"\bSTG\.E\.64\b", sass)),
        "ldg": len(re.findall(r"\bLDG\.", sass)),
        "stg": len(re.findall(r"\bSTG\.", sass)),
        "spills": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        "local": int(local.group(1)) if local else -1,
        "stack": int(stack.group(1)) if stack else -1,
    }


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET first"
    report = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, kernel, constexprs in variants():
            aligned = "ALIGNED" in kernel.arg_names
            report[name] = analyse(
                compile_variant(kernel, {**constexprs, **({"ALIGNED": True} if aligned else {})}),
                workdir,
                name,
            )
            if aligned and name.startswith(("adamw_fp32", "adamw_bf16", "scale_", "adamw_q8_")):
                # Negative control: the same kernel without the alignment hints.
                report[name + "_unaligned"] = analyse(
                    compile_variant(kernel, {**constexprs, "ALIGNED": False}),
                    workdir,
                    name + "_unaligned",
                )
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
