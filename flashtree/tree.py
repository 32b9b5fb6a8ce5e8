"""Tree encodings and the conversions between them.

Two kinds of trees appear in flashtree.

A. Decode trees (speculative-decoding verification). One sequence holds ``T`` draft tokens that form a
   tree; node 0 is the root. Encodings:

   - ``parents``, int32 ``[T]``: ``parents[0] == -1`` and ``0 <= parents[i] < i`` (topological order);
   - the ancestor mask, bool ``[T, T]``: ``mask[i, j]`` is True iff ``j`` is ``i`` or an ancestor of ``i``
     (True means "may attend");
   - DFS intervals ``(start, end)``, int32 ``[T]`` each: ``j`` lies in the subtree of ``i`` iff
     ``start[i] <= start[j] <= end[i]``;
   - Medusa choice paths: node ``i`` is named by the child indices that lead to it from the root.

B. Packed sequences (training, the convention of "Flash Attention 2 with Tree Attention"). ``N`` tokens
   hold several trees back to back; ``cu_seqlens`` (int32 ``[num_seqs + 1]``) delimits them. Each tree is
   laid out in DFS pre-order and each node is a run of one or more tokens. Per token:

   - ``start_q[t]``: the DFS index (pre-order index within its own tree, root 0) of the token's node;
   - ``end_k[t]``: the largest DFS index in that node's subtree.

   Query ``i`` may attend key ``j`` iff both lie in the same sequence, ``j <= i`` and
   ``start_q[i] <= end_k[j]``. A plain causal sequence is a single node: all starts and ends are 0.

Everything here works on small index tensors with plain PyTorch. Index outputs are int32 and live on
the CPU unless a ``device=`` argument says otherwise. Walks that are inherently sequential (DFS,
subtree sizes) are O(T) Python loops over node ids; nothing builds a quadratic structure unless its
result is one (the masks).
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    # A. decode trees
    "validate_parents",
    "ancestor_mask",
    "depths",
    "position_ids",
    "dfs_order",
    "dfs_intervals",
    "parents_from_paths",
    "MEDUSA_63",
    "chain",
    "retrieve_indices",
    "parents_from_mask",
    "check_tree_mask",
    "is_tree_mask",
    "TreeSpec",
    # B. packed sequences
    "dfs_arrays_from_groups",
    "dfs_arrays_from_parents",
    "parents_from_dfs_arrays",
    "packed_position_ids",
    "tree_visible_pairs",
    "dfs_mask",
    "validate_dfs_arrays",
    "PackedBatch",
    "pack",
    "unpack",
    "path_token_indices",
    "unpack_responses",
]

IndexLike = Union[Sequence[int], np.ndarray, torch.Tensor]
DeviceLike = Union[str, torch.device, None]
Groups = Sequence[Tuple[int, Sequence[int]]]

# Medusa's "mc_sim_7b_63" choice list (FasterDecoding/Medusa, medusa/model/medusa_choices.py):
# 63 paths, which with the implicit root make a 64-token tree of depth 4.
MEDUSA_63: Tuple[Tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)


# ---------------------------------------------------------------------------------------------------
# Private validation helpers (to move into _checks.py once it exists)
# ---------------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(value, name: str, *, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return int(value)


def _index_tensor(value: IndexLike, name: str) -> torch.Tensor:
    """A 1-D int64 CPU copy of a list, tuple, numpy array or integer tensor (int64 so it can index)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    elif isinstance(value, (list, tuple, np.ndarray)):
        try:
            array = np.asarray(value)
            # An empty list comes out as float64; it is still a valid (empty) index list.
            tensor = torch.zeros(0, dtype=torch.int64) if array.shape == (0,) else torch.as_tensor(array)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name}: expected integers, got {value!r}") from err
    else:
        raise TypeError(
            f"{name}: expected a list, tuple, numpy array or integer tensor, got {type(value).__name__}"
        )
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name}: expected an integer dtype, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {tuple(tensor.shape)}")
    return tensor.to(device="cpu", dtype=torch.int64)


def _node_lens(node_lens: IndexLike, num_nodes: int) -> torch.Tensor:
    """node_lens as int64 [num_nodes], every entry >= 1."""
    lens = _index_tensor(node_lens, "node_lens")
    if lens.numel() != num_nodes:
        raise ValueError(f"node_lens: expected one entry per node ({num_nodes}), got {lens.numel()}")
    if (lens < 1).any():
        i = _first_true(lens < 1)
        raise ValueError(f"node_lens[{i}]: expected >= 1 (every node holds a token), got {int(lens[i])}")
    return lens


def _first_true(flags: torch.Tensor) -> int:
    return int(flags.nonzero()[0, 0])


def _short(values: List[int], limit: int = 12) -> str:
    """A list for an error message, cut short when long."""
    if len(values) <= limit:
        return str(values)
    return str(values[:limit])[:-1] + f", ... ({len(values)} in all)]"


# ---------------------------------------------------------------------------------------------------
# A. Decode trees
# ---------------------------------------------------------------------------------------------------

def validate_parents(parents: IndexLike) -> torch.Tensor:
    """Check a parent array and return it as int32 ``[T]`` on the CPU.

    Args:
        parents: ``T >= 1`` integers (list, tuple, numpy array or integer tensor) with
            ``parents[0] == -1`` and ``0 <= parents[i] < i`` for ``i >= 1``.

    Returns:
        int32 tensor ``[T]``.

    Raises:
        TypeError: not a sequence of integers. ValueError: empty, not 1-D, or an entry out of order
        (the message names the first offending index and its value).
    """
    p = _index_tensor(parents, "parents")
    if p.numel() == 0:
        raise ValueError("parents: expected at least one node (the root), got length 0")
    if p[0] != -1:
        raise ValueError(f"parents[0]: expected -1 (node 0 is the root), got {int(p[0])}")
    node = torch.arange(p.numel())
    out_of_order = (p < 0) | (p >= node)
    out_of_order[0] = False
    if out_of_order.any():
        i = _first_true(out_of_order)
        raise ValueError(
            f"parents[{i}]: expected 0 <= parents[{i}] < {i} (nodes in topological order), "
            f"got {int(p[i])}"
        )
    return p.to(torch.int32)


def _parents64(parents: IndexLike) -> torch.Tensor:
    return validate_parents(parents).to(torch.int64)


def _jump_table(parents64: torch.Tensor) -> torch.Tensor:
    """int64 ``[T + 1]``: each node's parent, with the root's -1 replaced by a sentinel node ``T``
    that is its own parent, so pointer jumping can index without branches."""
    sentinel = parents64.numel()
    jump = torch.where(parents64 < 0, torch.full_like(parents64, sentinel), parents64)
    return torch.cat([jump, jump.new_tensor([sentinel])])


def _sum_over_ancestors(parents64: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[T]``: for each node, the sum of ``values`` over the node and all its ancestors.

    Pointer jumping: after round k, ``total[i]`` covers the ``2**k`` nearest ancestors-or-self of i and
    ``jump[i]`` is its ``2**k``-th ancestor (or the sentinel, which holds 0). O(T log depth).
    """
    jump = _jump_table(parents64)
    total = torch.cat([values, values.new_zeros(1)])
    sentinel = parents64.numel()
    while (jump[:-1] != sentinel).any():
        total = total + total[jump]
        jump = jump[jump]
    return total[:-1]


def ancestor_mask(parents: IndexLike, device: DeviceLike = None) -> torch.Tensor:
    """The ancestor-or-self mask of a tree.

    Args:
        parents: ``[T]`` parent array (see :func:`validate_parents`).
        device: where to build the mask (CPU when None).

    Returns:
        bool tensor ``[T, T]``: ``mask[i, j]`` is True iff ``j == i`` or ``j`` is an ancestor of ``i``.
        It is lower-triangular because ``parents[i] < i``.
    """
    parents64 = _parents64(parents).to(device)
    num_nodes = parents64.numel()
    jump = _jump_table(parents64)
    # Row i covers i and its 2**k - 1 nearest ancestors after round k; the sentinel row stays empty.
    mask = torch.zeros(num_nodes + 1, num_nodes + 1, dtype=torch.bool, device=parents64.device)
    mask[:num_nodes, :num_nodes] = torch.eye(num_nodes, dtype=torch.bool, device=parents64.device)
    while (jump[:-1] != num_nodes).any():
        mask = mask | mask[jump]
        jump = jump[jump]
    return mask[:num_nodes, :num_nodes]


def depths(parents: IndexLike) -> torch.Tensor:
    """int32 ``[T]``: the depth of each node (root 0)."""
    parents64 = _parents64(parents)
    return (_sum_over_ancestors(parents64, torch.ones_like(parents64)) - 1).to(torch.int32)


def position_ids(parents: IndexLike, kv_seq_len: Union[int, torch.Tensor]) -> torch.Tensor:
    """Position ids of the tree tokens that follow a KV cache of ``kv_seq_len`` tokens.

    Args:
        parents: ``[T]`` parent array.
        kv_seq_len: an int ``>= 0``, or an integer tensor ``[B]`` (one cache length per sequence).

    Returns:
        int32 ``[T]`` for an int, int32 ``[B, T]`` (on ``kv_seq_len``'s device) for a tensor:
        ``kv_seq_len + depth``.
    """
    node_depth = depths(parents)
    if isinstance(kv_seq_len, torch.Tensor):
        if kv_seq_len.is_floating_point() or kv_seq_len.dtype == torch.bool or kv_seq_len.is_complex():
            raise TypeError(f"kv_seq_len: expected an integer dtype, got {kv_seq_len.dtype}")
        if kv_seq_len.dim() != 1:
            raise ValueError(f"kv_seq_len: expected an int or a 1-D tensor [B], got shape "
                             f"{tuple(kv_seq_len.shape)}")
        node_depth = node_depth.to(kv_seq_len.device)
        return (kv_seq_len.to(torch.int32)[:, None] + node_depth[None, :]).to(torch.int32)
    return node_depth + _check_int(kv_seq_len, "kv_seq_len", minimum=0)


def _children(parents: List[int]) -> List[List[int]]:
    children: List[List[int]] = [[] for _ in parents]
    for node in range(1, len(parents)):
        children[parents[node]].append(node)  # nodes ascend, so each list comes out sorted
    return children


def _subtree_sizes(parents: List[int]) -> List[int]:
    sizes = [1] * len(parents)
    # A child always has a larger id than its parent, so a backward sweep completes every subtree
    # before adding it to its parent.
    for node in range(len(parents) - 1, 0, -1):
        sizes[parents[node]] += sizes[node]
    return sizes


def dfs_order(parents: IndexLike) -> torch.Tensor:
    """int32 ``[T]``: node ids in DFS pre-order, children visited in increasing index order."""
    children = _children(validate_parents(parents).tolist())
    order: List[int] = []
    stack = [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))  # smallest child on top, so it is visited first
    return torch.tensor(order, dtype=torch.int32)


def dfs_intervals(parents: IndexLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """DFS intervals of every node.

    Returns:
        ``(start, end)``, int32 ``[T]`` each: ``start[i]`` is the pre-order index of node ``i`` (see
        :func:`dfs_order`) and ``end[i]`` the largest pre-order index in its subtree. Node ``j`` is in
        the subtree of ``i`` iff ``start[i] <= start[j] <= end[i]``.
    """
    p = validate_parents(parents)
    order = dfs_order(p).to(torch.int64)
    start = torch.empty_like(order)
    start[order] = torch.arange(order.numel())
    end = start + torch.tensor(_subtree_sizes(p.tolist())) - 1
    return start.to(torch.int32), end.to(torch.int32)


def parents_from_paths(paths: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, List[Tuple[int, ...]]]:
    """Build a tree from Medusa-style choice paths.

    Each path lists child indices from the implicit root (node 0): ``(0,)`` is the root's first
    child, ``(0, 2)`` that node's third child. Nodes are numbered as Medusa does, by
    ``(depth, lexicographic path)``, so the result is in topological order.

    Args:
        paths: ``P`` distinct non-empty sequences of ints ``>= 0``; every proper prefix of a path must
            itself be listed.

    Returns:
        ``(parents, order)``: int32 ``[P + 1]``, and a list of ``P + 1`` tuples where ``order[i]`` is the
        path of node ``i`` (``order[0] == ()`` for the root).
    """
    if not isinstance(paths, (list, tuple)):
        raise TypeError(f"paths: expected a list or tuple of paths, got {type(paths).__name__}")
    normalized = []
    for k, path in enumerate(paths):
        if (not isinstance(path, (list, tuple)) or len(path) == 0
                or not all(_is_int(c) and c >= 0 for c in path)):
            raise ValueError(f"paths[{k}]: expected a non-empty list of child indices >= 0, got {path!r}")
        normalized.append(tuple(int(c) for c in path))
    seen = set()
    for k, path in enumerate(normalized):
        if path in seen:
            raise ValueError(f"paths[{k}]: expected each path once, got {list(path)} a second time")
        seen.add(path)

    nodes = sorted(normalized, key=lambda path: (len(path), path))
    node_of = {(): 0}
    node_of.update({path: i + 1 for i, path in enumerate(nodes)})
    parents = [-1]
    for path in nodes:
        if path[:-1] not in node_of:
            raise ValueError(
                f"paths: expected the prefix {list(path[:-1])} of path {list(path)} to be listed too "
                f"(every node's parent is a node), got no such path"
            )
        parents.append(node_of[path[:-1]])
    return torch.tensor(parents, dtype=torch.int32), [()] + nodes


def chain(n: int) -> torch.Tensor:
    """int32 ``[n]``: the parents of a linear chain of ``n >= 1`` nodes, ``[-1, 0, 1, ..., n - 2]``."""
    n = _check_int(n, "n", minimum=1)
    return torch.arange(-1, n - 1, dtype=torch.int32)


def retrieve_indices(parents: IndexLike) -> torch.Tensor:
    """The root-to-leaf paths of a tree.

    Returns:
        int32 ``[num_leaves, max_depth + 1]``: row ``r`` lists the node ids from the root to the
        ``r``-th leaf (leaves in increasing node order), padded with -1 at the end.
    """
    parents64 = _parents64(parents)
    node_depth = _sum_over_ancestors(parents64, torch.ones_like(parents64)) - 1
    is_leaf = torch.ones(parents64.numel(), dtype=torch.bool)
    is_leaf[parents64[1:]] = False
    leaves = is_leaf.nonzero().flatten()

    paths = torch.full((leaves.numel(), int(node_depth.max()) + 1), -1, dtype=torch.int64)
    row = torch.arange(leaves.numel())
    node = leaves.clone()
    # Walk up from every leaf at once, writing each node in the column of its depth.
    while (node >= 0).any():
        alive = node >= 0
        paths[row[alive], node_depth[node[alive]]] = node[alive]
        node[alive] = parents64[node[alive]]
    return paths.to(torch.int32)


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = may attend), got {mask.dtype}")
    if mask.dim() not in (2, 3) or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] == 0:
        raise ValueError(f"mask: expected shape [T, T] or [B, T, T] with T >= 1, got {tuple(mask.shape)}")
    return mask


def parents_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Read the parents off a tree mask.

    Args:
        mask: bool ``[T, T]`` or ``[B, T, T]``.

    Returns:
        int32 ``[T]`` or ``[B, T]`` on the mask's device: the parent of ``i`` is the largest ``j < i``
        with ``mask[i, j]``, or -1 when there is none. Only meaningful for a tree mask
        (see :func:`check_tree_mask`); the result is not validated.
    """
    mask = _bool_mask(mask)
    num_nodes = mask.shape[-1]
    strictly_earlier = torch.ones(num_nodes, num_nodes, dtype=torch.bool, device=mask.device).tril(-1)
    column = torch.arange(num_nodes, device=mask.device).expand(num_nodes, num_nodes)
    candidates = torch.where(mask & strictly_earlier, column, torch.full_like(column, -1))
    return candidates.amax(dim=-1).to(torch.int32)


def _check_one_tree_mask(mask: torch.Tensor, name: str) -> None:
    diagonal = mask.diagonal()
    if not diagonal.all():
        i = _first_true(~diagonal)
        raise ValueError(f"{name}[{i}, {i}]: expected True (reflexive: every token attends "
                         f"to itself), got False")
    above = mask.triu(1)
    if above.any():
        i, j = above.nonzero()[0].tolist()
        raise ValueError(f"{name}[{i}, {j}]: expected False (above the diagonal: a token never "
                         f"sees a later one), got True")
    parents = parents_from_mask(mask)
    orphans = parents[1:] < 0
    if orphans.any():
        i = _first_true(orphans) + 1
        raise ValueError(f"{name}[{i}, :{i}]: expected at least one True (row {i} needs a parent; "
                         f"only row 0, the root, has none), got none")
    expected = ancestor_mask(parents)
    differs = (expected != mask).any(dim=1)
    if differs.any():
        i = _first_true(differs)
        want = expected[i].nonzero().flatten().tolist()
        got = mask[i].nonzero().flatten().tolist()
        raise ValueError(f"{name}[{i}]: expected True exactly at columns {_short(want)} (ancestor-closed: "
                         f"node {i}, its parent {int(parents[i])} and that parent's ancestors), "
                         f"got True at columns {_short(got)}")


def check_tree_mask(mask: torch.Tensor) -> None:
    """Raise unless ``mask`` is the ancestor-or-self mask of some tree.

    Args:
        mask: bool ``[T, T]`` or ``[B, T, T]`` (each of the ``B`` masks is checked).

    Raises:
        TypeError: not a bool tensor. ValueError: bad shape, or a mask that is not reflexive (names the
        first row ``i`` with ``mask[i, i]`` False), has a True entry above the diagonal, has a row
        ``i >= 1`` with no earlier True entry, or differs from the ancestor mask of
        :func:`parents_from_mask` (names the first row that differs).
    """
    mask = _bool_mask(mask).cpu()
    if mask.dim() == 2:
        _check_one_tree_mask(mask, "mask")
        return
    for b in range(mask.shape[0]):
        _check_one_tree_mask(mask[b], f"mask[{b}]")


def is_tree_mask(mask: torch.Tensor) -> bool:
    """True iff :func:`check_tree_mask` accepts ``mask`` (TypeError still propagates for a non-bool mask)."""
    try:
        check_tree_mask(mask)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """An immutable, hashable decode tree; usable as a cache key for plans.

    Stores only the parent ids; every property is computed on demand by the functions of this module.
    """

    parent_ids: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "parent_ids", tuple(validate_parents(self.parent_ids).tolist()))

    @classmethod
    def from_parents(cls, parents: IndexLike) -> "TreeSpec":
        return cls(tuple(validate_parents(parents).tolist()))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TreeSpec":
        return cls.from_parents(parents_from_paths(paths)[0])

    @classmethod
    def chain(cls, n: int) -> "TreeSpec":
        return cls.from_parents(chain(n))

    @property
    def num_nodes(self) -> int:
        return len(self.parent_ids)

    @property
    def parents(self) -> torch.Tensor:
        """int32 ``[T]``."""
        return torch.tensor(self.parent_ids, dtype=torch.int32)

    @property
    def depths(self) -> torch.Tensor:
        """int32 ``[T]``."""
        return depths(self.parent_ids)

    @property
    def mask(self) -> torch.Tensor:
        """bool ``[T, T]``, the ancestor-or-self mask."""
        return ancestor_mask(self.parent_ids)

    @property
    def dfs_order(self) -> torch.Tensor:
        """int32 ``[T]``."""
        return dfs_order(self.parent_ids)

    @property
    def dfs_intervals(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(start, end)``, int32 ``[T]`` each."""
        return dfs_intervals(self.parent_ids)

    @property
    def retrieve_indices(self) -> torch.Tensor:
        """int32 ``[num_leaves, max_depth + 1]``."""
        return retrieve_indices(self.parent_ids)

    def position_ids(self, kv_seq_len: Union[int, torch.Tensor]) -> torch.Tensor:
        """int32 ``[T]`` or ``[B, T]``; see :func:`position_ids`."""
        return position_ids(self.parent_ids, kv_seq_len)


# ---------------------------------------------------------------------------------------------------
# B. Packed sequences in DFS order
# ---------------------------------------------------------------------------------------------------

def _check_groups(groups: Groups) -> List[Tuple[int, List[int]]]:
    """groups as a list of (prompt_len, [response_len, ...]) with every length >= 1."""
    if not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups: expected a list of (prompt_len, [response_len, ...]), got "
                        f"{type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups: expected at least one (prompt_len, [response_len, ...]) pair, got none")
    checked = []
    for g, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or len(group) != 2 or not isinstance(group[1], (list, tuple)):
            raise ValueError(f"groups[{g}]: expected a pair (prompt_len, [response_len, ...]), got {group!r}")
        prompt_len = _check_int(group[0], f"groups[{g}][0] (prompt length)", minimum=1)
        response_lens = [
            _check_int(length, f"groups[{g}][1][{r}] (response length; empty responses are not packed)",
                       minimum=1)
            for r, length in enumerate(group[1])
        ]
        checked.append((prompt_len, response_lens))
    return checked


def _star(num_responses: int) -> List[int]:
    """Parents of a prompt (root) with ``num_responses`` response children, already in pre-order."""
    return [-1] + [0] * num_responses


def dfs_arrays_from_groups(groups: Groups, *, device: DeviceLike = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token DFS arrays for packed prompt/response groups.

    Each group is one packed sequence ``[prompt][response 1]...[response R]``: the prompt is the root,
    every response a child of it.

    Args:
        groups: ``num_seqs >= 1`` pairs ``(prompt_len, [response_len, ...])``. Every length must be
            ``>= 1``: a zero-length prompt or response is rejected with ValueError, because an empty
            node has no token to carry its ``start_q``/``end_k``. A group may have no responses (then
            it is a plain causal sequence).
        device: where to put the results (CPU when None).

    Returns:
        ``(start_q, end_k, cu_seqlens)``: int32 ``[N]``, ``[N]`` and ``[num_seqs + 1]``.
    """
    start_q, end_k, seq_lens = [], [], []
    for prompt_len, response_lens in _check_groups(groups):
        node_lens = [prompt_len] + response_lens
        starts, ends = dfs_arrays_from_parents(_star(len(response_lens)), node_lens)
        start_q.append(starts)
        end_k.append(ends)
        seq_lens.append(sum(node_lens))
    cu_seqlens = torch.tensor([0] + seq_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return torch.cat(start_q).to(device), torch.cat(end_k).to(device), cu_seqlens.to(device)


def _check_preorder(parents: List[int]) -> None:
    """Raise unless node ids are a DFS pre-order numbering of the tree."""
    # In pre-order, node i hangs off the path from the root to node i - 1.
    path, on_path = [0], {0}
    for node in range(1, len(parents)):
        parent = parents[node]
        if parent not in on_path:
            raise ValueError(
                f"parents[{node}]: expected one of {_short(path)} (node {node - 1} or one of its "
                f"ancestors: nodes must be numbered in DFS pre-order), got {parent}"
            )
        while path[-1] != parent:
            on_path.discard(path.pop())
        path.append(node)
        on_path.add(node)


def dfs_arrays_from_parents(parents: IndexLike, node_lens: IndexLike, *, device: DeviceLike = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token DFS arrays for one tree whose nodes are numbered in DFS pre-order.

    Args:
        parents: ``[K]`` parent array that is also a pre-order numbering (ValueError otherwise);
            e.g. ``[-1, 0, 1, 0]`` but not ``[-1, 0, 0, 1]``.
        node_lens: ``[K]`` token count of each node, each ``>= 1``.
        device: where to put the results (CPU when None).

    Returns:
        ``(start_q, end_k)``, int32 ``[N]`` each with ``N = sum(node_lens)``, tokens laid out node by
        node.
    """
    parent_list = validate_parents(parents).tolist()
    _check_preorder(parent_list)
    lens = _node_lens(node_lens, len(parent_list))
    node_start = torch.arange(len(parent_list))  # pre-order numbering: a node's DFS index is its id
    node_end = node_start + torch.tensor(_subtree_sizes(parent_list)) - 1
    start_q = node_start.repeat_interleave(lens).to(torch.int32)
    end_k = node_end.repeat_interleave(lens).to(torch.int32)
    return start_q.to(device), end_k.to(device)


def _parents_from_node_ends(node_ends: List[int]) -> List[int]:
    """Parents of a pre-order tree given each node's subtree end.

    The ancestors of node n are the earlier nodes whose interval still covers n; the parent is the
    latest of them. A stack holds the current root-to-node path. Assumes the ends nest as a tree.
    """
    parents, path = [], []
    for node in range(len(node_ends)):
        while path and node_ends[path[-1]] < node:
            path.pop()
        parents.append(path[-1] if path else -1)
        path.append(node)
    return parents


def parents_from_dfs_arrays(start_q: IndexLike, end_k: IndexLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Recover the tree of one packed sequence from its per-token DFS arrays (inverse of
    :func:`dfs_arrays_from_parents`).

    Args:
        start_q, end_k: ``[N]`` integers for one packed sequence (checked with
            :func:`validate_dfs_arrays`).

    Returns:
        ``(parents, node_lens)``: int32 ``[K]`` each, ``K`` the number of nodes, in pre-order.
    """
    starts = _index_tensor(start_q, "start_q").to(torch.int32)
    ends = _index_tensor(end_k, "end_k").to(torch.int32)
    if starts.numel() == 0:
        raise ValueError("start_q: expected at least one token, got 0")
    validate_dfs_arrays(starts, ends, torch.tensor([0, starts.numel()], dtype=torch.int32))
    # Run-length decode: a node is a run of equal start_q.
    first_token = torch.cat([torch.tensor([True]), starts[1:] != starts[:-1]]).nonzero().flatten()
    node_lens = torch.diff(first_token, append=torch.tensor([starts.numel()]))
    parents = _parents_from_node_ends(ends[first_token].tolist())
    return torch.tensor(parents, dtype=torch.int32), node_lens.to(torch.int32)


def packed_position_ids(parents: IndexLike, node_lens: IndexLike) -> torch.Tensor:
    """Position ids of a tree packed node by node (in node id order).

    Each node's positions continue from the end of its parent's; the root starts at 0. So every token
    gets the position it would have in the plain sequence "its root-to-node path".

    Args:
        parents: ``[K]`` parent array.
        node_lens: ``[K]`` token count of each node, each ``>= 1``.

    Returns:
        int32 ``[N]``, ``N = sum(node_lens)``.
    """
    parents64 = _parents64(parents)
    lens = _node_lens(node_lens, parents64.numel())
    node_first_position = _sum_over_ancestors(parents64, lens) - lens  # tokens in proper ancestors
    token_node = torch.arange(lens.numel()).repeat_interleave(lens)
    node_first_token = lens.cumsum(0) - lens
    offset_in_node = torch.arange(token_node.numel()) - node_first_token[token_node]
    return (node_first_position[token_node] + offset_in_node).to(torch.int32)


def _packed_int64(start_q: torch.Tensor, end_k: torch.Tensor, cu_seqlens: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape checks shared by the packed-sequence helpers; returns int64 CPU copies."""
    starts = _index_tensor(start_q, "start_q")
    ends = _index_tensor(end_k, "end_k")
    cu = _index_tensor(cu_seqlens, "cu_seqlens")
    if ends.numel() != starts.numel():
        raise ValueError(f"end_k: expected the length of start_q ({starts.numel()}), got {ends.numel()}")
    if cu.numel() < 2 or cu[0] != 0 or cu[-1] != starts.numel() or (torch.diff(cu) <= 0).any():
        raise ValueError(f"cu_seqlens: expected a strict rise from 0 to N = {starts.numel()}, got "
                         f"{_short(cu.tolist())}")
    return starts, ends, cu


def _sequence_ids(cu: torch.Tensor) -> torch.Tensor:
    return torch.arange(cu.numel() - 1).repeat_interleave(torch.diff(cu))


def tree_visible_pairs(start_q: torch.Tensor, end_k: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """Number of (query i, key j) pairs the tree rule allows, without an ``N x N`` tensor.

    Tokens are grouped into runs of equal (sequence, start_q, end_k); within a run the rule is plain
    causal, and between two runs it is all or nothing. So the count costs O(runs^2) per sequence, in
    row chunks that bound memory. It follows the rule literally, valid arrays or not.

    Args:
        start_q, end_k: int ``[N]``. cu_seqlens: int ``[num_seqs + 1]``.

    Returns:
        The count, a Python int (equal to ``dfs_mask(...).sum()``).
    """
    starts, ends, cu = _packed_int64(start_q, end_k, cu_seqlens)
    seq = _sequence_ids(cu)
    new_run = torch.ones_like(starts, dtype=torch.bool)
    new_run[1:] = (starts[1:] != starts[:-1]) | (ends[1:] != ends[:-1]) | (seq[1:] != seq[:-1])
    run_first = new_run.nonzero().flatten()
    run_len = torch.diff(run_first, append=torch.tensor([starts.numel()]))
    run_start, run_end, run_seq = starts[run_first], ends[run_first], seq[run_first]

    sees_itself = run_start <= run_end
    total = int((run_len * (run_len + 1) // 2)[sees_itself].sum())
    run_bounds = torch.searchsorted(run_seq, torch.arange(cu.numel() - 1), right=False).tolist()
    run_bounds.append(run_seq.numel())
    for first, last in zip(run_bounds[:-1], run_bounds[1:]):
        total += _cross_run_pairs(run_start[first:last], run_end[first:last], run_len[first:last])
    return total


def _cross_run_pairs(run_start: torch.Tensor, run_end: torch.Tensor, run_len: torch.Tensor) -> int:
    """Pairs (query in run r, key in an earlier run q) of one sequence with start(r) <= end(q)."""
    num_runs = run_start.numel()
    rows_per_chunk = max(1, (1 << 22) // max(num_runs, 1))  # about 4M mask entries at a time
    total = 0
    for first in range(0, num_runs, rows_per_chunk):
        rows = torch.arange(first, min(num_runs, first + rows_per_chunk))
        earlier = torch.arange(num_runs)[None, :] < rows[:, None]
        visible = earlier & (run_start[rows, None] <= run_end[None, :])
        keys_seen = (visible * run_len[None, :]).sum(dim=1)
        total += int((keys_seen * run_len[rows]).sum())
    return total


def dfs_mask(start_q: torch.Tensor, end_k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Dense bool ``[N, N]`` mask of the tree rule (True = query i may attend key j). O(N^2) memory:
    for small N and tests only; kernels evaluate the rule on the fly.

    Args:
        start_q, end_k: int ``[N]``. cu_seqlens: int ``[num_seqs + 1]``.
    """
    starts, ends, cu = _packed_int64(start_q, end_k, cu_seqlens)
    seq = _sequence_ids(cu)
    token = torch.arange(starts.numel())
    same_sequence = seq[:, None] == seq[None, :]
    causal = token[None, :] <= token[:, None]
    return same_sequence & causal & (starts[:, None] <= ends[None, :])


def _int32_vector(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {tuple(value.shape)}")
    return value.detach().to(device="cpu", dtype=torch.int64)


def _check_cu_seqlens(cu: torch.Tensor, num_tokens: int) -> None:
    if cu.numel() < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., N], got {cu.numel()}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0]: expected 0, got {int(cu[0])}")
    not_rising = torch.diff(cu) <= 0
    if not_rising.any():
        k = _first_true(not_rising) + 1
        raise ValueError(f"cu_seqlens[{k}]: expected > cu_seqlens[{k - 1}] = {int(cu[k - 1])} "
                         f"(strictly increasing), got {int(cu[k])}")
    if cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens[-1]: expected the number of tokens N = {num_tokens}, got {int(cu[-1])}")


def _check_token_runs(starts: torch.Tensor, ends: torch.Tensor, seq_first: torch.Tensor) -> None:
    """Every node is one contiguous run, numbered 0, 1, 2, ... within its sequence."""
    bad_first = starts[seq_first] != 0
    if bad_first.any():
        t = int(seq_first[_first_true(bad_first)])
        raise ValueError(f"start_q[{t}]: expected 0 (token {t} opens a sequence, whose first node "
                         f"is the root), got {int(starts[t])}")
    is_first = torch.zeros_like(starts, dtype=torch.bool)
    is_first[seq_first] = True
    step = torch.diff(starts, prepend=starts[:1])
    bad_step = ~is_first & (step != 0) & (step != 1)
    if bad_step.any():
        t = _first_true(bad_step)
        previous = int(starts[t - 1])
        raise ValueError(f"start_q[{t}]: expected {previous} or {previous + 1} (start_q[{t - 1}] or the "
                         f"next node: nodes are packed in DFS order, each as one run), got {int(starts[t])}")
    inverted = ends < starts
    if inverted.any():
        t = _first_true(inverted)
        raise ValueError(f"end_k[{t}]: expected >= start_q[{t}] = {int(starts[t])} (a node's subtree "
                         f"contains the node), got {int(ends[t])}")
    end_changes = ~is_first & (step == 0) & (torch.diff(ends, prepend=ends[:1]) != 0)
    if end_changes.any():
        t = _first_true(end_changes)
        raise ValueError(f"end_k[{t}]: expected {int(ends[t - 1])} like end_k[{t - 1}] (both tokens belong "
                         f"to node {int(starts[t])}), got {int(ends[t])}")


def _check_nesting(starts: torch.Tensor, ends: torch.Tensor, cu: torch.Tensor) -> None:
    """Within each sequence the root spans every node and each node lies inside its parent."""
    for k in range(cu.numel() - 1):
        first, last = int(cu[k]), int(cu[k + 1])
        last_node = int(starts[last - 1])
        if ends[first] != last_node:
            raise ValueError(f"end_k[{first}]: expected {last_node} (the root of sequence {k} spans all "
                             f"its nodes 0..{last_node}), got {int(ends[first])}")
        node_first_token = first + torch.cat([
            torch.tensor([0]), (starts[first + 1:last] != starts[first:last - 1]).nonzero().flatten() + 1])
        node_ends = ends[node_first_token]
        parents = torch.tensor(_parents_from_node_ends(node_ends.tolist()))
        outside = node_ends[1:] > node_ends[parents[1:]]
        if outside.any():
            n = _first_true(outside) + 1
            t, parent = int(node_first_token[n]), int(parents[n])
            raise ValueError(f"end_k[{t}]: expected <= {int(node_ends[parent])} (node {n} of sequence {k} "
                             f"lies inside the subtree of its parent, node {parent}), got {int(ends[t])}")


def validate_dfs_arrays(start_q: torch.Tensor, end_k: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Opt-in full check of packed DFS arrays (copies to the CPU and synchronises; not for hot paths).

    Args:
        start_q, end_k: int32 ``[N]``. cu_seqlens: int32 ``[num_seqs + 1]``, 0 first, strictly
            increasing, N last.

    Checks, within each sequence: start_q is 0 on its first token and then rises by 0 or 1 per token
    (each node one contiguous run, nodes numbered in order); end_k is constant within a node and
    ``>= start_q``; the root's end_k is the last node; and each node's interval lies inside its
    parent's (the intervals nest as a tree).

    Raises:
        TypeError: not an int32 tensor. ValueError: anything else; the message names the array, the
        index, the expected and the actual value.
    """
    starts = _int32_vector(start_q, "start_q")
    ends = _int32_vector(end_k, "end_k")
    cu = _int32_vector(cu_seqlens, "cu_seqlens")
    if ends.numel() != starts.numel():
        raise ValueError(f"end_k: expected the length of start_q ({starts.numel()}), got {ends.numel()}")
    _check_cu_seqlens(cu, starts.numel())
    _check_token_runs(starts, ends, cu[:-1])
    _check_nesting(starts, ends, cu)


class PackedBatch(NamedTuple):
    """A packed batch of prompt/response groups (see :func:`pack`)."""

    values: torch.Tensor        # [N, ...] the tokens (or embeddings), group after group
    start_q: torch.Tensor       # int32 [N]
    end_k: torch.Tensor         # int32 [N]
    cu_seqlens: torch.Tensor    # int32 [num_seqs + 1]
    position_ids: torch.Tensor  # int32 [N]
    groups: List[Tuple[int, List[int]]]  # (prompt_len, [response_len, ...]) per sequence, for unpack


def _check_token_tensor(value, name: str, like: torch.Tensor = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() < 1 or value.shape[0] == 0:
        raise ValueError(f"{name}: expected shape [L, ...] with L >= 1, got {tuple(value.shape)}")
    if like is not None and (value.shape[1:] != like.shape[1:] or value.dtype != like.dtype
                             or value.device != like.device):
        raise ValueError(f"{name}: expected the trailing shape, dtype and device of prompts[0] "
                         f"({tuple(like.shape[1:])}, {like.dtype}, {like.device}), got "
                         f"({tuple(value.shape[1:])}, {value.dtype}, {value.device})")
    return value


def pack(prompts: Sequence[torch.Tensor], responses: Sequence[Sequence[torch.Tensor]]) -> PackedBatch:
    """Pack prompts and their responses into one DFS-ordered sequence per prompt.

    Args:
        prompts: ``num_seqs >= 1`` tensors ``[L_p, ...]`` (token ids ``[L_p]`` or embeddings), ``L_p >= 1``.
        responses: one list per prompt of tensors ``[L_r, ...]``, ``L_r >= 1``, same trailing shape,
            dtype and device as the prompts. A prompt may have no responses.

    Returns:
        :class:`PackedBatch`: ``values [N, ...]`` laid out ``[prompt][resp 1]...[resp R]`` per group,
        and int32 ``start_q [N]``, ``end_k [N]``, ``cu_seqlens [num_seqs + 1]``, ``position_ids [N]``
        on the values' device, plus the group lengths for :func:`unpack`.
    """
    if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)):
        raise TypeError(f"prompts, responses: expected lists, got {type(prompts).__name__} and "
                        f"{type(responses).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got none")
    if len(responses) != len(prompts):
        raise ValueError(f"responses: expected one list per prompt ({len(prompts)}), got {len(responses)}")
    first = _check_token_tensor(prompts[0], "prompts[0]")
    pieces, groups = [], []
    for g, (prompt, group_responses) in enumerate(zip(prompts, responses)):
        if not isinstance(group_responses, (list, tuple)):
            raise TypeError(f"responses[{g}]: expected a list of tensors, got "
                            f"{type(group_responses).__name__}")
        pieces.append(_check_token_tensor(prompt, f"prompts[{g}]", first))
        for r, response in enumerate(group_responses):
            pieces.append(_check_token_tensor(response, f"responses[{g}][{r}]", first))
        groups.append((prompt.shape[0], [response.shape[0] for response in group_responses]))

    values = torch.cat(pieces)
    start_q, end_k, cu_seqlens = dfs_arrays_from_groups(groups, device=values.device)
    positions = torch.cat([packed_position_ids(_star(len(lens)), [prompt_len] + lens)
                           for prompt_len, lens in groups])
    return PackedBatch(values, start_q, end_k, cu_seqlens, positions.to(values.device), groups)


def _group_offsets(groups: List[Tuple[int, List[int]]]) -> List[int]:
    """Packed index of the first token of each group, plus N at the end."""
    offsets = [0]
    for prompt_len, response_lens in groups:
        offsets.append(offsets[-1] + prompt_len + sum(response_lens))
    return offsets


def _check_packed_length(packed: torch.Tensor, total: int) -> None:
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed: expected a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() < 1 or packed.shape[0] != total:
        raise ValueError(f"packed: expected shape [N, ...] with N = {total} (from groups), got "
                         f"{tuple(packed.shape)}")


def unpack(packed: torch.Tensor, groups: Groups) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]]]:
    """Split a packed ``[N, ...]`` tensor (inputs, or any per-token output) back into its pieces.

    Args:
        packed: ``[N, ...]``. groups: the ``(prompt_len, [response_len, ...])`` pairs it was packed with.

    Returns:
        ``(prompts, responses)``: views ``[L_p, ...]`` and, per prompt, a list of views ``[L_r, ...]``.
    """
    groups = _check_groups(groups)
    _check_packed_length(packed, _group_offsets(groups)[-1])
    pieces = iter(torch.split(packed, [n for p, rs in groups for n in [p] + rs]))
    prompts, responses = [], []
    for _, response_lens in groups:
        prompts.append(next(pieces))
        responses.append([next(pieces) for _ in response_lens])
    return prompts, responses


def path_token_indices(groups: Groups) -> List[List[torch.Tensor]]:
    """Packed token indices of every prompt + response path, in order.

    Running the model on ``packed[indices]`` as one plain causal sequence should match its packed run
    on those tokens.

    Args:
        groups: ``(prompt_len, [response_len, ...])`` pairs.

    Returns:
        Per group, one int32 tensor ``[prompt_len + response_len]`` per response; a group with no
        responses gets one entry, the prompt alone (its only root-to-leaf path).
    """
    groups = _check_groups(groups)
    paths = []
    for offset, (prompt_len, response_lens) in zip(_group_offsets(groups), groups):
        prompt = torch.arange(offset, offset + prompt_len, dtype=torch.int32)
        if not response_lens:
            paths.append([prompt])
            continue
        response_first = offset + prompt_len + torch.tensor([0] + response_lens).cumsum(0)[:-1]
        paths.append([torch.cat([prompt, torch.arange(int(first), int(first) + length, dtype=torch.int32)])
                      for first, length in zip(response_first, response_lens)])
    return paths


def unpack_responses(packed: torch.Tensor, groups: Groups) -> List[List[torch.Tensor]]:
    """The packed values of every prompt + response path (see :func:`path_token_indices`).

    Args:
        packed: ``[N, ...]``. groups: ``(prompt_len, [response_len, ...])`` pairs.

    Returns:
        Per group, per response, a tensor ``[prompt_len + response_len, ...]`` (a copy).
    """
    paths = path_token_indices(groups)
    _check_packed_length(packed, _group_offsets(_check_groups(groups))[-1])
    return [[packed.index_select(0, path.to(device=packed.device, dtype=torch.int64)) for path in group]
            for group in paths]


# ---------------------------------------------------------------------------------------------------
# C. Speculative-decoding trees on the device: static trees as tensors, batched per-sequence trees, and
#    EAGLE-style dynamic top-k expansion. Everything here is fixed-shape torch code with no host sync.
# ---------------------------------------------------------------------------------------------------

class TreeTensors(NamedTuple):
    """One decode tree (or one per sequence) as device tensors, ready for verification.

    Shapes carry an optional leading ``B`` (per-sequence trees, e.g. dynamic ones); without it the tree
    is shared by the batch.
    """

    parents: torch.Tensor   # int64 [(B,) T], -1 for the root
    depths: torch.Tensor    # int64 [(B,) T], root 0
    mask: torch.Tensor      # bool [(B,) T, T], ancestor-or-self (True = may attend)
    paths: torch.Tensor     # int64 [(B,) P, max_depth + 1], root-to-node paths padded with -1
    dfs_order: torch.Tensor  # int64 [(B,) T], pre-order node ids, children in increasing id order

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[-1]

    @property
    def max_depth(self) -> int:
        """Static bound: the number of path slots minus one."""
        return self.paths.shape[-1] - 1

    def position_ids(self, kv_seq_len: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, T]``: ``kv_seq_len[b] + depth``."""
        return kv_seq_len.to(torch.int64)[:, None] + self.depths


def tree_tensors(spec: "TreeSpec", device: DeviceLike = None) -> TreeTensors:
    """A static tree (chain, Medusa choices, any :class:`TreeSpec`) as :class:`TreeTensors` on ``device``.

    ``paths`` are the root-to-leaf paths of :func:`retrieve_indices`. Build it once per tree and reuse it.
    """
    if not isinstance(spec, TreeSpec):
        raise TypeError(f"spec: expected a flashtree.tree.TreeSpec, got {type(spec).__name__}")
    return TreeTensors(
        parents=spec.parents.to(device=device, dtype=torch.int64),
        depths=spec.depths.to(device=device, dtype=torch.int64),
        mask=spec.mask.to(device),
        paths=spec.retrieve_indices.to(device=device, dtype=torch.int64),
        dfs_order=spec.dfs_order.to(device=device, dtype=torch.int64),
    )


def batched_tree_tensors(parents: torch.Tensor, max_depth: int) -> TreeTensors:
    """Per-sequence trees given as a parents tensor on any device, without a host sync.

    Args:
        parents: int ``[B, T]``, each row a valid parent array (``-1`` first, ``parents[b, i] < i``;
            not checked here: call :func:`validate_parents` on rows when in doubt).
        max_depth: a static bound on every tree's depth (extra path slots stay -1).

    Returns:
        :class:`TreeTensors` with a leading ``B``; ``paths[b, i]`` is the path from the root to node ``i``
        (one path per node, leaves or not: the longest accepted prefix is the same).
    """
    if not isinstance(parents, torch.Tensor) or parents.dim() != 2:
        raise ValueError(f"parents: expected a tensor [B, T], got "
                         f"{tuple(parents.shape) if isinstance(parents, torch.Tensor) else type(parents).__name__}")
    max_depth = _check_int(max_depth, "max_depth", minimum=0)
    bsz, num_nodes = parents.shape
    dev = parents.device
    sentinel = num_nodes
    p64 = parents.to(torch.int64)
    jump = torch.cat([torch.where(p64 < 0, torch.full_like(p64, sentinel), p64),
                      torch.full((bsz, 1), sentinel, dtype=torch.int64, device=dev)], 1)  # [B, T + 1]
    eye = torch.eye(num_nodes + 1, dtype=torch.bool, device=dev)
    eye[sentinel, sentinel] = False
    mask = eye.expand(bsz, -1, -1).clone()
    # Pointer jumping, a static number of rounds (2**rounds > T): after round k, row i holds i and its
    # 2**k - 1 nearest ancestors, and jump[i] is its 2**k-th ancestor (or the empty sentinel row).
    for _ in range(int(num_nodes).bit_length()):
        mask = mask | torch.gather(mask, 1, jump[:, :, None].expand(-1, -1, num_nodes + 1))
        jump = jump.gather(1, jump)
    mask = mask[:, :num_nodes, :num_nodes]
    depths_out = mask.sum(-1) - 1  # ancestors-or-self minus one
    # paths[b, i, d] = the ancestor of i at depth d: scatter column j into slot depth[j].
    slot = torch.where(mask, depths_out[:, None, :], torch.full_like(depths_out[:, None, :], max_depth + 1))
    cols = torch.arange(num_nodes, device=dev).expand(bsz, num_nodes, num_nodes)
    paths = torch.full((bsz, num_nodes, max_depth + 2), -1, dtype=torch.int64, device=dev)
    paths.scatter_(2, slot.clamp(max=max_depth + 1), cols)
    paths = paths[:, :, :max_depth + 1].contiguous()
    return TreeTensors(p64, depths_out, mask, paths, _batched_dfs_order(p64, mask, depths_out))


def _batched_dfs_order(parents: torch.Tensor, mask: torch.Tensor, node_depths: torch.Tensor) -> torch.Tensor:
    """Pre-order ids (children in increasing id order) from the ancestor mask, with matmuls only.

    pre(i) = depth(i) + sum over the ancestors-or-self a of i of E(a), where E(a) is the total size of
    the subtrees of a's earlier siblings (they are all visited before a).
    """
    num_nodes = mask.shape[-1]
    m = mask.to(torch.float32)
    subtree = m.sum(1)  # [B, T]: nodes having j as ancestor-or-self
    earlier = torch.ones(num_nodes, num_nodes, dtype=torch.bool, device=mask.device).tril(-1)
    siblings = (parents[:, :, None] == parents[:, None, :]) & earlier & (parents[:, :, None] >= 0)
    before = torch.bmm(siblings.to(torch.float32), subtree[:, :, None])  # [B, T, 1]
    pre = node_depths.to(torch.float32) + torch.bmm(m, before).squeeze(-1)
    return torch.argsort(pre, dim=1)


def topk_tree(cand_parents: torch.Tensor, cand_scores: torch.Tensor, num_nodes: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-style reranking: keep the root and the ``num_nodes - 1`` best candidates of an expansion.

    Candidates are numbered in expansion order (a parent before its children). The score of a
    candidate must not exceed its parent's (cumulative log-probabilities satisfy this), so the best
    set is closed under ancestors; ties are broken toward shallower candidates.

    Args:
        cand_parents: int ``[B, K]``: candidate 0 is the root (parent -1), ``cand_parents[b, i] < i``.
        cand_scores: float ``[B, K]`` (the root's score is ignored).
        num_nodes: the tree size to keep, ``1 <= num_nodes <= K``.

    Returns:
        ``(parents, kept)``: int64 ``[B, num_nodes]`` each. ``kept[b, n]`` is the candidate that became
        node ``n`` (ascending, so the tree is in topological order); ``parents`` is the new tree.
    """
    if cand_parents.shape != cand_scores.shape or cand_parents.dim() != 2:
        raise ValueError(f"cand_scores: expected the shape of cand_parents [B, K] "
                         f"{tuple(cand_parents.shape)}, got {tuple(cand_scores.shape)}")
    num_nodes = _check_int(num_nodes, "num_nodes", minimum=1)
    bsz, num_cands = cand_parents.shape
    if num_nodes > num_cands:
        raise ValueError(f"num_nodes: expected <= K = {num_cands} (the candidates), got {num_nodes}")
    dev = cand_parents.device
    p64 = cand_parents.to(torch.int64)
    # A tiny per-id penalty breaks ties toward earlier (hence shallower or parent) candidates.
    ids = torch.arange(num_cands, device=dev, dtype=torch.float64)
    score = cand_scores.to(torch.float64) - ids * 1e-9
    score[:, 0] = float("inf")
    kept = torch.topk(score, num_nodes, dim=1).indices.sort(dim=1).values  # [B, N]
    new_id = torch.full((bsz, num_cands), -1, dtype=torch.int64, device=dev)
    new_id.scatter_(1, kept, torch.arange(num_nodes, device=dev).expand(bsz, num_nodes))
    old_parent = p64.gather(1, kept)
    parents = torch.where(old_parent < 0, old_parent, new_id.gather(1, old_parent.clamp(min=0)))
    return parents, kept


def children_table(parents: torch.Tensor) -> torch.Tensor:
    """int64 ``[(B,) T, max_children]``: the children of each node in increasing id order, padded with -1.

    Host-side helper for static trees (it reads the widest fan-out); ``parents`` int ``[(B,) T]``.
    """
    p = parents.to(torch.int64)
    flat = p.reshape(-1, p.shape[-1])
    num_nodes = flat.shape[1]
    counts = torch.zeros(flat.shape[0], num_nodes + 1, dtype=torch.int64, device=p.device)
    counts.scatter_add_(1, flat.clamp(min=-1) + 1, torch.ones_like(flat))
    widest = max(1, int(counts[:, 1:].max()))
    table = torch.full((flat.shape[0], num_nodes, widest), -1, dtype=torch.int64, device=p.device)
    # rank of each child among its siblings = number of earlier nodes with the same parent
    same = (flat[:, :, None] == flat[:, None, :]) & torch.ones(num_nodes, num_nodes, dtype=torch.bool,
                                                               device=p.device).tril(-1)
    rank = same.sum(-1)
    child = torch.arange(num_nodes, device=p.device).expand_as(flat)
    rows = torch.arange(flat.shape[0], device=p.device)[:, None].expand_as(flat)
    has_parent = flat >= 0
    table[rows[has_parent], flat[has_parent], rank[has_parent]] = child[has_parent]
    return table.view(*p.shape, widest)
