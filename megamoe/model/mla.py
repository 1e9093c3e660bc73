"""Multi-head Latent Attention (DeepSeek-V2/V3), computing what transformers' DeepseekV3Attention
computes (attention_bias false, default or yarn RoPE, no KV cache: training and scoring).

Keys and values come from one small latent per token instead of per-head projections of x:
  kv_a_proj_with_mqa: x -> [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]
  c_kv -> RMSNorm -> kv_b_proj -> per head [k_nope (qk_nope_head_dim) | v (v_head_dim)]
  k_pe gets RoPE and is shared by all heads (multi-query style: RoPE does not commute with a
  low-rank up-projection, so the rotary part is kept out of the latent).
Queries: q_proj, or with q_lora_rank > 0 the low-rank q_a_proj -> RMSNorm -> q_b_proj; each head
is [q_nope | q_pe] and only q_pe is rotated. Scores use the whole qk_head_dim = nope + rope.

RoPE layout: megamoe rotates pairs (i, i + rope/2) ("rotate half"). DeepSeek checkpoints store
the rotary dims interleaved, pairs (2i, 2i + 1) (transformers' rope_interleave true); that is the
same rotation on permuted rows of q_b_proj / kv_a_proj_with_mqa, so the HF converter permutes
those rows (megamoe/hf/layouts_deepseek.py) and this module needs one layout only.

Legend: B batch, S sequence, H d_model, nh heads, dn qk_nope_head_dim, dr qk_rope_head_dim,
dv v_head_dim, r kv_lora_rank.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.config import ModelConfig
from megamoe.model.rope import apply_rope, softmax_scale_factor
from megamoe.model.norm import RMSNorm

# DeepSeek's latent norms use a fixed eps (transformers: DeepseekV3RMSNorm's default), not
# rms_norm_eps of the residual-stream norms.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        nh = cfg.num_heads
        # Module names are transformers' so the HF converter maps them one to one.
        self.q_lora = cfg.q_lora_rank > 0
        if self.q_lora:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, nh * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, cfg.d_model, bias=False)
        # yarn RoPE also sharpens the softmax by mscale(factor, mscale_all_dim)^2 (DeepSeek).
        self.scale = self.qk_dim ** -0.5 * softmax_scale_factor(cfg.rope_scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H]; cos, sin [>=S, dr] (the model's RoPE cache, built for qk_rope_head_dim)."""
        B, S, _ = x.shape
        nh = self.num_heads
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, S, nh, self.qk_dim).transpose(1, 2)                   # [B, nh, S, dn+dr]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv))                      # [B, S, nh*(dn+dv)]
        kv = kv.view(B, S, nh, self.nope_dim + self.v_dim).transpose(1, 2)  # [B, nh, S, dn+dv]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = k_pe.view(B, 1, S, self.rope_dim)                            # one rotary key for all heads

        cos, sin = cos[:S], sin[:S]
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)         # [B, nh, S, dn+dr]
        k_pe = apply_rope(k_pe, cos, sin).expand(B, nh, S, self.rope_dim)
        k = torch.cat([k_nope, k_pe], dim=-1)                               # [B, nh, S, dn+dr]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, nh, S, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, nh * self.v_dim))
