"""tree_attention (packed DFS-order masks): reference semantics on CPU, kernels against it on GPU."""
import math

import pytest
import torch

import flashtree
from flashtree import _jit, dfs, reference, tree
from tolerance import assert_close_rule


# ------------------------------------------------------------------------------- builders


def random_preorder_parents(num_nodes, gen):
    """A random tree numbered in DFS pre-order: node i hangs off the path root..node i-1."""
    parents, path = [-1], [0]
    for node in range(1, num_nodes):
        depth = int(torch.randint(0, len(path), (1,), generator=gen))
        del path[depth + 1:]
        parents.append(path[-1])
        path.append(node)
    return parents


def random_pack(gen, num_trees, max_nodes, max_len, ones=True):
    """DFS arrays of several random trees packed back to back, plus the dense token mask built from
    the parents (ancestor-or-self nodes, causal within a node): an independent statement of the rule."""
    starts, ends, masks, lens = [], [], [], []
    for _ in range(num_trees):
        k = int(torch.randint(1, max_nodes + 1, (1,), generator=gen))
        parents = random_preorder_parents(k, gen)
        node_lens = torch.randint(1, max_len + 1, (k,), generator=gen)
        if ones:
            node_lens[torch.rand(k, generator=gen) < 0.3] = 1
        s, e = tree.dfs_arrays_from_parents(parents, node_lens)
        node = torch.arange(k).repeat_interleave(node_lens)
        anc = tree.ancestor_mask(parents)
        m = anc[node][:, node] & torch.ones(len(node), len(node), dtype=torch.bool).tril()
        starts.append(s)
        ends.append(e)
        masks.append(m)
        lens.append(len(node))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return torch.cat(starts), torch.cat(ends), cu, torch.block_diag(*masks)


def dense_attention(q, k, v, mask, scale):
    """Naive full-mask attention in q's dtype (float64 here): [N, H, D] -> o, lse [N, H]."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("ihd,jhd->hij", q, kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), vv)
    return o, lse.t()


def qkv(n, h, hkv, d, dtype, device, gen, requires_grad=True):
    q = torch.randn(n, h, d, generator=gen, dtype=torch.float64).to(device, dtype)
    k = torch.randn(n, hkv, d, generator=gen, dtype=torch.float64).to(device, dtype)
    v = torch.randn(n, hkv, d, generator=gen, dtype=torch.float64).to(device, dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


# ----------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("h, hkv", [(4, 4), (6, 2), (3, 1)])
def test_reference_equals_dense_mask_values_and_grads(gen, h, hkv):
    sq, ek, cu, mask = random_pack(gen, num_trees=3, max_nodes=7, max_len=6)
    n, d = len(sq), 16
    q, k, v = qkv(n, h, hkv, d, torch.float64, "cpu", gen)
    scale = 0.37
    o, lse = reference.tree_attention(q, k, v, cu, sq, ek, scale, query_chunk=5)
    o_ref, lse_ref = dense_attention(q, k, v, mask, scale)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    w, wl = torch.randn_like(o), torch.randn_like(lse)
    grads = torch.autograd.grad((o * w).sum() + (lse * wl).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((o_ref * w).sum() + (lse_ref * wl).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_public_op_on_cpu_groups_and_gradcheck(gen):
    sq, ek, cu = tree.dfs_arrays_from_groups([(3, [2, 1, 2]), (2, [1]), (1, [])])
    n = len(sq)
    q, k, v = qkv(n, 4, 2, 8, torch.float64, "cpu", gen)
    o, lse = flashtree.tree_attention(q, k, v, cu, sq, ek, return_lse=True)
    assert lse.shape == (n, 4) and lse.dtype == torch.float64
    o_ref, _ = dense_attention(q, k, v, tree.dfs_mask(sq, ek, cu), 1 / math.sqrt(8))
    torch.testing.assert_close(o, o_ref)
    sq, ek, cu = tree.dfs_arrays_from_groups([(2, [1, 2]), (1, [])])
    small = qkv(len(sq), 2, 1, 4, torch.float64, "cpu", gen)
    fn = lambda a, b, c: flashtree.tree_attention(a, b, c, cu, sq, ek, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(small))


def test_chain_is_causal_attention_per_sequence(gen):
    lens = [5, 1, 9]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    n = sum(lens)
    zeros = torch.zeros(n, dtype=torch.int32)
    q, k, v = qkv(n, 4, 2, 16, torch.float64, "cpu", gen, requires_grad=False)
    o = flashtree.tree_attention(q, k, v, cu, zeros, zeros, softmax_scale=0.2)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(2, 0),
            v[a:b].transpose(0, 1).repeat_interleave(2, 0), is_causal=True, scale=0.2).transpose(0, 1)
        torch.testing.assert_close(o[a:b], ref)


def test_each_response_sees_only_the_prompt_and_itself(gen):
    """Metamorphic: a packed (prompt, responses) group equals running each prompt+response alone."""
    groups = [(6, [3, 1, 4])]
    sq, ek, cu = tree.dfs_arrays_from_groups(groups)
    n = len(sq)
    q, k, v = qkv(n, 2, 1, 8, torch.float64, "cpu", gen, requires_grad=False)
    o = flashtree.tree_attention(q, k, v, cu, sq, ek)
    for path in tree.path_token_indices(groups)[0]:
        idx = path.long()
        m = len(idx)
        z = torch.zeros(m, dtype=torch.int32)
        alone = flashtree.tree_attention(q[idx], k[idx], v[idx], torch.tensor([0, m], dtype=torch.int32), z, z)
        torch.testing.assert_close(o[idx], alone)


def test_flash_attn_varlen_func_drop_in(gen):
    sq, ek, cu, _ = random_pack(gen, num_trees=2, max_nodes=5, max_len=4)
    n = len(sq)
    q, k, v = qkv(n, 4, 2, 8, torch.float64, "cpu", gen, requires_grad=False)
    out, lse, probs = dfs.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 9, 9, causal=True,
                                                 return_attn_probs=True, tree_dfs_order_end_k=ek,
                                                 tree_dfs_order_start_q=sq)
    o_ref, lse_ref = flashtree.tree_attention(q, k, v, cu, sq, ek, return_lse=True)
    torch.testing.assert_close(out, o_ref)
    torch.testing.assert_close(lse, lse_ref.t())  # flash-attn's [H, N] layout
    assert probs is None
    zeros = torch.zeros(n, dtype=torch.int32)
    torch.testing.assert_close(dfs.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9),
                               flashtree.tree_attention(q, k, v, cu, zeros, zeros))


def _bad_inputs(gen):
    sq, ek, cu = tree.dfs_arrays_from_groups([(4, [2, 3])])
    q, k, v = qkv(len(sq), 4, 2, 8, torch.float32, "cpu", gen, requires_grad=False)
    return q, k, v, cu, sq, ek


@pytest.mark.parametrize("case, error, words", [
    ("start_int64", TypeError, ["tree_dfs_order_start_q", "int32", "int64"]),
    ("end_short", ValueError, ["tree_dfs_order_end_k", "[9]", "[8]"]),
    ("cu_not_rising", ValueError, ["cu_seqlens", "strict rise", "[0, 5, 5, 9]"]),
    ("cu_not_n", ValueError, ["cu_seqlens", "N = 9", "[0, 8]"]),
    ("cu_int64", TypeError, ["cu_seqlens", "int32", "int64"]),
    ("heads", ValueError, ["Hkv", "H = 4", "3"]),
    ("k_tokens", ValueError, ["k", "[9, *, 8]", "[8, 2, 8]"]),
    ("kv_dtype", TypeError, ["v", "float32", "float64"]),
    ("head_dim", ValueError, ["k", "[9, *, 8]"]),
])
def test_bad_input_errors_name_argument_expected_actual(gen, case, error, words):
    q, k, v, cu, sq, ek = _bad_inputs(gen)
    if case == "start_int64":
        sq = sq.long()
    elif case == "end_short":
        ek = ek[:-1]
    elif case == "cu_not_rising":
        cu = torch.tensor([0, 5, 5, 9], dtype=torch.int32)
    elif case == "cu_not_n":
        cu = torch.tensor([0, 8], dtype=torch.int32)
    elif case == "cu_int64":
        cu = cu.long()
    elif case == "heads":
        k, v = k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1)
    elif case == "k_tokens":
        k, v = k[:-1], v[:-1]
    elif case == "kv_dtype":
        v = v.double()
    elif case == "head_dim":
        k, v = k[..., :4], v[..., :4]
    with pytest.raises(error) as info:
        flashtree.tree_attention(q, k, v, cu, sq, ek)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_varlen_wrapper_rejects_unsupported_options(gen):
    q, k, v, cu, sq, ek = _bad_inputs(gen)
    kw = dict(tree_dfs_order_end_k=ek, tree_dfs_order_start_q=sq)
    for extra, word in [(dict(dropout_p=0.1), "dropout_p"), (dict(causal=False), "causal"),
                        (dict(window_size=(4, 0)), "window_size"), (dict(softcap=1.0), "softcap"),
                        (dict(alibi_slopes=torch.ones(4)), "alibi_slopes")]:
        with pytest.raises(ValueError, match=word):
            dfs.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, **extra, **kw)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        dfs.flash_attn_varlen_func(q, k, v, cu, cu, 9, 8, **kw)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        dfs.flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 4, 9], dtype=torch.int32), 9, 9, **kw)
    with pytest.raises(ValueError, match="both or neither"):
        dfs.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, tree_dfs_order_end_k=ek)


def test_opt_in_validator_catches_inconsistent_arrays(gen):
    q, k, v, cu, sq, ek = _bad_inputs(gen)
    bad = ek.clone()
    bad[5] = 0  # a start (1) beyond the end of its own node
    flashtree.tree_attention(q, k, v, cu, sq, bad)  # not checked by default: no host sync
    with pytest.raises(ValueError, match="end_k"):
        flashtree.tree_attention(q, k, v, cu, sq, bad, validate=True)
    flashtree.tree_attention(q, k, v, cu, sq, ek, validate=True)


def test_tile_map_never_skips_a_visible_pair_and_full_means_full(gen):
    for _ in range(3):
        sq, ek, cu, mask = random_pack(gen, num_trees=2, max_nodes=40, max_len=40)
        maps = dfs.tile_map(cu, sq, ek)
        for (a, b), (visited, full) in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), maps):
            m = mask[a:b, a:b]
            t = visited.shape[0]
            pad = t * 64 - (b - a)
            mp = torch.nn.functional.pad(m, (0, pad, 0, pad))
            blocks = mp.view(t, 64, t, 64).permute(0, 2, 1, 3)
            any_visible = blocks.any(-1).any(-1)
            assert not (any_visible & ~visited).any()
            valid = torch.nn.functional.pad(torch.ones(b - a, b - a, dtype=torch.bool), (0, pad, 0, pad))
            vb = valid.view(t, 64, t, 64).permute(0, 2, 1, 3)
            all_visible = (blocks | ~vb).all(-1).all(-1)
            assert not (full & ~all_visible).any()


def test_tile_map_of_the_benchmark_layout_follows_visible_pairs():
    sq, ek, cu = tree.dfs_arrays_from_groups([(2048, [512] * 8)])
    (visited, full), = dfs.tile_map(cu, sq, ek)
    # 32 prompt tiles (causal) + 8 responses x (32 prompt tiles + 8 own tiles causal)
    assert int(visited.sum()) == 32 * 33 // 2 + 8 * (8 * 32 + 8 * 9 // 2)
    assert int(full.sum()) == 32 * 31 // 2 + 8 * (8 * 32 + 8 * 7 // 2)


def test_slots_are_distinct_and_bounded(gen):
    for _ in range(5):
        lens = torch.randint(1, 200, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        cu = [0] + torch.tensor(lens).cumsum(0).tolist()
        slots = [c // 64 + s + t for s, (c, L) in enumerate(zip(cu, lens)) for t in range(-(-L // 64))]
        assert len(set(slots)) == len(slots) and max(slots) < dfs.num_slots(cu[-1], len(lens))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_dfs_specs_compile_without_spills(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHTREE_CACHE_DIR", str(tmp_path))
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}[arch]
    for spec in _jit.shipped_specs(["dfs"]):
        target = spec.target(arch)
        if target is None:  # an sm_90a kernel: built on the sm_90 pass only
            continue
        kernel, _ = _jit.load_or_compile(spec, target)
        assert kernel.resources.spills == 0, (spec.name, kernel.resources)
    for d in dfs.HEAD_DIMS:
        # two CTAs per SM fit (launch bounds assume it) on the larger parts; the Hopper forward: one
        assert max(dfs.fwd_smem(d), dfs.dkdv_smem(d), dfs.dq_smem(d)) <= limit
        assert max(dfs.fwd_ws_smem(d), dfs.dq_ws_smem(d), dfs.dkdv_ws_smem(d)) <= 227 * 1024


def test_dq_register_fragments_only_where_ptxas_keeps_them(monkeypatch):
    """The dQ kernel with Q and dO as register fragments (`_rf`) is chosen only with an NVRTC whose
    ptxas keeps an in-flight wgmma's registers (>= 13.3); it measured wrong at D = 64 with 13.0."""
    assert _jit.nvrtc.WGMMA_REGS_SAFE_FROM == (13, 3)
    try:
        for safe in (False, True):
            monkeypatch.setattr(_jit, "wgmma_regs_safe", lambda safe=safe: safe)
            dfs.bwd_ws_spec.cache_clear()
            names = {s.name for s in _jit.shipped_specs(["dfs"])}
            assert ("dfs_bwd_dq_ws_rf_bf16_d64" in names) == safe
            assert ("dfs_bwd_dq_ws_bf16_d64" in names) == (not safe)
            assert dfs.bwd_ws_spec("dq", torch.float16, 128).template_args[-1] == ("true" if safe else "false")
            assert dfs.bwd_ws_spec("dkdv", torch.float16, 128).name == "dfs_bwd_dkdv_ws_f16_d128"
    finally:
        dfs.bwd_ws_spec.cache_clear()


# ----------------------------------------------------------------------------------- GPU


def _baseline(q, k, v, cu, sq, ek, scale):
    """Plain PyTorch in the input dtype (the tolerance rule's baseline), differentiable."""
    outs = []
    g = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        r = torch.arange(a, b, device=q.device)
        allowed = (r[None, :] <= r[:, None]) & (sq[a:b, None] <= ek[None, a:b])
        kk = k[a:b].transpose(0, 1).repeat_interleave(g, 0)
        vv = v[a:b].transpose(0, 1).repeat_interleave(g, 0)
        s = (q[a:b].transpose(0, 1) @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append((torch.softmax(s.float(), -1).to(q.dtype) @ vv).transpose(0, 1))
    return torch.cat(outs)


def _poison_allocator(nbytes=64 << 20):
    """Leave NaN in the caching allocator so unwritten outputs show up."""
    torch.full((nbytes // 4,), float("nan"), device="cuda").view(-1)
    torch.cuda.synchronize()


def _check_gpu_case(sq, ek, cu, h, hkv, d, dtype, gen, noncontig=False, sharp=False):
    n = len(sq)
    q64, k64, v64 = qkv(n, h, hkv, d, torch.float64, "cuda", gen)
    if sharp:  # large, growing scores: the running max jumps often, so O is rescaled mid-row
        ramp = torch.linspace(0.25, 2.0, n, device="cuda", dtype=torch.float64)[:, None, None]
        q64 = (q64.detach() * 4).requires_grad_()
        k64 = (k64.detach() * ramp).requires_grad_()
    scale = 1 / math.sqrt(d)
    sq, ek, cu = sq.cuda(), ek.cuda(), cu.cuda()
    o64, lse64 = reference.tree_attention(q64, k64, v64, cu, sq, ek, scale)
    do = torch.randn_like(o64)
    dq64, dk64, dv64 = torch.autograd.grad((o64 * do).sum(), (q64, k64, v64))

    def leaf(x):
        if noncontig:  # a strided view: every other head of a wider tensor
            wide = torch.empty(x.shape[0], 2 * x.shape[1], x.shape[2], device="cuda", dtype=dtype)
            wide[:, ::2] = x.detach().to(dtype)
            return wide[:, ::2].requires_grad_()
        return x.detach().to(dtype).requires_grad_()

    q, k, v = leaf(q64), leaf(k64), leaf(v64)
    _poison_allocator()
    o, lse = flashtree.tree_attention(q, k, v, cu, sq, ek, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.to(dtype))
    dq_sum = torch.autograd.grad(flashtree.tree_attention(q, k, v, cu, sq, ek).sum(), q)[0]  # stride-0 dO
    assert not torch.isnan(dq_sum).any()
    qb, kb, vb = leaf(q64), leaf(k64), leaf(v64)
    ob = _baseline(qb, kb, vb, cu, sq, ek, scale)
    dqb, dkb, dvb = torch.autograd.grad(ob, (qb, kb, vb), do.to(dtype))
    what = f"{dtype} d{d} H{h}/{hkv} n{n}"
    assert_close_rule(o, o64, ob, dtype, f"o {what}")
    assert not torch.isnan(lse).any()
    # Rounding q and k to 16 bits moves a score s by ~|s| 2^-11 (fp16): sharp scores get a relative term.
    torch.testing.assert_close(lse.double(), lse64, atol=2e-2 if dtype == torch.bfloat16 else 5e-3,
                               rtol=2e-3 if sharp else 0)
    assert_close_rule(dq, dq64, dqb, dtype, f"dq {what}")
    assert_close_rule(dk, dk64, dkb, dtype, f"dk {what}")
    assert_close_rule(dv, dv64, dvb, dtype, f"dv {what}")
    return q, k, v, cu, sq, ek, do.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("h, hkv", [(6, 2), (5, 1)])
def test_gpu_random_trees_match_reference(gen, dtype, d, h, hkv):
    sq, ek, cu, _ = random_pack(gen, num_trees=3, max_nodes=30, max_len=23)
    _check_gpu_case(sq, ek, cu, h, hkv, d, dtype, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("wgmma", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_kernels_even_groups(gen, monkeypatch, wgmma, dtype, d):
    """G = H / Hkv even: on compute capability 9.0 the forward and the backward run the sm_90a
    kernels (TMA copies, wgmma); FLASHTREE_WGMMA=0 (here: _WGMMA False) the portable ones."""
    monkeypatch.setattr(dfs, "_WGMMA", wgmma)
    if wgmma and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels need compute capability 9.0")
    sq, ek, cu, _ = random_pack(gen, num_trees=3, max_nodes=30, max_len=40)
    _check_gpu_case(sq, ek, cu, 8, 2, d, dtype, gen)
    sq, ek, cu = tree.dfs_arrays_from_groups([(300, [150, 77, 1]), (64, [64, 64])])  # tiles across nodes and sequences
    _check_gpu_case(sq, ek, cu, 4, 2, d, dtype, gen, noncontig=True)


@pytest.mark.gpu
@pytest.mark.parametrize("h, hkv, dtype, d", [(6, 3, torch.bfloat16, 128), (4, 1, torch.float16, 64),
                                              (2, 1, torch.bfloat16, 128)])
def test_gpu_hopper_kernels_odd_kv_head_counts(gen, h, hkv, dtype, d):
    """G even and Hkv odd (GQA and MQA on the Hopper kernels): every (K tile, KV head) unit count,
    odd ones included (the last tree has 5 K tiles)."""
    sq, ek, cu, _ = random_pack(gen, num_trees=3, max_nodes=30, max_len=40)
    _check_gpu_case(sq, ek, cu, h, hkv, d, dtype, gen)
    sq, ek, cu = tree.dfs_arrays_from_groups([(129, [64, 1, 70])])  # 5 K tiles: an odd unit count
    _check_gpu_case(sq, ek, cu, h, hkv, d, dtype, gen)


@pytest.mark.gpu
def test_gpu_groups_odd_sizes_and_strided_inputs(gen):
    sq, ek, cu = tree.dfs_arrays_from_groups([(131, [67, 1, 64, 129]), (1, [1]), (63, [])])
    _check_gpu_case(sq, ek, cu, 4, 2, 128, torch.bfloat16, gen, noncontig=True)


@pytest.mark.gpu
def test_gpu_sharp_growing_scores(gen):
    sq, ek, cu = tree.dfs_arrays_from_groups([(300, [97, 150]), (129, [64])])
    _check_gpu_case(sq, ek, cu, 4, 2, 128, torch.float16, gen, sharp=True)


@pytest.mark.gpu
def test_gpu_deep_tree_and_lse_gradient(gen):
    sq, ek, cu, _ = random_pack(gen, num_trees=1, max_nodes=200, max_len=9)
    n, h, hkv, d = len(sq), 4, 4, 64
    q64, k64, v64 = qkv(n, h, hkv, d, torch.float64, "cuda", gen)
    sq, ek, cu = sq.cuda(), ek.cuda(), cu.cuda()
    o64, lse64 = reference.tree_attention(q64, k64, v64, cu, sq, ek, 0.125)
    wl = torch.randn_like(lse64)
    # lse does not depend on v: only q and k receive gradients.
    ref = torch.autograd.grad((lse64 * wl).sum(), (q64, k64))
    q, k, v = (x.detach().half().requires_grad_() for x in (q64, k64, v64))
    _, lse = flashtree.tree_attention(q, k, v, cu, sq, ek, softmax_scale=0.125, return_lse=True)
    got = torch.autograd.grad((lse * wl.float()).sum(), (q, k))
    for a, b, name in zip(got, ref, "qk"):
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-2 * (1 + b.abs().max().item()), (name, err)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic(gen):
    sq, ek, cu, _ = random_pack(gen, num_trees=2, max_nodes=20, max_len=40)
    q, k, v, cu, sq, ek, do = _check_gpu_case(sq, ek, cu, 8, 2, 128, torch.bfloat16, gen)
    runs = []
    for _ in range(3):
        o = flashtree.tree_attention(q, k, v, cu, sq, ek, deterministic=True)
        runs.append((o,) + torch.autograd.grad(o, (q, k, v), do))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_visited_tiles_follow_the_tile_map(gen):
    sq, ek, cu = tree.dfs_arrays_from_groups([(256, [128] * 4), (100, [30, 70])])
    sq2, ek2, cu2, _ = random_pack(gen, num_trees=2, max_nodes=60, max_len=20)
    for s, e, c in ((sq, ek, cu), (sq2, ek2, cu2)):
        n = len(s)
        q, k, v = qkv(n, 2, 1, 64, torch.bfloat16, "cuda", gen, requires_grad=False)
        visited = dfs.visited_tiles(q, k, v, c.cuda(), s.cuda(), e.cuda())
        expected = sum(int(m.sum()) for m, _ in dfs.tile_map(c, s, e))
        assert int(visited[:, 0].sum()) == expected
        assert torch.equal(visited[:, 0], visited[:, 1])


@pytest.mark.gpu
def test_gpu_chain_equals_sdpa_causal(gen):
    lens = [300, 77]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
    n = sum(lens)
    z = torch.zeros(n, dtype=torch.int32, device="cuda")
    q, k, v = qkv(n, 8, 8, 128, torch.bfloat16, "cuda", gen, requires_grad=False)
    o = flashtree.tree_attention(q, k, v, cu, z, z)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True)
        torch.testing.assert_close(o[a:b], ref.transpose(0, 1), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_torch_compile_and_graph_capture(gen):
    sq, ek, cu = (x.cuda() for x in tree.dfs_arrays_from_groups([(70, [33, 12])]))
    n = len(sq)
    q, k, v = qkv(n, 4, 2, 64, torch.float16, "cuda", gen)
    eager = flashtree.tree_attention(q, k, v, cu, sq, ek)
    g_eager = torch.autograd.grad(eager.float().square().sum(), (q, k, v))

    @torch.compile(fullgraph=True)
    def step(q, k, v):
        return flashtree.tree_attention(q, k, v, cu, sq, ek).float().square().sum()

    loss = step(q, k, v)
    g = torch.autograd.grad(loss, (q, k, v))
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(loss, eager.float().square().sum())

    qs, ks, vs = (x.detach() for x in (q, k, v))
    flashtree.tree_attention(qs, ks, vs, cu, sq, ek)  # warm up: compile, check cu_seqlens once
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashtree.tree_attention(qs, ks, vs, cu, sq, ek)
    out.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(out, eager.detach())
