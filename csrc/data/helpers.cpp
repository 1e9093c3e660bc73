// Dataset index builders for megamoe.data (extension module megamoe._data_helpers).
//
// Two sequential loops that are too slow in pure Python for billion-token datasets:
//   build_sample_idx        where each fixed-length training sample starts in a shuffled
//                           document stream (Megatron semantics: one-token overlap)
//   build_blending_indices  which dataset each blended sample comes from (greedy)
// megamoe/data/index_builders.py holds NumPy reference implementations with identical
// results; tests compare the two. NumPy arrays in and out; the GIL is released in the loops.

// The greedy blending choice compares w*(i+1) - count across datasets; a fused multiply-add
// would round differently from the NumPy reference, so forbid contraction.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _data_helpers
#endif

namespace py = pybind11;

namespace {

using SizesArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using DocIdxArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using WeightsArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Legend: sizes[num_docs_total] tokens per document; doc_idx[L] the shuffled document stream
// (all epochs back to back); out[num_samples + 1, 2] = (position in doc_idx, token offset).
//
// Sample i covers stream tokens [i*seq_length, (i+1)*seq_length] inclusive, i.e.
// seq_length + 1 tokens, so its last token is the first token of sample i+1. Row i of the
// output is the location of stream token i*seq_length: the doc_idx position j whose document
// holds it and the offset inside that document (empty documents never hold a token).
template <typename OutT>
py::array_t<OutT> sample_idx_impl(const SizesArray& sizes_arr, const DocIdxArray& doc_idx_arr,
                                  int64_t seq_length, int64_t num_epochs,
                                  int64_t tokens_per_epoch, bool drop_last) {
  if (sizes_arr.ndim() != 1 || doc_idx_arr.ndim() != 1)
    throw std::invalid_argument("build_sample_idx: sizes and doc_idx must be 1-D arrays");
  if (seq_length < 1) throw std::invalid_argument("build_sample_idx: seq_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("build_sample_idx: num_epochs must be >= 1");
  const int32_t* sizes = sizes_arr.data();
  const int64_t* doc_idx = doc_idx_arr.data();
  const int64_t num_docs = sizes_arr.shape(0);
  const int64_t stream_len = doc_idx_arr.shape(0);
  const int64_t total = num_epochs * tokens_per_epoch;

  // Validate the inputs (one pass; keeps a bad call from reading out of bounds).
  int64_t counted = 0;
  {
    py::gil_scoped_release release;
    for (int64_t j = 0; j < stream_len; ++j) {
      const int64_t d = doc_idx[j];
      if (d < 0 || d >= num_docs) throw std::out_of_range("build_sample_idx: doc_idx out of range");
      if (sizes[d] < 0) throw std::invalid_argument("build_sample_idx: negative document size");
      counted += sizes[d];
    }
  }
  if (counted != total)
    throw std::invalid_argument("build_sample_idx: num_epochs * tokens_per_epoch (" +
                                std::to_string(total) + ") != tokens in the doc_idx stream (" +
                                std::to_string(counted) + ")");
  if (total < 1) throw std::invalid_argument("build_sample_idx: the document stream has no tokens");

  // Every sample needs seq_length + 1 tokens and shares one with the next.
  const int64_t num_samples =
      drop_last ? (total - 1) / seq_length : (total - 1 + seq_length - 1) / seq_length;
  py::array_t<OutT> out({num_samples + 1, static_cast<int64_t>(2)});
  OutT* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t j = 0;          // position in doc_idx
    int64_t doc_start = 0;  // stream position of the first token of document doc_idx[j]
    for (int64_t i = 0; i <= num_samples; ++i) {
      int64_t p = i * seq_length;
      if (p > total - 1) p = total - 1;  // only the last row of a kept partial sample
      while (doc_start + sizes[doc_idx[j]] <= p) {  // token p lies beyond document j
        doc_start += sizes[doc_idx[j]];
        ++j;
      }
      o[2 * i] = static_cast<OutT>(j);
      o[2 * i + 1] = static_cast<OutT>(p - doc_start);
    }
  }
  return out;
}

py::array build_sample_idx(const SizesArray& sizes, const DocIdxArray& doc_idx, int64_t seq_length,
                           int64_t num_epochs, int64_t tokens_per_epoch, bool drop_last,
                           bool use_int64) {
  if (use_int64)
    return sample_idx_impl<int64_t>(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch,
                                    drop_last);
  return sample_idx_impl<int32_t>(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch,
                                  drop_last);
}

// Legend: weights[D]; returns dataset_index[size] (uint8 if D <= 256 else int16) and
// dataset_sample_index[size] (int64): sample i of the blend is sample
// dataset_sample_index[i] of dataset dataset_index[i].
template <typename IdxT>
py::tuple blending_impl(const double* w, int64_t num_datasets, int64_t size, bool megatron) {
  py::array_t<IdxT> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  IdxT* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      // Pick the dataset whose realised count lags its target share the most; ties go to
      // the lowest index (strict > below).
      // megamoe: the share after this pick, w*(i+1). Megatron-Core: w*max(i,1).
      const double steps = megatron ? static_cast<double>(i > 1 ? i : 1) : static_cast<double>(i + 1);
      int64_t best = 0;
      double best_err = w[0] * steps - static_cast<double>(count[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double err = w[d] * steps - static_cast<double>(count[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      di[i] = static_cast<IdxT>(best);
      dsi[i] = count[best];
      ++count[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

// megatron: Megatron-Core's variant -- weights used as given (the caller normalises them as
// Megatron does, bit for bit) and w*max(i,1) in the error.
py::tuple build_blending_indices(const WeightsArray& weights_arr, int64_t size, bool megatron) {
  if (weights_arr.ndim() != 1 || weights_arr.shape(0) < 1)
    throw std::invalid_argument("build_blending_indices: weights must be a non-empty 1-D array");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const int64_t num_datasets = weights_arr.shape(0);
  if (num_datasets > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blending_indices: too many datasets");
  // Normalise with a left-to-right sum: the NumPy reference sums in the same order, so both
  // see bit-identical weights.
  const double* raw = weights_arr.data();
  double total = 0.0;
  for (int64_t d = 0; d < num_datasets; ++d) {
    if (!(raw[d] >= 0.0) || raw[d] == std::numeric_limits<double>::infinity())
      throw std::invalid_argument("build_blending_indices: weights must be finite and >= 0");
    total += raw[d];
  }
  if (!(total > 0.0)) throw std::invalid_argument("build_blending_indices: weights sum to 0");
  std::vector<double> w(num_datasets);
  for (int64_t d = 0; d < num_datasets; ++d) w[d] = megatron ? raw[d] : raw[d] / total;
  if (num_datasets <= 256) return blending_impl<uint8_t>(w.data(), num_datasets, size, megatron);
  return blending_impl<int16_t>(w.data(), num_datasets, size, megatron);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megamoe dataset index builders (sample index, blending indices)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("use_int64") = true,
        "Sample index [num_samples + 1, 2] over a shuffled document stream (one-token overlap).");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        py::arg("megatron") = false,
        "Greedy blending: (dataset_index[size], dataset_sample_index[size]).");
}
