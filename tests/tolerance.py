"""The tolerance rule (after FlashAttention's tests), kept as data.

A kernel may be at most FACTOR times as far from the float64 reference as plain PyTorch in the
same dtype is, plus a rounding floor of the dtype.
"""
import torch

FACTOR = 2.0
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return diff.max().item() if diff.numel() else 0.0


def assert_close_rule(out, ref64, baseline, dtype, what=""):
    """out: kernel result; ref64: float64 reference; baseline: plain torch in ``dtype``."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = max_err(out, ref64)
    base = max_err(baseline, ref64)
    limit = FACTOR * base + FLOOR[dtype]
    assert err <= limit, f"{what}: max error {err:.3e} > {FACTOR} x torch's {base:.3e} + {FLOOR[dtype]:.1e}"
