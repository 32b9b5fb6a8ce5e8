"""`KernelSpec`: the name of one compiled specialisation of a kernel template."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# torch dtype -> (C++ type in kernels_cu/common/types.cuh, short name used in spec names)
DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float16: ("ft::f16", "f16"),
    torch.bfloat16: ("ft::bf16", "bf16"),
    torch.float32: ("float", "f32"),
}


def ctype(dtype: torch.dtype) -> str:
    return DTYPES[dtype][0]


def short(dtype: torch.dtype) -> str:
    return DTYPES[dtype][1]


@dataclass(frozen=True)
class KernelSpec:
    """One template instantiation of one kernel, compiled once per target arch.

    family:        the source file, ``kernels_cu/<family>.cu``.
    kernel:        the C++ template, e.g. ``"ft::merge_states_kernel"``.
    template_args: its arguments, e.g. ``("ft::bf16", 128, 256)``; everything that changes the
                   generated code (dtype, head_dim, tile sizes) and nothing else.
    name:          readable and unique, e.g. ``"merge_bf16_d128"``: cache files, logs, reports.
    arch_suffix:   ``"a"`` for kernels that need the arch-specific target (wgmma on sm_90a).
    archs:         the base targets it is built for (``("sm_90",)`` for an sm_90a kernel); empty: all.
    """

    family: str
    kernel: str
    template_args: tuple
    name: str
    arch_suffix: str = ""
    archs: tuple = ()

    def target(self, arch: str) -> str | None:
        """The NVRTC target for base target ``arch`` ("sm_90" -> "sm_90a"), or None if not built for it."""
        base = arch.removesuffix("a")
        if self.archs and base not in self.archs:
            return None
        return base + self.arch_suffix if self.arch_suffix else arch

    @property
    def name_expression(self) -> str:
        """The NVRTC name expression that instantiates the template."""
        args = ", ".join(str(a) for a in self.template_args)
        return f"{self.kernel}<{args}>"

    @property
    def source_file(self) -> str:
        return f"{self.family}.cu"
