#!/usr/bin/env bash
# Create .venv (if missing) with everything fusedopt needs, and build fusedopt._C in place.
# Idempotent: a second run only rebuilds what changed. Works on a fresh machine with PyPI.
#   FUSEDOPT_TORCH  torch requirement (default: torch==2.14.1, the CUDA 13 build, so that
#                   the CUDA part of _C compiles and links here even without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${FUSEDOPT_TORCH:-torch==2.14.1}" "triton>=3.6" ninja \
  numpy pytest pytest-benchmark matplotlib ruff cmake
# Test oracles only, never runtime deps: --no-deps so that they cannot replace the torch above
# (schedulefree: AdamWScheduleFree, the anchor of fusedopt.ScheduleFreeAdamW).
python -m pip install -q --no-deps "schedulefree==1.4.1"
# In-place build: fusedopt._C lands next to the sources; no build isolation, so the torch
# above (not a second download) is the one we compile against.
# The compiler lines go to build.log; on failure its tail is printed.
start=$(date +%s)
if ! MAX_JOBS=${MAX_JOBS:-2} python setup.py -q build_ext --inplace > build.log 2>&1; then
  tail -n 80 build.log
  echo "fusedopt: building fusedopt._C failed (full log: build.log)" >&2
  exit 1
fi
python -c "import fusedopt; print(*fusedopt.backends().values(), sep='\n')"
echo "fusedopt: built fusedopt._C in $(( $(date +%s) - start )) s"
