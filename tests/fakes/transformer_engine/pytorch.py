"""Fake transformer_engine.pytorch (see the package docstring)."""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

STATE = {"depth": 0, "calls_in_fp8": 0, "recomputes_in_fp8": 0}


class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=params_dtype)

    def forward(self, x):
        if torch.is_grad_enabled() and self.training and STATE["depth"] == 0:
            raise RuntimeError("fake te.Linear ran outside fp8_autocast")
        STATE["calls_in_fp8"] += STATE["depth"] > 0
        return F.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def fp8_autocast(enabled=True):
    STATE["depth"] += 1
    try:
        yield
    finally:
        STATE["depth"] -= 1


@contextlib.contextmanager
def _recompute_context():
    STATE["recomputes_in_fp8"] += 1
    with fp8_autocast():
        yield


def checkpoint(function, *args, use_reentrant=True, **kwargs):
    """Like TE's: the recompute runs inside the FP8 context of the original forward."""
    assert not use_reentrant, "megamoe asks for the non-reentrant variant"
    return torch_checkpoint(function, *args, use_reentrant=False,
                            context_fn=lambda: (contextlib.nullcontext(), _recompute_context()))
