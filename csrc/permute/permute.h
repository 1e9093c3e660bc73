// Token permutation kernels for MoE dispatch: shared declarations.
//
// Legend: T tokens, K slots per token (top-k), E experts, N valid (non-dropped) slots, H hidden.
// A "slot" is the flat index t*K + k of one (token, choice) pair. topk_idx[t, k] < 0 marks a
// dropped slot (capacity limit): it gets no permuted row and contributes zero to the unpermute.
//
// The same four primitives back both ops and their backward passes:
//   sort_by_expert      topk_idx[T,K] -> perm_map[T*K] (valid slots first, stable expert-major,
//                       then the dropped slots in slot order), counts[E] int64, offsets[E] int32
//                       (cumulative END offsets, the `offs` of torch._grouped_mm)
//   gather_rows         out[r] = src[perm_map[r] / K] * scale[perm_map[r]]      (scale optional)
//   unpermute_sum       out[t] = sum_k w[t,k] * y_perm[row of slot (t,k)]      (w optional = 1)
//   unpermute_backward  grad_y_perm[r] = w[slot] * grad_y[t];  grad_w[slot] = <grad_y[t], y_perm[r]>
// Weights and scales are taken in the accumulation type (fp32 for fp16/bf16/fp32, fp64 for fp64).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace megamoe {
namespace permute {

#ifdef MEGAMOE_WITH_CUDA
// Inputs are already validated and contiguous (see permute.cpp); all work is queued on the
// current stream, and none of these functions waits for the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_expert_cuda(const at::Tensor& topk_idx,
                                                                   int64_t num_experts);
at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& perm_map, int64_t top_k,
                            const std::optional<at::Tensor>& scale);
at::Tensor unpermute_sum_cuda(const at::Tensor& y_perm, const at::Tensor& perm_map,
                              int64_t num_tokens, int64_t top_k,
                              const std::optional<at::Tensor>& weights);
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> unpermute_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& y_perm, const at::Tensor& perm_map,
    const at::Tensor& weights, bool need_grad_y_perm, bool need_grad_weights);
#endif

}  // namespace permute
}  // namespace megamoe
