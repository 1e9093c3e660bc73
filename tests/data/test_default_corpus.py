"""The bundled stdlib corpus: deterministic, decodable, reused from the cache."""

import os
import time

import numpy as np
import pytest

from megamoe.config import DataConfig
from megamoe.data import build_datasets, corpus
from megamoe.data.indexed import IndexedDataset
from megamoe.data.tokenizer import load_tokenizer


def test_small_corpus_build_decode_and_reuse(tmp_path, monkeypatch):
    info = corpus.build_default_corpus(str(tmp_path / "a"), vocab_size=320, max_docs=12, log=lambda m: None)
    root, files = corpus.stdlib_files(12)
    assert files == sorted(files) and len(files) == 12 and all(f.endswith(".py") for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split(os.sep))
    ds = IndexedDataset(info.prefix)
    tok = load_tokenizer(info.tokenizer_path)
    assert len(ds) == info.num_documents == 12 and tok.vocab_size <= 320 and ds.dtype == np.uint16
    for i in (0, 5, 11):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eos_id == 0
        with open(os.path.join(root, files[i]), "rb") as f:
            assert tok.decode(ids[:-1]) == f.read().decode("utf-8", errors="ignore")

    # Same parameters elsewhere -> byte-identical output (deterministic tokenizer training).
    info_b = corpus.build_default_corpus(str(tmp_path / "b"), vocab_size=320, max_docs=12, log=lambda m: None)
    for suffix in (".bin", ".idx"):
        assert open(info.prefix + suffix, "rb").read() == open(info_b.prefix + suffix, "rb").read()
    assert open(info.tokenizer_path).read() == open(info_b.tokenizer_path).read()

    # Reused, not rebuilt, when the manifest matches.
    monkeypatch.setattr(corpus, "train_bpe_tokenizer", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = corpus.build_default_corpus(str(tmp_path / "a"), vocab_size=320, max_docs=12, log=lambda m: None)
    assert again == info
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters -> a new build
        corpus.build_default_corpus(str(tmp_path / "a"), vocab_size=320, max_docs=11, log=lambda m: None)


def test_build_datasets_with_default_corpus(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), corpus_docs=30, split="90,10,0")
    train, valid, info = build_datasets(cfg, seq_length=32, train_samples=64, valid_samples=8, seed=1,
                                        vocab_size=300, log=lambda m: None)
    assert len(train) == 64 and len(valid) == 8
    assert info.vocab_size <= 300 and info.eos_id == 0 and isinstance(info.decode(train[0].tolist()), str)
    assert all(train[i].shape == (33,) and train[i].max() < info.vocab_size for i in range(64))
    with pytest.raises(ValueError, match="too small"):
        build_datasets(DataConfig(cache_dir=str(tmp_path), corpus_docs=3), 32, 8, 0, 1, vocab_size=100)


@pytest.mark.skipif(os.environ.get("MEGAMOE_SLOW_TESTS") != "1", reason="slow: set MEGAMOE_SLOW_TESTS=1")
def test_full_corpus_under_a_minute(tmp_path):
    start = time.perf_counter()
    info = corpus.build_default_corpus(str(tmp_path), vocab_size=2048, log=lambda m: None)
    assert time.perf_counter() - start < 60
    assert info.num_tokens > 1_000_000
