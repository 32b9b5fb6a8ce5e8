// flashtree kernel family `deft`: shared-prefix tree decoding (DeFT), paged KV, two stages.
//
// The host plan (flashtree/deft.py) flattens the tree's KV into a token list in DFS order; each
// token carries a record (slot, q_lo, q_hi, mask_col): its row in the paged pool
// (page = slot >> log2_page, row = slot & (P - 1)), the query rows [q_lo, q_hi) that see it (the
// queries of the leaves beneath its node, contiguous because leaves are numbered in DFS order),
// and, for a leaf's own query tokens, the column of its tail mask (-1 otherwise). The token list
// is cut into chunks [tok_begin, tok_end) of about equal length that may span nodes; a chunk's
// query rows are [q0, q1), the union of its tokens' ranges.
//
// Stage 1 (deft_partial_kernel), per work item (chunk c, row tile t) and KV head hk:
//   rows m = t * 64 + r of the chunk, query q = q0 + m / G, head h = hk * G + m % G;
//   key j of the chunk is visible to q iff q_lo[j] <= q < q_hi[j]
//                                      and (mask_col[j] < 0 or mask[qmask_off[q] + mask_col[j]] != 0);
//   writes the partial state of (c, q, h): mid_o[slot_base[c] + q - q0, h, :] (fp32, normalised
//   over the visible keys) and mid_lse[...] (natural log; -inf and o = 0 when nothing is visible).
//   grid = (num_work, Hkv), 128 threads = 4 warps. A tile with R rows uses warps_m = 1, 2 or 4
//   warps across rows (16 rows each) and warps_n = 4 / warps_m warps across the keys of each KV
//   tile, so a chunk seen by one query (R = G rows) still keeps 4 warps busy; the warps_n states
//   of a row are merged through shared memory at the end. Q fragments are re-read from shared
//   memory at every step, so the registers hold O and the lazy-rescale state (warp_gemm.cuh); a
//   KV tile whose keys every query of the chunk sees (the shared prefix) skips the per-score
//   visibility test (one __syncthreads_and per tile decides).
//   Shared memory: Q [64][D] + 2 stages x (K [64][D] + V [64][D] + records [64][16 B]), 16-bit
//   rows XOR-swizzled; bytes = 2 * 64 * D + 2 * (2 * 2 * 64 * D + 64 * 16) (the host: same formula).
//   K/V rows arrive by cp.async through the page table, double-buffered.
// Stage 2 (deft_merge_kernel), per (query q, head h): merges the partials
//   slot_idx[q_indptr[q] .. q_indptr[q + 1]) in that (chunk) order, one online pass, no atomics:
//   bitwise deterministic. kLanes = D / 4 threads per row, each owning 4 floats of head_dim.
//
// Inputs (strides in elements, head_dim contiguous, rows 16-byte aligned):
//   q         T      [Q, H, D]               strides (q_sq, q_sh)
//   k/v pool  T      [pages, Hkv, P, D]      strides (sp, sh, sr)
//   tokens    int4   [N]          chunks int4 [C] (tok_begin, tok_end, q0, q1)
//   work      int2   [W] (chunk, row tile)    slot_base int [C]     qmask_off int [Q]   mask int [*]
//   q_indptr  int    [Q + 1]      slot_idx int [num_slots]
// Outputs: mid_o fp32 [num_slots, H, D], mid_lse fp32 [num_slots, H] (contiguous);
//   out T [Q, H, D] strides (o_sq, o_sh); lse_out fp32 [Q, H] contiguous.
// Numerics: exp2 softmax on scores scaled by scale_log2 = sm_scale * log2(e) > 0, fp32 accumulation,
//   P rounded to T for the P V product (as decode.cu); keys past tok_end and invisible keys are
//   -inf before any arithmetic, so pool rows nobody sees never reach the result.
#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"

namespace ft {

struct __align__(16) DeftToken { int slot, q_lo, q_hi, mask_col; };
struct __align__(16) DeftChunk { int tok_begin, tok_end, q0, q1; };
struct __align__(8) U32x2 { u32 a, b; };

template <int D>
struct DeftConfig {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 64;   // query rows per CTA
  static constexpr int kBlockN = 64;   // keys per KV tile
  static constexpr int kWarpN = 16;    // keys per softmax step of one warp
  static constexpr int kChunks = D / 8;
  static constexpr int kQElems = kBlockM * D;
  static constexpr int kTileElems = kBlockN * D;
  static constexpr int kLoadIters = kBlockN * kChunks / kThreads;  // K/V chunks per thread and tile
  // The cross-warp merge buffer, per warp: o (D / 8 x 4 floats per lane) + max and sum (2 + 2).
  static constexpr int kRedFloats = (D / 2 + 4) * 32;
  static_assert(kBlockN * kChunks % kThreads == 0, "whole load rounds");
  static_assert(kBlockN % (kWarps * kWarpN) == 0, "4 warps can split a KV tile");
};

template <typename T, int D>
__global__ void __launch_bounds__(128, 2)  // 2 CTAs per SM: up to 255 registers, no spills
deft_partial_kernel(const T* __restrict__ q, i64 q_sq, i64 q_sh,
                    const T* __restrict__ k_pool, i64 k_sp, i64 k_sh, i64 k_sr,
                    const T* __restrict__ v_pool, i64 v_sp, i64 v_sh, i64 v_sr, int log2_page,
                    const DeftToken* __restrict__ tokens, const DeftChunk* __restrict__ chunks,
                    const int* __restrict__ work, const int* __restrict__ slot_base,
                    const int* __restrict__ qmask_off, const int* __restrict__ mask,
                    float* __restrict__ mid_o, float* __restrict__ mid_lse,
                    int num_heads, int group, float scale_log2) {
  using Cfg = DeftConfig<D>;
  using Tile = SwizzledTile<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);                       // [64][D]
  T* smem_kv = smem_q + Cfg::kQElems;                               // [2][2][64][D]
  DeftToken* smem_rec = reinterpret_cast<DeftToken*>(smem_kv + 4 * Cfg::kTileElems);  // [2][64]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int hk = blockIdx.y;

  // Step 1: this CTA's chunk, rows and warp layout.
  const int c = work[2 * blockIdx.x], row_tile = work[2 * blockIdx.x + 1];
  const DeftChunk ch = chunks[c];
  const int rows = (ch.q1 - ch.q0) * group;
  const int m0 = row_tile * Cfg::kBlockM;
  const int rows_here = min(Cfg::kBlockM, rows - m0);
  const int warps_m = rows_here <= 16 ? 1 : (rows_here <= 32 ? 2 : 4);
  const int warps_n = Cfg::kWarps / warps_m;
  const int wm = warp % warps_m, wn = warp / warps_m;

  // Step 2: async loads. Q rows past the tile and keys past tok_end are zero-filled; a
  // zero-filled record has q_lo = q_hi = 0, so its key is visible to nobody.
  auto load_q = [&]() {
    for (int i = tid; i < Cfg::kBlockM * Cfg::kChunks; i += Cfg::kThreads) {
      const int r = i / Cfg::kChunks, cc = i % Cfg::kChunks;
      const bool ok = r < rows_here;
      const int m = m0 + (ok ? r : 0);
      const T* src = q + (ch.q0 + m / group) * q_sq + (hk * group + m % group) * q_sh + cc * 8;
      cp_async_16(smem_addr(smem_q + Tile::offset(r, cc)), src, ok ? 16 : 0);
    }
  };
  auto load_kv = [&](int stage, int tile_start) {
    T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    T* sv = sk + Cfg::kTileElems;
    if (tid < Cfg::kBlockN) {
      const int key = tile_start + tid;
      const bool ok = key < ch.tok_end;
      cp_async_16(smem_addr(smem_rec + stage * Cfg::kBlockN + tid), tokens + (ok ? key : ch.tok_begin), ok ? 16 : 0);
    }
    int slot[Cfg::kLoadIters];
#pragma unroll
    for (int j = 0; j < Cfg::kLoadIters; ++j) {  // all page lookups first, then the copies
      const int key = tile_start + (tid + j * Cfg::kThreads) / Cfg::kChunks;
      slot[j] = tokens[key < ch.tok_end ? key : ch.tok_begin].slot;
    }
#pragma unroll
    for (int j = 0; j < Cfg::kLoadIters; ++j) {
      const int i = tid + j * Cfg::kThreads;
      const int r = i / Cfg::kChunks, cc = i % Cfg::kChunks;
      const bool ok = tile_start + r < ch.tok_end;
      const i64 page = slot[j] >> log2_page, prow = slot[j] & ((1 << log2_page) - 1);
      cp_async_16(smem_addr(sk + Tile::offset(r, cc)), k_pool + page * k_sp + hk * k_sh + prow * k_sr + cc * 8, ok ? 16 : 0);
      cp_async_16(smem_addr(sv + Tile::offset(r, cc)), v_pool + page * v_sp + hk * v_sh + prow * v_sr + cc * 8, ok ? 16 : 0);
    }
  };

  const int num_tiles = (ch.tok_end - ch.tok_begin + Cfg::kBlockN - 1) / Cfg::kBlockN;
  load_q();
  cp_async_commit();
  load_kv(0, ch.tok_begin);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed
  __syncthreads();

  // Step 3: per-warp state: rows m0 + 16 wm + {g, g + 8}, keys kb = 16 wn + 16 warps_n k of each tile.
  const int g = lane / 4, c4 = lane % 4;
  const int warp_row0 = wm * 16;
  const bool warp_active = warp_row0 < rows_here;
  float o_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()};
  float row_sum[2] = {0.f, 0.f};
  int q_row[2], qm_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    q_row[r] = ch.q0 + min(m0 + warp_row0 + g + 8 * r, rows - 1) / group;
    qm_row[r] = qmask_off[q_row[r]];
  }

  // Step 4: the KV loop, one 64-key tile per iteration.
  for (int it = 0; it < num_tiles; ++it) {
    const int tile_start = ch.tok_begin + it * Cfg::kBlockN;
    const int stage = it & 1;
    if (it + 1 < num_tiles) load_kv(stage ^ 1, tile_start + Cfg::kBlockN);
    cp_async_commit();
    cp_async_wait<1>();
    const T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    const T* sv = sk + Cfg::kTileElems;
    const DeftToken* srec = smem_rec + stage * Cfg::kBlockN;
    // A full tile: every key visible to every query of the chunk (a shared prefix, say), so no
    // per-score test. Thread tid < 64 reads the record it copied itself (landed after its wait);
    // the barrier that publishes the tile also ANDs the verdicts. Keys past tok_end were
    // zero-filled (q_lo = q_hi = 0), which fails the test.
    bool visible_to_all = true;
    if (tid < Cfg::kBlockN) {
      const DeftToken rec = srec[tid];
      visible_to_all = rec.q_lo <= ch.q0 && ch.q1 <= rec.q_hi && rec.mask_col < 0;
    }
    const bool full = __syncthreads_and(visible_to_all);

    if (warp_active) {
#pragma unroll 1
      for (int kb = wn * Cfg::kWarpN; kb < Cfg::kBlockN; kb += warps_n * Cfg::kWarpN) {
        // Step 4a: S = Q K^T for 16 keys.
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {  // Q fragments re-read from shared memory: registers go to the lazy rescale
          u32 a[4];
          load_a_frag<D>(a, smem_q, warp_row0, kk, lane);
          mma_abt<D, 16>(s, a, sk, kb, kk, lane);
        }

        // Step 4b: keys this row's query does not see become -inf (the softmax step scales).
#pragma unroll
        for (int j = 0; j < 2 && !full; ++j) {
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            const DeftToken rec = srec[kb + 8 * j + 2 * c4 + e2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              bool ok = rec.q_lo <= q_row[r] && q_row[r] < rec.q_hi;
              if (ok && rec.mask_col >= 0) ok = mask[qm_row[r] + rec.mask_col] != 0;
              if (!ok) s[j][2 * r + e2] = neg_inf();
            }
          }
        }

        // Step 4c: online softmax (rows g and g + 8), rescaling what O holds so far.
        online_softmax_step(s, scale_log2, row_max, row_sum, o_acc);

        // Step 4d: O += P V.
        u32 a[4];
        acc_to_a<T>(a, s, 0);
        mma_ab<D>(o_acc, a, sv, kb, lane);
      }
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

  // Step 5: warps that split the keys of the same rows merge their states (K/V smem is free now).
  if (warps_n > 1) {
    cp_async_wait<0>();
    float* red = reinterpret_cast<float*>(smem_kv) + warp * Cfg::kRedFloats;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(4 * i + e) * 32 + lane] = o_acc[i][e];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      red[(D / 2 + r) * 32 + lane] = row_max[r];
      red[(D / 2 + 2 + r) * 32 + lane] = row_sum[r];
    }
    __syncthreads();
    if (wn != 0) return;
    for (int k = 1; k < warps_n; ++k) {
      const float* other = reinterpret_cast<const float*>(smem_kv) + (wm + k * warps_m) * Cfg::kRedFloats;
      float wa[2], wb[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_b = other[(D / 2 + r) * 32 + lane];
        const float mx = fmaxf(row_max[r], m_b);
        const float base = mx == neg_inf() ? 0.f : mx;
        wa[r] = fast_exp2(row_max[r] - base);
        wb[r] = fast_exp2(m_b - base);
        row_max[r] = mx;
        row_sum[r] = row_sum[r] * wa[r] + other[(D / 2 + 2 + r) * 32 + lane] * wb[r];
      }
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o_acc[i][e] = o_acc[i][e] * wa[e / 2] + other[(4 * i + e) * 32 + lane] * wb[e / 2];
      }
    }
  }

  // Step 6: normalise and store the partial state of each owned row.
  if (!warp_active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    const int m = m0 + warp_row0 + g + 8 * r;
    if (m >= rows) continue;
    const int h = hk * group + m % group;
    const i64 state = static_cast<i64>(slot_base[c] + m / group) * num_heads + h;
    const float inv = total > 0.f ? 1.f / total : 0.f;
    float* dst = mid_o + state * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<float2*>(dst + 8 * i + 2 * c4) = make_float2(o_acc[i][2 * r] * inv, o_acc[i][2 * r + 1] * inv);
    }
    if (c4 == 0) mid_lse[state] = lse_from_base2(row_max[r], total);
  }
}

template <typename T, int D>
struct DeftMergeConfig {
  static constexpr int kLanes = D / 4;             // threads per (query, head) row, 4 floats each
  static constexpr int kRows = 256 / kLanes;       // rows per block
  static constexpr int kThreads = kRows * kLanes;
};

template <typename T, int D>
__global__ void __launch_bounds__(256)
deft_merge_kernel(const float* __restrict__ mid_o, const float* __restrict__ mid_lse,
                  const int* __restrict__ q_indptr, const int* __restrict__ slot_idx,
                  T* __restrict__ out, i64 o_sq, i64 o_sh, float* __restrict__ lse_out,
                  int num_queries, int num_heads) {
  using Cfg = DeftMergeConfig<T, D>;
  const int row = blockIdx.x * Cfg::kRows + threadIdx.x / Cfg::kLanes;
  const int lane = threadIdx.x % Cfg::kLanes;
  if (row >= num_queries * num_heads) return;
  const int qi = row / num_heads, h = row % num_heads;

  // Step 1: one online pass over this query's partials, in the plan's order.
  float max2 = neg_inf(), sum = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int end = q_indptr[qi + 1];
  for (int s = q_indptr[qi]; s < end; ++s) {
    const i64 state = static_cast<i64>(slot_idx[s]) * num_heads + h;
    const float l2 = mid_lse[state] * kLog2e;
    if (l2 == neg_inf()) continue;  // an empty partial: its o is never read
    const Vec16 v = *reinterpret_cast<const Vec16*>(mid_o + state * D + 4 * lane);
    const float mx = fmaxf(max2, l2);
    const float rescale = fast_exp2(max2 - mx), w = fast_exp2(l2 - mx);
    max2 = mx;
    sum = sum * rescale + w;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = acc[i] * rescale + w * __uint_as_float(v.w[i]);
  }

  // Step 2: normalise and store 4 values of T (8 bytes) and the lse.
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  U32x2 packed;
  packed.a = pack2<T>(acc[0] * inv, acc[1] * inv);
  packed.b = pack2<T>(acc[2] * inv, acc[3] * inv);
  *reinterpret_cast<U32x2*>(out + qi * o_sq + h * o_sh + 4 * lane) = packed;
  if (lane == 0) lse_out[row] = lse_from_base2(max2, sum);
}

}  // namespace ft
