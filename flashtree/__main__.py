"""Command line: ``python -m flashtree {demo,compile,info}``.

demo     the main job: on a GPU, check every op against the reference and time it; on a CPU-only
         machine, say so, run the reference path and compile every kernel.
compile  precompile every shipped kernel spec into the disk cache (no GPU needed).
info     versions, GPU, cache location and entries, the resource report of each cached kernel.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import _jit


def _compile(archs: list[str], families: list[str] | None, max_spills: int | None, match: str | None = None) -> int:
    specs = [s for s in _jit.shipped_specs(families) if match is None or match in s.name]
    if not specs:
        family = f"--family {' '.join(families)} " if families else ""
        print(f"no shipped spec matches {family}--match {match!r} (NVRTC {_jit.nvrtc_version()})", file=sys.stderr)
        return 1
    print(f"compiling {len(specs)} specs for {', '.join(archs)} (NVRTC {_jit.nvrtc_version()}) "
          f"into {_jit.cache_dir()}", flush=True)
    bad = 0
    for arch in archs:
        for spec in specs:
            target = spec.target(arch)
            if target is None:  # an arch-specific kernel of another target (e.g. wgmma: sm_90a only)
                continue
            t0 = time.perf_counter()
            kernel, cached = _jit.load_or_compile(spec, target)
            r = kernel.resources
            flag = ""
            if max_spills is not None and r.spills > max_spills:
                flag, bad = "  SPILLS", bad + 1
            print(f"  {spec.name:<32} {target:<7} {'cached' if cached else f'{time.perf_counter() - t0:5.2f}s':>7}"
                  f"  regs {r.registers:3d}  spill {r.spill_stores}/{r.spill_loads} B  "
                  f"smem {r.shared} B{flag}", flush=True)
    if bad:
        print(f"{bad} kernels spill registers", file=sys.stderr)
    return 1 if bad else 0


def _info() -> int:
    import platform

    import torch

    from . import __version__

    print(f"flashtree {__version__}  python {platform.python_version()}  torch {torch.__version__} "
          f"(CUDA {torch.version.cuda})")
    try:
        versions = _jit.check_toolchain(need_torch_cuda=torch.cuda.is_available())
        print(f"cupy {versions['cupy']} (CUDA runtime {versions['cupy_cuda']})  NVRTC {versions['nvrtc']}")
        if not _jit.wgmma_regs_safe():  # NVRTC < 13.3 (flashtree/_jit/nvrtc.py)
            print("  NVRTC < 13.3: the register-fragment DFS dQ kernel is off (this ptxas can reuse the registers "
                  "of an in-flight wgmma); an nvidia-cuda-nvrtc wheel >= 13.3 found before torch's turns it on "
                  "(README, Install)")
    except (ImportError, RuntimeError) as e:
        print(f"toolchain: {e}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}  {_jit.device_arch(torch.device('cuda', i))}  "
                  f"{p.multi_processor_count} SMs  {p.total_memory / 2**30:.0f} GiB")
    else:
        print("GPU: none visible (CPU tensors use the reference path; kernels still compile)")
    entries = _jit.entries()
    print(f"cache: {_jit.cache_dir()}  ({len(entries)} entries)")
    for path, kernel in entries:
        if kernel is None:
            print(f"  {path.name}: corrupt (will be recompiled)")
            continue
        r = kernel.resources
        print(f"  {kernel.spec_name:<32} {kernel.arch:<7} regs {r.registers:3d}  stack {r.stack_frame} B  "
              f"spill {r.spill_stores}/{r.spill_loads} B  smem {r.shared} B  "
              f"compiled in {kernel.compile_seconds:.2f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashtree", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compile", help="precompile every shipped spec (no GPU needed)")
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="e.g. sm_80 sm_90 sm_90a")
    p.add_argument("--family", nargs="+", default=None, help="only these kernel families")
    p.add_argument("--max-spills", type=int, default=0, help="fail above this many spilled bytes")
    p.add_argument("--match", default=None, help="only specs whose name contains this (none: fails)")
    sub.add_parser("info", help="versions, GPU, cache and resource report")
    p = sub.add_parser("demo", help="the main job: self-check and benchmark (GPU) or reference run (CPU)")
    p.add_argument("--quick", action="store_true", help="a smaller workload")
    args = parser.parse_args(argv)
    if args.cmd == "compile":
        return _compile(args.arch, args.family, args.max_spills, args.match)
    if args.cmd == "info":
        return _info()
    from .demo import run_demo

    return run_demo(quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
