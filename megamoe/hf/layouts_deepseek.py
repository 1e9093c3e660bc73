"""The DeepSeek-V3-routed HF types: `glm4_moe` (standard GQA attention) and `deepseek_v3`
(Multi-head Latent Attention). Helpers of megamoe/hf/layouts.py, which registers them.

Both route like DeepSeek-V3 (== megamoe router_mode sigmoid_bias): sigmoid scores, a per-expert
e_score_correction_bias used for selection only, optional renormalisation (norm_topk_prob),
routed_scaling_factor, dense layers only at the start (first_k_dense_replace) and ungated shared
experts of n_shared_experts * moe_intermediate_size. Group-limited selection (n_group experts
groups, keep topk_group of them) has no megamoe counterpart; only n_group == topk_group (every
group kept, i.e. plain top-k) converts.

deepseek_v3 attention (megamoe attention "mla", megamoe/model/mla.py): tensor names are
transformers' (self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj). DeepSeek checkpoints keep the rotary dims of q and of the
shared rotary key interleaved (pairs 2i, 2i+1; config rope_interleave, default true) while
megamoe rotates pairs (i, i + dr/2); the rows of those dims are permuted on the way in and out,
which is exact, so exports are written interleaved like the published checkpoints.
Refused: yarn / other RoPE scaling (DeepSeek-V3's long-context setting, incl. its softmax mscale),
attention_bias, num_key_value_heads != num_attention_heads, q_lora_rank 0.
"""

from __future__ import annotations

import torch

from megamoe.config import ModelConfig, MoEConfig


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def shared_hidden(moe: MoEConfig) -> int:
    return moe.shared_expert_hidden or moe.num_shared_experts * moe.expert_hidden


# ---------------------------------------------------------------------------- megamoe -> HF

def _routing_to_hf(cfg: ModelConfig, t: str) -> dict:
    moe = cfg.moe
    need(not cfg.bias, f"{t} has no o_proj / MLP biases; this model has bias=true")
    need(moe.moe_layer_freq == 1, f"{t} has dense layers only at the start (first_k_dense); "
         f"this model has moe_layer_freq={moe.moe_layer_freq}")
    need(moe.num_shared_experts > 0 and not moe.shared_expert_gate,
         f"{t} always has ungated shared experts; this model needs num_shared_experts > 0 and "
         "shared_expert_gate=false")
    shared = shared_hidden(moe)
    need(shared % moe.expert_hidden == 0,
         f"{t} sizes shared experts as n_shared_experts * moe_intermediate_size; shared hidden "
         f"{shared} is not a multiple of expert_hidden {moe.expert_hidden}")
    return {"intermediate_size": cfg.ffn_hidden, "moe_intermediate_size": moe.expert_hidden,
            "n_routed_experts": moe.num_experts, "n_shared_experts": shared // moe.expert_hidden,
            "num_experts_per_tok": moe.top_k, "routed_scaling_factor": moe.routed_scaling_factor,
            "n_group": 1, "topk_group": 1, "first_k_dense_replace": moe.first_k_dense,
            "norm_topk_prob": moe.norm_topk_prob, "num_nextn_predict_layers": 0}


def glm4_moe_to_hf(cfg: ModelConfig, layout) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": 1.0}  # GLM's default is 0.5
    return {**_routing_to_hf(cfg, "glm4_moe"), "use_qk_norm": False, "attention_bias": cfg.qkv_bias,
            "rope_parameters": rope, "partial_rotary_factor": 1.0, "num_mtp_layers": 0}


def deepseek_v3_to_hf(cfg: ModelConfig, layout) -> dict:
    return {**_routing_to_hf(cfg, "deepseek_v3"),
            # transformers' MLA expands keys / values to every head; it only reads this for GQA.
            "num_key_value_heads": cfg.num_heads, "head_dim": cfg.qk_rope_head_dim,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "rope_interleave": True, "attention_bias": False,
            "pretraining_tp": 1}


# ---------------------------------------------------------------------------- HF -> megamoe

# transformers' defaults for fields a config.json may omit.
_DEFAULTS = {
    "glm4_moe": {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1},
    "deepseek_v3": {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                    "first_k_dense_replace": 3},
}


def _routing_from_hf(hf: dict, t: str) -> dict:
    """ModelConfig fields (ffn_hidden, moe) of a DeepSeek-V3-routed config.json."""
    hf = {**_DEFAULTS[t], **{k: v for k, v in hf.items() if v is not None}}
    n_group, topk_group = hf["n_group"], hf["topk_group"]
    # Group-limited selection keeps topk_group of n_group groups: only keeping all of them
    # (n_group == topk_group, e.g. 1) leaves plain top-k, which is what megamoe does.
    need(n_group == topk_group,
         f"{t}: group-limited routing (n_group={n_group}, topk_group={topk_group}) is not "
         "supported; only n_group == topk_group (e.g. 1)")
    n_shared = hf.get("n_shared_experts", 1)
    need(n_shared > 0, f"{t} without shared experts (n_shared_experts 0) is not supported")
    moe = MoEConfig(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                    expert_hidden=hf["moe_intermediate_size"], router_mode="sigmoid_bias",
                    norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(hf["routed_scaling_factor"]),
                    num_shared_experts=n_shared, first_k_dense=hf["first_k_dense_replace"],
                    # DeepSeek-V3's aux-loss-free balancing (bias update speed 0.001) and its
                    # small balance loss (1e-4); HF configs do not record these training settings.
                    bias_update_rate=0.001, lb_loss_coef=0.0001, z_loss_coef=0.0)
    return {"ffn_hidden": hf["intermediate_size"], "moe": moe}


def glm4_moe_from_hf(hf: dict) -> dict:
    need(not hf.get("use_qk_norm", False),
         "glm4_moe: per-head QK-norm (use_qk_norm) is not supported (megamoe's QK-norm spans the "
         "whole projection)")
    return {**_routing_from_hf(hf, "glm4_moe"), "qkv_bias": bool(hf.get("attention_bias", False))}


def deepseek_v3_from_hf(hf: dict) -> dict:
    t = "deepseek_v3"
    need(not hf.get("attention_bias", False), f"{t}: attention_bias is not supported")
    heads = hf["num_attention_heads"]
    need((hf.get("num_key_value_heads") or heads) == heads,
         f"{t}: num_key_value_heads != num_attention_heads is not supported (transformers would "
         "repeat MLA's per-head keys)")
    q_rank = hf.get("q_lora_rank", 1536)
    need(q_rank is None or q_rank > 0, f"{t}: q_lora_rank 0 is not supported (use null for q_proj)")
    return {**_routing_from_hf(hf, t), "attention": "mla", "num_kv_heads": 0, "head_dim": 0,
            "q_lora_rank": q_rank or 0, "kv_lora_rank": hf.get("kv_lora_rank", 512),
            "qk_nope_head_dim": hf.get("qk_nope_head_dim", 128),
            "qk_rope_head_dim": hf.get("qk_rope_head_dim", 64), "v_head_dim": hf.get("v_head_dim", 128)}


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
