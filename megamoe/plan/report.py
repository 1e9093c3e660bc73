"""Evaluate layouts (memory + time) and print them: the ranked table, JSON, one-line summaries."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from megamoe.config import TrainConfig
from megamoe.model.transformer import flops_per_token
from megamoe.plan.constants import GIB, Constants
from megamoe.plan.layouts import PlanLayout, enumerate_layouts, layout_of, why_invalid
from megamoe.plan.memory import DtypePolicy, MemoryBreakdown, layout_memory
from megamoe.plan.params import model_table
from megamoe.plan.timing import StepTime, step_time


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0


@dataclass(frozen=True)
class LayoutPlan:
    layout: PlanLayout
    params_per_gpu: int          # parameters held by the fullest pipeline rank
    memory: MemoryBreakdown
    fits: bool
    time: StepTime
    tokens_per_s: float
    mfu: float

    def as_dict(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp, "ep": lay.ep, "etp": lay.etp,
                "zero1": lay.zero1, "micro_batch_size": lay.micro_batch_size, "recompute": lay.recompute,
                "sequence_parallel": lay.sequence_parallel, "params_per_gpu": self.params_per_gpu,
                "memory_gib_per_gpu": self.memory.gib(), "fits": self.fits,
                "step_time_s": round(self.time.step_s, 4), "tokens_per_s": round(self.tokens_per_s, 1),
                "mfu": round(self.mfu, 4), "bubble": round(self.time.bubble, 4),
                "time_s": {"compute": round(self.time.compute_s, 4), "tp": round(self.time.tp_s, 4),
                           "ep_exposed": round(self.time.ep_s, 4), "pp_p2p": round(self.time.pp_s, 4),
                           "dp_exposed": round(self.time.dp_s, 4), "optimizer": round(self.time.optimizer_s, 4)},
                "comm_bytes_per_step": self.time.comm_bytes}


def evaluate(cfg: TrainConfig, lay: PlanLayout, cluster: Cluster, c: Constants,
             d: DtypePolicy | None = None) -> LayoutPlan:
    d = d or DtypePolicy.of(cfg.dtype)
    mem, stages = layout_memory(cfg, lay, c, d)
    t = step_time(cfg, lay, stages, c, d, cluster.gpus_per_node)
    tokens = cfg.global_batch_size * cfg.model.seq_length
    tps = tokens / t.step_s
    mfu = flops_per_token(cfg.model) * tps / (lay.world * c.hardware.peak_flops)
    usable = cluster.memory_gib * GIB * c.memory.usable_fraction
    return LayoutPlan(lay, max(s.numel for s in stages), mem, mem.total <= usable, t, tps, mfu)


def plan(cfg: TrainConfig, cluster: Cluster, c: Constants, fixed: bool = False,
         micro_batch_sizes: tuple[int, ...] = (1, 2, 4), recompute: tuple[str, ...] | None = None) -> list[LayoutPlan]:
    """Every valid layout ranked (fitting first, then tokens/s), or just cfg's own when `fixed`."""
    if fixed:
        lay = layout_of(cfg, cluster.gpus)
        why = why_invalid(cfg, lay)
        if why:
            raise ValueError(f"the configured layout ({lay.short()}) cannot run on {cluster.gpus} GPUs: {why}")
        return [evaluate(cfg, lay, cluster, c)]
    kwargs = {"recompute": recompute} if recompute else {}
    layouts = enumerate_layouts(cfg, cluster.gpus, cluster.gpus_per_node, micro_batch_sizes, **kwargs)
    plans = [evaluate(cfg, lay, cluster, c) for lay in layouts]
    plans.sort(key=lambda p: (not p.fits, -p.tokens_per_s))
    return plans


def model_summary(cfg: TrainConfig) -> dict:
    _, total, active = model_table(cfg.model)
    return {"params_total": total, "params_active": active, "flops_per_token": flops_per_token(cfg.model)}


def to_json(cfg: TrainConfig, plans: list[LayoutPlan], cluster: Cluster, c: Constants) -> str:
    return json.dumps({"model": model_summary(cfg),
                       "cluster": {"gpus": cluster.gpus, "gpus_per_node": cluster.gpus_per_node,
                                   "gpu": c.hardware.name, "memory_gib": cluster.memory_gib,
                                   "peak_tflops": c.hardware.peak_flops / 1e12, "constants": c.source},
                       "global_batch_size": cfg.global_batch_size, "seq_length": cfg.model.seq_length,
                       "layouts": [p.as_dict() for p in plans]}, indent=1)


def table(cfg: TrainConfig, plans: list[LayoutPlan], cluster: Cluster, c: Constants, top: int = 20) -> str:
    s = model_summary(cfg)
    fit = sum(p.fits for p in plans)
    lines = [f"megamoe plan: {s['params_total'] / 1e9:.2f}B parameters ({s['params_active'] / 1e9:.2f}B active), "
             f"{s['flops_per_token'] / 1e9:.2f} GFLOP/token; {cluster.gpus} x {c.hardware.name} "
             f"({cluster.gpus_per_node} per node, {cluster.memory_gib:g} GiB, "
             f"{c.hardware.peak_flops / 1e12:.0f} TFLOP/s); global batch {cfg.global_batch_size} x "
             f"{cfg.model.seq_length}; {len(plans)} layouts, {fit} fit; constants: {c.source}",
             f"{'#':>3} {'layout':38s} {'fits':4s} {'GiB/GPU':>8s} {'params/GPU':>11s} {'step s':>8s} "
             f"{'tokens/s':>10s} {'MFU':>6s} {'bubble':>6s}"]
    for i, p in enumerate(plans[:top]):
        lines.append(f"{i + 1:>3} {p.layout.short():38s} {'yes' if p.fits else 'NO':4s} "
                     f"{p.memory.total / GIB:8.1f} {p.params_per_gpu / 1e9:10.3f}B {p.time.step_s:8.2f} "
                     f"{p.tokens_per_s:10,.0f} {100 * p.mfu:5.1f}% {100 * p.time.bubble:5.1f}%")
    if len(plans) > top:
        lines.append(f"... {len(plans) - top} more (--top N, or --json for all)")
    return "\n".join(lines)


def describe_one(p: LayoutPlan) -> str:
    """Breakdown of one layout (train --dry-run, a fixed layout)."""
    g = p.memory.gib()
    parts = ", ".join(f"{k} {v:.2f}" for k, v in g.items() if k != "total" and v)
    cb = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.time.comm_bytes.items() if v)
    return (f"layout {p.layout.short()}: {g['total']:.2f} GiB per GPU on pipeline rank {p.memory.pp_rank} "
            f"({'fits' if p.fits else 'does NOT fit'}; {parts}); step {p.time.step_s:.3f} s, "
            f"{p.tokens_per_s:,.0f} tokens/s, MFU {100 * p.mfu:.1f}%, bubble {100 * p.time.bubble:.1f}%"
            + (f"; GiB sent per step: {cb}" if cb else ""))


def predicted_memory_line(cfg: TrainConfig, world: int, precision: str) -> str:
    """The one line a real run prints at start: predicted memory per GPU of its layout."""
    from megamoe.plan.constants import constants_for
    cfg = copy.deepcopy(cfg)
    c = constants_for("h100")            # memory does not depend on the GPU type
    try:
        lay = layout_of(cfg, world)
        mem, stages = layout_memory(cfg, lay, c, DtypePolicy.of(precision))
    except Exception as err:             # the planner must never stop a run that can start
        return f"megamoe: plan: no memory prediction for this run ({type(err).__name__}: {err})"
    return (f"megamoe: plan: predicted memory per GPU {mem.total / GIB:.2f} GiB on the fullest rank "
            f"(pipeline rank {mem.pp_rank}: state {(mem.params + mem.grads + mem.optimizer) / GIB:.2f}, "
            f"activations {(mem.activations + mem.recompute_transient + mem.logits_ce) / GIB:.2f}, "
            f"CUDA context + fragmentation {(mem.framework + mem.fragmentation) / GIB:.2f}); "
            f"{max(s.numel for s in stages) / 1e6:.2f}M parameters held; `megamoe plan` for details")


__all__ = ["Cluster", "LayoutPlan", "evaluate", "plan", "model_summary", "to_json", "table",
           "describe_one", "predicted_memory_line"]
