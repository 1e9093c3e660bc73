"""MoELayer = router + dispatcher + grouped experts (+ shared experts).

Legend: B batch, S sequence, H hidden, T = B*S tokens, K experts per token, E experts.

The auxiliary losses (load balancing, router z-loss) do not travel through the model's return
value: `AuxLossGrad` attaches their gradient to the layer output, so they work unchanged under
activation checkpointing and pipeline parallelism. Their detached values and the routing
statistics are kept in `last_stats` for the trainer to log.
"""

import torch
import torch.nn as nn

from megamoe.config import MoEConfig
from megamoe.model.mlp import SwiGLU
from megamoe.moe.dispatch import LocalDispatcher, apply_capacity, expert_counts, finish_combine
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.router import Router


class AuxLossGrad(torch.autograd.Function):
    """Identity on `out`; in backward, also feeds d(aux)/d(aux) = scale into the aux loss."""

    @staticmethod
    def forward(ctx, out, aux_loss, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        (aux_loss,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux_loss, ctx.scale), None


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_hidden, cfg.gemm_backend)
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self.shared_experts = None
        self.shared_expert_gate = None
        if cfg.num_shared_experts > 0:
            hidden = cfg.shared_expert_hidden or cfg.num_shared_experts * cfg.expert_hidden
            self.shared_experts = SwiGLU(d_model, hidden)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        # Gradient weight of the aux losses; the trainer sets 1/num_micro_batches.
        self.aux_loss_scale = 1.0
        # Selective recompute (set from outside): checkpoint(fn, *args) run around the expert
        # GEMMs and the shared experts only, so that the router decisions and the token
        # exchanges are kept and no communication is repeated in backward.
        self.recompute_fn = None
        self.last_stats: dict = {}

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
        """Under autocast, the tokens in the autocast dtype: torch._grouped_mm is not an autocast
        op (it would run in fp32), and casting before the permutation halves the bytes that are
        permuted and sent over expert parallelism."""
        if torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def _recomputed(self, fn, *args):
        if self.recompute_fn is not None and self.training and torch.is_grad_enabled():
            return self.recompute_fn(fn, *args)
        return fn(*args)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._recomputed(self.shared_experts, x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # [T, H]
        route = self.router(x)
        topk_idx = route.topk_idx
        if self.cfg.capacity_factor > 0:
            topk_idx = apply_capacity(topk_idx, self.cfg.num_experts, self.cfg.capacity_factor)
        dropless = self.cfg.capacity_factor <= 0
        # Dropless: the permuted row count is known (T*K), so the GPU path needs no host sync.
        flights = self.dispatcher.dispatch_start(
            self._compute_dtype(x), topk_idx, num_valid=topk_idx.numel() if dropless else None)
        # The shared experts need no exchange: they run while the dispatch travels.
        shared = self._shared(x) if self.shared_experts is not None else None
        combines = []
        for flight in flights:   # token chunks: one chunk's GEMMs overlap the other's exchange
            x_perm, counts, ctx = flight.wait()                                  # [N, H], [E_local]
            y_perm = self._recomputed(self.experts, x_perm, counts)
            combines.append(self.dispatcher.combine_start(y_perm, route.topk_weight, ctx))
        y = finish_combine(combines).to(x.dtype)                                 # [T, H]
        if shared is not None:
            y = y + shared

        # Statistics over all E experts (not only local ones): what the router decided.
        tokens_per_expert = expert_counts(topk_idx, self.cfg.num_experts)
        lb = self.router.load_balancing_loss(route.probs, tokens_per_expert)
        z = self.router.z_loss(route.logits)
        aux = self.cfg.lb_loss_coef * lb + self.cfg.z_loss_coef * z
        if self.training and aux.requires_grad:
            y = AuxLossGrad.apply(y, aux, self.aux_loss_scale)
        self.last_stats = {
            "lb_loss": lb.detach(), "z_loss": z.detach(), "aux_loss": aux.detach(),
            "tokens_per_expert": tokens_per_expert.detach(),
            "dropped_frac": 1.0 - tokens_per_expert.sum() / max(1, topk_idx.numel()) if not dropless
                            else torch.zeros((), device=topk_idx.device),
        }
        return y.reshape(shape)
