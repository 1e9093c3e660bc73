"""Optional third-party kernels, each behind a guarded import and used only when configured.

  grouped_gemm        megablocks' grouped GEMM (`grouped_gemm.ops.gmm`): MoE experts backend
                      model.moe.gemm_backend=grouped_gemm (CUDA only; counts on the host).
  apex                fused RMSNorm (apex.normalization.FusedRMSNorm, model.norm_impl=apex) and
                      fused AdamW (apex.optimizers.FusedAdam in AdamW mode, optim.impl=apex).
  transformer_engine  te.Linear for the dense linears, run under te.fp8_autocast (fp8: true),
                      and TE's checkpoint so that recompute replays the FP8 state.

`available()` says which are importable. Nothing here is picked because it happens to be
installed ("auto" always means the PyTorch implementation): the same config gives the same
numerics everywhere. Asking for a missing one raises a one-line ValueError naming the package.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn as nn

_PACKAGES = {"grouped_gemm": "grouped_gemm", "apex": "apex", "transformer_engine": "transformer_engine"}


def available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(mod) is not None for name, mod in _PACKAGES.items()}


def require(name: str, what: str):
    """Import the optional package `name`, or a ValueError saying that `what` needs it."""
    if importlib.util.find_spec(_PACKAGES[name]) is None:
        raise ValueError(f"{what} needs the '{name}' package, which is not installed; "
                         f"install it or choose the PyTorch implementation")
    return importlib.import_module(_PACKAGES[name])


# ------------------------------------------------------------------------------------ grouped_gemm

def megablocks_gmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[N, out] = per-expert x @ w[e] through grouped_gemm.ops.gmm (batch sizes on the host)."""
    gg = require("grouped_gemm", "model.moe.gemm_backend=grouped_gemm")
    return gg.ops.gmm(x, w.to(x.dtype), counts.to("cpu", torch.int64), trans_b=False)   # counts: host


# -------------------------------------------------------------------------------------------- apex

def apex_rmsnorm(norm: nn.Module) -> nn.Module:
    """apex FusedRMSNorm with the weights of megamoe's RMSNorm `norm`. Note: it returns the
    input's dtype under autocast where megamoe's norm keeps the residual stream's fp32."""
    require("apex", "model.norm_impl=apex")
    from apex.normalization import FusedRMSNorm
    fused = FusedRMSNorm(norm.weight.shape[0], eps=norm.eps).to(norm.weight.device, norm.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(norm.weight)
    return fused


def fused_adamw(param_groups, lr: float, betas, eps: float):
    require("apex", "optim.impl=apex")
    from apex.optimizers import FusedAdam
    return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)


# ----------------------------------------------------------------------------- Transformer Engine

def te_linear(child: nn.Linear) -> nn.Module:
    """A te.Linear with the weights of `child` (run it under `fp8_autocast()`)."""
    te = _te()
    new = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                    params_dtype=child.weight.dtype, device=child.weight.device)
    with torch.no_grad():
        new.weight.copy_(child.weight)
        if child.bias is not None:
            new.bias.copy_(child.bias)
    return new


def _te():
    require("transformer_engine", "fp8 training")
    return importlib.import_module("transformer_engine.pytorch")


def fp8_autocast():
    return _te().fp8_autocast(enabled=True)


def te_checkpoint(function, *args):
    """Activation checkpoint whose recompute runs in the FP8 state of the original forward."""
    return _te().checkpoint(function, *args, use_reentrant=False)
