"""What each (possibly sharded) parameter is: how its gradient reduces and which global slice it holds.

Every parallel transform (apply_tp, apply_ep) records a `ParamSpec` on the parameters it
creates (`param._megamoe_spec`); unmarked parameters are full copies. The spec drives
  - gradient reduction (data.py):  sum over `reduce_group`, then divide by dp
  - gradient norm (no double counting): only the first rank of `replica_group` counts it
  - checkpoints: global shape + the ranges of the global tensor this rank holds (resharding)
  - the model size printed at start (`count_params`): every parameter once, at its global size.

replica_group   the ranks holding identical copies after the gradient reduction:
                "dp" (TP-sharded dense), "dp_tp" (dense, full copy on every TP rank),
                "edp" (expert weights: sharded over ep / etp, replicated over expert-DP)
tp_partial      True when each TP rank's gradient covers only its own tokens (sequence-parallel
                norms, router and shared experts, whose inputs are split across TP), so the
                gradient must also be summed over TP.
norm_counted    False for a parameter that duplicates another one this rank group already
                counts (the head's copy of tied embeddings on the last pipeline stage).
index           per dim, the (start, stop) ranges of the global tensor that, concatenated in
                order, make up the local tensor. Usually one range per dim; the stacked
                gate|up expert weight under expert-TP holds two ranges on its last dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamoe.parallel.guard import guarded

Ranges = tuple[tuple[int, int], ...]


@dataclass
class ParamSpec:
    replica_group: str = "dp_tp"
    tp_partial: bool = False
    global_shape: tuple[int, ...] = ()
    index: tuple[Ranges, ...] = ()
    norm_counted: bool = True

    @property
    def reduce_group(self) -> str:
        if self.replica_group == "edp":
            return "edp"
        if self.replica_group == "dp_tp" and self.tp_partial:
            return "dp_tp"
        return "dp"  # TP-sharded, or full copies whose TP gradients are already identical

    def to_dict(self) -> dict:
        return {"replica_group": self.replica_group, "tp_partial": self.tp_partial,
                "global_shape": list(self.global_shape),
                "index": [[list(r) for r in ranges] for ranges in self.index],
                "norm_counted": self.norm_counted}


def full_index(shape) -> tuple[Ranges, ...]:
    return tuple(((0, n),) for n in shape)


def get_spec(p: torch.Tensor) -> ParamSpec:
    spec = getattr(p, "_megamoe_spec", None)
    if spec is None:
        spec = ParamSpec("dp_tp", False, tuple(p.shape), full_index(p.shape))
    return spec


def set_spec(p: torch.Tensor, **fields) -> ParamSpec:
    """Update the spec of p (creating the default one first)."""
    spec = get_spec(p)
    for k, v in fields.items():
        setattr(spec, k, v)
    p._megamoe_spec = spec
    return spec


def sharded_index(global_shape, dim: int, rank: int, parts: int) -> tuple[Ranges, ...]:
    """Index of the rank-th of `parts` equal contiguous chunks along `dim`."""
    n = global_shape[dim] // parts
    index = list(full_index(global_shape))
    index[dim] = ((rank * n, (rank + 1) * n),)
    return tuple(index)


def local_to_global_indices(index: tuple[Ranges, ...]) -> list[torch.Tensor]:
    """Per dim, the global positions of the local tensor's entries."""
    return [torch.cat([torch.arange(a, b) for a, b in ranges]) for ranges in index]


def place_shard(full: torch.Tensor, local: torch.Tensor, index: tuple[Ranges, ...]) -> None:
    """full[global positions of `index`] = local (used to reassemble shards)."""
    idx = local_to_global_indices(index)
    grid = torch.meshgrid(*idx, indexing="ij") if idx else ()
    full[grid] = local.to(full.dtype)


def spec_table(model: torch.nn.Module) -> dict[str, dict]:
    """name -> spec dict of every parameter (stored next to the shards in checkpoints)."""
    return {name: get_spec(p).to_dict() for name, p in model.named_parameters()}


@dataclass
class ParamCount:
    total: int                 # the whole model: every parameter once, tied embeddings once
    active: int                # used per token: routed experts count top_k / num_experts
    per_rank: list[int] = field(default_factory=list)   # what each rank holds (shards + copies)

    def describe(self) -> str:
        """The size as one process prints it; the same for every parallel layout."""
        return f"{self.total / 1e6:.2f}M parameters ({self.active / 1e6:.2f}M active)"

    def describe_per_rank(self) -> str | None:
        """What the ranks hold, when that differs from the whole model (sharded / pipelined)."""
        if len(self.per_rank) <= 1 or all(n == self.total for n in self.per_rank):
            return None
        lo, hi = min(self.per_rank), max(self.per_rank)
        held = f"{hi / 1e6:.2f}M" if lo == hi else f"{lo / 1e6:.2f}M to {hi / 1e6:.2f}M"
        return f"each of the {len(self.per_rank)} ranks holds {held} of them"


def count_params(model: torch.nn.Module) -> ParamCount:
    """Global parameter counts of a (possibly parallelized) megamoe model.

    Each rank lists its parameters by name at their global size (ParamSpec.global_shape), so a
    TP / EP shard counts as the whole tensor; the lists of all ranks are merged by name, so
    replicas count once and pipeline stages, which hold different layers, add up. The head's
    copy of tied embeddings (norm_counted False) is left out: the embedding counts once.
    A collective when torch.distributed is initialized: every rank must call it."""
    from megamoe.moe.layer import MoELayer   # lazily: params.py stays a leaf module
    routed = {f"{name}.experts.{pname}" if name else f"experts.{pname}"
              for name, m in model.named_modules() if isinstance(m, MoELayer)
              for pname, _ in m.experts.named_parameters()}
    mine = {name: (math.prod(get_spec(p).global_shape), name in routed)
            for name, p in model.named_parameters() if get_spec(p).norm_counted}
    held = sum(p.numel() for p in model.parameters())
    tables, per_rank = [mine], [held]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        with guarded():
            dist.all_gather_object(gathered, (mine, held))
        tables, per_rank = [t for t, _ in gathered], [n for _, n in gathered]
    merged = {}
    for table in tables:
        merged.update(table)
    total = sum(n for n, _ in merged.values())
    routed_total = sum(n for n, is_routed in merged.values() if is_routed)
    moe = getattr(getattr(model, "cfg", None), "moe", None)
    active = total
    if moe is not None and routed_total:
        # Stacked [E, ...] expert weights: routed_total is a multiple of num_experts.
        active = total - routed_total + routed_total * moe.top_k // moe.num_experts
    return ParamCount(total, active, per_rank)


__all__ = ["ParamSpec", "get_spec", "set_spec", "full_index", "sharded_index", "place_shard",
           "local_to_global_indices", "spec_table", "ParamCount", "count_params"]
