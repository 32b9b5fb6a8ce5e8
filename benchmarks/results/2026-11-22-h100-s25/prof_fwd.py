"""Read probe_fwd_profile.diff's clock64 sums (one forward call per tree; the forward's debug buffer
`visited` carries per-CTA sums instead of tile counts). Run with the patched tree first on PYTHONPATH."""
import numpy as np
import torch

import flashtree
from flashtree import dfs
from flashtree.bench.suites import dfs as suite

for params in suite.TREES[:2]:  # the random tree: its buffer (slots x H = 4128 ints) is smaller than 132 x 32
    sq, ek, cu = (x.cuda() for x in suite.packed_arrays(suite.workload_trees(params)))
    n = sq.shape[0]
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        flashtree.tree_attention(q, k, v, cu, sq, ek)
    runs = [dfs.visited_tiles(q, k, v, cu, sq, ek) for _ in range(3)]
    torch.cuda.synchronize()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"== {suite._label(dict(params, mode='fwd'))}: {n} tokens")
    for r, buf in enumerate(runs[:1]):
        a = buf.flatten()[: sms * 32].view(sms, 32).cpu().numpy().astype(np.int64)
        for cw in range(2):
            c = a[:, 8 * cw: 8 * cw + 8]
            tot, item, pre, wait, step, epi, steps, items = (c[:, i] for i in range(8))
            print(f"  run {r} consumer {cw}: total {np.median(tot):9.0f} cyc | next_item wait {np.median(item / tot) * 100:5.1f}% "
                  f"pre {np.median(pre / tot) * 100:4.1f}% stage wait {np.median(wait / tot) * 100:5.1f}% "
                  f"step {np.median(step / tot) * 100:5.1f}% epi {np.median(epi / tot) * 100:4.1f}% | "
                  f"steps {np.median(steps):6.0f} items {np.median(items):4.0f} | per step: "
                  f"step {np.median(step / steps):6.0f} wait {np.median(wait / steps):6.0f} all {np.median(tot / steps):6.0f} cyc")
        p = a[:, 16:22]
        tot, walk, ewait, tiles, trans, its = (p[:, i] for i in range(6))
        print(f"  run {r} producer: total {np.median(tot):9.0f} | walk {np.median(walk / tot) * 100:5.1f}% "
              f"empty wait {np.median(ewait / tot) * 100:5.1f}% item transitions {np.median(trans / tot) * 100:5.1f}% | "
              f"per tile: walk {np.median(walk / tiles):6.0f} empty wait {np.median(ewait / tiles):6.0f} cyc; "
              f"tiles {np.median(tiles):6.0f} items {np.median(its):4.0f}; per item transition {np.median(trans / np.maximum(its, 1)):6.0f}")
