"""Python front of csrc/: token permutation ops with pure-PyTorch fallbacks.

`backend(device)` says which implementation is active ("cpp", "cuda" or "torch");
MEGAMOE_OPS_BACKEND=torch forces the fallback. See megamoe/ops/permute.py for the semantics,
including dropped slots (topk_idx == -1).
"""

from megamoe.ops.permute import backend, permute, permute_with_map, sort_by_expert, unpermute

__all__ = ["backend", "permute", "permute_with_map", "sort_by_expert", "unpermute"]
