#!/usr/bin/env bash
# ncu of one kernel launch on the lent GPU: sections plus stall and pipe metrics, into $OUT/ncu_NAME.txt.
# Usage: bash benchmarks/gpu_ncu.sh NAME KERNEL_REGEX diag.py-args...
#   e.g. bash benchmarks/gpu_ncu.sh deft_long deft_partial deft_row 1
set -uo pipefail
OUT=${OUT:-/tmp/out}
name=$1 regex=$2; shift 2
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export FLASHTREE_CACHE_DIR=${FLASHTREE_CACHE_DIR:-/tmp/ftcache}
S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis --section Occupancy"
M=smsp__inst_executed_pipe_tensor_op_hmma.sum,smsp__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,smsp__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_lsu.sum,sm__inst_executed.sum
for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected selected dispatch_stall lg_throttle; do
  M=$M,smsp__average_warp_latency_issue_stalled_$r
done
ncu --clock-control none -k regex:$regex --launch-skip 2 --launch-count 1 $S python3 benchmarks/diag.py "$@" 2>&1 | grep -v "^==PROF==" | sed -n '/Section:/,$p' > $OUT/ncu_$name.txt
ncu --clock-control none -k regex:$regex --launch-skip 2 --launch-count 1 --metrics $M python3 benchmarks/diag.py "$@" 2>&1 | grep -v "^==PROF==" | grep -E "smsp__|sm__" | grep -v -E "max_rate|\.pct " >> $OUT/ncu_$name.txt
echo "== $name"; grep -E "Duration|Issue Slots|Eligible|Executed Ipc|Registers|Achieved Occupancy|Theoretical Occupancy|smsp__|sm__inst|L2 Hit|Mem Busy|DRAM Throughput" $OUT/ncu_$name.txt | head -50
