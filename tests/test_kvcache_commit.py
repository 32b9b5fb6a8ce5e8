"""flashtree.kvcache.commit_accepted: padded and paged caches, stacked/listed layers, overflow."""
import pytest
import torch

from flashtree.kvcache import CacheOverflowError, commit_accepted, stack_layers


def _reference_padded(kv, cur, nodes, length, lens):
    """Python loop: the expected cache and lengths after a commit (nothing for overflowing rows)."""
    kv, lens = kv.clone(), lens.clone()
    cap = kv.shape[-2]
    for b in range(nodes.shape[0]):
        n, base = int(length[b]), int(lens[b])
        if base + n > cap:
            continue
        for j in range(n):
            kv[..., b, :, base + j, :] = cur[..., b, :, int(nodes[b, j]), :]
        lens[b] = base + n
    return kv, lens


def _inputs(gen, layers=3, b=4, hkv=2, c=23, t=7, d=8, dtype=torch.float32, device="cpu"):
    kv = torch.randn(2, layers, b, hkv, c, d, generator=gen).to(device=device, dtype=dtype)
    cur = torch.randn(2, layers, b, hkv, t, d, generator=gen).to(device=device, dtype=dtype)
    width = 4
    nodes = torch.randint(0, t, (b, width), generator=gen)
    length = torch.randint(0, width + 1, (b,), generator=gen)
    lens = torch.randint(0, c - width + 1, (b,), generator=gen).to(torch.int32)
    return kv, cur, nodes.to(device), length.to(device), lens.to(device)


@pytest.mark.parametrize("form", ["stacked", "list-view", "list-separate", "single"])
def test_padded_matches_reference(gen, form):
    kv, cur, nodes, length, lens = _inputs(gen)
    expected, expected_lens = _reference_padded(kv, cur, nodes, length, lens)
    if form == "stacked":
        args = (kv[0], kv[1], cur[0], cur[1])
    elif form == "list-view":
        args = (list(kv[0]), list(kv[1]), list(cur[0]), list(cur[1]))
    elif form == "list-separate":
        ks = [x.clone() for x in kv[0]]
        vs = [x.clone() for x in kv[1]]
        args = (ks, vs, [x.clone() for x in cur[0]], [x.clone() for x in cur[1]])
    else:
        kv, expected = kv[:, :1], expected[:, :1]
        args = (kv[0, 0], kv[1, 0], cur[0, 0], cur[1, 0])
    overflow = commit_accepted(*args, nodes, length, lens)
    if form == "list-separate":
        kv = torch.stack([torch.stack(args[0]), torch.stack(args[1])])
    assert torch.equal(kv, expected)
    assert torch.equal(lens, expected_lens)
    assert not overflow.any()


def test_entries_past_length_are_ignored(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    length = torch.tensor([1, 2, 0, 3])
    garbage = nodes.clone()
    for b in range(4):
        garbage[b, int(length[b]):] = 10 ** 6
    expected, expected_lens = _reference_padded(kv, cur, nodes, length, lens)
    commit_accepted(kv[0], kv[1], cur[0], cur[1], garbage, length, lens)
    assert torch.equal(kv, expected) and torch.equal(lens, expected_lens)


def test_positions_past_the_new_length_are_untouched(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    before = kv.clone()
    start = lens.clone()
    commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens)
    for b in range(4):
        assert torch.equal(kv[..., b, :, int(lens[b]):, :], before[..., b, :, int(lens[b]):, :])
        assert torch.equal(kv[..., b, :, :int(start[b]), :], before[..., b, :, :int(start[b]), :])


def _paged(kv, page, gen):
    """A padded [2, L, B, Hkv, C, D] cache as shuffled pages [2, L, NP, Hkv, P, D] + block tables."""
    two, layers, b, hkv, c, d = kv.shape
    per = c // page
    perm = torch.randperm(b * per, generator=gen)
    pages = torch.empty(two, layers, b * per, hkv, page, d, dtype=kv.dtype)
    tables = perm.view(b, per).to(torch.int32)
    for s in range(b):
        for j in range(per):
            pages[:, :, int(tables[s, j])] = kv[:, :, s, :, j * page:(j + 1) * page]
    return pages, tables


def _unpage(pages, tables):
    two, layers, _, hkv, page, d = pages.shape
    b, per = tables.shape
    out = torch.empty(two, layers, b, hkv, per * page, d, dtype=pages.dtype)
    for s in range(b):
        for j in range(per):
            out[:, :, s, :, j * page:(j + 1) * page] = pages[:, :, int(tables[s, j])]
    return out


@pytest.mark.parametrize("page", [8, 16])
def test_paged_matches_reference(gen, page):
    kv, cur, nodes, length, lens = _inputs(gen, c=64)
    lens[0] = page - 2  # the tokens straddle a page boundary
    length[0] = 4
    expected, expected_lens = _reference_padded(kv, cur, nodes, length, lens)
    pages, tables = _paged(kv, page, gen)
    overflow = commit_accepted(pages[0], pages[1], cur[0], cur[1], nodes, length, lens, block_tables=tables)
    assert not overflow.any()
    assert torch.equal(_unpage(pages, tables), expected)
    assert torch.equal(lens, expected_lens)


def test_overflow_flags_and_loses_nothing(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    cap = kv.shape[-2]
    lens[1], length[1] = cap - 1, 3   # does not fit
    lens[2], length[2] = cap, 1       # a full cache
    lens[3], length[3] = cap - 3, 3   # fits exactly
    before = kv.clone()
    expected, expected_lens = _reference_padded(kv, cur, nodes, length, lens)
    overflow = commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens)
    assert overflow.tolist() == [False, True, True, False]
    assert torch.equal(kv, expected) and torch.equal(lens, expected_lens)
    assert torch.equal(kv[..., 1:3, :, :, :], before[..., 1:3, :, :, :])


def test_overflow_check_raises_before_writing(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    lens[2], length[2] = kv.shape[-2] - 1, 2
    before, before_lens = kv.clone(), lens.clone()
    with pytest.raises(CacheOverflowError, match=r"kv_seq_len\[2\] \+ accept_len\[2\]"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, check=True)
    assert torch.equal(kv, before) and torch.equal(lens, before_lens)


def test_paged_unmapped_page_is_an_overflow(gen):
    kv, cur, nodes, length, lens = _inputs(gen, c=32)
    pages, tables = _paged(kv, 8, gen)
    lens[0], length[0] = 7, 3  # needs page slot 1
    tables[0, 1] = -1
    before = pages.clone()
    overflow = commit_accepted(pages[0], pages[1], cur[0], cur[1], nodes, length, lens, block_tables=tables)
    assert overflow[0] and int(lens[0]) == 7
    # sequence 0's pages are unchanged
    for j in (0, 2, 3):
        assert torch.equal(pages[:, :, int(tables[0, j])], before[:, :, int(tables[0, j])])


def test_stack_layers_views_or_none():
    base = torch.zeros(3, 2, 5, 4)
    view = stack_layers(list(base))
    assert view is not None and view.data_ptr() == base.data_ptr() and view.shape == base.shape
    assert stack_layers([torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)]) is None
    assert stack_layers([base[0], base[2]]).stride(0) == 2 * base.stride(0)


def test_bad_input_names_the_argument(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    with pytest.raises(TypeError, match="kv_seq_len: expected dtype int32"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens.long())
    with pytest.raises(ValueError, match="accept_len"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length[:2], lens)
    with pytest.raises(ValueError, match="v_cache: expected 3 layers"):
        commit_accepted(kv[0], kv[1, :2], cur[0], cur[1], nodes, length, lens)
    with pytest.raises(ValueError, match=r"current_v \(layer 0\): expected shape \[4, 2, 7, 8\]"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1, :, :, :, :3], nodes, length, lens)
    with pytest.raises(TypeError, match="block_tables: expected dtype int32"):
        commit_accepted(kv[0, 0], kv[1, 0], cur[0, 0], cur[1, 0], nodes, length, lens,
                        block_tables=torch.zeros(4, 2, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_matches_reference_and_graph_capture(gen, dtype, paged):
    kv, cur, nodes, length, lens = _inputs(gen, layers=5, b=3, hkv=2, c=64, t=11, d=128, dtype=dtype)
    lens[1], length[1] = 63, 4  # overflow row
    expected, expected_lens = _reference_padded(kv, cur, nodes, length, lens)
    if paged:
        pages, tables = _paged(kv, 16, gen)
        dst, tables = pages.cuda(), tables.cuda()
    else:
        dst, tables = kv.cuda(), None
    args = (dst[0], dst[1], cur[0].cuda(), cur[1].cuda(), nodes.cuda(), length.cuda())
    dev_lens = lens.cuda()
    overflow = commit_accepted(*args, dev_lens, block_tables=tables)
    got = _unpage(dst.cpu(), tables.cpu()) if paged else dst.cpu()
    assert torch.equal(got, expected) and torch.equal(dev_lens.cpu(), expected_lens)
    assert overflow.tolist() == [False, True, False]
    # CUDA graph: capture one commit from the original state, replay twice (bitwise the same result)
    results = []
    start = dst.clone()
    dev_lens.copy_(lens.cuda())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        commit_accepted(*args, dev_lens, block_tables=tables)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    dst.copy_(start)
    dev_lens.copy_(lens.cuda())
    with torch.cuda.graph(graph):
        commit_accepted(*args, dev_lens, block_tables=tables)
    for _ in range(2):
        dst.copy_(start)
        dev_lens.copy_(lens.cuda())
        graph.replay()
        torch.cuda.synchronize()
        results.append((dst.clone(), dev_lens.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][1].cpu(), expected_lens)


# ------------------------------------------------------- CPU: edge rules shared by both paths


def test_paged_zero_length_never_overflows(gen):
    # Nothing is written, so an unmapped next page or a full table is no overflow (and nothing moves).
    kv, cur, nodes, length, lens = _inputs(gen, c=32)
    pages, tables = _paged(kv, 8, gen)
    lens[:] = torch.tensor([8, 32, 5, 16], dtype=torch.int32)
    length[:] = torch.tensor([0, 0, 0, 1])
    tables[0, 1] = -1  # the page after sequence 0's last one is unmapped
    before, before_lens = pages.clone(), lens.clone()
    overflow = commit_accepted(pages[0], pages[1], cur[0], cur[1], nodes, length, lens, block_tables=tables)
    assert overflow.tolist() == [False, False, False, False]
    assert torch.equal(lens, before_lens + torch.tensor([0, 0, 0, 1], dtype=torch.int32))
    changed = (pages != before).flatten(3).any(-1).any(0).any(0)  # [num_pages]: pages written
    assert changed.nonzero().flatten().tolist() == [int(tables[3, 2])]


def test_negative_length_in_cache_is_an_overflow(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    lens[1], length[1] = -2, 3
    before = kv.clone()
    overflow = commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens)
    assert overflow[1] and int(lens[1]) == -2
    assert torch.equal(kv[..., 1, :, :, :], before[..., 1, :, :, :])


def test_preallocated_overflow_is_filled_and_returned(gen):
    kv, cur, nodes, length, lens = _inputs(gen)
    lens[2], length[2] = kv.shape[-2] - 1, 2
    out = torch.ones(4, dtype=torch.bool)
    got = commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, overflow=out)
    assert got is out and out.tolist() == [False, False, True, False]
    with pytest.raises(TypeError, match="overflow: expected dtype bool"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, overflow=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"overflow: expected shape \[4\]"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, overflow=torch.zeros(3, dtype=torch.bool))


def test_commit_kernels_ship_and_their_parameter_buffers_match(monkeypatch, tmp_path):
    # test_jit.py compiles every shipped spec (sm_80, sm_90, zero spills); here: commit is shipped,
    # and the host's packed parameter buffer has the size of the kernel's parameter list.
    import re

    from flashtree import _jit
    from flashtree._jit import nvrtc
    from flashtree.kvcache import commit

    names = [s.name for s in _jit.shipped_specs(["commit"])]
    assert names == ["commit_f16", "commit_bf16", "commit_f32", "commit_advance"]
    monkeypatch.setenv("FLASHTREE_CACHE_DIR", str(tmp_path))
    for spec, layout in ((commit.spec(torch.bfloat16), commit._COPY_PARAMS),
                         (commit.ADVANCE_SPEC, commit._ADVANCE_PARAMS)):
        ptx = nvrtc.ptx_for(spec, "sm_80")
        entry = ptx[ptx.index(".entry"):]
        entry = entry[:entry.index(")")]
        end = 0
        for align, kind, count in re.findall(r"\.param (?:\.align (\d+) )?\.(\w+) \w+(?:\[(\d+)\])?", entry):
            size = int(count) if count else int(kind[1:]) // 8
            end = -(-end // int(align or size)) * int(align or size) + size
        assert end == layout.size, spec.name


# ------------------------------------------------------------------- GPU: the commit kernels


def _cuda_case(gen, *, layers, b, hkv, c, t, d, dtype, width, index_dtype=torch.int64):
    """A [2, L, B, Hkv, C, D] cache and [2, L, B, Hkv, T, D] tree K/V on the GPU, ragged lengths
    (0 and A included), node ids partly out of range (clamped), room left in every sequence."""
    kv = torch.randn(2, layers, b, hkv, c, d, generator=gen).to(dtype).cuda()
    cur = torch.randn(2, layers, b, hkv, t, d, generator=gen).to(dtype).cuda()
    nodes = torch.randint(-2, t + 2, (b, width), generator=gen).to(index_dtype).cuda()
    length = torch.randint(0, width + 1, (b,), generator=gen)
    length[0], length[-1] = 0, width
    lens = torch.randint(0, c - width + 1, (b,), generator=gen).to(torch.int32)
    return kv, cur, nodes, length.to(index_dtype).cuda(), lens.cuda()


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel-path commits; ``launches.torch(fn)`` runs fn with the kernels switched off."""
    from flashtree.kvcache import commit

    count = []
    real = commit._launch
    monkeypatch.setattr(commit, "_launch", lambda *a: (count.append(1), real(*a)))

    class Counter:
        def __len__(self):
            return len(count)

        def torch(self, fn):
            with monkeypatch.context() as m:
                m.setattr(commit, "_kernel_ready", lambda *a: False)
                return fn()

    return Counter()


def _both(launches, make_args):
    """The commit on two fresh copies of the inputs, by the kernels (checked to launch) and by the
    torch path: (arguments after the kernels, their flags, arguments after torch, its flags)."""
    args_k, args_t = make_args(), make_args()
    before = len(launches)
    flags_k = commit_accepted(*args_k)
    assert len(launches) - before == 1
    flags_t = launches.torch(lambda: commit_accepted(*args_t))
    torch.cuda.synchronize()
    return args_k, flags_k, args_t, flags_t


def _assert_same(args_k, flags_k, args_t, flags_t):
    def flat(x):
        return list(x) if isinstance(x, (list, tuple)) else [x]

    for a, b in zip(args_k, args_t):
        for x, y in zip(flat(a), flat(b)):
            assert torch.equal(x, y)
    assert torch.equal(flags_k, flags_t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 96),
                                      (torch.float16, 256), (torch.float32, 64)])
@pytest.mark.parametrize("form", ["stacked", "list-view", "separate-kv", "single"])
def test_gpu_padded_matches_torch_path_and_loop(gen, launches, dtype, d, form):
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=5, b=7, hkv=3, c=41, t=13, d=d, dtype=dtype, width=6)
    lens[2], length[2] = 41 - 3, 6  # capacity overflow
    lens[3], length[3] = 41 - 4, 4  # fits exactly
    expected, expected_lens = _reference_padded(kv.cpu(), cur.cpu(), nodes.clamp(0, 12).cpu(), length.cpu(), lens.cpu())

    def make():
        k, c_ = kv.clone(), cur.clone()
        if form == "stacked":
            return k[0], k[1], c_[0], c_[1], nodes, length, lens.clone()
        if form == "list-view":
            return list(k[0]), list(k[1]), list(c_[0]), list(c_[1]), nodes, length, lens.clone()
        if form == "separate-kv":  # K and V caches in two allocations, each a stack
            return k[0].clone(), k[1].clone(), c_[0].clone(), c_[1].clone(), nodes, length, lens.clone()
        return k[0, 0], k[1, 0], c_[0, 0], c_[1, 0], nodes, length, lens.clone()

    args_k, flags_k, args_t, flags_t = _both(launches, make)
    _assert_same(args_k, flags_k, args_t, flags_t)
    got = torch.stack([torch.stack(list(args_k[0])) if form != "single" else args_k[0][None],
                       torch.stack(list(args_k[1])) if form != "single" else args_k[1][None]]).cpu()
    want = expected if form != "single" else expected[:, :1]
    assert torch.equal(got, want)
    assert torch.equal(args_k[6].cpu(), expected_lens)
    assert flags_k.tolist() == [False, False, True, False, False, False, False]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [4, 16])
def test_gpu_paged_matches_torch_path_with_overflows(gen, launches, dtype, page):
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=3, b=6, hkv=2, c=64, t=11, d=128, dtype=dtype, width=5,
                                              index_dtype=torch.int32)
    pages, tables = _paged(kv.cpu(), page, gen)
    pages, tables = pages.cuda(), tables.cuda()
    lens[1], length[1] = page - 2, 5       # straddles a page boundary
    lens[2], length[2] = 2 * page, 3       # its page is unmapped (-1): overflow
    tables[2, 2] = -1
    lens[3], length[3] = 3 * page, 2       # its page id is past num_pages: overflow
    tables[3, 3] = pages.shape[2]
    lens[4], length[4] = 64 - 1, 2         # past capacity: overflow
    before = pages.clone()

    def make():
        p = pages.clone()
        return p[0], p[1], cur[0], cur[1], nodes, length, lens.clone()

    args_k = make()
    flags = commit_accepted(*args_k[:7], block_tables=tables)
    args_t = make()
    flags_t = launches.torch(lambda: commit_accepted(*args_t[:7], block_tables=tables))
    assert len(launches) == 1
    _assert_same(args_k, flags, args_t, flags_t)
    assert flags.tolist() == [False, False, True, True, True, False]
    assert torch.equal(args_k[6][2:5], lens[2:5])
    assert torch.equal(args_k[6][:2].long(), (lens[:2] + length[:2]).long())
    # The overflowing sequences' mapped pages are bitwise untouched.
    for s in (2, 3, 4):
        for j in range(tables.shape[1]):
            pid = int(tables[s, j])
            if 0 <= pid < pages.shape[2]:
                assert torch.equal(args_k[0][:, pid], before[0, :, pid])
                assert torch.equal(args_k[1][:, pid], before[1, :, pid])


@pytest.mark.gpu
def test_gpu_non_contiguous_inputs_and_strided_indices(gen, launches):
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=4, b=5, hkv=2, c=37, t=9, d=128,
                                              dtype=torch.bfloat16, width=4, index_dtype=torch.int32)
    # current: T sliced out of a longer staging buffer, and a [B, T, Hkv, D] layout transposed
    big = torch.randn(2, 4, 5, 2, 12, 128, generator=gen).to(torch.bfloat16).cuda()
    big[..., :9, :] = cur
    tr = cur.transpose(4, 3).contiguous().transpose(4, 3)
    assert not tr.is_contiguous()
    lens_buf = torch.zeros(5, 3, dtype=torch.int32, device="cuda")
    acc_buf = torch.zeros(5, 2, dtype=torch.int32, device="cuda")
    nodes_t = nodes.t().contiguous().t()  # [B, A] column-major

    def make(source):
        k = kv.clone()
        lb, ab = lens_buf.clone(), acc_buf.clone()
        lb[:, 1], ab[:, 1] = lens, length
        return k[0], k[1], source[0], source[1], nodes_t, ab[:, 1], lb[:, 1]

    for source in (big[..., :9, :], tr):
        args_k, flags_k, args_t, flags_t = _both(launches, lambda: make(source))
        _assert_same(args_k, flags_k, args_t, flags_t)
    expected, expected_lens = _reference_padded(kv.cpu(), cur.cpu(), nodes.clamp(0, 8).cpu(), length.cpu(), lens.cpu())
    assert torch.equal(torch.stack([args_k[0], args_k[1]]).cpu(), expected)
    assert torch.equal(args_k[6].cpu(), expected_lens)


@pytest.mark.gpu
def test_gpu_many_sequences_and_fallbacks(gen, launches):
    # B > one advance block; then two layouts the kernels refuse (8-byte rows; separately allocated
    # layers) take the torch path and give the same result.
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=2, b=131, hkv=1, c=19, t=5, d=64, dtype=torch.float16,
                                              width=3)
    lens[::7] = 18  # overflow wherever length > 1
    want_flags = (lens.long() + length.long() > 19).cpu()
    assert want_flags.any()
    expected, expected_lens = _reference_padded(kv.cpu(), cur.cpu(), nodes.clamp(0, 4).cpu(), length.cpu(), lens.cpu())
    flags = commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens)
    assert len(launches) == 1
    assert torch.equal(kv.cpu(), expected) and torch.equal(lens.cpu(), expected_lens)
    assert torch.equal(flags.cpu(), want_flags)

    small, scur, snodes, slen, slens = _cuda_case(gen, layers=2, b=3, hkv=2, c=11, t=4, d=4, dtype=torch.bfloat16,
                                                  width=2)
    expected, expected_lens = _reference_padded(small.cpu(), scur.cpu(), snodes.clamp(0, 3).cpu(), slen.cpu(),
                                                slens.cpu())
    commit_accepted(small[0], small[1], scur[0], scur[1], snodes, slen, slens)
    assert len(launches) == 1
    assert torch.equal(small.cpu(), expected) and torch.equal(slens.cpu(), expected_lens)

    kv, cur, nodes, length, lens = _cuda_case(gen, layers=3, b=2, hkv=2, c=16, t=6, d=64, dtype=torch.bfloat16,
                                              width=3)
    expected, expected_lens = _reference_padded(kv.cpu(), cur.cpu(), nodes.clamp(0, 5).cpu(), length.cpu(), lens.cpu())
    ks, vs = [x.clone() for x in kv[0]], [x.clone() for x in kv[1]]
    commit_accepted(ks, vs, list(cur[0]), list(cur[1]), nodes, length, lens)
    assert len(launches) == 1
    assert torch.equal(torch.stack([torch.stack(ks), torch.stack(vs)]).cpu(), expected)
    assert torch.equal(lens.cpu(), expected_lens)


@pytest.mark.gpu
def test_gpu_check_raises_before_writing(gen):
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=2, b=3, hkv=2, c=20, t=5, d=64, dtype=torch.bfloat16,
                                              width=3)
    lens[1], length[1] = 19, 2
    before, before_lens = kv.clone(), lens.clone()
    with pytest.raises(CacheOverflowError, match=r"kv_seq_len\[1\] \+ accept_len\[1\]"):
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, check=True)
    torch.cuda.synchronize()
    assert torch.equal(kv, before) and torch.equal(lens, before_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_graph_capture_replays_bitwise(gen, launches, paged):
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=6, b=4, hkv=2, c=48, t=10, d=128, dtype=torch.bfloat16,
                                              width=5)
    lens[2], length[2] = 47, 5  # overflow
    tables = None
    if paged:
        pages, tables = _paged(kv.cpu(), 8, gen)
        kv, tables = pages.cuda(), tables.cuda()
    start, start_lens = kv.clone(), lens.clone()
    flags = torch.empty(4, dtype=torch.bool, device="cuda")
    eager = commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, block_tables=tables)
    want, want_lens, want_flags = kv.clone(), lens.clone(), eager.clone()
    kv.copy_(start)
    lens.copy_(start_lens)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, then restore
        commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, block_tables=tables, overflow=flags)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = commit_accepted(kv[0], kv[1], cur[0], cur[1], nodes, length, lens, block_tables=tables,
                              overflow=flags)
    assert got is flags
    for _ in range(2):
        kv.copy_(start)
        lens.copy_(start_lens)
        flags.fill_(True)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kv, want) and torch.equal(lens, want_lens) and torch.equal(flags, want_flags)
    assert want_flags.tolist() == [False, False, True, False]
    assert len(launches) >= 3


@pytest.mark.gpu
def test_gpu_llama_shaped_commit_matches_torch_path(gen, launches):
    # The speculative bench's shape: 32 layers, Hkv 8, D 128, bf16, 5 accepted nodes, stacked [2, L, ...].
    kv, cur, nodes, length, lens = _cuda_case(gen, layers=32, b=4, hkv=8, c=160, t=64, d=128,
                                              dtype=torch.bfloat16, width=5)

    def make():
        k = kv.clone()
        return k[0], k[1], cur[0], cur[1], nodes, length, lens.clone()

    _assert_same(*_both(launches, make))
