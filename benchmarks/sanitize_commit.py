"""A small run of the commit kernels (copy + advance) for compute-sanitizer:
`python benchmarks/sanitize_commit.py` (memcheck, racecheck)."""
import torch

from flashtree.kvcache import commit_accepted

torch.manual_seed(0)
dev = "cuda"
layers, b, hkv, c, t, width = 3, 5, 2, 40, 9, 4
for dtype, d in [(torch.bfloat16, 128), (torch.float16, 96), (torch.float32, 64)]:
    kv = torch.randn(2, layers, b, hkv, c, d, device=dev, dtype=dtype)
    cur = torch.randn(2, layers, b, hkv, t + 2, d, device=dev, dtype=dtype)[..., :t, :]  # strided T
    nodes = torch.randint(-1, t + 1, (b, width), device=dev)
    length = torch.tensor([0, 1, width, 3, 2], device=dev)
    lens = torch.tensor([0, 7, 36, 39, 12], dtype=torch.int32, device=dev)  # row 3 overflows
    commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens)
    # paged: 8-token pages, row 2's new page unmapped, row 4 straddles a page boundary
    page = 8
    pages = torch.randn(2, layers, b * c // page, hkv, page, d, device=dev, dtype=dtype)
    tables = torch.randperm(b * c // page, device=dev).to(torch.int32).view(b, c // page)
    tables[2, 2] = -1
    lens = torch.tensor([0, 7, 16, 39, 6], dtype=torch.int32, device=dev)
    commit_accepted(pages[0], pages[1], cur[0], cur[1], nodes.int(), length.int(), lens, block_tables=tables)
torch.cuda.synchronize()
print("sanitize commit run done")
