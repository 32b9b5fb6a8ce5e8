"""Plain-torch references for every flashtree op: slow, exact, and the CPU path.

They compute in float64 and return the input's dtype (lse stays in lse's dtype). Tests compare the
kernels against these on float64 inputs; CPU tensors passed to a public op come here.
"""
from __future__ import annotations

import torch


def merge_states(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention states.

    o:   [N, S, H, D]   partial outputs, each normalised over its own keys
    lse: [N, S, H]      natural-log sum of exp of each partial's scores
    returns (o_merged [N, H, D] in o's dtype, lse_merged [N, H] in lse's dtype).

    A partial with lse = -inf contributes nothing, whatever its o holds (NaN included). A row whose
    partials are all -inf gives o = 0 and lse = -inf.
    """
    l64 = lse.to(torch.float64)
    o64 = o.to(torch.float64)
    empty = torch.isneginf(l64)  # [N, S, H]
    m = l64.masked_fill(empty, float("-inf")).amax(dim=1, keepdim=True)  # [N, 1, H]
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(l64 - m).masked_fill(empty, 0.0)  # [N, S, H]
    total = w.sum(dim=1)  # [N, H]
    o64 = o64.masked_fill(empty[..., None], 0.0)
    o_sum = (w[..., None] * o64).sum(dim=1)  # [N, H, D]
    has = total > 0
    o_out = torch.where(has[..., None], o_sum / total.clamp_min(1e-300)[..., None], torch.zeros_like(o_sum))
    lse_out = torch.where(has, m.squeeze(1) + torch.log(total.clamp_min(1e-300)), torch.full_like(total, float("-inf")))
    return o_out.to(o.dtype), lse_out.to(lse.dtype)


def attention_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float):
    """Masked attention with its lse, in float64: the building block of the other references.

    q: [..., M, D], k and v: [..., L, D], allowed: bool broadcastable to [..., M, L].
    returns (o [..., M, D] float64, lse [..., M] float64); rows with nothing allowed give o = 0,
    lse = -inf. Disallowed keys are excluded before any arithmetic, so NaN there never leaks.
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    allowed = allowed.expand(*q64.shape[:-1], k64.shape[-2])
    k64 = torch.where(torch.isfinite(k64), k64, torch.zeros_like(k64))
    v64 = torch.where(torch.isfinite(v64), v64, torch.zeros_like(v64))
    s = (q64 @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
    p = p.masked_fill(~allowed, 0.0)
    return p @ v64, lse


def tree_decode(q, k_cache, v_cache, current_k, current_v, mask, kv_seq_len, sm_scale):
    """Tree-verification attention: every tree token attends the whole cached prefix of its
    sequence plus the tree tokens its mask allows.

    q [B, H, T, D]; k_cache, v_cache [B, Hkv, C, D] (first kv_seq_len[b] positions valid);
    current_k, current_v [B, Hkv, T, D]; mask bool [T, T] or [B, T, T] (True = may attend);
    kv_seq_len int [B]. Returns (o [B, H, T, D] in q's dtype, lse [B, H, T] float32).
    """
    bsz, h, t, _ = q.shape
    g = h // k_cache.shape[1]
    mask = mask.expand(bsz, t, t)
    outs, lses = [], []
    for b in range(bsz):
        n = int(kv_seq_len[b])
        k = torch.cat([k_cache[b, :, :n], current_k[b]], dim=1).repeat_interleave(g, dim=0)  # [H, n+T, D]
        v = torch.cat([v_cache[b, :, :n], current_v[b]], dim=1).repeat_interleave(g, dim=0)
        allowed = torch.cat([torch.ones(t, n, dtype=torch.bool, device=q.device), mask[b].bool()], dim=1)
        o, lse = attention_state(q[b], k, v, allowed, sm_scale)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs).to(q.dtype), torch.stack(lses).float()


def gather_pages(pages: torch.Tensor, block_tables: torch.Tensor, kv_seq_len) -> torch.Tensor:
    """A paged cache [num_pages, Hkv, P, D] as a padded one [B, Hkv, max_pages * P, D].

    Only the pages that hold valid tokens are read; other table entries may hold anything.
    """
    bsz, max_pages = block_tables.shape
    page = pages.shape[2]
    needed = (torch.as_tensor(kv_seq_len).to(block_tables.device)[:, None] + page - 1) // page
    used = torch.arange(max_pages, device=block_tables.device)[None, :] < needed
    idx = torch.where(used, block_tables.long(), torch.zeros_like(block_tables, dtype=torch.long))
    out = pages[idx.flatten()].view(bsz, max_pages, *pages.shape[1:])  # [B, pages, Hkv, P, D]
    return out.permute(0, 2, 1, 3, 4).reshape(bsz, pages.shape[1], max_pages * page, pages.shape[3])


def tree_attention(q, k, v, cu_seqlens, start_q, end_k, softmax_scale, *, query_chunk=1024):
    """Packed tree attention with DFS-order arrays (the rule of ``flashtree.tree_attention``).

    q [N, H, D]; k, v [N, Hkv, D] (H a multiple of Hkv: query head h reads KV head h // (H / Hkv));
    cu_seqlens int [num_seqs + 1]; start_q, end_k int [N]. Query i may attend key j iff both lie in
    the same packed sequence, j <= i and start_q[i] <= end_k[j].

    Returns (o [N, H, D] in q's dtype, lse [N, H] natural log: float64 for float64 q, else float32).
    Differentiable by autograd in q, k and v. Memory: one [H, query_chunk, L] block at a time per
    sequence of length L (never an N x N mask). A query that sees no key gets o = 0, lse = -inf.
    """
    n, h, d = q.shape
    g = h // k.shape[1]
    cu = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    sq = torch.as_tensor(start_q).to(q.device, torch.int64)
    ek = torch.as_tensor(end_k).to(q.device, torch.int64)
    outs, lses = [], []
    for first, last in zip(cu[:-1], cu[1:]):
        ks = k[first:last].transpose(0, 1).repeat_interleave(g, dim=0)  # [H, L, D]
        vs = v[first:last].transpose(0, 1).repeat_interleave(g, dim=0)
        key = torch.arange(first, last, device=q.device)
        for c0 in range(first, last, query_chunk):
            c1 = min(c0 + query_chunk, last)
            row = torch.arange(c0, c1, device=q.device)
            allowed = (key[None, :] <= row[:, None]) & (sq[c0:c1, None] <= ek[None, first:last])
            o, lse = attention_state(q[c0:c1].transpose(0, 1), ks, vs, allowed, softmax_scale)
            outs.append(o.transpose(0, 1))   # [chunk, H, D]
            lses.append(lse.transpose(0, 1))  # [chunk, H]
    if not outs:
        return q.new_zeros(q.shape), torch.zeros(n, h, dtype=torch.float32, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.cat(outs).to(q.dtype), torch.cat(lses).to(lse_dtype)


def deft_attention(q, k_pool, v_pool, leaf_slots, leaf_num_queries, tail_masks, sm_scale):
    """Tree decoding, one root-to-leaf path at a time (the rule of ``flashtree.deft_attention``).

    q [Q, H, D], rows grouped by leaf in order, leaf i owning leaf_num_queries[i] rows;
    k_pool, v_pool [num_pages, Hkv, P, D]; leaf_slots[i]: int slots (page * P + row) of leaf i's path,
    root first, its last n_i tokens being its query tokens; tail_masks[i]: bool [n_i, n_i] among
    them (True = may attend) or None (all visible; n_i <= 1). Query row r of leaf i attends every
    path token before the tail and tail token j iff tail_masks[i][r, j].

    Returns (o [Q, H, D] in q's dtype, lse [Q, H] float32), computed in float64.
    """
    nq, h, d = q.shape
    page = k_pool.shape[2]
    g = h // k_pool.shape[1]
    o_out = torch.zeros(nq, h, d, dtype=torch.float64, device=q.device)
    lse_out = torch.full((nq, h), float("-inf"), dtype=torch.float64, device=q.device)
    row = 0
    for slots, n, tail in zip(leaf_slots, leaf_num_queries, tail_masks):
        if n == 0:
            continue
        s = torch.as_tensor(slots, dtype=torch.int64, device=k_pool.device)
        k = k_pool[s // page, :, s % page].transpose(0, 1).repeat_interleave(g, dim=0)  # [H, L, D]
        v = v_pool[s // page, :, s % page].transpose(0, 1).repeat_interleave(g, dim=0)
        allowed = torch.ones(n, len(s), dtype=torch.bool, device=q.device)
        if tail is not None:
            allowed[:, len(s) - n:] = torch.as_tensor(tail, dtype=torch.bool, device=q.device)
        o, lse = attention_state(q[row: row + n].transpose(0, 1), k.to(q.device), v.to(q.device), allowed, sm_scale)
        o_out[row: row + n] = o.transpose(0, 1)
        lse_out[row: row + n] = lse.transpose(0, 1)
        row += n
    return o_out.to(q.dtype), lse_out.float()
