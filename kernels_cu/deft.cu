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
//   writes the partial state of (c, q, h): mid_o[slot_base[c] + q - q0, h, :] (in T, normalised
//   over the visible keys) and mid_lse[...] (natural log; -inf and o = 0 when nothing is visible).
//   grid = num_work * Hkv (block = item * Hkv + hk: the plan orders items longest first), 128
//   threads = 4 warps. A tile with R rows uses warps_m = 1, 2 or 4 warps across rows (16 rows
//   each) and warps_n = 4 / warps_m warps across the keys of each KV tile, 64 / warps_n keys each
//   in one softmax step (a 64-row tile: 64-key steps, 8 independent S accumulators per warp), so
//   a chunk seen by one query (R = G rows) still keeps 4 warps busy; the warps_n states of a row
//   are merged through shared memory at the end. Q fragments are re-read from shared memory at
//   every step, so the registers hold O and the lazy-rescale state (warp_gemm.cuh).
//   Visibility: a KV tile whose keys every query of the chunk sees (the shared prefix) is "full"
//   and tests nothing (one __syncthreads_and vote per tile); for any other tile the CTA first
//   writes 64 visibility bits per query into shared memory, one tile ahead, and each score tests
//   one bit.
//   Shared memory: Q [64][D] + 2 stages x (K [64][D] + V [64][D]) + 3 x records [64][16 B], 16-bit
//   [rows][D] tiles XOR-swizzled (SwizzledTile); bytes = 5 * 2 * 64 * D + 3 * 64 * 16 (the host:
//   same formula), plus 1 KB of static visibility bits. K/V rows arrive by cp.async,
//   double-buffered; a tile's records arrive one tile earlier, so the page lookups of its K/V
//   copies read shared memory, not global memory, in the issue path, and its visibility bits are
//   ready with it.
//   The wgmma kernel (WG = true, sm_90a, chosen on compute capability 9.0): every tile is a 64-row
//   warpgroup tile (rows past the chunk are computed, never stored). S = Q K^T is one chain of
//   D / 16 wgmma m64n64k16 with Q in registers (A fragments, loaded once through shared memory)
//   and K from shared memory; O += P V is 4 wgmma m64nDk16 with P from registers and V from
//   shared memory ("transposed" B). Its tiles use wgmma.cuh's WgTile layout from a 1024-byte
//   boundary (the host adds 1 KB); with Q out of shared memory a CTA needs 4 tiles (2 K/V stages),
//   68 KB at D = 128, and at most 168 registers, so 3 CTAs share an SM (12 warps).
// Stage 2 (deft_merge_kernel), per (query q, head h): merges the partials
//   slot_idx[q_indptr[q] .. q_indptr[q + 1]) in that (chunk) order, no atomics: bitwise
//   deterministic. kLanes = D / 4 threads per row, each owning 4 floats of head_dim; the lanes
//   fetch a group of kLanes partials' lse at once, so the loads of o are the only serial part.
//
// Inputs (strides in elements, head_dim contiguous, rows 16-byte aligned):
//   q         T      [Q, H, D]               strides (q_sq, q_sh)
//   k/v pool  T      [pages, Hkv, P, D]      strides (sp, sh, sr); sh and sr below 2^31
//   tokens    int4   [N]          chunks int4 [C] (tok_begin, tok_end, q0, q1)
//   work      int8   [W] (chunk, row tile, the chunk's tok_begin, tok_end, q0, q1, slot_base, dense
//                     slot: its first key's slot when every key is at consecutive box-aligned slots and
//                     seen by every query of the chunk, else -1)
//   slot_base int [C]     qmask_off int [Q]   mask int [*]
//   q_indptr  int    [Q + 1]      slot_idx int [num_slots]
// Outputs: mid_o T [num_slots, H, D], mid_lse fp32 [num_slots, H] (contiguous);
//   out T [Q, H, D] strides (o_sq, o_sh); lse_out fp32 [Q, H] contiguous, or null (not stored).
// Numerics: exp2 softmax on scores scaled by scale_log2 = sm_scale * log2(e) > 0, fp32 accumulation,
//   P rounded to T for the P V product (as decode.cu); keys past tok_end and invisible keys are
//   -inf before any arithmetic, so pool rows nobody sees never reach the result.
#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"
#include "common/wgmma.cuh"
#include "common/wg_step.cuh"

namespace ft {

struct __align__(16) DeftToken { int slot, q_lo, q_hi, mask_col; };
struct __align__(16) DeftChunk { int tok_begin, tok_end, q0, q1; };
constexpr int kWorkInts = 8;  // a work item's record (the host: WORK_INTS)
struct __align__(8) U32x2 { u32 a, b; };

template <int D>
struct DeftConfig {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 64;   // query rows per CTA
  static constexpr int kBlockN = 64;   // keys per KV tile
  static constexpr int kChunks = D / 8;
  static constexpr int kQElems = kBlockM * D;
  static constexpr int kTileElems = kBlockN * D;
  static constexpr int kLoadIters = kBlockN * kChunks / kThreads;  // K/V chunks per thread and tile
  static constexpr int kRecRing = 3;  // record slots: tiles it (in use), it + 1 (K/V loading), it + 2 (arriving)
  // The cross-warp merge buffer, per warp: o (D / 8 x 4 floats per lane) + max and sum (2 + 2).
  static constexpr int kRedFloats = (D / 2 + 4) * 32;
  static_assert(kBlockN * kChunks % kThreads == 0, "whole load rounds");
  static_assert(kBlockN == 64 && kWarps == 4, "a tile's keys split as 64 / warps_n per warp");
};

// One softmax step of a warp's 16 rows over keys kb .. kb + KW - 1 of a KV tile (mma.sync). Unless
// the tile is full, vis holds the visibility bits of the lane's two rows.
template <int KW, typename Layout, typename T, int D>
__device__ __forceinline__ void deft_step(RowState<D>& st, const T* smem_q, const T* sk, const T* sv, bool full,
                                          const unsigned long long (&vis)[2], int warp_row0, int kb, float scale_log2,
                                          int lane) {
  // Step 4a: S = Q K^T; Q fragments are re-read from shared memory: registers go to O and S.
  float s[KW / 8][4];
#pragma unroll
  for (int j = 0; j < KW / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll 4
  for (int kk = 0; kk < D / 16; ++kk) {
    u32 a[4];
    load_a_frag<D, Layout>(a, smem_q, warp_row0, kk, lane);
    mma_abt<D, KW, Layout>(s, a, sk, kb, kk, lane);
  }

  // Step 4b: keys this row's query does not see become -inf (the softmax step scales).
  if (!full) mask_invisible<KW>(s, vis, kb, lane);

  // Step 4c: online softmax (rows g and g + 8), rescaling what O and l hold so far.
  online_softmax_step(s, scale_log2, st.row_max, st.l_acc, st.o_acc);

  // Step 4d: O += P V, l += P 1.
#pragma unroll
  for (int kk = 0; kk < KW / 16; ++kk) {
    u32 a[4];
    acc_to_a<T>(a, s, kk);
    mma_row_sum<T>(st.l_acc, a);
    mma_ab<D, Layout>(st.o_acc, a, sv, kb + 16 * kk, lane);
  }
}

// The end of stage 1 for split keys: the warps (or warpgroups) that ran the same rows over
// different keys merge their states through shared memory. deft_save_rows writes a warp's state to
// its kRedFloats slice `red`; deft_merge_rows folds the state saved at `other` into st.
template <int D>
__device__ __forceinline__ void deft_save_rows(const RowState<D>& st, float* red, int lane) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[(4 * i + e) * 32 + lane] = st.o_acc[i][e];
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    red[(D / 2 + r) * 32 + lane] = st.row_max[r];
    red[(D / 2 + 2 + r) * 32 + lane] = st.l_acc[2 * r];
  }
}

template <int D>
__device__ __forceinline__ void deft_merge_rows(RowState<D>& st, const float* other, int lane) {
  float wa[2], wb[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_b = other[(D / 2 + r) * 32 + lane];
    const float mx = fmaxf(st.row_max[r], m_b);
    const float base = mx == neg_inf() ? 0.f : mx;
    wa[r] = fast_exp2(st.row_max[r] - base);
    wb[r] = fast_exp2(m_b - base);
    st.row_max[r] = mx;
    st.l_acc[2 * r] = st.l_acc[2 * r] * wa[r] + other[(D / 2 + 2 + r) * 32 + lane] * wb[r];
  }
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.o_acc[i][e] = st.o_acc[i][e] * wa[e / 2] + other[(4 * i + e) * 32 + lane] * wb[e / 2];
  }
}

// Normalise and store the partial states of the lane's rows m = m_g and m_g + 8 of chunk c (rows
// at or past `rows` are not stored): mid_o[slot_base + m / group, hk * group + m % group, :] in T
// (a partial o is a convex combination of V rows, so T's range holds it; half the bytes of fp32
// between the two stages), the lse in fp32.
template <typename T, int D>
__device__ __forceinline__ void deft_store_rows(const RowState<D>& st, int m_g, int rows, int group, int hk,
                                                int slot_base, int num_heads, T* __restrict__ mid_o,
                                                float* __restrict__ mid_lse, int lane) {
  pdl_launch_dependents();  // the CTA's products are done: stage 2 may launch and load its indices
  const int c4 = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = st.l_acc[2 * r];
    const int m = m_g + 8 * r;
    if (m >= rows) continue;
    const int h = hk * group + m % group;
    const i64 state = static_cast<i64>(slot_base + m / group) * num_heads + h;
    const float inv = inv_or_zero(total);
    T* dst = mid_o + state * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<u32*>(dst + 8 * i + 2 * c4) = pack2<T>(st.o_acc[i][2 * r] * inv, st.o_acc[i][2 * r + 1] * inv);
    if (c4 == 0) mid_lse[state] = lse_from_base2(st.row_max[r], total);
  }
}

template <typename T, int D, bool WG>
__global__ void __launch_bounds__(128, WG ? 3 : 2)  // CTAs per SM: mma.sync 2 (up to 255 registers), wgmma 3 (168)
deft_partial_kernel(const T* __restrict__ q, i64 q_sq, i64 q_sh,
                    const T* __restrict__ k_pool, i64 k_sp, int k_sh, int k_sr,
                    const T* __restrict__ v_pool, i64 v_sp, int v_sh, int v_sr, int log2_page,
                    const DeftToken* __restrict__ tokens, const DeftChunk* __restrict__ chunks,
                    const int* __restrict__ work, const int* __restrict__ slot_base,
                    const int* __restrict__ qmask_off, const int* __restrict__ mask,
                    T* __restrict__ mid_o, float* __restrict__ mid_lse,
                    int num_heads, int group, float scale_log2) {
  using Cfg = DeftConfig<D>;
  // wgmma reads its own swizzled layout, from 1024-byte-aligned tiles (the host adds 1 KB); the
  // mma.sync kernel keeps the [rows][D] layout (measured: 13% faster than WgTile through ldmatrix).
  typedef typename Conditional<WG, WgTile<D, 64>, SwizzledTile<D>>::type Tile;
  static_assert(!WG || kHaveWgmma, "the wgmma kernel needs the sm_90a target");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = WG ? smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023) : smem_raw;
  constexpr int kTileUnits = WG ? 4 : 5;  // [64][D] tiles: Q + 2 K/V stages, or 2 stages (wgmma: Q in registers)
  T* smem_tiles = reinterpret_cast<T*>(smem_base);
  DeftToken* smem_rec = reinterpret_cast<DeftToken*>(smem_tiles + kTileUnits * Cfg::kTileElems);  // [kRecRing][64]
  __shared__ __align__(8) u32 smem_vis[2][Cfg::kBlockM][2];  // per tile slot and query: 64 key bits

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int num_kv_heads = num_heads / group;
  const int hk = blockIdx.x % num_kv_heads, item = blockIdx.x / num_kv_heads;

  // Step 1: this CTA's chunk, rows and warp layout.
  const int c = work[kWorkInts * item], row_tile = work[kWorkInts * item + 1];
  const DeftChunk ch = chunks[c];
  const int rows = (ch.q1 - ch.q0) * group;
  const int m0 = row_tile * Cfg::kBlockM;
  const int rows_here = min(Cfg::kBlockM, rows - m0);
  const int warps_m = WG || rows_here > 32 ? 4 : (rows_here <= 16 ? 1 : 2);  // wgmma: always 64 rows
  const int warps_n = Cfg::kWarps / warps_m;
  const int wm = warp % warps_m, wn = warp / warps_m;
  // mma.sync: Q in tile 0, K/V stage s in tiles 1 + 2 s (K) and 2 + 2 s (V). wgmma: stage s in
  // tiles 2 s and 2 s + 1; Q passes through tile 2 (stage 1's K) on its way to registers.
  T* smem_q = smem_tiles + (WG ? 2 : 0) * Cfg::kTileElems;
  T* smem_kv = smem_tiles + (WG ? 0 : 1) * Cfg::kTileElems;

  // Step 2: async loads. Q rows past the tile and keys past tok_end are zero-filled; a
  // zero-filled record has q_lo = q_hi = 0, so its key is visible to nobody. The records of tile
  // i arrive one tile before its K/V, so the page lookups of a K/V load read shared memory.
  auto load_q = [&]() {
    for (int i = tid; i < Cfg::kBlockM * Cfg::kChunks; i += Cfg::kThreads) {
      const int r = i / Cfg::kChunks, cc = i % Cfg::kChunks;
      const bool ok = r < rows_here;
      const int m = m0 + (ok ? r : 0);
      const T* src = q + (ch.q0 + m / group) * q_sq + (hk * group + m % group) * q_sh + cc * 8;
      cp_async_16(smem_addr(smem_q + Tile::offset(r, cc)), src, ok ? 16 : 0);
    }
  };
  auto load_rec = [&](int tile) {
    if (tid < Cfg::kBlockN) {
      const int key = ch.tok_begin + tile * Cfg::kBlockN + tid;
      const bool ok = key < ch.tok_end;
      cp_async_16(smem_addr(smem_rec + (tile % Cfg::kRecRing) * Cfg::kBlockN + tid), tokens + (ok ? key : ch.tok_begin),
                  ok ? 16 : 0);
    }
  };
  // This thread copies the 16-byte column `col` of its rows; the head and column offsets are
  // recomputed per copy rather than held in two base pointers (wgmma's 168-register budget).
  const int col = (tid % Cfg::kChunks) * 8;
  auto load_kv = [&](int tile, int stage) {  // its records have landed and are visible
    T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    T* sv = sk + Cfg::kTileElems;
    const DeftToken* srec = smem_rec + (tile % Cfg::kRecRing) * Cfg::kBlockN;
    const int tile_start = ch.tok_begin + tile * Cfg::kBlockN;
#pragma unroll
    for (int j = 0; j < Cfg::kLoadIters; ++j) {
      const int i = tid + j * Cfg::kThreads;
      const int r = i / Cfg::kChunks, cc = i % Cfg::kChunks;
      const bool ok = tile_start + r < ch.tok_end;
      const int slot = srec[r].slot;  // 0 past tok_end (zero-filled): a real row, nothing read
      const i64 page = slot >> log2_page;
      const int prow = slot & ((1 << log2_page) - 1);
      cp_async_16(smem_addr(sk + Tile::offset(r, cc)), k_pool + (page * k_sp + (hk * k_sh + prow * k_sr + col)), ok ? 16 : 0);
      cp_async_16(smem_addr(sv + Tile::offset(r, cc)), v_pool + (page * v_sp + (hk * v_sh + prow * v_sr + col)), ok ? 16 : 0);
    }
  };

  // Prologue: Q and the records of tiles 0 and 1; then the K/V of tile 0.
  const int num_tiles = (ch.tok_end - ch.tok_begin + Cfg::kBlockN - 1) / Cfg::kBlockN;
  // A tile is full when every key is visible to every query of the chunk (a shared prefix, say):
  // then no key is tested. Thread tid < 64 votes on the record it copied itself (landed after its
  // own wait); the barrier that publishes the records ANDs the votes. Keys past tok_end were
  // zero-filled (q_lo = q_hi = 0) and fail. Otherwise build_vis writes, for each query of this
  // CTA, the tile's 64 visibility bits (a warp ballot per query and 32 keys) into a ring slot that
  // the next barrier publishes, one tile ahead of its use.
  auto vote = [&](int tile) {
    if (tid >= Cfg::kBlockN || tile >= num_tiles) return true;
    const DeftToken rec = smem_rec[(tile % Cfg::kRecRing) * Cfg::kBlockN + tid];
    return rec.q_lo <= ch.q0 && ch.q1 <= rec.q_hi && rec.mask_col < 0;
  };
  auto build_vis = [&](int tile) {  // warp w: queries w, w + 4, ...; lane: keys lane and 32 + lane
    const int q_first = ch.q0 + m0 / group;                    // this CTA's queries: q_first + ql
    const int nq_here = (m0 + rows_here - 1) / group - m0 / group + 1;  // <= 64
    const DeftToken* srec = smem_rec + (tile % Cfg::kRecRing) * Cfg::kBlockN;
    const DeftToken rec[2] = {srec[lane], srec[32 + lane]};
    for (int ql = warp; ql < nq_here; ql += Cfg::kWarps) {
      const int qq = q_first + ql, qm = qmask_off[qq];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        bool ok = rec[half].q_lo <= qq && qq < rec[half].q_hi;
        if (ok && rec[half].mask_col >= 0) ok = mask[qm + rec[half].mask_col] != 0;
        const u32 bits = __ballot_sync(0xffffffffu, ok);
        if (lane == 0) smem_vis[tile & 1][ql][half] = bits;
      }
    }
  };

  // Step 3: per-warp state: rows m0 + 16 wm + {g, g + 8}; in every tile, keys [KW wn, KW (wn + 1))
  // with KW = 64 / warps_n: one softmax step of KW keys per warp and tile.
  const int g = lane / 4, c4 = lane % 4;
  const int warp_row0 = wm * 16;
  const bool warp_active = warp_row0 < rows_here;
  RowState<D> st;
  st.clear();

  // Prologue: Q and the records of tiles 0 and 1, then (after the barrier that publishes them and
  // ANDs the votes of tile 0) the K/V of tile 0.
  load_q();
  load_rec(0);
  if (num_tiles > 1) load_rec(1);
  cp_async_commit();
  cp_async_wait<0>();
  bool full_next = __syncthreads_and(vote(0));
  if (!full_next) build_vis(0);
  auto tile_vis = [&](int tile, unsigned long long (&vis)[2]) {  // this lane's rows' bits of a tile
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int ql = min(m0 + warp_row0 + g + 8 * r, rows - 1) / group - m0 / group;  // rows past the chunk clamp
      vis[r] = *reinterpret_cast<const unsigned long long*>(smem_vis[tile & 1][ql]);
    }
  };

  // wgmma: Q moves to registers once the barrier above has published it.
  u32 qf[WG ? D / 16 : 1][4];
  if constexpr (WG) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_frag<D, Tile>(qf[kk], smem_q, warp_row0, kk, lane);
  }

  // Step 4: the KV loop, one 64-key tile per iteration and one barrier: after it, tile `it`, the
  // records of tile it + 1 and the visibility bits of tile it are visible, and every warp has left
  // tile it - 1, whose K/V stage, record slot and bits slot now take tile it + 1 (over Q's staging
  // copy in the first round, for wgmma), the records of tile it + 2 and the bits of tile it + 1.
  load_kv(0, 0);
  cp_async_commit();
  for (int it = 0; it < num_tiles; ++it) {
    cp_async_wait<0>();  // this thread's part of tile it and of the records of tile it + 1
    if constexpr (WG) fence_proxy_async();  // the copies (generic proxy) before the wgmma reads (async proxy)
    const bool full = full_next;
    full_next = __syncthreads_and(vote(it + 1));
    if (it + 1 < num_tiles) {
      load_kv(it + 1, (it + 1) & 1);
      if (!full_next) build_vis(it + 1);
    }
    if (it + 2 < num_tiles) load_rec(it + 2);
    cp_async_commit();
    const T* sk = smem_kv + (it & 1) * 2 * Cfg::kTileElems;
    const T* sv = sk + Cfg::kTileElems;

    if constexpr (WG) {  // every warp: rows past the chunk are computed and never stored
      wg_attention_step<T, D>(st, qf, smem_addr(sk), smem_addr(sv), full,
                              [&](unsigned long long (&vis)[2]) { tile_vis(it, vis); }, scale_log2, lane);
    } else if (warp_active) {
      unsigned long long vis[2] = {~0ull, ~0ull};
      if (!full) tile_vis(it, vis);
      if (warps_n == 1) deft_step<64, Tile>(st, smem_q, sk, sv, full, vis, warp_row0, 0, scale_log2, lane);
      else if (warps_n == 2) deft_step<32, Tile>(st, smem_q, sk, sv, full, vis, warp_row0, 32 * wn, scale_log2, lane);
      else deft_step<16, Tile>(st, smem_q, sk, sv, full, vis, warp_row0, 16 * wn, scale_log2, lane);
    }
  }

  // Step 5: warps that split the keys of the same rows merge their states (K/V smem is free now).
  if (warps_n > 1) {
    __syncthreads();  // every warp has left the last tile (no copy is in flight after it)
    float* red = reinterpret_cast<float*>(smem_kv);
    deft_save_rows(st, red + warp * Cfg::kRedFloats, lane);
    __syncthreads();
    if (wn != 0) return;
    for (int k = 1; k < warps_n; ++k) deft_merge_rows(st, red + (wm + k * warps_m) * Cfg::kRedFloats, lane);
  }

  // Step 6: normalise and store the partial state of each owned row.
  if (!warp_active) return;
  deft_store_rows<T, D>(st, m0 + warp_row0 + g, rows, group, hk, slot_base[c], num_heads, mid_o, mid_lse, lane);
}

// Stage 1 on Hopper for wide shared chunks, warp-specialised (sm_90a): one CTA per SM, NC + 1
// warpgroups, per work item (chunk, 64 NC-row tile) x KV head. Warpgroup 0 (the producer) fills a
// ring of kStages 64-key K/V tiles; warpgroups 1 .. NC (the consumers) compute. With more than 64
// rows each consumer owns 64 of them (a consumer past the item's rows idles) and all read every
// K/V tile (1 / NC of the tile traffic per row of the 64-row kernels); with 64 rows or fewer all own
// the same rows and take every NC-th tile, then merge (split keys).
//   NC = 2 (128-row items): Q in registers (A fragments), 168 registers per thread.
//   NC = 3 (192-row items): three consumer chains per SM, which overlap better on the tensor cores
//   (benchmarks/wg_chains.py, H200: 1292-1350 cycles per 128 rows of a 64-key step against 1568
//   for two). The registers (512 threads: 128 each at launch) are split by setmaxnreg, producer 80
//   and consumers 144, so Q stays in shared memory (SS products) and the ring has 5 stages.
//   Producer, per tile: wait until its stage is empty; take the tile's 64 records (loaded two
//   tiles ahead into registers); vote whether every query of the item sees every key (then the
//   tile is "full"); issue a dense tile's copy (below); unless full, write the 64 visibility bits
//   of each query of the item; gather any other tile. A tile whose keys sit at consecutive slots
//   from a box boundary (tma_rows: whole pages of P < 64 rows, or 64 rows of one page) is copied by
//   TMA, one box per 64 columns of K and of V (tensor maps of the pools [pages, Hkv, P, D]); the
//   stage completes on the boxes' bytes, so the producer arrives once its bits are written. Any
//   other tile is gathered by cp.async (the page lookups from the records by shuffles) and
//   published after tile it + kLag is issued (so kLag + 1 tiles' copies are in flight): wait for
//   its copies, fence them for the async proxy (wgmma reads), arrive on its `full` mbarrier (which
//   also publishes the bits and the flag).
//   A work item whose chunk the plan marks dense (its record's dense slot: every key at
//   consecutive box-aligned slots and seen by every query of the chunk) loads no records: each
//   tile is one TMA copy from that slot, and after tile 0 the producer waits for the consumers' Q.
//   Consumer: Q rows through the ring's last stage into registers (NC = 2: A fragments) or into its
//   own tile (NC = 3), then an arrival on the last stage's `empty` barrier (its first phase); per
//   tile wait for `full`, one wg_attention_step unless the tile belongs to another consumer, then
//   each warp arrives on the stage's `empty` mbarrier (both products have completed); at the end
//   the split merge (through the idle ring) and the store.
// Measured and dropped (benchmarks/NOTES.md, session 6): TMA boxes of one key or of 8 keys for every
// tile, 128-key tiles, Q in shared memory, register reallocation between the warpgroups, ping-pong
// ordering of the consumers, a persistent grid (its split-merge buffer cost a stage: slower). Sessions
// 12, 13 and 15: the pipelined consumer step (wg_attention_step_pipelined) measured slower here.
template <int D, int NC>
struct DeftWsConfig {
  static_assert(NC == 2 || NC == 3, "two or three consumer warpgroups");
  static constexpr int kThreads = 128 * (NC + 1);
  static constexpr int kBlockM = 64 * NC;  // rows per work item
  static constexpr int kBlockN = 64;   // keys per K/V tile
  // NC = 2, measured on the long row: 3 / 4 / 5 stages 94.0 / 81.5 / 74.4 us (cp.async copies).
  // NC = 3: 5, beside the consumers' Q tiles.
  static constexpr int kStages = NC == 2 ? 6 : 5;
  static constexpr bool kQInSmem = NC == 3;                  // SS products for S
  static constexpr int kProducerRegs = 80, kConsumerRegs = 144;  // NC = 3 (setmaxnreg); NC = 2: 168 each
  static_assert(NC == 2 || 128 * kProducerRegs + 128 * NC * kConsumerRegs <= 65536, "the launch's registers");
  static constexpr int kLag = 2;  // tile t is published after tile t + kLag is issued (< kStages)
  static constexpr int kTileElems = 64 * D;  // K or V of one stage, WgTile<D, 64>
  static constexpr int kChunks = D / 8;
  static constexpr int kRowsPerPass = 32 / kChunks;  // a producer warp copies 16 rows, kChunks lanes per row
  static constexpr int kRedFloats = DeftConfig<D>::kRedFloats;  // the split merge, per consumer warp
  // Shared memory: kStages x (K [64][D], V [64][D]), NC = 3: the consumers' Q [NC][64][D], per
  // stage the visibility bits [kBlockM queries][2] u32, the 2 x kStages mbarriers and a full flag
  // per stage (the host: same sum). With NC = 2 the consumers' Q rows pass through the last stage
  // before the producer first fills it.
  static constexpr int kTileBytes = 2 * kStages * kTileElems * 2;
  static constexpr int kQBytes = kQInSmem ? NC * kTileElems * 2 : 0;
  static constexpr int kVisBytes = kStages * kBlockM * 8;
  static constexpr int kBytes = kTileBytes + kQBytes + kVisBytes + 2 * kStages * 8 + kStages * 4;
  static_assert(kTileBytes % 1024 == 0 && (NC - 1) * 4 * kRedFloats * 4 <= kTileBytes, "aligned tiles; the merge fits the ring");
};

// What one work item covers.
// Its record carries its chunk (one dependent load less at the item's start).
template <int BLOCK_M>
struct DeftWsItem {
  int c, hk, m0, rows, rows_here, q_first, nq_here, num_tiles, slot_base, dense_slot;
  DeftChunk ch;
  __device__ __forceinline__ DeftWsItem(int index, const int* __restrict__ work, int num_kv_heads, int group) {
    const int item = index / num_kv_heads;
    hk = index % num_kv_heads;
    const int4 a = reinterpret_cast<const int4*>(work)[2 * item];
    const int4 b = reinterpret_cast<const int4*>(work)[2 * item + 1];
    c = a.x;
    ch = DeftChunk{a.z, a.w, b.x, b.y};
    slot_base = b.z;
    dense_slot = b.w;
    rows = (ch.q1 - ch.q0) * group;
    m0 = a.y * BLOCK_M;
    rows_here = min(BLOCK_M, rows - m0);
    q_first = ch.q0 + m0 / group;                            // the item's queries: q_first + ql
    nq_here = (m0 + rows_here - 1) / group - m0 / group + 1;  // <= BLOCK_M
    num_tiles = (ch.tok_end - ch.tok_begin + 63) / 64;
  }
};

template <typename T, int D, int NC>
__global__ void __launch_bounds__(128 * (NC + 1), 1)
deft_partial_ws_kernel(const __grid_constant__ TmaDesc tma_k, const __grid_constant__ TmaDesc tma_v, int tma_rows,
                       const T* __restrict__ q, i64 q_sq, i64 q_sh,
                       const T* __restrict__ k_pool, i64 k_sp, int k_sh, int k_sr,
                       const T* __restrict__ v_pool, i64 v_sp, int v_sh, int v_sr, int log2_page,
                       const DeftToken* __restrict__ tokens, const DeftChunk* __restrict__ chunks,
                       const int* __restrict__ work, const int* __restrict__ slot_base,
                       const int* __restrict__ qmask_off, const int* __restrict__ mask,
                       T* __restrict__ mid_o, float* __restrict__ mid_lse,
                       int num_heads, int group, float scale_log2) {
  using Cfg = DeftWsConfig<D, NC>;
  using Tile = WgTile<D, 64>;
  static_assert(kHaveWgmma, "the warp-specialised kernel needs the sm_90a target");
  constexpr int S = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // the host adds 1 KB
  T* smem_kv = reinterpret_cast<T*>(smem_base);               // stage s: K at 2 s, V at 2 s + 1
  T* smem_q = reinterpret_cast<T*>(smem_base + Cfg::kTileBytes);  // NC = 3: consumer c's Q at c
  u32* smem_vis = reinterpret_cast<u32*>(smem_base + Cfg::kTileBytes + Cfg::kQBytes);  // [S][kBlockM][2]
  u64* bar_full = reinterpret_cast<u64*>(smem_vis + S * Cfg::kBlockM * 2);  // [S]
  u64* bar_empty = bar_full + S;                               // [S]
  int* smem_full = reinterpret_cast<int*>(bar_empty + S);      // [S]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  const int num_kv_heads = num_heads / group;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + s, 128);  // the producer's threads
      mbar_init(bar_empty + s, 4 * NC);  // the consumers' warps
    }
  }
  __syncthreads();

  const DeftWsItem<Cfg::kBlockM> w(blockIdx.x, work, num_kv_heads, group);
  if (wg == 0) {
    if constexpr (NC == 3) setmaxnreg_dec<Cfg::kProducerRegs>();
    // Producer. Warp pw copies rows 16 pw .. 16 pw + 15 of each tile: lane l the 16-byte column
    // l % kChunks of rows 16 pw + l / kChunks + kRowsPerPass j. Their slots come by shuffle from
    // the records: key r's record is held by lane r % 32 of rec[r / 32] = rec[pw / 2].
    const int pw = warp, col = (lane % Cfg::kChunks) * 8;
    // By thread 0: the K and V of the 64 keys at slots s0 .. s0 + 63 into `stage` by TMA (the stage
    // completes on their bytes).
    auto tma_tile = [&](int stage, int s0) {
      mbar_expect_tx(bar_full + stage, 2 * Cfg::kTileElems * sizeof(T));
      T* sk = smem_kv + 2 * stage * Cfg::kTileElems;
      const int prow = s0 & ((1 << log2_page) - 1), page = s0 >> log2_page;
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        tma_load_4d(smem_addr(sk + c * 64 * 64), &tma_k, 64 * c, prow, w.hk, page, bar_full + stage);
        tma_load_4d(smem_addr(sk + Cfg::kTileElems + c * 64 * 64), &tma_v, 64 * c, prow, w.hk, page,
                    bar_full + stage);
      }
    };
    if (w.dense_slot >= 0) {  // every tile full and dense (the plan checked): no records, TMA only
      if (tid == 0) {
        tma_prefetch_desc(&tma_k);
        tma_prefetch_desc(&tma_v);
      }
      for (int it = 0; it < w.num_tiles; ++it) {
        const int stage = it % S;
        if (stage == S - 1) mbar_wait(bar_empty + stage, (it / S) & 1);
        else if (it >= S) mbar_wait(bar_empty + stage, (it / S - 1) & 1);
        // After tile 0, the consumers' Q loads go first: the copies, no longer paced by record
        // loads, otherwise delay them (long row 51.1-51.5 us against 52.1; NOTES, session 17).
        if (it == 1) mbar_wait(bar_empty + S - 1, 0);
        if (tid == 0) {
          smem_full[stage] = 1;
          tma_tile(stage, w.dense_slot + 64 * it);
        }
        mbar_arrive(bar_full + stage);
      }
      return;
    }
    auto load_records = [&](int tile, DeftToken (&rec)[2]) {  // nobody sees a padding key
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int key = w.ch.tok_begin + tile * 64 + 32 * h + lane;
        rec[h] = key < w.ch.tok_end ? tokens[key] : DeftToken{0, 0, 0, 0};
      }
    };
    // Records two tiles ahead, in two register sets that even and odd tiles use in turn (the loop
    // is unrolled by 2, so no copy waits on a load in flight): one tile ahead, the record loads'
    // round trip paced the producer at ~1900 cycles per tile (NOTES, session 17).
    DeftToken rec_even[2], rec_odd[2];
    load_records(0, rec_even);
    if (w.num_tiles > 1) load_records(1, rec_odd);
    u32 by_tma = 0;  // bit it % 32: tile it was copied by TMA (its stage completes on the copy's bytes)
    if (tid == 0) {
      tma_prefetch_desc(&tma_k);
      tma_prefetch_desc(&tma_v);
    }
    auto produce_tile = [&](int it, DeftToken (&rec)[2]) {
      const int stage = it % S;
      const int tile_start = w.ch.tok_begin + it * 64;
      // Stage S - 1 first holds the consumers' Q rows: its empty barrier has one phase more.
      if (stage == S - 1) mbar_wait(bar_empty + stage, (it / S) & 1);
      else if (it >= S) mbar_wait(bar_empty + stage, (it / S - 1) & 1);
      bool sees_all = true;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        sees_all = sees_all && rec[h].q_lo <= w.q_first && w.q_first + w.nq_here <= rec[h].q_hi && rec[h].mask_col < 0;
      const bool full = __all_sync(0xffffffffu, sees_all);
      T* sk = smem_kv + 2 * stage * Cfg::kTileElems;
      T* sv = sk + Cfg::kTileElems;
      // A tile whose 64 keys sit at consecutive slots from a multiple of tma_rows (whole pages, or
      // 64 rows of one page) is one box per 64 columns of K and V: the TMA copies it, and the stage
      // completes on its bytes, so it is published at once instead of kLag tiles later. The copy is
      // issued before the visibility bits are written, so the two overlap.
      const int s0 = __shfl_sync(0xffffffffu, rec[0].slot, 0);
      const bool dense = __all_sync(0xffffffffu, tile_start + 64 <= w.ch.tok_end && rec[0].slot == s0 + lane &&
                                                     rec[1].slot == s0 + 32 + lane) &&
                         (s0 & (tma_rows - 1)) == 0;
      by_tma = (by_tma & ~(1u << (it % 32))) | (static_cast<u32>(dense) << (it % 32));
      if (dense && tid == 0) tma_tile(stage, s0);
      if (pw == 0 && lane == 0) smem_full[stage] = full;
      if (!full) {
        // Tail-mask lookups only where a key has a mask column: otherwise no load per query (one
        // per query and tile paced the producer of narrow chunks; NOTES, session 17).
        const bool masked = __any_sync(0xffffffffu, rec[0].mask_col >= 0 || rec[1].mask_col >= 0);
        for (int ql = pw; ql < w.nq_here; ql += 4) {
          const int qq = w.q_first + ql, qm = masked ? qmask_off[qq] : 0;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            bool ok = rec[h].q_lo <= qq && qq < rec[h].q_hi;
            if (ok && rec[h].mask_col >= 0) ok = mask[qm + rec[h].mask_col] != 0;
            const u32 bits = __ballot_sync(0xffffffffu, ok);
            if (lane == 0) smem_vis[(stage * Cfg::kBlockM + ql) * 2 + h] = bits;
          }
        }
      }
      if (dense) mbar_arrive(bar_full + stage);  // after this thread's bits and flag
      const int my_slot = pw < 2 ? rec[0].slot : rec[1].slot;
      if (it + 2 < w.num_tiles) load_records(it + 2, rec);  // rec is dead from here: two tiles ahead
#pragma unroll
      for (int j = 0; !dense && j < 16 / Cfg::kRowsPerPass; ++j) {
        const int r = 16 * pw + lane / Cfg::kChunks + Cfg::kRowsPerPass * j;
        const int slot = __shfl_sync(0xffffffffu, my_slot, r % 32);
        const bool ok = tile_start + r < w.ch.tok_end;
        const i64 page = slot >> log2_page;
        const int prow = slot & ((1 << log2_page) - 1);
        const int cc = lane % Cfg::kChunks;
        cp_async_16(smem_addr(sk + Tile::offset(r, cc)), k_pool + (page * k_sp + (w.hk * k_sh + prow * k_sr + col)), ok ? 16 : 0);
        cp_async_16(smem_addr(sv + Tile::offset(r, cc)), v_pool + (page * v_sp + (w.hk * v_sh + prow * v_sr + col)), ok ? 16 : 0);
      }
      cp_async_commit();  // one group per tile (empty for a TMA tile): the waits count tiles
      if (it >= Cfg::kLag && !((by_tma >> ((it - Cfg::kLag) % 32)) & 1u)) {  // publish tile it - kLag: its copies have landed
        cp_async_wait<Cfg::kLag>();
        fence_proxy_async();
        mbar_arrive(bar_full + (it - Cfg::kLag) % S);
      }
    };
    for (int it = 0; it < w.num_tiles; it += 2) {
      produce_tile(it, rec_even);
      if (it + 1 < w.num_tiles) produce_tile(it + 1, rec_odd);
    }
    cp_async_wait<0>();
    fence_proxy_async();
    for (int u = max(0, w.num_tiles - Cfg::kLag); u < w.num_tiles; ++u)
      if (!((by_tma >> (u % 32)) & 1u)) mbar_arrive(bar_full + u % S);
    return;
  }

  // Consumers: warpgroup cw owns rows m0 + mw .. m0 + mw + 63 (mw = 0 when splitting keys).
  if constexpr (NC == 3) setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int cw = wg - 1, w4 = warp % 4;
  const bool split = w.rows_here <= 64;
  const int mw = split ? 0 : 64 * cw;
  const bool idle = w.m0 + mw >= w.rows;  // past the item's rows: it only releases the stages
  const int m_lane = w.m0 + mw + 16 * w4 + lane / 4;  // the lane's first row
  // NC = 2: the last stage's K (consumer 0) or V (1), then registers; NC = 3: the consumer's own tile.
  T* my_q = Cfg::kQInSmem ? smem_q + cw * Cfg::kTileElems : smem_kv + (2 * (S - 1) + cw) * Cfg::kTileElems;
  for (int i = tid % 128; i < 64 * Cfg::kChunks; i += 128) {
    const int r = i / Cfg::kChunks, cc = i % Cfg::kChunks;
    const int m = w.m0 + mw + r;
    const bool ok = m < w.rows;
    const int mm = ok ? m : w.m0;
    const T* src = q + (w.ch.q0 + mm / group) * q_sq + (w.hk * group + mm % group) * q_sh + cc * 8;
    cp_async_16(smem_addr(my_q + Tile::offset(r, cc)), src, ok ? 16 : 0);
  }
  cp_async_commit();
  cp_async_wait<0>();
  if constexpr (Cfg::kQInSmem) fence_proxy_async();  // the copies (generic proxy) before the wgmma reads
  named_barrier_sync(1 + cw, 128);
  u32 qf[Cfg::kQInSmem ? 1 : D / 16][4];
  if constexpr (!Cfg::kQInSmem) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_frag<D, Tile>(qf[kk], my_q, 16 * w4, kk, lane);
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(bar_empty + S - 1);  // Q is loaded (NC = 2: in registers): the producer may fill the stage

  RowState<D> st;
  st.clear();
  for (int it = 0; it < w.num_tiles; ++it) {
    const int stage = it % S;
    mbar_wait(bar_full + stage, (it / S) & 1);
    if (split ? it % NC == cw : NC == 2 || !idle) {  // two consumers: none idles
      const T* sk = smem_kv + 2 * stage * Cfg::kTileElems;
      auto tile_vis = [&](unsigned long long (&vis)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int ql = min(m_lane + 8 * r, w.rows - 1) / group - w.m0 / group;  // rows past the chunk clamp
          vis[r] = *reinterpret_cast<const unsigned long long*>(smem_vis + (stage * Cfg::kBlockM + ql) * 2);
        }
      };
      if constexpr (Cfg::kQInSmem)
        wg_attention_step_ss<T, D>(st, smem_addr(my_q), smem_addr(sk), smem_addr(sk + Cfg::kTileElems),
                                   smem_full[stage] != 0, tile_vis, scale_log2, lane);
      else
        wg_attention_step<T, D>(st, qf, smem_addr(sk), smem_addr(sk + Cfg::kTileElems), smem_full[stage] != 0,
                                tile_vis, scale_log2, lane);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_empty + stage);
  }

  if (split) {  // the consumers ran the same rows over every NC-th tile: merge through the ring
    float* red = reinterpret_cast<float*>(smem_kv);
    named_barrier_sync(1 + NC, 128 * NC);  // all have left the ring (every copy has landed: all tiles were waited for)
    if constexpr (NC == 2) {
      if (cw == 1) deft_save_rows(st, red + w4 * Cfg::kRedFloats, lane);
      named_barrier_sync(1 + NC, 128 * NC);
      if (cw == 1) return;
      deft_merge_rows(st, red + w4 * Cfg::kRedFloats, lane);
    } else {
      // From the last consumer down: consumer c (holding the states of c + 1 .. NC - 1) saves to
      // its slice, consumer c - 1 folds it in. A fixed order (bitwise deterministic), one merge per
      // consumer (two in consumer 0 spilled at 144 registers).
      for (int c = NC - 1; c > 0; --c) {
        if (cw == c) deft_save_rows(st, red + (4 * (c - 1) + w4) * Cfg::kRedFloats, lane);
        named_barrier_sync(1 + NC, 128 * NC);
        if (cw == c - 1) deft_merge_rows(st, red + (4 * (c - 1) + w4) * Cfg::kRedFloats, lane);
      }
      if (cw > 0) return;
    }
  }
  deft_store_rows<T, D>(st, m_lane, w.rows, group, w.hk, w.slot_base, num_heads, mid_o, mid_lse, lane);
}

template <typename T, int D>
struct DeftMergeConfig {
  static constexpr int kLanes = D / 4;             // threads per (query, head) row, 4 floats each
  static constexpr int kRows = 256 / kLanes;       // rows per block
  static constexpr int kThreads = kRows * kLanes;
};

template <typename T, int D>
__global__ void __launch_bounds__(256, 1)  // (256) alone made ptxas cap itself at 40 registers and spill
deft_merge_kernel(const T* __restrict__ mid_o, const float* __restrict__ mid_lse,
                  const int* __restrict__ q_indptr, const int* __restrict__ slot_idx,
                  T* __restrict__ out, i64 o_sq, i64 o_sh, float* __restrict__ lse_out,
                  int num_queries, int num_heads) {
  using Cfg = DeftMergeConfig<T, D>;
  const int row = blockIdx.x * Cfg::kRows + threadIdx.x / Cfg::kLanes;
  const int lane = threadIdx.x % Cfg::kLanes;
  if (row >= num_queries * num_heads) return;
  const int qi = row / num_heads, h = row % num_heads;
  // The kLanes threads of this row (a whole warp for D = 128, half of one for D = 64): the shuffles
  // below name only them, so the other row of a shared warp may loop a different number of times.
  const unsigned row_mask = Cfg::kLanes == 32 ? 0xffffffffu
                                              : ((1u << Cfg::kLanes) - 1) << (threadIdx.x % 32 / Cfg::kLanes * Cfg::kLanes);

  // Step 1: this query's partials in the plan's order, in groups of kLanes: each lane of the row
  // reads one partial's slot and lse (independent loads), the group's maximum comes by shuffles,
  // then every lane walks the group's partials with the slot and lse broadcast, kUnroll o loads in
  // flight at a time. The arithmetic is the same fixed sequence on every run: bitwise deterministic.
  constexpr int kUnroll = 16;  // 8: the short row's merge 0.1-0.3 us slower; 32: the long row's 10.8 us vs 6.5 (NOTES, session 14)
  float max2 = neg_inf(), sum = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int begin = q_indptr[qi], end = q_indptr[qi + 1];
  // Launched as stage 1's dependent: its partials are complete and visible after pdl_wait. (ptxas
  // places the wait above the index loads too, SASS session 23: the overlap is the launch's.)
  pdl_wait();

  for (int g0 = begin; g0 < end; g0 += Cfg::kLanes) {
    const int n = min(Cfg::kLanes, end - g0);
    int my_slot = 0;
    float my_l2 = neg_inf();
    if (lane < n) {
      my_slot = slot_idx[g0 + lane];
      my_l2 = mid_lse[static_cast<i64>(my_slot) * num_heads + h] * kLog2e;
    }
    float group_max = my_l2;
#pragma unroll
    for (int off = Cfg::kLanes / 2; off > 0; off /= 2)
      group_max = fmaxf(group_max, __shfl_xor_sync(row_mask, group_max, off, Cfg::kLanes));
    if (group_max == neg_inf()) continue;  // only empty partials (their o is never read)
    const float mx = fmaxf(max2, group_max);
    const float rescale = fast_exp2(max2 - mx);  // max2 = -inf: 0, and sum and acc are 0 anyway
    max2 = mx;
    sum *= rescale;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] *= rescale;
    for (int j0 = 0; j0 < n; j0 += kUnroll) {
      uint2 v[kUnroll];  // 4 values of T each, converted only after every load is issued
      float w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // the loads first: kUnroll rows of o in flight
        const int j = min(j0 + u, n - 1);
        const int slot = __shfl_sync(row_mask, my_slot, j, Cfg::kLanes);
        const float l2 = __shfl_sync(row_mask, my_l2, j, Cfg::kLanes);
        w[u] = j0 + u < n && l2 != neg_inf() ? fast_exp2(l2 - max2) : 0.f;
        v[u] = make_uint2(0u, 0u);
        if (w[u] != 0.f) v[u] = *reinterpret_cast<const uint2*>(mid_o + (static_cast<i64>(slot) * num_heads + h) * D + 4 * lane);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float2 lo = unpack2<T>(v[u].x), hi = unpack2<T>(v[u].y);
        sum += w[u];
        acc[0] += w[u] * lo.x;
        acc[1] += w[u] * lo.y;
        acc[2] += w[u] * hi.x;
        acc[3] += w[u] * hi.y;
      }
    }
  }

  // Step 2: normalise and store 4 values of T (8 bytes) and the lse.
  const float inv = inv_or_zero(sum);
  U32x2 packed;
  packed.a = pack2<T>(acc[0] * inv, acc[1] * inv);
  packed.b = pack2<T>(acc[2] * inv, acc[3] * inv);
  *reinterpret_cast<U32x2*>(out + qi * o_sq + h * o_sh + 4 * lane) = packed;
  if (lane == 0 && lse_out != nullptr) lse_out[row] = lse_from_base2(max2, sum);
}

}  // namespace ft
