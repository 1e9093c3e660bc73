"""Token permutation for MoE dispatch (autograd front of csrc/permute).

Legend: T tokens, K experts per token (top-k), E experts, N valid (non-dropped) slots, H hidden.
A slot is the flat index t*K + k of one (token, choice) pair.

permute:   x[T, H], topk_idx[T, K] -> x_perm[N, H] in stable expert-major order (all rows of
           expert 0 in token order, then expert 1, ...), perm_map[N] (for each permuted row, the
           slot it came from), counts[E] (rows per expert).
unpermute: y_perm[N, H], perm_map[N], weights[T, K] -> y[T, H] = sum_k weights[t, k] * y(t, k),
           the weighted sum done inside the kernel (no separate scaling pass).
sort_by_expert: topk_idx -> perm_map, counts, offsets (int32 cumulative end offsets, the `offs`
           argument of torch._grouped_mm), without a host sync on GPU.

Dropped slots (capacity limit): an entry topk_idx[t, k] < 0 (conventionally -1) means the slot
is dropped. permute leaves it out (N = number of valid slots, perm_map lists only valid slots,
counts do not include it) and unpermute treats it as contributing zero (its weight gets a zero
gradient). Without drops N = T*K.

Backends: the C++ extension megamoe._permute (CPU kernels, plus CUDA kernels when it was built
with CUDA) or the pure-PyTorch fallback in _torch_permute.py. MEGAMOE_OPS_BACKEND selects:
"auto" (default: the extension where it covers the device, else torch), "torch" (always the
fallback), "ext" (the extension or an error). `backend(device)` says which is active.
"""

import os

import torch
from torch.autograd.function import once_differentiable

from megamoe.ops import _torch_permute

try:
    from megamoe import _permute as _ext
    _EXT_ERROR = None
except Exception as err:  # noqa: BLE001 - not built, or built against another torch
    _ext = None
    _EXT_ERROR = err


def _ext_covers(device_type: str) -> bool:
    if _ext is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and _ext.has_cuda()


def _impl(device: torch.device):
    """The module implementing the primitives for tensors on `device`."""
    mode = os.environ.get("MEGAMOE_OPS_BACKEND", "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "ext"):
        raise ValueError(f"MEGAMOE_OPS_BACKEND must be auto, torch or ext, got {mode!r}")
    if mode == "torch":
        return _torch_permute
    if _ext_covers(device.type):
        return _ext
    if mode == "ext":
        raise RuntimeError(f"MEGAMOE_OPS_BACKEND=ext but megamoe._permute does not cover "
                           f"{device.type} tensors (import error: {_EXT_ERROR})")
    return _torch_permute


def backend(device=None) -> str:
    """Which implementation serves tensors on `device`: "cpp", "cuda" or "torch".

    With no device: the CUDA one when a GPU is visible, else the CPU one.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if _impl(device) is _torch_permute:
        return "torch"
    return "cuda" if device.type == "cuda" else "cpp"


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int):
    """topk_idx[T, K] -> (perm_map[T*K] int64, counts[E] int64, offsets[E] int32).

    perm_map starts with the N = offsets[-1] valid slots in stable expert-major order, followed
    by the dropped slots (topk_idx < 0) in slot order; counts exclude dropped slots; offsets are
    the cumulative end offsets per expert (torch._grouped_mm's `offs`). Runs entirely on the
    device of topk_idx: no host sync on GPU.
    """
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {tuple(topk_idx.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return _impl(topk_idx.device).sort_by_expert(topk_idx.long(), num_experts)


class _PermuteRows(torch.autograd.Function):
    """x_perm[r] = x[perm_map[r] // K]; backward sums each token's rows (unweighted unpermute)."""

    @staticmethod
    def forward(ctx, x, perm_map, top_k):
        impl = _impl(x.device)
        ctx.impl, ctx.top_k, ctx.num_tokens = impl, top_k, x.shape[0]
        ctx.save_for_backward(perm_map)
        return impl.gather_rows(x, perm_map, top_k, None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_perm):
        (perm_map,) = ctx.saved_tensors
        grad_x = ctx.impl.unpermute_sum(grad_x_perm.contiguous(), perm_map, ctx.num_tokens, ctx.top_k, None)
        return grad_x, None, None


class _Unpermute(torch.autograd.Function):
    """y[t] = sum_k w[t,k] y_perm[row(t,k)]; backward = weighted gather + row-wise dot products."""

    @staticmethod
    def forward(ctx, y_perm, perm_map, weights):
        impl = _impl(y_perm.device)
        num_tokens, top_k = weights.shape
        ctx.impl, ctx.weights_dtype = impl, weights.dtype
        ctx.save_for_backward(y_perm, perm_map, weights)
        return impl.unpermute_sum(y_perm, perm_map, num_tokens, top_k, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        y_perm, perm_map, weights = ctx.saved_tensors
        need_y, _, need_w = ctx.needs_input_grad
        grad_y_perm, grad_w = ctx.impl.unpermute_backward(
            grad_y.to(y_perm.dtype).contiguous(), y_perm, perm_map, weights, need_y, need_w)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weights_dtype)
        return grad_y_perm, None, grad_w


def permute_with_map(x: torch.Tensor, perm_map: torch.Tensor, top_k: int) -> torch.Tensor:
    """x[T, H], perm_map[N] (from sort_by_expert, valid prefix) -> x_perm[N, H]; differentiable."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    return _PermuteRows.apply(x, perm_map, top_k)


def permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, num_valid: int | None = None):
    """x[T, H], topk_idx[T, K] -> (x_perm[N, H], perm_map[N] int64, counts[E] int64).

    Differentiable w.r.t. x. N is the number of valid (topk_idx >= 0) slots. On GPU, learning N
    costs one device->host sync; pass `num_valid` when the caller already knows it (T*K for
    dropless routing) to avoid it. A wrong num_valid is an error on CPU and undefined on GPU.
    """
    if x.dim() != 2 or topk_idx.dim() != 2 or x.shape[0] != topk_idx.shape[0]:
        raise ValueError(f"expected x[T, H] and topk_idx[T, K], got {tuple(x.shape)} and {tuple(topk_idx.shape)}")
    top_k = topk_idx.shape[1]
    perm_map, counts, offsets = sort_by_expert(topk_idx, num_experts)
    if num_valid is None:
        num_valid = int(offsets[-1])   # the only host sync of permute, when the caller cannot say
    elif not offsets.is_cuda:
        check_num_valid(offsets, num_valid)
    perm_map = perm_map[:num_valid]
    return permute_with_map(x, perm_map, top_k), perm_map, counts


def check_num_valid(offsets: torch.Tensor, num_valid: int) -> None:
    """CPU tensors only: free there, a host sync on a GPU (where a wrong value is undefined)."""
    actual = int(offsets[-1])
    if num_valid != actual:
        raise ValueError(f"num_valid={num_valid} but topk_idx has {actual} valid slots")


def unpermute(y_perm: torch.Tensor, perm_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_perm[N, H], perm_map[N], weights[T, K] -> y[T, H] = sum_k weights[t, k] * y(t, k).

    Differentiable w.r.t. y_perm and weights. Slots missing from perm_map (dropped) add zero.
    y has y_perm's dtype; the weighted sum is accumulated in fp32 (fp64 for fp64 data).
    """
    if y_perm.dim() != 2 or weights.dim() != 2 or perm_map.dim() != 1:
        raise ValueError(f"expected y_perm[N, H], perm_map[N], weights[T, K], got "
                         f"{tuple(y_perm.shape)}, {tuple(perm_map.shape)}, {tuple(weights.shape)}")
    if perm_map.shape[0] != y_perm.shape[0]:
        raise ValueError(f"perm_map has {perm_map.shape[0]} entries but y_perm has {y_perm.shape[0]} rows")
    return _Unpermute.apply(y_perm, perm_map, weights)
