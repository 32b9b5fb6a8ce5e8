#!/usr/bin/env bash
# Kernel-variant exploration on the lent GPU (FlashInfer from .whl/ when carried), then the GPU tests.
# Usage: [SKIP_TESTS=1] bash benchmarks/gpu_explore.sh [diag.py subcommand ...]   (default: variants mergevariants)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
export FLASHTREE_CACHE_DIR=/tmp/ftcache PYTHONUNBUFFERED=1
for cmd in "${@:-variants mergevariants}"; do
  for sub in $cmd; do
    echo "== diag $sub"; python3 benchmarks/diag.py $sub 2>&1 | grep -v DEBUG | tee "$OUT/$sub.txt"
  done
done
[ "${SKIP_TESTS:-0}" = 1 ] && exit 0
echo "== GPU tests"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | grep -v DEBUG > "$OUT/gpu_tests.log"; tail -25 "$OUT/gpu_tests.log"
