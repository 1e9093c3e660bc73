"""Typed configuration: dataclasses, presets, YAML files and dotted command-line overrides.

A run is described by one `TrainConfig` holding the sections below. Load order:
preset (``preset: tiny`` in YAML or ``--preset``) -> YAML file -> ``--section.field value`` overrides.
`validate()` checks the whole thing and raises `ValueError` with one line saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


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


# ------------------------------------------------------------------------------ dict <-> dataclass

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> tuple[bool, Any]:
    """(True, cls) if `tp` is a dataclass type or Optional[dataclass]."""
    if dataclasses.is_dataclass(tp):
        return True, tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return True, arg
    return False, None


def _coerce(value, tp, where: str):
    """Convert a YAML / command-line value to the annotated type, or raise a one-line error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, base=None, where: str = ""):
    """Build `cls` from a (partial) dict on top of `base` (defaults if None)."""
    obj = base if base is not None else cls()
    hints = _hints(cls)
    for key, value in (data or {}).items():
        path = f"{where}{key}"
        if key not in hints:
            known = ", ".join(hints)
            raise ValueError(f"unknown config key {path!r}; known keys here: {known}")
        is_dc, sub_cls = _is_dataclass_type(hints[key])
        if is_dc and (isinstance(value, dict)):
            current = getattr(obj, key)
            setattr(obj, key, from_dict(sub_cls, value, current if current is not None else sub_cls(),
                                        f"{path}."))
        elif is_dc and value is None:
            setattr(obj, key, None)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))
    return obj


def apply_override(cfg: TrainConfig, dotted: str, value: str) -> None:
    """Set ``cfg.<dotted>`` from a command-line string (``model.moe.num_experts`` -> 16)."""
    parts = dotted.split(".")
    nested: dict = {}
    cursor = nested
    for p in parts[:-1]:
        cursor[p] = {}
        cursor = cursor[p]
    cursor[parts[-1]] = yaml.safe_load(value) if value not in ("",) else ""
    # YAML turns "1e-3" into a string and "3,4" into a string: both are coerced by type below.
    from_dict(TrainConfig, nested, base=cfg)


def load(path: str | None = None, overrides: list[str] | None = None,
         preset_name: str | None = None) -> TrainConfig:
    """Preset -> YAML file -> dotted overrides (``["--model.d_model", "256", ...]``)."""
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} not found") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at top level")
    name = preset_name or data.pop("preset", None)
    data.pop("preset", None)
    cfg = preset(name) if name else TrainConfig()
    cfg = from_dict(TrainConfig, data, base=cfg)
    for key, value in parse_overrides(overrides or []):
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b 3 --c=4`` -> [("a.b", "3"), ("c", "4")]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --model.d_model 256")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override {arg!r} needs a value")
            value = argv[i + 1]
            i += 2
        out.append((key, value))
    return out


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
