"""Suite ``shared-prefix``: tree decoding over a shared prompt (DeFT), Llama-3-8B heads (H=32, Hkv=8, D=128), bf16.

Workloads (one decoding step, one layer):
- ``prefix``: a prompt of S tokens forked into b branches of u unique tokens; one query per branch.
  (4096, 32, 256), (16384, 64, 128), and DeFT's few-shot shapes (4096, w, 400) for w = 20, 30, 50.
- ``spec``: a prompt of 1024 tokens followed by a speculative draft tree of T tokens: T queries with the
  tree's ancestor mask among them, T = 32, 64, 128, 256.

The tree lives in a ``TreeKVCache`` (16-token pages, [pages, Hkv, 16, D] pools); the plan is built once in
``setup`` (not timed: once per decoding step, shared by all layers). Every input set is fresh pool values in
the same slots.

Providers:
- ``flashtree``: ``deft_attention``; ``flashtree-decode`` (spec rows): ``flash_decoding_attention_paged``
  with the tree mask.
- ``flashinfer-decode`` (prefix rows): ``BatchDecodeWithPagedKVCacheWrapper`` over the same pages, the
  prefix pages shared in memory but read once per branch; ``flashinfer-cascade``:
  ``MultiLevelCascadeAttentionWrapper`` with two levels (the prefix, then each branch). Both read our pools
  zero-copy in the "HND" layout; unavailable when FlashInfer is not installed.
- ``sdpa``: ``scaled_dot_product_attention`` over the prefix expanded and concatenated with each branch (the
  concatenation is timed: it is what a caller must do), with a dense mask on spec rows.
Floor: max(unique KV bytes + q and out bytes / copy bandwidth, 4 H D * visible pairs / matmul rate). The
label also gives the IO saving: KV bytes of per-branch decoding / unique KV bytes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..peers import import_peer
from ..suite import Case, Check, Provider, Suite, Unavailable, Verdict

H, HKV, D, PAGE = 32, 8, 128, 16
REL_TOL = 1e-2  # bf16 operands: relative error norms land between 1e-3 and 1e-2
WORKSPACE_BYTES = 256 << 20


def build_cache(params: dict, device, dtype=torch.bfloat16, seed: int = 0):
    """The workload's tree in a TreeKVCache (zero pools) and (queries_per_leaf, tail_masks)."""
    from flashtree import tree
    from flashtree.kvcache import TreeKVCache

    if params["kind"] == "prefix":
        s, b, u = params["S"], params["b"], params["u"]
        pages = s // PAGE + b * math.ceil(u / PAGE) + 1
        c = TreeKVCache(1, pages, HKV, D, page_size=PAGE, dtype=dtype, device=device)
        root = c.create_root(s)
        for leaf in c.fork(root, b):
            c.append(leaf, u)
        return c, 1, None
    t, prompt = params["T"], params["prompt"]  # the draft tree's T tokens follow the prompt
    c = TreeKVCache(1, (prompt + t) // PAGE + 1, HKV, D, page_size=PAGE, dtype=dtype, device=device)
    leaf = c.create_root(prompt + t)
    g = torch.Generator().manual_seed(seed + t)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    return c, t, {leaf: tree.ancestor_mask(parents)}


def io_table(params: dict) -> dict:
    """KV bytes of one layer (bf16): unique, per-branch decoding, and the DeFT plan's L2 traffic."""
    from flashtree import deft

    c, n, masks = build_cache(params, "cpu")
    return deft.deft_plan(c, H, queries_per_leaf=n, tail_masks=masks).io_stats(2)


def _flashtree(plan):
    try:
        import flashtree
    except Exception as e:  # noqa: BLE001
        return Unavailable(f"flashtree: {type(e).__name__}: {e}")
    return Provider(lambda q, kp, vp: flashtree.deft_attention(q, kp, vp, plan))


def _paths(cache):
    leaves = cache.leaves()
    return leaves, [cache.block_table(x) for x in leaves], [cache.path_length(x) for x in leaves]


def _flashtree_decode(cache, t, mask):
    """The tree-verification op on a spec row: the prompt's first 1024 - T tokens cached, T tree tokens."""
    try:
        import flashtree
    except Exception as e:  # noqa: BLE001
        return Unavailable(f"flashtree: {type(e).__name__}: {e}")
    _, tables, lens = _paths(cache)
    n = lens[0]

    def prepare(q, kp, vp):
        table = torch.tensor(tables, dtype=torch.int32, device=q.device)
        slots = torch.as_tensor(cache.path_slots(cache.leaves()[0])[n - t:], device=q.device)
        ck = kp[slots // PAGE, :, slots % PAGE].transpose(0, 1)[None].contiguous()  # [1, Hkv, T, D]
        cv = vp[slots // PAGE, :, slots % PAGE].transpose(0, 1)[None].contiguous()
        lens_t = torch.tensor([n - t], dtype=torch.int32, device=q.device)
        return q.transpose(0, 1)[None], kp, vp, table, lens_t, ck, cv, mask.to(q.device)

    return Provider(
        lambda q, kp, vp, table, lens_t, ck, cv, m: flashtree.flash_decoding_attention_paged(
            q, kp, vp, table, lens_t, ck, cv, m, 64, None, None, None, None, None, H // HKV),
        prepare=prepare, normalize=lambda o: o[0].transpose(0, 1))


def _flashinfer_decode(cache):
    fi = import_peer("flashinfer")
    if isinstance(fi, Unavailable):
        return fi
    _, tables, lens = _paths(cache)

    def prepare(q, kp, vp):
        dev = q.device
        indptr = torch.tensor([0] + list(_cumsum(len(t) for t in tables)), dtype=torch.int32, device=dev)
        indices = torch.tensor([p for t in tables for p in t], dtype=torch.int32, device=dev)
        last = torch.tensor([(n - 1) % PAGE + 1 for n in lens], dtype=torch.int32, device=dev)
        w = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev), "HND",
                                                  use_tensor_cores=True)
        w.plan(indptr, indices, last, H, HKV, D, PAGE, q_data_type=q.dtype, kv_data_type=q.dtype)
        return w, q, (kp, vp)

    return Provider(lambda w, q, kv: w.run(q, kv), prepare=prepare)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def _flashinfer_cascade(cache):
    fi = import_peer("flashinfer")
    if isinstance(fi, Unavailable):
        return fi
    leaves = cache.leaves()
    shared = cache.node_pages(cache.root)
    own = [cache.node_pages(x) for x in leaves]
    own_len = [cache.node_length(x) for x in leaves]

    def prepare(q, kp, vp):
        dev = q.device
        i32 = dict(dtype=torch.int32, device=dev)
        b = len(leaves)
        qo = [torch.tensor([0, b], **i32), torch.arange(b + 1, **i32)]
        kvi = [torch.tensor([0, len(shared)], **i32), torch.tensor([0] + list(_cumsum(len(p) for p in own)), **i32)]
        kvx = [torch.tensor(shared, **i32), torch.tensor([p for ps in own for p in ps], **i32)]
        last = [torch.tensor([PAGE], **i32), torch.tensor([(n - 1) % PAGE + 1 for n in own_len], **i32)]
        w = fi.MultiLevelCascadeAttentionWrapper(2, torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev), "HND")
        w.plan(qo, kvi, kvx, last, H, HKV, D, PAGE, q_data_type=q.dtype, kv_data_type=q.dtype)
        return w, q, (kp, vp)

    return Provider(lambda w, q, kv: w.run(q, kv), prepare=prepare)


def _sdpa(cache, t, mask):
    leaves = cache.leaves()
    root = cache.root

    def gather(pool, slots):
        s = torch.as_tensor(slots, device=pool.device)
        return pool[s // PAGE, :, s % PAGE].transpose(0, 1)  # [Hkv, n, D]

    if t == 1:
        def prepare(q, kp, vp):
            pre = cache.node_slots(root)
            kpre, vpre = gather(kp, pre)[None], gather(vp, pre)[None]
            ku = torch.stack([gather(kp, cache.node_slots(x)) for x in leaves])  # [b, Hkv, u, D]
            vu = torch.stack([gather(vp, cache.node_slots(x)) for x in leaves])
            return q[:, :, None], kpre, vpre, ku, vu

        def fn(q, kpre, vpre, ku, vu):
            b = q.shape[0]
            k = torch.cat([kpre.expand(b, -1, -1, -1), ku], 2)
            v = torch.cat([vpre.expand(b, -1, -1, -1), vu], 2)
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return Provider(fn, prepare=prepare, normalize=lambda o: o[:, :, 0])

    def prepare_spec(q, kp, vp):
        slots = cache.path_slots(leaves[0])
        n = len(slots)
        full = torch.ones(t, n, dtype=torch.bool, device=q.device)
        full[:, n - t:] = mask.to(q.device)
        return q.transpose(0, 1)[None], gather(kp, slots)[None], gather(vp, slots)[None], full

    return Provider(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                    prepare=prepare_spec, normalize=lambda o: o[0].transpose(0, 1))


def _compare(out, ref) -> Verdict:
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return Verdict(err <= REL_TOL, f"relative error {err:.1e} (tol {REL_TOL:.0e})")


def setup(params: dict, device: torch.device) -> Case:
    from flashtree import deft, reference

    dt = torch.bfloat16
    cache, n, masks = build_cache(params, device, dt)
    plan = deft.deft_plan(cache, H, queries_per_leaf=n, tail_masks=masks, device=device)
    stats = plan.io_stats(2)
    pool_shape = tuple(cache.k_pools[0].shape)

    def inputs():
        return (torch.randn(plan.num_queries, H, D, device=device, dtype=dt),
                torch.randn(pool_shape, device=device, dtype=dt), torch.randn(pool_shape, device=device, dtype=dt))

    def ref(q, kp, vp):
        return reference.deft_attention(q.double(), kp.double(), vp.double(), plan.leaf_slots,
                                        [int(x) for x in plan.leaf_query_offsets[1:] - plan.leaf_query_offsets[:-1]],
                                        plan.tail_masks, 1 / math.sqrt(D))[0]

    pairs = sum(int(ln) * n for ln in plan.leaf_path_lengths)  # visible (query, key) pairs, upper bound
    if params["kind"] == "prefix":
        providers = {"flashtree": _flashtree(plan), "flashinfer-decode": _flashinfer_decode(cache),
                     "flashinfer-cascade": _flashinfer_cascade(cache), "sdpa": _sdpa(cache, 1, None)}
    else:
        mask = next(iter(masks.values()))
        t = params["T"]
        pairs -= t * t - int(mask.sum())
        providers = {"flashtree": _flashtree(plan), "flashtree-decode": _flashtree_decode(cache, t, mask),
                     "sdpa": _sdpa(cache, t, mask)}
    return Case(
        inputs=inputs,
        providers=providers,
        nbytes=stats["unique"] + 2 * plan.num_queries * H * D * 2,
        flops=4 * H * D * pairs,
        check=Check(reference=ref, compare=_compare),
    )


def _label(p: dict) -> str:
    if p["kind"] == "spec":
        return f"spec prompt={p['prompt']} T={p['T']}"
    return f"S={p['S']} b={p['b']} u={p['u']}" + (" (few-shot)" if p["u"] == 400 else "")


WORKLOADS = (
    [dict(kind="prefix", S=4096, b=32, u=256), dict(kind="prefix", S=16384, b=64, u=128)]
    + [dict(kind="prefix", S=4096, b=w, u=400) for w in (20, 30, 50)]
    + [dict(kind="spec", prompt=1024, T=t) for t in (32, 64, 128, 256)]
)

SUITE = Suite(
    name="shared-prefix",
    description="tree decoding: a shared prompt and b branches (or a speculative tree), bf16, H=32 Hkv=8 D=128",
    workloads=WORKLOADS,
    quick=[WORKLOADS[0], WORKLOADS[6]],
    setup=setup,
    label=_label,
)
