"""The wheel: it carries the kernel sources, and an installed copy compiles them from site-packages.

A source tree finds ``kernels_cu/`` beside the package; an installed wheel must find it inside the
package (``flashtree/kernels_cu``). This test builds the wheel, installs it into a second venv and
runs it from a folder with no source tree in sight.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Build outputs, caches and virtual environments: never part of a fresh clone.
JUNK = {".git", "build", "dist", ".whl", "__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints"}

CHECK_INSTALLED = """
import json
import flashtree
from flashtree import _jit
from flashtree._jit.source import kernels_dir

spec = _jit.shipped_specs(["merge"])[0]
kernel, cached = _jit.load_or_compile(spec, "sm_90")
print(json.dumps({
    "file": flashtree.__file__, "kernels_dir": str(kernels_dir()), "spec": spec.name, "cached": cached,
    "registers": kernel.resources.registers, "spills": kernel.resources.spills,
}))
"""


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in JUNK or n.endswith(".egg-info") or (Path(folder, n) / "pyvenv.cfg").exists()}


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _setuptools_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("setuptools")).groups()
    return int(major), int(minor)


@pytest.mark.slow
def test_wheel_ships_the_kernels_and_runs_installed(tmp_path):
    assert _setuptools_version() >= (70, 1), "building the wheel needs setuptools>=70.1: pip install -e '.[test]'"

    # Step 1: build from a clean copy of the tree, so a stale build/ folder cannot leak into the wheel
    # and the checkout is left as it was.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src])
    (wheel,) = wheels.glob("flashtree-*.whl")

    # Step 2: the wheel holds every module and every kernel source, and nothing else of the tree.
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(metadata_name).decode()
    assert "flashtree/kernels_cu/merge.cu" in names
    headers = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "kernels_cu" / "common").glob("*.cuh"))
    assert headers and all(f"flashtree/{h}" in names for h in headers), sorted(names)
    for path in (REPO / "kernels_cu").rglob("*.cu*"):
        assert f"flashtree/{path.relative_to(REPO).as_posix()}" in names, f"{path} is not in the wheel"
    for path in (REPO / "flashtree").rglob("*.py"):
        assert path.relative_to(REPO).as_posix() in names, f"{path} is not in the wheel (a package missing?)"
    assert {n.split("/")[0] for n in names} == {"flashtree", metadata_name.split("/")[0]}
    for extra in ("cu12", "cu13", "test"):
        assert f"Provides-Extra: {extra}" in metadata

    # Step 3: install it into a second venv; torch, numpy and cupy come from this interpreter's
    # site-packages through a .pth file. It appends them to sys.path (so venv2's own flashtree comes
    # first) and to site.PREFIXES, where cuda-pathfinder looks for the NVRTC library's wheel.
    # No PYTHONPATH anywhere: a source tree on it would count as flashtree "already installed".
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FLASHTREE_CACHE_DIR"] = str(tmp_path / "cache")
    venv2 = tmp_path / "venv2"
    _run([sys.executable, "-m", "venv", "--without-pip", venv2], env=env)
    python2 = venv2 / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python2, "install", "--no-deps", "--no-index", wheel], env=env)
    purelib = Path(_run([python2, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip())
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    pth = f"import site; list(map(site.addsitedir, {ours!r})); site.PREFIXES.extend({site.PREFIXES!r})\n"
    (purelib / "deps-of-the-test-runner.pth").write_text(pth)

    # Step 4: from a folder with no source tree, it imports, finds its kernels and compiles one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run([python2, "-c", CHECK_INSTALLED], cwd=elsewhere, env=env)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    installed = (purelib / "flashtree").resolve()
    assert Path(found["file"]).resolve() == installed / "__init__.py"
    assert Path(found["kernels_dir"]).resolve() == installed / "kernels_cu"
    assert venv2.resolve() in installed.parents
    assert found["cached"] is False and found["registers"] > 0 and found["spills"] == 0, found
