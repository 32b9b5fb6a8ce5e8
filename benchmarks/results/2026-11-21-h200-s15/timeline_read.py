"""Session 15, call 4: run the long shared-prefix row once with a timeline_patch.py copy first on
PYTHONPATH (python3 -P timeline_read.py, from the repo root) and print each warpgroup's median
cycles per phase and the first two CTAs' per-tile timestamps."""
import sys, os
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import numpy as np, torch, cupy
import diag
from flashtree._jit import runtime
label, call = diag._deft_call(1)
mods = [v for k, v in runtime._loaded.items() if "ws" in k[0].name]
mp = mods[0]._module.get_global_var("ftdbg")
for _ in range(3): call()
torch.cuda.synchronize()
cupy.cuda.runtime.memset(mp, 0, 8 << 16)
call(); torch.cuda.synchronize()
h = np.zeros(1 << 16, np.uint64)
cupy.cuda.runtime.memcpy(h.ctypes.data, mp, 8 << 16, cupy.cuda.runtime.memcpyDeviceToHost)
a = h.astype(np.int64)
names = ["full_wait", "S", "max", "exp", "cvt+rowsum", "PV"]
for b in range(8):
    base = a[(b * 4 + 0) * 1024 + 0]
    rows = {}
    for who in (1, 2):
        r = a[(b * 4 + who) * 1024:(b * 4 + who + 1) * 1024]
        st = r[8:8 + 8 * 20].reshape(20, 8)
        d = np.diff(st[:, :7], axis=1)
        step = np.diff(st[:, 0])
        rows[who] = (r, st, d, step)
        print(f"cta {b} wg {who}: start {r[0]-base:6d} loop_end {r[1]-base:7d} end {r[2]-base:7d} | medians " +
              " ".join(f"{n} {int(np.median(d[1:, i])):5d}" for i, n in enumerate(names)) + f" | step {int(np.median(step[1:]))}")
    if b < 2:
        p = a[(b * 4) * 1024:(b * 4 + 1) * 1024][8:8 + 160].reshape(20, 8)
        print("  producer tile issue (after empty wait):", " ".join(str(int(x - base)) for x in p[:, 0]))
        for who in (1, 2):
            st = rows[who][1]
            print(f"  wg{who} full-wait end:", " ".join(str(int(x - base)) for x in st[:, 1]))
            print(f"  wg{who} S done     :", " ".join(str(int(x - base)) for x in st[:, 2]))
            print(f"  wg{who} PV done    :", " ".join(str(int(x - base)) for x in st[:, 6]))
