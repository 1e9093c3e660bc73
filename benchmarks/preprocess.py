#!/usr/bin/env python
"""Preprocessing throughput against Megatron-LM's tools/preprocess_data.py, side by side.

    python benchmarks/preprocess.py                      # 20 MB corpus, vocab-8192 BPE, 1 and 2 workers
    python benchmarks/preprocess.py --corpus-mb 50 --repeats 2
    python benchmarks/preprocess.py --index --tokens 1e8 # also the index-builder benchmark

1. A synthetic JSON-lines corpus, generated deterministically: documents of Zipf-distributed
   words from a 50k-word pseudo-lexicon, with capitals, digits and punctuation, exponential
   document lengths (mean ~2.5 KB); and a byte-level BPE (vocab --vocab, default 8192) trained
   on its first megabyte.
2. For 1 and 2 workers: Megatron's pipeline, re-implemented faithfully (`megatron_preprocess`:
   a multiprocessing.Pool of `workers`, ``pool.imap(encode, lines, 32)``, ``json.loads`` per
   line and one ``encode`` call per document in the workers, the main process writing with
   Megatron's IndexedDatasetBuilder logic), then megamoe.data.preprocess with the same
   tokenizer, corpus and worker count. Wall time includes pool start-up and the final write.
   The two outputs are compared byte for byte (.bin and .idx).
   The baseline calls the `tokenizers` library directly, the fastest per-document path:
   Megatron's HuggingFaceTokenizer wrapper adds transformers' overhead on top.
3. The last line: ``tokens_per_s_vs_megatron W1 <x> W2 <y>`` (megamoe tokens/s over Megatron
   tokens/s at 1 and 2 workers, best of --repeats runs each).

With --index: build_sample_idx / build_blending_indices, C++ extension vs NumPy reference.
"""

import argparse
import itertools
import json
import multiprocessing
import os
import random
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megamoe.data import index_builders as ib  # noqa: E402
from megamoe.data.indexed import CODE_OF_DTYPE, MAGIC, best_dtype  # noqa: E402
from megamoe.data.preprocess import preprocess  # noqa: E402

# ------------------------------------------------------------------------------------ corpus


def make_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """Write ~megabytes of JSON lines of Zipfian pseudo-prose; returns the number of documents."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "str", "ing", "tion"]
    lexicon = set()
    while len(lexicon) < 50_000:
        lexicon.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    lexicon = sorted(lexicon)
    rng.shuffle(lexicon)
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(lexicon))))
    target, written, docs = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            words = rng.choices(lexicon, cum_weights=cum, k=int(rng.expovariate(1 / 400)) + 1)
            out = []
            for k, w in enumerate(words):
                r = rng.random()
                if k == 0 or r < 0.05:
                    w = w.capitalize()
                if r > 0.97:
                    w = str(rng.randint(0, 2030))
                out.append(w)
                if rng.random() < 0.08:
                    out[-1] += rng.choice((",", ",", ".", ".", ";", ":", "?", ".\n\n"))
            line = json.dumps({"text": " ".join(out), "id": docs}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def train_tokenizer(corpus: str, out_path: str, vocab: int) -> None:
    from megamoe.data.corpus import train_bpe_tokenizer

    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > 1e6:
                break
    train_bpe_tokenizer(texts, vocab).save(out_path)


# ------------------------------------------------------------------- Megatron's pipeline


class MegatronEncoder:
    """Megatron's Encoder: a tokenizer per worker, json.loads and one encode per document."""

    def __init__(self, tokenizer_path: str, json_key: str, append_eod: bool):
        self.tokenizer_path, self.json_key, self.append_eod = tokenizer_path, json_key, append_eod

    def initializer(self):
        from tokenizers import Tokenizer

        MegatronEncoder.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        MegatronEncoder.eod = MegatronEncoder.tokenizer.token_to_id("<|endoftext|>")

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in (self.json_key,):
            doc_ids, sentence_lens = [], []
            for sentence in [data[key]]:  # no sentence splitting: the whole text
                sentence_ids = MegatronEncoder.tokenizer.encode(sentence, add_special_tokens=False).ids
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(MegatronEncoder.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


class MegatronBuilder:
    """Megatron-Core's IndexedDatasetBuilder + _IndexWriter, as far as preprocessing uses them."""

    def __init__(self, bin_path: str, dtype):
        self.data_file = open(bin_path, "wb")
        self.dtype = dtype
        self.sequence_lengths, self.document_indices = [], [0]

    def add_document(self, tokens, lengths):
        self.data_file.write(np.array(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str):
        self.data_file.close()
        itemsize = np.int64(np.dtype(self.dtype).itemsize)
        pointers, cur = [], np.int64(0)
        for length in self.sequence_lengths:
            pointers.append(cur.item())
            cur += length * itemsize
        with open(idx_path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(self.dtype)]))
            f.write(struct.pack("<Q", len(self.sequence_lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(np.array(self.sequence_lengths, dtype=np.int32).tobytes(order="C"))
            f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
            f.write(np.array(self.document_indices, dtype=np.int64).tobytes(order="C"))


def megatron_preprocess(src: str, prefix: str, tokenizer_path: str, workers: int, vocab_size: int) -> int:
    """Megatron's process_json_file (one partition, no sentence splitting); returns tokens written."""
    encoder = MegatronEncoder(tokenizer_path, "text", append_eod=True)
    with open(src, "r", encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = MegatronBuilder(prefix + ".bin", best_dtype(vocab_size))
        tokens = 0
        for doc, sentence_lens, _ in encoded_docs:
            for key in doc.keys():
                builder.add_document(doc[key], sentence_lens[key])
                tokens += len(doc[key])
        builder.finalize(prefix + ".idx")
        pool.close()
        pool.join()
    return tokens


# ------------------------------------------------------------------------------ benchmark


def bench_preprocess(args) -> None:
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src, tok_path = os.path.join(tmp, "corpus.jsonl"), os.path.join(tmp, "tokenizer.json")
        t0 = time.perf_counter()
        docs = make_corpus(src, args.corpus_mb)
        train_tokenizer(src, tok_path, args.vocab)
        vocab = Tokenizer.from_file(tok_path).get_vocab_size()
        print(f"== preprocessing: {args.corpus_mb:g} MB synthetic jsonl, {docs} documents, byte-level BPE "
              f"vocab {vocab}, --append-eod; best of {args.repeats} (set-up {time.perf_counter() - t0:.1f}s)")
        ratios = {}
        for workers in (1, 2):
            rates = {"megatron": 0.0, "megamoe": 0.0}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                n_meg = megatron_preprocess(src, os.path.join(tmp, "meg"), tok_path, workers, vocab)
                rates["megatron"] = max(rates["megatron"], n_meg / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                stats = preprocess([src], os.path.join(tmp, "mmoe"), tok_path, append_eod=True,
                                   workers=workers, progress=False, log=lambda m: None)
                rates["megamoe"] = max(rates["megamoe"], stats.tokens / (time.perf_counter() - t0))
            same = all(open(os.path.join(tmp, f"meg{ext}"), "rb").read()
                       == open(os.path.join(tmp, f"mmoe{ext}"), "rb").read() for ext in (".bin", ".idx"))
            if not same or stats.tokens != n_meg:
                sys.exit(f"outputs differ at {workers} workers: the comparison is void")
            ratios[workers] = rates["megamoe"] / rates["megatron"]
            print(f"workers={workers}: megatron {rates['megatron']:,.0f} tokens/s, megamoe "
                  f"{rates['megamoe']:,.0f} tokens/s ({stats.tokens} tokens) -> {ratios[workers]:.2f}x; "
                  "outputs byte-identical")
    print(f"tokens_per_s_vs_megatron W1 {ratios[1]:.2f} W2 {ratios[2]:.2f}")


def bench_indices(args) -> None:
    total = int(float(args.tokens))
    rng = np.random.default_rng(0)
    num_docs = max(1, total // 1001)
    sizes = (1 + rng.exponential(1000, num_docs)).astype(np.int32)
    sizes[-1] += max(0, total - int(sizes.sum(dtype=np.int64)))  # hit the token count roughly
    tokens = int(sizes.sum(dtype=np.int64))
    doc_idx = rng.permutation(num_docs).astype(np.int32)
    seq = args.seq_length
    print(f"== build_sample_idx: {tokens:.3g} tokens, {num_docs} documents, seq_length {seq}")
    t0 = time.perf_counter()
    ref = ib.build_sample_idx_numpy(sizes, doc_idx, seq, 1, tokens)
    t_np = time.perf_counter() - t0
    print(f"numpy: {t_np:.3f}s ({ref.shape[0] - 1} samples)")
    if ib.backend() != "cpp":
        print(f"C++ extension not available ({ib._ext_error}); build with "
              "`python setup.py build_ext --inplace`")
        return
    t0 = time.perf_counter()
    out = ib.build_sample_idx(sizes, doc_idx, seq, 1, tokens)
    t_cpp = time.perf_counter() - t0
    assert np.array_equal(out, ref), "C++ and NumPy sample indices differ"
    print(f"cpp:   {t_cpp:.3f}s  -> C++ is {t_np / t_cpp:.1f}x faster than NumPy (results identical)")
    n = int(ref.shape[0] - 1)
    weights = [0.5, 0.3, 0.2]
    print(f"== build_blending_indices: {n} samples, weights {weights}")
    t0 = time.perf_counter()
    di, _ = ib.build_blending_indices(weights, n)
    t_cpp = time.perf_counter() - t0
    part = max(1, int(n * args.blend_fraction))
    t0 = time.perf_counter()
    di_np, _ = ib.build_blending_indices_numpy(weights, part)
    t_np = (time.perf_counter() - t0) * n / part
    assert np.array_equal(di[:part], di_np), "C++ and NumPy blending indices differ"
    print(f"cpp: {t_cpp:.4f}s; numpy timed on {part} samples ({args.blend_fraction:.0%}) and "
          f"extrapolated to {t_np:.2f}s -> C++ is {t_np / max(t_cpp, 1e-9):.0f}x faster")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-mb", type=float, default=20.0, help="size of the synthetic jsonl corpus")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the best counts)")
    p.add_argument("--index", action="store_true", help="also benchmark the index builders (before the ratio line)")
    p.add_argument("--tokens", default="1e9", help="tokens of the synthetic index-building dataset")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--blend-fraction", type=float, default=0.1,
                   help="fraction of the samples the (slow, looped) NumPy blending reference runs on")
    args = p.parse_args()
    print(f"index builder backend: {ib.backend()}; CPU cores: {os.cpu_count()}")
    if args.index:
        bench_indices(args)
    bench_preprocess(args)


if __name__ == "__main__":
    main()
