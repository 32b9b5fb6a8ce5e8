"""The main job (``python -m flashtree demo``): prove the install on this machine.

On a GPU: check every op against its float64 reference on fresh random inputs, then time it
against its floor. On a CPU-only machine: say so, run the reference path, and compile every
shipped kernel for sm_80 and sm_90 (NVRTC needs no GPU).

Then the speculative loop (``flashtree.speculative.generate``) on a small random Llama with random
Medusa heads and the Medusa-63 tree, and GLIDE with a CAPE: the output must equal plain greedy
decoding (``model.generate(do_sample=False)``); it prints the tokens accepted per step and the time
per step with flashtree's verification attention and with HF's sdpa attention and a 4-D tree mask.
"""
from __future__ import annotations

import time

import torch

from . import _jit, merge_states, reference
from .bench.ceilings import measure_copy_bandwidth
from .bench.timing import bench


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check_merge(device: str, dtype: torch.dtype) -> float:
    n, s, h, d = 1031, 5, 8, 128
    o = torch.randn(n, s, h, d, device=device, dtype=dtype)
    lse = torch.randn(n, s, h, device=device) * 4
    lse[::7, 1] = float("-inf")
    out, lse_out = merge_states(o, lse)
    ref, ref_lse = reference.merge_states(o.double(), lse.double())
    err = max(_rel_err(out, ref), _rel_err(lse_out, ref_lse))
    if not err < 1e-2:
        raise SystemExit(f"merge_states {dtype} on {device}: relative error {err:.2e} exceeds 1e-2")
    return err


def _time_merge_gpu() -> None:
    n, s, h, d = 131072, 4, 32, 128
    o = torch.randn(n, s, h, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(n, s, h, device="cuda")
    out = (torch.empty(n, h, d, device="cuda", dtype=torch.bfloat16), torch.empty(n, h, device="cuda"))
    copy_bw = measure_copy_bandwidth()
    ms = bench(lambda: merge_states(o, lse, out=out), iters=20).median_us * 1e-3
    nbytes = o.numel() * 2 + lse.numel() * 4 + out[0].numel() * 2 + out[1].numel() * 4
    floor_ms = nbytes / copy_bw * 1e3
    print(f"merge_states N={n} S={s} H={h} D={d} bf16: {ms * 1e3:.0f} us, {nbytes / ms / 1e6:.0f} GB/s "
          f"= {floor_ms / ms:.0%} of the measured copy bandwidth ({copy_bw / 1e12:.2f} TB/s)")


def _tiny_llama(device: str):
    """A random Llama: fp32 with head_dim 16 on the CPU (the reference path); fp16, head_dim 64 on a GPU
    (the kernels take fp16/bf16 and head_dim 64/128/256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = device == "cuda"
    cfg = LlamaConfig(vocab_size=512 if gpu else 128, hidden_size=256 if gpu else 64,
                      intermediate_size=512 if gpu else 128, num_hidden_layers=4 if gpu else 2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64 if gpu else 16,
                      initializer_range=0.2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=torch.float16 if gpu else torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _near_tie(model, ids, got: list, n: int):
    """The first position where ``got`` differs from HF greedy and the target's top-2 logit gap there."""
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    for k, (a, b) in enumerate(zip(ref.sequences[0, ids.shape[1]:].tolist(), got[ids.shape[1]:])):
        if a != b:
            top2 = ref.scores[k][0].float().topk(2).values
            return k, float(top2[0] - top2[1])
    return None, None


def _speculative(device: str, quick: bool) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("  speculative loop skipped: transformers is not installed (pip install transformers)")
        return
    from . import speculative as sp
    from . import tree

    model = _tiny_llama(device)
    gpu = device == "cuda"
    n = 48 if gpu and not quick else 16
    ids = torch.randint(0, model.config.vocab_size, (1, 64 if gpu else 12),
                        generator=torch.Generator().manual_seed(1)).to(device)
    heads = sp.MedusaHeads.from_target(model, 4, noise=0.2, generator=torch.Generator().manual_seed(2)).eval()
    paths = tree.MEDUSA_63 if gpu else tree.MEDUSA_63[:15]
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    draft = sp.truncated_draft(model, 1)
    runs = [(f"random Medusa heads, Medusa tree of {len(paths) + 1} tokens", lambda: sp.MedusaDrafter(heads), paths),
            ("draft = the target's first layer, EAGLE dynamic top-k tree of 16 tokens",
             lambda: sp.DraftModelDrafter(draft, topk=4, depth=4, num_nodes=16), None)]
    print(f"Speculative decoding on a random Llama ({model.config.num_hidden_layers} layers, "
          f"{str(model.dtype)[6:]}, {device}), {n} new tokens, greedy acceptance:")
    for title, make, spec in runs:
        print(f"  {title}:")
        for attn in ("flashtree", "sdpa"):
            out, stats = sp.generate(model, make(), ids, tree=spec, max_new_tokens=n, attn=attn, return_stats=True)
            if not torch.equal(out, greedy):
                k, gap = _near_tie(model, ids, out[0].tolist(), n)
                if not (gpu and gap is not None and gap < 0.02):
                    raise SystemExit(f"speculative ({attn}) differs from greedy decoding at new token {k} "
                                     f"(top-2 logit gap {gap})")
                print(f"    note: fp16 near tie at new token {k} (top-2 logit gap {gap:.4f})")
            steady = stats.step_ms[1:] or stats.step_ms
            print(f"    {attn:<9} equals greedy: yes  steps {len(stats.step_ms):3d}  tokens/step "
                  f"{stats.mean_accepted:.2f}  step {sum(steady) / len(steady):7.2f} ms  "
                  f"accepted per step {[a[0] for a in stats.accepted]}")
    glide = sp.GlideDraft.from_target(model)
    out, stats = sp.generate(model, sp.GlideDrafter(glide, depth=4), ids, max_new_tokens=n, return_stats=True)
    same = torch.equal(out, greedy) or (gpu and (_near_tie(model, ids, out[0].tolist(), n)[1] or 1) < 0.02)
    if not same:
        raise SystemExit("GLIDE/CAPE speculative decoding differs from greedy decoding")
    steady = stats.step_ms[1:] or stats.step_ms
    print(f"  GLIDE+CAPE (block initialised from the last layer, untrained) equals greedy: yes  tokens/step {stats.mean_accepted:.2f}  "
          f"mean tree {sum(stats.tree_sizes) / len(stats.tree_sizes):.1f} tokens  "
          f"step {sum(steady) / len(steady):.2f} ms")


def run_demo(quick: bool = False) -> int:
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"GPU: {name}. Checking every op against its float64 reference...")
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            print(f"  merge_states {str(dtype)[6:]:<9} rel err {_check_merge('cuda', dtype):.1e}  ok")
        if not quick:
            _time_merge_gpu()
    else:
        print("No CUDA GPU visible: running the CPU reference path and a compile check instead.")
        print(f"  merge_states float32 (reference path) rel err {_check_merge('cpu', torch.float32):.1e}  ok")
        specs = _jit.shipped_specs()
        worst = 0
        for arch in ("sm_80", "sm_90"):
            for spec in specs:
                target = spec.target(arch)  # None: an sm_90a kernel on the sm_80 pass
                if target is not None:
                    kernel, _ = _jit.load_or_compile(spec, target)
                    worst = max(worst, kernel.resources.spills)
        print(f"  compiled {len(specs)} kernel specs for sm_80 and sm_90 with NVRTC "
              f"{_jit.nvrtc_version()}: {'no' if worst == 0 else worst} spilled bytes")
    if torch.cuda.is_available():
        _speculative("cuda", quick)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: one thread is fastest
        try:
            _speculative("cpu", quick)
        finally:
            torch.set_num_threads(threads)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0
