"""Kernel-variant exploration on the GPU.

  python benchmarks/diag.py decode B C T [block] [paged]   run one workload a few times (for ncu)
  python benchmarks/diag.py merge N S
  python benchmarks/diag.py variants                        time decode variants on the verify rows
  python benchmarks/diag.py mergevariants                   merge vs FlashInfer, eager and graph
  python benchmarks/diag.py overhead                        eager vs CUDA-graph time: the host's share
  python benchmarks/diag.py deft_host                       deft_attention eager vs graph, host profile
  python benchmarks/diag.py deft_host_parts                 deft_attention eager: host time up to the first launch, parts
  python benchmarks/diag.py deft_kernels [M]                deft_attention GPU time per kernel (profiler), M rows per item
  python benchmarks/diag.py deft_row I [L M]                deft_attention on shared-prefix row I (for ncu), chunk
                                                            length L and rows per item M (0: the plan's); with
                                                            DIAG_TIME=1 also its graph-replay time
  python benchmarks/diag.py deft_chunks I [M]               deft_attention on row I for each chunk length and M
  python benchmarks/diag.py deft_blockm                     every shared-prefix row with M = 64, 128 and 192
  python benchmarks/diag.py dfs_fwd                         tree_attention forward on the dfs suite's trees
  python benchmarks/diag.py dfs_fwd_loop [N]                the long dfs tree's forward, N eager calls in blocks of 20
  python benchmarks/diag.py dfs_step [T]                    one eager training step of dfs tree T (profiler: kernels, gaps)
  python benchmarks/diag.py hostprofile                     cProfile of the host path of tiny calls
"""
import os
import sys

import torch

import flashtree
from flashtree import tree


def decode_call(b, c, t, block=64, paged=0):
    h, hkv, d = 32, 8, 128
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, h, t, d, device=dev, dtype=dt)
    ck = torch.randn(b, hkv, t, d, device=dev, dtype=dt)
    cv = torch.randn_like(ck)
    lens = torch.full((b,), c, dtype=torch.int32, device=dev)
    mask = tree.ancestor_mask(tree.chain(t)).to(dev)
    if paged:
        ps = 16 if paged == 1 else 64  # the verify suite's 16-token pages, or pages as long as a tile
        pages = b * c // ps
        kp = torch.randn(pages, hkv, ps, d, device=dev, dtype=dt)
        vp = torch.randn_like(kp)
        bt = torch.randperm(pages, device=dev).to(torch.int32).view(b, c // ps)  # shuffled pages
        call = lambda: flashtree.flash_decoding_attention_paged(q, kp, vp, bt, lens, ck, cv, mask, block_size=block, kv_group_num=4)
    else:
        kc = torch.randn(b, hkv, c, d, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        call = lambda: flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, block, kv_group_num=4)
    return call


def decode(*args):
    call = decode_call(*args)
    for _ in range(4):
        call()
    torch.cuda.synchronize()


def variants():
    """Decode kernel variants on the verify rows: (16-row blocks per warp, keys per softmax step)."""
    from flashtree import decode as dec
    from flashtree.bench.timing import bench
    rows = [(1, 32768, 64), (8, 8192, 64), (32, 2048, 8), (64, 4096, 4), (4, 16384, 63)]
    configs = [(1, 64), (2, 32)]
    print(f"{'B,C,T':>14} {'block':>5} {'rows/warp':>9} {'warp_n':>6} {'padded us':>10} {'P=16 us':>10} "
          f"{'P=64 us':>11} {'paged/padded':>12}")
    for b, c, t in rows:
        for block in (64,):  # 128-key tiles were slower on every row (session 2, 2026-11-21)
            for tiles, warp in configs:
                if tiles == 2 and 4 * t <= 64:
                    continue  # one row tile: the two-block variant would idle half its rows
                dec._M_TILES_OVERRIDE, dec._WARP_N_OVERRIDE = tiles, warp
                us = []
                for paged in (0, 1, 2):
                    call = decode_call(b, c, t, block, paged)
                    us.append(bench(call, warmup=5, iters=30).median_us)
                    del call
                    torch.cuda.empty_cache()
                print(f"{f'{b},{c},{t}':>14} {block:>5} {16 * tiles:>9} {warp:>6} {us[0]:>10.1f} {us[1]:>10.1f} "
                      f"{us[2]:>11.1f} {us[1] / us[0]:>12.3f}", flush=True)
    dec._M_TILES_OVERRIDE = dec._WARP_N_OVERRIDE = None


def mergevariants():
    """merge_states (grid capped at 1 or 2 waves of resident blocks, or uncapped) against FlashInfer,
    eager and as CUDA-graph replays."""

    from flashtree import merge as mg
    from flashtree.bench.timing import bench, input_sets
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001
        flashinfer = None
        print("flashinfer unavailable:", e)
    print(f"{'N':>7} {'S':>3} {'variant':>12} {'eager us':>9} {'graph us':>9}")
    for n, s in [(4096, 2), (4096, 1), (4096, 4), (131072, 2), (131072, 4), (32768, 16)]:
        sets = input_sets(lambda: (torch.randn(n, s, 32, 128, device="cuda", dtype=torch.bfloat16),
                                   torch.randn(n, s, 32, device="cuda") * 3))
        impls = {f"ft waves={w}": (w, flashtree.merge_states) for w in (None, 2)}
        impls["ft default"] = (0, flashtree.merge_states)
        if flashinfer is not None:
            impls["flashinfer"] = (0, flashinfer.merge_states)  # base-2 lse; timing is value-blind
        for name, (waves, fn) in impls.items():
            mg._MAX_WAVES_OVERRIDE = waves
            eager = bench(fn, inputs=sets, warmup=10, iters=100).median_us
            graph = bench(fn, inputs=sets, warmup=10, iters=100, graph=True).median_us
            print(f"{n:>7} {s:>3} {name:>12} {eager:>9.1f} {graph:>9.1f}", flush=True)
        mg._MAX_WAVES_OVERRIDE = 0
        del sets
        torch.cuda.empty_cache()


def overhead():
    import time

    from flashtree.bench.timing import bench
    o = torch.randn(4096, 2, 32, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(4096, 2, 32, device="cuda")
    o_tiny, lse_tiny = o[:8], lse[:8]
    cases = {
        "merge N=4096 S=2": lambda: flashtree.merge_states(o, lse),
        "merge N=8 S=2 (tiny)": lambda: flashtree.merge_states(o_tiny, lse_tiny),
        "decode 32,2048,8": decode_call(32, 2048, 8),
        "decode 1,64,1 (tiny)": decode_call(1, 64, 1),
        "decode paged 1,64,1 (tiny)": decode_call(1, 64, 1, 64, 1),
    }
    print(f"{'case':>28} {'eager us':>9} {'graph us':>9} {'host us/call':>12}")
    for name, fn in cases.items():
        eager = bench(fn, warmup=10, iters=100).median_us
        graph = bench(fn, warmup=10, iters=100, graph=True).median_us
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"{name:>28} {eager:>9.1f} {graph:>9.1f} {host:>12.1f}", flush=True)


def hostprofile():
    o = torch.randn(8, 2, 32, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(8, 2, 32, device="cuda")
    for name, fn in {"merge": lambda: flashtree.merge_states(o, lse), "decode": decode_call(1, 64, 1)}.items():
        fn()
        print(f"== {name}: 300 calls")
        _profile(fn, 300, 22)


def _profile(fn, calls, rows):
    """cProfile of ``calls`` eager calls of ``fn``, the ``rows`` most expensive functions by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def _small_deft_tree():
    """(q, k_pool, v_pool, plan) of a small shared-prefix tree: a 1024-token root and 32 one-token
    leaves, bf16, H = 32, Hkv = 8, D = 128, 16-token pages."""
    from flashtree import deft
    from flashtree.kvcache import TreeKVCache
    c = TreeKVCache(1, 512, 8, 128, page_size=16, dtype=torch.bfloat16, device="cuda")
    kv = lambda n: (torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16),) * 2  # noqa: E731
    root = c.create_root(None, *kv(1024))
    for leaf in c.fork(root, 32):
        c.append(leaf, None, *kv(1))
    plan = deft.deft_plan(c, 32)
    q = torch.randn(plan.num_queries, 32, 128, device="cuda", dtype=torch.bfloat16)
    return q, c.k_pools[0], c.v_pools[0], plan


def deft_host():
    """deft_attention on a small shared-prefix tree: eager vs CUDA-graph time, and a host profile."""
    from flashtree import deft
    from flashtree.bench.timing import bench
    q, k, v, plan = _small_deft_tree()
    fn = lambda: deft.deft_attention(q, k, v, plan)  # noqa: E731
    print(f"eager {bench(fn, warmup=10, iters=100).median_us:.1f} us, "
          f"graph {bench(fn, warmup=10, iters=100, graph=True).median_us:.1f} us")
    _profile(fn, 300, 15)


def deft_host_parts():
    """Where an eager deft_attention call's host time goes (the small tree of deft_host, then the
    shared-prefix suite's first row): medians of perf_counter over calls on an idle GPU (synchronised
    before each), of the whole call, of its time up to the first kernel launch, and of the parts
    that cost host time; then event-timed eager and graph medians as in the suite."""
    import time
    from flashtree import _jit, deft
    from flashtree._jit import tma
    from flashtree.bench.timing import bench
    q, k, v, plan = _small_deft_tree()
    fn = lambda: deft.deft_attention(q, k, v, plan)  # noqa: E731
    for _ in range(20):
        fn()
    torch.cuda.synchronize()

    def median_us(f, n=400):
        ts = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            f()
            ts.append(time.perf_counter_ns() - t0)
        torch.cuda.synchronize()
        return sorted(ts)[n // 2] / 1e3

    stamps = []
    launch = _jit.runtime.LoadedKernel.launch

    def stamped(self, *args, **kwargs):
        stamps.append(time.perf_counter_ns())
        return launch(self, *args, **kwargs)

    _jit.runtime.LoadedKernel.launch = stamped
    first, whole = [], []
    try:
        for _ in range(400):
            torch.cuda.synchronize()
            stamps.clear()
            t0 = time.perf_counter_ns()
            fn()
            whole.append(time.perf_counter_ns() - t0)
            first.append(stamps[0] - t0)
    finally:
        _jit.runtime.LoadedKernel.launch = launch
    torch.cuda.synchronize()
    print(f"whole call {sorted(whole)[200] / 1e3:.1f} us, up to the first launch {sorted(first)[200] / 1e3:.1f} us "
          "(launches stamped)")
    box = (64, 16, 1, 4)
    ev = torch.cuda.Event(enable_timing=True)
    parts = {
        "whole call (unstamped)": fn,
        "_signature": lambda: deft._signature(q, k, v, plan, None, None, None),
        "plan.check_fresh": plan.check_fresh,
        "torch.empty (out)": lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device),
        "is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        "tma.swizzled_map x2": lambda: (tma.swizzled_map(k, box), tma.swizzled_map(v, box)),
        "event record": ev.record,
    }
    for name, f in parts.items():
        print(f"  {name:32s} {median_us(f):6.1f} us")
    print(f"eager {bench(fn, warmup=10, iters=200).median_us:.1f} us, "
          f"graph {bench(fn, warmup=10, iters=200, graph=True).median_us:.1f} us (small tree)")
    label, call = _deft_call(0)
    print(f"eager {bench(call, warmup=10, iters=200).median_us:.1f} us, "
          f"graph {bench(call, warmup=10, iters=200, graph=True).median_us:.1f} us ({label}, one input set)")


def _deft_call(i):
    """(label, call) for deft_attention on row i of the shared-prefix suite, warmed up."""
    from flashtree.bench import suites
    suite = suites.load_suite("shared-prefix")
    params = suite.workloads[i]
    case = suite.setup(params, torch.device("cuda"))
    fn, args = case.providers["flashtree"].fn, case.inputs()
    for _ in range(4):
        fn(*args)
    torch.cuda.synchronize()
    return suite.label(params), lambda: fn(*args)


def deft_kernels(block_m=0):
    """GPU time per kernel of deft_attention on the shared-prefix suite's first two rows (torch.profiler);
    block_m: force the rows per work item (0: the plan's)."""
    from torch.profiler import ProfilerActivity, profile
    from flashtree import deft
    if block_m:
        deft._choose_block_m = lambda *args: block_m
    for i in (0, 1):
        label, call = _deft_call(i)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                call()
            torch.cuda.synchronize()
        print(label)
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total > 0:
                print(f"  {e.key[:60]:60s} {e.count:4d} x {e.device_time_total / e.count:8.1f} us")


def deft_row(i, chunk_len=0, block_m=0):
    """deft_attention on row i of the shared-prefix suite, a few calls (for ncu); optionally with a
    given chunk length and rows per work item (0: the plan's choice)."""
    if not chunk_len and not block_m:
        _deft_call(i)
        return
    from flashtree import deft
    from flashtree.bench.suites import shared_prefix as sp
    cache, n, masks = sp.build_cache(sp.WORKLOADS[i], torch.device("cuda"))
    plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, chunk_len=chunk_len or None,
                          block_m=block_m or None)
    q = torch.randn(plan.num_queries, sp.H, sp.D, device="cuda", dtype=torch.bfloat16)
    fn = lambda: deft.deft_attention(q, cache.k_pools[0], cache.v_pools[0], plan)  # noqa: E731
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    if os.environ.get("DIAG_TIME"):
        from flashtree.bench.timing import bench
        print(f"row {i} chunk_len {plan.chunk_len} block_m {plan.block_m}: graph "
              f"{bench(fn, warmup=5, iters=100, graph=True).median_us:.1f} us", flush=True)


def deft_chunks(i, block_m=0):
    """deft_attention on shared-prefix row I with each chunk length: the plan's choice against the
    rest, for the 64-row kernels and the plan's (or the given) rows per work item."""
    from flashtree import deft
    from flashtree.bench.suites import shared_prefix as sp
    from flashtree.bench.timing import bench
    params = sp.WORKLOADS[i]
    cache, n, masks = sp.build_cache(params, torch.device("cuda"))
    auto_plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks)
    auto = auto_plan.chunk_len
    q = torch.randn(auto_plan.num_queries, sp.H, sp.D, device="cuda", dtype=torch.bfloat16)
    for block_m in sorted({deft.BLOCK_M, block_m or auto_plan.block_m}):  # the 64-row kernels and the plan's
        for length in sorted({256, 384, 512, 640, 768, 1024, 1280, 1536, 1920, 2560, auto}):
            plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, chunk_len=length,
                                  block_m=block_m)
            fn = lambda: deft.deft_attention(q, cache.k_pools[0], cache.v_pools[0], plan)  # noqa: E731
            t = bench(fn, warmup=5, iters=50, graph=True).median_us
            mark = " (plan)" if (length, block_m) == (auto, auto_plan.block_m) else ""
            print(f"{sp._label(params)} block_m {block_m:3d} chunk_len {length:5d}{mark:7s} "
                  f"{plan.num_work:4d} items {plan.num_slots:5d} partial rows  graph {t:7.1f} us", flush=True)


def deft_blockm():
    """Each shared-prefix suite row with the plan's chunk length, 64-row and (on Hopper) 128- and
    192-row work items."""
    from flashtree import deft
    from flashtree.bench.suites import shared_prefix as sp
    from flashtree.bench.timing import bench
    for params in sp.WORKLOADS:
        cache, n, masks = sp.build_cache(params, torch.device("cuda"))
        line = f"{sp._label(params):32s}"
        for block_m in (deft.BLOCK_M, deft.WS_BLOCK_M, getattr(deft, "WS3_BLOCK_M", None)):
            if block_m is None:  # a copy from before the three-consumer kernel
                continue
            plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, block_m=block_m)
            q = torch.randn(plan.num_queries, sp.H, sp.D, device="cuda", dtype=torch.bfloat16)
            fn = lambda: deft.deft_attention(q, cache.k_pools[0], cache.v_pools[0], plan)  # noqa: E731
            line += f"  block_m {block_m:3d} chunk {plan.chunk_len:5d}: {bench(fn, warmup=5, iters=50, graph=True).median_us:6.1f} us"
        print(line, flush=True)


BLOCKM_SWEEP = ([dict(kind="prefix", S=s, b=b, u=u) for s in (1024, 4096, 16384) for b in (4, 16, 48) for u in (32, 400)]
                + [dict(kind="spec", prompt=p, T=t) for p, t in ((1024, 16), (1024, 48), (1024, 96), (1024, 192),
                                                                (4096, 64), (4096, 128))])
BLOCKM_SWEEP_MASKED = [dict(kind="spec", prompt=p, T=t) for p in (2048, 4096, 8192, 16384) for t in (32, 64, 128, 256)]


def deft_blockm_sweep(which=0):
    """64- against 128-row work items (each with its own model's chunk length) over a grid of trees
    beyond the suite's rows (BLOCKM_SWEEP; which = 1: BLOCKM_SWEEP_MASKED, speculative trees under
    longer prompts): graph-replay medians, for the block_m choice, and the plan's own choice."""
    from flashtree import deft
    from flashtree.bench.suites import shared_prefix as sp
    from flashtree.bench.timing import bench
    for params in (BLOCKM_SWEEP, BLOCKM_SWEEP_MASKED)[which]:
        cache, n, masks = sp.build_cache(params, torch.device("cuda"))
        line = " ".join(f"{k}={v}" for k, v in params.items() if k != "kind")
        for block_m in (deft.BLOCK_M, deft.WS_BLOCK_M):
            plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, block_m=block_m)
            q = torch.randn(plan.num_queries, sp.H, sp.D, device="cuda", dtype=torch.bfloat16)
            fn = lambda: deft.deft_attention(q, cache.k_pools[0], cache.v_pools[0], plan)  # noqa: E731
            line += f"  block_m {block_m:3d} chunk {plan.chunk_len:5d}: {bench(fn, warmup=5, iters=30, graph=True).median_us:6.1f} us"
        chosen = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks).block_m
        print(f"{line}  plan: {chosen}", flush=True)


def dfs_fwd():
    """tree_attention forward (graph replay) on the dfs suite's trees: bf16, H = 32, Hkv = 8, D = 128."""
    from flashtree.bench.suites import dfs as suite
    from flashtree.bench.timing import bench
    for params in suite.TREES:
        sq, ek, cu = (x.cuda() for x in suite.packed_arrays(suite.workload_trees(params)))
        n = sq.shape[0]
        q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        fn = lambda: flashtree.tree_attention(q, k, v, cu, sq, ek)  # noqa: E731
        print(f"{suite._label(dict(params, mode='fwd')):40s} graph {bench(fn, warmup=5, iters=30, graph=True).median_us:8.1f} us",
              flush=True)


def dfs_fwd_loop(iters=400):
    """The long dfs tree's forward, eager, back to back as the suite runs it: one event pair per call,
    printed as the median of each block of 20 calls with the wall time, to set beside an nvidia-smi
    log of clocks and power (is the bimodal forward the power cap?)."""
    import time
    from flashtree.bench.suites import dfs as suite
    sq, ek, cu = (x.cuda() for x in suite.packed_arrays(suite.workload_trees(suite.TREES[0])))
    n = sq.shape[0]
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    t0 = time.time()
    for a, b in ev:
        a.record()
        flashtree.tree_attention(q, k, v, cu, sq, ek)
        b.record()
    torch.cuda.synchronize()
    us = [a.elapsed_time(b) * 1e3 for a, b in ev]
    print(f"started {time.strftime('%H:%M:%S', time.localtime(t0))}.{int(t0 * 1000) % 1000:03d}, "
          f"{iters} calls in {time.time() - t0:.3f} s")
    for i in range(0, iters, 20):
        block = sorted(us[i:i + 20])
        print(f"  calls {i:4d}-{i + 19:4d}: median {block[len(block) // 2]:7.1f} min {block[0]:7.1f} max {block[-1]:7.1f} us")
    s_us = sorted(us)
    print(f"all: min {s_us[0]:.1f} p20 {s_us[iters // 5]:.1f} median {s_us[iters // 2]:.1f} p80 {s_us[4 * iters // 5]:.1f} us")


def _dfs_backward_call(params):
    """The backward op alone on a dfs-suite tree (bf16, H = 32, Hkv = 8, D = 128), after one forward:
    a call that returns (dq, dk, dv)."""
    from flashtree import dfs
    from flashtree.bench.suites import dfs as suite
    sq, ek, cu = (x.cuda() for x in suite.packed_arrays(suite.workload_trees(params)))
    n = sq.shape[0]
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    scale = 128 ** -0.5
    o, lse, tiles = dfs._dfs_forward_impl(q, k, v, cu, sq, ek, scale)
    return lambda: dfs._dfs_backward_impl(do, q, k, v, o, lse, None, sq, ek, tiles, scale)


def _captured(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as torch.cuda.graphs requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def dfs_bwd():
    """tree_attention backward alone (graph replay of the backward op on saved forward outputs) on
    the dfs suite's trees, portable kernels vs the Hopper ones, with a max-difference check of the
    two paths' gradients; bf16, H = 32, Hkv = 8, D = 128."""
    from flashtree import dfs
    from flashtree.bench.suites import dfs as suite
    from flashtree.bench.timing import bench
    for params in suite.TREES:
        fn = _dfs_backward_call(params)
        line, grads = f"{suite._label(dict(params, mode='bwd')):40s}", []
        for ws in ((True,) if os.environ.get("DIAG_HOPPER_ONLY") else (False, True)):
            dfs._WGMMA = ws  # read at each call
            grads.append(fn())
            line += f"  {'hopper' if ws else 'portable'} {bench(fn, warmup=3, iters=20, graph=True).median_us:8.1f} us"
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            line += " (" + ", ".join(f"{e.key.split('dfs_bwd_')[-1].split('_kernel')[0]} {e.device_time_total:.0f}"
                                     for e in prof.key_averages() if "dfs_bwd" in e.key) + ")"
        if len(grads) == 2:
            diff = [(a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-6)
                    for a, b in zip(*grads)]
            line += "  rel max diff dq/dk/dv " + " ".join(f"{x:.1e}" for x in diff)
        print(line, flush=True)
    dfs._WGMMA = True


def dfs_bwd_trace(out="."):
    """The long tree's backward as a CUDA graph: 20 replays to warm up, then 5 replays under
    torch.profiler, the chrome trace written to OUT/dfs_bwd_trace.json, and per replay the kernels'
    durations and the gaps between them (is the graph median kernel time?), with the SM clock."""
    import json
    import subprocess
    from flashtree.bench.suites import dfs as suite
    fn = _dfs_backward_call(suite.TREES[0])
    g = _captured(fn)
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    clock = lambda: subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],  # noqa: E731
                                   capture_output=True, text=True).stdout.strip()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    print("clock after:", clock())
    path = f"{out}/dfs_bwd_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    prev_end = None
    for e in kernels:
        gap = "" if prev_end is None else f"  gap {e['ts'] - prev_end:8.1f}"
        print(f"{e['name'][:48]:48s} {e['dur']:9.1f} us{gap}")
        prev_end = e["ts"] + e["dur"]
    if kernels:
        print(f"5 replays: {kernels[-1]['ts'] + kernels[-1]['dur'] - kernels[0]['ts']:.1f} us first kernel start to last end")


def dfs_step(tree=0):
    """One training step of the dfs suite's tree TREE as the suite runs it (eager forward, autograd
    backward): five warm steps, then three under torch.profiler. Per step, every kernel with its
    duration and the gap before it, the kernels' sum against the step's span, and the SM clock and
    power after: where a step's time goes beyond the three big kernels."""
    import subprocess
    from flashtree.bench.suites import dfs as suite
    params = suite.TREES[tree]
    sq, ek, cu = (x.cuda() for x in suite.packed_arrays(suite.workload_trees(params)))
    n = sq.shape[0]
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    step = lambda: torch.autograd.grad(flashtree.tree_attention(q, k, v, cu, sq, ek), (q, k, v), do)  # noqa: E731
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
            torch.cuda.synchronize()
    print(subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip())
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per = len(kernels) // 3
    for s in range(3):
        ks = kernels[s * per:(s + 1) * per]
        prev = None
        for e in ks:
            gap = "" if prev is None else f"  gap {e.time_range.start - prev:7.1f}"
            print(f"  {e.name[:56]:56s} {e.time_range.elapsed_us():8.1f} us{gap}")
            prev = e.time_range.end
        span = ks[-1].time_range.end - ks[0].time_range.start
        print(f"step {s}: {len(ks)} kernels, sum {sum(e.time_range.elapsed_us() for e in ks):.1f} us, span {span:.1f} us")


def dfs_bwd_timing():
    """The long tree's backward as one CUDA graph, timed three ways: flashtree.bench.timing.bench's
    median, one event pair around 20 back-to-back replays, and one event pair per replay (the 20
    values): does per-replay event timing agree with the kernels' sum (dfs_bwd_trace)?"""
    from flashtree.bench.suites import dfs as suite
    from flashtree.bench.timing import bench
    fn = _dfs_backward_call(suite.TREES[0])
    t = bench(fn, warmup=3, iters=20, graph=True)
    print(f"bench graph: median {t.median_us:.1f} min {t.min_us:.1f} p20 {t.p20_us:.1f} p80 {t.p80_us:.1f} us")
    g = _captured(fn)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        g.replay()
    b.record()
    b.synchronize()
    print(f"20 replays, one event pair: {a.elapsed_time(b) * 1e3 / 20:.1f} us per replay")
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for s0, e0 in ev:
        s0.record()
        g.replay()
        e0.record()
    ev[-1][1].synchronize()
    print("per replay:", " ".join(f"{s0.elapsed_time(e0) * 1e3:.0f}" for s0, e0 in ev))
    fn()  # eager: the same, event pairs
    torch.cuda.synchronize()
    for s0, e0 in ev:
        s0.record()
        fn()
        e0.record()
    ev[-1][1].synchronize()
    print("eager per call:", " ".join(f"{s0.elapsed_time(e0) * 1e3:.0f}" for s0, e0 in ev))


def merge(n, s):
    o = torch.randn(n, s, 32, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(n, s, 32, device="cuda")
    for _ in range(4):
        flashtree.merge_states(o, lse)
    torch.cuda.synchronize()


if __name__ == "__main__":
    commands = {"decode": decode, "merge": merge, "variants": variants, "mergevariants": mergevariants,
                "overhead": overhead, "hostprofile": hostprofile, "deft_host": deft_host, "deft_host_parts": deft_host_parts,
                "deft_kernels": deft_kernels, "deft_row": deft_row, "deft_chunks": deft_chunks,
                "deft_blockm": deft_blockm, "deft_blockm_sweep": deft_blockm_sweep, "dfs_fwd": dfs_fwd, "dfs_bwd": dfs_bwd,
                "dfs_bwd_timing": dfs_bwd_timing, "dfs_step": dfs_step, "dfs_fwd_loop": dfs_fwd_loop}
    if sys.argv[1] == "dfs_bwd_trace":  # its argument is a folder
        dfs_bwd_trace(*sys.argv[2:])
    else:
        commands[sys.argv[1]](*map(int, sys.argv[2:]))
