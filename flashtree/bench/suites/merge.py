"""Suite ``merge``: merging S attention states per token into one.

Op under test: ``flashtree.merge_states(o, lse) -> (o_merged, lse_merged)`` with
``o`` [N, S, H, D] (bf16 here), ``lse`` [N, S, H] fp32 natural log, ``o_merged`` [N, H, D] in o's dtype,
``lse_merged`` [N, H] fp32.

The merge reads every state once and writes one, with ~4 flops per element of ``o``: it is purely
memory-bound, so its floor is ``bytes / copy bandwidth`` and a good kernel reaches a large fraction of it.

Peers: ``torch`` (plain eager PyTorch) and ``flashinfer.merge_states`` (same layout, base-2 LSE).
Inputs are random and finite (no empty states): every peer agrees on that case.
"""
from __future__ import annotations

import functools
import math

import torch

from ..peers import import_peer
from ..suite import Case, Check, Provider, Suite, Unavailable, Verdict, grid

LOG2E = math.log2(math.e)  # FlashInfer's LSE is base 2: lse2 = lse * log2(e)
LSE_SPREAD = 3.0  # lse ~ N(0, 3^2): the weights differ by orders of magnitude, as real splits do
LSE_ATOL = 1e-4  # fp32 logsumexp of a few terms, incl. base-2 round trips, is within ~1e-6
O_ROUNDING_FACTOR = 2.0  # o may be this many times as far from the reference as rounding it is
O_ATOL = 1e-6
REFERENCE_CHUNK_BYTES = 1 << 30  # float64 temporaries of the reference stay under ~1 GiB


# Providers ---------------------------------------------------------------------------------------------


def torch_merge(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain eager PyTorch merge: subtract the max, exponentiate, weighted sum in fp32.

    The weighted sum runs one ``addcmul_`` per split so that its memory stays O(N H D), not the
    O(N S H D) fp32 product a one-line version would allocate (17 GB at N=131072, S=16).
    """
    m = lse.amax(dim=1)  # [N, H]
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all-empty rows: keep exp() finite
    w = torch.exp(lse - m[:, None])  # [N, S, H]
    denom = w.sum(dim=1)  # [N, H]
    acc = torch.zeros(o.shape[0], o.shape[2], o.shape[3], dtype=torch.float32, device=o.device)
    for s in range(o.shape[1]):
        acc.addcmul_(o[:, s], w[:, s, :, None])
    o_merged = acc / denom.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return o_merged.to(o.dtype), m + torch.log(denom)


@functools.cache
def _flashtree_provider() -> Provider | Unavailable:
    # Imported here, not at the top: the suite must load (e.g. for --list) even where flashtree cannot.
    try:
        from flashtree import merge_states
    except Exception as e:  # noqa: BLE001 - any failure is reported, and the peers still run
        return Unavailable(f"flashtree.merge_states: {type(e).__name__}: {e}")
    return Provider(merge_states)


def _flashinfer_provider() -> Provider | Unavailable:
    flashinfer = import_peer("flashinfer")
    if isinstance(flashinfer, Unavailable):
        return flashinfer
    return Provider(
        fn=flashinfer.merge_states,
        prepare=lambda o, lse: (o, lse * LOG2E),  # to base 2, outside the timed region
        normalize=lambda out: (out[0], out[1] / LOG2E),  # back to natural log for the check
    )


# Reference and check -----------------------------------------------------------------------------------


def reference_merge(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge in float64, in its most obvious form (softmax weights), chunked over N to bound memory."""
    N, S, H, D = o.shape
    rows = max(1, REFERENCE_CHUNK_BYTES // (S * H * D * 8))
    o_ref = torch.empty(N, H, D, dtype=torch.float64, device=o.device)
    lse_ref = torch.empty(N, H, dtype=torch.float64, device=o.device)
    for a in range(0, N, rows):
        oc, lc = o[a : a + rows].double(), lse[a : a + rows].double()
        o_ref[a : a + rows] = torch.einsum("nshd,nsh->nhd", oc, torch.softmax(lc, dim=1))
        lse_ref[a : a + rows] = torch.logsumexp(lc, dim=1)
    return o_ref, lse_ref


def compare_merge(out, expected, *, o_dtype: torch.dtype) -> Verdict:
    """Dtypes and shapes exact; lse within ``LSE_ATOL``; o within twice the error of rounding the float64
    reference to o's dtype (the FlashAttention rule, with exact rounding as the baseline), both in the
    max (no element far off) and in the mean (no systematic error hiding under the largest elements)."""
    (o, lse), (o_ref, lse_ref) = out, expected
    if o.dtype != o_dtype or lse.dtype != torch.float32:
        return Verdict(False, f"dtypes (o {o.dtype}, lse {lse.dtype}), expected ({o_dtype}, torch.float32)")
    if o.shape != o_ref.shape or lse.shape != lse_ref.shape:
        return Verdict(False, f"shapes (o {tuple(o.shape)}, lse {tuple(lse.shape)}), expected "
                              f"({tuple(o_ref.shape)}, {tuple(lse_ref.shape)})")
    err = (o.double() - o_ref).abs_()
    rounding = (o_ref.to(o_dtype).double() - o_ref).abs_()
    max_tol = O_ROUNDING_FACTOR * rounding.max().item() + O_ATOL
    mean_tol = O_ROUNDING_FACTOR * rounding.mean().item() + O_ATOL
    max_err, mean_err = err.max().item(), err.mean().item()
    lse_err = (lse.double() - lse_ref).abs().max().item()
    ok = max_err <= max_tol and mean_err <= mean_tol and lse_err <= LSE_ATOL  # False for NaN errors too
    return Verdict(ok, f"o max err {max_err:.1e} (tol {max_tol:.1e}), mean {mean_err:.1e} (tol {mean_tol:.1e});"
                       f" lse max err {lse_err:.1e} (tol {LSE_ATOL:.0e})")


# Suite -------------------------------------------------------------------------------------------------


def merge_bytes(N: int, S: int, H: int, D: int, elem_bytes: int) -> int:
    """Read o and lse, write the merged o and lse."""
    return N * S * H * (D * elem_bytes + 4) + N * H * (D * elem_bytes + 4)


def setup(params: dict, device: torch.device) -> Case:
    N, S, H, D = params["N"], params["S"], params["H"], params["D"]
    dtype = getattr(torch, params["dtype"])

    def inputs():
        o = torch.randn(N, S, H, D, dtype=dtype, device=device)
        lse = LSE_SPREAD * torch.randn(N, S, H, dtype=torch.float32, device=device)
        return o, lse

    return Case(
        inputs=inputs,
        providers={
            "flashtree": _flashtree_provider(),
            "torch": torch_merge,
            "flashinfer": _flashinfer_provider(),
        },
        nbytes=merge_bytes(N, S, H, D, dtype.itemsize),
        flops=4 * N * S * H * D,  # scale, multiply, add, normalise: negligible next to the bytes
        check=Check(reference=reference_merge, compare=functools.partial(compare_merge, o_dtype=dtype)),
    )


SUITE = Suite(
    name="merge",
    description="merge S attention states per token: o [N,S,32,128] bf16 + lse -> [N,32,128]",
    workloads=grid(N=[4096, 32768, 131072], S=[2, 4, 16], H=[32], D=[128], dtype=["bfloat16"]),
    quick=grid(N=[4096, 32768], S=[2, 16], H=[32], D=[128], dtype=["bfloat16"]),
    setup=setup,
)
