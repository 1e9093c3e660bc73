"""Tokenizers for preprocessing and decoding: byte-level, or a Hugging Face tokenizer.json.

``load_tokenizer(spec)``:
  "byte"                      ids 0..255 are the UTF-8 bytes, eos = 256, vocab 257
  path to tokenizer.json      loaded offline with the `tokenizers` package
  directory                   the tokenizer.json inside it

Every tokenizer exposes vocab_size, eos_id (None if it has no end-of-text token),
encode(text) -> list[int], encode_batch(texts) -> list[list[int]] and decode(ids) -> str.
Encoding never adds special tokens: documents get an EOS only when asked (``--append-eod``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

# End-of-text tokens we recognise in tokenizer.json files, most common first.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]", "<|eot_id|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus an end-of-text id 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a tokenizer.json file."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises plain Exceptions with long texts
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"cannot load tokenizer {path!r}: {first}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = None
        for tok in EOS_CANDIDATES:
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                self.eos_id = tid
                break

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: same ids, less work.
        fast = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """[(ids, character offsets)] per text."""
        return [(e.ids, e.offsets) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def to_json(self) -> str:
        """The tokenizer.json text (its normalizer, pre-tokenizer, model and added tokens)."""
        return self._tok.to_str()

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def resolve_tokenizer_path(spec: str) -> str:
    """A tokenizer.json path from a file or directory spec, or a one-line ValueError."""
    if os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer directory {spec!r} has no tokenizer.json")
        return path
    if not os.path.isfile(spec):
        raise ValueError(f"tokenizer {spec!r} not found: give 'byte', a tokenizer.json file "
                         "or a directory containing one")
    return spec


def load_tokenizer(spec: str):
    """"byte" -> ByteTokenizer; a tokenizer.json file or directory -> HFTokenizer."""
    if not spec:
        raise ValueError("no tokenizer given: use 'byte', a tokenizer.json file or a directory containing one")
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(resolve_tokenizer_path(spec))


@dataclass
class TokenizerInfo:
    """What the trainer needs to know about the tokenizer of its data (eos_id may be None)."""

    vocab_size: int
    eos_id: int | None
    decode: Callable[[list[int]], str] | None = None
    name: str = ""


def tokenizer_info(spec: str) -> TokenizerInfo:
    """TokenizerInfo for a tokenizer spec ("byte", a tokenizer.json file or directory)."""
    tok = load_tokenizer(spec)
    return TokenizerInfo(vocab_size=tok.vocab_size, eos_id=tok.eos_id, decode=tok.decode, name=tok.name)
