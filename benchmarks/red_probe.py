"""Probe: how fast can a backward kernel add dQ partials to an fp32 [N, H, D] accumulator in L2?

Each CTA (128 threads, the wgmma accumulator layout of a 64 x 128 tile) adds ITEMS blocks of 64 rows
x 128 columns at (Q tile, head) positions with red.global.add (scalar or v2), or stores them
(st.global.v2, the no-reduction reference). Prints the time and the bytes per second for
`python benchmarks/red_probe.py`."""
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
"""


def main():
    mod = cp.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90"))
    fn = mod.get_function("probe")
    n, heads = 24576, 32
    tiles = n // 64
    acc = cp.zeros((n, heads, 128), dtype=cp.float32)
    ctas, per = 132 * 16, 64  # 135168 blocks of 32 KB = 4.4 GB of partials
    blocks = ctas * per
    for mode, name in ((2, "st.global.v2 (no reduction)"), (0, "atomicAdd f32"), (1, "red.global.add.v2.f32")):
        fn((ctas,), (128,), (acc, np.int32(tiles), np.int32(heads), np.int32(per), np.int32(mode)))
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(3):
            fn((ctas,), (128,), (acc, np.int32(tiles), np.int32(heads), np.int32(per), np.int32(mode)))
        stop.record()
        stop.synchronize()
        ms = cp.cuda.get_elapsed_time(start, stop) / 3
        gb = blocks * 64 * 128 * 4 / 1e9
        print(f"{name:30s} {gb:.2f} GB of partials in {ms:.3f} ms: {gb / ms:.2f} TB/s")


if __name__ == "__main__":
    main()
