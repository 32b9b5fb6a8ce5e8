"""CPU tests of the benchmark harness (flashtree.bench): registry, CLI, floor, statistics, rotation,
the merge suite's providers and check, the runner's bookkeeping, and the report files."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashtree.bench import report, runner, timing
from flashtree.bench.ceilings import Ceilings, floor_us
from flashtree.bench.report import Row
from flashtree.bench.suite import Case, Check, Provider, Suite, Unavailable, Verdict, grid
from flashtree.bench.suites import load_suite, suite_names
from flashtree.bench.suites import merge as merge_suite

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" makes the no-GPU path real even on a machine with a GPU.
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "flashtree.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


# Registry and CLI ------------------------------------------------------------------------------------


def test_registry_lists_merge_and_loads_it():
    assert "merge" in suite_names()
    suite = load_suite("merge")
    assert suite.name == "merge"
    assert len(suite.workloads) == 9
    quick = suite.select(quick=True)
    assert 0 < len(quick) < len(suite.workloads)
    assert all(w in suite.workloads for w in quick)
    with pytest.raises(ValueError, match="nope"):
        load_suite("nope")


def test_cli_list_names_the_suites():
    p = run_cli("--list")
    assert p.returncode == 0, p.stderr
    assert {"merge", "verify"} <= set(p.stdout.split())


def test_cli_without_gpu_exits_zero_without_timing():
    p = run_cli("merge")
    assert p.returncode == 0, p.stderr
    assert "no CUDA GPU present" in p.stdout
    assert "ceilings" not in p.stdout


def test_cli_rejects_an_unknown_suite():
    p = run_cli("no-such-suite")
    assert p.returncode == 2
    assert "unknown suite" in p.stderr


# Floor, statistics, rotation -------------------------------------------------------------------------


def test_floor_is_the_slower_of_bytes_and_flops():
    c = Ceilings(copy_bytes_per_s=4e12, matmul_flops_per_s=800e12)
    assert floor_us(4e9, 0, c) == pytest.approx(1000.0)  # 4 GB at 4 TB/s
    assert floor_us(4e9, 1.6e12, c) == pytest.approx(2000.0)  # 1.6 TFLOP at 800 TFLOP/s dominates
    assert floor_us(0, 0, c) == 0.0


def test_timing_statistics():
    t = timing.Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0], n_sets=2, graph=False)
    assert (t.min_us, t.median_us, t.iters) == (1.0, 3.0, 5)
    assert t.p20_us == pytest.approx(1.8) and t.p80_us == pytest.approx(4.2)
    assert timing.quantile([7.0], 0.2) == 7.0


def test_rotation_exceeds_the_target_bytes_with_independent_sets():
    assert timing.sets_needed(64 << 20, 100 << 20) == 2
    assert timing.sets_needed(200 << 20, 100 << 20) == 1
    assert timing.sets_needed(0, 100 << 20) == 1
    assert timing.sets_needed(1, 1 << 40) == timing.MAX_INPUT_SETS

    sets = timing.input_sets(lambda: (torch.zeros(256), torch.zeros(0)), rotate_bytes=4096)  # 1 KiB each
    assert len(sets) == 5 and sum(timing.tensor_bytes(s) for s in sets) > 4096
    assert len({s[0].data_ptr() for s in sets}) == 5


def test_tensor_bytes_counts_a_buffer_once():
    x = torch.zeros(1024, dtype=torch.uint8)
    assert timing.tensor_bytes((x, x[:10], {"y": [x.view(2, 512)]})) == 1024


def test_default_labels_name_the_varying_parameters():
    suite = Suite(name="t", description="", workloads=grid(N=[1, 2], S=[3], dtype=["bf16"]), setup=None)
    assert suite.workload_label({"N": 2, "S": 3, "dtype": "bf16"}) == "N=2"


# The merge suite on CPU ------------------------------------------------------------------------------


def small_merge_case(N=37, S=5, H=3, D=8):
    case = merge_suite.setup(dict(N=N, S=S, H=H, D=D, dtype="bfloat16"), torch.device("cpu"))
    inputs = case.inputs()
    return case, inputs, case.check.reference(*inputs)


def test_merge_reference_matches_flashtree_reference():
    from flashtree import reference

    _, (o, lse), (o_ref, lse_ref) = small_merge_case()
    o64, lse64 = reference.merge_states(o.double(), lse.double())
    torch.testing.assert_close(o_ref, o64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_ref, lse64, rtol=1e-12, atol=1e-12)


def test_merge_check_passes_the_torch_peer_and_catches_wrong_outputs():
    case, inputs, expected = small_merge_case()
    o, lse = merge_suite.torch_merge(*inputs)
    assert case.check.compare((o, lse), expected).ok

    o_bad = o.clone()
    o_bad[3, 1, 2] += 0.05 * (1 + o_bad[3, 1, 2].abs())
    assert not case.check.compare((o_bad, lse), expected).ok
    assert not case.check.compare((o, lse + 1e-3), expected).ok
    assert not case.check.compare((o.float(), lse), expected).ok  # wrong dtype
    o_nan = o.clone()
    o_nan[0, 0, 0] = float("nan")
    assert not case.check.compare((o_nan, lse), expected).ok


def test_merge_byte_count():
    # o 4*2*3*5 bf16 + lse 4*2*3 fp32 read; o 4*3*5 bf16 + lse 4*3 fp32 written
    assert merge_suite.merge_bytes(N=4, S=2, H=3, D=5, elem_bytes=2) == 240 + 96 + 120 + 48


def test_flashinfer_adapter_converts_lse_to_base_2_and_back(monkeypatch):
    """A stand-in FlashInfer that works in base 2: the adapter's conversions must make it pass."""

    class FakeFlashInfer:
        @staticmethod
        def merge_states(v, s):
            o, lse = merge_suite.torch_merge(v, s / merge_suite.LOG2E)
            return o, lse * merge_suite.LOG2E

    monkeypatch.setattr(merge_suite, "import_peer", lambda name: FakeFlashInfer)
    case, inputs, expected = small_merge_case()
    p = merge_suite._flashinfer_provider()
    assert case.check.compare(p.normalize(p.fn(*p.prepare(*inputs))), expected).ok
    # Without the conversions the same peer is wrong: the check can fail.
    assert not case.check.compare(p.fn(*inputs), expected).ok


# The runner's bookkeeping (timing stubbed) -----------------------------------------------------------


def stub_suite() -> Suite:
    def setup(params, device):
        n = params["n"]
        return Case(
            inputs=lambda: (torch.arange(n, dtype=torch.float32),),
            providers={
                "flashtree": lambda x: x * 2,
                "slow": lambda x: x + x,
                "wrong": lambda x: x * 3,
                "broken": Provider(fn=lambda x: 1 / 0),
                "missing": Unavailable("import missing failed: ModuleNotFoundError"),
            },
            nbytes=8 * n,
            flops=n,
            check=Check(reference=lambda x: x * 2,
                        compare=lambda out, exp: Verdict(bool(torch.equal(out, exp)), "exact")),
        )

    return Suite(name="stub", description="", workloads=grid(n=[4, 8]), setup=setup)


def fake_bench(times_us):
    def bench(fn, *, inputs, warmup, iters, graph):
        fn(*inputs[0])
        us = times_us[fn(torch.ones(1)).item()]  # tell the providers apart by their output
        return timing.Timing(us, us, us, us, iters, len(inputs), graph)

    return bench


def test_runner_checks_skips_and_derives(monkeypatch):
    monkeypatch.setattr(runner, "bench", fake_bench({2.0: 10.0}))
    lines = []
    ceilings = Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e12)
    result = runner.run_suite(stub_suite(), ceilings, torch.device("cpu"), runner.Options(iters=7), lines.append)

    by = {(r.workload, r.provider): r for r in result.rows}
    assert {r.provider for r in result.rows} == {"flashtree", "slow", "wrong", "broken"}
    assert by["n=4", "wrong"].status == "wrong" and by["n=4", "wrong"].median_us is None
    assert by["n=4", "broken"].status == "error" and "ZeroDivisionError" in by["n=4", "broken"].detail
    ft = by["n=8", "flashtree"]
    assert ft.status == "ok" and ft.median_us == 10.0 and ft.iters == 7
    assert ft.gbps == pytest.approx(64 / 10e-6 / 1e9)
    assert ft.frac_floor == pytest.approx(floor_us(64, 8, ceilings) / 10.0)
    assert by["n=8", "slow"].flashtree_speedup == pytest.approx(1.0)
    assert result.skipped == {"missing": "import missing failed: ModuleNotFoundError"}
    assert sum("missing: skipped" in line for line in lines) == 1  # once, not per workload


def test_runner_peers_filter_keeps_the_subject(monkeypatch):
    monkeypatch.setattr(runner, "bench", fake_bench({2.0: 10.0}))
    opts = runner.Options(peers={"slow"})
    suite = dataclasses.replace(stub_suite(), workloads=grid(n=[4]))
    result = runner.run_suite(suite, Ceilings(1e9, 1e12), torch.device("cpu"), opts, lambda line: None)
    assert [r.provider for r in result.rows] == ["flashtree", "slow"]


# Reports ---------------------------------------------------------------------------------------------


def synthetic_rows() -> list[Row]:
    rows = []
    for n in (4096, 32768):
        for provider, us in (("flashtree", 20.0), ("torch", 80.0), ("flashinfer", None)):
            r = Row(suite="merge", workload=f"N={n} S=2", provider=provider, status="ok" if us else "wrong",
                    nbytes=n * 1000, flops=n * 10, floor_us=15.0, params={"N": n, "S": 2, "dtype": "bfloat16"},
                    median_us=us, detail="" if us else "max|do| 1e-1 (tol 8e-3)")
            r.derive()
            rows.append(r)
    report.add_speedups(rows)
    return rows


def test_speedups_and_derived_columns():
    rows = synthetic_rows()
    torch_row = rows[1]
    assert torch_row.flashtree_speedup == pytest.approx(4.0)
    assert torch_row.frac_floor == pytest.approx(15.0 / 80.0)
    assert rows[2].flashtree_speedup is None and rows[2].gbps is None


def test_csv_json_png_and_table(tmp_path):
    rows = synthetic_rows()
    report.write_csv(rows, tmp_path / "r.csv")
    report.write_json(rows, tmp_path / "r.json", metadata={"gpu": "Fake GPU", "nan": float("nan")},
                      extra={"ceilings": {"copy_bytes_per_s": 4e12}})
    report.write_png(rows, tmp_path / "r.png", title="merge on Fake GPU")

    with open(tmp_path / "r.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 6
    assert lines[1]["provider"] == "torch" and float(lines[1]["flashtree_speedup"]) == pytest.approx(4.0)
    assert lines[0]["N"] == "4096" and lines[0]["dtype"] == "bfloat16"
    assert lines[2]["median_us"] == "" and lines[2]["status"] == "wrong"

    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["metadata"] == {"gpu": "Fake GPU", "nan": None}
    assert doc["ceilings"]["copy_bytes_per_s"] == 4e12
    assert len(doc["rows"]) == 6 and doc["rows"][0]["params"]["N"] == 4096

    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = report.format_table(rows).splitlines()
    assert table[0].split()[:3] == ["workload", "provider", "median"]
    assert len(table) == 7 and "4.00x" in table[2] and "wrong" in table[3]


def test_gpu_path_end_to_end_with_the_gpu_faked(monkeypatch, tmp_path, capsys):
    """cli.run on CPU: the suite, ceilings, metadata and timing are stand-ins; files and table are real."""
    from flashtree.bench import ceilings, cli, metadata
    from flashtree.bench.suites import SUITES

    monkeypatch.setitem(SUITES, "stub", "unused")
    monkeypatch.setattr(cli, "load_suite", lambda name: stub_suite())
    monkeypatch.setattr(cli, "_current_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ceilings, "measure_ceilings", lambda: Ceilings(1e9, 1e12))
    monkeypatch.setattr(metadata, "collect", lambda device: {
        "gpu": "Fake GPU", "sm_count": 1, "l2_bytes": 1 << 20, "torch": torch.__version__,
        "git_commit": None, "date_utc": "2026-11-21T06:12:40+00:00"})
    monkeypatch.setattr(runner, "bench", fake_bench({2.0: 10.0}))

    assert cli.run(cli.parse_args(["stub", "--out", str(tmp_path), "--peers", "slow,wrong"])) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stub.csv", "stub.json", "stub.png"]
    doc = json.loads((tmp_path / "stub.json").read_text())
    assert doc["ceilings"]["copy_bytes_per_s"] == 1e9 and doc["method"]["iters"] == cli.DEFAULT_ITERS
    assert {r["provider"] for r in doc["rows"]} == {"flashtree", "slow", "wrong"}
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("flashtree.bench stub on Fake GPU")
    header = next(i for i, line in enumerate(out) if line.startswith("workload  provider"))
    assert out[header - 2].startswith("wrote") and len(out) - header == 1 + 6 + 2  # table, then 2 notes
    assert out[-1].strip().startswith("n=8 wrong: wrong")


def test_default_output_directory_name():
    from flashtree.bench import cli, metadata

    assert metadata.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert cli._stamp("2026-11-21T06:12:40+00:00") == "2026-11-21T0612Z"
    assert cli.parse_peers("none") == set() and cli.parse_peers("a, b") == {"a", "b"}
    assert cli.parse_peers(None) is None


@pytest.mark.parametrize("script", ["dfs_rounds.py", "energy.py"])
def test_device_scripts_import_and_refuse_without_a_gpu(script):
    # benchmarks/dfs_rounds.py and energy.py run on the GPU machine only; here they must still import
    # (a renamed flashtree function would show) and exit 2 with a message rather than a traceback.
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-P", str(REPO / "benchmarks" / script)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr
