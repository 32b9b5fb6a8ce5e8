"""SASS of shipped kernel specialisations, with each loop's instruction mix: what the GPU runs.

    pip install nvidia-cuda-nvdisasm          # nvdisasm, from the package registry
    python benchmarks/sass.py dfs_bwd_dkdv_ws_bf16_d128 [--arch sm_90] [--out DIR]

Compiles the spec with the NVRTC flashtree uses (no GPU needed), writes DIR/NAME.sass and prints, per
loop (a backward branch), its instruction count and most frequent opcodes. A loop over tiles shows
what one step issues per warp next to its wgmma (HGMMA) count: session 20 found the dK/dV kernel's
per-element predicate and descriptor work this way (benchmarks/NOTES.md).

CuPy's getCUBIN drops the image's last byte (a NUL), and nvdisasm then calls the file an invalid ELF:
the byte is put back here (the driver loads either).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashtree import _jit  # noqa: E402
from flashtree._jit import nvrtc  # noqa: E402
from flashtree._jit.source import kernels_dir  # noqa: E402


def nvdisasm_path() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    for sub in ("nvidia/cu13/bin/nvdisasm", "nvidia/cuda_nvdisasm/bin/nvdisasm"):
        p = Path(sysconfig.get_paths()["purelib"]) / sub
        if p.exists():
            return str(p)
    sys.exit("sass.py: no nvdisasm on PATH or in site-packages (pip install nvidia-cuda-nvdisasm)")


def loop_mixes(sass: str, min_len: int = 60):
    """(label, instructions, Counter of opcodes) for every loop of at least min_len instructions."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(2).strip())
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
    for k, text in enumerate(ins):
        m = re.search(r"BRA.*`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), k + 1) <= k and k + 1 - labels[m.group(1)] >= min_len:
            body = ins[labels[m.group(1)]: k + 1]
            ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)
            yield m.group(1), len(body), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="a shipped spec's name (an unknown name lists them)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    specs = {s.name: s for s in _jit.shipped_specs()}
    if args.name not in specs:
        sys.exit("sass.py: unknown spec; shipped: " + " ".join(sorted(specs)))
    spec = specs[args.name]
    target = spec.target(args.arch)
    kernel = nvrtc.compile_with_nvrtc(spec, target, (kernels_dir() / spec.source_file).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cubin = out / f"{spec.name}.cubin"
    cubin.write_bytes(kernel.cubin + b"\0")
    sass = subprocess.run([nvdisasm_path(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    (out / f"{spec.name}.sass").write_text(sass)
    print(f"{spec.name} {target} NVRTC {nvrtc.nvrtc_version()}: {kernel.resources.registers} registers, "
          f"{kernel.resources.spill_stores} B spilled; {out / (spec.name + '.sass')}")
    for label, n, ops in loop_mixes(sass):
        print(f"  loop {label}: {n} instructions, HGMMA {ops['HGMMA']}: "
              + ", ".join(f"{op} {c}" for op, c in ops.most_common(12)))


if __name__ == "__main__":
    main()
