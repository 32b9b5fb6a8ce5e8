"""Session 15, call 4: patch a copy of flashtree (python timeline_patch.py COPY_DIR) so that
deft_partial_ws_kernel stamps clock64() per phase (producer: per tile after its empty wait and
after its copies; consumer warp 0 of each warpgroup: per tile before/after the full wait, after S,
after the row maxima, after the exponentials, after the P conversion and row sums, after P V) into
a __device__ buffer `ftdbg` for the first 8 CTAs. Read with timeline_read.py."""
import sys
root = sys.argv[1]
p = root + '/kernels_cu/deft.cu'
s = open(p).read()
# global debug buffer (outside the namespace: unmangled)
a = "namespace ft {"
i = s.index(a)
s = s[:i] + "__device__ unsigned long long ftdbg[1 << 16];\n#define FT_STAMP(slot) do { if (blockIdx.x < 8 && lane == 0) ftdbg[(blockIdx.x * 4 + who) * 1024 + (slot)] = clock64(); } while (0)\n" + s[i:]
# consumer loop stamps
a = """  for (int it = 0; it < w.num_tiles; ++it) {
    const int stage = it % S;
    mbar_wait(bar_full + stage, (it / S) & 1);
    if (!split || (it & 1) == cw) {"""
assert s.count(a) == 1
s = s.replace(a, """  const int who = (w4 == 0) ? 1 + cw : 3;
  if (w4 == 0) FT_STAMP(0);
  for (int it = 0; it < w.num_tiles; ++it) {
    const int stage = it % S;
    if (w4 == 0) FT_STAMP(8 + 8 * it + 0);
    mbar_wait(bar_full + stage, (it / S) & 1);
    if (w4 == 0) FT_STAMP(8 + 8 * it + 1);
    if (!split || (it & 1) == cw) {""")
a = """      wg_attention_step<T, D>(st, qf, smem_addr(sk), smem_addr(sk + Cfg::kTileElems), smem_full[stage] != 0,
                              tile_vis, scale_log2, lane);"""
assert s.count(a) == 1
s = s.replace(a, """      wg_attention_step_tl<T, D>(st, qf, smem_addr(sk), smem_addr(sk + Cfg::kTileElems), smem_full[stage] != 0,
                              tile_vis, scale_log2, lane, w4 == 0 ? 8 + 8 * it : -1, who);""")
a = "  if (split) {  // the two consumers ran the same rows over alternate tiles: merge through the ring"
assert s.count(a) == 1
s = s.replace(a, "  if (w4 == 0) FT_STAMP(1);\n" + a)
a = "  deft_store_rows(st, m_lane, w.rows, group, w.hk, my_slot_base, num_heads, mid_o, mid_lse, lane);\n}"
assert s.count(a) == 1
s = s.replace(a, a[:-2] + "\n  if (w4 == 0) FT_STAMP(2);\n}")
# producer stamps: warp 0, per tile after its empty wait and after issuing
a = "  if (wg == 0) {\n"
assert s.count(a) == 1
s = s.replace(a, "  if (wg == 0) {\n    const int who = 0;\n    if (warp == 0) FT_STAMP(0);\n", 1)
a = "      bool sees_all = true;\n"
assert s.count(a) == 1
s = s.replace(a, "      if (warp == 0) FT_STAMP(8 + 8 * it + 0);\n" + a)
a = "      cp_async_commit();  // one group per tile"
assert s.count(a) == 1
s = s.replace(a, "      if (warp == 0) FT_STAMP(8 + 8 * it + 1);\n" + a)
# the step with stamps
a = "// What one work item covers."
assert s.count(a) == 1
step = r'''
template <typename T, int D, typename VisFn>
__device__ __forceinline__ void wg_attention_step_tl(RowState<D>& st, const u32 (&q)[D / 16][4], u32 k, u32 v,
                                                  bool full, VisFn tile_vis, float scale_log2, int lane, int base, int who) {
  float s[8][4];
  wgmma_fence();
  wg_issue_scores<T, D>(s, q, k);
  wgmma_wait<0>();
  if (base >= 0) FT_STAMP(base + 2);
  if (!full) {
    unsigned long long vis[2];
    tile_vis(vis);
    mask_invisible<64>(s, vis, 0, lane);
  }
  float rescale[2];
  if (softmax_new_max(s, scale_log2, st.row_max, rescale)) softmax_rescale(rescale, st.l_acc, st.o_acc);
  if (base >= 0) FT_STAMP(base + 3);
  softmax_exp(s, scale_log2, st.row_max);
  if (base >= 0) FT_STAMP(base + 4);
  u32 p[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    acc_to_a<T>(p[kk], s, kk);
    mma_row_sum<T>(st.l_acc, p[kk]);
  }
  if (base >= 0) FT_STAMP(base + 5);
  wgmma_fence();
  wg_issue_pv<T, D>(st.o_acc, p, v);
  wgmma_wait<0>();
  if (base >= 0) FT_STAMP(base + 6);
}

'''
s = s.replace(a, step + a)
open(p, 'w').write(s)
