"""Tensor maps for the TMA (Hopper's tensor memory accelerator), encoded by the CUDA driver.

A kernel that copies with ``cp.async.bulk.tensor`` takes a 128-byte ``CUtensorMap`` per tensor as
a ``__grid_constant__`` parameter (kernels_cu/common/wgmma.cuh: ``TmaDesc``). The driver's
``cuTensorMapEncodeTiled`` builds it; we call it through ctypes (libcuda is loaded by any CUDA
process already), so no binding package is needed. Maps are cached by the tensor's address,
shape, strides and dtype: every layer's pool gets its map once.
"""
from __future__ import annotations

import ctypes
import functools

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


def row_map(t: torch.Tensor, box_rows: int = 1, box_cols: int = 64) -> bytes:
    """The tensor map of ``t`` (fp16/bf16, rank 2-5, last dim contiguous, other strides 16-byte
    multiples) whose box is ``box_cols`` elements (128 bytes for 64 16-bit values) of ``box_rows``
    consecutive indices of the second-last dim, written to shared memory with the 128-byte
    swizzle; out-of-range coordinates read zeros."""
    return _row_map(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, box_rows, box_cols)


@functools.lru_cache(maxsize=1024)
def _row_map(ptr: int, shape: tuple, strides: tuple, dtype: torch.dtype, box_rows: int, box_cols: int) -> bytes:
    rank, size = len(shape), torch.empty(0, dtype=dtype).element_size()
    dims = (ctypes.c_uint64 * rank)(*reversed(shape))
    byte_strides = (ctypes.c_uint64 * (rank - 1))(*[s * size for s in reversed(strides[:-1])])
    box = (ctypes.c_uint32 * rank)(box_cols, box_rows, *[1] * (rank - 2))
    steps = (ctypes.c_uint32 * rank)(*[1] * rank)
    raw = ctypes.create_string_buffer(128 + 64)  # the map must be 64-byte aligned
    at = ctypes.addressof(raw) + (-ctypes.addressof(raw) % 64)
    err = _encode_tiled()(at, _DATA_TYPES[dtype], rank, ptr, dims, byte_strides, box, steps,
                          _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for shape {shape}, strides {strides}, {dtype}")
    return ctypes.string_at(at, 128)
