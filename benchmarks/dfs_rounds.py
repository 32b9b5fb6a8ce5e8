"""Paired rounds of the dfs suite: flashtree against FlexAttention, alternating, in one process.

A suite run times each provider once, one after the other, so the GPU's clock (the power cap moves it
by ~5% over a sustained loop) differs between the two timings, and one run's ratio carries that
drift. Here every workload is timed in R rounds. Each round times both providers with the suite's own
loop (`bench`: 10 warm-up calls, 100 timed, inputs rotated); the order alternates (A B, B A, ...), so
a drift in time favours neither. Each round gives one ratio, FlexAttention's median over flashtree's.

    python3 -P benchmarks/dfs_rounds.py [--rounds 12] [--trees 0,1,2] [--modes fwd,fwd+bwd] [--out DIR]

Both providers are checked against the float64 reference first (the suite's check); a wrong one is
not timed. Output: one line per round, a summary per workload, and `rounds.csv` in DIR.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time

import torch

from flashtree.bench.suites import dfs as suite
from flashtree.bench.timing import bench, input_sets

SUBJECT, PEER = "flashtree", "flex"
TARGET = 1.3


def _clock() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().replace(", ", "/")
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def run_workload(params: dict, rounds: int, device: torch.device, writer) -> list[float]:
    label = suite.SUITE.workload_label(params)
    case = suite.setup(params, device)
    sets = input_sets(case.inputs, device=device)
    expected = case.check.reference(*sets[0])
    calls = {}
    for name in (SUBJECT, PEER):
        provider = case.provider(name)
        args = [provider.prepare(*s) for s in sets]
        verdict = case.check.compare(provider.normalize(provider.fn(*args[0])), expected)
        print(f"{label}: {name} {'ok' if verdict.ok else 'WRONG'} ({verdict.detail})", flush=True)
        if not verdict.ok:
            return []
        calls[name] = (provider.fn, args)
    del expected
    ratios = []
    for r in range(rounds):
        order = (SUBJECT, PEER) if r % 2 == 0 else (PEER, SUBJECT)
        t = {}
        for name in order:
            fn, args = calls[name]
            t[name] = bench(fn, inputs=args)
        ratio = t[PEER].median_us / t[SUBJECT].median_us
        ratios.append(ratio)
        clock = _clock()
        print(f"  round {r + 1:2d} ({order[0]} first): {SUBJECT} {t[SUBJECT].median_us:8.1f} us "
              f"(min {t[SUBJECT].min_us:8.1f})  {PEER} {t[PEER].median_us:8.1f} us (min {t[PEER].min_us:8.1f})"
              f"  {ratio:.4f}x  [sm MHz/W/C after: {clock}]", flush=True)
        writer.writerow([label, r + 1, order[0], f"{t[SUBJECT].median_us:.1f}", f"{t[SUBJECT].min_us:.1f}",
                         f"{t[PEER].median_us:.1f}", f"{t[PEER].min_us:.1f}", f"{ratio:.4f}", clock])
    s = sorted(ratios)
    print(f"{label}: {rounds} rounds, ratio median {statistics.median(s):.4f}x, range {s[0]:.4f}-{s[-1]:.4f}x, "
          f"{sum(x >= TARGET for x in s)} of {rounds} at or above {TARGET}x", flush=True)
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--trees", default="0,1,2", help="indices into the dfs suite's TREES")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--out", default=None, help="folder for rounds.csv")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("dfs_rounds: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    out = open(os.path.join(a.out, "rounds.csv"), "w", newline="") if a.out else open(os.devnull, "w")
    with out:
        writer = csv.writer(out)
        writer.writerow(["workload", "round", "first", "flashtree_median_us", "flashtree_min_us",
                         "flex_median_us", "flex_min_us", "ratio", "sm_mhz/power/temp_after"])
        for i in (int(x) for x in a.trees.split(",")):
            for mode in a.modes.split(","):
                run_workload(dict(suite.TREES[i], mode=mode), a.rounds, device, writer)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
