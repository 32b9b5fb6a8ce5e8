"""Suite ``speculative``: one speculative verification step of a Llama-3-8B-shaped stack of attention layers.

L = 32 layers of attention only (H = 32, Hkv = 8, D = 128, bf16, random weights), B sequences with C cached
tokens each, the 64-token Medusa tree (``tree.MEDUSA_63`` + the root).

``op=attention``: the verification attention of all 32 layers.
- ``flashtree``: ``flash_decoding_attention`` per layer (padded cache, outputs preallocated);
  ``flashtree-paged``: the paged variant, 16-token pages.
- ``hf-sdpa``: what HF transformers does with ``attn_implementation="sdpa"`` and a 4-D tree mask (the way the
  Medusa and EAGLE reference code verify trees): ``DynamicCache.update``'s concatenation of cache and tree
  K/V, then ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` with a bool
  ``[B, 1, T, C + T]`` mask. Timed per layer, as the model runs it.
Floor: max(KV bytes / copy bandwidth, 4 B H T (C + T) D / matmul rate), times L.

``op=commit``: keeping the accepted path (5 nodes: depth 4 + the root) of every layer's tree K/V.
- ``flashtree``: ``flashtree.kvcache.commit_accepted`` on the stacked ``[2, L, ...]`` cache, all layers in
  one call (the timed call also resets kv_seq_len with one tiny copy, so every iteration does the same work).
- ``torch-loop``: the reference implementations' way: per layer, K and V, ``dst.copy_(src[..., idx, :])``
  with host-side offsets.
Floor: the bytes moved (read 5 tokens, write 5 tokens, per layer, K and V).
"""
from __future__ import annotations

import math

import torch

from ..suite import Case, Check, Provider, Suite, Unavailable, Verdict, grid

L, H, HKV, D = 32, 32, 8, 128
ACCEPT = 5  # accepted nodes per step in the commit workload (the Medusa-63 tree's depth + 1)
REL_TOL = 1e-2


def _medusa(device):
    from flashtree import tree

    parents, _ = tree.parents_from_paths(tree.MEDUSA_63)
    spec = tree.TreeSpec.from_parents(parents)
    return spec, spec.mask.to(device)


# ------------------------------------------------------------------------------ attention


def _attention_case(b, c, device):
    import flashtree

    spec, mask = _medusa(device)
    t = spec.num_nodes
    dt = torch.bfloat16

    def inputs():
        q = torch.randn(L, b, H, t, D, device=device, dtype=dt)
        kv = torch.randn(2, L, b, HKV, c, D, device=device, dtype=dt)
        cur = torch.randn(2, L, b, HKV, t, D, device=device, dtype=dt)
        lens = torch.full((b,), c, dtype=torch.int32, device=device)
        return q, kv, cur, mask, lens

    def flashtree_padded():
        def run(q, kv, cur, m, lens, out):
            for i in range(L):
                flashtree.flash_decoding_attention(q[i], kv[0, i], kv[1, i], cur[0, i], cur[1, i], m, lens, 64, c,
                                                   out[i], kv_group_num=H // HKV)
            return out

        return Provider(run, prepare=lambda q, kv, cur, m, lens: (q, kv, cur, m, lens, torch.empty_like(q)))

    def flashtree_paged():
        page = 16

        def prepare(q, kv, cur, m, lens):
            pages = c // page
            paged = kv.view(2, L, b, HKV, pages, page, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(
                2, L, b * pages, HKV, page, D)
            table = torch.arange(b * pages, dtype=torch.int32, device=device).view(b, pages)
            return q, paged, table, cur, m, lens, torch.empty_like(q)

        def run(q, pages, table, cur, m, lens, out):
            for i in range(L):
                flashtree.flash_decoding_attention_paged(q[i], pages[0, i], pages[1, i], table, lens, cur[0, i],
                                                         cur[1, i], m, 64, c, out[i], kv_group_num=H // HKV)
            return out

        return Provider(run, prepare=prepare)

    def hf_sdpa():
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
        except Exception as e:  # noqa: BLE001
            return Unavailable(f"transformers sdpa_attention_forward: {type(e).__name__}: {e}")

        class _Layer(torch.nn.Module):  # the attributes HF's attention function reads
            def __init__(self):
                super().__init__()
                self.num_key_value_groups = H // HKV
                self.is_causal = True
                self.training = False

        module = _Layer()

        def prepare(q, kv, cur, m, lens):
            full = torch.ones(b, 1, t, c + t, dtype=torch.bool, device=device)
            full[..., c:] = m
            return q, kv, cur, full

        def run(q, kv, cur, full):
            outs = []
            for i in range(L):
                k = torch.cat([kv[0, i], cur[0, i]], -2)  # DynamicCache.update
                v = torch.cat([kv[1, i], cur[1, i]], -2)
                o, _ = sdpa_attention_forward(module, q[i], k, v, full, scaling=1 / math.sqrt(D))
                outs.append(o)  # [B, T, H, D]
            return outs

        return Provider(run, prepare=prepare,
                        normalize=lambda outs: [o.transpose(1, 2) for o in outs])

    def reference(q, kv, cur, m, lens):
        from flashtree import reference as ref

        return {i: ref.tree_decode(q[i].double(), kv[0, i].double(), kv[1, i].double(), cur[0, i].double(),
                                   cur[1, i].double(), m, lens.cpu(), 1 / math.sqrt(D))[0] for i in (0, L - 1)}

    def compare(out, expected) -> Verdict:
        worst = max(((out[i].double() - e).norm() / e.norm()).item() for i, e in expected.items())
        return Verdict(worst <= REL_TOL, f"relative error {worst:.1e} on layers 0 and {L - 1} (tol {REL_TOL:.0e})")

    return Case(
        inputs=inputs,
        providers={"flashtree": flashtree_padded(), "flashtree-paged": flashtree_paged(), "hf-sdpa": hf_sdpa()},
        nbytes=L * (2 * b * HKV * (c + t) * D * 2 + 2 * b * H * t * D * 2),
        flops=L * 4 * b * H * t * (c + t) * D,
        check=Check(reference=reference, compare=compare),
    )


# --------------------------------------------------------------------------------- commit


def _commit_case(b, c, device):
    from flashtree.kvcache import commit_accepted

    spec, _ = _medusa(device)
    t = spec.num_nodes
    path = [int(x) for x in spec.retrieve_indices[-1] if x >= 0][:ACCEPT]
    path += [path[-1]] * (ACCEPT - len(path))
    start = c - 2 * t  # room left for the accepted tokens
    dt = torch.bfloat16

    def inputs():
        kv = torch.randn(2, L, b, HKV, c, D, device=device, dtype=dt)
        cur = torch.randn(2, L, b, HKV, t, D, device=device, dtype=dt)
        nodes = torch.tensor(path, device=device).expand(b, ACCEPT).contiguous()
        length = torch.full((b,), ACCEPT, dtype=torch.int64, device=device)
        lens0 = torch.full((b,), start, dtype=torch.int32, device=device)
        return kv, cur, nodes, length, lens0

    def flashtree_commit():
        def run(kv, cur, nodes, length, lens0, lens):
            lens.copy_(lens0)
            commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens)
            return kv

        return Provider(run, prepare=lambda kv, cur, nodes, length, lens0: (kv, cur, nodes, length, lens0,
                                                                             lens0.clone()))

    def torch_loop():
        def prepare(kv, cur, nodes, length, lens0):
            return kv, cur, nodes[0].clone()

        def run(kv, cur, idx):
            for s in range(2):
                for i in range(L):
                    kv[s, i, :, :, start:start + ACCEPT].copy_(cur[s, i].index_select(2, idx))
            return kv

        return Provider(run, prepare=prepare)

    def reference(kv, cur, nodes, length, lens0):
        idx = torch.tensor(path, device=device)
        return cur.index_select(4, idx)

    def compare(kv, expected) -> Verdict:
        got = kv[..., start:start + ACCEPT, :]
        ok = torch.equal(got, expected)
        return Verdict(ok, "bitwise equal" if ok else "the committed K/V differ")

    moved = 2 * L * b * HKV * ACCEPT * D * 2
    return Case(
        inputs=inputs,
        providers={"flashtree": flashtree_commit(), "torch-loop": torch_loop()},
        nbytes=2 * moved, flops=0,
        check=Check(reference=reference, compare=compare),
    )


def setup(params: dict, device: torch.device) -> Case:
    if params["op"] == "attention":
        return _attention_case(params["B"], params["C"], device)
    return _commit_case(params["B"], params["C"], device)


WORKLOADS = grid(op=["attention", "commit"], B=[1, 4], C=[4096, 16384])

SUITE = Suite(
    name="speculative",
    description="one verification step of 32 Llama-3-8B attention layers (H=32, Hkv=8, D=128, bf16), "
                "Medusa-63 tree: attention (flashtree vs HF sdpa + 4-D mask) and KV commit",
    workloads=WORKLOADS,
    quick=[w for w in WORKLOADS if w["B"] == 1 and w["C"] == 4096],
    setup=setup,
    label=lambda p: f"{p['op']} B={p['B']} C={p['C']}",
)
