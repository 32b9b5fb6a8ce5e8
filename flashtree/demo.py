"""The main job (``python -m flashtree demo``): prove the install on this machine.

On a GPU: check every op against its float64 reference on fresh random inputs, then time it
against its floor. On a CPU-only machine: say so, run the reference path, and compile every
shipped kernel for sm_80 and sm_90 (NVRTC needs no GPU).
"""
from __future__ import annotations

import time

import torch

from . import _jit, merge_states, reference
from .bench.ceilings import measure_copy_bandwidth
from .bench.timing import bench


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check_merge(device: str, dtype: torch.dtype) -> float:
    n, s, h, d = 1031, 5, 8, 128
    o = torch.randn(n, s, h, d, device=device, dtype=dtype)
    lse = torch.randn(n, s, h, device=device) * 4
    lse[::7, 1] = float("-inf")
    out, lse_out = merge_states(o, lse)
    ref, ref_lse = reference.merge_states(o.double(), lse.double())
    err = max(_rel_err(out, ref), _rel_err(lse_out, ref_lse))
    if not err < 1e-2:
        raise SystemExit(f"merge_states {dtype} on {device}: relative error {err:.2e} exceeds 1e-2")
    return err


def _time_merge_gpu() -> None:
    n, s, h, d = 131072, 4, 32, 128
    o = torch.randn(n, s, h, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(n, s, h, device="cuda")
    out = (torch.empty(n, h, d, device="cuda", dtype=torch.bfloat16), torch.empty(n, h, device="cuda"))
    copy_bw = measure_copy_bandwidth()
    ms = bench(lambda: merge_states(o, lse, out=out), iters=20).median_us * 1e-3
    nbytes = o.numel() * 2 + lse.numel() * 4 + out[0].numel() * 2 + out[1].numel() * 4
    floor_ms = nbytes / copy_bw * 1e3
    print(f"merge_states N={n} S={s} H={h} D={d} bf16: {ms * 1e3:.0f} us, {nbytes / ms / 1e6:.0f} GB/s "
          f"= {floor_ms / ms:.0%} of the measured copy bandwidth ({copy_bw / 1e12:.2f} TB/s)")


def run_demo(quick: bool = False) -> int:
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"GPU: {name}. Checking every op against its float64 reference...")
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            print(f"  merge_states {str(dtype)[6:]:<9} rel err {_check_merge('cuda', dtype):.1e}  ok")
        if not quick:
            _time_merge_gpu()
    else:
        print("No CUDA GPU visible: running the CPU reference path and a compile check instead.")
        print(f"  merge_states float32 (reference path) rel err {_check_merge('cpu', torch.float32):.1e}  ok")
        specs = _jit.shipped_specs()
        worst = 0
        for arch in ("sm_80", "sm_90"):
            for spec in specs:
                kernel, _ = _jit.load_or_compile(spec, arch)
                worst = max(worst, kernel.resources.spills)
        print(f"  compiled {len(specs)} kernel specs for sm_80 and sm_90 with NVRTC "
              f"{_jit.nvrtc_version()}: {'no' if worst == 0 else worst} spilled bytes")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0
