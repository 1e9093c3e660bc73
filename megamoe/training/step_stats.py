"""What one optimizer step measured, summed over its micro-batches and MoE layers.

Everything stays a tensor on the training device until the step is logged: reading a value
with float() per micro-batch would be a host sync per micro-batch on a GPU. Under pipeline
parallelism each stage sees only its own MoE layers (and only the last stage sees the loss),
so `reduce(group)` sums the partial statistics over the pipeline group.

Legend: L MoE layers of the whole model (all stages), E routed experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.model.transformer import is_moe_layer
from megamoe.parallel.guard import guarded

CE, AUX, LB, Z, DROPPED, EVENTS = range(6)


def moe_layer_positions(model: torch.nn.Module) -> tuple[dict[int, int], int]:
    """({id(MoELayer): its position among the MoE layers of the full model, in global layer
    order}, number of MoE layers of the full model), for a whole model or for a pipeline
    stage's trimmed copy (which holds only some of them)."""
    cfg = model.cfg
    global_moe_ids = [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]
    positions = {id(block.ffn): global_moe_ids.index(int(key))
                 for key, block in model.layers.items() if int(key) in global_moe_ids}
    return positions, len(global_moe_ids)


class StepStats:
    def __init__(self, positions: dict[int, int], num_moe_layers: int, num_experts: int, device,
                 dtype: torch.dtype = torch.float32):
        # dtype: fp32, or fp64 for the fp64 test mode (fp32 rounding of a logged loss would
        # hide differences far below its last bit, or make equal runs look different)
        self.positions = positions
        self.scalars = torch.zeros(6, device=device, dtype=dtype)                       # CE..EVENTS
        self.load = torch.zeros(num_moe_layers, num_experts, device=device, dtype=dtype)  # [L, E]

    def add_ce(self, ce: torch.Tensor) -> None:
        self.scalars[CE] += ce.detach().to(self.scalars.dtype)

    def add_moe_layer(self, layer) -> None:
        """Statistics of one MoE layer's last forward (layer.last_stats, see MoELayer)."""
        s = layer.last_stats
        if not s:
            return
        dtype = self.scalars.dtype
        self.scalars[AUX] += s["aux_loss"].to(dtype)
        self.scalars[LB] += s["lb_loss"].to(dtype)
        self.scalars[Z] += s["z_loss"].to(dtype)
        self.scalars[DROPPED] += torch.as_tensor(s["dropped_frac"], dtype=dtype, device=self.scalars.device)
        self.scalars[EVENTS] += 1
        self.load[self.positions[id(layer)]] += s["tokens_per_expert"].to(dtype)

    def reduce(self, group) -> None:
        """Sum over the ranks of `group` (the pipeline stages), in one collective."""
        if group is None or dist.get_world_size(group) == 1:
            return
        flat = torch.cat([self.scalars, self.load.reshape(-1)])
        with guarded(group):
            dist.all_reduce(flat, group=group)
        self.scalars.copy_(flat[:6])
        self.load.copy_(flat[6:].view_as(self.load))

    # ------------------------------------------------------------------------------ results
    @property
    def has_moe(self) -> bool:
        return self.load.numel() > 0

    def ce_mean(self, num_micro: int) -> torch.Tensor:
        return self.scalars[CE] / num_micro

    def aux_mean(self, num_micro: int) -> torch.Tensor:
        """Per micro-batch: the sum over MoE layers of their weighted aux losses."""
        return self.scalars[AUX] / num_micro

    def layer_means(self) -> torch.Tensor:
        """[LB loss, z-loss, dropped fraction], each averaged over (micro-batch, MoE layer)."""
        return self.scalars[[LB, Z, DROPPED]] / self.scalars[EVENTS].clamp(min=1)


__all__ = ["StepStats", "moe_layer_positions"]
