"""Causal self-attention: RoPE, grouped-query heads, optional QK-norm (OLMoE-style over the whole
projection, or Qwen3-style per head), SDPA.

Legend: B batch, S sequence, H d_model, nh query heads, nkv key/value heads, hd head dim.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.config import ModelConfig
from megamoe.model.norm import build_norm
from megamoe.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        # OLMoE normalises the whole q / k projection (all heads together) before the head split;
        # Qwen3 (qk_norm_scope "head") normalises each head with one norm of head_dim.
        self.per_head_norm = cfg.qk_norm_scope == "head"
        q_norm_dim, k_norm_dim = (self.head_dim, self.head_dim) if self.per_head_norm else (q_dim, kv_dim)
        self.q_norm = build_norm(cfg, q_norm_dim) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, k_norm_dim) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Head counts come from the projection width so tensor parallelism (fewer local heads)
        # needs no change here.
        q = q.view(B, S, -1, self.head_dim)                           # [B, S, nh, hd]
        k = k.view(B, S, -1, self.head_dim)                           # [B, S, nkv, hd]
        if self.q_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                   # [B, nh | nkv, S, hd]
        v = v.view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:S], sin[:S]), apply_rope(k, cos[:S], sin[:S])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
