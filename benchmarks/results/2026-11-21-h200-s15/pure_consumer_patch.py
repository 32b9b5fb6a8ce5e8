"""Session 15, call 3: patch a copy of flashtree (python pure_consumer_patch.py COPY_DIR) so that
the ws kernel's producer neither loads records nor copies: it publishes every stage as full as
soon as it is empty, so the consumers run alone on whatever the ring holds (timing only)."""
import sys
p = sys.argv[1] + '/kernels_cu/deft.cu'
s = open(p).read()
reps = [
 ("    load_records(0, rec_next);\n", "    rec_next[0] = rec_next[1] = DeftToken{0, 0, 0, 0};\n"),
 ("      if (it + 1 < w.num_tiles) load_records(it + 1, rec_next);  // a tile ahead: off the issue path\n", ""),
 ("      else if (it >= S) mbar_wait(bar_empty + stage, (it / S - 1) & 1);\n",
  "      else if (it >= S) mbar_wait(bar_empty + stage, (it / S - 1) & 1);\n"
  "      if (true) { if (pw == 0 && lane == 0) smem_full[stage] = 1; by_tma = ~0u; mbar_arrive(bar_full + stage); continue; }\n"),
]
for a, b in reps:
    assert s.count(a) == 1, a
    s = s.replace(a, b)
open(p, 'w').write(s)
