"""megamoe <-> Hugging Face: the converted models compute the same logits in transformers 5.x.

Every model is tiny and built locally from a config (nothing is downloaded); fp32, eager attention.
"""

import json
import os

import pytest
import torch

from hfutil import (MEGAMOE_CONFIGS, hf_config, load_hf, max_diff, megamoe_from, megamoe_model, perturb,
                    save_megamoe, tokens)
from megamoe.config import load as load_train_config
from megamoe.hf.convert import hf_to_megamoe, megamoe_to_hf
from megamoe.model.transformer import build_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TYPES = list(MEGAMOE_CONFIGS)
MOE_TYPES = [t for t in TYPES if MEGAMOE_CONFIGS[t]().moe is not None]
TOL = 1e-4


@pytest.mark.parametrize("model_type", TYPES)
def test_megamoe_to_hf_same_logits_and_round_trip(model_type, tmp_path):
    cfg, model = megamoe_model(model_type)
    save_megamoe(tmp_path / "run", cfg, model)
    megamoe_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), model_type=model_type)  # out_dir -> latest

    hf = load_hf(tmp_path / "hf")
    assert hf.config.model_type == model_type
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        assert max_diff(ref, hf(x).logits) < TOL

    # ... and back: bit-exact weights, and a config that computes exactly the same function.
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "back"))
    _, back = megamoe_from(tmp_path / "back")
    original, returned = model.state_dict(), back.state_dict()
    assert set(original) == set(returned)
    for name, t in original.items():
        assert torch.equal(t, returned[name]), name
    with torch.no_grad():
        assert torch.equal(back(x), ref)


def _random_hf(model_type, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type), attn_implementation="eager")
    perturb(model, seed + 1, router_bias=True)
    return model.eval()


@pytest.mark.parametrize("model_type", TYPES)
def test_hf_to_megamoe_same_logits(model_type, tmp_path):
    hf = _random_hf(model_type)
    hf.save_pretrained(str(tmp_path / "hf"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if model_type in MOE_TYPES:  # save_pretrained writes one tensor per expert
        assert any(".experts.0." in k for k in keys) and not any("gate_up_proj" in k for k in keys)

    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    _, model = megamoe_from(tmp_path / "mm")
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_hf_fused_expert_layout_on_disk(model_type, tmp_path):
    """transformers 5.x keeps experts fused in memory (gate_up_proj [E, 2I, H], down_proj
    [E, H, I]); a state dict dumped as is must convert too."""
    from safetensors.torch import save_file

    hf = _random_hf(model_type, seed=7)
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    d = tmp_path / "fused"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf.config.to_json_file(str(d / "config.json"))

    hf_to_megamoe(str(d), str(tmp_path / "mm"))
    _, model = megamoe_from(tmp_path / "mm")
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL


def test_sharded_output_loads_and_converts_back(tmp_path):
    cfg, model = megamoe_model("olmoe")
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    megamoe_to_hf(ckpt, str(tmp_path / "hf"), max_shard_size="30KB")
    files = os.listdir(tmp_path / "hf")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and len(shards) > 2
    with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)

    hf = load_hf(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "back"))
    _, back = megamoe_from(tmp_path / "back")
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name


def test_bf16_export_loads(tmp_path):
    cfg, model = megamoe_model("mixtral")
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    megamoe_to_hf(ckpt, str(tmp_path / "hf"), dtype="bf16")
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    hf = load_hf(tmp_path / "hf")  # loaded as fp32: bf16-rounded weights
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < 0.1


def test_tokenizer_files_and_special_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() <= 96

    cfg, model = megamoe_model("olmoe")
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    megamoe_to_hf(ckpt, str(tmp_path / "hf"), tokenizer=str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["eos_token_id"] == tok.token_to_id("<|endoftext|>")
    with open(tmp_path / "hf" / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == tok.token_to_id("<|endoftext|>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok("the cat")["input_ids"] == tok.encode("the cat").ids


def test_converted_checkpoint_continues_training(tmp_path):
    """from-hf writes an out_dir that `megamoe train --config <dst>/config.yaml` resumes."""
    from megamoe import checkpoint as ckpt
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training

    hf = _random_hf("mixtral")
    hf.save_pretrained(str(tmp_path / "hf"))
    dst = tmp_path / "ct"
    hf_to_megamoe(str(tmp_path / "hf"), str(dst), seq_length=16)

    cfg = load_train_config(str(dst / "config.yaml"), [
        "--steps", "1", "--micro_batch_size", "2", "--global_batch_size", "2", "--progress", "false",
        "--eval_interval", "0", "--save_interval", "0"])
    assert os.path.samefile(cfg.out_dir, dst) and cfg.model.moe.router_mode == "topk_softmax"
    model = build_model(cfg.model, seed=123)  # a different init: resume must replace it
    rows = [torch.randint(0, 96, (17,)).numpy() for _ in range(4)]
    trainer = Trainer(build_training(cfg, model, device=torch.device("cpu"), verbose=False), rows)
    trainer.load(ckpt.newest_checkpoint(cfg.out_dir))
    x = tokens()
    with torch.no_grad():
        assert max_diff(model.eval()(x), hf(x).logits) < TOL
    history = trainer.train()
    assert trainer.step == 1 and history and torch.isfinite(torch.tensor(history[-1]["loss"]))
