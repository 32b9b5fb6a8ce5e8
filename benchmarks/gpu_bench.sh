#!/usr/bin/env bash
# Benchmarks on the lent GPU with FlashInfer carried in .whl/: bash benchmarks/gpu_bench.sh SUITE...
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
export FLASHTREE_CACHE_DIR=/tmp/ftcache PYTHONUNBUFFERED=1
for suite in "$@"; do
  python3 -m flashtree.bench "$suite" --out "$OUT/$suite" 2>&1 | grep -v DEBUG | tee -a "$OUT/bench.log" | tail -30
done
