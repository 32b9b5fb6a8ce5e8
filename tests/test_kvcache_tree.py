"""TreeKVCache: pages shared by forks, reference counts, clean out-of-pages errors, intact branches."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtree.kvcache import OutOfPagesError, TreeKVCache

LAYERS, HKV, D, PAGE = 2, 2, 8, 8


def values(n, gen):
    return torch.randn(LAYERS, n, HKV, D, generator=gen), torch.randn(LAYERS, n, HKV, D, generator=gen)


def snapshot(c: TreeKVCache):
    nodes = {n: (c.parent(n), c.children(n), c.node_pages(n), c.node_length(n)) for n in c.nodes()}
    return nodes, c.refs.copy(), c.num_free_pages, c.version, [p.clone() for p in c.k_pools + c.v_pools]


def check_invariants(c: TreeKVCache):
    leaves = c.leaves()
    refs = np.zeros(c.num_pages, dtype=np.int64)
    owner = {}
    for n in c.nodes():
        for p in c.node_pages(n):
            assert p not in owner, f"page {p} held by nodes {owner.get(p)} and {n}"
            owner[p] = n
        if c.children(n):
            assert c.node_length(n) % c.page_size == 0, "a node with children must hold whole pages"
        assert len(c.node_pages(n)) == math.ceil(c.node_length(n) / c.page_size)
    for leaf in leaves:
        table = c.block_table(leaf)
        assert len(table) == math.ceil(c.path_length(leaf) / c.page_size)
        refs[table] += 1
    np.testing.assert_array_equal(c.refs, refs)
    assert c.num_free_pages == int((refs == 0).sum()) == c.num_pages - len(owner)


def test_fork_shares_full_pages_and_moves_the_partial_one(gen):
    c = TreeKVCache(LAYERS, 16, HKV, D, page_size=PAGE, dtype=torch.float32)
    k, v = values(19, gen)  # 2 full pages + 3 tokens
    root = c.create_root(k=k, v=v)
    full = c.node_pages(root)[:2]
    kids = c.fork(root, 3)
    assert c.node_pages(root) == full and c.node_length(root) == 16
    assert [c.node_length(x) for x in kids] == [3, 3, 3]
    assert all(c.refs[p] == 3 for p in full)
    assert c.num_free_pages == 16 - 5  # 2 shared + the moved page + 2 copies
    for x in kids:
        assert c.block_table(x)[:2] == full
        pk, pv = c.read_path(x, 1)
        torch.testing.assert_close(pk, k[1].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(pv, v[1].transpose(0, 1), rtol=0, atol=0)
    check_invariants(c)


def test_fork_of_page_aligned_leaf_copies_nothing(gen):
    c = TreeKVCache(1, 4, HKV, D, page_size=PAGE)
    root = c.create_root(16)
    free = c.num_free_pages
    kids = c.fork(root, 5)
    assert c.num_free_pages == free and all(c.node_length(x) == 0 for x in kids)
    assert all(c.refs[p] == 5 for p in c.node_pages(root))


def test_prune_frees_pages_and_parent_becomes_leaf(gen):
    c = TreeKVCache(1, 32, HKV, D, page_size=PAGE)
    root = c.create_root(8)
    a, b = c.fork(root, 2)
    c.append(a, 20)
    c.append(b, 9)
    free = c.num_free_pages
    c.prune(a)
    assert c.num_free_pages == free + 3 and c.leaves() == [b]
    c.prune(b)
    assert c.leaves() == [root] and c.refs[c.node_pages(root)[0]] == 1
    check_invariants(c)
    c.prune(root)
    assert c.root is None and c.num_free_pages == 32 and not c.refs.any()


def test_out_of_pages_changes_nothing(gen):
    c = TreeKVCache(LAYERS, 5, HKV, D, page_size=PAGE, dtype=torch.float32)
    root = c.create_root(k=values(20, gen)[0], v=values(20, gen)[1])  # 3 pages, 4 tokens in the last
    before = snapshot(c)
    with pytest.raises(OutOfPagesError, match="needs 3 free pages, has 2"):
        c.fork(root, 4)
    with pytest.raises(OutOfPagesError, match="needs 3 free pages, has 2"):
        c.append(root, 21)
    after = snapshot(c)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:4] == after[2:4]
    assert all(torch.equal(x, y) for x, y in zip(before[4], after[4]))
    with pytest.raises(OutOfPagesError):
        TreeKVCache(1, 2, HKV, D, page_size=PAGE).create_root(17)


def test_bad_arguments_name_themselves(gen):
    with pytest.raises(ValueError, match=r"page_size: expected one of \[8, 16"):
        TreeKVCache(1, 4, HKV, D, page_size=12)
    with pytest.raises(ValueError, match="num_pages: expected a positive int"):
        TreeKVCache(1, 0, HKV, D)
    c = TreeKVCache(LAYERS, 8, HKV, D, page_size=PAGE)
    root = c.create_root(3)
    kid = c.fork(root, 1)[0]
    with pytest.raises(ValueError, match=r"append: expected a leaf, got node 0 with children \[1\]"):
        c.append(root, 1)
    with pytest.raises(ValueError, match="node: expected a live node id, got 99"):
        c.prune(99)
    with pytest.raises(ValueError, match=r"k: expected shape \[2, n, 2, 8\]"):
        c.append(kid, k=torch.zeros(1, 3, HKV, D), v=torch.zeros(1, 3, HKV, D))
    with pytest.raises(ValueError, match="create_root: the cache already has a root"):
        c.create_root(1)


def test_version_changes_on_structure_not_on_writes(gen):
    c = TreeKVCache(1, 8, HKV, D, page_size=PAGE)
    root = c.create_root(4)
    v0 = c.version
    c.write(0, c.node_slots(root), torch.ones(4, HKV, D), torch.ones(4, HKV, D))
    assert c.version == v0
    c.append(root, 1)
    assert c.version > v0


def test_block_table_serves_paged_decode(gen):
    import flashtree

    c = TreeKVCache(1, 16, HKV, 64, page_size=PAGE, dtype=torch.float64)
    kv = torch.randn(1, 13, HKV, 64, generator=gen, dtype=torch.float64)
    root = c.create_root(k=kv, v=kv * 2)
    leaf = c.fork(root, 2)[1]
    c.append(leaf, k=torch.ones(1, 6, HKV, 64, dtype=torch.float64), v=torch.ones(1, 6, HKV, 64, dtype=torch.float64))
    table = torch.tensor([c.block_table(leaf)], dtype=torch.int32)
    n = c.path_length(leaf)
    q = torch.randn(1, 4, 1, 64, generator=gen, dtype=torch.float64)
    cur = torch.zeros(1, HKV, 1, 64, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = flashtree.flash_decoding_attention_paged(q, c.k_pools[0], c.v_pools[0], table, torch.tensor([n], dtype=torch.int32),
                                                   cur, cur, mask, kv_group_num=2)
    k, v = c.read_path(leaf, 0)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[0], torch.cat([k, cur[0]], 1).repeat_interleave(2, 0), torch.cat([v, cur[0]], 1).repeat_interleave(2, 0))
    torch.testing.assert_close(out[0], ref)


ops = st.lists(st.tuples(st.sampled_from(["append", "fork", "prune"]), st.integers(0, 10**6), st.integers(0, 19)),
               min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.integers(0, 30), page=st.sampled_from([8, 16]), num_pages=st.integers(3, 24), program=ops)
def test_random_forks_appends_prunes_keep_every_branch_intact(prompt, page, num_pages, program):
    gen = torch.Generator().manual_seed(prompt * 1000 + num_pages)
    c = TreeKVCache(LAYERS, num_pages, 1, 4, page_size=page, dtype=torch.float32)
    expect = {}  # node -> its path's (k, v) [LAYERS, n, 1, 4]
    try:
        k, v = torch.randn(LAYERS, prompt, 1, 4, generator=gen), torch.randn(LAYERS, prompt, 1, 4, generator=gen)
        expect[c.create_root(k=k, v=v)] = (k, v)
    except OutOfPagesError:
        return
    for op, pick, size in program:
        if c.root is None:
            break
        nodes, leaves = c.nodes(), c.leaves()
        before = snapshot(c)
        try:
            if op == "append":
                leaf = leaves[pick % len(leaves)]
                k, v = torch.randn(LAYERS, size, 1, 4, generator=gen), torch.randn(LAYERS, size, 1, 4, generator=gen)
                c.append(leaf, k=k, v=v)
                ek, ev = expect[leaf]
                expect[leaf] = (torch.cat([ek, k], 1), torch.cat([ev, v], 1))
            elif op == "fork":
                leaf = leaves[pick % len(leaves)]
                kids = c.fork(leaf, 1 + size % 4)
                ek, ev = expect[leaf]
                for kid in kids:
                    expect[kid] = (ek, ev)
                keep = c.path_length(leaf)  # the partly filled page moved into the children
                expect[leaf] = (ek[:, :keep], ev[:, :keep])
            else:
                node = nodes[pick % len(nodes)]
                c.prune(node)
        except OutOfPagesError:
            after = snapshot(c)
            assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:4] == after[2:4]
            assert all(torch.equal(x, y) for x, y in zip(before[4], after[4]))
            continue
        check_invariants(c)
        for leaf in c.leaves():
            for layer in range(LAYERS):
                pk, pv = c.read_path(leaf, layer)
                ek, ev = expect[leaf]
                assert torch.equal(pk, ek[layer].transpose(0, 1)), f"leaf {leaf} layer {layer}: K changed"
                assert torch.equal(pv, ev[layer].transpose(0, 1)), f"leaf {leaf} layer {layer}: V changed"
