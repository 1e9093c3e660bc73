"""Index caches are keyed by content and validated on load; token ids are checked against the vocabulary."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from datautil import random_docs, random_texts, write_dataset, write_jsonl
from megamoe.data import blending
from megamoe.data import gpt_dataset as gd
from megamoe.data.gpt_dataset import GPTDataset
from megamoe.data.indexed import IndexedDataset
from megamoe.data.preprocess import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 16


def load_print_batch():
    spec = importlib.util.spec_from_file_location("print_batch", os.path.join(ROOT, "tools", "print_batch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def printed_samples(out: str) -> dict:
    rows = [line for line in out.splitlines() if line.startswith("batch ")]
    return {int(r.split(" sample ")[1].split(":")[0]): [int(x) for x in r.split(": ")[1].split()] for r in rows}


def test_reprocessed_corpus_of_same_size_never_reuses_indices(tmp_path, capsys):
    """The issue's reproduction: reversed documents, same prefix, same file sizes, same cache_dir."""
    texts = [t for t in random_texts(300, seed=4, max_words=40) if t]
    write_jsonl(tmp_path / "a.jsonl", texts)
    write_jsonl(tmp_path / "b.jsonl", texts[::-1])
    prefix, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    argv = ["--preset", "tiny", "--data.paths", prefix, "--data.tokenizer", "byte", "--data.cache_dir", cache,
            "--data.default_corpus", "false", "--model.seq_length", "32", "--steps", "10",
            "--global_batch_size", "4", "--micro_batch_size", "2", "--model.vocab_size", "512"]
    tool = load_print_batch()
    preprocess([str(tmp_path / "a.jsonl")], prefix, "byte", append_eod=True, progress=False)
    sizes = (os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx"))
    assert tool.main(argv + ["--batch", "0"]) == 0
    capsys.readouterr()
    preprocess([str(tmp_path / "b.jsonl")], prefix, "byte", append_eod=True, progress=False)
    assert (os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")) == sizes  # the old key collided
    assert tool.main(argv + ["--batch", "1"]) == 0
    got = printed_samples(capsys.readouterr().out)
    # The truth: indices built in memory for the new corpus.
    docs = gd.split_document_ranges(len(IndexedDataset(prefix)), "98,2,0")[0]
    fresh = GPTDataset(prefix, np.arange(*docs), 32, 40, seed=1234)
    assert sorted(got) == [4, 5, 6, 7]
    for s, ids in got.items():
        assert len(ids) == 33 and ids == fresh[s].tolist()
    assert len([f for f in os.listdir(cache) if f.startswith("gpt-train-") and f.endswith(".json")]) == 2


@pytest.fixture
def dataset(tmp_path):
    docs = random_docs(60, seed=2, max_len=40, vocab=4000, allow_empty=True)
    docs[7] = np.array([4999] + [1] * 10)
    write_dataset(tmp_path / "d", docs)
    return IndexedDataset(str(tmp_path / "d"))


def test_content_digest_tracks_lengths_not_file_sizes(tmp_path):
    docs = random_docs(40, seed=1, allow_empty=False)
    write_dataset(tmp_path / "a", docs)
    write_dataset(tmp_path / "b", docs[::-1])
    a, b = IndexedDataset(str(tmp_path / "a")), IndexedDataset(str(tmp_path / "b"))
    assert os.path.getsize(tmp_path / "a.idx") == os.path.getsize(tmp_path / "b.idx")
    assert a.content_digest() != b.content_digest()
    write_dataset(tmp_path / "c", [d + 1 for d in docs])  # other tokens, same lengths: same indices
    assert IndexedDataset(str(tmp_path / "c")).content_digest() == a.content_digest()


@pytest.mark.parametrize("damage, why", [
    (lambda a: {**a, "sample_idx": a["sample_idx"] + np.array([0, 1])}, "sample_idx"),
    (lambda a: {**a, "shuffle_idx": np.zeros_like(a["shuffle_idx"])}, "not a permutation"),
    (lambda a: {**a, "doc_idx": a["doc_idx"][:-1]}, "doc_idx has shape"),
    (lambda a: {**a, "doc_idx": np.full_like(a["doc_idx"], 59)}, "outside the split"),
    (lambda a: {**a, "sample_idx": a["sample_idx"][:-1]}, "shapes"),
])
def test_damaged_cache_is_rebuilt_with_a_warning(dataset, tmp_path, damage, why):
    cache = str(tmp_path / "cache")
    good = GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache)
    want = [good[i].tolist() for i in range(40)]
    arrays = {n: np.array(getattr(good, n)) for n in ("doc_idx", "sample_idx", "shuffle_idx")}
    bad = damage(arrays)
    for name, arr in bad.items():  # overwrite the cached files in place
        path = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(f"-{name}.npy")][0]
        np.save(path, arr)
    logged = []
    again = GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache, log=logged.append)
    assert len(logged) == 2 and why in logged[0] and "rebuilding" in logged[0]
    assert [again[i].tolist() for i in range(40)] == want
    logged.clear()
    GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache, log=logged.append)
    assert not any("warning" in m for m in logged)  # the rebuilt files are good


def test_unreadable_cache_file_is_rebuilt(dataset, tmp_path):
    cache = str(tmp_path / "cache")
    GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache)
    path = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith("-sample_idx.npy")][0]
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        ds = GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache)
    assert ds.sample_idx.shape == (ds.shuffle_idx.shape[0] + 1, 2)


def test_damaged_blend_cache_is_rebuilt(tmp_path):
    cache = str(tmp_path / "cache")
    di, dsi = (np.array(a) for a in blending.blending_indices([0.3, 0.7], 200, cache))
    path = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith("-dataset_sample_index.npy")][0]
    np.save(path, np.array(dsi) + 1)
    logged = []
    di2, dsi2 = blending.blending_indices([0.3, 0.7], 200, cache, log=logged.append)
    assert "running count" in logged[0] and np.array_equal(dsi2, dsi) and np.array_equal(di2, di)


# ------------------------------------------------------------------------- vocabulary guard

def test_vocabulary_guard(dataset, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError) as err:
        GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache, vocab_size=640)
    msg = str(err.value)
    assert "\n" not in msg and repr(dataset.prefix) in msg and "train split" in msg
    assert "holds token id 4999 but model.vocab_size is 640" in msg
    GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache, vocab_size=5000)
    # Only the split's documents count (document 7 holds the 4999).
    GPTDataset(dataset, np.arange(8, 50), SEQ, 40, seed=3, vocab_size=4000)

    def boom(*args, **kwargs):
        raise AssertionError("the token range was recomputed")

    monkeypatch.setattr(IndexedDataset, "token_range", boom)
    with pytest.raises(ValueError, match="token id 4999"):  # from the cache
        GPTDataset(dataset, np.arange(50), SEQ, 40, seed=3, cache_dir=cache, vocab_size=640)
    write_dataset(tmp_path / "u8", [np.arange(200)], np.uint8)  # uint8 ids always fit 256+
    GPTDataset(str(tmp_path / "u8"), [0], SEQ, 5, seed=0, vocab_size=256)


def test_vocabulary_guard_sees_rewritten_tokens(tmp_path):
    docs = random_docs(20, seed=5, vocab=100, allow_empty=False)
    write_dataset(tmp_path / "d", docs)
    cache = str(tmp_path / "cache")
    GPTDataset(str(tmp_path / "d"), np.arange(20), SEQ, 10, seed=0, cache_dir=cache, vocab_size=100)
    st = os.stat(tmp_path / "d.bin")
    write_dataset(tmp_path / "d", [d + 900 for d in docs])  # same lengths, new ids
    os.utime(tmp_path / "d.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(ValueError, match=r"holds token id 99\d"):
        GPTDataset(str(tmp_path / "d"), np.arange(20), SEQ, 10, seed=0, cache_dir=cache, vocab_size=100)


def test_negative_token_ids(tmp_path):
    write_dataset(tmp_path / "d", [np.array([1, 2, -3, 4] * 10)], np.int32)
    with pytest.raises(ValueError, match="negative token id -3"):
        GPTDataset(str(tmp_path / "d"), [0], 8, 3, seed=0, vocab_size=100_000)


def test_train_cli_out_of_vocabulary_is_one_line_exit_2(dataset, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megamoe", "train", "--preset", "tiny", "--data.paths", dataset.prefix,
         "--data.default_corpus", "false", "--data.cache_dir", str(tmp_path / "c"), "--model.vocab_size", "640",
         "--steps", "2", "--out_dir", str(tmp_path / "run"), "--model.seq_length", "16"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megamoe train: error: dataset ")
    assert "holds token id 4999 but model.vocab_size is 640" in last
    assert "Traceback" not in proc.stderr
