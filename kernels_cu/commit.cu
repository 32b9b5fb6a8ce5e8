// flashtree kernel family `commit`: keep the accepted tree tokens' K/V of every layer in the KV cache.
//
// Computes, for every sequence b (len = accept_len[b], base = kv_seq_len[b], A = accepted_nodes width,
// n = min(len, A) when len > 0, else 0):
//   fits[b] = base >= 0 and base + len <= capacity and, paged, every page the n new tokens land on,
//             block_tables[b, (base + i) / P] for i < n, lies in [0, num_pages)
//   if fits[b] and len > 0, for every plane s (the K then the V of each layer), KV head h and i < n:
//     cache_s[b or page, h, base + i (or its row in the page), :] = current_s[b, h, node_i, :]
//     with node_i = clamp(accepted_nodes[b, i], 0, T - 1)
//   overflow[b] = !fits[b];  kv_seq_len[b] += len where fits[b] and len > 0.
// A sequence that does not fit writes nothing and keeps its length.
//
// Two launches on one stream (the host issues both):
//   commit_copy_kernel    grid = (ceil(2 L Hkv A chunks / (kPerThread THREADS)), B), THREADS threads.
//     Block (x, b) copies kPerThread * THREADS 16-byte vectors of sequence b, taken from its flat
//     list [plane 2L][head Hkv][node A][chunk], chunk fastest: consecutive threads read one source
//     row and write consecutive cache rows. Vectors of nodes at or past n are skipped. Every thread
//     first works out sequence b's plan itself (a few broadcast loads; no shared memory, no barrier).
//   commit_advance_kernel grid = ceil(B / THREADS), one thread per sequence: the same plan, then the
//     overflow flag and the new length.
// Why two: every copy block reads kv_seq_len[b], so it may only grow once all of them have. One
// launch would need a grid-wide "last block" counter that is zero at every call: a memset (another
// launch) or a persistent counter, which two streams (or two captured graphs) committing at once
// would share. The second launch is one tiny block after the copy, ordered by the stream.
//
// Inputs (strides in elements, head_dim contiguous, rows 16-byte aligned; chunks = D * sizeof(T) / 16):
//   current_k/v  T     [L, B, Hkv, T, D]                  strides (s_layer, s_dim0, s_head, s_row)
//   accepted_nodes int32 or int64 [B, A]                  strides (nodes_sb, nodes_sa)
//   accept_len   int32 or int64 [B]                       stride accept_stride
//   block_tables int32 [B, max_pages] (paged; else null)  strides (bt_sb, bt_sp)
// In/out:
//   k/v cache    T     padded [L, B, Hkv, C, D] or paged [L, num_pages, Hkv, P, D], own strides each
//   kv_seq_len   int32 [B]                                stride lens_stride (advance kernel only)
// Output:
//   overflow     bool  [B]                                stride overflow_stride (advance kernel only)
// Numerics: a bitwise copy (the dtype only sets the vector width). Offsets are int64.
// Preconditions (checked in Python): the layers of each operand sit at one constant stride,
// 2 L Hkv A chunks < 2^31, capacity < 2^31, B <= 65535, T >= 1, current_* not aliasing the caches.
#include "common/types.cuh"

namespace ft {

// One operand as a stack of layers [L, dim0, Hkv, rows, D]. All fields are 8 bytes, so the
// parameter layout equals the flat list (pointer, 4 x int64) the host packs.
template <typename T>
struct CommitOperand {
  T* ptr;
  i64 s_layer, s_dim0, s_head, s_row;
};

// The per-sequence inputs both kernels read (8-byte fields only, as above).
struct CommitSeqs {
  int* kv_seq_len;
  i64 lens_stride;
  const void* accept_len;      // int32 or int64 (index_flags bit 0)
  i64 accept_stride;
  const void* nodes;           // int32 or int64 (index_flags bit 1)
  i64 nodes_sb, nodes_sa;
  const int* block_tables;     // null: a padded cache
  i64 bt_sb, bt_sp;
  i64 capacity;                // C, or max_pages * P
  i64 page;                    // P (paged)
  i64 num_pages;               // paged
  i64 width;                   // A
  i64 index_flags;
};

constexpr i64 kAcceptIs64 = 1;
constexpr i64 kNodesIs64 = 2;

__device__ __forceinline__ i64 load_index(const void* p, i64 i, bool is64) {
  return is64 ? static_cast<const i64*>(p)[i] : static_cast<i64>(static_cast<const int*>(p)[i]);
}

struct SeqPlan {
  i64 base;   // kv_seq_len[b] before the commit
  i64 len;    // accept_len[b]
  i64 count;  // nodes to copy: min(len, A) if the commit fits and len > 0, else 0
  bool fits;
};

__device__ __forceinline__ SeqPlan plan_sequence(const CommitSeqs& s, int b) {
  SeqPlan p;
  p.base = s.kv_seq_len[b * s.lens_stride];
  p.len = load_index(s.accept_len, b * s.accept_stride, s.index_flags & kAcceptIs64);
  const i64 count = p.len > 0 ? (p.len < s.width ? p.len : s.width) : 0;
  p.fits = p.base >= 0 && p.base + p.len <= s.capacity;
  if (p.fits && s.block_tables != nullptr && count > 0) {
    // 0 <= base + count <= capacity = max_pages * P < 2^31: every slot below is inside the table,
    // and 32-bit division is exact.
    const unsigned page = static_cast<unsigned>(s.page);
    const unsigned last = static_cast<unsigned>(p.base + count - 1) / page;
    for (unsigned slot = static_cast<unsigned>(p.base) / page; slot <= last; ++slot) {
      const int page = s.block_tables[b * s.bt_sb + slot * s.bt_sp];
      p.fits = p.fits && page >= 0 && page < s.num_pages;
    }
  }
  p.count = p.fits ? count : 0;
  return p;
}

__device__ __forceinline__ void store_vec16(void* p, const Vec16& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
}

template <typename T, int THREADS>
struct CommitConfig {
  static constexpr int kVec = VecWidth<T>::value;  // elements per 16-byte vector
  static constexpr int kPerThread = 4;             // vectors in flight per thread
  static constexpr int kPerBlock = kPerThread * THREADS;
};

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS, 4)
commit_copy_kernel(CommitOperand<T> src_k, CommitOperand<T> src_v, CommitOperand<T> dst_k,
                   CommitOperand<T> dst_v, CommitSeqs seqs, int num_layers, int num_heads, int num_tree,
                   int chunks) {
  using Cfg = CommitConfig<T, THREADS>;
  const int b = blockIdx.y;

  // Step 1: this sequence's plan; a sequence that does not fit (or keeps nothing) writes nothing.
  const SeqPlan plan = plan_sequence(seqs, b);
  if (plan.count == 0) return;
  const unsigned width = static_cast<unsigned>(seqs.width);
  const unsigned total = 2u * num_layers * num_heads * width * chunks;  // vectors of one sequence
  const bool paged = seqs.block_tables != nullptr;

  // Step 2: load this thread's vectors (all loads issued before any store).
  Vec16 v[Cfg::kPerThread];
  T* dst[Cfg::kPerThread];
#pragma unroll
  for (int u = 0; u < Cfg::kPerThread; ++u) {
    dst[u] = nullptr;
    const unsigned i = (blockIdx.x * Cfg::kPerThread + u) * THREADS + threadIdx.x;
    if (i >= total) continue;
    const unsigned chunk = i % chunks;
    unsigned rest = i / chunks;
    const unsigned a = rest % width;
    rest /= width;
    const unsigned h = rest % num_heads;
    const unsigned plane = rest / num_heads;
    if (a >= plan.count) continue;
    const bool is_v = plane >= static_cast<unsigned>(num_layers);
    const i64 layer = is_v ? plane - num_layers : plane;

    i64 node = load_index(seqs.nodes, b * seqs.nodes_sb + a * seqs.nodes_sa, seqs.index_flags & kNodesIs64);
    node = node < 0 ? 0 : (node >= num_tree ? num_tree - 1 : node);
    const unsigned pos = static_cast<unsigned>(plan.base) + a;  // < capacity < 2^31
    i64 dim0 = b, row = pos;
    if (paged) {
      const unsigned page = static_cast<unsigned>(seqs.page);
      dim0 = seqs.block_tables[b * seqs.bt_sb + static_cast<i64>(pos / page) * seqs.bt_sp];
      row = pos % page;
    }
    const T* src = (is_v ? src_v.ptr : src_k.ptr) + layer * (is_v ? src_v.s_layer : src_k.s_layer)
                   + b * (is_v ? src_v.s_dim0 : src_k.s_dim0) + h * (is_v ? src_v.s_head : src_k.s_head)
                   + node * (is_v ? src_v.s_row : src_k.s_row) + chunk * Cfg::kVec;
    dst[u] = (is_v ? dst_v.ptr : dst_k.ptr) + layer * (is_v ? dst_v.s_layer : dst_k.s_layer)
             + dim0 * (is_v ? dst_v.s_dim0 : dst_k.s_dim0) + h * (is_v ? dst_v.s_head : dst_k.s_head)
             + row * (is_v ? dst_v.s_row : dst_k.s_row) + chunk * Cfg::kVec;
    v[u] = load_vec_stream(src);
  }

  // Step 3: store.
#pragma unroll
  for (int u = 0; u < Cfg::kPerThread; ++u) {
    if (dst[u] != nullptr) store_vec16(dst[u], v[u]);
  }
}

// After the copy (same stream): overflow flags and the new lengths.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
commit_advance_kernel(CommitSeqs seqs, unsigned char* overflow, i64 overflow_stride, int batch) {
  const int b = blockIdx.x * THREADS + threadIdx.x;
  if (b >= batch) return;
  const SeqPlan plan = plan_sequence(seqs, b);
  overflow[b * overflow_stride] = plan.fits ? 0 : 1;
  if (plan.fits && plan.len > 0) seqs.kv_seq_len[b * seqs.lens_stride] = static_cast<int>(plan.base + plan.len);
}

}  // namespace ft
