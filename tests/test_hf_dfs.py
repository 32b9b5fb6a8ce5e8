"""HF transformers integration: a packed tree through the "flashtree" attention equals separate runs.

CPU tests run the reference path of ``flashtree.tree_attention`` in float64 on tiny randomly initialised
Llama and Qwen2 models; GPU tests run the kernels in bf16 under the tolerance rule.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import flashtree  # noqa: E402
from flashtree import tree  # noqa: E402
from flashtree.integrations import hf  # noqa: E402
from tolerance import FACTOR, FLOOR, max_err  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0, tie_word_embeddings=False)
GROUPS = [(7, [3, 1, 6]), (5, [4, 2])]  # (prompt_len, [response_len, ...]) per packed sequence
# A float64 model is not float64 throughout: HF's RMSNorm and rotary tables compute in float32. So packed and
# separate runs agree to float32 rounding (gradients sum the shared prompt's contributions in another order),
# far below the O(1e-2) a single wrongly visible key makes.
TOL = dict(atol=1e-6, rtol=1e-5)


def make_config(family: str, **overrides):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    return cls(**{**TINY, **overrides})


def make_models(config, dtype, device, seed=0):
    """The same random weights twice: one model on "flashtree" attention, one on HF's SDPA attention (exact in
    float64, unlike HF's "eager", which takes the softmax in float32). Each gets its own copy of the config:
    transformers writes the implementation into the config object it is given."""
    torch.manual_seed(seed)
    tree_model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    plain = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    plain.load_state_dict(tree_model.state_dict())
    hf.enable(tree_model)
    assert tree_model.config._attn_implementation == "flashtree" and plain.config._attn_implementation == "sdpa"
    return tree_model.to(device, dtype), plain.to(device, dtype)


def random_groups(groups, gen, vocab=TINY["vocab_size"]):
    prompts = [torch.randint(0, vocab, (p,), generator=gen) for p, _ in groups]
    responses = [[torch.randint(0, vocab, (n,), generator=gen) for n in lens] for _, lens in groups]
    return prompts, responses


def packed_run(model, batch: hf.TreeInputs):
    """Target logits per response, prompt logits, summed response loss and parameter gradients."""
    model.zero_grad()
    logits = model(**batch.model_kwargs(), use_cache=False).logits
    loss = batch.response_loss(logits)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return [x.detach() for x in batch.node_logits(logits)], logits.detach()[0], loss.detach(), grads


def separate_runs(model, prompts, responses, device):
    """Each prompt + response on its own as a plain causal sequence; the losses are summed."""
    model.zero_grad()
    response_logits, prompt_logits, total = [], [], 0
    for prompt, group in zip(prompts, responses):
        for response in group:
            ids = torch.cat([prompt, response])[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0]
            p = prompt.numel()
            predicting = logits[p - 1:-1]  # the logits that predict the response tokens
            upcast = predicting if predicting.dtype == torch.float64 else predicting.float()
            total = total + F.cross_entropy(upcast, response.to(device), reduction="sum")
            response_logits.append(predicting.detach())
            prompt_logits.append(logits[:p].detach())
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return response_logits, prompt_logits, total.detach(), grads


def packed_prompt_logits(logits, groups):
    """The packed prompt rows, repeated once per response to line up with :func:`separate_runs`."""
    prompts, responses = tree.unpack(logits, groups)
    return [p for p, rs in zip(prompts, responses) for _ in rs]


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_tree_equals_separate_runs(family, gen):
    tree_model, plain = make_models(make_config(family), torch.float64, "cpu")
    prompts, responses = random_groups(GROUPS, gen)
    batch = hf.tree_inputs_from_groups(prompts, responses)

    logits_t, all_logits_t, loss_t, grads_t = packed_run(tree_model, batch)
    logits_s, prompt_logits_s, loss_s, grads_s = separate_runs(plain, prompts, responses, "cpu")

    assert len(logits_t) == len(logits_s) == 5
    for r, (a, b) in enumerate(zip(logits_t, logits_s)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"response {r}: {m}")
    for a, b in zip(packed_prompt_logits(all_logits_t, GROUPS), prompt_logits_s):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(loss_t, loss_s.to(loss_t.dtype), **TOL)
    assert grads_t.keys() == grads_s.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_t[name], grads_s[name], **TOL, msg=lambda m: f"{name}: {m}")


def test_the_tree_rule_matters(gen):
    """Negative control: without the DFS arrays (plain causal over the packed row) responses see each other."""
    tree_model, _ = make_models(make_config("llama"), torch.float64, "cpu")
    batch = hf.tree_inputs_from_groups(*random_groups(GROUPS, gen))
    kwargs = batch.model_kwargs()
    with_tree = tree_model(**kwargs, use_cache=False).logits
    del kwargs[hf.START_KWARG], kwargs[hf.END_KWARG]
    causal = tree_model(**kwargs, use_cache=False).logits
    row_differs = (with_tree[0] - causal[0]).abs().amax(-1) > 1e-6
    # Prompts and first responses see the same keys either way; every other response sees fewer in the tree.
    later_responses = list(range(10, 17)) + list(range(26, 28))
    assert row_differs.nonzero().flatten().tolist() == later_responses


def test_deep_tree_equals_its_paths(gen):
    """A multi-turn tree: every root-to-leaf path run alone gives the packed logits of its tokens."""
    tree_model, plain = make_models(make_config("llama"), torch.float64, "cpu")
    parents = [-1, 0, 1, 1, 0, 4, 5, 4]
    lens = [4, 3, 1, 5, 2, 2, 1, 3]
    nodes = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen) for n in lens]
    batch = hf.tree_inputs_from_parents(nodes, parents)
    with torch.no_grad():
        packed = tree_model(**batch.model_kwargs(), use_cache=False).logits[0]
    first = torch.tensor([0] + lens).cumsum(0)
    leaves = [k for k in range(len(parents)) if k not in parents]
    assert leaves == [2, 3, 6, 7]
    for leaf in leaves:
        path, node = [], leaf
        while node >= 0:
            path.insert(0, node)
            node = parents[node]
        idx = torch.cat([torch.arange(int(first[k]), int(first[k + 1])) for k in path])
        with torch.no_grad():
            alone = plain(input_ids=batch.input_ids[:, idx], use_cache=False).logits[0]
        torch.testing.assert_close(packed[idx], alone, **TOL, msg=lambda m: f"leaf {leaf}: {m}")


def test_without_packing_kwargs_is_causal_attention(gen):
    tree_model, plain = make_models(make_config("qwen2"), torch.float64, "cpu")
    ids = torch.randint(0, TINY["vocab_size"], (3, 11), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(tree_model(input_ids=ids, use_cache=False).logits,
                                   plain(input_ids=ids, use_cache=False).logits, **TOL)


def test_cu_seq_lens_alone_is_varlen_causal(gen):
    tree_model, plain = make_models(make_config("llama"), torch.float64, "cpu")
    lens = [5, 9, 2]
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = tree_model(input_ids=torch.cat(seqs)[None], position_ids=positions, cu_seq_lens_q=cu,
                            cu_seq_lens_k=cu, max_length_q=9, max_length_k=9, use_cache=False).logits[0]
        for s, a, b in zip(seqs, cu[:-1].tolist(), cu[1:].tolist()):
            alone = plain(input_ids=s[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, **TOL)


def test_index_tensors_reach_the_op_unchanged(monkeypatch, gen):
    """The same cu_seqlens object in every layer: tree_attention checks it on the host once per object."""
    seen = []
    real = flashtree.tree_attention

    def spy(q, k, v, cu, start_q, end_k, **kwargs):
        seen.append((cu, start_q, end_k, kwargs))
        return real(q, k, v, cu, start_q, end_k, **kwargs)

    monkeypatch.setattr(flashtree, "tree_attention", spy)
    tree_model, _ = make_models(make_config("llama"), torch.float64, "cpu")
    batch = hf.tree_inputs_from_groups(*random_groups(GROUPS, gen))
    with torch.no_grad():
        tree_model(**batch.model_kwargs(), use_cache=False)
        assert len(seen) == TINY["num_hidden_layers"]
        for cu, start_q, end_k, kwargs in seen:
            assert cu is batch.cu_seq_lens and start_q is batch.start_q and end_k is batch.end_k
            assert kwargs == {"max_seqlen": 17, "softmax_scale": 0.25}
        seen.clear()
        tree_model(input_ids=torch.randint(0, TINY["vocab_size"], (2, 5), generator=gen), use_cache=False)
        cu, start_q, _, _ = seen[0]
        assert cu.tolist() == [0, 5, 10] and start_q.tolist() == [0] * 10
        assert all(s[0] is cu and s[1] is start_q for s in seen)


def test_tree_inputs_layout():
    batch = hf.tree_inputs_from_groups([[10, 11, 12]], [[[20, 21], [30]]])
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.start_q.tolist() == [0, 0, 0, 1, 1, 2] and batch.end_k.tolist() == [2, 2, 2, 1, 1, 2]
    assert batch.cu_seq_lens.tolist() == [0, 6] and batch.max_length == 6
    assert batch.target_index.tolist() == [3, 4, 5]
    assert batch.predictor_index.tolist() == [2, 3, 2]  # a response's first token is predicted by the prompt's last
    assert batch.labels.tolist() == [20, 21, 30] and batch.target_lens == [2, 1]
    kwargs = batch.model_kwargs()
    assert kwargs["cu_seq_lens_q"] is kwargs["cu_seq_lens_k"] and kwargs[hf.START_KWARG] is batch.start_q

    deep = hf.tree_inputs_from_parents([[1, 2], [3], [4, 5], [6]], [-1, 0, 1, 0])
    assert deep.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]
    assert deep.predictor_index.tolist() == [1, 2, 3, 1] and deep.target_index.tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="pre-order"):
        hf.tree_inputs_from_parents([[1], [2], [3], [4]], [-1, 0, 0, 1])
    with pytest.raises(ValueError, match=r"responses\[0\]\[1\]"):
        hf.tree_inputs_from_groups([[1, 2]], [[[3], []]])


def test_register_is_idempotent():
    assert hf.register() == hf.register() == "flashtree"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # a dict before 4.50, then an AttentionInterface

    assert ALL_ATTENTION_FUNCTIONS["flashtree"] is hf.flashtree_attention_forward
    model = transformers.AutoModelForCausalLM.from_config(make_config("llama"), attn_implementation="sdpa")
    assert hf.enable(hf.enable(model)) is model
    assert model.config._attn_implementation == "flashtree"
    assert all(layer.self_attn.config._attn_implementation == "flashtree" for layer in model.model.layers)


def test_bad_kwargs_are_named():
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    start = torch.zeros(6, dtype=torch.int32)
    call = hf.flashtree_attention_forward
    with pytest.raises(ValueError, match="dropout"):
        call(None, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match=hf.END_KWARG):
        call(None, q, k, k, None, **{hf.START_KWARG: start})
    with pytest.raises(ValueError, match="use_cache=False"):
        call(None, q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), None)
    with pytest.raises(ValueError, match="batch size 1"):
        call(None, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), None,
             cu_seq_lens_q=torch.tensor([0, 6, 12], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seq_lens_q: expected dtype int32 or int64"):
        call(None, q, k, k, None, cu_seq_lens_q=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="sliding_window"):
        call(None, q, k, k, None, sliding_window=4)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("family,head_dim", [("llama", 64), ("qwen2", 128)])
def test_packed_tree_equals_separate_runs_gpu(family, head_dim, gen):
    """Kernels in bf16: the packed tree is at most FACTOR x as far from float64 separate runs as HF's own
    SDPA attention in bf16 on separate runs is, plus bf16's rounding floor (logits, loss, gradients)."""
    groups = [(37, [11, 1, 23, 6]), (19, [7, 30])]
    config = make_config(family, hidden_size=128, head_dim=head_dim, intermediate_size=256)
    tree_model, plain = make_models(config, torch.bfloat16, "cuda")
    _, plain64 = make_models(config, torch.float64, "cpu")
    prompts, responses = random_groups(groups, gen)
    batch = hf.tree_inputs_from_groups(prompts, responses, device="cuda")

    got = packed_run(tree_model, batch)
    base = separate_runs(plain, prompts, responses, "cuda")
    ref = separate_runs(plain64, prompts, responses, "cpu")
    got_logits, base_logits, ref_logits = (torch.cat(run[0]).cpu() for run in (got, base, ref))
    pairs = {"logits": (got_logits, base_logits, ref_logits),
             "loss": (got[2].cpu(), base[2].cpu(), ref[2]),
             "grads": tuple(torch.cat([g.flatten().cpu().double() for g in run[3].values()])
                            for run in (got, base, ref))}
    assert not torch.isnan(got_logits).any()
    for what, (out, baseline, reference) in pairs.items():
        err, base_err = max_err(out, reference), max_err(baseline, reference)
        limit = FACTOR * base_err + FLOOR[torch.bfloat16] * max(1.0, reference.abs().max().item())
        assert err <= limit, f"{what}: max error {err:.3e} > {FACTOR} x SDPA's {base_err:.3e} + floor"
