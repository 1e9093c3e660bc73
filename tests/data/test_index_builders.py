"""build_sample_idx / build_blending_indices: semantics, and C++ == NumPy on random inputs."""

import os

import numpy as np
import pytest

from megamoe.data import index_builders as ib

needs_cpp = pytest.mark.skipif(ib.backend() != "cpp",
                               reason="megamoe._data_helpers not built (python setup.py build_ext --inplace)")


def brute_force_samples(sizes, doc_idx, seq_length, drop_last=True):
    """Samples as token-position lists of the concatenated stream (the definition)."""
    stream = [(j, o) for j, d in enumerate(doc_idx) for o in range(sizes[d])]
    total = len(stream)
    n = (total - 1) // seq_length if drop_last else -(-(total - 1) // seq_length)
    starts = [stream[min(i * seq_length, total - 1)] for i in range(n + 1)]
    return np.array(starts).reshape(-1, 2)


def random_case(rng):
    n = int(rng.integers(1, 25))
    sizes = rng.integers(0, 30, n).astype(np.int32)
    if rng.random() < 0.3:
        sizes[rng.integers(0, n)] = rng.integers(100, 300)  # a document longer than several samples
    if sizes.sum() == 0:
        sizes[0] = 5
    epochs = int(rng.integers(1, 4))
    docs = np.arange(n)
    if rng.random() < 0.3:
        docs = docs[rng.random(n) < 0.7]  # a split: a subset of the documents
        if sizes[docs].sum() == 0:
            docs = np.arange(n)
    doc_idx = np.concatenate([rng.permutation(docs) for _ in range(epochs)])
    return sizes, doc_idx, int(rng.integers(1, 40)), epochs, int(sizes[docs].sum())


def test_numpy_matches_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes, doc_idx, seq, epochs, tpe = random_case(rng)
        for drop_last in (True, False):
            got = ib.build_sample_idx_numpy(sizes, doc_idx, seq, epochs, tpe, drop_last)
            assert np.array_equal(got, brute_force_samples(sizes, doc_idx, seq, drop_last))


def test_one_token_overlap_reconstruction():
    rng = np.random.default_rng(1)
    sizes = np.array([5, 0, 17, 3, 0, 40, 1], dtype=np.int32)
    doc_idx = rng.permutation(7)
    seq = 6
    idx = ib.build_sample_idx(sizes, doc_idx, seq, 1, int(sizes.sum()))
    tokens = [np.arange(s) + 1000 * d for d, s in enumerate(sizes)]  # token = 1000*doc + offset
    stream = np.concatenate([tokens[d] for d in doc_idx])
    assert idx.shape == ((stream.size - 1) // seq + 1, 2)
    for i in range(idx.shape[0] - 1):
        (j0, o0), (j1, o1) = idx[i], idx[i + 1]
        parts = [tokens[doc_idx[j0]][o0:]] + [tokens[doc_idx[j]] for j in range(j0 + 1, j1)]
        sample = np.concatenate(parts + [tokens[doc_idx[j1]][:o1 + 1]]) if j1 > j0 else \
            tokens[doc_idx[j0]][o0:o1 + 1]
        assert np.array_equal(sample, stream[i * seq:i * seq + seq + 1])


@needs_cpp
def test_cpp_matches_numpy_sample_idx():
    rng = np.random.default_rng(2)
    for _ in range(300):
        sizes, doc_idx, seq, epochs, tpe = random_case(rng)
        for drop_last in (True, False):
            for dt in (np.int32, np.int64):
                a = ib.build_sample_idx_numpy(sizes, doc_idx.astype(dt), seq, epochs, tpe, drop_last)
                b = ib.build_sample_idx(sizes, doc_idx.astype(dt), seq, epochs, tpe, drop_last)
                assert a.dtype == b.dtype and np.array_equal(a, b)


@needs_cpp
def test_cpp_matches_numpy_large():
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 3000, 20000).astype(np.int32)
    doc_idx = np.concatenate([rng.permutation(20000) for _ in range(2)])
    a = ib.build_sample_idx_numpy(sizes, doc_idx, 2048, 2, int(sizes.sum()))
    b = ib.build_sample_idx(sizes, doc_idx, 2048, 2, int(sizes.sum()))
    assert np.array_equal(a, b)


def test_sample_idx_errors():
    sizes = np.array([3, 4], dtype=np.int32)
    with pytest.raises(ValueError, match="tokens in the doc_idx stream"):
        ib.build_sample_idx(sizes, [0, 1], 2, 1, 99)
    with pytest.raises(ValueError, match=r"doc_idx values must lie in \[0, 2\)"):
        ib.build_sample_idx(sizes, [0, 2], 2, 1, 7)
    with pytest.raises(ValueError, match="no tokens"):
        ib.build_sample_idx(np.zeros(2, np.int32), [0, 1], 2, 1, 0)
    with pytest.raises(ValueError, match="seq_length"):
        ib.build_sample_idx(sizes, [0, 1], 0, 1, 7)


# -------------------------------------------------------------------------------- blending

def test_blending_reference_semantics():
    di, dsi = ib.build_blending_indices_numpy([1, 1, 2], 8)
    assert di.tolist() == [2, 0, 1, 2, 2, 0, 1, 2]  # ties -> lowest index
    assert dsi.tolist() == [0, 0, 0, 1, 2, 1, 1, 3]
    assert di.dtype == np.uint8 and dsi.dtype == np.int64
    di, dsi = ib.build_blending_indices([3.0], 5)  # one dataset
    assert di.tolist() == [0] * 5 and dsi.tolist() == list(range(5))
    di, _ = ib.build_blending_indices_numpy([1.0] * 300, 10)
    assert di.dtype == np.int16


def test_blending_shares_track_weights():
    w = np.array([0.6, 0.3, 0.1])
    di, dsi = ib.build_blending_indices(w * 7, 10000)  # weights not summing to 1
    for n in (10, 100, 1000, 10000):
        counts = np.bincount(di[:n], minlength=3)
        assert np.all(np.abs(counts - w * n) <= 1.0 + 1e-9)
    for d in range(3):  # per-dataset sample indices run 0, 1, 2, ...
        assert np.array_equal(dsi[di == d], np.arange((di == d).sum()))


@needs_cpp
def test_cpp_matches_numpy_blending():
    rng = np.random.default_rng(4)
    cases = [[1.0], [0.5, 0.5], [1, 0, 1], [1e-9, 1.0], [1 / 3] * 3, [0.7, 0.2, 0.1]]
    cases += [list(rng.random(int(rng.integers(1, 8))) * rng.choice([0.1, 1, 100])) for _ in range(40)]
    cases.append(list(rng.random(300)))
    for w in cases:
        size = int(rng.integers(0, 3000))
        a = ib.build_blending_indices_numpy(w, size)
        b = ib.build_blending_indices(w, size)
        assert a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), w


def test_blending_errors():
    for bad, msg in (([], "non-empty"), ([1, -1], ">= 0"), ([0, 0], "sum to 0"), ([np.nan], "finite")):
        with pytest.raises(ValueError, match=msg):
            ib.build_blending_indices(bad, 4)


def test_backend_name():
    assert ib.backend() in ("cpp", "numpy")


def test_numpy_fallback_can_be_forced(tmp_path):
    import subprocess
    import sys

    code = ("from megamoe.data import index_builders as ib; import numpy as np;"
            "print(ib.backend(), ib.build_sample_idx(np.array([5, 7], np.int32), [1, 0], 4, 1, 12).tolist())")
    env = dict(os.environ, MEGAMOE_DATA_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.strip() == "numpy [[0, 0], [0, 4], [1, 1]]"
