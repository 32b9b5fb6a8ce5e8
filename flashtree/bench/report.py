"""Rows of results and the files they become: CSV, JSON (with metadata), a PNG, and a printed table.

One row per (workload, provider). Derived columns:
- ``gbps`` and ``tflops``: the workload's bytes and flops over the median time;
- ``frac_floor``: floor time / median time (1.0 = at the hardware ceiling);
- ``flashtree_speedup``: this provider's median / flashtree's median (> 1: flashtree is faster).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from .suite import SUBJECT


@dataclass
class Row:
    suite: str
    workload: str
    provider: str
    status: str  # "ok" (timed), "wrong" (failed its check, not timed), "error", "oom"
    nbytes: int
    flops: int
    floor_us: float
    params: dict = field(default_factory=dict)
    median_us: float | None = None
    min_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    iters: int | None = None
    n_sets: int | None = None
    graph: bool | None = None
    gbps: float | None = None
    tflops: float | None = None
    frac_floor: float | None = None
    flashtree_speedup: float | None = None
    detail: str = ""  # the check's verdict, or the error

    def derive(self) -> None:
        """Fill the rate columns from the median time."""
        if self.median_us is None or self.median_us <= 0:
            return
        seconds = self.median_us * 1e-6
        self.gbps = self.nbytes / seconds / 1e9
        self.tflops = self.flops / seconds / 1e12
        self.frac_floor = self.floor_us / self.median_us


def add_speedups(rows: Sequence[Row], subject: str = SUBJECT) -> None:
    """Set ``flashtree_speedup`` on every timed row of a workload where the subject was timed too."""
    subject_us = {(r.suite, r.workload): r.median_us for r in rows if r.provider == subject and r.median_us}
    for r in rows:
        base = subject_us.get((r.suite, r.workload))
        if base and r.median_us:
            r.flashtree_speedup = r.median_us / base


# Files ---------------------------------------------------------------------------------------------

_FIXED_COLUMNS = [f.name for f in fields(Row) if f.name not in ("params", "detail")]


def _param_columns(rows: Sequence[Row]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [k for k in r.params if k not in names]
    return names


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per row; each workload parameter gets its own column (prefixed if a name is taken)."""
    params = _param_columns(rows)
    param_col = {k: (f"param_{k}" if k in _FIXED_COLUMNS or k == "detail" else k) for k in params}
    header = _FIXED_COLUMNS[:3] + [param_col[k] for k in params] + _FIXED_COLUMNS[3:] + ["detail"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            line = {k: v for k, v in asdict(r).items() if k != "params"}
            line.update({param_col[k]: v for k, v in r.params.items()})
            w.writerow({k: ("" if v is None else v) for k, v in line.items()})


def write_json(rows: Sequence[Row], path: Path, *, metadata: dict, extra: dict | None = None) -> None:
    """``{"metadata": ..., **extra, "rows": [...]}``; non-finite floats are written as null."""
    doc = {"metadata": metadata, **(extra or {}), "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(_finite(doc), indent=1, sort_keys=False) + "\n")


def write_png(rows: Sequence[Row], path: Path, *, title: str) -> None:
    """Grouped bars per workload and provider: fraction of floor (top) and median time (bottom, log)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the GPU machine
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    by_cell = {(r.workload, r.provider): r for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, (ax_floor, ax_time) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(workloads) + 2), 7.5), sharex=True)
    for i, p in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(workloads))]
        cells = [by_cell.get((w, p)) for w in workloads]
        timed = [r if r is not None and r.median_us else None for r in cells]
        ax_floor.bar(xs, [100 * r.frac_floor if r else math.nan for r in timed], width, label=p)
        ax_time.bar(xs, [r.median_us if r else math.nan for r in timed], width, label=p)
        for x, r in zip(xs, cells):  # say why a bar is missing rather than leave a silent gap
            if r is not None and not r.median_us:
                ax_floor.text(x, 2, r.status, rotation=90, ha="center", va="bottom", fontsize="small")
    ax_floor.set_ylabel("% of floor (higher is better)")
    ax_floor.axhline(100, color="black", linewidth=0.8)
    ax_floor.legend(fontsize="small")
    ax_floor.set_title(title, fontsize="medium")
    ax_time.set_ylabel("median time (us, log)")
    if any(r.median_us for r in rows):
        ax_time.set_yscale("log")
    ax_time.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right", fontsize="small")
    ax_time.set_xlim(-0.5, len(workloads) - 0.5)  # room for every group, labelled or not
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# Table ---------------------------------------------------------------------------------------------

_TABLE = [  # (header, format of the cell)
    ("workload", None),
    ("provider", None),
    ("median us", "{:.1f}"),
    ("GB/s", "{:.0f}"),
    ("TFLOP/s", "{:.2f}"),
    ("floor us", "{:.1f}"),
    ("of floor", "{:.0%}"),
    ("ft speedup", "{:.2f}x"),
    ("status", None),
]


def format_table(rows: Sequence[Row]) -> str:
    """An aligned text table, one line per row; the workload is written once per group."""
    lines, prev = [], None
    for r in rows:
        values = [r.workload if r.workload != prev else "", r.provider, r.median_us, r.gbps, r.tflops,
                  r.floor_us, r.frac_floor, r.flashtree_speedup if r.provider != SUBJECT else None, r.status]
        lines.append([_cell(v, fmt) for v, (_, fmt) in zip(values, _TABLE)])
        prev = r.workload
    header = [h for h, _ in _TABLE]
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]

    def fmt_line(cells):
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if fmt is None else c.rjust(w)
                         for c, w, (_, fmt) in zip(cells, widths, _TABLE)).rstrip()

    return "\n".join([fmt_line(header)] + [fmt_line(c) for c in lines])


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    return fmt.format(value) if fmt else str(value)
