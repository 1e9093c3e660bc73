"""AdamW with decoupled weight decay on matrices only (not on norms, biases or router bias).

optim.impl: auto / torch -> torch's AdamW (fused on GPU); apex -> apex FusedAdam (AdamW mode),
only when configured. (With parallel.zero1 the ZeRO-1 optimizer steps torch AdamW on its shards.)"""

import torch

from megamoe.config import OptimConfig
from megamoe.ops import optional


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    on_cuda = any(p.is_cuda for p in model.parameters())
    if cfg.impl == "apex":
        return optional.fused_adamw(param_groups(model, cfg.weight_decay), cfg.lr,
                                    (cfg.beta1, cfg.beta2), cfg.eps)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True if on_cuda else None)
