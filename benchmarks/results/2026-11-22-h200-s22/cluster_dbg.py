import ctypes, torch, flashtree
from flashtree import dfs, tree, _jit
torch.manual_seed(0)
dev = torch.device("cuda")
k = _jit.get_kernel(dfs.fwd_ws_spec(torch.bfloat16, 128, True), dev)
class LC(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]
smem = dfs.fwd_ws_smem(128, True)
k._allow_dynamic_smem(smem)
for grid in (1, 2, 132):
    cfg = LC((ctypes.c_uint * 3)(grid, 1, 1), (ctypes.c_uint * 3)(384, 1, 1), smem, None, None, 0)
    n = ctypes.c_int(0)
    err = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(k._function.ptr), ctypes.byref(cfg))
    print("grid", grid, "err", err, "clusters", n.value)
for d in (64, 128):
  for dtype in (torch.float16, torch.bfloat16):
    for groups in ([(300, [150, 77, 1]), (64, [64, 64])], [(2048, [512] * 8)]):
        sq, ek, cu = (x.cuda() for x in tree.dfs_arrays_from_groups(groups))
        n = len(sq)
        q = torch.randn(n, 8, d, device=dev, dtype=dtype, requires_grad=True)
        kk, v = (torch.randn(n, 2, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        do = torch.randn(n, 8, d, device=dev, dtype=dtype)
        res = []
        for c in (False, True):
            dfs._CLUSTER = c
            o, lse = flashtree.tree_attention(q, kk, v, cu, sq, ek, return_lse=True)
            g = torch.autograd.grad(o, (q, kk, v), do)
            torch.cuda.synchronize()
            res.append((o, lse) + g)
        diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(*res)]
        bad = [(a.float() - b.float()).abs().amax(dim=-1) > 0 for a, b in zip(res[0][:2], res[1][:2])]
        where = [torch.nonzero(b)[:4].tolist() for b in bad]
        print(d, dtype, n, "o lse dq dk dv diffs", ["%.3g" % x for x in diffs], "bad rows (row, head)", where, flush=True)
