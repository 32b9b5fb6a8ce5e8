"""Argument validation. Every failure names the argument, the expected and the actual value.

These run on real and fake tensors alike (they read only shapes, dtypes, strides and devices),
so they also run while torch.compile traces. Never ``assert`` on user input.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def dtype_in(name: str, x: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if x.dtype not in allowed:
        want = " or ".join(_dtype_name(d) for d in allowed)
        raise TypeError(f"{name}: expected dtype {want}, got {_dtype_name(x.dtype)}")


def same_dtype(name: str, x: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if x.dtype != like.dtype:
        raise TypeError(
            f"{name}: expected dtype {_dtype_name(like.dtype)} (the dtype of {like_name}), "
            f"got {_dtype_name(x.dtype)}"
        )


def ndim(name: str, x: torch.Tensor, n: int, layout: str) -> None:
    if x.dim() != n:
        raise ValueError(f"{name}: expected {n} dimensions {layout}, got shape {tuple(x.shape)}")


def shape(name: str, x: torch.Tensor, expected: Sequence[int | None], layout: str) -> None:
    """``expected`` may hold None for a free size."""
    actual = tuple(x.shape)
    if len(actual) != len(expected) or any(
        e is not None and a != e for a, e in zip(actual, expected)
    ):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {want} {layout}, got {list(actual)}")


def positive(name: str, value: int, what: str) -> None:
    if value < 1:
        raise ValueError(f"{name}: expected {what} >= 1, got {value}")


def one_of(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected device {first.device} (the device of {first_name}), got {t.device}"
            )
    return first.device


def last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got stride {x.stride(-1)}")


def writable_output(name: str, x: torch.Tensor, expected_shape, dtype: torch.dtype, device) -> None:
    is_tensor(name, x)
    shape(name, x, expected_shape, "(preallocated output)")
    if x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {_dtype_name(dtype)}, got {_dtype_name(x.dtype)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device}, got {x.device}")
    last_dim_contiguous(name, x)


def workspace_buffer(name: str, x: torch.Tensor, device, dtype: torch.dtype = torch.float32) -> None:
    """A caller-provided workspace buffer of ``dtype`` (fp32 unless said otherwise): on ``device``,
    contiguous, 16-byte aligned (vector access)."""
    if x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {_dtype_name(dtype)}, got {_dtype_name(x.dtype)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device}, got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {x.stride()}")
    if x.device.type == "cuda" and x.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer, got {x.data_ptr():#x}")


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with 16-byte aligned rows for cp.async / vector loads: a misaligned CUDA view is copied once."""
    if x.device.type == "cuda" and not aligned16(x, range(x.dim() - 1)):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def aligned16(x: torch.Tensor, dims: Sequence[int]) -> bool:
    """Whether every row that starts at the given dims is 16-byte aligned (vector access)."""
    if x.data_ptr() % 16:
        return x.numel() == 0
    return strides16(x, dims)


def strides16(x: torch.Tensor, dims: Sequence[int]) -> bool:
    """Whether the strides of the given dims step in multiples of 16 bytes (or do not step)."""
    size, strides, shape = x.element_size(), x.stride(), x.shape
    return all(strides[d] * size % 16 == 0 or shape[d] == 1 for d in dims)


def softmax_scale(name: str, value, head_dim: int) -> float:
    """The softmax scale as a float: 1 / sqrt(head_dim) for None, else a positive finite number.
    (The kernels fold the scale into exp2 after taking the maximum of the raw scores.)"""
    if value is None:
        return head_dim ** -0.5
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < float("inf"):
        raise ValueError(f"{name}: expected None or a positive finite float, got {value!r}")
    return float(value)


def call_signature(tensors, scalars) -> tuple | None:
    """The key under which an eager CUDA call's validation can be remembered: (shape, strides,
    dtype, device) of each tensor (None stays None) and the scalars; None where the full checks must
    run (tracing, CPU tensors, DLPack arrays, tensor subclasses such as fake tensors). What the key
    does not hold (data pointers, tensor values) the caller still checks on every call."""
    if torch.compiler.is_compiling():
        return None
    key = []
    for x in tensors:
        if x is None:
            key.append(None)
        elif type(x) is torch.Tensor and x.is_cuda:
            key.append((x.shape, x.stride(), x.dtype, x.get_device()))
        else:
            return None
    return (*key, *scalars)


def remember(memo: dict, key, value, limit: int = 4096) -> None:
    """memo[key] = value, keeping the memo of validated call signatures bounded: a process that
    keeps meeting new shapes starts over rather than growing without end."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
