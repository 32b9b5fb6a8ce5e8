"""Peers: the libraries flashtree is measured against, in the same process.

Optional peers (FlashInfer) may be missing or broken on a machine; a suite asks for them through
``import_peer`` and gets either the module or an ``Unavailable`` with the reason, which the runner prints
once and skips. Adapters shared by several suites (SDPA, FlexAttention, FlashInfer wrappers) belong here.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

from .suite import Unavailable


@functools.cache
def import_peer(module: str) -> ModuleType | Unavailable:
    """``import module``, or ``Unavailable`` saying why it failed (any exception, not only ImportError:
    a wheel built for another CUDA fails with RuntimeError or OSError)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure means "skip this peer", with the reason
        return Unavailable(f"import {module} failed: {type(e).__name__}: {e}")
