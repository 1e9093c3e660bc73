"""Token dispatch for dropless (or capacity-limited) token-choice MoE.

Legend: T tokens, H hidden, K experts per token, E experts, N permuted rows (= T*K when dropless).

A dispatcher moves tokens to the experts that own them and back, in steps that are started and
later waited for (an expert-parallel exchange travels in between):
  dispatch_start(x[T, H], topk_idx[T, K], num_valid=None) -> [flight per token chunk]
      flight.wait() -> x_perm[N, H] grouped by *local* expert, counts[E_local], ctx
      (num_valid: the number of non-dropped slots when known, T*K if dropless)
  combine_start(y_perm[N, H], topk_weight[T, K], ctx) -> flight
      flight.wait() -> y[T_chunk, H]  (weighted sum over the k choices; chunks in token order)
  dispatch(...) / combine(...): one chunk, at once.
`ctx` is whatever the dispatcher needs to invert its own permutation; dispatchers hold no state.
`LocalDispatcher` keeps every expert on this rank (one chunk, nothing in flight). The
expert-parallel dispatcher (megamoe.parallel.expert) adds all-to-alls between permute and the
experts with the same API.
"""

import math

import torch

from megamoe import ops


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 slots routed to each expert (dropped slots, -1, not counted); on the device,
    with scatter_add (bincount would synchronize with the host on CUDA)."""
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int64))


def apply_capacity(topk_idx: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Mark slots beyond each expert's capacity as dropped (-1), first come first served.

    capacity = ceil(capacity_factor * T * K / E); slots are served in token order, and for one
    token in order of preference (k = 0 first).
    """
    T, K = topk_idx.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    flat = topk_idx.t().reshape(-1)            # preference-major: every token's 1st choice first
    one_hot = torch.nn.functional.one_hot(flat, num_experts)   # [K*T, E]
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1       # rank of the slot in its expert
    keep = (position < capacity).view(K, T).t()
    return torch.where(keep, topk_idx, torch.full_like(topk_idx, -1))


class LocalDispatcher:
    """All experts live on this rank: permute, run, unpermute."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_valid: int | None = None):
        x_perm, perm_map, counts = ops.permute(x, topk_idx, self.num_experts, num_valid)
        return x_perm, counts, perm_map

    def combine(self, y_perm: torch.Tensor, topk_weight: torch.Tensor, perm_map) -> torch.Tensor:
        return ops.unpermute(y_perm, perm_map, topk_weight)

    def dispatch_start(self, x: torch.Tensor, topk_idx: torch.Tensor, num_valid: int | None = None) -> list:
        return [Done(self.dispatch(x, topk_idx, num_valid))]

    def combine_start(self, y_perm: torch.Tensor, topk_weight: torch.Tensor, perm_map) -> "Done":
        return Done(self.combine(y_perm, topk_weight, perm_map))


class Done:
    """A step that finished at once, with a flight's interface (wait() -> its result)."""

    def __init__(self, value):
        self._value = value

    def wait(self):
        return self._value


def finish_combine(flights: list) -> torch.Tensor:
    """Wait for every chunk's combine, in token order: -> y[T, H]."""
    ys = [f.wait() for f in flights]
    return ys[0] if len(ys) == 1 else torch.cat(ys)
