// flashtree: one online-softmax attention step of a 64-row tile on Hopper's warpgroup tensor cores,
// shared by the DeFT and DFS kernels (deft.cu, dfs.cu).
#pragma once

#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"
#include "common/wgmma.cuh"

namespace ft {

// A warp's online-softmax state: O, the reference maxima and row sums of its rows g and g + 8.
template <int D>
struct RowState {
  float o_acc[D / 8][4];
  float row_max[2];
  // Row sums: row g in [0], g + 8 in [2]. wg_attention_step adds them on the tensor cores
  // (mma_row_sum); the pipelined step keeps each lane's own columns until wg_attention_flush.
  float l_acc[4];
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) l_acc[e] = 0.f;
    row_max[0] = row_max[1] = neg_inf();
  }
};

// Scores of keys kb .. kb + KW - 1 that a row's query does not see become -inf: vis[r] holds the
// tile's visibility bits of row g + 8 r's query (bit k: key k of the tile).
template <int KW>
__device__ __forceinline__ void mask_invisible(float (&s)[KW / 8][4], const unsigned long long (&vis)[2], int kb,
                                               int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const unsigned long long bits = vis[r] >> (kb + 2 * (lane % 4));  // bit 8 j + e2: key kb + 8 j + 2 c4 + e2
#pragma unroll
    for (int j = 0; j < KW / 8; ++j) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2)
        if (!((bits >> (8 * j + e2)) & 1ull)) s[j][2 * r + e2] = neg_inf();
    }
  }
}

// Issue S (64 x 64) = Q K^T (Q as register A fragments, K at shared-memory address k) as one group.
// DESC_ADD builds K's descriptors as one add per step (the backward's form: the forward measured
// 1-2% slower with it, session 20).
template <typename T, int D, bool DESC_ADD = false>
__device__ __forceinline__ void wg_issue_scores(float (&s)[8][4], const u32 (&q)[D / 16][4], u32 k) {
  using Tile = WgTile<D, 64>;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_rs<T, 64>(s, q[kk], DESC_ADD ? Tile::kmajor_desc_add(k, kk) : Tile::kmajor_desc(k, kk), kk);
  wgmma_commit();
}

// Issue S (64 x 64) = A B^T with both operands K-major [64][D] tiles in shared memory (WgTile<D, 64>
// at byte addresses a and b) as one group.
template <typename T, int D>
__device__ __forceinline__ void wg_issue_ss(float (&s)[8][4], u32 a, u32 b) {
  using Tile = WgTile<D, 64>;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<T, 64>(s, Tile::kmajor_desc_add(a, kk), Tile::kmajor_desc_add(b, kk), kk);
  wgmma_commit();
}

// Issue O (64 x D) += P V (P as register A fragments of 64 keys, V at shared-memory address v) as one group.
template <typename T, int D>
__device__ __forceinline__ void wg_issue_pv(float (&o)[D / 8][4], const u32 (&p)[4][4], u32 v) {
  using Tile = WgTile<D, 64>;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(o, p[kk], Tile::mnmajor_desc(v, kk));
  wgmma_commit();
}

// The rest of a 64-key softmax step once S (64 x 64) is in registers: each warp runs the softmax of
// its 16 rows on its fragment of S (the mma.sync layout), then O (64 x D) += P V takes P from
// registers and V from shared memory (byte address v). tile_vis(vis) reads the lane's visibility
// bits (called only if !full). Both products complete before it returns: the next barrier may hand
// the tile's K/V stage to a copy.
template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_softmax_pv(RowState<D>& st, float (&s)[8][4], u32 v, bool full, VisFn tile_vis,
                                              float scale_log2, int lane) {
  if (!full) {  // the bits are read only now: no registers held across the product
    unsigned long long vis[2];
    tile_vis(vis);
    mask_invisible<64>(s, vis, 0, lane);
  }
  online_softmax_step(s, scale_log2, st.row_max, st.l_acc, st.o_acc);

  u32 p[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    acc_to_a<T>(p[kk], s, kk);
    mma_row_sum<T>(st.l_acc, p[kk]);
  }
  wgmma_fence();
  wg_issue_pv<T, D>(st.o_acc, p, v);
  wgmma_wait<0>();
}

// One 64-key softmax step of a 64-row tile on the warpgroup's tensor cores (wgmma, sm_90a): the 4
// warps issue S (64 x 64) = Q K^T together (Q from registers: q holds this warp's 16 rows as A
// fragments; K from shared memory), then wg_softmax_pv. k and v are the tiles' shared-memory byte
// addresses (WgTile<D, 64> layout, 1024-byte aligned).
template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_attention_step(RowState<D>& st, const u32 (&q)[D / 16][4], u32 k, u32 v,
                                                  bool full, VisFn tile_vis, float scale_log2, int lane) {
  float s[8][4];
  wgmma_fence();
  wg_issue_scores<T, D>(s, q, k);
  wgmma_wait<0>();
  wg_softmax_pv<T, D>(st, s, v, full, tile_vis, scale_log2, lane);
}

// wg_attention_step with Q from shared memory (a WgTile<D, 64> at byte address q): 32 registers
// fewer per thread, 16 KB more shared-memory reads per step.
template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_attention_step_ss(RowState<D>& st, u32 q, u32 k, u32 v, bool full,
                                                     VisFn tile_vis, float scale_log2, int lane) {
  float s[8][4];
  wgmma_fence();
  wg_issue_ss<T, D>(s, q, k);
  wgmma_wait<0>();
  wg_softmax_pv<T, D>(st, s, v, full, tile_vis, scale_log2, lane);
}

// The software-pipelined form of wg_attention_step (FlashAttention-3's intra-warpgroup overlap): the
// P V product of tile n - 1 runs on the tensor cores while the softmax of tile n runs on the other
// pipes. Per tile: issue S = Q K_n^T and then O += P_{n-1} V_{n-1} (`pend`), wait for S, mask, take
// the new maxima (a rescale of O, which is rare with the lazy rule, first waits for the product),
// exponentiate and add the lane's part of the row sums (fp32, on the FP pipe while the product
// runs: as mma_row_sum after the wait, the long DFS forward measured 8% slower), wait for the
// product, then keep P_n and V_n as the next pending product. On return tile n - 1's K/V stage is
// free (the caller releases it) and tile n's V is still read later; wg_attention_flush adds the
// lanes' row sums and issues the last product. Needs 16 more registers than wg_attention_step.
struct PendingPV {
  u32 p[4][4];  // P_{n-1} as A fragments (16-bit)
  u32 v;        // V_{n-1}'s shared-memory address
  bool valid;
};

template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_attention_step_pipelined(RowState<D>& st, PendingPV& pend, const u32 (&q)[D / 16][4],
                                                            u32 k, u32 v, bool full, VisFn tile_vis, float scale_log2,
                                                            int lane) {
  float s[8][4];
  wgmma_fence();
  wg_issue_scores<T, D>(s, q, k);
  if (pend.valid) {
    wg_issue_pv<T, D>(st.o_acc, pend.p, pend.v);
    wgmma_wait<1>();  // S is in; P V may still run
  } else {
    wgmma_wait<0>();
  }

  if (!full) {
    unsigned long long vis[2];
    tile_vis(vis);
    mask_invisible<64>(s, vis, 0, lane);
  }
  float rescale[2];
  if (softmax_new_max(s, scale_log2, st.row_max, rescale)) {  // rare (lazy rule): O waits for its product
    wgmma_wait<0>();
    softmax_rescale(rescale, st.l_acc, st.o_acc);
  }
  softmax_exp(s, scale_log2, st.row_max);
  // Row sums on the FP pipe while P V runs: each lane adds its own 16 columns of each row (fp32);
  // wg_attention_flush adds the four lanes of a row. No tensor-core step between the P V wait and
  // the next tile's products. The four partial sums start from their first pair, not 0.f: ptxas
  // does not fold 0 + x (it would turn -0 into +0) and emitted an FADD with RZ for each (session 22).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float a[4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) a[jj] = s[jj][2 * r] + s[jj][2 * r + 1];
#pragma unroll
    for (int jj = 4; jj < 8; ++jj) a[jj - 4] += s[jj][2 * r] + s[jj][2 * r + 1];
    st.l_acc[2 * r] += (a[0] + a[1]) + (a[2] + a[3]);
  }
  wgmma_wait<0>();  // P_{n-1} V_{n-1} is done: its registers and its stage are free
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) acc_to_a<T>(pend.p[kk], s, kk);
  pend.v = v;
  pend.valid = true;
}

// Issue the last pending product of wg_attention_step_pipelined and wait for it.
template <typename T, int D>
__device__ __forceinline__ void wg_attention_flush(RowState<D>& st, PendingPV& pend) {
#pragma unroll
  for (int r = 0; r < 2; ++r) st.l_acc[2 * r] = st.l_acc[2 * r + 1] = quad_sum(st.l_acc[2 * r]);  // the lanes' partial sums
  if (!pend.valid) return;
  wgmma_fence();
  wg_issue_pv<T, D>(st.o_acc, pend.p, pend.v);
  wgmma_wait<0>();
  pend.valid = false;
}

}  // namespace ft
