"""HF transformers glue: the ``"flashtree"`` attention implementation, for packed DFS-ordered trees.

Public transformers APIs only: the attention function is registered through ``AttentionInterface``
(transformers >= 4.50; on 4.48 and 4.49 through the public ``ALL_ATTENTION_FUNCTIONS`` mapping it replaced).
Nothing of transformers is patched.

Use::

    from flashtree.integrations import hf

    model = hf.enable(AutoModelForCausalLM.from_config(config))      # registers "flashtree", switches to it
    batch = hf.tree_inputs_from_groups(prompts, responses)            # token ids, one packed row
    logits = model(**batch.model_kwargs(), use_cache=False).logits  # [1, N, vocab]
    loss = batch.response_loss(logits)                                # sum over response tokens

On transformers 4.48 to 4.57, ``hf.register()`` followed by ``attn_implementation="flashtree"`` in
``from_config``/``from_pretrained`` works too. transformers 5 takes every name containing "flash" for a
flash-attn build and refuses it there, hence :func:`enable`, which switches a built model.

The attention function reads, from the forward kwargs that transformers hands down to every attention
layer:

- ``cu_seq_lens_q`` / ``cu_seq_lens_k``: transformers' packed-sequence kwargs, int ``[num_seqs + 1]``
  (the two must be the same: q and k lengths are equal). int32 is passed on as is; int64 is converted in
  every layer, and then ``tree_attention`` checks the copy on the host in every layer too;
- ``tree_dfs_order_start_q`` / ``tree_dfs_order_end_k``: the per-token DFS arrays, int ``[N]``
  (see :mod:`flashtree.tree`); query ``i`` sees key ``j`` iff both lie in the same sequence, ``j <= i`` and
  ``start_q[i] <= end_k[j]``;
- ``max_length_q``: the longest sequence, optional, passed on.

Without the DFS arrays the function is causal attention over each packed sequence (or over each batch row
when ``cu_seq_lens_q`` is absent too). It does not take a KV cache (call the model with
``use_cache=False``), dropout, sliding windows or soft-capping, and it ignores ``attention_mask``: padding is
not supported, pack the sequences instead (recent transformers build no mask for this implementation; older
ones build a dense causal mask, which packing makes redundant).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple

import torch

import flashtree
from flashtree import tree

NAME = "flashtree"
START_KWARG = "tree_dfs_order_start_q"
END_KWARG = "tree_dfs_order_end_k"

__all__ = ["NAME", "START_KWARG", "END_KWARG", "register", "enable", "flashtree_attention_forward", "TreeInputs",
           "tree_inputs_from_groups", "tree_inputs_from_parents"]


# ---------------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------------

def _index_kwarg(kwargs: dict, name: str, device: torch.device) -> Optional[torch.Tensor]:
    """An integer index tensor from the kwargs as a flat int32 tensor on ``device`` (None when absent).

    A 1-D int32 tensor is passed on as the very same object: ``tree_attention`` checks ``cu_seqlens`` on the
    host once per tensor object, so a per-layer copy would cost a host sync in every layer.
    """
    value = kwargs.get(name)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(value).__name__}")
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 or int64, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of the hidden states), got {value.device}")
    if value.dim() != 1:
        value = value.reshape(-1)
    return value if value.dtype == torch.int32 else value.to(torch.int32)


@functools.lru_cache(maxsize=16)
def _causal_arrays(batch: int, seq_len: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens`` with one sequence per batch row, and all-zero DFS arrays (a chain: causal attention).
    Cached, so the same objects come back for every layer (see :func:`_index_kwarg`); never written to."""
    cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
    return cu_seqlens, torch.zeros(batch * seq_len, dtype=torch.int32, device=device)


def _check_unsupported(dropout: float, kwargs: dict) -> None:
    if dropout:
        raise ValueError(f"dropout: expected 0.0 (the flashtree attention has no dropout; set the config's "
                         f"attention_dropout to 0), got {dropout}")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: expected None (not supported by the flashtree attention), "
                             f"got {kwargs[name]!r}")
    if kwargs.get("is_causal") is False:
        raise ValueError("is_causal: expected True or None (the flashtree attention is causal), got False")


def flashtree_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                scaling: Optional[float] = None, dropout: float = 0.0, **kwargs
                                ) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by :func:`flashtree.tree_attention`.

    Args:
        module: the calling attention layer (unused: everything needed is in the arguments).
        query: ``[B, H, S, D]``. key, value: ``[B, Hkv, S, D]`` (no cache: the same ``S``).
        attention_mask: ignored (see the module docstring).
        scaling: softmax scale; None means ``D ** -0.5``.
        dropout: must be 0.
        kwargs: ``cu_seq_lens_q``/``cu_seq_lens_k`` (then ``B`` must be 1), ``max_length_q``,
            ``tree_dfs_order_start_q``/``tree_dfs_order_end_k`` (both or neither), ``int [B * S]``;
            anything else transformers passes along is ignored.

    Returns:
        ``(attn_output [B, S, H, D], None)``: no attention weights.
    """
    _check_unsupported(dropout, kwargs)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key, value: expected 4 dimensions [B, H, S, D], got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[0] != batch or key.shape[2] != seq_len or value.shape != key.shape:
        raise ValueError(f"key, value: expected shape [{batch}, Hkv, {seq_len}, {head_dim}] (no KV cache: call "
                         f"the model with use_cache=False), got {tuple(key.shape)} and {tuple(value.shape)}")
    device = query.device
    cu_seqlens = _index_kwarg(kwargs, "cu_seq_lens_q", device)
    cu_seqlens_k = _index_kwarg(kwargs, "cu_seq_lens_k", device)
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_k
    elif cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seq_lens_k: expected the shape of cu_seq_lens_q {tuple(cu_seqlens.shape)} "
                         f"(q and k lengths are equal), got {tuple(cu_seqlens_k.shape)}")
    start_q = _index_kwarg(kwargs, START_KWARG, device)
    end_k = _index_kwarg(kwargs, END_KWARG, device)
    if (start_q is None) != (end_k is None):
        missing = START_KWARG if start_q is None else END_KWARG
        raise ValueError(f"{missing}: expected a tensor (the DFS arrays come together), got None")

    max_seqlen = kwargs.get("max_length_q")
    if cu_seqlens is None:  # each batch row is one causal sequence
        cu_seqlens, chain = _causal_arrays(batch, seq_len, device)
        max_seqlen = seq_len
    elif batch != 1:
        raise ValueError(f"query: expected batch size 1 with cu_seq_lens_q (all sequences packed in one row), "
                         f"got {batch}")
    else:
        chain = None
    if start_q is None:  # a chain: all starts and ends 0, which is causal attention
        start_q = end_k = chain if chain is not None else torch.zeros(seq_len, dtype=torch.int32, device=device)

    # [B, H, S, D] -> packed [B * S, H, D]
    q = query.transpose(1, 2).reshape(batch * seq_len, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * seq_len, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * seq_len, kv_heads, head_dim)
    out = flashtree.tree_attention(q, k, v, cu_seqlens, start_q, end_k,
                                   max_seqlen=None if max_seqlen is None else int(max_seqlen),
                                   softmax_scale=scaling)
    return out.reshape(batch, seq_len, heads, head_dim), None


def register() -> str:
    """Register the ``"flashtree"`` attention implementation with transformers (idempotent).

    Returns:
        The name, ``"flashtree"``: pass it as ``attn_implementation=`` on transformers 4.48 to 4.57; on
        transformers 5 switch a built model with :func:`enable` instead.
    """
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers 4.48 and 4.49: the registry is a plain public dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[NAME] = flashtree_attention_forward
        return NAME
    AttentionInterface.register(NAME, flashtree_attention_forward)
    return NAME


def enable(model):
    """Register the ``"flashtree"`` attention and switch a built model to it; returns the model.

    ``model.set_attn_implementation`` is tried first. transformers 5.x takes every implementation name that
    contains "flash" for a flash-attn build to load from the hub and refuses it (also in ``from_config`` and
    ``from_pretrained``); then the name is set on the model's config, which the attention layers read at
    every call (``config._attn_implementation``, the config's own setter).
    """
    register()
    try:
        model.set_attn_implementation(NAME)
    except (AttributeError, ImportError, ValueError):
        model.config._attn_implementation = NAME
    if model.config._attn_implementation != NAME:
        raise ValueError(f"model: expected its attention implementation to become {NAME!r}, got "
                         f"{model.config._attn_implementation!r}")
    return model


# ---------------------------------------------------------------------------------------------------
# Model inputs for packed trees
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TreeInputs:
    """One packed row of trees, ready for a transformers causal LM with ``attn_implementation="flashtree"``.

    Token ``t`` of the row is predicted by the logits of ``predictor_index[m]`` where
    ``target_index[m] == t``: the previous token of the same node, or for a node's first token the last
    token of its parent node. Every token outside the root nodes (the prompts) is a target.
    """

    input_ids: torch.Tensor        # int64 [1, N]
    position_ids: torch.Tensor     # int64 [1, N]: a node's positions continue from its parent's end
    cu_seq_lens: torch.Tensor      # int32 [num_seqs + 1]
    max_length: int                # the longest packed sequence
    start_q: torch.Tensor          # int32 [N]
    end_k: torch.Tensor            # int32 [N]
    predictor_index: torch.Tensor  # int64 [M]
    target_index: torch.Tensor     # int64 [M]
    target_lens: List[int]         # tokens per non-root node, in packed order (sum M)

    def model_kwargs(self) -> dict:
        """The forward kwargs: ``model(**inputs.model_kwargs(), use_cache=False)``."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length,
                START_KWARG: self.start_q, END_KWARG: self.end_k}

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``[M]``: the target token ids."""
        return self.input_ids[0, self.target_index]

    def target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[M, V]``: the logits that predict each target, from the model's ``[1, N, V]`` logits."""
        return logits[0, self.predictor_index]

    def node_logits(self, logits: torch.Tensor) -> List[torch.Tensor]:
        """:meth:`target_logits` split per non-root node (per response): ``[L_node, V]`` each."""
        return list(torch.split(self.target_logits(logits), self.target_lens))

    def response_loss(self, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Cross-entropy of every target token (the responses), in fp32 at least (fp64 logits stay fp64)."""
        target_logits = self.target_logits(logits)
        if target_logits.dtype != torch.float64:
            target_logits = target_logits.float()
        return torch.nn.functional.cross_entropy(target_logits, self.labels, reduction=reduction)


def _token_tensor(value, name: str) -> torch.Tensor:
    tokens = torch.as_tensor(value)
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of token ids, got "
                         f"{tokens.dtype} shape {tuple(tokens.shape)}")
    return tokens.to(torch.int64)


def _targets(parent_lists: Sequence[Sequence[int]], node_lens: Sequence[Sequence[int]]
             ) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Predictor and target token indices of packed pre-order trees (see :class:`TreeInputs`)."""
    predictors, targets, target_lens = [], [], []
    offset = 0
    for parents, lens in zip(parent_lists, node_lens):
        node_first = [offset + sum(lens[:k]) for k in range(len(lens))]
        for node in range(1, len(lens)):
            first, parent = node_first[node], parents[node]
            parent_last = node_first[parent] + lens[parent] - 1
            predictors.append(parent_last)
            predictors.extend(range(first, first + lens[node] - 1))
            targets.extend(range(first, first + lens[node]))
            target_lens.append(lens[node])
        offset += sum(lens)
    return (torch.tensor(predictors, dtype=torch.int64), torch.tensor(targets, dtype=torch.int64), target_lens)


def _tree_inputs(tokens: torch.Tensor, parent_lists, node_lens, device) -> TreeInputs:
    start_q, end_k = zip(*(tree.dfs_arrays_from_parents(p, lens) for p, lens in zip(parent_lists, node_lens)))
    positions = torch.cat([tree.packed_position_ids(p, lens) for p, lens in zip(parent_lists, node_lens)])
    seq_lens = [sum(lens) for lens in node_lens]
    cu_seqlens = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32)
    predictors, targets, target_lens = _targets(parent_lists, node_lens)
    return TreeInputs(
        input_ids=tokens[None].to(device), position_ids=positions.to(torch.int64)[None].to(device),
        cu_seq_lens=cu_seqlens.to(device), max_length=max(seq_lens),
        start_q=torch.cat(start_q).to(device), end_k=torch.cat(end_k).to(device),
        predictor_index=predictors.to(device), target_index=targets.to(device), target_lens=target_lens)


def tree_inputs_from_groups(prompts: Sequence, responses: Sequence[Sequence], *, device=None) -> TreeInputs:
    """Pack prompts and their responses, one DFS-ordered sequence ``[prompt][resp 1]...[resp R]`` per prompt.

    Args:
        prompts: ``num_seqs >= 1`` 1-D token-id sequences (tensors or lists), each non-empty.
        responses: per prompt, a list of non-empty 1-D token-id sequences (possibly no responses).
        device: where the tensors go (CPU when None).

    Returns:
        :class:`TreeInputs`; its targets are the response tokens, response after response.
    """
    if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)):
        raise TypeError(f"prompts, responses: expected lists, got {type(prompts).__name__} and "
                        f"{type(responses).__name__}")
    prompt_tokens = [_token_tensor(p, f"prompts[{g}]") for g, p in enumerate(prompts)]
    response_tokens = [[_token_tensor(r, f"responses[{g}][{i}]") for i, r in enumerate(group)]
                       for g, group in enumerate(responses)]
    packed = tree.pack(prompt_tokens, response_tokens)  # checks the group structure
    parent_lists = [[-1] + [0] * len(lens) for _, lens in packed.groups]
    node_lens = [[prompt_len] + lens for prompt_len, lens in packed.groups]
    return _tree_inputs(packed.values, parent_lists, node_lens, device)


def tree_inputs_from_parents(nodes: Sequence, parents, *, device=None) -> TreeInputs:
    """Pack one deeper tree (multi-turn branches): node ``k`` holds the tokens ``nodes[k]``.

    Args:
        nodes: ``K >= 1`` non-empty 1-D token-id sequences, numbered in DFS pre-order (node 0 the root).
        parents: ``[K]`` parent array, a pre-order numbering (see :func:`flashtree.tree.dfs_arrays_from_parents`).
        device: where the tensors go (CPU when None).

    Returns:
        :class:`TreeInputs` with one sequence; its targets are the tokens of every node but the root.
    """
    if not isinstance(nodes, (list, tuple)) or len(nodes) == 0:
        raise ValueError(f"nodes: expected a non-empty list of token sequences, got {nodes!r:.80}")
    tokens = [_token_tensor(n, f"nodes[{k}]") for k, n in enumerate(nodes)]
    parent_list = tree.validate_parents(parents).tolist()
    if len(parent_list) != len(tokens):
        raise ValueError(f"parents: expected one entry per node ({len(tokens)}), got {len(parent_list)}")
    return _tree_inputs(torch.cat(tokens), [parent_list], [[t.numel() for t in tokens]], device)
