"""deft_plan / deft_attention: the plan against the per-path reference on CPU, the kernels on GPU."""
import math

import numpy as np
import pytest
import torch

import flashtree
from flashtree import deft, reference
from flashtree.kvcache import TreeKVCache
from tolerance import assert_close_rule


def randint(gen, lo, hi):
    """An int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def build_tree(gen, *, depth, max_branch, max_len, min_leaf=1, page=16, hkv=2, d=64, dtype=torch.float64,
               device="cpu", max_nodes=200, prompt=None):
    """A random tree in a fresh cache: levels of forks with random branching and node lengths.
    Unused pool rows (free pages, the rest of partly filled pages) hold NaN: they must never be read."""
    lengths = [prompt if prompt is not None else randint(gen, 1, max_len)]
    parents, frontier = [-1], [0]
    for _ in range(depth - 1):
        nxt = []
        for n in frontier:
            for _ in range(randint(gen, 1, max_branch)):
                if len(lengths) < max_nodes:
                    parents.append(n)
                    lengths.append(randint(gen, 0, max_len))
                    nxt.append(len(lengths) - 1)
        frontier = nxt
    has_kids = set(parents[1:])
    lengths = [ln if i in has_kids else max(ln, min_leaf) for i, ln in enumerate(lengths)]
    num_pages = sum(math.ceil(ln / page) + 1 for ln in lengths) + 3
    c = TreeKVCache(1, num_pages, hkv, d, page_size=page, dtype=dtype, device=device)

    def kv(n):
        return (torch.randn(1, n, hkv, d, generator=gen).to(device, dtype),
                torch.randn(1, n, hkv, d, generator=gen).to(device, dtype))

    ids = {0: c.create_root(None, *kv(lengths[0]))}
    for n in range(len(lengths)):
        kids = [i for i, p in enumerate(parents) if p == n]
        if kids:
            for i, cid in zip(kids, c.fork(ids[n], len(kids))):
                ids[i] = cid
                if lengths[i]:
                    c.append(cid, None, *kv(lengths[i]))
    poison_unused(c)
    return c


def poison_unused(c: TreeKVCache):
    used = np.zeros((c.num_pages, c.page_size), dtype=bool)
    for n in c.nodes():
        s = c.node_slots(n)
        used[s // c.page_size, s % c.page_size] = True
    unused = torch.as_tensor(~used, device=c.k_pools[0].device)
    for pool in c.k_pools + c.v_pools:
        pool.masked_fill_(unused[:, None, :, None], float("nan"))


def random_queries(c, gen, max_q=3):
    """Per leaf: 0..max_q query tokens (at least one leaf with one), random tree tail masks."""
    counts, masks = {}, {}
    for leaf in c.leaves():
        n = randint(gen, 0, min(max_q, c.node_length(leaf)))
        counts[leaf] = n
        if n > 1 and randint(gen, 0, 1):
            parents = [-1] + [randint(gen, 0, i - 1) for i in range(1, n)]
            masks[leaf] = flashtree.tree.ancestor_mask(parents)
    if not any(counts.values()):
        counts[c.leaves()[0]] = 1
    return counts, masks


def reference_of(q, c, plan, scale=None, layer=0):
    scale = scale or 1 / math.sqrt(q.shape[-1])
    return reference.deft_attention(q, c.k_pools[layer], c.v_pools[layer], plan.leaf_slots,
                                    np.diff(plan.leaf_query_offsets).tolist(), plan.tail_masks, scale)


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("seed", range(12))
def test_plan_computes_per_path_attention(seed):
    gen = torch.Generator().manual_seed(seed)
    c = build_tree(gen, depth=randint(gen, 1, 5), max_branch=randint(gen, 1, 5), max_len=randint(gen, 1, 90),
                   page=(8, 16)[seed % 2], hkv=2, d=16, max_nodes=60, min_leaf=3)
    counts, masks = random_queries(c, gen)
    g = (1, 2, 3)[seed % 3]
    for chunk_len, sms in [(64, None), (128, None), (None, 1), (None, 132)]:
        plan = deft.deft_plan(c, 2 * g, queries_per_leaf=counts, tail_masks=masks, chunk_len=chunk_len, num_sms=sms)
        q = torch.randn(plan.num_queries, 2 * g, 16, generator=gen, dtype=torch.float64)
        ref_o, ref_lse = reference_of(q, c, plan)
        o, lse = deft.emulate_plan(q, c.k_pools[0], c.v_pools[0], plan)
        assert not torch.isnan(o).any()
        torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse.float(), ref_lse)


def test_plan_structure(gen):
    c = build_tree(gen, depth=4, max_branch=4, max_len=150, page=16, hkv=2, d=16)
    plan = deft.deft_plan(c, 8, chunk_len=128)
    h = plan.host
    lens = h["chunks"][:, 1] - h["chunks"][:, 0]
    assert (lens > 0).all() and (lens <= 128).all() and (lens[:-1] == 128).all()
    assert (h["chunks"][1:, 0] == h["chunks"][:-1, 1]).all()  # the chunks tile the token list
    rows = (h["chunks"][:, 3] - h["chunks"][:, 2]) * 4
    np.testing.assert_array_equal(np.bincount(h["work"][:, 0], minlength=len(rows)), -(-rows // 64))
    for qi in range(plan.num_queries):  # each query's partials in increasing chunk order
        slots = h["slot_idx"][h["q_indptr"][qi]: h["q_indptr"][qi + 1]]
        assert (np.diff(slots) > 0).all()
    assert len(np.unique(h["slot_idx"])) == plan.num_slots
    assert plan.meta.dtype == torch.int32 and all(v % 4 == 0 for v in plan.offsets.values())


def test_dense_slots_mark_whole_shared_chunks():
    """Work records carry a chunk's first slot only when every key sits at consecutive,
    box-aligned slots and every query of the chunk sees it (the Hopper kernel then copies its tiles
    by TMA with no records); -1 elsewhere."""
    s, b, u = 1024, 3, 100
    c = TreeKVCache(1, s // 16 + b * 7 + 1, 2, 16, page_size=16, dtype=torch.float64)
    root = c.create_root(s)
    for leaf in c.fork(root, b):
        c.append(leaf, u)
    plan = deft.deft_plan(c, 8, chunk_len=256, block_m=128)
    work = plan.host["work"]
    assert work.shape[1] == deft.WORK_INTS
    np.testing.assert_array_equal(work[:, 2:6], plan.host["chunks"][work[:, 0]])
    np.testing.assert_array_equal(work[:, 6], plan.host["slot_base"][work[:, 0]])
    dense = {int(ci): int(slot) for ci, slot in zip(work[:, 0], work[:, 7])}
    slots = plan.host["tokens"][:, 0]
    for ci, (t0, t1, _, _) in enumerate(plan.host["chunks"]):
        assert dense[ci] == (slots[t0] if t1 <= s else -1)  # the prompt's chunks, not the branches'
    # a chunk that starts mid-page is not box-aligned: no dense slot
    assert (deft._dense_slots(plan.host["tokens"][1:257], np.array([[0, 256, 0, b]]), 16) == -1).all()


def test_chunk_length_worked_example():
    s, b, u, g, hkv = 16384, 64, 128, 4, 8  # the module docstring's example
    q_lo = np.concatenate([np.zeros(s, int)] + [np.full(u, i) for i in range(b)])
    q_hi = np.concatenate([np.full(s, b)] + [np.full(u, i + 1) for i in range(b)])
    assert deft.choose_chunk_len(q_lo, q_hi, g, hkv, 132) == 768
    assert deft.choose_chunk_len(q_lo[:100], q_hi[:100], g, hkv, 132) == 64


def test_plan_block_m(gen):
    c = build_tree(gen, depth=3, max_branch=6, max_len=200, page=16, hkv=2, d=16)
    for block_m in (64, 128, 192):  # 128, 192: the Hopper warp-specialised kernels' work items
        plan = deft.deft_plan(c, 8, chunk_len=128, block_m=block_m)
        h = plan.host
        rows = (h["chunks"][:, 3] - h["chunks"][:, 2]) * 4
        assert plan.block_m == block_m
        np.testing.assert_array_equal(np.bincount(h["work"][:, 0], minlength=len(rows)), -(-rows // block_m))
    with pytest.raises(ValueError, match="block_m: expected 64, 128 or 192, got 100"):
        deft.deft_plan(c, 8, block_m=100)
    assert deft.deft_plan(c, 8).block_m == 64  # a CPU plan: the 64-row kernels


def _shared_prefix_tokens(s, b, u):
    """(slot, q_lo, q_hi, mask_col) records of a prefix of s tokens under b branches of u tokens."""
    q_lo = np.concatenate([np.zeros(s, int)] + [np.full(u, i) for i in range(b)])
    q_hi = np.concatenate([np.full(s, b)] + [np.full(u, i + 1) for i in range(b)])
    return np.stack([np.arange(len(q_lo)), q_lo, q_hi, np.full(len(q_lo), -1)], 1)


def _with_tail_mask(tokens, n):
    """The same records with a tail mask over the last n keys (a speculative tree's draft tokens)."""
    tokens = tokens.copy()
    tokens[-n:, 3] = np.arange(n)
    return tokens


def test_block_m_choice_on_hopper():
    # The two chunk models compared (NOTES, session 20): 128 rows but on the (4096, 32, 256) row,
    # whose 128-row chunks the 64-row CTAs split evenly; tail masks change nothing
    for shape in ((16384, 64, 128), (1024, 64, 16), (1024, 4, 32), (4096, 20, 400)):
        assert deft._choose_block_m(_shared_prefix_tokens(*shape), 4, 8, 132) == 128
        assert deft._choose_block_m(_with_tail_mask(_shared_prefix_tokens(*shape), 16), 4, 8, 132) == 128
    assert deft._choose_block_m(_shared_prefix_tokens(4096, 32, 256), 4, 8, 132) == 64
    assert deft.ws_chunk_len(*_shared_prefix_tokens(16384, 64, 128).T[1:3], 4, 8, 132) == 1280
    assert deft._choose_block_m(_shared_prefix_tokens(16384, 64, 128)[:0], 4, 8, 132) == 64


def shared_prefix_cache(s, b, u, page=16, hkv=2, d=16, dtype=torch.float64, gen=None):
    c = TreeKVCache(1, (s + b * u) // page + b + 2, hkv, d, page_size=page, dtype=dtype)
    c.create_root(k=torch.randn(1, s, hkv, d, generator=gen, dtype=dtype), v=torch.randn(1, s, hkv, d, generator=gen, dtype=dtype))
    for leaf in c.fork(c.root, b):
        c.append(leaf, k=torch.randn(1, u, hkv, d, generator=gen, dtype=dtype), v=torch.randn(1, u, hkv, d, generator=gen, dtype=dtype))
    return c


def test_io_stats_shared_prefix(gen):
    s, b, u = 256, 5, 32
    c = shared_prefix_cache(s, b, u, gen=gen)
    st = deft.deft_plan(c, 4).io_stats(itemsize=8)
    per_token = 2 * 2 * 16 * 8
    assert st["unique"] == (s + b * u) * per_token
    assert st["per_branch"] == b * (s + u) * per_token


def test_single_leaf_equals_paged_decode(gen):
    c = shared_prefix_cache(100, 1, 7, hkv=2, d=64, gen=gen)
    leaf = c.leaves()[0]
    plan = deft.deft_plan(c, 4)
    q = torch.randn(1, 4, 64, generator=gen, dtype=torch.float64)
    out = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    n = c.path_length(leaf)
    table = torch.tensor([c.block_table(leaf)], dtype=torch.int32)
    # decode sees the first n - 1 path tokens in the pages and the last one as the current token
    k, v = c.read_path(leaf, 0)
    ref = flashtree.flash_decoding_attention_paged(
        q[:, :, None], c.k_pools[0], c.v_pools[0], table, torch.tensor([n - 1], dtype=torch.int32),
        k[None, :, -1:], v[None, :, -1:], torch.ones(1, 1, dtype=torch.bool), kv_group_num=2)
    torch.testing.assert_close(out, ref[:, :, 0])


def test_causal_tail_equals_sdpa(gen):
    c = shared_prefix_cache(40, 1, 9, hkv=1, d=16, gen=gen)
    leaf = c.leaves()[0]
    plan = deft.deft_plan(c, 2, queries_per_leaf=5)
    q = torch.randn(5, 2, 16, generator=gen, dtype=torch.float64)
    out = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    k, v = c.read_path(leaf, 0)
    n = k.shape[1]
    allowed = torch.ones(5, n, dtype=torch.bool)
    allowed[:, n - 5:] = torch.ones(5, 5, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.expand(2, -1, -1), v.expand(2, -1, -1), attn_mask=allowed)
    torch.testing.assert_close(out, ref.transpose(0, 1))


def test_cpu_out_and_lse(gen):
    c = build_tree(gen, depth=3, max_branch=3, max_len=40, d=64)
    plan = deft.deft_plan(c, 4)
    q = torch.randn(plan.num_queries, 4, 64, generator=gen, dtype=torch.float64)
    out = torch.full_like(q, float("nan"))
    r, lse = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, out=out, return_lse=True)
    assert r is out and not torch.isnan(out).any() and lse.shape == (plan.num_queries, 4)
    assert deft.workspace_shape(plan) == ((plan.num_slots, 4, 64), (plan.num_slots, 4))


def test_bad_input_names_the_argument(gen):
    c = build_tree(gen, depth=2, max_branch=3, max_len=30, d=64)
    plan = deft.deft_plan(c, 4)
    q = torch.randn(plan.num_queries, 4, 64, dtype=torch.float64)
    kp, vp = c.k_pools[0], c.v_pools[0]
    with pytest.raises(ValueError, match=rf"q: expected shape \[{plan.num_queries}, 4, 64\]"):
        flashtree.deft_attention(q[:-1], kp, vp, plan)
    with pytest.raises(TypeError, match="k_pool: expected dtype float64"):
        flashtree.deft_attention(q, kp.float(), vp, plan)
    with pytest.raises(ValueError, match=r"v_pool: expected shape \["):
        flashtree.deft_attention(q, kp, vp[:-1], plan)
    with pytest.raises(TypeError, match="plan: expected a DeftPlan"):
        flashtree.deft_attention(q, kp, vp, "plan")
    with pytest.raises(ValueError, match="num_qo_heads: expected a positive multiple of Hkv = 2, got 3"):
        deft.deft_plan(c, 3)
    leaf = c.leaves()[0]
    with pytest.raises(ValueError, match=f"queries_per_leaf: leaf {leaf} holds"):
        deft.deft_plan(c, 4, queries_per_leaf={leaf: c.node_length(leaf) + 1})
    c.append(leaf, 3)
    with pytest.raises(ValueError, match=r"tail_masks\[.*\]: expected every query to see itself"):
        deft.deft_plan(c, 4, queries_per_leaf={leaf: 2}, tail_masks={leaf: torch.zeros(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="chunk_len: expected a positive multiple of 64"):
        deft.deft_plan(c, 4, chunk_len=100)
    with pytest.raises(TypeError, match="workspace: expected a pair"):
        flashtree.deft_attention(torch.randn(deft.deft_plan(c, 4).num_queries, 4, 64, dtype=torch.float64), kp, vp,
                                 deft.deft_plan(c, 4), workspace=torch.empty(1))


def test_stale_plan_is_detected(gen):
    c = build_tree(gen, depth=2, max_branch=2, max_len=30, d=64)
    plan = deft.deft_plan(c, 2)
    q = torch.randn(plan.num_queries, 2, 64, dtype=torch.float64)
    c.write(0, c.node_slots(c.root)[:1], torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))  # values: still fresh
    flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    c.append(c.leaves()[0], 1)
    with pytest.raises(ValueError, match="plan: expected a plan of the cache's current state"):
        flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)


# ----------------------------------------------------------------------------- GPU


def torch_baseline(q, c, plan, scale):
    """Plain PyTorch in q's dtype, path by path (the tolerance rule's baseline)."""
    out = torch.zeros_like(q)
    g = q.shape[1] // c.num_kv_heads
    for slots, (a, b), tail in zip(plan.leaf_slots, zip(plan.leaf_query_offsets[:-1], plan.leaf_query_offsets[1:]), plan.tail_masks):
        if b == a:
            continue
        s = torch.as_tensor(slots, device=q.device)
        k = c.k_pools[0][s // c.page_size, :, s % c.page_size].transpose(0, 1).repeat_interleave(g, 0)
        v = c.v_pools[0][s // c.page_size, :, s % c.page_size].transpose(0, 1).repeat_interleave(g, 0)
        allowed = torch.ones(b - a, len(s), dtype=torch.bool, device=q.device)
        if tail is not None:
            allowed[:, len(s) - (b - a):] = torch.as_tensor(tail, device=q.device)
        sc = (q[a:b].transpose(0, 1) @ k.transpose(-1, -2)) * scale
        p = torch.softmax(sc.float().masked_fill(~allowed, float("-inf")), -1).to(q.dtype)
        out[a:b] = (p @ v).transpose(0, 1)
    return out


def check_gpu(c, plan, q, what, **kw):
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full_like(q, float("nan"))
    ws = tuple(torch.full(s, float("nan"), device="cuda", dtype=dt)
               for s, dt in zip(deft.workspace_shape(plan), (q.dtype, torch.float32)))
    flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, out=out, workspace=ws, **kw)
    ref = reference_of(q.double(), c, plan)[0]
    assert_close_rule(out, ref, torch_baseline(q, c, plan, scale), q.dtype, what)
    return out


@pytest.fixture(params=["ws", "ws3", "wgmma", "mma.sync"])
def stage1(request, monkeypatch):
    """Each stage-1 kernel the device runs: on compute capability 9.0 the warp-specialised kernel
    with two consumers (128-row work items; the plan picks it for wide shared trees) and three (192
    rows; opt-in), forced here, and the 64-row wgmma kernel, all sm_90a, and the portable mma.sync
    kernel with FLASHTREE_WGMMA=0; elsewhere only the latter."""
    hopper = request.param != "mma.sync"
    if hopper and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("sm_90a kernels need compute capability 9.0")
    monkeypatch.setattr(deft, "_WGMMA", hopper)
    monkeypatch.setattr(deft, "_validated", {})  # validated entries keep their loaded kernels
    block_m = {"ws": deft.WS_BLOCK_M, "ws3": deft.WS3_BLOCK_M}.get(request.param, deft.BLOCK_M)
    monkeypatch.setattr(deft, "_choose_block_m", lambda *args: block_m)
    assert deft.use_wgmma(torch.device("cuda")) == hopper
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_random_trees(dtype, d, gen, stage1):
    shapes = [  # depth, branching, max node length, (H, Hkv)
        (1, 1, 2000, (8, 8)), (2, 8, 300, (32, 8)), (3, 5, 700, (4, 1)), (4, 3, 2000, (16, 2)),
        (6, 2, 257, (8, 2)), (5, 4, 61, (28, 4)),
    ]
    for depth, branch, max_len, (h, hkv) in shapes:
        c = build_tree(gen, depth=depth, max_branch=branch, max_len=max_len, page=(16, 8, 32, 128)[depth % 4], hkv=hkv, d=d,
                       dtype=dtype, device="cuda", max_nodes=80, min_leaf=4)
        counts, masks = random_queries(c, gen, max_q=4)
        plan = deft.deft_plan(c, h, queries_per_leaf=counts, tail_masks=masks)
        q = torch.randn(plan.num_queries, h, d, generator=gen).to("cuda", dtype)
        check_gpu(c, plan, q, f"depth={depth} branch={branch} len<={max_len} H={h} Hkv={hkv}")
        if depth in (2, 4):  # the same tree with short chunks spanning many nodes
            plan = deft.deft_plan(c, h, queries_per_leaf=counts, tail_masks=masks, chunk_len=64)
            check_gpu(c, plan, q, f"chunk 64 depth={depth}")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 64, 256])
def test_speculative_tree_tail(t, gen, stage1):
    c = shared_prefix_cache(1024 - t, 1, t, hkv=8, d=128, dtype=torch.bfloat16, gen=gen)
    c.k_pools[0], c.v_pools[0] = c.k_pools[0].cuda(), c.v_pools[0].cuda()
    poison_unused(c)
    leaf = c.leaves()[0]
    parents = [-1] + [randint(gen, 0, i - 1) for i in range(1, t)]
    plan = deft.deft_plan(c, 32, queries_per_leaf=t, tail_masks={leaf: flashtree.tree.ancestor_mask(parents)}, device="cuda")
    q = torch.randn(t, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    check_gpu(c, plan, q, f"speculative T={t}")


@pytest.mark.gpu
def test_deterministic_noncontiguous_and_lse(gen, stage1):
    c = build_tree(gen, depth=3, max_branch=6, max_len=900, hkv=4, d=128, dtype=torch.bfloat16, device="cuda")
    plan = deft.deft_plan(c, 16)
    q = torch.randn(16, plan.num_queries, 128, generator=gen).to("cuda", torch.bfloat16).transpose(0, 1)  # strided
    a, lse = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, return_lse=True)
    b = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    assert torch.equal(a, b)
    ref_o, ref_lse = reference_of(q.double(), c, plan)
    torch.testing.assert_close(lse, ref_lse.cuda(), rtol=0, atol=2e-2)
    out = torch.full((16, plan.num_queries, 128), float("nan"), device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, out=out)
    assert torch.equal(out, a)


@pytest.mark.gpu
def test_cuda_graph_capture(gen):
    c = build_tree(gen, depth=3, max_branch=4, max_len=500, hkv=8, d=128, dtype=torch.bfloat16, device="cuda")
    plan = deft.deft_plan(c, 32)
    q = torch.randn(plan.num_queries, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    out = torch.empty_like(q)
    ws = tuple(torch.empty(s, device="cuda", dtype=dt) for s, dt in zip(deft.workspace_shape(plan), (q.dtype, torch.float32)))
    call = lambda: flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, out=out, workspace=ws)  # noqa: E731
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on its own side stream
        call()
    q.copy_(torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16))
    for layer_pool in (c.k_pools[0], c.v_pools[0]):  # new values in the same slots: the plan still holds
        layer_pool.copy_(torch.randn(layer_pool.shape, generator=gen).to("cuda", torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_of(q.double(), c, plan)[0]
    assert_close_rule(out, ref, torch_baseline(q, c, plan, 1 / math.sqrt(128)), torch.bfloat16, "graph replay")
    # on Hopper the captured merge is a dependent launch, the eager one a plain launch: the same bits
    assert torch.equal(out, flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan))


@pytest.mark.gpu
def test_plan_workspace_per_stream_and_not_in_graphs(gen):
    """Without workspace=, the layers of a step share the plan's buffer (one per stream), and a
    CUDA-graph capture takes its own, so replays and eager calls never share partial states."""
    c = build_tree(gen, depth=3, max_branch=4, max_len=500, hkv=8, d=128, dtype=torch.bfloat16, device="cuda")
    plan = deft.deft_plan(c, 32)
    q1, q2 = (torch.randn(plan.num_queries, 32, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    call = lambda q, **kw: flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, **kw)  # noqa: E731
    a, b = call(q1), call(q2)  # two layers, one workspace
    assert len(plan._workspaces) == 1
    for q, o, what in ((q1, a, "first call"), (q2, b, "second call on the reused workspace")):
        assert_close_rule(o, reference_of(q.double(), c, plan)[0], torch_baseline(q, c, plan, 1 / math.sqrt(128)),
                          torch.bfloat16, what)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = call(q1)
    torch.cuda.current_stream().wait_stream(side)
    assert len(plan._workspaces) == 2
    assert torch.equal(on_side, a)
    out = torch.full_like(q1, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(q1, out=out)
    assert len(plan._workspaces) == 2  # the capture did not take (or add) a plan buffer
    graph.replay()
    assert torch.equal(call(q2), b)  # an eager call right behind the replay, on the plan's buffer
    torch.cuda.synchronize()
    assert torch.equal(out, a)


@pytest.mark.gpu
def test_shared_prefix_matches_paged_decode_per_branch(gen, stage1):
    s, b, u = 3000, 9, 77
    c = shared_prefix_cache(s, b, u, hkv=8, d=128, dtype=torch.bfloat16, gen=gen)
    c.k_pools[0], c.v_pools[0] = c.k_pools[0].cuda(), c.v_pools[0].cuda()
    plan = deft.deft_plan(c, 32, device="cuda")
    q = torch.randn(b, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    out = flashtree.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    leaves = c.leaves()
    tables = torch.tensor([c.block_table(x) for x in leaves], dtype=torch.int32, device="cuda")
    n = c.path_length(leaves[0])
    last = [c.read_path(x, 0) for x in leaves]
    ck = torch.stack([k[:, -1:] for k, _ in last])
    cv = torch.stack([v[:, -1:] for _, v in last])
    ref = flashtree.flash_decoding_attention_paged(
        q[:, :, None], c.k_pools[0], c.v_pools[0], tables, torch.full((b,), n - 1, dtype=torch.int32, device="cuda"),
        ck, cv, torch.ones(1, 1, dtype=torch.bool, device="cuda"), kv_group_num=4)
    torch.testing.assert_close(out, ref[:, :, 0], rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_layers_of_one_signature_read_their_own_pools(gen, stage1):
    """Two layers' pools share one call signature; the warp-specialised kernel's tensor maps are
    kept per pool pointer, so each call must still read its own layer (alternating, then again
    with nothing remembered)."""
    c = TreeKVCache(2, 96, 2, 128, page_size=16, dtype=torch.bfloat16, device="cuda")

    def kv(n):
        return (torch.randn(2, n, 2, 128, generator=gen).to("cuda", torch.bfloat16),
                torch.randn(2, n, 2, 128, generator=gen).to("cuda", torch.bfloat16))

    root = c.create_root(None, *kv(700))
    for leaf in c.fork(root, 5):
        c.append(leaf, None, *kv(33))
    plan = deft.deft_plan(c, 8)
    q = torch.randn(plan.num_queries, 8, 128, device="cuda", dtype=torch.bfloat16)
    outs = [deft.deft_attention(q, c.k_pools[i % 2], c.v_pools[i % 2], plan) for i in range(4)]
    deft._validated.clear()
    fresh = [deft.deft_attention(q, c.k_pools[i], c.v_pools[i], plan) for i in range(2)]
    for i in range(4):
        assert torch.equal(outs[i], fresh[i % 2]), f"call {i} (layer {i % 2})"
    assert not torch.equal(fresh[0], fresh[1])


@pytest.mark.gpu
def test_repeated_call_still_checks_freshness_and_workspace_alignment(gen):
    """The second call with the same signature skips validation; a stale plan and a misaligned
    workspace (values its signature does not vouch for) still raise."""
    c = TreeKVCache(1, 64, 2, 64, page_size=16, dtype=torch.float16, device="cuda")

    def kv(n):
        return (torch.randn(1, n, 2, 64, generator=gen).to("cuda", torch.float16),
                torch.randn(1, n, 2, 64, generator=gen).to("cuda", torch.float16))

    root = c.create_root(None, *kv(40))
    leaves = c.fork(root, 3)
    for leaf in leaves:
        c.append(leaf, None, *kv(5))
    plan = deft.deft_plan(c, 4)
    q = torch.randn(plan.num_queries, 4, 64, device="cuda", dtype=torch.float16)
    first = deft.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    again = deft.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
    assert torch.equal(first, again)
    shape_o, shape_l = deft.workspace_shape(plan)
    flat = torch.empty(torch.Size(shape_o).numel() + 1, device="cuda", dtype=q.dtype)
    good = (flat[:-1].view(shape_o), torch.empty(shape_l, device="cuda"))
    deft.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, workspace=good)
    bad = (flat[1:].view(shape_o), good[1])  # same shape and strides, data 2 bytes off
    with pytest.raises(ValueError, match="workspace\\[0\\]: expected a 16-byte aligned data pointer"):
        deft.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, workspace=bad)
    fp32_o = (torch.empty(shape_o, device="cuda"), good[1])  # the partial o is in q's dtype
    with pytest.raises(TypeError, match="workspace\\[0\\]: expected dtype float16, got float32"):
        deft.deft_attention(q, c.k_pools[0], c.v_pools[0], plan, workspace=fp32_o)
    c.append(leaves[0], None, *kv(1))
    with pytest.raises(ValueError, match="plan: expected a plan of the cache's current state"):
        deft.deft_attention(q, c.k_pools[0], c.v_pools[0], plan)
