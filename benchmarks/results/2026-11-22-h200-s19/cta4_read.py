"""Run a shared-prefix row with block_m = 256 and a cta4_patch.py copy first on PYTHONPATH; print
per-CTA phases by item kind (256-row, 192-row wide, split) and wave, and the span.
python cta4_read.py ROW [CHUNK_LEN]"""
import sys
import numpy as np, torch, cupy
from flashtree import deft
from flashtree._jit import runtime
from flashtree.bench.suites import shared_prefix as sp
row = int(sys.argv[1]) if len(sys.argv) > 1 else 1
chunk_len = int(sys.argv[2]) if len(sys.argv) > 2 else None
cache, n, masks = sp.build_cache(sp.WORKLOADS[row], torch.device("cuda"))
plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, block_m=256, chunk_len=chunk_len)
torch.manual_seed(0)
for kp, vp in zip(cache.k_pools, cache.v_pools):
    kp.normal_(); vp.normal_()
q = torch.randn(plan.num_queries, sp.H, sp.D, device="cuda", dtype=torch.bfloat16)
call = lambda: deft.deft_attention(q, cache.k_pools[0], cache.v_pools[0], plan)
for _ in range(5): call()
torch.cuda.synchronize()
mod = [v for k, v in runtime._loaded.items() if k[0].name.endswith("_c4")][0]
mp = mod._module.get_global_var("ftcta")
nbytes = 8192 * 16 * 8
ch, work = plan.host["chunks"], plan.host["work"]
hkv = plan.num_kv_heads
nblk = len(work) * hkv
item = np.arange(nblk) // hkv
all4 = work[item, 1] < 0
m0 = np.where(all4, -work[item, 1] - 1, work[item, 1]) * 64
rows = np.minimum(np.where(all4, 256, 192), (ch[work[item, 0], 3] - ch[work[item, 0], 2]) * 4 - m0)
tiles = -(-(ch[work[item, 0], 1] - ch[work[item, 0], 0]) // 64)
kind = np.where(all4, "256", np.where(rows > 64, "192", "split"))
print(sp.WORKLOADS[row], "blocks", nblk, "chunk", plan.chunk_len, {k: int((kind == k).sum()) for k in ("256", "192", "split")})
for rep in range(2):
    cupy.cuda.runtime.memset(mp, 0, nbytes)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); call(); e1.record(); torch.cuda.synchronize()
    h = np.zeros(8192 * 16, np.uint64)
    cupy.cuda.runtime.memcpy(h.ctypes.data, mp, nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
    a = h.astype(np.int64).reshape(-1, 16)[:nblk]
    assert ((a[:, 12] == 1) == all4).all()
    gt0 = a[:, 1].min()
    print(f"\nrep {rep}: call {e0.elapsed_time(e1)*1e3:.1f} us (events), CTA span {(a[:, 6].max() - gt0) / 1e3:.1f} us")
    sm = a[:, 2]
    wave = np.zeros(nblk, int)
    for s_ in np.unique(sm):
        idx = np.where(sm == s_)[0]
        idx = idx[np.argsort(a[idx, 0])]
        wave[idx] = np.arange(len(idx))
    start_first = a[:, 3] - a[:, 0]; loop = a[:, 4] - a[:, 3]; tail = a[:, 5] - a[:, 4]
    tot = np.maximum(a[:, 5], a[:, 7]) - a[:, 0]
    for k in ("256", "192", "split"):
        for wv in (0, 1, 2):
            m = (kind == k) & (wave == wv)
            if not m.any(): continue
            extra = ""
            if k == "256":
                ends = a[m][:, 8:12] - a[m][:, 3:4]
                extra = f" consumer loop ends (per tile) {np.median(ends / tiles[m][:, None], 0).round(0)}"
            print(f"  {k:5s} wave {wv}: n {m.sum():3d} tiles {np.median(tiles[m]):.0f} | start->first tile {np.median(start_first[m]):6.0f}"
                  f" loop {np.median(loop[m]):7.0f} (per tile {np.median(loop[m]/tiles[m]):5.0f}) tail {np.median(tail[m]):5.0f}"
                  f" total {np.median(tot[m]):7.0f} p90 {np.percentile(tot[m], 90):7.0f}{extra}")
    last = np.array([a[sm == s_, 6].max() - gt0 for s_ in np.unique(sm)]) / 1e3
    print(f"  SM last end us: min {last.min():.2f} median {np.median(last):.2f} max {last.max():.2f}; SMs used {len(last)}")
    d_cyc = (a[:, 5] - a[:, 0]).astype(float); d_ns = (a[:, 6] - a[:, 1]).astype(float)
    ok = d_ns > 5000
    print(f"  SM clock (cycles/ns): median {np.median(d_cyc[ok] / d_ns[ok]):.3f}")
