"""Probe: how fast can a backward kernel add dQ partials to an fp32 [N, H, D] accumulator in L2?

Each CTA (128 threads, the wgmma accumulator layout of a 64 x 128 tile) adds ITEMS blocks of 64 rows
x 128 columns at (Q tile, head) positions with red.global.add (scalar or v2), or stores them
(st.global.v2, the no-reduction reference). `probe_bulk` instead writes each block to shared memory
(two buffers) and one warp adds it with TMA bulk reductions (cp.reduce.async.bulk .add.f32, one
512-byte row each), the way a fused dQ would take the reductions off the consumers; at random
positions, and contended (every CTA adds the same sequence of (tile, head) blocks). Prints the time
and the bytes per second for `python benchmarks/red_probe.py`."""
import cupy as cp
import numpy as np

SRC = r"""
extern "C" __global__ void probe(float* acc, int tiles, int heads, int items_per_cta, int mode) {
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;
  for (int it = 0; it < items_per_cta; ++it) {
    const unsigned item = blockIdx.x * items_per_cta + it;
    const unsigned hsh = item * 2654435761u;
    const int tile = (hsh >> 8) % tiles, head = item % heads;
    for (int r = 0; r < 2; ++r) {
      const long row = tile * 64 + 16 * w + g + 8 * r;
      float* p = acc + (row * heads + head) * 128 + 2 * c4;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float a = 1.f + i, b = 2.f + r;
        if (mode == 0) { atomicAdd(p + 8 * i, a); atomicAdd(p + 8 * i + 1, b); }
        else if (mode == 1) asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(p + 8 * i), "f"(a), "f"(b) : "memory");
        else *reinterpret_cast<float2*>(p + 8 * i) = make_float2(a, b);
      }
    }
  }
}

extern "C" __global__ void probe_bulk(float* acc, int tiles, int heads, int items_per_cta, int contended) {
  extern __shared__ __align__(128) float buf[];  // [2][64][128]
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;
  for (int it = 0; it < items_per_cta; ++it) {
    const unsigned item = blockIdx.x * items_per_cta + it;
    const unsigned hsh = item * 2654435761u;
    const int tile = contended ? (it / 4) % tiles : (hsh >> 8) % tiles;
    const int head = contended ? it % 4 : item % heads;
    float* b = buf + (it & 1) * 64 * 128;
    if (w == 0 && it >= 2) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    __syncthreads();  // buffer it & 1 is free again
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * w + g + 8 * r;
#pragma unroll
      for (int i = 0; i < 16; ++i) *reinterpret_cast<float2*>(b + row * 128 + 8 * i + 2 * c4) = make_float2(1.f + i, 2.f + r);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (w == 0) {
      for (int r = 0; r < 2; ++r) {
        const int row = lane + 32 * r;
        const long grow = static_cast<long>(tile) * 64 + row;
        const unsigned src = static_cast<unsigned>(__cvta_generic_to_shared(b + row * 128));
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], 512;"
                     :: "l"(acc + (grow * heads + head) * 128), "r"(src) : "memory");
      }
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  if (w == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""


def _time_ms(fn, ctas, args, smem=0):
    """Mean milliseconds of 3 launches of fn after one warm-up."""
    fn((ctas,), (128,), args, shared_mem=smem)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(3):
        fn((ctas,), (128,), args, shared_mem=smem)
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 3


def main():
    mod = cp.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90"))
    n, heads = 24576, 32
    tiles = n // 64
    acc = cp.zeros((n, heads, 128), dtype=cp.float32)
    ctas, per = 132 * 16, 64  # 135168 blocks of 32 KB = 4.4 GB of partials
    blocks = ctas * per
    gb = blocks * 64 * 128 * 4 / 1e9
    fn, bulk = mod.get_function("probe"), mod.get_function("probe_bulk")
    smem = 2 * 64 * 128 * 4
    bulk.max_dynamic_shared_size_bytes = smem
    runs = [(fn, mode, 0, name) for mode, name in
            ((2, "st.global.v2 (no reduction)"), (0, "atomicAdd f32"), (1, "red.global.add.v2.f32"))]
    runs += [(bulk, mode, smem, name) for mode, name in ((0, "bulk reduce, random"), (1, "bulk reduce, contended"))]
    for kernel, mode, shared, name in runs:
        ms = _time_ms(kernel, ctas, (acc, np.int32(tiles), np.int32(heads), np.int32(per), np.int32(mode)), shared)
        print(f"{name:30s} {gb:.2f} GB of partials in {ms:.3f} ms: {gb / ms:.2f} TB/s")
    acc.fill(0)  # the contended mode's sums are checked: every block adds 45056 in all
    bulk((ctas,), (128,), (acc, np.int32(tiles), np.int32(heads), np.int32(per), np.int32(1)), shared_mem=smem)
    print(f"bulk reduce check: sum {float(acc.sum(dtype=cp.float64)):.0f}, expected {blocks * 45056}")

if __name__ == "__main__":
    main()
