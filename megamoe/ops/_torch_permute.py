"""Pure-PyTorch versions of the permutation primitives (fallback and reference).

Legend: T tokens, K slots per token (top-k), E experts, N valid (non-dropped) slots, H hidden.
A slot is the flat index t*K + k; topk_idx < 0 marks a dropped slot.

Same signatures and semantics as the functions of the C++/CUDA extension megamoe._permute
(see csrc/permute/permute.h), so megamoe.ops.permute can use either without caring which.
Sums and scalings run in the accumulation dtype (fp32, or fp64 for fp64 data) like the kernels.
"""

import torch

from megamoe.precision import accum_dtype as acc_dtype


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int):
    """topk_idx[T, K] -> perm_map[T*K] int64, counts[E] int64, offsets[E] int32.

    perm_map holds the valid slots first, in stable expert-major order, then the dropped slots
    in slot order; offsets are cumulative END offsets per expert (offsets[-1] = N).
    """
    flat = topk_idx.reshape(-1)
    if not flat.is_cuda and flat.numel() > 0:   # cheap on CPU; on GPU it would cost a sync
        hi = int(flat.max())
        if hi >= num_experts:
            raise ValueError(f"sort_by_expert: expert index {hi} out of range for num_experts={num_experts}")
    keys = torch.where(flat < 0, num_experts, flat)   # dropped slots sort after every expert
    sorted_keys, perm_map = torch.sort(keys, stable=True)
    # Counts from the sorted keys rather than torch.bincount: CUDA bincount reads the maximum
    # back to the host to size its output, and this path must stay free of host syncs.
    experts = torch.arange(num_experts, device=flat.device, dtype=keys.dtype)
    ends = torch.searchsorted(sorted_keys, experts, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return perm_map, counts, ends.to(torch.int32)


def gather_rows(src: torch.Tensor, perm_map: torch.Tensor, top_k: int, scale=None):
    """out[r] = src[perm_map[r] // K] * scale[perm_map[r]]  (scale [T, K] optional)."""
    rows = src.index_select(0, perm_map // top_k)
    if scale is None:
        return rows
    acc = acc_dtype(src.dtype)
    s = scale.reshape(-1).to(acc)[perm_map]
    return (rows.to(acc) * s.unsqueeze(1)).to(src.dtype)


def unpermute_sum(y_perm: torch.Tensor, perm_map: torch.Tensor, num_tokens: int, top_k: int,
                  weights=None):
    """out[t] = sum_k weights[t, k] * y_perm[row of slot t*K+k]; slots not in perm_map add 0."""
    acc = acc_dtype(y_perm.dtype)
    h = y_perm.shape[1]
    slots = y_perm.new_zeros((num_tokens * top_k, h), dtype=acc)
    slots.index_copy_(0, perm_map, y_perm.to(acc))          # back to slot order; dropped = 0
    slots = slots.view(num_tokens, top_k, h)
    if weights is not None:
        slots = slots * weights.to(acc).view(num_tokens, top_k, 1)
    return slots.sum(dim=1).to(y_perm.dtype)


def unpermute_backward(grad_y: torch.Tensor, y_perm: torch.Tensor, perm_map: torch.Tensor,
                       weights: torch.Tensor, need_grad_y_perm: bool, need_grad_weights: bool):
    """-> (grad_y_perm[N, H] or None, grad_weights[T, K] in the accumulation dtype or None)."""
    acc = acc_dtype(y_perm.dtype)
    num_tokens, top_k = weights.shape
    g_rows = grad_y.index_select(0, perm_map // top_k).to(acc)   # grad_y of each row's token
    grad_y_perm = grad_weights = None
    if need_grad_y_perm:
        w = weights.reshape(-1).to(acc)[perm_map]
        grad_y_perm = (g_rows * w.unsqueeze(1)).to(y_perm.dtype)
    if need_grad_weights:
        dots = (g_rows * y_perm.to(acc)).sum(dim=1)
        grad_weights = torch.zeros(num_tokens * top_k, dtype=acc, device=y_perm.device)
        grad_weights.index_copy_(0, perm_map, dots)             # dropped slots keep 0
        grad_weights = grad_weights.view(num_tokens, top_k)
    return grad_y_perm, grad_weights
