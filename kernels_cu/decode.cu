// flashtree kernel family `decode`: split-KV attention of a draft tree over a KV cache.
//
// Computes, for sequence b, KV head hk and every query row m = t * G + g (tree token t, query head
// h = hk * G + g), one partial attention state per split:
//   split s < S (cache):  keys k_cache[b, hk, j] for j in [s * split_len, min((s + 1) * split_len, kv_len[b]))
//   split S     (tree):   keys current_k[b, hk, j] for j in [0, T) with mask[b, t, j] != 0
// and writes mid_o[b, h, t, s, :] (normalised over the split's keys, fp32) and mid_lse[b, h, t, s]
// (natural log; -inf for an empty split, whose mid_o is left unwritten). The merge kernel then
// combines the S + 1 states exactly into the output.
//
// Mapping: grid = (ceil(G * T / 64), S + 1, B * Hkv), 128 threads = 4 warps.
//   All G * T query rows of one KV head share each K/V tile: a CTA holds 64 of them (16 per warp),
//   so the cache is read once per KV head and row tile, never once per query head.
//   Each warp: S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation), online softmax
//   in base 2 over sub-tiles of kWarpN keys.
// Shared memory (16-bit elements): Q [64][D] + STAGES x (K [BLOCK_N][D] + V [BLOCK_N][D]), rows
//   XOR-swizzled in 16-byte chunks; K/V tiles arrive by cp.async, STAGES - 1 tiles in flight
//   while one is computed (the host picks 3 stages where two CTAs still fit on an SM).
//   bytes = 2 * (64 * D + STAGES * 2 * BLOCK_N * D)   (the host computes the same formula).
//
// Inputs (strides in elements, head_dim contiguous, rows 16-byte aligned):
//   q          T      [B, H, T, D]                 strides (q_sb, q_sh, q_st)
//   k/v cache  T      padded [B, Hkv, C, D]        strides (sb, sh, st)
//                     paged  [pages, Hkv, P, D]    strides (sb = page stride, sh, st); P = 2^log2_page
//   block_table int32 [B, max_pages]               stride bt_sb (paged only)
//   current k/v T     [B, Hkv, T, D]               strides (sb, sh, st)
//   mask       uint8  [B or 1, T, T]               strides (m_sb = 0 when shared, m_si, m_sj)
//   kv_len     int32  [B]
// Outputs: mid_o fp32 [B, H, T, S + 1, D] and mid_lse fp32 [B, H, T, S + 1], contiguous.
// Numerics: scores scaled by scale_log2 = sm_scale * log2(e), exp2 softmax, fp32 accumulation;
//   keys outside [begin, end) are zero-filled in shared memory and masked to -inf, so NaN or
//   garbage beyond kv_len never reaches the result.
#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"

namespace ft {

template <typename T, int D, int BLOCK_N, int STAGES, int WARP_N>
struct DecodeConfig {
  static constexpr int kThreads = 128;
  static constexpr int kBlockM = 64;                        // query rows per CTA (16 per warp)
  // Keys per softmax step (WARP_N, capped by the tile): 64 halves the rescales of O and gives 8
  // independent S accumulators per warp, 32 leaves registers for Q fragments.
  static constexpr int kWarpN = BLOCK_N < WARP_N ? BLOCK_N : WARP_N;
  static constexpr int kChunks = D / 8;                     // 16-byte chunks per row
  static constexpr bool kQInRegs = D <= 128 && D * kWarpN <= 128 * 32;  // else Q is re-read from smem
  static constexpr int kQElems = kBlockM * D;
  static constexpr int kTileElems = BLOCK_N * D;
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N % kWarpN == 0, "BLOCK_N must be a multiple of 16");
  static_assert(STAGES >= 1 && STAGES <= 4, "one to four stages");
};

// Where one key's row of K or V lives.
struct KvAddress {
  i64 sb, sh, st;
  const int* block_table;  // paged only
  i64 bt_sb;
  int log2_page;

  // Row `row` of slot `slot` (padded: slot = sequence b; paged: slot = page from the block table).
  template <typename T>
  __device__ __forceinline__ const T* row_ptr(const T* base, int slot, int hk, int row) const {
    return base + slot * sb + hk * sh + row * st;
  }
};

template <typename T, int D, int BLOCK_N, int STAGES, int WARP_N, bool PAGED>
__global__ void __launch_bounds__(128, 2)  // 2 CTAs per SM: up to 255 registers, no spills
tree_decode_kernel(const T* __restrict__ q, i64 q_sb, i64 q_sh, i64 q_st,
                   const T* __restrict__ k_cache, i64 kc_sb, i64 kc_sh, i64 kc_st,
                   const T* __restrict__ v_cache, i64 vc_sb, i64 vc_sh, i64 vc_st,
                   const int* __restrict__ block_table, i64 bt_sb, int log2_page,
                   const T* __restrict__ cur_k, i64 ck_sb, i64 ck_sh, i64 ck_st,
                   const T* __restrict__ cur_v, i64 cv_sb, i64 cv_sh, i64 cv_st,
                   const unsigned char* __restrict__ mask, i64 m_sb, i64 m_si, i64 m_sj,
                   const int* __restrict__ kv_len,
                   float* __restrict__ mid_o, float* __restrict__ mid_lse,
                   int num_heads, int group, int num_tokens, int num_splits, int split_len,
                   float scale_log2) {
  using Cfg = DecodeConfig<T, D, BLOCK_N, STAGES, WARP_N>;
  using Tile = SwizzledTile<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);                  // [64][D]
  T* smem_kv = smem_q + Cfg::kQElems;                          // [STAGES][2][BLOCK_N][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int num_kv_heads = num_heads / group;
  const int b = blockIdx.z / num_kv_heads, hk = blockIdx.z % num_kv_heads;
  const int split = blockIdx.y, num_states = num_splits + 1;
  const int rows = group * num_tokens;                         // M = G * T query rows
  const int m0 = blockIdx.x * Cfg::kBlockM;

  // Step 1: this CTA's key range; the tree split reads current_k/current_v under the mask.
  const bool is_tree = split == num_splits;
  int key_begin = 0, key_end = num_tokens;
  if (!is_tree) {
    key_begin = split * split_len;
    key_end = min(key_begin + split_len, kv_len[b]);
  }
  const T* k_base = is_tree ? cur_k : k_cache;
  const T* v_base = is_tree ? cur_v : v_cache;
  const KvAddress k_addr = is_tree ? KvAddress{ck_sb, ck_sh, ck_st, nullptr, 0, 0}
                                   : KvAddress{kc_sb, kc_sh, kc_st, block_table, bt_sb, log2_page};
  const KvAddress v_addr = is_tree ? KvAddress{cv_sb, cv_sh, cv_st, nullptr, 0, 0}
                                   : KvAddress{vc_sb, vc_sh, vc_st, block_table, bt_sb, log2_page};
  const bool paged = PAGED && !is_tree;

  // An empty split stores lse = -inf only: the merge ignores the o of an empty state.
  if (key_end <= key_begin) {
    for (int m = m0 + tid; m < min(m0 + Cfg::kBlockM, rows); m += Cfg::kThreads) {
      const int t = m / group, h = hk * group + m % group;
      mid_lse[(static_cast<i64>(b * num_heads + h) * num_tokens + t) * num_states + split] = neg_inf();
    }
    return;
  }

  // Step 2: async loads. Q rows past M and keys past key_end are zero-filled (nothing read).
  auto load_q = [&]() {
    for (int i = tid; i < Cfg::kBlockM * Cfg::kChunks; i += Cfg::kThreads) {
      const int r = i / Cfg::kChunks, c = i % Cfg::kChunks, m = m0 + r;
      const bool ok = m < rows;
      const int mm = ok ? m : 0;
      const T* src = q + b * q_sb + (hk * group + mm % group) * q_sh + (mm / group) * q_st + c * 8;
      cp_async_16(smem_addr(smem_q + Tile::offset(r, c)), src, ok ? 16 : 0);
    }
  };
  auto load_kv = [&](int stage, int tile_start) {
    T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    T* sv = sk + Cfg::kTileElems;
    // Each thread copies one 16-byte column c of rows r0, r0 + kRowStep, ...; one page lookup per
    // row serves K and V.
    // Paged: a thread's rows step by kRowStep, so consecutive rows often share a page; the block
    // table is read again only when the page changes (once per tile when pages >= the tile).
    constexpr int kRowStep = Cfg::kThreads / Cfg::kChunks;
    const int c = tid % Cfg::kChunks;
    int page_of_slot = -1, slot = b;
#pragma unroll 2
    for (int r = tid / Cfg::kChunks; r < BLOCK_N; r += kRowStep) {
      const int key = tile_start + r;
      const int kc = min(key, key_end - 1);
      int row = kc;
      if (paged) {
        const int page = kc >> k_addr.log2_page;
        if (page != page_of_slot) {
          slot = k_addr.block_table[b * k_addr.bt_sb + page];
          page_of_slot = page;
        }
        row = kc & ((1 << k_addr.log2_page) - 1);
      }
      const int bytes = key < key_end ? 16 : 0;
      cp_async_16(smem_addr(sk + Tile::offset(r, c)), k_addr.row_ptr(k_base, slot, hk, row) + c * 8, bytes);
      cp_async_16(smem_addr(sv + Tile::offset(r, c)), v_addr.row_ptr(v_base, slot, hk, row) + c * 8, bytes);
    }
  };

  // Prologue: Q with tile 0 in the first commit group, then tiles 1 .. STAGES - 2; one group per
  // tile (possibly empty) keeps the group count fixed, so wait<STAGES - 2> always means "tile
  // `it` has landed".
  const int num_tiles = (key_end - key_begin + BLOCK_N - 1) / BLOCK_N;
  load_q();
  load_kv(0, key_begin);
  cp_async_commit();
#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    if (i < num_tiles) load_kv(i, key_begin + i * BLOCK_N);
    cp_async_commit();
  }
  if (STAGES == 1) cp_async_wait<0>();
  else cp_async_wait<(STAGES > 1 ? STAGES - 2 : 0)>();
  __syncthreads();

  // Step 3: per-warp state. This warp owns rows m0 + 16 * warp + {g, g + 8}.
  const int g = lane / 4, c4 = lane % 4;
  const int warp_row0 = warp * 16;
  const bool warp_active = m0 + warp_row0 < rows;
  u32 q_frag[Cfg::kQInRegs ? D / 16 : 1][4];
  if (Cfg::kQInRegs && warp_active) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_frag<D>(q_frag[kk], smem_q, warp_row0, kk, lane);
  }
  float o_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()};  // base-2 running max of rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums (quad-reduced at the end)
  // Tree token of each owned row (for the mask); rows past M are never stored.
  const int t_row0 = min(m0 + warp_row0 + g, rows - 1) / group;
  const int t_row1 = min(m0 + warp_row0 + g + 8, rows - 1) / group;

  // Step 4: the KV loop, one BLOCK_N tile per iteration.
  for (int it = 0; it < num_tiles; ++it) {
    const int tile_start = key_begin + it * BLOCK_N;
    int stage = 0;
    if (STAGES == 1) {
      if (it > 0) {
        __syncthreads();  // every warp is done with the previous tile
        load_kv(0, tile_start);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
    } else {
      // Tile `it` has landed (prologue or the previous iteration's wait) and every warp has left
      // tile it - 1, whose stage now receives tile it + STAGES - 1.
      stage = it % STAGES;
      const int ahead = it + STAGES - 1;
      if (ahead < num_tiles) load_kv(ahead % STAGES, key_begin + ahead * BLOCK_N);
      cp_async_commit();
    }
    const T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    const T* sv = sk + Cfg::kTileElems;
    const bool needs_mask = is_tree || tile_start + BLOCK_N > key_end;

    if (warp_active) {
#pragma unroll 1
      for (int kb = 0; kb < BLOCK_N; kb += Cfg::kWarpN) {
        // Step 4a: S = Q K^T for kWarpN keys.
        float s[Cfg::kWarpN / 8][4];
#pragma unroll
        for (int j = 0; j < Cfg::kWarpN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          if (Cfg::kQInRegs) {
            mma_abt<D, Cfg::kWarpN>(s, q_frag[Cfg::kQInRegs ? kk : 0], sk, kb, kk, lane);
          } else {
            u32 a[4];
            load_a_frag<D>(a, smem_q, warp_row0, kk, lane);
            mma_abt<D, Cfg::kWarpN>(s, a, sk, kb, kk, lane);
          }
        }

        // Step 4b: scale to base 2; mask keys outside the range and, in the tree split, by the tree.
#pragma unroll
        for (int j = 0; j < Cfg::kWarpN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = tile_start + kb + 8 * j + 2 * c4 + (e & 1);
            bool ok = true;
            if (needs_mask) {
              ok = key < key_end;
              if (is_tree && ok) ok = mask[b * m_sb + (e < 2 ? t_row0 : t_row1) * m_si + key * m_sj] != 0;
            }
            s[j][e] = ok ? s[j][e] * scale_log2 : neg_inf();
          }
        }

        // Step 4c: online softmax (rows g and g + 8), rescaling what O holds so far.
        online_softmax_step(s, row_max, row_sum, o_acc);

        // Step 4d: O += P V, P re-packed from the S accumulators as 16-bit A fragments.
#pragma unroll
        for (int kk = 0; kk < Cfg::kWarpN / 16; ++kk) {
          u32 a[4];
          acc_to_a<T>(a, s, kk);
          mma_ab<D>(o_acc, a, sv, kb + 16 * kk, lane);
        }
      }
    }
    if (STAGES > 1) {
      cp_async_wait<(STAGES > 1 ? STAGES - 2 : 0)>();  // tile it + 1 has landed (this thread's part)
      __syncthreads();  // ... everyone's part, and every warp is done with tile it
    }
  }

  // Step 5: normalise and store this split's state for the owned rows.
  if (!warp_active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    const int m = m0 + warp_row0 + g + 8 * r;
    if (m >= rows) continue;
    const int t = m / group, h = hk * group + m % group;
    const i64 state = (static_cast<i64>(b * num_heads + h) * num_tokens + t) * num_states + split;
    const float inv = total > 0.f ? 1.f / total : 0.f;
    float* dst = mid_o + state * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      float2 v = make_float2(o_acc[i][2 * r] * inv, o_acc[i][2 * r + 1] * inv);
      *reinterpret_cast<float2*>(dst + 8 * i + 2 * c4) = v;
    }
    if (c4 == 0) mid_lse[state] = lse_from_base2(row_max[r], total);
  }
}

}  // namespace ft
