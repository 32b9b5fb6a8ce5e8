"""Runs a suite: for each workload, set up, check every provider, time the right ones, make rows."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .ceilings import Ceilings, floor_us
from .report import Row, add_speedups
from .suite import Case, Provider, Suite, Unavailable
from .timing import bench, input_sets, tensor_bytes

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)  # flushed: progress must show while a long sweep runs


@dataclass
class Options:
    quick: bool = False
    peers: set[str] | None = None  # peers to run besides the subject; None: all
    warmup: int = 10
    iters: int = 100
    graph: bool = False  # time CUDA-graph replays


@dataclass
class RunResult:
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it did not run


def run_suite(suite: Suite, ceilings: Ceilings, device: torch.device, opts: Options, log: Log = _print) -> RunResult:
    result = RunResult()
    workloads = suite.select(quick=opts.quick)
    for i, params in enumerate(workloads, 1):
        label = suite.workload_label(params)
        log(f"[{i}/{len(workloads)}] {suite.name} {label}")
        result.rows += _run_workload(suite, params, label, ceilings, device, opts, result.skipped, log)
        _free_memory(device)
    add_speedups(result.rows, suite.subject)
    return result


def _run_workload(suite, params, label, ceilings, device, opts, skipped, log) -> list[Row]:
    def row(provider: str, status: str, **kw) -> Row:
        return Row(suite=suite.name, workload=label, provider=provider, status=status, params=dict(params),
                   nbytes=case.nbytes, flops=case.flops, floor_us=floor, **kw)

    case = floor = None
    try:
        case = suite.setup(params, device)
        floor = floor_us(case.nbytes, case.flops, ceilings)
        sets = input_sets(case.inputs, device=device)
        expected = case.check.reference(*sets[0]) if case.check else None
    except Exception as e:  # noqa: BLE001 - one broken workload must not end the sweep
        log(f"    setup failed: {_describe(e)}")
        return [Row(suite=suite.name, workload=label, provider="(setup)", status=_status(e), params=dict(params),
                    nbytes=getattr(case, "nbytes", 0), flops=getattr(case, "flops", 0), floor_us=floor or 0.0,
                    detail=_describe(e))]
    log(f"    {len(sets)} input set(s) of {tensor_bytes(sets[0]) / 2**20:.1f} MiB; floor {floor:.1f} us")

    rows = []
    for name in _selected(case, suite.subject, opts.peers):
        provider = case.provider(name)
        if isinstance(provider, Unavailable):
            if name not in skipped:
                skipped[name] = provider.reason
                log(f"    {name}: skipped ({provider.reason})")
            continue
        r = row(name, "ok")
        _run_provider(r, provider, sets, case, expected, opts)
        log(f"    {_progress(r)}")
        rows.append(r)
        _free_memory(device)
    return rows


def _selected(case: Case, subject: str, peers: set[str] | None) -> list[str]:
    """The subject always; the peers named by ``--peers`` (all when None)."""
    return [n for n in case.providers if n == subject or peers is None or n in peers]


def _run_provider(r: Row, provider: Provider, sets, case: Case, expected: Any, opts: Options) -> None:
    """Check, then time; fills ``r`` in place. A wrong provider is not timed."""
    try:
        args = [provider.prepare(*s) for s in sets]
        if case.check is not None:
            # The first call also pays for any JIT compilation, outside the timed region.
            out = provider.normalize(provider.fn(*args[0]))
            verdict = case.check.compare(out, expected)
            del out
            r.detail = verdict.detail
            if not verdict.ok:
                r.status = "wrong"
                return
        t = bench(provider.fn, inputs=args, warmup=opts.warmup, iters=opts.iters, graph=opts.graph)
    except Exception as e:  # noqa: BLE001 - reported in the row; the next provider still runs
        r.status, r.detail = _status(e), _describe(e)
        return
    r.median_us, r.min_us, r.p20_us, r.p80_us = t.median_us, t.min_us, t.p20_us, t.p80_us
    r.iters, r.n_sets, r.graph = t.iters, t.n_sets, t.graph
    r.derive()


def _progress(r: Row) -> str:
    if r.median_us is None:
        return f"{r.provider:<12} {r.status}: {r.detail}"
    return (f"{r.provider:<12} {r.median_us:10.1f} us  {r.gbps:7.0f} GB/s  {r.frac_floor:6.1%} of floor"
            f"  [{r.detail}]")


def _status(e: BaseException) -> str:
    return "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
