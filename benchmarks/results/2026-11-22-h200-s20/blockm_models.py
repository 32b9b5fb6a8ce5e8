"""Session 20's block_m data against the two chunk models (CPU): for every tree of call 3's
`deft_blockm_sweep` and `deft_blockm` lines, the measured 64- and 128-row graph medians, the 64-row
plan's modelled cost P (deft._chunk_model), the 128-row makespan W (deft._ws_chunk_model), P / W,
whether the tree has tail masks, and the block_m deft_plan now picks.

    PYTHONPATH=.:benchmarks python benchmarks/results/2026-11-22-h200-s20/blockm_models.py
"""
import re
from pathlib import Path

import diag
from flashtree import deft
from flashtree.bench.suites import shared_prefix as sp

deft.use_wgmma = lambda device: True  # plan as on Hopper
seen = {}
choose = deft._choose_block_m


def spy(tokens, group, hkv, num_sms, ws_model=None):
    seen["args"] = (tokens, group, hkv, num_sms)
    return choose(tokens, group, hkv, num_sms, ws_model)


deft._choose_block_m = spy
log = (Path(__file__).parent / "call3_tests_ab_sanitizers_blockm_sweep.log").read_text()
lines = re.findall(r"^(\S.*?)\s+block_m  64 chunk\s+\d+:\s+([\d.]+) us  block_m 128 chunk\s+\d+:\s+([\d.]+) us", log, re.M)
for params, (label, t64, t128) in zip(list(diag.BLOCKM_SWEEP) + list(sp.WORKLOADS), lines, strict=True):
    cache, n, masks = sp.build_cache(params, "cpu")
    plan = deft.deft_plan(cache, sp.H, queries_per_leaf=n, tail_masks=masks, num_sms=132)
    tokens, group, hkv, num_sms = seen["args"]
    p = deft._chunk_model(tokens[:, 1], tokens[:, 2], group, hkv, num_sms)[0]
    w = deft._ws_chunk_model(tokens[:, 1], tokens[:, 2], group, hkv, num_sms)[0]
    print(f"{label.strip()[:30]:32s} 64: {float(t64):5.1f} us  128: {float(t128):5.1f} us  P {p:6.0f}  W {w:5.1f}  "
          f"P/W {p / w:5.1f}  masked {int((tokens[:, 3] >= 0).any())}  picks {plan.block_m}")
