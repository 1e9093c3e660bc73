"""Top-k token-choice router with load-balancing and z-losses.

Legend: T tokens, H hidden, E experts, K experts per token.

Modes (see ../shared/DESIGN.md, "Routing semantics"):
  softmax_topk  softmax over all E logits (fp32), then top-k; no renormalisation (OLMoE).
  topk_softmax  top-k of the logits, softmax over those k (Mixtral, Qwen).
  sigmoid_bias  sigmoid scores; a per-expert bias (a buffer, not trained by the optimizer) is
                added for *selection only*; weights are the unbiased scores, optionally
                renormalised, times routed_scaling_factor (DeepSeek-V3, aux-loss-free balancing).

Group-limited selection (n_group > 1, DeepSeek-V2/V3): the E experts form n_group equal groups,
a token keeps only its topk_group best groups and picks its k experts among them. A group scores
the sum of its top-2 selection scores (sigmoid_bias, V3) or its best probability (softmax_topk,
V2's group_limited_greedy). It only changes which experts are chosen, per token, before dispatch.

Losses use the statistics of the tokens this router sees; a parallel wrapper may install
`stats_reduce` (sum over a process group) so they use the statistics of a larger token set.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.config import MoEConfig
from megamoe.precision import full_precision, upcast


@dataclass
class RouterOutput:
    topk_idx: torch.Tensor      # [T, K] int64 expert of each slot
    topk_weight: torch.Tensor   # [T, K] fp32 routing weight of each slot
    probs: torch.Tensor         # [T, E] fp32 per-expert probability used by the LB loss
    logits: torch.Tensor        # [T, E] fp32 raw router logits


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))  # [E, H] like nn.Linear
        # Selection bias of sigmoid_bias mode; a buffer so it is checkpointed but not optimised.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        # Optional: callable(tensor) -> tensor summed over the token-sharing group (set by parallel/).
        self.stats_reduce = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # Router math in fp32 (fp64 in the fp64 test mode) whatever the autocast state: under
        # bf16 autocast F.linear would return bf16 logits, and near-ties would select other
        # experts than the fp32 model does.
        with full_precision(x.device.type):
            return self._route(upcast(x))

    def _route(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight.to(x.dtype))                    # [T, E]
        mode, k = self.cfg.router_mode, self.top_k
        if mode == "softmax_topk":
            probs = logits.softmax(dim=-1)
            topk_weight, topk_idx = self._group_limit(probs, "max").topk(k, dim=-1)
            if self.cfg.norm_topk_prob:
                topk_weight = topk_weight / topk_weight.sum(-1, keepdim=True)
        elif mode == "topk_softmax":
            probs = logits.softmax(dim=-1)
            top_logits, topk_idx = logits.topk(k, dim=-1)
            topk_weight = top_logits.softmax(dim=-1)
        else:  # sigmoid_bias
            scores = logits.sigmoid()
            choice = self._group_limit(scores + self.expert_bias.to(scores.dtype), "top2")
            _, topk_idx = choice.topk(k, dim=-1)
            topk_weight = scores.gather(-1, topk_idx)
            if self.cfg.norm_topk_prob:
                topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
            probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.cfg.routed_scaling_factor
        return RouterOutput(topk_idx, topk_weight, probs, logits)

    def _group_limit(self, scores: torch.Tensor, group_score: str) -> torch.Tensor:
        """scores [T, E] with the experts outside each token's topk_group best groups masked
        (0 for probabilities, -inf for sigmoid choice scores: neither can then be chosen, as
        config validation keeps top_k within the kept groups)."""
        n_group, keep = self.cfg.n_group, self.cfg.topk_group
        if n_group == 1 or keep == n_group:
            return scores
        grouped = scores.view(scores.shape[0], n_group, -1)                  # [T, G, E/G]
        if group_score == "top2":
            value = grouped.topk(2, dim=-1).values.sum(-1)                     # [T, G]
        else:
            value = grouped.max(dim=-1).values
        kept = torch.zeros_like(value, dtype=torch.bool)
        kept.scatter_(1, value.topk(keep, dim=-1).indices, True)
        mask = kept[:, :, None].expand_as(grouped).reshape(scores.shape)
        return scores.masked_fill(~mask, 0.0 if group_score == "max" else float("-inf"))

    # ------------------------------------------------------------------------------------ losses
    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.stats_reduce(t) if self.stats_reduce is not None else t

    def load_balancing_loss(self, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """E * sum_e f_e * P_e with f_e = share of token-slots routed to e, P_e = mean prob of e.

        Equals 1 for a perfectly balanced router. (transformers' Mixtral/OLMoE function sums over
        the k choices separately, which is K times this value.)
        """
        num_tokens = probs.new_full((), float(probs.shape[0]))   # a fill kernel, not a host copy
        prob_sum = probs.sum(0)                                   # [E]
        stats = self._reduce(torch.cat([counts.to(probs.dtype), num_tokens[None]]).detach())
        counts_g, tokens_g = stats[:-1], stats[-1]
        # P_e is differentiable; only its local part carries a gradient (the rest is a constant).
        prob_sum_g = prob_sum + (self._reduce(prob_sum.detach()) - prob_sum.detach())
        f = counts_g / (tokens_g * self.top_k).clamp(min=1)
        p = prob_sum_g / tokens_g.clamp(min=1)
        return self.num_experts * (f * p).sum()

    def z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
        z = torch.logsumexp(logits, dim=-1).square()
        total = z.sum()
        n = total.new_full((), float(logits.shape[0]))
        stats = self._reduce(torch.stack([total.detach(), n]))
        total_g = total + (stats[0] - total.detach())
        return total_g / stats[1].clamp(min=1)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: push under-loaded experts up, over-loaded ones down."""
        if self.cfg.router_mode != "sigmoid_bias" or self.cfg.bias_update_rate == 0:
            return
        load = tokens_per_expert.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
