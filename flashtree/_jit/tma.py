"""Tensor maps for the TMA (Hopper's tensor memory accelerator), encoded by the CUDA driver.

A kernel that copies with ``cp.async.bulk.tensor`` takes a 128-byte ``CUtensorMap`` per tensor as a
``__grid_constant__`` parameter (kernels_cu/common/wgmma.cuh: ``TmaDesc``). The driver's
``cuTensorMapEncodeTiled`` builds it; we call it through ctypes (libcuda is loaded by any CUDA
process already), so no binding package is needed. Maps are cached by the tensor's address, shape,
strides, dtype and box: every layer's tensors get their maps once.
"""
from __future__ import annotations

import ctypes
import functools
import struct

import torch

_DATA_TYPES = {torch.float16: 6, torch.bfloat16: 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZERO = 0
_INTERLEAVE_NONE = 0


@functools.cache
def _encode_tiled():
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def swizzled_map(t: torch.Tensor, box: tuple[int, ...]) -> bytes:
    """The tensor map of ``t`` (fp16/bf16, last dim contiguous, other strides 16-byte multiples) with
    box ``box`` (one extent per dim, innermost first; the innermost 64 elements = 128 bytes at most),
    written to shared memory with the 128-byte swizzle; out-of-range coordinates read zeros."""
    return _map(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, tuple(box))


@functools.lru_cache(maxsize=1024)
def _map(ptr: int, shape: tuple, strides: tuple, dtype: torch.dtype, box: tuple) -> bytes:
    rank, size = len(shape), torch.empty(0, dtype=dtype).element_size()
    dims = (ctypes.c_uint64 * rank)(*reversed(shape))
    byte_strides = (ctypes.c_uint64 * (rank - 1))(*[s * size for s in reversed(strides[:-1])])
    boxes = (ctypes.c_uint32 * rank)(*box)
    steps = (ctypes.c_uint32 * rank)(*[1] * rank)
    raw = ctypes.create_string_buffer(128 + 64)  # the map must be 64-byte aligned
    at = ctypes.addressof(raw) + (-ctypes.addressof(raw) % 64)
    err = _encode_tiled()(at, _DATA_TYPES[dtype], rank, ptr, dims, byte_strides, boxes, steps,
                          _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for shape {shape}, strides {strides}, "
                           f"{dtype}, box {box}")
    return ctypes.string_at(at, 128)


_layouts: dict[int, struct.Struct] = {}


def param_layout(kernel, maps: int, tail: struct.Struct) -> struct.Struct:
    """The parameter buffer of a kernel that takes ``maps`` tensor maps first (128 bytes each,
    64-byte aligned: the compiler may start them past offset 0, so the offset is read from the loaded
    kernel) and then the parameters of ``tail`` (a ``runtime.param_layout``)."""
    layout = _layouts.get(id(kernel))
    if layout is None:
        first = kernel.param_offset(0)
        if first % 8 or kernel.param_offset(maps) != first + 128 * maps:
            raise RuntimeError(f"{kernel.kernel.lowered_name}: unexpected parameter offsets {first}, "
                               f"{kernel.param_offset(maps)}")
        layout = _layouts[id(kernel)] = struct.Struct("<" + "x" * first + "128s" * maps + tail.format[1:])
    return layout
