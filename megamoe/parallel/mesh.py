"""One rank grid, several named views of it (Megatron-Core order, nanotron style).

Attention / dense view (tp varies fastest, then dp, then pp):
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
Expert view of the same ranks: inside one pipeline stage the dp*tp ranks are re-read as
    (rank mod dp*tp) = etp_rank + etp * (ep_rank + ep * edp_rank),   edp = dp*tp / (ep*etp)

Named groups (each a list of global ranks; every rank belongs to exactly one of each kind):
    tp     tensor parallel               (same pp, dp)
    dp     data parallel of dense params (same pp, tp)
    pp     pipeline                      (same dp, tp)
    dp_tp  all ranks of one stage: the ranks that see distinct tokens in the MoE block
    ep     expert parallel               (same pp, edp, etp)
    etp    expert tensor parallel        (same pp, edp, ep)
    edp    expert data parallel: replicas of one expert shard (same pp, ep, etp)
    embed  first and last pipeline stage (same dp, tp): sums the gradients of tied embeddings
           when the head lives on another stage than the embedding; other ranks: alone
Gradients of dense params reduce over "dp" (or "dp_tp" when each TP rank saw different
tokens, see megamoe.parallel.params); expert params over "edp".

`layout(...)` is pure arithmetic (testable without processes); `ParallelMesh` additionally
creates the torch.distributed groups (every rank must construct it, in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megamoe.parallel.launch import new_group

GROUP_NAMES = ("tp", "dp", "pp", "dp_tp", "ep", "etp", "edp", "embed")


@dataclass(frozen=True)
class Coords:
    """Where one rank sits in both views."""
    pp: int
    dp: int
    tp: int
    edp: int
    ep: int
    etp: int


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int

    @property
    def edp(self) -> int:
        return self.dp * self.tp // (self.ep * self.etp)

    def coords(self, rank: int) -> Coords:
        tp_r = rank % self.tp
        dp_r = (rank // self.tp) % self.dp
        pp_r = rank // (self.tp * self.dp)
        local = rank % (self.tp * self.dp)
        etp_r = local % self.etp
        ep_r = (local // self.etp) % self.ep
        edp_r = local // (self.etp * self.ep)
        return Coords(pp_r, dp_r, tp_r, edp_r, ep_r, etp_r)

    def groups(self, name: str) -> list[list[int]]:
        """All groups of kind `name`, each a sorted list of global ranks, in a fixed order."""
        if name not in GROUP_NAMES:
            raise ValueError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES)}")
        if name == "embed":
            return self._embed_groups()
        # Key = the coordinates that stay fixed inside one group of this kind.
        fixed = {"tp": ("pp", "dp"), "dp": ("pp", "tp"), "pp": ("dp", "tp"), "dp_tp": ("pp",),
                 "ep": ("pp", "edp", "etp"), "etp": ("pp", "edp", "ep"),
                 "edp": ("pp", "ep", "etp")}[name]
        by_key: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            by_key.setdefault(tuple(getattr(c, f) for f in fixed), []).append(r)
        return [by_key[k] for k in sorted(by_key)]

    def _embed_groups(self) -> list[list[int]]:
        ends = {0, self.pp - 1}
        groups = []
        for r in range(self.world_size):
            c = self.coords(r)
            if c.pp not in ends:
                groups.append([r])
            elif c.pp == 0:
                groups.append(sorted({r, r + (self.pp - 1) * self.tp * self.dp}))
        return sorted(groups)

    def describe(self) -> str:
        """Readable table: rank -> coordinates in both views."""
        lines = [f"world {self.world_size} = pp {self.pp} x dp {self.dp} x tp {self.tp}; "
                 f"experts: pp {self.pp} x edp {self.edp} x ep {self.ep} x etp {self.etp}",
                 "rank | pp dp tp | edp ep etp"]
        for r in range(self.world_size):
            c = self.coords(r)
            lines.append(f"{r:4d} | {c.pp:2d} {c.dp:2d} {c.tp:2d} | {c.edp:3d} {c.ep:2d} {c.etp:3d}")
        return "\n".join(lines)


def make_layout(world_size: int, tp: int = 1, pp: int = 1, dp: int = 0, ep: int = 1,
                etp: int = 1) -> Layout:
    """Check the sizes and return the layout; ValueError says which combination is impossible."""
    for name, v in (("world_size", world_size), ("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if v < 1:
            raise ValueError(f"parallel.{name} must be >= 1 (got {v})")
    if dp < 0:
        raise ValueError(f"parallel.dp must be >= 0 (0 = derive from the world size), got {dp}")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    dp = dp or world_size // (tp * pp)
    if dp * tp * pp != world_size:
        raise ValueError(f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} != world size {world_size}")
    if (dp * tp) % (ep * etp):
        raise ValueError(f"ep*etp = {ep}*{etp} must divide dp*tp = {dp}*{tp}: expert groups are "
                         "carved out of the data- and tensor-parallel ranks of one stage")
    return Layout(world_size, tp, pp, dp, ep, etp)


class ParallelMesh:
    """The layout plus this rank's process group of every kind.

    Groups of size 1 are still real groups so that collectives can always be called with an
    explicit group (they return early when the group has one rank).
    """

    def __init__(self, layout: Layout, rank: int, timeout_s: float | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before building a ParallelMesh")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"the layout is for {layout.world_size} ranks but the process group "
                             f"has {dist.get_world_size()}")
        self.layout, self.rank = layout, rank
        self.coords = layout.coords(rank)
        self._groups: dict[str, dist.ProcessGroup] = {}
        self._ranks: dict[str, list[int]] = {}
        for name in GROUP_NAMES:
            for ranks in layout.groups(name):  # every rank creates every group, same order
                pg = new_group(ranks, name, timeout_s)   # named: errors say which group
                if rank in ranks:
                    self._groups[name], self._ranks[name] = pg, ranks

    @classmethod
    def from_config(cls, pcfg, world_size: int, rank: int) -> "ParallelMesh":
        return cls(make_layout(world_size, pcfg.tp, pcfg.pp, pcfg.dp, pcfg.ep, pcfg.etp), rank,
                   timeout_s=pcfg.timeout_s)

    # --------------------------------------------------------------------------------- queries
    def group(self, name: str) -> dist.ProcessGroup:
        return self._groups[name]

    def ranks(self, name: str) -> list[int]:
        return list(self._ranks[name])

    def size(self, name: str) -> int:
        return len(self._ranks[name])

    def rank_in(self, name: str) -> int:
        return self._ranks[name].index(self.rank)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    tp = property(lambda self: self.layout.tp)
    dp = property(lambda self: self.layout.dp)
    pp = property(lambda self: self.layout.pp)
    ep = property(lambda self: self.layout.ep)
    etp = property(lambda self: self.layout.etp)
    edp = property(lambda self: self.layout.edp)

    def describe(self) -> str:
        return self.layout.describe()


__all__ = ["Coords", "Layout", "ParallelMesh", "make_layout", "GROUP_NAMES"]
