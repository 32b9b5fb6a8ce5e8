#!/usr/bin/env bash
# Profile decode/merge with ncu (hardware counters, clocks left alone): bash benchmarks/gpu_diag.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export FLASHTREE_CACHE_DIR=/tmp/ftcache PYTHONUNBUFFERED=1
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
prof() {  # name, kernel regex, args...
  local name=$1 re=$2; shift 2
  echo "== $name" >> "$OUT/ncu.txt"
  ncu --clock-control none -k "regex:$re" --launch-skip 2 --launch-count 1 $SECTIONS python3 benchmarks/diag.py "$@" 2>&1 \
    | grep -v "^==PROF==" | sed -n '/Section:/,$p' >> "$OUT/ncu.txt"
}
prof "decode 8,8192,64" tree_decode decode 8 8192 64
prof "decode 1,32768,64" tree_decode decode 1 32768 64
prof "decode 64,4096,4" tree_decode decode 64 4096 4
prof "decode paged 64,4096,4" tree_decode decode 64 4096 4 64 1
prof "decode combine 64,4096,4" merge_states decode 64 4096 4
prof "merge 131072,4" merge_states merge 131072 4
