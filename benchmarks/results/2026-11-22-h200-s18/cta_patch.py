"""Session 17's cta_patch.py for the kernel with NC consumer warpgroups (session 18): the same stamps,
with its two changed anchor lines. python cta_patch.py COPY_DIR (a copy of flashtree to patch)."""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
src = open(os.path.join(here, "..", "2026-11-22-h200-s17", "cta_patch.py")).read()
for old, new in [
    ("    if (!split || (it & 1) == cw) {", "    if (split ? it % NC == cw : NC == 2 || !idle) {  // two consumers: none idles"),
    ('"    if (!split"', '"    if (split ?"'),
    ("  if (split) {  // the two consumers ran the same rows over alternate tiles: merge through the ring",
     "  if (split) {  // the consumers ran the same rows over every NC-th tile: merge through the ring"),
]:
    assert old in src, old
    src = src.replace(old, new)
sys.argv = [sys.argv[0]] + sys.argv[1:]
exec(compile(src, "cta_patch_s17", "exec"))
