"""An H200 model of every kernel, from its sm_90 cubin, for a machine without a GPU.

Run ``python -m bench.h200_model`` (nvcc and Triton needed, no GPU): it compiles every CUDA
kernel (``csrc/cuda/*.cu``, with tests/test_cuda_static.py's flags) and every Triton variant of
tests/triton_static_compile.py for sm_90, reads registers, shared memory and the SASS of each,
and writes ``bench/results/h200_model.{md,csv}``. tests/test_h200_model.py asserts on it.

[note: h200 model] How a kernel engineer guesses, before a profiler run, whether a streaming
kernel can reach the copy bandwidth of an H200:

1. **Occupancy** from the registers and shared memory of the cubin and the launch config
   (CUDA: ``kThreads`` = 256 threads per block, ``__launch_bounds__(kThreads)``; Triton:
   ``num_warps`` x 32), with the sm_90 limits of :data:`H200` (registers allocated per warp
   in units of 256, per SM sub-partition; 2048 threads, 32 blocks, 228 KB shared memory, 1 KB
   of it reserved per block).
2. **Bytes per thread per iteration** of the main loop, from the SASS: the innermost loop
   (a backward branch) holding the most 128-bit global accesses; its LDG and STG
   instructions and their widths. A loop iteration issues its loads, waits for them, computes
   and stores, so each resident thread moves those bytes once per DRAM round trip.
3. **Little's law**: to keep HBM busy an SM must have ``need = copy bandwidth x latency /
   SMs`` bytes moving per round trip; it has ``in flight = resident threads x bytes per
   iteration``. Predicted fraction of copy bandwidth: ``min(1, in flight / need, issue)``,
   where ``issue`` is the same test against instruction issue (4 warp-instructions per clock
   per SM; the instructions of the shortest path through the loop body, i.e. the fast path
   of IEEE division and square root; the static count, slow paths inlined, is in the CSV).

What it ignores: the tail of a launch (the last wave of blocks; small for the ~16K blocks of
a 1B-parameter step), launch overhead (the host model below), the chunk set-up per block,
DRAM page and channel effects, and latency growth under load (shown instead: the prediction
at twice the latency). It predicts a ceiling set by parallelism, not a time; the GPU suite
prints the measured percentage beside it (``python -m bench.report --device cuda``).

[note: host model] A step on a GPU is bound by the largest of: its bytes over the bandwidth,
its launches times the launch latency, and its host time (Python + C++ op dispatch, measured
here on the cpu backend with tiny tensors, where the kernels cost nothing). The model finds
the parameter count below which a step of N tensors is launch- or host-bound.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("FUSEDOPT_MODEL_CACHE", Path.home() / ".cache" / "fusedopt-model"))


@dataclasses.dataclass(frozen=True)
class Gpu:
    """The hardware numbers the model uses (sm_90 limits are the CUDA occupancy rules)."""

    name: str = "H200 SXM (sm_90)"
    sms: int = 132
    regs_per_sm: int = 65536
    sub_partitions: int = 4  # registers are allocated per sub-partition (16K each)
    reg_unit: int = 256  # registers per warp are allocated in units of 256
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024
    smem_unit: int = 128
    warp_issue_per_clock: int = 4  # one warp-instruction per sub-partition per clock
    clock_ghz: float = 1.755
    copy_gbps: float = 4300.0  # copy bandwidth, read + written bytes (the issue's figure)
    dram_latency_ns: float = 570.0


H200 = Gpu()

#: Where the numbers of :data:`H200` come from. H200 is assumed equal to H100 SXM in
#: everything but its HBM3e (bandwidth): same GH100 die, 132 SMs, same clocks.
SOURCES = {
    "sms, sm_90 limits": "NVIDIA CUDA C++ Programming Guide, compute capability 9.0 table "
    "(64K registers, 2048 threads, 32 blocks, 228 KB shared memory per SM); H100/H200 SXM: "
    "132 SMs",
    "clock_ghz": "1755 MHz max boost of H100 (Chips and Cheese, 'Nvidia's H100: Funny L2, and "
    "Tons of Bandwidth', 2023-07-02, chipsandcheese.com/2023/07/02/"
    "nvidias-h100-funny-l2-and-tons-of-bandwidth/); lower than the SXM's boost, so the "
    "issue bound is conservative",
    "copy_gbps": "~4.3 TB/s copy bandwidth of an H200 (issue #17; HBM3e peak 4.8 TB/s); the "
    "GPU suite measures it in the same run",
    "dram_latency_ns": "an assumption, not a measurement: 1,000 core cycles at 1.755 GHz = "
    "570 ns. Secondary web sources put H100's HBM3 latency at ~600 cycles "
    "(fp4-site.pages.dev/silicon/gpu-memory-hierarchy) to '>1,000 cycles' "
    "(visualgrok.com/articles/gpu-memory-hierarchy); the pointer-chasing measurements of "
    "Luo et al. 2024 (arXiv:2402.13499) are the primary source to check, but their table "
    "could not be read here. 570 ns is the conservative end of that range; latency under "
    "load is higher still, hence the 2x column",
    "launch_us": "a few microseconds per launch (torchedup.dev, 'kernel launch overhead'; "
    "the NVIDIA blog 'Getting Started with CUDA Graphs' motivates graphs by it); 4 us "
    "assumed, not measured here",
}

LAUNCH_US = 4.0

#: Goals of issue 8 (bench/goals.py): % of copy bandwidth of fp32 AdamW on the 1B mix.
GOALS = {"cuda": 0.90, "triton": 0.85}

# ---------------------------------------------------------------------------------------
# The model arithmetic.


@dataclasses.dataclass
class Occupancy:
    blocks: int  # resident blocks per SM
    threads: int  # resident threads per SM
    limiter: str  # what bounds the blocks: regs, threads, blocks, smem


def occupancy(regs: int, threads_per_block: int, smem: int, gpu: Gpu = H200) -> Occupancy:
    """Resident blocks and threads per SM (the CUDA occupancy calculator's rules for sm_90)."""
    warps = math.ceil(threads_per_block / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / gpu.reg_unit) * gpu.reg_unit
    per_partition = gpu.regs_per_sm // gpu.sub_partitions
    warps_by_regs = (per_partition // regs_per_warp) * gpu.sub_partitions
    smem_block = math.ceil(smem / gpu.smem_unit) * gpu.smem_unit + gpu.smem_reserved_per_block
    limits = {
        "regs": warps_by_regs // warps,
        "threads": gpu.max_threads_per_sm // (warps * 32),
        "blocks": gpu.max_blocks_per_sm,
        "smem": gpu.smem_per_sm // smem_block,
    }
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * threads_per_block, limiter)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b(?:\s+[!A-Z0-9]+,)?\s+(?:`?\(?\.?L?_?x?_?)?0x([0-9a-f]+)")
_GLOBAL = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)\s")


def access_bytes(suffix: str) -> int:
    """Bytes per thread of one LDG/STG from its suffixes (.128, .64, .U16, .U8...)."""
    tokens = suffix.split(".")
    for token, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if token in tokens:
            return size
    return 4


@dataclasses.dataclass
class Loop:
    load_bytes: float  # per thread per iteration (an eighth for a per-warp word)
    store_bytes: float
    loads: int
    stores: int
    instructions: int  # static count of the loop body
    path: int  # instructions on the shortest path through it (the fast path)
    vector: bool  # holds 128-bit accesses


def _shortest_path(body: list[tuple[int, str]]) -> int:
    """Instructions on the shortest path from the loop head to its back-edge branch: forward
    branches are edges (conditional ones also fall through), inner backward branches are
    taken as not taken, calls cost their one instruction. The fast path of IEEE division and
    square root (a check, then a branch around the slow path) is the shortest path."""
    index = {a: i for i, (a, _) in enumerate(body)}
    dist = [math.inf] * len(body)
    dist[0] = 1
    for i, (addr, text) in enumerate(body[:-1]):
        if dist[i] == math.inf:
            continue
        branch = _BRANCH.search(text)
        unconditional = not text.startswith("@")
        if text.startswith(("EXIT", "RET")) and unconditional:
            continue
        if branch and int(branch.group(1), 16) > addr:
            j = index.get(int(branch.group(1), 16))
            if j is not None:
                dist[j] = min(dist[j], dist[i] + 1)
            if unconditional:
                continue
        dist[i + 1] = min(dist[i + 1], dist[i] + 1)
    return int(dist[-1]) if dist[-1] != math.inf else len(body)


def main_loop(sass: str, warp_words: bool = False) -> Loop | None:
    """The main loop of a kernel's SASS: of the loops (backward branches) the one with the most
    128-bit global accesses, innermost (shortest) on a tie; None for a kernel without loops.

    ``warp_words``: the loop's 32-bit accesses are the 8-bit states' block scales, one word
    per 256-element quantization block however many threads read it (CUDA: a warp's lanes,
    [note: q8 warps] in csrc/cuda/quant8.cuh; Triton: a tile row, [note: q8 tiles]), so each
    moves 4 bytes per 256 elements: 1/8 byte per thread of 8 elements, not 4.

    Loads marked ``.CONSTANT`` are left out of the bytes: in fusedopt's kernels they are only
    the 8-bit states' code tables (fusedopt/quant8.h: 2 KB, read through the read-only
    cache, no DRAM traffic per element; tests/test_cuda_static.py checks that no other
    kernel has them). Their instructions stay on the path."""
    insns = [(int(a, 16), text) for a, text in _INSN.findall(sass)]
    insns = [(a, t) for a, t in insns if not t.startswith("NOP")]
    loops = []
    for addr, text in insns:
        branch = _BRANCH.search(text)
        if branch and int(branch.group(1), 16) <= addr:
            loops.append([(a, t) for a, t in insns if int(branch.group(1), 16) <= a <= addr])
    if not loops:
        return None

    def summary(body: list[tuple[int, str]]) -> Loop:
        found = [m for _, t in body if (m := _GLOBAL.search(t + " "))]
        found = [m for m in found if "CONSTANT" not in m.group(2).split(".")]

        def moved(m: re.Match) -> float:
            b = access_bytes(m.group(2))
            return b / 32 if warp_words and b == 4 else b

        loads = [moved(m) for m in found if m.group(1) == "LDG"]
        stores = [moved(m) for m in found if m.group(1) == "STG"]
        wide = any(b == 16 for b in loads + stores)
        return Loop(sum(loads), sum(stores), len(loads), len(stores), len(body),
                    _shortest_path(body), wide)  # fmt: skip

    def wide(body: list[tuple[int, str]]) -> int:
        found = [m for _, t in body if (m := _GLOBAL.search(t + " "))]
        return sum(access_bytes(m.group(2)) == 16 for m in found)

    # Most 128-bit accesses, then innermost: a loop that holds a vector path and a scalar
    # one (the 8-bit states' per-block choice, [note: q8 warps] in csrc/cuda/quant8.cuh) has
    # more bytes than its vector path's own loop, but not more 128-bit accesses. Among loops
    # without any, the one that moves the most bytes.
    def key(body: list[tuple[int, str]]) -> tuple[int, float, int]:
        s = summary(body)
        return wide(body), 0 if wide(body) else s.load_bytes + s.store_bytes, -len(body)

    return summary(max(loops, key=key))


@dataclasses.dataclass
class Prediction:
    in_flight: float  # bytes per SM per DRAM round trip
    need: float  # bytes per SM that Little's law asks for
    latency_bound: float
    issue_bound: float
    predicted: float  # fraction of copy bandwidth
    predicted_2x_latency: float


def predict(occ: Occupancy, loop: Loop, gpu: Gpu = H200) -> Prediction:
    """[note: h200 model]: min(1, in flight / need, issue bound)."""
    moved = loop.load_bytes + loop.store_bytes  # 0 for a kernel without a loop: predicted 0
    in_flight = occ.threads * moved
    need = gpu.copy_gbps * gpu.dram_latency_ns / gpu.sms  # GB/s x ns = bytes
    per_sm = gpu.copy_gbps / gpu.sms  # bytes per ns one SM must move
    # Issue: a warp moves 32 x moved bytes per `instructions` warp-instructions.
    issue_rate = gpu.warp_issue_per_clock * gpu.clock_ghz * 32 * moved / max(loop.path, 1)
    issue = min(1.0, issue_rate / per_sm)
    latency = min(1.0, in_flight / need)
    return Prediction(
        in_flight, need, latency, issue, min(latency, issue),
        min(1.0, in_flight / (2 * need), issue),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The kernels: compile, read the cubins.


def _bytes(b: float) -> int | float:
    """Bytes as the table prints them: whole when they are."""
    return int(b) if b == int(b) else b


@dataclasses.dataclass
class KernelRow:
    backend: str  # cuda | triton
    kernel: str
    variant: str
    streaming: bool  # moves tensor elements through the 128-bit path (the goals apply)
    threads_per_block: int
    regs: int
    smem: int
    occ: Occupancy
    loop: Loop | None
    pred: Prediction | None

    def csv_row(self) -> dict:
        lp, pr = self.loop, self.pred
        return {
            "backend": self.backend,
            "kernel": self.kernel,
            "variant": self.variant,
            "streaming": int(self.streaming),
            "vector_loop": int(bool(lp and lp.vector)),
            "threads_per_block": self.threads_per_block,
            "regs": self.regs,
            "smem_bytes": self.smem,
            "blocks_per_sm": self.occ.blocks,
            "threads_per_sm": self.occ.threads,
            "occupancy_pct": round(100 * self.occ.threads / H200.max_threads_per_sm, 1),
            "limiter": self.occ.limiter,
            "loop_loads": lp.loads if lp else "",
            "loop_stores": lp.stores if lp else "",
            "load_bytes_per_thread": _bytes(lp.load_bytes) if lp else "",
            "store_bytes_per_thread": _bytes(lp.store_bytes) if lp else "",
            "loop_instructions": lp.instructions if lp else "",
            "path_instructions": lp.path if lp else "",
            "in_flight_bytes_per_sm": round(pr.in_flight) if pr else "",
            "need_bytes_per_sm": round(pr.need) if pr else "",
            "latency_bound_pct": round(100 * pr.latency_bound, 1) if pr else "",
            "issue_bound_pct": round(100 * pr.issue_bound, 1) if pr else "",
            "predicted_pct": round(100 * pr.predicted, 1) if pr else "",
            "predicted_2x_latency_pct": round(100 * pr.predicted_2x_latency, 1) if pr else "",
        }


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cuda_static():
    """tests/test_cuda_static.py: its nvcc flags, compile and cuobjdump parsing, reused."""
    if "_fusedopt_cuda_static" in sys.modules:
        return sys.modules["_fusedopt_cuda_static"]
    return _load_module("_fusedopt_cuda_static", ROOT / "tests" / "test_cuda_static.py")


def _source_hash(paths: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted(paths):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_CUDA_NAMES = {"AdamWBody": "adamw", "SgdBody": "sgd", "LionBody": "lion",
                "AdanBody": "adan", "ScheduleFreeAdamWBody": "schedulefree_adamw",
                "LambApplyBody": "lamb_apply", "AdafactorApplyBody": "adafactor_apply",
                "MuonMomentumBody": "muon_momentum", "MuonApplyBody": "muon_apply",
                "AdamWQ8Body": "adamw_q8", "LionQ8Body": "lion_q8", "SgdQ8Body": "sgd_q8",
                "LambQ8ApplyBody": "lamb_q8_apply"}  # fmt: skip


#: A Body's MasterKind as the variant labels name it (false/true: no/fp32 masters, as
#: before the compact kind; [note: compact master], [note: kahan master] in
#: fusedopt/_contract.py).
_MASTER_KINDS = {"(MasterKind)0": "false", "(MasterKind)1": "true", "(MasterKind)2": "compact",
                 "(MasterKind)3": "kahan"}  # fmt: skip


def _cuda_label(name: str) -> tuple[str, str]:
    """(kernel, variant) of a demangled CUDA kernel name."""
    short = name.replace("fusedopt::cuda::", "").replace("(anonymous namespace)::", "")
    for kind, label in _MASTER_KINDS.items():
        short = short.replace(kind, label)
    body = re.search(r"step_kernel<(\w+)<([^>]*)>", short)
    if body:
        return _CUDA_NAMES.get(body.group(1), body.group(1)), body.group(2).replace(" ", "")
    plain = re.match(r"(?:void )?(\w+)(?:<([^>]*)>)?\(", short)
    return plain.group(1), (plain.group(2) or "").replace(" ", "")


def cuda_rows(gpu: Gpu = H200) -> list[KernelRow]:
    """Every CUDA kernel: compiled (cached by source hash) and modelled."""
    static = _cuda_static()
    cuda_home = static.SETUP.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit (nvcc): the CUDA part of the model needs one")
    cuobjdump = static._cuobjdump(cuda_home)
    sources = static.CUDA_SOURCES
    include = ROOT / "csrc" / "include"
    nvcc = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--version"],
                          capture_output=True, text=True).stdout  # fmt: skip
    inputs = [*sources, *(ROOT / "csrc" / "cuda").glob("*.cuh"), *include.rglob("*.h")]
    key = _source_hash(inputs, nvcc + " ".join(static.SETUP.NVCC_FLAGS) + static.ARCH)
    out = CACHE / f"cuda-{key}"
    out.mkdir(parents=True, exist_ok=True)
    stats = out / "stats.json"  # (name, regs, shared bytes, SASS) of every kernel
    if not stats.exists():
        found = []
        for source in sources:
            cubin = static._compile(source, out, cuda_home, include)
            usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout  # fmt: skip
            smem = re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:(\d+)", usage)
            demangled = subprocess.run(["c++filt"], input="\n".join(m for m, _ in smem),
                                       capture_output=True, text=True,
                                       check=True).stdout.splitlines()  # fmt: skip
            shared = {pretty: int(b) for pretty, (_, b) in zip(demangled, smem, strict=True)}
            found += [(pretty, k.registers, shared[pretty], k.sass)
                      for pretty, k in static._parse(cuobjdump, cubin).items()]  # fmt: skip
        stats.write_text(json.dumps(found))
    threads = _cuda_threads()
    rows = []
    for pretty, regs, smem, sass in json.loads(stats.read_text()):
        kernel, variant = _cuda_label(pretty)
        block = threads["finish" if "finish" in kernel else
                        "fold" if "fold" in kernel else "default"]  # fmt: skip
        rows.append(_row("cuda", kernel, variant, block, regs, smem, sass, gpu))
    return rows


def _cuda_threads() -> dict[str, int]:
    """Block sizes of the launchers, read from the sources (not restated here)."""
    common = (ROOT / "csrc" / "cuda" / "common.cuh").read_text()
    grad_norm = (ROOT / "csrc" / "cuda" / "grad_norm.cu").read_text()
    lamb = (ROOT / "csrc" / "cuda" / "lamb.cu").read_text()
    pick = lambda text, name: int(re.search(rf"{name}\s*=\s*(\d+)", text).group(1))  # noqa: E731
    return {"default": pick(common, "kThreads"), "finish": pick(grad_norm, "kFinishThreads"),
            "fold": pick(lamb, "kFoldThreads")}  # fmt: skip


#: Kernels that stream tensor elements (a pass over memory), by backend: the ones the goals
#: apply to. The others (norm finish, trust ratios, tables, step counts) touch a few bytes.
#: Adafactor's reductions run a block/program per chunk of whole rows ([note: adafactor sums]),
#: a warp per row with scalar (4-byte, coalesced) loads and g read twice, the second time
#: from cache: not modelled as streaming (this model's loops are the vector path's); its
#: apply pass is.
STREAMING = {
    "cuda": ("adamw", "sgd", "lion", "adan", "schedulefree_adamw", "lamb_apply",
             "lamb_norms_kernel", "grad_norm_partials_kernel", "scale_kernel", "adafactor_apply",
             "muon_momentum", "muon_apply", "adamw_q8", "lion_q8", "sgd_q8", "lamb_q8_apply",
             "lamb_q8_norms_kernel"),
    "triton": ("adamw", "sgd", "lion", "adan", "schedulefree_adamw", "lamb_apply", "lamb_norms",
               "grad_norm_partials", "scale", "adafactor_apply", "muon_momentum", "muon_apply"),
}  # fmt: skip

_NO_LOOP = Loop(0, 0, 0, 0, 0, 0, False)

#: The 8-bit-state kernels, whose main loop's 32-bit accesses are block scales (main_loop's
#: warp_words): their vector loops move p, g and masters in 128-bit and the codes in 64-bit
#: accesses and read the code tables as .CONSTANT (CUDA) or compute them (Triton, [note: q8
#: code formulas]). CUDA names them by kernel, Triton by variant (q8_<case>).
Q8_KERNELS = ("adamw_q8", "lion_q8", "sgd_q8", "lamb_q8_apply", "lamb_q8_norms_kernel")


def _block_scale_words(backend: str, kernel: str, variant: str) -> bool:
    return kernel in Q8_KERNELS if backend == "cuda" else variant.startswith("q8_")


def _row(backend, kernel, variant, block, regs, smem, sass, gpu) -> KernelRow:
    """A kernel modelled. A streaming kernel is predicted from its main loop (0 without one);
    its unaligned fallback too, though no goal applies to it."""
    occ = occupancy(regs, block, smem, gpu)
    loop = main_loop(sass, warp_words=_block_scale_words(backend, kernel, variant))
    streams = kernel in STREAMING[backend]
    streaming = streams and "unaligned" not in variant
    pred = predict(occ, loop or _NO_LOOP, gpu) if streams else None
    return KernelRow(backend, kernel, variant, streaming, block, regs, smem, occ, loop, pred)


def _triton_worker() -> None:
    """In a process without TRITON_INTERPRET: compile every variant, print JSON stats."""
    sys.path.insert(0, str(ROOT / "tests"))
    import triton_static_compile as tsc

    out = []
    for name, kernel, constexprs in tsc.variants():
        aligned = "ALIGNED" in kernel.arg_names
        for suffix, flag in (("", True), ("_unaligned", False)) if aligned else (("", None),):
            extra = {} if flag is None else {"ALIGNED": flag}
            if flag is False and not name.startswith(("adamw_fp32", "adamw_bf16", "scale_")):
                continue  # the unaligned fallbacks the static test compiles
            signature = {
                n: "constexpr" if n in {**constexprs, **extra} else tsc.ARG_TYPES.get(n, "*fp32")
                for n in kernel.arg_names
            }
            src = tsc.triton.compiler.ASTSource(
                fn=kernel, signature=signature, constexprs={**constexprs, **extra}
            )
            compiled = tsc.triton.compile(src, target=tsc.TARGET, options=dict(tsc.LAUNCH_OPTIONS))
            path = CACHE / "triton" / f"{name}{suffix}.cubin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([tsc.CUOBJDUMP, "-sass", str(path)], capture_output=True,
                                  text=True, check=True).stdout  # fmt: skip
            usage = subprocess.run([tsc.CUOBJDUMP, "-res-usage", str(path)],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
            out.append({
                "name": name + suffix, "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
                "smem": int(compiled.metadata.shared),
                "threads": 32 * int(compiled.metadata.num_warps), "sass": sass,
            })  # fmt: skip
    json.dump(out, sys.stdout)


def triton_rows(gpu: Gpu = H200) -> list[KernelRow]:
    """Every Triton variant of tests/triton_static_compile.py, compiled for sm_90 (the stats
    cached by source hash and Triton version), modelled."""
    import triton

    # The kernels' sources, wherever the package maps them (repo root or fusedopt/).
    kernels = [*ROOT.glob("triton_kernels/*.py"), *ROOT.glob("fusedopt/triton_kernels/*.py")]
    assert kernels, "no Triton kernel sources found for the cache key"
    inputs = [*kernels, ROOT / "tests" / "triton_static_compile.py"]
    key = _source_hash(inputs, triton.__version__ + inspect.getsource(_triton_worker))
    cached = CACHE / f"triton-{key}.json"
    if not cached.exists():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        result = subprocess.run([sys.executable, "-m", "bench.h200_model", "--triton-worker"],
                                capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError("Triton compile failed:\n" + result.stderr[-3000:])
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(result.stdout)
    rows = []
    for k in json.loads(cached.read_text()):
        aligned = not k["name"].endswith("_unaligned")
        kernel, _, variant = k["name"].removesuffix("_unaligned").partition("_")
        for op in ("grad_norm_partials", "grad_norm_tensor_norms", "grad_norm_total",
                   "lamb_norms", "lamb_apply", "lamb_fold", "schedulefree_adamw",
                   "muon_momentum", "muon_apply"):  # fmt: skip
            if k["name"].startswith(op):
                kernel, variant = op, k["name"].removeprefix(op).strip("_")
        variant = variant.removesuffix("_unaligned") + ("" if aligned else " (unaligned)")
        rows.append(_row("triton", kernel, variant or "-", k["threads"], k["regs"], k["smem"],
                         k["sass"], gpu))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------
# The launch and host model.

#: Kernel launches per op call of the cuda backend in a steady step (the table is cached, so
#: no upload), read from the launchers: adamw_ = increment_steps + step (adamw.cu),
#: grad_norm = partials + finish (grad_norm.cu), lamb_ = increment_steps + norms + fold
#: (lamb_direction_) + apply (lamb_apply_) (lamb.cu), sgd_ = increment_steps (with
#: momentum) + step (sgd.cu), lion_ = step, adan_ = increment_steps + step (adan.cu),
#: schedulefree_adamw_ = step + the hyperparameter table's host-to-device copy, which it
#: needs at every step (its ckp1 and bias correction change each step; a copy, not a kernel,
#: counted as one); adafactor_ = increment_steps + vectors + rows + columns + updates + fold
#: (adafactor_norms_) + floors + apply (adafactor_apply_) (adafactor.cu); scale_ = one;
#: muon_momentum_ and muon_apply_ one each (muon.cu; the Newton-Schulz GEMMs between them are
#: aten's). Any other op of a step (aten) counts one launch.
CUDA_LAUNCHES_PER_OP = {"adamw": 2, "grad_norm": 2, "lamb": 4, "sgd": 2, "lion": 1, "adan": 2,
                        "schedulefree_adamw": 2, "adafactor": 8, "scale": 1,
                        "muon_momentum": 1, "muon_apply": 1,
                        # a cached plan's ops ([note: planned calls]): the grads' check and
                        # release launch nothing; the norm pass is grad_norm's two; the
                        # planned step is the host rows' AdamW (increment_steps + step)
                        "plan_grads": 0, "plan_release": 0, "plan_grad_norm": 2,
                        "plan_call_step": 2}  # fmt: skip


@dataclasses.dataclass
class HostRow:
    tensors: int
    mode: str
    host_ms: float  # fastest wall time of a step of tiny tensors on the cpu backend
    host_median_ms: float  # its median (inflated on a shared machine by other processes)
    op_calls: int  # top-level op calls per step
    cuda_launches: int  # what those calls launch on the cuda backend
    bytes_per_param: int

    def bound_params(self, gpu: Gpu, predicted: float, launch_us: float) -> float:
        """Params below which a step of this many tensors is launch- or host-bound."""
        floor_s = max(self.host_ms * 1e-3, self.cuda_launches * launch_us * 1e-6)
        return floor_s * gpu.copy_gbps * 1e9 * predicted / self.bytes_per_param


def _ops_per_step(step) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    top, end = [], -1
    for e in events:
        if (e.name.startswith(("aten::", "fusedopt::"))) and e.time_range.start >= end:
            top.append(e.name)
            end = e.time_range.end
    del torch
    return top


def measure_host(counts: tuple[int, ...], modes: tuple[str, ...], repeats: int) -> list[HostRow]:
    """Host time per AdamW step on the cpu backend, tensors of 16 elements (kernel work ~0)."""
    import torch

    import fusedopt
    from bench.traffic import bytes_per_param

    torch.set_num_threads(1)
    rows = []
    for mode in modes:
        amp = mode == "amp"
        for n in counts:
            dtype = torch.bfloat16 if amp else torch.float32
            params = [torch.nn.Parameter(torch.randn(16).to(dtype)) for _ in range(n)]
            for p in params:
                p.grad = torch.randn(16).to(dtype)
            opt = fusedopt.AdamW(params, lr=1e-3, backend="cpu", master_weights=amp,
                                 max_grad_norm=1.0 if amp else None)  # fmt: skip
            for _ in range(3):
                opt.step()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            ops = _ops_per_step(opt.step)
            launches = 0
            for op in ops:
                name = op.removeprefix("fusedopt::").removesuffix("_").removesuffix("_cpu")
                launches += CUDA_LAUNCHES_PER_OP.get(name.rstrip("_"), 1)
            rows.append(HostRow(n, mode, 1e3 * min(times), 1e3 * statistics.median(times),
                                len(ops), launches, bytes_per_param("adamw_", mode)))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------
# Output.

COLUMNS = ("backend", "kernel", "variant", "regs", "occupancy_pct", "limiter",
           "load_bytes_per_thread", "store_bytes_per_thread", "in_flight_bytes_per_sm",
           "need_bytes_per_sm", "issue_bound_pct", "predicted_pct",
           "predicted_2x_latency_pct")  # fmt: skip


def kernel_table(rows: list[KernelRow]) -> str:
    head = ["backend", "kernel", "variant", "regs", "occ %", "limit", "LD B/thr", "ST B/thr",
            "in flight B/SM", "need B/SM", "issue %", "**pred %**", "pred % @2x lat"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        c = r.csv_row()
        cells = [str(c[k]) if c[k] != "" else "-" for k in COLUMNS]
        if r.pred:
            cells[11] = f"**{cells[11]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def host_slopes(rows: list[HostRow]) -> dict[str, list[tuple[int, int, float]]]:
    """mode -> [(n0, n1, us per tensor between them)]: the host cost a tensor adds."""
    slopes = {}
    for mode in dict.fromkeys(h.mode for h in rows):
        pts = sorted((h.tensors, h.host_ms) for h in rows if h.mode == mode)
        slopes[mode] = [(a, b, 1e3 * (tb - ta) / (b - a))
                        for (a, ta), (b, tb) in itertools.pairwise(pts)]  # fmt: skip
    return slopes


def host_table(rows: list[HostRow], gpu: Gpu, launch_us: float, predicted: float) -> str:
    lines = ["| mode | tensors | host ms/step, fastest (median) | op calls | cuda launches | "
             "launches x latency (us) | launch- or host-bound below (params) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for h in rows:
        bound = h.bound_params(gpu, predicted, launch_us)
        lines.append(f"| {h.mode} | {h.tensors} | {h.host_ms:.3f} ({h.host_median_ms:.3f}) | "
                     f"{h.op_calls} | "
                     f"{h.cuda_launches} | {h.cuda_launches * launch_us:.0f} | "
                     f"{bound / 1e6:.1f}M |")  # fmt: skip
    return "\n".join(lines)


def model_steps(rows: list[HostRow], gpu: Gpu, launch_us: float, predicted: float) -> str:
    """Which bound a step of the report's models hits on an H200."""
    from bench.shapes import model_shapes, numel

    lines = ["| model | mode | params | tensors | kernel ms (bytes / predicted bw) | "
             "launch ms | host ms (interpolated) | bound |", "| --- | --- | --- | --- | --- |"
             " --- | --- | --- |"]  # fmt: skip
    for model in ("gpt2", "llama1b"):
        shapes = model_shapes(model)
        n, params = len(shapes), numel(shapes)
        for mode in dict.fromkeys(h.mode for h in rows):
            pts = sorted((h.tensors, h) for h in rows if h.mode == mode)
            host = _interpolate([(t, h.host_ms) for t, h in pts], n)
            launches = pts[0][1].cuda_launches
            kernel_ms = pts[0][1].bytes_per_param * params / (gpu.copy_gbps * 1e9 * predicted)
            kernel_ms *= 1e3
            launch_ms = launches * launch_us * 1e-3
            parts = {"kernel": kernel_ms, "launch": launch_ms, "host": host}
            bound = max(parts, key=parts.get)
            lines.append(f"| {model} | {mode} | {params / 1e6:.0f}M | {n} | {kernel_ms:.3f} | "
                         f"{launch_ms:.3f} | {host:.3f} | **{bound}** |")  # fmt: skip
    return "\n".join(lines)


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Linear in the tensor count between the measured points (extrapolated at the ends)."""
    (x0, y0), (x1, y1) = (points[0], points[1]) if x <= points[1][0] else (points[-2], points[-1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def render(kernels: list[KernelRow], host: list[HostRow], gpu: Gpu, launch_us: float,
           versions: str) -> str:  # fmt: skip
    below = below_goal([r.csv_row() for r in kernels])
    adamw = next((r for r in kernels if r.backend == "cuda" and r.kernel == "adamw"
                  and r.variant == "float,float,false,false"), None)  # fmt: skip
    predicted = adamw.pred.predicted if adamw and adamw.pred else 1.0
    sources = "\n".join(f"- `{k}`: {v}" for k, v in SOURCES.items())
    return "\n".join([
        "# H200 model of every kernel (no GPU: from the sm_90 cubins)",
        "",
        f"Generated by `python -m bench.h200_model` ({versions}). How to read it: "
        "bench/README.md, [note: h200 model] in bench/h200_model.py, DESIGN.md §6. A "
        "prediction is a ceiling set by the parallelism a kernel exposes, not a measurement.",
        "",
        f"Assumed: {gpu.name}, {gpu.sms} SMs, copy bandwidth {gpu.copy_gbps:.0f} GB/s, DRAM "
        f"latency {gpu.dram_latency_ns:.0f} ns, so Little's law needs "
        f"{gpu.copy_gbps * gpu.dram_latency_ns / gpu.sms / 1024:.1f} KiB moving per SM per "
        f"round trip; clock {gpu.clock_ghz} GHz; launch latency {launch_us} us. Sources:",
        "",
        sources,
        "",
        "## Kernels",
        "",
        "Streaming kernels (a main loop with 128-bit accesses) get a prediction; goals: cuda "
        ">= 90%, triton >= 85% of copy bandwidth. LD/ST B/thr: bytes each thread loads and "
        "stores per main-loop iteration (SASS); in flight = resident threads x (LD + ST); "
        "issue % = the instruction-issue bound; pred % = min(in flight / need, issue, 100%); "
        "the last column doubles the latency (a loaded memory system).",
        "",
        "Streaming kernels (aligned path) predicted below their goal: "
        + (", ".join(f"{k} ({v}%)" for k, v in below.items()) or "none") + ". All of them "
        "are issue-bound (the instruction issue, not the bytes in flight, is short): low-"
        "precision storage without master weights, 8 elements per 16-byte access, each "
        "with IEEE division/square root and, for fp16, the exact conversion done in integer "
        "code (fusedopt/dtype.h), costs more instructions per byte than 4 warp-instructions "
        "per clock deliver. fp32 and master-weight variants, the goals' cases, are not.",
        "",
        kernel_table(kernels),
        "",
        "## Launches and host time",
        "",
        "AdamW steps of N tensors of 16 elements on the cpu backend of this machine (1 "
        "thread), so the time is the host's: Python (the cached plan) and the C++ op "
        "dispatch. The cuda backend's host path is the same Python plus a table build, so "
        "this stands in for it; a GPU host CPU is likely faster than this VM. The model uses "
        "the fastest of the repeats: this 2-core VM is shared, and the median carries other "
        "processes' time (load average at the run: "
        f"{os.getloadavg()[0]:.1f}). cuda launches "
        "= the op calls of a step mapped to the launches each makes (CUDA_LAUNCHES_PER_OP). "
        "'Bound below' = the params under which max(launches x latency, host time) exceeds "
        f"the kernel time at {100 * predicted:.0f}% of copy bandwidth (fp32 AdamW's "
        "prediction).",
        "",
        host_table(host, gpu, launch_us, predicted),
        "",
        "Host cost a tensor adds (fastest times, between the counts measured): "
        + "; ".join(f"{mode}: " + ", ".join(f"{per:.2f} us ({a}->{b})" for a, b, per in sl)
                    for mode, sl in host_slopes(host).items())
        + ". Not constant, and noisy at 1000 tensors (the fastest of 50 steps varied 3-8 ms "
        "between runs on this shared VM), so the measured counts are given rather than a "
        "fitted line. Where it goes at 1000 tensors (cProfile, fp32): ~60% in the Python "
        "check of the cached plan (`_match_plan`, a few attribute reads per param), ~20% in "
        "the C++ op (its per-tensor loop; the cuda op builds its table there instead).",
        "",
        "A step of the report's models on an H200, by the same numbers:",
        "",
        model_steps(host, gpu, launch_us, predicted),
        "",
    ])  # fmt: skip


def _versions() -> str:
    import triton

    static = _cuda_static()
    cuda_home = static.SETUP.find_cuda_home()
    nvcc = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--version"],
                          capture_output=True, text=True).stdout  # fmt: skip
    release = re.search(r"release ([\d.]+)", nvcc)
    return f"nvcc {release.group(1) if release else '?'}, Triton {triton.__version__}"


def write(kernels: list[KernelRow], host: list[HostRow], out: Path, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "h200_model.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(kernels[0].csv_row()))
        writer.writeheader()
        writer.writerows(r.csv_row() for r in kernels)
    with open(out / "h200_host_model.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(HostRow)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(h) for h in host)
    (out / "h200_model.md").write_text(text)


def below_goal(rows: list[dict]) -> dict[str, float]:
    """'backend kernel [variant]' -> predicted % for every streaming kernel (aligned path) whose
    prediction is under its backend's goal (rows: :meth:`KernelRow.csv_row` dicts)."""
    return {
        f"{r['backend']} {r['kernel']} [{r['variant']}]": float(r["predicted_pct"])
        for r in rows
        if int(r["streaming"]) and float(r["predicted_pct"]) < 100 * GOALS[r["backend"]]
    }


def read_predictions(path: Path = RESULTS / "h200_model.csv") -> dict[tuple[str, str, str], float]:
    """(backend, kernel, variant) -> predicted % of copy bandwidth, from a written model."""
    if not path.exists():
        return {}
    with open(path) as f:
        return {(r["backend"], r["kernel"], r["variant"]): float(r["predicted_pct"])
                for r in csv.DictReader(f) if r["predicted_pct"]}  # fmt: skip


#: The kernel whose prediction stands beside a report row: (backend, mode) -> (kernel,
#: variant). fp32 AdamW without AMSGrad; amp: bf16 params and grads with fp32 masters.
REPORT_KERNELS = {
    ("cuda", "fp32"): ("adamw", "float,float,false,false"),
    ("cuda", "amp"): ("adamw", "bf16,bf16,true,false"),
    ("triton", "fp32"): ("adamw", "fp32"),
    ("triton", "amp"): ("adamw", "fp16_master"),
}


def report_section(rows, device: str, path: Path = RESULTS / "h200_model.csv") -> str:
    """Markdown for bench/report.py: predicted % of copy bandwidth beside the measured % of the
    run's bandwidth ceiling (AdamW)."""
    predictions = read_predictions(path)
    if not predictions:
        return f"No H200 model at {path}: run `python -m bench.h200_model`."
    lines = ["| implementation | mode | step kernel modelled | predicted % copy (H200 model) | "
             "measured % of ceiling |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for (backend, mode), (kernel, variant) in REPORT_KERNELS.items():
        row = next((r for r in rows if r.impl == f"fusedopt {backend}" and r.mode == mode
                    and r.optimizer == "adamw"), None)  # fmt: skip
        if row is not None and row.ok and device == "cuda":
            measured = f"{row.pct_ceiling:.1f}"
        else:
            measured = "not measured (needs --device cuda)" if device != "cuda" else "not run"
        predicted = predictions.get((backend, kernel, variant))
        lines.append(f"| fusedopt {backend} | {mode} | {kernel} [{variant}] | "
                     f"{predicted if predicted is not None else '?'} | {measured} |")  # fmt: skip
    lines += ["", "Predicted: the step kernel alone, at the model's 4.3 TB/s; measured: the whole "
              "step (amp: the grad_norm pass too) against the bandwidth ceiling of this run "
              "(the best of STREAM's copy, scale, add and triad, bench/timing.py). "
              "Triton's modelled variants are the static check's, compiled with every option on "
              "(AMSGrad, maximize); its amp row uses fp16_master, the nearest compiled variant "
              "to bf16 with fp32 masters."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h200_model", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--latency-ns", type=float, default=H200.dram_latency_ns)
    parser.add_argument("--copy-gbps", type=float, default=H200.copy_gbps)
    parser.add_argument("--launch-us", type=float, default=LAUNCH_US)
    parser.add_argument("--tensors", default="10,150,1000")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--kernels-only", action="store_true", help="skip the host timing")
    parser.add_argument("--json", action="store_true", help="print the kernel rows as JSON")
    parser.add_argument("--triton-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.triton_worker:
        _triton_worker()
        return 0
    gpu = dataclasses.replace(H200, dram_latency_ns=args.latency_ns, copy_gbps=args.copy_gbps)
    kernels = cuda_rows(gpu) + triton_rows(gpu)
    if args.json:
        json.dump([r.csv_row() for r in kernels], sys.stdout)
        return 0
    counts = tuple(int(x) for x in args.tensors.split(","))
    host = [] if args.kernels_only else measure_host(counts, ("fp32", "amp"), args.repeats)
    text = render(kernels, host, gpu, args.launch_us, _versions()) if host else ""
    if host:
        write(kernels, host, args.out, text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
