#!/usr/bin/env bash
# The README's main job: set up (scripts/setup_env.sh: .venv, build fusedopt._C), then run the
# benchmark report, `python -m bench.report` (bench/report.py): every optimizer, precision mode
# and usable backend beside torch's peers on real models' parameter lists. It prints a Markdown
# table and writes CSV/MD/PNG under bench/results/. Extra arguments pass through, e.g.
#   bash scripts/run_main.sh --quick
#   bash scripts/run_main.sh --device cuda --model llama1b --out /tmp/results
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m bench.report "$@"
