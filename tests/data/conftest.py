"""Shared fixtures for the data pipeline tests."""

import pytest

from datautil import random_texts


@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json (vocab 300) trained on the test texts."""
    from megamoe.data.corpus import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer(random_texts(200, seed=1), 300).save(str(path))
    return str(path)
