"""DeepSeek-MoE (model_type deepseek, DeepSeek-MoE-16B's remote-code layout) both ways.

transformers has no class for it; the reference is transformers' Qwen2-MoE with the same
weights (see below). Logits in fp32 within TOL 1e-4, as tests/hf/test_convert.py.
"""

import json

import pytest
import torch

from hfutil import load_hf, max_diff, megamoe_from, random_hf, tokens
from megamoe.hf.convert import hf_to_megamoe, megamoe_to_hf
from megamoe.hf.layouts import config_from_hf, config_to_hf
from megamoe.model.transformer import build_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
TOL = 1e-4


# ------------------------------------------------------------ deepseek (DeepSeek-MoE, remote code)
# transformers has no class. The reference is transformers' Qwen2-MoE with the same weights:
# its routing (softmax over all experts, top-k, norm_topk_prob false) is DeepSeek-MoE's, and its
# shared expert is gated by sigmoid(x g): with g = 0 the gate is exactly 1/2, which the
# DeepSeek checkpoint folds into its ungated shared experts' down_proj (halved: exact in fp).

def _qwen2_reference_config(norm_topk_prob=False):
    return transformers.Qwen2MoeConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, qkv_bias=False, mlp_only_layers=[0],
        max_position_embeddings=32, initializer_range=0.1, rms_norm_eps=1e-5,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _deepseek_config_json(**kw):
    return {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 96,
            "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
            "n_shared_experts": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False,
            "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
            "hidden_act": "silu", "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
            "tie_word_embeddings": False, "initializer_range": 0.1, **kw}


def _qwen2_to_deepseek(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k.endswith("shared_expert_gate.weight"):
            assert not v.any()
            continue
        if ".shared_expert." in k:
            k = k.replace(".shared_expert.", ".shared_experts.")
            v = v * 0.5 if k.endswith("down_proj.weight") else v
        out[k] = v.contiguous()
    return out


def _deepseek_to_qwen2(state: dict, hidden: int) -> dict:
    out = {}
    for k, v in state.items():
        if ".shared_experts." in k:
            k = k.replace(".shared_experts.", ".shared_expert.")
            v = v * 2.0 if k.endswith("down_proj.weight") else v
            if k.endswith("down_proj.weight"):
                out[k.replace("shared_expert.down_proj", "shared_expert_gate")] = torch.zeros(1, hidden)
        out[k] = v.contiguous()
    return out


def _qwen2_reference(tmp_path):
    """(transformers Qwen2-MoE with zero shared gates, its saved per-expert state)."""
    from safetensors.torch import load_file

    hf = random_hf(_qwen2_reference_config(), seed=11)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("shared_expert_gate.weight"):
                p.zero_()
    hf.save_pretrained(str(tmp_path / "qwen2"))
    return hf, load_file(str(tmp_path / "qwen2" / "model.safetensors"))


def _deepseek_dir(tmp_path, state: dict, **config):
    """A remote-code deepseek model directory holding `state`."""
    from safetensors.torch import save_file

    d = tmp_path / "deepseek"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(_deepseek_config_json(**config)))
    return d


def test_deepseek_moe_from_remote_code_checkpoint(tmp_path):
    hf, state = _qwen2_reference(tmp_path)
    d = _deepseek_dir(tmp_path, _qwen2_to_deepseek(state))
    hf_to_megamoe(str(d), str(tmp_path / "mm"))
    cfg, model = megamoe_from(tmp_path / "mm")
    assert (cfg.moe.router_mode, cfg.moe.norm_topk_prob, cfg.moe.num_shared_experts,
            cfg.moe.shared_expert_gate, cfg.moe.first_k_dense) == ("softmax_topk", False, 2, False, 1)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert max_diff(model(x), ref) < TOL
        cfg.moe.norm_topk_prob = True                       # renormalising would be visible
        other = build_model(cfg)
        other.load_state_dict(model.state_dict())
        assert max_diff(other.eval()(x), ref) > 100 * TOL


def test_deepseek_moe_export_loads_as_reference(tmp_path):
    from safetensors.torch import load_file, save_file

    hf, state = _qwen2_reference(tmp_path)
    d = _deepseek_dir(tmp_path, _qwen2_to_deepseek(state))
    hf_to_megamoe(str(d), str(tmp_path / "mm"))
    cfg, model = megamoe_from(tmp_path / "mm")
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "out"))   # model type inferred: deepseek
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["DeepseekForCausalLM"] and written["model_type"] == "deepseek"
    for key, value in _deepseek_config_json().items():
        if key not in ("rope_scaling", "initializer_range", "seq_aux"):
            assert written[key] == value, key
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = load_file(str(d / "model.safetensors"))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # ... and loads into the transformers reference with the same logits.
    q = tmp_path / "as_qwen2"
    q.mkdir()
    save_file(_deepseek_to_qwen2(exported, 32), str(q / "model.safetensors"), metadata={"format": "pt"})
    _qwen2_reference_config().to_json_file(str(q / "config.json"))
    ref = load_hf(q)
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), ref(x).logits) < TOL


def test_deepseek_moe_16b_config_and_layer_pattern():
    from megamoe.config import preset

    published = _deepseek_config_json(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        num_experts_per_tok=6, max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.02)
    cfg, ref = config_from_hf(published), preset("deepseek-moe-16b").model
    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_hidden", "seq_length", "norm_eps"):
        assert getattr(cfg, f) == getattr(ref, f), f
    for f in ("num_experts", "top_k", "expert_hidden", "router_mode", "norm_topk_prob",
              "num_shared_experts", "first_k_dense", "moe_layer_freq", "lb_loss_coef"):
        assert getattr(cfg.moe, f) == getattr(ref.moe, f), f
    # remote code: MoE where layer >= first_k_dense_replace and layer % moe_layer_freq == 0
    odd = config_from_hf(_deepseek_config_json(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2))
    assert (odd.moe.first_k_dense, odd.moe.moe_layer_freq) == (2, 2)      # layers 2, 4
    odd.moe.first_k_dense = 1
    with pytest.raises(ValueError, match="multiple of moe_layer_freq"):
        config_to_hf(odd, "deepseek")


def test_deepseek_moe_bf16_round_trip_is_byte_identical(tmp_path):
    """The remote-code deepseek layout in bf16: HF -> megamoe -> HF keeps every tensor's bytes
    and dtype (transformers has no class for it, so the files are compared directly)."""
    from safetensors.torch import load_file

    _, state = _qwen2_reference(tmp_path)
    bf16 = {k: v.to(torch.bfloat16) for k, v in _qwen2_to_deepseek(state).items()}
    d = _deepseek_dir(tmp_path, bf16, torch_dtype="bfloat16")
    hf_to_megamoe(str(d), str(tmp_path / "mm"))
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "out"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(bf16)
    for k, t in bf16.items():
        assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k].view(torch.uint8),
                                                                    t.view(torch.uint8)), k
