"""Probe: how fast do the attention step's wgmma products run, on one or two warpgroups per SM?

Each CTA (one per SM, 256 threads) runs `iters` iterations of one product chain per warpgroup, with
the first `active` warpgroups working, and records clock64() cycles per iteration:
  S n64      S (64 x 64)  += Q K^T over D = 128: 8 x m64n64k16, Q from registers, K K-major (the
             shipped step's 64-key scores);
  S n128     S (64 x 128) += Q K^T: 8 x m64n128k16 (a 128-key step's scores);
  PV         O (64 x 128) += P V over 64 keys: 4 x m64n128k16, V MN-major;
  S n64 + PV and S n128 + PV over 128 keys: a whole step's products as one group.
Every product accumulates into live registers (an S that is overwritten each iteration lets ptxas
drop the dead products: the first version of this probe measured 2-3x the tensor peak). Operands are
fixed non-zero bf16 patterns. "Busy" is the SM's dense bf16 rate (2048 multiply-adds per cycle: 4
tensor cores of 512) over the measured time. `python benchmarks/wgmma_rate.py` (sm_90 only)."""
import os

import cupy as cp
import numpy as np

SRC = r"""
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"

namespace ft {
// d (64 x 128) += A (registers) * B (desc b, K-major): the m64n128k16 form the shipped kernels lack.
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const u32 (&a)[4], u64 b) {
#define R4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
               "}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
               : R4(0), R4(1), R4(2), R4(3), R4(4), R4(5), R4(6), R4(7),
                 R4(8), R4(9), R4(10), R4(11), R4(12), R4(13), R4(14), R4(15)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
#undef R4
}

template <int MODE>
__global__ void __launch_bounds__(256, 1) rate(int active, int iters, long long* cycles, float* sink) {
  using T64 = WgTile<128, 64>;
  using T128 = WgTile<128, 128>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int wg = threadIdx.x / 128;
  for (int i = threadIdx.x; i < 65536 / 4; i += 256)
    reinterpret_cast<u32*>(base)[i] = 0x3c003c00u ^ ((i * 2654435761u) & 0x03ff03ffu);
  fence_proxy_async();
  __syncthreads();
  if (wg >= active) return;
  const u32 k = smem_addr(base), v = k + 32768;
  u32 a[8][4];  // Q (S products) and P (P V products): 16-bit patterns, not zeros
  for (int i = 0; i < 8; ++i)
    for (int e = 0; e < 4; ++e) a[i][e] = 0x3c003c00u ^ (((threadIdx.x + 7 * i + 3 * e) * 2654435761u) & 0x03ff03ffu);
  float s64[8][4], s128[16][4], o[16][4];
  for (int i = 0; i < 16; ++i) {
    for (int e = 0; e < 4; ++e) {
      o[i][e] = s128[i][e] = 0.f;
      if (i < 8) s64[i][e] = 0.f;
    }
  }
  long long t0 = 0;
  for (int it = -8; it < iters; ++it) {  // 8 warm-up iterations
    if (it == 0) t0 = clock64();
    wgmma_fence();
    if constexpr (MODE == 0 || MODE == 3) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) wgmma_rs<bf16, 64>(s64, a[kk], T64::kmajor_desc(k, kk), 1);
    }
    if constexpr (MODE == 1 || MODE == 4) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) wgmma_rs_n128(s128, a[kk], T128::kmajor_desc(k, kk));
    }
    if constexpr (MODE == 2 || MODE == 3) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<bf16, 128>(o, a[kk], T64::mnmajor_desc(v, kk));
    }
    if constexpr (MODE == 4) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) wgmma_rs_mn<bf16, 128>(o, a[kk], T128::mnmajor_desc(v, kk));
    }
    wgmma_commit();
    wgmma_wait<0>();
  }
  const long long t1 = clock64();
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + wg] = t1 - t0;
  const float keep = o[0][0] + s64[0][0] + s128[0][0];
  if (keep == 12345.f) sink[threadIdx.x] = keep;  // the results stay live
}
}  // namespace ft
"""

# (name, multiply-adds per iteration and warpgroup / 1024)
MODES = [("S n64 (64 keys)", 512), ("S n128 (128 keys)", 1024), ("PV (64 keys)", 512),
         ("S n64 + PV (64 keys)", 1024), ("S n128 + PV (128 keys)", 2048)]
SMEM = 65536 + 1024


def main(iters: int = 400) -> None:
    include = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels_cu")
    names = [f"ft::rate<{m}>" for m in range(len(MODES))]
    mod = cp.RawModule(code=SRC, options=("--std=c++17", "--gpu-architecture=sm_90a", f"--include-path={include}"),
                       name_expressions=names)
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    cycles, sink = cp.zeros(sms * 2, cp.int64), cp.zeros(256, cp.float32)
    print(f"{'warpgroups':>10s}  {'chain':24s} {'cycles/iter':>11s} {'ideal':>6s} {'SM busy':>8s}")
    for active in (1, 2):
        for m, (label, kmacs) in enumerate(MODES):
            fn = mod.get_function(names[m])
            fn.max_dynamic_shared_size_bytes = SMEM
            cycles.fill(0)
            fn((sms,), (256,), (np.int32(active), np.int32(iters), cycles, sink), shared_mem=SMEM)
            cp.cuda.runtime.deviceSynchronize()
            c = float(np.median(cycles.get().reshape(sms, 2)[:, :active])) / iters
            ideal = kmacs * 1024 / 2048  # cycles of one warpgroup's products at the SM's rate
            print(f"{active:10d}  {label:24s} {c:11.1f} {ideal:6.0f} {active * ideal / c * 100:7.1f}%")


if __name__ == "__main__":
    main()
