"""GPT pretraining samples over an indexed dataset: fixed-length windows of a shuffled stream.

Legend: L = len(doc_idx) = epochs * documents in the split; S = samples built.

  doc_idx[L]          the split's document ids, shuffled independently in every epoch, epochs
                      back to back (as many epochs as needed to fill num_samples)
  sample_idx[S+1, 2]  (position in doc_idx, token offset) where sample s starts; sample s runs
                      to row s+1 inclusive: seq_length + 1 tokens, one shared with sample s+1
  shuffle_idx[S]      the order samples are served in: the full epochs shuffled together,
                      then the final (possibly partial) epoch shuffled on its own, so a sample
                      of the last epoch is only used after every sample of the earlier ones

``dataset[i]`` -> int64[seq_length + 1]; inputs = x[:-1], labels = x[1:]. Everything is a
function of (dataset, documents, seq_length, num_samples, seed), and cached as .npy files
keyed by a hash of exactly that.
"""

from __future__ import annotations

import os

import numpy as np

from megamoe.data.cache import array_digest, cached_arrays
from megamoe.data.index_builders import build_sample_idx
from megamoe.data.indexed import IndexedDataset, bin_path, idx_path

SPLIT_NAMES = ("train", "valid", "test")
INDEX_VERSION = 1  # bump when index construction changes: invalidates cached indices


def parse_split(split: str) -> list[float]:
    """"98,2,0" -> [0.98, 0.02, 0.0]; 1 to 3 non-negative numbers (missing ones are 0)."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"data.split must look like '98,2,0' (train,valid,test), got {split!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split must be 1-3 non-negative numbers with a positive sum "
                         f"(train,valid,test), got {split!r}")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """[(start, end)] document ranges of train, valid, test: contiguous, in order, covering all."""
    shares = parse_split(split)
    bounds = [0]
    acc = 0.0
    for share in shares:
        acc += share
        bounds.append(min(num_documents, int(round(acc * num_documents))))
    bounds[-1] = num_documents
    return [(bounds[k], bounds[k + 1]) for k in range(3)]


def _index_dtype(n: int):
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E with (E * tokens_per_epoch - 1) // seq_length >= num_samples (at least 1)."""
    need = num_samples * seq_length + 1  # tokens in num_samples overlapping samples
    return max(1, -(-need // tokens_per_epoch))


def build_gpt_indices(sizes: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int,
                      seed: int) -> dict:
    """-> {"doc_idx", "sample_idx", "shuffle_idx"} (see the module legend). Deterministic."""
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64)) if documents.size else 0
    if tokens_per_epoch == 0:
        raise ValueError("the selected documents hold no tokens")
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    # RandomState: its streams are frozen across NumPy versions, so the data order is too.
    rng = np.random.RandomState(seed % 2**32)
    doc_idx = np.concatenate([rng.permutation(documents) for _ in range(epochs)])
    doc_idx = doc_idx.astype(_index_dtype(int(documents.max()) + 1))
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens_per_epoch)
    built = sample_idx.shape[0] - 1
    # Samples lying wholly in the full epochs are shuffled together; the rest (touching the
    # final epoch) follow, shuffled among themselves, so only final-epoch samples go unused.
    # E is minimal, so before_final < num_samples: every full-epoch sample is served.
    before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length if epochs > 1 else built
    dt = _index_dtype(built)
    shuffle_idx = np.concatenate([rng.permutation(np.arange(before_final, dtype=dt)),
                                  rng.permutation(np.arange(before_final, built, dtype=dt))])
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class GPTDataset:
    """num_samples windows of seq_length + 1 tokens over `documents` of an IndexedDataset.

    indexed: an IndexedDataset or its prefix; documents: the split's sequence ids (the
    preprocessor writes one sequence per document). cache_dir None -> indices kept in memory.
    """

    def __init__(self, indexed, documents, seq_length: int, num_samples: int, seed: int,
                 cache_dir: str | None = None, name: str = "train", log=None):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.documents = np.asarray(documents, dtype=np.int64)
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1 (got {seq_length})")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (got {num_samples})")
        if self.documents.size and (self.documents.min() < 0 or self.documents.max() >= len(self.indexed)):
            raise ValueError(f"document ids must lie in [0, {len(self.indexed)}) for {self.indexed.prefix!r}")
        self.seq_length, self.num_samples, self.seed, self.name = seq_length, num_samples, seed, name
        sizes = self.indexed.sequence_lengths
        self.tokens_per_epoch = int(sizes[self.documents].sum(dtype=np.int64)) if self.documents.size else 0
        if self.tokens_per_epoch == 0:
            raise ValueError(f"{name} split of {self.indexed.prefix!r} has no tokens "
                             f"({self.documents.size} documents); check data.split")
        prefix = os.path.abspath(self.indexed.prefix)
        desc = {"kind": "gpt", "version": INDEX_VERSION, "prefix": prefix,
                "bin_bytes": os.path.getsize(bin_path(prefix)), "idx_bytes": os.path.getsize(idx_path(prefix)),
                "documents": array_digest(self.documents), "num_documents": int(self.documents.size),
                "seq_length": seq_length, "num_samples": num_samples, "seed": seed}
        self.cache_key = desc
        arrays = cached_arrays(cache_dir, f"gpt-{name}", desc, ["doc_idx", "sample_idx", "shuffle_idx"],
                               lambda: build_gpt_indices(sizes, self.documents, seq_length, num_samples, seed),
                               log=log)
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, seq_length, num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, s: int) -> np.ndarray:
        """Unshuffled sample s of the stream: int64[seq_length + 1]."""
        (j0, o0), (j1, o1) = self.sample_idx[s], self.sample_idx[s + 1]
        j0, o0, j1, o1 = int(j0), int(o0), int(j1), int(o1)
        if j0 == j1:
            out = self.indexed.get(int(self.doc_idx[j0]), o0, o1 - o0 + 1)
        else:
            parts = [self.indexed.get(int(self.doc_idx[j0]), o0)]
            parts += [self.indexed[int(self.doc_idx[j])] for j in range(j0 + 1, j1)]
            parts.append(self.indexed.get(int(self.doc_idx[j1]), 0, o1 + 1))
            out = np.concatenate(parts)
        return out.astype(np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples}) in {self.name} dataset")
        return self.sample(int(self.shuffle_idx[i]))
