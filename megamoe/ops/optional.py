"""Optional third-party kernels, each behind a guarded import.

  grouped_gemm        megablocks' grouped GEMM (`grouped_gemm.ops.gmm`): MoE experts backend
                      "grouped_gemm" (CUDA only; needs the per-expert counts on the host).
  apex                fused RMSNorm (apex.normalization.FusedRMSNorm) and fused AdamW
                      (apex.optimizers.FusedAdam with adam_w_mode).
  transformer_engine  te.Linear for the dense linears, run under te.fp8_autocast for FP8.

`available()` says which are importable. Asking for one that is missing raises a ValueError
saying which package to install; "auto" choices silently fall back to PyTorch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch
import torch.nn as nn

_PACKAGES = {"grouped_gemm": "grouped_gemm", "apex": "apex", "transformer_engine": "transformer_engine"}


def available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(mod) is not None for name, mod in _PACKAGES.items()}


def _require(name: str, what: str):
    if importlib.util.find_spec(_PACKAGES[name]) is None:
        raise ValueError(f"{what} needs the '{name}' package, which is not installed; "
                         f"install it or choose the PyTorch implementation")
    return importlib.import_module(_PACKAGES[name])


# ------------------------------------------------------------------------------------ grouped_gemm

def megablocks_gmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[N, out] = per-expert x @ w[e] through grouped_gemm.ops.gmm (batch sizes on the host)."""
    gg = _require("grouped_gemm", "model.moe.gemm_backend=grouped_gemm")
    return gg.ops.gmm(x, w.to(x.dtype), counts.to("cpu", torch.int64), trans_b=False)


# -------------------------------------------------------------------------------------------- apex

def rmsnorm_class(impl: str):
    """The RMSNorm class for `impl` in (auto, torch, apex); None means megamoe's own."""
    if impl == "torch" or (impl == "auto" and not available()["apex"]):
        return None
    _require("apex", "model.norm_impl=apex")
    from apex.normalization import FusedRMSNorm
    return FusedRMSNorm


def fused_adamw(param_groups, lr: float, betas, eps: float):
    _require("apex", "optim.impl=apex")
    from apex.optimizers import FusedAdam
    return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)


# ----------------------------------------------------------------------------- Transformer Engine

def swap_linears_for_te(model: nn.Module) -> int:
    """Replace the model's nn.Linear layers (not the experts, router or head) by te.Linear with
    the same weights; returns how many were swapped. Run the forward under `fp8_autocast()`."""
    _require("transformer_engine", "fp8 training")
    import transformer_engine.pytorch as te_torch
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name == "lm_head":
                continue
            new = te_torch.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  params_dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(parent, name, new)
            swapped += 1
    return swapped


def fp8_autocast(enabled: bool = True):
    if not enabled:
        return contextlib.nullcontext()
    _require("transformer_engine", "fp8 training")
    import transformer_engine.pytorch as te_torch
    return te_torch.fp8_autocast(enabled=True)
