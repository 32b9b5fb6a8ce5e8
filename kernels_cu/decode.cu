// flashtree kernel family `decode`: split-KV attention of a draft tree over a KV cache.
//
// Computes, for sequence b, KV head hk and every query row m = t * G + g (tree token t, query head
// h = hk * G + g), one partial attention state per split s < S over the keys
//   k_cache[b, hk, j] for j in [s * split_len, min((s + 1) * split_len, kv_len[b])), and, in the
//   sequence's last non-empty split (split 0 when kv_len[b] = 0), also
//   current_k[b, hk, j] for j in [0, T) with mask[b, t, j] != 0 (extra tiles after the cache tiles).
// With S = 1 that state is the answer: out[b, h, t, :] in T and lse_out[b, h, t]. With S > 1 it
// writes mid_o[b, h, t, s, :] (normalised over the split's keys, fp32) and mid_lse[b, h, t, s]
// (natural log; -inf for an empty split, whose mid_o is left unwritten), and the merge kernel
// combines the S states exactly into the output.
//
// Mapping: grid = (ceil(G * T / kBlockM), S, B * Hkv), 128 threads = 4 warps.
//   All G * T query rows of one KV head share each K/V tile: a CTA holds kBlockM = 64 * M_TILES
//   of them (16 * M_TILES per warp), so the cache is read once per KV head and row tile, never
//   once per query head. With M_TILES = 2 (the host's choice when M > 64) each K/V fragment
//   loaded from shared memory feeds two mma chains: half the ldmatrix traffic per flop.
//   Each warp: S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation), online softmax
//   in base 2 over sub-tiles of kWarpN keys, the row sums also on the tensor cores (P x 1).
// Shared memory (16-bit elements): Q [kBlockM][D] + STAGES x (K [BLOCK_N][D] + V [BLOCK_N][D]),
//   rows XOR-swizzled in 16-byte chunks; K/V tiles arrive by cp.async, STAGES - 1 tiles in flight
//   while one is computed (the host picks the deepest pipeline with which two CTAs fit an SM).
//   bytes = 2 * (kBlockM * D + STAGES * 2 * BLOCK_N * D)   (the host computes the same formula),
//   plus a static ring of block-table entries when PAGED: the page ids of tile i + STAGES are
//   read from global memory while tile i is computed, so no cp.async waits on a table lookup.
//
// Inputs (strides in elements, head_dim contiguous, rows 16-byte aligned):
//   q          T      [B, H, T, D]                 strides (q_sb, q_sh, q_st)
//   k/v cache  T      padded [B, Hkv, C, D]        strides (sb, sh, st)
//                     paged  [pages, Hkv, P, D]    strides (sb = page stride, sh, st); P = 2^log2_page
//   block_table int32 [B, max_pages]               stride bt_sb (paged only)
//   current k/v T     [B, Hkv, T, D]               strides (sb, sh, st)
//   mask       uint8  [B or 1, T, T]               strides (m_sb = 0 when shared, m_si, m_sj)
//   kv_len     int32  [B]
// Outputs: S > 1: mid_o fp32 [B, H, T, state_stride, D] and mid_lse fp32 [B, H, T, state_stride],
//   contiguous (state_stride >= S); S = 1: out T [B, H, T, D] strides (o_sb, o_sh, o_st), 4-byte
//   aligned rows, and lse_out fp32 [B, H, T] contiguous.
// Numerics: scores scaled by scale_log2 = sm_scale * log2(e) > 0 inside the exp2 (one FFMA), fp32
//   accumulation, O rescaled lazily (common/warp_gemm.cuh: online_softmax_step);
//   keys outside [begin, end) are zero-filled in shared memory and masked to -inf, so NaN or
//   garbage beyond kv_len never reaches the result.
#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"

namespace ft {

template <typename T, int D, int BLOCK_N, int STAGES, int WARP_N, int M_TILES>
struct DecodeConfig {
  static constexpr int kThreads = 128;
  static constexpr int kMTiles = M_TILES;                   // 16-row blocks per warp
  static constexpr int kWarpM = 16 * M_TILES;               // query rows per warp
  static constexpr int kBlockM = 4 * kWarpM;                // query rows per CTA
  // Keys per softmax step (WARP_N, capped by the tile): 64 halves the rescales of O and gives 8
  // independent S accumulators per warp, 32 leaves registers for Q fragments.
  static constexpr int kWarpN = BLOCK_N < WARP_N ? BLOCK_N : WARP_N;
  static constexpr int kChunks = D / 8;                     // 16-byte chunks per row
  // Q fragments stay in registers only for one 16-row block and a short softmax step; otherwise
  // they are re-read from shared memory (ldmatrix) at every step.
  static constexpr bool kQInRegs = M_TILES == 1 && D <= 128 && D * kWarpN <= 128 * 32;
  // Reduction steps of S = Q K^T unrolled together: all of them for one row block of D <= 128;
  // two otherwise (full unrolling hoists enough addresses to spill at 255 registers).
  static constexpr int kQKUnroll = M_TILES == 1 && D <= 128 ? D / 16 : 2;
  static constexpr int kQElems = kBlockM * D;
  static constexpr int kTileElems = BLOCK_N * D;
  // Paged: block-table entries of a tile (pages are >= 8 keys), kept in a ring of shared-memory
  // slots one tile ahead of the cp.async pipeline.
  static constexpr int kPagesPerTile = BLOCK_N / 8;
  static constexpr int kPageRing = STAGES + 1;
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N % kWarpN == 0, "BLOCK_N must be a multiple of 16");
  static_assert(STAGES >= 1 && STAGES <= 4, "one to four stages");
  static_assert(M_TILES == 1 || M_TILES == 2, "one or two 16-row blocks per warp");
};

// Where this thread's 16-byte column of a key's K or V row lives: the head (and, padded, the
// sequence) is folded into `base` once; a paged row adds its page.
template <typename T>
struct KvAddress {
  const T* base;
  i64 sb, st;

  __device__ __forceinline__ const T* row_ptr(int page, int row) const { return base + page * sb + row * st; }
};

template <typename T, int D, int BLOCK_N, int STAGES, int WARP_N, bool PAGED, int M_TILES>
__global__ void __launch_bounds__(128, 2)  // 2 CTAs per SM: up to 255 registers, no spills
tree_decode_kernel(const T* __restrict__ q, i64 q_sb, i64 q_sh, i64 q_st,
                   const T* __restrict__ k_cache, i64 kc_sb, i64 kc_sh, i64 kc_st,
                   const T* __restrict__ v_cache, i64 vc_sb, i64 vc_sh, i64 vc_st,
                   const int* __restrict__ block_table, i64 bt_sb, int log2_page,
                   const T* __restrict__ cur_k, i64 ck_sb, i64 ck_sh, i64 ck_st,
                   const T* __restrict__ cur_v, i64 cv_sb, i64 cv_sh, i64 cv_st,
                   const unsigned char* __restrict__ mask, i64 m_sb, i64 m_si, i64 m_sj,
                   const int* __restrict__ kv_len,
                   float* __restrict__ mid_o, float* __restrict__ mid_lse, int state_stride,
                   T* __restrict__ out, i64 o_sb, i64 o_sh, i64 o_st, float* __restrict__ lse_out,
                   int num_heads, int group, int num_tokens, int num_splits, int split_len,
                   float scale_log2) {
  using Cfg = DecodeConfig<T, D, BLOCK_N, STAGES, WARP_N, M_TILES>;
  using Tile = SwizzledTile<D>;
  constexpr int MT = Cfg::kMTiles;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);                  // [kBlockM][D]
  T* smem_kv = smem_q + Cfg::kQElems;                          // [STAGES][2][BLOCK_N][D]
  __shared__ int smem_pages[PAGED ? Cfg::kPageRing : 1][PAGED ? Cfg::kPagesPerTile : 1];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int num_kv_heads = num_heads / group;
  const int b = blockIdx.z / num_kv_heads, hk = blockIdx.z % num_kv_heads;
  const int split = blockIdx.y;
  const int rows = group * num_tokens;                         // M = G * T query rows
  const int m0 = blockIdx.x * Cfg::kBlockM;

  // Step 1: this CTA's keys: the cache keys [key_begin, key_end) of its split, in tiles
  // 0 .. cache_tiles - 1, then, in the sequence's last non-empty split (split 0 when the cache is
  // empty), the T tree tokens of current_k/current_v under the mask, in tiles cache_tiles ...
  const int len = kv_len[b];
  const int key_begin = split * split_len;
  const int key_end = min(key_begin + split_len, len);
  const int cache_tiles = key_end > key_begin ? (key_end - key_begin + BLOCK_N - 1) / BLOCK_N : 0;
  const int last_split = split_len > 0 && len > 0 ? min((len - 1) / split_len, num_splits - 1) : 0;
  const int num_tiles = cache_tiles + (split == last_split ? (num_tokens + BLOCK_N - 1) / BLOCK_N : 0);
  const int chunk = tid % Cfg::kChunks;  // the 16-byte column of K/V rows this thread copies
  auto kv_address = [&](const T* base, i64 sb, i64 sh, i64 st) {
    return KvAddress<T>{base + (PAGED ? 0 : b * sb) + hk * sh + chunk * 8, sb, st};
  };
  const KvAddress<T> k_addr = kv_address(k_cache, kc_sb, kc_sh, kc_st);
  const KvAddress<T> v_addr = kv_address(v_cache, vc_sb, vc_sh, vc_st);

  // An empty split stores lse = -inf only: the merge ignores the o of an empty state. (With one
  // split there is no merge, and that split always holds the tree.)
  if (num_tiles == 0) {
    for (int m = m0 + tid; m < min(m0 + Cfg::kBlockM, rows); m += Cfg::kThreads) {
      const int t = m / group, h = hk * group + m % group;
      mid_lse[(static_cast<i64>(b * num_heads + h) * num_tokens + t) * state_stride + split] = neg_inf();
    }
    return;
  }

  // Paged: tile `tile` spans pages first_page(tile) .. + pages_per_tile - 1 (tiles start on a
  // page boundary when pages are shorter than a tile, and lie inside one page otherwise). Thread
  // p < pages_per_tile reads entry p; pages past the last valid key are clamped, never read.
  const int pages_per_tile = max(1, BLOCK_N >> log2_page);
  const int last_page = (max(key_end, key_begin + 1) - 1) >> log2_page;
  auto first_page = [&](int tile) { return (key_begin + tile * BLOCK_N) >> log2_page; };
  auto fetch_page = [&](int tile) {
    return block_table[b * bt_sb + min(first_page(tile) + tid, last_page)];
  };

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
  auto load_kv = [&](int stage, int tile) {
    T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    T* sv = sk + Cfg::kTileElems;
    // Each thread copies its 16-byte column of rows r0, r0 + kRowStep, ...; paged rows find
    // their page in the shared-memory ring (filled one tile ahead), not in global memory.
    constexpr int kRowStep = Cfg::kThreads / Cfg::kChunks;
    if (tile >= cache_tiles) {  // a tree tile: tokens j of current_k/current_v, j < T
      const int j0 = (tile - cache_tiles) * BLOCK_N;
      const T* ck = cur_k + b * ck_sb + hk * ck_sh + chunk * 8;
      const T* cv = cur_v + b * cv_sb + hk * cv_sh + chunk * 8;
#pragma unroll 2
      for (int r = tid / Cfg::kChunks; r < BLOCK_N; r += kRowStep) {
        const int j = j0 + r, jc = min(j, num_tokens - 1), bytes = j < num_tokens ? 16 : 0;
        cp_async_16(smem_addr(sk + Tile::offset(r, chunk)), ck + jc * ck_st, bytes);
        cp_async_16(smem_addr(sv + Tile::offset(r, chunk)), cv + jc * cv_st, bytes);
      }
      return;
    }
    const int tile_start = key_begin + tile * BLOCK_N;
    // Paged: a tile starts on a page boundary when pages are shorter than a tile and lies inside
    // one page otherwise, so row r is in ring entry r >> log2_page (0 for long pages). Entries past
    // the last valid page repeat it, so rows past key_end still address a real page (reading nothing).
    const int* pages = PAGED ? smem_pages[tile % Cfg::kPageRing] : nullptr;
    if (!PAGED || (BLOCK_N >> log2_page) <= 1) {
      // The tile is contiguous (padded, or inside one page): row r at tile_base + r * st, the same
      // affine address stream as a padded cache. Padded rows past key_end are clamped (and read
      // nothing); paged ones stay inside the page.
      const i64 page_off = PAGED ? pages[0] * k_addr.sb : 0, page_off_v = PAGED ? pages[0] * v_addr.sb : 0;
      const int first = PAGED ? (tile_start & ((1 << log2_page) - 1)) : tile_start;
      const T* kt = k_addr.base + page_off + first * k_addr.st;
      const T* vt = v_addr.base + page_off_v + first * v_addr.st;
      const int last_row = PAGED ? BLOCK_N - 1 : key_end - 1 - tile_start;
#pragma unroll 2
      for (int r = tid / Cfg::kChunks; r < BLOCK_N; r += kRowStep) {
        const int rr = min(r, last_row), bytes = tile_start + r < key_end ? 16 : 0;
        cp_async_16(smem_addr(sk + Tile::offset(r, chunk)), kt + rr * k_addr.st, bytes);
        cp_async_16(smem_addr(sv + Tile::offset(r, chunk)), vt + rr * v_addr.st, bytes);
      }
      return;
    }
    if (2 * kRowStep <= (1 << log2_page)) {
      // Pages shorter than the tile (which starts on a page boundary), each holding whole pairs
      // of this thread's rows: rows r and r + kRowStep (r mod 2 kRowStep < kRowStep) share a
      // page, so one lookup and one page address serve both.
#pragma unroll 2
      for (int r = tid / Cfg::kChunks; r < BLOCK_N; r += 2 * kRowStep) {
        const int key = tile_start + r, row = key & ((1 << log2_page) - 1), page = pages[r >> log2_page];
        const T* kp = k_addr.row_ptr(page, row);
        const T* vp = v_addr.row_ptr(page, row);
        cp_async_16(smem_addr(sk + Tile::offset(r, chunk)), kp, key < key_end ? 16 : 0);
        cp_async_16(smem_addr(sv + Tile::offset(r, chunk)), vp, key < key_end ? 16 : 0);
        const int bytes2 = key + kRowStep < key_end ? 16 : 0;
        cp_async_16(smem_addr(sk + Tile::offset(r + kRowStep, chunk)), kp + kRowStep * k_addr.st, bytes2);
        cp_async_16(smem_addr(sv + Tile::offset(r + kRowStep, chunk)), vp + kRowStep * v_addr.st, bytes2);
      }
      return;
    }
    // Pages shorter than two of this thread's row steps: row by row.
    int ring_entry = -1, page = 0;
#pragma unroll 2
    for (int r = tid / Cfg::kChunks; r < BLOCK_N; r += kRowStep) {
      const int key = tile_start + r;
      if ((r >> log2_page) != ring_entry) {  // read again only when this thread crosses a page
        ring_entry = r >> log2_page;
        page = pages[ring_entry];
      }
      const int row = key & ((1 << log2_page) - 1), bytes = key < key_end ? 16 : 0;
      cp_async_16(smem_addr(sk + Tile::offset(r, chunk)), k_addr.row_ptr(page, row), bytes);
      cp_async_16(smem_addr(sv + Tile::offset(r, chunk)), v_addr.row_ptr(page, row), bytes);
    }
  };

  // Prologue: the page ids of tiles 0 .. STAGES - 1 (and, in a register, of tile STAGES), then
  // Q with tile 0 in the first commit group and tiles 1 .. STAGES - 2; one group per tile
  // (possibly empty) keeps the group count fixed, so wait<STAGES - 2> always means "tile `it`
  // has landed".
  const bool fetches_pages = PAGED && tid < pages_per_tile;
  int pending_page = 0;  // page id of tile it + STAGES, read from global memory one iteration ago
  if (PAGED) {
    if (fetches_pages) {
#pragma unroll
      for (int i = 0; i < STAGES; ++i)
        if (i < cache_tiles) smem_pages[i % Cfg::kPageRing][tid] = fetch_page(i);
      if (STAGES < cache_tiles) pending_page = fetch_page(STAGES);
    }
    __syncthreads();
  }
  load_q();
  load_kv(0, 0);
  cp_async_commit();
#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    if (i < num_tiles) load_kv(i, i);
    cp_async_commit();
  }
  if (STAGES == 1) cp_async_wait<0>();
  else cp_async_wait<(STAGES > 1 ? STAGES - 2 : 0)>();
  __syncthreads();

  // Step 3: per-warp state. This warp owns rows m0 + kWarpM * warp + 16 * mt + {g, g + 8}.
  const int g = lane / 4, c4 = lane % 4;
  const int warp_row0 = warp * Cfg::kWarpM;
  const bool warp_active = m0 + warp_row0 < rows;
  u32 q_frag[Cfg::kQInRegs ? D / 16 : 1][4];
  if (Cfg::kQInRegs && warp_active) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_frag<D>(q_frag[kk], smem_q, warp_row0, kk, lane);
  }
  float o_acc[MT][D / 8][4];
  float row_max[MT][2];  // base-2 running max (reference) of rows g, g + 8
  float l_acc[MT][4];    // row sums (mma_row_sum): row g in [0], row g + 8 in [2]
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o_acc[mt][i][0] = o_acc[mt][i][1] = o_acc[mt][i][2] = o_acc[mt][i][3] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) row_max[mt][r] = neg_inf();
#pragma unroll
    for (int e = 0; e < 4; ++e) l_acc[mt][e] = 0.f;
  }

  // Step 4: the KV loop, one BLOCK_N tile per iteration.
  for (int it = 0; it < num_tiles; ++it) {
    const bool tree_tile = it >= cache_tiles;  // keys are tree tokens j (masked), else cache positions
    const int tile_start = tree_tile ? (it - cache_tiles) * BLOCK_N : key_begin + it * BLOCK_N;
    const int tile_end = tree_tile ? num_tokens : key_end;
    int stage = 0;
    if (STAGES == 1) {
      if (it > 0) {
        __syncthreads();  // every warp is done with the previous tile (and the page ring is written)
        load_kv(0, it);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
    } else {
      // Tile `it` has landed (prologue or the previous iteration's wait) and every warp has left
      // tile it - 1, whose stage now receives tile it + STAGES - 1.
      stage = it % STAGES;
      const int ahead = it + STAGES - 1;
      if (ahead < num_tiles) load_kv(ahead % STAGES, ahead);
      cp_async_commit();
    }
    // Paged: store the page id of tile it + STAGES (read one iteration ago, so its latency hid
    // behind a whole tile of math; read by load_kv after this iteration's barrier) and read the
    // one of tile it + STAGES + 1.
    if (fetches_pages && it + STAGES < cache_tiles) {
      smem_pages[(it + STAGES) % Cfg::kPageRing][tid] = pending_page;
      if (it + STAGES + 1 < cache_tiles) pending_page = fetch_page(it + STAGES + 1);
    }

    const T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    const T* sv = sk + Cfg::kTileElems;
    const bool needs_mask = tree_tile || tile_start + BLOCK_N > tile_end;

    if (warp_active) {
#pragma unroll 1
      for (int kb = 0; kb < BLOCK_N; kb += Cfg::kWarpN) {
        // Step 4a: S = Q K^T for kWarpN keys, each K fragment loaded once for the MT row blocks.
        float s[MT][Cfg::kWarpN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < Cfg::kWarpN / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll Cfg::kQKUnroll
        for (int kk = 0; kk < D / 16; ++kk) {
          u32 a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if (Cfg::kQInRegs) {
#pragma unroll
              for (int e = 0; e < 4; ++e) a[mt][e] = q_frag[Cfg::kQInRegs ? kk : 0][e];
            } else {
              load_a_frag<D>(a[mt], smem_q, warp_row0 + 16 * mt, kk, lane);
            }
          }
          mma_abt_mt<D, Cfg::kWarpN, MT>(s, a, sk, kb, kk, lane);
        }

        // Step 4b: mask keys outside the range and, in the tree split, by the tree (raw scores; the
        // softmax step applies the base-2 scale).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // The mask rows of this block's rows g and g + 8 (tree split only; rows past M, never
          // stored, reuse the last row).
          const unsigned char* mask_row[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int t = min(m0 + warp_row0 + 16 * mt + g + 8 * r, rows - 1) / group;
            mask_row[r] = tree_tile ? mask + b * m_sb + t * m_si : mask;
          }
#pragma unroll
          for (int j = 0; j < Cfg::kWarpN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = tile_start + kb + 8 * j + 2 * c4 + (e & 1);
              bool ok = true;
              if (needs_mask) {
                ok = key < tile_end;
                if (tree_tile && ok) ok = mask_row[e / 2][key * m_sj] != 0;
              }
              if (!ok) s[mt][j][e] = neg_inf();
            }
          }
          // Step 4c: online softmax (rows g and g + 8), rescaling what O holds so far.
          online_softmax_step(s[mt], scale_log2, row_max[mt], l_acc[mt], o_acc[mt]);
        }

        // Step 4d: O += P V and l += P 1, P re-packed from the S accumulators as 16-bit A fragments.
#pragma unroll
        for (int kk = 0; kk < Cfg::kWarpN / 16; ++kk) {
          u32 a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            acc_to_a<T>(a[mt], s[mt], kk);
            mma_row_sum<T>(l_acc[mt], a[mt]);
          }
          mma_ab_mt<D, MT>(o_acc, a, sv, kb + 16 * kk, lane);
        }
      }
    }
    if (STAGES > 1) {
      cp_async_wait<(STAGES > 1 ? STAGES - 2 : 0)>();  // tile it + 1 has landed (this thread's part)
      __syncthreads();  // ... everyone's part, every warp is done with tile it, the page ring is written
    }
  }

  // Step 5: normalise and store the owned rows: with one split this is the answer (out in T and
  // lse_out, no merge needed), else this split's state for the merge.
  if (!warp_active) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = l_acc[mt][2 * r];
      const int m = m0 + warp_row0 + 16 * mt + g + 8 * r;
      if (m >= rows) continue;
      const int t = m / group, h = hk * group + m % group;
      const float inv = inv_or_zero(total);
      const i64 bht = static_cast<i64>(b * num_heads + h) * num_tokens + t;
      if (num_splits == 1) {
        T* dst = out + b * o_sb + h * o_sh + t * o_st;
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
          *reinterpret_cast<u32*>(dst + 8 * i + 2 * c4) = pack2<T>(o_acc[mt][i][2 * r] * inv, o_acc[mt][i][2 * r + 1] * inv);
        if (c4 == 0) lse_out[bht] = lse_from_base2(row_max[mt][r], total);
        continue;
      }
      const i64 state = bht * state_stride + split;
      float* dst = mid_o + state * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        float2 v = make_float2(o_acc[mt][i][2 * r] * inv, o_acc[mt][i][2 * r + 1] * inv);
        *reinterpret_cast<float2*>(dst + 8 * i + 2 * c4) = v;
      }
      if (c4 == 0) mid_lse[state] = lse_from_base2(row_max[mt][r], total);
    }
  }
}

}  // namespace ft
