"""merge_states / merge_state: reference properties on CPU, kernels against it on GPU."""
import math

import pytest
import torch

import flashtree
from flashtree import reference
from tolerance import assert_close_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def random_states(n, s, h, d, dtype, device, gen, empty_frac=0.2):
    """Partial states with some -inf partials (garbage o) and a few all-empty rows."""
    o = torch.randn(n, s, h, d, generator=gen).to(device=device, dtype=dtype)
    lse = (torch.randn(n, s, h, generator=gen) * 5).to(device)
    empty = torch.rand(n, s, h, generator=gen).to(device) < empty_frac
    lse[empty] = float("-inf")
    o[empty] = float("nan")  # an empty partial's o must never be read
    if n > 2:
        lse[1] = float("-inf")  # one all-empty row
    return o, lse


def states_from_attention(q, k, v, splits, scale):
    """Split the keys into the given parts and compute each part's (o, lse) with the reference."""
    bounds = [0] + list(splits) + [k.shape[-2]]
    os_, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        allowed = torch.zeros(q.shape[-2], k.shape[-2], dtype=torch.bool)
        allowed[:, a:b] = True
        o, lse = reference.attention_state(q, k, v, allowed, scale)
        os_.append(o)
        lses.append(lse)
    return torch.stack(os_, dim=1), torch.stack(lses, dim=1)  # [H? ...]


# ---------------------------------------------------------------- CPU: the reference itself


@pytest.mark.parametrize("splits", [(5,), (1, 2, 3), (0, 7, 7, 20)])
def test_merge_of_split_attention_equals_full_attention(splits, gen):
    # metamorphic: attention over all keys == merge of attention over disjoint parts
    n, h, l, d = 3, 2, 23, 16
    q = torch.randn(n, h, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(n, h, l, d, generator=gen, dtype=torch.float64)
    v = torch.randn(n, h, l, d, generator=gen, dtype=torch.float64)
    full_o, full_lse = reference.attention_state(q, k, v, torch.ones(1, l, dtype=torch.bool), 0.3)
    parts_o, parts_lse = states_from_attention(q, k, v, splits, 0.3)  # [n, S, h, 1, d]
    o, lse = flashtree.merge_states(parts_o[:, :, :, 0], parts_lse[:, :, :, 0].float())
    torch.testing.assert_close(o, full_o[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), full_lse[:, :, 0], rtol=1e-6, atol=1e-5)


def test_merge_order_does_not_matter(gen):
    o, lse = random_states(17, 7, 3, 8, torch.float64, "cpu", gen)
    perm = torch.randperm(7, generator=gen)
    a = reference.merge_states(o, lse)
    b = reference.merge_states(o[:, perm], lse[:, perm])
    torch.testing.assert_close(a, b)


def test_empty_partials_contribute_nothing_and_all_empty_rows_are_zero(gen):
    o, lse = random_states(11, 5, 4, 8, torch.float64, "cpu", gen)
    out, lse_out = reference.merge_states(o, lse)
    assert not torch.isnan(out).any()
    assert (out[1] == 0).all() and torch.isneginf(lse_out[1]).all()
    # dropping the -inf partials by hand gives the same result
    keep = ~torch.isneginf(lse)
    for n in range(11):
        for h in range(4):
            idx = keep[n, :, h]
            if idx.any():
                w = torch.softmax(lse[n, idx, h].double(), 0)
                torch.testing.assert_close(out[n, h], (w[:, None] * o[n, idx, h]).sum(0))


def test_single_state_is_identity(gen):
    o = torch.randn(5, 1, 3, 64, generator=gen)
    lse = torch.randn(5, 1, 3, generator=gen)
    out, lse_out = flashtree.merge_states(o, lse)
    torch.testing.assert_close(out, o[:, 0])
    torch.testing.assert_close(lse_out, lse[:, 0])


def test_merge_state_pairs_equal_merge_states(gen):
    o, lse = random_states(9, 2, 3, 32, torch.float32, "cpu", gen)
    a = flashtree.merge_state(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1])
    b = flashtree.merge_states(o, lse)
    torch.testing.assert_close(a, b)


def test_out_is_filled_and_returned(gen):
    o, lse = random_states(6, 3, 2, 64, torch.float32, "cpu", gen)
    out = (torch.full((6, 2, 64), float("nan")), torch.full((6, 2), float("nan")))
    ret = flashtree.merge_states(o, lse, out=out)
    assert ret is out
    torch.testing.assert_close(out, reference.merge_states(o, lse), equal_nan=False)


def test_inputs_are_not_mutated(gen):
    o, lse = random_states(6, 3, 2, 64, torch.float32, "cpu", gen)
    o0, lse0 = o.clone(), lse.clone()
    flashtree.merge_states(o, lse)
    assert torch.equal(o.nan_to_num(7.0), o0.nan_to_num(7.0)) and torch.equal(lse, lse0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ([1, 2], torch.zeros(1, 1, 1)), TypeError, "o: expected a torch.Tensor"),
        (lambda: (torch.zeros(2, 3, 4), torch.zeros(2, 3)), ValueError, r"o: expected 4 dimensions"),
        (lambda: (torch.zeros(2, 0, 4, 64), torch.zeros(2, 0, 4)), ValueError, r"S .* >= 1, got 0"),
        (lambda: (torch.zeros(2, 3, 4, 64), torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "lse: expected dtype float32, got float64"),
        (lambda: (torch.zeros(2, 3, 4, 64), torch.zeros(2, 3, 5)), ValueError, r"lse: expected shape \[2, 3, 4\]"),
        (lambda: (torch.zeros(2, 3, 4, 64, dtype=torch.int32), torch.zeros(2, 3, 4)), TypeError, "o: expected dtype"),
        (lambda: (torch.zeros(2, 3, 64, 4).transpose(-1, -2), torch.zeros(2, 3, 4)), ValueError, "o: expected a contiguous last dimension"),
    ],
)
def test_bad_input_names_the_argument(make, exc, match):
    o, lse = make()
    with pytest.raises(exc, match=match):
        flashtree.merge_states(o, lse)


def test_bad_out_names_the_argument():
    o, lse = torch.zeros(2, 3, 4, 64), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"out\[0\]: expected shape \[2, 4, 64\]"):
        flashtree.merge_states(o, lse, out=(torch.zeros(2, 4, 63), torch.zeros(2, 4)))
    with pytest.raises(TypeError, match=r"out\[1\]: expected dtype float32"):
        flashtree.merge_states(o, lse, out=(torch.zeros(2, 4, 64), torch.zeros(2, 4, dtype=torch.float16)))
    with pytest.raises(TypeError, match="out: expected a pair"):
        flashtree.merge_states(o, lse, out=torch.zeros(2, 4, 64))


# ---------------------------------------------------------------- torch.library registration


def test_registered_ops_pass_opcheck(gen):
    o, lse = random_states(5, 3, 2, 64, torch.float32, "cpu", gen, empty_frac=0.0)
    torch.library.opcheck(torch.ops.flashtree.merge_states.default, (o, lse))
    out = (torch.empty(5, 2, 64), torch.empty(5, 2))
    torch.library.opcheck(torch.ops.flashtree.merge_states_out.default, (o, lse, *out))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        o = torch.empty(7, 3, 5, 128, dtype=torch.bfloat16)
        lse = torch.empty(7, 3, 5)
        out, lse_out = flashtree.merge_states(o, lse)
    assert out.shape == (7, 5, 128) and out.dtype == torch.bfloat16
    assert lse_out.shape == (7, 5) and lse_out.dtype == torch.float32


def test_torch_compile_fullgraph_cpu(gen):
    o, lse = random_states(5, 3, 2, 64, torch.float32, "cpu", gen, empty_frac=0.0)
    f = torch.compile(lambda a, b: flashtree.merge_states(a, b)[0] * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(o, lse), reference.merge_states(o, lse)[0] * 2)


# ---------------------------------------------------------------- GPU: kernels against the reference


def _torch_merge(o, lse):
    """Plain PyTorch in the input dtype: the baseline of the tolerance rule."""
    w = torch.softmax(torch.nan_to_num(lse, neginf=-1e30), dim=1).to(o.dtype)
    return (w[..., None] * torch.nan_to_num(o)).sum(1), torch.logsumexp(lse, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", flashtree.merge.HEAD_DIMS)
@pytest.mark.parametrize("s", [1, 2, 3, 7, 16, 31])
def test_kernel_matches_reference(dtype, d, s, gen):
    n, h = 97, 5  # primes: rows never fill a block exactly
    o, lse = random_states(n, s, h, d, dtype, "cuda", gen)
    out = (torch.full((n, h, d), float("nan"), device="cuda", dtype=dtype), torch.full((n, h), float("nan"), device="cuda"))
    flashtree.merge_states(o, lse, out=out)
    ref, ref_lse = reference.merge_states(o.double(), lse.double())
    base, _ = _torch_merge(o, lse)
    assert_close_rule(out[0], ref, base, dtype, f"o {dtype} d={d} s={s}")
    torch.testing.assert_close(out[1].double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert (out[0][1] == 0).all() and torch.isneginf(out[1][1]).all()


@pytest.mark.gpu
def test_kernel_non_contiguous_and_strided_views(gen):
    base_o = torch.randn(40, 6, 9, 128, device="cuda", dtype=torch.bfloat16)
    base_lse = torch.randn(9, 40, 6, device="cuda")
    o = base_o[::2, 1:5].transpose(1, 1)  # strided N and S
    lse = base_lse.permute(1, 2, 0)[::2, 1:5]  # arbitrary lse strides
    out, lse_out = flashtree.merge_states(o, lse)
    ref, ref_lse = reference.merge_states(o.double(), lse.double())
    assert_close_rule(out, ref, _torch_merge(o, lse)[0], torch.bfloat16, "strided")
    torch.testing.assert_close(lse_out.double(), ref_lse, rtol=1e-5, atol=1e-5)
    # a misaligned view (row start not on 16 bytes) goes through an aligned copy
    flat = torch.randn(3 * 2 * 4 * 64 + 1, device="cuda", dtype=torch.float16)
    o = flat[1:].view(3, 2, 4, 64)
    out, _ = flashtree.merge_states(o, torch.zeros(3, 2, 4, device="cuda"))
    torch.testing.assert_close(out.double(), o.double().mean(1), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_kernel_is_deterministic_and_leaves_inputs_alone(gen):
    o, lse = random_states(513, 5, 8, 128, torch.bfloat16, "cuda", gen)
    o0, lse0 = o.clone(), lse.clone()
    a = flashtree.merge_states(o, lse)
    b = flashtree.merge_states(o, lse)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(o.nan_to_num(3.0), o0.nan_to_num(3.0)) and torch.equal(lse, lse0)


@pytest.mark.gpu
def test_kernel_empty_batch_and_large_lse():
    out, lse = flashtree.merge_states(torch.empty(0, 3, 4, 64, device="cuda"), torch.empty(0, 3, 4, device="cuda"))
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    o = torch.randn(4, 2, 2, 64, device="cuda")
    lse = torch.tensor([[1e4, 1e4 - 1]], device="cuda").repeat(4, 1)[:, :, None].repeat(1, 1, 2)
    out, lse_out = flashtree.merge_states(o, lse)
    ref, ref_lse = reference.merge_states(o.double(), lse.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_out.double(), ref_lse, rtol=1e-6, atol=1e-2)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(gen):
    o, lse = random_states(129, 4, 8, 128, torch.bfloat16, "cuda", gen)
    out = (torch.empty(129, 8, 128, device="cuda", dtype=torch.bfloat16), torch.empty(129, 8, device="cuda"))
    flashtree.merge_states(o, lse, out=out)  # compile and load before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # captures on its own side stream
        flashtree.merge_states(o, lse, out=out)
    o2, lse2 = random_states(129, 4, 8, 128, torch.bfloat16, "cuda", gen)
    o.copy_(o2)
    lse.copy_(lse2)
    out[0].fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref, _ = reference.merge_states(o.double(), lse.double())
    assert_close_rule(out[0], ref, _torch_merge(o, lse)[0], torch.bfloat16, "graph replay")


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu(gen):
    o, lse = random_states(33, 3, 4, 64, torch.float16, "cuda", gen, empty_frac=0.0)
    f = torch.compile(lambda a, b: flashtree.merge_states(a, b)[0].float() * 2, fullgraph=True)
    ref, _ = reference.merge_states(o.double(), lse.double())
    torch.testing.assert_close(f(o, lse).double(), ref * 2, rtol=4e-3, atol=4e-3)


@pytest.mark.gpu
def test_cupy_arrays_in_and_out(gen):
    cupy = pytest.importorskip("cupy")
    o, lse = random_states(8, 3, 2, 64, torch.float32, "cuda", gen, empty_frac=0.0)
    out, lse_out = flashtree.merge_states(cupy.from_dlpack(o), cupy.from_dlpack(lse))
    assert isinstance(out, cupy.ndarray)
    torch.testing.assert_close(torch.from_dlpack(out).double(), reference.merge_states(o.double(), lse.double())[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_second_gpu_device_if_present(gen):
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    o, lse = random_states(8, 3, 2, 64, torch.float32, "cuda:1", gen, empty_frac=0.0)
    out, _ = flashtree.merge_states(o, lse)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.double().cpu(), reference.merge_states(o.double(), lse.double())[0].cpu(), rtol=1e-5, atol=1e-5)
