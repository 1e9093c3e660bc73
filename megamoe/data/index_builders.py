"""Dataset index builders: C++ extension when built, NumPy reference otherwise.

build_sample_idx        sample index [num_samples + 1, 2] over a shuffled document stream
build_blending_indices  (dataset_index[size], dataset_sample_index[size]) for a weighted blend

Both implementations give identical arrays (tests compare them on random inputs).
`backend()` says which one the dispatchers use: "cpp" or "numpy". Set
``MEGAMOE_DATA_BACKEND=numpy`` to force the reference implementation.
"""

from __future__ import annotations

import os

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
_ext = None
_ext_error: str | None = None


def _load_ext():
    """Import megamoe._data_helpers once; None if it is missing or disabled."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        if os.environ.get("MEGAMOE_DATA_BACKEND", "").lower() == "numpy":
            _ext_error = "disabled by MEGAMOE_DATA_BACKEND=numpy"
        else:
            try:
                import torch  # noqa: F401  - loads libc10/libtorch that the extension links to
                from megamoe import _data_helpers
                _ext = _data_helpers
            except ImportError as err:
                _ext_error = str(err)
    return _ext


def backend() -> str:
    """"cpp" when the compiled extension is used, else "numpy"."""
    return "cpp" if _load_ext() is not None else "numpy"


# ----------------------------------------------------------------------------- sample index

def _sample_idx_setup(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, drop_last):
    """Validate inputs; -> (sizes int32, doc_idx int64, total tokens, num_samples, out dtype)."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int64)
    if sizes.ndim != 1 or doc_idx.ndim != 1:
        raise ValueError("build_sample_idx: sizes and doc_idx must be 1-D arrays")
    if seq_length < 1 or num_epochs < 1:
        raise ValueError(f"build_sample_idx: seq_length ({seq_length}) and num_epochs ({num_epochs}) must be >= 1")
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= sizes.size):
        raise ValueError(f"build_sample_idx: doc_idx values must lie in [0, {sizes.size})")
    if sizes.size and sizes.min() < 0:
        raise ValueError("build_sample_idx: document sizes must be >= 0")
    total = int(num_epochs) * int(tokens_per_epoch)
    counted = int(sizes[doc_idx].sum(dtype=np.int64)) if doc_idx.size else 0
    if counted != total:
        raise ValueError(f"build_sample_idx: num_epochs * tokens_per_epoch ({total}) != tokens in the "
                         f"doc_idx stream ({counted})")
    if total < 1:
        raise ValueError("build_sample_idx: the document stream has no tokens")
    if drop_last:
        num_samples = (total - 1) // seq_length
    else:
        num_samples = -(-(total - 1) // seq_length)
    # Rows hold a doc_idx position and an offset inside one document: int32 when both fit.
    biggest = max(doc_idx.size, int(sizes.max()) if sizes.size else 0)
    out_dtype = np.int32 if biggest < _INT32_MAX else np.int64
    return sizes, doc_idx, total, num_samples, out_dtype


def build_sample_idx_numpy(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int,
                           drop_last_partial_sequence: bool = True) -> np.ndarray:
    """NumPy reference of `build_sample_idx` (vectorised: one cumsum + one searchsorted)."""
    sizes, doc_idx, total, num_samples, out_dtype = _sample_idx_setup(
        sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, drop_last_partial_sequence)
    lens = sizes[doc_idx].astype(np.int64)        # [L] tokens of each stream entry
    ends = np.cumsum(lens)                        # [L] stream position one past each entry
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # [S+1]
    np.minimum(positions, total - 1, out=positions)  # a kept partial sample ends at the last token
    # The entry holding token p is the first one whose end is > p (skips empty documents).
    j = np.searchsorted(ends, positions, side="right")
    out = np.empty((num_samples + 1, 2), dtype=out_dtype)
    out[:, 0] = j
    out[:, 1] = positions - (ends[j] - lens[j])
    return out


def build_sample_idx(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int,
                     drop_last_partial_sequence: bool = True) -> np.ndarray:
    """Where each training sample starts in the document stream ``doc_idx``.

    Legend: sizes[num_docs_total] tokens per document; doc_idx[L] document ids, all epochs
    back to back (``num_epochs * tokens_per_epoch`` tokens in total).
    Returns sample_idx[num_samples + 1, 2] (int32, or int64 when needed): row i is
    (position in doc_idx, token offset in that document) of stream token ``i * seq_length``.
    Sample i is the seq_length + 1 tokens from row i to row i + 1 inclusive, so consecutive
    samples overlap by one token (inputs = x[:-1], labels = x[1:]). num_samples =
    (total - 1) // seq_length, or rounded up (short last sample) if not drop_last.
    """
    ext = _load_ext()
    if ext is None:
        return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch,
                                      drop_last_partial_sequence)
    sizes, doc_idx, _, _, out_dtype = _sample_idx_setup(
        sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, drop_last_partial_sequence)
    return ext.build_sample_idx(sizes, doc_idx, int(seq_length), int(num_epochs),
                                int(tokens_per_epoch), bool(drop_last_partial_sequence),
                                out_dtype == np.int64)


# -------------------------------------------------------------------------- blending indices

def _normalised_weights(weights) -> np.ndarray:
    """Validate and normalise with a left-to-right sum (the C++ code sums in the same order)."""
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size < 1:
        raise ValueError("build_blending_indices: weights must be a non-empty 1-D list")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"build_blending_indices: weights must be finite and >= 0, got {w.tolist()}")
    if w.size > np.iinfo(np.int16).max:
        raise ValueError("build_blending_indices: too many datasets")
    total = 0.0
    for x in w.tolist():
        total += x
    if not total > 0:
        raise ValueError("build_blending_indices: weights sum to 0")
    return w / total


def _index_dtype(num_datasets: int):
    return np.uint8 if num_datasets <= 256 else np.int16


def build_blending_indices_numpy(weights, size: int, megatron: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `build_blending_indices`: a plain loop, O(size * D) (~1 us per sample)."""
    w = _normalised_weights(weights).tolist()
    if megatron:
        w = np.ascontiguousarray(weights, dtype=np.float64).tolist()  # used as given
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")
    num = len(w)
    counts = [0] * num
    dataset_index = np.empty(size, dtype=_index_dtype(num))
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        steps = float(max(i, 1)) if megatron else float(i + 1)
        best, best_err = 0, w[0] * steps - counts[0]
        for d in range(1, num):
            err = w[d] * steps - counts[d]
            if err > best_err:  # strict: ties go to the lowest index
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights, size: int, megatron: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend of D datasets into ``size`` samples.

    weights[D] >= 0 (normalised here). At step i the chosen dataset is
    argmax_d(w_d * (i + 1) - count_d), the one whose realised share lags its weight the most
    (ties -> lowest index). Returns dataset_index[size] (uint8 if D <= 256, else int16) and
    dataset_sample_index[size] (int64; the running count of the chosen dataset).
    megatron: Megatron-Core's formula instead, argmax_d(w_d * max(i, 1) - count_d), with the
    weights used exactly as given (normalise them as Megatron does, see blending.py).
    """
    ext = _load_ext()
    # An extension built before the megatron option existed cannot do it: use the reference.
    if ext is None or (megatron and "megatron" not in (ext.build_blending_indices.__doc__ or "")):
        return build_blending_indices_numpy(weights, size, megatron)
    _normalised_weights(weights)  # same ValueErrors as the reference
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")
    return ext.build_blending_indices(np.ascontiguousarray(weights, dtype=np.float64), int(size), bool(megatron))
