"""Commit the accepted tokens of a verification step into the KV cache, all layers in one call.

During verification the T tree tokens' keys and values arrive as ``current_k``/``current_v``
``[B, Hkv, T, D]`` per layer; the cache holds ``kv_seq_len[b]`` valid tokens. After acceptance,
sequence ``b`` keeps ``accept_len[b]`` tree nodes ``accepted_nodes[b, :accept_len[b]]`` (a root-to-node
path); their K/V move to cache positions ``kv_seq_len[b] + 0, 1, ...`` and ``kv_seq_len[b]`` grows by
``accept_len[b]``, on the GPU.

How, on CUDA tensors: one kernel (``kernels_cu/commit.cu``) copies the accepted nodes' 16-byte vectors
of every layer, K and V, for every sequence that fits, and a one-block kernel after it writes the
overflow flags and advances ``kv_seq_len`` (it may only change once every copy block has read it). That
takes each operand as a stack of layers at one constant stride: a ``[L, ...]`` tensor, or a list whose
layers sit at a constant stride in one allocation (:func:`stack_layers`); K and V may be views of one
allocation (:class:`flashtree.integrations.hf_verify.FlashTreeCache`) or separate. No host sync, no
allocation but the returned flags (none with ``overflow=``): CUDA-graph capturable.

The fused-torch path (CPU tensors: the reference; CUDA: lists that form no constant-stride stack,
rows not 16-byte aligned, float64, and torch.compile tracing): every sequence writes a fixed
``A = accepted_nodes.shape[1]`` slots, the ones past ``accept_len[b]`` repeating the last accepted node
at its own destination (same value twice), so nothing is written past the new length; one gather of
the sources, one of the old contents, one select and one indexed store per stacked destination.

Overflow, with nothing lost: a sequence whose ``kv_seq_len[b] + accept_len[b]`` exceeds the capacity
(or, paged, whose new tokens land on an unmapped page: a block-table entry outside ``[0, num_pages)``;
a negative ``kv_seq_len`` counts as an overflow too) writes nothing, keeps its ``kv_seq_len`` and is
flagged in the returned bool ``[B]`` tensor. Reading that flag is the caller's choice of host sync
(``flashtree.speculative.generate`` reads it together with the accepted lengths it needs anyway, and
raises). ``check=True`` is the opt-in eager check: one host sync before anything is written, and
``CacheOverflowError`` (a ``ValueError``) naming the sequence.
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

import torch

from .. import _checks, _jit

__all__ = ["CacheOverflowError", "commit_accepted", "stack_layers"]

TensorOrLayers = Union[torch.Tensor, Sequence[torch.Tensor]]


class CacheOverflowError(ValueError):
    """The accepted tokens do not fit the cache; nothing was written."""


def stack_layers(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A zero-copy ``[N, ...]`` view over equally shaped tensors that sit at a constant stride in one
    allocation (e.g. the layers of a stacked cache, or its K and V halves); None when they do not."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0)
    size = first.element_size()
    gap = tensors[1].data_ptr() - first.data_ptr()
    if gap <= 0 or gap % size:
        return None
    for i, t in enumerate(tensors):
        if (t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
                or t.device != first.device or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.data_ptr() - first.data_ptr() != i * gap):
            return None
    return first.as_strided((len(tensors), *first.shape), (gap // size, *first.stride()),
                            first.storage_offset())


def _layers(name: str, x: TensorOrLayers, ndim: int) -> list[torch.Tensor]:
    """The per-layer tensors of a stacked ``[L, ...]`` tensor, a single layer, or a list of layers."""
    if isinstance(x, torch.Tensor):
        if x.dim() == ndim + 1:
            return list(x.unbind(0))
        if x.dim() == ndim:
            return [x]
        raise ValueError(f"{name}: expected {ndim} dimensions (one layer) or {ndim + 1} ([L, ...]), "
                         f"got shape {tuple(x.shape)}")
    if isinstance(x, (list, tuple)) and x:
        for i, t in enumerate(x):
            _checks.is_tensor(f"{name}[{i}]", t)
            _checks.ndim(f"{name}[{i}]", t, ndim, "(one layer)")
        return list(x)
    raise TypeError(f"{name}: expected a tensor or a non-empty list of tensors, got {type(x).__name__}")


def _stacked(name: str, layers_k: list[torch.Tensor], layers_v: list[torch.Tensor], writable: bool
             ) -> list[torch.Tensor]:
    """Stacks ``[S, ...]`` covering K then V of every layer: one view if possible, else a few.

    Destinations must stay views (they are written); sources may be copied into one stack.
    """
    both = stack_layers(layers_k + layers_v)
    if both is not None:
        return [both]
    parts = [stack_layers(layers_k), stack_layers(layers_v)]
    if all(p is not None for p in parts):
        return parts
    if not writable:
        return [torch.stack(layers_k + layers_v)]
    return [t.unsqueeze(0) for t in layers_k + layers_v]


def _check_index(name: str, x: torch.Tensor, shape, device) -> None:
    _checks.is_tensor(name, x)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 or int64, got {x.dtype}")
    _checks.shape(name, x, shape, "")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (the cache's), got {x.device}")


# ------------------------------------------------------------------------------------------ kernels

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COPY_THREADS = 256
_COPY_PER_BLOCK = 4 * _COPY_THREADS  # commit.cu CommitConfig::kPerBlock
_ADVANCE_THREADS = 128
_MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def spec(dtype: torch.dtype) -> _jit.KernelSpec:
    """The copy kernel for one element type (the copy is bitwise: the dtype sets the vector width)."""
    return _jit.KernelSpec(family="commit", kernel="ft::commit_copy_kernel",
                           template_args=(_jit.ctype(dtype), _COPY_THREADS), name=f"commit_{_jit.short(dtype)}")


ADVANCE_SPEC = _jit.KernelSpec(family="commit", kernel="ft::commit_advance_kernel",
                               template_args=(_ADVANCE_THREADS,), name="commit_advance")

_jit.register_shipped("commit", lambda: [spec(dt) for dt in DTYPES] + [ADVANCE_SPEC])

# CommitOperand (pointer + 4 int64 strides) and CommitSeqs (15 fields), all 8 bytes wide.
_OPERAND = "Q qqqq "
_SEQS = "QqQqQqqQqqqqqqq "
_COPY_PARAMS = _jit.param_layout(_OPERAND * 4 + _SEQS + "iiii")
_ADVANCE_PARAMS = _jit.param_layout(_SEQS + "Qqi")


def _kernel_ready(stacks, width: int, capacity: int) -> bool:
    """Whether the kernels take these ``[L, ...]`` stacks (else the torch path runs)."""
    if any(x is None for x in stacks) or torch.compiler.is_compiling():
        return False
    first = stacks[0]
    if first.device.type != "cuda" or first.dtype not in DTYPES:
        return False
    layers, _, hkv, _, d = stacks[2].shape
    chunks, rem = divmod(d * first.element_size(), 16)
    if rem or chunks == 0 or layers * hkv * stacks[2].shape[3] == 0 or stacks[2].shape[1] > _MAX_GRID_Y:
        return False
    if 2 * layers * hkv * width * chunks >= 2 ** 31 - _COPY_PER_BLOCK or capacity >= 2 ** 31:
        return False
    return all(x.stride(4) == 1 and _checks.aligned16(x, range(4)) for x in stacks)


def _launch(stacks, accepted_nodes, accept_len, kv_seq_len, block_tables, capacity, overflow) -> None:
    """The copy, then the overflow flags and lengths: two launches on torch's current stream."""
    k_cache, v_cache, current_k, current_v = stacks
    layers, bsz, hkv, t, d = current_k.shape
    if bsz == 0:
        return
    width = accepted_nodes.shape[1]
    chunks = d * current_k.element_size() // 16
    if block_tables is None:
        table = (0, 0, 0, capacity, 1, 0)
    else:
        table = (block_tables.data_ptr(), *block_tables.stride(), capacity, k_cache.shape[3], k_cache.shape[1])
    # index_flags: bit 0 (kAcceptIs64), bit 1 (kNodesIs64)
    flags = int(accept_len.dtype == torch.int64) | int(accepted_nodes.dtype == torch.int64) << 1
    seqs = (kv_seq_len.data_ptr(), kv_seq_len.stride(0), accept_len.data_ptr(), accept_len.stride(0),
            accepted_nodes.data_ptr(), *accepted_nodes.stride(), *table, width, flags)
    operands = []
    for x in (current_k, current_v, k_cache, v_cache):
        operands += (x.data_ptr(), *x.stride()[:4])
    device = current_k.device
    blocks = (2 * layers * hkv * width * chunks + _COPY_PER_BLOCK - 1) // _COPY_PER_BLOCK
    _jit.get_kernel(spec(current_k.dtype), device).launch(
        (blocks, bsz, 1), (_COPY_THREADS, 1, 1), _COPY_PARAMS, (*operands, *seqs, layers, hkv, t, chunks))
    _jit.get_kernel(ADVANCE_SPEC, device).launch(
        ((bsz + _ADVANCE_THREADS - 1) // _ADVANCE_THREADS, 1, 1), (_ADVANCE_THREADS, 1, 1), _ADVANCE_PARAMS,
        (*seqs, overflow.data_ptr(), overflow.stride(0), bsz))


# ------------------------------------------------------------------------------------------ the op


def _plain_stacks(k_cache, v_cache, current_k, current_v, paged: bool):
    """``[L, ...]`` views of four plain tensors (stacked ``[L, ...]`` or one layer each) that pass every
    per-layer check of the full path, recognised without splitting the layers; else None."""
    xs = (k_cache, v_cache, current_k, current_v)
    if not all(type(x) is torch.Tensor for x in xs):
        return None
    nd = current_k.dim()
    if nd not in (4, 5) or any(x.dim() != nd for x in xs):
        return None
    if k_cache.shape != v_cache.shape or current_k.shape != current_v.shape:
        return None
    dtype, device = current_k.dtype, current_k.device
    if any(x.dtype != dtype or x.device != device for x in xs):
        return None
    if nd == 4:
        xs = tuple(x.unsqueeze(0) for x in xs)
    layers, bsz, hkv, _, d = xs[2].shape
    cache = xs[0].shape
    if layers < 1 or cache[0] != layers or cache[2] != hkv or cache[4] != d or (not paged and cache[1] != bsz):
        return None
    return xs


def _validated_layers(k_cache, v_cache, current_k, current_v, paged: bool):
    """The per-layer lists, every layer checked (the path for lists, and the one that names errors)."""
    ks, vs = _layers("k_cache", k_cache, 4), _layers("v_cache", v_cache, 4)
    cks, cvs = _layers("current_k", current_k, 4), _layers("current_v", current_v, 4)
    num_layers = len(ks)
    for name, x in (("v_cache", vs), ("current_k", cks), ("current_v", cvs)):
        if len(x) != num_layers:
            raise ValueError(f"{name}: expected {num_layers} layers (as k_cache), got {len(x)}")
    bsz, hkv, t, d = cks[0].shape
    layout = "[num_pages, Hkv, P, D]" if paged else "[B, Hkv, C, D]"
    for i in range(num_layers):
        for name, x, like in (("k_cache", ks[i], ks[0]), ("v_cache", vs[i], ks[0])):
            _checks.shape(f"{name} (layer {i})", x, (None if paged else bsz, hkv, None, d), layout)
            _checks.same_dtype(f"{name} (layer {i})", x, "current_k", cks[0])
            if x.shape != like.shape:
                raise ValueError(f"{name} (layer {i}): expected shape {list(like.shape)} (layer 0 of "
                                 f"k_cache), got {list(x.shape)}")
        for name, x in (("current_k", cks[i]), ("current_v", cvs[i])):
            _checks.shape(f"{name} (layer {i})", x, (bsz, hkv, t, d), "[B, Hkv, T, D]")
            _checks.same_dtype(f"{name} (layer {i})", x, "current_k", cks[0])
    return ks, vs, cks, cvs


def commit_accepted(k_cache: TensorOrLayers, v_cache: TensorOrLayers, current_k: TensorOrLayers,
                    current_v: TensorOrLayers, accepted_nodes: torch.Tensor, accept_len: torch.Tensor,
                    kv_seq_len: torch.Tensor, *, block_tables: torch.Tensor | None = None,
                    check: bool = False, overflow: torch.Tensor | None = None) -> torch.Tensor:
    """Move the accepted tree tokens' K/V into the cache after ``kv_seq_len`` and advance it (in place).

    Args:
        k_cache, v_cache: padded ``[B, Hkv, C, D]``, or paged ``[num_pages, Hkv, P, D]`` when
            ``block_tables`` is given; per layer: a stacked ``[L, ...]`` tensor or a list of L tensors.
            Written in place.
        current_k, current_v: ``[B, Hkv, T, D]`` per layer, stacked or listed like the cache.
        accepted_nodes: int ``[B, A]``: tree node ids (into T) of the accepted path, root first.
            Entries at or past ``accept_len[b]`` are ignored; the others are clamped into ``[0, T)``.
        accept_len: int ``[B]`` in ``[0, A]``: how many nodes each sequence keeps (0: none).
        kv_seq_len: int32 ``[B]``, advanced by ``accept_len`` where the commit fits.
        block_tables: int32 ``[B, max_pages]`` for a paged cache (page ``j // P`` of sequence b is
            ``block_tables[b, j // P]``); the pages the new tokens land on must be mapped already.
        check: opt-in host-side check (one sync) before writing: raises ``CacheOverflowError``.
        overflow: optional preallocated bool ``[B]`` for the result (nothing is allocated then).

    Returns:
        bool ``[B]``: True where the tokens did not fit (nothing of that sequence was written).

    CUDA tensors run one copy kernel for all layers, K and V, plus a one-block kernel that advances
    ``kv_seq_len``, when every operand is a constant-stride stack of layers (a ``[L, ...]`` tensor, or
    a list of views into one allocation) in fp16, bf16 or fp32 with 16-byte aligned rows; anything
    else (e.g. a list of separately allocated layers) takes the fused-torch path, same result.
    """
    for name, x in (("kv_seq_len", kv_seq_len), ("accepted_nodes", accepted_nodes), ("accept_len", accept_len)):
        _checks.is_tensor(name, x)
    paged = block_tables is not None
    stacks = _plain_stacks(k_cache, v_cache, current_k, current_v, paged)
    layers = None
    if stacks is None:
        layers = _validated_layers(k_cache, v_cache, current_k, current_v, paged)
    # [L, ...] stacks or layer 0 of each operand: the checks below read devices and the last 4 sizes.
    k0, v0, ck0, cv0 = stacks if stacks is not None else (x[0] for x in layers)
    cache_shape = k0.shape[-4:]
    bsz = ck0.shape[-4]
    device = kv_seq_len.device
    if kv_seq_len.dtype != torch.int32:
        raise TypeError(f"kv_seq_len: expected dtype int32, got {kv_seq_len.dtype}")
    _checks.shape("kv_seq_len", kv_seq_len, (bsz,), "[B] (B = current_k.shape[0])")
    _check_index("accepted_nodes", accepted_nodes, (bsz, None), device)
    _check_index("accept_len", accept_len, (bsz,), device)
    width = accepted_nodes.shape[1]
    if width < 1:
        raise ValueError("accepted_nodes: expected at least one column [B, A >= 1], got A = 0")
    _checks.same_device(kv_seq_len=kv_seq_len, k_cache=k0, v_cache=v0, current_k=ck0, current_v=cv0,
                        block_tables=block_tables)
    if paged:
        if block_tables.dtype != torch.int32:
            raise TypeError(f"block_tables: expected dtype int32, got {block_tables.dtype}")
        _checks.shape("block_tables", block_tables, (bsz, None), "[B, max_pages]")
        capacity = block_tables.shape[1] * cache_shape[2]
    else:
        capacity = cache_shape[2]
    if overflow is None:
        overflow = torch.empty(bsz, dtype=torch.bool, device=device)
    else:
        _checks.writable_output("overflow", overflow, (bsz,), torch.bool, device)
    if check:
        base, length = kv_seq_len.to(torch.int64), accept_len.to(torch.int64)
        fits = _fits(base, length, width, capacity, block_tables, cache_shape[0])
        _raise_on_overflow(~fits, base, length, capacity, paged)

    if stacks is None:
        stacks = tuple(stack_layers(x) for x in layers)
    if _kernel_ready(stacks, width, capacity):
        _launch(stacks, accepted_nodes, accept_len, kv_seq_len, block_tables, capacity, overflow)
        return overflow
    if layers is None:
        layers = tuple(list(x.unbind(0)) for x in stacks)
    _commit_torch(*layers, accepted_nodes, accept_len, kv_seq_len, block_tables, capacity, overflow)
    return overflow


def _fits(base, length, width: int, capacity: int, block_tables, num_pages: int) -> torch.Tensor:
    """bool [B]: the commit fits the capacity and, paged, its new tokens' pages are mapped."""
    fits = (base >= 0) & (base + length <= capacity)
    if block_tables is not None and block_tables.shape[1] > 0:
        page = capacity // block_tables.shape[1]
        slot = torch.arange(width, device=base.device)[None, :]
        # Where the commit fits, the pages of its min(len, A) new tokens are inside the table.
        page_slot = ((base[:, None] + slot) // page).clamp(0, block_tables.shape[1] - 1)
        page_id = block_tables.to(torch.int64).gather(1, page_slot)
        mapped = ((page_id >= 0) & (page_id < num_pages)) | (slot >= length[:, None])
        fits = fits & mapped.all(1)
    return fits


def _commit_torch(ks, vs, cks, cvs, accepted_nodes, accept_len, kv_seq_len, block_tables, capacity, overflow):
    """The fused-torch commit (the reference semantics): a fixed number of slots per sequence."""
    paged = block_tables is not None
    bsz, hkv, t, d = cks[0].shape
    width = accepted_nodes.shape[1]
    device = kv_seq_len.device
    # Step 1: per-slot sources and destinations [B, A] (slots past the length repeat the last node).
    length = accept_len.to(torch.int64)
    base = kv_seq_len.to(torch.int64)
    fits = _fits(base, length, width, capacity, block_tables, ks[0].shape[0])
    overflow.copy_(~fits)
    ok = fits & (length > 0)
    slot = torch.minimum(torch.arange(width, device=device)[None, :], (length - 1).clamp(min=0)[:, None])
    nodes = accepted_nodes.to(torch.int64).gather(1, slot).clamp(0, t - 1)
    # Rejected sequences rewrite one of their own valid positions with its old value.
    hold = (base - 1).clamp(min=0)[:, None].expand(-1, width)
    pos = torch.where(ok[:, None], base[:, None] + slot, hold)
    if paged:
        page = ks[0].shape[2]
        page_id = block_tables.to(torch.int64).gather(1, (pos // page).clamp(max=block_tables.shape[1] - 1))
        index = (page_id.clamp(0, ks[0].shape[0] - 1), pos % page)
    else:
        index = (torch.arange(bsz, device=device)[:, None].expand(-1, width), pos)

    # Step 2: gather, select, store; one pass per stacked destination.
    sources = _stacked("current_k", cks, cvs, writable=False)
    dests = _stacked("k_cache", ks, vs, writable=True)
    src_all = sources[0] if len(sources) == 1 else torch.cat(sources)
    first = 0
    for dst in dests:
        src = src_all[first:first + dst.shape[0]]
        first += dst.shape[0]
        _store(dst, src, nodes, index, ok, paged)

    # Step 3: the new lengths, on the device.
    kv_seq_len.add_(torch.where(ok, length, torch.zeros_like(length)).to(torch.int32))


def _store(dst, src, nodes, index, ok, paged):
    """dst [S, B or num_pages, Hkv, C or P, D] <- src [S, B, Hkv, T, D] at the accepted nodes."""
    s, bsz, hkv, t, d = src.shape
    width = nodes.shape[1]
    dev = src.device
    si = torch.arange(s, device=dev)[:, None, None, None]
    bi = torch.arange(bsz, device=dev)[None, :, None, None]
    hi = torch.arange(hkv, device=dev)[None, None, None, :]
    new = src[si, bi, hi, nodes[None, :, :, None]]  # [S, B, A, Hkv, D]
    where0, where1 = index[0][None, :, :, None], index[1][None, :, :, None]
    old = dst[si, where0, hi, where1]
    dst[si, where0, hi, where1] = torch.where(ok[None, :, None, None, None], new, old)


def _raise_on_overflow(overflow, base, length, capacity, paged) -> None:
    bad = overflow.nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        need = int(base[b] + length[b])
        what = "mapped pages for" if paged and need <= capacity else "capacity for"
        raise CacheOverflowError(
            f"kv_seq_len[{b}] + accept_len[{b}]: expected {what} {need} tokens (cache capacity "
            f"{capacity}), got kv_seq_len {int(base[b])} + accept_len {int(length[b])}; nothing was committed")
