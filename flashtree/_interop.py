"""Arrays from other libraries cross into torch zero-copy through DLPack (e.g. CuPy arrays)."""
from __future__ import annotations

import torch


def as_tensor(name: str, x):
    """``x`` as a torch.Tensor, sharing memory; TypeError naming ``name`` when impossible."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    raise TypeError(f"{name}: expected a torch.Tensor or a DLPack array, got {type(x).__name__}")


def is_foreign(x) -> bool:
    return not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__")


def like(template, t: torch.Tensor):
    """Hand ``t`` back as the caller's kind of array: a CuPy array if ``template`` was one."""
    if is_foreign(template) and type(template).__module__.startswith("cupy"):
        import cupy

        return cupy.from_dlpack(t)
    return t
