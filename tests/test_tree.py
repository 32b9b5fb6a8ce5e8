"""CPU tests of flashtree.tree: tree encodings and the conversions between them.

Every conversion is checked against a plain-Python brute force on fresh random trees (odd and prime
sizes), plus metamorphic properties: a chain is causal, round trips are identities, the packed DFS rule
is tree ancestry expanded to tokens, and each token sees exactly ``position + 1`` keys.
"""
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from flashtree import tree

SIZES = [1, 2, 7, 31, 64, 100, 257]
FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------------
# Random trees and brute-force references
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def rng():
    """A freshly seeded generator; the seed is printed so a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


def random_parents(num_nodes, rng):
    """Random topological parents; a random window mixes bushy and deep trees."""
    window = int(rng.integers(1, num_nodes + 1))
    return [-1] + [int(rng.integers(max(0, i - window), i)) for i in range(1, num_nodes)]


def random_preorder_parents(num_nodes, rng):
    """Random parents numbered in DFS pre-order: each node hangs off the path to the previous one."""
    parents, path = [-1], [0]
    for node in range(1, num_nodes):
        del path[len(path) - int(rng.integers(0, len(path))):]  # keep at least the root
        parents.append(path[-1])
        path.append(node)
    return parents


@st.composite
def tree_parents(draw, max_nodes=48):
    num_nodes = draw(st.integers(1, max_nodes))
    deep = draw(st.booleans())
    parents = [-1]
    for i in range(1, num_nodes):
        if deep:
            parents.append(i - 1 - draw(st.integers(0, min(2, i - 1))))
        else:
            parents.append(draw(st.integers(0, i - 1)))
    return parents


def brute_ancestors(parents, node):
    """node and its ancestors, root last."""
    chain_up = [node]
    while parents[chain_up[-1]] != -1:
        chain_up.append(parents[chain_up[-1]])
    return chain_up


def brute_mask(parents):
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i in range(len(parents)):
        mask[i, brute_ancestors(parents, i)] = True
    return mask


def brute_preorder(parents):
    children = {i: sorted(j for j in range(len(parents)) if parents[j] == i) for i in range(len(parents))}
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))
    return order


def relabel_preorder(parents):
    """The same tree with nodes renumbered in pre-order."""
    order = brute_preorder(parents)
    new_id = {old: new for new, old in enumerate(order)}
    return [-1] + [new_id[parents[old]] for old in order[1:]]


def brute_rule_mask(start_q, end_k, cu_seqlens):
    """The packed DFS rule, one pair at a time."""
    n = len(start_q)
    seq = np.searchsorted(cu_seqlens, np.arange(n), side="right") - 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            mask[i, j] = bool(seq[i] == seq[j] and start_q[i] <= end_k[j])
    return mask


def token_level_ancestry(parents, node_lens):
    """Tree ancestry expanded to tokens: a token sees its ancestors' tokens and the earlier tokens of its node."""
    node = torch.arange(len(parents)).repeat_interleave(torch.tensor(node_lens))
    anc = brute_mask(parents)[node][:, node]
    token = torch.arange(len(node))
    return anc & ((node[:, None] != node[None, :]) | (token[None, :] <= token[:, None]))


def random_groups(rng, num_seqs=None):
    num_seqs = int(rng.integers(1, 6)) if num_seqs is None else num_seqs
    return [(int(rng.integers(1, 8)), [int(x) for x in rng.integers(1, 7, size=int(rng.integers(0, 5)))])
            for _ in range(num_seqs)]


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------
# A. Decode trees
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("convert", [list, tuple, np.array, lambda p: np.array(p, dtype=np.int32),
                                     torch.tensor, lambda p: torch.tensor(p, dtype=torch.int32)])
def test_validate_parents_accepts_every_input_kind(convert):
    parents = [-1, 0, 0, 1, 3, 2, 0]
    out = tree.validate_parents(convert(parents))
    assert out.dtype == torch.int32 and out.device.type == "cpu"
    assert out.tolist() == parents


@pytest.mark.parametrize("parents, error, match", [
    ([], ValueError, r"parents: expected at least one node \(the root\), got length 0"),
    ([0, 0], ValueError, r"parents\[0\]: expected -1 .*got 0"),
    ([-1, 0, 2], ValueError, r"parents\[2\]: expected 0 <= parents\[2\] < 2 .*got 2"),
    ([-1, 0, 1, 5], ValueError, r"parents\[3\]: expected 0 <= parents\[3\] < 3 .*got 5"),
    ([-1, -1], ValueError, r"parents\[1\]: expected 0 <= parents\[1\] < 1 .*got -1"),
    ([[-1, 0]], ValueError, r"parents: expected 1 dimension, got shape \(1, 2\)"),
    ([-1.0, 0.0], TypeError, r"parents: expected an integer dtype, got torch.float64"),
    (torch.tensor([True, False]), TypeError, r"parents: expected an integer dtype, got torch.bool"),
    ("abc", TypeError, r"parents: expected a list, tuple, numpy array or integer tensor, got str"),
])
def test_validate_parents_rejects(parents, error, match):
    with pytest.raises(error, match=match):
        tree.validate_parents(parents)


@pytest.mark.parametrize("num_nodes", SIZES)
def test_ancestor_mask_matches_brute_force(num_nodes, rng):
    parents = random_parents(num_nodes, rng)
    mask = tree.ancestor_mask(parents)
    assert mask.dtype == torch.bool and mask.shape == (num_nodes, num_nodes)
    assert torch.equal(mask, brute_mask(parents))
    assert torch.equal(tree.ancestor_mask(parents, device="cpu"), mask)


@pytest.mark.parametrize("num_nodes", SIZES)
def test_chain_is_causal(num_nodes):
    parents = tree.chain(num_nodes)
    assert parents.dtype == torch.int32
    assert parents.tolist() == [-1] + list(range(num_nodes - 1))
    causal = torch.ones(num_nodes, num_nodes, dtype=torch.bool).tril()
    assert torch.equal(tree.ancestor_mask(parents), causal)
    assert tree.depths(parents).tolist() == list(range(num_nodes))
    assert tree.dfs_order(parents).tolist() == list(range(num_nodes))
    assert tree.retrieve_indices(parents).tolist() == [list(range(num_nodes))]


@pytest.mark.parametrize("num_nodes", [2, 7, 31])
def test_star_mask_is_diagonal_plus_root(num_nodes):
    mask = tree.ancestor_mask([-1] + [0] * (num_nodes - 1))
    expected = torch.eye(num_nodes, dtype=torch.bool)
    expected[:, 0] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("n, error, match", [
    (0, ValueError, r"n: expected >= 1, got 0"),
    (3.0, TypeError, r"n: expected an int, got float"),
    (True, TypeError, r"n: expected an int, got bool"),
])
def test_chain_rejects(n, error, match):
    with pytest.raises(error, match=match):
        tree.chain(n)


@pytest.mark.parametrize("num_nodes", SIZES)
def test_depths_and_position_ids(num_nodes, rng):
    parents = random_parents(num_nodes, rng)
    expected = torch.tensor([len(brute_ancestors(parents, i)) - 1 for i in range(num_nodes)])
    node_depth = tree.depths(parents)
    assert node_depth.dtype == torch.int32 and torch.equal(node_depth.long(), expected)
    # Metamorphic: the depth is the number of proper ancestors, i.e. a mask row sum minus one.
    assert torch.equal(tree.ancestor_mask(parents).sum(1) - 1, expected)

    positions = tree.position_ids(parents, 13)
    assert positions.dtype == torch.int32 and torch.equal(positions.long(), expected + 13)
    kv_lens = torch.tensor([0, 5, 11], dtype=torch.int32)
    batched = tree.position_ids(parents, kv_lens)
    assert batched.dtype == torch.int32 and batched.shape == (3, num_nodes)
    assert torch.equal(batched.long(), kv_lens.long()[:, None] + expected[None, :])


@pytest.mark.parametrize("kv_seq_len, error, match", [
    (-1, ValueError, r"kv_seq_len: expected >= 0, got -1"),
    (2.5, TypeError, r"kv_seq_len: expected an int, got float"),
    (torch.tensor([1.0]), TypeError, r"kv_seq_len: expected an integer dtype, got torch.float32"),
    (torch.tensor([[1]]), ValueError, r"kv_seq_len: expected an int or a 1-D tensor \[B\], got shape \(1, 1\)"),
])
def test_position_ids_rejects(kv_seq_len, error, match):
    with pytest.raises(error, match=match):
        tree.position_ids([-1, 0], kv_seq_len)


@pytest.mark.parametrize("num_nodes", SIZES)
def test_dfs_order_and_intervals(num_nodes, rng):
    parents = random_parents(num_nodes, rng)
    order = tree.dfs_order(parents)
    assert order.dtype == torch.int32 and order.tolist() == brute_preorder(parents)
    start, end = tree.dfs_intervals(parents)
    assert start.dtype == torch.int32 and end.dtype == torch.int32
    assert torch.equal(start[order.long()], torch.arange(num_nodes, dtype=torch.int32))
    # j is in the subtree of i iff i is an ancestor-or-self of j.
    in_subtree = (start[:, None] <= start[None, :]) & (start[None, :] <= end[:, None])
    assert torch.equal(in_subtree, brute_mask(parents).T)


def test_dfs_order_visits_children_in_increasing_index_order():
    parents = [-1, 0, 0, 1, 2, 1, 0]  # children: 0 -> 1, 2, 6; 1 -> 3, 5; 2 -> 4
    assert tree.dfs_order(parents).tolist() == [0, 1, 3, 5, 2, 4, 6]
    start, end = tree.dfs_intervals(parents)
    assert start.tolist() == [0, 1, 4, 2, 5, 3, 6]
    assert end.tolist() == [6, 3, 5, 2, 5, 3, 6]


def test_medusa_63_matches_medusa():
    assert len(tree.MEDUSA_63) == 63 and len(set(tree.MEDUSA_63)) == 63
    parents, order = tree.parents_from_paths(tree.MEDUSA_63)
    assert parents.dtype == torch.int32 and parents.shape == (64,)
    # Medusa numbers nodes by (depth, path): sorted(choices, key=lambda x: (len(x), x)).
    assert order[1:] == sorted(tree.MEDUSA_63, key=lambda x: (len(x), list(x)))
    assert order[0] == () and order[1:4] == [(0,), (1,), (2,)]
    leaves = [p for p in tree.MEDUSA_63 if not any(q[:len(p)] == p and q != p for q in tree.MEDUSA_63)]
    assert tree.retrieve_indices(parents).shape == (len(leaves), 5) == (42, 5)
    assert int(tree.depths(parents).max()) == 4


def paths_of(parents):
    """Each node's path of sibling ranks (children ranked by index)."""
    rank, seen = {}, {}
    for node in range(1, len(parents)):
        rank[node] = seen.get(parents[node], 0)
        seen[parents[node]] = rank[node] + 1
    return {tuple(rank[a] for a in reversed(brute_ancestors(parents, i)[:-1])) for i in range(1, len(parents))}


@given(tree_parents(), st.randoms(use_true_random=False))
@FAST
def test_parents_from_paths_rebuilds_the_tree(parents, shuffler):
    paths = sorted(paths_of(parents))
    shuffler.shuffle(paths)
    rebuilt, order = tree.parents_from_paths([list(p) for p in paths])
    rebuilt = rebuilt.tolist()
    assert len(rebuilt) == len(parents)
    # Node i's path is its parent's path plus one step, and the tree is the same up to numbering.
    assert all(order[i][:-1] == order[rebuilt[i]] for i in range(1, len(rebuilt)))
    assert paths_of(rebuilt) == set(paths)
    assert [len(p) for p in order] == tree.depths(rebuilt).tolist()


@pytest.mark.parametrize("paths, error, match", [
    ([(0,), (0, 1, 0)], ValueError, r"prefix \[0, 1\] of path \[0, 1, 0\]"),
    ([(1, 0)], ValueError, r"prefix \[1\] of path \[1, 0\]"),
    ([(0,), (1,), (0,)], ValueError, r"paths\[2\]: expected each path once, got \[0\] a second time"),
    ([(0,), ()], ValueError, r"paths\[1\]: expected a non-empty list of child indices >= 0, got \(\)"),
    ([(0,), (0, -1)], ValueError, r"paths\[1\]: expected a non-empty list .*got \(0, -1\)"),
    ([(0,), 3], ValueError, r"paths\[1\]: expected a non-empty list .*got 3"),
    ("01", TypeError, r"paths: expected a list or tuple of paths, got str"),
])
def test_parents_from_paths_rejects(paths, error, match):
    with pytest.raises(error, match=match):
        tree.parents_from_paths(paths)


def test_parents_from_paths_empty_is_root_only():
    parents, order = tree.parents_from_paths([])
    assert parents.tolist() == [-1] and order == [()]


@pytest.mark.parametrize("num_nodes", SIZES)
def test_retrieve_indices_matches_brute_force(num_nodes, rng):
    parents = random_parents(num_nodes, rng)
    leaves = [i for i in range(num_nodes) if i not in parents]
    width = max(len(brute_ancestors(parents, i)) for i in range(num_nodes))
    expected = [list(reversed(brute_ancestors(parents, leaf))) for leaf in leaves]
    expected = [path + [-1] * (width - len(path)) for path in expected]
    paths = tree.retrieve_indices(parents)
    assert paths.dtype == torch.int32 and paths.tolist() == expected


@given(tree_parents())
@FAST
def test_mask_parents_round_trips(parents):
    mask = tree.ancestor_mask(parents)
    recovered = tree.parents_from_mask(mask)
    assert recovered.dtype == torch.int32 and recovered.tolist() == parents
    assert torch.equal(tree.ancestor_mask(recovered), mask)
    tree.check_tree_mask(mask)
    assert tree.is_tree_mask(mask)


def test_batched_masks(rng):
    batch = [random_parents(31, rng) for _ in range(3)]
    masks = torch.stack([tree.ancestor_mask(p) for p in batch])
    assert tree.parents_from_mask(masks).tolist() == batch
    tree.check_tree_mask(masks)
    masks[2, 7, 7] = False
    with pytest.raises(ValueError, match=r"mask\[2\]\[7, 7\]: expected True .*got False"):
        tree.check_tree_mask(masks)


def tree_order_mask(mask):
    """Independent definition: a tree mask is a partial order (reflexive, lower-triangular, transitive)
    whose down-sets are chains, with node 0 below every node."""
    m = mask.float()
    reflexive = bool(mask.diagonal().all())
    lower = not mask.triu(1).any()
    transitive = not ((m @ m > 0) & ~mask).any()
    comparable = mask | mask.T
    chains = not any((mask[i][:, None] & mask[i][None, :] & ~comparable).any() for i in range(len(mask)))
    return reflexive and lower and transitive and chains and bool(mask[:, 0].all())


@given(tree_parents(max_nodes=24), st.lists(st.tuples(st.integers(0, 23), st.integers(0, 23)), max_size=3))
@FAST
def test_is_tree_mask_agrees_with_the_order_definition(parents, flips):
    mask = tree.ancestor_mask(parents)
    for i, j in flips:
        i, j = i % len(parents), j % len(parents)
        mask[i, j] = ~mask[i, j]
    assert tree.is_tree_mask(mask) == tree_order_mask(mask)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__((3, 3), False), r"mask\[3, 3\]: expected True \(reflexive"),
    (lambda m: m.__setitem__((2, 5), True), r"mask\[2, 5\]: expected False \(above the diagonal"),
    (lambda m: m.__setitem__((4, slice(0, 4)), False), r"mask\[4, :4\]: expected at least one True"),
    # Row 5 (parent 4, chain 0-1-2-3-4-5) loses ancestor 2 but keeps its parent 4.
    (lambda m: m.__setitem__((5, 2), False),
     r"mask\[5\]: expected True exactly at columns \[0, 1, 2, 3, 4, 5\] .*got True at columns \[0, 1, 3, 4, 5\]"),
])
def test_check_tree_mask_names_the_bad_row(edit, match):
    mask = tree.ancestor_mask(tree.chain(7))
    edit(mask)
    with pytest.raises(ValueError, match=match):
        tree.check_tree_mask(mask)
    assert not tree.is_tree_mask(mask)


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(3, 3).tril(), TypeError, r"mask: expected dtype torch.bool"),
    (torch.ones(3, 4, dtype=torch.bool), ValueError, r"mask: expected shape \[T, T\] or \[B, T, T\]"),
    (torch.ones(0, 0, dtype=torch.bool), ValueError, r"mask: expected shape .*got \(0, 0\)"),
    ([[True]], TypeError, r"mask: expected a torch.Tensor, got list"),
])
def test_check_tree_mask_rejects_bad_arguments(mask, error, match):
    with pytest.raises(error, match=match):
        tree.check_tree_mask(mask)


def test_tree_spec():
    spec = tree.TreeSpec.from_paths(tree.MEDUSA_63)
    parents, _ = tree.parents_from_paths(tree.MEDUSA_63)
    assert spec.num_nodes == 64
    assert torch.equal(spec.parents, parents)
    assert torch.equal(spec.depths, tree.depths(parents))
    assert torch.equal(spec.mask, tree.ancestor_mask(parents))
    assert torch.equal(spec.dfs_order, tree.dfs_order(parents))
    assert all(torch.equal(a, b) for a, b in zip(spec.dfs_intervals, tree.dfs_intervals(parents)))
    assert torch.equal(spec.retrieve_indices, tree.retrieve_indices(parents))
    assert torch.equal(spec.position_ids(9), tree.position_ids(parents, 9))
    # Equal trees from different inputs are equal, hashable cache keys.
    assert tree.TreeSpec.from_parents(np.array(parents.tolist())) == spec
    assert len({spec, tree.TreeSpec.from_parents(parents.tolist())}) == 1
    assert tree.TreeSpec.chain(5) == tree.TreeSpec((-1, 0, 1, 2, 3)) != spec
    with pytest.raises(AttributeError):
        spec.parent_ids = (-1,)
    with pytest.raises(ValueError, match=r"parents\[2\]: expected 0 <= parents\[2\] < 2"):
        tree.TreeSpec((-1, 0, 3))


# ---------------------------------------------------------------------------------------------------
# B. Packed sequences in DFS order
# ---------------------------------------------------------------------------------------------------

def test_dfs_arrays_from_groups_example():
    # [prompt 3][response 2][response 1][response 2] + a prompt-only sequence of 2.
    start_q, end_k, cu_seqlens = tree.dfs_arrays_from_groups([(3, [2, 1, 2]), (2, [])])
    assert start_q.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 0, 0]
    assert end_k.tolist() == [3, 3, 3, 1, 1, 2, 3, 3, 0, 0]
    assert cu_seqlens.tolist() == [0, 8, 10]
    assert {t.dtype for t in (start_q, end_k, cu_seqlens)} == {torch.int32}


@pytest.mark.parametrize("lengths", [[1], [2, 7], [31, 64, 100], [257]])
def test_prompt_only_groups_are_causal(lengths):
    start_q, end_k, cu_seqlens = tree.dfs_arrays_from_groups([(n, []) for n in lengths])
    assert not start_q.any() and not end_k.any()
    causal = torch.block_diag(*[torch.ones(n, n).tril() for n in lengths]).bool()
    assert torch.equal(tree.dfs_mask(start_q, end_k, cu_seqlens), causal)
    # Runs of equal (start, end) must not merge across sequence boundaries.
    assert tree.tree_visible_pairs(start_q, end_k, cu_seqlens) == sum(n * (n + 1) // 2 for n in lengths)


@pytest.mark.parametrize("groups, error, match", [
    ([(3, [2, 0])], ValueError, r"groups\[0\]\[1\]\[1\] \(response length; empty responses are not packed\): expected >= 1, got 0"),
    ([(2, []), (0, [1])], ValueError, r"groups\[1\]\[0\] \(prompt length\): expected >= 1, got 0"),
    ([], ValueError, r"groups: expected at least one \(prompt_len, \[response_len, \.\.\.\]\) pair, got none"),
    ([(3, 2)], ValueError, r"groups\[0\]: expected a pair \(prompt_len, \[response_len, \.\.\.\]\), got \(3, 2\)"),
    ([(3.0, [])], TypeError, r"groups\[0\]\[0\] \(prompt length\): expected an int, got float"),
    ("abc", TypeError, r"groups: expected a list"),
])
def test_dfs_arrays_from_groups_rejects(groups, error, match):
    with pytest.raises(error, match=match):
        tree.dfs_arrays_from_groups(groups)


@pytest.mark.parametrize("num_nodes", SIZES)
def test_packed_tree_rule_is_ancestry(num_nodes, rng):
    parents = random_preorder_parents(num_nodes, rng)
    node_lens = [int(x) for x in rng.integers(1, 4, size=num_nodes)]
    start_q, end_k = tree.dfs_arrays_from_parents(parents, node_lens)
    assert start_q.dtype == torch.int32 and end_k.dtype == torch.int32
    cu_seqlens = i32([0, sum(node_lens)])
    tree.validate_dfs_arrays(start_q, end_k, cu_seqlens)
    mask = tree.dfs_mask(start_q, end_k, cu_seqlens)
    assert torch.equal(mask, token_level_ancestry(parents, node_lens))
    # Per node, the arrays hold the node's DFS interval.
    start, end = tree.dfs_intervals(parents)
    node = torch.arange(num_nodes).repeat_interleave(torch.tensor(node_lens))
    assert torch.equal(start_q, start[node]) and torch.equal(end_k, end[node])


@given(tree_parents(), st.data())
@FAST
def test_dfs_arrays_round_trip(parents, data):
    parents = relabel_preorder(parents)
    node_lens = data.draw(st.lists(st.integers(1, 4), min_size=len(parents), max_size=len(parents)))
    start_q, end_k = tree.dfs_arrays_from_parents(parents, node_lens)
    recovered, recovered_lens = tree.parents_from_dfs_arrays(start_q, end_k)
    assert recovered.dtype == torch.int32 and recovered_lens.dtype == torch.int32
    assert recovered.tolist() == parents and recovered_lens.tolist() == node_lens


def test_dfs_arrays_from_parents_rejects():
    with pytest.raises(ValueError, match=r"parents\[3\]: expected one of \[0, 2\] \(node 2 or one of its ancestors"):
        tree.dfs_arrays_from_parents([-1, 0, 0, 1], [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"node_lens\[1\]: expected >= 1 \(every node holds a token\), got 0"):
        tree.dfs_arrays_from_parents([-1, 0], [3, 0])
    with pytest.raises(ValueError, match=r"node_lens: expected one entry per node \(2\), got 3"):
        tree.dfs_arrays_from_parents([-1, 0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"parents\[0\]: expected -1"):
        tree.dfs_arrays_from_parents([0], [1])


@pytest.mark.parametrize("num_nodes", SIZES)
def test_packed_position_ids(num_nodes, rng):
    parents = random_parents(num_nodes, rng)  # any topological numbering; tokens laid out by node id
    node_lens = [int(x) for x in rng.integers(1, 5, size=num_nodes)]
    expected = []
    for node, length in enumerate(node_lens):
        first = sum(node_lens[a] for a in brute_ancestors(parents, node)[1:])
        expected += range(first, first + length)
    positions = tree.packed_position_ids(parents, node_lens)
    assert positions.dtype == torch.int32 and positions.tolist() == expected


@pytest.mark.parametrize("num_nodes", SIZES)
def test_each_token_sees_position_plus_one_keys(num_nodes, rng):
    parents = random_preorder_parents(num_nodes, rng)
    node_lens = [int(x) for x in rng.integers(1, 4, size=num_nodes)]
    start_q, end_k = tree.dfs_arrays_from_parents(parents, node_lens)
    mask = tree.dfs_mask(start_q, end_k, i32([0, len(start_q)]))
    positions = tree.packed_position_ids(parents, node_lens)
    assert torch.equal(mask.sum(1), positions.long() + 1)


def test_visible_pairs_and_mask_follow_the_rule_on_any_arrays(rng):
    n = 61
    start_q = i32(rng.integers(0, 6, size=n))
    end_k = i32(rng.integers(0, 6, size=n))
    cu_seqlens = i32([0, 13, 14, 40, n])
    mask = tree.dfs_mask(start_q, end_k, cu_seqlens)
    assert torch.equal(mask, brute_rule_mask(start_q.tolist(), end_k.tolist(), cu_seqlens.tolist()))
    assert tree.tree_visible_pairs(start_q, end_k, cu_seqlens) == int(mask.sum())


def test_visible_pairs_in_row_chunks(rng):
    # Thousands of runs in one sequence make the count take several row chunks.
    n = 3001
    start_q = i32(np.sort(rng.integers(0, 2000, size=n)))
    end_k = i32(rng.integers(0, 2500, size=n))
    cu_seqlens = i32([0, 1700, n])
    mask = tree.dfs_mask(start_q, end_k, cu_seqlens)
    assert tree.tree_visible_pairs(start_q, end_k, cu_seqlens) == int(mask.sum())


def test_visible_pairs_on_40k_tokens(rng):
    groups = random_groups(rng, num_seqs=9)
    groups += [(int(rng.integers(100, 4000)), [int(x) for x in rng.integers(1, 400, size=40)])
               for _ in range(8)]
    # One long sequence of many small nodes in a random tree.
    parents = random_preorder_parents(5003, rng)
    node_lens = [int(x) for x in rng.integers(1, 3, size=len(parents))]
    start_q, end_k, cu_seqlens = tree.dfs_arrays_from_groups(groups)
    tree_start, tree_end = tree.dfs_arrays_from_parents(parents, node_lens)
    start_q, end_k = torch.cat([start_q, tree_start]), torch.cat([end_k, tree_end])
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + len(tree_start)])
    tree.validate_dfs_arrays(start_q, end_k, cu_seqlens)
    # Each token sees itself and all earlier tokens on its root-to-node path: position + 1 keys.
    positions = [tree.packed_position_ids([-1] + [0] * len(lens), [p] + lens) for p, lens in groups]
    positions.append(tree.packed_position_ids(parents, node_lens))
    expected = int((torch.cat(positions).long() + 1).sum())
    assert tree.tree_visible_pairs(start_q, end_k, cu_seqlens) == expected


def brute_valid(start_q, end_k, cu_seqlens):
    """Independent validity test: nodes numbered 0..K-1 as contiguous runs, end constant per node and
    >= the node, the root spanning all, and all intervals pairwise nested or disjoint."""
    for first, last in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        starts, ends = start_q[first:last], end_k[first:last]
        node_end = {}
        for t, (s, e) in enumerate(zip(starts, ends)):
            if s not in node_end and s != len(node_end):
                return False  # nodes not numbered 0, 1, 2, ... in one contiguous run each
            if t > 0 and s != starts[t - 1] and s in node_end:
                return False
            if node_end.setdefault(s, e) != e or e < s:
                return False
        if node_end[0] != len(node_end) - 1:
            return False
        for m in node_end:
            for n in node_end:
                if m < n <= node_end[m] and node_end[n] > node_end[m]:
                    return False
    return True


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_validate_dfs_arrays_agrees_with_brute_force(data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    groups = random_groups(rng, num_seqs=2)
    start_q, end_k, cu_seqlens = tree.dfs_arrays_from_groups(groups)
    parents = random_preorder_parents(int(rng.integers(1, 9)), rng)
    extra_start, extra_end = tree.dfs_arrays_from_parents(parents, rng.integers(1, 3, size=len(parents)))
    start_q, end_k = torch.cat([start_q, extra_start]), torch.cat([end_k, extra_end])
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + len(extra_start)])
    for _ in range(data.draw(st.integers(0, 2))):  # corrupt a few entries
        array = data.draw(st.sampled_from([start_q, end_k]))
        array[data.draw(st.integers(0, len(array) - 1))] += data.draw(st.sampled_from([-2, -1, 1, 2]))
    valid = brute_valid(start_q.tolist(), end_k.tolist(), cu_seqlens.tolist())
    try:
        tree.validate_dfs_arrays(start_q, end_k, cu_seqlens)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == valid


def valid_example():
    # Two sequences: prompt 2 + responses 1, 2; then the tree [-1, 0, 1, 0] with one token per node.
    start_q = [0, 0, 1, 2, 2, 0, 1, 2, 3]
    end_k = [2, 2, 1, 2, 2, 3, 2, 2, 3]
    return i32(start_q), i32(end_k), i32([0, 5, 9])


def edited(position, value, which):
    arrays = list(valid_example())
    arrays[which] = arrays[which].clone()
    arrays[which][position] = value
    return arrays


@pytest.mark.parametrize("arrays, error, match", [
    (edited(0, 1, 0), ValueError, r"start_q\[0\]: expected 0 \(token 0 opens a sequence"),
    (edited(5, 2, 0), ValueError, r"start_q\[5\]: expected 0 \(token 5 opens a sequence.*got 2"),
    (edited(3, 3, 0), ValueError, r"start_q\[3\]: expected 1 or 2 .*got 3"),
    (edited(1, 1, 1), ValueError, r"end_k\[1\]: expected 2 like end_k\[0\] \(both tokens belong to node 0\), got 1"),
    (edited(4, 3, 1), ValueError, r"end_k\[4\]: expected 2 like end_k\[3\] .*got 3"),
    (edited(3, 1, 1), ValueError, r"end_k\[3\]: expected >= start_q\[3\] = 2 \(a node's subtree contains the node\), got 1"),
    (edited(8, 2, 1), ValueError, r"end_k\[8\]: expected >= start_q\[8\] = 3 .*got 2"),
    (edited(5, 2, 1), ValueError, r"end_k\[5\]: expected 3 \(the root of sequence 1 spans all its nodes 0\.\.3\), got 2"),
    (edited(7, 3, 1), ValueError, r"end_k\[7\]: expected <= 2 \(node 2 of sequence 1 lies inside the subtree of its parent, node 1\), got 3"),
    (edited(1, 9, 2), ValueError, r"cu_seqlens\[2\]: expected > cu_seqlens\[1\] = 9 \(strictly increasing\), got 9"),
    (edited(0, 1, 2), ValueError, r"cu_seqlens\[0\]: expected 0, got 1"),
    (edited(2, 8, 2), ValueError, r"cu_seqlens\[-1\]: expected the number of tokens N = 9, got 8"),
])
def test_validate_dfs_arrays_names_index_expected_and_actual(arrays, error, match):
    with pytest.raises(error, match=match):
        tree.validate_dfs_arrays(*arrays)


def test_validate_dfs_arrays_rejects_nesting_violations():
    # Root spans 0..3, node 1 spans 1..2, node 2 spans 2..3: node 2 starts inside node 1 but ends outside.
    start_q, end_k, cu = i32([0, 1, 2, 3]), i32([3, 2, 3, 3]), i32([0, 4])
    with pytest.raises(ValueError, match=r"end_k\[2\]: expected <= 2 \(node 2 of sequence 0 lies inside "
                                         r"the subtree of its parent, node 1\), got 3"):
        tree.validate_dfs_arrays(start_q, end_k, cu)


@pytest.mark.parametrize("arrays, error, match", [
    ((i32([0, 0]).long(), i32([0, 0]), i32([0, 2])), TypeError, r"start_q: expected dtype torch.int32, got torch.int64"),
    ((i32([0, 0]), [0, 0], i32([0, 2])), TypeError, r"end_k: expected a torch.Tensor, got list"),
    ((i32([0, 0]), i32([0]), i32([0, 2])), ValueError, r"end_k: expected the length of start_q \(2\), got 1"),
    ((i32([[0, 0]]), i32([0, 0]), i32([0, 2])), ValueError, r"start_q: expected 1 dimension, got shape \(1, 2\)"),
    ((i32([0, 0]), i32([0, 0]), i32([2])), ValueError, r"cu_seqlens: expected at least 2 entries"),
])
def test_validate_dfs_arrays_rejects_bad_types_and_shapes(arrays, error, match):
    with pytest.raises(error, match=match):
        tree.validate_dfs_arrays(*arrays)


def test_dfs_mask_and_visible_pairs_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"end_k: expected the length of start_q \(3\), got 2"):
        tree.dfs_mask(i32([0, 0, 0]), i32([0, 0]), i32([0, 3]))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected a strict rise from 0 to N = 3, got \[0, 2\]"):
        tree.tree_visible_pairs(i32([0, 0, 0]), i32([0, 0, 0]), i32([0, 2]))


def test_parents_from_dfs_arrays_rejects_bad_arrays():
    with pytest.raises(ValueError, match=r"start_q\[2\]: expected 1 or 2 .*got 3"):
        tree.parents_from_dfs_arrays([0, 1, 3], [2, 1, 3])
    with pytest.raises(ValueError, match=r"start_q: expected at least one token, got 0"):
        tree.parents_from_dfs_arrays([], [])


def random_batch(rng, trailing=()):
    groups = random_groups(rng)
    make = (lambda n: torch.randn(n, *trailing)) if trailing else (lambda n: torch.randint(0, 1000, (n,)))
    prompts = [make(p) for p, _ in groups]
    responses = [[make(r) for r in lens] for _, lens in groups]
    return groups, prompts, responses


@pytest.mark.parametrize("trailing", [(), (3, 5)])
def test_pack_unpack_round_trip(trailing, rng):
    groups, prompts, responses = random_batch(rng, trailing)
    packed = tree.pack(prompts, responses)
    assert packed.groups == groups
    start_q, end_k, cu_seqlens = tree.dfs_arrays_from_groups(groups)
    assert torch.equal(packed.start_q, start_q) and torch.equal(packed.end_k, end_k)
    assert torch.equal(packed.cu_seqlens, cu_seqlens)
    assert packed.position_ids.dtype == torch.int32 and packed.position_ids.shape == start_q.shape
    tree.validate_dfs_arrays(packed.start_q, packed.end_k, packed.cu_seqlens)
    unpacked_prompts, unpacked_responses = tree.unpack(packed.values, groups)
    assert all(torch.equal(a, b) for a, b in zip(unpacked_prompts, prompts))
    assert all(torch.equal(a, b) for ra, rb in zip(unpacked_responses, responses) for a, b in zip(ra, rb))
    assert [len(r) for r in unpacked_responses] == [len(r) for r in responses]


def test_paths_see_exactly_their_own_prefix(rng):
    groups, prompts, responses = random_batch(rng)
    packed = tree.pack(prompts, responses)
    mask = tree.dfs_mask(packed.start_q, packed.end_k, packed.cu_seqlens)
    paths = tree.path_token_indices(groups)
    values = tree.unpack_responses(packed.values, groups)
    for g, (prompt, group_responses) in enumerate(zip(prompts, responses)):
        expected = [torch.cat([prompt, r]) for r in group_responses] or [prompt]
        assert len(paths[g]) == len(values[g]) == len(expected)
        for path, value, want in zip(paths[g], values[g], expected):
            assert path.dtype == torch.int32 and torch.equal(value, want)
            assert torch.equal(packed.values[path.long()], want)
            # Running the path alone is plain causal attention at positions 0..L-1.
            assert packed.position_ids[path.long()].tolist() == list(range(len(path)))
            rows = mask[path.long()]
            assert torch.equal(rows[:, path.long()], torch.ones(len(path), len(path), dtype=torch.bool).tril())
            # The last token of a path sees nothing outside it.
            assert int(rows[-1].sum()) == len(path)


def test_pack_accepts_non_contiguous_views():
    base = torch.randn(4, 7)
    prompts, responses = [base.T[:3]], [[base.T[3:5], base.T[5:]]]  # [L, 4] views with stride (1, 7)
    assert not prompts[0].is_contiguous()
    packed = tree.pack(prompts, responses)
    assert torch.equal(packed.values, base.T)


@pytest.mark.parametrize("prompts, responses, error, match", [
    ([torch.zeros(3)], [[torch.zeros(0)]], ValueError, r"responses\[0\]\[0\]: expected shape \[L, \.\.\.\] with L >= 1, got \(0,\)"),
    ([torch.zeros(3), torch.zeros(2, dtype=torch.int64)], [[], []], ValueError,
     r"prompts\[1\]: expected the trailing shape, dtype and device of prompts\[0\]"),
    ([torch.zeros(3)], [[], []], ValueError, r"responses: expected one list per prompt \(1\), got 2"),
    ([], [], ValueError, r"prompts: expected at least one prompt, got none"),
    ([torch.zeros(3)], [torch.zeros(2)], TypeError, r"responses\[0\]: expected a list of tensors, got Tensor"),
    ([[1, 2]], [[]], TypeError, r"prompts\[0\]: expected a torch.Tensor, got list"),
])
def test_pack_rejects(prompts, responses, error, match):
    with pytest.raises(error, match=match):
        tree.pack(prompts, responses)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"packed: expected shape \[N, \.\.\.\] with N = 6 \(from groups\), got \(5,\)"):
        tree.unpack(torch.zeros(5), [(3, [2, 1])])
    with pytest.raises(ValueError, match=r"packed: expected shape \[N, \.\.\.\] with N = 6"):
        tree.unpack_responses(torch.zeros(7, 2), [(3, [2, 1])])
