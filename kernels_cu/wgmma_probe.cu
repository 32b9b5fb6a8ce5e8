// flashtree test kernel (not shipped): one warpgroup runs the two products of an attention step
// through common/wgmma.cuh, so tests/test_wgmma.py can check the descriptors, the WgTile layout and
// the fragment layouts against torch on their own:
//   S (64 x 64, fp32)  = Q K^T         wgmma_ss, Q and K K-major from shared memory
//   O (64 x D, fp32)   = T(S) V        wgmma_rs_mn, S rounded to T as the register A operand,
//                                      V MN-major ("transposed") from shared memory
// q, k, v: [64][D] contiguous T; s_out [64][64] and o_out [64][D] fp32 contiguous. One CTA of 128
// threads; dynamic shared memory 3 * 64 * D * 2 + 1024 bytes.
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/warp_gemm.cuh"
#include "common/wgmma.cuh"

namespace ft {

template <typename T, int D>
__global__ void __launch_bounds__(128, 1)
wgmma_probe_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   float* __restrict__ s_out, float* __restrict__ o_out) {
  static_assert(kHaveWgmma, "the wgmma probe needs the sm_90a target");
  using Tile = WgTile<D, 64>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* sq = reinterpret_cast<T*>(base);
  T* sk = sq + 64 * D;
  T* sv = sk + 64 * D;
  for (int i = threadIdx.x; i < 64 * D / 8; i += 128) {
    const int r = i / (D / 8), c = i % (D / 8);
    *reinterpret_cast<Vec16*>(sq + Tile::offset(r, c)) = *reinterpret_cast<const Vec16*>(q + r * D + 8 * c);
    *reinterpret_cast<Vec16*>(sk + Tile::offset(r, c)) = *reinterpret_cast<const Vec16*>(k + r * D + 8 * c);
    *reinterpret_cast<Vec16*>(sv + Tile::offset(r, c)) = *reinterpret_cast<const Vec16*>(v + r * D + 8 * c);
  }
  fence_proxy_async();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c4 = lane % 4;
  float s[8][4];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_ss<T, 64>(s, Tile::kmajor_desc(smem_addr(sq), kk), Tile::kmajor_desc(smem_addr(sk), kk), kk);
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s_out[(16 * warp + g + 8 * (e / 2)) * 64 + 8 * j + 2 * c4 + e % 2] = s[j][e];
  }

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  u32 p[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) acc_to_a<T>(p[kk], s, kk);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_rs_mn<T, D>(o, p[kk], Tile::mnmajor_desc(smem_addr(sv), kk));
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_out[(16 * warp + g + 8 * (e / 2)) * D + 8 * j + 2 * c4 + e % 2] = o[j][e];
  }
}

}  // namespace ft
