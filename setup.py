"""Build ``fusedopt._C``: the CPU C++ kernels always, the CUDA kernels when possible.

Switches (environment variables):
  FUSEDOPT_CUDA=auto|1|0   build the CUDA part: auto (default) does when nvcc and a CUDA
                           build of torch are found; 1 insists (error if impossible); 0 never.
  TORCH_CUDA_ARCH_LIST     GPU architectures, as torch reads it (e.g. "9.0" or "8.0;9.0").
                           Default: the visible GPU's, else "9.0".
  FUSEDOPT_NO_EXT=1        build no extension at all (pure Python + Triton install).

The CUDA toolkit root and the CUDA library headers that ship in torch's ``nvidia`` wheels are
found here, so that pip-installed torch plus any nvcc works without setting paths by hand.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Pinned contraction (DESIGN.md §2): explicit fmaf where an FMA is meant, none elsewhere, so
# the CPU and GPU builds round alike. C++20: torch 2.14's headers #error under C++17.
# tests/test_cuda_static.py compiles the kernels with NVCC_FLAGS too. -fno-math-errno lets
# g++ vectorise sqrtf (errno never reports anything here); rounding is unchanged.
CXX_FLAGS = (
    "-O3",
    "-std=c++20",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",
    "-march=x86-64-v3",
)
NVCC_FLAGS = ("-O3", "-std=c++20", "-fmad=false", "--expt-relaxed-constexpr", "-lineinfo")


def _is_cuda_home(home: str | None) -> bool:
    return bool(home) and all(
        os.path.exists(os.path.join(home, *part))
        for part in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit an ``nvcc`` really belongs to. ``nvcc`` on PATH may be a wrapper script
    (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) whose own folder holds no headers; a
    dry run prints the real root as ``TOP=``."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "x.cu", "-o", "x.o"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.normpath(line.split("TOP=", 1)[1].strip())  # "<root>/bin/.."
    return None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (a folder with ``bin/nvcc`` and ``include/cuda_runtime.h``):
    $CUDA_HOME, $CUDA_PATH, the toolkit of nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(_nvcc_top(nvcc))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((os.path.realpath(h) for h in candidates if _is_cuda_home(h)), None)


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the ``nvidia-*`` wheels torch depends on (cuBLAS, cuSPARSE...):
    ATen's CUDA headers include them, and a bare toolkit may lack them."""
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(dirs))


def cuda_include_dirs(cuda_home: str) -> list[str]:
    """Include folders for the CUDA part, the toolkit's own first.

    torch appends ``$CUDA_HOME/include`` *after* the extension's own folders, so the wheel
    folders alone would shadow the toolkit: ``nvidia/cu13/include`` ships its own
    ``cuda_runtime.h``, which may be another minor version than the nvcc compiling against
    it. Listing the toolkit first makes its headers win wherever both have one; the wheels
    then only fill in what a minimal toolkit lacks (cuBLAS, cuSPARSE... that ATen includes).
    """
    toolkit = os.path.join(cuda_home, "include")
    return [toolkit, *(d for d in nvidia_wheel_include_dirs() if d != toolkit)]


def cuda_wanted() -> bool:
    mode = os.environ.get("FUSEDOPT_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if find_cuda_home() is None:
        reasons.append("no CUDA toolkit (nvcc) found")
    if reasons:
        if mode in ("1", "on", "true", "yes"):
            sys.exit("FUSEDOPT_CUDA=1 but the CUDA part cannot be built: " + "; ".join(reasons))
        print("fusedopt: building without CUDA: " + "; ".join(reasons))
        return False
    return True


def default_arch_list() -> str:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def extensions():
    if os.environ.get("FUSEDOPT_NO_EXT") == "1":
        return [], {}
    with_cuda = cuda_wanted()
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = find_cuda_home()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    from torch.utils import cpp_extension

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = list(CXX_FLAGS)
    if os.uname().machine != "x86_64":
        cxx.remove("-march=x86-64-v3")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    macros = []
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
        include_dirs += cuda_include_dirs(find_cuda_home())
        macros.append(("FUSEDOPT_WITH_CUDA", "1"))
        cls = cpp_extension.CUDAExtension
        args = {"cxx": cxx, "nvcc": list(NVCC_FLAGS)}
    else:
        cls = cpp_extension.CppExtension
        args = {"cxx": cxx}
    if not sources:
        return [], {}
    ext = cls(
        "fusedopt._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def main() -> None:
    ext_modules, cmdclass = extensions()
    setup(
        name="fusedopt",
        version="0.1.0",
        description="Fused multi-tensor optimizer kernels for PyTorch (CUDA C++, Triton, C++ CPU)",
        packages=["fusedopt", "fusedopt.optim", "fusedopt.reference", "fusedopt.triton_kernels"],
        python_requires=">=3.10",
        install_requires=["torch>=2.11"],
        extras_require={"triton": ["triton>=3.6"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


# setuptools' PEP 517 backend also runs this file as __main__; tests import it for the flags.
if __name__ == "__main__":
    main()
