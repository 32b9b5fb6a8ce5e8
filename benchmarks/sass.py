"""SASS of shipped kernel specs, on a machine with nvdisasm or cuobjdump (the lent GPU's image has both).

    python benchmarks/sass.py OUT_DIR ARCH SPEC_NAME ...      e.g.  /tmp/out sm_90 decode_bf16_d128_b64

Compiles (or reads from the cache) each spec for ARCH, writes OUT_DIR/NAME.sass and prints a count of
the instructions by opcode: the first check of an instruction-count change.
"""
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from flashtree import _jit


def main(out: str, arch: str, names: list[str]) -> None:
    specs = {s.name: s for s in _jit.shipped_specs()}
    for name in names:
        kernel, _ = _jit.load_or_compile(specs[name], arch)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.cubin)
            f.flush()
            run = first = subprocess.run(["nvdisasm", f.name], capture_output=True, text=True)
            if run.returncode:
                run = subprocess.run(["cuobjdump", "--dump-sass", f.name], capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{name}: nvdisasm and cuobjdump failed: {run.stderr[-500:]}\n{first.stderr[-500:]}")
            sass = run.stdout
        Path(out, f"{name}.sass").write_text(sass)
        ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
        print(f"{name} ({arch}): {sum(ops.values())} instructions; " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
