#!/usr/bin/env bash
# Benchmarks on the lent GPU with FlashInfer carried in .whl/: bash benchmarks/gpu_bench.sh SUITE...
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export FLASHTREE_CACHE_DIR=/tmp/ftcache PYTHONUNBUFFERED=1
for suite in "$@"; do
  python3 -m flashtree.bench "$suite" --out "$OUT/$suite" 2>&1 | grep -v DEBUG | tee -a "$OUT/bench.log" | tail -30
done
