"""flashtree benchmarks: one timing utility, measured ceilings, declarative suites, CSV/JSON/PNG reports.

Run ``python -m flashtree.bench --list`` to see the suites and ``python -m flashtree.bench <suite>`` on a
GPU machine to run one. To add a suite, see ``flashtree/bench/suite.py`` (the format) and
``flashtree/bench/suites/merge.py`` (an example).
"""
from .ceilings import Ceilings, floor_us, measure_ceilings
from .suite import Case, Check, Provider, Suite, Unavailable, Verdict, grid
from .timing import Timing, bench, input_sets

__all__ = [
    "Case", "Ceilings", "Check", "Provider", "Suite", "Timing", "Unavailable", "Verdict",
    "bench", "floor_us", "grid", "input_sets", "measure_ceilings",
]
