"""Static checks of the CUDA kernels (DESIGN.md §5), no GPU needed.

Every ``csrc/cuda/*.cu`` file is compiled for sm_90 to a cubin with setup.py's own nvcc flags,
and its SASS (``cuobjdump``: the toolkit's, else the one in Triton's wheel) must show:

* every kernel the launchers can pick: one step kernel per (param dtype, grad dtype, master
  weights) combination of DESIGN.md §3 and per compile-time variant, plus the reduction and
  table kernels;
* 128-bit global loads (``LDG.E.128``) in every kernel that streams tensors, and 128-bit
  stores (``STG.E.128``) in every one that writes them: the aligned path of
  [note: vector path] (csrc/include/fusedopt/multi_tensor.h);
* nothing in local memory: zero stack frame, zero local bytes, no ``LDL``/``STL`` (spills).

``test_checker_catches_scalar_only_kernels`` compiles scale.cu with the vector path removed
and asserts the 128-bit check fails, so the check is known to bite.
Skips (with the reason) where nvcc, cuobjdump or c++filt is missing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCH = "sm_90"


def _setup_module():
    """setup.py as a module (its ``main()`` only runs as ``__main__``): the flags and the
    toolkit search are the build's own."""
    spec = importlib.util.spec_from_file_location("_fusedopt_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _setup_module()


def _cuobjdump(cuda_home: str) -> str | None:
    tool = Path(cuda_home, "bin", "cuobjdump")
    if tool.exists():
        return str(tool)
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec and triton_spec.origin:
        tool = Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    return shutil.which("cuobjdump")


@dataclasses.dataclass
class Kernel:
    name: str  # demangled
    sass: str
    registers: int
    stack: int
    local: int


def _parse(cuobjdump: str, cubin: Path) -> dict[str, Kernel]:
    """Kernels of a cubin by demangled name, with their SASS and resource usage."""
    sass = subprocess.run(
        [cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    usage = subprocess.run(
        [cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    bodies = dict(
        re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*\.{5,}|\n\s*Function : |\Z)", sass, re.S)
    )
    resources = re.findall(
        r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage
    )
    mangled = [name for name, *_ in resources]
    demangled = subprocess.run(
        ["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    kernels = {}
    for (name, reg, stack, local), pretty in zip(resources, demangled, strict=True):
        kernels[pretty] = Kernel(pretty, bodies.get(name, ""), int(reg), int(stack), int(local))
    return kernels


def _compile(source: Path, out_dir: Path, cuda_home: str, include: Path) -> Path:
    cubin = out_dir / (source.stem + ".cubin")
    cmd = [
        str(Path(cuda_home, "bin", "nvcc")),
        *SETUP.NVCC_FLAGS,
        "-cubin",
        f"-arch={ARCH}",
        f"-I{include}",
        f"-I{Path(cuda_home, 'include')}",
        str(source),
        "-o",
        str(cubin),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    return cubin


@pytest.fixture(scope="module")
def toolchain():
    cuda_home = SETUP.find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) found: the CUDA static checks need one")
    cuobjdump = _cuobjdump(cuda_home)
    if cuobjdump is None:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit nor in Triton's wheel)")
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt (binutils) to demangle kernel names")
    if not CUDA_SOURCES:
        pytest.skip("no csrc/cuda/*.cu sources")
    return cuda_home, cuobjdump


@pytest.fixture(scope="module")
def kernels(toolchain, tmp_path_factory) -> dict[str, Kernel]:
    cuda_home, cuobjdump = toolchain
    out = tmp_path_factory.mktemp("cubins")
    include = ROOT / "csrc" / "include"
    workers = max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        cubins = list(pool.map(lambda s: _compile(s, out, cuda_home, include), CUDA_SOURCES))
    found: dict[str, Kernel] = {}
    for cubin in cubins:
        found.update(_parse(cuobjdump, cubin))
    return found


# The (param, grad, master) storage combinations of DESIGN.md §3, as the kernels name them:
# the master is a MasterKind (csrc/cuda/common.cuh: none, fp32, compact, Kahan), compact for
# bf16 only ([note: compact master] in fusedopt/_contract.py), Kahan for bf16 and fp16
# ([note: kahan master]).
_NS = "fusedopt::cuda::"
_LOW = (_NS + "bf16", _NS + "fp16")
NO_MASTER, FP32_MASTER, COMPACT_MASTER, KAHAN_MASTER = (f"({_NS}MasterKind){k}" for k in range(4))
STORAGE = (
    [("float", "float", NO_MASTER)]
    + [
        (p, g, m)
        for p in _LOW
        for g in (p, "float")
        for m in (NO_MASTER, FP32_MASTER, KAHAN_MASTER)
    ]
    + [(_NS + "bf16", g, COMPACT_MASTER) for g in (_NS + "bf16", "float")]
    + [("double", "double", NO_MASTER), ("double", "float", NO_MASTER)]
)


def _expected() -> dict[str, tuple[str, ...]]:
    """Demangled-name fragment -> the global accesses that kernel must vectorise."""
    both, loads = ("LDG", "STG"), ("LDG",)
    expected: dict[str, tuple[str, ...]] = {
        "scale_kernel(": both,
        "write_table_kernel(": (),
        "increment_steps_kernel(": (),
    }
    for acc in ("float", "double"):
        for inf in ("false", "true"):
            expected[f"grad_norm_partials_kernel<{acc}, {inf}>("] = loads
            expected[f"grad_norm_finish_kernel<{acc}, {inf}>("] = ()
        expected[f"lamb_fold_kernel<{acc}>("] = ()
        expected[f"adafactor_fold_kernel<{acc}>("] = ()
    for p, g, m in STORAGE:
        types = f"{p}, {g}, {m}"
        for variant in ("true", "false"):
            expected[f"AdamWBody<{types}, {variant}>"] = both
            expected[f"SgdBody<{types}, {variant}>"] = both
            expected[f"MuonMomentumBody<{types}, {variant}>"] = both  # nesterov
        expected[f"LionBody<{types}>"] = both
        expected[f"AdanBody<{types}>"] = both
        expected[f"ScheduleFreeAdamWBody<{types}>"] = both
        expected[f"LambApplyBody<{types}>"] = both
        expected[f"MuonApplyBody<{types}>"] = both
        state = "float" if m != NO_MASTER else p  # StateOf (csrc/cuda/step.cuh)
        expected[f"lamb_norms_kernel<{state}, {types}>("] = loads
        # Adafactor's reductions walk a chunk's rows a warp per row (or its columns a thread
        # per column) with scalar accesses, coalesced: 32 consecutive elements per warp
        # access (csrc/cuda/adafactor.cu); its apply takes p and g on the vector path.
        for kernel in ("vectors", "rows", "columns", "updates", "floor"):
            expected[f"adafactor_{kernel}_kernel<{types}>("] = ()
        expected[f"AdafactorApplyBody<{types}>"] = both
        # 8-bit states: a warp per quantization block, 8 elements per lane ([note: q8
        # warps] in csrc/cuda/quant8.cuh): p, g and masters in 128-bit accesses (the codes
        # in 64-bit ones); not for fp64 params (refused: dispatch_q8_types).
        if p == "double":
            continue
        expected[f"AdamWQ8Body<{types}>"] = both
        expected[f"LionQ8Body<{types}>"] = both
        expected[f"SgdQ8Body<{types}>"] = both
        expected[f"LambQ8ApplyBody<{types}>"] = both
        expected[f"lamb_q8_norms_kernel<{types}>("] = loads
    # [note: state dtype]: the states of AdamW, LAMB, Lion and SGD in another storage than
    # StateOf's (fp32 with masters, else the param's): dispatch_step_states's
    # instantiations, the storages kCudaStateStorage builds (csrc/cuda/step.cuh): fp32
    # params with 16-bit states, bf16 params with masters and bf16 states.
    for p, g, m in STORAGE:
        if p == "float":
            states = (_NS + "bf16", _NS + "fp16")
        elif p == _NS + "bf16" and m != NO_MASTER:
            states = (_NS + "bf16",)
        else:
            continue
        for s in states:
            for variant in ("true", "false"):
                expected[f"AdamWBodyOf<{s}, {p}, {g}, {m}, {variant}>"] = both
            expected[f"SgdBodyOf<{s}, {p}, {g}, {m}, true>"] = both  # with buffers only
            expected[f"LionBodyOf<{s}, {p}, {g}, {m}>"] = both
            expected[f"LambApplyBodyOf<{s}, {p}, {g}, {m}>"] = both
            expected[f"lamb_norms_kernel<{s}, {p}, {g}, {m}>("] = loads
    return expected


EXPECTED = _expected()

_VECTOR = {op: re.compile(rf"\b{op}(\.[A-Z0-9_]+)*\.128\b") for op in ("LDG", "STG")}


def _matching(kernels: dict[str, Kernel], fragment: str) -> list[Kernel]:
    return [k for name, k in kernels.items() if fragment in name]


def missing_vector_accesses(kernels: dict[str, Kernel]) -> list[str]:
    """Expected kernels lacking a required 128-bit access: '<kernel>: no LDG.E.128'."""
    problems = []
    for fragment, ops in EXPECTED.items():
        for kernel in _matching(kernels, fragment):
            problems += [
                f"{kernel.name}: no {op}.E.128" for op in ops if not _VECTOR[op].search(kernel.sass)
            ]
    return problems


def test_every_kernel_compiles_for_sm90(kernels):
    missing = [f for f in EXPECTED if len(_matching(kernels, f)) != 1]
    assert not missing, f"kernels missing (or ambiguous) in the sm_90 build: {missing}"
    unexpected = [n for n in kernels if not any(f in n for f in EXPECTED)]
    assert not unexpected, f"kernels the static checks do not know: {unexpected}"


def test_aligned_path_uses_128_bit_accesses(kernels):
    assert not missing_vector_accesses(kernels)


#: Kernels known to use local memory, by a substring of their demangled name, with the reason
#: (measured with nvcc 13.0, sm_90). The test fails when one of them stops using it, so that
#: the entry goes. adafactor_rows_kernel<fp16, fp16, Kahan masters>: one register (8-byte
#: stack) spilled around the grad loads' IEEE-division slow-path calls in the row-sum loop;
#: computing sum p^2 after the grad loops instead moved the spill to the bf16 fp32-master
#: builds.
KNOWN_LOCAL_MEMORY = {
    "adafactor_rows_kernel<fusedopt::cuda::fp16, fusedopt::cuda::fp16, "
    "(fusedopt::cuda::MasterKind)3>",
}


def test_no_local_memory_or_spills(kernels):
    used = {
        k.name: f"{k.name}: stack {k.stack} B, local {k.local} B"
        for k in kernels.values()
        if k.stack or k.local or re.search(r"\b(LDL|STL)\b", k.sass)
    }
    bad = [line for name, line in used.items() if not any(s in name for s in KNOWN_LOCAL_MEMORY)]
    assert not bad, "kernels using local memory (spills or stack arrays):\n" + "\n".join(bad)
    gone = [s for s in KNOWN_LOCAL_MEMORY if not any(s in name for name in used)]
    assert not gone, f"no longer using local memory, drop from KNOWN_LOCAL_MEMORY: {gone}"


def test_constant_loads_are_only_the_8bit_code_tables(kernels):
    """bench/h200_model.py leaves ``.CONSTANT`` loads out of a loop's bytes as reads of the
    8-bit states' code tables (fusedopt/quant8.h); no other kernel may have them."""
    others = [
        k.name
        for k in kernels.values()
        if re.search(r"\bLDG(\.[A-Z0-9_]+)*\.CONSTANT\b", k.sass)
        and not any(s in k.name for s in ("q8_step_kernel<", "lamb_q8_norms_kernel<"))
    ]
    assert not others, f"read-only (.CONSTANT) loads outside the 8-bit kernels: {others}"


def test_checker_catches_scalar_only_kernels(toolchain, tmp_path):
    """With the vector path of multi_tensor.h removed, the 128-bit check must fail."""
    cuda_home, cuobjdump = toolchain
    include = tmp_path / "include"
    shutil.copytree(ROOT / "csrc" / "include", include)
    header = include / "fusedopt" / "multi_tensor.h"
    text = header.read_text()
    # Both lines: with only nvec = 0 the vector loop survives as dead code (the compiler
    # cannot prove tid >= 0), and its LDG.E.128 would still be in the SASS.
    patch = {
        "const int32_t nvec = aligned ? span.len / W : 0;": "const int32_t nvec = 0;",
        "for (int32_t v = tid; v < nvec; v += nthreads) vec(span.start + int64_t{v} * W);": (
            "(void)vec;"
        ),
    }
    for old, new in patch.items():
        assert old in text, "multi_tensor.h changed: update this test's patch"
        text = text.replace(old, new)
    header.write_text(text)
    source = tmp_path / "scale.cu"
    shutil.copy(ROOT / "csrc" / "cuda" / "scale.cu", source)
    for helper in (ROOT / "csrc" / "cuda").glob("*.cuh"):
        shutil.copy(helper, tmp_path / helper.name)
    scalar_only = _parse(cuobjdump, _compile(source, tmp_path, cuda_home, include))
    problems = missing_vector_accesses(scalar_only)
    assert any("scale_kernel" in p and "LDG" in p for p in problems), problems
    assert any("scale_kernel" in p and "STG" in p for p in problems), problems


def test_cuda_extension_links_the_cuda_runtime():
    """A _C built with its CUDA part must name libcudart as a dependency (the kernels'
    launches go through it; without it the import fails on a GPU machine only)."""
    try:
        import fusedopt._C as ext
    except ImportError as error:
        pytest.skip(f"fusedopt._C is not built ({error})")
    if not getattr(ext, "WITH_CUDA", False):
        pytest.skip("fusedopt._C was built without its CUDA part")
    if shutil.which("readelf") is None:
        pytest.skip("no readelf (binutils) to read the extension's dependencies")
    dynamic = subprocess.run(
        ["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert any(lib.startswith("libcudart.so") for lib in needed), needed
