"""HF model families beyond the basic ones: RoPE scaling (llama3 / yarn, incl. MLA's mscale),
qwen3_moe, deepseek_v2, group-limited routing, bf16 round trips, FP8 block-quantized weights,
upcycled sigmoid-routed models (DeepSeek-MoE's remote-code layout: test_family_deepseek_moe.py).

Every model is tiny and built locally; logits are compared in fp32 with transformers' eager
attention (TOL 1e-4, as tests/hf/test_convert.py), each check paired with one showing that the
feature under test changes the logits by far more than that.
"""

import json

import pytest
import torch

from hfutil import (LLAMA3, MEGAMOE_CONFIGS, YARN, YARN_MLA, hf_config, hf_rope, load_hf, max_diff,
                    megamoe_from, megamoe_model, perturb, random_hf, save_megamoe, tokens)
from megamoe.config import ModelConfig, RopeScaling, TrainConfig, from_dict, to_dict
from megamoe.hf.convert import from_hf_state, hf_to_megamoe, megamoe_to_hf
from megamoe.hf.io import load_megamoe_state
from megamoe.hf.layouts import LAYOUTS, config_from_hf, config_to_hf, mtp_layer_count
from megamoe.model.rope import inv_freq_and_scale, softmax_scale_factor
from megamoe.model.transformer import build_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
TOL = 1e-4


# ------------------------------------------------------------------------------------ RoPE

@pytest.mark.parametrize("scaling, dim, theta", [
    # Llama-3.1-8B, DeepSeek-V3 (MLA rope dims), Qwen3 yarn (no mscale), a ramp of 0 width.
    (dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192), 128, 500000.0),
    (dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0), 64, 10000.0),
    (dict(type="yarn", factor=4.0, original_max_position_embeddings=32768), 128, 1e6),
    (dict(YARN_MLA), 4, 10000.0),
    (dict(type="yarn", factor=4.0, original_max_position_embeddings=8, attention_factor=0.9,
          truncate=False), 16, 10000.0),
])
def test_rope_scaling_matches_transformers(scaling, dim, theta):
    """inv_freq and the cos/sin factor equal transformers' _compute_{llama3,yarn}_parameters.
    transformers computes in fp32, megamoe in fp64: rtol 1e-6 (a few fp32 roundings)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    r = RopeScaling(**scaling)
    params = hf_rope(scaling, theta)
    hf = transformers.DeepseekV3Config(hidden_size=dim * 4, num_attention_heads=4,
                                       qk_rope_head_dim=dim, max_position_embeddings=8 * 4096,
                                       rope_parameters=params)
    hf.head_dim = dim
    ref, ref_scale = ROPE_INIT_FUNCTIONS[scaling["type"]](hf)
    inv, scale = inv_freq_and_scale(dim, theta, r)
    torch.testing.assert_close(inv, ref.double(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    plain, _ = inv_freq_and_scale(dim, theta)
    assert not torch.allclose(inv, plain, rtol=1e-3)            # the scaling does something
    # MLA's softmax scale: transformers' DeepseekV3Attention.scaling over qk_head_dim^-0.5.
    from transformers.modeling_rope_utils import yarn_apply_mscale
    assert softmax_scale_factor(r) == pytest.approx(yarn_apply_mscale(params, 1.0), rel=1e-12)


def _llama_hf_config(scaling):
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
        initializer_range=0.1, rms_norm_eps=1e-5, rope_parameters=hf_rope(scaling),
        pad_token_id=None, bos_token_id=None, eos_token_id=None)


@pytest.mark.parametrize("scaling", [LLAMA3, YARN], ids=["llama3", "yarn"])
def test_llama_rope_scaling_from_hf(scaling, tmp_path):
    hf = random_hf(_llama_hf_config(scaling))
    hf.save_pretrained(str(tmp_path / "hf"))
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    cfg, model = megamoe_from(tmp_path / "mm")
    assert cfg.rope_scaling == RopeScaling(**scaling)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert max_diff(model(x), ref) < TOL
        cfg.rope_scaling = None                                   # plain RoPE: clearly different
        plain = build_model(cfg)
        plain.load_state_dict(model.state_dict())
        assert max_diff(plain.eval()(x), ref) > 100 * TOL


@pytest.mark.parametrize("scaling", [LLAMA3, YARN], ids=["llama3", "yarn"])
def test_llama_rope_scaling_to_hf(scaling, tmp_path):
    cfg = MEGAMOE_CONFIGS["llama"]()
    cfg.rope_scaling = RopeScaling(**scaling)
    model = build_model(cfg, seed=0)
    perturb(model, 1, router_bias=False)
    save_megamoe(tmp_path / "run", cfg, model)
    megamoe_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    hf = load_hf(tmp_path / "hf")
    assert hf.config.rope_parameters["rope_type"] == scaling["type"]
    x = tokens()
    with torch.no_grad():
        assert max_diff(model.eval()(x), hf(x).logits) < TOL
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "back"))
    cfg2, _ = load_megamoe_state(str(tmp_path / "back"))
    assert cfg2.rope_scaling == cfg.rope_scaling


def test_rope_scaling_survives_config_files_upcycling_and_training():
    from megamoe.hf.upcycle import upcycle

    cfg = MEGAMOE_CONFIGS["llama"]()
    cfg.bias, cfg.rope_scaling = False, RopeScaling(**YARN)
    again = from_dict(TrainConfig, to_dict(TrainConfig(model=cfg))).model   # config.yaml round trip
    assert again.rope_scaling == cfg.rope_scaling
    model = build_model(cfg, seed=0)
    new, state, _ = upcycle(cfg, model.state_dict(), num_experts=4, top_k=2)
    assert new.rope_scaling == cfg.rope_scaling
    moe = build_model(new)
    moe.load_state_dict(state)
    x = tokens()
    with torch.no_grad():   # copy mode reproduces the dense model, yarn cache included
        assert max_diff(moe.eval()(x), model.eval()(x)) < 1e-5
    moe.train()
    loss = moe(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in moe.parameters() if p.requires_grad)


@pytest.mark.parametrize("field, value, message", [
    ("type", "dynamic", "llama3 or yarn"),
    ("factor", 0.0, "factor > 0"),
])
def test_rope_scaling_validation(field, value, message):
    from megamoe.config import validate

    cfg = MEGAMOE_CONFIGS["llama"]()
    cfg.rope_scaling = RopeScaling(**{**LLAMA3, field: value})
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(model=cfg))


def test_mla_yarn_is_applied(tmp_path):
    """deepseek_v3 / v2 with yarn: without the cos/sin factor or the softmax mscale the logits
    differ clearly (the parity itself is tests/hf/test_convert.py's, through MEGAMOE_CONFIGS)."""
    for model_type in ("deepseek_v3", "deepseek_v2"):
        hf = random_hf(hf_config(model_type))
        hf.save_pretrained(str(tmp_path / model_type))
        hf_to_megamoe(str(tmp_path / model_type), str(tmp_path / f"{model_type}_mm"))
        cfg, model = megamoe_from(tmp_path / f"{model_type}_mm")
        assert cfg.rope_scaling == RopeScaling(**YARN_MLA)
        x = tokens()
        with torch.no_grad():
            ref = hf(x).logits
            assert max_diff(model(x), ref) < TOL
            for attr, value in (("mscale_all_dim", None), ("mscale", None)):
                c = ModelConfig(**{**cfg.__dict__})
                c.rope_scaling = RopeScaling(**{**YARN_MLA, attr: value})
                other = build_model(c)
                other.load_state_dict(model.state_dict())
                assert max_diff(other.eval()(x), ref) > 100 * TOL, (model_type, attr)


# ------------------------------------------------------------------------------- qwen3_moe

def test_qwen3_moe_per_head_qk_norm_and_layer_pattern():
    cfg, model = megamoe_model("qwen3_moe")
    assert model.layers["1"].attn.q_norm.weight.shape == (cfg.head_dim,)
    hf = config_to_hf(cfg, "qwen3_moe")
    assert hf["mlp_only_layers"] == [0] and hf["norm_topk_prob"] is True
    back = config_from_hf({**hf, "num_hidden_layers": 6, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert (back.moe.first_k_dense, back.moe.moe_layer_freq) == (1, 2)
    assert back.qk_norm and back.qk_norm_scope == "head" and back.moe.num_shared_experts == 0
    with pytest.raises(ValueError, match="per-head"):
        config_to_hf(MEGAMOE_CONFIGS["olmoe"](), "qwen3_moe")
    with pytest.raises(ValueError, match="whole-projection"):
        config_to_hf(cfg, "olmoe")


# ------------------------------------------------------------------- bf16 byte-exact trips

def _bf16(model):
    """bf16 weights as transformers loads / saves a bf16 model: the tensors of the class's
    _keep_in_fp32_modules_strict (DeepSeek routers) stay fp32 (== megamoe Layout.keep_fp32)."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    model.to(torch.bfloat16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(name.endswith(k) for k in keep):
            t.data = t.data.float()
    return model


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v2", "deepseek_v3", "llama3"])
def test_bf16_hf_round_trip_is_byte_identical(model_type, tmp_path):
    from safetensors.torch import load_file

    if model_type == "llama3":
        config = _llama_hf_config(LLAMA3)
    else:
        config = hf_config(model_type)
    hf = _bf16(random_hf(config))
    hf.save_pretrained(str(tmp_path / "hf"))
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "back"), model_type=config.model_type,
                  dtype="bf16")
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    keep = LAYOUTS[config.model_type].keep_fp32
    assert {k for k, t in a.items() if t.dtype == torch.float32} == {k for k in a if k.endswith(keep)}
    for name, t in a.items():
        assert t.dtype == b[name].dtype and torch.equal(t, b[name]), name
    back = load_hf(tmp_path / "back")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(_bf16(back)(x).logits, hf(x).logits)


# ----------------------------------------------------------------------- group-limited routing

@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_group_limited_routing_matters(model_type, tmp_path):
    """The converted models route with groups (n_group 4, topk_group 2); plain top-k differs."""
    hf = random_hf(hf_config(model_type), seed=3)
    hf.save_pretrained(str(tmp_path / "hf"))
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    cfg, model = megamoe_from(tmp_path / "mm")
    assert (cfg.moe.n_group, cfg.moe.topk_group) == (4, 2)
    x = tokens(batch=4)
    with torch.no_grad():
        ref = hf(x).logits
        assert max_diff(model(x), ref) < TOL
        cfg.moe.n_group = cfg.moe.topk_group = 1
        plain = build_model(cfg)
        plain.load_state_dict(model.state_dict())
        assert max_diff(plain.eval()(x), ref) > 100 * TOL


def test_mtp_layers_are_a_layout_fact():
    assert mtp_layer_count(LAYOUTS["deepseek_v3"], {"num_nextn_predict_layers": 1}) == 1
    assert mtp_layer_count(LAYOUTS["glm4_moe"], {"num_mtp_layers": 2}) == 2
    assert mtp_layer_count(LAYOUTS["qwen3_moe"], {"num_nextn_predict_layers": 1}) == 0
    assert mtp_layer_count(LAYOUTS["deepseek_v3"], {}) == 0


# ------------------------------------------------------------------ FP8 block-quantized weights

def test_dequantize_block_fp8_is_the_elementwise_formula():
    from megamoe.hf.fp8 import dequantize_block_fp8, quantize_block_fp8

    w = torch.randn(21, 13, generator=torch.Generator().manual_seed(0))
    q, scale_inv = quantize_block_fp8(w, (8, 4))
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 4)     # edge blocks cropped
    got = dequantize_block_fp8(q, scale_inv, (8, 4), torch.float32)
    i, j = torch.meshgrid(torch.arange(21), torch.arange(13), indexing="ij")
    assert torch.equal(got, q.float() * scale_inv[i // 8, j // 4])
    # fp8 e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each block's scale.
    assert ((got - w).abs() <= scale_inv[i // 8, j // 4] * 448 * 2 ** -4).all()
    assert torch.equal(dequantize_block_fp8(q, scale_inv, (8, 4)), got.bfloat16())
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_block_fp8(q, scale_inv[:2], (8, 4))


def test_fp8_deepseek_v3_checkpoint_dequantizes_to_transformers_logits(tmp_path):
    """A tiny deepseek_v3 quantized like DeepSeek-V3's release (every *_proj linear in fp8 with
    8x8 blocks here, so that edges are cropped); megamoe reading it through DequantizedTensors
    computes transformers' logits on the dequantized weights."""
    from safetensors.torch import load_file, save_file

    from megamoe.hf.fp8 import DequantizedTensors, fp8_block_size, quantize_block_fp8
    from megamoe.hf.io import HFTensors

    hf = random_hf(hf_config("deepseek_v3"), seed=5)
    hf.save_pretrained(str(tmp_path / "bf"))
    state = load_file(str(tmp_path / "bf" / "model.safetensors"))
    quantized, dequantized = {}, {}
    for k, v in state.items():
        if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight"):
            q, s = quantize_block_fp8(v, (8, 8))
            quantized[k], quantized[k[:-len(".weight")] + ".weight_scale_inv"] = q, s
            i, j = torch.meshgrid(torch.arange(v.shape[0]), torch.arange(v.shape[1]), indexing="ij")
            dequantized[k] = q.float() * s[i // 8, j // 8]
        else:
            quantized[k] = dequantized[k] = v
    assert sum(t.dtype == torch.float8_e4m3fn for t in quantized.values()) > 20
    hf_cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [8, 8]}
    for name, tensors, config in (("fp8", quantized, hf_cfg), ("ref", dequantized, None)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(json.dumps(config or {**hf_cfg, "quantization_config": None}))
    ref = load_hf(tmp_path / "ref")

    cfg = config_from_hf(hf_cfg)
    block = fp8_block_size(hf_cfg)
    assert block == (8, 8)
    reader = DequantizedTensors(HFTensors(str(tmp_path / "fp8")), block, torch.float32)
    mm_state, _ = from_hf_state(cfg, reader, "deepseek_v3", hf_cfg)
    model = build_model(cfg)
    model.load_state_dict(mm_state)
    x = tokens()
    with torch.no_grad():
        out = model.eval()(x)
        assert max_diff(out, ref(x).logits) < TOL
        assert max_diff(out, hf(x).logits) > 100 * TOL          # quantization did change the model
    with pytest.raises(ValueError, match="cannot place"):     # unwrapped: scales are not weights
        from_hf_state(cfg, HFTensors(str(tmp_path / "fp8")), "deepseek_v3", hf_cfg)


# ----------------------------------------------- upcycled sigmoid-routed models without shared experts

def _dense_source(attention: str):
    base = dict(vocab_size=96, d_model=32, num_layers=3, num_heads=4, ffn_hidden=48, seq_length=16,
                init_std=0.1, moe=None)
    if attention == "mla":
        cfg = ModelConfig(**base, attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=4, v_head_dim=6)
    else:
        cfg = ModelConfig(**base, num_kv_heads=2)
    model = build_model(cfg, seed=0)
    perturb(model, 1, router_bias=False)
    return cfg, model.eval()


@pytest.mark.parametrize("model_type, attention", [("glm4_moe", "gqa"), ("deepseek_v3", "mla")])
def test_copy_upcycled_sigmoid_model_exports_without_shared_experts(model_type, attention, tmp_path):
    """n_shared_experts 0: transformers builds zero-width shared MLPs ([0, H] weights, output 0),
    so the export is exact; the checkpoint holds those empty weights, so nothing is missing."""
    from megamoe.hf.layouts_deepseek import empty_shared_expert_tensors
    from megamoe.hf.upcycle import upcycle

    dense_cfg, dense = _dense_source(attention)
    cfg, state, _ = upcycle(dense_cfg, dense.state_dict(), num_experts=4, top_k=2,
                            router_mode="sigmoid_bias", norm_topk_prob=True, router_std=0.5, seed=3)
    model = build_model(cfg)
    model.load_state_dict(state)
    save_megamoe(tmp_path / "run", cfg, model.eval())
    megamoe_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), model_type=model_type)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_shared_experts"] == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    empty = set(empty_shared_expert_tensors(cfg, LAYOUTS[model_type]))
    assert empty and not info["missing_keys"] and not info["unexpected_keys"]
    assert all(hf.state_dict()[k].numel() == 0 for k in empty)
    x = tokens()
    with torch.no_grad():
        out = model(x)
        assert max_diff(out, hf.eval()(x).logits) < TOL
        assert max_diff(out, dense(x)) < 1e-5          # copy mode: still the dense model
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "back"))
    cfg2, state2 = load_megamoe_state(str(tmp_path / "back"))
    assert cfg2.moe.num_shared_experts == 0
    assert all(torch.equal(t, state2[k]) for k, t in model.state_dict().items())


def test_glm4_moe_per_head_qk_norm_both_ways(tmp_path):
    """GLM-4.5's use_qk_norm is per-head QK-norm (megamoe qk_norm_scope head)."""
    config = hf_config("glm4_moe")
    config.use_qk_norm = True
    hf = random_hf(config)
    hf.save_pretrained(str(tmp_path / "hf"))
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    cfg, model = megamoe_from(tmp_path / "mm")
    assert cfg.qk_norm and cfg.qk_norm_scope == "head"
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL
    megamoe_to_hf(str(tmp_path / "mm"), str(tmp_path / "back"), model_type="glm4_moe")
    back = load_hf(tmp_path / "back")
    assert back.config.use_qk_norm
    with torch.no_grad():
        assert max_diff(model(x), back(x).logits) < TOL


def test_fp8_reader_interface(tmp_path):
    """DequantizedTensors is a drop-in checkpoint reader: keys without scales, dtype() before
    reading, renames carrying the scale along."""
    from safetensors.torch import save_file

    from megamoe.hf.fp8 import DequantizedTensors, fp8_block_size, quantize_block_fp8
    from megamoe.hf.io import HFTensors

    q, s = quantize_block_fp8(torch.randn(10, 6), (4, 4))
    save_file({"a.weight": q, "a.weight_scale_inv": s, "n.weight": torch.ones(6)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    r = DequantizedTensors(HFTensors(str(tmp_path)), (4, 4), torch.float32)
    assert sorted(r.keys()) == ["a.weight", "n.weight"] and "a.weight_scale_inv" not in r
    assert r.dtype("a.weight") == r["a.weight"].dtype == torch.float32
    assert r.dtype("n.weight") == torch.float32
    r.rename("a.weight", "b.weight")
    assert "b.weight" in r and r["b.weight"].dtype == torch.float32
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}) == (128, 128)
    assert fp8_block_size({}) is None
    with pytest.raises(ValueError, match="not supported"):
        fp8_block_size({"quantization_config": {"quant_method": "bitsandbytes"}})


def test_transformers_saved_checkpoint_without_shared_experts_imports(tmp_path):
    config = hf_config("glm4_moe")
    config.n_shared_experts = 0
    hf = random_hf(config)
    hf.save_pretrained(str(tmp_path / "hf"))          # writes the [0, H] shared weights
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "mm"))
    cfg, model = megamoe_from(tmp_path / "mm")
    assert cfg.moe.num_shared_experts == 0
    x = tokens()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL
