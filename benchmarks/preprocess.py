#!/usr/bin/env python
"""Data pipeline throughput: preprocessing (tokens/s, 1 vs 2 workers) and index building.

    python benchmarks/preprocess.py                  # 20 MB corpus, 1e9-token index benchmark
    python benchmarks/preprocess.py --tokens 1e8 --corpus-mb 5
    python benchmarks/preprocess.py --tokenizer bpe --corpus-mb 4 --skip-index

1. Preprocessing: a synthetic JSON-lines corpus (random words, seeded) through
   megamoe.data.preprocess with the byte tokenizer (or --tokenizer bpe / tokenizer.json), with
   1 and 2 workers; prints tokens/s and the 2-vs-1 worker ratio. The byte tokenizer is so cheap
   that the run is bound by JSON parsing and inter-process traffic; BPE shows the worker scaling.
2. Index building for a synthetic dataset of --tokens tokens (document lengths ~ 1 + Exp(1000),
   one shuffled epoch, seq_length 4096): build_sample_idx with the C++ extension vs the NumPy
   reference (both on the full size; they are checked to agree), then build_blending_indices
   (C++ on the full sample count; the NumPy loop on --blend-fraction of it, timed and
   extrapolated, said so in the output).
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megamoe.data import index_builders as ib  # noqa: E402
from megamoe.data.preprocess import preprocess  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no "
         "moe expert router token layer gradient tensor parallel pipeline αβγ 東京 naïve").split()


def make_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """Write ~megabytes of JSON lines; returns the number of documents."""
    rng = random.Random(seed)
    target, written, docs = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 2000)))
            line = json.dumps({"text": text, "id": docs}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def bench_preprocess(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "corpus.jsonl")
        docs = make_corpus(src, args.corpus_mb)
        if args.tokenizer == "bpe":  # a byte-level BPE (vocab 2048) trained on the corpus' start
            from megamoe.data.corpus import train_bpe_tokenizer

            with open(src, encoding="utf-8") as f:
                sample = [json.loads(next(f))["text"] for _ in range(min(docs, 300))]
            args.tokenizer = os.path.join(tmp, "tokenizer.json")
            train_bpe_tokenizer(sample, 2048).save(args.tokenizer)
            # One core per worker, so 1 vs 2 workers compares like with like.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            print("bpe: TOKENIZERS_PARALLELISM=false (1 worker = 1 core; by default a single worker "
                  "also lets the Rust tokenizer use all cores)")
        print(f"== preprocessing: {args.corpus_mb:.0f} MB synthetic jsonl, {docs} documents, "
              f"tokenizer {args.tokenizer!r}")
        rates = {}
        for workers in (1, 2):
            stats = preprocess([src], os.path.join(tmp, f"out{workers}"), args.tokenizer,
                               append_eod=True, workers=workers, progress=False)
            rates[workers] = stats.tokens / stats.seconds
            print(f"workers={workers}: {stats.tokens} tokens in {stats.seconds:.2f}s -> "
                  f"{rates[workers]:,.0f} tokens/s, {stats.bytes / 1e6 / stats.seconds:.1f} MB/s")
        same = (open(os.path.join(tmp, "out1.bin"), "rb").read() == open(os.path.join(tmp, "out2.bin"), "rb").read())
        print(f"2 workers vs 1: {rates[2] / rates[1]:.2f}x (outputs identical: {same})")


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
    p.add_argument("--tokens", default="1e9", help="tokens of the synthetic index-building dataset")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--corpus-mb", type=float, default=20.0, help="size of the synthetic jsonl corpus")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte', 'bpe' (train a vocab-2048 byte-level BPE on the corpus first) or a tokenizer.json")
    p.add_argument("--blend-fraction", type=float, default=0.1,
                   help="fraction of the samples the (slow, looped) NumPy blending reference runs on")
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    args = p.parse_args()
    print(f"index builder backend: {ib.backend()}; CPU cores: {os.cpu_count()}")
    if not args.skip_preprocess:
        bench_preprocess(args)
    if not args.skip_index:
        bench_indices(args)


if __name__ == "__main__":
    main()
