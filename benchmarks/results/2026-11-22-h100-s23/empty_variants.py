import time, torch
q = torch.randn(32 * 4, 32, 128, device="cuda", dtype=torch.bfloat16)
def med(f, n=2000):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t0)
    return sorted(ts)[n // 2] / 1e3
for name, f in [("torch.empty(shape, dtype, device)", lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device)),
                ("torch.empty_like(q)", lambda: torch.empty_like(q)),
                ("q.new_empty(q.shape)", lambda: q.new_empty(q.shape)),
                ("torch.empty(tuple, dtype, device=str)", lambda: torch.empty((128, 32, 128), dtype=torch.bfloat16, device="cuda"))]:
    print(f"  {name:40s} {med(f):5.2f} us")
