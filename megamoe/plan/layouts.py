"""The layouts of a cluster: enumeration and validity.

A `PlanLayout` is everything the planner varies: tp, pp, vpp (virtual stages), dp, ep, etp,
ZeRO-1, micro-batch size and recompute (none | selective | full). Sequence parallelism is on
whenever tp > 1 (the README's advice: "With TP>1 use sequence parallelism in training"), unless
the user fixed the layout.

Validity is decided by the project's own checks, not re-implemented here: `config.validate` with
the world size (divisibility of heads, vocabulary, experts, batch), `parallelize.check_model_config`
(expert-TP, MLA, capacity), `pipeline.partition_layers` (stages vs layers, pp_layout) and the
interleaved schedule's rule (micro-batches a multiple of pp). A layout is valid when a real run
of it would start.
"""

from __future__ import annotations

import copy
import types
from dataclasses import asdict, dataclass

from megamoe.config import TrainConfig, validate
from megamoe.parallel.parallelize import check_model_config
from megamoe.parallel.pipeline import partition_layers

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class PlanLayout:
    tp: int
    pp: int
    vpp: int
    dp: int
    ep: int
    etp: int
    zero1: bool
    micro_batch_size: int
    recompute: str               # none | selective | full
    sequence_parallel: bool

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.dp * self.tp // (self.ep * self.etp)

    def num_micro(self, global_batch_size: int) -> int:
        return global_batch_size // (self.micro_batch_size * self.dp)

    def short(self) -> str:
        rc = {"none": "-", "selective": "sel", "full": "full"}[self.recompute]
        return (f"tp{self.tp} pp{self.pp}" + (f"x{self.vpp}" if self.vpp > 1 else "")
                + f" dp{self.dp} ep{self.ep}" + (f" etp{self.etp}" if self.etp > 1 else "")
                + (" z1" if self.zero1 else "") + f" mb{self.micro_batch_size} rc:{rc}")

    def as_dict(self) -> dict:
        return asdict(self)


def layout_of(cfg: TrainConfig, world: int) -> PlanLayout:
    """The layout a config describes on `world` GPUs (dp derived when 0)."""
    p = cfg.parallel
    if world % (p.tp * p.pp):
        raise ValueError(f"--gpus {world} is not divisible by parallel.tp*parallel.pp ({p.tp * p.pp})")
    dp = p.dp or world // (p.tp * p.pp)
    rc = cfg.recompute if cfg.activation_checkpointing else "none"
    return PlanLayout(p.tp, p.pp, p.virtual_pp, dp, p.ep, p.etp, p.zero1, cfg.micro_batch_size, rc,
                      p.sequence_parallel and p.tp > 1)


def apply_layout(cfg: TrainConfig, lay: PlanLayout) -> TrainConfig:
    """A copy of cfg running `lay`."""
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.pp, p.virtual_pp, p.dp, p.ep, p.etp = lay.tp, lay.pp, lay.vpp, lay.dp, lay.ep, lay.etp
    p.zero1, p.sequence_parallel = lay.zero1, lay.sequence_parallel
    out.micro_batch_size = lay.micro_batch_size
    out.activation_checkpointing = lay.recompute != "none"
    if lay.recompute != "none":
        out.recompute = lay.recompute
    return out


def why_invalid(cfg: TrainConfig, lay: PlanLayout) -> str | None:
    """None if a run of `lay` would start, else the one-line reason (the project's own message)."""
    c = apply_layout(cfg, lay)
    try:
        if lay.vpp > 1 and lay.pp == 1:
            raise ValueError("parallel.virtual_pp > 1 needs parallel.pp > 1")
        validate(c, world_size=lay.world)
        check_model_config(c, types.SimpleNamespace(tp=lay.tp, etp=lay.etp), lay.sequence_parallel)
        partition_layers(c.model.num_layers, lay.pp, lay.vpp, c.parallel.pp_layout)
        if lay.vpp > 1 and lay.num_micro(c.global_batch_size) % lay.pp:
            raise ValueError(f"interleaved pipelining needs the micro-batches per step "
                             f"({lay.num_micro(c.global_batch_size)}) to be a multiple of parallel.pp ({lay.pp})")
        if c.fp8 and lay.tp > 1:
            raise ValueError("fp8 with parallel.tp > 1 is not supported")
    except ValueError as err:
        return str(err)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg: TrainConfig, world: int, gpus_per_node: int,
                      micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
                      recompute: tuple[str, ...] = RECOMPUTE, max_vpp: int = 2) -> list[PlanLayout]:
    """Every valid layout of `world` GPUs. tp and etp stay inside a node (their collectives are
    on the critical path of every layer); ValueError (saying why) when none is valid."""
    m = cfg.model
    experts = m.moe.num_experts if m.moe is not None else 1
    out, reasons = [], {}
    for tp in [d for d in _divisors(gpus_per_node) if world % d == 0]:
        for pp in [d for d in _divisors(world // tp) if d <= m.num_layers]:
            dp = world // (tp * pp)
            for vpp in range(1, (max_vpp if pp > 1 else 1) + 1):
                for ep in [d for d in _divisors(experts) if (dp * tp) % d == 0]:
                    etps = [d for d in _divisors(gpus_per_node) if (dp * tp) % (ep * d) == 0] \
                        if m.moe is not None else [1]
                    for etp in etps:
                        # ZeRO-1 with nothing to shard (dp = expert-DP = 1) is plain DP with extra buffers
                        for zero1 in ((False, True) if dp > 1 or dp * tp > ep * etp else (False,)):
                            for mbs in micro_batch_sizes:
                                for rc in recompute:
                                    lay = PlanLayout(tp, pp, vpp, dp, ep, etp, zero1, mbs, rc, tp > 1)
                                    why = why_invalid(cfg, lay)
                                    if why is None:
                                        out.append(lay)
                                    else:
                                        count, example = reasons.get(why, (0, lay))
                                        reasons[why] = (count + 1, example)
    if not out:
        if not reasons:
            raise ValueError(f"no valid layout on {world} GPUs: no tensor-parallel size divides both "
                             f"{world} and --gpus-per-node {gpus_per_node}")
        top = max(reasons, key=lambda k: reasons[k][0])
        raise ValueError(f"no valid layout of the {m.num_layers}-layer model on {world} GPUs "
                         f"({gpus_per_node} per node); most often (e.g. {reasons[top][1].short()}): {top}")
    return out


__all__ = ["PlanLayout", "RECOMPUTE", "layout_of", "apply_layout", "why_invalid", "enumerate_layouts"]
