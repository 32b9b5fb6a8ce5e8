"""What a result needs to be reproducible: the device, the software versions, the date and the commit."""
from __future__ import annotations

import datetime as dt
import importlib
import platform
import re
import subprocess
import sys

import torch

PEER_MODULES = ("flashinfer", "triton")  # versions recorded when a suite imported them


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def collect(device: torch.device, now: dt.datetime | None = None) -> dict:
    """Device, versions, date and git commit; entries that cannot be read are None."""
    props = torch.cuda.get_device_properties(device)
    now = now or utc_now()
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": _driver_version(),
        "cuda_torch": torch.version.cuda,
        "torch": torch.__version__,
        "cupy": _attr("cupy", "__version__"),
        "nvrtc": _nvrtc_version(),
        "flashtree": _attr("flashtree", "__version__"),
        "python": platform.python_version(),
        "date_utc": now.isoformat(timespec="seconds"),
        **_git(),
    }


def peer_versions() -> dict:
    """Versions of the peer libraries this process imported (call after the suite ran)."""
    return {m: getattr(sys.modules[m], "__version__", None) for m in PEER_MODULES if m in sys.modules}


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3', for directory names."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "gpu"


def _attr(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - metadata must never stop a run
        return None


def _nvrtc_version() -> str | None:
    try:
        from cupy.cuda import nvrtc

        return ".".join(map(str, nvrtc.getVersion()))
    except Exception:  # noqa: BLE001
        return None


def _driver_version() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _git() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"]) if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _run(cmd: list[str]) -> str | None:
    """stdout of ``cmd`` run in the cwd, or None when it is missing or fails."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None
