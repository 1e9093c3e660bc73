"""Vocabulary extension: merged tokenizer keeps old ids, new rows start at the mean of old rows."""

import importlib.util
import json
import os

import pytest
import torch

from hfutil import max_diff, save_megamoe
from megamoe.config import ModelConfig, MoEConfig
from megamoe.hf.io import load_megamoe_state
from megamoe.hf.vocab import (extend_embeddings, merge_tokenizers, new_tokens, token_ids,
                              tokenizer_size)
from megamoe.model.transformer import build_model

tokenizers = pytest.importorskip("tokenizers")

OLD_TEXT = ["the cat sat on the mat", "a dog and a cat", "the mat is flat"] * 20
NEW_TEXT = ["quantum chromodynamics describes quarks", "gluons bind quarks", "quantum fields"] * 20


def _bpe(texts, vocab_size, path, pre_tokenizer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def tok_pair(tmp_path):
    old = _bpe(OLD_TEXT, 290, tmp_path / "old.json")
    new = _bpe(NEW_TEXT + ["<|pad|>"], 310, tmp_path / "new.json")
    return tmp_path / "old.json", tmp_path / "new.json", old, new


def test_merged_tokenizer_keeps_old_ids_and_reaches_new_tokens(tok_pair):
    from tokenizers import Tokenizer

    _, _, old, new = tok_pair
    merged, added = merge_tokenizers(old, new)
    old_ids, merged_ids = token_ids(old), token_ids(merged)
    assert all(merged_ids[t] == i for t, i in old_ids.items())
    assert [t for t, _ in added] == new_tokens(old, new) and added
    assert [i for _, i in added] == list(range(tokenizer_size(old), tokenizer_size(merged)))

    tok_new, tok_merged = Tokenizer.from_str(json.dumps(new)), Tokenizer.from_str(json.dumps(merged))
    tok_old = Tokenizer.from_str(json.dumps(old))
    word = "Ġquarks"  # byte-level form of " quarks": a single token only in the new vocabulary
    assert word in token_ids(new) and word not in old_ids
    ids = tok_merged.encode(" quarks").ids
    assert ids == [merged_ids[word]] and len(tok_old.encode(" quarks").ids) > 1
    assert tok_merged.decode(tok_merged.encode("the cat ate quarks").ids) == "the cat ate quarks"
    assert tok_new.encode(" quarks").tokens == [word]


def test_incompatible_tokenizers_are_refused(tmp_path):
    from tokenizers import pre_tokenizers

    old = _bpe(OLD_TEXT, 290, tmp_path / "old.json")
    other = _bpe(NEW_TEXT, 310, tmp_path / "new.json", pre_tokenizer=pre_tokenizers.Whitespace())
    with pytest.raises(ValueError, match="pre_tokenizers differ"):
        merge_tokenizers(old, other)
    wordpiece = dict(other, model={"type": "WordPiece", "vocab": {}})
    with pytest.raises(ValueError, match="BPE tokenizers only"):
        merge_tokenizers(old, wordpiece)


@pytest.mark.parametrize("tied", [False, True])
def test_extended_embeddings(tied):
    cfg = ModelConfig(vocab_size=300, d_model=16, num_layers=1, num_heads=2, ffn_hidden=32,
                      seq_length=8, tie_embeddings=tied, init_std=0.1,
                      moe=MoEConfig(num_experts=2, top_k=1, expert_hidden=8))
    model = build_model(cfg, seed=0).eval()
    state = model.state_dict()
    new_cfg, new_state = extend_embeddings(cfg, state, old_size=290, new_size=330, pad_to=64)
    assert new_cfg.vocab_size == 384
    for name in ("embed.weight", "lm_head.weight"):
        old, new = state[name], new_state[name]
        assert new.shape == (384, 16)
        assert torch.equal(new[:290], old[:290])
        mean = old[:290].double().mean(0).float()
        assert torch.equal(new[290:], mean.expand(94, -1))
    if tied:
        assert new_state["embed.weight"] is new_state["lm_head.weight"]

    extended = build_model(new_cfg)
    extended.load_state_dict(new_state)
    x = torch.randint(0, 290, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(extended.eval()(x)[..., :290], model(x)[..., :290]) < 1e-6
    # Never shrinks; pad_to 1 keeps the size.
    assert extend_embeddings(cfg, state, 290, 295)[0].vocab_size == 300
    with pytest.raises(ValueError, match="only 300 rows"):
        extend_embeddings(cfg, state, 301, 400)


def _tool():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "extend_vocab.py")
    spec = importlib.util.spec_from_file_location("extend_vocab_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extend_vocab_tool(tok_pair, tmp_path, capsys):
    old_path, new_path, old, _ = tok_pair
    cfg = ModelConfig(vocab_size=300, d_model=16, num_layers=1, num_heads=2, ffn_hidden=32,
                      seq_length=8, moe=None)
    model = build_model(cfg, seed=0)
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    tool = _tool()
    assert tool.run([ckpt, str(tmp_path / "ext"), "--old-tokenizer", str(old_path),
                     "--new-tokenizer", str(new_path), "--pad-to", "64"]) == 0
    assert "new tokens" in capsys.readouterr().out
    new_cfg, state = load_megamoe_state(str(tmp_path / "ext"))
    merged = json.loads((tmp_path / "ext" / "tokenizer.json").read_text())
    assert new_cfg.vocab_size % 64 == 0 and new_cfg.vocab_size >= tokenizer_size(merged)
    assert torch.equal(state["embed.weight"][:tokenizer_size(old)],
                       model.state_dict()["embed.weight"][:tokenizer_size(old)])

    assert tool.run([ckpt, str(tmp_path / "ext2"), "--new-tokenizer", str(new_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("extend_vocab: error:") and "--old-tokenizer" in err and "\n" not in err


@pytest.mark.parametrize("tied", [False, True])
def test_subtoken_mean_rows_are_the_mean_of_the_old_pieces(tok_pair, tmp_path, tied):
    """--init subtoken-mean: a new token's row is the mean of the rows of the old tokenizer's
    encoding of its text (checked through the full old tokenizer, not the code's own split);
    old rows are exact and padding rows are the mean of the old rows."""
    from tokenizers import Tokenizer

    old_path, new_path, old, _ = tok_pair
    cfg = ModelConfig(vocab_size=300, d_model=16, num_layers=1, num_heads=2, ffn_hidden=32,
                      seq_length=8, tie_embeddings=tied, init_std=0.1, moe=None)
    model = build_model(cfg, seed=0)
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    tool = _tool()
    assert tool.run([ckpt, str(tmp_path / "ext"), "--old-tokenizer", str(old_path), "--new-tokenizer",
                     str(new_path), "--pad-to", "64", "--init", "subtoken-mean"]) == 0
    new_cfg, state = load_megamoe_state(str(tmp_path / "ext"))
    merged = json.loads((tmp_path / "ext" / "tokenizer.json").read_text())
    tok_old, tok_merged = Tokenizer.from_str(json.dumps(old)), Tokenizer.from_str(json.dumps(merged))
    n_old, n_merged = tokenizer_size(old), tokenizer_size(merged)
    before = model.state_dict()
    checked = 0
    for name in ("embed.weight", "lm_head.weight"):
        w_old, w_new = before[name], state[name]
        assert torch.equal(w_new[:n_old], w_old[:n_old])
        mean = w_old[:n_old].double().mean(0).float()
        assert torch.equal(w_new[n_merged:], mean.expand(new_cfg.vocab_size - n_merged, -1))
        for text in (" quarks", " fields", " bind", " chromodynamics"):
            (new_id,) = tok_merged.encode(text).ids          # one new token in the merged vocab
            assert new_id >= n_old
            pieces = tok_old.encode(text).ids
            assert len(pieces) > 1
            expected = w_old[pieces].double().mean(0).float()
            assert torch.equal(w_new[new_id], expected), (name, text)
            assert not torch.equal(w_new[new_id], mean)
            checked += 1
    assert checked == 8
    if tied:
        assert torch.equal(state["embed.weight"], state["lm_head.weight"])
    # the default stays the plain mean
    assert tool.run([ckpt, str(tmp_path / "ext_mean"), "--old-tokenizer", str(old_path),
                     "--new-tokenizer", str(new_path)]) == 0
    _, plain = load_megamoe_state(str(tmp_path / "ext_mean"))
    mean = before["embed.weight"][:n_old].double().mean(0).float()
    assert torch.equal(plain["embed.weight"][n_old:], mean.expand(plain["embed.weight"].shape[0] - n_old, -1))


def test_extend_vocab_streams_from_a_hugging_face_directory(tok_pair, tmp_path):
    """An HF llama directory as the source: every tensor but the grown embeddings is copied
    unchanged, in the source dtype (bf16 here), and the result loads as a megamoe model."""
    import transformers

    from hfutil import hf_config
    from megamoe.hf.convert import read_hf
    from megamoe.hf.vocab import extend_vocab

    old_path, new_path, old, _ = tok_pair
    config = hf_config("llama")
    config.vocab_size = 300
    hf = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "hf"))
    _, cfg, state, _ = read_hf(str(tmp_path / "hf"))
    extend_vocab(str(tmp_path / "hf"), str(tmp_path / "ext"), str(new_path), str(old_path), pad_to=64,
                 init="subtoken-mean")
    new_cfg, ext = load_megamoe_state(str(tmp_path / "ext"))
    n_old = tokenizer_size(old)
    assert new_cfg.vocab_size == 384 and set(ext) == set(state)
    for name, t in state.items():
        assert ext[name].dtype == torch.bfloat16, name
        if name in ("embed.weight", "lm_head.weight"):
            assert torch.equal(ext[name][:n_old], t[:n_old])
        else:
            assert torch.equal(ext[name], t), name
    model = build_model(new_cfg)
    model.load_state_dict({k: v.float() for k, v in ext.items()})
