"""Decoder-only language model: embedding -> N x (attention + dense-or-MoE FFN) -> norm -> head.

Plain single-device PyTorch. Parallelism (megamoe.parallel) is applied from outside by swapping
or sharding these modules; nothing here knows about process groups.
Legend: B batch, S sequence, H d_model, V vocabulary.
"""

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megamoe.config import ModelConfig
from megamoe.model.attention import Attention
from megamoe.model.mla import MLAttention
from megamoe.model.mlp import SwiGLU
from megamoe.model.norm import build_norm
from megamoe.model.rope import rope_cache
from megamoe.moe.layer import MoELayer


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    moe = cfg.moe
    return (moe is not None and layer_idx >= moe.first_k_dense
            and (layer_idx - moe.first_k_dense) % moe.moe_layer_freq == 0)


class Block(nn.Module):
    """Residual block: pre-norm, or post-norm (OLMo2) with cfg.norm_position == "post"."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = build_norm(cfg, cfg.d_model)
        self.attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn_norm = build_norm(cfg, cfg.d_model)
        if is_moe_layer(cfg, layer_idx):
            self.ffn = MoELayer(cfg.d_model, cfg.moe)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.bias)
        # Recompute activations in backward instead of storing them: a checkpoint(fn, *args)
        # function (torch's, or Transformer Engine's under FP8), or None. `selective` (MoE
        # blocks): recompute attention and the expert GEMMs, keep the MoE token exchanges.
        self.checkpoint_fn = None
        self.selective = False

    def forward(self, x, cos, sin):
        if self.checkpoint_fn is None or not (self.training and torch.is_grad_enabled()):
            return self._forward(x, cos, sin)
        if not (self.selective and isinstance(self.ffn, MoELayer)):
            return self.checkpoint_fn(self._forward, x, cos, sin)
        # Selective: the MoE layer itself recomputes only its expert GEMMs (recompute_fn).
        if self.post_norm:
            x = x + self.checkpoint_fn(lambda h: self.attn_norm(self.attn(h, cos, sin)), x)
            return x + self.ffn_norm(self.ffn(x))
        x = x + self.checkpoint_fn(lambda h: self.attn(self.attn_norm(h), cos, sin), x)
        return x + self.ffn(self.ffn_norm(x))

    def _forward(self, x, cos, sin):
        if self.post_norm:  # OLMo2 "reordered norm": normalise each sublayer's output instead
            x = x + self.attn_norm(self.attn(x, cos, sin))
            return x + self.ffn_norm(self.ffn(x))
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A ModuleDict keyed by global layer index keeps parameter names stable when pipeline
        # parallelism keeps only some layers on a rank.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.norm = build_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # MLA rotates only the qk_rope_head_dim part of each head.
        rope_dim = (cfg.qk_rope_head_dim if cfg.attention == "mla"
                    else cfg.head_dim or cfg.d_model // cfg.num_heads)
        cos, sin = rope_cache(cfg.seq_length, rope_dim, cfg.rope_theta, scaling=cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Truncated normal (std init_std, cut at 3 sigma) for matrices; ones/zeros for norms/biases."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.trunc_normal_(p, 0.0, std, -3 * std, 3 * std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)

    def forward(self, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
        """tokens [B, S] -> logits [B, S, V]. Pipeline stages may pass `hidden` [B, S, H] instead
        and may lack the embedding (`embed` None) or the head (`lm_head` None)."""
        x = self.embed(tokens) if self.embed is not None else hidden
        for layer in self.layers.values():
            x = layer(x, self.rope_cos, self.rope_sin)
        if self.lm_head is None:
            return x
        return self.lm_head(self.norm(x))

    # ---------------------------------------------------------------------------------- helpers
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def set_activation_checkpointing(self, enabled: bool, checkpoint_fn=None, selective: bool = False) -> None:
        """Recompute blocks in backward; checkpoint_fn defaults to torch's non-reentrant
        checkpoint (which replays the forward's autocast state). `selective`: MoE blocks
        recompute attention and their expert GEMMs but keep the router decisions and the
        token exchanges (all-to-all outputs), so no communication is repeated in backward;
        dense blocks are recomputed whole either way."""
        fn = (checkpoint_fn or functools.partial(checkpoint, use_reentrant=False)) if enabled else None
        for layer in self.layers.values():
            layer.checkpoint_fn, layer.selective = fn, selective and enabled
            if isinstance(layer.ffn, MoELayer):
                layer.ffn.recompute_fn = fn if selective else None

    def set_aux_loss_scale(self, scale: float) -> None:
        for m in self.moe_layers():
            m.aux_loss_scale = scale

    def num_params(self, active: bool = False) -> int:
        """Parameter count; `active` counts only top_k of the routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.cfg.moe is not None:
            moe = self.cfg.moe
            for m in self.moe_layers():
                expert_params = m.experts.w_gate_up.numel() + m.experts.w_down.numel()
                total -= expert_params * (1 - moe.top_k / moe.num_experts)
        return int(total)


def _attention_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one attention layer: 2 per multiply-add of each projection,
    plus scores (q.k) and values (p.v) over the causal half of the sequence."""
    H, S, nh = cfg.d_model, cfg.seq_length, cfg.num_heads
    if cfg.attention == "mla":
        qk, dv, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_proj = H * cfg.q_lora_rank + cfg.q_lora_rank * nh * qk if cfg.q_lora_rank else H * nh * qk
        kv_proj = H * (r + cfg.qk_rope_head_dim) + r * nh * (cfg.qk_nope_head_dim + dv)
        proj = q_proj + kv_proj + nh * dv * H                                 # ... + o_proj
        return 2 * proj + 2 * S * nh * (qk + dv) / 2                          # causal half
    hd = cfg.head_dim or H // nh
    q_dim, kv_dim = nh * hd, (cfg.num_kv_heads or nh) * hd
    return 2 * H * (q_dim + 2 * kv_dim) + 2 * q_dim * H + 2 * 2 * S * q_dim / 2  # causal half


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (fwd + bwd = 3 x forward), Megatron-style formula with the MoE
    FFN counted for the top-k experts actually used (+ shared experts + router)."""
    H, L, V = cfg.d_model, cfg.num_layers, cfg.vocab_size
    attn = _attention_flops(cfg)
    total = 0.0
    for i in range(L):
        if is_moe_layer(cfg, i):
            moe = cfg.moe
            ffn = moe.top_k * 6 * H * moe.expert_hidden + 2 * H * moe.num_experts
            if moe.num_shared_experts:
                ffn += 6 * H * (moe.shared_expert_hidden or moe.num_shared_experts * moe.expert_hidden)
        else:
            ffn = 6 * H * cfg.ffn_hidden
        total += attn + ffn
    total += 2 * H * V
    return 3 * total


def build_model(cfg: ModelConfig, seed: int | None = None) -> Transformer:
    """Create the model on CPU in fp32 with a deterministic initialisation."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Transformer(cfg)
    return Transformer(cfg)



