"""Energy per call of the dfs suite's long tree: flashtree's kernels and FlexAttention, under the power cap.

The suite's eager loop runs each provider for ~0.6 s back to back, long enough for the GPU to reach its
power limit (700 W on the H100 / H200 machines) and lower its SM clock. A kernel that reaches the cap
then runs at a speed set by its energy per call, not by its cycle count. This script measures both.

For each subject it runs the call in a loop for about SECONDS seconds and reads NVML's energy counter
before and after (ctypes on libnvidia-ml, no extra package), and samples the SM clock and power from a
side thread every 20 ms. Per subject: time per call, joules per call, FLOP per joule, mean power and
the SM clock (median of the samples in the second half of the loop).

    python3 -P benchmarks/energy.py [--tree 0] [--seconds 3] [--subjects fwd,dq,dkdv,bwd,step,flex_fwd,flex_step]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time

import torch

import flashtree
from flashtree import dfs
from flashtree.bench.suites import dfs as suite


class Nvml:
    def __init__(self, index: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.h = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.h)) != 0:
            raise RuntimeError("nvmlDeviceGetHandleByIndex_v2 failed")

    def energy_mj(self) -> int:
        v = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.h, ctypes.byref(v)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return v.value

    def sm_clock(self) -> int:
        v = ctypes.c_uint()
        self.lib.nvmlDeviceGetClockInfo(self.h, 1, ctypes.byref(v))  # NVML_CLOCK_SM
        return v.value

    def power_w(self) -> float:
        v = ctypes.c_uint()
        self.lib.nvmlDeviceGetPowerUsage(self.h, ctypes.byref(v))
        return v.value / 1000


def _sampler(nvml: Nvml, stop: threading.Event, out: list):
    while not stop.is_set():
        out.append((time.perf_counter(), nvml.sm_clock(), nvml.power_w()))
        time.sleep(0.02)


def measure(nvml: Nvml, fn, seconds: float, flops: float) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(5, int(seconds / max(time.perf_counter() - t0, 1e-4)))
    samples: list = []
    stop = threading.Event()
    th = threading.Thread(target=_sampler, args=(nvml, stop, samples), daemon=True)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0 = nvml.energy_mj()
    th.start()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    e1 = nvml.energy_mj()
    stop.set()
    th.join()
    t_s = a.elapsed_time(b) / 1e3
    joules = (e1 - e0) / 1e3
    half = [s for s in samples if s[0] >= samples[0][0] + (samples[-1][0] - samples[0][0]) / 2] or samples
    return dict(n=n, us=t_s / n * 1e6, j=joules / n, tflop_per_j=flops / (joules / n) / 1e12 if joules else 0.0,
                watts=joules / t_s if t_s else 0.0, mhz=statistics.median(s[1] for s in half),
                w_samples=statistics.median(s[2] for s in half))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--subjects", default="fwd,dq,dkdv,bwd,step,flex_fwd,flex_step")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("energy: needs a CUDA device", file=sys.stderr)
        return 2
    nvml = Nvml(torch.cuda.current_device())
    params = dict(suite.TREES[a.tree], mode="fwd+bwd")
    trees = suite.workload_trees(params)
    sq, ek, cu = (x.cuda() for x in suite.packed_arrays(trees))
    n = sq.shape[0]
    pairs = suite.visible_pairs(trees)
    fwd_flops = 4 * suite.H * suite.D * pairs
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, suite.H, suite.D, device="cuda", dtype=suite.DTYPE, generator=g).requires_grad_()
    k, v = (torch.randn(n, suite.HKV, suite.D, device="cuda", dtype=suite.DTYPE, generator=g).requires_grad_()
            for _ in range(2))
    do = torch.randn(n, suite.H, suite.D, device="cuda", dtype=suite.DTYPE, generator=g)
    scale = suite.D ** -0.5
    o, lse, tiles = dfs._dfs_forward_impl(q.detach(), k.detach(), v.detach(), cu, sq, ek, scale)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    dq, dk, dv = torch.empty_like(qd), torch.empty_like(kd), torch.empty_like(vd)
    delta = torch.empty(n, suite.H, dtype=torch.float32, device="cuda")

    def run_dq_dkdv(which):
        # The Hopper backward's two kernels, one at a time (dkdv reads the delta dq's run stored).
        dfs._launch_bwd_ws(do, qd, kd, vd, o, lse, (0, 0, 0), sq, ek, tiles, dq, dk, dv, delta, scale, stages=(which,))

    run_dq_dkdv("dq")  # delta for a dkdv subject that runs first

    flex_fwd = flex_step = None
    if any(s.startswith("flex") for s in a.subjects.split(",")):
        fcase = suite.setup(params, torch.device("cuda"))
        fprov = fcase.provider("flex")
        fargs = fprov.prepare(q.detach(), k.detach(), v.detach(), do, cu, sq, ek)
        flex_step = lambda: fprov.fn(*fargs)  # noqa: E731
        fwd_case = suite.setup(dict(params, mode="fwd"), torch.device("cuda"))
        fp = fwd_case.provider("flex")
        fa = fp.prepare(q.detach(), k.detach(), v.detach(), cu, sq, ek)
        flex_fwd = lambda: fp.fn(*fa)  # noqa: E731

    ma, mb = (torch.randn(8192, 8192, device="cuda", dtype=suite.DTYPE, generator=g) for _ in range(2))
    subjects = {
        "fwd": (lambda: dfs._dfs_forward_impl(qd, kd, vd, cu, sq, ek, scale), fwd_flops),
        "dq": (lambda: run_dq_dkdv("dq"), 3 / 2 * fwd_flops),
        "dkdv": (lambda: run_dq_dkdv("dkdv"), 2 * fwd_flops),
        "bwd": (lambda: dfs._dfs_backward_impl(do, qd, kd, vd, o, lse, None, sq, ek, tiles, scale), 3.5 * fwd_flops),
        "step": (lambda: torch.autograd.grad(flashtree.tree_attention(q, k, v, cu, sq, ek), (q, k, v), do),
                 4.5 * fwd_flops),
        "flex_fwd": (flex_fwd, fwd_flops),
        "mm": (lambda: torch.mm(ma, mb), 2 * 8192 ** 3),
        "flex_step": (flex_step, 4.5 * fwd_flops),
    }
    print(f"{torch.cuda.get_device_name()}, tree {a.tree} ({n} tokens), FLOPs counted as executed products "
          f"(fwd 2, dq 3, dkdv 4 per pair and head), {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"{'subject':10s} {'calls':>6s} {'us/call':>9s} {'J/call':>8s} {'TFLOP/J':>8s} {'W':>6s} {'W nvml':>7s} {'SM MHz':>7s}")
    for name in a.subjects.split(","):
        fn, flops = subjects[name]
        if fn is None:
            continue
        time.sleep(2.0)  # start each subject from a cooler state
        r = measure(nvml, fn, a.seconds, flops)
        print(f"{name:10s} {r['n']:6d} {r['us']:9.1f} {r['j']:8.3f} {r['tflop_per_j']:8.2f} {r['watts']:6.0f} "
              f"{r['w_samples']:7.0f} {r['mhz']:7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
