#!/usr/bin/env bash
# One session's closing GPU run, in two calls that each fit the device's 10-minute limit:
#   bash benchmarks/gpu_final.sh check   GPU tests, sanitizers, compile timings, decode variants
#   bash benchmarks/gpu_final.sh bench [suite ...]   benchmark suites (default all; FlashInfer from .whl/)
# Everything lands in $OUT/<part>.tar.gz (the device returns few files) plus the part's log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
part=${1:?check or bench}
work=/tmp/final_$part; mkdir -p "$work"
if [ "$part" = check ]; then
  OUT=$work bash benchmarks/gpu_check.sh
  OUT=$work SKIP_TESTS=1 bash benchmarks/gpu_explore.sh variants mergevariants > /dev/null 2>&1 || true
else
  shift
  for suite in "${@:-merge verify dfs shared-prefix speculative}"; do
    for one in $suite; do
      OUT=$work bash benchmarks/gpu_bench.sh "$one"
      tar -czf "$OUT/$part.tar.gz" -C "$work" .  # after each suite: a timeout keeps what finished
    done
  done
fi
tar -czf "$OUT/$part.tar.gz" -C "$work" .
tail -c 6000 "$work"/*.log
