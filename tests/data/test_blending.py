"""BlendedDataset and build_datasets with several paths: shares close to the weights."""

import numpy as np
import pytest

from datautil import write_dataset
from megamoe.config import DataConfig
from megamoe.data import BlendedDataset, GPTDataset, build_datasets


@pytest.fixture
def three_corpora(tmp_path):
    """Three datasets whose tokens name their corpus: corpus k uses ids [k*100, k*100+50)."""
    rng = np.random.default_rng(0)
    prefixes = []
    for k in range(3):
        docs = [k * 100 + rng.integers(0, 50, rng.integers(1, 80)) for _ in range(60)]
        write_dataset(tmp_path / f"c{k}", docs)
        prefixes.append(str(tmp_path / f"c{k}"))
    return prefixes


def corpus_of(sample):
    return int(sample[0]) // 100


def test_blended_dataset_shares(three_corpora):
    weights = [0.5, 0.3, 0.2]
    size = 600
    parts = [GPTDataset(p, np.arange(60), 8, 400, seed=1) for p in three_corpora]
    blend = BlendedDataset(parts, weights, size)
    assert len(blend) == size
    counts = np.bincount([corpus_of(blend[i]) for i in range(size)], minlength=3)
    assert np.all(np.abs(counts - np.array(weights) * size) <= 1)
    first100 = np.bincount([corpus_of(blend[i]) for i in range(100)], minlength=3)
    assert first100.tolist() == [50, 30, 20]


def test_blend_needs_enough_samples(three_corpora):
    parts = [GPTDataset(p, np.arange(60), 8, 10, seed=1) for p in three_corpora]
    with pytest.raises(ValueError, match="draws 50 samples from dataset 0 but it has only 10"):
        BlendedDataset(parts, [0.5, 0.3, 0.2], 100)


def test_build_datasets_blends_paths(three_corpora, tmp_path):
    cfg = DataConfig(paths=three_corpora, weights=[2.0, 1.0, 1.0], cache_dir=str(tmp_path / "cache"),
                     split="90,10,0")
    train, valid, info = build_datasets(cfg, seq_length=8, train_samples=400, valid_samples=40, seed=3)
    assert len(train) == 400 and len(valid) == 40
    assert info is None  # no data.tokenizer given
    counts = np.bincount([corpus_of(train[i]) for i in range(400)], minlength=3)
    assert counts.tolist() == [200, 100, 100]
    # valid comes from the last 10% of every corpus' documents, train from the first 90%.
    again, _, _ = build_datasets(cfg, seq_length=8, train_samples=400, valid_samples=40, seed=3)
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 400, 13))
    # No weights: proportional to each corpus' train tokens; a tokenizer spec gives decode.
    cfg2 = DataConfig(paths=three_corpora[:2], tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    t2, v2, info2 = build_datasets(cfg2, seq_length=8, train_samples=100, valid_samples=0, seed=3)
    assert v2 is None and info2.vocab_size == 257 and info2.eos_id == 256 and info2.decode([104, 105]) == "hi"


def test_build_datasets_user_errors(three_corpora, tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        build_datasets(DataConfig(default_corpus=False), 8, 10, 0, 0)
    with pytest.raises(ValueError, match="index file .* not found"):
        build_datasets(DataConfig(paths=[str(tmp_path / "missing")]), 8, 10, 0, 0)
    with pytest.raises(ValueError, match="data.weights has 1 entries"):
        build_datasets(DataConfig(paths=three_corpora, weights=[1.0]), 8, 10, 0, 0)
    with pytest.raises(ValueError, match="train split .* has no tokens"):
        build_datasets(DataConfig(paths=three_corpora[:1], split="0,1,0", cache_dir=""), 8, 10, 0, 0)
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_datasets(DataConfig(paths=three_corpora[:1], tokenizer="byte", cache_dir=""), 8, 10, 0, 0,
                       vocab_size=200)
