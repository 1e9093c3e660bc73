"""RMSNorm (computed in fp32) and the norm factory."""

import torch
import torch.nn as nn

from megamoe.config import ModelConfig
from megamoe.precision import upcast


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-channel scale, or none (`affine=False`: a parameter-free
    norm, as OLMo-1B's non-parametric layer norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = upcast(x)   # statistics in fp32 (fp64 for fp64 data)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            normed = normed * self.weight.to(x32.dtype)
        return normed.to(x.dtype)


def build_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """megamoe's RMSNorm or torch's LayerNorm, with learnable weights unless cfg.norm_affine is
    off; other implementations (model.norm_impl apex) are swapped in by the build pipeline
    (megamoe.training.build.apply_precision)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, affine=cfg.norm_affine)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine,
                        bias=cfg.bias and cfg.norm_affine)
