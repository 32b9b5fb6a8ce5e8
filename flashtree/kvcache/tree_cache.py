"""`TreeKVCache`: a paged KV cache holding a tree of branches that share their common prefix.

Layout (the layout of ``flash_decoding_attention_paged``, so pages are shareable with that op):
  k_pools[layer], v_pools[layer]: [num_pages, Hkv, P, D], P = page_size (a power of two).
  A *slot* names one token's row: slot = page * P + row, i.e. k_pools[l][slot // P, :, slot % P].

Tree: the root holds the prompt; each node owns a list of pages holding its own tokens, and a
node's path is root -> ... -> node. Only leaves grow. Every node that has children holds a whole
number of pages (its length is a multiple of P), so a root-to-leaf path is always a plain list of
pages, token j in page j // P, row j % P: ``block_table(leaf)`` hands it to
``flash_decoding_attention_paged`` unchanged.

fork(leaf, k) and the partly filled last page: the parent keeps its full pages; the f < P tokens
of its partly filled last page move into the children (child 0 takes that page over, children
1..k-1 each get a copy of it: one page copy per extra child and layer, nothing else is copied).
So a fork costs at most (k - 1) pages, and the shared prefix is every full page of the parent.
The parent's own path then ends at its last full page (what it sees if its children are pruned).

Reference counts: refs[page] = the number of live leaves whose path contains the page (a page of
the prompt below 64 branches has refs 64). Fork adds k - 1 to every page on the parent's path;
prune subtracts, and a page whose count reaches 0 goes back to the free list.

Every operation that needs pages checks first and raises ``OutOfPagesError`` before changing
anything. ``version`` increases on every change of tree or tokens; a DeFT plan records it and
``deft_attention`` refuses a plan whose cache has changed since (one int comparison).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PAGE_SIZES = (8, 16, 32, 64, 128, 256)


class OutOfPagesError(RuntimeError):
    """The pool has too few free pages for the operation; nothing was changed."""


@dataclass
class _Node:
    parent: int | None
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens held by this node itself
    children: list[int] = field(default_factory=list)


class TreeKVCache:
    """A paged tree KV cache for ``num_layers`` layers.

    Args:
        num_layers, num_pages, num_kv_heads, head_dim: pool sizes; every layer has its own pool pair
            [num_pages, Hkv, page_size, D].
        page_size: P, a power of two in {8, 16, 32, 64, 128, 256}.
        dtype, device: of the pools (zero-initialised).
    """

    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, head_dim: int, *,
                 page_size: int = 16, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        for name, v in (("num_layers", num_layers), ("num_pages", num_pages),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size: expected one of {list(PAGE_SIZES)}, got {page_size!r}")
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.refs = np.zeros(num_pages, dtype=np.int64)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives low pages first
        self._nodes: dict[int, _Node] = {}
        self._next_id = 0
        self.root: int | None = None
        self.version = 0

    # ------------------------------------------------------------------------- queries

    @property
    def num_layers(self) -> int:
        return len(self.k_pools)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def nodes(self) -> list[int]:
        """Live node ids in DFS preorder (children in creation order)."""
        if self.root is None:
            return []
        order, stack = [], [self.root]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(reversed(self._nodes[n].children))
        return order

    def leaves(self) -> list[int]:
        """Live leaves in DFS order (the order of the query rows in a DeFT plan)."""
        return [n for n in self.nodes() if not self._nodes[n].children]

    def parent(self, node: int) -> int | None:
        return self._node(node).parent

    def children(self, node: int) -> list[int]:
        return list(self._node(node).children)

    def node_length(self, node: int) -> int:
        """Tokens held by the node itself."""
        return self._node(node).length

    def node_pages(self, node: int) -> list[int]:
        return list(self._node(node).pages)

    def path(self, node: int) -> list[int]:
        """Node ids from the root to ``node``."""
        out = []
        n: int | None = node
        while n is not None:
            out.append(n)
            n = self._node(n).parent
        return out[::-1]

    def path_length(self, node: int) -> int:
        return sum(self._nodes[n].length for n in self.path(node))

    def block_table(self, node: int) -> list[int]:
        """The pages of the path to ``node``: token j of the path is in page j // P, row j % P."""
        return [p for n in self.path(node) for p in self._nodes[n].pages]

    def node_slots(self, node: int) -> np.ndarray:
        """int64 slots (page * P + row) of the node's own tokens, in order."""
        nd = self._node(node)
        p = self.page_size
        rows = np.arange(len(nd.pages) * p, dtype=np.int64)
        slots = np.asarray(nd.pages, dtype=np.int64).repeat(p) * p + rows % p
        return slots[: nd.length]

    def path_slots(self, node: int) -> np.ndarray:
        """int64 slots of every token on the path to ``node``, root first."""
        parts = [self.node_slots(n) for n in self.path(node)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def read_path(self, node: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of the path to ``node`` for one layer, each [Hkv, path_length, D] (a copy)."""
        slots = torch.as_tensor(self.path_slots(node), device=self.k_pools[layer].device)
        p = self.page_size
        k = self.k_pools[layer][slots // p, :, slots % p]  # [L, Hkv, D]
        v = self.v_pools[layer][slots // p, :, slots % p]
        return k.transpose(0, 1), v.transpose(0, 1)

    # ------------------------------------------------------------------------- changes

    def create_root(self, length: int | None = None, k=None, v=None) -> int:
        """The root node holding the prompt. ``k``, ``v``: [num_layers, n, Hkv, D] written at once;
        or only ``length`` to reserve n tokens that ``write`` fills layer by layer."""
        if self.root is not None:
            raise ValueError("create_root: the cache already has a root; prune it first")
        n = self._length_of(length, k, v)
        pages = self._take(self._pages_for(0, n))
        node = self._new(_Node(parent=None, pages=pages, length=n))
        self.root = node
        self.refs[pages] += 1
        self._write_tail(node, n, k, v)
        return node

    def append(self, leaf: int, length: int | None = None, k=None, v=None) -> np.ndarray:
        """Append n tokens to a leaf; returns their slots (int64). ``k``, ``v`` as in ``create_root``."""
        nd = self._leaf(leaf, "append")
        n = self._length_of(length, k, v)
        new = self._take(self._pages_for(nd.length, n))
        nd.pages.extend(new)
        nd.length += n
        self.refs[new] += 1
        self.version += 1
        self._write_tail(leaf, n, k, v)
        return self.node_slots(leaf)[nd.length - n:]

    def fork(self, leaf: int, num_children: int) -> list[int]:
        """Split a leaf into ``num_children`` empty children that share its path (see the module
        docstring for what happens to a partly filled last page). Returns the children's ids."""
        nd = self._leaf(leaf, "fork")
        if not isinstance(num_children, int) or num_children < 1:
            raise ValueError(f"num_children: expected a positive int, got {num_children!r}")
        p = self.page_size
        tail = nd.length % p
        copies = self._take(num_children - 1 if tail else 0)
        path_pages = self.block_table(leaf)
        self.refs[path_pages] += num_children - 1
        if tail:
            last = nd.pages.pop()
            nd.length -= tail
            tail_pages = [last] + copies
            for layer in range(self.num_layers):
                for pool in (self.k_pools[layer], self.v_pools[layer]):
                    pool[copies, :, :tail] = pool[last, :, :tail].unsqueeze(0)
        children = []
        for i in range(num_children):
            child = _Node(parent=leaf, pages=[tail_pages[i]] if tail else [], length=tail)
            children.append(self._new(child))
        if tail:  # the moved page is on every child's path once; its count is one per child
            self.refs[last] = 1
            self.refs[copies] = 1
        nd.children.extend(children)
        self.version += 1
        return children

    def prune(self, node: int) -> None:
        """Remove ``node`` and its subtree, returning pages nobody uses any more. Pruning the root
        empties the cache. The parent stays; with no children left it is a leaf again."""
        nd = self._node(node)
        doomed = []
        stack = [node]
        while stack:
            n = stack.pop()
            doomed.append(n)
            stack.extend(self._nodes[n].children)
        leaves = [n for n in doomed if not self._nodes[n].children]
        for leaf in leaves:
            np.subtract.at(self.refs, self.block_table(leaf), 1)
        parent = nd.parent
        if parent is not None:
            self._nodes[parent].children.remove(node)
            if not self._nodes[parent].children:  # a leaf again: its path counts once more
                np.add.at(self.refs, self.block_table(parent), 1)
        freed = [pg for n in doomed for pg in self._nodes[n].pages]
        for n in doomed:
            del self._nodes[n]
        if node == self.root:
            self.root = None
        self._free.extend(sorted((pg for pg in freed if self.refs[pg] == 0), reverse=True))
        self.version += 1

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, Hkv, D] of one layer into the given slots (e.g. from ``append``).
        Writes do not change ``version``: a plan stays valid while new values are written."""
        slots = torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.k_pools[layer].device)
        p = self.page_size
        self.k_pools[layer][slots // p, :, slots % p] = k.to(self.k_pools[layer].dtype)
        self.v_pools[layer][slots // p, :, slots % p] = v.to(self.v_pools[layer].dtype)

    # ------------------------------------------------------------------------- helpers

    def _node(self, node: int) -> _Node:
        if node not in self._nodes:
            raise ValueError(f"node: expected a live node id, got {node!r}")
        return self._nodes[node]

    def _leaf(self, node: int, op: str) -> _Node:
        nd = self._node(node)
        if nd.children:
            raise ValueError(f"{op}: expected a leaf, got node {node} with children {nd.children}")
        return nd

    def _new(self, nd: _Node) -> int:
        node = self._next_id
        self._next_id += 1
        self._nodes[node] = nd
        self.version += 1
        return node

    def _pages_for(self, have: int, add: int) -> int:
        p = self.page_size
        return -(-(have + add) // p) - -(-have // p)

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"TreeKVCache: needs {count} free pages, has {len(self._free)} "
                                  f"of {self.num_pages}; nothing was changed")
        return [self._free.pop() for _ in range(count)]

    def _length_of(self, length, k, v) -> int:
        if k is None and v is None:
            if not isinstance(length, int) or length < 0:
                raise ValueError(f"length: expected an int >= 0 (or k and v), got {length!r}")
            return length
        if k is None or v is None:
            raise ValueError("k, v: expected both or neither, got only one")
        want = (self.num_layers, None, self.num_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 4 or any(w is not None and a != w for a, w in zip(x.shape, want)):
                raise ValueError(f"{name}: expected shape [{self.num_layers}, n, {self.num_kv_heads}, "
                                 f"{self.head_dim}] [num_layers, n, Hkv, D], got {list(x.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v: expected shape {list(k.shape)} (the shape of k), got {list(v.shape)}")
        if length is not None and length != k.shape[1]:
            raise ValueError(f"length: expected {k.shape[1]} (k.shape[1]) or None, got {length!r}")
        return k.shape[1]

    def _write_tail(self, node: int, n: int, k, v) -> None:
        if k is None or n == 0:
            return
        slots = self.node_slots(node)[-n:]
        for layer in range(self.num_layers):
            self.write(layer, slots, k[layer], v[layer])
