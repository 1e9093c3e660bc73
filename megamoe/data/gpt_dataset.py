"""GPT pretraining samples over an indexed dataset: fixed-length windows of a shuffled stream.

Legend: L = len(doc_idx) = epochs * documents in the split; S = samples built.

  doc_idx[L]          the split's document ids, epochs back to back (as many epochs as needed
                      to fill num_samples), shuffled as `order` says (below)
  sample_idx[S+1, 2]  (position in doc_idx, token offset) where sample s starts; sample s runs
                      to row s+1 inclusive: seq_length + 1 tokens, one shared with sample s+1
  shuffle_idx[S]      the order samples are served in

order "megamoe" (default): every epoch is shuffled on its own; the samples lying wholly in the
full epochs are shuffled together, then those touching the final (possibly partial) epoch
among themselves, so a final-epoch sample is only used after every sample of the earlier ones.
order "megatron": Megatron-Core's GPTDataset exactly -- all epochs shuffled together as one
document index, except a final epoch used < 80% (``separate_final_epoch``), which is shuffled
separately, and likewise for the sample shuffle (same RandomState stream, same calls).

``dataset[i]`` -> int64[seq_length + 1]; inputs = x[:-1], labels = x[1:]. Everything is a
function of (sequence lengths, documents, seq_length, num_samples, seed, order), cached as .npy
files keyed by a digest of exactly that -- the *content* of the .idx, so a corpus re-preprocessed
into the same prefix (same file sizes) never reuses indices of the old one -- and checked on
load (shapes, bounds, every sample boundary), so a bad cache is rebuilt, never used.
With vocab_size, the split's token ids are checked against it once (cached the same way).
"""

from __future__ import annotations

import os

import numpy as np

from megamoe.data.cache import array_digest, cached_arrays
from megamoe.data.index_builders import build_sample_idx
from megamoe.data.indexed import IndexedDataset, bin_path

SPLIT_NAMES = ("train", "valid", "test")
INDEX_VERSION = 2  # bump when index construction changes: invalidates cached indices
SAMPLE_ORDERS = ("megamoe", "megatron")
MEGATRON_SEPARATE_EPOCH_THRESHOLD = 0.80  # Megatron-Core's separate_final_epoch threshold


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


def _megatron_document_index(documents: np.ndarray, epochs: int, rng, separate_final_epoch: bool):
    """Megatron-Core's _build_document_index: epochs of documents, shuffled as one array."""
    if not separate_final_epoch or epochs == 1:
        doc_idx = np.tile(documents, epochs).astype(np.int32 if documents.max() < 2**31 else np.int64)
        rng.shuffle(doc_idx)
        return doc_idx
    first = _megatron_document_index(documents, epochs - 1, rng, False)
    return np.concatenate((first, _megatron_document_index(documents, 1, rng, False)))


def _megatron_shuffle_index(num: int, total: int, rng) -> np.ndarray:
    """Megatron-Core's _build_shuffle_index: [0, num) shuffled, then [num, total) shuffled."""
    dt = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num, dtype=dt)
    rng.shuffle(first)
    if num == total:
        return first
    last = np.arange(num, total, dtype=dt)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices_megatron(sizes: np.ndarray, documents: np.ndarray, seq_length: int,
                               num_samples: int, seed: int) -> dict:
    """Megatron-Core GPTDataset's indices (add_extra_token_to_sequence, drop the last partial)."""
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64)) if documents.size else 0
    if tokens_per_epoch == 0:
        raise ValueError("the selected documents hold no tokens")
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - before_final < int(MEGATRON_SEPARATE_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed % 2**32)
    doc_idx = _megatron_document_index(documents, epochs, rng, separate)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens_per_epoch)
    built = sample_idx.shape[0] - 1
    shuffle_idx = _megatron_shuffle_index(before_final if separate else built, built, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def check_gpt_indices(arrays: dict, sizes: np.ndarray, documents: np.ndarray, seq_length: int,
                      num_samples: int) -> str | None:
    """None if cached indices are exactly consistent with the data, else what is wrong.

    O(L + S), vectorised: doc_idx holds the split's documents (right count, in range, right
    token total); every sample boundary lies at stream token s * seq_length; shuffle_idx holds
    each sample once (checked by sums, see _is_permutation).
    """
    doc_idx, sample_idx, shuffle_idx = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    built = (epochs * tokens_per_epoch - 1) // seq_length
    if doc_idx.shape != (epochs * documents.size,):
        return f"doc_idx has shape {doc_idx.shape}, expected ({epochs * documents.size},)"
    if sample_idx.shape != (built + 1, 2) or shuffle_idx.shape != (built,):
        return (f"sample_idx/shuffle_idx have shapes {sample_idx.shape}/{shuffle_idx.shape}, "
                f"expected ({built + 1}, 2)/({built},)")
    if doc_idx.size and (int(doc_idx.min()) < int(documents.min()) or int(doc_idx.max()) > int(documents.max())):
        return "doc_idx holds documents outside the split"
    lens = sizes[np.asarray(doc_idx, dtype=np.int64)].astype(np.int64)
    if int(lens.sum()) != epochs * tokens_per_epoch:
        return "doc_idx does not hold the split's documents"
    pos, off = np.asarray(sample_idx[:, 0], dtype=np.int64), np.asarray(sample_idx[:, 1], dtype=np.int64)
    if pos.min() < 0 or pos.max() >= doc_idx.size or off.min() < 0 or np.any(off >= lens[pos]):
        return "sample_idx points outside its documents"
    starts = np.cumsum(lens) - lens
    if not np.array_equal(starts[pos] + off, np.arange(built + 1, dtype=np.int64) * seq_length):
        return "sample_idx boundaries are not seq_length tokens apart"
    if built and not _is_permutation(shuffle_idx, built):
        return "shuffle_idx is not a permutation of the samples"
    return None


def _is_permutation(arr: np.ndarray, n: int, chunk: int = 1 << 24) -> bool:
    """arr[n] in [0, n) with the sum and the sum of squares (mod 2**64) of range(n).

    Not a proof, but a corrupted or foreign array passes with negligible probability, in
    O(chunk) memory (a bincount over hundreds of millions of samples would take GBs).
    """
    total, squares = 0, np.uint64(0)
    for a in range(0, n, chunk):
        part = np.asarray(arr[a:a + chunk], dtype=np.int64)
        if part.min() < 0 or part.max() >= n:
            return False
        total += int(part.sum())
        u = part.astype(np.uint64)
        with np.errstate(over="ignore"):
            squares = squares + np.sum(u * u, dtype=np.uint64)
    want_squares = (n - 1) * n * (2 * n - 1) // 6 % 2**64
    return total == n * (n - 1) // 2 and int(squares) == want_squares


def _check_token_range(arrays: dict) -> str | None:
    r = arrays["token_range"]
    return None if r.shape == (2,) and r[0] <= r[1] else f"token_range has shape {r.shape}"


class GPTDataset:
    """num_samples windows of seq_length + 1 tokens over `documents` of an IndexedDataset.

    indexed: an IndexedDataset or its prefix; documents: the split's sequence ids (the
    preprocessor writes one sequence per non-empty document). cache_dir None -> indices kept in
    memory. order: "megamoe" or "megatron" (see the module docstring). vocab_size: raise a
    ValueError naming the dataset if a token id of the split is >= vocab_size (or < 0).
    """

    def __init__(self, indexed, documents, seq_length: int, num_samples: int, seed: int,
                 cache_dir: str | None = None, name: str = "train", log=None, order: str = "megamoe",
                 vocab_size: int | None = None):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.documents = np.asarray(documents, dtype=np.int64)
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1 (got {seq_length})")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (got {num_samples})")
        if order not in SAMPLE_ORDERS:
            raise ValueError(f"data.sample_order must be one of {', '.join(SAMPLE_ORDERS)}, got {order!r}")
        if self.documents.size and (self.documents.min() < 0 or self.documents.max() >= len(self.indexed)):
            raise ValueError(f"document ids must lie in [0, {len(self.indexed)}) for {self.indexed.prefix!r}")
        self.seq_length, self.num_samples, self.seed, self.name = seq_length, num_samples, seed, name
        self.order = order
        sizes = self.indexed.sequence_lengths
        self.tokens_per_epoch = int(sizes[self.documents].sum(dtype=np.int64)) if self.documents.size else 0
        if self.tokens_per_epoch == 0:
            raise ValueError(f"{name} split of {self.indexed.prefix!r} has no tokens "
                             f"({self.documents.size} documents); check data.split")
        content = self.indexed.content_digest()
        docs_digest = array_digest(self.documents)
        desc = {"kind": "gpt", "version": INDEX_VERSION, "order": order, "content": content,
                "documents": docs_digest, "num_documents": int(self.documents.size),
                "seq_length": seq_length, "num_samples": num_samples, "seed": seed}
        self.cache_key = desc
        build = build_gpt_indices_megatron if order == "megatron" else build_gpt_indices
        arrays = cached_arrays(cache_dir, f"gpt-{name}", desc, ["doc_idx", "sample_idx", "shuffle_idx"],
                               lambda: build(sizes, self.documents, seq_length, num_samples, seed), log=log,
                               validate=lambda a: check_gpt_indices(a, sizes, self.documents, seq_length,
                                                                    num_samples))
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, seq_length, num_samples)
        if vocab_size is not None:
            self.check_vocab(vocab_size, cache_dir, log)

    def token_range(self, cache_dir: str | None = None, log=None) -> tuple[int, int]:
        """(smallest, largest) token id in the split: one chunked pass, cached like the indices.

        Keyed by the .bin's size and modification time besides the index content: token values
        are not in the .idx, and a rewritten .bin gets a new mtime.
        """
        path = bin_path(self.indexed.prefix)
        st = os.stat(path)
        desc = {"kind": "token_range", "version": 1, "content": self.indexed.content_digest(),
                "bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns,
                "documents": array_digest(self.documents)}

        def build():
            lo_hi = self.indexed.token_range(self.documents)
            return {"token_range": np.asarray(lo_hi if lo_hi is not None else (0, 0), dtype=np.int64)}

        arrays = cached_arrays(cache_dir, f"tokens-{self.name}", desc, ["token_range"], build, log=log,
                               validate=_check_token_range)
        lo, hi = (int(x) for x in arrays["token_range"])
        return lo, hi

    def check_vocab(self, vocab_size: int, cache_dir: str | None = None, log=None) -> None:
        """ValueError (one line) if a token id of the split does not fit an embedding of vocab_size."""
        dt = self.indexed.dtype
        if np.issubdtype(dt, np.integer) and np.iinfo(dt).min >= 0 and np.iinfo(dt).max < vocab_size:
            return  # every value the token dtype can hold fits: no need to read the data
        lo, hi = self.token_range(cache_dir, log)
        where = f"dataset {self.indexed.prefix!r} ({self.name} split)"
        if hi >= vocab_size:
            raise ValueError(f"{where} holds token id {hi} but model.vocab_size is {vocab_size}; raise "
                             f"model.vocab_size to at least {hi + 1} or use data tokenized for this model")
        if lo < 0:
            raise ValueError(f"{where} holds negative token id {lo}; the data is not token ids")

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
