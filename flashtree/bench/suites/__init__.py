"""The registry of benchmark suites: name -> module that defines ``SUITE``.

Adding a suite is one new module in this folder plus one line here. Modules are imported only when
their suite is loaded, so a suite with a heavy or broken import cannot break the others or ``--list``.
"""
from __future__ import annotations

import importlib

from ..suite import Suite

SUITES: dict[str, str] = {
    "dfs": "flashtree.bench.suites.dfs",
    "merge": "flashtree.bench.suites.merge",
    "shared-prefix": "flashtree.bench.suites.shared_prefix",
    "verify": "flashtree.bench.suites.verify",
    "speculative": "flashtree.bench.suites.speculative",
}


def suite_names() -> list[str]:
    return sorted(SUITES)


def load_suite(name: str) -> Suite:
    """Import the suite called ``name``; ValueError for an unknown name."""
    if name not in SUITES:
        raise ValueError(f"suite: expected one of {', '.join(suite_names())}, got {name!r}")
    suite = importlib.import_module(SUITES[name]).SUITE
    if suite.name != name:
        raise ValueError(f"suite: registry name {name!r} and SUITE.name {suite.name!r} differ")
    return suite
