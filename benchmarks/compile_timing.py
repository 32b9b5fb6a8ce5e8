"""Cold compile of one spec, then the first result of a new process that finds it in the disk cache.

Usage: python benchmarks/compile_timing.py   (uses a fresh FLASHTREE_CACHE_DIR)
"""
import os
import subprocess
import sys
import tempfile
import time

cache = tempfile.mkdtemp(prefix="ftcache-")
env = dict(os.environ, FLASHTREE_CACHE_DIR=cache)
child = r"""
import time, sys
t0 = time.perf_counter()
import torch
torch.zeros(1, device="cuda"); torch.cuda.synchronize()   # CUDA context: not ours to count
t1 = time.perf_counter()
import flashtree
t2 = time.perf_counter()
o = torch.randn(64, 4, 32, 128, device="cuda", dtype=torch.bfloat16); l = torch.randn(64, 4, 32, device="cuda")
torch.cuda.synchronize()
t3 = time.perf_counter()
out = flashtree.merge_states(o, l); torch.cuda.synchronize()
t4 = time.perf_counter()
print(f"import flashtree {t2 - t1:.3f}s; first merge_states result {t4 - t3:.3f}s after import "
      f"(import + first result {t4 - t3 + t2 - t1:.3f}s)")
"""
for label in ("cold (empty cache)", "warm (new process, disk cache)"):
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    print(label + ":", r.stdout.strip(), r.stderr.strip()[-500:])
# Cold compile of single specs, in-process, no cache.
from flashtree import _jit  # noqa: E402
from flashtree.decode import spec as decode_spec  # noqa: E402
from flashtree.merge import spec as merge_spec  # noqa: E402
import torch  # noqa: E402
from flashtree._jit.nvrtc import compile_with_nvrtc  # noqa: E402
from flashtree._jit.source import kernels_dir  # noqa: E402

for s in (merge_spec(torch.bfloat16, 128), decode_spec(torch.bfloat16, 128, 64, False)):
    src = (kernels_dir() / s.source_file).read_text()
    k = compile_with_nvrtc(s, "sm_90", src)
    print(f"cold NVRTC compile {s.name}: {k.compile_seconds:.2f}s (regs {k.resources.registers}, spills {k.resources.spills})")
