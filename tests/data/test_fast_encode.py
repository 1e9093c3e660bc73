"""The piece-cached batch encoder gives exactly the tokenizer's own ids."""

import json
import random

import numpy as np
import pytest

from megamoe.data.fast_encode import (PieceCachedEncoder, WholeTextEncoder, make_batch_encoder,
                                      piece_cache_eligible)
from megamoe.data.tokenizer import load_tokenizer

# Characters chosen to stress the cut rule: every kind of whitespace (ASCII, Unicode, the
# U+001C..U+001F that only Python calls whitespace), contractions, digits, punctuation,
# multi-byte and combining characters, and the tokenizer's special token.
ALPHABET = (list("abcXYZ 0123456789.,!?'\"-()") +
            [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x85", "\x1c", "\x1f",
             "'s", "'re", "'ll", " 's", "東京", "é", "e\u0301", "😀", "ß", "<|endoftext|>", "<|endof", "text|>"])


def adversarial_texts(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def reference(tok, texts):
    ids = tok.encode_batch(texts)
    return [x for one in ids for x in one], [len(one) for one in ids]


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_path):
    return load_tokenizer(bpe_tokenizer_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_piece_cache_is_exact_on_adversarial_text(tok, seed):
    enc = make_batch_encoder(tok, np.uint16)
    assert isinstance(enc, PieceCachedEncoder)
    for batch in range(4):  # later batches hit the cache filled by earlier ones
        texts = adversarial_texts(300, seed * 10 + batch)
        tokens, lengths = enc(texts)
        want_tokens, want_lengths = reference(tok, texts)
        assert lengths.tolist() == want_lengths and tokens.tolist() == want_tokens
        assert tokens.dtype == np.uint16
    assert 0 < enc.misses < enc.calls  # pieces were reused


def test_cache_restart_and_whole_text_fallbacks(tok):
    enc = PieceCachedEncoder(tok, np.int32, max_pieces=50)  # restarts every batch or so
    texts = adversarial_texts(200, 7) + ["a<|endoftext|>b c", "x\x1cy z", "", "   "]
    for _ in range(3):
        tokens, lengths = enc(texts)
        assert (tokens.tolist(), lengths.tolist()) == reference(tok, texts)


def test_eligibility(tok, tmp_path):
    config = json.loads(tok.to_json())
    assert piece_cache_eligible(config)
    for change in ({"normalizer": {"type": "NFKC"}},
                   {"pre_tokenizer": {**config["pre_tokenizer"], "add_prefix_space": True}},
                   {"pre_tokenizer": {**config["pre_tokenizer"], "use_regex": False}},
                   {"pre_tokenizer": {"type": "Whitespace"}},
                   {"model": {**config["model"], "dropout": 0.1}}):
        assert not piece_cache_eligible({**config, **change})
    assert isinstance(make_batch_encoder(load_tokenizer("byte"), np.uint16), WholeTextEncoder)
    assert isinstance(make_batch_encoder(tok, np.uint16, piece_cache=False), WholeTextEncoder)
    # A tokenizer with a normalizer is encoded whole, and still exactly.
    (tmp_path / "t.json").write_text(json.dumps({**config, "normalizer": {"type": "Lowercase"}}))
    other = load_tokenizer(str(tmp_path / "t.json"))
    enc = make_batch_encoder(other, np.uint16)
    texts = adversarial_texts(50, 3)
    assert isinstance(enc, WholeTextEncoder)
    assert [t.tolist() for t in enc(texts)] == list(reference(other, texts))
