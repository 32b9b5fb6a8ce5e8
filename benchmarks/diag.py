"""Kernel-variant exploration on the GPU.

  python benchmarks/diag.py decode B C T [block] [paged]   run one workload a few times (for ncu)
  python benchmarks/diag.py merge N S
  python benchmarks/diag.py variants                        time decode variants on the verify rows
  python benchmarks/diag.py overhead                        eager vs CUDA-graph time: the host's share
  python benchmarks/diag.py hostprofile                     cProfile of the host path of tiny calls
"""
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
        ps = 64
        pages = b * c // ps
        kp = torch.randn(pages, hkv, ps, d, device=dev, dtype=dt)
        vp = torch.randn_like(kp)
        bt = torch.randperm(pages, device=dev, dtype=torch.int32).view(b, c // ps)
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
    from flashtree import decode as dec
    from flashtree.bench.timing import bench
    rows = [(1, 32768, 64), (8, 8192, 64), (32, 2048, 8), (64, 4096, 4), (4, 16384, 63)]
    print(f"{'B,C,T':>14} {'block':>5} {'warp':>4} {'padded us':>10} {'paged us':>10}")
    for b, c, t in rows:
        for block in (64, 128):
            for warp in (32, 64):
                dec._WARP_N_OVERRIDE = warp
                us = []
                for paged in (0, 1):
                    call = decode_call(b, c, t, block, paged)
                    us.append(bench(call, warmup=5, iters=30).median_us)
                    del call
                    torch.cuda.empty_cache()
                print(f"{f'{b},{c},{t}':>14} {block:>5} {warp:>4} {us[0]:>10.1f} {us[1]:>10.1f}", flush=True)
    dec._WARP_N_OVERRIDE = None


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
    import cProfile
    import pstats

    o = torch.randn(8, 2, 32, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(8, 2, 32, device="cuda")
    for name, fn in {"merge": lambda: flashtree.merge_states(o, lse), "decode": decode_call(1, 64, 1)}.items():
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"== {name}: 300 calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def merge(n, s):
    o = torch.randn(n, s, 32, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(n, s, 32, device="cuda")
    for _ in range(4):
        flashtree.merge_states(o, lse)
    torch.cuda.synchronize()


if __name__ == "__main__":
    {"decode": decode, "merge": merge, "variants": variants, "overhead": overhead, "hostprofile": hostprofile}[sys.argv[1]](*map(int, sys.argv[2:]))
