# In one process (so the host's speed is the same for both): eager and graph medians of
# deft_attention on the shared-prefix suite's two prefix rows, with stage 2 as a dependent launch
# (deft._PDL = True) and as a plain launch, alternating, four rounds.
import torch
from flashtree import deft
from flashtree.bench import suites
from flashtree.bench.timing import bench
suite = suites.load_suite("shared-prefix")
cases = []
for i in (0, 1):
    params = suite.workloads[i]
    case = suite.setup(params, torch.device("cuda"))
    cases.append((suite.label(params), case.providers["flashtree"].fn, [case.inputs() for _ in range(3)]))
for r in range(4):
    for pdl in (True, False):
        deft._PDL = pdl
        out = []
        for label, fn, sets in cases:
            e = bench(fn, inputs=sets, warmup=20, iters=300)
            g = bench(fn, inputs=sets, warmup=10, iters=300, graph=True)
            out.append(f"{label}: eager {e.median_us:.1f} (p20 {e.p20_us:.1f}) graph {g.median_us:.1f}")
        print(f"round {r} pdl={int(pdl)} | " + " | ".join(out), flush=True)
