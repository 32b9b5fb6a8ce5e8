"""Speculative tree decoding end to end: acceptance rules, drafters and the generate loop.

A step: the drafter proposes a tree of T tokens whose node 0 (the root) is the last emitted token (not
yet in the target's cache); the target verifies the whole tree in one forward (``flashtree_verify``
attention over its cache); an acceptance rule picks the longest acceptable root-to-node path and a bonus
token; the accepted nodes' K/V are committed (all layers, one call); the accepted draft tokens and the
bonus are emitted and the bonus becomes the next root.

Acceptance rules (batched, on the device, no host sync):
- :func:`greedy_accept`: a node is accepted iff its token is the target's argmax at its parent.
  Emits exactly the target's greedy continuation.
- :func:`typical_accept`: Medusa's typical acceptance: the target's probability of the token at its
  parent exceeds ``min(threshold, alpha * exp(-entropy))``; ties between equally long paths go to the
  likelier one. Not lossless (it trades exactness for acceptance).
- :func:`sampling_accept`: lossless tree speculative sampling. With ``draft_probs=None`` the children are
  deterministic candidates (top-k drafts): child x is accepted with probability ``p(x)``, else ``p(x)``
  is zeroed and renormalised before the next sibling (sampling without replacement from ``p``). With
  ``draft_probs`` (children drawn i.i.d. from ``q``), x is accepted with ``min(1, p(x) / q(x))``, else
  ``p <- norm(max(p - q, 0))``. The bonus token is drawn from what remains.

Drafters: :class:`MedusaDrafter` (Medusa heads on the target's last hidden state, a static choice tree),
:class:`DraftModelDrafter` (a small causal LM with its own flashtree cache: a static tree, a chain, or
EAGLE-style dynamic top-k expansion), and :class:`GlideDrafter` (GLIDE: a one-block draft whose
attention reads the target's KV cache through ``flash_decoding_attention``, with CAPE's
confidence-aware proposal expansion).

:func:`generate` ties them together for any HF decoder-only causal LM whose attention goes through
``AttentionInterface`` (Llama, Mistral, Qwen2, ...).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import tree as _tree
from .decode import flash_decoding_attention
from .kvcache.commit import CacheOverflowError

__all__ = [
    "Acceptance", "Proposal", "greedy_accept", "typical_accept", "sampling_accept", "validate_tree",
    "MedusaHeads", "MedusaDrafter", "DraftModelDrafter", "GlideDraft", "GlideDrafter", "CapeConfig",
    "generate", "SpeculativeStats",
]

# ------------------------------------------------------------------------------------ acceptance


class Acceptance(NamedTuple):
    """The result of one verification step, per sequence (all on the logits' device).

    ``A = max_depth + 1`` slots: ``nodes[b, :length[b]]`` is the accepted path (root first) and
    ``tokens[b, :length[b]]`` the tokens it emits (the accepted drafts after the root, then the bonus).
    Slots past the length repeat the last entry.
    """

    nodes: torch.Tensor   # int64 [B, A]
    length: torch.Tensor  # int64 [B], >= 1 (the root is always kept)
    bonus: torch.Tensor   # int64 [B], the target's token after the last accepted node
    tokens: torch.Tensor  # int64 [B, A]


def _as_tree(tree) -> _tree.TreeTensors:
    if isinstance(tree, _tree.TreeTensors):
        return tree
    if isinstance(tree, _tree.TreeSpec):
        return _tree.tree_tensors(tree)
    raise TypeError(f"tree: expected flashtree.tree.TreeTensors or TreeSpec, got {type(tree).__name__}")


def _check_step(draft_tokens, logits, tree: _tree.TreeTensors) -> tuple[int, int]:
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens: expected a tensor [B, T], got "
                         f"{tuple(draft_tokens.shape) if isinstance(draft_tokens, torch.Tensor) else type(draft_tokens).__name__}")
    bsz, t = draft_tokens.shape
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (bsz, t):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected shape [B, T, V] = [{bsz}, {t}, V] (the draft tokens' B and T: "
                         f"one row of logits per tree node of every sequence), got {got}")
    if tree.num_nodes != t:
        raise ValueError(f"tree: expected T = {t} nodes (draft_tokens.shape[1]), got {tree.num_nodes}")
    if tree.parents.dim() == 2 and tree.parents.shape[0] != bsz:
        raise ValueError(f"tree: expected one tree per sequence (B = {bsz}) or one shared tree, got "
                         f"{tree.parents.shape[0]} trees")
    if draft_tokens.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"draft_tokens: expected an integer dtype, got {draft_tokens.dtype}")
    return bsz, t


def _per_seq(x: torch.Tensor, bsz: int) -> torch.Tensor:
    return x.expand(bsz, *x.shape) if x.dim() == 1 or (x.dim() == 2 and x.shape[0] != bsz) else x


def _parents_b(tree: _tree.TreeTensors, bsz: int, device) -> torch.Tensor:
    p = tree.parents.to(device)
    return p.expand(bsz, -1) if p.dim() == 1 else p


def _finish(draft_tokens, paths, node_ok, target_next, score=None) -> Acceptance:
    """Longest accepted root-to-node path per sequence, then the bonus from ``target_next [B, T]``."""
    bsz = draft_tokens.shape[0]
    paths = paths.to(draft_tokens.device)
    paths = paths.expand(bsz, -1, -1) if paths.dim() == 2 else paths
    width = paths.shape[2]
    valid = paths >= 0
    idx = paths.clamp(min=0)
    ok = node_ok.gather(1, idx.flatten(1)).view_as(idx) & valid
    run = ok[:, :, 1:].to(torch.int64).cumprod(-1)  # [B, P, A - 1]
    n = run.sum(-1)  # accepted drafts per path
    if score is None:
        best = n.argmax(1)
    else:
        path_score = (score.gather(1, idx.flatten(1)).view_as(idx)[:, :, 1:] * run).sum(-1)
        longest = n == n.max(1, keepdim=True).values
        best = torch.where(longest, path_score, torch.full_like(path_score, -math.inf)).argmax(1)
    length = n.gather(1, best[:, None]).squeeze(1) + 1
    nodes = idx.gather(1, best[:, None, None].expand(-1, 1, width)).squeeze(1)
    slot = torch.minimum(torch.arange(width, device=nodes.device)[None, :], (length - 1)[:, None])
    nodes = nodes.gather(1, slot)
    last = nodes.gather(1, (length - 1)[:, None]).squeeze(1)
    bonus = target_next.gather(1, last[:, None]).squeeze(1)
    drafted = draft_tokens.to(torch.int64).gather(1, nodes)
    shifted = torch.cat([drafted[:, 1:], bonus[:, None]], 1)
    tokens = torch.where(torch.arange(width, device=nodes.device)[None, :] < (length - 1)[:, None],
                         shifted, bonus[:, None])
    return Acceptance(nodes, length, bonus, tokens)


def greedy_accept(draft_tokens: torch.Tensor, logits: torch.Tensor, tree) -> Acceptance:
    """Greedy verification: the longest path whose tokens match the target's argmax at their parents.

    Args:
        draft_tokens: int ``[B, T]``; node 0 is the root (its token is not checked).
        logits: ``[B, T, V]``, the target's logits at the T tree positions.
        tree: :class:`flashtree.tree.TreeTensors` (shared or per sequence) or a ``TreeSpec``.

    Returns:
        :class:`Acceptance`; the bonus is the argmax after the last accepted node.
    """
    tree = _as_tree(tree)
    bsz, _ = _check_step(draft_tokens, logits, tree)
    target = logits.argmax(-1)  # [B, T]
    parents = _parents_b(tree, bsz, logits.device)
    ok = draft_tokens.to(torch.int64) == target.gather(1, parents.clamp(min=0))
    return _finish(draft_tokens, tree.paths, ok, target)


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def _sample(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row of ``probs [N, V]`` (int64 [N]) by the Gumbel-max trick: no host sync."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(min=1e-20)
    return (torch.log(probs) - torch.log(-torch.log(u))).argmax(-1)


def typical_accept(draft_tokens: torch.Tensor, logits: torch.Tensor, tree, *, temperature: float = 0.7,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                   generator: Optional[torch.Generator] = None) -> Acceptance:
    """Medusa's typical acceptance (see the module docstring); temperature 0 is greedy acceptance.

    The bonus is drawn from the target's tempered distribution after the last accepted node.
    """
    if temperature <= 0:
        return greedy_accept(draft_tokens, logits, tree)
    tree = _as_tree(tree)
    bsz, t = _check_step(draft_tokens, logits, tree)
    probs = _probs(logits, temperature)  # [B, T, V]
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [B, T]
    parents = _parents_b(tree, bsz, logits.device).clamp(min=0)
    parent_probs = probs.gather(1, parents[:, :, None].expand(-1, -1, probs.shape[2]))
    cand = parent_probs.gather(2, draft_tokens.to(torch.int64)[:, :, None]).squeeze(-1)
    threshold = torch.minimum(torch.full_like(cand, posterior_threshold),
                              posterior_alpha * torch.exp(-entropy.gather(1, parents)))
    ok = cand > threshold
    bonus_all = _sample(probs.flatten(0, 1), generator).view(bsz, t)
    return _finish(draft_tokens, tree.paths, ok, bonus_all, score=torch.log(cand.clamp_min(1e-30)))


def sampling_accept(draft_tokens: torch.Tensor, logits: torch.Tensor, tree, *, temperature: float = 1.0,
                    draft_probs: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Acceptance:
    """Lossless tree speculative sampling (see the module docstring); temperature 0 is greedy acceptance.

    Args:
        draft_probs: optional ``[B, T, V]``: ``draft_probs[b, i]`` is the distribution the children of
            node i were drawn from (i.i.d.). None: the children are deterministic candidates.

    The loop runs over depth and sibling slots on the host (a static count from the tree), each
    iteration a few batched device ops; nothing synchronises.
    """
    if temperature <= 0:
        return greedy_accept(draft_tokens, logits, tree)
    tree = _as_tree(tree)
    bsz, t = _check_step(draft_tokens, logits, tree)
    dev = logits.device
    probs = _probs(logits, temperature)
    vocab = probs.shape[2]
    if draft_probs is not None and tuple(draft_probs.shape) != (bsz, t, vocab):
        raise ValueError(f"draft_probs: expected shape [{bsz}, {t}, {vocab}] (B, T, V of logits), "
                         f"got {list(draft_probs.shape)}")
    children = _children(tree, bsz, dev)  # [B, T, C]
    rows = torch.arange(bsz, device=dev)
    draft = draft_tokens.to(torch.int64)
    cur = torch.zeros(bsz, dtype=torch.int64, device=dev)
    alive = torch.ones(bsz, dtype=torch.bool, device=dev)
    residual = probs[:, 0].clone()
    width = tree.max_depth + 1
    nodes = torch.zeros(bsz, width, dtype=torch.int64, device=dev)
    length = torch.ones(bsz, dtype=torch.int64, device=dev)
    for depth in range(1, width):
        moved = torch.zeros(bsz, dtype=torch.bool, device=dev)
        for j in range(children.shape[2]):
            child = children[rows, cur, j]
            live = (child >= 0) & alive & ~moved
            c = child.clamp(min=0)
            x = draft[rows, c]
            px = residual[rows, x]
            u = torch.rand(bsz, device=dev, generator=generator)
            if draft_probs is None:
                take = live & (u <= px)
                rejected = residual.clone()
                rejected[rows, x] = 0.0
            else:
                q = draft_probs[rows, cur].float()
                qx = q[rows, x]
                take = live & (u * qx <= px)
                rejected = (residual - q).clamp_min(0.0)
            total = rejected.sum(-1, keepdim=True)
            rejected = torch.where(total > 0, rejected / total.clamp_min(1e-30), residual)
            residual = torch.where((live & ~take)[:, None], rejected, residual)
            cur = torch.where(take, c, cur)
            residual = torch.where(take[:, None], probs[rows, c], residual)
            moved |= take
        alive &= moved
        nodes[:, depth] = torch.where(moved, cur, nodes[:, depth - 1])
        length += moved.to(torch.int64)
    bonus = _sample(residual, generator)
    slot = torch.minimum(torch.arange(width, device=dev)[None, :], (length - 1)[:, None])
    nodes = nodes.gather(1, slot)
    drafted = draft.gather(1, nodes)
    shifted = torch.cat([drafted[:, 1:], bonus[:, None]], 1)
    tokens = torch.where(torch.arange(width, device=dev)[None, :] < (length - 1)[:, None], shifted, bonus[:, None])
    return Acceptance(nodes, length, bonus, tokens)


@functools.lru_cache(maxsize=64)
def _children_static(parents: torch.Tensor) -> torch.Tensor:
    """Keyed by the tensor object (static trees are built once and reused); one host copy per tree."""
    return _tree.children_table(parents.cpu()).to(parents.device)


def _children(tree: _tree.TreeTensors, bsz: int, dev) -> torch.Tensor:
    if tree.parents.dim() == 1:
        return _children_static(tree.parents).to(dev).expand(bsz, -1, -1)
    # per-sequence trees: every node may have up to T - 1 children (static bound, no sync)
    p = tree.parents.to(dev)
    t = p.shape[1]
    is_child = p[:, None, :] == torch.arange(t, device=dev)[None, :, None]  # [B, parent, child]
    rank = is_child.to(torch.int64).cumsum(-1) - 1
    table = torch.full((bsz, t, t + 1), -1, dtype=torch.int64, device=dev)
    table.scatter_(2, torch.where(is_child, rank, torch.full_like(rank, t)),
                   torch.arange(t, device=dev).expand(bsz, t, t).clone())
    return table[:, :, :t]


def validate_tree(tree: _tree.TreeTensors) -> None:
    """Opt-in full check of a proposal's tree (host sync): each parents row is topological and the mask
    equals its ancestor mask. Raises ValueError naming the sequence, node and entry."""
    parents = tree.parents.cpu()
    masks = tree.mask.cpu()
    rows = parents if parents.dim() == 2 else parents[None]
    masks = masks if masks.dim() == 3 else masks[None]
    for b in range(rows.shape[0]):
        where = f"tree.parents[{b}]" if parents.dim() == 2 else "tree.parents"
        try:
            _tree.validate_parents(rows[b])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        expected = _tree.ancestor_mask(rows[b])
        m = masks[min(b, masks.shape[0] - 1)]
        if m.shape != expected.shape or not torch.equal(m.bool(), expected):
            diff = (m.bool() != expected).nonzero()[0].tolist() if m.shape == expected.shape else None
            raise ValueError(f"tree.mask: expected the ancestor mask of {where}"
                             + (f", got mask[{diff[0]}, {diff[1]}] = {bool(m[diff[0], diff[1]])}" if diff else
                                f" of shape {list(expected.shape)}, got {list(m.shape)}"))


# ----------------------------------------------------------------------------------- proposals


class Proposal(NamedTuple):
    """A draft tree for every sequence: ``tokens [B, T]`` (node 0 = the root, the last emitted token),
    its :class:`flashtree.tree.TreeTensors` (shared or per sequence), and for ``sampling_accept`` the
    optional ``draft_probs [B, T, V]``."""

    tokens: torch.Tensor
    tree: _tree.TreeTensors
    draft_probs: Optional[torch.Tensor] = None


@dataclasses.dataclass
class SpecContext:
    """What a drafter sees: the target, its cache, the current roots and the target's hidden state at
    the position that produced each root, and the tokens emitted by the last step."""

    model: Any
    cache: Any
    root: torch.Tensor            # int64 [B]
    hidden: torch.Tensor          # [B, hidden]
    prompt: torch.Tensor          # int64 [B, P]
    new_tokens: torch.Tensor      # int64 [B, A]: the last step's emitted tokens (the prompt's first token at start)
    new_lengths: torch.Tensor     # int64 [B] on the device
    new_lengths_host: List[int]   # the same, read by the loop's one sync
    temperature: float = 0.0


def _static_tree_cached(spec: _tree.TreeSpec, device) -> _tree.TreeTensors:
    return _static_tree(spec.parent_ids, str(device))


@functools.lru_cache(maxsize=32)
def _static_tree(parent_ids: tuple, device: str) -> _tree.TreeTensors:
    return _tree.tree_tensors(_tree.TreeSpec(parent_ids), device)


def _sibling_ranks(parent_ids: Sequence[int]) -> List[int]:
    """Rank of each node among its siblings (increasing id order); the root gets 0."""
    seen: dict = {}
    ranks = [0]
    for p in parent_ids[1:]:
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
    return ranks


def _tree_and_ranks(tree) -> tuple[_tree.TreeSpec, List[int]]:
    """A TreeSpec and each node's candidate rank: Medusa paths (rank = the last path index) or a TreeSpec
    (rank = position among its siblings)."""
    if isinstance(tree, _tree.TreeSpec):
        return tree, _sibling_ranks(tree.parent_ids)
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], (list, tuple)):
        parents, order = _tree.parents_from_paths(tree)
        return _tree.TreeSpec.from_parents(parents), [0] + [path[-1] for path in order[1:]]
    raise TypeError(f"tree: expected a flashtree.tree.TreeSpec or a list of Medusa choice paths, got "
                    f"{type(tree).__name__}")


# -------------------------------------------------------------------------------------- Medusa


class _ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """Medusa-1 heads: head k (k = 0..K-1) maps the target's last hidden state to logits of the token
    k + 2 positions ahead (ResBlocks, then a vocabulary projection).

    ``from_target(model, K, noise)`` builds heads whose ResBlocks start at zero (identity) and whose
    projections copy the target's LM head plus ``noise`` (Medusa's initialisation, randomised).
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int = 4, num_layers: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*[_ResBlock(hidden_size) for _ in range(num_layers)],
                          nn.Linear(hidden_size, vocab_size, bias=False))
            for _ in range(num_heads))

    @classmethod
    def from_target(cls, model, num_heads: int = 4, noise: float = 0.0, generator=None) -> "MedusaHeads":
        head = model.get_output_embeddings()
        heads = cls(head.in_features, head.out_features, num_heads)
        param = next(model.parameters())
        with torch.no_grad():
            for h in heads.heads:
                h[0].linear.weight.zero_()
                h[0].linear.bias.zero_()
                w = head.weight.detach().float().cpu()
                h[-1].weight.copy_(w + noise * w.std() * torch.randn(w.shape, generator=generator))
        return heads.to(device=param.device, dtype=param.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [B, hidden]`` -> logits ``[K, B, V]``."""
        return torch.stack([h(hidden) for h in self.heads])


class MedusaDrafter:
    """Medusa: the tree's depth-d nodes take head d-1's top-k tokens (rank = the node's choice index).

    Args:
        heads: :class:`MedusaHeads` (or any module mapping ``[B, hidden]`` to ``[K, B, V]``).
        tree: default tree (Medusa choice paths or a TreeSpec), overridden by ``generate(tree=...)``.
    """

    def __init__(self, heads: nn.Module, tree=_tree.MEDUSA_63):
        self.heads = heads
        self.default_tree = tree

    def start(self, ctx: SpecContext, tree) -> None:
        spec, ranks = _tree_and_ranks(tree if tree is not None else self.default_tree)
        dev = ctx.root.device
        self.tree = _static_tree_cached(spec, dev)
        depths = spec.depths.tolist()
        self.topk = max(ranks) + 1
        num_heads = len(self.heads.heads) if hasattr(self.heads, "heads") else None
        if num_heads is not None and max(depths) > num_heads:
            raise ValueError(f"tree: expected depth <= {num_heads} (the number of Medusa heads), got {max(depths)}")
        # node i >= 1 reads flat candidate (depth_i - 1) * topk + rank_i
        self.index = torch.tensor([(d - 1) * self.topk + r for d, r in zip(depths[1:], ranks[1:])],
                                  dtype=torch.int64, device=dev)

    def propose(self, ctx: SpecContext) -> Proposal:
        logits = self.heads(ctx.hidden)  # [K, B, V]
        top = logits.topk(self.topk, dim=-1).indices  # [K, B, k]
        flat = top.permute(1, 0, 2).reshape(top.shape[1], -1)
        tokens = torch.cat([ctx.root[:, None], flat[:, self.index]], 1)
        return Proposal(tokens, self.tree)

    def accepted(self, ctx: SpecContext, acc: Acceptance) -> None:
        return None


# ---------------------------------------------------------------------------------- draft model


def truncated_draft(model, num_layers: int = 1):
    """A draft model: the HF target cut to its first ``num_layers`` decoder layers, sharing the
    embedding, final norm and LM head weights (copied), on the target's device and dtype."""
    cfg = type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": num_layers})
    draft = type(model)(cfg).eval()
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    draft.load_state_dict(keep)
    return draft.to(next(model.parameters()))


class DraftModelDrafter:
    """A small causal LM (same tokenizer) drafting with its own :class:`FlashTreeCache`.

    Trees: ``generate(tree=TreeSpec)`` fills a static tree (a chain included): node i takes the
    rank-i token of the draft's distribution at its parent, one draft forward per depth level.
    ``tree=None`` uses EAGLE-style dynamic expansion: ``depth`` levels, each expanding the ``topk`` best
    frontier candidates (by cumulative log-probability) by their ``topk`` children, then keeping the
    ``num_nodes`` best candidates (:func:`flashtree.tree.topk_tree`), a new tree per step and sequence.
    """

    def __init__(self, draft_model, *, topk: int = 4, depth: int = 4, num_nodes: int = 16,
                 capacity: Optional[int] = None):
        self.draft = draft_model
        self.topk, self.depth, self.num_nodes, self.capacity = topk, depth, num_nodes, capacity

    def start(self, ctx: SpecContext, tree) -> None:
        from .integrations.hf_verify import FlashTreeCache, prefill

        bsz, plen = ctx.prompt.shape
        capacity = self.capacity or ctx.cache.capacity
        kwargs = dict(paged=False)
        self.cache = FlashTreeCache.for_model(self.draft, bsz, capacity, **kwargs)
        self.static = None
        if tree is not None:
            spec, ranks = _tree_and_ranks(tree)
            self.static = (_static_tree_cached(spec, ctx.root.device), ranks, spec)
        self._run(lambda: prefill(self.draft, self.cache, ctx.prompt))

    def _run(self, fn):
        from .integrations.hf_verify import VERIFY_ATTENTION, attention_implementation

        with attention_implementation(self.draft, VERIFY_ATTENTION):
            return fn()

    def _catch_up(self, ctx: SpecContext) -> torch.Tensor:
        """Run the tokens emitted last step (ending with the root) into the draft cache; returns the draft's
        log-probabilities after the root ``[B, V]``."""
        from .integrations.hf_verify import tree_forward

        dev = ctx.root.device
        n = max(ctx.new_lengths_host)
        bsz = ctx.root.shape[0]
        lens = ctx.new_lengths  # [B]
        slots = torch.arange(n, device=dev)
        first = n - lens  # right-aligned: sequence b uses slots first[b] .. n - 1
        real = slots[None, :] >= first[:, None]
        src = (slots[None, :] - first[:, None]).clamp(min=0)
        tokens = ctx.new_tokens.gather(1, src.clamp(max=ctx.new_tokens.shape[1] - 1))
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        mask = causal[None] & real[:, None, :] & real[:, :, None]
        mask = mask | torch.eye(n, dtype=torch.bool, device=dev)[None]
        pos = self.cache.kv_seq_len.to(torch.int64)[:, None] + src
        logits, _ = tree_forward(self.draft, self.cache, tokens, mask, pos)
        nodes = (first[:, None] + slots[None, :]).clamp(max=n - 1)
        self.cache.commit(nodes, lens)
        return torch.log_softmax(logits[:, -1].float(), -1)

    def propose(self, ctx: SpecContext) -> Proposal:
        return self._run(lambda: self._propose(ctx))

    def _expand(self, tokens: torch.Tensor, parents: torch.Tensor, max_depth: int) -> torch.Tensor:
        """Draft log-probs ``[B, T - 1, V]`` at the non-root nodes of a tree (root already cached)."""
        from .integrations.hf_verify import tree_forward

        sub = parents[:, 1:] - 1  # the tree without its root: depth-1 nodes become roots of a forest
        tt = _tree.batched_tree_tensors(torch.where(sub < 0, torch.full_like(sub, -1), sub), max_depth)
        # A forest: rows with parent -1 are separate roots; batched_tree_tensors treats every -1 as a root.
        pos = self.cache.kv_seq_len.to(torch.int64)[:, None] + tt.depths  # root sits at kv_seq_len - 1
        logits, _ = tree_forward(self.draft, self.cache, tokens[:, 1:], tt.mask, pos)
        return torch.log_softmax(logits.float(), -1)

    def _propose(self, ctx: SpecContext) -> Proposal:
        root_logp = self._catch_up(ctx)
        bsz = ctx.root.shape[0]
        dev = ctx.root.device
        if self.static is not None:
            tree, ranks, spec = self.static
            t = tree.num_nodes
            if t == 1:
                return Proposal(ctx.root[:, None], tree)
            k = max(ranks) + 1
            depths = spec.depths.tolist()
            parents = tree.parents.expand(bsz, -1)
            tokens = torch.zeros(bsz, t, dtype=torch.int64, device=dev)
            tokens[:, 0] = ctx.root
            rank = torch.tensor(ranks, device=dev)
            top_root = root_logp.topk(k, -1).indices  # [B, k]
            level1 = torch.tensor([i for i in range(t) if depths[i] == 1], device=dev)
            tokens[:, level1] = top_root[:, rank[level1]]
            for d in range(2, max(depths) + 1):
                logp = self._expand(tokens, parents, max(depths) - 1)  # [B, T - 1, V]
                top = logp.topk(k, -1).indices  # [B, T - 1, k]
                level = torch.tensor([i for i in range(t) if depths[i] == d], device=dev)
                par = tree.parents[level] - 1
                tokens[:, level] = top[:, par, rank[level]]
            return Proposal(tokens, tree)
        return self._propose_dynamic(ctx, root_logp)

    def _propose_dynamic(self, ctx: SpecContext, root_logp: torch.Tensor) -> Proposal:
        bsz, dev, k = ctx.root.shape[0], ctx.root.device, self.topk
        top = root_logp.topk(k, -1)
        cand_tokens = [ctx.root[:, None], top.indices]
        cand_scores = [torch.zeros(bsz, 1, device=dev, dtype=torch.float64), top.values.double()]
        cand_parents = [torch.full((bsz, 1), -1, dtype=torch.int64, device=dev),
                        torch.zeros(bsz, k, dtype=torch.int64, device=dev)]
        frontier = torch.arange(1, k + 1, device=dev).expand(bsz, k)  # candidate ids
        for level in range(1, self.depth):
            tokens = torch.cat(cand_tokens, 1)
            parents = torch.cat(cand_parents, 1)
            scores = torch.cat(cand_scores, 1)
            logp = self._expand(tokens, parents, level)  # [B, N - 1, V]
            f_logp = logp.gather(1, (frontier - 1)[:, :, None].expand(-1, -1, logp.shape[2]))  # [B, k, V]
            child = f_logp.topk(k, -1)  # [B, k, k]
            child_scores = scores.gather(1, frontier)[:, :, None] + child.values.double()
            n0 = tokens.shape[1]
            cand_tokens.append(child.indices.flatten(1))
            cand_scores.append(child_scores.flatten(1))
            cand_parents.append(frontier[:, :, None].expand(-1, -1, k).flatten(1))
            best = child_scores.flatten(1).topk(k, -1).indices  # next frontier among the new children
            frontier = n0 + best
        tokens = torch.cat(cand_tokens, 1)
        parents, kept = _tree.topk_tree(torch.cat(cand_parents, 1), torch.cat(cand_scores, 1),
                                        min(self.num_nodes, tokens.shape[1]))
        return Proposal(tokens.gather(1, kept), _tree.batched_tree_tensors(parents, self.depth))

    def accepted(self, ctx: SpecContext, acc: Acceptance) -> None:
        return None


# ---------------------------------------------------------------------------------------- GLIDE


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class _RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class GlideDraft(nn.Module):
    """GLIDE: one decoder block whose attention reads the target's KV cache.

    The block embeds tokens with the target's embedding, projects q/k/v with its own weights (the
    target's head layout: H query heads, Hkv KV heads, head_dim D), applies the target's rotary
    embedding, and attends the target's layer ``target_layer`` cache (the committed prefix) plus its
    own K/V of the draft tokens under the draft tree mask, with ``flash_decoding_attention``. Then an
    MLP, its own final norm, and the target's LM head.

    Real checkpoints: load the block's weights (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
    ``mlp.*``, ``input_norm``, ``post_norm``, ``final_norm``) with ``load_state_dict`` and set
    ``target_layer`` to the layer the checkpoint was trained against.
    """

    def __init__(self, config, target_layer: int = -1):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.target_layer = target_layer % config.num_hidden_layers
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_norm = _RMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.post_norm = _RMSNorm(hidden, eps)
        inter = getattr(config, "intermediate_size", 4 * hidden)
        self.mlp = nn.ModuleDict(dict(gate=nn.Linear(hidden, inter, bias=False), up=nn.Linear(hidden, inter, bias=False),
                                      down=nn.Linear(inter, hidden, bias=False)))
        self.final_norm = _RMSNorm(hidden, eps)

    @classmethod
    def from_target(cls, model, target_layer: int = -1) -> "GlideDraft":
        """A GLIDE block initialised from the target's layer ``target_layer`` (same shapes), on its device."""
        glide = cls(model.config, target_layer)
        layer = model.get_decoder().layers[glide.target_layer]
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            for mine, theirs in ((glide.q_proj, attn.q_proj), (glide.k_proj, attn.k_proj),
                                 (glide.v_proj, attn.v_proj), (glide.o_proj, attn.o_proj),
                                 (glide.mlp["gate"], mlp.gate_proj), (glide.mlp["up"], mlp.up_proj),
                                 (glide.mlp["down"], mlp.down_proj)):
                mine.weight.copy_(theirs.weight)
            glide.input_norm.weight.copy_(layer.input_layernorm.weight)
            glide.post_norm.weight.copy_(layer.post_attention_layernorm.weight)
            glide.final_norm.weight.copy_(model.get_decoder().norm.weight)
        param = next(model.parameters())
        return glide.to(device=param.device, dtype=param.dtype)

    def forward(self, target, cache, tokens: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor):
        """Logits ``[B, T, V]`` of the draft tokens ``[B, T]`` at ``position_ids [B, T]`` under ``mask``."""
        decoder = target.get_decoder()
        x = target.get_input_embeddings()(tokens)
        bsz, t, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(bsz, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(bsz, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = decoder.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache, lens, tables = cache.layer_kv(self.target_layer)
        if tables is None:
            o = flash_decoding_attention(q, k_cache, v_cache, k.contiguous(), v.contiguous(), mask, lens,
                                         kv_group_num=self.num_heads // self.num_kv_heads)
        else:
            from .decode import flash_decoding_attention_paged

            o = flash_decoding_attention_paged(q, k_cache, v_cache, tables, lens, k.contiguous(), v.contiguous(),
                                               mask, kv_group_num=self.num_heads // self.num_kv_heads)
        x = x + self.o_proj(o.transpose(1, 2).reshape(bsz, t, -1))
        h = self.post_norm(x)
        x = x + self.mlp["down"](nn.functional.silu(self.mlp["gate"](h)) * self.mlp["up"](h))
        return target.get_output_embeddings()(self.final_norm(x))


@dataclasses.dataclass(frozen=True)
class CapeConfig:
    """CAPE (confidence-aware proposal expansion): at draft position d, keep only the top-1 token when
    the draft's top-1 probability is at least ``confident``; otherwise add the next-ranked tokens as
    siblings until their cumulative probability reaches ``coverage``, at most ``max_candidates`` in all.
    Alternatives are leaves under the previous chain token; the batch shares the widest choice per depth.
    """

    confident: float = 0.8
    coverage: float = 0.9
    max_candidates: int = 4


class GlideDrafter:
    """GLIDE with a CAPE: a chain of ``depth`` greedy GLIDE drafts, expanded into a tree by CAPE.

    The draft reads the target's cache (``cache.layer_kv``), so it keeps no cache of its own. Each depth
    is one GLIDE forward over the chain so far. CAPE reads the confidences once per step (one host
    sync of ``[depth]`` widths) to size the tree; ``cape=None`` proposes the plain chain.
    """

    def __init__(self, glide: GlideDraft, *, depth: int = 4, cape: Optional[CapeConfig] = CapeConfig()):
        self.glide, self.depth, self.cape = glide, depth, cape

    def start(self, ctx: SpecContext, tree) -> None:
        if tree is not None:
            raise ValueError("tree: expected None for GlideDrafter (CAPE builds each step's tree), got a tree")
        self.last_widths: List[int] = []

    def propose(self, ctx: SpecContext) -> Proposal:
        from .integrations.hf_verify import chain_mask

        bsz, dev = ctx.root.shape[0], ctx.root.device
        kmax = self.cape.max_candidates if self.cape else 1
        chain = ctx.root[:, None]
        base = ctx.cache.kv_seq_len.to(torch.int64)[:, None]
        tops, probs = [], []
        with torch.no_grad():
            for d in range(self.depth):
                n = d + 1
                mask = chain_mask(n, dev)
                pos = base + torch.arange(n, device=dev)
                logits = self.glide(ctx.model, ctx.cache, chain, pos, mask)[:, -1]
                p = torch.softmax(logits.float(), -1).topk(kmax, -1)
                tops.append(p.indices)
                probs.append(p.values)
                chain = torch.cat([chain, p.indices[:, :1]], 1)
        top = torch.stack(tops, 1)    # [B, depth, kmax]
        prob = torch.stack(probs, 1)  # [B, depth, kmax]
        if self.cape is None:
            widths = (1,) * self.depth
        else:
            need = (prob.cumsum(-1) < self.cape.coverage).sum(-1) + 1  # smallest k reaching the coverage
            need = torch.where(prob[..., 0] >= self.cape.confident, torch.ones_like(need), need.clamp(max=kmax))
            widths = tuple(need.amax(0).tolist())  # the one host sync of the drafter
        self.last_widths = list(widths)
        tree, index = _cape_tree(widths, kmax, str(dev))
        flat = torch.cat([ctx.root[:, None], top.flatten(1)], 1)
        return Proposal(flat[:, index], tree)

    def accepted(self, ctx: SpecContext, acc: Acceptance) -> None:
        return None


@functools.lru_cache(maxsize=256)
def _cape_tree(widths: tuple, kmax: int, device: str):
    """Tree of a chain with ``widths[d] - 1`` leaf alternatives at each depth; returns (tree, index) where
    ``index`` maps nodes into ``[root, top[0, 0..kmax-1], top[1, ...], ...]``."""
    parents, index = [-1], [0]
    chain_node = 0
    for d, w in enumerate(widths):
        main = len(parents)
        parents.append(chain_node)
        index.append(1 + d * kmax)
        for j in range(1, w):
            parents.append(chain_node)
            index.append(1 + d * kmax + j)
        chain_node = main
    spec = _tree.TreeSpec(tuple(parents))
    return _tree.tree_tensors(spec, device), torch.tensor(index, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------- generate


@dataclasses.dataclass
class SpeculativeStats:
    """Per step: tokens emitted (accepted drafts + the bonus), tree size and wall time (ms)."""

    accepted: List[List[int]] = dataclasses.field(default_factory=list)  # [step][b]
    tree_sizes: List[int] = dataclasses.field(default_factory=list)
    step_ms: List[float] = dataclasses.field(default_factory=list)
    prefill_ms: float = 0.0

    @property
    def mean_accepted(self) -> float:
        flat = [n for step in self.accepted for n in step]
        return sum(flat) / max(1, len(flat))

    @property
    def mean_step_ms(self) -> float:
        return sum(self.step_ms) / max(1, len(self.step_ms))


def _first_token(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return _sample(_probs(logits, temperature), generator)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, drafter, input_ids: torch.Tensor, tree=None, max_new_tokens: int = 32, *,
             acceptance: str = "greedy", temperature: float = 0.0, generator: Optional[torch.Generator] = None,
             attn: str = "flashtree", paged: bool = False, page_size: int = 16, capacity: Optional[int] = None,
             eos_token_id: Optional[int] = None, typical_threshold: float = 0.09, typical_alpha: float = 0.3,
             validate: bool = False, return_stats: bool = False):
    """Speculative tree decoding with an HF causal LM as the target.

    Args:
        model: the target (``model.get_decoder()``, ``get_output_embeddings()``, attention through
            ``AttentionInterface``).
        drafter: :class:`MedusaDrafter`, :class:`DraftModelDrafter` or :class:`GlideDrafter` (or any object
            with ``start(ctx, tree)``, ``propose(ctx) -> Proposal``, ``accepted(ctx, acceptance)``).
        input_ids: int ``[B, P]`` prompts of equal length (no padding).
        tree: a static tree (``flashtree.tree.TreeSpec``, e.g. ``TreeSpec.chain(5)``, or Medusa choice
            paths such as ``flashtree.tree.MEDUSA_63``), or None for the drafter's own (dynamic) trees.
        max_new_tokens: tokens to emit per sequence.
        acceptance: "greedy" (exactly the target's greedy decoding), "typical" or "sampling".
        temperature: for "typical"/"sampling" (0 means greedy); generator: their random numbers.
        attn: "flashtree" (``flashtree_verify`` attention, :class:`FlashTreeCache`) or "sdpa" (HF's sdpa with
            a 4-D tree mask and ``DynamicCache``, the reference implementations' way; batch size 1).
        paged, page_size: a paged flashtree cache. capacity: cache tokens per sequence (default: enough).
        eos_token_id: stop a sequence after this token (later positions are filled with it).
        validate: check every proposal's tree (host sync per step).
        return_stats: also return :class:`SpeculativeStats`.

    Returns:
        int64 ``[B, P + max_new_tokens]`` (and the stats). Host syncs: one per step (the accepted lengths,
        the overflow flags and the emitted tokens, read together), plus what a drafter documents.
    """
    from .integrations.hf_verify import (VERIFY_ATTENTION, FlashTreeCache, SdpaTreeCache, attention_implementation,
                                         prefill, tree_forward)

    if acceptance not in ("greedy", "typical", "sampling"):
        raise ValueError(f"acceptance: expected 'greedy', 'typical' or 'sampling', got {acceptance!r}")
    if attn not in ("flashtree", "sdpa"):
        raise ValueError(f"attn: expected 'flashtree' or 'sdpa', got {attn!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids: expected an int tensor [B, P] with P >= 1, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    bsz, plen = input_ids.shape
    if attn == "sdpa" and bsz != 1:
        raise ValueError(f"input_ids: expected batch size 1 with attn='sdpa', got {bsz}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    stats = SpeculativeStats()
    if capacity is None:
        capacity = plen + max_new_tokens + 2 * 256 + 1
    impl = VERIFY_ATTENTION if attn == "flashtree" else "sdpa"
    with attention_implementation(model, impl):
        t0 = time.perf_counter()
        cache = (FlashTreeCache.for_model(model, bsz, capacity, paged=paged, page_size=page_size)
                 if attn == "flashtree" else SdpaTreeCache(model, capacity))
        last_logits, last_hidden = prefill(model, cache, input_ids)
        root = _first_token(last_logits, temperature if acceptance != "greedy" else 0.0, generator)
        ctx = SpecContext(model, cache, root, last_hidden, input_ids, root[:, None],
                          torch.ones(bsz, dtype=torch.int64, device=device), [1] * bsz,
                          temperature)
        out: List[List[int]] = [[t] for t in root.tolist()]
        done = [eos_token_id is not None and out[b][-1] == eos_token_id for b in range(bsz)]
        drafter.start(ctx, tree)
        _sync(device)
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3
        while not all(stop or len(o) >= max_new_tokens for o, stop in zip(out, done)):
            t0 = time.perf_counter()
            prop = drafter.propose(ctx)
            if validate:
                validate_tree(prop.tree)
            pos = prop.tree.position_ids(cache.kv_seq_len)
            logits, hidden = tree_forward(model, cache, prop.tokens, prop.tree.mask, pos)
            if acceptance == "greedy":
                acc = greedy_accept(prop.tokens, logits, prop.tree)
            elif acceptance == "typical":
                acc = typical_accept(prop.tokens, logits, prop.tree, temperature=temperature,
                                     posterior_threshold=typical_threshold, posterior_alpha=typical_alpha,
                                     generator=generator)
            else:
                acc = sampling_accept(prop.tokens, logits, prop.tree, temperature=temperature,
                                      draft_probs=prop.draft_probs, generator=generator)
            overflow = cache.commit(acc.nodes, acc.length)
            last = acc.nodes.gather(1, (acc.length - 1)[:, None])
            ctx.hidden = hidden.gather(1, last[:, :, None].expand(-1, -1, hidden.shape[2])).squeeze(1)
            ctx.root, ctx.new_tokens, ctx.new_lengths = acc.bonus, acc.tokens, acc.length
            drafter.accepted(ctx, acc)
            host = torch.cat([acc.length[:, None], overflow[:, None].to(torch.int64), acc.tokens], 1).tolist()
            if any(row[1] for row in host):
                b = next(i for i, row in enumerate(host) if row[1])
                raise CacheOverflowError(
                    f"capacity: expected room for {host[b][0]} more tokens in sequence {b} (cache capacity "
                    f"{cache.capacity}), got a full cache; nothing was committed. Pass a larger capacity.")
            ctx.new_lengths_host = [row[0] for row in host]
            for b, row in enumerate(host):
                if not done[b]:
                    for tok in row[2:2 + row[0]]:
                        out[b].append(tok)
                        if tok == eos_token_id:
                            done[b] = True
                            break
            stats.accepted.append(ctx.new_lengths_host)
            stats.tree_sizes.append(prop.tokens.shape[1])
            stats.step_ms.append((time.perf_counter() - t0) * 1e3)
    fill = eos_token_id if eos_token_id is not None else 0
    rows = [o[:max_new_tokens] + [fill] * (max_new_tokens - len(o[:max_new_tokens])) for o in out]
    result = torch.cat([input_ids, torch.tensor(rows, dtype=torch.int64, device=device)], 1)
    return (result, stats) if return_stats else result
