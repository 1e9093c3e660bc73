"""Learning-rate schedules: linear warmup, then cosine / linear / WSD decay to min_lr_ratio * lr."""

import math

from megamoe.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":  # warmup - stable - decay (linear) over the last decay_steps
        decay = cfg.decay_steps or max(1, int(0.2 * total_steps))
        start = total_steps - decay
        if step < start:
            return peak
        frac = min(1.0, (step - start) / decay)
        return peak + (floor - peak) * frac
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return peak + (floor - peak) * frac
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))  # cosine
