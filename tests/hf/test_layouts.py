"""Conversion without transformers: round trips, refusals, CLI behaviour, the checkpoint hook."""

import json
import os

import pytest
import torch

from hfutil import MEGAMOE_CONFIGS, megamoe_model, save_megamoe
from megamoe.cli import main as cli_main
from megamoe.config import ModelConfig, MoEConfig
from megamoe.hf import io as hf_io
from megamoe.hf.convert import from_hf_state, hf_to_megamoe, megamoe_to_hf, to_hf_state
from megamoe.hf.layouts import config_from_hf, config_to_hf, infer_model_type
from megamoe.model.transformer import build_model


@pytest.mark.parametrize("model_type", list(MEGAMOE_CONFIGS))
def test_round_trip_is_bit_exact(model_type, tmp_path):
    cfg, model = megamoe_model(model_type)
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    assert infer_model_type(cfg) == model_type
    megamoe_to_hf(ckpt, str(tmp_path / "hf"))            # model type inferred
    hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "back"))
    cfg2, state2 = hf_io.load_megamoe_state(str(tmp_path / "back"))
    state = model.state_dict()
    assert set(state) == set(state2)
    for name, t in state.items():
        assert torch.equal(t, state2[name]), name
    # The config comes back as the same architecture (training-only knobs may differ).
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "seq_length",
                  "norm_eps", "qk_norm", "norm_position", "rope_theta", "bias", "qkv_bias",
                  "tie_embeddings"):
        assert getattr(cfg2, field) == getattr(cfg, field), field
    assert (cfg2.num_kv_heads or cfg2.num_heads) == (cfg.num_kv_heads or cfg.num_heads)
    if cfg.moe is not None:
        for field in ("num_experts", "top_k", "expert_hidden", "first_k_dense", "moe_layer_freq",
                      "routed_scaling_factor", "num_shared_experts", "shared_expert_gate"):
            assert getattr(cfg2.moe, field) == getattr(cfg.moe, field), field


def test_expert_layout_mapping():
    """megamoe w_gate_up [E, H, 2I] / w_down [E, I, H] <-> HF per-expert [out, in] weights."""
    cfg, model = megamoe_model("olmoe")
    state = model.state_dict()
    hf = to_hf_state(cfg, state, "olmoe")
    w_gate_up, w_down = state["layers.1.ffn.experts.w_gate_up"], state["layers.1.ffn.experts.w_down"]
    inter = cfg.moe.expert_hidden
    pre = "model.layers.1.mlp.experts.2."
    assert torch.equal(hf[pre + "gate_proj.weight"], w_gate_up[2, :, :inter].t())
    assert torch.equal(hf[pre + "up_proj.weight"], w_gate_up[2, :, inter:].t())
    assert torch.equal(hf[pre + "down_proj.weight"], w_down[2].t())
    assert torch.equal(hf["model.layers.1.mlp.gate.weight"], state["layers.1.ffn.router.weight"])
    # The transformers 5.x fused in-memory layout reads back the same.
    fused = {k: v for k, v in hf.items() if ".experts." not in k}
    for layer in range(cfg.num_layers):
        gates, ups, downs = zip(*[(hf[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"],
                                   hf[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"],
                                   hf[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"])
                                  for e in range(4)])
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat(
            [torch.stack(gates), torch.stack(ups)], dim=1)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(downs)
    back, _ = from_hf_state(cfg, fused, "olmoe")
    for name, t in state.items():
        assert torch.equal(t, back[name]), name


def _hf(model_type, **extra):
    base = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 16,
            "max_position_embeddings": 32, "num_experts": 4, "num_local_experts": 4,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16}
    base.update(extra)
    return base


@pytest.mark.parametrize("hf, message", [
    (_hf("deepseek_v2", kv_lora_rank=16, norm_topk_prob=True), "norm_topk_prob"),
    (_hf("deepseek_v2", kv_lora_rank=16, topk_method="noaux_tc"), "topk_method"),
    (_hf("deepseek_v2", kv_lora_rank=16, rope_interleave=False), "rope_interleave"),
    (_hf("deepseek", n_routed_experts=None), "dense model"),
    (_hf("deepseek", scoring_func="sigmoid"), "scoring_func"),
    (_hf("deepseek", rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling"),
    (_hf("mixtral", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "RoPE scaling"),
    (_hf("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "RoPE scaling"),
    (_hf("deepseek_v3", n_group=1, topk_group=1, attention_bias=True), "attention_bias"),
    (_hf("deepseek_v3", n_group=1, topk_group=1, num_key_value_heads=2), "num_key_value_heads"),
    (_hf("deepseek_v3", n_group=1, topk_group=1, q_lora_rank=0), "q_lora_rank 0"),
    (_hf("mixtral", sliding_window=8), "sliding-window"),
    (_hf("qwen2_moe", use_sliding_window=True), "sliding-window"),
    (_hf("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (_hf("llama", attention_bias=True, mlp_bias=False), "attention_bias != mlp_bias"),
    (_hf("llama", hidden_act="gelu"), "activation"),
    (_hf("olmoe", clip_qkv=8.0), "clip_qkv"),
    (_hf("olmo2", attention_bias=True), "attention_bias"),
    (_hf("qwen3_moe", use_sliding_window=True), "sliding-window"),
    (_hf("glm4_moe"), "partial rotary"),          # absent: transformers' default 0.5
    (_hf("glm4_moe", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.5}), "partial rotary"),
    (_hf("qwen2_moe", mlp_only_layers=[0, 1]), "no layer is MoE"),
    (_hf("gpt2"), "unsupported Hugging Face model type"),
])
def test_unsupported_hf_configs_are_refused(hf, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf)


def test_qwen2_layer_pattern_is_fitted():
    cfg = config_from_hf(_hf("qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2))
    assert (cfg.moe.first_k_dense, cfg.moe.moe_layer_freq) == (1, 2)   # layers 1, 3, 5
    with pytest.raises(ValueError, match="not 'every"):
        config_from_hf(_hf("qwen2_moe", num_hidden_layers=6, mlp_only_layers=[3]))


def _moe(**kw):
    return MoEConfig(num_experts=4, top_k=2, expert_hidden=16, **kw)


@pytest.mark.parametrize("cfg, model_type, message", [
    (ModelConfig(moe=None), "olmoe", "dense"),
    (ModelConfig(moe=_moe()), "llama", "MoE"),
    (ModelConfig(qk_norm=True, moe=_moe(num_shared_experts=1)), "olmoe", "shared experts"),
    (ModelConfig(qk_norm=True, moe=_moe(routed_scaling_factor=2.0)), "olmoe", "routed_scaling_factor"),
    (ModelConfig(moe=_moe(router_mode="topk_softmax")), "olmoe", "QK-norm"),
    (ModelConfig(bias=True, moe=_moe(router_mode="topk_softmax")), "mixtral", "bias"),
    (ModelConfig(moe=_moe()), "mixtral", "renormalises"),
    (ModelConfig(moe=_moe(num_shared_experts=1)), "qwen2_moe", "gated shared expert"),
    (ModelConfig(moe=_moe(router_mode="sigmoid_bias", num_shared_experts=1, moe_layer_freq=2)),
     "glm4_moe", "moe_layer_freq"),
    (ModelConfig(moe=_moe(router_mode="sigmoid_bias")), "mixtral", "glm4_moe"),
    (ModelConfig(norm="layernorm", moe=None), "llama", "RMSNorm"),
    (ModelConfig(qkv_bias=True, moe=None), "llama", "o_proj"),
    (ModelConfig(moe=None), "olmo2", "norm"),
    (ModelConfig(moe=_moe(router_mode="sigmoid_bias", num_shared_experts=1)), "deepseek_v3",
     "Multi-head Latent Attention"),
    (ModelConfig(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 moe=_moe(router_mode="sigmoid_bias", num_shared_experts=1)), "glm4_moe", "use deepseek_v3"),
    (ModelConfig(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 moe=_moe(num_shared_experts=1)), "deepseek_v3", "sigmoid"),
])
def test_unsupported_megamoe_configs_are_refused(cfg, model_type, message):
    with pytest.raises(ValueError, match=message):
        config_to_hf(cfg, model_type)


def test_parse_size():
    assert hf_io.parse_size("5GB") == 5 * 10**9
    assert hf_io.parse_size("2GiB") == 2 * 2**30
    assert hf_io.parse_size("300kb") == 300_000
    assert hf_io.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="cannot parse size"):
        hf_io.parse_size("lots")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megamoe convert: error:") and "does not exist" in err and "\n" not in err

    d = tmp_path / "ds"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v2", "kv_lora_rank": 512}))
    assert cli_main(["convert", "from-hf", str(d), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks the field 'n_routed_experts'" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "out")


def test_cli_success_and_existing_output(tmp_path, capsys):
    cfg, model = megamoe_model("mixtral")
    ckpt = save_megamoe(tmp_path / "run", cfg, model)
    assert cli_main(["convert", "to-hf", ckpt, str(tmp_path / "hf"), "--max-shard-size", "50KB"]) == 0
    assert "mixtral" in capsys.readouterr().out
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    # An existing output is never touched without --overwrite ...
    assert cli_main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert set(os.listdir(tmp_path / "hf")) == files
    # ... and replaced as a whole with it.
    assert cli_main(["convert", "to-hf", ckpt, str(tmp_path / "hf"), "--overwrite"]) == 0
    assert "model.safetensors" in os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" not in os.listdir(tmp_path / "hf")
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p] == []


def test_failed_conversion_leaves_no_output(tmp_path, monkeypatch):
    cfg, model = megamoe_model("olmoe")
    ckpt = save_megamoe(tmp_path / "run", cfg, model)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr("megamoe.hf.convert.save_safetensors", broken)
    assert cli_main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["run"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_ep2_checkpoint_converts_like_single_process(tmp_path):
    """A TP2xEP2 run's sharded checkpoint (model_rank{r}.pt) converts exactly like the
    single-process checkpoint of the same weights."""
    import torch.multiprocessing as mp

    from hfutil import parallel_save_worker, parallel_train_config

    pytest.importorskip("megamoe.parallel.setup")
    out_dir, gathered_path = str(tmp_path / "par"), str(tmp_path / "gathered.pt")
    mp.spawn(parallel_save_worker, args=(2, _free_port(), out_dir, gathered_path), nprocs=2, join=True)
    step0 = os.path.join(out_dir, "checkpoints", "step_00000000")
    assert "model_rank1.pt" in os.listdir(step0) and "model.pt" not in os.listdir(step0)

    # Step 0: the sharded initial weights are the single-process model built from the same seed.
    cfg = parallel_train_config(out_dir)
    single = save_megamoe(tmp_path / "single", cfg.model, build_model(cfg.model, seed=cfg.seed))
    megamoe_to_hf(step0, str(tmp_path / "hf_par"))
    megamoe_to_hf(single, str(tmp_path / "hf_single"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf_par" / name).read_bytes() == (tmp_path / "hf_single" / name).read_bytes()

    # After training: consolidating the files gives what the live shards held.
    _, state = hf_io.load_megamoe_state(out_dir)   # latest = step 2
    gathered = torch.load(gathered_path, weights_only=True)
    for name, t in gathered.items():
        assert torch.equal(state[name], t), name


def test_megamoe_checkpoint_without_model_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="neither a megamoe checkpoint"):
        hf_io.load_megamoe_state(str(tmp_path / "x"))
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, ffn_hidden=32, moe=None)
    model = build_model(cfg, seed=0)
    state = model.state_dict()
    state.pop("norm.weight")
    with pytest.raises(ValueError, match="lacks the tensor 'norm.weight'"):
        to_hf_state(cfg, state, "llama")
