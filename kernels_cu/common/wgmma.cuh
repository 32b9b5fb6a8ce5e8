// flashtree: Hopper warpgroup MMA (wgmma, sm_90a) as thin PTX wrappers, and the shared-memory
// layout it reads.
//
// A warpgroup is 4 consecutive warps (128 threads, the first warp index divisible by 4). One
// wgmma.mma_async computes D (64 x N, fp32) += A (64 x 16) * B (16 x N):
//   - B always comes from shared memory, named by a 64-bit matrix descriptor;
//   - A comes from shared memory (descriptor, the "ss" form) or from registers (the "rs" form);
//   - the accumulator fragment of warp w of the group covers rows 16 w .. 16 w + 15, with the
//     m16n8 C layout of mma.cuh repeated over the N / 8 column blocks: d[j][0..3] is block j. The
//     register A fragment of warp w (rows 16 w ..) has the mma.sync A layout. So the softmax code
//     written for mma.sync fragments (warp_gemm.cuh) runs unchanged on wgmma accumulators.
//
// Shared-memory layout (WgTile below): a [ROWS][D] tile of 16-bit values is stored as D / 64
// column blocks, each [ROWS][64] with 128-byte rows, the 16-byte chunks of row r XOR-swizzled by
// r % 8. That is the hardware's "128-byte swizzle" (address bits 4-6 ^= bits 7-9) when every block
// starts at a 1024-byte-aligned address, so one tile serves:
//   - as a K-major operand (Q as A, K as B of S = Q K^T: the reduction index is the column):
//     8-row groups 1024 bytes apart (SBO), a 16-wide k step is +32 bytes inside a 128-byte row,
//     and column block kk / 4 starts ROWS * 128 bytes further;
//   - as an MN-major operand (V as B of O = P V, "transposed"): the reduction index is the row,
//     8-row groups 1024 bytes apart (SBO), the 64-column blocks ROWS * 128 bytes apart (LBO), and a
//     16-row k step is +2048 bytes;
//   - and, through WgTile::offset, as an ldmatrix source for the mma.sync helpers (conflict-free:
//     the 8 rows of one ldmatrix hit 8 different chunks).
// Ordering: wgmma_fence() before the first wgmma that reads or writes registers that ordinary
// instructions touched; wgmma_commit() then wgmma_wait<N>() before ordinary code reads the
// accumulators again or the shared memory it read is overwritten. Shared memory written by the
// generic proxy (st.shared, cp.async) needs fence_proxy_async() in each writer before the barrier
// that publishes it to the wgmma.
#pragma once

#include "common/types.cuh"
#include "common/mma.cuh"

namespace ft {

typedef unsigned long long u64;

// wgmma is compiled only for the arch-specific target (sm_90a); other targets get none of it.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kHaveWgmma = true;
#else
constexpr bool kHaveWgmma = false;
#endif

template <int D, int ROWS>
struct WgTile {
  static_assert(D % 64 == 0 && ROWS % 8 == 0, "64-column blocks of 8-row groups");
  static constexpr int kChunks = D / 8;
  static constexpr int kBlockBytes = ROWS * 128;  // one [ROWS][64] column block
  __device__ __forceinline__ static int offset(int row, int chunk) {  // in 16-bit elements
    return (chunk / 8) * ROWS * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
  // Descriptors; `base` is the tile's shared-memory byte address, 1024-byte aligned.
  __device__ __forceinline__ static u64 kmajor_desc(u32 base, int kk) {  // columns 16 kk .. 16 kk + 15
    return make_desc(base + (kk / 4) * kBlockBytes + (kk % 4) * 32, 16, 1024);
  }
  __device__ __forceinline__ static u64 mnmajor_desc(u32 base, int kk) {  // rows 16 kk .. 16 kk + 15
    return make_desc(base + kk * 16 * 128, kBlockBytes, 1024);
  }
  // Bits 0-13: start address >> 4; 16-29: leading byte offset >> 4; 32-45: stride byte offset >> 4;
  // 49-51: base offset (0: blocks are 1024-byte aligned); 62-63: swizzle mode (1 = 128 bytes).
  __device__ __forceinline__ static u64 make_desc(u32 addr, u32 lbo, u32 sbo) {
    return static_cast<u64>((addr & 0x3ffff) >> 4) | (static_cast<u64>(lbo >> 4) << 16) |
           (static_cast<u64>(sbo >> 4) << 32) | (1ull << 62);
  }
  // The same descriptors built as one 32-bit add per step: shared-window addresses lie below 256 KB,
  // so (base >> 4) + step fits bits 0-13 and carries into nothing, and the high word is a constant.
  // Fewer instructions per product in the backward kernels (NOTES, session 20: dK/dV -2..3%, dQ
  // -1..4%); the DeFT mma.sync kernel's wgmma form spills 8 B with them under NVRTC 12.9, so the
  // forward steps keep make_desc (wg_issue_scores takes them only when asked: the register dQ).
  __device__ __forceinline__ static u64 kmajor_desc_add(u32 base, int kk) {
    return desc_add(base, 16, 1024, ((kk / 4) * kBlockBytes + (kk % 4) * 32) >> 4);
  }
  __device__ __forceinline__ static u64 mnmajor_desc_add(u32 base, int kk) {
    return desc_add(base, kBlockBytes, 1024, (kk * 16 * 128) >> 4);
  }
  __device__ __forceinline__ static u64 desc_add(u32 base, u32 lbo, u32 sbo, u32 step) {
    const u32 lo = ((base >> 4) | ((lbo >> 4) << 16)) + step;
    const u32 hi = (sbo >> 4) | (1u << 30);
    return (static_cast<u64>(hi) << 32) | lo;
  }
};

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Warp specialisation: mbarriers (a 64-bit shared-memory arrival counter with a phase bit: the
// phase completes when `count` arrivals have landed, then the counter re-arms for the next phase)
// and named barriers (bar.sync on an id of its own, for a subset of the CTA's warps).
// A producer/consumer ring of S stages uses two mbarriers per stage: `full` (the stage holds
// tile it: consumers wait on phase parity (it / S) & 1) and `empty` (every consumer is done with
// it: the producer waits on parity (it / S - 1) & 1 before refilling it). An arrive releases the
// arriving thread's earlier writes; a completed wait acquires them.
__device__ __forceinline__ void mbar_init(u64* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
  u32 done;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  } while (!done);
}
// An mbarrier arrival that also expects `bytes` more bytes of asynchronous (TMA) copies: the phase
// completes when its arrivals are in and those bytes have landed.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Expect `bytes` more bytes of asynchronous copies on the barrier's current phase, without arriving.
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// TMA (the tensor memory accelerator): a tensor map (CUtensorMap, encoded on the host by
// cuTensorMapEncodeTiled, flashtree/_jit/tma.py; a __grid_constant__ kernel parameter) describes a
// global tensor and a box; tma_load_3d copies the box at coordinates (c0 innermost, c1, c2) to shared
// memory at dst and completes its bytes on the mbarrier. With the 128-byte swizzle the TMA unit
// swizzles by shared-memory address, as wgmma reads (so a box of 64 16-bit columns lands as a WgTile
// column block). Coordinates outside the tensor read zeros (and still count their bytes).
struct alignas(64) TmaDesc {
  unsigned long long opaque[16];
};
__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaDesc* desc, int c0, int c1, int c2, u64* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
      ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}
// tma_load_4d: the same for a 4-dimensional map (coordinates c0 innermost .. c3).
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* desc, int c0, int c1, int c2, int c3, u64* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];"
      ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* desc) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<unsigned long long>(desc)) : "memory");
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// x, the same in every lane of the warp, as a value ptxas knows is warp-uniform (a shuffle from lane
// 0). What derives from it is then computed on the uniform datapath: a warpgroup index that picks
// shared tiles or ring stages makes every wgmma descriptor uniform, not built per thread and moved
// by two R2UR before each wgmma (SASS, session 21: the dK/dV loop 381 -> 334 instructions per tile).
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

// Register reallocation between the warpgroups of a warp-specialised CTA (sm_90a): every warp of a
// warpgroup executes the same call; a producer gives registers back (dec) so that the consumers can
// take more (inc: it waits until the CTA's pool holds them). N is a multiple of 8 in [24, 256].
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
#endif
}

// d (64 x N) = A (desc a) * B (desc b) + (accumulate ? d : 0); A and B K-major.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], u64 a, u64 b, int accumulate);
// d (64 x N) = A (registers, this warp's 16 x 16 fragment) * B (desc b, K-major) + (accumulate ? d : 0).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const u32 (&a)[4], u64 b, int accumulate);
// d (64 x N) += A (registers, this warp's 16 x 16 fragment) * B (desc b, MN-major).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_mn(float (&d)[N / 8][4], const u32 (&a)[4], u64 b);

#define FT_ACC4(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FT_ACC32(d) FT_ACC4(d, 0), FT_ACC4(d, 1), FT_ACC4(d, 2), FT_ACC4(d, 3), \
                    FT_ACC4(d, 4), FT_ACC4(d, 5), FT_ACC4(d, 6), FT_ACC4(d, 7)
#define FT_ACC64(d) FT_ACC32(d), FT_ACC4(d, 8), FT_ACC4(d, 9), FT_ACC4(d, 10), FT_ACC4(d, 11), \
                    FT_ACC4(d, 12), FT_ACC4(d, 13), FT_ACC4(d, 14), FT_ACC4(d, 15)
#define FT_REGS32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FT_REGS64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FT_DEFINE_WGMMA(T, NAME)                                                                         \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma_ss<T, 64>(float (&d)[8][4], u64 a, u64 b, int accumulate) {     \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." NAME "." NAME " {"                        \
                 FT_REGS32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                            \
                 : FT_ACC32(d) : "l"(a), "l"(b), "r"(accumulate));                                       \
  }                                                                                                      \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma_rs<T, 64>(float (&d)[8][4], const u32 (&a)[4], u64 b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." NAME "." NAME " {"                        \
                 FT_REGS32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                              \
                 : FT_ACC32(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));   \
  }                                                                                                      \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma_rs_mn<T, 64>(float (&d)[8][4], const u32 (&a)[4], u64 b) {      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." NAME "." NAME " {"                        \
                 FT_REGS32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                              \
                 : FT_ACC32(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));            \
  }                                                                                                      \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma_rs_mn<T, 128>(float (&d)[16][4], const u32 (&a)[4], u64 b) {    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." NAME "." NAME " {"                       \
                 FT_REGS64 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                              \
                 : FT_ACC64(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));            \
  }
FT_DEFINE_WGMMA(bf16, "bf16")
FT_DEFINE_WGMMA(f16, "f16")
#undef FT_DEFINE_WGMMA

#endif
#undef FT_REGS32
#undef FT_REGS64
#undef FT_ACC4
#undef FT_ACC32
#undef FT_ACC64

}  // namespace ft
