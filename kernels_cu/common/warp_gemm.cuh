// flashtree: warp-level GEMM steps on swizzled [rows][D] shared-memory tiles (mma.sync m16n8k16).
//
// One warp owns a 16-row slab of the output. Every operand tile in shared memory is row-major
// [rows][D] 16-bit with the SwizzledTile<D> layout (or another Layout with the same offset(row,
// chunk), such as wgmma.cuh's WgTile), so one tile serves both as "B^T" (rows are the
// output columns: S = Q K^T reads K this way) and as "B" (rows are the reduction index: O = P V
// reads V this way, through ldmatrix.trans). Accumulator fragments follow mma.cuh's C layout.
#pragma once

#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/state.cuh"

namespace ft {

// A operand: the 16 x 16 block (rows row0..row0+15, columns 16 kk..16 kk+15) of a [rows][D] tile.
template <int D, typename Layout = SwizzledTile<D>, typename T>
__device__ __forceinline__ void load_a_frag(u32 (&a)[4], const T* tile, int row0, int kk, int lane) {
  const int r = row0 + (lane % 8) + 8 * ((lane / 8) % 2);
  ldmatrix_x4(a, smem_addr(tile + Layout::offset(r, 2 * kk + lane / 16)));
}

// acc (16 x N) += A (16 x 16, reduction block kk) * B^T, B the rows n0..n0+N-1 of a [rows][D] tile:
//   acc[m][n] += sum_k A[m][k] * tile[n0 + n][16 kk + k].
// The _mt forms take MT independent 16-row A blocks (a warp owning 16 MT rows) and load each B
// fragment once for all of them: MT times fewer ldmatrix per mma, MT independent mma chains.
template <int D, int N, int MT, typename Layout = SwizzledTile<D>, typename T>
__device__ __forceinline__ void mma_abt_mt(float (&acc)[MT][N / 8][4], const u32 (&a)[MT][4], const T* tile,
                                           int n0, int kk, int lane) {
#pragma unroll
  for (int j2 = 0; j2 < N / 16; ++j2) {
    u32 b[4];
    const int r = n0 + j2 * 16 + (lane % 8) + 8 * (lane / 16);
    ldmatrix_x4(b, smem_addr(tile + Layout::offset(r, 2 * kk + (lane / 8) % 2)));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_16816<T>(acc[mt][2 * j2], a[mt], b[0], b[1]);
      mma_16816<T>(acc[mt][2 * j2 + 1], a[mt], b[2], b[3]);
    }
  }
}

template <int D, int N, typename Layout = SwizzledTile<D>, typename T>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const u32 (&a)[4], const T* tile, int n0,
                                        int kk, int lane) {
  mma_abt_mt<D, N, 1, Layout>(reinterpret_cast<float(&)[1][N / 8][4]>(acc), reinterpret_cast<const u32(&)[1][4]>(a),
                      tile, n0, kk, lane);
}

// acc (16 x D) += A (16 x 16) * B, B the rows k0..k0+15 of a [rows][D] tile:
//   acc[m][d] += sum_k A[m][k] * tile[k0 + k][d].
template <int D, int MT, typename Layout = SwizzledTile<D>, typename T>
__device__ __forceinline__ void mma_ab_mt(float (&acc)[MT][D / 8][4], const u32 (&a)[MT][4], const T* tile,
                                          int k0, int lane) {
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    u32 b[4];
    const int r = k0 + (lane % 8) + 8 * ((lane / 8) % 2);
    ldmatrix_x4_trans(b, smem_addr(tile + Layout::offset(r, 2 * dn + lane / 16)));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_16816<T>(acc[mt][2 * dn], a[mt], b[0], b[1]);
      mma_16816<T>(acc[mt][2 * dn + 1], a[mt], b[2], b[3]);
    }
  }
}

template <int D, typename Layout = SwizzledTile<D>, typename T>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const u32 (&a)[4], const T* tile, int k0, int lane) {
  mma_ab_mt<D, 1, Layout>(reinterpret_cast<float(&)[1][D / 8][4]>(acc), reinterpret_cast<const u32(&)[1][4]>(a), tile,
                  k0, lane);
}

// Columns 16 kk..16 kk+15 of a 16 x N fp32 accumulator, rounded to T as an A operand.
template <typename T, int NB>
__device__ __forceinline__ void acc_to_a(u32 (&a)[4], const float (&c)[NB][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Row sums of probabilities by the tensor cores: l (16 x 8) += P (16 x 16 keys, an A fragment) x 1,
// so every column of l holds the row's sum: a lane reads row g at l[0] and row g + 8 at l[2],
// summed over all four lanes of the row (no shuffles) and over exactly the 16-bit P that the P V
// product uses. It replaces a lane's serial chain of fp32 adds with one mma per 16 keys.
template <typename T>
__device__ __forceinline__ void mma_row_sum(float (&l)[4], const u32 (&p)[4]) {
  const u32 one = pack2<T>(1.f, 1.f);
  mma_16816<T>(l, p, one, one);
}

// The maximum of row g (r = 0) or g + 8 (r = 1) over a lane's columns of a 16 x (8 NB) block,
// as a tree: depth log2(2 NB) instead of a chain of 2 NB dependent FMNMX.
template <int NB>
__device__ __forceinline__ float lane_row_max(const float (&s)[NB][4], int r) {
  float m[NB];
#pragma unroll
  for (int j = 0; j < NB; ++j) m[j] = fmaxf(s[j][2 * r], s[j][2 * r + 1]);
#pragma unroll
  for (int w = 1; w < NB; w *= 2) {
#pragma unroll
    for (int j = 0; j + w < NB; j += 2 * w) m[j] = fmaxf(m[j], m[j + w]);
  }
  return m[0];
}

// One online-softmax step for the two rows (g, g + 8) a lane holds in a 16 x (8 NB) block of raw
// scores Q K^T (masked entries already -inf): update the reference maximum (base 2, scaled),
// rescale the running state when it moved, and turn the scores into probabilities
// exp2(s * scale_log2 - reference) in place: one FFMA per score, the scale folded in
// (scale_log2 > 0, so the maximum of the raw scores is the maximum of the scaled ones; the host
// rejects other scales). The running state is O (o_acc) and the row sums l, an m16n8 accumulator
// that the caller feeds with mma_row_sum for every 16-key P fragment it multiplies into O.
// Lazy rescaling: O (D / 2 multiplies per lane) and l are rescaled only when a row's maximum
// exceeds its reference by more than kRescaleSlack, which after the first few tiles is rare. Until
// then the probabilities stay below 2^kRescaleSlack: harmless in the fp32 sums and in the 16-bit P
// operand (same relative precision). The state's lse = reference + log2(l) is exact whichever
// reference is used. The branch is warp-uniform (__any_sync), so whole warps skip it. The test is
// made on each lane's own scores first (x -> x * scale_log2 is monotonic, so a row's maximum passes
// it iff one of its lanes' maxima does): the row maxima (quad shuffles) and the rescale's exp2 are
// computed only when some row grows (DeFT's stage 1 on the long shared-prefix row: 56.1 -> 55.2 us;
// NOTES, session 15).
// A row with nothing visible yet keeps reference -inf and exponentiates against 0 (exp2 stays finite).
// LAZY = false rescales at every new maximum (slack 0, no vote): for kernels with no registers to spare.
constexpr float kRescaleSlack = 8.f;

// The step in three parts, for callers that must hold the rescale back (wg_step.cuh: the
// pipelined step waits for an in-flight product of O first):
//   softmax_new_max   new reference maxima and the state's rescale factors; returns whether any row
//                     of the warp moved its reference (warp-uniform; always true when !LAZY);
//   softmax_rescale   multiply l and O by those factors;
//   softmax_exp       scores -> probabilities against the references.
template <bool LAZY = true, int NB>
__device__ __forceinline__ bool softmax_new_max(const float (&s)[NB][4], float scale_log2, float (&row_max)[2],
                                                float (&rescale)[2]) {
  const float slack = LAZY ? kRescaleSlack : 0.f;
  if (LAZY) {  // the cheap test first: no shuffles and no exp2 unless some row grows
    bool grow_any = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) grow_any |= lane_row_max(s, r) * scale_log2 > row_max[r] + slack;
    if (!__any_sync(0xffffffffu, grow_any)) return false;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float mx = quad_max(lane_row_max(s, r)) * scale_log2;
    const bool grow = mx > row_max[r] + slack;  // -inf + slack = -inf: the first visible key sets it
    rescale[r] = grow ? fast_exp2(row_max[r] - mx) : 1.f;
    row_max[r] = grow ? mx : row_max[r];
  }
  return true;
}

template <int DB>
__device__ __forceinline__ void softmax_rescale(const float (&rescale)[2], float (&l)[4], float (&o_acc)[DB][4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) l[e] *= rescale[e / 2];
#pragma unroll
  for (int i = 0; i < DB; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[i][e] *= rescale[e / 2];
  }
}

template <int NB>
__device__ __forceinline__ void softmax_exp(float (&s)[NB][4], float scale_log2, const float (&row_max)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float neg_base = row_max[r] == neg_inf() ? 0.f : -row_max[r];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      s[j][2 * r] = fast_exp2(fmaf(s[j][2 * r], scale_log2, neg_base));
      s[j][2 * r + 1] = fast_exp2(fmaf(s[j][2 * r + 1], scale_log2, neg_base));
    }
  }
}

template <bool LAZY = true, int NB, int DB>
__device__ __forceinline__ void online_softmax_step(float (&s)[NB][4], float scale_log2, float (&row_max)[2],
                                                    float (&l)[4], float (&o_acc)[DB][4]) {
  float rescale[2];
  if (softmax_new_max<LAZY>(s, scale_log2, row_max, rescale)) softmax_rescale(rescale, l, o_acc);
  softmax_exp(s, scale_log2, row_max);
}

}  // namespace ft
