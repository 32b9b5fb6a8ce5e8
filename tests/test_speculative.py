"""Speculative tree decoding: tree specs, acceptance rules, HF integration, exact greedy equivalence."""
import math

import pytest
import torch

from flashtree import speculative as sp
from flashtree import tree
from flashtree.kvcache import CacheOverflowError

transformers = pytest.importorskip("transformers")

SMALL_MEDUSA = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run far faster on one thread (and CI machines are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_parents(t, g):
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]


# ------------------------------------------------------------------------------------ tree specs


def test_batched_tree_tensors_match_tree_spec(gen):
    for t in (1, 2, 5, 17, 64):
        rows = [_random_parents(t, gen) for _ in range(3)]
        bt = tree.batched_tree_tensors(torch.tensor(rows), t - 1)
        for b, p in enumerate(rows):
            spec = tree.TreeSpec.from_parents(p)
            assert torch.equal(bt.mask[b], spec.mask)
            assert torch.equal(bt.depths[b], spec.depths.long())
            assert torch.equal(bt.dfs_order[b], spec.dfs_order.long())
            for i in range(t):  # paths[b, i] walks root -> i
                path = [int(x) for x in bt.paths[b, i] if x >= 0]
                assert path[-1] == i and path[0] == 0
                assert all(p[path[k]] == path[k - 1] for k in range(1, len(path)))


def test_static_tree_tensors_for_chain_and_medusa():
    chain = tree.tree_tensors(tree.TreeSpec.chain(5))
    assert chain.paths.tolist() == [[0, 1, 2, 3, 4]]
    assert torch.equal(chain.mask, torch.ones(5, 5, dtype=torch.bool).tril())
    medusa = tree.tree_tensors(tree.TreeSpec.from_paths(tree.MEDUSA_63))
    assert medusa.num_nodes == 64 and medusa.max_depth == 4
    assert medusa.position_ids(torch.tensor([10, 20])).shape == (2, 64)
    assert medusa.position_ids(torch.tensor([10]))[0, 1:11].tolist() == [11] * 10


def test_topk_tree_keeps_best_closed_set(gen):
    # root, 3 children, each with 2 children; cumulative scores decrease along paths
    parents = torch.tensor([[-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]])
    step = -torch.rand(1, 10, generator=gen)
    scores = step.clone()
    for i in range(4, 10):
        scores[0, i] = scores[0, int(parents[0, i])] + step[0, i]
    for keep in (1, 4, 7, 10):
        new_parents, kept = tree.topk_tree(parents, scores, keep)
        tree.validate_parents(new_parents[0])
        chosen = set(kept[0].tolist())
        assert all(int(parents[0, c]) in chosen for c in chosen if c)  # closed under ancestors
        others = [float(scores[0, i]) for i in range(1, 10) if i not in chosen]
        mine = [float(scores[0, i]) for i in chosen if i]
        assert not others or not mine or min(mine) >= max(others)
        for n, c in enumerate(kept[0].tolist()):
            if n:
                assert kept[0, int(new_parents[0, n])] == parents[0, c]


def test_children_table():
    table = tree.children_table(torch.tensor([-1, 0, 0, 1, 0, 3]))
    assert table.tolist() == [[1, 2, 4], [3, -1, -1], [-1, -1, -1], [5, -1, -1], [-1, -1, -1], [-1, -1, -1]]


# ------------------------------------------------------------------------------------ acceptance


def _root_path(parents, node):
    """Node ids from the root (0) down to ``node``."""
    path = [node]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    return path[::-1]


def _greedy_reference(tokens, logits, parents):
    """Brute force over every node: the deepest node whose whole path matches (first in path order)."""
    target = logits.argmax(-1).tolist()
    best_len, best_path = 0, [0]
    t = len(parents)
    for leaf in range(t):
        path = _root_path(parents, leaf)
        n = 0
        for k in range(1, len(path)):
            if tokens[path[k]] != target[path[k - 1]]:
                break
            n += 1
        if n > best_len:
            best_len, best_path = n, path[:n + 1]
    return best_path, target[best_path[-1]]


@pytest.mark.parametrize("shared", [True, False])
def test_greedy_accept_matches_brute_force(gen, shared):
    b, t, v = 6, 23, 5  # a tiny vocabulary makes long matches likely
    rows = [_random_parents(t, gen)] * b if shared else [_random_parents(t, gen) for _ in range(b)]
    logits = torch.randn(b, t, v, generator=gen)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    tt = (tree.tree_tensors(tree.TreeSpec.from_parents(rows[0])) if shared
          else tree.batched_tree_tensors(torch.tensor(rows), t - 1))
    acc = sp.greedy_accept(tokens, logits, tt)
    for i in range(b):
        path, bonus = _greedy_reference(tokens[i].tolist(), logits[i], rows[i])
        n = int(acc.length[i])
        got = acc.nodes[i, :n].tolist()
        assert n == len(path)
        # equally long paths may differ: check the chosen one is valid and as long
        assert got[0] == 0 and all(rows[i][got[k]] == got[k - 1] for k in range(1, n))
        target = logits[i].argmax(-1)
        bonus = int(target[got[-1]])
        assert int(acc.bonus[i]) == bonus
        assert all(int(tokens[i, got[k]]) == int(target[got[k - 1]]) for k in range(1, n))
        assert acc.tokens[i, :n].tolist() == [int(tokens[i, x]) for x in got[1:]] + [bonus]
        assert acc.nodes[i, n:].tolist() == [got[-1]] * (acc.nodes.shape[1] - n)


def test_typical_accept_matches_reference(gen):
    b, t, v = 5, 9, 6
    parents = _random_parents(t, gen)
    tt = tree.tree_tensors(tree.TreeSpec.from_parents(parents))
    logits = torch.randn(b, t, v, generator=gen) * 2
    tokens = torch.randint(0, v, (b, t), generator=gen)
    temp, eps, alpha = 0.7, 0.09, 0.3
    acc = sp.typical_accept(tokens, logits, tt, temperature=temp, posterior_threshold=eps, posterior_alpha=alpha,
                            generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits / temp, -1)
    for i in range(b):
        def ok(node):
            p = probs[i, parents[node]]
            ent = -(p * p.log()).sum()
            return p[tokens[i, node]] > min(eps, alpha * math.exp(-ent))
        best = 0
        for leaf in range(t):
            path = _root_path(parents, leaf)
            n = 0
            while n + 1 < len(path) and ok(path[n + 1]):
                n += 1
            best = max(best, n)
        assert int(acc.length[i]) == best + 1


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_sampling_accept_is_lossless(with_draft_probs):
    """Many copies of one step: the first emitted token follows the target distribution, and so does the
    second given the first (chi-square-style bound on every cell)."""
    g = torch.Generator().manual_seed(1234)
    v, n = 4, 40000
    parents = [-1, 0, 0, 1, 1, 2]
    tt = tree.tree_tensors(tree.TreeSpec.from_parents(parents))
    logits = torch.randn(1, 6, v, generator=g).expand(n, -1, -1)
    if with_draft_probs:
        q = torch.softmax(torch.randn(1, 6, v, generator=g), -1)
        tokens = torch.zeros(n, 6, dtype=torch.int64)
        for node in range(1, 6):  # children drawn i.i.d. from q at their parent
            tokens[:, node] = torch.multinomial(q[0, parents[node]], n, replacement=True, generator=g)
        draft_probs = q.expand(n, -1, -1)
    else:
        tokens = torch.tensor([[0, 1, 2, 0, 3, 1]]).expand(n, -1)
        draft_probs = None
    acc = sp.sampling_accept(tokens, logits, tt, temperature=1.0, draft_probs=draft_probs, generator=g)
    p = torch.softmax(logits[0].double(), -1)
    first = acc.tokens[:, 0]
    freq = torch.bincount(first, minlength=v).double() / n
    assert (freq - p[0]).abs().max() < 4 * math.sqrt(0.25 / n) + 1e-3, (freq, p[0])
    # the second token, given the first was a particular accepted child token
    if not with_draft_probs:
        sel = (first == 1) & (acc.length >= 2)  # token 1 is node 1: the next token follows p at node 1
        second = acc.tokens[sel, 1]
        freq2 = torch.bincount(second, minlength=v).double() / sel.sum()
        assert (freq2 - p[1]).abs().max() < 4 * math.sqrt(0.25 / int(sel.sum())) + 1e-3, (freq2, p[1])


def test_acceptance_bad_input():
    tt = tree.tree_tensors(tree.TreeSpec.chain(4))
    with pytest.raises(ValueError, match=r"logits: expected shape \[B, T, V\] = \[2, 4, V\]"):
        sp.greedy_accept(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 5, 7), tt)
    with pytest.raises(ValueError, match=r"logits: expected shape \[B, T, V\] = \[2, 4, V\]"):
        sp.greedy_accept(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 4, 7), tt)
    with pytest.raises(ValueError, match="tree: expected T = 3 nodes"):
        sp.greedy_accept(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, 7), tt)
    with pytest.raises(ValueError, match=r"parents\[2\]: expected 0 <= parents\[2\] < 2"):
        tree.TreeSpec.from_parents([-1, 0, 3, 1])
    bad = tt._replace(mask=tt.mask.clone())
    bad.mask[3, 0] = False
    with pytest.raises(ValueError, match=r"tree.mask: expected the ancestor mask of tree.parents, got mask\[3, 0\]"):
        sp.validate_tree(bad)
    with pytest.raises(ValueError, match=r"tree.parents\[1\]"):
        sp.validate_tree(tree.batched_tree_tensors(torch.tensor([[-1, 0, 1], [-1, 0, 1]]), 2)._replace(
            parents=torch.tensor([[-1, 0, 1], [-1, 2, 1]])))


# ------------------------------------------------------------------- HF transformers equivalence


def _tiny(num_layers=2, head_dim=None, seed=0, dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                      head_dim=head_dim or 16, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _reference(model, ids, n):
    # an explicit attention mask: HF would otherwise treat prompt tokens equal to pad_token_id as padding
    return torch.cat([model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), max_new_tokens=n,
                                     do_sample=False) for i in range(ids.shape[0])])


@pytest.fixture(scope="module")
def tiny():
    model = _tiny()
    heads = sp.MedusaHeads.from_target(model, 3, noise=0.2, generator=torch.Generator().manual_seed(1)).eval()
    return model, sp.truncated_draft(model), heads


CASES = [
    ("medusa-small-tree", "medusa", SMALL_MEDUSA, {}),
    ("medusa-chain", "medusa", tree.TreeSpec.chain(4), {}),
    ("draft-chain", "draft", tree.TreeSpec.chain(3), {}),
    ("draft-medusa-like", "draft", tree.TreeSpec.from_paths(SMALL_MEDUSA), {}),
    ("eagle-dynamic", "eagle", None, {}),
    ("eagle-dynamic-paged", "eagle", None, dict(paged=True, page_size=8)),
    ("glide-cape", "glide", None, {}),
    ("medusa-sdpa-baseline", "medusa", SMALL_MEDUSA, dict(attn="sdpa")),
]


def _drafter(kind, model, draft, heads):
    if kind == "medusa":
        return sp.MedusaDrafter(heads)
    if kind == "draft":
        return sp.DraftModelDrafter(draft)
    if kind == "eagle":
        return sp.DraftModelDrafter(draft, topk=3, depth=3, num_nodes=9)
    return sp.GlideDrafter(sp.GlideDraft.from_target(model), depth=3,
                           cape=sp.CapeConfig(confident=0.5, coverage=0.6, max_candidates=3))


@pytest.mark.parametrize("name,kind,spec,kwargs", CASES, ids=[c[0] for c in CASES])
def test_greedy_speculative_equals_hf_greedy(tiny, name, kind, spec, kwargs):
    model, draft, heads = tiny
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    bsz = 1 if kwargs.get("attn") == "sdpa" else 2
    ids = torch.randint(0, 128, (bsz, 7), generator=g)
    n = 20
    expected = _reference(model, ids, n)
    out, stats = sp.generate(model, _drafter(kind, model, draft, heads), ids, tree=spec, max_new_tokens=n,
                             return_stats=True, validate=True, **kwargs)
    assert out.tolist() == expected.tolist()
    assert len(stats.step_ms) < n  # at least one step emitted more than one token
    assert model.config._attn_implementation == "sdpa"  # restored


def test_medusa_63_tree_equals_hf_greedy(tiny):
    model, _, _ = tiny
    heads = sp.MedusaHeads.from_target(model, 4, noise=0.2, generator=torch.Generator().manual_seed(2)).eval()
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    out = sp.generate(model, sp.MedusaDrafter(heads), ids, tree=tree.MEDUSA_63, max_new_tokens=12)
    assert out.tolist() == _reference(model, ids, 12).tolist()


def test_long_prompt_prefills_in_chunks(tiny):
    model, draft, _ = tiny
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(4))
    out = sp.generate(model, sp.DraftModelDrafter(draft), ids, tree=tree.TreeSpec.chain(3), max_new_tokens=6)
    assert out.tolist() == _reference(model, ids, 6).tolist()


def test_sampling_and_typical_run_and_are_seeded(tiny):
    model, draft, heads = tiny
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    for acceptance in ("sampling", "typical"):
        runs = [sp.generate(model, sp.MedusaDrafter(heads), ids, tree=SMALL_MEDUSA, max_new_tokens=10,
                            acceptance=acceptance, temperature=0.8, generator=torch.Generator().manual_seed(7))
                for _ in range(2)]
        assert runs[0].tolist() == runs[1].tolist()
        assert ((runs[0][:, 6:] >= 0) & (runs[0][:, 6:] < 128)).all()


def test_cache_overflow_raises_with_nothing_lost(tiny):
    model, _, heads = tiny
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    with pytest.raises(CacheOverflowError, match="nothing was committed"):
        sp.generate(model, sp.MedusaDrafter(heads), ids, tree=SMALL_MEDUSA, max_new_tokens=30, capacity=9)
    assert model.config._attn_implementation == "sdpa"


def test_flashtree_cache_is_an_hf_cache(tiny):
    from transformers import Cache

    from flashtree.integrations import hf_verify

    model, _, _ = tiny
    cache = hf_verify.FlashTreeCache.for_model(model, 2, 40)
    assert isinstance(cache, Cache) and len(cache) == 2 and cache.get_max_length() == 40
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(8))
    with hf_verify.attention_implementation(model, hf_verify.VERIFY_ATTENTION):
        logits, _ = hf_verify.prefill(model, cache, ids)
    assert cache.get_seq_length() == 5 and cache.kv_seq_len.tolist() == [5, 5]
    ref = model(ids).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="flashtree_cache: expected the FlashTreeCache"):
        hf_verify.verify_attention(model.model.layers[0].self_attn, None, None, None, None)


def test_generate_bad_input(tiny):
    model, _, heads = tiny
    with pytest.raises(ValueError, match="acceptance: expected"):
        sp.generate(model, sp.MedusaDrafter(heads), torch.zeros(1, 3, dtype=torch.int64), acceptance="best")
    with pytest.raises(ValueError, match="input_ids: expected batch size 1 with attn='sdpa'"):
        sp.generate(model, sp.MedusaDrafter(heads), torch.zeros(2, 3, dtype=torch.int64), attn="sdpa")


# ------------------------------------------------------------------------------------------ GPU


def _first_divergence_margin(model, ids, got, n):
    """Where greedy outputs differ, the target's top-2 logit gap there (a near tie allows a flip)."""
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    seq = ref.sequences[0].tolist()
    for k, (a, b) in enumerate(zip(seq[ids.shape[1]:], got[ids.shape[1]:])):
        if a != b:
            top2 = ref.scores[k][0].float().topk(2).values
            return k, float(top2[0] - top2[1])
    return None, None


@pytest.mark.gpu
@pytest.mark.parametrize("kind,spec,kwargs", [("medusa", tree.MEDUSA_63, {}), ("draft", tree.TreeSpec.chain(4), {}),
                                               ("eagle", None, dict(paged=True, page_size=16)),
                                               ("glide", None, {})])
def test_gpu_greedy_speculative_equals_hf_greedy(kind, spec, kwargs):
    """fp16 on the GPU (the kernels take fp16/bf16, head_dim 64): the outputs must equal HF's greedy
    decoding, except that a flip is tolerated at a near tie (top-2 logit gap < 0.02), where fp16
    rounding of two different attention kernels may legitimately disagree."""
    model = _tiny(head_dim=64, seed=11, dtype=torch.float16, device="cuda")
    draft = sp.truncated_draft(model)
    heads = sp.MedusaHeads.from_target(model, 4, noise=0.2, generator=torch.Generator().manual_seed(1)).eval()
    g = torch.Generator().manual_seed(12)
    for _ in range(3):
        ids = torch.randint(0, 128, (1, 11), generator=g).cuda()
        out = sp.generate(model, _drafter(kind, model, draft, heads), ids, tree=spec, max_new_tokens=24, **kwargs)
        k, margin = _first_divergence_margin(model, ids, out[0].tolist(), 24)
        assert k is None or margin < 0.02, f"diverged at new token {k} with top-2 gap {margin}"
