#!/usr/bin/env bash
# The README's test command: set up (scripts/setup_env.sh), then run every test suite:
# ruff, pytest (reference, cpu, triton under TRITON_INTERPRET=1; GPU tests skip without one)
# and the torch-free C++ tests with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
if [ -f CMakeLists.txt ]; then
  cmake -S . -B ctest-build -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build ctest-build -j 2 >/dev/null
  ctest --test-dir ctest-build --output-on-failure
fi
