"""Tiny models of every supported HF type, built locally (no downloads), and comparison helpers."""

import torch

from megamoe.config import ModelConfig, MoEConfig, RopeScaling, TrainConfig, to_dict
from megamoe.model.transformer import build_model
from megamoe.checkpoint import save_checkpoint

VOCAB, SEQ = 96, 16
# Long-context RoPE of the tiny models: a pretraining context of 8 stretched 4x, so both the
# interpolated and the extrapolated frequencies (and yarn's mscale) show in 16-token inputs.
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=8.0, beta_slow=1.0)
YARN_MLA = dict(YARN, mscale=1.0, mscale_all_dim=0.7)   # DeepSeek: mscale ratio + softmax mscale
LLAMA3 = dict(type="llama3", factor=4.0, original_max_position_embeddings=8, low_freq_factor=1.0,
              high_freq_factor=4.0)


def hf_rope(scaling: dict, theta: float = 10000.0) -> dict:
    """transformers' rope_parameters of a megamoe RopeScaling-style dict."""
    out = {k: v for k, v in scaling.items() if k != "type"}
    return {"rope_type": scaling["type"], "rope_theta": theta, **out}

_BASE = dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, ffn_hidden=48, seq_length=SEQ,
             init_std=0.1)

# One megamoe config per HF model type, exercising that type's features (GQA, head_dim !=
# d_model / heads, biases, tied embeddings, QK-norm, post-norm, shared experts, dense layers,
# router modes, routed scaling).
MEGAMOE_CONFIGS = {
    "llama": lambda: ModelConfig(**_BASE, num_kv_heads=2, bias=True, tie_embeddings=True, moe=None),
    "olmo2": lambda: ModelConfig(**_BASE, num_kv_heads=2, qk_norm=True, norm_position="post", moe=None),
    "olmoe": lambda: ModelConfig(**_BASE, qk_norm=True,
                                 moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16)),
    "mixtral": lambda: ModelConfig(**_BASE, num_kv_heads=2, head_dim=16, rope_theta=1e6,
                                   moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16,
                                                 router_mode="topk_softmax")),
    "qwen2_moe": lambda: ModelConfig(**_BASE, qkv_bias=True, moe=MoEConfig(
        num_experts=4, top_k=2, expert_hidden=16, norm_topk_prob=True, num_shared_experts=1,
        shared_expert_hidden=24, shared_expert_gate=True, first_k_dense=1)),
    "glm4_moe": lambda: ModelConfig(**_BASE, num_kv_heads=2, qkv_bias=True, moe=MoEConfig(
        num_experts=4, top_k=2, expert_hidden=16, router_mode="sigmoid_bias", norm_topk_prob=True,
        routed_scaling_factor=2.5, num_shared_experts=1, first_k_dense=1)),
    # MLA with query LoRA, nope != v head dims, DeepSeek-V3 routing with expert groups, yarn
    # RoPE, tied embeddings.
    "deepseek_v3": lambda: ModelConfig(
        **_BASE, attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, tie_embeddings=True, rope_scaling=RopeScaling(**YARN_MLA),
        moe=MoEConfig(num_experts=8, top_k=3, expert_hidden=16, router_mode="sigmoid_bias",
                      norm_topk_prob=True, routed_scaling_factor=2.5, num_shared_experts=2,
                      first_k_dense=1, n_group=4, topk_group=2)),
    # Per-head QK-norm, GQA, head_dim != d_model / heads, yarn, a dense layer.
    "qwen3_moe": lambda: ModelConfig(
        **_BASE, num_kv_heads=2, head_dim=16, qk_norm=True, qk_norm_scope="head",
        rope_scaling=RopeScaling(**YARN), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16,
                                                        norm_topk_prob=True, first_k_dense=1)),
    # MLA without query LoRA, softmax group-limited routing, routed scaling, yarn.
    "deepseek_v2": lambda: ModelConfig(
        **_BASE, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, rope_scaling=RopeScaling(**YARN_MLA), moe=MoEConfig(
            num_experts=8, top_k=3, expert_hidden=16, routed_scaling_factor=2.0,
            num_shared_experts=2, first_k_dense=1, n_group=4, topk_group=2)),
}

_HF_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=32, initializer_range=0.1, rms_norm_eps=1e-5,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)


def hf_config(model_type: str):
    """A tiny transformers config of `model_type` (transformers imported by the caller's test)."""
    import transformers as tf

    c = dict(_HF_COMMON)
    if model_type == "llama":
        return tf.LlamaConfig(**c, intermediate_size=48, num_key_value_heads=2, attention_bias=True,
                              mlp_bias=True, tie_word_embeddings=True)
    if model_type == "olmo2":
        return tf.Olmo2Config(**c, intermediate_size=48, num_key_value_heads=2)
    if model_type == "olmoe":
        return tf.OlmoeConfig(**c, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=False)
    if model_type == "mixtral":
        return tf.MixtralConfig(**c, intermediate_size=16, num_key_value_heads=2, head_dim=16,
                                num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                 num_key_value_heads=2,
                                 mlp_only_layers=[0], norm_topk_prob=True, qkv_bias=True)
    if model_type == "glm4_moe":
        return tf.Glm4MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2,
                                n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                first_k_dense_replace=1, routed_scaling_factor=2.5, attention_bias=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 1.0})
    if model_type == "deepseek_v3":  # rope_interleave defaults to true: rows get de-interleaved
        return tf.DeepseekV3Config(**c, intermediate_size=48, moe_intermediate_size=16,
                                   num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                                   num_experts_per_tok=3,
                                   n_group=4, topk_group=2, first_k_dense_replace=1,
                                   routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16,
                                   qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
                                   rope_parameters=hf_rope(YARN_MLA))
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                 num_experts_per_tok=2, num_key_value_heads=2, head_dim=16,
                                 mlp_only_layers=[0], norm_topk_prob=True, rope_parameters=hf_rope(YARN))
    if model_type == "deepseek_v2":
        return tf.DeepseekV2Config(**c, intermediate_size=48, moe_intermediate_size=16,
                                   num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                                   num_experts_per_tok=3, topk_method="group_limited_greedy",
                                   n_group=4, topk_group=2, first_k_dense_replace=1,
                                   routed_scaling_factor=2.0, q_lora_rank=12, kv_lora_rank=16,
                                   qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
                                   rope_parameters=hf_rope(YARN_MLA))
    raise KeyError(model_type)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, router_bias: bool) -> None:
    """Give norms / biases (and the router selection bias) non-trivial values: fresh models have
    ones and zeros there, which would hide a swapped or missing tensor."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            scale, offset = (0.1, 0.0) if name.endswith("bias") else (0.2, 1.0)
            p.copy_(offset + scale * torch.randn(p.shape, generator=g))
    if router_bias:
        for name, b in model.named_buffers():
            if name.endswith(("expert_bias", "e_score_correction_bias")):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def megamoe_model(model_type: str, seed: int = 0):
    cfg = MEGAMOE_CONFIGS[model_type]()
    model = build_model(cfg, seed=seed)
    perturb(model, seed + 1, router_bias=cfg.moe is not None and cfg.moe.router_mode == "sigmoid_bias")
    return cfg, model.eval()


def save_megamoe(out_dir, cfg, model, step: int = 3) -> str:
    """A megamoe checkpoint as the trainer writes it (model.pt + config.yaml)."""
    return save_checkpoint(str(out_dir), step, {"model.pt": model.state_dict()},
                           config=to_dict(TrainConfig(model=cfg)))


def dense_llama(seed: int = 0):
    """(config, eval-mode model) of a small dense llama-style megamoe model with perturbed weights:
    the source of the upcycling tests."""
    cfg = ModelConfig(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      ffn_hidden=64, seq_length=16, init_std=0.1, moe=None)
    model = build_model(cfg, seed=seed)
    perturb(model, seed + 1, router_bias=False)
    return cfg, model.eval()


def random_hf(config, seed: int = 0):
    """A transformers model of `config` with seeded, perturbed weights (eager attention)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    perturb(model, seed + 1, router_bias=True)
    return model.eval()


def megamoe_from(out_dir):
    """(ModelConfig, eval-mode model) of a megamoe checkpoint / out_dir."""
    from megamoe.hf.io import load_megamoe_state

    cfg, state = load_megamoe_state(str(out_dir))
    model = build_model(cfg)
    model.load_state_dict(state)
    return cfg, model.eval()


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def load_hf(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                       dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------- parallel checkpoint worker

def parallel_train_config(out_dir: str):
    """TP2 x EP2 on 2 ranks (experts split over the TP ranks), sequence parallel, tiny OLMoE."""
    cfg = TrainConfig(model=MEGAMOE_CONFIGS["olmoe"]())
    cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.sequence_parallel = 2, 2, True
    cfg.parallel.backend = "gloo"
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = 2, 2, 2
    cfg.eval_interval, cfg.save_interval, cfg.log_interval = 0, 0, 0
    cfg.out_dir, cfg.resume, cfg.progress = out_dir, False, False
    cfg.tensorboard, cfg.watchdog_s = False, 0
    return cfg


def parallel_save_worker(rank: int, world_size: int, port: int, out_dir: str, result_path: str):
    """Spawned: build the TP2xEP2 model, save a sharded checkpoint at step 0, train 2 steps, save
    again; rank 0 writes every parameter reassembled from the live shards to result_path."""
    import os

    import torch.distributed as dist

    from megamoe.parallel.params import get_spec, place_shard
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    cfg = parallel_train_config(out_dir)
    run = build_training(cfg, verbose=False)
    model = run.model
    rows = [torch.randint(0, VOCAB, (SEQ + 1,), generator=torch.Generator().manual_seed(i)).numpy()
            for i in range(8)]
    trainer = Trainer(run, rows)
    trainer.save()                      # step 0: the sharded initial weights
    trainer.train()                     # steps 1-2, saved at the end
    local = {n: (p.detach().clone(), get_spec(p)) for n, p in model.named_parameters()}
    everything = [None] * world_size
    dist.all_gather_object(everything, local)
    if rank == 0:
        full = {}
        for shards in everything:
            for name, (t, spec) in shards.items():
                full.setdefault(name, torch.zeros(spec.global_shape, dtype=t.dtype))
                place_shard(full[name], t, spec.index)
        torch.save(full, result_path)
    run.ctx.shutdown()
