"""flash_decoding_attention (+ paged): reference semantics on CPU, kernels against it on GPU."""
import math

import pytest
import torch

import flashtree
from flashtree import reference, tree
from flashtree.decode import BLOCK_SIZES, _stages_and_smem, plan_splits, workspace_shape
from tolerance import assert_close_rule


def random_parents(t, gen):
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]


def make_case(b, h, g, t, c, d, dtype, device, gen, lens=None, per_seq_mask=False):
    hkv = h // g
    q = torch.randn(b, h, t, d, generator=gen).to(device, dtype)
    kc = torch.randn(b, hkv, c, d, generator=gen).to(device, dtype)
    vc = torch.randn(b, hkv, c, d, generator=gen).to(device, dtype)
    ck = torch.randn(b, hkv, t, d, generator=gen).to(device, dtype)
    cv = torch.randn(b, hkv, t, d, generator=gen).to(device, dtype)
    if lens is None:
        lens = torch.randint(0, c + 1, (b,), generator=gen)
    lens = torch.as_tensor(lens, dtype=torch.int32)
    for i, n in enumerate(lens.tolist()):  # garbage past kv_seq_len must never reach the result
        kc[i, :, n:] = float("nan")
        vc[i, :, n:] = float("nan")
    if per_seq_mask:
        mask = torch.stack([tree.ancestor_mask(random_parents(t, gen)) for _ in range(b)])
    else:
        mask = tree.ancestor_mask(random_parents(t, gen))
    return q, kc, vc, ck, cv, mask.to(device), lens.to(device)


def torch_baseline(q, kc, vc, ck, cv, mask, lens, scale):
    """Plain PyTorch in the input dtype (the tolerance rule's baseline)."""
    b, h, t, d = q.shape
    g = h // kc.shape[1]
    outs = []
    mask = mask.expand(b, t, t)
    for i in range(b):
        n = int(lens[i])
        k = torch.cat([kc[i, :, :n], ck[i]], 1).repeat_interleave(g, 0)
        v = torch.cat([vc[i, :, :n], cv[i]], 1).repeat_interleave(g, 0)
        allowed = torch.cat([torch.ones(t, n, dtype=torch.bool, device=q.device), mask[i].bool()], 1)
        s = (q[i] @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(s.float(), -1).to(q.dtype) @ v)
    return torch.stack(outs)


# ----------------------------------------------------------------------------- CPU


def test_chain_tree_with_empty_cache_is_causal_attention(gen):
    b, h, t, d = 2, 4, 9, 64
    q, kc, vc, ck, cv, _, _ = make_case(b, h, 2, t, 5, d, torch.float64, "cpu", gen, lens=[0, 0])
    mask = tree.ancestor_mask(tree.chain(t))
    out = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, torch.zeros(b, dtype=torch.int32), kv_group_num=2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, ck.repeat_interleave(2, 1), cv.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref)


def test_cpu_matches_dense_sdpa_with_cache(gen):
    b, h, g, t, c, d = 3, 6, 3, 7, 11, 64
    q, kc, vc, ck, cv, mask, lens = make_case(b, h, g, t, c, d, torch.float64, "cpu", gen, lens=[11, 4, 0])
    out, lse = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, kv_group_num=g, return_lse=True)
    for i in range(b):
        n = int(lens[i])
        k = torch.cat([kc[i, :, :n], ck[i]], 1).repeat_interleave(g, 0)
        v = torch.cat([vc[i, :, :n], cv[i]], 1).repeat_interleave(g, 0)
        allowed = torch.cat([torch.ones(t, n, dtype=torch.bool), mask], 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i], k, v, attn_mask=allowed)
        torch.testing.assert_close(out[i], ref)
        s = (q[i] @ k.transpose(-1, -2)) / math.sqrt(d)
        torch.testing.assert_close(lse[i].double(), torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int", "additive"])
def test_int_and_additive_masks_equal_bool(kind, gen):
    q, kc, vc, ck, cv, mask, lens = make_case(2, 4, 4, 6, 8, 64, torch.float64, "cpu", gen, per_seq_mask=True)
    alt = mask.int() if kind == "int" else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    a = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, kv_group_num=4)
    b = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, alt, lens, kv_group_num=4)
    torch.testing.assert_close(a, b)


def test_paged_equals_padded_cpu(gen):
    b, h, g, t, d, page = 3, 4, 2, 5, 64, 8
    lens = [17, 0, 9]
    q, kc, vc, ck, cv, mask, lens_t = make_case(b, h, g, t, 24, d, torch.float64, "cpu", gen, lens=lens)
    kp, vp, table = paginate(kc, vc, lens, page, gen)
    a = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens_t, kv_group_num=g)
    p = flashtree.flash_decoding_attention_paged(q, kp, vp, table, lens_t, ck, cv, mask, kv_group_num=g)
    torch.testing.assert_close(a, p)


def paginate(kc, vc, lens, page, gen):
    """Scatter a padded cache into shuffled pages; unused table entries hold -1."""
    b, hkv, c, d = kc.shape
    max_pages = math.ceil(c / page)
    num_pages = b * max_pages + 3
    perm = torch.randperm(num_pages, generator=gen)
    kp = torch.full((num_pages, hkv, page, d), float("nan"), dtype=kc.dtype, device=kc.device)
    vp = kp.clone()
    table = torch.full((b, max_pages), -1, dtype=torch.int32)
    for i in range(b):
        for p in range(math.ceil(int(lens[i]) / page)):
            idx = int(perm[i * max_pages + p])
            table[i, p] = idx
            lo, hi = p * page, min(c, (p + 1) * page)
            kp[idx, :, : hi - lo] = kc[i, :, lo:hi]
            vp[idx, :, : hi - lo] = vc[i, :, lo:hi]
    return kp, vp, table.to(kc.device)


def test_split_heuristic_worked_example():
    # the module docstring's example: H100, 1 x 8 KV heads, 256 rows, C = 32768, block 64
    assert plan_splits(1, 8, 256, 32768, 64, 132, 2) == (8, 4096)
    assert plan_splits(64, 8, 16, 4096, 64, 132, 2)[0] == 1  # enough CTAs already
    assert plan_splits(2, 1, 16, 0, 64, 132, 2) == (0, 64)  # empty caches: the tree alone
    s, n = plan_splits(1, 1, 16, 1000, 64, 132, 2, max_splits=3)
    assert s <= 3 and s * n >= 1000 and n % 64 == 0


def test_workspace_shape_and_user_workspace_cap(gen):
    assert workspace_shape((2, 4, 3, 64), 5) == ((2, 4, 3, 5, 64), (2, 4, 3, 5))
    q, kc, vc, ck, cv, mask, lens = make_case(2, 4, 2, 3, 10, 64, torch.float32, "cpu", gen)
    mo, ml = (torch.empty(s) for s in workspace_shape(q.shape, 2))
    out = torch.full_like(q, float("nan"))
    r = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, 64, None, out, mo, ml, None, 2)
    assert r is out and not torch.isnan(out).any()


def good_args(gen, device="cpu", dtype=torch.float32):
    return list(make_case(2, 4, 2, 5, 8, 64, dtype, device, gen))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.__setitem__(0, a[0][..., :32]), ValueError, r"current_k: expected shape \[2, 2, 5, 32\]"),
        (lambda a: a.__setitem__(1, a[1].double()), TypeError, "k_cache: expected dtype"),
        (lambda a: a.__setitem__(6, a[6].long()), TypeError, "kv_seq_len: expected dtype int32, got torch.int64"),
        (lambda a: a.__setitem__(6, a[6][:1]), ValueError, r"kv_seq_len: expected shape \[2\]"),
        (lambda a: a.__setitem__(5, a[5][:4, :4]), ValueError, r"mask: expected shape \[5, 5\] or \[2, 5, 5\]"),
        (lambda a: a.__setitem__(5, torch.zeros(5, 5, dtype=torch.bool)), ValueError, r"mask: expected every row to allow its own token, got mask\[0, 0\]"),
        (lambda a: a.__setitem__(3, a[3][:, :1]), ValueError, "current_k: expected shape"),
        (lambda a: a.__setitem__(2, a[2][:, :, :7]), ValueError, "v_cache: expected shape"),
        (lambda a: a.__setitem__(0, a[0].transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError, "q: expected a contiguous last dimension"),
        (lambda a: a.__setitem__(0, a[0][:, :, :0]), ValueError, r"q: expected 1 <= T"),
        (lambda a: a.__setitem__(5, a[5].float().to(torch.complex64)), TypeError, "mask: expected dtype"),
    ],
)
def test_bad_input_names_the_argument(mutate, exc, match, gen):
    args = good_args(gen)
    mutate(args)
    with pytest.raises(exc, match=match):
        flashtree.flash_decoding_attention(*args, kv_group_num=2)


def test_bad_options_name_the_argument(gen):
    args = good_args(gen)
    with pytest.raises(ValueError, match=r"kv_group_num: expected a positive divisor of H = 4, got 3"):
        flashtree.flash_decoding_attention(*args, kv_group_num=3)
    with pytest.raises(ValueError, match=r"current_k: expected shape \[2, 4, 5, 64\]"):
        flashtree.flash_decoding_attention(*args)  # kv_group_num inconsistent with the shapes
    with pytest.raises(ValueError, match=r"block_size: expected one of \[16, 32, 64, 128, 256\], got 48"):
        flashtree.flash_decoding_attention(*args, block_size=48, kv_group_num=2)
    with pytest.raises(ValueError, match=r"max_seq_len_in_batch: expected an int in \[0, 8\]"):
        flashtree.flash_decoding_attention(*args, max_seq_len_in_batch=9, kv_group_num=2)
    with pytest.raises(ValueError, match="kv_seq_len: expected values in"):
        bad = list(args)
        bad[6] = torch.tensor([3, 9], dtype=torch.int32)
        flashtree.flash_decoding_attention(*bad, kv_group_num=2, validate=True)
    with pytest.raises(ValueError, match="output: expected shape"):
        flashtree.flash_decoding_attention(*args, output=torch.empty(2, 4, 5, 63), kv_group_num=2)
    with pytest.raises(ValueError, match="mid_output, mid_output_lse: expected both or neither"):
        flashtree.flash_decoding_attention(*args, mid_output=torch.empty(2, 4, 5, 3, 64), kv_group_num=2)


def test_bad_paged_input(gen):
    q, kc, vc, ck, cv, mask, lens = good_args(gen)
    kp, vp, table = paginate(kc, vc, lens.tolist(), 8, gen)
    with pytest.raises(TypeError, match="block_tables: expected dtype int32"):
        flashtree.flash_decoding_attention_paged(q, kp, vp, table.long(), lens, ck, cv, mask, kv_group_num=2)
    with pytest.raises(ValueError, match=r"k_pages.shape\[2\] \(page size\): expected one of"):
        flashtree.flash_decoding_attention_paged(q, kp[:, :, :6], vp[:, :, :6], table, lens, ck, cv, mask, kv_group_num=2)


def test_inputs_not_mutated_cpu(gen):
    args = good_args(gen)
    before = [a.clone() for a in args]
    flashtree.flash_decoding_attention(*args, kv_group_num=2)
    for a, b in zip(args, before):
        assert torch.equal(a.nan_to_num(1.0), b.nan_to_num(1.0))


def test_registered_op_fake_and_opcheck(gen):
    q, kc, vc, ck, cv, mask, lens = make_case(2, 4, 2, 3, 6, 64, torch.float32, "cpu", gen, lens=[6, 2])
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    mo, ml = (torch.zeros(s) for s in workspace_shape(q.shape, 1))
    out, lse = torch.empty_like(q), torch.empty(2, 4, 3)
    torch.library.opcheck(torch.ops.flashtree.tree_decode.default,
                          (q, kc, vc, None, ck, cv, mask.view(torch.uint8)[None], lens, mo, ml, out, lse, 64, 1, 64, 0, 0.125))


def test_torch_compile_cpu(gen):
    q, kc, vc, ck, cv, mask, lens = make_case(2, 4, 2, 3, 6, 64, torch.float32, "cpu", gen, lens=[6, 2])
    f = torch.compile(lambda *a: flashtree.flash_decoding_attention(*a, kv_group_num=2) * 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, kc, vc, ck, cv, mask, lens), flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, kv_group_num=2))


# ----------------------------------------------------------------------------- GPU


def check_gpu(q, kc, vc, ck, cv, mask, lens, g, block_size, what, paged=None, **kw):
    out = torch.full_like(q, float("nan"))
    if paged is None:
        flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, block_size, output=out, kv_group_num=g, **kw)
    else:
        kp, vp, table = paged
        flashtree.flash_decoding_attention_paged(q, kp, vp, table, lens, ck, cv, mask, block_size, output=out, kv_group_num=g, **kw)
    scale = 1 / math.sqrt(q.shape[-1])
    ref, _ = reference.tree_decode(q, kc, vc, ck, cv, mask, lens.cpu(), scale)
    base = torch_baseline(q, kc.nan_to_num(), vc.nan_to_num(), ck, cv, mask, lens.cpu(), scale)
    ref64 = reference.tree_decode(q.double(), kc.double(), vc.double(), ck.double(), cv.double(), mask, lens.cpu(), scale)[0]
    assert_close_rule(out, ref64, base, q.dtype, what)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_kernel_matches_reference(dtype, d, block_size, gen):
    for t, g in [(1, 1), (2, 8), (7, 4), (31, 2), (64, 4), (100, 1), (256, 8)]:
        b = 3
        q, kc, vc, ck, cv, mask, lens = make_case(b, 2 * g, g, t, 300, d, dtype, "cuda", gen,
                                                  lens=[0, 1, int(torch.randint(2, 301, (1,), generator=gen))],
                                                  per_seq_mask=t % 2 == 1)
        check_gpu(q, kc, vc, ck, cv, mask, lens, g, block_size, f"T={t} G={g}")


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_head_dim_256(block_size, gen):
    q, kc, vc, ck, cv, mask, lens = make_case(2, 4, 2, 13, 200, 256, torch.bfloat16, "cuda", gen, lens=[200, 37])
    check_gpu(q, kc, vc, ck, cv, mask, lens, 2, block_size, "D=256")


@pytest.mark.gpu
@pytest.mark.parametrize("page", [8, 16, 32, 64, 256])
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("t", [11, 37])  # 44 and 148 query rows per KV head: one and three row tiles
def test_paged_kernel(page, block_size, t, gen):
    lens = [523, 0, 64, 1]
    q, kc, vc, ck, cv, mask, lens_t = make_case(4, 8, 4, t, 523, 128, torch.bfloat16, "cuda", gen, lens=lens)
    paged = paginate(kc, vc, lens, page, gen)
    out = check_gpu(q, kc, vc, ck, cv, mask, lens_t, 4, block_size, f"paged P={page} T={t}", paged=paged)
    padded = torch.full_like(out, float("nan"))
    flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens_t, block_size, output=padded, kv_group_num=4)
    # Paged and padded may run different kernel variants (rows per warp): equal up to 16-bit rounding.
    torch.testing.assert_close(out, padded, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [5, 40])
def test_sharp_growing_scores(t, gen):
    """Large scores that grow along the cache: the running max jumps by more than the lazy-rescale
    slack many times within a split, so the rescale path runs (random N(0, 1) data rarely needs it)."""
    q, kc, vc, ck, cv, mask, lens = make_case(2, 8, 4, t, 3000, 128, torch.float16, "cuda", gen, lens=[3000, 1777])
    ramp = torch.linspace(0.1, 3.0, 3000, device="cuda", dtype=torch.float16)[:, None]
    check_gpu(q * 6, kc * ramp, vc, ck, cv, mask, lens, 4, 64, f"sharp T={t}", max_seq_len_in_batch=3000)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [8, 16, 32, 64])
def test_paged_kernel_head_dim_64(page, gen):
    """D = 64 copies 16 rows per thread step: every page-walking path of the loader (row by row,
    row pairs, one page per tile) at a 128-key tile."""
    lens = [700, 3, 0]
    q, kc, vc, ck, cv, mask, lens_t = make_case(3, 8, 4, 37, 700, 64, torch.float16, "cuda", gen, lens=lens)
    check_gpu(q, kc, vc, ck, cv, mask, lens_t, 4, 128, f"paged D=64 P={page}", paged=paginate(kc, vc, lens, page, gen))


@pytest.mark.gpu
def test_mqa_noncontiguous_and_large_splits(gen):
    b, h, t, c, d = 2, 8, 5, 5000, 128
    q, kc, vc, ck, cv, mask, lens = make_case(b, h, h, t, c, d, torch.float16, "cuda", gen, lens=[4999, 3001])
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, D] view with T-major strides
    big = torch.randn(b, 1, c + 7, d, device="cuda", dtype=torch.float16)
    big[:, :, 3:-4] = kc
    kc_nc = big[:, :, 3:-4]  # a strided view into a larger cache
    check_gpu(q_nc, kc_nc, vc, ck, cv, mask, lens, h, 64, "MQA strided", max_seq_len_in_batch=5000)


@pytest.mark.gpu
def test_workspace_larger_than_the_splits_used(gen):
    """A caller's workspace may hold more states than the plan uses (S_max = 16, 4 splits here)."""
    q, kc, vc, ck, cv, mask, lens = make_case(1, 4, 4, 9, 200, 128, torch.bfloat16, "cuda", gen, lens=[197])
    mo, ml = (torch.full(s, float("nan"), device="cuda") for s in workspace_shape(q.shape, 16))
    check_gpu(q, kc, vc, ck, cv, mask, lens, 4, 64, "S_max 16", mid_output=mo, mid_output_lse=ml,
              max_seq_len_in_batch=200)
    assert torch.isnan(mo[..., 4:, :]).all()  # states past the plan's 4 splits are never written


@pytest.mark.gpu
def test_repeated_signature_still_checks_values_and_options(gen):
    """A call whose shapes, strides and options were validated before skips validation; what its
    signature does not vouch for is still checked: the mask diagonal, option types, new shapes."""
    q, kc, vc, ck, cv, mask, lens = make_case(2, 8, 4, 6, 300, 128, torch.bfloat16, "cuda", gen, lens=[300, 5])
    first = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, 64, None, None, None, None, 1, 4)
    again = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, 64, None, None, None, None, 1, 4)
    assert torch.equal(first, again)
    blocked = mask.clone()
    blocked[3, 3] = False
    with pytest.raises(ValueError, match=r"mask: expected every row to allow its own token, got mask\[3, 3\]"):
        flashtree.flash_decoding_attention(q, kc, vc, ck, cv, blocked, lens, 64, None, None, None, None, 1, 4)
    with pytest.raises(ValueError, match="sm_scale: expected None or a positive finite float, got True"):
        flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, 64, None, None, None, None, True, 4)
    with pytest.raises(ValueError, match="current_k: expected shape"):
        flashtree.flash_decoding_attention(q, kc, vc, ck[:, :, :5], cv, mask, lens, 64, None, None, None, None, 1, 4)


@pytest.mark.gpu
def test_deterministic_and_inputs_untouched(gen):
    args = make_case(4, 8, 4, 17, 777, 128, torch.bfloat16, "cuda", gen)
    before = [a.clone() for a in args]
    a = flashtree.flash_decoding_attention(*args, kv_group_num=4)
    b = flashtree.flash_decoding_attention(*args, kv_group_num=4)
    assert torch.equal(a, b)
    for x, y in zip(args, before):
        assert torch.equal(x.nan_to_num(1.0), y.nan_to_num(1.0))


@pytest.mark.gpu
def test_cuda_graph_capture_with_preallocated_buffers(gen):
    q, kc, vc, ck, cv, mask, lens = make_case(2, 8, 4, 9, 1000, 128, torch.bfloat16, "cuda", gen, lens=[1000, 400])
    mo, ml = (torch.empty(s, device="cuda") for s in workspace_shape(q.shape, 8))
    out = torch.empty_like(q)
    call = lambda: flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, 64, None, out, mo, ml, None, 4)  # noqa: E731
    call()  # compile, load and check the mask before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on its own side stream
        call()
    new = make_case(2, 8, 4, 9, 1000, 128, torch.bfloat16, "cuda", gen, lens=[10, 999])
    for dst, src in zip((q, kc, vc, ck, cv, mask, lens), new):
        dst.copy_(src)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    scale = 1 / math.sqrt(128)
    ref = reference.tree_decode(q.double(), kc.double(), vc.double(), ck.double(), cv.double(), mask, lens.cpu(), scale)[0]
    assert_close_rule(out, ref, torch_baseline(q, kc.nan_to_num(), vc.nan_to_num(), ck, cv, mask, lens.cpu(), scale), torch.bfloat16, "graph replay")


@pytest.mark.gpu
def test_torch_compile_gpu(gen):
    q, kc, vc, ck, cv, mask, lens = make_case(2, 8, 4, 9, 300, 128, torch.float16, "cuda", gen)
    f = torch.compile(lambda *a: flashtree.flash_decoding_attention(*a, kv_group_num=4).float() + 1, fullgraph=True)
    eager = flashtree.flash_decoding_attention(q, kc, vc, ck, cv, mask, lens, kv_group_num=4).float() + 1
    torch.testing.assert_close(f(q, kc, vc, ck, cv, mask, lens), eager)
