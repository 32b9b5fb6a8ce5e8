"""Run the long shared-prefix row with a cta_patch.py copy first on PYTHONPATH and print where
each SM's time goes: per-CTA phases by item kind and by wave, gaps between CTAs, the span."""
import sys, os
import numpy as np, torch, cupy
from flashtree import deft
from flashtree._jit import runtime
from flashtree.bench.suites import shared_prefix as sp
row = int(sys.argv[1]) if len(sys.argv) > 1 else 1
cache, n, masks = sp.build_cache(sp.WORKLOADS[row], torch.device("cuda"))
plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks)
torch.manual_seed(0)
for kp, vp in zip(cache.k_pools, cache.v_pools):
    kp.normal_(); vp.normal_()
q = torch.randn(plan.num_queries, sp.H, sp.D, device="cuda", dtype=torch.bfloat16)
call = lambda: deft.deft_attention(q, cache.k_pools[0], cache.v_pools[0], plan)
for _ in range(5): call()
torch.cuda.synchronize()
mods = [v for k, v in runtime._loaded.items() if "ws" in k[0].name]
mp = mods[0]._module.get_global_var("ftcta")
nbytes = 8192 * 8 * 8
ch, work = plan.host["chunks"], plan.host["work"]
hkv = plan.num_kv_heads
nblk = len(work) * hkv
item = np.arange(nblk) // hkv
rows = np.minimum(128, (ch[work[item, 0], 3] - ch[work[item, 0], 2]) * 4 - 128 * work[item, 1])
tiles = -(-(ch[work[item, 0], 1] - ch[work[item, 0], 0]) // 64)
kind = np.where(rows > 64, "wide", "split")
print(sp.WORKLOADS[row], "blocks", nblk, "block_m", plan.block_m, "chunk", plan.chunk_len)
for rep in range(3):
    cupy.cuda.runtime.memset(mp, 0, nbytes)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); call(); e1.record(); torch.cuda.synchronize()
    h = np.zeros(8192 * 8, np.uint64)
    cupy.cuda.runtime.memcpy(h.ctypes.data, mp, nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
    a = h.astype(np.int64).reshape(-1, 8)[:nblk]
    gt0 = a[:, 1].min()
    span = (a[:, 6].max() - gt0) / 1e3
    print(f"\nrep {rep}: call {e0.elapsed_time(e1)*1e3:.1f} us (events), CTA span {span:.1f} us (globaltimer)")
    sm = a[:, 2]
    # wave = position of the CTA on its SM
    wave = np.zeros(nblk, int)
    gaps = []
    for s_ in np.unique(sm):
        idx = np.where(sm == s_)[0]
        idx = idx[np.argsort(a[idx, 0])]
        wave[idx] = np.arange(len(idx))
        for p_, n_ in zip(idx[:-1], idx[1:]):
            gaps.append(a[n_, 0] - max(a[p_, 5], a[p_, 7]))
    print(f"  CTAs per SM: {np.bincount(np.bincount(sm)[np.unique(sm)])}  gap between CTAs on an SM (cycles): "
          f"median {np.median(gaps):.0f} p10 {np.percentile(gaps,10):.0f} p90 {np.percentile(gaps,90):.0f}")
    start_first = a[:, 3] - a[:, 0]; loop = a[:, 4] - a[:, 3]; tail = a[:, 5] - a[:, 4]; tot = np.maximum(a[:, 5], a[:, 7]) - a[:, 0]
    for k in ("wide", "split"):
        for wv in (0, 1, 2):
            m = (kind == k) & (wave == wv)
            if not m.any(): continue
            print(f"  {k:5s} wave {wv}: n {m.sum():3d} tiles {np.median(tiles[m]):.0f} | start->first tile {np.median(start_first[m]):6.0f}"
                  f" loop {np.median(loop[m]):7.0f} (per tile {np.median(loop[m]/tiles[m]):5.0f}) tail {np.median(tail[m]):5.0f}"
                  f" total {np.median(tot[m]):7.0f}  p90 total {np.percentile(tot[m],90):7.0f} cycles")
    # global timeline: per SM start of first CTA and end of last CTA (globaltimer)
    first = []; last = []
    for s_ in np.unique(sm):
        idx = np.where(sm == s_)[0]
        first.append(a[idx, 1].min() - gt0); last.append(a[idx, 6].max() - gt0)
    first, last = np.array(first) / 1e3, np.array(last) / 1e3
    print(f"  SM first start us: max {first.max():.2f}; SM last end us: min {last.min():.2f} median {np.median(last):.2f} max {last.max():.2f}")
    w1 = wave == 1
    if w1.any():
        st1 = (a[w1, 1] - gt0) / 1e3
        print(f"  second-wave CTA starts us: min {st1.min():.2f} median {np.median(st1):.2f} max {st1.max():.2f}")
    # clock rate estimate: cycles / ns on an SM
    d_cyc = (a[:, 5] - a[:, 0]).astype(float); d_ns = (a[:, 6] - a[:, 1]).astype(float)
    ok = d_ns > 5000
    print(f"  SM clock (cycles/ns): median {np.median(d_cyc[ok]/d_ns[ok]):.3f}")
