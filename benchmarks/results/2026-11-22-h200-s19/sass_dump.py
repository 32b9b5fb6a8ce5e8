"""Dump SASS of the c4 kernel (from the flashtree cache) and of the wg_chains probe (compiled here)."""
import os, sys, subprocess, glob, json, struct, importlib.util
out = os.environ["OUT"] + "/c"
sys.path.insert(0, os.getcwd())
import torch
from flashtree import deft, _jit
from flashtree._jit import cache as C, nvrtc as N
sp = deft.ws_spec(torch.bfloat16, 128, 4)
k, _ = _jit.load_or_compile(sp, sp.target("sm_90"))
open(f"{out}/c4.cubin", "wb").write(k.cubin)
sp2 = deft.ws_spec(torch.bfloat16, 128, 2)
k2, _ = _jit.load_or_compile(sp2, sp2.target("sm_90"))
open(f"{out}/c2.cubin", "wb").write(k2.cubin)
spec = importlib.util.spec_from_file_location("m", "benchmarks/wg_chains.py"); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
nv = N.nvrtc_module()
prog = nv.createProgram(m.SRC, "probe.cu", [], [])
name = "ft::chains<4, 0, 0, 0, false, true>"
nv.addNameExpression(prog, name)
nv.compileProgram(prog, ["--std=c++17", "--gpu-architecture=sm_90a", "--include-path=kernels_cu", "-lineinfo"])
open(f"{out}/probe.cubin", "wb").write(nv.getCUBIN(prog))
for f in ("c4", "c2", "probe"):
    r = subprocess.run(["cuobjdump", "-sass", f"{out}/{f}.cubin"], capture_output=True, text=True)
    open(f"{out}/{f}.sass", "w").write(r.stdout + r.stderr)
    print(f, len(r.stdout.splitlines()), r.stderr[:200])
