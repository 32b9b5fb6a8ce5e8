"""clock() sums per consumer warpgroup of the Hopper dK/dV and dQ kernels, one backward per dfs-suite
tree after warm-up: where a consumer's time goes. Run it from the benchmarks/ folder of a copy of the
tree with probe_bwd_profile.diff applied (session 26 applied it to 7290b84):
    python -P benchmarks/prof_bwd.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from flashtree import dfs
from flashtree.bench.suites import dfs as suite

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diag  # noqa: E402

NAMES = ["total", "kv wait", "stage wait", "S^T issue->wait", "exp", "dV issue->dP^T wait", "dS", "dK issue->wait",
         "epilogue"]
for params in suite.TREES:
    fn = diag._dfs_backward_call(params)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    sq, ek, cu = suite.packed_arrays(suite.workload_trees(params))
    n = sq.shape[0]
    rows = 8 * dfs.num_slots(n, cu.shape[0] - 1)
    dfs._PROF = torch.zeros(rows, 32, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    p = dfs._PROF.cpu().to(torch.int64)
    dfs._PROF = None
    label = suite._label(dict(params, mode="bwd"))
    for cw in range(2):
        x = p[:, 16 * cw:16 * cw + 10]
        x = x[x[:, 0] > 0]
        tot = x[:, 0].sum().item()
        items = x[:, 9].sum().item()
        parts = " ".join(f"{NAMES[i]} {100 * x[:, i].sum().item() / tot:.1f}%" for i in range(1, 9))
        print(f"{label} wg{cw}: CTAs {x.shape[0]}, items {items}, cycles/item {tot / max(items, 1):.0f}; {parts}")
        per = " ".join(f"{NAMES[i]} {x[:, i].sum().item() / max(items, 1):.0f}" for i in (2, 3, 4, 5, 6, 7))
        print(f"    per item (cycles): {per}; per CTA: kv wait {x[:, 1].float().mean():.0f}, "
              f"epilogue {x[:, 8].float().mean():.0f}, total {x[:, 0].float().mean():.0f}")

# The dQ kernel (persistent): per consumer, over its items.
QN = ["total", "next item", "item start (delta, Q/dO)", "stage wait", "S, dP issue->S wait", "exp, dP wait, dS",
      "dQ issue->wait", "epilogue (dQ stores)"]
for params in suite.TREES:
    fn = diag._dfs_backward_call(params)
    fn()
    torch.cuda.synchronize()
    dfs._PROF_DQ = torch.zeros(1024, 32, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    p = dfs._PROF_DQ.cpu().to(torch.int64)
    dfs._PROF_DQ = None
    label = suite._label(dict(params, mode="bwd"))
    for cw in range(2):
        x = p[:, 16 * cw:16 * cw + 10]
        x = x[x[:, 0] > 0]
        tot, steps, items = x[:, 0].sum().item(), x[:, 8].sum().item(), x[:, 9].sum().item()
        parts = " ".join(f"{QN[i]} {100 * x[:, i].sum().item() / tot:.1f}%" for i in range(1, 8))
        print(f"dQ {label} wg{cw}: CTAs {x.shape[0]}, items {items}, steps {steps}, cycles/step {tot / max(steps, 1):.0f}; {parts}")
        print(f"    per step: " + " ".join(f"{QN[i]} {x[:, i].sum().item() / max(steps, 1):.0f}" for i in (3, 4, 5, 6))
              + "; per item: " + " ".join(f"{QN[i]} {x[:, i].sum().item() / max(items, 1):.0f}" for i in (1, 2, 7)))
