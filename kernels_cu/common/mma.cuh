// flashtree: tensor-core and async-copy building blocks (sm_80+), as thin PTX wrappers.
//
// mma.sync.m16n8k16 fragment layout (lane = 4 * g + c, g = lane / 4, c = lane % 4):
//   A 16x16 (row-major), 4 regs of two 16-bit values:
//     a0 = A[g][2c..2c+1]   a1 = A[g+8][2c..2c+1]   a2 = A[g][2c+8..]   a3 = A[g+8][2c+8..]
//   B 16x8 (k-major "col"), 2 regs:  b0 = B[2c..2c+1][g]   b1 = B[2c+8..2c+9][g]
//   C/D 16x8 fp32, 4 regs:           c0,c1 = C[g][2c..2c+1]   c2,c3 = C[g+8][2c..2c+1]
// ldmatrix.x4: lane i gives the address of row (i % 8) of 8x8 matrix (i / 8); register j of
// lane l receives matrix j's elements at row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1
// (with .trans: row 2 (l % 4) and 2 (l % 4) + 1, column l / 4).
#pragma once

#include "common/types.cuh"

namespace ft {

template <typename T> struct MmaType;
template <> struct MmaType<f16> { static constexpr const char* name = "f16"; };
template <> struct MmaType<bf16> { static constexpr const char* name = "bf16"; };

// D = A * B + D, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1);

template <>
__device__ __forceinline__ void mma_16816<bf16>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<f16>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// A [rows][D] tile of 16-bit values in shared memory, 16-byte chunks XOR-swizzled by row so that
// the 8 rows one ldmatrix reads fall in 8 different bank groups (D >= 64: 8+ chunks per row).
template <int D>
struct SwizzledTile {
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(kChunks >= 8 && kChunks % 8 == 0, "head_dim must be a multiple of 64");
  __device__ __forceinline__ static int offset(int row, int chunk) {  // in 16-bit elements
    return row * D + ((chunk ^ (row & 7)) << 3);
  }
};

// Sum and max over the 4 lanes that share a row of an m16n8 accumulator.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace ft
