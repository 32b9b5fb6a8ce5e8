#!/usr/bin/env bash
# The GPU proof, run on the lent machine from the repo root: tests, sanitizers, compile timings.
# Usage: bash benchmarks/gpu_check.sh [pytest -k filter]   (writes $OUT/gpu_check.log)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  export FLASHTREE_CACHE_DIR=/tmp/ftcache PYTHONUNBUFFERED=1
  python3 -m flashtree info | head -8
  echo "== compile timing"; python3 benchmarks/compile_timing.py
  echo "== profile"; python3 benchmarks/profile_first_call.py 2>&1 | head -45
  echo "== GPU tests"; python3 -m pytest -q -m gpu -p no:cacheprovider tests ${1:+-k "$1"} 2>&1 | grep -v DEBUG > "$OUT/gpu_tests.log"; tail -60 "$OUT/gpu_tests.log"
  for script in benchmarks/sanitize*.py; do
    for tool in memcheck racecheck; do
      echo "== $tool $script"; compute-sanitizer --tool $tool --print-limit 10 python3 "$script" 2>&1 | grep -v DEBUG | tail -4
    done
  done
} 2>&1 | tee "$LOG"
