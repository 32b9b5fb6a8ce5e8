"""How much of the Hopper dK/dV kernel's time is its schedule: a list-scheduling model on the CPU.

The kernel launches one CTA per (K tile, KV head) unit in `blockIdx` order (ascending slots, the Hkv
heads of a tile together), one CTA per SM. A unit's time is modelled as ITEM_US per item (Q tile x
query head of the group; 0.78 us per item and SM is the long tree's measured pace, session 26) plus
OVERHEAD_US per CTA (its start and final sums, ~2.5%). The model hands each next unit to the SM that
frees first, for the launch order and for longest-first order, and compares both with the ideal
(total work / SMs) and the longest single unit.

    python3 benchmarks/dkdv_schedule.py [--sms 132]

Session 27: long tree 2228 us in launch order (2217 ideal, +0.5%; measured 2226-2255 in graphs),
longest-first +0.1%: the order is not worth changing. The random tree's time is its root unit's
(402 us of 306 ideal).
"""
from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashtree.bench.suites import dfs as suite  # noqa: E402
from flashtree.dfs import tile_map  # noqa: E402

ITEM_US, OVERHEAD_US = 0.78, 2.2


def unit_items(params: dict) -> list[int]:
    """Visible Q tiles per K tile, in slot order (a sequence's tiles, then its unused slot)."""
    start_q, end_k, cu = suite.packed_arrays(suite.workload_trees(params))
    counts: list[int] = []
    for visited, _ in tile_map(cu, start_q, end_k):
        counts += visited.sum(0).tolist() + [0]
    return counts


def makespan(durations: list[float], sms: int) -> float:
    free = [0.0] * sms
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    a = ap.parse_args()
    for params in suite.TREES:
        durations = [c * suite.G * ITEM_US + OVERHEAD_US for c in unit_items(params) for _ in range(suite.HKV) if c]
        ideal = sum(durations) / a.sms
        launch, lpt = makespan(durations, a.sms), makespan(sorted(durations, reverse=True), a.sms)
        print(f"{suite.SUITE.workload_label(dict(params, mode='bwd')):40s} units {len(durations):5d}  ideal {ideal:7.0f} us  "
              f"launch order {launch:7.0f} (+{100 * (launch / ideal - 1):.1f}%)  longest first {lpt:7.0f} "
              f"(+{100 * (lpt / ideal - 1):.1f}%)  longest unit {max(durations):5.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
