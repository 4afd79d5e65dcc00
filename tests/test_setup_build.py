"""setup.py's toolkit discovery (issue 2): the real CUDA root behind an ``nvcc`` wrapper, and
the toolkit's headers ahead of the ``nvidia`` wheels' copies. No GPU needed; skips without
a CUDA toolkit."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("_fusedopt_setup_build", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() only runs as __main__
    return module


SETUP = _setup_module()


@pytest.fixture(scope="module")
def cuda_home() -> str:
    home = SETUP.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    return home


def test_found_toolkit_has_compiler_and_runtime_headers(cuda_home):
    assert Path(cuda_home, "bin", "nvcc").exists()
    assert Path(cuda_home, "include", "cuda_runtime.h").exists()


def test_wrapper_script_resolves_to_the_real_toolkit(cuda_home, tmp_path, monkeypatch):
    # Like /usr/local/bin/nvcc on some images: a script whose own folder has no headers.
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {Path(cuda_home, "bin", "nvcc")} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    assert os.path.realpath(SETUP._nvcc_top(str(wrapper))) == os.path.realpath(cuda_home)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    found = SETUP.find_cuda_home()
    assert found is not None and found != os.path.realpath(tmp_path)
    assert Path(found, "include", "cuda_runtime.h").exists()


def test_toolkit_headers_come_before_the_wheels(cuda_home):
    dirs = SETUP.cuda_include_dirs(cuda_home)
    assert dirs[0] == os.path.join(cuda_home, "include")
    assert dirs[1:] == [d for d in SETUP.nvidia_wheel_include_dirs() if d != dirs[0]]
