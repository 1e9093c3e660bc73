"""Indexed token datasets: the Megatron-Core ``.bin`` / ``.idx`` pair, byte for byte.

Layout (little-endian)::

    .idx = b"MMIDIDX\\x00\\x00"          9-byte magic
         | u64 version (= 1)
         | u8  dtype code                 see DTYPE_CODES
         | u64 N                          number of sequences
         | u64 D                          number of document boundaries (= documents + 1)
         | int32[N] sequence lengths      in tokens
         | int64[N] sequence offsets      in bytes into .bin
         | int64[D] document boundaries   sequence indices, starting with 0, ending with N
    .bin = the tokens of all sequences back to back

The preprocessor writes one sequence per document, so "sequence" and "document" coincide
for data we produce; the reader accepts the general form.

Writing goes to temporary files (``PREFIX.bin.tmp.<host>.<pid>``) that are renamed into place by
`finalize()`, so an interrupted run never leaves a pair that looks valid; a builder removes the
temporaries that killed writers of the same prefix on this host left behind. Reading memory-maps both files and
validates the index on open; corrupt inputs raise `IndexedDatasetError` (a ValueError)
with one line saying what is wrong.
"""

from __future__ import annotations

import array
import glob
import hashlib
import os
import shutil
import socket
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, N, D = 34 bytes

# Megatron-Core dtype codes.
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A missing, truncated or inconsistent .bin/.idx pair (one-line message)."""


def best_dtype(vocab_size: int) -> np.dtype:
    """Token dtype Megatron uses for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def _dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODE_OF_DTYPE:
        raise ValueError(f"unsupported token dtype {dt}; use one of "
                         f"{', '.join(str(np.dtype(d)) for d in DTYPE_CODES.values())}")
    return CODE_OF_DTYPE[dt]


def encode_index(dtype, sequence_lengths, document_indices) -> bytes:
    """The bytes of an .idx file for these sequence lengths [N] and boundaries [D]."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError("sequence lengths must be >= 0")
    if lengths.size and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError("a sequence longer than 2**31-1 tokens does not fit the .idx format")
    docs = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    offsets = np.zeros(lengths.size, dtype=np.int64)  # exclusive cumsum, in bytes
    if lengths.size > 1:
        np.cumsum(lengths[:-1] * itemsize, out=offsets[1:])
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", _dtype_code(dtype))
    header += struct.pack("<Q", lengths.size) + struct.pack("<Q", docs.size)
    return b"".join([header, lengths.astype("<i4").tobytes(), offsets.astype("<i8").tobytes(),
                     docs.astype("<i8").tobytes()])


# ------------------------------------------------------------------------------------ writer

_HOST = socket.gethostname().replace(os.sep, "_") or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists (another user's process), or not a pid we can judge: keep the file
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Delete ``PREFIX.{bin,idx}.tmp.*`` whose writer on this host is dead; -> the paths removed.

    A writer killed by SIGKILL (or a node crash) cannot clean up after itself. Files of live
    processes and of other hosts (a shared file system) are left alone; names without a host
    (older megamoe) count as this host's.
    """
    removed = []
    for path in sorted(glob.glob(glob.escape(prefix) + ".bin.tmp.*") + glob.glob(glob.escape(prefix) + ".idx.tmp.*")):
        host, _, pid = path[len(prefix) + len(".bin.tmp."):].rpartition(".")
        if not pid.isdigit() or (host or _HOST) != _HOST or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass  # another process cleaned it up at the same time
    return removed


class IndexedDatasetBuilder:
    """Append documents, then `finalize()` to atomically publish ``prefix.bin``/``prefix.idx``.

    Use as a context manager: a clean exit finalizes, an exception removes the temp files.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        _dtype_code(self.dtype)  # validate early
        parent = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(parent):
            raise ValueError(f"output directory {parent!r} does not exist")
        self.removed_stale = remove_stale_temporaries(prefix)
        # Names that a reader would never pick up as a dataset.
        tag = f".tmp.{_HOST}.{os.getpid()}"
        self._bin_tmp = bin_path(prefix) + tag
        self._idx_tmp = idx_path(prefix) + tag
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array.array("q")      # tokens per sequence
        self._doc_bounds = array.array("q", [0])
        self._done = False

    def _write_tokens(self, tokens) -> int:
        """Range-check, convert and append tokens to the .bin; returns how many."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise ValueError(f"token id out of range for {self.dtype}: "
                                     f"[{arr.min()}, {arr.max()}]")
            arr = arr.astype(self.dtype)
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        return arr.size

    # Megatron-style two-step API: several sequences may form one document.
    def add_item(self, tokens) -> None:
        """Append one sequence (1-D array-like of token ids)."""
        self._lengths.append(self._write_tokens(tokens))

    def add_documents(self, tokens, lengths, keep_empty: bool = True) -> None:
        """Append many one-sequence documents at once: tokens[sum(lengths)] back to back.

        keep_empty False: a document of length 0 gets no sequence, only its (repeated)
        boundary -- what Megatron's ``add_document([], [])`` writes for an empty document.
        """
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._write_tokens(tokens)  # one write for the whole batch
        base = len(self._lengths)
        if keep_empty:
            self._lengths.extend(lengths.tolist())
            self._doc_bounds.extend(range(base + 1, base + 1 + lengths.size))
        else:
            has = lengths > 0
            self._lengths.extend(lengths[has].tolist())
            self._doc_bounds.extend((base + np.cumsum(has)).tolist())

    def end_document(self) -> None:
        self._doc_bounds.append(len(self._lengths))

    def add_document(self, tokens) -> None:
        """Append one document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Append all sequences and documents of an existing dataset (for merging)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {prefix!r}: dtype {other.dtype} != {self.dtype}")
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.astype(np.int64).tolist())
        self._doc_bounds.extend((other.document_indices[1:] + base).tolist())
        other.close()
        with open(bin_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)

    @property
    def num_documents(self) -> int:
        return len(self._doc_bounds) - 1

    def finalize(self) -> None:
        """Write the index and rename both files into place (.bin first, .idx last)."""
        if self._done:
            return
        try:
            if self._doc_bounds[-1] != len(self._lengths):
                self.end_document()  # close a document left open by add_item
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            data = encode_index(self.dtype, np.frombuffer(self._lengths, dtype=np.int64),
                                np.frombuffer(self._doc_bounds, dtype=np.int64))
            with open(self._idx_tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # Drop a stale .idx first so a crash between the renames cannot pair the new .bin
            # with an old index.
            if os.path.exists(idx_path(self.prefix)):
                os.unlink(idx_path(self.prefix))
            os.replace(self._bin_tmp, bin_path(self.prefix))
            os.replace(self._idx_tmp, idx_path(self.prefix))
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temporary files (nothing valid-looking is left behind)."""
        if self._done:
            return
        self._done = True
        try:
            self._bin.close()
        except OSError:
            pass
        for p in (self._bin_tmp, self._idx_tmp):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


# ------------------------------------------------------------------------------------ reader

def _read_index(path: str):
    """Parse and validate an .idx file -> (dtype, lengths int32[N], offsets int64[N], docs int64[D])."""
    if not os.path.isfile(path):
        raise IndexedDatasetError(f"index file {path!r} not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        raise IndexedDatasetError(f"{path!r} is not a Megatron .idx file (bad magic {head[:9]!r})")
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(f"{path!r} is truncated: {size} bytes, header needs {HEADER_SIZE}")
    version, code, n, d = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION:
        raise IndexedDatasetError(f"{path!r}: unsupported .idx version {version} (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{path!r}: unknown dtype code {code} (valid: 1-8)")
    expected = HEADER_SIZE + 4 * n + 8 * n + 8 * d
    if size != expected:
        kind = "truncated" if size < expected else "has trailing bytes"
        raise IndexedDatasetError(f"{path!r} {kind}: {size} bytes but N={n} sequences and "
                                  f"D={d} boundaries need {expected}")
    dtype = np.dtype(DTYPE_CODES[code])
    if n == 0 and d == 0:
        mm = np.zeros(0, np.uint8)
    else:
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_SIZE)
    lengths = np.frombuffer(mm, dtype="<i4", count=n, offset=0)
    offsets = np.frombuffer(mm, dtype="<i8", count=n, offset=4 * n)
    docs = np.frombuffer(mm, dtype="<i8", count=d, offset=12 * n)
    # Consistency checks (vectorised, O(N)): they catch hand-edited or mixed-up files.
    if n and lengths.min() < 0:
        raise IndexedDatasetError(f"{path!r}: negative sequence length at index {int(np.argmin(lengths))}")
    expect_off = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=expect_off[1:])
    if n and not np.array_equal(offsets, expect_off):
        bad = int(np.flatnonzero(offsets != expect_off)[0])
        raise IndexedDatasetError(f"{path!r}: sequence {bad} has byte offset {int(offsets[bad])} but "
                                  f"the lengths before it imply {int(expect_off[bad])}")
    if d == 0 or docs[0] != 0 or docs[-1] != n or (d > 1 and np.any(np.diff(docs) < 0)):
        raise IndexedDatasetError(f"{path!r}: document boundaries must increase from 0 to N={n}")
    return dtype, lengths, offsets, docs


class IndexedDataset:
    """Memory-mapped reader of a ``prefix.bin`` / ``prefix.idx`` pair.

    ``ds[i]`` -> the tokens of sequence i (a read-only NumPy view);
    ``ds.get(i, offset, length)`` -> a slice of it without touching the rest.
    """

    def __init__(self, prefix: str):
        if prefix.endswith(".bin") or prefix.endswith(".idx"):
            prefix = prefix[:-4]
        self.prefix = prefix
        self.dtype, self.sequence_lengths, self.sequence_offsets, self.document_indices = \
            _read_index(idx_path(prefix))
        self._digest = None
        bpath = bin_path(prefix)
        if not os.path.isfile(bpath):
            raise IndexedDatasetError(f"data file {bpath!r} not found (index {idx_path(prefix)!r} exists)")
        expected = int(self.sequence_lengths.astype(np.int64).sum()) * self.dtype.itemsize
        actual = os.path.getsize(bpath)
        if actual != expected:
            kind = "truncated" if actual < expected else "larger than its index says"
            raise IndexedDatasetError(f"{bpath!r} is {kind}: {actual} bytes, the index needs {expected}")
        # A plain read-only ndarray over the mapping: slices are ndarrays, not np.memmap.
        self._tokens = (np.frombuffer(np.memmap(bpath, dtype=np.uint8, mode="r"),
                                      dtype=self.dtype.newbyteorder("<"))
                        if expected else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())

    def _start(self, idx: int) -> int:
        return int(self.sequence_offsets[idx]) // self.dtype.itemsize

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        idx = int(idx)
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence index {idx} out of range [0, {len(self)})")
        start = self._start(idx)
        return self._tokens[start:start + int(self.sequence_lengths[idx])]

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence idx (to its end if length is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"range [{offset}, {offset + length}) outside sequence {idx} of length {size}")
        start = self._start(idx) + offset
        return self._tokens[start:start + length]

    def content_digest(self) -> str:
        """Digest of what dataset indices are built from: dtype, sequence lengths, documents.

        Computed once per object (hashing runs at GB/s over the memory-mapped .idx arrays).
        Index caches keyed by it cannot be confused by a re-preprocessed corpus of the same size.
        """
        if self._digest is None:
            h = hashlib.sha256(struct.pack("<BQQ", CODE_OF_DTYPE[np.dtype(self.dtype)],
                                           len(self.sequence_lengths), len(self.document_indices)))
            for arr in (self.sequence_lengths, self.document_indices):
                if arr.size:
                    h.update(np.ascontiguousarray(arr).view(np.uint8))
            self._digest = h.hexdigest()[:32]
        return self._digest

    def token_range(self, sequences, chunk_tokens: int = 1 << 24) -> tuple[int, int] | None:
        """(smallest, largest) token id over `sequences`, or None if they hold no tokens.

        Reads the memory map in chunks (bounded memory); consecutive sequence ids are one
        contiguous run of the .bin, so a split (a document range) is one sequential pass.
        """
        seqs = np.unique(np.asarray(sequences, dtype=np.int64))
        if not seqs.size:
            return None
        if seqs[0] < 0 or seqs[-1] >= len(self):
            raise IndexError(f"sequence ids must lie in [0, {len(self)})")
        breaks = np.flatnonzero(np.diff(seqs) != 1) + 1
        firsts, lasts = seqs[np.r_[0, breaks]], seqs[np.r_[breaks - 1, seqs.size - 1]]
        lo = hi = None
        for first, last in zip(firsts.tolist(), lasts.tolist()):
            end = self._start(last) + int(self.sequence_lengths[last])
            for a in range(self._start(first), end, chunk_tokens):
                part = self._tokens[a:min(a + chunk_tokens, end)]
                p_lo, p_hi = int(part.min()), int(part.max())
                lo = p_lo if lo is None else min(lo, p_lo)
                hi = p_hi if hi is None else max(hi, p_hi)
        return None if lo is None else (lo, hi)

    # Pickle by path (DataLoader workers started with spawn reopen the memory maps instead of
    # receiving a copy of the data).
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def close(self) -> None:
        """Drop the memory maps (the object is unusable afterwards)."""
        self._tokens = None
        self.sequence_lengths = self.sequence_offsets = self.document_indices = None

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, "
                f"documents={self.num_documents}, dtype={self.dtype})")


def merge_datasets(prefixes: list[str], out_prefix: str) -> None:
    """Concatenate datasets (same dtype) into ``out_prefix``; documents keep their order."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    dtypes = {IndexedDataset(p).dtype for p in prefixes}  # also validates every input
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge datasets with different dtypes: {sorted(map(str, dtypes))}")
    with IndexedDatasetBuilder(out_prefix, dtypes.pop()) as builder:
        for p in prefixes:
            builder.add_index(p)
