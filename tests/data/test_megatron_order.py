"""data.sample_order: megatron == Megatron-Core's GPTDataset / BlendedDataset order.

The reference below is a NumPy port written from Megatron-LM's source, independent of megamoe's
code: megatron/core/datasets/gpt_dataset.py (_get_num_epochs, separate_final_epoch,
_build_document_index, _build_shuffle_index, _query_document_sample_shuffle_indices),
helpers.cpp (build_sample_idx, build_blending_indices) and blended_megatron_dataset_builder.py
(_get_size_per_split_per_dataset, normalize; surplus 0.005).
"""

import math

import numpy as np
import pytest

from datautil import random_docs, write_dataset
from megamoe import config as config_lib
from megamoe.config import DataConfig
from megamoe.data import build_datasets
from megamoe.data.gpt_dataset import GPTDataset
from megamoe.data.indexed import IndexedDataset

# ------------------------------------------------------------------ Megatron, in NumPy


def ref_sample_idx(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, extra=1):
    """helpers.cpp build_sample_idx (drop_last_partial_sequence=True), loop for loop."""
    num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    index, doc_i, offset = 1, 0, 0
    while index <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            doc_len = int(sizes[document_idx[doc_i]]) - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - extra
                remaining = 0
            else:
                if doc_i == len(document_idx) - 1:
                    offset = int(sizes[document_idx[doc_i]]) - extra
                    break
                doc_i += 1
                offset = 0
        out[index] = (doc_i, offset)
        index += 1
    return out


def ref_document_index(documents, num_epochs, rs, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.mgrid[0:num_epochs, 0:len(documents)][1]
        document_index[:] = documents
        document_index = document_index.reshape(-1).astype(np.int32)
        rs.shuffle(document_index)
        return document_index
    first = ref_document_index(documents, num_epochs - 1, rs, False)
    last = ref_document_index(documents, 1, rs, False)
    return np.concatenate((first, last))


def ref_shuffle_index(num_samples, total_size, rs):
    first = np.arange(0, num_samples, 1, dtype=np.uint32)
    rs.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, 1, dtype=np.uint32)
    rs.shuffle(last)
    return np.concatenate((first, last))


def ref_gpt_indices(sizes, documents, seq_length, num_samples, seed):
    """GPTDataset._build_document_sample_shuffle_indices -> (doc, sample, shuffle, separate)."""
    tokens_per_epoch = int(np.sum(sizes[documents]))
    num_epochs, num_tokens = 1, tokens_per_epoch
    while num_tokens < num_samples * seq_length + 1:
        num_epochs += 1
        num_tokens += tokens_per_epoch
    separate = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - sans_final < int(0.80 * per_epoch)
    rs = np.random.RandomState(seed)
    document_index = ref_document_index(documents, num_epochs, rs, separate)
    sample_index = ref_sample_idx(sizes, document_index, seq_length, num_epochs, tokens_per_epoch)
    total = sample_index.shape[0] - 1
    shuffle_index = ref_shuffle_index(sans_final if separate else total, total, rs)
    return document_index, sample_index, shuffle_index, separate


def ref_sample(indexed, document_index, sample_index, shuffle_index, idx):
    """_query_document_sample_shuffle_indices (add_extra_token_to_sequence)."""
    idx = shuffle_index[idx]
    (b, bo), (e, eo) = sample_index[idx], sample_index[idx + 1]
    if b == e:
        return indexed.get(int(document_index[b]), int(bo), int(eo - bo + 1)).tolist()
    parts = []
    for i in range(b, e + 1):
        offset = 0 if i > b else int(bo)
        length = None if i < e else int(eo) + 1
        parts += indexed.get(int(document_index[i]), offset, length).tolist()
    return parts


def ref_normalize(weights):
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def ref_blending(weights, size):
    """helpers.cpp build_blending_indices."""
    current = [0] * len(weights)
    dataset_index, dataset_sample_index = np.zeros(size, np.int16), np.zeros(size, np.int64)
    for i in range(size):
        s = max(float(i), 1.0)
        best, best_err = 0, weights[0] * s - current[0]
        for d in range(1, len(weights)):
            err = weights[d] * s - current[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i], dataset_sample_index[i] = best, current[best]
        current[best] += 1
    return dataset_index, dataset_sample_index


# ------------------------------------------------------------------------------- tests

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prefixes = []
    for k, (n, max_len) in enumerate([(40, 60), (25, 30), (60, 20)]):
        docs = random_docs(n, seed=k, max_len=max_len, vocab=1000)  # empty documents included
        write_dataset(root / f"d{k}", [1000 * (k + 1) + np.asarray(d) % 1000 for d in docs], np.int32)
        prefixes.append(str(root / f"d{k}"))
    return [IndexedDataset(p) for p in prefixes]


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 1])
@pytest.mark.parametrize("epochs_case", ["one", "separate_final", "joint_final"])
def test_gpt_indices_match_megatron(corpus, seed, epochs_case):
    indexed = corpus[0]
    documents = np.arange(3, 37, dtype=np.int32)
    sizes = indexed.sequence_lengths
    tokens = int(sizes[documents].sum())
    per_epoch = (tokens - 1) // SEQ
    num_samples = {"one": per_epoch - 3, "separate_final": 2 * per_epoch + 2,
                   "joint_final": (2 * tokens - 1) // SEQ}[epochs_case]
    doc_ref, sample_ref, shuffle_ref, separate = ref_gpt_indices(sizes, documents, SEQ, num_samples, seed)
    assert separate == (epochs_case == "separate_final")
    ds = GPTDataset(indexed, documents, SEQ, num_samples, seed, order="megatron")
    assert np.array_equal(ds.doc_idx, doc_ref)
    assert np.array_equal(ds.sample_idx, sample_ref)
    assert np.array_equal(ds.shuffle_idx, shuffle_ref)
    for i in range(num_samples):
        assert ds[i].tolist() == ref_sample(indexed, doc_ref, sample_ref, shuffle_ref, i)


def test_default_order_is_unchanged(corpus):
    indexed = corpus[0]
    documents = np.arange(40)
    a = GPTDataset(indexed, documents, SEQ, 200, 7)
    doc_ref = ref_gpt_indices(indexed.sequence_lengths, documents, SEQ, 200, 7)[0]
    assert a.order == "megamoe" and not np.array_equal(a.doc_idx, doc_ref)
    rng = np.random.RandomState(7)  # megamoe: one permutation per epoch
    assert np.array_equal(a.doc_idx[:40], rng.permutation(documents))


@pytest.mark.parametrize("weights, size, seed", [
    ([0.3, 0.7], 150, 5), ([1.0, 2.0, 3.0], 400, 0), ([0.5, 0.25, 0.25], 97, 42), ([5, 1, 0.1], 300, 3),
])
def test_blend_matches_megatron(corpus, tmp_path, weights, size, seed):
    corpus = corpus[:len(weights)]
    cfg = DataConfig(paths=[ds.prefix for ds in corpus], weights=weights, split="90,10,0",
                     cache_dir=str(tmp_path / "cache"), default_corpus=False, sample_order="megatron")
    train, _, _ = build_datasets(cfg, SEQ, size, 0, seed, log=lambda m: None)
    # Megatron: normalise, per-dataset target ceil(N w) and build size ceil(ceil(N w) * 1.005),
    # blend of sum(targets) samples with the twice-normalised weights.
    w = ref_normalize(weights)
    built = [int(math.ceil(math.ceil(size * x) * 1.005)) for x in w]
    blend_size = sum(int(math.ceil(size * x)) for x in w)
    dataset_index, dataset_sample_index = ref_blending(ref_normalize(w), blend_size)
    refs = []
    for indexed, n in zip(corpus, built):
        count = len(indexed)
        documents = np.arange(int(round(0.0 * count)), int(round(0.9 * count)), dtype=np.int32)
        refs.append(ref_gpt_indices(indexed.sequence_lengths, documents, SEQ, n, seed)[:3])
    assert np.array_equal(np.asarray(train.dataset_index), dataset_index[:size])
    for i in range(size):
        d, s = int(dataset_index[i]), int(dataset_sample_index[i])
        assert train[i].tolist() == ref_sample(corpus[d], *refs[d], s)


def test_megatron_blend_formula_cpp_and_numpy_agree():
    from megamoe.data import index_builders as ib

    w = ref_normalize(ref_normalize([0.2, 0.5, 0.3]))
    ref_di, ref_dsi = ref_blending(w, 5000)
    for fn in (ib.build_blending_indices, ib.build_blending_indices_numpy):
        di, dsi = fn(np.asarray(w), 5000, megatron=True)
        assert np.array_equal(di, ref_di) and np.array_equal(dsi, ref_dsi)
    # megamoe's default step, w * (i + 1), picks differently: the option is not a no-op.
    default_di, _ = ib.build_blending_indices(np.asarray(w), 5000)
    assert 0.3 < np.mean(default_di == ref_di) < 0.9


def test_sample_order_config_validation():
    cfg = config_lib.load(None, ["--data.sample_order", "megatron"], preset_name="tiny")
    assert cfg.data.sample_order == "megatron"
    with pytest.raises(ValueError, match="data.sample_order must be megamoe or megatron, got 'random'"):
        config_lib.load(None, ["--data.sample_order", "random"], preset_name="tiny")
