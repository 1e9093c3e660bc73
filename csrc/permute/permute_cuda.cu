// Token permutation for MoE dispatch: CUDA kernels.
//
// Legend: T tokens, K slots per token (top-k), E experts, N valid (non-dropped) slots, H hidden.
// Arguments arrive checked and contiguous from permute.cpp; see permute.h for the semantics.
// Nothing here synchronises with the host: sizes come from the inputs' shapes, temporary
// buffers come from PyTorch's caching allocator, and all work goes on the current stream.
//
// Only light headers are included (no ATen/cuda/CUDAContext.h, which drags in cuBLAS and
// cuSPARSE headers) so the file compiles against a plain CUDA toolkit.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "permute.h"

namespace megamoe {
namespace permute {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
// Grid-stride loops below make any grid size correct; this cap just bounds launch size.
constexpr int64_t kMaxBlocks = 1 << 20;

// VEC consecutive elements moved as one aligned load/store (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

// Widest vector (elements) that divides H and keeps every row start of every pointer aligned.
template <typename scalar_t>
int pick_vec(int64_t h, std::initializer_list<const void*> ptrs) {
  int vec = 16 / static_cast<int>(sizeof(scalar_t));
  auto aligned = [&](int v) {
    if (h % v != 0) return false;
    for (const void* p : ptrs) {
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (v * sizeof(scalar_t)) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !aligned(vec)) vec /= 2;
  return vec;
}

// Calls launch(std::integral_constant<int, VEC>) for the chosen width; only widths of at most
// 16 bytes are instantiated.
template <typename scalar_t, typename Launch>
void with_vec(int vec, Launch&& launch) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (vec == 8) return launch(std::integral_constant<int, 8>{});
  }
  if constexpr (sizeof(scalar_t) <= 4) {
    if (vec == 4) return launch(std::integral_constant<int, 4>{});
  }
  if constexpr (sizeof(scalar_t) <= 8) {
    if (vec == 2) return launch(std::integral_constant<int, 2>{});
  }
  launch(std::integral_constant<int, 1>{});
}

// One block per row: enough threads to cover the row's vectors once, in whole warps.
int threads_for(int64_t vectors_per_row) {
  const int64_t warps = (vectors_per_row + kWarp - 1) / kWarp;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(1, warps) * kWarp));
}

unsigned int blocks_for(int64_t rows) {
  return static_cast<unsigned int>(std::min<int64_t>(rows, kMaxBlocks));
}

// Sum over the block; the result is valid in thread 0. Every thread of the block must call it.
template <typename T>
__device__ T block_sum(T v, T* warp_sums /* [kMaxThreads / kWarp] in shared memory */) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x / kWarp;
  v = threadIdx.x < num_warps ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0) {
    for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums is reused by the block's next call
  return v;
}

// ---------------------------------------------------------------------------------------------
// Index building
// ---------------------------------------------------------------------------------------------

// Sort keys (expert, or E for a dropped slot), sort values (the slot itself) and the per-expert
// histogram. The histogram is built in shared memory when E fits and flushed with one global
// atomic per (block, expert), which keeps contention on the global counters low.
__global__ void expert_keys_kernel(const int64_t* __restrict__ topk_idx, int64_t n, int num_experts,
                                   bool shared_hist, uint32_t* __restrict__ keys,
                                   int64_t* __restrict__ slots, int32_t* __restrict__ counts) {
  extern __shared__ int32_t hist_smem[];
  int32_t* hist = shared_hist ? hist_smem : counts;
  if (shared_hist) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = topk_idx[i];
    CUDA_KERNEL_ASSERT(e < num_experts && "expert index out of range");
    const bool dropped = e < 0;
    keys[i] = dropped ? static_cast<uint32_t>(num_experts) : static_cast<uint32_t>(e);
    slots[i] = i;
    if (!dropped) atomicAdd(&hist[e], 1);
  }
  if (shared_hist) {
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> sort_by_expert_cuda(const Tensor& topk_idx, int64_t num_experts) {
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = topk_idx.numel();
  const auto opts = topk_idx.options();
  TORCH_CHECK(num_experts < (int64_t{1} << 30), "num_experts too large: ", num_experts);

  auto counts32 = at::zeros({num_experts}, opts.dtype(at::kInt));
  auto perm_map = at::empty({n}, opts.dtype(at::kLong));
  if (n > 0) {
    auto keys_in = at::empty({n}, opts.dtype(at::kInt));
    auto keys_out = at::empty({n}, opts.dtype(at::kInt));
    auto slots_in = at::empty({n}, opts.dtype(at::kLong));
    auto* keys_in_p = reinterpret_cast<uint32_t*>(keys_in.data_ptr<int32_t>());
    auto* keys_out_p = reinterpret_cast<uint32_t*>(keys_out.data_ptr<int32_t>());

    const int threads = kMaxThreads;
    const unsigned int blocks = static_cast<unsigned int>(
        std::min<int64_t>((n + threads - 1) / threads, 1024));
    const size_t hist_bytes = num_experts * sizeof(int32_t);
    const bool shared_hist = hist_bytes <= 32 * 1024;
    expert_keys_kernel<<<blocks, threads, shared_hist ? hist_bytes : 0, stream>>>(
        topk_idx.data_ptr<int64_t>(), n, static_cast<int>(num_experts), shared_hist, keys_in_p,
        slots_in.data_ptr<int64_t>(), counts32.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // LSD radix sort is stable, so equal experts keep slot order: exactly the expert-major,
    // token-ordered layout we want. Only the bits that can hold 0..E are sorted.
    int end_bit = 1;
    while ((int64_t{1} << end_bit) <= num_experts) ++end_bit;
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys_in_p, keys_out_p, slots_in.data_ptr<int64_t>(),
        perm_map.data_ptr<int64_t>(), static_cast<int>(n), 0, end_bit, stream));
    auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.data_ptr(), temp_bytes, keys_in_p, keys_out_p, slots_in.data_ptr<int64_t>(),
        perm_map.data_ptr<int64_t>(), static_cast<int>(n), 0, end_bit, stream));
  }
  // Device-side scan: cumulative end offsets as torch._grouped_mm wants them (int32).
  auto offsets = at::cumsum(counts32, 0, at::kInt);
  return {perm_map, counts32.to(at::kLong), offsets};
}

namespace {

// ---------------------------------------------------------------------------------------------
// Row movement
// ---------------------------------------------------------------------------------------------

// out[r] = src[perm_map[r] / K] (* scale[perm_map[r]]). One block per output row (grid-stride),
// threads stride over the row in VEC-wide packs.
template <typename scalar_t, int VEC, bool SCALED>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ perm_map,
                                   const at::opmath_type<scalar_t>* __restrict__ scale,
                                   scalar_t* __restrict__ out, int64_t n, int64_t h, int64_t top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = h / VEC;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t slot = perm_map[r];
    const P* from = reinterpret_cast<const P*>(src + (slot / top_k) * h);
    P* to = reinterpret_cast<P*>(out + r * h);
    const acc_t s = SCALED ? scale[slot] : acc_t(1);
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      P p = from[j];
      if constexpr (SCALED) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) p.val[i] = static_cast<scalar_t>(static_cast<acc_t>(p.val[i]) * s);
      }
      to[j] = p;
    }
  }
}

// row_of_slot[perm_map[r]] = r; row_of_slot was filled with -1, so dropped slots stay -1.
__global__ void invert_perm_map_kernel(const int64_t* __restrict__ perm_map, int64_t n,
                                       int64_t num_slots, int64_t* __restrict__ row_of_slot) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t slot = perm_map[r];
    CUDA_KERNEL_ASSERT(slot >= 0 && slot < num_slots && "perm_map entry out of range");
    row_of_slot[slot] = r;
  }
}

// out[t] = sum_k w[t,k] * y_perm[row_of_slot[t*K+k]]: one block per token (grid-stride), each
// thread owns VEC columns and sums the K rows in k order in the accumulation type. Gathering
// per token (instead of scattering per row) needs no atomics and is deterministic.
template <typename scalar_t, int VEC, bool WEIGHTED>
__global__ void unpermute_sum_kernel(const scalar_t* __restrict__ y_perm,
                                     const int64_t* __restrict__ row_of_slot,
                                     const at::opmath_type<scalar_t>* __restrict__ weights,
                                     scalar_t* __restrict__ out, int64_t num_tokens, int64_t h,
                                     int64_t top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = h / VEC;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t slot = t * top_k + k;
        const int64_t r = row_of_slot[slot];
        if (r < 0) continue;  // dropped slot: contributes zero
        const acc_t w = WEIGHTED ? weights[slot] : acc_t(1);
        const P p = reinterpret_cast<const P*>(y_perm + r * h)[j];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += w * static_cast<acc_t>(p.val[i]);
      }
      P o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.val[i] = static_cast<scalar_t>(acc[i]);
      reinterpret_cast<P*>(out + t * h)[j] = o;
    }
  }
}

// Both gradients of unpermute in one pass over the permuted rows (one block per row):
// grad_y_perm[r] = w[slot] * grad_y[t] and grad_w[slot] = <grad_y[t], y_perm[r]>.
template <typename scalar_t, int VEC, bool NEED_GY, bool NEED_GW>
__global__ void unpermute_backward_kernel(const scalar_t* __restrict__ grad_y,
                                          const scalar_t* __restrict__ y_perm,
                                          const int64_t* __restrict__ perm_map,
                                          const at::opmath_type<scalar_t>* __restrict__ weights,
                                          scalar_t* __restrict__ grad_y_perm,
                                          at::opmath_type<scalar_t>* __restrict__ grad_w,
                                          int64_t n, int64_t h, int64_t top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t warp_sums[kMaxThreads / kWarp];
  const int64_t packs = h / VEC;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t slot = perm_map[r];
    const P* g = reinterpret_cast<const P*>(grad_y + (slot / top_k) * h);
    const acc_t w = weights[slot];
    acc_t dot = 0;
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      const P gp = g[j];
      if constexpr (NEED_GY) {
        P o;
#pragma unroll
        for (int i = 0; i < VEC; ++i) o.val[i] = static_cast<scalar_t>(static_cast<acc_t>(gp.val[i]) * w);
        reinterpret_cast<P*>(grad_y_perm + r * h)[j] = o;
      }
      if constexpr (NEED_GW) {
        const P yp = reinterpret_cast<const P*>(y_perm + r * h)[j];
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += static_cast<acc_t>(gp.val[i]) * static_cast<acc_t>(yp.val[i]);
      }
    }
    if constexpr (NEED_GW) {
      dot = block_sum(dot, warp_sums);
      if (threadIdx.x == 0) grad_w[slot] = dot;
    }
  }
}

}  // namespace

Tensor gather_rows_cuda(const Tensor& src, const Tensor& perm_map, int64_t top_k,
                        const std::optional<Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(src.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = perm_map.numel();
  const int64_t h = src.size(1);
  auto out = at::empty({n, h}, src.options());
  if (n == 0 || h == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* w = scale ? scale->data_ptr<acc_t>() : nullptr;
    const int vec = pick_vec<scalar_t>(h, {in, o});
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int V = decltype(vec_c)::value;
      const int threads = threads_for(h / V);
      if (w != nullptr) {
        gather_rows_kernel<scalar_t, V, true><<<blocks_for(n), threads, 0, stream>>>(
            in, perm_map.data_ptr<int64_t>(), w, o, n, h, top_k);
      } else {
        gather_rows_kernel<scalar_t, V, false><<<blocks_for(n), threads, 0, stream>>>(
            in, perm_map.data_ptr<int64_t>(), nullptr, o, n, h, top_k);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

Tensor unpermute_sum_cuda(const Tensor& y_perm, const Tensor& perm_map, int64_t num_tokens,
                          int64_t top_k, const std::optional<Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(y_perm.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = perm_map.numel();
  const int64_t h = y_perm.size(1);
  auto out = at::empty({num_tokens, h}, y_perm.options());
  if (num_tokens == 0 || h == 0) return out;

  // The per-token kernel needs slot -> row; building it is one tiny pass over perm_map.
  auto row_of_slot = at::full({num_tokens * top_k}, -1, perm_map.options());
  if (n > 0) {
    const int threads = kMaxThreads;
    const unsigned int blocks = static_cast<unsigned int>(
        std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks));
    invert_perm_map_kernel<<<blocks, threads, 0, stream>>>(
        perm_map.data_ptr<int64_t>(), n, num_tokens * top_k, row_of_slot.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y = y_perm.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* w = weights ? weights->data_ptr<acc_t>() : nullptr;
    const int vec = pick_vec<scalar_t>(h, {y, o});
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int V = decltype(vec_c)::value;
      const int threads = threads_for(h / V);
      if (w != nullptr) {
        unpermute_sum_kernel<scalar_t, V, true><<<blocks_for(num_tokens), threads, 0, stream>>>(
            y, row_of_slot.data_ptr<int64_t>(), w, o, num_tokens, h, top_k);
      } else {
        unpermute_sum_kernel<scalar_t, V, false><<<blocks_for(num_tokens), threads, 0, stream>>>(
            y, row_of_slot.data_ptr<int64_t>(), nullptr, o, num_tokens, h, top_k);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<std::optional<Tensor>, std::optional<Tensor>> unpermute_backward_cuda(
    const Tensor& grad_y, const Tensor& y_perm, const Tensor& perm_map, const Tensor& weights,
    bool need_grad_y_perm, bool need_grad_weights) {
  const c10::cuda::CUDAGuard guard(y_perm.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = perm_map.numel();
  const int64_t h = y_perm.size(1);
  const int64_t top_k = weights.size(1);
  std::optional<Tensor> grad_y_perm, grad_weights;
  if (need_grad_y_perm) grad_y_perm = at::empty({n, h}, y_perm.options());
  // Zero-filled: dropped slots never appear in perm_map and keep a zero gradient.
  if (need_grad_weights) grad_weights = at::zeros(weights.sizes(), weights.options());
  if (n == 0 || h == 0 || !(need_grad_y_perm || need_grad_weights)) return {grad_y_perm, grad_weights};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* y = y_perm.data_ptr<scalar_t>();
    const acc_t* w = weights.data_ptr<acc_t>();
    scalar_t* gyp = need_grad_y_perm ? grad_y_perm->data_ptr<scalar_t>() : nullptr;
    acc_t* gw = need_grad_weights ? grad_weights->data_ptr<acc_t>() : nullptr;
    const int vec = pick_vec<scalar_t>(h, {gy, y, gyp});
    const int64_t* map = perm_map.data_ptr<int64_t>();
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int V = decltype(vec_c)::value;
      const int threads = threads_for(h / V);
      const unsigned int blocks = blocks_for(n);
      if (gyp != nullptr && gw != nullptr) {
        unpermute_backward_kernel<scalar_t, V, true, true><<<blocks, threads, 0, stream>>>(
            gy, y, map, w, gyp, gw, n, h, top_k);
      } else if (gyp != nullptr) {
        unpermute_backward_kernel<scalar_t, V, true, false><<<blocks, threads, 0, stream>>>(
            gy, y, map, w, gyp, gw, n, h, top_k);
      } else {
        unpermute_backward_kernel<scalar_t, V, false, true><<<blocks, threads, 0, stream>>>(
            gy, y, map, w, gyp, gw, n, h, top_k);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_y_perm, grad_weights};
}

}  // namespace permute
}  // namespace megamoe
