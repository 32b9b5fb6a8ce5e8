"""Patch a copy of flashtree (python cta_patch.py COPY_DIR) so that every CTA of
deft_partial_ws_kernel stamps: [0] clock64 at start, [1] globaltimer at start, [2] smid,
[3] clock64 when consumer 0 has its first tile, [4] clock64 at consumer 0's loop end,
[5] clock64 after consumer 0's stores, [6] globaltimer then, [7] clock64 at the producer's end."""
import sys
p = sys.argv[1] + '/kernels_cu/deft.cu'
s = open(p).read()
a = "namespace ft {"
i = s.index(a)
s = s[:i] + ("__device__ unsigned long long ftcta[8192 * 8];\n"
             "__device__ __forceinline__ unsigned long long ft_gt() { unsigned long long t; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t)); return t; }\n"
             "__device__ __forceinline__ unsigned ft_smid() { unsigned r; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(r)); return r; }\n") + s[i:]
a = "  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;\n  const int num_kv_heads = num_heads / group;\n  if (tid == 0) {\n    for (int s = 0; s < S; ++s) {"
assert s.count(a) == 1, "start"
s = s.replace(a, a.replace("  const int num_kv_heads", "  unsigned long long* ft = ftcta + blockIdx.x * 8;\n  if (tid == 0) { ft[0] = clock64(); ft[1] = ft_gt(); ft[2] = ft_smid(); }\n  const int num_kv_heads"))
a = """    cp_async_wait<0>();
    fence_proxy_async();
    for (int u = max(0, w.num_tiles - Cfg::kLag); u < w.num_tiles; ++u)
      if (!((by_tma >> (u % 32)) & 1u)) mbar_arrive(bar_full + u % S);
    return;"""
assert s.count(a) == 1, "producer end"
s = s.replace(a, a.replace("    return;", "    if (tid == 0) ft[7] = clock64();\n    return;"))
a = """    mbar_wait(bar_full + stage, (it / S) & 1);
    if (!split || (it & 1) == cw) {"""
assert s.count(a) == 1, "loop"
s = s.replace(a, a.replace("    if (!split", "    if (it == 0 && cw == 0 && w4 == 0 && lane == 0) ft[3] = clock64();\n    if (!split"))
a = "  if (split) {  // the two consumers ran the same rows over alternate tiles: merge through the ring"
assert s.count(a) == 1, "split"
s = s.replace(a, "  if (cw == 0 && w4 == 0 && lane == 0) ft[4] = clock64();\n" + a)
a = "  deft_store_rows(st, m_lane, w.rows, group, w.hk, w.slot_base, num_heads, mid_o, mid_lse, lane);\n}"
assert s.count(a) == 1, "store"
s = s.replace(a, a[:-2] + "\n  if (cw == 0 && w4 == 0 && lane == 0) { ft[5] = clock64(); ft[6] = ft_gt(); }\n}")
open(p, 'w').write(s)
