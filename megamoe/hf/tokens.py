"""Special tokens and tokenizer files across a conversion, both ways.

from-hf keeps, in the out_dir: the tokenizer files of the HF directory (TOKENIZER_FILES) and
io.HF_META = {"model_type", "token_ids": {bos/eos/pad_token_id from config.json, else
generation_config.json}, "generation_config": generation_config.json or null,
"tokenizer_files": [names]}. to-hf writes them back: the ids into config.json and
generation_config.json (--bos/eos/pad-token-id override; an eos found in a --tokenizer's
tokenizer.json fills a missing one), the tokenizer files copied (or --tokenizer's). A bare
tokenizer.json gets a tokenizer_config.json / special_tokens_map.json naming its special tokens,
so AutoTokenizer and generate() know where to stop.
"""

from __future__ import annotations

import os
import shutil

from megamoe.checkpoint.files import read_json, write_json, writing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_files(spec: str) -> dict[str, str]:
    """{file name in the output: source path} of a tokenizer.json file or tokenizer directory."""
    if os.path.isdir(spec):
        found = {f: os.path.join(spec, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(spec, f))}
        if not found:
            raise ValueError(f"tokenizer directory {spec!r} holds none of {', '.join(TOKENIZER_FILES)}")
        return found
    if os.path.isfile(spec):
        return {"tokenizer.json": spec}
    raise ValueError(f"tokenizer {spec!r} not found: give a tokenizer.json file or a directory")


def kept_files(meta: dict, meta_dir: str | None) -> dict[str, str]:
    """The tokenizer files from-hf kept next to HF_META."""
    if meta_dir is None:
        return {}
    return {f: os.path.join(meta_dir, f) for f in meta.get("tokenizer_files", [])
            if os.path.isfile(os.path.join(meta_dir, f))}


def hf_side(src: str, hf_config: dict) -> tuple[dict[str, str], dict]:
    """({name: path} of the tokenizer files to keep, HF_META contents) of an HF directory."""
    gen = read_json(os.path.join(src, "generation_config.json"))
    ids = {}
    for k in ID_KEYS:
        v = hf_config.get(k)
        ids[k] = v if v is not None else (gen or {}).get(k)
    found = {f: os.path.join(src, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))}
    meta = {"model_type": hf_config.get("model_type"), "token_ids": ids, "generation_config": gen,
            "tokenizer_files": sorted(found)}
    return found, meta


def _ids_in(v) -> list[int]:
    return [v] if isinstance(v, int) else list(v or [])


def special_ids(meta: dict, tok_files: dict[str, str], vocab_size: int, overrides: dict | None) -> dict:
    """bos/eos/pad ids for config.json: the kept ones, an EOS detected in tokenizer.json where
    none is kept, then the explicit overrides; each checked against the vocabulary."""
    ids = {k: None for k in ID_KEYS}
    ids.update({k: v for k, v in (meta.get("token_ids") or {}).items() if k in ids and v is not None})
    tok_json = tok_files.get("tokenizer.json")
    if tok_json is not None:
        from megamoe.data.tokenizer import HFTokenizer

        tk = HFTokenizer(tok_json)
        if tk.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tk.vocab_size} tokens but the model's vocabulary is "
                             f"{vocab_size}")
        if ids["eos_token_id"] is None and tk.eos_id is not None:
            ids["eos_token_id"] = tk.eos_id
    ids.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for k, v in ids.items():
        for i in _ids_in(v):
            if not 0 <= i < vocab_size:
                raise ValueError(f"{k} {i} is outside the vocabulary (size {vocab_size})")
    return ids


def generation_config(meta: dict, ids: dict, overrides: dict | None = None) -> dict:
    """The kept generation_config.json (its own ids win: e.g. several EOS ids), else one from
    the config's ids; explicit overrides apply to both."""
    gen = dict(meta.get("generation_config") or {"_from_model_config": True})
    for k, v in ids.items():
        if v is not None and (gen.get(k) is None or (overrides or {}).get(k) is not None):
            gen[k] = v
    return gen


def _token_strings(tok_json: str, ids: dict) -> dict[str, str]:
    """{"bos_token": content, ...} of the special ids, looked up in tokenizer.json."""
    data = read_json(tok_json) or {}
    content = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        content.update({i: s for s, i in vocab.items() if i not in content})
    out = {}
    for k, v in ids.items():
        first = _ids_in(v)[:1]
        if first and first[0] in content:
            out[k[:-len("_id")]] = content[first[0]]
    return out


def write_tokenizer(out_dir: str, tok_files: dict[str, str], ids: dict, seq_length: int) -> None:
    """Copy the tokenizer files; a bare tokenizer.json gets tokenizer_config.json and
    special_tokens_map.json naming its special tokens."""
    for name, path in tok_files.items():
        with writing(os.path.join(out_dir, name)):
            shutil.copyfile(path, os.path.join(out_dir, name))
    if "tokenizer.json" not in tok_files:
        return
    specials = _token_strings(tok_files["tokenizer.json"], ids)
    extra = {}
    if "tokenizer_config.json" not in tok_files:
        # Lets AutoTokenizer load a bare tokenizer.json without guessing a slow tokenizer class.
        extra["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                          "model_max_length": seq_length, **specials}
    if "special_tokens_map.json" not in tok_files and specials:
        extra["special_tokens_map.json"] = specials
    for name, data in extra.items():
        write_json(os.path.join(out_dir, name), data, indent=2)


__all__ = ["TOKENIZER_FILES", "tokenizer_files", "kept_files", "hf_side", "special_ids",
           "generation_config", "write_tokenizer"]
