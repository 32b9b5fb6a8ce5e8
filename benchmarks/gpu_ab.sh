#!/usr/bin/env bash
# A/B on the lent GPU: the working tree (B) against a baseline source tree in .ab_base/ (A), made here with
#   rm -rf .ab_base && mkdir .ab_base && git archive REV flashtree kernels_cu | tar -x -C .ab_base
# (untracked, so it travels; never commit it). Rows are benchmarks/ab.py specs; runs A B A B so drift shows.
# Usage: bash benchmarks/gpu_ab.sh SPEC ...     (writes $OUT/ab.txt)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
export PYTHONUNBUFFERED=1
base_path=$PWD/.ab_base${PYTHONPATH:+:$PYTHONPATH}
for round in 1 2; do
  FLASHTREE_CACHE_DIR=/tmp/ftcache_a PYTHONPATH=$base_path python3 benchmarks/ab.py "A$round" "$@" 2>&1 | grep -v DEBUG | tee -a "$OUT/ab.txt"
  FLASHTREE_CACHE_DIR=/tmp/ftcache_b python3 benchmarks/ab.py "B$round" "$@" 2>&1 | grep -v DEBUG | tee -a "$OUT/ab.txt"
done
