"""Mixture-of-Experts block: router -> dispatcher -> grouped experts (+ shared experts)."""

from megamoe.moe.layer import MoELayer

__all__ = ["MoELayer"]
