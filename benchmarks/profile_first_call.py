"""Where the first call of a new process spends its time (disk cache warm)."""
import cProfile
import pstats
import time

import torch

torch.zeros(1, device="cuda")
torch.cuda.synchronize()
import flashtree  # noqa: E402

o = torch.randn(64, 4, 32, 128, device="cuda", dtype=torch.bfloat16)
lse = torch.randn(64, 4, 32, device="cuda")
torch.cuda.synchronize()
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
flashtree.merge_states(o, lse)
torch.cuda.synchronize()
prof.disable()
print(f"first call {time.perf_counter() - t0:.3f}s")
pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
