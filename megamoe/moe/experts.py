"""Stacked SwiGLU experts and the grouped GEMM behind them.

Legend: N permuted token rows (grouped by expert), H hidden, I expert hidden, E local experts.
Weights are stacked so one kernel can run every expert:
  w_gate_up [E, H, 2I]  (gate | up along the last dim)     w_down [E, I, H]
Rows of x are already grouped expert-major; `counts[E]` says how many rows each expert owns.

Backends of `grouped_gemm(x, w, counts)` (all give the same numbers):
  grouped_mm  torch._grouped_mm with cumulative int32 offsets, no host sync
  loop        one matmul per expert (needs the counts on the host)
  grouped_gemm  megablocks' grouped_gemm package, if installed (CUDA; counts on the host)
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
    """torch._grouped_mm needs fp32/bf16/fp16 operands with 16-byte aligned row strides."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0) \
            and x.dtype != torch.bfloat16:
        return False
    elem = x.element_size()
    return (x.shape[-1] * elem) % 16 == 0 and (w.shape[-1] * elem) % 16 == 0


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto"):
    """y[N, out] where rows of expert e are x[rows_e] @ w[e]; x[N, in], w[E, in, out]."""
    if backend == "auto":
        backend = "grouped_mm" if grouped_mm_supported(x, w) else "loop"
    if backend == "grouped_mm":
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # on device: no host sync
        return _ContiguousGrad.apply(torch._grouped_mm(x, w.to(x.dtype), offs=offsets))
    if backend == "grouped_gemm":
        return optional.megablocks_gmm(x, w, counts)
    if backend == "loop":
        chunks = torch.split(x, counts.tolist())
        outs = [c @ w[e].to(x.dtype) for e, c in enumerate(chunks)]
        return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])
    raise ValueError(f"unknown grouped GEMM backend {backend!r}; use auto, grouped_mm, loop or grouped_gemm")


class GroupedExperts(nn.Module):
    """E SwiGLU experts applied to expert-major rows in three grouped GEMMs' worth of work."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.backend = num_experts, hidden, backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.w_gate_up.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.w_gate_up.dtype)
        elif torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gate_up = grouped_gemm(x, self.w_gate_up, counts, self.backend)   # [N, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_gemm(F.silu(gate) * up, self.w_down, counts, self.backend)  # [N, H]
