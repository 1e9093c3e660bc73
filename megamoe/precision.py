"""The precision policy: which dtype each part of a training step runs in.

`dtype` (TrainConfig.dtype) chooses the compute dtype; everything below follows from it.

  part                       fp32          bf16 (autocast)                 fp64 (tests only)
  parameters (master)        fp32          fp32                            fp64
  gradients, DP reductions   fp32          fp32 (all-reduce / reduce-      fp64
                                           scatter of fp32 buffers)
  optimizer state            fp32          fp32 (ZeRO-1: fp32 masters)     fp64
  dense GEMMs (attn, MLP,    fp32          bf16 inputs, fp32 accumulate    fp64
  head)                                    (torch.autocast)
  expert GEMMs               fp32          bf16: tokens cast before the    fp64
                                           permutation; a bf16 copy of the
                                           weights made once per optimizer
                                           step (grouped_mm is no autocast op)
  router: logits, softmax /  fp32          fp32, autocast disabled inside  fp64
  sigmoid, top-k, weights                  the router (selection too)
  aux losses (LB, z)         fp32          fp32                            fp64
  norms (RMSNorm)            fp32 stats    fp32 statistics; output in      fp64
                                           the input's dtype (residual
                                           stream stays fp32)
  softmax in attention       fp32          SDPA under autocast (bf16       fp64
                                           inputs, fp32 softmax inside)
  cross-entropy              fp32          fp32 (logits upcast)            fp64
  logged statistics          fp32          fp32                            fp64

`auto` is bf16 on a GPU and fp32 on a CPU. `fp64` exists so that the parallel-vs-one-process
tests can compare at ~1e-9 without fp32 reduction-order noise; it is not a training mode.
FP8 (TrainConfig.fp8, Transformer Engine) is applied on top of bf16 to the dense linears whose
dimensions are multiples of 16; see megamoe.training.build.apply_precision.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = ("auto", "fp32", "bf16", "fp64")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which statistics, losses and norms of `dtype` data are computed:
    fp64 for fp64 data, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in its accumulation dtype (fp32 for bf16/fp16/fp32, fp64 stays fp64)."""
    return t.to(accum_dtype(t.dtype))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a GPU, 'fp32' elsewhere; other values unchanged."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def param_dtype(dtype: str) -> torch.dtype:
    """Parameters are fp32 masters except in the fp64 test mode."""
    return torch.float64 if dtype == "fp64" else torch.float32


def autocast_context(dtype: str, device: torch.device):
    """The forward's autocast context for a resolved dtype (bf16 -> torch.autocast)."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device_type: str):
    """Disable autocast (for the router: its math is fp32 whatever the surrounding dtype)."""
    return torch.autocast(device_type, enabled=False)


__all__ = ["DTYPES", "accum_dtype", "upcast", "resolve_dtype", "param_dtype", "autocast_context",
           "full_precision"]
