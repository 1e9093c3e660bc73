"""Batch tokenization into flat NumPy arrays, with a piece cache for GPT-2-style byte-level BPE.

    enc = make_batch_encoder(tokenizer, dtype)      # a megamoe.data.tokenizer tokenizer
    tokens, lengths = enc(texts)                    # tokens[sum(lengths)], lengths[len(texts)]

Why a piece cache is exact. A byte-level BPE tokenizer (GPT-2, GPT-NeoX / OLMo, megamoe's
default) pre-tokenizes with the GPT-2 regex and runs BPE on each regex match separately. No
match of that regex runs from a non-whitespace character into following whitespace (only the
optional single space *before* a word, or a pure whitespace run, can hold whitespace). So a
text cut before every whitespace run that follows a non-whitespace character -- into pieces
matching ``\\s*\\S+`` -- tokenizes piece by piece: encode(text) == concat(encode(piece)).
Text repeats its pieces (" the", " of", " model,") heavily, so every distinct piece is encoded
once, by the tokenizer itself, and its ids reused from a bounded cache: the output is the
tokenizer's own, only the repeated per-word work is skipped.

The cache is used only when the tokenizer.json proves the precondition: no normalizer, a plain
``ByteLevel`` pre-tokenizer with the GPT-2 regex and no prefix space, a BPE model without
dropout. Any other tokenizer is encoded whole with ``encode_batch``. Per document, texts that
contain an added token's text (added tokens are matched in the raw text before
pre-tokenization) or U+001C..U+001F (whitespace to Python's regex but not to the tokenizer's)
are encoded whole too.
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np

from megamoe.data.tokenizer import ByteTokenizer, HFTokenizer

# A run of whitespace, then non-whitespace; the tail alternative keeps trailing whitespace.
_PIECES = re.compile(r"\s*\S+|\s+")
# Whitespace to Python's \s but not to Oniguruma's (the tokenizer's regex engine).
_UNSAFE_SPACE = re.compile("[\x1c-\x1f]")
_ASCII_SPACE = frozenset(" \t\n\r\x0b\x0c")  # whitespace to every regex engine
_RUN_PIECES = 2048            # new pieces per joined run (runs are encoded in parallel)
# Cache bounds per process (~100 MB at the limit). When either is reached, the most used half
# of the pieces is kept: the head of the word distribution stays cached on any corpus size.
MAX_CACHED_PIECES = 1 << 19
MAX_CACHED_CHARS = 1 << 25    # characters of cached pieces (whole-text fallbacks can be long)


def piece_cache_eligible(config: dict) -> bool:
    """True when tokenizer.json `config` splits exactly at ``\\s*\\S+`` piece boundaries."""
    pre = config.get("pre_tokenizer") or {}
    model = config.get("model") or {}
    return (config.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True
            and pre.get("add_prefix_space") is False
            and model.get("type") == "BPE" and not model.get("dropout"))


def _ids_to_arrays(id_lists, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    tokens = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


class WholeTextEncoder:
    """tokenizer.encode_batch over whole texts (any tokenizer)."""

    def __init__(self, tokenizer, dtype):
        self.tok, self.dtype = tokenizer, np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.tok, ByteTokenizer):  # the UTF-8 bytes are the ids
            raw = [t.encode("utf-8") for t in texts]
            lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
            return np.frombuffer(b"".join(raw), dtype=np.uint8).astype(self.dtype), lengths
        return _ids_to_arrays(self.tok.encode_batch(texts), self.dtype)


class PieceCachedEncoder:
    """Encode texts piece by piece, each distinct piece once (see the module docstring)."""

    def __init__(self, tokenizer: HFTokenizer, dtype, max_pieces: int = MAX_CACHED_PIECES,
                 max_chars: int = MAX_CACHED_CHARS):
        self.tok, self.dtype = tokenizer, np.dtype(dtype)
        self.max_pieces, self.max_chars = max_pieces, max_chars
        added = [t["content"] for t in json.loads(tokenizer.to_json()).get("added_tokens") or [] if t["content"]]
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self.calls = self.misses = 0  # pieces seen / pieces sent to the tokenizer (stats, tests)
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, int] = {}
        self._chars = 0
        self._ids = np.zeros(1 << 16, dtype=self.dtype)   # ids of all cached pieces back to back
        self._used = 0
        self._start = np.zeros(1 << 12, dtype=np.int64)   # per piece: where its ids start
        self._len = np.zeros(1 << 12, dtype=np.int64)     # per piece: how many ids
        self._uses = np.zeros(1 << 12, dtype=np.int64)    # per piece: occurrences so far

    def _evict(self) -> None:
        """Keep the most used half of the cached pieces (ids renumbered, arrays compacted)."""
        n = len(self._index)
        keep = np.sort(np.argsort(-self._uses[:n], kind="stable")[:self.max_pieces // 2])
        keys = list(self._index)  # insertion order == id order
        kept = [keys[k] for k in keep]
        lens, starts = self._len[keep], self._start[keep]
        src = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()), dtype=np.int64)
        ids, uses = self._ids[src], self._uses[keep]
        self._reset()
        self._index.update(zip(kept, range(len(kept))))
        self._chars = sum(map(len, kept))
        self._ids = np.resize(ids, max(ids.size, 1 << 16))
        self._used = ids.size
        size = max(len(kept), 1 << 12)
        self._len = np.resize(lens, size)
        self._start = np.resize(np.cumsum(lens) - lens, size)
        self._uses = np.resize(uses, size)

    def _pieces(self, text: str, whole: set) -> list[str]:
        if not text:
            return []
        if _UNSAFE_SPACE.search(text) or (self._added is not None and self._added.search(text)):
            whole.add(text)
            return [text]
        return _PIECES.findall(text)

    def _new_pieces(self, flat: list[str]) -> list[str]:
        """Pieces of `flat` not cached yet, in first-occurrence order (C-level passes only)."""
        uniq = dict.fromkeys(flat)
        missing = uniq.keys() - self._index.keys()
        return list(filter(missing.__contains__, uniq)) if missing else []

    def _encode_new(self, pieces: list[str], whole: set) -> tuple[np.ndarray, np.ndarray]:
        """(ids, per-piece lengths) of new pieces, encoded in long runs where that is exact.

        Rare pieces cost the tokenizer ~2x more one by one than back to back, so pieces that
        start with ASCII whitespace and end with non-whitespace (nearly all) are joined into runs
        -- every junction is then a valid cut, as inside a text -- and the run's ids are split
        per piece by their character offsets. A run that fails its check (an added token formed
        across a junction, a piece without ids) is encoded piece by piece instead.
        """
        ids: list = [None] * len(pieces)
        joinable = [k for k, p in enumerate(pieces)
                    if p[0] in _ASCII_SPACE and not p[-1].isspace() and p not in whole]
        runs = [joinable[i:i + _RUN_PIECES] for i in range(0, len(joinable), _RUN_PIECES)]
        texts = ["".join(pieces[k] for k in run) for run in runs]
        for run, text, (run_ids, offsets) in zip(runs, texts, self.tok.encode_batch_with_offsets(texts)):
            starts = np.cumsum([0] + [len(pieces[k]) for k in run[:-1]])
            token_starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
            owner = np.searchsorted(starts, token_starts, side="right") - 1
            counts = np.bincount(owner[owner >= 0], minlength=len(run))
            if (counts.size != len(run) or not counts.all() or np.any(np.diff(owner) < 0) or owner[0] != 0
                    or (self._added is not None and self._added.search(text))):
                continue  # left as None: encoded one by one below
            bounds = np.concatenate(([0], np.cumsum(counts)))
            for j, k in enumerate(run):
                ids[k] = run_ids[bounds[j]:bounds[j + 1]]
        rest = [k for k in range(len(pieces)) if ids[k] is None]
        for k, one in zip(rest, self.tok.encode_batch([pieces[k] for k in rest])):
            ids[k] = one
        return _ids_to_arrays(ids, self.dtype)

    def _store(self, pieces: list[str], whole: set) -> None:
        """Encode the pieces that just got ids len(index)-len(pieces) .. len(index)-1; keep their ids."""
        tokens, lengths = self._encode_new(pieces, whole)
        first = len(self._index) - len(pieces)
        need_p, need_t = len(self._index), self._used + tokens.size
        if need_p > self._start.size:
            grow = max(need_p, 2 * self._start.size)
            self._start = np.resize(self._start, grow)
            self._len = np.resize(self._len, grow)
            self._uses = np.resize(self._uses, grow)
        self._uses[first:need_p] = 0
        if need_t > self._ids.size:
            self._ids = np.resize(self._ids, max(need_t, 2 * self._ids.size))
        self._ids[self._used:need_t] = tokens
        self._len[first:need_p] = lengths
        self._start[first:need_p] = self._used + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        self._used = need_t

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        whole: set = set()  # texts encoded whole (never joined with other pieces)
        pieces_of = [self._pieces(t, whole) for t in texts]
        flat = list(itertools.chain.from_iterable(pieces_of))
        counts = np.fromiter(map(len, pieces_of), dtype=np.int64, count=len(texts))
        new = self._new_pieces(flat)
        if len(self._index) + len(new) > self.max_pieces or self._chars + sum(map(len, new)) > self.max_chars:
            self._evict()  # bounded memory (soft: one batch may overshoot); ids never depend on it
            new = self._new_pieces(flat)
        index = self._index
        if new:
            before = len(index)
            index.update(zip(new, range(before, before + len(new))))
            self._chars += sum(map(len, new))
            self._store(new, whole)
            self.misses += len(new)
        codes = np.fromiter(map(index.__getitem__, flat), dtype=np.int64, count=len(flat))
        self.calls += len(flat)
        self._uses[:len(index)] += np.bincount(codes, minlength=len(index))
        lens = self._len[codes]
        total = int(lens.sum())
        # Gather every piece's ids: output position k reads _ids[start(piece) + k - out(piece)].
        out_start = np.cumsum(lens) - lens
        src = np.repeat(self._start[codes] - out_start, lens) + np.arange(total, dtype=np.int64)
        tokens = self._ids[src]
        ends = np.concatenate(([0], np.cumsum(lens)))
        piece_ends = np.cumsum(counts)
        lengths = ends[piece_ends] - ends[piece_ends - counts]
        return tokens, lengths


def make_batch_encoder(tokenizer, dtype, piece_cache: bool = True):
    """The fastest exact batch encoder for `tokenizer`: PieceCachedEncoder when eligible."""
    if (piece_cache and isinstance(tokenizer, HFTokenizer)
            and piece_cache_eligible(json.loads(tokenizer.to_json()))):
        return PieceCachedEncoder(tokenizer, dtype)
    return WholeTextEncoder(tokenizer, dtype)
