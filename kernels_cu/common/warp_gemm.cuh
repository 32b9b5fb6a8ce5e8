// flashtree: warp-level GEMM steps on swizzled [rows][D] shared-memory tiles (mma.sync m16n8k16).
//
// One warp owns a 16-row slab of the output. Every operand tile in shared memory is row-major
// [rows][D] 16-bit with the SwizzledTile<D> layout, so one tile serves both as "B^T" (rows are the
// output columns: S = Q K^T reads K this way) and as "B" (rows are the reduction index: O = P V
// reads V this way, through ldmatrix.trans). Accumulator fragments follow mma.cuh's C layout.
#pragma once

#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/state.cuh"

namespace ft {

// A operand: the 16 x 16 block (rows row0..row0+15, columns 16 kk..16 kk+15) of a [rows][D] tile.
template <int D, typename T>
__device__ __forceinline__ void load_a_frag(u32 (&a)[4], const T* tile, int row0, int kk, int lane) {
  const int r = row0 + (lane % 8) + 8 * ((lane / 8) % 2);
  ldmatrix_x4(a, smem_addr(tile + SwizzledTile<D>::offset(r, 2 * kk + lane / 16)));
}

// acc (16 x N) += A (16 x 16, reduction block kk) * B^T, B the rows n0..n0+N-1 of a [rows][D] tile:
//   acc[m][n] += sum_k A[m][k] * tile[n0 + n][16 kk + k].
template <int D, int N, typename T>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const u32 (&a)[4], const T* tile, int n0,
                                        int kk, int lane) {
#pragma unroll
  for (int j2 = 0; j2 < N / 16; ++j2) {
    u32 b[4];
    const int r = n0 + j2 * 16 + (lane % 8) + 8 * (lane / 16);
    ldmatrix_x4(b, smem_addr(tile + SwizzledTile<D>::offset(r, 2 * kk + (lane / 8) % 2)));
    mma_16816<T>(acc[2 * j2], a, b[0], b[1]);
    mma_16816<T>(acc[2 * j2 + 1], a, b[2], b[3]);
  }
}

// acc (16 x D) += A (16 x 16) * B, B the rows k0..k0+15 of a [rows][D] tile:
//   acc[m][d] += sum_k A[m][k] * tile[k0 + k][d].
template <int D, typename T>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const u32 (&a)[4], const T* tile, int k0, int lane) {
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    u32 b[4];
    const int r = k0 + (lane % 8) + 8 * ((lane / 8) % 2);
    ldmatrix_x4_trans(b, smem_addr(tile + SwizzledTile<D>::offset(r, 2 * dn + lane / 16)));
    mma_16816<T>(acc[2 * dn], a, b[0], b[1]);
    mma_16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
  }
}

// Columns 16 kk..16 kk+15 of a 16 x N fp32 accumulator, rounded to T as an A operand.
template <typename T, int NB>
__device__ __forceinline__ void acc_to_a(u32 (&a)[4], const float (&c)[NB][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// One online-softmax step for the two rows (g, g + 8) a lane holds in a 16 x (8 NB) score block
// (base-2, already scaled and masked with -inf): update the running max and this lane's partial
// sum, turn the scores into probabilities in place, and rescale what O holds so far.
// A row with nothing visible yet keeps max = -inf and exponentiates against 0 (exp2 stays finite).
template <int NB, int DB>
__device__ __forceinline__ void online_softmax_step(float (&s)[NB][4], float (&row_max)[2], float (&row_sum)[2],
                                                    float (&o_acc)[DB][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = quad_max(mx);
    const float base = mx == neg_inf() ? 0.f : mx;
    const float rescale = fast_exp2(row_max[r] - base);
    row_max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      s[j][2 * r] = fast_exp2(s[j][2 * r] - base);
      s[j][2 * r + 1] = fast_exp2(s[j][2 * r + 1] - base);
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * rescale + sum;
#pragma unroll
    for (int i = 0; i < DB; ++i) {
      o_acc[i][2 * r] *= rescale;
      o_acc[i][2 * r + 1] *= rescale;
    }
  }
}

}  // namespace ft
