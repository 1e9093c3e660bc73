"""RMSNorm (computed in fp32) and the norm factory."""

import torch
import torch.nn as nn

from megamoe.config import ModelConfig
from megamoe.ops import optional


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def build_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        fused = optional.rmsnorm_class(cfg.norm_impl)  # apex FusedRMSNorm when asked / available
        return fused(dim, eps=cfg.norm_eps) if fused is not None else RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)
