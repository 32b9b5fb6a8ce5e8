"""Probe: does a third consumer warpgroup per SM make DeFT's attention step cheaper per row?

DeFT's warp-specialised stage 1 (kernels_cu/deft.cu) runs two consumer warpgroups per SM, each the
serial chain S = Q K^T, softmax, O += P V on 64 rows and a 64-key tile. Session 17's timeline put
that chain at ~1700 cycles per 128-row step against 1024 for the products at the SM's tensor rate.
If the chains' latency, not a shared pipe, sets the step, a third chain per SM should do 192 rows
in little more time than two do 128 (and a fourth, with no producer warpgroup, 256).

Each CTA (one per SM) has NP idle "producer" warpgroups (1, or 0) and NC consumer warpgroups that
run the shipped `wg_attention_step` (or its pipelined form) `iters` times on one K/V tile in shared memory
(every key visible), with registers split as a real kernel would split them (`setmaxnreg`: the
producer gives back, the consumers take). clock64() per warpgroup; the table gives cycles per step
and per 128 rows (cycles x 2 / NC). `python benchmarks/wg_chains.py` (sm_90 only)."""
import os

import cupy as cp
import numpy as np

SRC = r"""
#include "common/types.cuh"
#include "common/wg_step.cuh"

namespace ft {
template <int NC, int NP, int PREG, int CREG, bool PIPE, bool QSS>
__global__ void __launch_bounds__(128 * (NC + NP), 1) chains(int iters, long long* cycles, float* sink) {
  using Tile = WgTile<128, 64>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int wg = threadIdx.x / 128, lane = threadIdx.x % 32, w4 = threadIdx.x / 32 % 4;
  // Two K/V stages (64 KB) and the consumers' Q tiles after them; small non-zero bf16 patterns.
  for (int i = threadIdx.x; i < (65536 + NC * 16384) / 4; i += blockDim.x)
    reinterpret_cast<u32*>(base)[i] = 0x38003800u ^ ((i * 2654435761u) & 0x01ff01ffu);
  fence_proxy_async();
  __syncthreads();
  if (wg < NP) {  // the producer (NP = 0: none): gives its registers back and idles
    if constexpr (PREG > 0) setmaxnreg_dec<PREG>();
    return;
  }
  if constexpr (CREG > 0) setmaxnreg_inc<CREG>();
  const int cw = wg - NP;
  const bf16* my_q = reinterpret_cast<const bf16*>(base + 65536 + cw * 16384);
  u32 qf[8][4];
  if constexpr (!QSS) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) load_a_frag<128, Tile>(qf[kk], my_q, 16 * w4, kk, lane);
  }
  RowState<128> st;
  st.clear();
  PendingPV pend;
  pend.valid = false;
  auto no_vis = [&](unsigned long long (&vis)[2]) { vis[0] = vis[1] = ~0ull; };
  const float scale_log2 = 0.08838834764831845f * 1.4426950408889634f;
  long long t0 = 0;
  for (int it = -8; it < iters; ++it) {
    if (it == 0) t0 = clock64();
    const u32 k = smem_addr(base) + (it & 1) * 32768;  // two stages in turn
    if constexpr (QSS)
      wg_attention_step_ss<bf16, 128>(st, smem_addr(my_q), k, k + 16384, true, no_vis, scale_log2, lane);
    else if constexpr (PIPE)
      wg_attention_step_pipelined<bf16, 128>(st, pend, qf, k, k + 16384, true, no_vis, scale_log2, lane);
    else
      wg_attention_step<bf16, 128>(st, qf, k, k + 16384, true, no_vis, scale_log2, lane);
    __syncwarp();
  }
  if constexpr (PIPE) wg_attention_flush<bf16, 128>(st, pend);
  const long long t1 = clock64();
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 4 + cw] = t1 - t0;
  float keep = st.l_acc[0];
#pragma unroll
  for (int j = 0; j < 16; ++j) keep += st.o_acc[j][0] + st.o_acc[j][3];
  if (keep == 12345.f) sink[threadIdx.x] = keep;  // the results stay live
}
}  // namespace ft
"""

# (label, NC, producer warpgroups, producer registers, consumer registers, pipelined, Q from shared
# memory); registers 0: no setmaxnreg.
# 128 P + 128 NC C must not exceed the registers the launch holds (65536 / threads, rounded down to 8,
# x threads), or setmaxnreg.inc waits forever: four consumers (640 threads, 96 each) hung at 24 / 120.
# With a producer warpgroup, four consumers fit only at 112, where the step with Q in registers spills 160 B.
CONFIGS = [
    ("2 consumers (shipped, 168 regs)", 2, 1, 0, 0, False, False),
    ("2 consumers pipelined (168)", 2, 1, 0, 0, True, False),
    ("2 consumers, Q in smem", 2, 1, 0, 0, False, True),
    ("3 consumers, 24 / 160", 3, 1, 24, 160, False, False),
    ("3 consumers, Q in smem, 56 / 152", 3, 1, 56, 152, False, True),
    ("3 consumers pipelined, 24 / 160", 3, 1, 24, 160, True, False),
    # No producer warpgroup: 512 threads at 128 registers each, Q in shared memory (127 registers,
    # no spills under NVRTC 12.9). A kernel of this shape issues its TMA copies from a consumer lane.
    ("4 consumers, no producer, Q in smem", 4, 0, 0, 0, False, True),
    ("3 consumers, no producer, Q in smem", 3, 0, 0, 0, False, True),
    # The DFS forward's split (its producer walks the tile table at 40 registers), session 25.
    ("2 consumers pipelined, 40 / 232", 2, 1, 40, 232, True, False),
    ("2 consumers, 40 / 232", 2, 1, 40, 232, False, False),
    ("3 consumers, 32 / 160", 3, 1, 32, 160, False, False),
    ("3 consumers, 40 / 152", 3, 1, 40, 152, False, False),
    ("3 consumers, Q in smem, 40 / 152", 3, 1, 40, 152, False, True),
]


def main(iters: int = 400) -> None:
    include = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels_cu")
    b = lambda x: "true" if x else "false"  # noqa: E731
    names = [f"ft::chains<{nc}, {npr}, {p}, {c}, {b(pipe)}, {b(qss)}>" for _, nc, npr, p, c, pipe, qss in CONFIGS]
    mod = cp.RawModule(code=SRC, options=("--std=c++17", "--gpu-architecture=sm_90a", f"--include-path={include}"),
                       name_expressions=names)
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    cycles, sink = cp.zeros(sms * 4, cp.int64), cp.zeros(640, cp.float32)
    print(f"{'config':34s} {'regs':>4s} {'spill':>5s} {'cycles/step':>11s} {'per 128 rows':>12s} {'tensor busy':>11s}")
    for (label, nc, npr, *_), name in zip(CONFIGS, names):
        fn = mod.get_function(name)
        smem = 65536 + nc * 16384 + 1024
        fn.max_dynamic_shared_size_bytes = smem
        runs = []
        for _ in range(3):
            cycles.fill(0)
            fn((sms,), (128 * (nc + npr),), (np.int32(iters), cycles, sink), shared_mem=smem)
            cp.cuda.runtime.deviceSynchronize()
            runs.append(float(np.median(cycles.get().reshape(sms, 4)[:, :nc])) / iters)
        c = float(np.median(runs))
        per128 = c * 2 / nc
        print(f"{label:34s} {fn.num_regs:4d} {fn.local_size_bytes:5d} {c:11.0f} {per128:12.0f} "
              f"{1024 / per128 * 100:10.1f}%", flush=True)


if __name__ == "__main__":
    main()
