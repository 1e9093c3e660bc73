"""The published architectures as TrainConfig presets (`--preset NAME`, `preset: NAME`)."""

from __future__ import annotations

from megamoe.config.schema import ModelConfig, MoEConfig, OptimConfig, TrainConfig

# ---------------------------------------------------------------------------------------- presets
# The published architectures (config.json on the Hugging Face Hub / the papers); their sizes
# are tested against the published totals in tests/test_config.py. What differs on purpose
# is said next to each preset and in the README ("Presets"). Batch sizes, learning rates and
# warmups are training choices (the papers' where published).

def _tiny() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, ffn_hidden=512,
                          seq_length=128, qk_norm=True,
                          moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=256)),
        optim=OptimConfig(lr=3e-3, warmup_steps=20), steps=300, micro_batch_size=16,
        global_batch_size=16, out_dir="runs/tiny")


def _olmoe_1b_7b() -> TrainConfig:
    # allenai/OLMoE-1B-7B-0924: 6.92B parameters, 1.28B active. ffn_hidden is unused (every
    # layer is MoE).
    return TrainConfig(
        model=ModelConfig(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16,
                          ffn_hidden=8192, seq_length=4096, qk_norm=True,
                          moe=MoEConfig(num_experts=64, top_k=8, expert_hidden=1024,
                                        router_mode="softmax_topk", lb_loss_coef=0.01,
                                        z_loss_coef=0.001)),
        optim=OptimConfig(lr=4e-4, weight_decay=0.1, warmup_steps=2000, clip_grad=1.0),
        micro_batch_size=1, global_batch_size=1024, out_dir="runs/olmoe-1b-7b")


def _mixtral_8x7b() -> TrainConfig:
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active. On purpose: seq_length 4096
    # (the model's context is 32768; set model.seq_length for long-context training).
    return TrainConfig(
        model=ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, ffn_hidden=14336, seq_length=4096, rope_theta=1e6,
                          moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=14336,
                                        router_mode="topk_softmax", lb_loss_coef=0.02,
                                        z_loss_coef=0.0)),
        optim=OptimConfig(lr=1e-4, warmup_steps=2000), micro_batch_size=1,
        global_batch_size=1024, out_dir="runs/mixtral-8x7b")


def _deepseek_moe_16b() -> TrainConfig:
    # deepseek-ai/deepseek-moe-16b-base: 16.4B parameters, 2.8B active. On purpose: the
    # load-balancing loss is taken over each micro-batch, not per sequence (DeepSeek's seq_aux).
    return TrainConfig(
        model=ModelConfig(vocab_size=102400, d_model=2048, num_layers=28, num_heads=16,
                          ffn_hidden=10944, seq_length=4096, norm_eps=1e-6,
                          moe=MoEConfig(num_experts=64, top_k=6, expert_hidden=1408,
                                        router_mode="softmax_topk", num_shared_experts=2,
                                        first_k_dense=1, lb_loss_coef=0.001, z_loss_coef=0.0)),
        optim=OptimConfig(lr=4.2e-4, warmup_steps=2000), micro_batch_size=1,
        global_batch_size=4608, out_dir="runs/deepseek-moe-16b")


def _olmo_1b() -> TrainConfig:
    # allenai/OLMo-1B: 1.18B parameters; tied embeddings, LayerNorm without learnable weights
    # ("non-parametric"), 2048-token sequences, ~4M tokens per batch (2048 x 2048).
    return TrainConfig(
        model=ModelConfig(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16,
                          ffn_hidden=8192, seq_length=2048, norm="layernorm", norm_affine=False,
                          tie_embeddings=True, moe=None),
        optim=OptimConfig(lr=4e-4, warmup_steps=2000), micro_batch_size=1,
        global_batch_size=2048, out_dir="runs/olmo-1b")


PRESETS = {"tiny": _tiny, "olmoe-1b-7b": _olmoe_1b_7b, "mixtral-8x7b": _mixtral_8x7b,
           "deepseek-moe-16b": _deepseek_moe_16b, "olmo-1b": _olmo_1b}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
