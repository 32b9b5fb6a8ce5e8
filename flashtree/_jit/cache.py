"""The disk cache of compiled kernels.

Location: ``$FLASHTREE_CACHE_DIR``, default ``~/.cache/flashtree``.
Key: sha256 of the source digest (every file pulled in), the name expression, the NVRTC
options, the target arch, the NVRTC version and the flashtree version.
Entry: one file, ``<spec name>.<arch>.<key prefix>.ftk`` = magic, the sha256 of the rest, the
header length, a JSON header (metadata) and the cubin. The checksum covers the header too: a flipped
byte in the lowered name would otherwise load as a valid entry and fail only at launch. Writes go to
a temporary file and are renamed into place, so a reader never sees half an entry and two processes
compiling the same spec both succeed (the last rename wins; either entry is whole and valid).
An entry that fails its checksum is recompiled.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from .nvrtc import CompiledKernel, Resources, compile_with_nvrtc, nvrtc_options, nvrtc_version
from .source import kernels_dir, source_digest
from .spec import KernelSpec

_MAGIC = b"FTK2"


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHTREE_CACHE_DIR") or Path.home() / ".cache" / "flashtree")


def cache_key(spec: KernelSpec, arch: str) -> str:
    from .. import __version__

    fields = {
        "sources": source_digest(spec.source_file),
        "name_expression": spec.name_expression,
        "options": [o for o in nvrtc_options(arch) if not o.startswith("--include-path")],
        "arch": arch,
        "nvrtc": nvrtc_version(),
        "flashtree": __version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def entry_path(spec: KernelSpec, arch: str) -> Path:
    return cache_dir() / f"{spec.name}.{arch}.{cache_key(spec, arch)[:24]}.ftk"


def _encode(kernel: CompiledKernel) -> bytes:
    header = json.dumps(kernel.meta()).encode()
    body = struct.pack("<I", len(header)) + header + kernel.cubin
    return _MAGIC + hashlib.sha256(body).digest() + body


def _decode(blob: bytes) -> CompiledKernel | None:
    """The entry's kernel, or None when the bytes are not a whole, intact entry."""
    body = blob[36:]
    if blob[:4] != _MAGIC or hashlib.sha256(body).digest() != blob[4:36]:
        return None
    try:
        (n,) = struct.unpack("<I", body[:4])
        meta = json.loads(body[4 : 4 + n])
        meta["resources"] = Resources(**meta["resources"])
        return CompiledKernel(cubin=body[4 + n :], **meta)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None


def read_entry(path: Path) -> CompiledKernel | None:
    try:
        return _decode(path.read_bytes())
    except OSError:
        return None


def write_entry(path: Path, kernel: CompiledKernel) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_encode(kernel))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_compile(spec: KernelSpec, arch: str) -> tuple[CompiledKernel, bool]:
    """The compiled kernel for (spec, arch) and whether it came from the disk cache."""
    path = entry_path(spec, arch)
    kernel = read_entry(path)
    if kernel is not None:
        return kernel, True
    source = (kernels_dir() / spec.source_file).read_text()
    kernel = compile_with_nvrtc(spec, arch, source)
    try:
        write_entry(path, kernel)
    except OSError:
        pass  # a read-only cache still lets the process run; it just compiles again next time
    return kernel, False


def entries() -> list[tuple[Path, CompiledKernel | None]]:
    """Every entry in the cache folder, decoded (None where corrupt)."""
    folder = cache_dir()
    if not folder.is_dir():
        return []
    return [(p, read_entry(p)) for p in sorted(folder.glob("*.ftk"))]
