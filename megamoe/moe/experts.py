"""Stacked SwiGLU experts and the grouped GEMM behind them.

Legend: N permuted token rows (grouped by expert), H hidden, I expert hidden, E local experts.
Weights are stacked so one kernel can run every expert:
  w_gate_up [E, H, 2I]  (gate | up along the last dim)     w_down [E, I, H]
Rows of x are already grouped expert-major; `counts[E]` says how many rows each expert owns.

Backends of `grouped_gemm(x, w, counts)` (all give the same numbers):
  grouped_mm  torch._grouped_mm with cumulative int32 offsets, no host sync
  loop        one matmul per expert (needs the counts on the host)
  grouped_gemm  megablocks' grouped_gemm package, only when configured (CUDA; counts on the host)
  auto        grouped_mm where torch runs it without host syncs and fast: bf16 on sm90/sm100,
              and on CPU (fp32/bf16/fp16); else loop
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.ops import optional


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects stride-0 (expanded) gradients, e.g. from `.sum()`.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm can run these operands at all: fp32/bf16/fp16 with 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    elem = x.element_size()
    return (x.shape[-1] * elem) % 16 == 0 and (w.shape[-1] * elem) % 16 == 0


def grouped_mm_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm is the best choice here. On a GPU only with its fast
    (CUTLASS) kernel, bf16 on sm90 / sm100: elsewhere (fp32/fp16, other GPUs) torch copies the
    offsets to the host and loops over the groups. On a CPU there is no device to wait for,
    and torch's loop over the groups (C++) beats the Python `loop` backend (1.1-2.3x in every
    CPU run of benchmarks/moe_layer.py in RESULTS.md), for the dtypes it has (fp32/bf16/fp16)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def resolve_gemm_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The grouped GEMM backend a run uses for `backend` (config value) with compute `dtype`:
    auto -> grouped_mm where grouped_mm_fast says so, else loop. A configured backend that
    cannot run here is a one-line ValueError."""
    if backend == "auto":
        return "grouped_mm" if grouped_mm_fast(device, dtype) else "loop"
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"model.moe.gemm_backend grouped_mm needs torch._grouped_mm (torch >= 2.8); "
                         f"this torch {torch.__version__} has none: use auto or loop")
    if backend == "grouped_gemm":
        optional.require("grouped_gemm", "model.moe.gemm_backend=grouped_gemm")
    if backend not in ("grouped_mm", "loop", "grouped_gemm"):
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; use auto, grouped_mm, loop or grouped_gemm")
    return backend


def pick_backend(backend: str, x: torch.Tensor, w: torch.Tensor) -> str:
    """`auto` -> grouped_mm where torch has its fast kernel for these operands, else loop."""
    if backend != "auto":
        return backend
    return "grouped_mm" if grouped_mm_fast(x.device, x.dtype) and grouped_mm_supported(x, w) else "loop"


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto",
                 host_counts: list[int] | None = None):
    """y[N, out] where rows of expert e are x[rows_e] @ w[e]; x[N, in], w[E, in, out].
    host_counts: `counts` as a Python list, for the backends that need them on the host (loop,
    grouped_gemm), so that a caller running several GEMMs transfers them once."""
    backend = pick_backend(backend, x, w)
    if backend == "grouped_mm":
        if not grouped_mm_supported(x, w):
            raise ValueError(f"model.moe.gemm_backend grouped_mm needs fp32/bf16/fp16 rows of a multiple "
                             f"of 16 bytes (got {x.dtype}, in {x.shape[-1]}, out {w.shape[-1]}); use loop")
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # on device: no host sync
        return _ContiguousGrad.apply(torch._grouped_mm(x, w.to(x.dtype), offs=offsets))
    if host_counts is None and backend in ("grouped_gemm", "loop"):
        host_counts = counts.tolist()       # a host sync: these backends loop on the host
    if backend == "grouped_gemm":
        return optional.megablocks_gmm(x, w, torch.tensor(host_counts, dtype=torch.int64))
    if backend == "loop":
        chunks = torch.split(x, host_counts)
        outs = [c @ w[e].to(x.dtype) for e, c in enumerate(chunks)]
        return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])
    raise ValueError(f"unknown grouped GEMM backend {backend!r}; use auto, grouped_mm, loop or grouped_gemm")


class _CachedCast(torch.autograd.Function):
    """The weight in the compute dtype from a cache (forward), its gradient cast back to the
    master weight's dtype (backward): the autograd of w.to(dtype) without the per-call cast."""

    @staticmethod
    def forward(ctx, w, cached):
        ctx.dtype = w.dtype
        return cached.view_as(cached)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


class GroupedExperts(nn.Module):
    """E SwiGLU experts applied to expert-major rows in three grouped GEMMs' worth of work.

    Under autocast the fp32 master weights are cast to the compute dtype once per optimizer
    step, not once per call (forward, every micro-batch, recompute): the copy is kept and
    reused while the parameter's version counter is unchanged (an optimizer step, or loading
    a checkpoint, updates the weights in place and so bumps it). Same numbers as casting per
    call; costs a compute-dtype copy of this rank's expert weights (half their fp32 bytes)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.backend = num_experts, hidden, backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self._casts: dict[str, tuple] = {}     # name -> (param, version, dtype, copy)

    def compute_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, name)
        if w.dtype == dtype:
            return w
        hit = self._casts.get(name)
        if hit is None or hit[0] is not w or hit[1] != w._version or hit[2] != dtype:
            with torch.no_grad():
                hit = (w, w._version, dtype, w.detach().to(dtype))
            self._casts[name] = hit
        return _CachedCast.apply(w, hit[3]) if torch.is_grad_enabled() and w.requires_grad else hit[3]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.w_gate_up.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.w_gate_up.dtype)
        elif torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        backend = pick_backend(self.backend, x, self.w_gate_up)
        # loop / grouped_gemm need the counts on the host: one transfer for both GEMMs
        host_counts = counts.tolist() if backend in ("loop", "grouped_gemm") else None
        w_gate_up, w_down = self.compute_weight("w_gate_up", x.dtype), self.compute_weight("w_down", x.dtype)
        gate_up = grouped_gemm(x, w_gate_up, counts, backend, host_counts)   # [N, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_gemm(F.silu(gate) * up, w_down, counts, backend, host_counts)  # [N, H]
