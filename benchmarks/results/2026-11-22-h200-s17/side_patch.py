"""Patch a copy of flashtree (python side_patch.py consumers|producer COPY_DIR) for timing only:
`consumers`: the ws kernel's producer neither loads records nor copies, it publishes each stage as
full once it is empty; `producer`: the consumers wait for each stage and release it without computing."""
import sys
mode, root = sys.argv[1], sys.argv[2]
p = root + '/kernels_cu/deft.cu'
s = open(p).read()
if mode == "consumers":
    reps = [
     ("    load_records(0, rec_even);\n    if (w.num_tiles > 1) load_records(1, rec_odd);\n",
      "    rec_even[0] = rec_even[1] = rec_odd[0] = rec_odd[1] = DeftToken{0, 0, 0, 0};\n"),
     ("      else if (it >= S) mbar_wait(bar_empty + stage, (it / S - 1) & 1);\n",
      "      else if (it >= S) mbar_wait(bar_empty + stage, (it / S - 1) & 1);\n"
      "      if (true) { if (pw == 0 && lane == 0) smem_full[stage] = 1; by_tma |= 1u << (it % 32); mbar_arrive(bar_full + stage); return; }\n"),
    ]
else:
    reps = [
     ("      wg_attention_step<T, D>(st, qf, smem_addr(sk), smem_addr(sk + Cfg::kTileElems), smem_full[stage] != 0,\n"
      "                              tile_vis, scale_log2, lane);\n", "      (void)tile_vis; (void)sk;\n"),
    ]
for a, b in reps:
    assert s.count(a) == 1, a
    s = s.replace(a, b)
open(p, 'w').write(s)
