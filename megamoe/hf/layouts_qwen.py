"""The Qwen MoE HF types (helpers of megamoe/hf/layouts.py, which registers them).

  qwen2_moe  softmax top-k (norm_topk_prob) plus one shared expert behind a sigmoid gate
             (out += sigmoid(x g) * shared(x)); q/k/v biases (qkv_bias).
  qwen3_moe  softmax top-k (norm_topk_prob), no shared expert, per-head QK-norm (megamoe
             qk_norm_scope "head"); attention_bias covers q, k, v and o (megamoe `bias`).
Both: dense layers through mlp_only_layers / decoder_sparse_step, which megamoe represents only as
first_k_dense + moe_layer_freq (the pattern is fitted and anything else refused); no sliding window.
"""

from __future__ import annotations

from megamoe.config import ModelConfig, MoEConfig
from megamoe.hf.layouts_deepseek import need as _need
from megamoe.hf.layouts_deepseek import shared_hidden
from megamoe.model.transformer import is_moe_layer


# ---------------------------------------------------------------------------- megamoe -> HF

def qwen2_moe_to_hf(cfg: ModelConfig, layout) -> dict:
    moe = cfg.moe
    _need(not cfg.bias, "qwen2_moe has no o_proj / MLP biases; this model has bias=true")
    _need(moe.num_shared_experts > 0 and moe.shared_expert_gate,
          "qwen2_moe always has a gated shared expert; this model needs num_shared_experts > 0 and "
          "shared_expert_gate=true (use olmoe or mixtral without shared experts)")
    dense = [i for i in range(cfg.num_layers) if not is_moe_layer(cfg, i)]
    return {"intermediate_size": cfg.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "shared_expert_intermediate_size": shared_hidden(moe), "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.norm_topk_prob or moe.router_mode == "topk_softmax",
            "router_aux_loss_coef": moe.lb_loss_coef, "qkv_bias": cfg.qkv_bias,
            "decoder_sparse_step": 1, "mlp_only_layers": dense, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.num_layers}


def qwen3_moe_to_hf(cfg: ModelConfig, layout) -> dict:
    moe = cfg.moe
    _need(moe.num_shared_experts == 0, "qwen3_moe has no shared experts (use qwen2_moe or deepseek)")
    _need(not (cfg.qkv_bias and not cfg.bias),
          "qwen3_moe's attention_bias also covers o_proj; a model with qkv_bias only has no qwen3_moe form")
    dense = [i for i in range(cfg.num_layers) if not is_moe_layer(cfg, i)]
    _need(not (cfg.bias and dense), "qwen3_moe's dense layers have no MLP biases; this model has "
          "bias=true and dense layers")
    return {"intermediate_size": cfg.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.norm_topk_prob or moe.router_mode == "topk_softmax",
            "router_aux_loss_coef": moe.lb_loss_coef, "attention_bias": cfg.bias,
            "decoder_sparse_step": 1, "mlp_only_layers": dense, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.num_layers}


# ---------------------------------------------------------------------------- HF -> megamoe

def _fit_layer_pattern(moe_layers: list[bool], t: str) -> tuple[int, int]:
    """(first_k_dense, moe_layer_freq) reproducing exactly which layers are MoE."""
    idx = [i for i, m in enumerate(moe_layers) if m]
    _need(bool(idx), f"{t}: no layer is MoE; convert it as a dense model")
    first = idx[0]
    freq = idx[1] - idx[0] if len(idx) > 1 else max(1, len(moe_layers) - first)
    fits = all(m == (i >= first and (i - first) % freq == 0) for i, m in enumerate(moe_layers))
    _need(fits, f"{t}: the MoE layers {idx} are not 'every {freq}-th from layer {first}', the only "
          "pattern megamoe supports (first_k_dense, moe_layer_freq)")
    return first, freq


def _qwen_layer_pattern(hf: dict, t: str) -> tuple[int, int]:
    """(first_k_dense, moe_layer_freq) of Qwen's decoder_sparse_step / mlp_only_layers."""
    _need(not hf.get("use_sliding_window", False), f"{t}: sliding-window attention is not supported")
    n_layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    mlp_only = set(hf.get("mlp_only_layers") or [])
    pattern = [i not in mlp_only and hf["num_experts"] > 0 and (i + 1) % step == 0 for i in range(n_layers)]
    return _fit_layer_pattern(pattern, t)


def qwen3_moe_from_hf(hf: dict) -> dict:
    if "num_experts" not in hf and "num_local_experts" in hf:  # transformers 5.x writes the latter
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    first, freq = _qwen_layer_pattern(hf, "qwen3_moe")
    _need(not (hf.get("attention_bias") and first + freq > 2),
          "qwen3_moe with attention_bias and dense layers is not supported (megamoe's `bias` "
          "would also give the dense MLPs biases)")
    moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                    expert_hidden=hf["moe_intermediate_size"], router_mode="softmax_topk",
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), first_k_dense=first,
                    moe_layer_freq=freq, lb_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                    z_loss_coef=0.0)
    return {"ffn_hidden": hf["intermediate_size"], "qk_norm": True, "qk_norm_scope": "head",
            "bias": bool(hf.get("attention_bias", False)), "moe": moe}


def qwen2_moe_from_hf(hf: dict) -> dict:
    first, freq = _qwen_layer_pattern(hf, "qwen2_moe")
    shared = hf.get("shared_expert_intermediate_size", 0)
    _need(shared > 0,
          "qwen2_moe without a shared expert (shared_expert_intermediate_size 0) is not supported")
    moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                    expert_hidden=hf["moe_intermediate_size"], router_mode="softmax_topk",
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), num_shared_experts=1,
                    shared_expert_hidden=shared, shared_expert_gate=True, first_k_dense=first,
                    moe_layer_freq=freq, lb_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                    z_loss_coef=0.0)
    return {"ffn_hidden": hf["intermediate_size"], "qkv_bias": bool(hf.get("qkv_bias", True)), "moe": moe}
