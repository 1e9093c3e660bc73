"""Small seeded helpers shared by the data pipeline tests (imported as `datautil`)."""

import json
import random

import numpy as np

from megamoe.data.indexed import IndexedDatasetBuilder

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu naïve 東京 ü".split()


def random_texts(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words))) for _ in range(n)]


def write_jsonl(path, texts, key="text") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": 1}) + "\n")


def write_dataset(prefix, docs, dtype=np.uint16) -> None:
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(np.asarray(d, dtype=dtype))


def random_docs(n: int, seed: int = 0, max_len: int = 50, vocab: int = 1000, allow_empty=True):
    rng = np.random.default_rng(seed)
    lo = 0 if allow_empty else 1
    return [rng.integers(0, vocab, rng.integers(lo, max_len + 1)) for _ in range(n)]
