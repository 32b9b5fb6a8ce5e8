set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
export FLASHTREE_CACHE_DIR=/tmp/ftcache PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode.py -k "paged or workspace" 2>&1 | tail -2
S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats"
for args in "32 2048 8 64 0" "32 2048 8 64 1"; do
  echo "== decode $args" >> $OUT/ncu_paged.txt
  ncu --clock-control none -k regex:tree_decode --launch-skip 2 --launch-count 1 $S python3 benchmarks/diag.py decode $args 2>&1 | grep -v "^==PROF==" | sed -n '/Section:/,$p' >> $OUT/ncu_paged.txt
done
grep -E "^==|Duration|Registers|Stall|Issue Slots|Eligible|Active Warps|Memory Throughput|DRAM Through|L1/TEX Hit|L2 Hit|Achieved Occupancy|Block Limit|Dynamic Shared|Static Shared" $OUT/ncu_paged.txt
