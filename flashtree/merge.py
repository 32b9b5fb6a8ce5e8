"""`merge_states` and `merge_state`: the log-sum-exp merge of partial attention states.

Three thin layers: the kernel launch (`launch`), the registered torch ops (so torch.compile
and CUDA graphs see an opaque, allocation-free call), and the public functions.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from . import _checks, _interop, _jit, reference

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROW_THREADS = 256  # threads per block ~ rows per block * threads per row


@functools.lru_cache(maxsize=None)
def _geometry(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(threads per row, rows per block): each thread owns 16 bytes of a row's head_dim."""
    lanes = head_dim * torch.finfo(dtype).bits // 8 // 16
    return lanes, max(1, _ROW_THREADS // lanes)


@functools.lru_cache(maxsize=None)  # called on every launch: build each spec once
def spec(dtype: torch.dtype, head_dim: int, out_dtype: torch.dtype | None = None) -> _jit.KernelSpec:
    """The merge kernel for o in ``dtype`` written out in ``out_dtype`` (default: the same)."""
    out_dtype = out_dtype or dtype
    _, rows = _geometry(dtype, head_dim)
    out_name = "" if out_dtype == dtype else f"_to_{_jit.short(out_dtype)}"
    return _jit.KernelSpec(
        family="merge",
        kernel="ft::merge_states_kernel",
        template_args=(_jit.ctype(dtype), _jit.ctype(out_dtype), head_dim, rows),
        name=f"merge_{_jit.short(dtype)}{out_name}_d{head_dim}",
    )


_jit.register_shipped("merge", lambda: [spec(dt, d) for dt in DTYPES for d in HEAD_DIMS])


def launch(o, lse, o_out, lse_out, *, fresh_out: bool = False) -> None:
    """Launch the merge kernel on tensors already validated (any N/S/H strides, D contiguous).

    o_out may be in a 16-bit dtype while o is fp32: split-KV decode combines its fp32 partials
    straight into the output this way. ``fresh_out``: o_out was just allocated (aligned).
    """
    n, s, h, d = o.shape
    if n * h == 0:
        return
    if not _checks.aligned16(o, (0, 1, 2)):
        o = o.clone(memory_format=torch.contiguous_format)  # vector loads need 16-byte rows
    if not fresh_out and not _checks.aligned16(o_out, (0, 1)):
        raise ValueError("out[0]: expected 16-byte aligned rows (data_ptr and strides), got a misaligned view")
    launch_raw(o.device, o.dtype, o_out.dtype, (n, s, h, d),
               o.data_ptr(), o.stride()[:3], lse.data_ptr(), lse.stride(),
               o_out.data_ptr(), o_out.stride()[:2], lse_out.data_ptr(), lse_out.stride())


_BLOCKS_PER_SM_THREADS = 1536  # merge.cu's __launch_bounds__: 1536 threads per SM
_MAX_WAVES_OVERRIDE: int | None = 0  # exploration (benchmarks/diag.py); 0 = the rule below


def _max_waves(blocks: int, num_states: int, resident: int) -> int | None:
    """Grid cap in waves of resident blocks, or None for one block per ROWS rows. Measured on an
    H200 (benchmarks/NOTES.md, session 3): capping at 2 waves gains 5% at S >= 4 when the full grid
    is a few waves (the partial last wave is a large share), and loses 2-4% on long grids and S = 2."""
    if _MAX_WAVES_OVERRIDE != 0:
        return _MAX_WAVES_OVERRIDE
    return 2 if num_states >= 4 and blocks < 16 * resident else None

# merge_states_kernel(o, lse, o_out, lse_out, num_rows, num_heads, num_states, 10 x int64 strides)
_PARAMS = _jit.param_layout("QQQQ iii qqq qqq qq qq")


def launch_raw(device, dtype, out_dtype, shape, o_ptr, o_strides, lse_ptr, lse_strides,
               out_ptr, out_strides, out_lse_ptr, out_lse_strides) -> None:
    """The launch itself, from raw pointers and element strides (aligned, validated by the caller):
    decode's combine step calls it on its workspace without building tensor views."""
    n, s, h, d = shape
    kernel = _jit.get_kernel(spec(dtype, d, out_dtype), device)
    lanes, rows = _geometry(dtype, d)
    blocks = (n * h + rows - 1) // rows
    resident = _jit.num_sms(device) * (_BLOCKS_PER_SM_THREADS // (rows * lanes))  # blocks per wave
    waves = _max_waves(blocks, s, resident)
    if waves is not None:  # blocks stride over the rows: no partial last wave, no relaunches
        blocks = min(blocks, waves * resident)
    kernel.launch(
        (blocks, 1, 1), (rows * lanes, 1, 1), _PARAMS,
        (o_ptr, lse_ptr, out_ptr, out_lse_ptr, n * h, h, s,
         *o_strides, *lse_strides, *out_strides, *out_lse_strides),
    )


def _merge_into(o, lse, o_out, lse_out) -> None:
    if o.device.type == "cuda" and o.dtype in DTYPES:
        launch(o, lse, o_out, lse_out)
    else:  # CPU tensors, and float64 anywhere: the exact reference
        ref_o, ref_lse = reference.merge_states(o, lse)
        o_out.copy_(ref_o)
        lse_out.copy_(ref_lse)


def _merge_states_impl(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, d = o.shape
    o_out = o.new_empty(n, h, d)
    lse_out = lse.new_empty(n, h)
    _merge_into(o, lse, o_out, lse_out)
    return o_out, lse_out


def _plain_cuda_call(o, lse) -> bool:
    """The common eager call, recognised in ~1 us: plain CUDA tensors that pass every check of
    ``_check`` (anything else takes the full path, which names what is wrong)."""
    return (type(o) is torch.Tensor and type(lse) is torch.Tensor and o.is_cuda and o.dim() == 4
            and o.dtype in DTYPES and lse.dtype == torch.float32 and o.shape[1] >= 1
            and o.shape[3] in HEAD_DIMS and lse.shape == o.shape[:3] and lse.device == o.device
            and o.stride(3) == 1 and not torch.compiler.is_compiling())


_merge_states_op = torch.library.custom_op("flashtree::merge_states", _merge_states_impl, mutates_args=())


@_merge_states_op.register_fake
def _(o, lse):
    n, _, h, d = o.shape
    return o.new_empty(n, h, d), lse.new_empty(n, h)


def _merge_states_out_impl(o: torch.Tensor, lse: torch.Tensor, o_out: torch.Tensor, lse_out: torch.Tensor) -> None:
    _merge_into(o, lse, o_out, lse_out)


_merge_states_out_op = torch.library.custom_op(
    "flashtree::merge_states_out", _merge_states_out_impl, mutates_args=("o_out", "lse_out"))


@_merge_states_out_op.register_fake
def _(o, lse, o_out, lse_out):
    return None


def _check(o, lse, out):
    _checks.is_tensor("o", o)
    _checks.is_tensor("lse", lse)
    _checks.ndim("o", o, 4, "[N, S, H, D]")
    _checks.dtype_in("o", o, DTYPES + (torch.float64,))
    n, s, h, d = o.shape
    _checks.positive("o", s, "S (dim 1, the number of partial states)")
    if o.device.type == "cuda" and o.dtype != torch.float64:
        _checks.one_of("o.shape[-1] (head_dim)", d, HEAD_DIMS)
    _checks.dtype_in("lse", lse, (torch.float32,))
    _checks.shape("lse", lse, (n, s, h), "[N, S, H] (o is [N, S, H, D])")
    _checks.same_device(o=o, lse=lse)
    _checks.last_dim_contiguous("o", o)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out: expected a pair (o_out, lse_out), got {type(out).__name__}")
        _checks.writable_output("out[0]", out[0], (n, h, d), o.dtype, o.device)
        _checks.writable_output("out[1]", out[1], (n, h), torch.float32, o.device)


def merge_states(o, lse, *, out=None):
    """Merge S partial attention states per token and head, exactly (log-sum-exp).

    Args:
        o:   [N, S, H, D] fp16, bf16 or fp32 (fp64 runs the reference), head_dim contiguous.
             CUDA head_dim: 32, 64, 96, 128, 192 or 256; any strides on N, S, H.
        lse: [N, S, H] fp32, natural log. A partial with lse = -inf contributes nothing; its o is
             ignored (garbage or NaN there is harmless).
        out: optional preallocated (o_out [N, H, D] in o's dtype, lse_out [N, H] fp32); when given,
             nothing is allocated (CUDA-graph capture) and ``out`` is returned.

    Returns:
        (o_merged [N, H, D] in o's dtype, lse_merged [N, H] fp32). A row whose partials are all
        -inf gives o = 0, lse = -inf. Finite inputs never give NaN. CuPy arrays in, CuPy out.
    """
    if out is None and _plain_cuda_call(o, lse):  # the hot path: checked, allocated, launched
        n, _, h, d = o.shape
        o_out = torch.empty((n, h, d), dtype=o.dtype, device=o.device)
        lse_out = torch.empty((n, h), dtype=torch.float32, device=o.device)
        launch(o, lse, o_out, lse_out, fresh_out=True)
        return o_out, lse_out
    o_t, lse_t = _interop.as_tensor("o", o), _interop.as_tensor("lse", lse)
    _check(o_t, lse_t, out)
    # Eager calls go straight to the implementation (no dispatcher cost); traced ones see the op.
    traced = torch.compiler.is_compiling()
    if out is not None:
        (torch.ops.flashtree.merge_states_out if traced else _merge_states_out_impl)(o_t, lse_t, out[0], out[1])
        return out
    o_m, lse_m = (torch.ops.flashtree.merge_states if traced else _merge_states_impl)(o_t, lse_t)
    return _interop.like(o, o_m), _interop.like(o, lse_m)


def merge_state(o_a, lse_a, o_b, lse_b, *, out=None):
    """Merge two attention states: o_a, o_b [N, H, D]; lse_a, lse_b [N, H] fp32.

    Returns (o [N, H, D], lse [N, H]). Same rules as ``merge_states`` (which it calls on the
    two states stacked, costing one extra copy of each input).
    """
    names = ("o_a", "lse_a", "o_b", "lse_b")
    o_a, lse_a, o_b, lse_b = (_interop.as_tensor(n, x) for n, x in zip(names, (o_a, lse_a, o_b, lse_b)))
    for name, x in zip(names, (o_a, lse_a, o_b, lse_b)):
        _checks.is_tensor(name, x)
    _checks.ndim("o_a", o_a, 3, "[N, H, D]")
    _checks.shape("o_b", o_b, tuple(o_a.shape), "(the shape of o_a)")
    _checks.same_dtype("o_b", o_b, "o_a", o_a)
    _checks.shape("lse_a", lse_a, tuple(o_a.shape[:2]), "[N, H]")
    _checks.shape("lse_b", lse_b, tuple(o_a.shape[:2]), "[N, H]")
    _checks.same_device(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)
    return merge_states(torch.stack((o_a, o_b), dim=1), torch.stack((lse_a, lse_b), dim=1), out=out)
