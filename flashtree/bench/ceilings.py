"""The two hardware ceilings every result is compared with, measured in the same run.

A kernel's floor is the time the device needs at best: moving its bytes at the measured copy bandwidth,
or doing its flops at the measured dense matmul rate, whichever is longer. ``fraction of floor`` near 1
means nothing is left to gain; measuring the ceilings on the very device (and clocks) that timed the
kernels keeps the fraction comparable across machines.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .timing import bench

GiB = 1 << 30
COPY_BYTES = 1 * GiB  # far beyond any L2: the copy streams from and to HBM
MATMUL_SIZE = 8192  # large enough to reach the tensor cores' sustained rate
CEILING_ITERS = 10


@dataclass(frozen=True)
class Ceilings:
    """Measured rates. ``copy_bytes_per_s`` counts bytes read plus bytes written."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_bytes: int = COPY_BYTES
    matmul_size: int = MATMUL_SIZE

    def as_dict(self) -> dict:
        return asdict(self)


def floor_us(nbytes: float, flops: float, ceilings: Ceilings) -> float:
    """The least time, in microseconds, a kernel moving ``nbytes`` and doing ``flops`` can take."""
    seconds = max(nbytes / ceilings.copy_bytes_per_s, flops / ceilings.matmul_flops_per_s)
    return seconds * 1e6


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, iters: int = CEILING_ITERS) -> float:
    """Device-to-device copy rate in bytes/s, counting the bytes read and the bytes written."""
    # Random bytes, not zeros: the copy then sees the data a kernel would.
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=3, iters=iters)
    return 2 * nbytes / (t.median_us * 1e-6)


def measure_matmul_rate(n: int = MATMUL_SIZE, iters: int = CEILING_ITERS) -> float:
    """Dense bf16 ``n x n x n`` matmul rate in flop/s (2 n^3 flops per product)."""
    # Random operands: zeros would let the tensor cores idle at lower power and read as a faster device.
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    t = bench(lambda: torch.matmul(a, b, out=c), warmup=3, iters=iters)
    return 2 * n**3 / (t.median_us * 1e-6)


def measure_ceilings() -> Ceilings:
    """Both ceilings on the current CUDA device, each the median of several runs."""
    ceilings = Ceilings(copy_bytes_per_s=measure_copy_bandwidth(), matmul_flops_per_s=measure_matmul_rate())
    torch.cuda.empty_cache()  # hand the 2 GiB of copy buffers back before the suite allocates
    return ceilings
