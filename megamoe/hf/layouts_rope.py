"""RoPE fields of HF config.json <-> megamoe `rope_theta` / `rope_scaling` (a helper of layouts.py).

transformers 5.x writes `rope_parameters` ({rope_type, rope_theta, factor, ...}); 4.x configs
(and remote-code checkpoints such as DeepSeek-V3's) write `rope_theta` plus `rope_scaling`
({type | rope_type, factor, ...}). Both are read; exports write both. The scaled types megamoe
computes exactly (megamoe/model/rope.py) are llama3 and yarn; others are refused.
"""

from __future__ import annotations

from megamoe.config import ModelConfig, RopeScaling
from megamoe.hf.layouts_deepseek import need as _need

# HF types whose RoPE scaling is converted (their transformers models build the rotary cache
# with modeling_rope_utils and megamoe's tests compare logits with it).
SCALED_ROPE_TYPES = ("llama", "qwen3_moe", "deepseek_v2", "deepseek_v3")
_DEFAULT_THETA = {"mixtral": 1e6}
# transformers fills in partial_rotary_factor 0.5 when a glm4_moe config.json omits it.
_DEFAULT_PARTIAL_ROTARY = {"glm4_moe": 0.5}


def rope_from_hf(hf: dict, t: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) of a config.json dict, or a ValueError."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor",
                         hf.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY.get(t, 1.0)))
    _need(float(partial) == 1.0,
          f"{t}: partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(t, 10000.0))))
    if rope_type == "default":
        return theta, None
    _need(rope_type in ("llama3", "yarn") and t in SCALED_ROPE_TYPES,
          f"{t}: RoPE scaling ({rope_type!r}) is not supported by megamoe's RoPE (llama3 / yarn "
          f"only, for {', '.join(SCALED_ROPE_TYPES)})")
    # As transformers' standardize_rope_params: a top-level field wins, then the dict's, then
    # max_position_embeddings.
    original = (hf.get("original_max_position_embeddings")
                or params.get("original_max_position_embeddings") or hf.get("max_position_embeddings"))
    _need(bool(original), f"{t}: {rope_type} RoPE needs original_max_position_embeddings")
    if rope_type == "llama3":
        return theta, RopeScaling(
            type="llama3", factor=float(params["factor"]), original_max_position_embeddings=int(original),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]))
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style: the ratio of the context lengths
        factor = hf["max_position_embeddings"] / original

    def opt(key):
        return None if params.get(key) is None else float(params[key])

    return theta, RopeScaling(
        type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"), truncate=bool(params.get("truncate", True)))


def check_rope_to_hf(cfg: ModelConfig, t: str) -> None:
    _need(cfg.rope_scaling is None or t in SCALED_ROPE_TYPES,
          f"{t}: this model uses {cfg.rope_scaling and cfg.rope_scaling.type} RoPE scaling, which "
          f"megamoe exports only as {', '.join(SCALED_ROPE_TYPES)}")


def rope_to_hf(cfg: ModelConfig) -> dict:
    """config.json RoPE fields (5.x rope_parameters and 4.x rope_theta / rope_scaling)."""
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    r = cfg.rope_scaling
    if r is None:
        return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": None}
    scaling = {"rope_type": r.type, "factor": r.factor,
               "original_max_position_embeddings": r.original_max_position_embeddings}
    if r.type == "llama3":
        scaling.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    else:
        scaling.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(r, key) is not None:
                scaling[key] = getattr(r, key)
    return {"rope_parameters": {**params, **scaling}, "rope_theta": cfg.rope_theta,
            "rope_scaling": scaling}
