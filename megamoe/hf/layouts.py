"""The Hugging Face model types megamoe converts to and from, and how their tensors are named.

Each supported `model_type` is a `Layout`: where the MoE block lives, how experts and shared
experts are named, where the norms sit, plus two config translators (megamoe `ModelConfig` <->
the fields of the transformers config class). Both translators refuse, with a one-line
ValueError, anything megamoe cannot represent exactly, so a conversion that succeeds computes the
same function on both sides.

Tensor names are derived rather than listed: `hf_name()` rewrites a megamoe parameter name into
its HF name, so the mapping follows whatever modules the megamoe config builds (dense or MoE
layers, shared experts, biases, QK-norm). Expert weights are the one non 1:1 case:
  megamoe  ffn.experts.w_gate_up [E, H, 2I] (gate | up on the last dim), w_down [E, I, H]
  HF disk  experts.{e}.{gate,up}_proj.weight [I, H], experts.{e}.down_proj.weight [H, I]
  HF 5.x in memory  experts.gate_up_proj [E, 2I, H] (gate rows first), experts.down_proj [E, H, I]

Semantics checked against transformers 5.x (see DESIGN.md, "Routing semantics"):
  olmoe      softmax over all experts, top-k, optional renormalisation (norm_topk_prob);
             QK-norm = RMSNorm over the whole q / k projection; attention_bias covers q,k,v,o.
  mixtral    softmax, top-k, always renormalised == megamoe topk_softmax; GQA; no biases.
  qwen2_moe  as olmoe without QK-norm, plus one shared expert behind a sigmoid gate
             (out += sigmoid(x g) * shared(x)); q/k/v biases (qkv_bias); dense layers through
             mlp_only_layers / decoder_sparse_step.
  glm4_moe   DeepSeek-V3 routing (sigmoid scores, e_score_correction_bias for selection only,
             optional renormalisation, routed_scaling_factor, first_k_dense_replace, shared
             experts without gate) on standard GQA attention: megamoe `sigmoid_bias` models
             with attention "gqa".
  deepseek_v3  the same routing with Multi-head Latent Attention (megamoe attention "mla");
             rotary rows are stored interleaved (rope_interleave); group-limited routing
             (n_group / topk_group). Both: layouts_deepseek.py.
  deepseek_v2  MLA with softmax routing (greedy or group_limited_greedy), routed_scaling_factor,
             ungated shared experts, first_k_dense_replace (layouts_deepseek.py).
  deepseek   DeepSeek-MoE (remote code, no transformers class): MHA/GQA, softmax top-k without
             renormalisation, ungated shared experts (layouts_deepseek.py).
  qwen3_moe  softmax top-k (norm_topk_prob), no shared expert, per-head QK-norm (megamoe
             qk_norm_scope "head"), attention_bias covers q,k,v,o, dense layers as qwen2_moe.
  llama      dense, pre-norm; attention_bias (q,k,v,o) and mlp_bias both == megamoe `bias`.
RoPE: llama3 / yarn scaling converts for llama, qwen3_moe, deepseek_v2, deepseek_v3
(layouts_rope.py; computed by megamoe/model/rope.py); other types take default RoPE only.
  olmo2      dense, post-norm ("reordered norm": x + norm(f(x))) == megamoe
             norm_position "post"; whole-projection QK-norm; no biases.
Training-only settings: router_aux_loss_coef <-> lb_loss_coef one to one, as DESIGN.md's presets
do (transformers' loss function sums over the k choices, K times megamoe's value; the published
coefficient is kept rather than rescaled). z-loss and bias-update rates are not in HF configs;
imports use the family's published values (see the *_from_hf functions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from megamoe.config import ModelConfig, MoEConfig
from megamoe.hf.layouts_deepseek import (deepseek_from_hf, deepseek_to_hf, deepseek_v2_from_hf,
                                         deepseek_v2_to_hf, deepseek_v3_from_hf, deepseek_v3_to_hf,
                                         glm4_moe_from_hf, glm4_moe_to_hf)
from megamoe.hf.layouts_deepseek import need as _need
from megamoe.hf.layouts_qwen import (qwen2_moe_from_hf, qwen2_moe_to_hf, qwen3_moe_from_hf,
                                     qwen3_moe_to_hf)
from megamoe.hf.layouts_rope import check_rope_to_hf, rope_from_hf, rope_to_hf


@dataclass(frozen=True)
class Layout:
    model_type: str
    architecture: str                   # transformers class named in config.json
    moe_block: str | None = None        # module of the MoE block inside a layer; None: dense type
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_experts: str | None = None   # module name of the shared expert(s)
    router_bias: bool = False           # DeepSeek-V3 e_score_correction_bias
    norm_position: str = "pre"
    qk_norm: bool | None = False        # None: optional (glm4_moe's use_qk_norm)
    qk_norm_scope: str = "projection"   # megamoe ModelConfig.qk_norm_scope when qk_norm
    attention: str = "gqa"              # megamoe ModelConfig.attention of the type
    # Alternative block names met on disk / in memory, renamed to `moe_block` when reading.
    block_aliases: tuple[str, ...] = ()
    scaled_routing: bool = False        # routed_scaling_factor exists (any router mode)
    # config.json field counting the multi-token-prediction layers stored after the
    # num_hidden_layers decoder layers (dropped on import); None: the type has none, so extra
    # layers in the weights are an error.
    mtp_layers: str | None = None
    # HF tensor-name suffixes the transformers class keeps fp32 whatever the checkpoint dtype
    # (its _keep_in_fp32_modules_strict: DeepSeek routers); an export keeps them fp32.
    keep_fp32: tuple[str, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.moe_block is not None

    @property
    def norm_names(self) -> tuple[str, str]:
        """HF names of megamoe's (attn_norm, ffn_norm)."""
        if self.norm_position == "post":
            return "post_attention_layernorm", "post_feedforward_layernorm"
        return "input_layernorm", "post_attention_layernorm"


LAYOUTS = {
    "llama": Layout("llama", "LlamaForCausalLM"),
    "olmo2": Layout("olmo2", "Olmo2ForCausalLM", norm_position="post", qk_norm=True),
    "olmoe": Layout("olmoe", "OlmoeForCausalLM", moe_block="mlp", qk_norm=True),
    "mixtral": Layout("mixtral", "MixtralForCausalLM", moe_block="block_sparse_moe",
                      expert_names=("w1", "w3", "w2"), block_aliases=("mlp",)),
    "qwen2_moe": Layout("qwen2_moe", "Qwen2MoeForCausalLM", moe_block="mlp",
                        shared_experts="shared_expert"),
    "qwen3_moe": Layout("qwen3_moe", "Qwen3MoeForCausalLM", moe_block="mlp", qk_norm=True,
                        qk_norm_scope="head"),
    "glm4_moe": Layout("glm4_moe", "Glm4MoeForCausalLM", moe_block="mlp", qk_norm=None,
                       qk_norm_scope="head", shared_experts="shared_experts", router_bias=True,
                       scaled_routing=True, mtp_layers="num_nextn_predict_layers",
                       keep_fp32=("mlp.gate.e_score_correction_bias", "mlp.gate.weight")),
    "deepseek_v3": Layout("deepseek_v3", "DeepseekV3ForCausalLM", moe_block="mlp",
                          shared_experts="shared_experts", router_bias=True, attention="mla",
                          scaled_routing=True, mtp_layers="num_nextn_predict_layers",
                          keep_fp32=("mlp.gate.e_score_correction_bias", "mlp.gate.weight")),
    "deepseek_v2": Layout("deepseek_v2", "DeepseekV2ForCausalLM", moe_block="mlp",
                          shared_experts="shared_experts", attention="mla", scaled_routing=True,
                          keep_fp32=("mlp.gate.weight",)),
    "deepseek": Layout("deepseek", "DeepseekForCausalLM", moe_block="mlp",
                       shared_experts="shared_experts"),
}

# Refused types, with the reason (checked before anything else).
UNSUPPORTED: dict[str, str] = {}


def mtp_layer_count(layout: Layout, hf_config: dict | None) -> int:
    """Multi-token-prediction layers a checkpoint of this type may hold after its decoder layers
    (config.json's num_nextn_predict_layers / num_mtp_layers for deepseek_v3, glm4_moe; else 0)."""
    if layout.mtp_layers is None or not hf_config:
        return 0
    return int(hf_config.get(layout.mtp_layers) or hf_config.get("num_mtp_layers") or 0)


def get_layout(model_type: str) -> Layout:
    if model_type in UNSUPPORTED:
        raise ValueError(UNSUPPORTED[model_type])
    if model_type not in LAYOUTS:
        raise ValueError(f"unsupported Hugging Face model type {model_type!r}; supported: "
                         f"{', '.join(LAYOUTS)}")
    return LAYOUTS[model_type]


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF model type that fits a megamoe config best (the converter still validates it)."""
    moe = cfg.moe
    if cfg.attention == "mla":
        return "deepseek_v3" if moe is None or moe.router_mode == "sigmoid_bias" else "deepseek_v2"
    if moe is None:
        return "olmo2" if cfg.norm_position == "post" or cfg.qk_norm else "llama"
    if moe.router_mode == "sigmoid_bias":
        return "glm4_moe"
    if cfg.qk_norm and cfg.qk_norm_scope == "head":
        return "qwen3_moe"
    if moe.num_shared_experts > 0 and not moe.shared_expert_gate:
        return "deepseek"
    if moe.num_shared_experts > 0 or moe.first_k_dense > 0 or moe.moe_layer_freq > 1:
        return "qwen2_moe"
    if cfg.qk_norm:
        return "olmoe"
    return "mixtral"


# ------------------------------------------------------------------------------ tensor names

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
EXPERT_TENSORS = ("ffn.experts.w_gate_up", "ffn.experts.w_down")


def is_expert_tensor(name: str) -> bool:
    return name.endswith(EXPERT_TENSORS)


def layer_prefix(i: int | str) -> str:
    return f"model.layers.{i}."


def hf_name(layout: Layout, name: str) -> str | None:
    """HF name of a megamoe tensor; None for tensors the HF type does not store (a zero router
    bias of a softmax router). Expert tensors are not 1:1; see `experts_to_hf`."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"megamoe tensor {name!r} has no Hugging Face counterpart")
    i, rest = m.groups()
    pre = layer_prefix(i)
    block = f"{pre}{layout.moe_block}."
    attn_norm, ffn_norm = layout.norm_names
    if rest.startswith("attn."):
        return pre + "self_attn." + rest[len("attn."):]
    if rest.startswith("attn_norm."):
        return pre + attn_norm + rest[len("attn_norm"):]
    if rest.startswith("ffn_norm."):
        return pre + ffn_norm + rest[len("ffn_norm"):]
    if rest == "ffn.router.weight":
        return block + "gate.weight"
    if rest == "ffn.router.expert_bias":
        return block + "gate.e_score_correction_bias" if layout.router_bias else None
    if rest.startswith("ffn.shared_experts.") and layout.shared_experts:
        return block + layout.shared_experts + rest[len("ffn.shared_experts"):]
    if rest.startswith("ffn.shared_expert_gate."):
        return block + "shared_expert_gate" + rest[len("ffn.shared_expert_gate"):]
    if rest.startswith("ffn.") and not rest.startswith(("ffn.router", "ffn.experts", "ffn.shared")):
        return pre + "mlp." + rest[len("ffn."):]  # dense SwiGLU layer
    raise ValueError(f"megamoe tensor {name!r} has no counterpart in a {layout.model_type} checkpoint")


def expert_keys(layout: Layout, layer: int | str, e: int) -> tuple[str, str, str]:
    """HF per-expert weight names (gate, up, down) of expert e in a layer."""
    base = f"{layer_prefix(layer)}{layout.moe_block}.experts.{e}."
    return tuple(f"{base}{n}.weight" for n in layout.expert_names)


def fused_expert_keys(layout: Layout, layer: int | str) -> tuple[str, str]:
    """transformers 5.x in-memory names (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    base = f"{layer_prefix(layer)}{layout.moe_block}.experts."
    return base + "gate_up_proj", base + "down_proj"


# ---------------------------------------------------------------------------- config helpers

def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


def _check_common_megamoe(cfg: ModelConfig, layout: Layout) -> None:
    t = layout.model_type
    _need(cfg.norm == "rmsnorm", f"{t} uses RMSNorm; this model has norm={cfg.norm!r}")
    # OLMo-1B's non-parametric norm (HF model type "olmo") has no layout here.
    _need(cfg.norm_affine, f"{t} has learnable norm weights; this model has norm_affine=False")
    _need(layout.is_moe == (cfg.moe is not None),
          f"{t} is {'an MoE' if layout.is_moe else 'a dense'} model type but this model is "
          f"{'dense (model.moe is None)' if cfg.moe is None else 'MoE'}; choose another --model-type")
    _need(cfg.norm_position == layout.norm_position,
          f"{t} places norms {'after' if layout.norm_position == 'post' else 'before'} each sublayer "
          f"but this model has norm_position={cfg.norm_position!r}")
    kind = "Multi-head Latent Attention (mla)" if layout.attention == "mla" else "standard (gqa) attention"
    _need(cfg.attention == layout.attention,
          f"{t} uses {kind} but this model has attention={cfg.attention!r}"
          + ("; use deepseek_v3" if cfg.attention == "mla" else ""))
    scope = "per-head" if layout.qk_norm_scope == "head" else "whole-projection"
    _need(cfg.qk_norm == layout.qk_norm if layout.qk_norm is not None else True,
          f"{t} {'always has' if layout.qk_norm else 'has no'} {scope} QK-norm but this model "
          f"has qk_norm={cfg.qk_norm}")
    _need(not cfg.qk_norm or cfg.qk_norm_scope == layout.qk_norm_scope,
          f"{t} has {scope} QK-norm but this model "
          f"has qk_norm={cfg.qk_norm}, qk_norm_scope={cfg.qk_norm_scope!r}")
    check_rope_to_hf(cfg, t)
    if cfg.moe is not None:
        moe = cfg.moe
        _need(moe.router_mode != "sigmoid_bias" or layout.router_bias,
              f"{t} has no sigmoid router with selection bias (router_mode sigmoid_bias); use glm4_moe")
        _need(moe.router_mode == "sigmoid_bias" or not layout.router_bias,
              f"{t} routes with sigmoid scores; this model uses router_mode={moe.router_mode!r}")
        if not layout.scaled_routing:
            _need(moe.routed_scaling_factor == 1.0,
                  f"{t} has no routed_scaling_factor; this model uses {moe.routed_scaling_factor}")
        _need(moe.n_group == 1 or t in ("glm4_moe", "deepseek_v3", "deepseek_v2"),
              f"{t} has no group-limited routing; this model has n_group={moe.n_group}")


def _common_to_hf(cfg: ModelConfig, layout: Layout) -> dict:
    return {
        "architectures": [layout.architecture],
        "model_type": layout.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "head_dim": _head_dim(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_length,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 5.x reads rope_parameters; 4.x reads rope_theta / rope_scaling.
        **rope_to_hf(cfg),
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def _llama_to_hf(cfg: ModelConfig, layout: Layout) -> dict:
    _need(not (cfg.qkv_bias and not cfg.bias),
          "llama's attention_bias also covers o_proj; a model with qkv_bias only has no llama form")
    return {"intermediate_size": cfg.ffn_hidden, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "pretraining_tp": 1}


def _olmo2_to_hf(cfg: ModelConfig, layout: Layout) -> dict:
    _need(not cfg.bias and not cfg.qkv_bias, "olmo2 has no bias terms; this model has bias/qkv_bias set")
    return {"intermediate_size": cfg.ffn_hidden, "attention_bias": False}


def _all_layers_moe(cfg: ModelConfig, t: str) -> None:
    moe = cfg.moe
    _need(moe.first_k_dense == 0 and moe.moe_layer_freq == 1,
          f"every {t} layer is MoE; this model has first_k_dense={moe.first_k_dense}, "
          f"moe_layer_freq={moe.moe_layer_freq} (use qwen2_moe for dense layers)")
    _need(moe.num_shared_experts == 0, f"{t} has no shared experts (use qwen2_moe or glm4_moe)")


def _olmoe_to_hf(cfg: ModelConfig, layout: Layout) -> dict:
    moe = cfg.moe
    _all_layers_moe(cfg, "olmoe")
    _need(cfg.num_heads * _head_dim(cfg) == cfg.d_model,
          "olmoe sizes its q_norm by hidden_size, so num_heads * head_dim must equal d_model")
    _need(not (cfg.qkv_bias and not cfg.bias),
          "olmoe's attention_bias also covers o_proj; a model with qkv_bias only has no olmoe form")
    return {"intermediate_size": moe.expert_hidden, "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            # topk_softmax == softmax over all, top-k, renormalise.
            "norm_topk_prob": moe.norm_topk_prob or moe.router_mode == "topk_softmax",
            "router_aux_loss_coef": moe.lb_loss_coef, "attention_bias": cfg.bias, "clip_qkv": None}


def _mixtral_to_hf(cfg: ModelConfig, layout: Layout) -> dict:
    moe = cfg.moe
    _all_layers_moe(cfg, "mixtral")
    _need(not cfg.bias and not cfg.qkv_bias, "mixtral has no bias terms; this model has bias/qkv_bias set")
    _need(moe.router_mode == "topk_softmax" or moe.norm_topk_prob,
          "mixtral renormalises the top-k weights; this model uses softmax_topk without "
          "norm_topk_prob (use olmoe or qwen2_moe)")
    return {"intermediate_size": moe.expert_hidden, "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.lb_loss_coef,
            "router_jitter_noise": 0.0, "sliding_window": None}


_TO_HF: dict[str, Callable[[ModelConfig, Layout], dict]] = {
    "llama": _llama_to_hf, "olmo2": _olmo2_to_hf, "olmoe": _olmoe_to_hf, "mixtral": _mixtral_to_hf,
    "qwen2_moe": qwen2_moe_to_hf, "qwen3_moe": qwen3_moe_to_hf, "glm4_moe": glm4_moe_to_hf,
    "deepseek_v3": deepseek_v3_to_hf, "deepseek_v2": deepseek_v2_to_hf, "deepseek": deepseek_to_hf,
}


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    """config.json fields of `model_type` for a megamoe model, or a ValueError saying why not."""
    layout = get_layout(model_type)
    _check_common_megamoe(cfg, layout)
    out = _common_to_hf(cfg, layout)
    out.update(_TO_HF[model_type](cfg, layout))
    return out


# --------------------------------------------------------------------------- HF -> megamoe

def _common_from_hf(hf: dict, t: str) -> dict:
    act = hf.get("hidden_act", "silu")
    _need(act in ("silu", "swish"), f"{t}: activation {act!r} is not supported (megamoe uses SwiGLU/SiLU)")
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling = rope_from_hf(hf, t)
    return dict(
        vocab_size=hf["vocab_size"], d_model=hidden, num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim * heads == hidden else head_dim,
        seq_length=hf.get("max_position_embeddings", 4096), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02))


def _llama_from_hf(hf: dict) -> ModelConfig:
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    _need(attn_bias == mlp_bias, "llama with attention_bias != mlp_bias is not supported "
          "(megamoe's `bias` switches both)")
    _need(hf.get("pretraining_tp", 1) == 1, "llama: pretraining_tp > 1 is not supported")
    return ModelConfig(**_common_from_hf(hf, "llama"), ffn_hidden=hf["intermediate_size"],
                       bias=attn_bias, moe=None)


def _olmo2_from_hf(hf: dict) -> ModelConfig:
    _need(not hf.get("attention_bias", False), "olmo2 with attention_bias is not supported")
    return ModelConfig(**_common_from_hf(hf, "olmo2"), ffn_hidden=hf["intermediate_size"],
                       qk_norm=True, norm_position="post", moe=None)


def _olmoe_from_hf(hf: dict) -> ModelConfig:
    _need(hf.get("clip_qkv") is None, f"olmoe: clip_qkv={hf.get('clip_qkv')} is not supported")
    common = _common_from_hf(hf, "olmoe")
    _need(common["head_dim"] == 0, "olmoe with head_dim * num_heads != hidden_size is not supported")
    norm = bool(hf.get("norm_topk_prob", False))
    moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                    expert_hidden=hf["intermediate_size"], router_mode="softmax_topk",
                    norm_topk_prob=norm, lb_loss_coef=hf.get("router_aux_loss_coef", 0.01),
                    z_loss_coef=0.001)  # OLMoE trains with a router z-loss (DESIGN.md)
    return ModelConfig(**common, ffn_hidden=hf["intermediate_size"], qk_norm=True,
                       bias=bool(hf.get("attention_bias", False)), moe=moe)


def _mixtral_from_hf(hf: dict) -> ModelConfig:
    _need(hf.get("sliding_window") is None,
          f"mixtral: sliding-window attention (sliding_window={hf.get('sliding_window')}) is not "
          "supported; set it to null if the window is not smaller than your sequence length")
    moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                    expert_hidden=hf["intermediate_size"], router_mode="topk_softmax",
                    lb_loss_coef=hf.get("router_aux_loss_coef", 0.02), z_loss_coef=0.0)
    return ModelConfig(**_common_from_hf(hf, "mixtral"), ffn_hidden=hf["intermediate_size"], moe=moe)


def _with_common(t: str, fields: Callable[[dict], dict]) -> Callable[[dict], ModelConfig]:
    """Types whose own fields come from layouts_deepseek.py / layouts_qwen.py: the common
    fields here, the type's on top."""
    def from_hf(hf: dict) -> ModelConfig:
        own = fields(hf)  # type-specific refusals first, then the common fields (overridable)
        return ModelConfig(**{**_common_from_hf(hf, t), **own})
    return from_hf


_FROM_HF: dict[str, Callable[[dict], ModelConfig]] = {
    "llama": _llama_from_hf, "olmo2": _olmo2_from_hf, "olmoe": _olmoe_from_hf,
    "mixtral": _mixtral_from_hf,
    "qwen2_moe": _with_common("qwen2_moe", qwen2_moe_from_hf),
    "qwen3_moe": _with_common("qwen3_moe", qwen3_moe_from_hf),
    "glm4_moe": _with_common("glm4_moe", glm4_moe_from_hf),
    "deepseek_v3": _with_common("deepseek_v3", deepseek_v3_from_hf),
    "deepseek_v2": _with_common("deepseek_v2", deepseek_v2_from_hf),
    "deepseek": _with_common("deepseek", deepseek_from_hf),
}


def config_from_hf(hf: dict) -> ModelConfig:
    """megamoe ModelConfig of a config.json dict, or a ValueError saying what is unsupported."""
    t = hf.get("model_type")
    _need(bool(t), "config.json has no model_type")
    get_layout(t)
    try:
        return _FROM_HF[t](hf)
    except KeyError as err:
        raise ValueError(f"{t} config.json lacks the field {err.args[0]!r}") from None
