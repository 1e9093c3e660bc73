"""What each (possibly sharded) parameter is: how its gradient reduces and which global slice it holds.

Every parallel transform (apply_tp, apply_ep) records a `ParamSpec` on the parameters it
creates (`param._megamoe_spec`); unmarked parameters are full copies. The spec drives
  - gradient reduction (data.py):  sum over `reduce_group`, then divide by dp
  - gradient norm (no double counting): only the first rank of `replica_group` counts it
  - checkpoints: global shape + the ranges of the global tensor this rank holds (resharding).

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

from dataclasses import dataclass

import torch

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


__all__ = ["ParamSpec", "get_spec", "set_spec", "full_index", "sharded_index", "place_shard",
           "local_to_global_indices", "spec_table"]
