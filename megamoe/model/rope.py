"""Rotary position embeddings: the cos / sin cache, with optional llama3 / yarn frequency scaling.

Layout: "rotate half", pairs (i, i + d/2), the layout Hugging Face Llama / OLMoE / Mixtral use
(DeepSeek's interleaved pairs are handled by permuting weight rows, see megamoe/model/mla.py).
The scaled variants follow transformers' modeling_rope_utils (`_compute_llama3_parameters`,
`_compute_yarn_parameters`) formula by formula; they are computed here in float64.
Legend: S sequence, d rotary dims.
"""

from __future__ import annotations

import math

import torch

from megamoe.config import RopeScaling


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv_freq: torch.Tensor, r: RopeScaling) -> torch.Tensor:
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)   # low frequencies
    smooth = ((r.original_max_position_embeddings / wavelen - r.low_freq_factor)
              / (r.high_freq_factor - r.low_freq_factor))
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, r: RopeScaling) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2], attention_factor) of YaRN."""
    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = yarn_get_mscale(r.factor, r.mscale) / yarn_get_mscale(r.factor, r.mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(r.factor)
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength makes `rotations` turns over the original context."""
        return (dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation = 1 - ramp                                   # 1: keep the original frequency
    inv_freq = (1.0 / (r.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def inv_freq_and_scale(dim: int, theta: float, scaling: RopeScaling | None = None
                       ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [d/2] in float64, factor applied to cos / sin)."""
    if scaling is not None and scaling.type == "yarn":
        return _yarn(dim, theta, scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling is not None and scaling.type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq, 1.0


def softmax_scale_factor(scaling: RopeScaling | None) -> float:
    """Extra factor on MLA's softmax scale: yarn's mscale(factor, mscale_all_dim)^2 (DeepSeek's
    reference and transformers' yarn_apply_mscale); 1 otherwise."""
    if scaling is None or scaling.type != "yarn" or not scaling.mscale_all_dim:
        return 1.0
    return yarn_get_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None,
               scaling: RopeScaling | None = None):
    """cos, sin [S, d] (fp32) for rotate-half RoPE, times yarn's attention factor if any."""
    inv_freq, scale = inv_freq_and_scale(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1).to(device)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, S, hd]; rotate pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
