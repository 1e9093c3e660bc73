"""GPTDataset: determinism, one-token overlap, epochs, cache reuse, splits."""

import os

import numpy as np
import pytest

from datautil import write_dataset
from megamoe.data import gpt_dataset as gd
from megamoe.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megamoe.data.indexed import IndexedDataset

SEQ = 16


@pytest.fixture
def dataset(tmp_path):
    # Token value = 1000 * doc + position: every token says where it came from.
    rng = np.random.default_rng(0)
    docs = [1000 * d + np.arange(int(n)) for d, n in enumerate(rng.integers(0, 60, 30))]
    docs[4] = 1000 * 4 + np.arange(120)  # longer than several samples
    write_dataset(tmp_path / "d", docs, np.int32)
    return IndexedDataset(str(tmp_path / "d")), docs


def stream_of(ds: GPTDataset, docs):
    return np.concatenate([docs[d] for d in ds.doc_idx])


def test_items_are_overlapping_windows_of_the_stream(dataset):
    indexed, docs = dataset
    ds = GPTDataset(indexed, np.arange(30), SEQ, 50, seed=7)
    stream = stream_of(ds, docs)
    for s in range(ds.sample_idx.shape[0] - 1):
        x = ds.sample(s)
        assert x.dtype == np.int64 and x.shape == (SEQ + 1,)
        assert np.array_equal(x, stream[s * SEQ:s * SEQ + SEQ + 1])
        if s:
            assert ds.sample(s - 1)[-1] == x[0]  # one-token overlap
    served = sorted(int(ds.shuffle_idx[i]) for i in range(len(ds)))
    assert len(set(served)) == len(ds) == 50
    assert np.array_equal(ds[3], ds.sample(int(ds.shuffle_idx[3])))


def test_deterministic_and_seed_dependent(dataset):
    indexed, _ = dataset
    a = GPTDataset(indexed, np.arange(30), SEQ, 40, seed=1)
    b = GPTDataset(indexed, np.arange(30), SEQ, 40, seed=1)
    c = GPTDataset(indexed, np.arange(30), SEQ, 40, seed=2)
    assert all(np.array_equal(a[i], b[i]) for i in range(40))
    assert not all(np.array_equal(a[i], c[i]) for i in range(40))


def test_epochs(dataset):
    indexed, docs = dataset
    split = np.arange(5, 25)
    tokens = int(sum(len(docs[d]) for d in split))
    n = 3 * tokens // SEQ + 1  # needs a bit more than 3 epochs
    ds = GPTDataset(indexed, split, SEQ, n, seed=3)
    assert ds.num_epochs == gd.num_epochs_needed(tokens, SEQ, n) == 4
    assert ds.doc_idx.size == 4 * split.size
    for e in range(4):  # each epoch is a fresh permutation of the split
        epoch = ds.doc_idx[e * split.size:(e + 1) * split.size]
        assert sorted(epoch.tolist()) == split.tolist()
    assert not np.array_equal(ds.doc_idx[:split.size], ds.doc_idx[split.size:2 * split.size])
    # Every sample lying wholly in the first three epochs is served before the fourth epoch's.
    full = (3 * tokens - 1) // SEQ
    assert sorted(ds.shuffle_idx[:full].tolist()) == list(range(full))
    assert np.all(np.asarray(ds.shuffle_idx[full:]) >= full)
    assert all(ds[i].shape == (SEQ + 1,) for i in range(len(ds)))
    assert all(0 <= ds[i].min() and ds[i].max() // 1000 in split for i in range(0, len(ds), 7))


def test_cache_reuse(dataset, tmp_path, monkeypatch):
    indexed, _ = dataset
    cache = tmp_path / "cache"
    a = GPTDataset(indexed, np.arange(20), SEQ, 30, seed=5, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3 and not any(".tmp" in f for f in files)

    def boom(*args, **kwargs):
        raise AssertionError("indices were rebuilt instead of loaded from the cache")

    monkeypatch.setattr(gd, "build_gpt_indices", boom)
    b = GPTDataset(indexed, np.arange(20), SEQ, 30, seed=5, cache_dir=str(cache))
    assert all(np.array_equal(a[i], b[i]) for i in range(30))
    assert isinstance(b.sample_idx, np.memmap)
    for changed in ({"seed": 6}, {"num_samples": 31}, {"seq_length": 8}, {"documents": np.arange(19)}):
        kwargs = dict(indexed=indexed, documents=np.arange(20), seq_length=SEQ, num_samples=30, seed=5)
        kwargs.update(changed)
        with pytest.raises(AssertionError, match="rebuilt"):
            GPTDataset(cache_dir=str(cache), **kwargs)


def test_zero_token_split_is_a_clear_error(tmp_path):
    write_dataset(tmp_path / "d", [[], [], [1, 2, 3]])
    with pytest.raises(ValueError, match="valid split of .* has no tokens"):
        GPTDataset(str(tmp_path / "d"), [0, 1], 4, 10, seed=0, name="valid")


def test_split_parsing():
    assert parse_split("98,2,0") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split("90/5/5") == pytest.approx([0.9, 0.05, 0.05])
    assert split_document_ranges(100, "98,2,0") == [(0, 98), (98, 100), (100, 100)]
    assert split_document_ranges(7, "1,1,1") == [(0, 2), (2, 5), (5, 7)]
    assert split_document_ranges(3, "98,2,0") == [(0, 3), (3, 3), (3, 3)]
    for bad in ("a,b", "0,0,0", "1,-1", "1,2,3,4"):
        with pytest.raises(ValueError, match="data.split"):
            parse_split(bad)
