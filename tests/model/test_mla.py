"""Multi-head Latent Attention: equal to transformers' DeepseekV3Attention, config checks, FLOPs,
and a short training run of a tiny MLA MoE model."""

import types

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig, TrainConfig, validate
from megamoe.hf.layouts_deepseek import mla_tensor_from_hf
from megamoe.model.rope import rope_cache
from megamoe.model.mla import MLAttention
from megamoe.model.transformer import build_model, flops_per_token

B, S, H, NH = 2, 12, 32, 4


def mla_cfg(**kw):
    dims = dict(attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6)
    dims.update(kw)
    moe = dims.pop("moe", MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router_mode="sigmoid_bias",
                                    num_shared_experts=1, first_k_dense=1, norm_topk_prob=True))
    return ModelConfig(vocab_size=64, d_model=H, num_layers=2, num_heads=NH, ffn_hidden=48,
                       seq_length=16, moe=moe, **dims)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("rope_interleave", [False, True])
def test_matches_transformers_deepseek_v3_attention(q_lora_rank, rope_interleave):
    tf = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    cfg = mla_cfg(q_lora_rank=q_lora_rank)
    hf_cfg = tf.DeepseekV3Config(
        hidden_size=H, num_attention_heads=NH, num_key_value_heads=NH, q_lora_rank=q_lora_rank or None,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        rope_interleave=rope_interleave, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    ref = ds.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norms too: ones would hide a swapped norm
            p.copy_(1.0 + 0.2 * torch.randn(p.shape) if p.dim() == 1 else 0.2 * torch.randn(p.shape))

    ours = MLAttention(cfg).eval()
    state = {k: mla_tensor_from_hf(cfg, "attn." + k, v, rope_interleave)
             for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)  # strict: same module names as transformers

    x = torch.randn(B, S, H)
    rotary = ds.DeepseekV3RotaryEmbedding(hf_cfg)
    position_embeddings = rotary(x, torch.arange(S)[None])
    causal = torch.full((S, S), float("-inf")).triu(1)[None, None]
    cos, sin = rope_cache(16, cfg.qk_rope_head_dim, cfg.rope_theta)
    with torch.no_grad():
        expected, _ = ref(x, position_embeddings=position_embeddings, attention_mask=causal)
        got = ours(x, cos, sin)
    assert (got - expected).abs().max() < 1e-5


def test_model_uses_mla_and_rope_cache_of_rope_dims():
    model = build_model(mla_cfg(), seed=0)
    assert isinstance(model.layers["0"].attn, MLAttention)
    assert model.rope_cos.shape == (16, 4)
    assert model(torch.randint(0, 64, (2, 16))).shape == (2, 16, 64)


@pytest.mark.parametrize("kw, message", [
    (dict(attention="mqa"), "model.attention must be gqa or mla"),
    (dict(kv_lora_rank=0), "kv_lora_rank > 0"),
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=3), "even"),
    (dict(v_head_dim=0), "v_head_dim > 0"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(qk_norm=True), "qk_norm"),
])
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(model=mla_cfg(**kw)))


def test_config_valid_and_tp_refused():
    validate(TrainConfig(model=mla_cfg()))
    validate(TrainConfig(model=mla_cfg(q_lora_rank=0, qk_nope_head_dim=0)))
    from megamoe.parallel.parallelize import check_model_config

    cfg = TrainConfig(model=mla_cfg())
    check_model_config(cfg, types.SimpleNamespace(tp=1, etp=1), False)
    with pytest.raises(ValueError, match="not tensor-parallel"):
        check_model_config(cfg, types.SimpleNamespace(tp=2, etp=1), False)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_flops_count_every_mla_matrix_once(q_lora_rank):
    """Dense MLA model: each weight matrix is one multiply-add per token (2 FLOPs), plus the
    causal half of scores (qk_head_dim) and values (v_head_dim) per head; x3 for training."""
    cfg = mla_cfg(q_lora_rank=q_lora_rank, moe=None)
    model = build_model(cfg)
    matrices = sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    qk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attention = cfg.num_layers * 2 * cfg.seq_length * NH * (qk + dv) / 2
    expected = 3 * (2 * matrices + attention + 2 * H * cfg.vocab_size)
    assert flops_per_token(cfg) == pytest.approx(expected)


def test_training_smoke(tmp_path):
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training

    cfg = TrainConfig(model=mla_cfg())
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = 3, 2, 2
    cfg.eval_interval, cfg.save_interval, cfg.log_interval = 0, 0, 1
    cfg.out_dir, cfg.resume, cfg.progress = str(tmp_path), False, False
    cfg.tensorboard, cfg.watchdog_s = False, 0
    validate(cfg)
    rows = [torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(i)).numpy()
            for i in range(8)]
    trainer = Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), rows)
    history = trainer.train()
    assert trainer.step == 3
    assert history and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
