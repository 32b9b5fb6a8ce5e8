"""The one compile path: CUDA C source -> cubin through NVRTC, with no GPU needed.

CI and run time both come through here; the disk cache sits in front (see cache.py).
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass

from .source import kernels_dir
from .spec import KernelSpec


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; the message carries the spec name and the compiler log."""


@dataclass(frozen=True)
class Resources:
    """ptxas's resource report for one kernel (bytes unless named otherwise)."""

    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared: int
    constant: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class CompiledKernel:
    spec_name: str
    arch: str
    lowered_name: str
    cubin: bytes
    resources: Resources
    log: str
    compile_seconds: float

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("cubin")
        return d


def nvrtc_module():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as e:  # pragma: no cover - exercised only without cupy
        raise ImportError(
            "flashtree compiles its CUDA kernels with NVRTC through CuPy, which is not installed: "
            "pip install 'flashtree[cu12]' (CUDA 12) or 'flashtree[cu13]' (CUDA 13)"
        ) from e
    return nvrtc


def nvrtc_version() -> str:
    major, minor = nvrtc_module().getVersion()
    return f"{major}.{minor}"


# Before CUDA 13.3, ptxas may give a register that an asynchronous wgmma still reads to another
# value before the wgmma's wait (NVIDIA's 13.3 release notes). flashtree's dQ kernel with Q and dO
# as register fragments measured wrong at D = 64 with NVRTC 13.0 and right with 13.5
# (benchmarks/NOTES.md, session 10); such kernels are chosen only where this is True.
WGMMA_REGS_SAFE_FROM = (13, 3)


@functools.lru_cache(maxsize=None)
def wgmma_regs_safe() -> bool:
    """Whether this NVRTC's ptxas keeps the registers of an in-flight wgmma (version >= 13.3)."""
    return tuple(nvrtc_module().getVersion()) >= WGMMA_REGS_SAFE_FROM


def nvrtc_options(arch: str) -> list[str]:
    """NVRTC options for one target arch, e.g. ``"sm_90"`` or ``"sm_90a"``."""
    return [
        "--std=c++17",
        f"--gpu-architecture={arch}",
        f"--include-path={kernels_dir()}",
        "-Xptxas=-v",  # the resource report: registers, spills, shared memory
        "-lineinfo",  # source lines for compute-sanitizer and ncu; no effect on the code
    ]


_REPORT = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "shared": re.compile(r"(\d+) bytes smem"),
    "constant": re.compile(r"(\d+) bytes cmem\[0\]"),
}


def parse_resources(log: str, lowered_name: str = "") -> Resources:
    """Read one entry function's report out of the ptxas log (the first one if unnamed)."""
    sections = log.split("Compiling entry function")
    for section in sections[1:]:
        if section.lstrip().startswith(f"'{lowered_name}'"):  # the whole name: k must not match k2
            log = section
            break
    values = {}
    for key, pattern in _REPORT.items():
        m = pattern.search(log)
        values[key] = int(m.group(1)) if m else 0
    return Resources(**values)


def compile_with_nvrtc(spec: KernelSpec, arch: str, source: str) -> CompiledKernel:
    """Compile one spec to a cubin for ``arch``; raise CompileError with the log on failure."""
    nvrtc = nvrtc_module()
    t0 = time.perf_counter()
    prog = nvrtc.createProgram(source, spec.source_file, [], [])
    try:
        nvrtc.addNameExpression(prog, spec.name_expression)
        try:
            nvrtc.compileProgram(prog, nvrtc_options(arch))
        except nvrtc.NVRTCError as e:
            raise CompileError(
                f"NVRTC failed on {spec.name} ({spec.name_expression}) for {arch}:\n"
                f"{nvrtc.getProgramLog(prog)}"
            ) from e
        log = nvrtc.getProgramLog(prog)
        lowered = nvrtc.getLoweredName(prog, spec.name_expression)
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return CompiledKernel(
        spec_name=spec.name,
        arch=arch,
        lowered_name=lowered,
        cubin=bytes(cubin),
        resources=parse_resources(log, lowered),
        log=log,
        compile_seconds=time.perf_counter() - t0,
    )


def ptx_for(spec: KernelSpec, arch: str) -> str:
    """The PTX NVRTC generates for one spec and ``arch``, to read (the cache keeps only cubins)."""
    nvrtc = nvrtc_module()
    source = (kernels_dir() / spec.source_file).read_text()
    prog = nvrtc.createProgram(source, spec.source_file, [], [])
    try:
        nvrtc.addNameExpression(prog, spec.name_expression)
        try:
            nvrtc.compileProgram(prog, nvrtc_options(arch))
        except nvrtc.NVRTCError as e:
            raise CompileError(
                f"NVRTC failed on {spec.name} ({spec.name_expression}) for {arch}:\n"
                f"{nvrtc.getProgramLog(prog)}"
            ) from e
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return bytes(ptx).rstrip(b"\0").decode()
