"""The config dataclasses: one `TrainConfig` with its sections (see megamoe.config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256          # SwiGLU intermediate size of one expert
    # softmax_topk: softmax over all experts then top-k, no renorm (OLMoE)
    # topk_softmax: top-k of logits then softmax over the k (Mixtral, Qwen)
    # sigmoid_bias: sigmoid scores, per-expert bias used only for selection (DeepSeek-V3)
    router_mode: str = "softmax_topk"
    norm_topk_prob: bool = False      # renormalise the k weights (softmax_topk / sigmoid_bias)
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.0     # sigmoid_bias: bias += rate * sign(mean_load - load)
    lb_loss_coef: float = 0.01        # Switch/OLMoE load-balancing loss weight (alpha)
    z_loss_coef: float = 0.001        # router z-loss weight (beta)
    capacity_factor: float = 0.0      # 0 = dropless; > 0 drops tokens over capacity
    num_shared_experts: int = 0
    shared_expert_hidden: int = 0     # 0 -> num_shared_experts * expert_hidden
    shared_expert_gate: bool = False  # Qwen2-MoE style sigmoid gate on the shared output
    # auto (grouped_mm where torch runs it fast without host syncs: bf16 on sm90/sm100, CPU;
    # else loop) |
    # grouped_mm | loop | grouped_gemm (megablocks' package, only when configured)
    gemm_backend: str = "auto"
    moe_layer_freq: int = 1           # every n-th layer is MoE (1 = all)
    first_k_dense: int = 0            # the first k layers use a dense MLP
    # Group-limited routing (DeepSeek-V2/V3): experts form n_group equal groups; only the
    # topk_group best groups of a token are eligible for its top-k. A group's score is the sum
    # of its top-2 biased scores (sigmoid_bias, V3) or its best probability (softmax_topk, V2's
    # group_limited_greedy). 1 / 1 = off.
    n_group: int = 1
    topk_group: int = 1


@dataclass
class RopeScaling:
    """Long-context RoPE frequency scaling, as transformers' modeling_rope_utils defines it.

    llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp between
            (low_freq_factor, high_freq_factor, original_max_position_embeddings).
    yarn:   per-dimension blend of interpolated / extrapolated frequencies (beta_fast, beta_slow,
            truncate) and cos / sin scaled by attention_factor (None: derived from factor, mscale,
            mscale_all_dim); MLA also scales its softmax by mscale(factor, mscale_all_dim)^2.
    """
    type: str = "yarn"                # llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    low_freq_factor: float = 1.0      # llama3
    high_freq_factor: float = 4.0     # llama3
    beta_fast: float = 32.0           # yarn
    beta_slow: float = 1.0            # yarn
    mscale: float | None = None       # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: None -> derived
    truncate: bool = True             # yarn: round the correction range to whole dims


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0             # 0 -> num_heads (MHA)
    head_dim: int = 0                 # 0 -> d_model // num_heads
    # gqa: MHA/GQA with RoPE (Llama, OLMoE, Mixtral); mla: DeepSeek-V2/V3 Multi-head Latent
    # Attention, sized by the five fields below (unused by gqa; num_kv_heads / head_dim unused by mla)
    attention: str = "gqa"
    q_lora_rank: int = 0              # mla: low-rank query (q_a_proj -> norm -> q_b_proj); 0 -> q_proj
    kv_lora_rank: int = 0             # mla: width of the compressed, RMS-normalised KV latent
    qk_nope_head_dim: int = 0         # mla: per-head query/key dims without RoPE
    qk_rope_head_dim: int = 0         # mla: per-head query dims with RoPE (key part shared by heads)
    v_head_dim: int = 0               # mla: per-head value dim
    ffn_hidden: int = 512             # dense MLP intermediate size
    seq_length: int = 128
    norm: str = "rmsnorm"             # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_affine: bool = True          # False: no learnable norm weights (OLMo-1B's non-parametric LN)
    norm_impl: str = "auto"           # auto = torch (megamoe's RMSNorm) | apex (FusedRMSNorm, if configured)
    qk_norm: bool = False             # OLMoE: RMSNorm over the whole q and k projections
    # projection: one norm over all heads of q / k before the head split (OLMoE, OLMo2);
    # head: one norm of head_dim shared by the heads, per head (Qwen3, GLM-4.5 use_qk_norm)
    qk_norm_scope: str = "projection"
    # pre: x + f(norm(x)) (Llama, OLMoE); post: x + norm(f(x)), OLMo2's "reordered norm"
    norm_position: str = "pre"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    bias: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None -> dense model


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 0                       # 0 -> world_size / (tp * pp)
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    zero1: bool = False
    virtual_pp: int = 1
    pp_layout: str = ""               # e.g. "3,5": layers per stage (uneven allowed)
    backend: str = "auto"             # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 600
    # Expert parallelism: split each MoE layer's tokens into this many chunks so that one chunk's
    # all-to-all overlaps another chunk's expert GEMMs (same results; 1 = off). The shared
    # experts overlap the dispatch exchange either way.
    ep_overlap_chunks: int = 1
    # Data parallelism: gradient buckets (all-reduce, or ZeRO-1 reduce-scatter + parameter
    # all-gather) of this many elements, 0 = 2**24 (64 MiB of fp32); each bucket's reduction
    # starts as soon as its gradients are final in the last backward (overlap_grad_reduce).
    dp_bucket_numel: int = 0
    overlap_grad_reduce: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "cosine"          # cosine | linear | wsd | constant
    warmup_steps: int = 20
    decay_steps: int = 0              # wsd: length of the final decay (0 -> 20% of training)
    impl: str = "auto"                # auto = torch (AdamW, fused on GPU) | apex (FusedAdam, if configured)


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)   # indexed dataset prefixes (no .bin/.idx)
    weights: list[float] = field(default_factory=list)  # blending weights, one per path
    tokenizer: str = ""               # tokenizer.json / directory, or "byte"
    default_corpus: bool = True       # no paths: build the bundled Python-stdlib corpus
    corpus_docs: int = 0              # 0 = all stdlib files found; >0 limits the default corpus
    cache_dir: str = "data_cache"
    split: str = "98,2,0"             # train,valid,test shares of documents
    num_workers: int = 0
    # megamoe (each epoch shuffled on its own) | megatron (Megatron-Core's exact sample and blend
    # order: epochs shuffled together, a short last epoch apart, its blending formula)
    sample_order: str = "megamoe"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 8        # sequences per optimizer step (grad accumulation fills it)
    seed: int = 1234
    # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16; fp64 for tests only.
    # The policy (what runs in which dtype) is in megamoe/precision.py.
    dtype: str = "auto"
    activation_checkpointing: bool = False
    # selective: MoE blocks recompute attention + expert GEMMs, keeping router decisions and
    # the all-to-all outputs (no communication repeated in backward); full: whole blocks
    recompute: str = "selective"
    fp8: bool = False                 # Transformer Engine FP8 linears (needs transformer_engine)
    eval_interval: int = 50
    eval_iters: int = 4               # validation batches of global_batch_size samples
    log_interval: int = 10
    save_interval: int = 100
    out_dir: str = "runs/default"
    resume: bool = True               # continue from out_dir's newest complete checkpoint if present
    resume_from: str = ""             # a checkpoint directory to resume from instead (any layout)
    max_bad_steps: int = 5            # NaN/inf steps in a row before stopping
    progress: bool = True
    # Logging sinks besides metrics.jsonl (rank 0 only). TensorBoard event files go to
    # <out_dir>/tensorboard when the tensorboard package is importable (silently off otherwise);
    # W&B is used only when wandb_project is set (and wandb is installed).
    tensorboard: bool = True
    wandb_project: str = ""
    wandb_run_name: str = ""          # "" -> the out_dir's base name
    # Hang detection: a step (incl. its eval / checkpoint) running longer than watchdog_s prints
    # the stack traces of all threads; watchdog_abort then ends the process so the job fails
    # instead of idling until the time limit. 0 disables the watchdog.
    watchdog_s: int = 1800
    watchdog_abort: bool = False
