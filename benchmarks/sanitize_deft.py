"""One small run of each DeFT kernel (partial + merge), for compute-sanitizer memcheck and racecheck:
`compute-sanitizer --tool memcheck python benchmarks/sanitize_deft.py` (and --tool racecheck)."""
import torch

import flashtree
from flashtree import tree
from flashtree.kvcache import TreeKVCache

torch.manual_seed(0)
dev = "cuda"
# 3 leaves: chunks of up to 28 rows (16- and 32-key steps); 13 leaves: 64-row tiles (64-key steps);
# 41 leaves: 172 rows (on Hopper a 128-row work item, each consumer warpgroup 64 rows, and a split
# one; with three consumers one 192-row item whose third consumer is partly past the rows).
for dtype, d, hkv, h, page, lens in [(torch.bfloat16, 128, 2, 8, 16, (1, 40, 9)), (torch.float16, 64, 1, 4, 8, (1, 40, 9)),
                                     (torch.bfloat16, 128, 2, 8, 16, (1, 40, 9) + tuple(range(2, 12))),
                                     (torch.bfloat16, 128, 2, 8, 16, (1, 40, 9) + tuple(range(2, 40)))]:
    c = TreeKVCache(1, 160, hkv, d, page_size=page, dtype=dtype, device=dev)
    root = c.create_root(None, torch.randn(1, 150, hkv, d, device=dev, dtype=dtype), torch.randn(1, 150, hkv, d, device=dev, dtype=dtype))
    kids = c.fork(root, len(lens))
    for i, kid in enumerate(kids):  # leaf 2 gets a 5-token speculative tail
        n = lens[i]
        c.append(kid, None, torch.randn(1, n, hkv, d, device=dev, dtype=dtype), torch.randn(1, n, hkv, d, device=dev, dtype=dtype))
    mask = tree.ancestor_mask([-1, 0, 0, 1, 1])
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for chunk_len, block_m in ((64, None), (None, None)) + (((64, 128), (None, 128), (64, 192), (None, 192)) if hopper else ()):
        # many small chunks spanning nodes, then the automatic length; on Hopper also the
        # warp-specialised kernels (128-row work items, which the plan picks for wide trees only, and
        # the opt-in 192-row ones)
        plan = flashtree.deft_plan(c, h, queries_per_leaf={kids[2]: 5}, tail_masks={kids[2]: mask}, chunk_len=chunk_len,
                                   block_m=block_m)
        q = torch.randn(plan.num_queries, h, d, device=dev, dtype=dtype)
        flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
# Stage 2 is a programmatic dependent launch only inside a CUDA-graph capture (on Hopper): the last
# call once more, captured and replayed.
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
graph.replay()
torch.cuda.synchronize()
assert torch.equal(captured, flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)), "graph replay differs"
print("sanitize deft run done")
