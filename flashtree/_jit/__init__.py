"""The compile layer: KernelSpec -> NVRTC -> disk cache -> loaded function -> launch.

It knows nothing about attention. Op modules describe their specialisations with
``KernelSpec`` and register the ones they ship with ``register_shipped`` so that
``python -m flashtree compile`` and CI can build every one of them without a GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from .cache import cache_dir, entries, load_or_compile
from .nvrtc import CompileError, CompiledKernel, Resources, nvrtc_version, wgmma_regs_safe
from .runtime import (check_toolchain, compiled, current_stream, device_arch, device_properties, get_kernel, num_sms,
                      param_layout)
from .spec import KernelSpec, ctype, short

_shipped: dict[str, Callable[[], Iterable[KernelSpec]]] = {}


def register_shipped(family: str, specs: Callable[[], Iterable[KernelSpec]]) -> None:
    """Declare the specs an op family ships (built by ``flashtree compile`` and CI).

    Op modules call this at import; ``import flashtree`` imports them all.
    """
    _shipped[family] = specs


def shipped_specs(families: Iterable[str] | None = None) -> list[KernelSpec]:
    names = sorted(_shipped) if families is None else list(families)
    return [spec for name in names for spec in _shipped[name]()]


__all__ = [
    "CompileError",
    "CompiledKernel",
    "KernelSpec",
    "Resources",
    "cache_dir",
    "check_toolchain",
    "compiled",
    "ctype",
    "device_arch",
    "device_properties",
    "entries",
    "get_kernel",
    "load_or_compile",
    "num_sms",
    "nvrtc_version",
    "wgmma_regs_safe",
    "param_layout",
    "register_shipped",
    "short",
    "shipped_specs",
]
