"""HF transformers glue for tree verification, public APIs only.

- ``flashtree_verify``: an attention function registered with ``transformers.AttentionInterface``. In a
  verification step every layer sees q_len = T tree tokens; it calls ``flash_decoding_attention`` (or
  the paged variant) on the layer's cache and the step's tree mask. CPU tensors take the reference path.
- :class:`FlashTreeCache`: a ``transformers.Cache`` that owns flashtree's KV cache, stacked over layers
  (``[2, L, B, Hkv, C, D]`` padded, or ``[2, L, num_pages, Hkv, P, D]`` paged), the step's staged tree
  K/V, and ``kv_seq_len`` on the device. ``update`` only stages the tree tokens; ``commit`` keeps the
  accepted ones (:func:`flashtree.kvcache.commit_accepted`, all layers in one call).
- :class:`SdpaTreeCache`: the baseline that Medusa's and EAGLE's reference code use: HF's own
  ``DynamicCache`` and ``sdpa`` attention with a 4-D boolean tree mask over cache + tree, then a
  gather of the accepted positions. Batch size 1.

The model runs through ``model.get_decoder()`` and ``model.get_output_embeddings()``; the cache object is
handed to the attention function as the ``flashtree_cache`` keyword, which HF passes down to it.
Prompts longer than 256 tokens are prefilled in chunks of 256 (each chunk a chain over the cache).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from .. import decode
from ..kvcache.commit import commit_accepted

VERIFY_ATTENTION = "flashtree_verify"
_CHUNK = decode.MAX_TREE_TOKENS

try:  # transformers >= 4.56: a Cache is a list of layer objects
    from transformers import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin as _HFLayer
except ImportError:  # pragma: no cover - older transformers
    from transformers import Cache as _HFCache
    _HFLayer = object


def verify_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     flashtree_cache=None, **kwargs):
    """The ``flashtree_verify`` attention function: ``[B, H, T, D]`` queries over the layer's cache and
    the staged tree tokens (``key``/``value``), under the cache's current tree mask.

    Returns ``(attn_output [B, T, H, D], None)`` as HF attention functions do.
    """
    if flashtree_cache is None:
        raise ValueError("flashtree_cache: expected the FlashTreeCache of this forward (pass "
                         "flashtree_cache=cache to the model call), got None")
    out = flashtree_cache.attend(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2), None


def register() -> str:
    """Register ``flashtree_verify`` with ``transformers.AttentionInterface`` (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VERIFY_ATTENTION, verify_attention)
    return VERIFY_ATTENTION


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run a block with ``model``'s attention implementation set to ``name``, restored afterwards."""
    if name == VERIFY_ATTENTION:
        register()
    before = model.config._attn_implementation
    if before != name:
        _set_attention(model, name)
    try:
        yield model
    finally:
        if model.config._attn_implementation != before:
            _set_attention(model, before)


def _set_attention(model, name: str) -> None:
    """``set_attn_implementation``; for a registered name it rejects (transformers 5 treats any name that
    contains "flash" as a flash-attention kernel to import), the config attribute the modeling code
    dispatches on."""
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, ImportError):
        from transformers import AttentionInterface

        if name not in AttentionInterface._global_mapping:
            raise
        model.config._attn_implementation = name


def _model_dims(model):
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv_heads, head_dim


class _StagedLayer(_HFLayer):
    """One layer of :class:`FlashTreeCache` seen through HF's per-layer cache API."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "FlashTreeCache", layer_idx: int):
        if _HFLayer is not object:
            super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.stage(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length, *args):
        return self.owner.capacity + query_length, 0

    def get_seq_length(self, *args):
        return self.owner.get_seq_length()

    def get_max_length(self):
        return self.owner.capacity


class FlashTreeCache(_HFCache):
    """flashtree's KV cache for an HF decoder, stacked over layers, with ``kv_seq_len`` on the device.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: the model's shape (see :meth:`for_model`).
        capacity: tokens per sequence (padded: C; paged: rounded up to whole pages).
        dtype, device: of the cache (the model's).
        paged: a paged cache ``[2, L, num_pages, Hkv, P, D]`` with ``block_tables [B, C / P]``
            (sequence b owns pages ``b * C / P ...``; replace ``block_tables`` to share or remap pages).
        page_size: P, a power of two in 8..256.
        max_tree_tokens: the largest T of a step (staging buffer size), at most 256.
        block_size: the decode kernel's KV tile.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 dtype=torch.float32, device=None, paged: bool = False, page_size: int = 16,
                 max_tree_tokens: int = decode.MAX_TREE_TOKENS, block_size: int = 64):
        layers = [_StagedLayer(self, i) for i in range(num_layers)]
        try:
            super().__init__(layers=layers)
        except TypeError:  # pragma: no cover - older transformers
            super().__init__()
            self.layers = layers
        device = torch.device(device) if device is not None else torch.device("cpu")
        if not 1 <= max_tree_tokens <= decode.MAX_TREE_TOKENS:
            raise ValueError(f"max_tree_tokens: expected 1..{decode.MAX_TREE_TOKENS}, got {max_tree_tokens}")
        self.num_layers, self.num_seqs = num_layers, batch_size
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.paged, self.page_size = paged, page_size
        if paged:
            if page_size not in decode.PAGE_SIZES:
                raise ValueError(f"page_size: expected one of {list(decode.PAGE_SIZES)}, got {page_size}")
            pages_per_seq = math.ceil(capacity / page_size)
            capacity = pages_per_seq * page_size
            self.kv = torch.zeros(2, num_layers, batch_size * pages_per_seq, num_kv_heads, page_size, head_dim,
                                  dtype=dtype, device=device)
            self.block_tables = torch.arange(batch_size * pages_per_seq, dtype=torch.int32,
                                             device=device).view(batch_size, pages_per_seq)
        else:
            self.kv = torch.zeros(2, num_layers, batch_size, num_kv_heads, capacity, head_dim, dtype=dtype,
                                  device=device)
            self.block_tables = None
        self.capacity = capacity
        self.staged = torch.zeros(2, num_layers, batch_size, num_kv_heads, max_tree_tokens, head_dim,
                                  dtype=dtype, device=device)
        self.kv_seq_len = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.length_bound = 0  # host-side upper bound of kv_seq_len (no sync): plans fewer splits
        self.mask = None
        self.num_tree_tokens = 0

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, **kwargs) -> "FlashTreeCache":
        """A cache shaped for ``model`` (its config, dtype and device)."""
        num_layers, _, kv_heads, head_dim = _model_dims(model)
        param = next(model.parameters())
        kwargs.setdefault("dtype", param.dtype)
        kwargs.setdefault("device", param.device)
        return cls(num_layers, batch_size, kv_heads, head_dim, capacity, **kwargs)

    # -------------------------------------------------------------- one verification step

    def begin(self, mask: torch.Tensor) -> None:
        """Set the tree mask (bool ``[T, T]`` or ``[B, T, T]``, True = may attend) of the next forward."""
        num_tokens = mask.shape[-1]
        if num_tokens > self.staged.shape[4]:
            raise ValueError(f"mask: expected T <= {self.staged.shape[4]} (max_tree_tokens), got T = {num_tokens}")
        self.mask, self.num_tree_tokens = mask, num_tokens

    def stage(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Keep a layer's tree K/V ``[B, Hkv, T, D]`` for attention and the commit; returns the staged views."""
        t = key_states.shape[2]
        if self.mask is None or t != self.num_tree_tokens:
            raise ValueError(f"key_states: expected T = {self.num_tree_tokens} tree tokens (set by "
                             f"FlashTreeCache.begin), got {t}")
        k = self.staged[0, layer_idx, :, :, :t]
        v = self.staged[1, layer_idx, :, :, :t]
        k.copy_(key_states.detach())  # an inference cache: no autograd through it
        v.copy_(value_states.detach())
        return k, v

    def layer_kv(self, layer_idx: int):
        """``(k_cache, v_cache, kv_seq_len, block_tables)`` of one layer, as flash_decoding_attention takes them."""
        return self.kv[0, layer_idx], self.kv[1, layer_idx], self.kv_seq_len, self.block_tables

    def attend(self, layer_idx: int, query, key, value, scaling=None, mask=None):
        """Tree attention of ``query [B, H, T, D]`` over the layer's cache and ``key``/``value`` ``[B, Hkv, T, D]``."""
        k_cache, v_cache, lens, tables = self.layer_kv(layer_idx)
        mask = self.mask if mask is None else mask
        group = query.shape[1] // key.shape[1]
        bound = min(self.capacity, self.length_bound) if self.length_bound else None
        if query.device.type != "cuda":
            bound = None  # the reference path reads the lengths themselves
        if tables is None:
            return decode.flash_decoding_attention(query, k_cache, v_cache, key, value, mask, lens, self.block_size,
                                                   bound, sm_scale=scaling, kv_group_num=group)
        return decode.flash_decoding_attention_paged(query, k_cache, v_cache, tables, lens, key, value, mask,
                                                     self.block_size, bound, sm_scale=scaling, kv_group_num=group)

    def commit(self, accepted_nodes: torch.Tensor, accept_len: torch.Tensor, *, check: bool = False) -> torch.Tensor:
        """Keep the accepted tree tokens of every layer (one call); returns the overflow flags ``[B]``."""
        t = self.num_tree_tokens
        overflow = commit_accepted(self.kv[0], self.kv[1], self.staged[0, :, :, :, :t], self.staged[1, :, :, :, :t],
                                   accepted_nodes, accept_len, self.kv_seq_len, block_tables=self.block_tables,
                                   check=check)
        self.length_bound = min(self.capacity, self.length_bound + accepted_nodes.shape[1])
        return overflow

    # -------------------------------------------------------------- HF's Cache API

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.stage(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest ``kv_seq_len`` (a host sync; HF calls it only when position ids are not given)."""
        return int(self.kv_seq_len.max()) if self.num_seqs else 0

    def get_max_length(self, layer_idx=None) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.capacity + query_length, 0

    def __len__(self):
        return self.num_layers


class SdpaTreeCache:
    """The HF baseline: ``DynamicCache`` + ``sdpa`` with a 4-D boolean tree mask (batch size 1)."""

    def __init__(self, model, capacity: int = 1 << 20):
        from transformers import DynamicCache

        self.capacity = capacity  # no preallocation; the bound drafters size their own caches by

        self.cache = DynamicCache(config=model.config) if _accepts_config(DynamicCache) else DynamicCache()
        self.num_layers = _model_dims(model)[0]
        self.length = 0
        self.mask = None
        self.num_tree_tokens = 0
        self.kv_seq_len = torch.zeros(1, dtype=torch.int32, device=next(model.parameters()).device)

    def layer_kv(self, layer_idx: int):
        layer = self.cache.layers[layer_idx]
        return layer.keys[..., :self.length, :], layer.values[..., :self.length, :], self.kv_seq_len, None

    def commit(self, accepted_nodes, accept_len, *, check: bool = False) -> torch.Tensor:
        n = int(accept_len[0])  # host sync, as in the reference implementations
        idx = self.length + accepted_nodes[0, :n].to(torch.int64)
        for layer in self.cache.layers:
            keep = torch.arange(self.length, device=idx.device)
            layer.keys = torch.cat([layer.keys[..., keep, :], layer.keys[..., idx, :]], -2)
            layer.values = torch.cat([layer.values[..., keep, :], layer.values[..., idx, :]], -2)
        self.length += n
        self.kv_seq_len.fill_(self.length)
        return torch.zeros(1, dtype=torch.bool, device=idx.device)


def _accepts_config(cls) -> bool:
    import inspect

    return "config" in inspect.signature(cls.__init__).parameters


def tree_forward(model, cache, tokens: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                 *, last_only: bool = False):
    """One forward of ``tokens [B, T]`` as a tree (``mask [T, T]`` or ``[B, T, T]``) over ``cache``.

    Returns ``(logits [B, T, V] (or [B, 1, V] with last_only), hidden [B, T, hidden])``.
    """
    decoder = model.get_decoder()
    if isinstance(cache, SdpaTreeCache):
        bsz, t = tokens.shape
        full = torch.ones(bsz, 1, t, cache.length + t, dtype=torch.bool, device=tokens.device)
        full[..., cache.length:] = mask.expand(bsz, t, t)[:, None]
        cache.mask, cache.num_tree_tokens = mask, t
        out = decoder(input_ids=tokens, attention_mask=full, position_ids=position_ids,
                      past_key_values=cache.cache, use_cache=True)
    else:
        cache.begin(mask)
        out = decoder(input_ids=tokens, position_ids=position_ids, past_key_values=cache, use_cache=True,
                      flashtree_cache=cache)
    hidden = out.last_hidden_state
    head = model.get_output_embeddings()
    logits = head(hidden[:, -1:] if last_only else hidden)
    return logits, hidden


@functools.lru_cache(maxsize=64)
def _chain_mask(n: int, device: str) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def chain_mask(n: int, device) -> torch.Tensor:
    """The causal ``[n, n]`` mask, one tensor per (n, device): flash_decoding_attention checks a GPU mask's
    diagonal with one host sync the first time it sees a mask tensor, so reusing them avoids syncs."""
    return _chain_mask(n, str(torch.device(device)))


def prefill(model, cache, input_ids: torch.Tensor):
    """Run the prompt ``[B, P]`` into the cache (chunks of 256 chains); returns the last position's
    ``(logits [B, V], hidden [B, hidden])``."""
    bsz, total = input_ids.shape
    logits = hidden = None
    for first in range(0, total, _CHUNK):
        chunk = input_ids[:, first:first + _CHUNK]
        t = chunk.shape[1]
        mask = chain_mask(t, chunk.device)
        pos = (cache.kv_seq_len.to(torch.int64)[:, None] + torch.arange(t, device=chunk.device))
        logits, hidden = tree_forward(model, cache, chunk, mask, pos, last_only=True)
        nodes = torch.arange(t, device=chunk.device).expand(bsz, t)
        length = torch.full((bsz,), t, dtype=torch.int64, device=chunk.device)
        cache.commit(nodes, length, check=True)
    return logits[:, -1], hidden[:, -1]
