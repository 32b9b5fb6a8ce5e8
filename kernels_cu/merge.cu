// flashtree kernel family `merge`: merge S partial attention states per (token, head).
//
// Computes, for every token n and head h:
//   lse_out[n, h] = log(sum_s exp(lse[n, s, h]))
//   o_out[n, h, :] = sum_s exp(lse[n, s, h] - lse_out[n, h]) * o[n, s, h, :]
// States with lse = -inf contribute nothing (their o is ignored, so garbage or NaN there is harmless).
// A row whose states are all -inf gives o_out = 0, lse_out = -inf.
//
// Mapping: one row (n, h) is handled by kLanes = D * sizeof(T) / 16 threads, each owning one
// 16-byte slice of head_dim; a block holds ROWS rows (a template argument, ~256 threads).
// Threads of a row do not communicate: each reads the S lse values itself (broadcast from L1)
// and its own slice of every o, in one online pass (kUnroll states per memory round trip).
// The o slices travel by cp.async into per-thread shared-memory slots, so the bytes in flight
// cost no registers: 40 registers leave room for 6 blocks (1536 threads) per SM.
//   grid  <= ceil(N * H / ROWS) blocks striding over the rows (the host caps it at one wave of
//   resident blocks), block = ROWS * kLanes threads, static shared memory kUnroll * 16 bytes
//   per thread.
//
// Inputs (strides in elements, head_dim contiguous, 16-byte aligned rows):
//   o       T     [N, S, H, D]   strides (o_sn, o_ss, o_sh, 1)
//   lse     fp32  [N, S, H]      strides (l_sn, l_ss, l_sh)
// Outputs:
//   o_out   TOut  [N, H, D]      strides (oo_sn, oo_sh, 1); TOut = T, or 16-bit when T = fp32
//                                (split-KV decode combines its fp32 partials straight into q's dtype)
//   lse_out fp32  [N, H]         strides (lo_sn, lo_sh)
// Numerics: fp32 accumulation, base-2 exponentials internally, natural-log lse at the boundary.
// Preconditions (checked in Python): S >= 1, D * sizeof(T) a multiple of 16, aligned pointers.
#include "common/types.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"  // cp.async wrappers

namespace ft {

template <typename T, int D, int ROWS>
struct MergeConfig {
  static constexpr int kVec = VecWidth<T>::value;  // input elements per 16-byte slice
  static constexpr int kLanes = D / kVec;          // threads per row
  static constexpr int kRows = ROWS;               // rows per block (chosen by the host)
  static constexpr int kThreads = kRows * kLanes;
  static constexpr int kUnroll = 4;                // loads in flight per thread
  static_assert(D % kVec == 0, "head_dim must fill whole 16-byte vectors");
};

template <typename T, typename TOut, int D, int ROWS>
__global__ void __launch_bounds__(MergeConfig<T, D, ROWS>::kThreads, 1536 / MergeConfig<T, D, ROWS>::kThreads)
merge_states_kernel(const T* __restrict__ o, const float* __restrict__ lse,
                    TOut* __restrict__ o_out, float* __restrict__ lse_out,
                    int num_rows, int num_heads, int num_states,
                    i64 o_sn, i64 o_ss, i64 o_sh, i64 l_sn, i64 l_ss, i64 l_sh,
                    i64 oo_sn, i64 oo_sh, i64 lo_sn, i64 lo_sh) {
  using Cfg = MergeConfig<T, D, ROWS>;
  constexpr int kVec = Cfg::kVec;

  const int lane = threadIdx.x % Cfg::kLanes;
  __shared__ __align__(16) Vec16 slots[Cfg::kUnroll][Cfg::kThreads];
  // Grid-stride over rows: the host launches at most as many blocks as fit on the GPU at once,
  // so no block waits for a later wave and the last one ends with the rest.
  for (int row = blockIdx.x * Cfg::kRows + threadIdx.x / Cfg::kLanes; row < num_rows;
       row += gridDim.x * Cfg::kRows) {
    const int n = row / num_heads;
    const int h = row % num_heads;

    const float* lse_row = lse + n * l_sn + h * l_sh;                 // [S], stride l_ss (advanced)
    const T* o_row = o + n * o_sn + h * o_sh + lane * kVec;           // [S][kVec], stride o_ss (advanced)

    // One online pass: for each group of kUnroll states, issue every o copy (cp.async into this
    // thread's own shared-memory slots, so data in flight costs no registers and occupancy stays
    // full) and every lse load first, one memory round trip per group; then fold the group into a
    // running (max, sum, acc).
    // The running maximum stays in natural-log units: differences of nearby lse values are exact
    // (Sterbenz) before the scale to base 2, so large lse (say 1e4) loses no precision.
    float max_l = neg_inf(), sum = 0.f;
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0.f;

    for (int s0 = 0; s0 < num_states; s0 += Cfg::kUnroll) {
      // Step 1: loads. An empty state's o is copied with the rest but never used (NaN is harmless).
      float l[Cfg::kUnroll];
#pragma unroll
      for (int u = 0; u < Cfg::kUnroll; ++u) {
        const int s = s0 + u;
        if (s < num_states) cp_async_16(smem_addr(&slots[u][threadIdx.x]), o_row, 16);
        o_row += o_ss;
      }
      cp_async_commit();
#pragma unroll
      for (int u = 0; u < Cfg::kUnroll; ++u) {
        const int s = s0 + u;
        l[u] = s < num_states ? *lse_row : neg_inf();
        lse_row += l_ss;
      }
      cp_async_wait<0>();  // each thread reads back only its own slots: no barrier needed
      // Step 2: rescale what is held to the group's new maximum, then add the group.
      float group_max = max_l;
#pragma unroll
      for (int u = 0; u < Cfg::kUnroll; ++u) group_max = fmaxf(group_max, l[u]);
      if (group_max == neg_inf()) continue;  // all empty so far
      const float rescale = fast_exp2((max_l - group_max) * kLog2e);
      sum *= rescale;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] *= rescale;
#pragma unroll
      for (int u = 0; u < Cfg::kUnroll; ++u) {
        if (l[u] != neg_inf()) {
          const float w = fast_exp2((l[u] - group_max) * kLog2e);
          float f[kVec];
          vec_to_float<T>(slots[u][threadIdx.x], f);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] = fmaf(w, f[i], acc[i]);
          sum += w;
        }
      }
      max_l = group_max;
    }

    // Step 3: normalise and store; an empty row stores o = 0 and lse = -inf.
    const float inv = inv_or_zero(sum);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] *= inv;
    store_vec<TOut>(o_out + n * oo_sn + h * oo_sh + lane * kVec, acc);
    if (lane == 0) lse_out[n * lo_sn + h * lo_sh] = (sum > 0.f ? max_l + fast_log2(sum) * kLn2 : neg_inf());
  }
}

}  // namespace ft
