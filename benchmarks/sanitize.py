"""A small run of every kernel, for compute-sanitizer (memcheck, racecheck): `python benchmarks/sanitize.py`."""
import torch

import flashtree
from flashtree import tree

torch.manual_seed(0)
dev = "cuda"
o = torch.randn(37, 5, 4, 128, device=dev, dtype=torch.bfloat16)
lse = torch.randn(37, 5, 4, device=dev)
lse[::3, 2] = float("-inf")
flashtree.merge_states(o, lse)
for dtype, d, bs in [(torch.bfloat16, 128, 64), (torch.float16, 64, 32), (torch.bfloat16, 256, 16)]:
    b, h, g, t, c = 3, 8, 4, 19, 300
    q = torch.randn(b, h, t, d, device=dev, dtype=dtype)
    kc = torch.randn(b, h // g, c, d, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    ck = torch.randn(b, h // g, t, d, device=dev, dtype=dtype)
    cv = torch.randn_like(ck)
    mask = tree.ancestor_mask([-1] + [i // 2 for i in range(1, t)]).to(dev)
    lens = torch.tensor([300, 0, 77], dtype=torch.int32, device=dev)
    flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, bs, kv_group_num=g)
    page = 16
    pages = torch.randn(b * 20, h // g, page, d, device=dev, dtype=dtype)
    table = torch.arange(b * 20, dtype=torch.int32, device=dev).view(b, 20)
    flashtree.flash_decoding_attention_paged(q, pages, pages, table, lens, ck, cv, mask, bs, kv_group_num=g)
torch.cuda.synchronize()
print("sanitize run done")
