"""The one timing utility every benchmark uses.

``bench(fn)`` times ``fn`` on the current CUDA stream with CUDA events and returns the median (and min,
p20, p80) of many runs. Three things keep the number honest:

1. Warm-up runs first, so JIT compilation, autotuning and allocator growth are not timed.
2. Inputs rotate. A memory-bound kernel re-run on the same 10 MiB would read it from L2 and look faster
   than it ever is in a model. ``input_sets`` builds enough independent input sets that together they
   exceed twice the L2 cache, and each run uses the next one.
3. Nothing synchronises the host inside the timed loop; one event sync at the end collects the times.

With ``graph=True`` each input set's call is captured once in a ``torch.cuda.CUDAGraph`` and the graph
replays are timed instead: that removes the Python and launch overhead of small ops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

MiB = 1 << 20
FALLBACK_L2_BYTES = 64 * MiB  # when the device does not report its L2 size
MAX_INPUT_SETS = 512  # tiny inputs would need thousands of sets; past this, rotation buys nothing

InputSet = tuple  # positional arguments for one call of the timed function


@dataclass(frozen=True)
class Timing:
    """Statistics of one ``bench`` call, in microseconds."""

    median_us: float
    min_us: float
    p20_us: float
    p80_us: float
    iters: int
    n_sets: int  # input sets rotated through (1 when no inputs were given)
    graph: bool  # timed CUDA-graph replays rather than eager calls

    @classmethod
    def from_samples(cls, samples_us: Sequence[float], *, n_sets: int, graph: bool) -> "Timing":
        s = sorted(samples_us)
        return cls(
            median_us=quantile(s, 0.5),
            min_us=s[0],
            p20_us=quantile(s, 0.2),
            p80_us=quantile(s, 0.8),
            iters=len(s),
            n_sets=n_sets,
            graph=graph,
        )


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted values, interpolating linearly between neighbours."""
    if not sorted_values:
        raise ValueError("quantile: expected at least one value, got none")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def l2_bytes(device: torch.device | int | None = None) -> int:
    """L2 cache size of ``device`` in bytes (64 MiB when it cannot be read)."""
    try:
        size = int(torch.cuda.get_device_properties(device).L2_cache_size)
    except Exception:  # no CUDA, or an old torch without the attribute
        return FALLBACK_L2_BYTES
    return size if size > 0 else FALLBACK_L2_BYTES


def tensor_bytes(obj: Any) -> int:
    """Bytes of all distinct tensors found in ``obj`` (a tensor, or nested tuples/lists/dicts of them)."""
    seen: dict[tuple, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            # Views of one buffer count once: key on the storage, not on the view.
            key = (x.device, x.untyped_storage().data_ptr())
            seen[key] = max(seen.get(key, 0), x.untyped_storage().nbytes())
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(obj)
    return sum(seen.values())


def sets_needed(set_bytes: int, rotate_bytes: int) -> int:
    """How many input sets of ``set_bytes`` each together exceed ``rotate_bytes``."""
    if set_bytes <= 0:
        return 1  # nothing in the set lives in memory; rotating cannot help
    return max(1, min(MAX_INPUT_SETS, rotate_bytes // set_bytes + 1))


def input_sets(
    factory: Callable[[], Any], *, rotate_bytes: int | None = None, device: torch.device | None = None
) -> list[InputSet]:
    """Call ``factory`` until the input sets together exceed ``rotate_bytes`` (default: 2 x L2).

    ``factory()`` returns one fresh input set: a tuple of positional arguments (a lone value is wrapped).
    """
    first = _as_set(factory())
    target = rotate_bytes if rotate_bytes is not None else 2 * l2_bytes(device)
    n = sets_needed(tensor_bytes(first), target)
    return [first] + [_as_set(factory()) for _ in range(n - 1)]


def bench(
    fn: Callable[..., Any],
    *,
    inputs: Callable[[], Any] | Sequence[InputSet] | None = None,
    warmup: int = 10,
    iters: int = 100,
    rotate_bytes: int | None = None,
    graph: bool = False,
) -> Timing:
    """Time ``fn(*input_set)`` with CUDA events; the median and spread of ``iters`` runs after ``warmup``.

    ``inputs`` is either a factory (``input_sets`` is called with ``rotate_bytes``), a ready list of input
    sets (used as given, e.g. shared by several providers), or None (``fn()`` takes no arguments).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench: needs a CUDA device, none is available")
    if iters < 1 or warmup < 0:
        raise ValueError(f"bench: expected iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    sets = _resolve_inputs(inputs, rotate_bytes)
    calls = [functools.partial(fn, *s) for s in sets]
    if graph:
        calls = _capture_graphs(calls, warmup)

    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()  # the timed loop starts on an idle device

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    ends[-1].synchronize()  # the only host sync: after the last run

    samples_us = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return Timing.from_samples(samples_us, n_sets=len(sets), graph=graph)


def _as_set(x: Any) -> InputSet:
    return x if isinstance(x, tuple) else (x,)


def _resolve_inputs(inputs, rotate_bytes: int | None) -> list[InputSet]:
    if inputs is None:
        return [()]
    if callable(inputs):
        return input_sets(inputs, rotate_bytes=rotate_bytes)
    sets = [_as_set(s) for s in inputs]
    if not sets:
        raise ValueError("bench: inputs is an empty list; expected at least one input set")
    return sets


def _capture_graphs(calls: list[Callable[[], Any]], warmup: int) -> list[Callable[[], None]]:
    """One CUDA graph per call; returns their ``replay`` methods.

    The graphs share one memory pool: they replay one after another on one stream, never concurrently,
    so their (discarded) outputs may alias.
    """
    # Warm up on a side stream before capture, as torch.cuda.graphs requires (lazy init, cuBLAS handles).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, min(warmup, 3))):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)

    pool = torch.cuda.graph_pool_handle()
    replays = []
    for call in calls:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            call()
        replays.append(g.replay)
    return replays
