"""Patch a copy of flashtree (python cta4_patch.py COPY_DIR) so that every CTA of the four-consumer
deft_partial_ws_kernel (NC = 4) stamps, 16 slots per CTA: [0] clock64 at start, [1] globaltimer
at start, [2] smid, [3] clock64 when consumer 0 has its first tile, [4] clock64 at consumer 0's
loop end, [5] clock64 after consumer 0's stores, [6] globaltimer then, [7] clock64 at the
producer's end (192-row items), [8 + c] clock64 at consumer c's loop end (256-row items), [12] 1
for a 256-row item of four consumers."""
import sys
p = sys.argv[1] + '/kernels_cu/deft.cu'
s = open(p).read()


def sub(old, new, what):
    global s
    assert s.count(old) == 1, what
    s = s.replace(old, new)


i = s.index("namespace ft {")
s = s[:i] + ("__device__ unsigned long long ftcta[8192 * 16];\n"
             "__device__ __forceinline__ unsigned long long ft_gt() { unsigned long long t; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t)); return t; }\n"
             "__device__ __forceinline__ unsigned ft_smid() { unsigned r; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(r)); return r; }\n") + s[i:]
sub("  const int num_kv_heads = num_heads / group;\n  if constexpr (NC == 4) {",
    "  const int num_kv_heads = num_heads / group;\n  unsigned long long* ft = ftcta + blockIdx.x * 16;\n"
    "  if (tid == 0) { ft[0] = clock64(); ft[1] = ft_gt(); ft[2] = ft_smid(); }\n  if constexpr (NC == 4) {", "start")
sub("        mbar_wait(bar_full + stage, (it / S) & 1);\n        if (!idle) {",
    "        mbar_wait(bar_full + stage, (it / S) & 1);\n        if (it == 0 && tid == 0) { ft[3] = clock64(); ft[12] = 1; }\n        if (!idle) {", "all4 loop")
sub("      if (!idle)\n        deft_store_rows(",
    "      if (tid % 128 == 0) ft[8 + cw] = clock64();\n      if (tid == 0) ft[4] = clock64();\n      if (!idle)\n        deft_store_rows(", "all4 loop end")
sub("                        mid_o, mid_lse, lane);\n      return;",
    "                        mid_o, mid_lse, lane);\n      if (tid == 0) { ft[5] = clock64(); ft[6] = ft_gt(); }\n      return;", "all4 store")
sub("""      if (!((by_tma >> (u % 32)) & 1u)) mbar_arrive(bar_full + u % S);
    return;""", """      if (!((by_tma >> (u % 32)) & 1u)) mbar_arrive(bar_full + u % S);
    if (tid == 0) ft[7] = clock64();
    return;""", "producer end")
sub("""    mbar_wait(bar_full + stage, (it / S) & 1);
    if (split ? it % NCP == cw""", """    mbar_wait(bar_full + stage, (it / S) & 1);
    if (it == 0 && cw == 0 && w4 == 0 && lane == 0) ft[3] = clock64();
    if (split ? it % NCP == cw""", "loop")
sub("  if (split) {  // the consumers ran the same rows over every NC-th tile: merge through the ring",
    "  if (cw == 0 && w4 == 0 && lane == 0) ft[4] = clock64();\n"
    "  if (split) {  // the consumers ran the same rows over every NC-th tile: merge through the ring", "split")
sub("  deft_store_rows(st, m_lane, w.rows, group, w.hk, w.slot_base, num_heads, mid_o, mid_lse, lane);\n}",
    "  deft_store_rows(st, m_lane, w.rows, group, w.hk, w.slot_base, num_heads, mid_o, mid_lse, lane);\n"
    "  if (cw == 0 && w4 == 0 && lane == 0) { ft[5] = clock64(); ft[6] = ft_gt(); }\n}", "store")
open(p, 'w').write(s)
