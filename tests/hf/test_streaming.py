"""Conversion at scale: dtypes kept (bf16 round trips byte for byte), the model-only sharded
output, split-upcycled exports, special tokens both ways, one-line errors, layer-count checks."""

import json
import os

import pytest
import torch

from hfutil import dense_llama, hf_config, load_hf, max_diff, perturb, save_megamoe, tokens
from megamoe.checkpoint import files
from megamoe.checkpoint.sources import open_source
from megamoe.checkpoint.sources import WeightsSource
from megamoe.cli import main as cli_main
from megamoe.hf.convert import hf_to_megamoe, megamoe_to_hf
from megamoe.hf.io import load_megamoe_state
from megamoe.hf.upcycle import upcycle
from megamoe.model.transformer import build_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from safetensors import safe_open  # noqa: E402  (installed with transformers)


def _hf_dir(model_type, path, dtype=torch.float32, seed=0, **save):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type), dtype=dtype,
                                                          attn_implementation="eager")
    perturb(model, seed + 1, router_bias=True)
    model.save_pretrained(str(path), **save)
    return model.eval()


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


ALL_HF_TYPES = ["llama", "olmo2", "olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "deepseek_v2",
                "deepseek_v3"]


@pytest.mark.parametrize("model_type", ALL_HF_TYPES)
def test_bf16_round_trip_is_byte_identical(model_type, tmp_path):
    """bf16 stays bf16 and the fp32 router (gate.weight, e_score_correction_bias) stays fp32."""
    _hf_dir(model_type, tmp_path / "hf", dtype=torch.bfloat16)
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    source = open_source(os.path.join(tmp_path, "mm", "checkpoints", "step_00000000"))
    assert isinstance(source, WeightsSource)
    assert source.names["embed.weight"]["dtype"] == "bfloat16"
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "back"))
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(before) == set(after)
    for k, t in before.items():
        assert t.dtype == after[k].dtype, k
        assert torch.equal(t.view(torch.uint8), after[k].view(torch.uint8)), k
    if model_type in ("glm4_moe", "deepseek_v2", "deepseek_v3"):
        assert before["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    with open(tmp_path / "back" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == model_type


def test_fp32_export_with_bf16_keeps_router_fp32(tmp_path):
    from hfutil import megamoe_model

    cfg, model = megamoe_model("glm4_moe")
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    megamoe_to_hf(ckpt, str(tmp_path / "hf"), dtype="bf16")
    t = _tensors(tmp_path / "hf")
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert torch.equal(t["model.layers.1.mlp.gate.weight"], model.state_dict()["layers.1.ffn.router.weight"])
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_from_hf_writes_sharded_weights_with_marker(tmp_path):
    hf = _hf_dir("mixtral", tmp_path / "hf", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"), max_shard_size="30KB")
    step = tmp_path / "mm" / "checkpoints" / "step_00000000"
    names = sorted(os.listdir(step))
    shards = [f for f in names if f.endswith(".safetensors")]
    assert len(shards) > 2 and {"COMPLETE", "metadata.json", "trainer.pt", "config.yaml"} <= set(names)
    assert "model.pt" not in names and "optimizer.pt" not in names
    marker = files.read_marker(str(step))
    assert set(marker["files"]) == set(names) - {"COMPLETE"}
    _, state = load_megamoe_state(str(tmp_path / "mm"))
    cfg, _ = load_megamoe_state(str(tmp_path / "mm"))
    model = build_model(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        assert max_diff(model.eval()(tokens()), hf(tokens()).logits) < 1e-4


@pytest.mark.parametrize("top_k, qk_norm", [(2, False), (4, False), (2, True)])
def test_split_upcycled_model_exports_with_same_logits(top_k, qk_norm, tmp_path):
    """softmax top-k without renormalisation and routed_scaling_factor E: exported as qwen2_moe
    (a zero shared expert) or olmoe (QK-norm), the factor folded into down_proj."""
    cfg, dense = dense_llama()
    cfg.qk_norm = qk_norm
    dense = build_model(cfg, seed=0)
    perturb(dense, 1, router_bias=False)
    new_cfg, state, _ = upcycle(cfg, dense.state_dict(), num_experts=4, top_k=top_k, mode="split",
                                router_std=0.5, seed=2)
    assert new_cfg.moe.routed_scaling_factor == 4.0 and new_cfg.moe.router_mode == "softmax_topk"
    moe = build_model(new_cfg)
    moe.load_state_dict(state)
    ckpt = save_megamoe(tmp_path / "run", new_cfg, moe.eval())
    notes = megamoe_to_hf(ckpt, str(tmp_path / "hf"))
    assert any("folded routed_scaling_factor 4" in n for n in notes)
    hf = load_hf(tmp_path / "hf")
    assert hf.config.model_type == ("olmoe" if qk_norm else "qwen2_moe")
    assert hf.config.norm_topk_prob is False
    x = tokens()
    with torch.no_grad():
        assert max_diff(moe(x), hf(x).logits) < 1e-4


def _train_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<s>", "</s>", "<pad>"])
    tk.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    tk.save(str(path))
    return tk


def test_special_tokens_and_tokenizer_survive_both_ways(tmp_path):
    _hf_dir("llama", tmp_path / "src")
    tk = _train_tokenizer(tmp_path / "src" / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "src" / "tokenizer.json"),
                                                bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(tmp_path / "src"))
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    with open(tmp_path / "src" / "config.json") as f:
        cfg = json.load(f)
    cfg.update(ids)
    with open(tmp_path / "src" / "config.json", "w") as f:
        json.dump(cfg, f)
    gen = {"bos_token_id": 0, "eos_token_id": [1, 2], "max_new_tokens": 7}
    with open(tmp_path / "src" / "generation_config.json", "w") as f:
        json.dump(gen, f)

    hf_to_megamoe(str(tmp_path / "src"), str(tmp_path / "mm"))
    assert os.path.isfile(tmp_path / "mm" / "tokenizer_config.json")
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "back"))
    with open(tmp_path / "back" / "config.json") as f:
        back = json.load(f)
    assert {k: back[k] for k in ids} == ids
    with open(tmp_path / "back" / "generation_config.json") as f:
        back_gen = json.load(f)
    assert back_gen["eos_token_id"] == [1, 2] and back_gen["max_new_tokens"] == 7
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(tmp_path / "src" / name):
            assert (tmp_path / "src" / name).read_bytes() == (tmp_path / "back" / name).read_bytes()
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert (again.eos_token, again.eos_token_id, again.pad_token_id) == ("</s>", 1, 2)
    assert again("the cat")["input_ids"] == tk.encode("the cat").ids

    # A bare tokenizer.json given to to-hf: tokenizer_config.json names its special tokens.
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "bare"), tokenizer=str(tmp_path / "src" / "tokenizer.json"))
    with open(tmp_path / "bare" / "tokenizer_config.json") as f:
        tc = json.load(f)
    assert (tc["eos_token"], tc["bos_token"], tc["pad_token"]) == ("</s>", "<s>", "<pad>")
    bare = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bare"))
    assert bare.eos_token_id == 1


def _one_line_error(argv, capsys):
    capsys.readouterr()                 # drop what building the inputs printed
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_hf_weights_are_one_line(fmt, tmp_path, capsys):
    _hf_dir("olmoe", tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf" / "model.safetensors"
    if fmt == "bin":
        torch.save(dict(_tensors(tmp_path / "hf")), tmp_path / "hf" / "pytorch_model.bin")
        path.unlink()
        path = tmp_path / "hf" / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _one_line_error(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")], capsys)
    assert str(path) in err and "truncated" in err
    assert not os.path.exists(tmp_path / "out") and sorted(os.listdir(tmp_path)) == ["hf"]


def test_truncated_model_pt_is_one_line(tmp_path, capsys):
    cfg, model = dense_llama()
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    os.remove(os.path.join(ckpt, "COMPLETE"))       # no size list: the reader must notice itself
    path = os.path.join(ckpt, "model.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    err = _one_line_error(["convert", "to-hf", ckpt, str(tmp_path / "hf")], capsys)
    assert "model.pt" in err
    assert not os.path.exists(tmp_path / "hf")


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    cfg, model = dense_llama()
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    _hf_dir("llama", tmp_path / "hf")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:           # safetensors shards
        m.setattr("megamoe.checkpoint.stfiles._raw", full)
        err = _one_line_error(["convert", "to-hf", ckpt, str(tmp_path / "out")], capsys)
        assert "No space left on device" in err and "safetensors" in err
        err = _one_line_error(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")], capsys)
        assert "cannot write" in err and "safetensors" in err

    def torch_full(*args, **kwargs):           # what torch.save raises on ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", torch_full)
        err = _one_line_error(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")], capsys)
        assert "cannot write" in err and "trainer.pt" in err
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]


def test_write_errors_name_the_file():
    from safetensors import SafetensorError

    for exc in (SafetensorError("Error while serializing: IoError(No space left on device)"),
                RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                OSError(122, "Disk quota exceeded")):
        with pytest.raises(files.WriteError, match="cannot write /x/y.bin: "):
            with files.writing("/x/y.bin"):
                raise exc
    with pytest.raises(KeyError):              # not a write error: untouched
        with files.writing("/x/y.bin"):
            raise KeyError("k")


def test_more_layers_than_declared(tmp_path):
    _hf_dir("llama", tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"holds layers \[2\] but config.json declares num_hidden_layers 2"):
        hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    assert not os.path.exists(tmp_path / "mm")

    _hf_dir("deepseek_v3", tmp_path / "ds")     # a known MTP layer: dropped with a note
    with open(tmp_path / "ds" / "config.json") as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    with open(tmp_path / "ds" / "config.json", "w") as f:
        json.dump(cfg, f)
    notes = hf_to_megamoe(str(tmp_path / "ds"), str(tmp_path / "mm"))
    assert any("multi-token-prediction" in n for n in notes)


def test_from_hf_reads_each_input_byte_once_and_holds_one_shard(tmp_path, monkeypatch):
    """Streaming: every input tensor is read exactly once (no whole-file loads, no mmap), and
    the writer never holds more than one output shard."""
    from megamoe.checkpoint import stfiles

    _hf_dir("mixtral", tmp_path / "hf", max_shard_size="20KB")
    reads, pending = [], []
    plain_read, plain_add = stfiles.SafetensorsFile.read, stfiles.ShardWriter.add

    def read(self, name, rows=None):
        t = plain_read(self, name, rows)
        reads.append((self.path, name, t.numel() * t.element_size()))
        return t

    def add(self, name, t):
        plain_add(self, name, t)
        pending.append(self._size)

    monkeypatch.setattr(stfiles.SafetensorsFile, "read", read)
    monkeypatch.setattr(stfiles.ShardWriter, "add", add)
    inputs = _tensors(tmp_path / "hf")
    reads.clear()
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"), max_shard_size="30KB")
    names = [(p, n) for p, n, _ in reads if str(tmp_path / "hf") in p]
    assert sorted(n for _, n in names) == sorted(inputs)               # each one, once
    assert sum(b for p, _, b in reads if str(tmp_path / "hf") in p) == \
        sum(t.numel() * t.element_size() for t in inputs.values())
    largest = max(t.numel() * t.element_size() for t in inputs.values()) * 4   # one stacked expert tensor
    assert max(pending) <= 30_000 + largest
