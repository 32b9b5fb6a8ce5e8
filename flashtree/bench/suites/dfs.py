"""Suite ``dfs``: packed tree attention for training (DFS-order masks), Llama-3-8B heads (H=32, Hkv=8, D=128), bf16.

Each workload packs trees back to back; query i sees key j iff both lie in the same tree, j <= i and
``start_q[i] <= end_k[j]`` (prompt -> its responses; a deep tree: every token its ancestors and itself).
Each workload runs twice: ``fwd`` (the forward pass) and ``fwd+bwd`` (forward, then dq, dk, dv from a random
upstream gradient, through ``torch.autograd.grad``).

Providers:
- ``flashtree``: ``flashtree.tree_attention`` on the packed layout.
- ``flex``: FlexAttention on the packed layout ``[1, H, N, D]`` with the same rule as a ``mask_mod``; the block
  mask is built by ``create_block_mask`` in ``prepare`` (not timed).
- ``sdpa``: SDPA, flash backend, causal, on the layout with the prompt copied per response: one row per
  root-to-leaf path (for the random tree the rows are right-padded to the longest path; causal attention
  keeps the padding out of the real tokens, but its work is timed: that is the cost of the layout). The copy
  is made in ``prepare`` (not timed). Its outputs are mapped back to the packed layout for the check: each
  packed token's output from its first copy; gradients summed over the copies (the upstream gradient of a
  copied prompt token is given to its first copy only, so the sums are the packed gradients).

Metric: effective TFLOP/s over visible pairs: ``4 H D`` flops per visible (query, key) pair for the forward
pass; the backward pass does 2.5x the forward's matmul work (five matmuls to the forward's two), so
``fwd+bwd`` counts ``3.5 x 4 H D`` per pair. Every provider is credited with the same flops, whatever it
computes (the SDPA peer recomputes the prompt per response; FlexAttention and flashtree skip invisible tiles).
Floor: max(essential bytes / copy bandwidth, flops / matmul rate); the flops dominate.

Check: every provider against a float64 reference (forward: ``flashtree.reference.tree_attention``;
backward: the same, differentiated by hand in query chunks, so memory stays O(chunk x sequence)), by
relative error norm, on the first input set of every workload.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..suite import Case, Check, Provider, Suite, Unavailable, Verdict

H, HKV, D = 32, 8, 128
G = H // HKV
DTYPE = torch.bfloat16
BWD_FACTOR = 2.5  # backward matmul work / forward matmul work; fwd+bwd counts 1 + 2.5 = 3.5x the forward
O_REL_TOL = 1e-2  # bf16 operands: relative error norms of o land between 1e-3 and 5e-3
GRAD_REL_TOL = 2e-2  # dq, dk, dv accumulate longer bf16 products: up to about 1e-2
REFERENCE_CHUNK = 512  # query rows per float64 reference block: [H, 512, L] per temporary


# Trees ------------------------------------------------------------------------------------------------


def star(prompt: int, responses: int, response_len: int) -> tuple[list[int], list[int]]:
    """``(parents, node_lens)`` of a prompt with ``responses`` children, in pre-order."""
    return [-1] + [0] * responses, [prompt] + [response_len] * responses


def random_deep_tree(tokens: int, nodes: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random tree in pre-order: ``nodes`` nodes of random lengths (>= 1) summing to ``tokens``.

    Node i hangs off the path from the root to node i - 1: off node i - 1 itself half of the time (the
    branch goes deeper), otherwise off a uniformly chosen non-root node of that path (a new branch; the root,
    a shared system prompt, gets one child).
    """
    g = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(tokens - 1, generator=g)[: nodes - 1] + 1).sort().values.tolist()
    lens = [b - a for a, b in zip([0] + cuts, cuts + [tokens])]
    parents, path = [-1], [0]
    for node in range(1, nodes):
        if torch.rand((), generator=g) < 0.5:
            depth = len(path) - 1
        else:
            depth = int(torch.randint(min(1, len(path) - 1), len(path), (), generator=g))
        del path[depth + 1:]
        parents.append(path[-1])
        path.append(node)
    return parents, lens


def workload_trees(params: dict) -> list[tuple[list[int], list[int]]]:
    if params["tree"] == "groups":
        return [star(params["prompt"], params["responses"], params["response_len"])] * params["trees"]
    return [random_deep_tree(params["tokens"], params["nodes"], params["seed"])]


def packed_arrays(trees) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(start_q, end_k, cu_seqlens)`` int32 on the CPU for trees packed back to back."""
    from flashtree import tree

    starts, ends = zip(*(tree.dfs_arrays_from_parents(p, lens) for p, lens in trees))
    seq_lens = [sum(lens) for _, lens in trees]
    cu = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32)
    return torch.cat(starts), torch.cat(ends), cu


def path_indices(trees) -> list[torch.Tensor]:
    """Packed token indices (int64) of every root-to-leaf path, tree after tree."""
    paths, offset = [], 0
    for parents, lens in trees:
        first = torch.tensor([0] + lens).cumsum(0) + offset
        tokens = [torch.arange(int(first[k]), int(first[k + 1])) for k in range(len(lens))]
        for leaf in sorted(set(range(len(parents))) - set(parents)):
            chain, node = [], leaf
            while node >= 0:
                chain.append(tokens[node])
                node = parents[node]
            paths.append(torch.cat(chain[::-1]))
        offset += sum(lens)
    return paths


def visible_pairs(trees) -> int:
    from flashtree import tree

    return tree.tree_visible_pairs(*packed_arrays(trees))


# Reference --------------------------------------------------------------------------------------------


def reference_forward(q, k, v, cu, start_q, end_k):
    """float64 ``o [N, H, D]`` and ``lse [N, H]``."""
    from flashtree import reference

    scale = 1 / math.sqrt(q.shape[-1])
    return reference.tree_attention(q.double(), k.double(), v.double(), cu, start_q, end_k, scale,
                                    query_chunk=REFERENCE_CHUNK)


def reference_backward(q, k, v, do, cu, start_q, end_k):
    """float64 ``(dq, dk, dv)`` of ``sum(o * do)``, by hand, one block of query rows at a time.

    With ``P = exp(S - lse)`` (masked), ``delta = rowsum(dO * O)``: ``dV = P^T dO``, ``dS = P (dO V^T -
    delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``; dk and dv are summed over each GQA group.
    """
    q, k, v, do = (x.detach().double() for x in (q, k, v, do))
    o, lse = reference_forward(q, k, v, cu, start_q, end_k)
    n, h, d = q.shape
    g = h // k.shape[1]
    scale = 1 / math.sqrt(d)
    delta = (do * o).sum(-1)  # [N, H]
    dq = torch.zeros_like(q)
    dk_heads = torch.zeros(n, h, d, dtype=torch.float64, device=q.device)
    dv_heads = torch.zeros_like(dk_heads)
    sq, ek = start_q.to(q.device, torch.int64), end_k.to(q.device, torch.int64)
    bounds = cu.tolist()
    for first, last in zip(bounds[:-1], bounds[1:]):
        ks = k[first:last].transpose(0, 1).repeat_interleave(g, 0)  # [H, L, D]
        vs = v[first:last].transpose(0, 1).repeat_interleave(g, 0)
        keys = torch.arange(first, last, device=q.device)
        for c0 in range(first, last, REFERENCE_CHUNK):
            c1 = min(c0 + REFERENCE_CHUNK, last)
            rows = torch.arange(c0, c1, device=q.device)
            allowed = (keys[None, :] <= rows[:, None]) & (sq[c0:c1, None] <= ek[None, first:last])
            qc, doc = q[c0:c1].transpose(0, 1), do[c0:c1].transpose(0, 1)  # [H, c, D]
            p = torch.exp((qc @ ks.transpose(1, 2)) * scale - lse[c0:c1].T[..., None])
            p = p.masked_fill(~allowed, 0.0)  # [H, c, L]
            ds = p * (doc @ vs.transpose(1, 2) - delta[c0:c1].T[..., None])
            dq[c0:c1] = (scale * ds @ ks).transpose(0, 1)
            dk_heads[first:last] += (scale * ds.transpose(1, 2) @ qc).transpose(0, 1)
            dv_heads[first:last] += (p.transpose(1, 2) @ doc).transpose(0, 1)
    fold = lambda x: x.view(n, h // g, g, d).sum(2)  # noqa: E731 - query heads -> their KV head
    return dq, fold(dk_heads), fold(dv_heads)


def _rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def compare_forward(out, expected) -> Verdict:
    if out.shape != expected[0].shape:
        return Verdict(False, f"o shape {tuple(out.shape)}, expected {tuple(expected[0].shape)}")
    err = _rel_err(out, expected[0])
    return Verdict(err <= O_REL_TOL, f"o relative error {err:.1e} (tol {O_REL_TOL:.0e})")  # False for NaN


def compare_backward(out, expected) -> Verdict:
    errs = []
    for name, x, ref in zip(("dq", "dk", "dv"), out, expected):
        if x.shape != ref.shape:
            return Verdict(False, f"{name} shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
        errs.append((name, _rel_err(x, ref)))
    ok = all(e <= GRAD_REL_TOL for _, e in errs)
    return Verdict(ok, ", ".join(f"{n} {e:.1e}" for n, e in errs) + f" relative error (tol {GRAD_REL_TOL:.0e})")


# Providers --------------------------------------------------------------------------------------------


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@functools.cache
def _flashtree_op():
    try:
        import flashtree

        return flashtree.tree_attention
    except Exception as e:  # noqa: BLE001 - reported, and the peers still run
        return Unavailable(f"flashtree.tree_attention: {type(e).__name__}: {e}")


def _flashtree(backward: bool):
    op = _flashtree_op()
    if isinstance(op, Unavailable):
        return op
    if not backward:
        return Provider(lambda q, k, v, cu, sq, ek: op(q, k, v, cu, sq, ek))
    return Provider(lambda q, k, v, do, cu, sq, ek: _grads(op(q, k, v, cu, sq, ek), (q, k, v), do))


@functools.cache
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _leaf(x: torch.Tensor, backward: bool) -> torch.Tensor:
    """A contiguous copy in the peer's layout; a leaf that requires grad for the backward pass."""
    return x.detach().contiguous().requires_grad_(backward)


def _flex(backward: bool):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
        flex = _flex_fn()
    except Exception as e:  # noqa: BLE001
        return Unavailable(f"flex_attention: {type(e).__name__}: {e}")

    def block_mask(cu, sq, ek, n, device):
        seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), torch.diff(cu.long()))

        def tree_rule(b, h, qi, ki):
            return (seq[qi] == seq[ki]) & (ki <= qi) & (sq[qi] <= ek[ki])

        return create_block_mask(tree_rule, None, None, n, n, device=device)

    to_flex = lambda x, bwd: _leaf(x.transpose(0, 1)[None], bwd)  # noqa: E731 - [N, h, D] -> [1, h, N, D]
    from_flex = lambda x: x[0].transpose(0, 1)  # noqa: E731

    if not backward:
        def prepare(q, k, v, cu, sq, ek):
            return (*(to_flex(x, False) for x in (q, k, v)), block_mask(cu, sq, ek, q.shape[0], q.device))

        return Provider(lambda q, k, v, bm: flex(q, k, v, block_mask=bm, enable_gqa=True), prepare=prepare,
                        normalize=from_flex)

    def prepare_bwd(q, k, v, do, cu, sq, ek):
        return (*(to_flex(x, True) for x in (q, k, v)), to_flex(do, False),
                block_mask(cu, sq, ek, q.shape[0], q.device))

    return Provider(lambda q, k, v, do, bm: _grads(flex(q, k, v, block_mask=bm, enable_gqa=True), (q, k, v), do),
                    prepare=prepare_bwd, normalize=lambda grads: tuple(from_flex(x) for x in grads))


@functools.cache
def _sdpa_flash_takes_gqa(device_type: str) -> bool:
    """Whether SDPA's flash backend runs grouped K/V heads here (else K/V heads are expanded in prepare)."""
    if device_type != "cuda":
        return True
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 4, 8, 64, device="cuda", dtype=DTYPE)
    kv = torch.zeros(1, 1, 8, 64, device="cuda", dtype=DTYPE)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    except RuntimeError:
        return False
    return True


class _PathLayout:
    """Every root-to-leaf path as one row, right-padded: ``[B, L_max]`` packed indices."""

    def __init__(self, paths: list[torch.Tensor], n: int, device):
        longest = max(p.numel() for p in paths)
        self.index = torch.zeros(len(paths), longest, dtype=torch.int64)
        self.valid = torch.zeros(len(paths), longest, dtype=torch.bool)
        for row, p in enumerate(paths):
            self.index[row, : p.numel()] = p
            self.valid[row, : p.numel()] = True
        flat_valid = self.valid.flatten().nonzero().flatten()
        flat_index = self.index.flatten()[flat_valid]
        first = torch.full((n,), -1, dtype=torch.int64)
        first.scatter_reduce_(0, flat_index, flat_valid, reduce="amin", include_self=False)  # first copy of each
        self.first, self.flat_valid, self.flat_index = first.to(device), flat_valid.to(device), flat_index.to(device)
        self.index, self.valid = self.index.to(device), self.valid.to(device)
        self.shape = tuple(self.index.shape)

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``[N, h, D]`` -> copied ``[B, h, L_max, D]`` (padding rows hold token 0: never seen by a real
        query, causal attention keeps them after every real token)."""
        return x[self.index].permute(0, 2, 1, 3)

    def first_copy_only(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``[N, h, D]`` -> ``[B, h, L_max, D]``: each token's values at its first copy, zeros elsewhere."""
        out = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:])
        out[self.first] = x
        return out.view(*self.shape, *x.shape[1:]).permute(0, 2, 1, 3)

    def gather_first(self, y: torch.Tensor) -> torch.Tensor:
        """Copied ``[B, h, L_max, D]`` -> packed ``[N, h, D]`` from each token's first copy."""
        return y.permute(0, 2, 1, 3).reshape(-1, y.shape[1], y.shape[3])[self.first]

    def sum_copies(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """Copied ``[B, h, L_max, D]`` -> packed ``[N, h, D]``, summed over the copies of each token."""
        flat = y.permute(0, 2, 1, 3).reshape(-1, y.shape[1], y.shape[3])
        return flat.new_zeros(n, y.shape[1], y.shape[3]).index_add_(0, self.flat_index, flat[self.flat_valid])


def _sdpa(backward: bool, layout: _PathLayout, n: int, device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
    gqa = _sdpa_flash_takes_gqa(device.type)

    def attend(q, k, v):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def kv_copy(x, bwd):
        y = layout.copy(x)
        return _leaf(y if gqa else y.repeat_interleave(G, 1), bwd)

    def fold_kv(dx):  # the gradient of expanded K/V heads, summed back per KV head
        return dx if gqa else dx.view(dx.shape[0], HKV, G, *dx.shape[2:]).sum(2)

    if not backward:
        return Provider(attend, prepare=lambda q, k, v, cu, sq, ek: (_leaf(layout.copy(q), False),
                                                                    kv_copy(k, False), kv_copy(v, False)),
                        normalize=layout.gather_first)

    def prepare_bwd(q, k, v, do, cu, sq, ek):
        return (_leaf(layout.copy(q), True), kv_copy(k, True), kv_copy(v, True),
                layout.first_copy_only(do).contiguous())

    def normalize(grads):
        dq, dk, dv = grads
        return layout.sum_copies(dq, n), layout.sum_copies(fold_kv(dk), n), layout.sum_copies(fold_kv(dv), n)

    return Provider(lambda q, k, v, do: _grads(attend(q, k, v), (q, k, v), do), prepare=prepare_bwd,
                    normalize=normalize)


# Suite ------------------------------------------------------------------------------------------------


def essential_bytes(n: int, backward: bool) -> int:
    """Forward: read q, k, v, write o and lse. Backward adds: read q, k, v, o, do, lse, write dq, dk, dv."""
    q_o = n * H * D * 2
    kv = n * HKV * D * 2
    forward = 2 * q_o + 2 * kv + n * H * 4
    return forward + (4 * q_o + 4 * kv + n * H * 4 if backward else 0)


def setup(params: dict, device: torch.device) -> Case:
    trees = workload_trees(params)
    backward = params["mode"] == "fwd+bwd"
    start_q, end_k, cu = packed_arrays(trees)
    n = start_q.numel()
    pairs = visible_pairs(trees)
    sq, ek, cu_d = start_q.to(device), end_k.to(device), cu.to(device)
    layout = _PathLayout(path_indices(trees), n, device)

    def inputs():
        q = torch.randn(n, H, D, device=device, dtype=DTYPE).requires_grad_(backward)
        k = torch.randn(n, HKV, D, device=device, dtype=DTYPE).requires_grad_(backward)
        v = torch.randn(n, HKV, D, device=device, dtype=DTYPE).requires_grad_(backward)
        if backward:
            return q, k, v, torch.randn(n, H, D, device=device, dtype=DTYPE), cu_d, sq, ek
        return q, k, v, cu_d, sq, ek

    if backward:
        check = Check(reference=reference_backward, compare=compare_backward)
    else:
        check = Check(reference=lambda q, k, v, cu, s, e: reference_forward(q, k, v, cu, s, e), compare=compare_forward)
    forward_flops = 4 * H * D * pairs
    return Case(
        inputs=inputs,
        providers={"flashtree": _flashtree(backward), "flex": _flex(backward),
                   "sdpa": _sdpa(backward, layout, n, device)},
        nbytes=essential_bytes(n, backward),
        flops=round(forward_flops * (1 + BWD_FACTOR)) if backward else forward_flops,
        check=check,
    )


def _label(p: dict) -> str:
    if p["tree"] == "groups":
        shape = f"{p['trees']}x({p['prompt']}+{p['responses']}x{p['response_len']})"
    else:
        shape = f"random tree {p['tokens']} tok/{p['nodes']} nodes"
    return f"{shape} {p['mode']}"


TREES = [dict(tree="groups", trees=4, prompt=2048, responses=8, response_len=512),
         dict(tree="groups", trees=2, prompt=1024, responses=16, response_len=256),
         dict(tree="random", tokens=8192, nodes=64, seed=0)]
WORKLOADS = [dict(t, mode=m) for t in TREES for m in ("fwd", "fwd+bwd")]

SUITE = Suite(
    name="dfs",
    description="packed tree attention (DFS masks): q [N,32,128], k/v [N,8,128] bf16; fwd and fwd+bwd",
    workloads=WORKLOADS,
    quick=[w for w in WORKLOADS if w["tree"] == "groups" and w["trees"] == 2],
    setup=setup,
    label=_label,
)
