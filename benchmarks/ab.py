"""A/B timing of flashtree builds: the same suite rows, timed with the suite's own inputs and timer.

    python benchmarks/ab.py LABEL SUITE:ROWS[:PROVIDERS] ...     e.g.  verify:0,1,4  shared-prefix:0,1:flashtree

Imports whichever flashtree is first on PYTHONPATH, so a driver can alternate two source trees
(``benchmarks/gpu_ab.sh``) on one machine; prints one line per (row, provider):
    LABEL  suite  row label  provider  median us  p20 us  p80 us
"""
from __future__ import annotations

import sys

import torch

from flashtree.bench import suites
from flashtree.bench.timing import bench, input_sets


def main(label: str, specs: list[str]) -> None:
    device = torch.device("cuda")
    import flashtree
    print(f"{label:8s} flashtree from {flashtree.__file__}", flush=True)
    for spec in specs:
        name, rows, *rest = spec.split(":")
        suite = suites.load_suite(name)
        wanted = rest[0].split(",") if rest else ["flashtree"]
        for i in map(int, rows.split(",")):
            params = suite.workloads[i]
            case = suite.setup(params, device)
            sets = input_sets(case.inputs, device=device)
            for provider in wanted:
                p = case.providers[provider]
                args = [p.prepare(*s) for s in sets]
                t = bench(p.fn, inputs=args, warmup=10, iters=100)
                print(f"{label:8s} {name:14s} {suite.label(params):28s} {provider:16s} "
                      f"{t.median_us:9.1f} {t.p20_us:9.1f} {t.p80_us:9.1f}", flush=True)
                del args
            del case, sets
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
