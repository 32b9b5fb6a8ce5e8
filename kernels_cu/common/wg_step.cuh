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
  float l_acc[4];  // row sums (mma_row_sum): row g in [0], g + 8 in [2]
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

// One 64-key softmax step of a 64-row tile on the warpgroup's tensor cores (wgmma, sm_90a): the 4
// warps issue S (64 x 64) = Q K^T together (Q from registers: q holds this warp's 16 rows as A
// fragments; K from shared memory), each warp then runs the softmax of its 16 rows on its
// fragment of S (the mma.sync layout), and O (64 x D) += P V takes P from registers and V from
// shared memory. k and v are the tiles' shared-memory byte addresses (WgTile<D, 64> layout,
// 1024-byte aligned); tile_vis(vis) reads the lane's visibility bits (called only if !full). Both
// products complete before it returns: the next barrier may hand this tile's K/V stage to a copy.
template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_attention_step(RowState<D>& st, const u32 (&q)[D / 16][4], u32 k, u32 v,
                                                  bool full, VisFn tile_vis, float scale_log2, int lane) {
  using Tile = WgTile<D, 64>;
  float s[8][4];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma_rs<T, 64>(s, q[kk], Tile::kmajor_desc(k, kk), kk);
  wgmma_commit();
  wgmma_wait<0>();

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
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(st.o_acc, p[kk], Tile::mnmajor_desc(v, kk));
  wgmma_commit();
  wgmma_wait<0>();
}

// The software-pipelined form of wg_attention_step (FlashAttention-3's intra-warpgroup overlap): the
// P V product of tile n - 1 runs on the tensor cores while the softmax of tile n runs on the other
// pipes. Per tile: issue S = Q K_n^T and then O += P_{n-1} V_{n-1} (`pend`), wait for S, mask, take
// the new maxima (a rescale of O, which is rare with the lazy rule, first waits for the product),
// exponentiate, wait for the product, then keep P_n and V_n as the next pending product. On return
// tile n - 1's K/V stage is free (the caller releases it) and tile n's V is still read later;
// wg_attention_flush issues the last product. Needs 16 more registers than wg_attention_step.
struct PendingPV {
  u32 p[4][4];  // P_{n-1} as A fragments (16-bit)
  u32 v;        // V_{n-1}'s shared-memory address
  bool valid;
};

template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_attention_step_pipelined(RowState<D>& st, PendingPV& pend, const u32 (&q)[D / 16][4],
                                                            u32 k, u32 v, bool full, VisFn tile_vis, float scale_log2,
                                                            int lane) {
  using Tile = WgTile<D, 64>;
  float s[8][4];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma_rs<T, 64>(s, q[kk], Tile::kmajor_desc(k, kk), kk);
  wgmma_commit();
  if (pend.valid) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(st.o_acc, pend.p[kk], Tile::mnmajor_desc(pend.v, kk));
    wgmma_commit();
    wgmma_wait<1>();  // S is in; P V may still run
  } else {
    wgmma_wait<0>();
  }

  if (!full) {
    unsigned long long vis[2];
    tile_vis(vis);
    mask_invisible<64>(s, vis, 0, lane);
  }
  // online_softmax_step with the O rescale held back until the pending product is done.
  float rescale[2];
  bool grow_any = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float mx = quad_max(lane_row_max(s, r)) * scale_log2;
    const bool grow = mx > st.row_max[r] + kRescaleSlack;
    rescale[r] = grow ? fast_exp2(st.row_max[r] - mx) : 1.f;
    st.row_max[r] = grow ? mx : st.row_max[r];
    grow_any |= grow;
  }
  if (__any_sync(0xffffffffu, grow_any)) {
    wgmma_wait<0>();
#pragma unroll
    for (int e = 0; e < 4; ++e) st.l_acc[e] *= rescale[e / 2];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st.o_acc[i][e] *= rescale[e / 2];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float neg_base = st.row_max[r] == neg_inf() ? 0.f : -st.row_max[r];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][2 * r] = fast_exp2(fmaf(s[j][2 * r], scale_log2, neg_base));
      s[j][2 * r + 1] = fast_exp2(fmaf(s[j][2 * r + 1], scale_log2, neg_base));
    }
  }
  wgmma_wait<0>();  // P_{n-1} V_{n-1} is done: its registers and its stage are free
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    acc_to_a<T>(pend.p[kk], s, kk);
    mma_row_sum<T>(st.l_acc, pend.p[kk]);
  }
  pend.v = v;
  pend.valid = true;
}

// Issue the last pending product of wg_attention_step_pipelined and wait for it.
template <typename T, int D>
__device__ __forceinline__ void wg_attention_flush(RowState<D>& st, PendingPV& pend) {
  using Tile = WgTile<D, 64>;
  if (!pend.valid) return;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(st.o_acc, pend.p[kk], Tile::mnmajor_desc(pend.v, kk));
  wgmma_commit();
  wgmma_wait<0>();
  pend.valid = false;
}

}  // namespace ft
