"""validate(): the whole config checked, a ValueError with one line saying what is wrong."""

from __future__ import annotations

from megamoe.config.schema import TrainConfig

# -------------------------------------------------------------------------------------- validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    m, p, o = cfg.model, cfg.parallel, cfg.optim
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_hidden", "seq_length"):
        _check(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0,
           f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({kv})")
    _check(m.attention in ("gqa", "mla"), f"model.attention must be gqa or mla, got {m.attention!r}")
    if m.attention == "mla":
        _check(m.kv_lora_rank > 0,
               f"model.attention mla needs model.kv_lora_rank > 0 (got {m.kv_lora_rank})")
        _check(m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0,
               "model.attention mla needs an even model.qk_rope_head_dim > 0 "
               f"(got {m.qk_rope_head_dim})")
        _check(m.qk_nope_head_dim >= 0 and m.q_lora_rank >= 0,
               "model.qk_nope_head_dim and model.q_lora_rank must be >= 0 "
               "(q_lora_rank 0 = no query LoRA)")
        _check(m.v_head_dim > 0, f"model.attention mla needs model.v_head_dim > 0 (got {m.v_head_dim})")
        _check(kv == m.num_heads, f"model.attention mla has one key/value per query head; leave "
               f"model.num_kv_heads 0 (got {m.num_kv_heads})")
        _check(not m.qk_norm and not m.qkv_bias and not m.bias,
               "model.attention mla has no qk_norm / qkv_bias / bias "
               "(DeepSeek's latent norms replace them)")
    elif not m.head_dim:
        _check(m.d_model % m.num_heads == 0,
               f"model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads}) "
               "or set model.head_dim")
    _check(m.norm in ("rmsnorm", "layernorm"), f"model.norm must be rmsnorm or layernorm, got {m.norm!r}")
    _check(m.norm_affine or (not m.qk_norm and m.norm_impl != "apex"),
           "model.norm_affine false does not combine with model.qk_norm or model.norm_impl apex")
    _check(m.norm_position in ("pre", "post"),
           f"model.norm_position must be pre or post, got {m.norm_position!r}")
    _check(m.qk_norm_scope in ("projection", "head"),
           f"model.qk_norm_scope must be projection or head, got {m.qk_norm_scope!r}")
    if m.rope_scaling is not None:
        r = m.rope_scaling
        _check(r.type in ("llama3", "yarn"),
               f"model.rope_scaling.type must be llama3 or yarn, got {r.type!r}")
        _check(r.factor > 0 and r.original_max_position_embeddings > 0,
               "model.rope_scaling needs factor > 0 and original_max_position_embeddings > 0")
        _check(r.type != "llama3" or r.high_freq_factor > r.low_freq_factor > 0,
               "model.rope_scaling (llama3) needs high_freq_factor > low_freq_factor > 0")
    if m.moe is not None:
        e = m.moe
        _check(e.num_experts >= 1, f"model.moe.num_experts must be >= 1 (got {e.num_experts})")
        _check(1 <= e.top_k <= e.num_experts,
               f"model.moe.top_k ({e.top_k}) must be between 1 and model.moe.num_experts ({e.num_experts})")
        _check(e.expert_hidden > 0, f"model.moe.expert_hidden must be > 0 (got {e.expert_hidden})")
        _check(e.router_mode in ("softmax_topk", "topk_softmax", "sigmoid_bias"),
               f"model.moe.router_mode must be softmax_topk, topk_softmax or sigmoid_bias, got {e.router_mode!r}")
        _check(e.gemm_backend in ("auto", "grouped_mm", "loop", "grouped_gemm"),
               f"model.moe.gemm_backend must be auto, grouped_mm, loop or grouped_gemm, got {e.gemm_backend!r}")
        _check(e.capacity_factor >= 0, "model.moe.capacity_factor must be >= 0 (0 = dropless)")
        _check(e.moe_layer_freq >= 1, "model.moe.moe_layer_freq must be >= 1")
        _check(0 <= e.first_k_dense <= m.num_layers, "model.moe.first_k_dense must be in [0, num_layers]")
        _check(e.n_group >= 1 and 1 <= e.topk_group <= e.n_group
               and e.num_experts % e.n_group == 0,
               f"model.moe.n_group ({e.n_group}) must divide num_experts ({e.num_experts}) and "
               f"1 <= topk_group ({e.topk_group}) <= n_group")
        if e.n_group > 1:
            _check(e.router_mode in ("softmax_topk", "sigmoid_bias"),
                   "model.moe.n_group > 1 needs router_mode softmax_topk or sigmoid_bias")
            _check(e.top_k <= e.topk_group * (e.num_experts // e.n_group),
                   f"model.moe.top_k ({e.top_k}) exceeds the experts of topk_group groups")
            _check(e.router_mode != "sigmoid_bias" or e.num_experts // e.n_group >= 2,
                   "model.moe.n_group: sigmoid_bias scores a group by its top-2, so groups "
                   "need >= 2 experts")
        _check(e.num_experts % p.ep == 0,
               f"model.moe.num_experts ({e.num_experts}) must be divisible by parallel.ep ({p.ep})")
    _check(p.dp_bucket_numel >= 0, f"parallel.dp_bucket_numel must be >= 0 (0 = default), got {p.dp_bucket_numel}")
    for name in ("tp", "pp", "ep", "etp", "virtual_pp", "ep_overlap_chunks"):
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1 (got {getattr(p, name)})")
    _check(m.num_heads % p.tp == 0,
           f"model.num_heads ({m.num_heads}) must be divisible by parallel.tp ({p.tp})")
    _check(kv % p.tp == 0, f"model.num_kv_heads ({kv}) must be divisible by parallel.tp ({p.tp})")
    _check(m.vocab_size % p.tp == 0,
           f"model.vocab_size ({m.vocab_size}) must be divisible by parallel.tp ({p.tp}); pad the vocabulary")
    _check(m.ffn_hidden % p.tp == 0,
           f"model.ffn_hidden ({m.ffn_hidden}) must be divisible by parallel.tp ({p.tp})")
    if p.sequence_parallel:
        _check(m.seq_length % p.tp == 0,
               f"model.seq_length ({m.seq_length}) must be divisible by parallel.tp ({p.tp}) with sequence_parallel")
    _check(o.schedule in ("cosine", "linear", "wsd", "constant"),
           f"optim.schedule must be cosine, linear, wsd or constant, got {o.schedule!r}")
    _check(o.lr > 0, f"optim.lr must be > 0 (got {o.lr})")
    _check(o.impl in ("auto", "torch", "apex"), f"optim.impl must be auto, torch or apex, got {o.impl!r}")
    _check(m.norm_impl in ("auto", "torch", "apex"),
           f"model.norm_impl must be auto, torch or apex, got {m.norm_impl!r}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    _check(cfg.steps >= 1, f"steps must be >= 1 (got {cfg.steps})")
    _check(cfg.micro_batch_size >= 1, "micro_batch_size must be >= 1")
    _check(cfg.recompute in ("selective", "full"),
           f"recompute must be selective or full, got {cfg.recompute!r}")
    _check(cfg.dtype in ("auto", "fp32", "bf16", "fp64"),
           f"dtype must be auto, fp32 or bf16 (fp64 for tests), got {cfg.dtype!r}")
    _check(cfg.watchdog_s >= 0, f"watchdog_s must be >= 0 (0 = off), got {cfg.watchdog_s}")
    _check(p.timeout_s > 0, f"parallel.timeout_s must be > 0 seconds, got {p.timeout_s}")
    _check(cfg.data.sample_order in ("megamoe", "megatron"),
           f"data.sample_order must be megamoe or megatron, got {cfg.data.sample_order!r}")
    if cfg.data.weights:
        _check(len(cfg.data.weights) == len(cfg.data.paths),
               f"data.weights has {len(cfg.data.weights)} entries but data.paths has {len(cfg.data.paths)}")
        _check(all(w >= 0 for w in cfg.data.weights) and sum(cfg.data.weights) > 0,
               "data.weights must be non-negative and not all zero")
    if world_size is not None:
        model_par = p.tp * p.pp
        _check(world_size % model_par == 0,
               f"world size {world_size} is not divisible by parallel.tp*parallel.pp ({model_par})")
        dp = p.dp or world_size // model_par
        _check(dp * model_par == world_size,
               f"parallel.dp ({dp}) * tp ({p.tp}) * pp ({p.pp}) != world size ({world_size})")
        _check((dp * p.tp) % (p.ep * p.etp) == 0,
               f"parallel.ep*etp ({p.ep * p.etp}) must divide dp*tp ({dp * p.tp})")
        _check(cfg.global_batch_size % (cfg.micro_batch_size * dp) == 0,
               f"global_batch_size ({cfg.global_batch_size}) must be divisible by "
               f"micro_batch_size*dp ({cfg.micro_batch_size * dp})")
    else:
        _check(cfg.global_batch_size % cfg.micro_batch_size == 0,
               f"global_batch_size ({cfg.global_batch_size}) must be divisible by "
               f"micro_batch_size ({cfg.micro_batch_size})")
