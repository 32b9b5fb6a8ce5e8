"""Shared-prefix tree decoding (DeFT): read each node's KV once for all the queries beneath it.

Per decoding step: ``deft_plan(cache, num_qo_heads)`` runs once on the host and moves one int32
buffer to the GPU; every layer then calls ``deft_attention(q, k_pool, v_pool, plan)`` with no host
work beyond argument checks: no synchronisation, and no allocation but the output (none when ``out``
is given). The partial states (o in q's dtype, lse in fp32) live in the plan's own workspace,
allocated on its first call on a stream and reused by every layer after it (or in a caller's
``workspace``). On compute capability 9.0, inside a CUDA-graph capture, stage 2 is a programmatic
dependent launch: its CTAs start while stage 1 stores its partials and wait for them in the kernel
(``FLASHTREE_DEFT_PDL=0`` launches it plainly). Eager calls launch it plainly: the dependent
launch goes through ctypes, and its host time costs more than it saves on the GPU wherever an eager
call is host-bound (H100, session 24).

The plan (the flattened tree split):
  1. Leaves in DFS order own consecutive query rows: leaf i has n_i query tokens, the last n_i
     tokens of its node (one per step for plain decoding, several for speculative trees, with a
     causal or a given tree mask among them). So every node is seen by a contiguous range of
     query rows: those of the leaves beneath it.
  2. The tree's KV tokens, in DFS order of nodes, become one list of token records
     (slot, q_lo, q_hi, mask_col); tokens nobody sees are left out.
  3. The list is cut into chunks of ``chunk_len`` tokens; a chunk may span nodes. Its query rows
     are the union [q0, q1) of its tokens' ranges, i.e. G * (q1 - q0) rows for the kernel, in
     row tiles of 64: one work item per (chunk, row tile), times Hkv KV heads. Work items are
     launched longest first (``_work_cost``), all KV heads of one item together.
  4. Stage 2: query q merges the partials of the chunks that contain it, in chunk order.

Chunk length (``choose_chunk_len``): each CTA costs about (L + L0) key loads, L0 = 128 keys for
loading Q and storing 64 partial rows; with W(L) work items and ``slots`` = SMs x 2 CTAs,
the time is ~ceil(W(L) Hkv / slots) (L + L0) plus the partial states' traffic spread over the
machine, 2 Hkv R(L) / slots for R(L) partial rows (one row written and read ~ 2 keys); we
take the L (a multiple of 64 from a short list) that minimises it, the longer one on a tie. Worked example, H100 (132 SMs, 264 slots), G = 4,
Hkv = 8, prefix 16384 + 64 branches of 128 tokens (24576 tokens): L = 768 gives 22 chunks that
touch the prefix (64 queries, 256 rows, 4 row tiles each) and 10 branch-only chunks (6 branches,
24 rows, 1 tile each), W = 98 items, 784 CTAs = 3 waves: 3 x 896 + 2 x 8 x 5872 / 264 = 3044;
L = 512 needs 5 waves (3200 + 512), L = 3072 one wave of long CTAs (3200 + 105).

Kernels (the plan's ``block_m`` fixes which): on compute capability 9.0 (``use_wgmma``, off with
FLASHTREE_WGMMA=0) stage 1 runs sm_90a kernels on the warpgroup tensor cores:
  - block_m = 64: one warpgroup per CTA, 3 CTAs per SM (the chunk model above keeps 2 CTAs per SM:
    on the H200 this kernel measured best at the same chunk lengths, NOTES.md session 5);
  - block_m = 128, chosen by ``_choose_block_m``, which compares the two chunk models (48 of the
    49 trees measured in session 20 take it): a warp-specialised
    kernel, one CTA per SM, whose two consumer warpgroups share each K/V tile that a producer
    warpgroup streams in; its chunk length comes from ``ws_chunk_len`` (a makespan model);
  - block_m = 192 (only when asked for): the same kernel with three consumer warpgroups.
Elsewhere the portable mma.sync kernel (block_m = 64, 2 CTAs per SM).

Stale plans: a plan records the cache's ``version``; ``deft_attention`` raises if the cache has
changed (a fork, append or prune) since planning. Writing new K/V values into planned slots does
not change the version. A plan built without a cache (``cache=None`` is not offered) cannot go stale.

CUDA graphs: capture with a fixed plan and a preallocated ``out`` (a capture without ``workspace``
takes its partial-state buffer from the graph's pool, not the plan's); the plan's device buffer
and grid are baked into the graph, so a new tree needs a new plan and a new capture.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _checks, _interop, _jit, reference
from ._jit import tma
from .kvcache.tree_cache import TreeKVCache

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
BLOCK_M = 64   # query rows per work item (kernels_cu/deft.cu: DeftConfig::kBlockM)
WS_BLOCK_M = 128   # the Hopper warp-specialised kernel's, two consumer warpgroups (DeftWsConfig::kBlockM)
WS3_BLOCK_M = 192  # the same kernel with three consumer warpgroups
WS_CONSUMERS = {WS_BLOCK_M: 2, WS3_BLOCK_M: 3}  # block_m -> consumer warpgroups (NC)
WS_STAGES = {2: 6, 3: 5}  # its ring of 64-key K/V tiles (DeftWsConfig::kStages)
BLOCK_N = 64   # keys per KV tile
WORK_INTS = 8  # a work item's record: (chunk, row tile, the chunk's 4 fields, slot_base, dense slot); deft.cu kWorkInts
CTA_OVERHEAD_KEYS = 128  # L0 of the chunk-length model (module docstring)
PARTIAL_ROW_KEYS = 2     # one partial row written and read back, at most ~ 2 keys' K + V (bf16)
CHUNK_MULTIPLES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # L / BLOCK_N candidates
DEFAULT_SMS = 132  # planning for a CPU plan (an H100) when no device and no num_sms is given
_MERGE_THREADS = 256
_PDL = os.environ.get("FLASHTREE_DEFT_PDL", "1") != "0"  # stage 2 as a programmatic dependent launch (A/B switch)


def _smem_bytes(head_dim: int, wgmma: bool) -> int:
    # 5 [64][D] 16-bit tiles (Q and 2 K/V stages) and the 3-slot record ring; wgmma: 4 tiles (2 K/V
    # stages, Q in registers) and 1 KB more to start them on a 1024-byte boundary.
    tiles = 2 * BLOCK_N * head_dim * (4 if wgmma else 5) + 3 * BLOCK_N * 16
    return tiles + 1024 if wgmma else tiles


def _ws_smem_bytes(head_dim: int, block_m: int) -> int:
    # DeftWsConfig::kBytes: the ring of [64][D] K/V tiles (two consumers: Q passes through its last
    # stage; three: their Q tiles after it), per stage block_m queries' 64 visibility bits, 2
    # mbarriers and a flag; 1 KB more to start the tiles on a 1024-byte boundary.
    nc = WS_CONSUMERS[block_m]
    stages = WS_STAGES[nc]
    tiles = 2 * stages * BLOCK_N * head_dim * 2 + (nc * BLOCK_N * head_dim * 2 if nc == 3 else 0)
    return tiles + stages * (block_m * 8 + 16 + 4) + 1024


# Stage 1 on Hopper (compute capability 9.0): the 64-row tiles run on wgmma (an sm_90a kernel).
# FLASHTREE_WGMMA=0 keeps the portable mma.sync kernel (for comparisons and tests).
_WGMMA = os.environ.get("FLASHTREE_WGMMA", "1") != "0"


def use_wgmma(device: torch.device) -> bool:
    """Whether stage 1 runs the wgmma (sm_90a) kernel on ``device``."""
    return _WGMMA and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


@functools.lru_cache(maxsize=None)  # called on every launch: build each spec once
def spec(dtype: torch.dtype, head_dim: int, wgmma: bool = False) -> _jit.KernelSpec:
    """Stage 1; ``wgmma``: the sm_90a kernel (built for sm_90 only)."""
    return _jit.KernelSpec(family="deft", kernel="ft::deft_partial_kernel",
                           template_args=(_jit.ctype(dtype), head_dim, "true" if wgmma else "false"),
                           name=f"deft_partial_{_jit.short(dtype)}_d{head_dim}{'_wgmma' if wgmma else ''}",
                           arch_suffix="a" if wgmma else "", archs=("sm_90",) if wgmma else ())


@functools.lru_cache(maxsize=None)
def ws_spec(dtype: torch.dtype, head_dim: int, consumers: int = 2) -> _jit.KernelSpec:
    """Stage 1, the warp-specialised sm_90a kernel: 2 consumer warpgroups (128-row work items) or 3
    (192-row items)."""
    return _jit.KernelSpec(family="deft", kernel="ft::deft_partial_ws_kernel",
                           template_args=(_jit.ctype(dtype), head_dim, consumers),
                           name=f"deft_partial_ws_{_jit.short(dtype)}_d{head_dim}{'_c3' if consumers == 3 else ''}",
                           arch_suffix="a", archs=("sm_90",))


@functools.lru_cache(maxsize=None)
def merge_spec(dtype: torch.dtype, head_dim: int) -> _jit.KernelSpec:
    return _jit.KernelSpec(family="deft", kernel="ft::deft_merge_kernel",
                           template_args=(_jit.ctype(dtype), head_dim),
                           name=f"deft_merge_{_jit.short(dtype)}_d{head_dim}")


_jit.register_shipped("deft", lambda: [s for dt in DTYPES for d in HEAD_DIMS
                                       for s in (spec(dt, d), spec(dt, d, wgmma=True), ws_spec(dt, d), ws_spec(dt, d, 3),
                                                 merge_spec(dt, d))])


# ---------------------------------------------------------------------------------- the plan

_SECTIONS = ("tokens", "chunks", "work", "slot_base", "qmask_off", "mask", "q_indptr", "slot_idx")


@dataclass
class DeftPlan:
    """One decoding step's schedule, shared by every layer. Host arrays (numpy int32) are kept for
    inspection; ``meta`` is the same data in one int32 tensor on the plan's device.

    tokens [N, 4] (slot, q_lo, q_hi, mask_col); chunks [C, 4] (tok_begin, tok_end, q0, q1);
    work [W, 8] (chunk, row tile, the chunk's four fields, slot_base, dense slot: the slot of its first
    key when the Hopper kernel copies every tile by TMA without records, else -1); slot_base [C];
    qmask_off [Q]; mask (flat 0/1);
    q_indptr [Q + 1] and slot_idx [num_slots]: query q's partials, in chunk order.
    """

    num_queries: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    chunk_len: int
    block_m: int  # rows per work item: 128 for the Hopper warp-specialised kernel, else 64
    host: dict[str, np.ndarray]
    meta: torch.Tensor
    offsets: dict[str, int]
    leaves: list[int]
    leaf_query_offsets: np.ndarray            # [num_leaves + 1]
    leaf_path_lengths: np.ndarray             # tokens on each leaf's path
    tail_masks: list[np.ndarray | None]       # bool [n_i, n_i] per leaf, None when n_i == 1
    cache: TreeKVCache | None = field(default=None, repr=False)
    version: int = -1
    # The plan's own workspace, one per (device, stream) it ran on (deft_attention without
    # ``workspace=``): every layer of a step reuses it, stream order keeps the uses apart.
    _workspaces: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def leaf_slots(self) -> list[np.ndarray]:
        """The slots of each leaf's path (from the cache, which must be unchanged since planning)."""
        self.check_fresh()
        return [self.cache.path_slots(leaf) for leaf in self.leaves]

    @property
    def num_chunks(self) -> int:
        return len(self.host["chunks"])

    @property
    def num_work(self) -> int:
        return len(self.host["work"])

    @property
    def num_slots(self) -> int:
        return len(self.host["slot_idx"])

    @property
    def device(self) -> torch.device:
        return self.meta.device

    @functools.cached_property
    def kernel_args(self) -> tuple[int, ...]:
        """Stage 1's plan arguments: log2 of the page size and the six plan arrays' addresses."""
        at = self.addresses
        return (self.page_size.bit_length() - 1,
                *(at[name] for name in ("tokens", "chunks", "work", "slot_base", "qmask_off", "mask")))

    @functools.cached_property
    def addresses(self) -> dict[str, int]:
        """The device address of each section of ``meta`` (kernel arguments)."""
        base, size = self.meta.data_ptr(), self.meta.element_size()
        return {name: base + start * size for name, start in self.offsets.items()}

    def section(self, name: str) -> torch.Tensor:
        """A view of one section of ``meta`` (flat int32)."""
        start = self.offsets[name]
        return self.meta[start: start + self.host[name].size]

    def check_fresh(self) -> None:
        if self.cache is not None and self.cache.version != self.version:
            raise ValueError(f"plan: expected a plan of the cache's current state (version "
                             f"{self.cache.version}), got one built at version {self.version}; "
                             "re-plan after fork, append or prune")

    def io_stats(self, itemsize: int = 2) -> dict[str, int]:
        """KV bytes (K and V, all KV heads) of one layer, ``itemsize`` bytes per element.

        unique: every visible token once (the floor); deft_dram: the same (each chunk is read from
        DRAM once, its row tiles hit L2); deft_l2: per work item (row tiles re-read the chunk);
        per_branch: every leaf reads its whole path (flash decoding per branch);
        partials: the partial states (o in 16 bits, lse in fp32) written and read back by the two
            stages.
        """
        per_token = 2 * self.num_kv_heads * self.head_dim * itemsize
        chunks, work = self.host["chunks"], self.host["work"]
        chunk_tokens = (chunks[:, 1] - chunks[:, 0]).astype(np.int64)
        return {
            "unique": int(chunk_tokens.sum()) * per_token,
            "deft_dram": int(chunk_tokens.sum()) * per_token,
            "deft_l2": int(chunk_tokens[work[:, 0]].sum()) * per_token if len(work) else 0,
            "per_branch": int(self.leaf_path_lengths[np.diff(self.leaf_query_offsets) > 0].sum()) * per_token,
            "partials": 2 * self.num_slots * self.num_heads * (self.head_dim * itemsize + 4),
        }


def choose_chunk_len(q_lo: np.ndarray, q_hi: np.ndarray, group: int, num_kv_heads: int,
                     num_sms: int, ctas_per_sm: int = 2) -> int:
    """The chunk length (tokens, a multiple of 64) minimising the wave model of the module docstring."""
    return _chunk_model(q_lo, q_hi, group, num_kv_heads, num_sms, ctas_per_sm)[1]


def _chunk_model(q_lo: np.ndarray, q_hi: np.ndarray, group: int, num_kv_heads: int, num_sms: int,
                 ctas_per_sm: int = 2) -> tuple[float, int]:
    """choose_chunk_len's minimum: (cost in keys per CTA slot, chunk length)."""
    n = len(q_lo)
    if n == 0:
        return 0.0, BLOCK_N
    slots = max(1, num_sms * ctas_per_sm)
    best = None
    for mult in CHUNK_MULTIPLES:
        length = mult * BLOCK_N
        starts = np.arange(0, n, length)
        rows = (np.maximum.reduceat(q_hi, starts) - np.minimum.reduceat(q_lo, starts)) * group
        work = int(np.sum(-(-rows // BLOCK_M)))
        partials = PARTIAL_ROW_KEYS * num_kv_heads * int(rows.sum()) / slots  # spread over the machine
        cost = math.ceil(work * num_kv_heads / slots) * (length + CTA_OVERHEAD_KEYS) + partials
        if best is None or cost <= best[0]:
            best = (cost, length)
        if length >= n:
            break
    return best


WS_CHUNK_MULTIPLES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
WS_ITEM_OVERHEAD = 2.0   # tiles' worth per item: Q in, the split merge, the partial states out
# The chunk-length model's cost per tile of a wide and of a split item (<= 64 rows: the consumers
# take every NC-th tile), relative to a 128-row item; 128 rows: validated by chunk sweeps (NOTES,
# sessions 6-17); 192 rows: the session 18 timeline's per-tile cycles (2220 wide, 1130 split, against
# 1710 for a 128-row item).
WS_TILE_COST = {WS_BLOCK_M: (1.0, 0.6), WS3_BLOCK_M: (1.3, 0.66)}


def ws_chunk_len(q_lo: np.ndarray, q_hi: np.ndarray, group: int, num_kv_heads: int, num_sms: int,
                 block_m: int = WS_BLOCK_M) -> int:
    """The chunk length for the Hopper warp-specialised kernel (``block_m`` rows per item): the
    makespan of its work items (in KV tiles, longest first onto the least-loaded SM) plus the
    partial states' traffic, minimised."""
    return _ws_chunk_model(q_lo, q_hi, group, num_kv_heads, num_sms, block_m)[1]


def _ws_chunk_model(q_lo: np.ndarray, q_hi: np.ndarray, group: int, num_kv_heads: int, num_sms: int,
                    block_m: int = WS_BLOCK_M) -> tuple[float, int]:
    """ws_chunk_len's minimum: (makespan in 128-row tile steps, chunk length)."""
    n = len(q_lo)
    if n == 0:
        return 0.0, BLOCK_N
    best = None
    for mult in WS_CHUNK_MULTIPLES:
        length = mult * BLOCK_N
        starts = np.arange(0, n, length)
        tiles = -(-np.diff(np.append(starts, n)) // BLOCK_N)
        rows = (np.maximum.reduceat(q_hi, starts) - np.minimum.reduceat(q_lo, starts)) * group
        per_chunk = -(-rows // block_m)
        item_rows = np.minimum(block_m, rows.repeat(per_chunk) - block_m * _ranks(per_chunk))
        full, split = WS_TILE_COST[block_m]
        cost = tiles.repeat(per_chunk) * np.where(item_rows <= 64, split, full) + WS_ITEM_OVERHEAD
        loads = np.zeros(num_sms)
        items = np.sort(np.repeat(cost, num_kv_heads))[::-1]
        for r in range(0, len(items), num_sms):  # longest first onto the least-loaded SMs, a round at a time
            part = items[r: r + num_sms]
            order = np.argsort(loads, kind="stable")[: len(part)]
            loads[order] += part
        partials = PARTIAL_ROW_KEYS / BLOCK_N * num_kv_heads * int(rows.sum()) / num_sms
        total = loads.max() + partials
        if best is None or total <= best[0]:
            best = (total, length)
        if length >= n:
            break
    return best


# The two chunk models' exchange rate: one 128-row tile step of the makespan model (ws_chunk_len) is
# worth this many keys of the wave model's CTA slots (choose_chunk_len). Session 20 measured 64- and
# 128-row items on 49 trees on the H200 (benchmarks/NOTES.md). Without tail masks, 128 rows won or
# tied wherever the wave model's cost was at least 45.6 times the makespan (up to 66); the
# (4096, 32, 256) row, at 45.3, was 4% slower with them. The speculative trees (tail masks) all lie
# above 50: 128 rows won on 19 of 26 (by up to 32%, under prompts of 1024-16384 tokens), tied on 3
# and lost on 4, by 7-17% (prompts of 1024 and 4096 with 32-192 draft tokens).
WS_TILE_KEYS = 45.5


def _choose_block_m(tokens: np.ndarray, group: int, num_kv_heads: int, num_sms: int,
                    ws_model: tuple[float, int] | None = None, model: tuple[float, int] | None = None) -> int:
    """Rows per work item on Hopper: 128 (the warp-specialised kernel: two warpgroups share each
    K/V tile) when the 64-row plan's modelled cost is at least WS_TILE_KEYS times the 128-row plan's
    makespan, else 64 (three 64-row CTAs per SM). ``ws_model``, ``model``: ``_ws_chunk_model``'s and
    ``_chunk_model``'s results when the caller has them."""
    if len(tokens) == 0:
        return BLOCK_M
    if ws_model is None:
        ws_model = _ws_chunk_model(tokens[:, 1], tokens[:, 2], group, num_kv_heads, num_sms)
    if model is None:
        model = _chunk_model(tokens[:, 1], tokens[:, 2], group, num_kv_heads, num_sms)
    return WS_BLOCK_M if model[0] >= WS_TILE_KEYS * ws_model[0] else BLOCK_M


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, .., c - 1 for each count c, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _work_cost(chunks: np.ndarray, work: np.ndarray, group: int, block_m: int = BLOCK_M) -> np.ndarray:
    """Relative run time of each work item (chunk, row tile), for launching the longest first (so
    the last wave holds short CTAs, not one long straggler): KV tiles x (a tile's loads, ~32 keys'
    worth, + the keys each warp computes: 64 / warps_n, warps_n = 4 / warps_m)."""
    keys = chunks[work[:, 0], 1] - chunks[work[:, 0], 0]
    rows = np.minimum(block_m, (chunks[work[:, 0], 3] - chunks[work[:, 0], 2]) * group - block_m * work[:, 1])
    if block_m in WS_CONSUMERS:  # each consumer takes 64 rows, or all split the tiles of <= 64 rows
        # Split items last. On the long shared-prefix row they run longer per tile than wide ones
        # (HBM-bound), and launching them first cut its merge by 0.5 us, but it made 128-row plans
        # of DeFT's few-shot trees 17-27% slower (NOTES, session 18).
        return -(-keys // BLOCK_N) * np.where(rows <= 64, 1, 2)
    warps_m = np.where(rows <= 16, 1, np.where(rows <= 32, 2, 4))
    return -(-keys // BLOCK_N) * (32 + 16 * warps_m)


def _dense_slots(tokens: np.ndarray, chunks: np.ndarray, box_rows: int) -> np.ndarray:
    """Per chunk, the slot of its first key when the Hopper kernel may copy every tile by TMA with
    no records: whole 64-key tiles at consecutive slots from a multiple of ``box_rows``, every key
    seen by every query of the chunk and none masked; else -1. (The chunks tile the token list.)"""
    if len(chunks) == 0:
        return np.zeros(0, dtype=np.int64)
    b, e = chunks[:, 0], chunks[:, 1]
    chunk_of = np.repeat(np.arange(len(chunks)), e - b)
    odd = ((tokens[:, 1] != chunks[chunk_of, 2]) | (tokens[:, 2] != chunks[chunk_of, 3]) | (tokens[:, 3] >= 0)
           | np.concatenate([[False], np.diff(tokens[:, 0]) != 1]) & (np.arange(len(tokens)) != b[chunk_of]))
    counts = np.concatenate([[0], np.cumsum(odd)])
    first = tokens[b, 0]
    ok = (counts[e] == counts[b]) & ((e - b) % BLOCK_N == 0) & (first % box_rows == 0)
    return np.where(ok, first, -1)


def _leaf_counts(leaves, queries_per_leaf) -> list[int]:
    if isinstance(queries_per_leaf, int):
        counts = [queries_per_leaf] * len(leaves)
    elif isinstance(queries_per_leaf, dict):
        unknown = set(queries_per_leaf) - set(leaves)
        if unknown:
            raise ValueError(f"queries_per_leaf: expected keys among the leaves {leaves}, got {sorted(unknown)}")
        counts = [queries_per_leaf.get(leaf, 1) for leaf in leaves]
    else:
        counts = [int(x) for x in queries_per_leaf]
        if len(counts) != len(leaves):
            raise ValueError(f"queries_per_leaf: expected {len(leaves)} counts (one per leaf), got {len(counts)}")
    for leaf, n in zip(leaves, counts):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"queries_per_leaf: expected ints >= 0, got {n!r} for leaf {leaf}")
    return counts


def _tail_mask(leaf, n, tail_masks) -> np.ndarray | None:
    given = None if tail_masks is None else tail_masks.get(leaf)
    if given is None:
        return None if n <= 1 else np.tril(np.ones((n, n), dtype=bool))
    m = np.asarray(torch.as_tensor(given).cpu().bool().numpy())
    if m.shape != (n, n):
        raise ValueError(f"tail_masks[{leaf}]: expected shape [{n}, {n}] (the leaf's query count), got {list(m.shape)}")
    if not m.diagonal().all():
        raise ValueError(f"tail_masks[{leaf}]: expected every query to see itself, got a False diagonal "
                         f"at row {int(np.argmin(m.diagonal()))}")
    return m


def deft_plan(cache: TreeKVCache, num_qo_heads: int, *, queries_per_leaf=1, tail_masks=None,
              device=None, num_sms: int | None = None, chunk_len: int | None = None,
              block_m: int | None = None) -> DeftPlan:
    """Plan one decoding step over ``cache``'s current tree.

    Args:
        cache: the tree; its leaves, in DFS order (``cache.leaves()``), own the query rows.
        num_qo_heads: H, a multiple of the cache's Hkv.
        queries_per_leaf: n_i query tokens per leaf, the last n_i tokens of the leaf's node: an int
            for all leaves, a sequence in leaf order, or a dict {leaf: n} (missing leaves: 1). 0 is
            allowed (that leaf's own tokens are then left out). Q = sum n_i.
        tail_masks: optional {leaf: bool [n_i, n_i]} among a leaf's query tokens (True = may attend,
            the diagonal must be True); default causal.
        device: where ``meta`` goes (default: the cache's device).
        num_sms: for the chunk length; default the device's SM count (132 for a CPU plan).
        chunk_len: force a chunk length in tokens (a multiple of 64).
        block_m: rows per work item, which fixes the stage-1 kernel: 128 (the warp-specialised
            sm_90a kernel; the default on compute capability 9.0 unless FLASHTREE_WGMMA=0) or 64
            (the 64-row kernels; the default elsewhere). 192 (opt-in, compute capability 9.0):
            the warp-specialised kernel with three consumer warpgroups, ~13% less time per row on
            wide tiles, for trees whose wide chunks have a multiple of 192 rows or a little more
            (H200, NOTES session 18: DeFT's few-shot width 50, 200 rows, 48.0-48.1 us against
            52.8 with the plan's 64-row items); a remainder of 64 rows runs as a split item bound
            by its tile copies, so 256-row chunks are slower with it (the long shared-prefix row:
            71.0-72.6 us against 62.5 with 128).
    """
    if not isinstance(cache, TreeKVCache):
        raise TypeError(f"cache: expected a flashtree.kvcache.TreeKVCache, got {type(cache).__name__}")
    hkv = cache.num_kv_heads
    if not isinstance(num_qo_heads, int) or num_qo_heads < 1 or num_qo_heads % hkv:
        raise ValueError(f"num_qo_heads: expected a positive multiple of Hkv = {hkv}, got {num_qo_heads!r}")
    group = num_qo_heads // hkv
    device = torch.device(device) if device is not None else cache.k_pools[0].device
    if block_m is not None and block_m not in (BLOCK_M, WS_BLOCK_M, WS3_BLOCK_M):
        raise ValueError(f"block_m: expected {BLOCK_M}, {WS_BLOCK_M} or {WS3_BLOCK_M}, got {block_m!r}")
    leaves = cache.leaves()
    if not leaves:
        raise ValueError("cache: expected a tree with a root, got an empty cache")
    counts = _leaf_counts(leaves, queries_per_leaf)
    if tail_masks is not None and not isinstance(tail_masks, dict):
        raise TypeError(f"tail_masks: expected a dict {{leaf: bool [n, n]}} or None, got {type(tail_masks).__name__}")

    # Step 1: query rows per leaf, and each node's range [lo, hi) of query rows (post-order).
    leaf_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    q_range: dict[int, tuple[int, int]] = {}
    order = cache.nodes()
    leaf_index = {leaf: i for i, leaf in enumerate(leaves)}
    for node in reversed(order):
        kids = cache.children(node)
        if not kids:
            i = leaf_index[node]
            q_range[node] = (int(leaf_off[i]), int(leaf_off[i + 1]))
        else:
            seen = [q_range[k] for k in kids if q_range[k][1] > q_range[k][0]]
            q_range[node] = (min(s[0] for s in seen), max(s[1] for s in seen)) if seen else (0, 0)

    # Step 2: token records in DFS order of nodes; a leaf's query tokens carry mask columns.
    leaf_masks = [_tail_mask(leaf, n, tail_masks) for leaf, n in zip(leaves, counts)]
    masks, mask_rows, mask_at = [], [], 0
    qmask_off = np.zeros(int(leaf_off[-1]), dtype=np.int64)
    parts = []
    for node in order:
        lo, hi = q_range[node]
        if hi <= lo or cache.node_length(node) == 0:
            continue
        slots = cache.node_slots(node)
        cols = np.full(len(slots), -1, dtype=np.int64)
        if node in leaf_index:
            i = leaf_index[node]
            n = counts[i]
            if n > len(slots):
                raise ValueError(f"queries_per_leaf: leaf {node} holds {len(slots)} tokens of its own, "
                                 f"fewer than its {n} query tokens")
            m = leaf_masks[i]
            if m is not None:
                cols[len(slots) - n:] = np.arange(n)
                qmask_off[lo:hi] = mask_at + n * np.arange(n)
                masks.append(m.reshape(-1))
                mask_at += n * n
        parts.append(np.stack([slots, np.full(len(slots), lo), np.full(len(slots), hi), cols], 1))
    tokens = np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)

    # Step 3: chunks and work items.
    if num_sms is None:
        num_sms = _num_sms(device)
    hopper = use_wgmma(device)
    # The two chunk models serve both the choice and the chosen kernel's chunk length (each run once).
    models = {}
    if block_m is None:
        if hopper:
            models = {WS_BLOCK_M: _ws_chunk_model(tokens[:, 1], tokens[:, 2], group, hkv, num_sms),
                      BLOCK_M: _chunk_model(tokens[:, 1], tokens[:, 2], group, hkv, num_sms)}
            block_m = _choose_block_m(tokens, group, hkv, num_sms, models[WS_BLOCK_M], models[BLOCK_M])
        else:
            block_m = BLOCK_M
    if chunk_len is None:
        if block_m in models:
            chunk_len = models[block_m][1]
        elif block_m in WS_CONSUMERS:
            chunk_len = ws_chunk_len(tokens[:, 1], tokens[:, 2], group, hkv, num_sms, block_m)
        else:
            chunk_len = choose_chunk_len(tokens[:, 1], tokens[:, 2], group, hkv, num_sms)
    elif not isinstance(chunk_len, int) or chunk_len < BLOCK_N or chunk_len % BLOCK_N:
        raise ValueError(f"chunk_len: expected a positive multiple of {BLOCK_N}, got {chunk_len!r}")
    total = len(tokens)
    starts = np.arange(0, total, chunk_len, dtype=np.int64)
    ends = np.minimum(starts + chunk_len, total)
    q0 = np.minimum.reduceat(tokens[:, 1], starts) if total else starts
    q1 = np.maximum.reduceat(tokens[:, 2], starts) if total else starts
    chunks = np.stack([starts, ends, q0, q1], 1)
    tiles = -(-((q1 - q0) * group) // block_m)
    work = np.stack([np.repeat(np.arange(len(chunks)), tiles),
                     np.concatenate([np.arange(t) for t in tiles]) if len(tiles) else np.zeros(0, np.int64)], 1)
    work = work[np.argsort(-_work_cost(chunks, work, group, block_m), kind="stable")]

    # Step 4: partial slots (chunk-major) and each query's list of them, in chunk order.
    widths = q1 - q0
    slot_base = np.concatenate([[0], np.cumsum(widths)[:-1]]) if len(widths) else np.zeros(0, np.int64)
    pair_q = np.concatenate([np.arange(a, b) for a, b in zip(q0, q1)]) if len(widths) else np.zeros(0, np.int64)
    pair_slot = np.arange(len(pair_q))
    by_q = np.argsort(pair_q, kind="stable")
    num_q = int(leaf_off[-1])
    q_indptr = np.concatenate([[0], np.cumsum(np.bincount(pair_q, minlength=num_q))])
    dense = _dense_slots(tokens, chunks, min(cache.page_size, BLOCK_N))
    work = np.concatenate([work, chunks[work[:, 0]], slot_base[work[:, 0], None], dense[work[:, 0], None]], 1)
    host = {
        "tokens": tokens, "chunks": chunks, "work": work, "slot_base": slot_base,
        "qmask_off": qmask_off, "mask": np.concatenate(masks).astype(np.int64) if masks else np.zeros(1, np.int64),
        "q_indptr": q_indptr, "slot_idx": pair_slot[by_q],
    }
    host = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in host.items()}

    # Step 5: one int32 buffer, sections 16-byte aligned, one copy to the device.
    offsets, at = {}, 0
    for name in _SECTIONS:
        offsets[name] = at
        at += -(-host[name].size // 4) * 4
    flat = np.zeros(max(at, 4), dtype=np.int32)
    for name in _SECTIONS:
        flat[offsets[name]: offsets[name] + host[name].size] = host[name].reshape(-1)
    meta = torch.from_numpy(flat).to(device)
    return DeftPlan(
        num_queries=num_q, num_heads=num_qo_heads, num_kv_heads=hkv, head_dim=cache.head_dim,
        page_size=cache.page_size, num_pages=cache.num_pages, chunk_len=chunk_len, block_m=block_m, host=host,
        meta=meta, offsets=offsets, leaves=leaves, leaf_query_offsets=leaf_off,
        leaf_path_lengths=np.array([cache.path_length(leaf) for leaf in leaves], dtype=np.int64),
        tail_masks=leaf_masks,
        cache=cache, version=cache.version)


def _num_sms(device: torch.device) -> int:
    return _jit.num_sms(device) if device.type == "cuda" else DEFAULT_SMS


def workspace_shape(plan: DeftPlan) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Shapes of the workspaces: mid_o [num_slots, H, D] (q's dtype) and mid_lse [num_slots, H] (fp32)."""
    return (plan.num_slots, plan.num_heads, plan.head_dim), (plan.num_slots, plan.num_heads)


def _plan_workspace(plan: DeftPlan, device: torch.device, capturing: bool) -> tuple[int, int]:
    """(mid_o, mid_lse) pointers in the plan's own workspace for the current stream: one flat
    buffer (mid_o in 16 bits, then mid_lse in fp32), allocated on the plan's first call on that
    stream and reused by every later one (the layers of a decoding step run in stream order, so
    they never overlap). A CUDA-graph capture (``capturing``) takes a buffer of its own from the
    graph's pool instead, so no replay shares it with an eager call."""
    n_o = plan.num_slots * plan.num_heads * plan.head_dim  # 16-bit values: n_o // 2 floats of the buffer
    n_l = plan.num_slots * plan.num_heads
    if capturing:
        buf = torch.empty(n_o // 2 + n_l, dtype=torch.float32, device=device)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, _jit.current_stream(index))
        buf = plan._workspaces.get(key)
        if buf is None:
            buf = plan._workspaces[key] = torch.empty(n_o // 2 + n_l, dtype=torch.float32, device=device)
    base = buf.data_ptr()
    return base, base + 2 * n_o  # mid_o [num_slots, H, D] then mid_lse [num_slots, H]; n_o * 2 % 16 == 0


# ------------------------------------------------------------------------------ the op


_LOG2E = math.log2(math.e)
# deft_partial_kernel: q (pointer, 2 strides), k and v pools (pointer, page stride, int32 head and row
# strides each), log2 page,
# six plan arrays, mid_o, mid_lse, num_heads, group, the base-2 scale.
_PARTIAL_PARAMS = _jit.param_layout("Qqq Qqii Qqii i QQQQQQ QQ ii f")
# deft_partial_ws_kernel: the K and V pools' tensor maps, the TMA box's rows, then as deft_partial_kernel.
_WS_TAIL = _jit.param_layout("i Qqq Qqii Qqii i QQQQQQ QQ ii f")
# deft_merge_kernel: mid_o, mid_lse, q_indptr, slot_idx, out (pointer, 2 strides), lse, Q, H.
_MERGE_PARAMS = _jit.param_layout("QQQQ Qqq Q ii")
_MAPS_PER_ENTRY = 1024  # (k_pool, v_pool) pairs whose tensor maps a validated signature keeps

@dataclass(frozen=True)
class _Validated:
    """What a validated call signature fixes: the scale, the two loaded kernels (and stage 1's
    shared memory), and whether the q/k/v row strides are 16-byte multiples (then only the data
    pointers need checking per call)."""

    scale: float
    partial: _jit.runtime.LoadedKernel
    partial_smem: int
    partial_threads: int
    ws: bool  # the warp-specialised kernel (TMA tensor maps before its other parameters)
    merge: _jit.runtime.LoadedKernel
    strides_aligned: bool
    # ws: (k_pool, v_pool) data pointers -> stage 1's packed tensor maps. Within one signature the
    # pools' shape, strides and dtype are fixed, so the pointers name the maps (one pair per layer).
    maps: dict = field(default_factory=dict, compare=False, repr=False)


def _validated_entry(q, k_pool, v_pool, scale, block_m) -> _Validated:
    d = q.shape[2]
    if block_m in WS_CONSUMERS:
        nc = WS_CONSUMERS[block_m]
        partial = (_jit.get_kernel(ws_spec(q.dtype, d, nc), q.device), _ws_smem_bytes(d, block_m), 128 * (nc + 1), True)
    else:
        wgmma = use_wgmma(q.device)
        partial = (_jit.get_kernel(spec(q.dtype, d, wgmma), q.device), _smem_bytes(d, wgmma), 128, False)
    return _Validated(scale, *partial,
                      _jit.get_kernel(merge_spec(q.dtype, d), q.device),
                      all(_checks.strides16(x, range(x.dim() - 1)) for x in (q, k_pool, v_pool)))


def _launch_partial(q, k_pool, v_pool, plan, entry: _Validated, mid_o: int, mid_lse: int):
    """Stage 1 on the current stream: every (work item, KV head) into the workspace (mid_o, mid_lse
    pointers)."""
    layout, maps = _PARTIAL_PARAMS, ()
    if entry.ws:
        # K/V tiles at consecutive slots go by TMA: the pool [pages, Hkv, P, D] as a 4-D tensor map,
        # one box = 64 keys (min(P, 64) rows of 64 // min(P, 64) consecutive pages) x 64 columns
        layout = tma.param_layout(entry.partial, 2, _WS_TAIL)
        key = (k_pool.data_ptr(), v_pool.data_ptr())
        maps = entry.maps.get(key)
        if maps is None:
            rows = min(plan.page_size, BLOCK_N)
            box = (64, rows, 1, BLOCK_N // rows)
            maps = (tma.swizzled_map(k_pool, box), tma.swizzled_map(v_pool, box), rows)
            _checks.remember(entry.maps, key, maps, limit=_MAPS_PER_ENTRY)
    h = q.shape[1]
    entry.partial.launch(
        (plan.num_work * plan.num_kv_heads, 1, 1), (entry.partial_threads, 1, 1), layout,
        maps + (
            q.data_ptr(), *q.stride()[:2],
            k_pool.data_ptr(), *k_pool.stride()[:3],
            v_pool.data_ptr(), *v_pool.stride()[:3],
            *plan.kernel_args, mid_o, mid_lse, h, h // plan.num_kv_heads, entry.scale * _LOG2E,
        ),
        smem=entry.partial_smem,
    )


def _launch_merge(plan, entry: _Validated, mid_o: int, mid_lse: int, out, lse: int, capturing: bool):
    """Stage 2 on the current stream: each query row merges its partials into out (and lse, a data
    pointer; 0: not stored). A dependent launch only while a CUDA graph is captured (the module
    docstring says why)."""
    nq, h, d = out.shape
    rows_per_block = _MERGE_THREADS // (d // 4)
    at = plan.addresses
    entry.merge.launch(
        ((nq * h + rows_per_block - 1) // rows_per_block, 1, 1), (_MERGE_THREADS, 1, 1), _MERGE_PARAMS,
        (mid_o, mid_lse, at["q_indptr"], at["slot_idx"], out.data_ptr(), *out.stride()[:2], lse, nq, h),
        dependent=_PDL and capturing,  # starts during stage 1's last stores; waits for them (deft.cu: pdl_wait)
    )


def _check(q, k_pool, v_pool, plan, out, workspace):
    _checks.is_tensor("q", q)
    _checks.is_tensor("k_pool", k_pool)
    _checks.is_tensor("v_pool", v_pool)
    if not isinstance(plan, DeftPlan):
        raise TypeError(f"plan: expected a DeftPlan (from deft_plan), got {type(plan).__name__}")
    plan.check_fresh()
    _checks.ndim("q", q, 3, "[Q, H, D]")
    _checks.shape("q", q, (plan.num_queries, plan.num_heads, plan.head_dim),
                  "[Q, H, D] (Q = the plan's query rows, H = its num_qo_heads)")
    layout = "[num_pages, Hkv, P, D] (the plan's cache pools)"
    pool_shape = (plan.num_pages, plan.num_kv_heads, plan.page_size, plan.head_dim)
    _checks.ndim("k_pool", k_pool, 4, layout)
    _checks.shape("k_pool", k_pool, pool_shape, layout)
    _checks.shape("v_pool", v_pool, pool_shape, layout)
    _checks.same_dtype("k_pool", k_pool, "q", q)
    _checks.same_dtype("v_pool", v_pool, "q", q)
    for name, x in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        _checks.last_dim_contiguous(name, x)
    for name, x in (("k_pool", k_pool), ("v_pool", v_pool)):
        if max(x.stride()[1:3]) >= 2**31:
            raise ValueError(f"{name}: expected head and row strides below 2**31 elements, got strides {x.stride()}")
    _checks.same_device(q=q, k_pool=k_pool, v_pool=v_pool, plan=plan.meta)
    if plan.block_m in WS_CONSUMERS and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) != (9, 0):
        raise ValueError(f"plan: block_m {plan.block_m} runs the sm_90a kernel and needs compute capability 9.0, got "
                         f"{torch.cuda.get_device_capability(q.device)}; plan with block_m={BLOCK_M}")
    if q.device.type == "cuda":
        _checks.dtype_in("q", q, DTYPES)
        _checks.one_of("q.shape[2] (head_dim)", q.shape[2], HEAD_DIMS)
    else:
        _checks.dtype_in("q", q, DTYPES + (torch.float32, torch.float64))
    if out is not None:
        _checks.writable_output("out", out, tuple(q.shape), q.dtype, q.device)
    if workspace is not None:
        if not isinstance(workspace, (tuple, list)) or len(workspace) != 2:
            raise TypeError(f"workspace: expected a pair (mid_o, mid_lse), got {type(workspace).__name__}")
        for name, x, shp in zip(("workspace[0]", "workspace[1]"), workspace, workspace_shape(plan)):
            _checks.is_tensor(name, x)
            _checks.shape(name, x, shp, "(workspace_shape(plan))")
        _check_workspace_buffers(workspace, q)


def _check_workspace_buffers(workspace, q) -> None:
    """A caller's (mid_o, mid_lse): mid_o in q's dtype, mid_lse in fp32, both on q's device,
    contiguous and 16-byte aligned (checked on every call: the signature does not vouch for them)."""
    for name, x, dtype in (("workspace[0]", workspace[0], q.dtype), ("workspace[1]", workspace[1], torch.float32)):
        _checks.workspace_buffer(name, x, q.device, dtype)


def deft_attention(q, k_pool, v_pool, plan: DeftPlan, *, sm_scale=None, out=None, workspace=None,
                   return_lse=False):
    """Tree decoding attention: query row q (a query token of leaf i) attends every token on leaf
    i's root-to-leaf path, its own leaf's query tokens only as the leaf's tail mask allows.

    Args:
        q: [Q, H, D] fp16 or bf16 (CPU: also fp32/fp64, through ``reference.deft_attention``);
            rows in the plan's order (leaves in DFS order, n_i rows each). D in {64, 128}.
        k_pool, v_pool: one layer's pools [num_pages, Hkv, P, D] of the planned cache, q's dtype.
        plan: from ``deft_plan`` for the cache's current tree (checked: a stale plan raises).
        sm_scale: default 1 / sqrt(D).
        out: optional [Q, H, D] in q's dtype, written in place.
        workspace: optional (mid_o in q's dtype, mid_lse fp32) of ``workspace_shape(plan)``; by default the
            plan's own (one per stream, kept as long as the plan). With ``out`` given nothing is
            allocated but the lse when ``return_lse``.
        return_lse: also return lse [Q, H] fp32 (natural log).

    Returns:
        out [Q, H, D] (and lse). Bitwise deterministic: stage 2 merges in a fixed order.
    """
    signature = _signature(q, k_pool, v_pool, plan, sm_scale, out, workspace)
    entry = _validated.get(signature) if signature is not None else None
    if entry is not None:  # seen and checked: freshness and alignment
        plan.check_fresh()
        if workspace is not None:
            _check_workspace_buffers(workspace, q)
        return _run(q, k_pool, v_pool, q, plan, entry, out, workspace, return_lse)
    q_t, k_t, v_t = (_interop.as_tensor(n, x) for n, x in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)))
    _check(q_t, k_t, v_t, plan, out, workspace)
    scale = _checks.softmax_scale("sm_scale", sm_scale, q_t.shape[2])
    if q_t.device.type != "cuda":
        o, lse = reference.deft_attention(q_t, k_t, v_t, plan.leaf_slots, np.diff(plan.leaf_query_offsets).tolist(),
                                          plan.tail_masks, scale)
        if out is not None:
            out.copy_(o)
            o = out
        return (o, lse) if return_lse else o
    entry = _validated_entry(q_t, k_t, v_t, scale, plan.block_m)
    if signature is not None:
        _checks.remember(_validated, signature, entry)
    return _run(q_t, k_t, v_t, q, plan, entry, out, workspace, return_lse)


# Validated CUDA calls, by signature: (shape, strides, dtype, device) of every tensor, the plan's
# shape fields and the options. A call whose signature was seen skips _check (it depends on nothing
# else); the plan's freshness and the data-pointer alignment are checked on every call.
_validated: dict[tuple, _Validated] = {}


def _signature(q, k_pool, v_pool, plan, sm_scale, out, workspace) -> tuple | None:
    if not isinstance(plan, DeftPlan):
        return None
    tensors = (q, k_pool, v_pool, out, *(workspace if isinstance(workspace, (tuple, list)) else (workspace,)))
    return _checks.call_signature(tensors, (len(tensors), plan.num_queries, plan.num_heads, plan.head_dim,
                                            plan.num_pages, plan.num_kv_heads, plan.page_size,
                                            plan.meta.get_device(), plan.block_m, sm_scale, type(sm_scale)))


def _run(q_t, k_t, v_t, q, plan, entry: _Validated, out, workspace, return_lse):
    """The CUDA call on validated arguments (q: the caller's array, for CuPy in, CuPy out). Stage 1
    is launched first, so the output's allocation and stage 2's arguments are host work done while
    it runs (H200, session 16: the first launch ~6 us earlier in an eager call; the whole call's
    host time, ~28 us, moved within noise)."""
    capturing = torch.cuda.is_current_stream_capturing()
    if workspace is None:
        mid_o, mid_lse = _plan_workspace(plan, q_t.device, capturing)
    else:
        mid_o, mid_lse = workspace[0].data_ptr(), workspace[1].data_ptr()
    if not entry.strides_aligned or (q_t.data_ptr() | k_t.data_ptr() | v_t.data_ptr()) & 15:
        q_t, k_t, v_t = (_checks.aligned_rows(x) for x in (q_t, k_t, v_t))  # a misaligned view is copied once
    run = plan.num_work > 0 and q_t.shape[0] > 0
    if run:
        _launch_partial(q_t, k_t, v_t, plan, entry, mid_o, mid_lse)
    # empty_like: ~4 us less host time than torch.empty with dtype= and device= (H100 host, session 23)
    result = out if out is not None else torch.empty_like(q_t, memory_format=torch.contiguous_format)
    # stage 2 stores 4 elements (8 bytes) per thread: rows must be 8-byte aligned
    direct = result.data_ptr() % 8 == 0 and result.stride(0) % 4 == 0 and result.stride(1) % 4 == 0
    target = result if direct else torch.empty(q_t.shape, dtype=q_t.dtype, device=q_t.device)
    lse = torch.empty(plan.num_queries, plan.num_heads, dtype=torch.float32, device=q_t.device) if return_lse else None
    if run:
        _launch_merge(plan, entry, mid_o, mid_lse, target, 0 if lse is None else lse.data_ptr(), capturing)
    if target is not result:
        result.copy_(target)
    result = _interop.like(q, result)
    return (result, _interop.like(q, lse)) if return_lse else result


def emulate_plan(q, k_pool, v_pool, plan: DeftPlan, sm_scale=None):
    """The plan's own arithmetic in float64 on any device: stage 1 per chunk (with the kernel's
    visibility rule), stage 2 through the CSR lists. Equal to ``reference.deft_attention`` iff the
    plan is right; tests use it to check plans without a GPU. Returns (o, lse) float64."""
    nq, h, d = q.shape
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    hkv, p = plan.num_kv_heads, plan.page_size
    g = h // hkv
    tok, ch = plan.host["tokens"].astype(np.int64), plan.host["chunks"].astype(np.int64)
    mask, qmo = plan.host["mask"].astype(bool), plan.host["qmask_off"].astype(np.int64)
    mid_o = torch.full((plan.num_slots, h, d), float("nan"), dtype=torch.float64)
    mid_lse = torch.full((plan.num_slots, h), float("nan"), dtype=torch.float64)
    for c, (b, e, q0, q1) in enumerate(ch):
        t = tok[b:e]
        slots = torch.as_tensor(t[:, 0])
        k = k_pool[slots // p, :, slots % p].transpose(0, 1).repeat_interleave(g, 0)  # [H, L, D]
        v = v_pool[slots // p, :, slots % p].transpose(0, 1).repeat_interleave(g, 0)
        qs = np.arange(q0, q1)
        allowed = (t[None, :, 1] <= qs[:, None]) & (qs[:, None] < t[None, :, 2])
        cols = t[:, 3]
        masked = cols[None, :] >= 0
        lookup = mask[np.clip(qmo[qs][:, None] + cols[None, :], 0, len(mask) - 1)]
        allowed &= ~masked | lookup
        o, lse = reference.attention_state(q[q0:q1].transpose(0, 1), k, v, torch.as_tensor(allowed), scale)
        base = int(plan.host["slot_base"][c])
        mid_o[base: base + q1 - q0] = o.transpose(0, 1).cpu()
        mid_lse[base: base + q1 - q0] = lse.transpose(0, 1).cpu()
    o_out = torch.zeros(nq, h, d, dtype=torch.float64)
    lse_out = torch.full((nq, h), float("-inf"), dtype=torch.float64)
    ind, idx = plan.host["q_indptr"], plan.host["slot_idx"]
    for qi in range(nq):
        s = torch.as_tensor(idx[ind[qi]: ind[qi + 1]].astype(np.int64))
        if len(s):
            o, lse = reference.merge_states(mid_o[s][None], mid_lse[s][None])
            o_out[qi], lse_out[qi] = o[0], lse[0]
    return o_out, lse_out
