"""Kernel sources: where they are, which files one pulls in, and their content digest."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@functools.cache
def kernels_dir() -> Path:
    """The ``kernels_cu`` folder: inside the installed package, else beside it in a source tree."""
    pkg = Path(__file__).resolve().parent.parent  # .../flashtree
    for candidate in (pkg / "kernels_cu", pkg.parent / "kernels_cu"):
        if (candidate / "common").is_dir():
            return candidate
    raise FileNotFoundError(
        f"flashtree kernel sources not found: looked for {pkg / 'kernels_cu'} and "
        f"{pkg.parent / 'kernels_cu'}; reinstall flashtree"
    )


def include_closure(source_file: str, root: Path | None = None) -> list[Path]:
    """Every file that ``source_file`` pulls in through quoted includes, itself first.

    A quoted include resolves against the including file's folder, then the kernels root,
    as NVRTC does with ``--include-path=<root>``. Angle-bracket includes are not followed:
    kernels use none.
    """
    root = root or kernels_dir()
    seen: list[Path] = []
    stack = [root / source_file]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"kernel source {path} not found")
        seen.append(path)
        for name in _INCLUDE.findall(path.read_text()):
            local = path.parent / name
            stack.append(local if local.is_file() else root / name)
    return seen


def source_digest(source_file: str, root: Path | None = None) -> str:
    """sha256 over the relative path and bytes of every file in the include closure."""
    root = root or kernels_dir()
    h = hashlib.sha256()
    for path in sorted(include_closure(source_file, root)):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()
