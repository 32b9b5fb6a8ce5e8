"""GPU tests on the kernels that NVRTC 12.9 (what ``flashtree[cu12]`` installs) compiles: the GPU
machine's own NVRTC is 13.0, and ptxas before 13.3 may reuse registers of an in-flight wgmma, so a
kernel can be right under one and wrong under the other (benchmarks/NOTES.md, sessions 10 and 22).

On the CPU machine, with NVRTC 12.9 (compiles every shipped sm_90 / sm_90a specialisation, ~45 s):
    python benchmarks/nvrtc129_cache.py build/cache12
On the GPU machine (carry build/; any kernel missing from the cache fails its test):
    PYTHONPATH=.:benchmarks FLASHTREE_CACHE_DIR=build/cache12 python3 -m pytest -m gpu -p nvrtc129_cache tests/
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def pytest_configure(config):  # the pytest plugin: read the cache as 12.9's, never compile
    import flashtree._jit.cache as cache

    cache.nvrtc_version = lambda: "12.9"

    def miss(spec, arch, source):
        raise RuntimeError(f"cache miss (not compiled by NVRTC 12.9): {spec.name} {arch}")

    cache.compile_with_nvrtc = miss


def main(out: str) -> None:
    os.environ["FLASHTREE_CACHE_DIR"] = str(Path(out).resolve())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flashtree import _jit
    from flashtree._jit.cache import load_or_compile

    if _jit.nvrtc_version() != "12.9":
        sys.exit(f"this NVRTC is {_jit.nvrtc_version()}, not 12.9")
    n = 0
    for spec in _jit.shipped_specs():
        target = spec.target("sm_90")
        if target is not None:
            kernel, _ = load_or_compile(spec, target)
            assert kernel.resources.spills == 0, spec.name
            n += 1
    print(f"{n} specialisations for sm_90 in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/cache12")
