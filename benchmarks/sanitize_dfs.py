"""A small run of every dfs kernel (forward, delta, dK/dV, dQ, the tile table) for compute-sanitizer:
`python benchmarks/sanitize_dfs.py` (memcheck, racecheck)."""
import torch

import flashtree
from flashtree import dfs, tree

torch.manual_seed(0)
dev = "cuda"
# Odd sizes: a group whose nodes straddle tile edges, a one-token sequence, a plain causal one.
sq, ek, cu = (x.to(dev) for x in tree.dfs_arrays_from_groups([(70, [33, 1, 65]), (1, []), (45, [])]))
n = sq.shape[0]
for dtype, d, h, hkv in [(torch.bfloat16, 128, 4, 2), (torch.float16, 64, 4, 1), (torch.float16, 64, 3, 1)]:
    q = torch.randn(n, h, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(n, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(n, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    o, lse = flashtree.tree_attention(q, k, v, cu, sq, ek, return_lse=True)
    torch.autograd.grad((o.float().sum() + lse.sum()), (q, k, v))
    dfs.visited_tiles(q.detach(), k.detach(), v.detach(), cu, sq, ek)
torch.cuda.synchronize()
print("sanitize dfs run done")
