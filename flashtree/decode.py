"""Tree-verification decode: split-KV flash decoding with a tree mask, padded or paged cache.

Layers: the kernel launches (`_launch`), one registered torch op that writes into preallocated
buffers (CUDA-graph and torch.compile friendly), and the two public functions.

Split heuristic (``plan_splits``), worked example on an H100 (132 SMs), bf16, D = 128,
block_size = 64: B = 1, Hkv = 8, T = 64 tree tokens, G = 4 (M = G * T = 256 query rows per KV
head, 4 row tiles of 64), C = 32768.
  * Without splitting there are B * Hkv * row_tiles = 32 CTAs: a quarter of the 264 CTA slots
    (2 CTAs of 80 KB shared memory fit per SM).
  * With s splits there are 32 s CTAs in ceil(32 s / 264) waves; the wave efficiency
    32 s / (waves * 264) is 97% at s = 8, so each CTA reads 32768 / 8 = 4096 keys.
  * We take the smallest s within 10% of the best efficiency for s up to the number of
    block_size tiles (more splits only add partial states to merge), i.e. s = 8 here.
The tree tokens join the last non-empty split of each sequence as extra tiles (read from
current_k/current_v under the mask). With one split the kernel writes the output itself; with
more, the S partial states are merged exactly by the merge kernel (log-sum-exp).
"""
from __future__ import annotations

import functools
import math
import weakref

import numpy as np
import torch

from . import _checks, _interop, _jit, merge, reference

BLOCK_SIZES = (16, 32, 64, 128, 256)
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
PAGE_SIZES = (8, 16, 32, 64, 128, 256)
MAX_TREE_TOKENS = 256
_ROWS_PER_M_TILE = 64  # query rows per CTA and 16-row block per warp (DecodeConfig::kBlockM = 64 * M_TILES)
_SMEM_LIMIT = 227 * 1024
_TWO_CTA_SMEM = 113 * 1024  # two CTAs per SM on sm_90 (228 KB, 1 KB reserved per CTA); sm_80 has 164 KB


# head_dim 256 keeps 128 fp32 accumulators per thread; these tile lengths spill registers there.
_UNSUPPORTED = {(256, 32), (256, 256)}


@functools.lru_cache(maxsize=None)
def _stages_and_smem(head_dim: int, block_size: int, m_tiles: int = 1) -> tuple[int, int] | None:
    """Pipeline depth and dynamic shared memory (bytes); None for an unsupported combination."""
    if (head_dim, block_size) in _UNSUPPORTED or (m_tiles > 1 and (head_dim > 128 or block_size < 64)):
        return None  # two 16-row blocks per warp: D <= 128 (2 x D / 2 accumulators), tiles >= 64 keys
    def smem(stages):
        return 2 * (_ROWS_PER_M_TILE * m_tiles * head_dim + stages * 2 * block_size * head_dim)

    # Deepest pipeline (up to 4 stages) with which two CTAs still share an SM; else whatever fits.
    for stages in (4, 3, 2):
        if smem(stages) <= _TWO_CTA_SMEM:
            return stages, smem(stages)
    for stages in (2, 1):
        if smem(stages) <= _SMEM_LIMIT:
            return stages, smem(stages)
    return None


def warp_n(head_dim: int, block_size: int, m_tiles: int = 1) -> int:
    """Keys per softmax step in the kernel (DecodeConfig::kWarpN before capping by the tile).

    64 halves the rescales of O and doubles the independent accumulators but leaves no registers
    for Q fragments (Q is then re-read from shared memory); D = 256 has no registers to spare.
    ``_WARP_N_OVERRIDE`` selects a variant for exploration (benchmarks/diag.py, notebooks).
    """
    if _WARP_N_OVERRIDE is not None:
        return _WARP_N_OVERRIDE
    return _DEFAULT_WARP_N[m_tiles] if head_dim <= 128 else 32


_DEFAULT_WARP_N = {1: 64, 2: 32}  # per 16-row blocks per warp: what fits in 255 registers unspilled
_WARP_N_OVERRIDE: int | None = None
_M_TILES_OVERRIDE: int | None = None


def m_tiles(rows: int, head_dim: int, block_size: int) -> int:
    """16-row blocks per warp. 1 everywhere: on an H200 (benchmarks/NOTES.md, session 3) two blocks
    per warp (128 query rows per CTA, each K/V fragment feeding two mma chains) lost 1-7% on the
    padded T = 64 rows (only two pipeline stages fit) and won 2% on paged ones once the paged
    loader had its own address paths. ``_M_TILES_OVERRIDE = 2`` selects it for exploration (not
    shipped: compiled on first use)."""
    if _M_TILES_OVERRIDE is not None and rows > _ROWS_PER_M_TILE and \
            _stages_and_smem(head_dim, block_size, _M_TILES_OVERRIDE) is not None:
        return _M_TILES_OVERRIDE
    return 1


def spec(dtype: torch.dtype, head_dim: int, block_size: int, paged: bool, warp: int | None = None,
         tiles: int = 1) -> _jit.KernelSpec:
    return _spec(dtype, head_dim, block_size, paged, warp or warp_n(head_dim, block_size, tiles), tiles)


@functools.lru_cache(maxsize=None)  # called on every launch: build each spec once
def _spec(dtype: torch.dtype, head_dim: int, block_size: int, paged: bool, warp: int, tiles: int) -> _jit.KernelSpec:
    stages, _ = _stages_and_smem(head_dim, block_size, tiles)
    default_warp = warp == (_DEFAULT_WARP_N[tiles] if head_dim <= 128 else 32)
    variant = ("" if tiles == 1 else f"_m{64 * tiles}") + ("" if default_warp else f"_w{warp}")
    return _jit.KernelSpec(
        family="decode",
        kernel="ft::tree_decode_kernel",
        template_args=(_jit.ctype(dtype), head_dim, block_size, stages, warp, "true" if paged else "false", tiles),
        name=f"decode_{'paged_' if paged else ''}{_jit.short(dtype)}_d{head_dim}_b{block_size}{variant}",
    )


def _shipped():
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            yield merge.spec(torch.float32, d, dtype)  # the combine step
            for bs in BLOCK_SIZES:
                if _stages_and_smem(d, bs) is not None:
                    for paged in (False, True):
                        yield spec(dtype, d, bs, paged)


_jit.register_shipped("decode", _shipped)


# ---------------------------------------------------------------------------------- planning


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def plan_splits(batch: int, num_kv_heads: int, rows: int, max_len: int, block_size: int,
                num_sms: int, ctas_per_sm: int, max_splits: int | None = None,
                block_m: int = _ROWS_PER_M_TILE) -> tuple[int, int]:
    """(num_splits, split_len) for the cache part; see the module docstring for a worked example.
    ``block_m`` is the kernel's query rows per CTA."""
    if max_len <= 0:
        return 0, block_size
    base = batch * num_kv_heads * math.ceil(rows / block_m)
    slots = max(1, num_sms * ctas_per_sm)
    limit = math.ceil(max_len / block_size)
    if max_splits is not None:
        limit = min(limit, max_splits)
    limit = max(1, min(limit, 128))

    def efficiency(s):
        ctas = base * s
        return ctas / (math.ceil(ctas / slots) * slots)

    best = max(efficiency(s) for s in range(1, limit + 1))
    splits = next(s for s in range(1, limit + 1) if efficiency(s) >= 0.9 * best)
    split_len = math.ceil(math.ceil(max_len / splits) / block_size) * block_size
    return math.ceil(max_len / split_len), split_len


def workspace_shape(q_shape, num_splits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of mid_output [B, H, T, S, D] and mid_output_lse [B, H, T, S] (fp32): one partial
    state per split (the tree tokens join the last split of each sequence)."""
    b, h, t, d = q_shape
    return (b, h, t, num_splits, d), (b, h, t, num_splits)


# ------------------------------------------------------------------------------------ masks

_checked_masks: dict[int, int] = {}


def _mask_as_bytes(mask: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """The tree mask as uint8 [1 or B, T, T] with True/nonzero = may attend (zero-copy for bool)."""
    _checks.is_tensor("mask", mask)
    if mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != (t, t) or (mask.dim() == 3 and mask.shape[0] != b):
        raise ValueError(f"mask: expected shape [{t}, {t}] or [{b}, {t}, {t}] (T = q.shape[2]), got {list(mask.shape)}")
    # Bool -> uint8 is a zero-copy view in eager mode; Inductor cannot lower a dtype view of bool,
    # so traced code converts instead (one tiny kernel inside the compiled graph).
    as_bytes = (lambda x: x.to(torch.uint8)) if torch.compiler.is_compiling() else (lambda x: x.view(torch.uint8))
    if mask.dtype == torch.bool:
        allowed = as_bytes(mask)
    elif mask.dtype.is_floating_point:  # additive mask: 0 = attend, -inf = blocked
        allowed = as_bytes(mask == 0)
    elif mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        allowed = as_bytes(mask != 0)
    else:
        raise TypeError(f"mask: expected dtype bool, an integer or a floating dtype, got {mask.dtype}")
    return allowed if allowed.dim() == 3 else allowed.unsqueeze(0)


def _check_diagonal(mask: torch.Tensor, allowed: torch.Tensor) -> None:
    """Every row must allow its own token. On a GPU mask this costs one host sync the first time a
    given mask tensor (same object, same version) is seen; it is skipped during graph capture and
    tracing, where the caller's earlier eager calls have checked it."""
    if torch.compiler.is_compiling():
        return
    if allowed.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return
        key = id(mask)
        if _checked_masks.get(key) == mask._version:
            return
    diag = allowed.diagonal(dim1=-2, dim2=-1)  # [1 or B, T]
    bad = (diag == 0).nonzero()
    if bad.numel():
        bi, row = bad[0].tolist()
        where = f"mask[{bi}, {row}, {row}]" if mask.dim() == 3 else f"mask[{row}, {row}]"
        raise ValueError(f"mask: expected every row to allow its own token, got {where} = blocked")
    if allowed.device.type == "cuda":
        _checked_masks[key] = mask._version
        weakref.finalize(mask, _checked_masks.pop, key, None)


# --------------------------------------------------------------------------------- the op


# tree_decode_kernel's parameters (kernels_cu/decode.cu): q, k cache, v cache (pointer + 3 strides
# each), block table (pointer, stride, log2 page), current k and v, mask (pointer + 3 strides),
# kv_len, mid_o, mid_lse and their state stride, out (pointer + 3 strides), lse_out, five int32
# sizes and the base-2 scale.
_PARAMS = _jit.param_layout("Qqqq Qqqq Qqqq Qqi Qqqq Qqqq Qqqq Q QQi Qqqq Q iiiii f")
_LOG2E = math.log2(math.e)


def _launch(q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
            mid_o, mid_lse, output, lse, block_size, num_splits, split_len, log2_page, sm_scale):
    bsz, h, t, d = q.shape
    hkv = current_k.shape[1]
    paged = block_tables is not None
    q, k_cache, v_cache, current_k, current_v = map(_checks.aligned_rows, (q, k_cache, v_cache, current_k, current_v))
    rows = h // hkv * t
    tiles = m_tiles(rows, d, block_size)
    kernel = _jit.get_kernel(spec(q.dtype, d, block_size, paged, tiles=tiles), q.device)
    _, smem = _stages_and_smem(d, block_size, tiles)
    block_m = _ROWS_PER_M_TILE * tiles
    # One split (or an empty cache) writes the output directly; more go through the merge.
    direct = num_splits <= 1
    grid = ((rows + block_m - 1) // block_m, max(num_splits, 1), bsz * hkv)
    ms = mask_u8.stride()
    kernel.launch(
        grid, (128, 1, 1), _PARAMS,
        (
            q.data_ptr(), *q.stride()[:3],
            k_cache.data_ptr(), *k_cache.stride()[:3],
            v_cache.data_ptr(), *v_cache.stride()[:3],
            block_tables.data_ptr() if paged else 0, block_tables.stride(0) if paged else 0, log2_page,
            current_k.data_ptr(), *current_k.stride()[:3],
            current_v.data_ptr(), *current_v.stride()[:3],
            mask_u8.data_ptr(), ms[0] if mask_u8.shape[0] > 1 else 0, ms[1], ms[2],
            kv_seq_len.data_ptr(),
            0 if direct else mid_o.data_ptr(), 0 if direct else mid_lse.data_ptr(), 0 if direct else mid_o.shape[3],
            output.data_ptr(), *output.stride()[:3], lse.data_ptr(),
            h, h // hkv, t, max(num_splits, 1), split_len if num_splits else 0,
            sm_scale * _LOG2E,
        ),
        smem=smem,
    )
    if direct:
        return
    # Combine: the states of row (b, h, t) are mid_o[b, h, t, :S] (contiguous workspace), read
    # as [N = B * H, S, T, D] -> output [B * H, T, D] (contiguous).
    s_total = mid_o.shape[3]
    merge.launch_raw(
        q.device, torch.float32, q.dtype, (bsz * h, num_splits, t, d),
        mid_o.data_ptr(), (t * s_total * d, d, s_total * d),
        mid_lse.data_ptr(), (t * s_total, 1, s_total),
        output.data_ptr(), (output.stride(1), output.stride(2)), lse.data_ptr(), (t, 1),
    )


def _tree_decode_impl(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor | None,
    current_k: torch.Tensor, current_v: torch.Tensor, mask_u8: torch.Tensor, kv_seq_len: torch.Tensor,
    mid_o: torch.Tensor | None, mid_lse: torch.Tensor | None, output: torch.Tensor, lse: torch.Tensor,
    block_size: int, num_splits: int, split_len: int, log2_page: int, sm_scale: float,
) -> None:
    if q.device.type == "cuda" and q.dtype in DTYPES:
        _launch(q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
                mid_o, mid_lse, output, lse, block_size, num_splits, split_len, log2_page, sm_scale)
        return
    if block_tables is not None:
        k_cache = reference.gather_pages(k_cache, block_tables, kv_seq_len)
        v_cache = reference.gather_pages(v_cache, block_tables, kv_seq_len)
    o, l = reference.tree_decode(q, k_cache, v_cache, current_k, current_v, mask_u8.bool(),
                                 kv_seq_len, sm_scale)
    output.copy_(o)
    lse.copy_(l)


_tree_decode_op = torch.library.custom_op(
    "flashtree::tree_decode", _tree_decode_impl, mutates_args=("mid_o", "mid_lse", "output", "lse"))


@_tree_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
      mid_o, mid_lse, output, lse, block_size, num_splits, split_len, log2_page, sm_scale):
    return None


# ---------------------------------------------------------------------------- validation


def _check_common(q, current_k, current_v, kv_seq_len, block_size, kv_group_num, kv_dtype):
    for name, x in (("q", q), ("current_k", current_k), ("current_v", current_v), ("kv_seq_len", kv_seq_len)):
        _checks.is_tensor(name, x)
    _checks.ndim("q", q, 4, "[B, H, T, D]")
    bsz, h, t, d = q.shape
    if q.device.type == "cuda":
        _checks.dtype_in("q", q, DTYPES)
        _checks.one_of("q.shape[3] (head_dim)", d, HEAD_DIMS)
        _checks.one_of("block_size", block_size, BLOCK_SIZES)
        if _stages_and_smem(d, block_size) is None:
            allowed = [bs for bs in BLOCK_SIZES if _stages_and_smem(d, bs) is not None]
            raise ValueError(f"block_size: expected one of {allowed} with head_dim {d}, got {block_size}")
    else:
        _checks.dtype_in("q", q, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        _checks.one_of("block_size", block_size, BLOCK_SIZES)
    if not 1 <= t <= MAX_TREE_TOKENS:
        raise ValueError(f"q: expected 1 <= T (q.shape[2]) <= {MAX_TREE_TOKENS}, got {t}")
    if not isinstance(kv_group_num, int) or kv_group_num < 1 or h % kv_group_num:
        raise ValueError(f"kv_group_num: expected a positive divisor of H = {h}, got {kv_group_num!r}")
    hkv = h // kv_group_num
    _checks.shape("current_k", current_k, (bsz, hkv, t, d), "[B, H / kv_group_num, T, D]")
    _checks.shape("current_v", current_v, (bsz, hkv, t, d), "[B, H / kv_group_num, T, D]")
    for name, x in (("current_k", current_k), ("current_v", current_v)):
        _checks.same_dtype(name, x, "q", q)
    if kv_dtype != q.dtype:
        raise TypeError(f"k_cache: expected dtype {q.dtype} (the dtype of q), got {kv_dtype}")
    if kv_seq_len.dtype != torch.int32:
        raise TypeError(f"kv_seq_len: expected dtype int32, got {kv_seq_len.dtype}")
    _checks.shape("kv_seq_len", kv_seq_len, (bsz,), "[B]")
    for name, x in (("q", q), ("current_k", current_k), ("current_v", current_v)):
        _checks.last_dim_contiguous(name, x)
    return bsz, h, t, d, hkv


def _buffers(q, num_splits, output, mid_output, mid_output_lse, return_lse):
    bsz, h, t, d = q.shape
    if output is None:
        output = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        _checks.writable_output("output", output, (bsz, h, t, d), q.dtype, q.device)
    if mid_output is None and num_splits > 1:  # one split writes the output directly
        shape_o, shape_l = workspace_shape(q.shape, num_splits)
        mid_output = torch.empty(shape_o, dtype=torch.float32, device=q.device)
        mid_output_lse = torch.empty(shape_l, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, h, t, dtype=torch.float32, device=q.device)
    return output, mid_output, mid_output_lse, lse


def _check_workspace(q, mid_output, mid_output_lse):
    """User workspaces bound the number of splits: S_max = mid_output.shape[3]."""
    if mid_output is None and mid_output_lse is None:
        return None
    if mid_output is None or mid_output_lse is None:
        raise ValueError("mid_output, mid_output_lse: expected both or neither, got only one")
    bsz, h, t, d = q.shape
    _checks.is_tensor("mid_output", mid_output)
    _checks.ndim("mid_output", mid_output, 5, "[B, H, T, S_max, D]")
    _checks.shape("mid_output", mid_output, (bsz, h, t, None, d), "[B, H, T, S_max, D]")
    _checks.shape("mid_output_lse", mid_output_lse, (bsz, h, t, mid_output.shape[3]), "[B, H, T, S_max]")
    for name, x in (("mid_output", mid_output), ("mid_output_lse", mid_output_lse)):
        _checks.workspace_buffer(name, x, q.device)
    if mid_output.shape[3] < 1:
        raise ValueError(f"mid_output: expected shape[3] (S_max, the most splits) >= 1, got {mid_output.shape[3]}")
    return mid_output.shape[3]


def _plan(q, hkv, max_len, block_size, max_splits):
    if q.device.type != "cuda":
        return (1 if max_len > 0 else 0), max(block_size, max_len)
    props = _jit.device_properties(q.device.index if q.device.index is not None else torch.cuda.current_device())
    rows = q.shape[1] // hkv * q.shape[2]
    tiles = m_tiles(rows, q.shape[3], block_size)
    _, smem = _stages_and_smem(q.shape[3], block_size, tiles)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    ctas_per_sm = max(1, min(smem_per_sm // (smem + 1024), 2))  # launch bounds: 2 CTAs per SM
    return plan_splits(q.shape[0], hkv, rows, max_len, block_size, props.multi_processor_count,
                       ctas_per_sm, max_splits, block_m=_ROWS_PER_M_TILE * tiles)


def _run(q, k_cache, v_cache, block_tables, current_k, current_v, mask, kv_seq_len, capacity,
         block_size, max_seq_len_in_batch, output, mid_output, mid_output_lse, sm_scale,
         hkv, log2_page, return_lse, validate, signature=None):
    bsz, h, t, d = q.shape
    mask_u8 = _mask_as_bytes(mask, bsz, t)
    _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache, current_k=current_k, current_v=current_v,
                        mask=mask_u8, kv_seq_len=kv_seq_len, block_tables=block_tables)
    _check_diagonal(mask, mask_u8)
    if max_seq_len_in_batch is None:
        max_len = capacity
    elif not isinstance(max_seq_len_in_batch, int) or not 0 <= max_seq_len_in_batch <= capacity:
        raise ValueError(f"max_seq_len_in_batch: expected an int in [0, {capacity}] (the cache capacity), "
                         f"got {max_seq_len_in_batch!r}")
    else:
        max_len = max_seq_len_in_batch
    if validate:  # opt-in: one host sync
        longest = int(kv_seq_len.max()) if bsz else 0
        shortest = int(kv_seq_len.min()) if bsz else 0
        if shortest < 0 or longest > max_len:
            raise ValueError(f"kv_seq_len: expected values in [0, {max_len}], got min {shortest}, max {longest}")
    scale = _checks.softmax_scale("sm_scale", sm_scale, d)
    max_splits = _check_workspace(q, mid_output, mid_output_lse)
    num_splits, split_len = _plan(q, hkv, max_len, block_size, max_splits)
    plan = (block_size, num_splits, split_len, log2_page, scale, return_lse)
    if signature is not None:
        _checks.remember(_fast_plans, signature, plan)
    return _execute(plan, q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
                    output, mid_output, mid_output_lse)


# Validated calls, by signature: (shape, strides, dtype, device) of every tensor argument and the
# scalar options. A call whose signature was seen skips validation and planning (they depend on
# nothing else); only the mask diagonal (cached per mask tensor and version) and the data-pointer
# alignment (in _launch) are checked again. ~20-30 us less host time per eager call.
_fast_plans: dict[tuple, tuple] = {}


def _try_fast(kind, tensors, options, validate):
    """(signature, result): the result of a call whose signature was validated before (else None),
    and the signature under which the full path remembers its plan (None: do not remember)."""
    if validate:
        return None, None
    # Option values with their types (True must not pass for 1), and the exploration knobs.
    signature = _checks.call_signature(tensors, (kind, *options, *map(type, options), _M_TILES_OVERRIDE,
                                                 _WARP_N_OVERRIDE))
    if signature is None:
        return None, None
    q, k, v, block_tables, kv_seq_len, current_k, current_v, mask, output, mid_output, mid_output_lse = tensors
    return signature, _run_fast(signature, q, k, v, block_tables, current_k, current_v, mask, kv_seq_len,
                                output, mid_output, mid_output_lse)


def _fast_mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """_mask_as_bytes for a mask whose dtype and shape a validated signature vouches for."""
    if mask.dtype == torch.bool:
        allowed = mask.view(torch.uint8)
    elif mask.dtype.is_floating_point:
        allowed = (mask == 0).view(torch.uint8)
    else:
        allowed = (mask != 0).view(torch.uint8)
    return allowed if allowed.dim() == 3 else allowed.unsqueeze(0)


def _run_fast(signature, q, k_cache, v_cache, block_tables, current_k, current_v, mask, kv_seq_len,
              output, mid_output, mid_output_lse):
    """The call with a seen signature, or None when the full path must run."""
    plan = _fast_plans.get(signature)
    if plan is None:
        return None
    mask_u8 = _fast_mask_bytes(mask)
    _check_diagonal(mask, mask_u8)
    return _execute(plan, q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
                    output, mid_output, mid_output_lse)


def _execute(plan, q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
             output, mid_output, mid_output_lse):
    block_size, num_splits, split_len, log2_page, scale, return_lse = plan
    h = q.shape[1]
    output, mid_output, mid_output_lse, lse = _buffers(q, num_splits, output, mid_output, mid_output_lse, return_lse)
    # The combine step writes output as [B * H, T, D] rows with 16-byte vector stores.
    # (Traced code cannot read data pointers; there the eager calls' checks stand.)
    direct = (output.is_contiguous() or output.stride(0) == h * output.stride(1)) and (
        output.device.type != "cuda" or torch.compiler.is_compiling() or _checks.aligned16(output, (0, 1, 2)))
    out = output if direct else torch.empty_like(output, memory_format=torch.contiguous_format)
    # Eager calls go straight to the implementation (no dispatcher cost); traced ones see the op.
    op = torch.ops.flashtree.tree_decode if torch.compiler.is_compiling() else _tree_decode_impl
    op(
        q, k_cache, v_cache, block_tables, current_k, current_v, mask_u8, kv_seq_len,
        mid_output, mid_output_lse, out, lse, block_size, num_splits, split_len, log2_page, scale)
    if not direct:
        output.copy_(out)
    return (output, lse) if return_lse else output


def _check_kv(k_name, k, v_name, v, q, expected, layout):
    """The K and V caches (padded or paged): same shape and dtype as each other and q, D contiguous."""
    _checks.is_tensor(v_name, v)
    _checks.ndim(k_name, k, 4, layout)
    _checks.shape(k_name, k, expected, layout)
    _checks.shape(v_name, v, tuple(k.shape), f"(the shape of {k_name})")
    _checks.same_dtype(v_name, v, "q", q)
    _checks.last_dim_contiguous(k_name, k)
    _checks.last_dim_contiguous(v_name, v)


def _returned(q, result, return_lse):
    """The caller's kind of array (CuPy in, CuPy out), with the lse when asked for."""
    if return_lse:
        return _interop.like(q, result[0]), _interop.like(q, result[1])
    return _interop.like(q, result)


def flash_decoding_attention(q, k_cache, v_cache, current_k, current_v, mask, kv_seq_len,
                             block_size=64, max_seq_len_in_batch=None, output=None, mid_output=None,
                             mid_output_lse=None, sm_scale=None, kv_group_num=1, *,
                             return_lse=False, validate=False):
    """Attention of a draft tree of T tokens per sequence over its KV cache and its tree ancestors.

    Token i of sequence b attends all of ``k_cache[b, :, :kv_seq_len[b]]`` and current token j
    iff ``mask[(b,) i, j]``.

    Args:
        q: [B, H, T, D] fp16 or bf16 (CPU: fp32/fp64 through the reference). 1 <= T <= 256;
            D in {64, 128, 256}. Any strides with a contiguous last dimension.
        k_cache, v_cache: [B, Hkv, C, D], padded; positions past kv_seq_len[b] may hold anything
            (NaN included) and never reach the result.
        current_k, current_v: [B, Hkv, T, D], the tree tokens' keys and values.
        mask: [T, T] (shared) or [B, T, T]; bool or int (nonzero = may attend) or an additive float
            mask (0 = attend, -inf = blocked). Row i must allow token i: checked with one host sync
            the first time a given mask tensor is seen (not during graph capture or tracing).
        kv_seq_len: int32 [B], cached tokens per sequence (the T tree tokens not included); 0 is fine.
        block_size: the KV tile length, a compile-time specialisation in {16, 32, 64, 128, 256}
            ({16, 64, 128} when D = 256); each split is a whole number of tiles.
        max_seq_len_in_batch: optional host int bounding kv_seq_len (fewer splits); None uses C and
            never synchronises.
        output: optional [B, H, T, D] in q's dtype, written in place.
        mid_output, mid_output_lse: optional fp32 workspaces [B, H, T, S_max, D] and
            [B, H, T, S_max] (contiguous), one partial state per split; they cap the number of
            splits at S_max. With output and both workspaces given, the call allocates only the
            [B, H, T] lse (graph capture works). ``workspace_shape(q.shape, S_max)`` gives the
            shapes. A call that needs one split writes the output directly and leaves them alone.
        sm_scale: softmax scale, default 1 / sqrt(D).
        kv_group_num: H / Hkv (GQA group size), checked against the shapes.
        return_lse: also return the natural-log lse [B, H, T] fp32 (for callers that merge further).
        validate: check 0 <= kv_seq_len <= the bound on the host (one sync).

    Returns:
        output [B, H, T, D] in q's dtype (and lse when return_lse).
    """
    signature, result = _try_fast(
        "padded", (q, k_cache, v_cache, None, kv_seq_len, current_k, current_v, mask, output, mid_output, mid_output_lse),
        (block_size, max_seq_len_in_batch, sm_scale, kv_group_num, return_lse), validate)
    if result is not None:
        return result
    names = ("q", "k_cache", "v_cache", "current_k", "current_v", "mask", "kv_seq_len")
    args = [_interop.as_tensor(n, x) for n, x in zip(names, (q, k_cache, v_cache, current_k, current_v, mask, kv_seq_len))]
    q_t, k_cache, v_cache, current_k, current_v, mask, kv_seq_len = args
    _checks.is_tensor("k_cache", k_cache)
    bsz, h, t, d, hkv = _check_common(q_t, current_k, current_v, kv_seq_len, block_size, kv_group_num, k_cache.dtype)
    _check_kv("k_cache", k_cache, "v_cache", v_cache, q_t, (bsz, hkv, None, d), "[B, H / kv_group_num, C, D]")
    result = _run(q_t, k_cache, v_cache, None, current_k, current_v, mask, kv_seq_len, k_cache.shape[2],
                  block_size, max_seq_len_in_batch, output, mid_output, mid_output_lse, sm_scale,
                  hkv, 0, return_lse, validate, signature)
    return _returned(q, result, return_lse)


def flash_decoding_attention_paged(q, k_pages, v_pages, block_tables, kv_seq_len, current_k, current_v,
                                   mask, block_size=64, max_seq_len_in_batch=None, output=None,
                                   mid_output=None, mid_output_lse=None, sm_scale=None, kv_group_num=1, *,
                                   return_lse=False, validate=False):
    """``flash_decoding_attention`` over a paged KV cache ("replace the padding").

    k_pages, v_pages: [num_pages, Hkv, P, D] with P (the page size) a power of two in
        {8, 16, 32, 64, 128, 256}; token j of sequence b lives in page block_tables[b, j // P],
        row j % P. block_tables: int32 [B, max_pages]; entries past the last used page are never read.
    Everything else is as in ``flash_decoding_attention`` (the capacity is max_pages * P).
    """
    signature, result = _try_fast(
        "paged", (q, k_pages, v_pages, block_tables, kv_seq_len, current_k, current_v, mask, output, mid_output,
                  mid_output_lse),
        (block_size, max_seq_len_in_batch, sm_scale, kv_group_num, return_lse), validate)
    if result is not None:
        return result
    names = ("q", "k_pages", "v_pages", "block_tables", "kv_seq_len", "current_k", "current_v", "mask")
    args = [_interop.as_tensor(n, x) for n, x in zip(names, (q, k_pages, v_pages, block_tables, kv_seq_len, current_k, current_v, mask))]
    q_t, k_pages, v_pages, block_tables, kv_seq_len, current_k, current_v, mask = args
    _checks.is_tensor("k_pages", k_pages)
    _checks.is_tensor("block_tables", block_tables)
    bsz, h, t, d, hkv = _check_common(q_t, current_k, current_v, kv_seq_len, block_size, kv_group_num, k_pages.dtype)
    _check_kv("k_pages", k_pages, "v_pages", v_pages, q_t, (None, hkv, None, d), "[num_pages, H / kv_group_num, P, D]")
    _checks.one_of("k_pages.shape[2] (page size)", k_pages.shape[2], PAGE_SIZES)
    if block_tables.dtype != torch.int32:
        raise TypeError(f"block_tables: expected dtype int32, got {block_tables.dtype}")
    _checks.shape("block_tables", block_tables, (bsz, None), "[B, max_pages]")
    page = k_pages.shape[2]
    result = _run(q_t, k_pages, v_pages, block_tables, current_k, current_v, mask, kv_seq_len,
                  block_tables.shape[1] * page, block_size, max_seq_len_in_batch, output, mid_output,
                  mid_output_lse, sm_scale, hkv, int(math.log2(page)), return_lse, validate, signature)
    return _returned(q, result, return_lse)
