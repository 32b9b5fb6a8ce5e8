// flashtree: the attention state (o, lse) and its merge.
//
// A partial attention result over a subset of keys is the pair
//   o   = sum_j softmax_j * v_j   (normalised over that subset),
//   lse = log(sum_j exp(s_j))     natural log, fp32.
// Two states over disjoint key sets merge exactly:
//   lse = log(exp(lse_a) + exp(lse_b)),
//   o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse).
// The empty state is lse = -inf, o = 0; merging it changes nothing, and an all-empty
// merge stays empty (o = 0, lse = -inf). Finite inputs never produce NaN.
//
// Kernels accumulate in base 2 (exp2 is one instruction) and convert at the boundary.
#pragma once

namespace ft {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

// -inf, the lse of the empty state (no constexpr spelling exists without CUDA headers).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The normaliser of a state's sum: 1 / sum, or 0 for an empty state (its o stays 0).
__device__ __forceinline__ float inv_or_zero(float sum) { return sum > 0.f ? 1.f / sum : 0.f; }

// Natural-log lse of a merged state held as (max2, sum): the running base-2 maximum and the
// sum of exp2(x - max2). An empty state (sum == 0) gives -inf.
__device__ __forceinline__ float lse_from_base2(float max2, float sum) {
  return sum > 0.f ? (max2 + fast_log2(sum)) * kLn2 : neg_inf();
}

}  // namespace ft
