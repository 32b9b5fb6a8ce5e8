"""Suite ``verify``: speculative-decoding tree verification, Llama-3-8B heads (H=32, Hkv=8, D=128), bf16.

B sequences each hold C cached tokens and a draft tree of T tokens (a random tree, or Medusa's 63-choice
tree); every tree token attends the whole cache plus its tree ancestors.

Providers:
- ``flashtree``: ``flash_decoding_attention`` (padded cache), block_size 64; ``flashtree-paged``: the paged
  variant with 16-token pages (the target: within 10% of padded).
- ``sdpa``: ``scaled_dot_product_attention`` with a dense [T, C+T] bool mask over the cache concatenated with
  the tree tokens (the concatenation is timed: it is what a caller must do).
- ``flex``: FlexAttention with a block mask over pre-concatenated K/V (concatenation not timed).
- ``flashinfer``: ``BatchPrefillWithPagedKVCacheWrapper`` with a dense custom mask (when installed).
Floor: max(KV bytes / copy bandwidth, 4 B H T (C+T) D / matmul rate).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..peers import import_peer
from ..suite import Case, Check, Provider, Suite, Unavailable, Verdict

H, HKV, D = 32, 8, 128
REL_TOL = 1e-2  # bf16 operands: relative error norms land between 1e-3 and 1e-2


def _tree_mask(t: int, device, seed: int = 0) -> torch.Tensor:
    from flashtree import tree

    if t == 64:  # the widely used Medusa tree: 63 choices + the root
        parents, _ = tree.parents_from_paths(tree.MEDUSA_63)
    else:
        g = torch.Generator().manual_seed(seed + t)
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    return tree.ancestor_mask(parents).to(device)


def _flashtree(paged: bool):
    try:
        import flashtree
    except Exception as e:  # noqa: BLE001
        return Unavailable(f"flashtree: {type(e).__name__}: {e}")
    if not paged:
        return Provider(lambda q, kc, vc, ck, cv, m, lens: flashtree.flash_decoding_attention(
            q, kc, vc, ck, cv, m, lens, 64, None, None, None, None, None, H // HKV))
    page = 16

    def prepare(q, kc, vc, ck, cv, m, lens):
        b, hkv, c, d = kc.shape
        pages = c // page
        kp = kc.view(b, hkv, pages, page, d).transpose(1, 2).reshape(b * pages, hkv, page, d)
        vp = vc.view(b, hkv, pages, page, d).transpose(1, 2).reshape(b * pages, hkv, page, d)
        table = torch.arange(b * pages, dtype=torch.int32, device=q.device).view(b, pages)
        return q, kp, vp, table, lens, ck, cv, m

    return Provider(
        lambda q, kp, vp, table, lens, ck, cv, m: flashtree.flash_decoding_attention_paged(
            q, kp, vp, table, lens, ck, cv, m, 64, None, None, None, None, None, H // HKV),
        prepare=prepare)


def _sdpa():
    def prepare(q, kc, vc, ck, cv, m, lens):
        t, c = m.shape[0], kc.shape[2]
        full = torch.cat([torch.ones(t, c, dtype=torch.bool, device=q.device), m], 1)
        return q, kc, vc, ck, cv, full

    return Provider(
        lambda q, kc, vc, ck, cv, full: F.scaled_dot_product_attention(
            q, torch.cat([kc, ck], 2), torch.cat([vc, cv], 2), attn_mask=full, enable_gqa=True),
        prepare=prepare)


@functools.cache
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask
        flex = _flex_fn()
    except Exception as e:  # noqa: BLE001
        return Unavailable(f"flex_attention: {type(e).__name__}: {e}")

    def prepare(q, kc, vc, ck, cv, m, lens):
        t, c = m.shape[0], kc.shape[2]

        def mask_mod(b, h, qi, ki):
            return (ki < c) | m[qi, (ki - c).clamp(min=0)]

        bm = create_block_mask(mask_mod, None, None, t, c + t, device=q.device)
        return q, torch.cat([kc, ck], 2), torch.cat([vc, cv], 2), bm

    return Provider(lambda q, k, v, bm: flex(q, k, v, block_mask=bm, enable_gqa=True), prepare=prepare)


def _flashinfer():
    fi = import_peer("flashinfer")
    if isinstance(fi, Unavailable):
        return fi
    page = 16

    def prepare(q, kc, vc, ck, cv, m, lens):
        b, hkv, c, d = kc.shape
        t = q.shape[2]
        n = c + t
        npg = math.ceil(n / page)
        kv = torch.zeros(b, npg * page, 2, hkv, d, device=q.device, dtype=q.dtype)
        kv[:, :n, 0] = torch.cat([kc, ck], 2).transpose(1, 2)
        kv[:, :n, 1] = torch.cat([vc, cv], 2).transpose(1, 2)
        kv = kv.view(b, npg, page, 2, hkv, d).permute(0, 1, 3, 2, 4, 5).reshape(b * npg, 2, page, hkv, d).contiguous()
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        dev = q.device
        full = torch.cat([torch.ones(t, c, dtype=torch.bool, device=dev), m], 1)
        w.plan(torch.arange(b + 1, device=dev, dtype=torch.int32) * t,
               torch.arange(b + 1, device=dev, dtype=torch.int32) * npg,
               torch.arange(b * npg, device=dev, dtype=torch.int32),
               torch.full((b,), n - (npg - 1) * page, device=dev, dtype=torch.int32),
               H, hkv, d, page, custom_mask=full.flatten().repeat(b), q_data_type=q.dtype, kv_data_type=q.dtype)
        return w, q.transpose(1, 2).reshape(b * t, H, d).contiguous(), kv, (b, t)

    return Provider(lambda w, qf, kv, bt: w.run(qf, kv), prepare=prepare,
                    normalize=lambda o: o)


def _reference(q, kc, vc, ck, cv, m, lens):
    from flashtree import reference

    scale = 1 / math.sqrt(q.shape[-1])
    return reference.tree_decode(q.double(), kc.double(), vc.double(), ck.double(), cv.double(), m, lens.cpu(), scale)[0]


def _compare(out, ref) -> Verdict:
    if out.shape != ref.shape:  # flashinfer's layout: [B*T, H, D]
        b, h, t, d = ref.shape
        out = out.view(b, t, h, d).transpose(1, 2)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return Verdict(err <= REL_TOL, f"relative error {err:.1e} (tol {REL_TOL:.0e})")


def setup(params: dict, device: torch.device) -> Case:
    b, c, t = params["B"], params["C"], params["T"]
    dt = torch.bfloat16
    mask = _tree_mask(t, device)

    def inputs():
        return (torch.randn(b, H, t, D, device=device, dtype=dt),
                torch.randn(b, HKV, c, D, device=device, dtype=dt), torch.randn(b, HKV, c, D, device=device, dtype=dt),
                torch.randn(b, HKV, t, D, device=device, dtype=dt), torch.randn(b, HKV, t, D, device=device, dtype=dt),
                mask, torch.full((b,), c, dtype=torch.int32, device=device))

    return Case(
        inputs=inputs,
        providers={"flashtree": _flashtree(False), "flashtree-paged": _flashtree(True), "sdpa": _sdpa(),
                   "flex": _flex(), "flashinfer": _flashinfer()},
        nbytes=2 * b * HKV * (c + t) * D * 2 + 2 * b * H * t * D * 2,
        flops=4 * b * H * t * (c + t) * D,
        check=Check(reference=_reference, compare=_compare),
    )


WORKLOADS = [dict(B=1, C=32768, T=64), dict(B=8, C=8192, T=64), dict(B=32, C=2048, T=8),
             dict(B=64, C=4096, T=4), dict(B=4, C=16384, T=64)]

SUITE = Suite(
    name="verify",
    description="tree verification: q [B,32,T,128] over a [B,8,C,128] bf16 cache + the tree (T=64: Medusa-63)",
    workloads=WORKLOADS,
    quick=WORKLOADS[2:4],
    setup=setup,
    label=lambda p: f"B={p['B']} C={p['C']} T={p['T']}" + (" medusa" if p["T"] == 64 and p["B"] == 4 else ""),
)
