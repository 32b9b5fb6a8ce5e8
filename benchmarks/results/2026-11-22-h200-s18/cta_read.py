"""Session 17's cta_read.py with the rows per work item and the chunk length as arguments (session
18): python cta_read.py ROW [BLOCK_M [CHUNK_LEN]], with a cta_patch.py copy first on PYTHONPATH."""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
src = open(os.path.join(here, "..", "2026-11-22-h200-s17", "cta_read.py")).read()
for old, new in [
    ("row = int(sys.argv[1]) if len(sys.argv) > 1 else 1",
     "row = int(sys.argv[1]) if len(sys.argv) > 1 else 1\n"
     "block_m = int(sys.argv[2]) if len(sys.argv) > 2 else None\n"
     "chunk_len = int(sys.argv[3]) if len(sys.argv) > 3 else None"),
    ("plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks)",
     "plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, block_m=block_m, chunk_len=chunk_len)"),
    ('if "ws" in k[0].name]', 'if "ws" in k[0].name and (plan.block_m == 192) == k[0].name.endswith("_c3")]'),
    ("rows = np.minimum(128, (ch[work[item, 0], 3] - ch[work[item, 0], 2]) * 4 - 128 * work[item, 1])",
     "rows = np.minimum(plan.block_m, (ch[work[item, 0], 3] - ch[work[item, 0], 2]) * 4 - plan.block_m * work[item, 1])"),
]:
    assert old in src, old
    src = src.replace(old, new)
exec(compile(src, "cta_read_s17", "exec"))
