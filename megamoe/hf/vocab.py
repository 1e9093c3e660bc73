"""Vocabulary extension: append a new tokenizer's tokens to a model (tools/extend_vocab.py).

  python tools/extend_vocab.py SRC DST --new-tokenizer new/tokenizer.json [--old-tokenizer
      old/tokenizer.json] [--pad-to 64]

Tokenizer side (tokenizers' tokenizer.json, BPE models): every token of the new tokenizer that
the old one lacks is appended after the old ids, in the new tokenizer's id order; old ids never
change. New merges whose two parts and result all exist in the merged vocabulary are appended
after the old merges (BPE applies merges by rank, so the old merges keep their priority), which
makes the new tokens reachable. Special (added) tokens stay added tokens. Both tokenizers must
split text the same way (normalizer, pre-tokenizer, subword affixes), or their token strings would
not mean the same thing; otherwise this refuses.

Model side: embedding and lm_head grow to the merged size rounded up to --pad-to (never
shrinking). Rows of the old tokens, ids [0, old tokenizer size), are kept bit for bit. New rows
start (--init):
  mean           (default) as the mean of the old tokens' rows: every new token begins as an
                 "average" token rather than at random scale;
  subtoken-mean  as the mean of the rows of the old tokenizer's pieces of the new token: the
                 old BPE model's split of the token string (added / special tokens: the old
                 tokenizer's encoding of their text), the Chinese-LLaMA / Mixtral-extension
                 practice, so " quarks" starts near " qu" + "ark" + "s". A token the old
                 tokenizer cannot split into known pieces, and the padding rows, get the mean.
Rows are averaged in fp64 and stored in the checkpoint's dtype. With tied embeddings both are
one tensor.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch

from megamoe.config import ModelConfig, TrainConfig

# Tokenizer parts that decide what a token string means; they must agree to merge vocabularies.
_SPLITTING = ("normalizer", "pre_tokenizer")
_MODEL_AFFIXES = ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")


def load_tokenizer_json(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path!r} not found (give a tokenizer.json or its directory)")
    with open(path, encoding="utf-8") as f:
        try:
            tok = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON: {err}") from None
    if not isinstance(tok, dict) or "model" not in tok:
        raise ValueError(f"{path!r} is not a tokenizers tokenizer.json (no 'model')")
    return tok


def token_ids(tok: dict) -> dict[str, int]:
    """token string -> id over the model vocabulary and the added tokens."""
    model = tok["model"]
    vocab = model.get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    else:
        ids = dict(vocab)
    for added in tok.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
    return ids


def tokenizer_size(tok: dict) -> int:
    """Number of ids the tokenizer can produce (max id + 1)."""
    ids = token_ids(tok)
    return max(ids.values()) + 1 if ids else 0


def new_tokens(old: dict, new: dict) -> list[str]:
    """Tokens of `new` missing from `old`, in `new`'s id order."""
    old_ids = token_ids(old)
    return [t for t, _ in sorted(token_ids(new).items(), key=lambda kv: kv[1]) if t not in old_ids]


def _pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):          # older tokenizer.json: "a b"
        a, b = merge.split(" ", 1)
        return a, b
    return tuple(merge)


def merge_tokenizers(old: dict, new: dict) -> tuple[dict, list[tuple[str, int]]]:
    """(merged tokenizer.json dict, [(token, id)] appended). See the module docstring."""
    mo, mn = old["model"], new["model"]
    if mo.get("type") != "BPE" or mn.get("type") != "BPE":
        raise ValueError(f"vocabulary extension merges BPE tokenizers only (old: {mo.get('type')}, "
                         f"new: {mn.get('type')})")
    for part in _SPLITTING:
        if old.get(part) != new.get(part):
            raise ValueError(f"the tokenizers' {part}s differ, so their token strings are not "
                             "comparable; use a new tokenizer built with the same settings")
    for key in _MODEL_AFFIXES:
        if mo.get(key) != mn.get(key):
            raise ValueError(f"the tokenizers' BPE {key} differ ({mo.get(key)!r} vs {mn.get(key)!r})")
    merged = copy.deepcopy(old)
    vocab = merged["model"]["vocab"]
    merged.setdefault("added_tokens", [])
    next_id = tokenizer_size(old)
    new_special = {a["content"]: a for a in new.get("added_tokens") or []}
    added = []
    for token in new_tokens(old, new):
        if token in new_special:
            merged["added_tokens"].append(dict(new_special[token], id=next_id))
            if token in mn.get("vocab", {}):
                vocab[token] = next_id
        else:
            vocab[token] = next_id
        added.append((token, next_id))
        next_id += 1

    old_merges = [_pair(m) for m in mo.get("merges", [])]
    seen = set(old_merges)
    prefix = mo.get("continuing_subword_prefix") or ""
    string_form = bool(mo.get("merges")) and isinstance(mo["merges"][0], str)
    extra = []
    for a, b in (_pair(m) for m in mn.get("merges", [])):
        result = a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)
        if (a, b) not in seen and a in vocab and b in vocab and result in vocab:
            seen.add((a, b))
            extra.append((a, b))
    merged["model"]["merges"] = [f"{a} {b}" if string_form else [a, b] for a, b in old_merges + extra]
    _check_loads(merged)
    return merged, added


def _check_loads(tok: dict) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(json.dumps(tok))
    except Exception as err:  # the Rust side raises plain Exceptions
        raise ValueError(f"the merged tokenizer does not load: {str(err).splitlines()[0]}") from None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def subtoken_pieces(old: dict, merged: dict, added: list[tuple[str, int]]) -> dict[int, list[int]]:
    """{new id: the old tokenizer's ids of its pieces} for subtoken-mean initialisation; a
    token without a split into old ids is left out (it gets the mean row)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(old))
    special = {a["content"] for a in merged.get("added_tokens") or []}
    old_size = tokenizer_size(old)
    out = {}
    for token, new_id in added:
        if token in special:
            ids = tok.encode(token, add_special_tokens=False).ids
        else:   # the BPE model alone: the token string is already pre-tokenized and normalized
            ids = [t.id for t in tok.model.tokenize(token)]
        if ids and all(0 <= i < old_size for i in ids):
            out[new_id] = ids
    return out


def extend_embeddings(cfg: ModelConfig, state: dict, old_size: int, new_size: int,
                      pad_to: int = 1, pieces: dict[int, list[int]] | None = None) -> tuple[ModelConfig, dict]:
    """Grow embed / lm_head to round_up(max(new_size, vocab_size), pad_to) rows; rows [0, old_size)
    are kept exactly; row i >= old_size is the mean of the rows pieces[i] when given (subtoken-mean),
    else the mean of all old rows (computed in fp64)."""
    new_cfg = extended_config(cfg, old_size, new_size, pad_to)
    out = dict(state)
    out["embed.weight"] = grow_rows(state["embed.weight"], old_size, new_cfg.vocab_size, pieces)
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else \
        grow_rows(state["lm_head.weight"], old_size, new_cfg.vocab_size, pieces)
    return new_cfg, out


def extended_config(cfg: ModelConfig, old_size: int, new_size: int, pad_to: int) -> ModelConfig:
    """cfg with vocab_size round_up(max(new_size, vocab_size), pad_to) (never shrinking)."""
    if pad_to < 1:
        raise ValueError(f"--pad-to must be >= 1 (got {pad_to})")
    if old_size > cfg.vocab_size:
        raise ValueError(f"the old tokenizer has {old_size} ids but the model only {cfg.vocab_size} rows; "
                         "is it the model's tokenizer?")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.vocab_size = _round_up(max(new_size, cfg.vocab_size), pad_to)
    return new_cfg


def grow_rows(w: torch.Tensor, old_size: int, vocab: int, pieces: dict[int, list[int]] | None) -> torch.Tensor:
    """w[V, H] -> [vocab, H]: rows [0, old_size) kept, row i >= old_size the fp64 mean of the rows
    pieces[i] (subtoken-mean) or of all old rows."""
    out = torch.empty(vocab, w.shape[1], dtype=w.dtype)
    out[:old_size] = w[:old_size]
    out[old_size:] = w[:old_size].double().mean(0).to(w.dtype)
    for i, ids in (pieces or {}).items():
        if old_size <= i < vocab:
            out[i] = w[ids].double().mean(0).to(w.dtype)
    return out


INITS = ("mean", "subtoken-mean")


def extend_vocab(src: str, dst: str, new_tokenizer: str, old_tokenizer: str | None = None,
                 pad_to: int = 1, overwrite: bool = False, init: str = "mean") -> list[str]:
    """Extend the model at `src` (megamoe checkpoint / out_dir, or HF dir) with the tokens of
    `new_tokenizer`; write a megamoe out_dir with the merged tokenizer.json to `dst`."""
    from megamoe.hf.convert import by_layer, open_model_state
    from megamoe.hf.io import megamoe_writer, stored_names

    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)} (got {init!r})")
    if old_tokenizer is None:
        old_tokenizer = os.path.join(src, "tokenizer.json")
        if not os.path.isfile(old_tokenizer):
            raise ValueError(f"{src!r} has no tokenizer.json; pass --old-tokenizer")
    old, new = load_tokenizer_json(old_tokenizer), load_tokenizer_json(new_tokenizer)
    merged, added = merge_tokenizers(old, new)
    old_size = tokenizer_size(old)
    pieces = subtoken_pieces(old, merged, added) if init == "subtoken-mean" else None
    # Streamed: one layer of the source in memory at a time, the output written as it goes.
    st = open_model_state(src)
    cfg, what = st.cfg, st.what
    new_cfg = extended_config(cfg, old_size, tokenizer_size(merged), pad_to)
    base = TrainConfig()
    base.data.tokenizer = os.path.join(os.path.abspath(dst), "tokenizer.json")
    with megamoe_writer(dst, new_cfg, overwrite, base,
                        extra_text={"tokenizer.json": json.dumps(merged, ensure_ascii=False, indent=2)}) as out:
        for group in by_layer(stored_names(cfg, st.names)):
            for name in group:
                t = st[name]
                if name in ("embed.weight", "lm_head.weight"):
                    t = grow_rows(t, old_size, new_cfg.vocab_size, pieces)
                out.add(name, t)
            st.release()
    span = f" (ids {added[0][1]}..{added[-1][1]})" if added else ""
    return [f"wrote {dst} from a {what}: {len(added)} new tokens{span}; vocabulary "
            f"{cfg.vocab_size} -> {new_cfg.vocab_size} (pad to {pad_to}); new rows: {init}"
            + (f" ({len(pieces)} of {len(added)} tokens from their pieces)" if pieces is not None else "")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extend_vocab", description="append a new tokenizer's tokens "
                                "to a model: new embedding / lm_head rows start at a mean of old ones")
    p.add_argument("src", help="megamoe checkpoint / out_dir, or an HF model directory")
    p.add_argument("dst", help="output megamoe out_dir (with the merged tokenizer.json)")
    p.add_argument("--new-tokenizer", required=True, help="tokenizer.json (or dir) with the new tokens")
    p.add_argument("--old-tokenizer", help="the model's tokenizer.json (default: SRC/tokenizer.json)")
    p.add_argument("--pad-to", type=int, default=1, help="round the vocabulary up to a multiple (e.g. 64)")
    p.add_argument("--init", choices=INITS, default="mean", help="new rows: the mean of all old rows "
                   "(mean), or of the rows of the token's pieces in the old tokenizer (subtoken-mean)")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        notes = extend_vocab(args.src, args.dst, args.new_tokenizer, args.old_tokenizer, args.pad_to,
                             args.overwrite, args.init)
    except OSError as err:
        raise ValueError(f"{err.strerror or err}: {err.filename}") from None
    for line in notes:
        print(f"extend_vocab: {line}")
    return 0
