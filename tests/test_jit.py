"""The compile layer on a CPU-only machine: NVRTC needs no GPU.

Every shipped kernel compiles for sm_80 and sm_90 without spills (CI's proof that the kernels
build), the cache key follows every source file pulled in, the disk cache survives corruption and
concurrent writers, the command line works, and a missing or mismatched CuPy fails clearly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import flashtree
from flashtree import _jit
from flashtree._jit import cache, nvrtc, runtime, source

ARCHS = ("sm_80", "sm_90")
# The most shared memory one block may use (static + dynamic, opt-in above 48 KB): A100, H100.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
PACKAGE_PARENT = Path(flashtree.__file__).resolve().parents[1]  # what `import flashtree` resolved to
MERGE_SPECS = _jit.shipped_specs(["merge"])
MERGE_SPEC = MERGE_SPECS[0]
KERNEL_NAME = MERGE_SPEC.kernel.split("::")[-1]  # appears in the lowered name

# A kernel that must spill (1024 threads x 2 blocks per SM cap it at 32 registers while it keeps
# kLive accumulators alive) and a second entry function with static shared memory, so one ptxas
# log holds two different reports.
SPILL_CU = """\
namespace ft {
template <int kLive>
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* __restrict__ x, float* y, int n) {
  float acc[kLive];
#pragma unroll
  for (int i = 0; i < kLive; ++i) acc[i] = x[i * 1024 + threadIdx.x];
  for (int k = 0; k < n; ++k) {
#pragma unroll
    for (int i = 0; i < kLive; ++i) acc[i] = acc[i] * acc[(i + 1) % kLive] + x[k];
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kLive; ++i) s += acc[i];
  y[threadIdx.x] = s;
}
}  // namespace ft
extern "C" __global__ void smem_kernel(const float* x, float* y) {
  __shared__ float buf[4096];
  for (int i = threadIdx.x; i < 4096; i += blockDim.x) buf[i] = x[i];
  __syncthreads();
  y[threadIdx.x] = buf[4095 - threadIdx.x];
}
"""
SPILL_SPEC = _jit.KernelSpec(family="spill", kernel="ft::spill_kernel", template_args=(64,), name="spill_f32_l64")


@pytest.fixture
def cache_tmp(tmp_path, monkeypatch) -> Path:
    """A fresh, empty disk cache for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FLASHTREE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def shipped_cache(tmp_path_factory) -> Path:
    """One fresh cache for this session's compile of every shipped spec (the demo reuses it)."""
    return tmp_path_factory.mktemp("shipped-cache")


@pytest.fixture
def kernels_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of kernels_cu/ that the compile layer reads instead of the real one.

    ``kernels_dir`` is functools.cache'd and imported by name, so each module's attribute is patched.
    """
    root = tmp_path / "kernels_cu"
    shutil.copytree(source.kernels_dir(), root)
    for module in (source, cache, nvrtc):
        monkeypatch.setattr(module, "kernels_dir", lambda: root)
    return root


def subprocess_env(**extra: str) -> dict:
    """The environment for a child Python that imports the same flashtree as this process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_flashtree(*args: str, cache_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashtree", *args], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(FLASHTREE_CACHE_DIR=str(cache_dir)), cwd=cache_dir.parent,
    )


# ---------------------------------------------------------------- every shipped kernel compiles


def _spec_arch_params():
    return [pytest.param(spec, arch, id=f"{spec.name}-{arch}") for spec in _jit.shipped_specs() for arch in ARCHS
            if spec.target(arch) is not None]


def test_every_family_ships_uniquely_named_specs_with_sources():
    assert "merge" in _jit._shipped
    for family in sorted(_jit._shipped):
        specs = _jit.shipped_specs([family])
        assert specs, f"family {family} ships no specs"
        for spec in specs:
            assert (source.kernels_dir() / spec.source_file).is_file(), spec
    specs = _jit.shipped_specs()
    assert len({s.name for s in specs}) == len(specs)  # names key cache files and test ids


@pytest.mark.parametrize("spec, arch", _spec_arch_params())
def test_shipped_spec_compiles_without_spills(spec, arch, shipped_cache, monkeypatch):
    monkeypatch.setenv("FLASHTREE_CACHE_DIR", str(shipped_cache))
    target = spec.target(arch)
    kernel, cached = _jit.load_or_compile(spec, target)
    assert not cached  # a fresh cache: this really ran NVRTC
    r = kernel.resources
    assert kernel.cubin[:4] == b"\x7fELF" and kernel.arch == target
    assert kernel.spec_name == spec.name and spec.kernel.split("::")[-1] in kernel.lowered_name
    assert "Used" in kernel.log and r.registers > 0, f"no ptxas report was read:\n{kernel.log}"
    assert r.spills == 0, f"{spec.name} on {target} spills {r.spill_stores}/{r.spill_loads} B:\n{kernel.log}"
    # A stack frame without spills is an array ptxas put in local memory: a register array indexed at
    # run time (session 25: a reference to one of two accumulators chosen at run time cost 6%).
    assert r.stack_frame == 0, f"{spec.name} on {target} has a {r.stack_frame} B stack frame:\n{kernel.log}"
    # Static shared memory only; dynamic shared memory is checked by each op at launch.
    assert r.shared < SMEM_LIMIT[arch], f"{spec.name} on {target}: {r.shared} B of shared memory"


# ---------------------------------------------------------------- cache key


def test_cache_key_ignores_where_the_sources_live(kernels_copy, monkeypatch):
    # the same bytes in another folder (e.g. an installed wheel) give the same key
    copied = cache.cache_key(MERGE_SPEC, "sm_90")
    monkeypatch.undo()
    assert cache.cache_key(MERGE_SPEC, "sm_90") == copied


def test_cache_key_follows_an_included_header(kernels_copy):
    header = kernels_copy / "common" / "state.cuh"
    assert header in source.include_closure(MERGE_SPEC.source_file)  # the edit below must matter
    before = cache.cache_key(MERGE_SPEC, "sm_90")
    original = header.read_bytes()
    header.write_bytes(original + b"\n// an edit of an included header, not of merge.cu\n")
    edited = cache.cache_key(MERGE_SPEC, "sm_90")
    assert edited != before
    header.write_bytes(original)
    assert cache.cache_key(MERGE_SPEC, "sm_90") == before  # content, not mtime


def test_cache_key_ignores_unrelated_files_and_mtimes(kernels_copy):
    before = cache.cache_key(MERGE_SPEC, "sm_90")
    (kernels_copy / "unrelated.cu").write_text("// another family\n")
    (kernels_copy / "common" / "unrelated.cuh").write_text("#pragma once\n")
    os.utime(kernels_copy / "merge.cu", (1, 1))
    assert cache.cache_key(MERGE_SPEC, "sm_90") == before


def test_cache_key_follows_arch_options_spec_and_versions(monkeypatch):
    base = cache.cache_key(MERGE_SPEC, "sm_90")
    keys = {base, cache.cache_key(MERGE_SPEC, "sm_80"), cache.cache_key(MERGE_SPEC, "sm_90a")}
    keys.add(cache.cache_key(MERGE_SPECS[1], "sm_90"))
    assert len(keys) == 4
    assert cache.cache_key(MERGE_SPEC, "sm_90") == base  # deterministic

    original_options = cache.nvrtc_options
    monkeypatch.setattr(cache, "nvrtc_options", lambda arch: original_options(arch) + ["--use_fast_math"])
    assert cache.cache_key(MERGE_SPEC, "sm_90") not in keys
    monkeypatch.undo()
    monkeypatch.setattr(cache, "nvrtc_version", lambda: "99.9")
    assert cache.cache_key(MERGE_SPEC, "sm_90") not in keys
    monkeypatch.undo()
    monkeypatch.setattr(flashtree, "__version__", "99.0.0")
    assert cache.cache_key(MERGE_SPEC, "sm_90") not in keys


def test_an_edited_header_is_recompiled(kernels_copy, cache_tmp):
    _, cached = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    assert not cached
    assert _jit.load_or_compile(MERGE_SPEC, "sm_90")[1]
    header = kernels_copy / "common" / "state.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    _, cached = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    assert not cached
    assert len(list(cache_tmp.glob("*.ftk"))) == 2


# ---------------------------------------------------------------- include closure


def test_include_closure_of_merge_finds_its_headers():
    root = source.kernels_dir()
    closure = source.include_closure("merge.cu")
    assert closure[0] == root / "merge.cu"
    assert {root / "common" / "types.cuh", root / "common" / "state.cuh"} <= set(closure)
    assert len(set(closure)) == len(closure)
    for path in closure:
        assert path.is_file() and path.resolve().is_relative_to(root.resolve())
        for name in source._INCLUDE.findall(path.read_text()):
            assert path.parent / name in closure or root / name in closure


def test_include_closure_resolves_local_first_and_survives_cycles(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "k.cu").write_text('#include "common/a.cuh"\n  #  include "common/b.cuh"\n#include <cstdint>\n')
    (tmp_path / "common" / "a.cuh").write_text('#include "b.cuh"\n')  # beside a.cuh
    (tmp_path / "common" / "b.cuh").write_text('#include "common/a.cuh"\n')  # a cycle, from the root
    (tmp_path / "b.cuh").write_text("// must not be picked: common/b.cuh is beside a.cuh\n")
    closure = source.include_closure("k.cu", tmp_path)
    assert closure[0] == tmp_path / "k.cu"
    assert set(closure) == {tmp_path / "k.cu", tmp_path / "common" / "a.cuh", tmp_path / "common" / "b.cuh"}


@pytest.mark.parametrize("where", ["kernel", "header"])
def test_include_closure_missing_include_raises(tmp_path, where):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "ok.cuh").write_text('#include "common/nope.cuh"\n' if where == "header" else "")
    (tmp_path / "k.cu").write_text('#include "common/ok.cuh"\n' + ('#include "nope.cuh"\n' if where == "kernel" else ""))
    with pytest.raises(FileNotFoundError, match="nope.cuh"):
        source.include_closure("k.cu", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.cuh"):
        source.source_digest("k.cu", tmp_path)


def test_missing_kernel_source_raises(kernels_copy):
    spec = _jit.KernelSpec(family="nosuchfamily", kernel="ft::k", template_args=(), name="nosuch")
    with pytest.raises(FileNotFoundError, match="nosuchfamily.cu"):
        cache.cache_key(spec, "sm_90")


# ---------------------------------------------------------------- disk cache


def test_second_load_comes_from_the_cache(cache_tmp):
    first, cached = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    assert not cached
    second, cached = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    assert cached
    assert second.cubin == first.cubin and second.lowered_name == first.lowered_name
    assert second.resources == first.resources and second.log == first.log
    (path, decoded), = _jit.entries()
    assert path == cache.entry_path(MERGE_SPEC, "sm_90") and decoded == first
    assert path.name.startswith(f"{MERGE_SPEC.name}.sm_90.")


def _truncate(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _flip(position):
    def corrupt(b: bytes) -> bytes:
        i = position(b)
        return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]
    return corrupt


CORRUPTIONS = {
    "empty": lambda b: b"",
    "truncated": _truncate,
    "truncated-by-one": lambda b: b[:-1],
    "garbage": lambda b: os.urandom(len(b)),
    "magic-flipped": _flip(lambda b: 1),
    "checksum-flipped": _flip(lambda b: 10),
    "length-flipped": _flip(lambda b: 37),
    # a byte of the lowered name in the JSON header: still valid JSON, but it names no function
    "header-flipped": _flip(lambda b: b.index(KERNEL_NAME.encode()) + 2),
    "cubin-flipped": _flip(lambda b: len(b) - 100),
    "appended": lambda b: b + b"\0",
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_recompiled_and_rewritten(cache_tmp, corrupt):
    good, _ = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    path = cache.entry_path(MERGE_SPEC, "sm_90")
    path.write_bytes(corrupt(path.read_bytes()))
    assert cache.read_entry(path) is None
    assert [k for _, k in _jit.entries()] == [None]  # `flashtree info` shows it as corrupt

    again, cached = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    assert not cached
    # the same kernel (not the same bytes: NVRTC's internal symbol names vary between compiles)
    assert again.lowered_name == good.lowered_name and again.resources == good.resources
    assert cache.read_entry(path) == again  # rewritten
    assert _jit.load_or_compile(MERGE_SPEC, "sm_90")[1]
    assert not list(cache_tmp.glob("*.tmp"))


def test_writes_leave_no_temporary_files(cache_tmp, monkeypatch):
    for spec in MERGE_SPECS[:4]:
        _jit.load_or_compile(spec, "sm_90")
    assert len(list(cache_tmp.glob("*.ftk"))) == 4
    assert sorted(p.suffix for p in cache_tmp.iterdir()) == [".ftk"] * 4

    # a write interrupted half way leaves neither a temporary file nor an entry
    kernel, _ = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    target = cache_tmp / "interrupted.ftk"

    def interrupted(kernel):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.write_entry(target, kernel)
    assert not target.exists() and not list(cache_tmp.glob("*.tmp"))


def test_an_unwritable_cache_still_compiles(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FLASHTREE_CACHE_DIR", str(blocker / "cache"))
    kernel, cached = _jit.load_or_compile(MERGE_SPEC, "sm_90")
    assert not cached and kernel.resources.registers > 0
    assert _jit.entries() == []


CONCURRENT_CHILD = """
import hashlib, json, sys, time
from pathlib import Path
import torch, flashtree
from flashtree._jit import cache

# Hold every compile for a moment, so that both processes miss the cache and both write.
compile_with_nvrtc = cache.compile_with_nvrtc
def slow_compile(*args):
    kernel = compile_with_nvrtc(*args)
    time.sleep(1.0)
    return kernel
cache.compile_with_nvrtc = slow_compile

folder = Path(sys.argv[1])
(folder / f"ready-{sys.argv[2]}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
kernel, cached = cache.load_or_compile(flashtree._jit.shipped_specs(["merge"])[0], "sm_90")
print(json.dumps({"cached": cached, "cubin": hashlib.sha256(kernel.cubin).hexdigest()}))
"""


def test_two_processes_compiling_into_one_empty_cache(tmp_path):
    folder = tmp_path / "sync"
    folder.mkdir()
    cache_dir = tmp_path / "cache"
    env = subprocess_env(FLASHTREE_CACHE_DIR=str(cache_dir))
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, str(folder), str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (folder / "go").touch()  # both start together
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["cached"] for r in results] == [False, False]  # both really compiled and wrote
    (entry,) = cache_dir.iterdir()
    kernel = cache.read_entry(entry)
    assert kernel is not None and entry.suffix == ".ftk"
    # NVRTC's internal symbol names vary between compiles, so the two cubins may differ in those
    # names: the entry is one of them, whole.
    assert hashlib.sha256(kernel.cubin).hexdigest() in {r["cubin"] for r in results}


# ---------------------------------------------------------------- ptxas resource report

SAMPLE_LOG = """\
ptxas info    : 32 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelILi1EEvv_wide' for 'sm_90'
ptxas info    : Function properties for _Z6kernelILi1EEvv_wide
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]
ptxas info    : Compile time = 1.234 ms
ptxas info    : Compiling entry function '_Z6kernelILi1EEvv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelILi1EEvv
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 49152 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 5.678 ms
"""


def test_parse_resources_picks_the_named_entry():
    first = nvrtc.Resources(registers=40, stack_frame=8, spill_stores=4, spill_loads=12, shared=1024, constant=368)
    second = nvrtc.Resources(registers=128, stack_frame=0, spill_stores=0, spill_loads=0, shared=49152, constant=400)
    # the second entry's name is a prefix of the first's: only the whole name may match
    assert nvrtc.parse_resources(SAMPLE_LOG, "_Z6kernelILi1EEvv") == second
    assert nvrtc.parse_resources(SAMPLE_LOG, "_Z6kernelILi1EEvv_wide") == first
    assert nvrtc.parse_resources(SAMPLE_LOG) == first
    assert first.spills == 16 and second.spills == 0


def test_parse_resources_of_a_real_two_kernel_log():
    kernel = nvrtc.compile_with_nvrtc(SPILL_SPEC, "sm_90", SPILL_CU)
    assert kernel.log.count("Compiling entry function") == 2 and "smem_kernel" in kernel.log
    r = kernel.resources
    assert r.spill_stores > 0 and r.spill_loads > 0 and r.registers <= 32
    assert r.shared == 0  # the 16 KB belong to smem_kernel, the other entry
    other = nvrtc.parse_resources(kernel.log, "smem_kernel")
    assert other.shared == 4096 * 4 and other.spills == 0


def test_compile_error_names_the_spec_and_carries_the_log():
    with pytest.raises(_jit.CompileError, match=r"(?s)spill_f32_l64.*sm_90.*error"):
        nvrtc.compile_with_nvrtc(SPILL_SPEC, "sm_90", SPILL_CU.replace("float s = 0.f;", "float s = undeclared;"))


def test_ptx_for_gives_the_kernels_ptx():
    ptx = nvrtc.ptx_for(MERGE_SPEC, "sm_90")
    assert ".target sm_90" in ptx and ".entry" in ptx and KERNEL_NAME in ptx
    assert "\0" not in ptx


# ---------------------------------------------------------------- command line


def test_cli_compile_then_info(tmp_path, shipped_cache):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    specs = MERGE_SPECS
    # the sm_80 entries the compile tests made (if they ran) are served from the cache; sm_90 compiles
    seeded = set()
    for spec in specs:
        for entry in shipped_cache.glob(f"{spec.name}.sm_80.*.ftk"):
            shutil.copy(entry, cache_dir)
            seeded.add((spec.name, "sm_80"))
    done = run_flashtree("compile", "--arch", "sm_80", "sm_90", "--family", "merge", cache_dir=cache_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"compiling {len(specs)} specs for sm_80, sm_90")
    for spec in specs:
        for arch in ARCHS:
            (line,) = [ln for ln in lines if ln.split()[:2] == [spec.name, arch]]
            assert "spill 0/0 B" in line and "regs" in line and "SPILLS" not in line
            assert (line.split()[2] == "cached") == ((spec.name, arch) in seeded), line
    assert len(list(cache_dir.glob("*.ftk"))) == 2 * len(specs)

    (cache_dir / "broken.sm_90.0.ftk").write_bytes(b"FTK2 not an entry")
    info = run_flashtree("info", cache_dir=cache_dir)
    assert info.returncode == 0, info.stdout + info.stderr
    assert f"cache: {cache_dir}  ({2 * len(specs) + 1} entries)" in info.stdout
    assert "broken.sm_90.0.ftk: corrupt" in info.stdout
    for spec in specs:
        for arch in ARCHS:
            (line,) = [ln for ln in info.stdout.splitlines() if ln.split()[:2] == [spec.name, arch]]
            assert "regs" in line and "spill 0/0 B" in line


def test_cli_compile_fails_on_spills(kernels_copy, cache_tmp, monkeypatch, capsys):
    from flashtree.__main__ import main

    (kernels_copy / "spill.cu").write_text(SPILL_CU)
    monkeypatch.setitem(_jit._shipped, "spill", lambda: [SPILL_SPEC])
    assert main(["compile", "--arch", "sm_90", "--family", "spill"]) == 1
    out, err = capsys.readouterr()
    assert "SPILLS" in out and "1 kernels spill registers" in err
    assert main(["compile", "--arch", "sm_90", "--family", "spill", "--max-spills", "100000"]) == 0


def test_cli_compile_match(kernels_copy, cache_tmp, monkeypatch, capsys):
    from flashtree.__main__ import main

    (kernels_copy / "spill.cu").write_text(SPILL_CU)
    monkeypatch.setitem(_jit._shipped, "spill", lambda: [SPILL_SPEC])
    assert main(["compile", "--arch", "sm_90", "--family", "spill", "--match", SPILL_SPEC.name, "--max-spills", "100000"]) == 0
    assert main(["compile", "--arch", "sm_90", "--family", "spill", "--match", "no such spec"]) == 1
    out, err = capsys.readouterr()
    assert out.count(SPILL_SPEC.name) == 1 and "no shipped spec matches" in err


def test_cli_demo_on_this_machine(shipped_cache):
    # the cache the compile tests above filled: the demo's own compile check then reads it
    done = run_flashtree("demo", cache_dir=shipped_cache, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    if torch.cuda.is_available():
        assert "GPU:" in done.stdout
    else:
        assert "No CUDA GPU visible" in done.stdout
        assert f"compiled {len(_jit.shipped_specs())} kernel specs for sm_80 and sm_90" in done.stdout
        assert "no spilled bytes" in done.stdout
    assert "demo finished" in done.stdout


# ---------------------------------------------------------------- toolchain checks


@pytest.fixture
def fresh_toolchain_check():
    runtime.check_toolchain.cache_clear()
    yield runtime.check_toolchain
    runtime.check_toolchain.cache_clear()


def _fake_toolchain(monkeypatch, *, nvrtc_major: int, cupy_major: int, torch_cuda: str | None):
    fake_cupy = types.SimpleNamespace(
        __version__="0.0-fake",
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(runtimeGetVersion=lambda: cupy_major * 1000 + 20)),
    )
    fake_nvrtc = types.SimpleNamespace(getVersion=lambda: (nvrtc_major, 4))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(runtime, "nvrtc_module", lambda: fake_nvrtc)
    monkeypatch.setattr(runtime, "_installed_cupy_dists", lambda: [f"cupy-cuda{cupy_major}x"])
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)


def test_check_toolchain_names_the_three_disagreeing_majors(fresh_toolchain_check, monkeypatch):
    _fake_toolchain(monkeypatch, nvrtc_major=12, cupy_major=13, torch_cuda="11.8")
    with pytest.raises(RuntimeError, match=r"cupy CUDA 13, NVRTC CUDA 12, torch CUDA 11\).*extra that matches torch"):
        fresh_toolchain_check()


def test_check_toolchain_torch_alone_disagreeing(fresh_toolchain_check, monkeypatch):
    _fake_toolchain(monkeypatch, nvrtc_major=12, cupy_major=12, torch_cuda="13.0")
    with pytest.raises(RuntimeError, match=r"cupy CUDA 12, NVRTC CUDA 12, torch CUDA 13.*flashtree\[cu13\]"):
        fresh_toolchain_check()
    fresh_toolchain_check.cache_clear()
    assert fresh_toolchain_check(need_torch_cuda=False)["nvrtc"] == "12.4"  # compile-only use is fine


def test_check_toolchain_agreeing_majors(fresh_toolchain_check, monkeypatch):
    _fake_toolchain(monkeypatch, nvrtc_major=12, cupy_major=12, torch_cuda="12.8")
    assert fresh_toolchain_check() == {"cupy": "0.0-fake", "cupy_cuda": "12.2", "nvrtc": "12.4", "torch_cuda": "12.8"}


def test_check_toolchain_several_cupy_packages(fresh_toolchain_check, monkeypatch):
    monkeypatch.setattr(runtime, "_installed_cupy_dists", lambda: ["cupy-cuda12x", "cupy-cuda13x"])
    with pytest.raises(RuntimeError, match="several CuPy packages.*cupy-cuda12x, cupy-cuda13x"):
        fresh_toolchain_check()


def test_check_toolchain_of_this_machine(fresh_toolchain_check):
    versions = fresh_toolchain_check(need_torch_cuda=torch.cuda.is_available())
    assert versions["nvrtc"] == _jit.nvrtc_version()
    assert versions["nvrtc"].split(".")[0] == versions["cupy_cuda"].split(".")[0]


WITHOUT_CUPY = """
import sys
sys.modules["cupy"] = None  # as if CuPy were not installed: `import cupy` raises ImportError
sys.modules["cupy_backends"] = None
import torch, flashtree
from flashtree import _jit

# CPU tensors need no CuPy
o, lse = torch.randn(5, 3, 2, 64, dtype=torch.float64), torch.randn(5, 3, 2)
out, lse_out = flashtree.merge_states(o.float(), lse)
ref, ref_lse = flashtree.reference.merge_states(o, lse.double())
torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(lse_out.double(), ref_lse, rtol=1e-5, atol=1e-5)
print("cpu ok")

# every CUDA op gets its kernel here; the toolchain check comes before anything touches a GPU
spec = _jit.shipped_specs(["merge"])[0]
for name, call in [("get_kernel", lambda: _jit.get_kernel(spec, torch.device("cuda", 0))),
                   ("load_or_compile", lambda: _jit.load_or_compile(spec, "sm_90"))]:
    try:
        call()
    except ImportError as e:
        print(f"{name}: ImportError: {e}")
    else:
        print(f"{name}: no error")
"""


def test_without_cupy_cuda_ops_say_how_to_install_and_cpu_works(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_CUPY], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(FLASHTREE_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "cpu ok"
    hint = "pip install 'flashtree[cu12]' (CUDA 12) or 'flashtree[cu13]' (CUDA 13)"
    assert lines[1].startswith("get_kernel: ImportError:") and hint in lines[1]
    assert "CPU tensors work without it" in lines[1]
    assert lines[2].startswith("load_or_compile: ImportError:") and hint in lines[2]
    assert not (tmp_path / "cache").exists()


def test_pdl_launch_config_matches_cuda_h_layout():
    """The programmatic-dependent launch packs CUlaunchConfig by hand (one struct call per launch):
    its offsets must be those of cuda.h's struct, mirrored here with ctypes' C layout rules."""
    import ctypes

    class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, pad[4], a 64-byte union
        _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]

    class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
        _fields_ = [(n, ctypes.c_uint) for n in ("gx", "gy", "gz", "bx", "by", "bz", "smem")] + [
            ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)), ("num_attrs", ctypes.c_uint)]

    assert runtime._LAUNCH_CONFIG.size == ctypes.sizeof(LaunchConfig) == 56
    assert ctypes.sizeof(LaunchAttribute) == 72
    buffer, address = runtime._pdl_config()
    assert address == ctypes.addressof(buffer) and len(buffer) >= 56 + 72
    runtime._LAUNCH_CONFIG.pack_into(buffer, 0, 3, 5, 7, 128, 2, 1, 4096, 0xABC0, address + 56, 1)
    config = LaunchConfig.from_buffer(buffer)
    assert (config.gx, config.gy, config.gz, config.bx, config.by, config.bz, config.smem) == (3, 5, 7, 128, 2, 1, 4096)
    assert config.stream == 0xABC0 and config.num_attrs == 1
    attr = config.attrs[0]
    assert ctypes.addressof(attr) == address + 56
    assert attr.id == runtime._CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert int.from_bytes(attr.value[:4], "little") == 1  # programmaticStreamSerializationAllowed
