"""Suite ``dfs`` on the CPU: its reference backward, its peers' layouts and its flop count."""
import math

import pytest
import torch

from flashtree import reference, tree
from flashtree.bench.suites import dfs, load_suite

SMALL = [dict(tree="groups", trees=2, prompt=13, responses=3, response_len=7),
         dict(tree="random", tokens=97, nodes=9, seed=3)]


def test_reference_backward_matches_autograd(gen):
    trees = [dfs.star(11, 3, 5), dfs.random_deep_tree(41, 7, seed=1)]
    sq, ek, cu = dfs.packed_arrays(trees)
    n, h, hkv, d = sq.numel(), 8, 2, 16
    q, k, v, do = (torch.randn(n, x, d, generator=gen, dtype=torch.float64) for x in (h, hkv, hkv, h))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = reference.tree_attention(q, k, v, cu, sq, ek, 1 / math.sqrt(d))
    expected = torch.autograd.grad(o, (q, k, v), do)
    got = dfs.reference_backward(q, k, v, do, cu, sq, ek)
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("params", SMALL, ids=["groups", "random"])
def test_providers_pass_the_check_on_cpu(params, mode):
    case = dfs.setup(dict(params, mode=mode), torch.device("cpu"))
    inputs = case.inputs()
    expected = case.check.reference(*inputs)
    for name in ("flashtree", "sdpa"):  # flex needs a compiler toolchain; it runs on the GPU
        provider = case.provider(name)
        out = provider.normalize(provider.fn(*provider.prepare(*inputs)))
        verdict = case.check.compare(out, expected)
        assert verdict.ok, f"{name}: {verdict.detail}"
    # ... and the check can fail: the forward of the packed row as plain causal attention is wrong.
    q, k, v = inputs[:3]
    zeros = torch.zeros_like(inputs[-1])
    causal = dfs.Provider(lambda q, k, v, *_: reference.tree_attention(
        q.double(), k.double(), v.double(), inputs[-3], zeros, zeros, 1 / math.sqrt(dfs.D))[0])
    if mode == "fwd":
        assert not case.check.compare(causal.fn(q, k, v), expected).ok


def test_path_layout_round_trip():
    trees = [dfs.star(3, 2, 2), ([-1, 0, 1, 0], [1, 2, 1, 2])]
    layout = dfs._PathLayout(dfs.path_indices(trees), 13, "cpu")
    assert layout.index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, 6], [7, 8, 9, 10, 0], [7, 11, 12, 0, 0]]
    x = torch.arange(13.0)[:, None, None].expand(13, 2, 1)
    copied = layout.copy(x)  # [B, h, L, D]
    assert torch.equal(layout.gather_first(copied), x)
    counts = layout.sum_copies(torch.ones_like(copied), 13)[:, 0, 0]
    assert counts.tolist() == [2, 2, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1]  # shared prompt tokens appear twice
    assert torch.equal(layout.sum_copies(layout.first_copy_only(x), 13), x)


def test_workloads_and_flops():
    suite = load_suite("dfs")
    assert [suite.workload_label(w) for w in suite.workloads][:2] == ["4x(2048+8x512) fwd", "4x(2048+8x512) fwd+bwd"]
    big = suite.workloads[0]
    prompt_pairs = 2048 * 2049 // 2
    response_pairs = 8 * (512 * 2048 + 512 * 513 // 2)
    pairs = 4 * (prompt_pairs + response_pairs)
    assert dfs.visible_pairs(dfs.workload_trees(big)) == pairs
    trees = dfs.workload_trees(suite.workloads[-1])
    parents, lens = trees[0]
    assert sum(lens) == 8192 and min(lens) >= 1 and int(tree.depths(parents).max()) >= 8
    assert dfs.random_deep_tree(8192, 64, 0) == dfs.random_deep_tree(8192, 64, 0)  # seeded
    tree.validate_dfs_arrays(*dfs.packed_arrays(trees))
    fwd, both = (dfs.setup(w, torch.device("cpu")) for w in suite.workloads[:2])
    assert fwd.flops == 4 * dfs.H * dfs.D * pairs and both.flops == round(3.5 * fwd.flops)
    assert both.nbytes > fwd.nbytes > 2 * 4 * 6144 * (dfs.H + dfs.HKV) * dfs.D
