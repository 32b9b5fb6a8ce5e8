"""KV-cache management: a paged tree KV cache for shared-prefix decoding (``tree_cache``) and the
commit of accepted speculative tokens into padded or paged caches (``commit``)."""
from .tree_cache import OutOfPagesError, TreeKVCache  # noqa: E402,F401
from .commit import CacheOverflowError, commit_accepted, stack_layers  # noqa: E402,F401
