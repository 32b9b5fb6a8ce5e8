"""Packed tree attention with DFS-order masks (training: forward and backward).

Rule (the convention of "Flash Attention 2 with Tree Attention"): in a pack of N tokens split into
sequences by ``cu_seqlens``, query i may attend key j iff both lie in the same sequence, j <= i and
``start_q[i] <= end_k[j]``. A chain (all zeros) is causal attention.

Layers: kernel launches (``_launch_*``), two registered torch ops (forward, backward; fake
implementations for torch.compile), one ``torch.autograd.Function``, the public functions.

Tiles. Every sequence is cut into 64-token tiles from its first token; the same tiles serve as query
(Q) tiles and key (K) tiles. Tile t of sequence s gets the slot ``cu[s] // 64 + s + t``: slots are
distinct, lie below ``N // 64 + num_seqs`` and need no prefix sum, so the grid is known from shapes
alone (no host sync, no max_seqlen). A pre-pass writes, per slot, the tile's rows and the min/max of
start_q and end_k over it. A K tile is skipped for a Q tile when ``max(end_k over K) < min(start_q
over Q)`` or when it lies after the Q tile; a pair with ``min(end_k over K) >= max(start_q over Q)``
and the K tile strictly earlier is fully visible and skips the per-element predicate.

Worked example, 4 x (prompt 2048 + 8 x 512): a response-r query tile has min start_q = r, and the
tiles of responses r' < r have max end_k = r' < r: skipped. It visits 32 prompt tiles and its own
response's tiles, exactly the visible blocks.

Forward on Hopper (compute capability 9.0, G = H / Hkv even; FLASHTREE_WGMMA=0 turns it off): an
sm_90a kernel in which a producer warp walks the visible K tiles and copies them by TMA while two
consumer warpgroups run two query heads of the KV group on wgmma over the same tiles
(``dfs_fwd_ws_kernel``); elsewhere the portable mma.sync kernel. Under the same condition the
backward runs ``dfs_bwd_dq_ws_kernel`` (the forward's shape; Q, dO and O resident; it also computes
delta) and then ``dfs_bwd_dkdv_ws_kernel`` (one K/V tile per CTA; the producer copies each (Q tile,
head) item's Q and dO; the two consumers take alternate items). The forward and dQ kernels are
persistent: one CTA per SM takes (Q tile, pair of heads) items, longest rows first, from an atomic
counter zeroed before the launch, and its producer walks the next item's tiles into the same ring
while the consumers finish the current one. Each item is computed by one CTA in a fixed order, so
results stay bitwise deterministic. Producers find the next visible tile with one warp ballot over
32 table rows.

Backward, deterministic without atomics: ``delta = rowsum(dO * O) - dlse`` (a pre-pass, or on Hopper
inside the dQ kernel, which then runs first); kernel A per (K tile, KV head) loops over the Q tiles
that see it and over the G query heads of the group, accumulating dK and dV in registers (the GQA
reduction happens in a fixed order); kernel B per (Q tile, query head) loops over the visible K
tiles computing dQ. The op is always deterministic;
``deterministic=True`` is accepted and changes nothing.
"""
from __future__ import annotations

import functools
import math
import os
import weakref

import numpy as np
import torch

from . import _checks, _interop, _jit, reference
from . import tree as _tree
from ._jit import tma

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TILE = 64            # query rows and keys per tile (kernels_cu/dfs.cu: kTile)
_META = 8            # ints per slot in the tile table
_THREADS = 128


# ----------------------------------------------------------------------------------- specs


def tiles_spec() -> _jit.KernelSpec:
    return _jit.KernelSpec(family="dfs", kernel="ft::dfs_tiles_kernel", template_args=(TILE,),
                           name=f"dfs_tiles_t{TILE}")


def _spec(stage: str, dtype: torch.dtype, head_dim: int) -> _jit.KernelSpec:
    """The ``ft::dfs_<stage>_kernel`` specialisation (stage: fwd, bwd_delta, bwd_dkdv, bwd_dq)."""
    return _jit.KernelSpec(family="dfs", kernel=f"ft::dfs_{stage}_kernel",
                           template_args=(_jit.ctype(dtype), head_dim),
                           name=f"dfs_{stage}_{_jit.short(dtype)}_d{head_dim}")


fwd_spec = functools.partial(_spec, "fwd")


@functools.lru_cache(maxsize=None)
def fwd_ws_spec(dtype: torch.dtype, head_dim: int) -> _jit.KernelSpec:
    """The Hopper forward (sm_90a, built for sm_90 only): two query heads of a KV group per CTA."""
    return _jit.KernelSpec(family="dfs", kernel="ft::dfs_fwd_ws_kernel", template_args=(_jit.ctype(dtype), head_dim),
                           name=f"dfs_fwd_ws_{_jit.short(dtype)}_d{head_dim}", arch_suffix="a", archs=("sm_90",))
delta_spec = functools.partial(_spec, "bwd_delta")
dkdv_spec = functools.partial(_spec, "bwd_dkdv")
dq_spec = functools.partial(_spec, "bwd_dq")


@functools.lru_cache(maxsize=None)
def bwd_ws_spec(stage: str, dtype: torch.dtype, head_dim: int, qdo_regs: bool | None = None) -> _jit.KernelSpec:
    """The Hopper backward kernels (sm_90a; stage ``dkdv`` or ``dq``), chosen with the Hopper forward.
    The dQ kernel keeps Q and dO in registers (``qdo_regs``, the ``_rf`` specialisation: 10% faster on
    the long tree) by default only where NVRTC's ptxas is safe for it (``_jit.wgmma_regs_safe``)."""
    args, suffix = (_jit.ctype(dtype), head_dim), ""
    if stage == "dq":
        rf = _jit.wgmma_regs_safe() if qdo_regs is None else qdo_regs
        args, suffix = args + ("true" if rf else "false",), "_rf" if rf else ""
    return _jit.KernelSpec(family="dfs", kernel=f"ft::dfs_bwd_{stage}_ws_kernel", template_args=args,
                           name=f"dfs_bwd_{stage}_ws{suffix}_{_jit.short(dtype)}_d{head_dim}", arch_suffix="a",
                           archs=("sm_90",))


def _shipped():
    yield tiles_spec()
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            yield fwd_spec(dtype, d)
            yield fwd_ws_spec(dtype, d)
            yield delta_spec(dtype, d)
            yield dkdv_spec(dtype, d)
            yield dq_spec(dtype, d)
            yield bwd_ws_spec("dkdv", dtype, d)
            yield bwd_ws_spec("dq", dtype, d)


_jit.register_shipped("dfs", _shipped)


def fwd_smem(head_dim: int) -> int:
    """Q [64][D] + 2 stages x (K + V) [64][D], 16-bit."""
    return 2 * (TILE * head_dim + 2 * 2 * TILE * head_dim)


def _ws_smem(head_dim: int, resident: int, stages: int, per_stage: int, tail: int) -> int:
    """A warp-specialised kernel's shared memory: `resident` [64][D] 16-bit tiles and a ring of
    `stages` stages of two tiles (a DfsWsConfig / DfsDkdvWsConfig's kBytes), `per_stage` more bytes
    per stage (row values and a 16-byte header), the full/empty mbarriers and `tail` more bytes; 1 KB
    more to start the tiles on a 1024-byte boundary."""
    return 2 * (resident + 2 * stages) * TILE * head_dim + stages * per_stage + 2 * stages * 8 + tail + 1024


_PAIR_TAIL = 2 * 8 + 8 * 4  # DfsPairCta: the res_full / res_free mbarriers and the published item


def fwd_ws_smem(head_dim: int) -> int:
    """dfs_fwd_ws_kernel: Q of 2 heads, 5 stages of K + V with their 64 end_k."""
    return _ws_smem(head_dim, 2, _WS_STAGES, 4 * TILE + 16, _PAIR_TAIL)


def dq_ws_smem(head_dim: int) -> int:
    """dfs_bwd_dq_ws_kernel: Q, dO and O of 2 heads, 4 stages of K + V with their 64 end_k."""
    return _ws_smem(head_dim, 6, 4, 4 * TILE + 16, _PAIR_TAIL)


def dkdv_ws_smem(head_dim: int) -> int:
    """dfs_bwd_dkdv_ws_kernel: K and V, 5 stages of Q + dO with their rows' lse, delta and start_q."""
    return _ws_smem(head_dim, 2, 5, 3 * 4 * TILE + 16, 8)


_WS_STAGES = 5  # DfsWsConfig::kStages
# The forward on compute capability 9.0 runs the sm_90a kernel when G = H / Hkv is even;
# FLASHTREE_WGMMA=0 keeps the portable one (as for DeFT).
_WGMMA = os.environ.get("FLASHTREE_WGMMA", "1") != "0"


def use_ws_forward(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the forward of these CUDA tensors runs the Hopper kernel (dfs_fwd_ws_kernel)."""
    if not _WGMMA or (q.shape[1] // k.shape[1]) % 2:
        return False
    props = _jit.device_properties(q.device.index)  # cached: this runs on every forward
    return (props.major, props.minor) == (9, 0)


def dkdv_smem(head_dim: int) -> int:
    """K, V, Q, dO [64][D] 16-bit + lse, delta (fp32) and start_q (int32) per query row."""
    return 2 * 4 * TILE * head_dim + 3 * 4 * TILE


def dq_smem(head_dim: int) -> int:
    """Q, dO [64][D] + 2 stages x (K + V) [64][D], 16-bit."""
    return 2 * (2 * TILE * head_dim + 2 * 2 * TILE * head_dim)


def num_slots(n: int, num_seqs: int) -> int:
    """Tile slots of a pack of n tokens in num_seqs sequences (see the module docstring)."""
    return n // TILE + num_seqs


# --------------------------------------------------------------------------------- launches


def _ptr(x: torch.Tensor | None):
    return np.uint64(x.data_ptr() if x is not None else 0)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """16-byte aligned rows with a contiguous head_dim (an expanded gradient has stride 0 there):
    anything else is copied once."""
    if x.stride(-1) != 1 or not _checks.aligned16(x, range(x.dim() - 1)):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _i64(x: torch.Tensor, dims=(0, 1)):
    return tuple(np.int64(x.stride(d)) for d in dims)


def _launch_tiles(cu_seqlens, start_q, end_k, tiles) -> None:
    slots = tiles.shape[0]
    kernel = _jit.get_kernel(tiles_spec(), cu_seqlens.device)
    warps = _THREADS // 32
    kernel(((slots + warps - 1) // warps, 1, 1), (_THREADS, 1, 1),
           (_ptr(cu_seqlens), np.int32(cu_seqlens.shape[0] - 1), _ptr(start_q), _ptr(end_k),
            np.int32(start_q.shape[0]), _ptr(tiles), np.int32(slots)))


_WS_TAIL = _jit.param_layout("QQQQi Qqq QQ iif")  # dfs_fwd_ws_kernel's parameters after its 3 tensor maps
_DKDV_WS_TAIL = _jit.param_layout("QQQQQi Qqq Qqq iiff")  # dfs_bwd_dkdv_ws_kernel's after its 4
_DQ_WS_TAIL = _jit.param_layout("QQQQQQi Qqq iiff Qqq")  # dfs_bwd_dq_ws_kernel's after its 5


def _pair_grid(num_heads: int, slots: int, device: torch.device) -> int:
    """The persistent grid of dfs_fwd_ws_kernel and dfs_bwd_dq_ws_kernel: one CTA per SM (their
    shared memory allows one), at most one per (Q tile, pair of heads) item."""
    return max(1, min(num_heads // 2 * slots, _jit.num_sms(device)))


def _launch_fwd(q, k, v, start_q, end_k, tiles, o, lse, scale, visited) -> None:
    n, h, d = q.shape
    if use_ws_forward(q, k):
        kernel = _jit.get_kernel(fwd_ws_spec(q.dtype, d), q.device)
        box = (64, 1, TILE)  # 64 columns of one head, 64 rows: a WgTile column block
        work = torch.zeros(1, dtype=torch.int32, device=q.device)  # the item counter
        kernel.launch(
            (_pair_grid(h, tiles.shape[0], q.device), 1, 1), (3 * _THREADS, 1, 1), tma.param_layout(kernel, 3, _WS_TAIL),
            (tma.swizzled_map(q, box), tma.swizzled_map(k, box), tma.swizzled_map(v, box),
             start_q.data_ptr(), end_k.data_ptr(), tiles.data_ptr(), work.data_ptr(), tiles.shape[0],
             o.data_ptr(), *o.stride()[:2], lse.data_ptr(), visited.data_ptr() if visited is not None else 0,
             h, h // k.shape[1], scale * math.log2(math.e)),
            smem=fwd_ws_smem(d))
        return
    kernel = _jit.get_kernel(fwd_spec(q.dtype, d), q.device)
    kernel((h * tiles.shape[0], 1, 1), (_THREADS, 1, 1),
           (_ptr(q), *_i64(q), _ptr(k), *_i64(k), _ptr(v), *_i64(v),
            _ptr(start_q), _ptr(end_k), _ptr(tiles), np.int32(tiles.shape[0]),
            _ptr(o), *_i64(o), _ptr(lse), _ptr(visited),
            np.int32(h), np.int32(h // k.shape[1]), np.float32(scale * math.log2(math.e))),
           smem=fwd_smem(d))


def _launch_bwd(do, q, k, v, o, lse, dlse, start_q, end_k, tiles, dq, dk, dv, delta, scale) -> None:
    n, h, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    dlse_args = (_ptr(dlse), np.int64(dlse.stride(0) if dlse is not None else 0),
                 np.int64(dlse.stride(1) if dlse is not None else 0))
    if use_ws_forward(q, k):  # the Hopper dQ kernel computes delta itself
        _launch_bwd_ws(do, q, k, v, o, lse, dlse_args, start_q, end_k, tiles, dq, dk, dv, delta, scale)
        return
    rows = _THREADS * 8 // d  # delta pre-pass: 16 bytes per thread
    _jit.get_kernel(delta_spec(q.dtype, d), dev)(
        ((n * h + rows - 1) // rows, 1, 1), (_THREADS, 1, 1),
        (_ptr(o), *_i64(o), _ptr(do), *_i64(do)) + dlse_args + (_ptr(delta), np.int32(n), np.int32(h)))
    scale_log2 = np.float32(scale * math.log2(math.e))
    common = (_ptr(q), *_i64(q), _ptr(k), *_i64(k), _ptr(v), *_i64(v), _ptr(do), *_i64(do),
              _ptr(lse), _ptr(delta), _ptr(start_q), _ptr(end_k), _ptr(tiles), np.int32(tiles.shape[0]))
    _jit.get_kernel(dkdv_spec(q.dtype, d), dev)(
        (hkv * tiles.shape[0], 1, 1), (_THREADS, 1, 1),
        common + (_ptr(dk), *_i64(dk), _ptr(dv), *_i64(dv), np.int32(h), np.int32(h // hkv),
                  scale_log2, np.float32(scale)),
        smem=dkdv_smem(d))
    _jit.get_kernel(dq_spec(q.dtype, d), dev)(
        (h * tiles.shape[0], 1, 1), (_THREADS, 1, 1),
        common + (_ptr(dq), *_i64(dq), np.int32(h), np.int32(h // hkv), scale_log2, np.float32(scale)),
        smem=dq_smem(d))


def _launch_bwd_ws(do, q, k, v, o, lse, dlse_args, start_q, end_k, tiles, dq, dk, dv, delta, scale,
                   stages=("dq", "dkdv")) -> None:
    """The Hopper backward: dfs_bwd_dq_ws_kernel, which also computes delta, then dfs_bwd_dkdv_ws_kernel
    (``stages`` picks one of them for benchmarks/energy.py; dkdv alone reads the delta a dq run stored)."""
    n, h, d = q.shape
    hkv, slots = k.shape[1], tiles.shape[0]
    box = (64, 1, TILE)
    maps = tuple(tma.swizzled_map(x, box) for x in (q, k, v, do))
    rows = (lse.data_ptr(), delta.data_ptr(), start_q.data_ptr(), end_k.data_ptr(), tiles.data_ptr(), slots)
    tail = (h, h // hkv, scale * math.log2(math.e), scale)
    if "dq" in stages:
        kernel = _jit.get_kernel(bwd_ws_spec("dq", q.dtype, d), q.device)
        work = torch.zeros(1, dtype=torch.int32, device=q.device)  # the item counter
        kernel.launch((_pair_grid(h, slots, q.device), 1, 1), (3 * _THREADS, 1, 1), tma.param_layout(kernel, 5, _DQ_WS_TAIL),
                      maps + (tma.swizzled_map(o, box),) + rows[:-1]
                      + (work.data_ptr(), slots, dq.data_ptr(), *dq.stride()[:2]) + tail + dlse_args,
                      smem=dq_ws_smem(d))
    if "dkdv" in stages:
        kernel = _jit.get_kernel(bwd_ws_spec("dkdv", q.dtype, d), q.device)
        kernel.launch((hkv * slots, 1, 1), (3 * _THREADS, 1, 1), tma.param_layout(kernel, 4, _DKDV_WS_TAIL),
                      maps + rows + (dk.data_ptr(), *dk.stride()[:2], dv.data_ptr(), *dv.stride()[:2]) + tail,
                      smem=dkdv_ws_smem(d))


# ---------------------------------------------------------------------------------- the ops


def _dfs_forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      start_q: torch.Tensor, end_k: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [N, H, D], lse [N, H] fp32, tiles int32 [slots, 8]) for CUDA fp16/bf16 inputs."""
    n, h, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(n, h, dtype=torch.float32, device=q.device)
    tiles = torch.empty(num_slots(n, cu_seqlens.shape[0] - 1), _META, dtype=torch.int32, device=q.device)
    if n == 0:
        return o, lse, tiles
    q, k, v = map(_aligned, (q, k, v))
    _launch_tiles(cu_seqlens, start_q, end_k, tiles)
    _launch_fwd(q, k, v, start_q, end_k, tiles, o, lse, scale, None)
    return o, lse, tiles


_dfs_forward_op = torch.library.custom_op("flashtree::dfs_forward", _dfs_forward_impl, mutates_args=())


@_dfs_forward_op.register_fake
def _(q, k, v, cu_seqlens, start_q, end_k, scale):
    n, h, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(n, h, dtype=torch.float32),
            q.new_empty(num_slots(n, cu_seqlens.shape[0] - 1), _META, dtype=torch.int32))


def _dfs_backward_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                       start_q: torch.Tensor, end_k: torch.Tensor, tiles: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in q's dtype; dk and dv summed over each GQA group."""
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.shape[0] == 0:
        return dq, dk, dv
    delta = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    do, q, k, v, o = map(_aligned, (do, q, k, v, o))
    _launch_bwd(do, q, k, v, o, lse, dlse, start_q, end_k, tiles, dq, dk, dv, delta, scale)
    return dq, dk, dv


_dfs_backward_op = torch.library.custom_op("flashtree::dfs_backward", _dfs_backward_impl, mutates_args=())


@_dfs_backward_op.register_fake
def _(do, q, k, v, o, lse, dlse, start_q, end_k, tiles, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _traced() -> bool:
    return torch.compiler.is_compiling()


class _TreeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, start_q, end_k, scale):
        fwd = torch.ops.flashtree.dfs_forward if _traced() else _dfs_forward_impl
        o, lse, tiles = fwd(q, k, v, cu_seqlens, start_q, end_k, scale)
        ctx.save_for_backward(q, k, v, o, lse, start_q, end_k, tiles)
        ctx.scale = scale
        ctx.mark_non_differentiable(tiles)
        return o, lse, tiles

    @staticmethod
    def backward(ctx, do, dlse, _dtiles):
        q, k, v, o, lse, start_q, end_k, tiles = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        bwd = torch.ops.flashtree.dfs_backward if _traced() else _dfs_backward_impl
        dq, dk, dv = bwd(do, q, k, v, o, lse, dlse, start_q, end_k, tiles, ctx.scale)
        return dq, dk, dv, None, None, None, None


# ------------------------------------------------------------------------------- validation

_checked_cu: dict[int, int] = {}


def _check_cu_values(cu_seqlens: torch.Tensor, n: int, name: str) -> None:
    """cu_seqlens must rise strictly from 0 to N. A CUDA tensor costs one host sync the first time a
    given tensor (same object, same version) is seen; skipped during graph capture and tracing (the
    kernels clamp every index, so a bad cu_seqlens there gives wrong values, never a bad access)."""
    if torch.compiler.is_compiling():
        return
    cuda = cu_seqlens.device.type == "cuda"
    if cuda:
        if torch.cuda.is_current_stream_capturing():
            return
        key = id(cu_seqlens)
        if _checked_cu.get(key) == cu_seqlens._version:
            return
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != n or any(b <= a for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 12 else values[:12] + ["..."]
        raise ValueError(f"{name}: expected a strict rise from 0 to N = {n} (q.shape[0]), got {shown}")
    if cuda:
        _checked_cu[key] = cu_seqlens._version
        weakref.finalize(cu_seqlens, _checked_cu.pop, key, None)


def _check(q, k, v, cu_seqlens, start_q, end_k, max_seqlen, softmax_scale, names):
    cu_name, sq_name, ek_name = names
    for name, x in (("q", q), ("k", k), ("v", v), (cu_name, cu_seqlens), (sq_name, start_q), (ek_name, end_k)):
        _checks.is_tensor(name, x)
    _checks.ndim("q", q, 3, "[N, H, D]")
    n, h, d = q.shape
    _checks.ndim("k", k, 3, "[N, Hkv, D]")
    _checks.shape("k", k, (n, None, d), "[N, Hkv, D] (q is [N, H, D])")
    _checks.shape("v", v, tuple(k.shape), "(the shape of k)")
    hkv = k.shape[1]
    if hkv < 1 or h % hkv:
        raise ValueError(f"k: expected Hkv (k.shape[1]) to divide H = {h} (q.shape[1]), got {hkv}")
    _checks.same_dtype("k", k, "q", q)
    _checks.same_dtype("v", v, "q", q)
    _checks.same_device(q=q, k=k, v=v, **{cu_name: cu_seqlens, sq_name: start_q, ek_name: end_k})
    if q.device.type == "cuda":
        _checks.dtype_in("q", q, DTYPES)
        _checks.one_of("q.shape[2] (head_dim)", d, HEAD_DIMS)
    else:
        _checks.dtype_in("q", q, CPU_DTYPES)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.last_dim_contiguous(name, x)
    for name, x, length, layout in ((cu_name, cu_seqlens, None, "[num_seqs + 1]"),
                                    (sq_name, start_q, n, "[N]"), (ek_name, end_k, n, "[N]")):
        if x.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32, got {str(x.dtype).replace('torch.', '')}")
        _checks.ndim(name, x, 1, layout)
        if length is not None:
            _checks.shape(name, x, (length,), f"{layout} (N = q.shape[0])")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"{cu_name}: expected at least 2 entries [0, ..., N], got {cu_seqlens.shape[0]}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1):
        raise ValueError(f"max_seqlen: expected None or an int >= 1, got {max_seqlen!r}")
    _checks.softmax_scale("softmax_scale", softmax_scale, d)
    _check_cu_values(cu_seqlens, n, cu_name)
    return n, h, d


def _run(q, k, v, cu_seqlens, start_q, end_k, softmax_scale, validate, return_tiles=False):
    scale = _checks.softmax_scale("softmax_scale", softmax_scale, q.shape[2])
    if validate:  # opt-in: copies the arrays to the host
        _tree.validate_dfs_arrays(start_q, end_k, cu_seqlens)
    if q.device.type != "cuda":
        return reference.tree_attention(q, k, v, cu_seqlens, start_q, end_k, scale)
    cu_seqlens, start_q, end_k = (x.contiguous() for x in (cu_seqlens, start_q, end_k))
    o, lse, _ = _TreeAttention.apply(q, k, v, cu_seqlens, start_q, end_k, scale)
    return o, lse


# ---------------------------------------------------------------------------- public API


def tree_attention(q, k, v, cu_seqlens, tree_dfs_order_start_q, tree_dfs_order_end_k, *,
                   max_seqlen=None, softmax_scale=None, return_lse=False, deterministic=False,
                   validate=False):
    """Packed tree attention (forward and backward) over DFS-ordered sequences.

    Query i may attend key j iff both lie in the same sequence of ``cu_seqlens``, j <= i and
    ``tree_dfs_order_start_q[i] <= tree_dfs_order_end_k[j]``.

    Args:
        q: [N, H, D]; k, v: [N, Hkv, D] with Hkv dividing H (GQA/MQA: query head h reads KV head
            h // (H / Hkv)). CUDA: fp16 or bf16, D in {64, 128}; CPU: fp32/fp64 (fp16/bf16 too)
            through ``flashtree.reference.tree_attention``. Any strides with a contiguous last dim.
        cu_seqlens: int32 [num_seqs + 1], strictly increasing from 0 to N. Checked on the host once
            per tensor object (one sync for a CUDA tensor; skipped under graph capture/tracing).
        tree_dfs_order_start_q, tree_dfs_order_end_k: int32 [N]: the DFS index of each token's
            node and the largest DFS index of that node's subtree (``flashtree.tree`` builds them).
        max_seqlen: optional int, accepted for compatibility; the grid never needs it.
        softmax_scale: default 1 / sqrt(D).
        return_lse: also return lse [N, H], natural log (fp32; fp64 for fp64 CPU inputs).
            Gradients flow through it as well.
        deterministic: accepted; the backward pass is always deterministic (no atomics).
        validate: check the DFS arrays with ``flashtree.tree.validate_dfs_arrays`` (host copy).

    Returns:
        o [N, H, D] in q's dtype (and lse). Differentiable in q, k and v.
    """
    names = ("q", "k", "v", "cu_seqlens", "tree_dfs_order_start_q", "tree_dfs_order_end_k")
    q_t, k, v, cu, sq, ek = (_interop.as_tensor(nm, x) for nm, x in
                             zip(names, (q, k, v, cu_seqlens, tree_dfs_order_start_q, tree_dfs_order_end_k)))
    _check(q_t, k, v, cu, sq, ek, max_seqlen, softmax_scale, names[3:])
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    o, lse = _run(q_t, k, v, cu, sq, ek, softmax_scale, validate)
    if return_lse:
        return _interop.like(q, o), _interop.like(q, lse)
    return _interop.like(q, o)


def _values_checkable(x: torch.Tensor) -> bool:
    """Whether reading a tensor's values on the host is allowed here (not while tracing or capturing)."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None, tree_dfs_order_end_k=None, tree_dfs_order_start_q=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_func`` of the tree-attention fork.

    Same arguments and order as flash-attn 2's varlen function plus the two DFS arrays. Supported:
    equal query and key packs (``cu_seqlens_k`` equal to ``cu_seqlens_q``, k.shape[0] == q.shape[0]),
    ``causal=True``, ``dropout_p=0``, no window, softcap, alibi or block table. Without the DFS
    arrays it is causal varlen attention. ``return_attn_probs=True`` returns
    ``(out, softmax_lse [H, N] fp32, None)`` as flash-attn does (no probabilities).
    """
    if tree_dfs_order_start_q is None and tree_dfs_order_end_k is None:
        n = q.shape[0]
        zeros = torch.zeros(n, dtype=torch.int32, device=q.device)
        tree_dfs_order_start_q = tree_dfs_order_end_k = zeros
    elif tree_dfs_order_start_q is None or tree_dfs_order_end_k is None:
        given = "tree_dfs_order_start_q" if tree_dfs_order_end_k is None else "tree_dfs_order_end_k"
        raise ValueError(f"tree_dfs_order_start_q, tree_dfs_order_end_k: expected both or neither, got only {given}")
    if dropout_p != 0:
        raise ValueError(f"dropout_p: expected 0.0 (dropout is not supported), got {dropout_p!r}")
    if causal is not True:
        raise ValueError(f"causal: expected True (tree attention is causal within each path), got {causal!r}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size: expected (-1, -1) (no sliding window), got {tuple(window_size)}")
    if softcap != 0:
        raise ValueError(f"softcap: expected 0.0, got {softcap!r}")
    for name, x in (("alibi_slopes", alibi_slopes), ("block_table", block_table)):
        if x is not None:
            raise ValueError(f"{name}: expected None (not supported), got a {type(x).__name__}")
    q_t, k_t = _interop.as_tensor("q", q), _interop.as_tensor("k", k)
    cu_q = _interop.as_tensor("cu_seqlens_q", cu_seqlens_q)
    cu_k = _interop.as_tensor("cu_seqlens_k", cu_seqlens_k)
    _checks.is_tensor("q", q_t)
    _checks.is_tensor("k", k_t)
    if q_t.dim() >= 1 and k_t.dim() >= 1 and k_t.shape[0] != q_t.shape[0]:
        raise ValueError(f"k: expected as many tokens as q ({q_t.shape[0]}): tree attention packs queries "
                         f"and keys together, got {k_t.shape[0]}")
    if max_seqlen_q != max_seqlen_k:
        raise ValueError(f"max_seqlen_k: expected max_seqlen_q ({max_seqlen_q!r}), got {max_seqlen_k!r}")
    if cu_k is not cu_q:
        _checks.is_tensor("cu_seqlens_k", cu_k)
        _checks.is_tensor("cu_seqlens_q", cu_q)
        if cu_k.shape != cu_q.shape or (_values_checkable(cu_q) and not torch.equal(cu_k.to(cu_q.device), cu_q)):
            raise ValueError("cu_seqlens_k: expected the values of cu_seqlens_q (one pack of queries and keys), "
                             "got different values")
    result = tree_attention(q, k, v, cu_q, tree_dfs_order_start_q, tree_dfs_order_end_k,
                            max_seqlen=max_seqlen_q, softmax_scale=softmax_scale,
                            return_lse=return_attn_probs, deterministic=deterministic)
    if return_attn_probs:
        out, lse = result
        return out, _interop.like(q, _interop.as_tensor("lse", lse).t()), None
    return result


def visited_tiles(q, k, v, cu_seqlens, tree_dfs_order_start_q, tree_dfs_order_end_k, *, softmax_scale=None):
    """Debug: int32 [slots, H], how many K tiles each (Q tile slot, head) CTA of the forward kernel
    visited (CUDA only); unused slots hold 0. The sum over slots follows the visible 64 x 64 blocks."""
    names = ("q", "k", "v", "cu_seqlens", "tree_dfs_order_start_q", "tree_dfs_order_end_k")
    _check(q, k, v, cu_seqlens, tree_dfs_order_start_q, tree_dfs_order_end_k, None, softmax_scale, names[3:])
    if q.device.type != "cuda":
        raise ValueError(f"q: expected a CUDA tensor (visited_tiles counts kernel work), got {q.device}")
    n, h, d = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    tiles = torch.empty(num_slots(n, cu_seqlens.shape[0] - 1), _META, dtype=torch.int32, device=q.device)
    visited = torch.zeros(tiles.shape[0], h, dtype=torch.int32, device=q.device)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(n, h, dtype=torch.float32, device=q.device)
    if n:
        q, k, v = map(_aligned, (q, k, v))
        _launch_tiles(cu_seqlens, tree_dfs_order_start_q, tree_dfs_order_end_k, tiles)
        _launch_fwd(q, k, v, tree_dfs_order_start_q, tree_dfs_order_end_k, tiles, o, lse, scale, visited)
    return visited


def tile_map(cu_seqlens, tree_dfs_order_start_q, tree_dfs_order_end_k):
    """The kernels' tile-skipping decisions, computed on the host (for tests and pictures).

    Returns one pair ``(visited, full)`` per sequence, bool ``[T, T]`` with ``T = ceil(L / 64)``:
    ``visited[a, b]`` when Q tile a loads K tile b, ``full[a, b]`` when the pair needs no per-element
    predicate. The same rule as kernels_cu/dfs.cu (min/max of start_q and end_k per 64-token tile).
    """
    cu = torch.as_tensor(cu_seqlens).tolist()
    sq = torch.as_tensor(tree_dfs_order_start_q).cpu().long()
    ek = torch.as_tensor(tree_dfs_order_end_k).cpu().long()
    maps = []
    for first, last in zip(cu[:-1], cu[1:]):
        t = -(-(last - first) // TILE)
        pad = t * TILE - (last - first)
        big = torch.iinfo(torch.int64).max
        s_tiles = torch.cat([sq[first:last], sq.new_full((pad,), big)]).view(t, TILE)
        e_tiles = torch.cat([ek[first:last], ek.new_full((pad,), -big)]).view(t, TILE)
        min_s = s_tiles.amin(1)
        max_s = torch.where(s_tiles == big, -big, s_tiles).amax(1)
        min_e = torch.where(e_tiles == -big, big, e_tiles).amin(1)
        max_e = e_tiles.amax(1)
        a = torch.arange(t)
        earlier = a[None, :] < a[:, None]
        visited = (a[None, :] <= a[:, None]) & ((max_e[None, :] >= min_s[:, None]) | (a[None, :] == a[:, None]))
        full = earlier & (min_e[None, :] >= max_s[:, None])
        maps.append((visited, full))
    return maps
