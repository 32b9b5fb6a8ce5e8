# A/B timing of deft_attention on the shared-prefix suite's rows: eager and graph medians of the whole call.
import sys, torch
sys.path.insert(0, sys.argv[1])
from flashtree.bench import suites
from flashtree.bench.timing import bench
suite = suites.load_suite("shared-prefix")
out = []
for i in (0, 1):
    params = suite.workloads[i]
    case = suite.setup(params, torch.device("cuda"))
    fn = case.providers["flashtree"].fn
    sets = [case.inputs() for _ in range(3)]
    e = bench(fn, inputs=sets, warmup=20, iters=300)
    g = bench(fn, inputs=sets, warmup=10, iters=300, graph=True)
    out.append(f"{suite.label(params)}: eager {e.median_us:.1f} (p20 {e.p20_us:.1f}) graph {g.median_us:.1f} (p20 {g.p20_us:.1f}) us")
print(" | ".join(out), flush=True)
