"""The DeepSeek HF types and GLM-4.5 (helpers of megamoe/hf/layouts.py, which registers them).

  glm4_moe, deepseek_v3  DeepSeek-V3 routing (== megamoe router_mode sigmoid_bias): sigmoid
      scores, e_score_correction_bias for selection only, optional renormalisation
      (norm_topk_prob), routed_scaling_factor, group-limited selection (n_group / topk_group: a
      group scores the sum of its top-2 biased scores), dense layers only at the start
      (first_k_dense_replace), ungated shared experts of n_shared_experts * moe_intermediate_size.
      glm4_moe uses GQA attention (optionally per-head QK-norm, use_qk_norm), deepseek_v3 MLA.
  deepseek_v2  MLA; softmax routing (megamoe softmax_topk): topk_method greedy (plain top-k) or
      group_limited_greedy (a group scores its best probability), no renormalisation
      (transformers' DeepseekV2 ignores norm_topk_prob, so true is refused), routed_scaling_factor,
      ungated shared experts, first_k_dense_replace (transformers ignores moe_layer_freq: only 1).
  deepseek   DeepSeek-MoE (16B; remote code, no transformers class): standard attention,
      softmax top-k (norm_topk_prob, false for 16B), ungated shared experts (n_shared_experts may be
      null), MoE layers where layer >= first_k_dense_replace and layer % moe_layer_freq == 0.

MLA attention (megamoe attention "mla", megamoe/model/mla.py): tensor names are transformers'
(self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}, kv_a_proj_with_mqa, kv_a_layernorm,
kv_b_proj, o_proj). DeepSeek checkpoints keep the rotary dims of q and of the shared rotary key
interleaved (pairs 2i, 2i+1; deepseek_v3's rope_interleave, default true; deepseek_v2 always)
while megamoe rotates pairs (i, i + dr/2); the rows of those dims are permuted on the way in and
out, which is exact, so exports are written interleaved like the published checkpoints.
yarn RoPE converts (layouts_rope.py), with MLA's softmax mscale (megamoe/model/rope.py).
Refused: attention_bias, num_key_value_heads != num_attention_heads (MLA), q_lora_rank 0.
"""

from __future__ import annotations

import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.transformer import is_moe_layer


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def shared_hidden(moe: MoEConfig) -> int:
    return moe.shared_expert_hidden or moe.num_shared_experts * moe.expert_hidden


# ---------------------------------------------------------------------------- megamoe -> HF

def _routing_to_hf(cfg: ModelConfig, t: str) -> dict:
    moe = cfg.moe
    need(not cfg.bias, f"{t} has no o_proj / MLP biases; this model has bias=true")
    if t == "deepseek":
        need(moe.first_k_dense % moe.moe_layer_freq == 0,
             f"deepseek's MoE layers are those >= first_k_dense_replace with layer % moe_layer_freq "
             f"== 0; first_k_dense {moe.first_k_dense} is not a multiple of moe_layer_freq "
             f"{moe.moe_layer_freq}")
    else:
        need(moe.moe_layer_freq == 1, f"{t} has dense layers only at the start (first_k_dense); "
             f"this model has moe_layer_freq={moe.moe_layer_freq}")
    need(not moe.shared_expert_gate, f"{t} has ungated shared experts; this model has "
         "shared_expert_gate=true (use qwen2_moe)")
    # No shared experts: n_shared_experts 0, which transformers builds as a zero-width MLP that
    # adds exactly 0 (e.g. copy-upcycled models with sigmoid routing).
    shared = shared_hidden(moe)
    need(shared % moe.expert_hidden == 0,
         f"{t} sizes shared experts as n_shared_experts * moe_intermediate_size; shared hidden "
         f"{shared} is not a multiple of expert_hidden {moe.expert_hidden}")
    return {"intermediate_size": cfg.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "n_routed_experts": moe.num_experts, "n_shared_experts": shared // moe.expert_hidden,
            "num_experts_per_tok": moe.top_k, "first_k_dense_replace": moe.first_k_dense,
            "n_group": moe.n_group, "topk_group": moe.topk_group,
            "routed_scaling_factor": moe.routed_scaling_factor, "norm_topk_prob": moe.norm_topk_prob}


def glm4_moe_to_hf(cfg: ModelConfig, layout) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": 1.0}  # GLM's default is 0.5
    return {**_routing_to_hf(cfg, "glm4_moe"), "use_qk_norm": cfg.qk_norm,
            "attention_bias": cfg.qkv_bias, "rope_parameters": rope, "partial_rotary_factor": 1.0,
            "num_mtp_layers": 0, "num_nextn_predict_layers": 0}


def _mla_to_hf(cfg: ModelConfig) -> dict:
    # transformers' MLA expands keys / values to every head; it only reads this for GQA.
    return {"num_key_value_heads": cfg.num_heads, "head_dim": cfg.qk_rope_head_dim,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "attention_bias": False, "pretraining_tp": 1}


def deepseek_v3_to_hf(cfg: ModelConfig, layout) -> dict:
    return {**_routing_to_hf(cfg, "deepseek_v3"), **_mla_to_hf(cfg), "rope_interleave": True,
            "num_nextn_predict_layers": 0}


def deepseek_v2_to_hf(cfg: ModelConfig, layout) -> dict:
    moe = cfg.moe
    need(moe.router_mode == "softmax_topk" and not moe.norm_topk_prob,
         "deepseek_v2 routes softmax top-k without renormalisation (transformers ignores "
         f"norm_topk_prob); this model has router_mode={moe.router_mode!r}, "
         f"norm_topk_prob={moe.norm_topk_prob}")
    out = {**_routing_to_hf(cfg, "deepseek_v2"), **_mla_to_hf(cfg), "mlp_bias": False,
           "topk_method": "group_limited_greedy" if moe.n_group > 1 else "greedy",
           "moe_layer_freq": 1, "aux_loss_alpha": moe.lb_loss_coef}
    if moe.n_group == 1:
        out.update(n_group=None, topk_group=None)
    return out


def deepseek_to_hf(cfg: ModelConfig, layout) -> dict:
    moe = cfg.moe
    # Remote code: softmax, top-k, renormalised with norm_topk_prob (topk_softmax is the same).
    need(cfg.rope_scaling is None, "deepseek: RoPE scaling is not exported for the remote-code type")
    need(not cfg.qkv_bias, "deepseek's attention_bias also covers o_proj; this model has qkv_bias only")
    routing = _routing_to_hf(cfg, "deepseek")
    for key in ("n_group", "topk_group", "routed_scaling_factor"):
        routing.pop(key)
    return {**routing, "n_shared_experts": routing["n_shared_experts"] or None,
            "norm_topk_prob": moe.norm_topk_prob or moe.router_mode == "topk_softmax",
            "moe_layer_freq": moe.moe_layer_freq, "scoring_func": "softmax",
            "aux_loss_alpha": moe.lb_loss_coef, "seq_aux": True, "attention_bias": False,
            "pretraining_tp": 1}


def empty_shared_expert_tensors(cfg: ModelConfig, layout) -> dict[str, torch.Tensor]:
    """The zero-width shared-expert weights a DeepSeek-style type has in each MoE layer when the
    model has no shared experts (n_shared_experts 0): transformers builds them as [0, H] / [H, 0]
    linears and reports them missing unless the checkpoint holds them (empty, 0 bytes)."""
    moe = cfg.moe
    if layout.shared_experts is None or moe is None or moe.num_shared_experts > 0:
        return {}
    out = {}
    for i in range(cfg.num_layers):
        if is_moe_layer(cfg, i):
            base = f"model.layers.{i}.{layout.moe_block}.{layout.shared_experts}."
            out[base + "gate_proj.weight"] = torch.zeros(0, cfg.d_model)
            out[base + "up_proj.weight"] = torch.zeros(0, cfg.d_model)
            out[base + "down_proj.weight"] = torch.zeros(cfg.d_model, 0)
    return out


# ---------------------------------------------------------------------------- HF -> megamoe

# transformers' (remote code's for deepseek) defaults for fields a config.json may omit.
_DEFAULTS = {
    "glm4_moe": {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                 "first_k_dense_replace": 1, "n_shared_experts": 1, "norm_topk_prob": True},
    "deepseek_v3": {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                    "first_k_dense_replace": 3, "n_shared_experts": 1, "norm_topk_prob": True},
    "deepseek_v2": {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                    "first_k_dense_replace": 0, "n_shared_experts": 2, "norm_topk_prob": False,
                    "topk_method": "greedy", "aux_loss_alpha": 0.001},
    "deepseek": {"first_k_dense_replace": 0, "moe_layer_freq": 1, "norm_topk_prob": False,
                 "scoring_func": "softmax", "aux_loss_alpha": 0.001},
}


def _routing_from_hf(hf: dict, t: str) -> dict:
    """ModelConfig fields (ffn_hidden, moe) of a DeepSeek-style config.json."""
    hf = {**_DEFAULTS[t], **{k: v for k, v in hf.items() if v is not None}}
    n_shared = hf.get("n_shared_experts", 0)
    common = dict(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                  expert_hidden=hf["moe_intermediate_size"], num_shared_experts=n_shared, z_loss_coef=0.0)
    first = hf["first_k_dense_replace"]
    if t == "deepseek":
        need(hf["scoring_func"] == "softmax", f"deepseek: scoring_func {hf['scoring_func']!r} is not "
             "supported (softmax only)")
        freq = hf["moe_layer_freq"]
        first_moe = -(-first // freq) * freq   # MoE: layer >= first and layer % freq == 0
        moe = MoEConfig(**common, router_mode="softmax_topk", norm_topk_prob=bool(hf["norm_topk_prob"]),
                        first_k_dense=first_moe, moe_layer_freq=freq, lb_loss_coef=hf["aux_loss_alpha"])
        return {"ffn_hidden": hf["intermediate_size"], "moe": moe}
    if t == "deepseek_v2":
        method = hf["topk_method"]
        need(method in ("greedy", "group_limited_greedy"),
             f"deepseek_v2: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
        need(not hf["norm_topk_prob"], "deepseek_v2 with norm_topk_prob true is not supported "
             "(transformers' DeepseekV2 ignores it; the original code renormalises)")
        need(hf.get("moe_layer_freq", 1) == 1, "deepseek_v2: moe_layer_freq != 1 is not supported "
             "(transformers' DeepseekV2 ignores it)")
        groups = (hf["n_group"], hf["topk_group"]) if method == "group_limited_greedy" else (1, 1)
        moe = MoEConfig(**common, router_mode="softmax_topk", n_group=groups[0], topk_group=groups[1],
                        routed_scaling_factor=float(hf["routed_scaling_factor"]), first_k_dense=first,
                        lb_loss_coef=hf["aux_loss_alpha"])
        return {"ffn_hidden": hf["intermediate_size"], "moe": moe}
    moe = MoEConfig(**common, router_mode="sigmoid_bias", norm_topk_prob=bool(hf["norm_topk_prob"]),
                    routed_scaling_factor=float(hf["routed_scaling_factor"]), first_k_dense=first,
                    n_group=hf["n_group"], topk_group=hf["topk_group"],
                    # DeepSeek-V3's aux-loss-free balancing (bias update speed 0.001) and its
                    # small balance loss (1e-4); HF configs do not record these training settings.
                    bias_update_rate=0.001, lb_loss_coef=0.0001)
    return {"ffn_hidden": hf["intermediate_size"], "moe": moe}


def glm4_moe_from_hf(hf: dict) -> dict:
    return {**_routing_from_hf(hf, "glm4_moe"), "qkv_bias": bool(hf.get("attention_bias", False)),
            "qk_norm": bool(hf.get("use_qk_norm", False)), "qk_norm_scope": "head"}


def _mla_from_hf(hf: dict, t: str) -> dict:
    need(not hf.get("attention_bias", False), f"{t}: attention_bias is not supported")
    heads = hf["num_attention_heads"]
    need((hf.get("num_key_value_heads") or heads) == heads,
         f"{t}: num_key_value_heads != num_attention_heads is not supported (transformers would "
         "repeat MLA's per-head keys)")
    q_rank = hf.get("q_lora_rank", 1536)
    need(q_rank is None or q_rank > 0, f"{t}: q_lora_rank 0 is not supported (use null for q_proj)")
    return {"attention": "mla", "num_kv_heads": 0, "head_dim": 0,
            "q_lora_rank": q_rank or 0, "kv_lora_rank": hf.get("kv_lora_rank", 512),
            "qk_nope_head_dim": hf.get("qk_nope_head_dim", 128),
            "qk_rope_head_dim": hf.get("qk_rope_head_dim", 64), "v_head_dim": hf.get("v_head_dim", 128)}


def deepseek_v3_from_hf(hf: dict) -> dict:
    return {**_routing_from_hf(hf, "deepseek_v3"), **_mla_from_hf(hf, "deepseek_v3")}


def deepseek_v2_from_hf(hf: dict) -> dict:
    need(hf.get("rope_interleave", True) is not False,
         "deepseek_v2 always stores rotary dims interleaved; rope_interleave false is not supported")
    need(not hf.get("mlp_bias", False), "deepseek_v2: mlp_bias is not supported")
    return {**_routing_from_hf(hf, "deepseek_v2"), **_mla_from_hf(hf, "deepseek_v2")}


def deepseek_from_hf(hf: dict) -> dict:
    need(hf.get("n_routed_experts") is not None,
         "deepseek without n_routed_experts is a dense model; convert it as llama")
    need(not hf.get("attention_bias", False), "deepseek: attention_bias is not supported")
    return _routing_from_hf(hf, "deepseek")


# --------------------------------------------------------------- MLA rotary row permutation

def _rope_rows(cfg: ModelConfig, name: str) -> tuple[int, int] | None:
    """(rows per block, first rotary row in a block) of an MLA weight whose output rows hold
    rotary dims, or None. q: one block per head [nope | rope]; kv_a: one block [latent | rope]."""
    if name.endswith(("attn.q_proj.weight", "attn.q_b_proj.weight")):
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    if name.endswith("attn.kv_a_proj_with_mqa.weight"):
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    return None


def _permute_rope(cfg: ModelConfig, name: str, w: torch.Tensor, to_interleaved: bool) -> torch.Tensor:
    rows = _rope_rows(cfg, name)
    if cfg.attention != "mla" or rows is None:
        return w
    block, start = rows
    blocks = w.reshape(-1, block, w.shape[-1])                       # [n, block, in]
    rope = blocks[:, start:]                                         # [n, dr, in]
    half = rope.shape[1] // 2
    if to_interleaved:   # rows (x_0..x_{h-1}, y_0..y_{h-1}) -> (x_0, y_0, x_1, y_1, ...)
        rope = torch.stack([rope[:, :half], rope[:, half:]], dim=2).reshape(rope.shape)
    else:                # (x_0, y_0, x_1, y_1, ...) -> (x_0..x_{h-1}, y_0..y_{h-1})
        rope = torch.cat([rope[:, 0::2], rope[:, 1::2]], dim=1)
    return torch.cat([blocks[:, :start], rope], dim=1).reshape(w.shape)


def mla_tensor_to_hf(cfg: ModelConfig, name: str, w: torch.Tensor) -> torch.Tensor:
    """megamoe tensor `name` as a deepseek_v3 checkpoint (rope_interleave true) stores it."""
    return _permute_rope(cfg, name, w, to_interleaved=True)


def mla_tensor_from_hf(cfg: ModelConfig, name: str, w: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The megamoe tensor `name` from a deepseek_v3 checkpoint tensor."""
    return _permute_rope(cfg, name, w, to_interleaved=False) if interleaved else w
