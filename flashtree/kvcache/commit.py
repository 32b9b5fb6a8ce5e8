"""Commit the accepted tokens of a verification step into the KV cache, all layers in one call.

During verification the T tree tokens' keys and values arrive as ``current_k``/``current_v``
``[B, Hkv, T, D]`` per layer; the cache holds ``kv_seq_len[b]`` valid tokens. After acceptance,
sequence ``b`` keeps ``accept_len[b]`` tree nodes ``accepted_nodes[b, :accept_len[b]]`` (a root-to-node
path); their K/V move to cache positions ``kv_seq_len[b] + 0, 1, ...`` and ``kv_seq_len[b]`` grows by
``accept_len[b]``, on the GPU.

How (fused torch ops, no host sync): every sequence writes a fixed ``A = accepted_nodes.shape[1]``
slots, the ones past ``accept_len[b]`` repeating the last accepted node at its own destination (same
value twice), so nothing is written past the new length. The layers (and K with V, when they are views
of one allocation as in :class:`flashtree.integrations.hf_verify.FlashTreeCache`) are stacked into one
tensor, so a step costs one gather of the sources, one gather of the old contents, one select and one
indexed store, whatever the number of layers.

Overflow, with nothing lost: a sequence whose ``kv_seq_len[b] + accept_len[b]`` exceeds the capacity
(or, paged, whose destination falls on an unmapped page: a block-table entry outside
``[0, num_pages)`` or past ``max_pages``) writes its old contents back unchanged, keeps its
``kv_seq_len`` and is flagged in the returned bool ``[B]`` tensor. Reading that flag is the caller's
choice of host sync (``flashtree.speculative.generate`` reads it together with the accepted lengths it
needs anyway, and raises). ``check=True`` is the opt-in eager check: one host sync before anything is
written, and ``CacheOverflowError`` (a ``ValueError``) naming the sequence.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .. import _checks

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


def commit_accepted(k_cache: TensorOrLayers, v_cache: TensorOrLayers, current_k: TensorOrLayers,
                    current_v: TensorOrLayers, accepted_nodes: torch.Tensor, accept_len: torch.Tensor,
                    kv_seq_len: torch.Tensor, *, block_tables: torch.Tensor | None = None,
                    check: bool = False) -> torch.Tensor:
    """Move the accepted tree tokens' K/V into the cache after ``kv_seq_len`` and advance it (in place).

    Args:
        k_cache, v_cache: padded ``[B, Hkv, C, D]``, or paged ``[num_pages, Hkv, P, D]`` when
            ``block_tables`` is given; per layer: a stacked ``[L, ...]`` tensor or a list of L tensors.
            Written in place.
        current_k, current_v: ``[B, Hkv, T, D]`` per layer, stacked or listed like the cache.
        accepted_nodes: int ``[B, A]``: tree node ids (into T) of the accepted path, root first.
            Entries at or past ``accept_len[b]`` are ignored.
        accept_len: int ``[B]`` in ``[0, A]``: how many nodes each sequence keeps (0: none).
        kv_seq_len: int32 ``[B]``, advanced by ``accept_len`` where the commit fits.
        block_tables: int32 ``[B, max_pages]`` for a paged cache (page ``j // P`` of sequence b is
            ``block_tables[b, j // P]``); the pages the new tokens land on must be mapped already.
        check: opt-in host-side check (one sync) before writing: raises ``CacheOverflowError``.

    Returns:
        bool ``[B]``: True where the tokens did not fit (nothing of that sequence was written).
    """
    for name, x in (("kv_seq_len", kv_seq_len), ("accepted_nodes", accepted_nodes), ("accept_len", accept_len)):
        _checks.is_tensor(name, x)
    paged = block_tables is not None
    ks, vs = _layers("k_cache", k_cache, 4), _layers("v_cache", v_cache, 4)
    cks, cvs = _layers("current_k", current_k, 4), _layers("current_v", current_v, 4)
    num_layers = len(ks)
    for name, x in (("v_cache", vs), ("current_k", cks), ("current_v", cvs)):
        if len(x) != num_layers:
            raise ValueError(f"{name}: expected {num_layers} layers (as k_cache), got {len(x)}")
    bsz, hkv, t, d = cks[0].shape
    device = kv_seq_len.device
    if kv_seq_len.dtype != torch.int32:
        raise TypeError(f"kv_seq_len: expected dtype int32, got {kv_seq_len.dtype}")
    _checks.shape("kv_seq_len", kv_seq_len, (bsz,), "[B] (B = current_k.shape[0])")
    _check_index("accepted_nodes", accepted_nodes, (bsz, None), device)
    _check_index("accept_len", accept_len, (bsz,), device)
    width = accepted_nodes.shape[1]
    if width < 1:
        raise ValueError("accepted_nodes: expected at least one column [B, A >= 1], got A = 0")
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
    _checks.same_device(kv_seq_len=kv_seq_len, k_cache=ks[0], v_cache=vs[0], current_k=cks[0],
                        current_v=cvs[0], block_tables=block_tables)
    if paged:
        if block_tables.dtype != torch.int32:
            raise TypeError(f"block_tables: expected dtype int32, got {block_tables.dtype}")
        _checks.shape("block_tables", block_tables, (bsz, None), "[B, max_pages]")
        page = ks[0].shape[2]
        capacity = block_tables.shape[1] * page
    else:
        capacity = ks[0].shape[2]

    # Step 1: per-slot sources and destinations [B, A] (slots past the length repeat the last node).
    length = accept_len.to(torch.int64)
    base = kv_seq_len.to(torch.int64)
    slot = torch.minimum(torch.arange(width, device=device)[None, :], (length - 1).clamp(min=0)[:, None])
    nodes = accepted_nodes.to(torch.int64).gather(1, slot).clamp(0, t - 1)
    pos = base[:, None] + slot
    fits = base + length <= capacity
    if paged:
        page_slot = pos // page
        in_table = page_slot < block_tables.shape[1]
        page_id = block_tables.to(torch.int64).gather(1, page_slot.clamp(max=block_tables.shape[1] - 1))
        mapped = in_table & (page_id >= 0) & (page_id < ks[0].shape[0])
        fits = fits & mapped.all(1)
    overflow = ~fits
    ok = fits & (length > 0)
    if check:
        _raise_on_overflow(overflow, base, length, capacity, paged)
    # Rejected sequences rewrite one of their own valid positions with its old value.
    hold = (base - 1).clamp(min=0)[:, None].expand(-1, width)
    pos = torch.where(ok[:, None], pos, hold)
    if paged:
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
    return overflow


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
