// flashtree kernel family `dfs`: packed tree attention with DFS-order masks, forward and backward.
//
// Rule: in a pack of N tokens cut into sequences by cu_seqlens, query i may attend key j iff both lie
//   in the same sequence, j <= i and start_q[i] <= end_k[j]  (flashtree/tree.py, section B).
//
// Tiles and slots. Each sequence s is cut into kTile = 64-token tiles from its first token; tile t of
//   sequence s has the slot cu[s] / 64 + s + t (distinct, < N / 64 + num_seqs). The same tiles are
//   query (Q) tiles and key (K) tiles. dfs_tiles_kernel writes one row of int32 tiles[slot][8]:
//     {row0, row_end, first_slot, seq_end, min start_q, max start_q, min end_k, max end_k}
//   (an unused slot has row0 = row_end = 0). K tile jk is invisible to Q tile j when jk > j or
//   max end_k(jk) < min start_q(j) (skipped, nothing loaded); it is fully visible when jk < j and
//   min end_k(jk) >= max start_q(j) (no per-element predicate).
//
// Kernels (128 threads = 4 warps, each warp 16 rows of a 64-row tile; mma.sync m16n8k16 with fp32
// accumulation; K/V/Q/dO tiles in shared memory [64][D], 16-byte chunks XOR-swizzled by row):
//   dfs_tiles_kernel     grid ceil(slots / 4), one warp per slot.
//   dfs_fwd_kernel       grid H * slots: head = x % H, slot = slots - 1 - x / H (the heads of one tile
//                        run together and share K/V in L2; long rows first).
//                        smem = 2 * (64 D + 2 stages * 2 * 64 D) bytes; K/V by cp.async, double-buffered.
//   dfs_fwd_ws_kernel    the forward on compute capability 9.0 when G is even (sm_90a): 384 threads,
//                        a persistent grid over (H / 2) * slots items, two query heads per item
//                        sharing each K/V tile (TMA copies, wgmma; its section below).
//   dfs_bwd_delta_kernel delta[i, h] = sum_d dO[i, h, d] O[i, h, d] - dlse[i, h]; grid over N * H rows
//                        (not run before the Hopper dQ kernel, which computes delta itself).
//   dfs_bwd_dkdv_kernel  grid Hkv * slots (slot = x / Hkv, ascending): one K tile and KV head; loops
//                        over the Q tiles that see it and the G query heads of the group (a fixed
//                        order: deterministic, no atomics).
//                        smem = 2 * 4 * 64 D + 3 * 4 * 64 bytes (K, V, Q, dO; lse, delta, start_q).
//   dfs_bwd_dq_kernel    grid H * slots (as the forward): one Q tile and query head; loops over the
//                        visible K tiles.
//                        smem = 2 * (2 * 64 D + 2 stages * 2 * 64 D) bytes.
//
// Tensors (strides in elements; head_dim contiguous; rows 16-byte aligned):
//   q, o, dO, dq   T [N, H, D]     strides (sn, sh)
//   k, v, dk, dv   T [N, Hkv, D]   strides (sn, sh); query head h reads KV head h / G, G = H / Hkv
//   lse, delta     fp32 [N, H] contiguous; lse is the natural log
//   start_q, end_k int32 [N]; cu_seqlens int32 [num_seqs + 1]
// Numerics: scores scaled by scale_log2 = softmax_scale * log2(e) > 0, exp2 softmax, fp32 accumulation;
//   P and dS are rounded to T for their tensor-core products (as FlashAttention 2 does). Keys and
//   rows outside a tile are zero-filled in shared memory and masked, so nothing past N is read.
// Preconditions: every token sees itself (start_q[i] <= end_k[i]); a row that sees nothing gets
//   o = 0, lse = -inf and zero gradients. Bad cu_seqlens give wrong values, never a bad access.
#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"
#include "common/wgmma.cuh"
#include "common/wg_step.cuh"

namespace ft {

constexpr int kTile = 64;          // rows of a Q tile = keys of a K tile
constexpr int kMeta = 8;           // ints per slot in the tile table
constexpr int kIntMax = 0x7fffffff;
constexpr int kIntMin = -kIntMax - 1;
// setmaxnreg of the warp-specialised Q-tile kernels (DfsPairCta, 384 threads at 168 registers): the
// producer warpgroup keeps 40 registers per thread (its walk loads the next tile's end_k before the
// stage wait), the two consumer warpgroups get 232 (128 * 40 + 256 * 232 <= 384 * 168). The dK/dV
// kernel's consumers need 240, so its producer keeps 24.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
constexpr int kDkdvProducerRegs = 24;
constexpr int kDkdvConsumerRegs = 240;
// setmaxnreg.inc waits for registers that the CTA's own setmaxnreg.dec released: a split above the
// launch's 384 x 168 never completes and the kernel hangs (NOTES, session 12: 64 / 224 in DeFT).
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "the Q-tile kernels' register split");
static_assert(128 * kDkdvProducerRegs + 256 * kDkdvConsumerRegs <= 384 * 168, "the dK/dV kernel's register split");

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// ------------------------------------------------------------------------------ tile table

template <int TILE>
__global__ void __launch_bounds__(128)
dfs_tiles_kernel(const int* __restrict__ cu_seqlens, int num_seqs, const int* __restrict__ start_q,
                 const int* __restrict__ end_k, int n, int* __restrict__ tiles, int num_slots) {
  const int lane = threadIdx.x % 32;
  const int slot = blockIdx.x * 4 + threadIdx.x / 32;
  if (slot >= num_slots) return;
  auto cu = [&](int s) { return min(max(cu_seqlens[s], 0), n); };  // clamped: never out of bounds

  // Step 1: the sequence, the last s with first_slot(s) = cu[s] / TILE + s <= slot (binary search).
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu(mid) / TILE + mid <= slot) lo = mid; else hi = mid - 1;
  }
  const int seq_first = cu(lo), seq_end = max(cu(lo + 1), seq_first);
  const int first_slot = seq_first / TILE + lo;
  const int t = slot - first_slot;
  const int row0 = t >= 0 ? seq_first + t * TILE : seq_end;
  const int row_end = min(row0 + TILE, seq_end);
  int* out = tiles + static_cast<i64>(slot) * kMeta;
  if (row0 >= row_end) {  // past its sequence's end: an unused slot
    if (lane < kMeta) out[lane] = lane == 2 ? slot : (lane == 4 || lane == 6) ? kIntMax : (lane >= 4 ? kIntMin : 0);
    return;
  }

  // Step 2: min/max of start_q and end_k over the tile's rows (warp reduction).
  int mn_s = kIntMax, mx_s = kIntMin, mn_e = kIntMax, mx_e = kIntMin;
  for (int i = row0 + lane; i < row_end; i += 32) {
    const int s = start_q[i], e = end_k[i];
    mn_s = min(mn_s, s); mx_s = max(mx_s, s);
    mn_e = min(mn_e, e); mx_e = max(mx_e, e);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    mn_s = min(mn_s, __shfl_xor_sync(0xffffffffu, mn_s, off));
    mx_s = max(mx_s, __shfl_xor_sync(0xffffffffu, mx_s, off));
    mn_e = min(mn_e, __shfl_xor_sync(0xffffffffu, mn_e, off));
    mx_e = max(mx_e, __shfl_xor_sync(0xffffffffu, mx_e, off));
  }
  if (lane == 0) {
    out[0] = row0; out[1] = row_end; out[2] = first_slot; out[3] = seq_end;
    out[4] = mn_s; out[5] = mx_s; out[6] = mn_e; out[7] = mx_e;
  }
}

// ---------------------------------------------------------------------------- shared pieces

template <int D>
struct DfsConfig {
  static constexpr int kThreads = 128;
  static constexpr int kWarpN = 32;          // keys (queries in dK/dV) per register step
  static constexpr int kChunks = D / 8;      // 16-byte chunks per row
  static constexpr int kTileElems = kTile * D;
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
};

// cp.async rows [row0, row_end) of a [N, heads, D] tensor (head `head`) into a [64][D] tile;
// rows past row_end are zero-filled (nothing read).
template <int D, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, i64 sn, i64 sh, int head, int row0, int row_end,
                                          int tid) {
  using Cfg = DfsConfig<D>;
  for (int i = tid; i < kTile * Cfg::kChunks; i += Cfg::kThreads) {
    const int r = i / Cfg::kChunks, c = i % Cfg::kChunks, row = row0 + r;
    const bool ok = row < row_end;
    const T* p = src + static_cast<i64>(ok ? row : row0) * sn + head * sh + c * 8;
    cp_async_16(smem_addr(tile + SwizzledTile<D>::offset(r, c)), p, ok ? 16 : 0);
  }
}

// The previous K tile that Q tile (min start_q = q_min_s) can see, or first_slot - 1.
__device__ __forceinline__ int prev_visible(const int* __restrict__ tiles, int jk, int first_slot, int q_min_s) {
  for (--jk; jk >= first_slot; --jk)
    if (tiles[static_cast<i64>(jk) * kMeta + 7] >= q_min_s) break;
  return jk;
}

// One Q tile of the forward and dQ kernels: Q tile j of head h (CTAs take the tiles from the last
// backwards), rows [row0, row_end), K tiles first_slot .. j, the start_q range [q_min_s, q_max_s]
// of its rows. K tile jk holds keys key0(jk) .. key0(jk) + 63.
struct DfsQTile {
  int h, hk, j, row0, row_end, first_slot, q_min_s, q_max_s;

  __device__ __forceinline__ DfsQTile(const int* __restrict__ tiles, int num_slots, int num_heads, int group) {
    h = blockIdx.x % num_heads;
    hk = h / group;
    j = num_slots - 1 - static_cast<int>(blockIdx.x / num_heads);
    const int* meta = tiles + static_cast<i64>(j) * kMeta;
    row0 = meta[0], row_end = meta[1], first_slot = meta[2];
    q_min_s = meta[4], q_max_s = meta[5];
  }
  __device__ __forceinline__ int key0(int jk) const { return row0 - kTile * (j - jk); }
  // Every key of an earlier tile jk visible to every row: its smallest end_k covers the largest start_q.
  __device__ __forceinline__ bool full(const int* __restrict__ tiles, int jk) const {
    return jk < j && tiles[static_cast<i64>(jk) * kMeta + 6] >= q_max_s;
  }
  // cp.async K tile jk and its V tile into one pipeline stage ([K, V][64][D]).
  template <int D, typename T>
  __device__ __forceinline__ void load_kv(T* stage_tiles, const T* k, i64 k_sn, i64 k_sh, const T* v, i64 v_sn,
                                          i64 v_sh, int jk, int tid) const {
    const int key_end = jk == j ? row_end : key0(jk) + kTile;
    load_tile<D>(stage_tiles, k, k_sn, k_sh, hk, key0(jk), key_end, tid);
    load_tile<D>(stage_tiles + DfsConfig<D>::kTileElems, v, v_sn, v_sh, hk, key0(jk), key_end, tid);
  }
};

// One 16-byte block of a row: a[m] is this lane's part (columns 2 c4, 2 c4 + 1) of blocks 4 k + m of
// the row; returns block 4 k + c4 in column order (see store_rows).
__device__ __forceinline__ uint4 quad_transpose(const u32 (&a)[4], int c4) {
  const bool h0 = c4 & 1, h1 = c4 & 2;
  // Round 1, with lane c4 ^ 2: keep the two blocks whose bit 1 is c4's, and take the partner's
  // parts of them.
  const u32 keep0 = h1 ? a[2] : a[0], keep1 = h1 ? a[3] : a[1];
  const u32 from2_0 = __shfl_xor_sync(0xffffffffu, h1 ? a[0] : a[2], 2);
  const u32 from2_1 = __shfl_xor_sync(0xffffffffu, h1 ? a[1] : a[3], 2);
  // Round 2, with lane c4 ^ 1: keep block c4 (its parts from lanes c4 and c4 ^ 2), take the parts
  // of lanes c4 ^ 1 and c4 ^ 3.
  const u32 own = h0 ? keep1 : keep0, of2 = h0 ? from2_1 : from2_0;
  const u32 of1 = __shfl_xor_sync(0xffffffffu, h0 ? keep0 : keep1, 1);
  const u32 of3 = __shfl_xor_sync(0xffffffffu, h0 ? from2_0 : from2_1, 1);
  // The part of lane s goes to position s.
  const u32 near0 = h0 ? of1 : own, near1 = h0 ? own : of1;  // positions 2 (c4 / 2) and 2 (c4 / 2) + 1
  const u32 far0 = h0 ? of3 : of2, far1 = h0 ? of2 : of3;    // the other two
  return h1 ? make_uint4(far0, far1, near0, near1) : make_uint4(near0, near1, far0, far1);
}

// Store rows g and g + 8 of a warp's 16 x D fp32 accumulator, scaled by mul0 and mul1, as T at rows
// `row` and row + 8 of a tensor with row stride sn (base: its head's first row, 16-byte aligned
// rows), each if it is below `end`. The four lanes of a row hold columns 2 c4, 2 c4 + 1 of each
// 8-column block; two rounds of shuffles within the four (quad_transpose) give each lane one whole
// 16-byte block of each group of four, so that a warp's store covers 8 rows x 64 contiguous bytes.
// Each lane storing its own 4 bytes (8 rows x 16 bytes per store) took ~4800 cycles per item of the
// Hopper forward, 9% of its time (NOTES, session 25). Every lane of the warp calls it (the shuffles).
template <int D, typename T>
__device__ __forceinline__ void store_rows(T* base, i64 sn, int row, int end, const float (&acc)[D / 8][4], float mul0,
                                           float mul1, int c4) {
  T* const dst[2] = {base + static_cast<i64>(row) * sn, base + static_cast<i64>(row + 8) * sn};
  const float mul[2] = {mul0, mul1};
  const bool ok[2] = {row < end, row + 8 < end};
#pragma unroll
  for (int k = 0; k < D / 32; ++k) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      u32 a[4];
#pragma unroll
      for (int m = 0; m < 4; ++m)
        a[m] = pack2<T>(acc[4 * k + m][2 * r] * mul[r], acc[4 * k + m][2 * r + 1] * mul[r]);
      const uint4 block = quad_transpose(a, c4);
      if (ok[r]) *reinterpret_cast<uint4*>(dst[r] + 8 * (4 * k + c4)) = block;
    }
  }
}

// ---------------------------------------------------------------------------------- forward

template <typename T, int D>
__global__ void __launch_bounds__(128, 2)
dfs_fwd_kernel(const T* __restrict__ q, i64 q_sn, i64 q_sh, const T* __restrict__ k, i64 k_sn, i64 k_sh,
               const T* __restrict__ v, i64 v_sn, i64 v_sh, const int* __restrict__ start_q,
               const int* __restrict__ end_k, const int* __restrict__ tiles, int num_slots,
               T* __restrict__ o, i64 o_sn, i64 o_sh, float* __restrict__ lse, int* __restrict__ visited,
               int num_heads, int group, float scale_log2) {
  using Cfg = DfsConfig<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);      // [64][D]
  T* smem_kv = smem_q + Cfg::kTileElems;           // [2 stages][K, V][64][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;

  // Step 1: this Q tile: rows [row0, row_end), K tiles first_slot..j.
  const DfsQTile qt(tiles, num_slots, num_heads, group);
  const int h = qt.h, j = qt.j, row0 = qt.row0, row_end = qt.row_end, first_slot = qt.first_slot;
  if (row0 >= row_end) return;
  auto load_kv = [&](int stage, int jk) {
    qt.load_kv<D>(smem_kv + stage * 2 * Cfg::kTileElems, k, k_sn, k_sh, v, v_sn, v_sh, jk, tid);
  };

  // Step 2: Q and the diagonal K/V tile in flight; Q fragments into registers.
  load_tile<D>(smem_q, q, q_sn, q_sh, h, row0, row_end, tid);
  cp_async_commit();
  load_kv(0, j);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  const int warp_row0 = warp * 16;
  const bool warp_active = row0 + warp_row0 < row_end;
  u32 q_frag[D / 16][4];
  if (warp_active) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_frag<D>(q_frag[kk], smem_q, warp_row0, kk, lane);
  }
  // The two rows this lane owns (clamped to the tile: rows past row_end are computed, never stored).
  int row_c[2], sq_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_c[r] = min(row0 + warp_row0 + g + 8 * r, row_end - 1);
    sq_row[r] = start_q[row_c[r]];
  }
  float o_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()};  // base-2 running max
  float l_acc[4] = {0.f, 0.f, 0.f, 0.f};      // row sums (mma_row_sum): row g in [0], g + 8 in [2]

  // Step 3: the visible K tiles, from the diagonal backwards; the next one loads during this one.
  int jk = j, stage = 0, count = 0;
  while (jk >= first_slot) {
    const int jn = prev_visible(tiles, jk, first_slot, qt.q_min_s);
    if (jn >= first_slot) load_kv(stage ^ 1, jn);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    ++count;
    const int key0 = qt.key0(jk);
    const bool full = qt.full(tiles, jk);
    const T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    const T* sv = sk + Cfg::kTileElems;

    if (warp_active) {
#pragma unroll 1
      for (int kb = 0; kb < kTile; kb += Cfg::kWarpN) {
        // Step 3a: S = Q K^T for kWarpN keys.
        float s[Cfg::kWarpN / 8][4];
#pragma unroll
        for (int jj = 0; jj < Cfg::kWarpN / 8; ++jj) s[jj][0] = s[jj][1] = s[jj][2] = s[jj][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) mma_abt<D, Cfg::kWarpN>(s, q_frag[kk], sk, kb, kk, lane);

        // Step 3b: the tree predicate unless the tile is fully visible (the softmax step scales).
#pragma unroll
        for (int jj = 0; jj < Cfg::kWarpN / 8; ++jj) {
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            const int key = key0 + kb + 8 * jj + 2 * c4 + e2;
            const int ek = full ? 0 : end_k[min(key, row_end - 1)];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const bool ok = full || (key <= row_c[r] && sq_row[r] <= ek);
              if (!ok) s[jj][2 * r + e2] = neg_inf();
            }
          }
        }

        // Step 3c: online softmax, rescaling what O holds so far.
        online_softmax_step(s, scale_log2, row_max, l_acc, o_acc);

        // Step 3d: O += P V, l += P 1.
#pragma unroll
        for (int kk = 0; kk < Cfg::kWarpN / 16; ++kk) {
          u32 a[4];
          acc_to_a<T>(a, s, kk);
          mma_row_sum<T>(l_acc, a);
          mma_ab<D>(o_acc, a, sv, kb + 16 * kk, lane);
        }
      }
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
    jk = jn;
    stage ^= 1;
  }
  if (visited != nullptr && tid == 0) visited[static_cast<i64>(j) * num_heads + h] = count;

  // Step 4: normalise; store o and the natural-log lse of the owned rows.
  if (!warp_active) return;
  const int row = row0 + warp_row0 + g;
  store_rows<D>(o + h * o_sh, o_sn, row, row_end, o_acc, inv_or_zero(l_acc[0]), inv_or_zero(l_acc[2]), c4);
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (c4 == 0 && row + 8 * r < row_end)
      lse[static_cast<i64>(row + 8 * r) * num_heads + h] = lse_from_base2(row_max[r], l_acc[2 * r]);
}

// --------------------------------------------------------------- forward, Hopper (sm_90a)
//
// dfs_fwd_ws_kernel: the forward for compute capability 9.0 when G = H / Hkv is even. One CTA per
// (Q tile, pair of query heads of one KV group), 3 warpgroups: warpgroup 0's first warp (the
// producer, dfs_kv_producer) walks the visible K tiles (as dfs_fwd_kernel) and copies each K/V tile
// by TMA into a ring of kStages stages (4 [64][64] boxes per tile at D = 128), with the tile's 64
// end_k values and its (key0, full, valid, last) header; warpgroups 1 and 2 (the consumers) run
// heads 2 p and 2 p + 1 of the pair over the same tiles on wgmma (wg_attention_step_pipelined: S in
// registers, Q as register A fragments, tile t's P V during tile t + 1's softmax), so each K/V tile
// crosses L2 -> SM once for two heads. A stage with valid = 0 ends the walk. Rows and keys past the
// tile (another sequence, or past N: zeros) are computed and masked, never stored.
// Persistent CTAs: grid = min(items, SMs), items x = 0 .. (H / 2) * slots - 1 (pair = x % (H / 2),
// slot = slots - 1 - x / (H / 2): long rows first) handed out by an atomic counter (`work`, zero
// before the launch), so a CTA's next item starts as soon as it is free (greedy, not a fixed
// round robin). The producer takes the next item, publishes it in shared memory with its resident
// tiles (barrier `res_full`, one phase per item, freed by the consumers through `res_free`), and walks
// its K/V tiles into the same ring, so the next item's first tiles load during this item's last.
// dfs_bwd_dq_ws_kernel (backward, below) has the same shape with Q and dO of both heads resident.
template <int D, int PER_HEAD, int STAGES>
struct DfsWsConfig {
  static constexpr int kStages = STAGES;
  static constexpr int kTileElems = kTile * D;
  // PER_HEAD resident tiles of each of the 2 heads (Q; Q and dO), then the K/V ring.
  static constexpr int kTileBytes = (2 * PER_HEAD + 2 * kStages) * kTileElems * 2;
  // Then per stage 64 end_k (int) and a header int4; the full/empty mbarriers, the resident tiles'
  // (res_full, res_free) and the published item (8 ints) (host: the same sum, plus 1 KB for the alignment).
  static constexpr int kBytes = kTileBytes + kStages * (kTile * 4 + 16) + (2 * kStages + 2) * 8 + 8 * 4;
};

// A producer warp's step through the tile table: the first tile from `from` on, in steps of DIR
// (+1 or -1) and not past `last`, that `test(row, visible, full)` finds visible, and whether it is
// fully visible; last + DIR when there is none. Lane l tests candidate from + DIR (32 r + l) and a
// ballot keeps the visible ones, so a run of invisible tiles costs one round trip per 32 tiles, not
// one per tile. Every lane gets the result.
template <int DIR, typename Test>
__device__ __forceinline__ int dfs_next_visible(const int* __restrict__ tiles, int from, int last, int lane,
                                                bool& full, Test test) {
  for (int base = from; DIR * (base - last) <= 0; base += 32 * DIR) {
    const int cand = base + DIR * lane;
    bool v = false, f = false;
    if (DIR * (cand - last) <= 0) test(tiles + static_cast<i64>(cand) * kMeta, v, f);
    const u32 vis = __ballot_sync(0xffffffffu, v);
    if (vis != 0u) {
      const int l = __ffs(vis) - 1;
      full = (__ballot_sync(0xffffffffu, f) >> l) & 1u;
      return base + DIR * l;
    }
  }
  return last + DIR;
}

// The producer warp of the Q-tile kernels: walk K tiles j, then the earlier visible ones, of Q tile
// j (rows row0..row_end, start_q range [q_min_s, q_max_s]) and fill ring stage t % S with tile t: K
// and V by TMA (KV head hk) and the tile's end_k by the lanes, each lane arriving on `full` (count
// 32; lane 0 with the copies' bytes, after its stores). The stage after the last tile gets valid =
// 0. The next tile is found, and its end_k values are loaded, before the wait for this tile's stage.
// t counts the ring's stages over the CTA's items: the walk starts at stage t and leaves t past its
// closing stage.
template <typename T, int D, int S>
__device__ __forceinline__ void dfs_kv_producer(const TmaDesc* tma_k, const TmaDesc* tma_v, T* smem_kv,
                                                int* smem_ek, int4* smem_hdr, u64* bar_full, u64* bar_empty,
                                                const int* __restrict__ end_k, const int* __restrict__ tiles, int j,
                                                int row0, int row_end, int first_slot, int q_min_s, int q_max_s,
                                                int hk, int lane, int& t) {
  constexpr u32 kTileTx = 2 * kTile * D * sizeof(T);  // K and V
  const auto test = [q_min_s, q_max_s](const int* meta, bool& v, bool& f) {
    v = meta[7] >= q_min_s;
    f = meta[6] >= q_max_s;  // every key visible to every row
  };
  auto ek_of = [&](int jk, int r) {
    const int key0 = row0 - kTile * (j - jk), key_end = jk == j ? row_end : key0 + kTile;
    return jk < first_slot ? 0 : end_k[min(key0 + 32 * r + lane, key_end - 1)];
  };
  int jk = j;  // the diagonal tile: always visible, never full
  bool full = false;
  int ek0 = ek_of(jk, 0), ek1 = ek_of(jk, 1);
  for (;; ++t) {
    const int stage = t % S;
    bool full_n = false;
    const int jn = jk < first_slot ? jk : dfs_next_visible<-1>(tiles, jk - 1, first_slot, lane, full_n, test);
    const int ek0_n = ek_of(jn, 0), ek1_n = ek_of(jn, 1);
    if (t >= S) mbar_wait(bar_empty + stage, (t / S - 1) & 1);
    if (jk < first_slot) {  // the walk is over: an invalid stage tells the consumers
      if (lane == 0) smem_hdr[stage] = make_int4(0, 0, 0, 0);
      mbar_arrive(bar_full + stage);
      ++t;
      return;
    }
    const int key0 = row0 - kTile * (j - jk);
    smem_ek[stage * kTile + lane] = ek0;  // each lane publishes its own stores by its arrival
    smem_ek[stage * kTile + 32 + lane] = ek1;
    if (lane != 0) mbar_arrive(bar_full + stage);
    if (lane == 0) {
      smem_hdr[stage] = make_int4(key0, full, 1, jn < first_slot);  // w: the walk's last tile
      mbar_arrive_expect_tx(bar_full + stage, kTileTx);
      T* sk = smem_kv + 2 * stage * kTile * D;
      for (int c = 0; c < D / 64; ++c) {
        tma_load_3d(smem_addr(sk + c * kTile * 64), tma_k, 64 * c, hk, key0, bar_full + stage);
        tma_load_3d(smem_addr(sk + kTile * D + c * kTile * 64), tma_v, 64 * c, hk, key0, bar_full + stage);
      }
    }
    jk = jn, full = full_n, ek0 = ek0_n, ek1 = ek1_n;
  }
}

// Visibility bits of a consumer lane's two rows (row_c[r], start_q sq_row[r]) against the K tile at
// key0 with end_k ek[64]: bit 8 jj + 2 c4 + e2 (the lane's keys only), as mask_invisible reads them.
__device__ __forceinline__ void dfs_tile_vis(unsigned long long (&vis)[2], const int* ek, int key0,
                                             const int (&row_c)[2], const int (&sq_row)[2], int c4) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    unsigned long long bits = 0;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int key = 8 * jj + 2 * c4 + e2;
        const bool ok = key0 + key <= row_c[r] && sq_row[r] <= ek[key];
        bits |= static_cast<unsigned long long>(ok) << key;
      }
    }
    vis[r] = bits;
  }
}

// Copy `per_head` resident [64][D] tiles (one tensor map each) of heads 2 pair and 2 pair + 1, rows
// row0 .., to smem (tile m of head hh at (m * 2 + hh) * 64 D), completing on `bar`.
template <typename T, int D>
__device__ __forceinline__ void dfs_load_resident(T* smem, const TmaDesc* const (&maps)[3], int per_head, int pair,
                                                  int row0, u64* bar) {
  mbar_arrive_expect_tx(bar, per_head * 2 * kTile * D * sizeof(T));
  for (int m = 0; m < per_head; ++m)
    for (int hh = 0; hh < 2; ++hh)
      for (int c = 0; c < D / 64; ++c)
        tma_load_3d(smem_addr(smem + (m * 2 + hh) * kTile * D + c * kTile * 64), maps[m], 64 * c, 2 * pair + hh,
                    row0, bar);
}

// The shared setup of the two persistent kernels over (Q tile, pair of query heads) items: their
// shared memory (PER_HEAD resident tiles per head, then the K/V ring of S stages with end_k and
// headers, then the mbarriers and the published item), the barriers' initialisation, the producer
// warp and the consumers' view of the current item.
template <typename T, int D, int PER_HEAD, int S>
struct DfsPairCta {
  using Cfg = DfsWsConfig<D, PER_HEAD, S>;
  T* res;         // resident tile m of head hh at (2 m + hh) * 64 D
  T* kv;          // stage s: K at 2 s, V at 2 s + 1
  int* ek;        // [S][64]
  int4* hdr;      // [S] (key0, full, valid, last: the walk's last tile)
  u64* full;      // [S]
  u64* empty;     // [S]
  u64* res_full;  // the resident tiles and the item have landed (one phase per item)
  u64* res_free;  // the consumers are done with them
  int* item;      // the published item: x (< 0: no more), pair, j, row0, row_end, first_slot, q_min_s, q_max_s
  int pair, hk, j, row0, row_end, first_slot, q_min_s, q_max_s;  // the current item

  __device__ __forceinline__ explicit DfsPairCta(unsigned char* smem_raw) {
    unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // the host adds 1 KB
    res = reinterpret_cast<T*>(base);
    kv = res + 2 * PER_HEAD * Cfg::kTileElems;
    ek = reinterpret_cast<int*>(base + Cfg::kTileBytes);
    hdr = reinterpret_cast<int4*>(ek + S * kTile);
    full = reinterpret_cast<u64*>(hdr + S);
    empty = full + S;
    res_full = empty + S;
    res_free = res_full + 1;
    item = reinterpret_cast<int*>(res_free + 1);
  }
  // By the whole CTA: the producer warp's lanes fill a stage (count 32), every thread of the two
  // consumer warpgroups empties it after its own reads (count 256; arrivals after a __syncwarp by
  // one lane per warp measured slower and racecheck does not see them), the same for the resident
  // tiles, one arrival (with the bytes) publishes an item.
  __device__ __forceinline__ void init_barriers() const {
    if (threadIdx.x == 0) {
      for (int s = 0; s < S; ++s) {
        mbar_init(full + s, 32);
        mbar_init(empty + s, 256);
      }
      mbar_init(res_full, 1);
      mbar_init(res_free, 256);
    }
    __syncthreads();
  }
  // Item x's fields from the tile table; false for an unused slot.
  __device__ __forceinline__ bool set_item(const int* __restrict__ tiles, int x, int num_slots, int num_heads,
                                           int group) {
    const int pairs = num_heads / 2;
    pair = x % pairs;
    hk = 2 * pair / group;
    j = num_slots - 1 - x / pairs;
    const int* meta = tiles + static_cast<i64>(j) * kMeta;
    row0 = meta[0], row_end = meta[1], first_slot = meta[2], q_min_s = meta[4], q_max_s = meta[5];
    return row0 < row_end;
  }
  // The consumers: wait for their it-th item (the it-th phase of res_full) and read it; false when
  // there is none.
  __device__ __forceinline__ bool next_item(int it, int group) {
    mbar_wait(res_full, it & 1);
    if (item[0] < 0) return false;
    pair = item[1], j = item[2], row0 = item[3], row_end = item[4], first_slot = item[5];
    q_min_s = item[6], q_max_s = item[7];
    hk = 2 * pair / group;
    return true;
  }
  // The consumers: wait for ring stage t (counted over the CTA's items) and read its header.
  __device__ __forceinline__ int4 wait_stage(int t) const {
    mbar_wait(full + t % S, (t / S) & 1);
    return hdr[t % S];
  }
  // Warpgroup 0: it gives its registers to the consumers (kProducerRegs / kConsumerRegs) and its
  // first warp produces. Per item taken from `work`: wait until the consumers have freed the
  // resident tiles, publish the item and copy its resident tiles (one map per kind), walk its K/V
  // tiles. Then one more phase of res_full with x = -1 ends the consumers.
  // CLAIM_AHEAD: the next item is taken from the counter when this item's walk starts, so its atomic
  // is in flight during the walk rather than between two walks. The dQ kernel measured 2.2-2.3%
  // faster with it, the forward 1-3% slower (NOTES, session 25).
  template <bool CLAIM_AHEAD>
  __device__ __forceinline__ void produce(const TmaDesc* const (&maps)[3], const TmaDesc* tma_k, const TmaDesc* tma_v,
                                          const int* __restrict__ end_k, const int* __restrict__ tiles,
                                          int num_slots, int num_heads, int group, int* work) {
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x, items = num_heads / 2 * num_slots;
    if (lane == 0) {
      tma_prefetch_desc(tma_k);
      tma_prefetch_desc(tma_v);
    }
    int t = 0;
    int ticket = CLAIM_AHEAD && lane == 0 ? atomicAdd(work, 1) : 0;
    for (int it = 0;; ++it) {
      int x = CLAIM_AHEAD ? __shfl_sync(0xffffffffu, ticket, 0) : items;
      if (!CLAIM_AHEAD || (x < items && !set_item(tiles, x, num_slots, num_heads, group))) {
        do {  // the next item with rows
          x = __shfl_sync(0xffffffffu, lane == 0 ? atomicAdd(work, 1) : 0, 0);
        } while (x < items && !set_item(tiles, x, num_slots, num_heads, group));
      }
      if (CLAIM_AHEAD && x < items && lane == 0) ticket = atomicAdd(work, 1);
      if (it > 0) mbar_wait(res_free, (it - 1) & 1);
      if (lane == 0) {
        if (x < items) {
          item[0] = x, item[1] = pair, item[2] = j, item[3] = row0, item[4] = row_end, item[5] = first_slot;
          item[6] = q_min_s, item[7] = q_max_s;
          dfs_load_resident<T, D>(res, maps, PER_HEAD, pair, row0, res_full);  // arrives after the stores
        } else {
          item[0] = -1;
          mbar_arrive(res_full);
        }
      }
      if (x >= items) return;
      dfs_kv_producer<T, D, S>(tma_k, tma_v, kv, ek, hdr, full, empty, end_k, tiles, j, row0, row_end, first_slot,
                               q_min_s, q_max_s, hk, lane, t);
    }
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(384, 1)
dfs_fwd_ws_kernel(const __grid_constant__ TmaDesc tma_q, const __grid_constant__ TmaDesc tma_k,
                  const __grid_constant__ TmaDesc tma_v, const int* __restrict__ start_q,
                  const int* __restrict__ end_k, const int* __restrict__ tiles, int* __restrict__ work,
                  int num_slots, T* __restrict__ o, i64 o_sn, i64 o_sh, float* __restrict__ lse,
                  int* __restrict__ visited, int num_heads, int group, float scale_log2) {
  using Cta = DfsPairCta<T, D, 1, 5>;
  using Cfg = typename Cta::Cfg;
  using Tile = WgTile<D, kTile>;
  static_assert(kHaveWgmma, "the warp-specialised forward needs the sm_90a target");
  constexpr int S = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Cta cta(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  cta.init_barriers();

  if (wg == 0) {
    const TmaDesc* const maps[3] = {&tma_q, &tma_q, &tma_q};  // Q only (PER_HEAD 1)
    cta.template produce<false>(maps, &tma_k, &tma_v, end_k, tiles, num_slots, num_heads, group, work);
    return;
  }

  // Consumers: warpgroup cw runs head 2 pair + cw, rows row0 + 16 w4 + g (+ 8), of each item.
  setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1, w4 = warp % 4, g = lane / 4, c4 = lane % 4;
  int t = 0;  // the ring's stages, over the items
  for (int it = 0;; ++it) {
    if (!cta.next_item(it, group)) break;
    const int j = cta.j, row0 = cta.row0, row_end = cta.row_end, h = 2 * cta.pair + cw;
    int row_c[2], sq_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_c[r] = min(row0 + 16 * w4 + g + 8 * r, row_end - 1);
      sq_row[r] = start_q[row_c[r]];
    }
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_frag<D, Tile>(qf[kk], cta.res + cw * Cfg::kTileElems, 16 * w4, kk, lane);
    mbar_arrive(cta.res_free);  // Q is in registers: the next item's may land

    // The tiles' steps are software-pipelined: tile t's P V runs during tile t + 1's softmax, so a
    // stage is released one step later.
    RowState<D> st;
    st.clear();
    PendingPV pend;
    pend.valid = false;
    pend.v = 0;
    int count = 0, held = -1;
    for (;; ++t) {
      const int stage = t % S;
      const int4 hdr = cta.wait_stage(t);
      if (!hdr.z) break;
      ++count;
      const int* ek = cta.ek + stage * kTile;
      auto tile_vis = [&](unsigned long long (&vis)[2]) { dfs_tile_vis(vis, ek, hdr.x, row_c, sq_row, c4); };
      const T* sk = cta.kv + 2 * stage * Cfg::kTileElems;
      wg_attention_step_pipelined<T, D>(st, pend, qf, smem_addr(sk), smem_addr(sk + Cfg::kTileElems), hdr.y != 0,
                                        tile_vis, scale_log2, lane);
      if (held >= 0) mbar_arrive(cta.empty + held);  // each thread releases its own reads
      held = stage;
    }
    wg_attention_flush<T, D>(st, pend);
    if (held >= 0) mbar_arrive(cta.empty + held);
    mbar_arrive(cta.empty + t % S);  // the closing stage
    ++t;
    if (visited != nullptr && w4 == 0 && lane == 0) visited[static_cast<i64>(j) * num_heads + h] = count;

    // Normalise; store o and the natural-log lse of the owned rows.
    const int row = row0 + 16 * w4 + g;
    store_rows<D>(o + h * o_sh, o_sn, row, row_end, st.o_acc, inv_or_zero(st.l_acc[0]), inv_or_zero(st.l_acc[2]), c4);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (c4 == 0 && row + 8 * r < row_end)
        lse[static_cast<i64>(row + 8 * r) * num_heads + h] = lse_from_base2(st.row_max[r], st.l_acc[2 * r]);
  }
}

// ------------------------------------------------------------------------- backward: delta

template <typename T, int D>
__global__ void __launch_bounds__(128)
dfs_bwd_delta_kernel(const T* __restrict__ o, i64 o_sn, i64 o_sh, const T* __restrict__ dout, i64 do_sn,
                     i64 do_sh, const float* __restrict__ dlse, i64 dl_sn, i64 dl_sh,
                     float* __restrict__ delta, int n, int num_heads) {
  constexpr int kLanes = D / 8;                 // threads per row, 16 bytes each
  constexpr int kRows = 128 / kLanes;
  const int tid = threadIdx.x, c = tid % kLanes;
  const i64 row = static_cast<i64>(blockIdx.x) * kRows + tid / kLanes;  // = token * H + head
  const bool ok = row < static_cast<i64>(n) * num_heads;
  const int token = ok ? static_cast<int>(row / num_heads) : 0, h = ok ? static_cast<int>(row % num_heads) : 0;
  float sum = 0.f;
  if (ok) {
    float a[8], b[8];
    vec_to_float<T>(*reinterpret_cast<const Vec16*>(o + token * o_sn + h * o_sh + 8 * c), a);
    vec_to_float<T>(*reinterpret_cast<const Vec16*>(dout + token * do_sn + h * do_sh + 8 * c), b);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += a[i] * b[i];
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (ok && c == 0) delta[row] = sum - (dlse != nullptr ? dlse[token * dl_sn + h * dl_sh] : 0.f);
}

// ------------------------------------------------------------------------- backward: dK, dV

// The dK/dV kernels' final sum: add the other consumer's accumulator, handed over in shared memory
// as [D / 2][128] floats (value e of block i at row 4 i + e, thread ti at column ti).
template <int D>
__device__ __forceinline__ void add_transferred(float (&acc)[D / 8][4], const float* other, int ti) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] += other[(4 * i + e) * 128 + ti];
}

template <typename T, int D>
__global__ void __launch_bounds__(128, 2)
dfs_bwd_dkdv_kernel(const T* __restrict__ q, i64 q_sn, i64 q_sh, const T* __restrict__ k, i64 k_sn, i64 k_sh,
                    const T* __restrict__ v, i64 v_sn, i64 v_sh, const T* __restrict__ dout, i64 do_sn, i64 do_sh,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    const int* __restrict__ start_q, const int* __restrict__ end_k,
                    const int* __restrict__ tiles, int num_slots,
                    T* __restrict__ dk, i64 dk_sn, i64 dk_sh, T* __restrict__ dv, i64 dv_sn, i64 dv_sh,
                    int num_heads, int group, float scale_log2, float scale) {
  using Cfg = DfsConfig<D>;
  constexpr int kSubQ = D <= 64 ? 32 : 16;  // queries per register step (D = 128: 255 registers)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);            // [64][D]
  T* smem_v = smem_k + Cfg::kTileElems;                  // [64][D]
  T* smem_q = smem_v + Cfg::kTileElems;                  // [64][D]
  T* smem_do = smem_q + Cfg::kTileElems;                 // [64][D]
  float* smem_lse2 = reinterpret_cast<float*>(smem_do + Cfg::kTileElems);  // [64] lse * log2(e); +inf = no row
  float* smem_delta = smem_lse2 + kTile;                 // [64]
  int* smem_sq = reinterpret_cast<int*>(smem_delta + kTile);  // [64] start_q; kIntMax = no row

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;
  const int num_kv_heads = num_heads / group;
  const int hk = blockIdx.x % num_kv_heads, j = static_cast<int>(blockIdx.x / num_kv_heads);

  // Step 1: this K tile: keys [key0, key_end); Q tiles j..last of its sequence.
  const int* meta = tiles + static_cast<i64>(j) * kMeta;
  const int key0 = meta[0], key_end = meta[1], seq_end = meta[3];
  const int k_min_e = meta[6], k_max_e = meta[7];
  if (key0 >= key_end) return;
  const int last = min(j + (seq_end - key0 + kTile - 1) / kTile - 1, num_slots - 1);

  load_tile<D>(smem_k, k, k_sn, k_sh, hk, key0, key_end, tid);
  load_tile<D>(smem_v, v, v_sn, v_sh, hk, key0, key_end, tid);
  cp_async_commit();

  const int warp_row0 = warp * 16;
  const bool warp_active = key0 + warp_row0 < key_end;
  int key_c[2], ek_key[2];  // the two keys this lane owns (clamped), and their end_k
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key_c[r] = min(key0 + warp_row0 + g + 8 * r, key_end - 1);
    ek_key[r] = end_k[key_c[r]];
  }
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

  // Step 2: every Q tile that can see this K tile, every query head of the group, in a fixed order.
  for (int i = j; i <= last; ++i) {
    const int* qmeta = tiles + static_cast<i64>(i) * kMeta;
    if (i > j && qmeta[4] > k_max_e) continue;  // no query of tile i sees any key here
    const bool full = i > j && k_min_e >= qmeta[5];
    const int qrow0 = key0 + kTile * (i - j), q_end = min(qrow0 + kTile, seq_end);
    for (int gi = 0; gi < group; ++gi) {
      const int h = hk * group + gi;
      __syncthreads();  // the previous step is done with Q, dO and the row values
      load_tile<D>(smem_q, q, q_sn, q_sh, h, qrow0, q_end, tid);
      load_tile<D>(smem_do, dout, do_sn, do_sh, h, qrow0, q_end, tid);
      cp_async_commit();
      if (tid < kTile) {
        const int row = qrow0 + tid;
        const bool ok = row < q_end;
        const float l = ok ? lse[static_cast<i64>(row) * num_heads + h] : neg_inf();
        smem_lse2[tid] = l == neg_inf() ? pos_inf() : l * kLog2e;  // a row that sees nothing: P = 0
        smem_delta[tid] = ok ? delta[static_cast<i64>(row) * num_heads + h] : 0.f;
        smem_sq[tid] = ok ? start_q[row] : kIntMax;
      }
      cp_async_wait<0>();
      __syncthreads();
      if (!warp_active) continue;

#pragma unroll 1
      for (int qb = 0; qb < kTile; qb += kSubQ) {
        // Step 2a: S^T = K Q^T (16 keys x kWarpN queries), then P^T under the predicate.
        float p[kSubQ / 8][4], dp[kSubQ / 8][4];
#pragma unroll
        for (int jj = 0; jj < kSubQ / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) p[jj][e] = dp[jj][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          u32 a[4];
          load_a_frag<D>(a, smem_k, warp_row0, kk, lane);
          mma_abt<D, kSubQ>(p, a, smem_q, qb, kk, lane);
        }
#pragma unroll
        for (int jj = 0; jj < kSubQ / 8; ++jj) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qi = qb + 8 * jj + 2 * c4 + (e & 1), r = e / 2;
            const bool ok = full || (key_c[r] <= qrow0 + qi && smem_sq[qi] <= ek_key[r]);
            p[jj][e] = ok ? fast_exp2(p[jj][e] * scale_log2 - smem_lse2[qi]) : 0.f;
          }
        }
        // Step 2b: dV += P^T dO.
#pragma unroll
        for (int kk = 0; kk < kSubQ / 16; ++kk) {
          u32 a[4];
          acc_to_a<T>(a, p, kk);
          mma_ab<D>(dv_acc, a, smem_do, qb + 16 * kk, lane);
        }
        // Step 2c: dP^T = V dO^T; dS^T = P^T (dP^T - delta).
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          u32 a[4];
          load_a_frag<D>(a, smem_v, warp_row0, kk, lane);
          mma_abt<D, kSubQ>(dp, a, smem_do, qb, kk, lane);
        }
#pragma unroll
        for (int jj = 0; jj < kSubQ / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[jj][e] = p[jj][e] * (dp[jj][e] - smem_delta[qb + 8 * jj + 2 * c4 + (e & 1)]);
        // Step 2d: dK += dS^T Q.
#pragma unroll
        for (int kk = 0; kk < kSubQ / 16; ++kk) {
          u32 a[4];
          acc_to_a<T>(a, dp, kk);
          mma_ab<D>(dk_acc, a, smem_q, qb + 16 * kk, lane);
        }
      }
    }
  }
  cp_async_wait<0>();  // a K tile no query sees (invalid input) still has its copy in flight

  // Step 3: store dK (times softmax_scale) and dV for the owned keys.
  if (!warp_active) return;
  const int key = key0 + warp_row0 + g;
  store_rows<D>(dk + hk * dk_sh, dk_sn, key, key_end, dk_acc, scale, scale, c4);
  store_rows<D>(dv + hk * dv_sh, dv_sn, key, key_end, dv_acc, 1.f, 1.f, c4);
}

// ----------------------------------------------------------------------------- backward: dQ

template <typename T, int D>
__global__ void __launch_bounds__(128, 2)
dfs_bwd_dq_kernel(const T* __restrict__ q, i64 q_sn, i64 q_sh, const T* __restrict__ k, i64 k_sn, i64 k_sh,
                  const T* __restrict__ v, i64 v_sn, i64 v_sh, const T* __restrict__ dout, i64 do_sn, i64 do_sh,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  const int* __restrict__ start_q, const int* __restrict__ end_k,
                  const int* __restrict__ tiles, int num_slots, T* __restrict__ dq, i64 dq_sn, i64 dq_sh,
                  int num_heads, int group, float scale_log2, float scale) {
  using Cfg = DfsConfig<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);      // [64][D]
  T* smem_do = smem_q + Cfg::kTileElems;           // [64][D]
  T* smem_kv = smem_do + Cfg::kTileElems;          // [2 stages][K, V][64][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;

  // Step 1: this Q tile (as in the forward kernel).
  const DfsQTile qt(tiles, num_slots, num_heads, group);
  const int h = qt.h, j = qt.j, row0 = qt.row0, row_end = qt.row_end, first_slot = qt.first_slot;
  if (row0 >= row_end) return;
  auto load_kv = [&](int stage, int jk) {
    qt.load_kv<D>(smem_kv + stage * 2 * Cfg::kTileElems, k, k_sn, k_sh, v, v_sn, v_sh, jk, tid);
  };

  // Step 2: Q, dO and the diagonal K/V tile in flight; Q and dO fragments into registers.
  load_tile<D>(smem_q, q, q_sn, q_sh, h, row0, row_end, tid);
  load_tile<D>(smem_do, dout, do_sn, do_sh, h, row0, row_end, tid);
  cp_async_commit();
  load_kv(0, j);
  cp_async_commit();

  const int warp_row0 = warp * 16;
  const bool warp_active = row0 + warp_row0 < row_end;
  int row_c[2], sq_row[2];
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + warp_row0 + g + 8 * r;
    row_c[r] = min(row, row_end - 1);
    sq_row[r] = start_q[row_c[r]];
    const float l = row < row_end ? lse[static_cast<i64>(row) * num_heads + h] : neg_inf();
    lse2[r] = l == neg_inf() ? pos_inf() : l * kLog2e;
    dlt[r] = row < row_end ? delta[static_cast<i64>(row) * num_heads + h] : 0.f;
  }
  cp_async_wait<1>();
  __syncthreads();
  u32 q_frag[D / 16][4], do_frag[D / 16][4];
  if (warp_active) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      load_a_frag<D>(q_frag[kk], smem_q, warp_row0, kk, lane);
      load_a_frag<D>(do_frag[kk], smem_do, warp_row0, kk, lane);
    }
  }
  float dq_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq_acc[i][0] = dq_acc[i][1] = dq_acc[i][2] = dq_acc[i][3] = 0.f;

  // Step 3: the visible K tiles, from the diagonal backwards, double-buffered.
  int jk = j, stage = 0;
  while (jk >= first_slot) {
    const int jn = prev_visible(tiles, jk, first_slot, qt.q_min_s);
    if (jn >= first_slot) load_kv(stage ^ 1, jn);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int key0 = qt.key0(jk);
    const bool full = qt.full(tiles, jk);
    const T* sk = smem_kv + stage * 2 * Cfg::kTileElems;
    const T* sv = sk + Cfg::kTileElems;

    if (warp_active) {
#pragma unroll 1
      for (int kb = 0; kb < kTile; kb += Cfg::kWarpN) {
        // Step 3a: S = Q K^T and dP = dO V^T for kWarpN keys.
        float s[Cfg::kWarpN / 8][4], dp[Cfg::kWarpN / 8][4];
#pragma unroll
        for (int jj = 0; jj < Cfg::kWarpN / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[jj][e] = dp[jj][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          mma_abt<D, Cfg::kWarpN>(s, q_frag[kk], sk, kb, kk, lane);
          mma_abt<D, Cfg::kWarpN>(dp, do_frag[kk], sv, kb, kk, lane);
        }
        // Step 3b: dS = P (dP - delta) under the predicate.
#pragma unroll
        for (int jj = 0; jj < Cfg::kWarpN / 8; ++jj) {
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            const int key = key0 + kb + 8 * jj + 2 * c4 + e2;
            const int ek = full ? 0 : end_k[min(key, row_end - 1)];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int e = 2 * r + e2;
              const bool ok = full || (key <= row_c[r] && sq_row[r] <= ek);
              const float pv = ok ? fast_exp2(s[jj][e] * scale_log2 - lse2[r]) : 0.f;
              s[jj][e] = pv * (dp[jj][e] - dlt[r]);
            }
          }
        }
        // Step 3c: dQ += dS K.
#pragma unroll
        for (int kk = 0; kk < Cfg::kWarpN / 16; ++kk) {
          u32 a[4];
          acc_to_a<T>(a, s, kk);
          mma_ab<D>(dq_acc, a, sk, kb + 16 * kk, lane);
        }
      }
    }
    __syncthreads();
    jk = jn;
    stage ^= 1;
  }

  // Step 4: store dQ (times softmax_scale).
  if (!warp_active) return;
  store_rows<D>(dq + h * dq_sh, dq_sn, row0 + warp_row0 + g, row_end, dq_acc, scale, scale, c4);
}

// ------------------------------------------------------------------ backward, Hopper (sm_90a)
//
// Chosen with the Hopper forward (compute capability 9.0, G even). Both kernels keep every operand
// of their products in shared memory or in registers as the forward does (WgTile tiles, 128-byte
// swizzle, TMA copies) and give the producer's registers to the consumers (setmaxnreg).
//
// dfs_bwd_dkdv_ws_kernel: grid Hkv * slots (slot = x / Hkv ascending, as dfs_bwd_dkdv_kernel). The
//   CTA holds K tile j and its V tile of KV head hk. Its items are (Q tile i, query head h) for the
//   Q tiles i that see tile j and the G heads of the group, in that order; the producer warp copies
//   item t's Q and dO tiles by TMA into ring stage t % kStages with the rows' lse (base 2), delta
//   and start_q, and consumer warpgroup t % 2 takes it. Per item, with the keys as rows:
//     S^T = K Q^T and dP^T = V dO^T  (wgmma, both operands in shared memory),
//     P^T = exp2(S^T scale_log2 - lse2) under the tree predicate,
//     dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q  (P^T, dS^T from registers).
//   At the end the two warpgroups' sums meet in shared memory (dK = dK_0 + dK_1, dV = dV_1 + dV_0:
//   a fixed order) and are stored; dK is scaled by softmax_scale.
//   Two stages after the last item carry valid = 0, one for each consumer.
// dfs_bwd_dq_ws_kernel: the forward's shape (grid (H / 2) * slots; the producer walks the visible K
//   tiles); Q and dO of both heads are resident. Per K tile: S = Q K^T, dP = dO V^T (Q and dO from
//   shared memory, or with QDO_REGS from registers), P = exp2(S scale_log2 - lse2) masked,
//   dS = P (dP - delta), dQ += dS K (dS from registers); dQ is scaled by softmax_scale. O is
//   resident too: the kernel computes its rows' delta itself (from dO's and O's tiles) and stores
//   it; it runs first, the dK/dV kernel reads that delta, and there is no pre-pass.
template <int D>
struct DfsDkdvWsConfig {
  static constexpr int kStages = 5;
  static constexpr int kTileElems = kTile * D;
  static constexpr int kTileBytes = (2 + 2 * kStages) * kTileElems * 2;  // K, V, the (Q, dO) ring
  // Then per stage 64 lse2, 64 delta, 64 start_q and a header int4 (qrow0, full, valid, -); the
  // full/empty mbarriers and K/V's (host: the same sum, plus 1 KB for the alignment).
  static constexpr int kBytes = kTileBytes + kStages * (3 * kTile * 4 + 16) + (2 * kStages + 1) * 8;
  static_assert(2 * kStages * kTileElems * 2 >= 2 * 128 * (D / 2) * 4, "the final sums fit in the ring");
};

template <typename T, int D>
__global__ void __launch_bounds__(384, 1)
dfs_bwd_dkdv_ws_kernel(const __grid_constant__ TmaDesc tma_q, const __grid_constant__ TmaDesc tma_k,
                       const __grid_constant__ TmaDesc tma_v, const __grid_constant__ TmaDesc tma_do,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       const int* __restrict__ start_q, const int* __restrict__ end_k,
                       const int* __restrict__ tiles, int num_slots, T* __restrict__ dk, i64 dk_sn, i64 dk_sh,
                       T* __restrict__ dv, i64 dv_sn, i64 dv_sh, int num_heads, int group, float scale_log2,
                       float scale) {
  using Cfg = DfsDkdvWsConfig<D>;
  using Tile = WgTile<D, kTile>;
  static_assert(kHaveWgmma, "the warp-specialised backward needs the sm_90a target");
  constexpr int S = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // the host adds 1 KB
  T* smem_k = reinterpret_cast<T*>(smem_base);                      // [64][D]
  T* smem_v = smem_k + Cfg::kTileElems;                             // [64][D]
  T* smem_ring = smem_v + Cfg::kTileElems;                          // stage s: Q at 2 s, dO at 2 s + 1
  float* smem_rows = reinterpret_cast<float*>(smem_base + Cfg::kTileBytes);  // [S][lse2, delta, start_q][64]
  int4* smem_hdr = reinterpret_cast<int4*>(smem_rows + S * 3 * kTile);      // [S]
  u64* bar_full = reinterpret_cast<u64*>(smem_hdr + S);                     // [S]
  u64* bar_empty = bar_full + S;                                             // [S]
  u64* bar_kv = bar_empty + S;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  const int num_kv_heads = num_heads / group;
  const int hk = blockIdx.x % num_kv_heads, j = static_cast<int>(blockIdx.x / num_kv_heads);
  const int* meta = tiles + static_cast<i64>(j) * kMeta;
  const int key0 = meta[0], key_end = meta[1], seq_end = meta[3];
  if (key0 >= key_end) return;  // an unused slot: the whole CTA leaves before any barrier
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + s, 32);  // the producer warp's lanes (lane 0 with the tiles' bytes)
      mbar_init(bar_empty + s, 128);  // every thread of the consumer that takes the stage
    }
    mbar_init(bar_kv, 1);
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<kDkdvProducerRegs>();
    if (warp != 0) return;
    // Producer: the items (Q tile i, head h) in order.
    constexpr u32 kItemTx = 2 * kTile * D * sizeof(T);  // Q and dO
    if (lane == 0) {
      tma_prefetch_desc(&tma_q);
      tma_prefetch_desc(&tma_do);
      mbar_arrive_expect_tx(bar_kv, 2 * kTile * D * sizeof(T));
      for (int c = 0; c < D / 64; ++c) {
        tma_load_3d(smem_addr(smem_k + c * kTile * 64), &tma_k, 64 * c, hk, key0, bar_kv);
        tma_load_3d(smem_addr(smem_v + c * kTile * 64), &tma_v, 64 * c, hk, key0, bar_kv);
      }
    }
    const int last = min(j + (seq_end - key0 + kTile - 1) / kTile - 1, num_slots - 1);
    const auto test = [tiles, j](const int* qmeta, bool& v, bool& f) {
      const int* kmeta = tiles + static_cast<i64>(j) * kMeta;  // reread: the warp has 24 registers
      v = qmeta[4] <= kmeta[7];  // some query of tile i sees some key here
      f = kmeta[6] >= qmeta[5];  // every query sees every key
    };
    int t = 0;
    bool full = false;  // the diagonal tile: it sees itself, never fully
    for (int i = j; i <= last; i = dfs_next_visible<1>(tiles, i + 1, last, lane, full, test)) {
      const int qrow0 = key0 + kTile * (i - j), q_end = min(qrow0 + kTile, seq_end);
      for (int gi = 0; gi < group; ++gi, ++t) {
        const int stage = t % S, h = hk * group + gi;
        // The rows' values load before the stage wait; the copies start before they are stored.
        float l2[2], dl[2];
        int sqv[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = qrow0 + lane + 32 * half;
          const bool ok = row < q_end;
          const float l = ok ? lse[static_cast<i64>(row) * num_heads + h] : neg_inf();
          l2[half] = l == neg_inf() ? pos_inf() : l * kLog2e;  // a row that sees nothing: P = 0
          dl[half] = ok ? delta[static_cast<i64>(row) * num_heads + h] : 0.f;
          sqv[half] = ok ? start_q[row] : kIntMax;
        }
        if (t >= S) mbar_wait(bar_empty + stage, (t / S - 1) & 1);
        if (lane == 0) {
          smem_hdr[stage] = make_int4(qrow0, full, 1, 0);
          mbar_expect_tx(bar_full + stage, kItemTx);
          T* sq = smem_ring + 2 * stage * Cfg::kTileElems;
          for (int c = 0; c < D / 64; ++c) {
            tma_load_3d(smem_addr(sq + c * kTile * 64), &tma_q, 64 * c, h, qrow0, bar_full + stage);
            tma_load_3d(smem_addr(sq + Cfg::kTileElems + c * kTile * 64), &tma_do, 64 * c, h, qrow0,
                        bar_full + stage);
          }
        }
        float* rows = smem_rows + stage * 3 * kTile;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = lane + 32 * half;
          rows[r] = l2[half];
          rows[kTile + r] = dl[half];
          reinterpret_cast<int*>(rows)[2 * kTile + r] = sqv[half];
        }
        mbar_arrive(bar_full + stage);  // each lane publishes its own stores
      }
    }
    for (int c = 0; c < 2; ++c, ++t) {  // the two closing stages, one for each consumer
      const int stage = t % S;
      if (t >= S) mbar_wait(bar_empty + stage, (t / S - 1) & 1);
      if (lane == 0) smem_hdr[stage] = make_int4(0, 0, 0, 0);
      mbar_arrive(bar_full + stage);
    }
    return;
  }

  // Consumers: warpgroup cw takes items cw, cw + 2, ...; warp w4 owns keys key0 + 16 w4 + g (+ 8).
  setmaxnreg_inc<kDkdvConsumerRegs>();
  const int cw = warp_uniform(wg - 1), w4 = warp % 4, g = lane / 4, c4 = lane % 4;
  // A key past the tile's end (another sequence's, or zeros) gets end_k = INT_MIN: no query sees
  // it (its dK and dV are not stored either).
  int key_c[2], ek_key[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 16 * w4 + g + 8 * r;
    key_c[r] = min(key, key_end - 1);
    ek_key[r] = key < key_end ? end_k[key_c[r]] : kIntMin;
  }
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;
  const u32 k_addr = smem_addr(smem_k), v_addr = smem_addr(smem_v);
  mbar_wait(bar_kv, 0);

  // The next item's stage is waited for (and its header read) while this item's dK product runs
  // (-0.5% on the long tree; the same in the dQ kernel measured +1%, session 26).
  int t = cw;
  mbar_wait(bar_full + t % S, (t / S) & 1);
  int4 hdr = smem_hdr[t % S];
  for (;; t += 2) {
    const int stage = t % S;
    if (!hdr.z) break;
    const u32 q_addr = smem_addr(smem_ring + 2 * stage * Cfg::kTileElems);
    const u32 do_addr = q_addr + Cfg::kTileElems * sizeof(T);
    const float* lse2 = smem_rows + stage * 3 * kTile;
    const float* dlt = lse2 + kTile;
    const int* sq = reinterpret_cast<const int*>(dlt + kTile);

    // S^T = K Q^T and dP^T = V dO^T, in two groups: the softmax of S^T runs while dP^T computes.
    float s[8][4], dp[8][4];
    wgmma_fence();
    wg_issue_ss<T, D>(s, k_addr, q_addr);
    wg_issue_ss<T, D>(dp, v_addr, do_addr);
    wgmma_wait<1>();

    // P^T: element (key 16 w4 + g + 8 r, query 8 jj + 2 c4 + e2) in s[jj][2 r + e2]. The lane's two
    // queries 8 jj + 2 c4 + {0, 1} are adjacent: their row values load as pairs.
    const float2* lse2_pairs = reinterpret_cast<const float2*>(lse2) + c4;
    if (hdr.y) {
      // A fully visible tile (the table's test; never the diagonal, so no key past the tile's end):
      // no per-element predicate. Rows past the sequence have lse2 = +inf, so their P^T is 0. One
      // branch per item, the same for the whole warpgroup (session 20: dK/dV -6% on the long tree);
      // a per-element `full || ...` short-circuit had measured 16-21% slower (NOTES, session 9).
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const float2 l2 = lse2_pairs[4 * jj];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          s[jj][2 * r] = fast_exp2(fmaf(s[jj][2 * r], scale_log2, -l2.x));
          s[jj][2 * r + 1] = fast_exp2(fmaf(s[jj][2 * r + 1], scale_log2, -l2.y));
        }
      }
    } else {
      // The tree predicate on every element; an invisible one gets exp2(-inf) = 0.
      const int2* sq_pairs = reinterpret_cast<const int2*>(sq) + c4;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const float2 l2 = lse2_pairs[4 * jj];
        const int2 sqi = sq_pairs[4 * jj];
        const int qi = hdr.x + 8 * jj + 2 * c4;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const bool ok0 = key_c[r] <= qi && sqi.x <= ek_key[r];
          const bool ok1 = key_c[r] <= qi + 1 && sqi.y <= ek_key[r];
          s[jj][2 * r] = fast_exp2(ok0 ? fmaf(s[jj][2 * r], scale_log2, -l2.x) : neg_inf());
          s[jj][2 * r + 1] = fast_exp2(ok1 ? fmaf(s[jj][2 * r + 1], scale_log2, -l2.y) : neg_inf());
        }
      }
    }
    // dV += P^T dO.
    u32 pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc_to_a<T>(pa[kk], s, kk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(dv_acc, pa[kk], Tile::mnmajor_desc_add(do_addr, kk));
    wgmma_commit();
    wgmma_wait<1>();  // dP^T is in (dV may still run)

    // dS^T = P^T (dP^T - delta); dK += dS^T Q.
    const float2* dlt_pairs = reinterpret_cast<const float2*>(dlt) + c4;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const float2 d = dlt_pairs[4 * jj];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        dp[jj][2 * r] = s[jj][2 * r] * (dp[jj][2 * r] - d.x);
        dp[jj][2 * r + 1] = s[jj][2 * r + 1] * (dp[jj][2 * r + 1] - d.y);
      }
    }
    u32 da[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc_to_a<T>(da[kk], dp, kk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(dk_acc, da[kk], Tile::mnmajor_desc_add(q_addr, kk));
    wgmma_commit();
    mbar_wait(bar_full + (t + 2) % S, ((t + 2) / S) & 1);
    hdr = smem_hdr[(t + 2) % S];
    wgmma_wait<0>();
    mbar_arrive(bar_empty + stage);  // each thread releases its own reads of the row values
  }

  // The two consumers' sums meet in the ring (every copy into it has landed and been read once both
  // are here): consumer 0 hands over dV, consumer 1 dK; each adds the other's and stores one.
  constexpr int kRegs = D / 2;  // accumulator values per thread
  const int ti = tid - 128 * (cw + 1);
  float* xfer = reinterpret_cast<float*>(smem_ring);  // [2][kRegs][128]
  named_barrier_sync(1, 256);
  {
    float* mine = xfer + cw * kRegs * 128;
    if (cw == 0) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(4 * i + e) * 128 + ti] = dv_acc[i][e];
    } else {
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(4 * i + e) * 128 + ti] = dk_acc[i][e];
    }
  }
  named_barrier_sync(1, 256);
  const float* other = xfer + (1 - cw) * kRegs * 128;
  const int key = key0 + 16 * w4 + g;
  if (cw == 0) {  // two branches: a reference chosen at run time would put both sums in local memory
    add_transferred<D>(dk_acc, other, ti);
    store_rows<D>(dk + hk * dk_sh, dk_sn, key, key_end, dk_acc, scale, scale, c4);
  } else {
    add_transferred<D>(dv_acc, other, ti);
    store_rows<D>(dv + hk * dv_sh, dv_sn, key, key_end, dv_acc, 1.f, 1.f, c4);
  }
}

template <typename T, int D, bool QDO_REGS>
__global__ void __launch_bounds__(384, 1)
dfs_bwd_dq_ws_kernel(const __grid_constant__ TmaDesc tma_q, const __grid_constant__ TmaDesc tma_k,
                     const __grid_constant__ TmaDesc tma_v, const __grid_constant__ TmaDesc tma_do,
                     const __grid_constant__ TmaDesc tma_o,
                     const float* __restrict__ lse, float* __restrict__ delta,
                     const int* __restrict__ start_q, const int* __restrict__ end_k,
                     const int* __restrict__ tiles, int* __restrict__ work, int num_slots, T* __restrict__ dq,
                     i64 dq_sn, i64 dq_sh, int num_heads, int group, float scale_log2, float scale,
                     const float* __restrict__ dlse, i64 dl_sn, i64 dl_sh) {
  using Cta = DfsPairCta<T, D, 3, 4>;  // Q, dO and O of both heads resident
  using Cfg = typename Cta::Cfg;
  using Tile = WgTile<D, kTile>;
  static_assert(kHaveWgmma, "the warp-specialised backward needs the sm_90a target");
  constexpr int S = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Cta cta(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  cta.init_barriers();

  if (wg == 0) {
    const TmaDesc* const maps[3] = {&tma_q, &tma_do, &tma_o};
    cta.template produce<true>(maps, &tma_k, &tma_v, end_k, tiles, num_slots, num_heads, group, work);
    return;
  }

  setmaxnreg_inc<kConsumerRegs>();
  // cw uniform: Q and dO in shared memory are then addressed on the uniform datapath (SASS, session
  // 21: a full tile 337 -> 291 instructions per warp). With QDO_REGS it added 18 moves instead.
  const int cw = QDO_REGS ? wg - 1 : warp_uniform(wg - 1), w4 = warp % 4, g = lane / 4, c4 = lane % 4;
  const u32 q_addr = smem_addr(cta.res + cw * Cfg::kTileElems);
  const u32 do_addr = smem_addr(cta.res + (2 + cw) * Cfg::kTileElems);
  int t = 0;  // the ring's stages, over the items
  for (int it = 0;; ++it) {
    if (!cta.next_item(it, group)) break;
    const int row0 = cta.row0, row_end = cta.row_end, h = 2 * cta.pair + cw;
    // The lane's fragment addresses are recomputed per item: hoisted out of the item loop, they stayed
    // live across it and NVRTC 13.5 spilled one in the QDO_REGS kernel (D = 128, session 25).
    int lane_i = lane;
    asm volatile("" : "+r"(lane_i));
    int row_c[2], sq_row[2];
    float lse2[2], dlt[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 16 * w4 + g + 8 * r;
      row_c[r] = min(row, row_end - 1);
      sq_row[r] = start_q[row_c[r]];
      const float l = row < row_end ? lse[static_cast<i64>(row) * num_heads + h] : neg_inf();
      lse2[r] = l == neg_inf() ? pos_inf() : l * kLog2e;
    }
    float dq_acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq_acc[i][0] = dq_acc[i][1] = dq_acc[i][2] = dq_acc[i][3] = 0.f;
    // delta = rowsum(dO O) - dlse of the lane's rows, stored for the dK/dV kernel that runs next
    // (no pre-pass): dO's and O's resident tiles read as A fragments, so each lane multiplies its
    // own 32 columns of rows g and g + 8 (registers 0, 2 and 1, 3 of each fragment), then its quad
    // adds. Before Q and dO move to registers (QDO_REGS): fewer registers live.
    {
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 of[4], df[4];
        load_a_frag<D, Tile>(of, cta.res + (4 + cw) * Cfg::kTileElems, 16 * w4, kk, lane_i);
        load_a_frag<D, Tile>(df, cta.res + (2 + cw) * Cfg::kTileElems, 16 * w4, kk, lane_i);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 ov = unpack2<T>(of[e]), dv = unpack2<T>(df[e]);
          sum[e % 2] = fmaf(ov.x, dv.x, fmaf(ov.y, dv.y, sum[e % 2]));
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 16 * w4 + g + 8 * r;
        float d = quad_sum(sum[r]);
        if (row < row_end && dlse != nullptr) d -= dlse[static_cast<i64>(row) * dl_sn + h * dl_sh];
        dlt[r] = row < row_end ? d : 0.f;
        if (row < row_end && c4 == 0) delta[static_cast<i64>(row) * num_heads + h] = dlt[r];
      }
    }
    // QDO_REGS: Q and dO as register A fragments, so S and dP read only K and V from shared memory,
    // and the next item's Q and dO may land while this one runs. Only where ptxas keeps registers
    // that an asynchronous wgmma reads (NVRTC >= 13.3; flashtree/_jit/nvrtc.py).
    u32 qf[QDO_REGS ? D / 16 : 1][4], dof[QDO_REGS ? D / 16 : 1][4];
    if constexpr (QDO_REGS) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a_frag<D, Tile>(qf[kk], cta.res + cw * Cfg::kTileElems, 16 * w4, kk, lane_i);
        load_a_frag<D, Tile>(dof[kk], cta.res + (2 + cw) * Cfg::kTileElems, 16 * w4, kk, lane_i);
      }
      mbar_arrive(cta.res_free);
    }

    for (;; ++t) {
      const int stage = t % S;
      const int4 hdr = cta.wait_stage(t);
      if (!hdr.z) break;
      const u32 k_addr = smem_addr(cta.kv + 2 * stage * Cfg::kTileElems);
      const u32 v_addr = k_addr + Cfg::kTileElems * sizeof(T);

      float s[8][4], dp[8][4];
      wgmma_fence();
      if constexpr (QDO_REGS) {
        wg_issue_scores<T, D, true>(s, qf, k_addr);
        wg_issue_scores<T, D, true>(dp, dof, v_addr);
      } else {
        wg_issue_ss<T, D>(s, q_addr, k_addr);
        wg_issue_ss<T, D>(dp, do_addr, v_addr);
      }
      wgmma_wait<1>();

      if (!hdr.y) {
        unsigned long long vis[2];
        dfs_tile_vis(vis, cta.ek + stage * kTile, hdr.x, row_c, sq_row, c4);
        mask_invisible<64>(s, vis, 0, lane);
      }
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[jj][e] = fast_exp2(fmaf(s[jj][e], scale_log2, -lse2[e / 2]));
      wgmma_wait<0>();
      // Without QDO_REGS the products above were the item's last reads of Q and dO at its last tile:
      // the next item's resident tiles may land during this step's dQ product and the epilogue.
      if (!QDO_REGS && hdr.w) mbar_arrive(cta.res_free);
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[jj][e] = s[jj][e] * (dp[jj][e] - dlt[e / 2]);
      u32 da[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) acc_to_a<T>(da[kk], dp, kk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(dq_acc, da[kk], Tile::mnmajor_desc_add(k_addr, kk));
      wgmma_commit();
      wgmma_wait<0>();
      mbar_arrive(cta.empty + stage);  // each thread releases its own reads
    }
    mbar_arrive(cta.empty + t % S);  // the closing stage
    ++t;

    store_rows<D>(dq + h * dq_sh, dq_sn, row0 + 16 * w4 + g, row_end, dq_acc, scale, scale, c4);
  }
}

}  // namespace ft
