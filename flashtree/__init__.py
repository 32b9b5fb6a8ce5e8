"""flashtree: tree-attention GPU kernels in CUDA C, compiled at run time with NVRTC.

Public ops take torch tensors (CuPy arrays too, through DLPack). CUDA tensors run the kernels;
CPU tensors run the plain-torch references in ``flashtree.reference``.
"""
__version__ = "0.1.0"

from . import reference  # noqa: E402
from .decode import flash_decoding_attention, flash_decoding_attention_paged  # noqa: E402
from .deft import deft_attention, deft_plan  # noqa: E402
from .dfs import tree_attention  # noqa: E402
from . import kvcache  # noqa: E402,F401  (registers the commit kernels' shipped specs)
from .merge import merge_state, merge_states  # noqa: E402

__all__ = [
    "__version__",
    "deft_attention",
    "deft_plan",
    "flash_decoding_attention",
    "flash_decoding_attention_paged",
    "merge_state",
    "merge_states",
    "reference",
    "tree_attention",
]
