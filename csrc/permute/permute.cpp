// Token permutation for MoE dispatch: CPU kernels, argument checks and Python bindings.
//
// Legend: T tokens, K slots per token (top-k), E experts, N valid (non-dropped) slots, H hidden.
// See permute.h for what each primitive computes. The public functions here check arguments
// once and then route to the CPU kernels below or, in a CUDA build (MEGAMOE_WITH_CUDA), to
// permute_cuda.cu, so both devices share one set of checks and one binding.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "permute.h"

namespace megamoe {
namespace permute {
namespace {

using at::Tensor;

// Rows per parallel task so that each task touches roughly this many elements: small enough to
// spread over the threads, large enough that task overhead does not dominate for small H.
constexpr int64_t kElementsPerTask = 32768;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_item));
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------

// Stable counting sort of slots by expert. The slots are cut into chunks counted in parallel;
// an exclusive scan in (bucket, chunk) order then hands every chunk its own start position in
// every bucket, so the scatter can run in parallel and still keeps slot order within an expert.
// Bucket E collects the dropped slots, which therefore land after all experts.
std::tuple<Tensor, Tensor, Tensor> sort_by_expert_cpu(const Tensor& topk_idx, int64_t num_experts) {
  const int64_t n = topk_idx.numel();
  const int64_t* key = topk_idx.data_ptr<int64_t>();
  const int64_t buckets = num_experts + 1;

  const int64_t min_chunk = 1 << 14;
  const int64_t num_chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (n + min_chunk - 1) / min_chunk));
  const int64_t chunk = (n + num_chunks - 1) / num_chunks;
  auto bucket_of = [&](int64_t e) { return e < 0 ? num_experts : e; };

  std::vector<int64_t> pos(num_chunks * buckets, 0);  // counts, then start positions
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = pos.data() + c * buckets;
      for (int64_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i) {
        TORCH_CHECK(key[i] < num_experts, "sort_by_expert: expert index ", key[i],
                    " out of range for num_experts=", num_experts);
        ++hist[bucket_of(key[i])];
      }
    }
  });

  auto counts = at::empty({num_experts}, topk_idx.options().dtype(at::kLong));
  auto offsets = at::empty({num_experts}, topk_idx.options().dtype(at::kInt));
  int64_t* counts_p = counts.data_ptr<int64_t>();
  int32_t* offsets_p = offsets.data_ptr<int32_t>();
  int64_t running = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t bucket_start = running;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = pos[c * buckets + b];
      pos[c * buckets + b] = running;
      running += count;
    }
    if (b < num_experts) {
      counts_p[b] = running - bucket_start;
      offsets_p[b] = static_cast<int32_t>(running);
    }
  }

  auto perm_map = at::empty({n}, topk_idx.options().dtype(at::kLong));
  int64_t* perm = perm_map.data_ptr<int64_t>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = pos.data() + c * buckets;
      for (int64_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i) {
        perm[next[bucket_of(key[i])]++] = i;
      }
    }
  });
  return {perm_map, counts, offsets};
}

Tensor gather_rows_cpu(const Tensor& src, const Tensor& perm_map, int64_t top_k,
                       const std::optional<Tensor>& scale) {
  const int64_t n = perm_map.numel();
  const int64_t h = src.size(1);
  const int64_t num_slots = src.size(0) * top_k;
  auto out = at::empty({n, h}, src.options());
  const int64_t* map = perm_map.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* w = scale ? scale->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, grain_for(h), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t slot = map[r];
        TORCH_CHECK(slot >= 0 && slot < num_slots, "gather_rows: perm_map entry ", slot,
                    " out of range [0, ", num_slots, ")");
        const scalar_t* from = in + (slot / top_k) * h;
        scalar_t* to = o + r * h;
        if (w == nullptr) {
          std::memcpy(to, from, h * sizeof(scalar_t));
        } else {
          const acc_t s = w[slot];
          for (int64_t j = 0; j < h; ++j) to[j] = static_cast<scalar_t>(static_cast<acc_t>(from[j]) * s);
        }
      }
    });
  });
  return out;
}

// row_of_slot[s] = the permuted row holding slot s, or -1 when s is dropped (not in perm_map).
std::vector<int64_t> invert_perm_map(const Tensor& perm_map, int64_t num_slots) {
  std::vector<int64_t> row_of_slot(num_slots, -1);
  const int64_t* map = perm_map.data_ptr<int64_t>();
  for (int64_t r = 0, n = perm_map.numel(); r < n; ++r) {
    const int64_t slot = map[r];
    TORCH_CHECK(slot >= 0 && slot < num_slots, "unpermute: perm_map entry ", slot,
                " out of range [0, ", num_slots, ")");
    TORCH_CHECK(row_of_slot[slot] < 0, "unpermute: slot ", slot, " appears twice in perm_map");
    row_of_slot[slot] = r;
  }
  return row_of_slot;
}

// One task per group of tokens; each token sums its K rows in a thread-local accumulator of the
// accumulation type, in k order, so the result does not depend on the thread count.
Tensor unpermute_sum_cpu(const Tensor& y_perm, const Tensor& perm_map, int64_t num_tokens,
                         int64_t top_k, const std::optional<Tensor>& weights) {
  const int64_t h = y_perm.size(1);
  const std::vector<int64_t> row_of_slot = invert_perm_map(perm_map, num_tokens * top_k);
  auto out = at::empty({num_tokens, h}, y_perm.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y = y_perm.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* w = weights ? weights->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, num_tokens, grain_for(top_k * h), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(h);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < top_k; ++k) {
          const int64_t slot = t * top_k + k;
          const int64_t r = row_of_slot[slot];
          if (r < 0) continue;  // dropped slot: contributes zero
          const acc_t wk = w ? w[slot] : acc_t(1);
          const scalar_t* row = y + r * h;
          for (int64_t j = 0; j < h; ++j) acc[j] += wk * static_cast<acc_t>(row[j]);
        }
        scalar_t* to = o + t * h;
        for (int64_t j = 0; j < h; ++j) to[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return out;
}

// Both gradients of unpermute from one pass over the permuted rows: each row reads grad_y of its
// token once, writes the weighted copy (grad of y_perm) and/or the dot product (grad of weight).
std::tuple<std::optional<Tensor>, std::optional<Tensor>> unpermute_backward_cpu(
    const Tensor& grad_y, const Tensor& y_perm, const Tensor& perm_map, const Tensor& weights,
    bool need_grad_y_perm, bool need_grad_weights) {
  const int64_t n = perm_map.numel();
  const int64_t h = grad_y.size(1);
  const int64_t top_k = weights.size(1);
  const int64_t num_slots = weights.numel();
  std::optional<Tensor> grad_y_perm, grad_weights;
  if (need_grad_y_perm) grad_y_perm = at::empty({n, h}, grad_y.options());
  // Zero-filled: dropped slots never appear in perm_map and keep a zero gradient.
  if (need_grad_weights) grad_weights = at::zeros(weights.sizes(), weights.options());
  const int64_t* map = perm_map.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* y = y_perm.data_ptr<scalar_t>();
    const acc_t* w = weights.data_ptr<acc_t>();
    scalar_t* gyp = need_grad_y_perm ? grad_y_perm->data_ptr<scalar_t>() : nullptr;
    acc_t* gw = need_grad_weights ? grad_weights->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, grain_for(h), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t slot = map[r];
        TORCH_CHECK(slot >= 0 && slot < num_slots, "unpermute_backward: perm_map entry ", slot,
                    " out of range [0, ", num_slots, ")");
        const scalar_t* g = gy + (slot / top_k) * h;
        if (gyp != nullptr) {
          const acc_t s = w[slot];
          scalar_t* to = gyp + r * h;
          for (int64_t j = 0; j < h; ++j) to[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) * s);
        }
        if (gw != nullptr) {
          const scalar_t* row = y + r * h;
          acc_t dot = 0;
          for (int64_t j = 0; j < h; ++j) dot += static_cast<acc_t>(g[j]) * static_cast<acc_t>(row[j]);
          gw[slot] = dot;
        }
      }
    });
  });
  return {grad_y_perm, grad_weights};
}

// ---------------------------------------------------------------------------------------------
// Argument checks shared by both devices
// ---------------------------------------------------------------------------------------------

void check_floating_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
              " must be float32/float64/bfloat16/float16, got ", s);
}

void check_perm_map(const Tensor& perm_map, const Tensor& like) {
  TORCH_CHECK(perm_map.dim() == 1 && perm_map.scalar_type() == at::kLong,
              "perm_map must be a 1-D int64 tensor, got ", perm_map.scalar_type(), " ", perm_map.sizes());
  TORCH_CHECK(perm_map.device() == like.device(), "perm_map is on ", perm_map.device(),
              " but the data is on ", like.device());
}

// Weights/scales: [T, K] on the data's device, converted to the accumulation type the kernels
// read (a tiny copy at most: T*K elements).
Tensor prepare_weights(const Tensor& w, const Tensor& like, int64_t num_tokens, int64_t top_k,
                       const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == num_tokens && w.size(1) == top_k, name,
              " must have shape [", num_tokens, ", ", top_k, "], got ", w.sizes());
  TORCH_CHECK(w.device() == like.device(), name, " is on ", w.device(), " but the data is on ",
              like.device());
  return w.to(acc_type(like.scalar_type())).contiguous();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points (device routing)
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> sort_by_expert(const Tensor& topk_idx, int64_t num_experts) {
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.scalar_type() == at::kLong,
              "topk_idx must be a 2-D int64 tensor, got ", topk_idx.scalar_type(), " ", topk_idx.sizes());
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(topk_idx.numel() < std::numeric_limits<int32_t>::max(),
              "sort_by_expert: too many slots for int32 offsets: ", topk_idx.numel());
  auto idx = topk_idx.contiguous();
  if (idx.is_cuda()) {
#ifdef MEGAMOE_WITH_CUDA
    return sort_by_expert_cuda(idx, num_experts);
#else
    TORCH_CHECK(false, "megamoe._permute was built without CUDA");
#endif
  }
  return sort_by_expert_cpu(idx, num_experts);
}

Tensor gather_rows(const Tensor& src, const Tensor& perm_map, int64_t top_k,
                   const std::optional<Tensor>& scale) {
  check_floating_2d(src, "src");
  check_perm_map(perm_map, src);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  auto s = src.contiguous();
  auto map = perm_map.contiguous();
  std::optional<Tensor> w;
  if (scale) w = prepare_weights(*scale, s, s.size(0), top_k, "scale");
  if (s.is_cuda()) {
#ifdef MEGAMOE_WITH_CUDA
    return gather_rows_cuda(s, map, top_k, w);
#else
    TORCH_CHECK(false, "megamoe._permute was built without CUDA");
#endif
  }
  return gather_rows_cpu(s, map, top_k, w);
}

Tensor unpermute_sum(const Tensor& y_perm, const Tensor& perm_map, int64_t num_tokens,
                     int64_t top_k, const std::optional<Tensor>& weights) {
  check_floating_2d(y_perm, "y_perm");
  check_perm_map(perm_map, y_perm);
  TORCH_CHECK(top_k >= 1 && num_tokens >= 0, "bad num_tokens/top_k: ", num_tokens, ", ", top_k);
  TORCH_CHECK(perm_map.size(0) == y_perm.size(0), "perm_map has ", perm_map.size(0),
              " entries but y_perm has ", y_perm.size(0), " rows");
  TORCH_CHECK(y_perm.size(0) <= num_tokens * top_k, "y_perm has more rows than slots");
  auto y = y_perm.contiguous();
  auto map = perm_map.contiguous();
  std::optional<Tensor> w;
  if (weights) w = prepare_weights(*weights, y, num_tokens, top_k, "weights");
  if (y.is_cuda()) {
#ifdef MEGAMOE_WITH_CUDA
    return unpermute_sum_cuda(y, map, num_tokens, top_k, w);
#else
    TORCH_CHECK(false, "megamoe._permute was built without CUDA");
#endif
  }
  return unpermute_sum_cpu(y, map, num_tokens, top_k, w);
}

std::tuple<std::optional<Tensor>, std::optional<Tensor>> unpermute_backward(
    const Tensor& grad_y, const Tensor& y_perm, const Tensor& perm_map, const Tensor& weights,
    bool need_grad_y_perm, bool need_grad_weights) {
  check_floating_2d(grad_y, "grad_y");
  check_floating_2d(y_perm, "y_perm");
  check_perm_map(perm_map, y_perm);
  TORCH_CHECK(grad_y.scalar_type() == y_perm.scalar_type() && grad_y.device() == y_perm.device(),
              "grad_y and y_perm must share dtype and device");
  TORCH_CHECK(grad_y.size(1) == y_perm.size(1), "grad_y and y_perm hidden sizes differ");
  TORCH_CHECK(perm_map.size(0) == y_perm.size(0), "perm_map has ", perm_map.size(0),
              " entries but y_perm has ", y_perm.size(0), " rows");
  TORCH_CHECK(weights.dim() == 2, "weights must be 2-D [T, K], got ", weights.sizes());
  auto gy = grad_y.contiguous();
  auto y = y_perm.contiguous();
  auto map = perm_map.contiguous();
  auto w = prepare_weights(weights, y, gy.size(0), weights.size(1), "weights");
  if (y.is_cuda()) {
#ifdef MEGAMOE_WITH_CUDA
    return unpermute_backward_cuda(gy, y, map, w, need_grad_y_perm, need_grad_weights);
#else
    TORCH_CHECK(false, "megamoe._permute was built without CUDA");
#endif
  }
  return unpermute_backward_cpu(gy, y, map, w, need_grad_y_perm, need_grad_weights);
}

bool has_cuda() {
#ifdef MEGAMOE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace permute
}  // namespace megamoe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace mp = megamoe::permute;
  m.doc() = "megamoe token permutation kernels (CPU, and CUDA when built with it)";
  m.def("sort_by_expert", &mp::sort_by_expert, py::arg("topk_idx"), py::arg("num_experts"),
        "topk_idx[T,K] int64 -> (perm_map[T*K] int64, counts[E] int64, offsets[E] int32); valid "
        "slots first in stable expert-major order, dropped (negative) slots after them");
  m.def("gather_rows", &mp::gather_rows, py::arg("src"), py::arg("perm_map"), py::arg("top_k"),
        py::arg("scale") = py::none(),
        "out[r] = src[perm_map[r] // top_k] * scale[perm_map[r]] (scale [T,K] optional)");
  m.def("unpermute_sum", &mp::unpermute_sum, py::arg("y_perm"), py::arg("perm_map"),
        py::arg("num_tokens"), py::arg("top_k"), py::arg("weights") = py::none(),
        "out[t] = sum_k weights[t,k] * y_perm[row of slot t*K+k]; slots not in perm_map add zero");
  m.def("unpermute_backward", &mp::unpermute_backward, py::arg("grad_y"), py::arg("y_perm"),
        py::arg("perm_map"), py::arg("weights"), py::arg("need_grad_y_perm"),
        py::arg("need_grad_weights"),
        "-> (grad_y_perm[N,H] or None, grad_weights[T,K] in the accumulation dtype or None)");
  m.def("has_cuda", &mp::has_cuda, "whether the CUDA kernels were compiled in");
}
