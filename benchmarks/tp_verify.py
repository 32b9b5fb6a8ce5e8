"""Tensor-parallel speculative verification step vs one GPU (torch.distributed, NCCL).

    torchrun --nproc_per_node 2 benchmarks/tp_verify.py [--context 4096] [--batch 1] [--layers 32]

A Llama-3-8B-shaped stack of attention layers only (hidden 4096, H = 32, Hkv = 8, D = 128, bf16, random
weights; no MLP, no norms, no RoPE: the check is about splitting attention), verifying the 64-token
Medusa tree over a cache of ``--context`` tokens. Tensor parallelism as Megatron does it: each rank holds
H / world query heads and Hkv / world KV heads (q/k/v projections split by columns, the output
projection by rows), runs ``flash_decoding_attention`` on its own ``cuda:<local_rank>`` over its shard of
the cache, and one all-reduce per layer sums the output projections. Rank 0 also runs the whole stack
alone. Checks: the hidden states after the stack agree (bf16 tolerance: the reductions differ in order);
the KV commit of the accepted path (``commit_accepted``, all layers in one call) on every shard equals its
own staged tree K/V at the accepted nodes bitwise, and the gathered shards match the single-GPU commit
(same tolerance: later layers' K/V come from slightly different hidden states). Prints the median step
time of both.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import flashtree
from flashtree import tree
from flashtree.kvcache import commit_accepted

HIDDEN, H, HKV, D = 4096, 32, 8, 128


def build(layers, batch, context, device):
    """Weights, cache, tree inputs: identical on every rank (one seed), full size."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    w = [dict(q=rnd(HIDDEN, H * D, scale=HIDDEN ** -0.5), k=rnd(HIDDEN, HKV * D, scale=HIDDEN ** -0.5),
              v=rnd(HIDDEN, HKV * D, scale=HIDDEN ** -0.5), o=rnd(H * D, HIDDEN, scale=(H * D) ** -0.5))
         for _ in range(layers)]
    parents, _ = tree.parents_from_paths(tree.MEDUSA_63)
    spec = tree.TreeSpec.from_parents(parents)
    t = spec.num_nodes
    kv = rnd(2, layers, batch, HKV, context + 2 * t, D)
    x = rnd(batch, t, HIDDEN)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    path = [int(n) for n in spec.retrieve_indices[-1] if n >= 0]
    nodes = torch.tensor(path, device=device).expand(batch, -1).contiguous()
    return w, kv, x, spec.mask.to(device), lens, nodes


def stack(x, w, kv, mask, lens, heads, kv_heads, staged, group=None):
    """The attention stack on the given head shard; all-reduce over ``group`` when splitting."""
    b, t, _ = x.shape
    hq = slice(heads.start * D, heads.stop * D)
    hk = slice(kv_heads.start * D, kv_heads.stop * D)
    nh, nkv = heads.stop - heads.start, kv_heads.stop - kv_heads.start
    for i, layer in enumerate(w):
        q = (x @ layer["q"][:, hq]).view(b, t, nh, D).transpose(1, 2)
        staged[0, i].copy_((x @ layer["k"][:, hk]).view(b, t, nkv, D).transpose(1, 2))
        staged[1, i].copy_((x @ layer["v"][:, hk]).view(b, t, nkv, D).transpose(1, 2))
        o = flashtree.flash_decoding_attention(q, kv[0, i], kv[1, i], staged[0, i], staged[1, i], mask, lens,
                                               64, kv.shape[4], kv_group_num=nh // nkv)
        y = o.transpose(1, 2).reshape(b, t, nh * D) @ layer["o"][hq, :]
        if group is not None:
            dist.all_reduce(y, group=group)
        x = x + y
    return x


def median_ms(fn, iters=20):
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[3:])[iters // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    if H % world or HKV % world:
        raise SystemExit(f"world size: expected a divisor of Hkv = {HKV}, got {world}")
    w, kv_full, x, mask, lens, nodes = build(args.layers, args.batch, args.context, device)
    heads = slice(rank * H // world, (rank + 1) * H // world)
    kv_heads = slice(rank * HKV // world, (rank + 1) * HKV // world)
    kv = kv_full[:, :, :, kv_heads].contiguous()
    t = x.shape[1]
    staged = torch.empty(2, args.layers, args.batch, HKV // world, t, D, dtype=x.dtype, device=device)
    out_tp = stack(x, w, kv, mask, lens, heads, kv_heads, staged, group=dist.group.WORLD)
    length = torch.full((args.batch,), nodes.shape[1], device=device)
    lens_tp = lens.clone()
    commit_accepted(kv[0], kv[1], staged[0], staged[1], nodes, length, lens_tp)
    shard = kv[..., args.context:args.context + nodes.shape[1], :].contiguous()
    own = torch.equal(shard, staged.index_select(4, nodes[0]))
    shards = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(shards, shard)
    tp_ms = median_ms(lambda: stack(x, w, kv, mask, lens, heads, kv_heads, staged, group=dist.group.WORLD))
    if rank == 0:
        staged1 = torch.empty(2, args.layers, args.batch, HKV, t, D, dtype=x.dtype, device=device)
        out_1 = stack(x, w, kv_full, mask, lens, slice(0, H), slice(0, HKV), staged1)
        err = ((out_tp.double() - out_1.double()).norm() / out_1.double().norm()).item()
        lens_1 = lens.clone()
        commit_accepted(kv_full[0], kv_full[1], staged1[0], staged1[1], nodes, length, lens_1)
        whole = kv_full[..., args.context:args.context + nodes.shape[1], :]
        gathered = torch.cat(shards, dim=3).double()
        commit_err = ((gathered - whole.double()).norm() / whole.double().norm()).item()
        owns = torch.tensor([int(own)], device=device)
        dist.all_reduce(owns, op=dist.ReduceOp.MIN)
        commit_same = bool(owns.item()) and commit_err < 2e-2
        one_ms = median_ms(lambda: stack(x, w, kv_full, mask, lens, slice(0, H), slice(0, HKV), staged1))
        ok = err < 2e-2 and commit_same and torch.equal(lens_tp, lens_1)
        print(f"tp_verify: {args.layers} layers, B={args.batch}, context {args.context}, Medusa-63 tree, "
              f"world {world} ({torch.cuda.get_device_name(device)})")
        print(f"  hidden states after the stack: relative error TP vs 1 GPU {err:.2e} (tol 2e-2)")
        print(f"  KV commit: every shard bitwise equal to its staged accepted nodes: {bool(owns.item())}; "
              f"gathered vs single-GPU commit relative error {commit_err:.2e}")
        print(f"  step time: 1 GPU {one_ms:.3f} ms, {world} GPUs (TP) {tp_ms:.3f} ms")
        print("tp_verify: OK" if ok else "tp_verify: MISMATCH")
        result = torch.tensor([0 if ok else 1], device=device)
    else:
        owns = torch.tensor([int(own)], device=device)
        dist.all_reduce(owns, op=dist.ReduceOp.MIN)
        result = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(result, 0)
    dist.destroy_process_group()
    raise SystemExit(int(result.item()))


if __name__ == "__main__":
    main()
