"""``python -m flashtree.bench <suite> [--out DIR] [--quick] [--peers a,b] [--iters N] [--graph]``.

Measures the ceilings, runs the suite, writes ``<suite>.csv``, ``<suite>.json`` and ``<suite>.png`` into
``--out`` (default ``benchmarks/results/<suite>-<gpu>-<date>/``) and prints an aligned table last, since
a remote run often shows only the tail of its output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .suites import SUITES, load_suite, suite_names

RESULTS_ROOT = Path("benchmarks") / "results"
DEFAULT_WARMUP, DEFAULT_ITERS = 10, 100
QUICK_WARMUP, QUICK_ITERS = 3, 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashtree.bench", description="flashtree benchmarks")
    p.add_argument("suite", nargs="?", help=f"one of: {', '.join(suite_names())}")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<suite>-<gpu>-<date>)")
    p.add_argument("--quick", action="store_true", help="a subset of the workloads, fewer iterations")
    p.add_argument("--peers", help="comma-separated peers to run besides flashtree ('none' for none; default all)")
    p.add_argument("--iters", type=int, help=f"timed runs per provider (default {DEFAULT_ITERS}, --quick {QUICK_ITERS})")
    p.add_argument("--warmup", type=int, help=f"untimed runs first (default {DEFAULT_WARMUP}, --quick {QUICK_WARMUP})")
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays (removes launch overhead)")
    args = p.parse_args(argv)
    if not args.list and args.suite is None:
        p.error("a suite is required (or --list)")
    if args.suite is not None and args.suite not in SUITES:
        p.error(f"unknown suite {args.suite!r}; expected one of: {', '.join(suite_names())}")
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters: expected >= 1, got {args.iters}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup: expected >= 0, got {args.warmup}")
    return args


def parse_peers(text: str | None) -> set[str] | None:
    """'a,b' -> {'a', 'b'}; 'none' or '' -> set(); None -> None (all peers)."""
    if text is None:
        return None
    names = {t.strip() for t in text.split(",") if t.strip()}
    return set() if names <= {"none"} else names


def list_suites() -> str:
    lines = []
    for name in suite_names():
        try:
            suite = load_suite(name)
            lines.append(f"{name:<16} {len(suite.workloads):>3} workloads  {suite.description}")
        except Exception as e:  # noqa: BLE001 - one broken suite must not hide the others
            lines.append(f"{name:<16} (cannot load: {type(e).__name__}: {e})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_suites())
        return 0

    import torch

    if not torch.cuda.is_available():
        print(f"flashtree.bench: no CUDA GPU present (torch {torch.__version__}); "
              f"suite {args.suite!r} not timed.")
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The GPU path: ceilings, suite, files, table."""
    from . import metadata
    from .ceilings import measure_ceilings
    from .report import format_table
    from .runner import Options, run_suite

    suite = load_suite(args.suite)
    device = _current_device()
    meta = metadata.collect(device)
    opts = Options(
        quick=args.quick,
        peers=parse_peers(args.peers),
        warmup=args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP),
        iters=args.iters or (QUICK_ITERS if args.quick else DEFAULT_ITERS),
        graph=args.graph,
    )
    say(f"flashtree.bench {suite.name} on {meta['gpu']} ({meta['sm_count']} SMs, "
        f"L2 {(meta['l2_bytes'] or 0) >> 20} MiB), torch {meta['torch']}, "
        f"commit {(meta['git_commit'] or 'unknown')[:10]}")
    ceilings = measure_ceilings()
    say(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (read+write), "
        f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s")

    result = run_suite(suite, ceilings, device, opts)

    meta["peers"] = metadata.peer_versions()
    out = args.out or RESULTS_ROOT / f"{suite.name}-{metadata.gpu_slug(meta['gpu'])}-{_stamp(meta['date_utc'])}"
    paths = write_all(result, suite.name, out, meta, ceilings, opts)
    for p in paths:
        say(f"wrote {p}")
    say("")
    say(format_table(result.rows))
    for r in result.rows:
        if r.status != "ok":
            say(f"  {r.workload} {r.provider}: {r.status}: {r.detail[:160]}")
    for name, reason in result.skipped.items():
        say(f"  {name}: skipped ({reason[:160]})")
    return 0


def write_all(result, suite_name: str, out: Path, meta: dict, ceilings, opts) -> list[Path]:
    from .report import write_csv, write_json, write_png

    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = (out / f"{suite_name}.{ext}" for ext in ("csv", "json", "png"))
    method = {
        "timing": "CUDA events around each call; median of iters runs after warmup; inputs rotated over "
                  "sets that together exceed 2x L2",
        "warmup": opts.warmup, "iters": opts.iters, "graph": opts.graph, "quick": opts.quick,
        "floor": "max(bytes / copy_bytes_per_s, flops / matmul_flops_per_s)",
    }
    write_csv(result.rows, csv_path)
    write_json(result.rows, json_path, metadata=meta,
               extra={"suite": suite_name, "ceilings": ceilings.as_dict(), "method": method,
                      "skipped": result.skipped})
    title = f"{suite_name} on {meta['gpu']}, {meta['date_utc']}, {(meta['git_commit'] or '')[:10]}"
    try:
        write_png(result.rows, png_path, title=title)
    except Exception as e:  # noqa: BLE001 - the numbers are written already; a plot must not lose them
        say(f"plot failed: {type(e).__name__}: {e}")
        return [csv_path, json_path]
    return [csv_path, json_path, png_path]


def _current_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def say(line: str) -> None:
    print(line, flush=True)


def _stamp(iso_date: str) -> str:
    """'2026-11-21T06:12:40+00:00' -> '2026-11-21T0612Z' (no colons: safe in every file system)."""
    return iso_date[:10] + "T" + iso_date[11:13] + iso_date[14:16] + "Z"


if __name__ == "__main__":
    sys.exit(main())
