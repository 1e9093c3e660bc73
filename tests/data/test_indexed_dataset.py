"""IndexedDataset reader/writer: exact Megatron byte format, round trips, merging, corrupt files."""

import os
import struct

import numpy as np
import pytest

from datautil import random_docs, write_dataset
from megamoe.data.indexed import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, best_dtype,
                                  merge_datasets)


def expected_idx(code: int, itemsize: int, docs_lengths: list[int]) -> bytes:
    """Hand-assembled .idx for one sequence per document."""
    n = len(docs_lengths)
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    out += b"".join(struct.pack("<i", x) for x in docs_lengths)
    offset = 0
    for x in docs_lengths:
        out += struct.pack("<q", offset)
        offset += x * itemsize
    out += b"".join(struct.pack("<q", i) for i in range(n + 1))
    return out


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.uint8, 1), (np.int64, 5)])
def test_bytes_match_megatron_format(tmp_path, dtype, code):
    docs = [[1, 2, 3], [], [7], [250, 0, 9, 4]]
    prefix = tmp_path / "d"
    write_dataset(prefix, docs, dtype)
    lengths = [len(d) for d in docs]
    assert (tmp_path / "d.idx").read_bytes() == expected_idx(code, np.dtype(dtype).itemsize, lengths)
    flat = [t for d in docs for t in d]
    fmt = {np.uint16: "H", np.int32: "i", np.uint8: "B", np.int64: "q"}[dtype]
    assert (tmp_path / "d.bin").read_bytes() == struct.pack(f"<{len(flat)}{fmt}", *flat)


def test_round_trip_and_accessors(tmp_path):
    docs = random_docs(40, seed=3)
    write_dataset(tmp_path / "d", docs)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 40 and ds.num_documents == 40 and ds.dtype == np.uint16
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    assert np.array_equal(ds[-1], docs[-1])
    assert np.array_equal(ds.sequence_lengths, [len(d) for d in docs])
    assert np.array_equal(ds.document_indices, np.arange(41))
    longest = int(np.argmax(ds.sequence_lengths))
    assert np.array_equal(ds.get(longest, 2, 5), docs[longest][2:7])
    assert np.array_equal(ds.get(longest, 3), docs[longest][3:])
    with pytest.raises(IndexError):
        ds.get(longest, 1, len(docs[longest]))
    with pytest.raises(IndexError):
        ds[40]
    assert [len(x) for x in ds[1:4]] == [len(d) for d in docs[1:4]]


def test_multi_sequence_documents(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "d"), np.int32) as b:
        b.add_item([1, 2])
        b.add_item([3])
        b.end_document()
        b.add_item([4, 5, 6])
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.document_indices.tolist() == [0, 2, 3]


def test_best_dtype():
    assert best_dtype(257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32


def test_builder_rejects_out_of_range_tokens(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        b.add_document(np.array([70000]))
    b.abort()
    assert os.listdir(tmp_path) == []


def test_builder_abort_and_exception_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16) as b:
            b.add_document([1, 2, 3])
            assert len(os.listdir(tmp_path)) == 1  # only the temp .bin so far
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_finalize_replaces_existing_output(tmp_path):
    write_dataset(tmp_path / "d", [[1, 2, 3]])
    write_dataset(tmp_path / "d", [[4], [5, 6]])
    ds = IndexedDataset(str(tmp_path / "d"))
    assert [x.tolist() for x in ds[0:2]] == [[4], [5, 6]]
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_merge(tmp_path):
    a, b = random_docs(5, seed=1), random_docs(7, seed=2)
    write_dataset(tmp_path / "a", a)
    write_dataset(tmp_path / "b", b)
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    m = IndexedDataset(str(tmp_path / "m"))
    assert len(m) == 12 and m.document_indices.tolist() == list(range(13))
    for i, d in enumerate(a + b):
        assert np.array_equal(m[i], d)
    write_dataset(tmp_path / "c", [[1]], np.int32)
    with pytest.raises(ValueError, match="different dtypes"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "m2"))


def test_pickle_reopens_by_path(tmp_path):
    import pickle

    write_dataset(tmp_path / "d", [[1, 2], [3]])
    ds = pickle.loads(pickle.dumps(IndexedDataset(str(tmp_path / "d"))))
    assert ds[1].tolist() == [3]


# ------------------------------------------------------------------------------ corrupt inputs

@pytest.fixture
def good(tmp_path):
    write_dataset(tmp_path / "d", [[1, 2, 3], [4, 5], [6]])
    return tmp_path / "d"


def _rewrite(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def _one_line_error(prefix, match):
    with pytest.raises(IndexedDatasetError, match=match) as info:
        IndexedDataset(str(prefix))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_bin(good):
    _rewrite(good.with_suffix(".bin"), lambda d: d[:-2])
    _one_line_error(good, r"d\.bin' is truncated: 10 bytes, the index needs 12")


def test_bin_too_long(good):
    _rewrite(good.with_suffix(".bin"), lambda d: d + b"\0\0")
    _one_line_error(good, "larger than its index says")


def test_wrong_magic(good):
    _rewrite(good.with_suffix(".idx"), lambda d: b"XXIDIDX\0\0" + d[9:])
    _one_line_error(good, "not a Megatron .idx file")


def test_bad_version(good):
    _rewrite(good.with_suffix(".idx"), lambda d: d[:9] + struct.pack("<Q", 2) + d[17:])
    _one_line_error(good, "unsupported .idx version 2")


def test_bad_dtype_code(good):
    _rewrite(good.with_suffix(".idx"), lambda d: d[:17] + b"\x09" + d[18:])
    _one_line_error(good, "unknown dtype code 9")


def test_truncated_idx(good):
    _rewrite(good.with_suffix(".idx"), lambda d: d[:-5])
    _one_line_error(good, r"d\.idx' truncated")
    _rewrite(good.with_suffix(".idx"), lambda d: d[:20])
    _one_line_error(good, "truncated")


def test_offset_length_mismatch(good):
    # Make sequence 1 claim length 3: offsets no longer follow from the lengths.
    _rewrite(good.with_suffix(".idx"), lambda d: d[:34 + 4] + struct.pack("<i", 3) + d[34 + 8:])
    _one_line_error(good, "sequence 2 has byte offset 10 but the lengths before it imply 12")


def test_bad_document_boundaries(good):
    n = 3
    start = 34 + 12 * n
    _rewrite(good.with_suffix(".idx"), lambda d: d[:start] + struct.pack("<q", 1) + d[start + 8:])
    _one_line_error(good, "document boundaries")


def test_missing_files(tmp_path, good):
    _one_line_error(tmp_path / "nope", r"index file .*nope\.idx' not found")
    os.unlink(good.with_suffix(".bin"))
    _one_line_error(good, r"data file .*d\.bin' not found")
