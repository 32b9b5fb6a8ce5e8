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
