"""Step time of a layout: roofline compute per GEMM class, communication, bubble. A model.

FLOPs: the trainer's own formula, `megamoe.model.transformer.flops_per_token` (Megatron style,
fwd + bwd = 3 x forward, top-k experts, causal attention). Its split into GEMM classes is taken
from the same function by differences (no FLOP formula is repeated here):
    head       flops_per_token(num_layers=0)
    attn_proj  3 * _attention_flops(seq_length=0)          (q/k/v/o projections)
    attn_core  3 * _attention_flops - attn_proj             (QK^T and PV, causal half)
    routed     flops(one MoE layer) - flops(same, top_k=0)  (expert GEMMs)
    dense      the rest of each layer (dense MLP, shared experts, router)
and the classes add up to flops_per_token exactly (asserted).
Per rank and micro-batch every class is divided by tp (TP shards the dense GEMMs; the MoE block
sees 1/tp of the tokens). Time of a class = FLOPs / (peak * efficiency(class)), with
dense/head/attn_proj at `dense_gemm`, attn_core at `attention_core`, routed at the grouped-GEMM
efficiency of its shape (rows per local expert, I/etp; constants.py). Backward = 2 x forward;
recompute adds a forward of what it recomputes (full: all layers; selective: attention,
expert GEMMs, dense blocks and shared experts).

Communication per micro-batch and chunk (comm.py for the bytes), on the critical path unless
said otherwise:
    TP / SP    per attention or dense sublayer (t-1)/t * n*H*(r + e) each way (all-gather of the
               fp32 norm output + reduce-scatter of the bf16 linear output, or the two
               all-reduces without SP: the same bytes); MoE sublayer without SP (t-1)/t*n*H*r
               each way; embedding and head once each. Not overlapped.
    EP         the all-to-all bytes of comm.py; overlapped with the shared experts' GEMMs, and
               with ep_overlap_chunks = c > 1 with (c-1)/c of the expert GEMMs.
    PP         one activation n_sp*H*r per stage boundary and op, added to the dependency.
    DP         plain: bucketed fp32 all-reduce (dense over dp, experts over expert-DP);
               ZeRO-1: bucketed reduce-scatter; either overlapped with the last micro-batch's
               backward (megamoe.parallel.data / zero). ZeRO-1's parameter all-gather after
               the optimizer step is not overlapped.
Pipeline: time = busiest rank's compute / (1 - bubble), the bubble being the idle share of the
executed schedule (pipesim.py, whole slots: F 1, B 2, or 3 with full recompute).
Optimizer: AdamW reads p, g, m, v and writes p, m, v: 28 bytes per fp32 element it steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megamoe.config import ModelConfig, TrainConfig
from megamoe.model.transformer import _attention_flops, flops_per_token, is_moe_layer
from megamoe.parallel.pipeline import partition_layers
from megamoe.plan import comm
from megamoe.plan.constants import Constants
from megamoe.plan.layouts import PlanLayout
from megamoe.plan.memory import DtypePolicy
from megamoe.plan.params import StageParams
from megamoe.plan.pipesim import bubble_fraction


@dataclass(frozen=True)
class FlopClasses:
    """Training FLOPs per token (fwd + bwd) by class; per layer where it differs."""
    head: float
    attn_proj: float             # per layer
    attn_core: float             # per layer
    moe_routed: float            # per MoE layer
    moe_dense: float             # per MoE layer: router + shared experts
    dense_ffn: float             # per dense layer
    total: float                 # flops_per_token(cfg)


def flop_classes(m: ModelConfig) -> FlopClasses:
    rep = dataclasses.replace
    total = flops_per_token(m)
    head = flops_per_token(rep(m, num_layers=0))
    attn = 3 * _attention_flops(m)
    attn_proj = 3 * _attention_flops(rep(m, seq_length=0))
    one_dense = flops_per_token(rep(m, num_layers=1, moe=None)) - head - attn
    routed = moe_dense = 0.0
    if m.moe is not None:
        only_moe = rep(m.moe, first_k_dense=0, moe_layer_freq=1)
        one_moe = flops_per_token(rep(m, num_layers=1, moe=only_moe)) - head - attn
        no_routed = flops_per_token(rep(m, num_layers=1, moe=rep(only_moe, top_k=0))) - head - attn
        routed, moe_dense = one_moe - no_routed, no_routed
    n_moe = sum(is_moe_layer(m, i) for i in range(m.num_layers))
    summed = head + m.num_layers * attn + n_moe * (routed + moe_dense) + (m.num_layers - n_moe) * one_dense
    assert abs(summed - total) <= 1e-9 * total, (summed, total)
    return FlopClasses(head, attn_proj, attn - attn_proj, routed, moe_dense, one_dense, total)


def grouped_efficiency(rows_per_expert: float, inter: float, c: Constants) -> float:
    e = c.efficiency
    return e.grouped_max * rows_per_expert / (rows_per_expert + e.grouped_rows_half) \
        * inter / (inter + e.grouped_inter_half)


@dataclass(frozen=True)
class StepTime:
    step_s: float
    compute_s: float             # busiest pipeline rank, all micro-batches, no bubble
    bubble: float                # idle share of the executed schedule
    tp_s: float
    ep_s: float                  # exposed EP time
    pp_s: float
    dp_s: float                  # exposed DP time
    optimizer_s: float
    comm_bytes: dict             # per rank per step: tp, ep, pp, dp


def _chunk_times(cfg: TrainConfig, lay: PlanLayout, ids: list[int], first: bool, last: bool,
                 fc: FlopClasses, c: Constants, d: DtypePolicy, gpn: int) -> dict:
    """Forward / backward seconds of one chunk and one micro-batch, and its comm bytes."""
    m, hw, eff = cfg.model, c.hardware, c.efficiency
    t, n = lay.tp, lay.micro_batch_size * m.seq_length
    per_rank = n / t
    dense_rate = hw.peak_flops * eff.dense_gemm
    flop_t = {"attn": 0.0, "routed": 0.0, "dense": 0.0, "head": 0.0, "shared": 0.0}
    n_moe_layers = sum(is_moe_layer(m, i) for i in ids)
    for i in ids:
        flop_t["attn"] += per_rank * (fc.attn_proj / dense_rate + fc.attn_core / (hw.peak_flops * eff.attention_core))
        if is_moe_layer(m, i):
            x = m.moe
            rows = per_rank * x.top_k * lay.etp / (x.num_experts / lay.ep)
            flop_t["routed"] += per_rank * fc.moe_routed / (hw.peak_flops * grouped_efficiency(
                rows, x.expert_hidden / lay.etp, c))
            flop_t["shared"] += per_rank * fc.moe_dense / dense_rate
        else:
            flop_t["dense"] += per_rank * fc.dense_ffn / dense_rate
    if last:
        flop_t["head"] = per_rank * fc.head / dense_rate
    total = sum(flop_t.values())
    fwd, bwd = total / 3, 2 * total / 3
    if lay.recompute == "full":
        bwd += (total - flop_t["head"]) / 3
    elif lay.recompute == "selective":
        bwd += (flop_t["attn"] + flop_t["routed"] + flop_t["dense"] + flop_t["shared"]) / 3
    # TP / SP
    H, r, e = m.d_model, d.residual, d.compute
    tp_one_way = 0.0
    for i in ids:
        tp_one_way += comm.ring_bytes("all_gather", n * H * (r + e), t)             # attention
        if is_moe_layer(m, i):
            tp_one_way += 0 if lay.sequence_parallel else comm.ring_bytes("all_gather", n * H * r, t)
        else:
            tp_one_way += comm.ring_bytes("all_gather", n * H * (r + e), t)
    tp_one_way += (first + last) * comm.ring_bytes("all_gather", n * H * r, t)
    tp_link = comm.group_link(1, t, gpn)
    calls = 4 * len(ids)
    tp_f = comm.ring_time(tp_one_way, calls, tp_link, c)
    tp_bytes = 2 * tp_one_way
    if lay.recompute != "none":      # the recomputed forward repeats its collectives (selective:
        tp_bytes += tp_one_way if lay.recompute == "full" else tp_one_way / 2   # ~ attention's)
    # EP
    ep_f = ep_b = ep_bytes = 0.0
    if n_moe_layers and (lay.ep > 1 or lay.etp > 1):
        x = m.moe
        eb = comm.ep_bytes_per_layer(int(per_rank), H, x.num_experts, x.top_k, lay.ep, lay.etp, e, d.accum,
                                     chunks=cfg.parallel.ep_overlap_chunks)
        link = comm.group_link(lay.etp, lay.ep, gpn)
        raw_f = n_moe_layers * comm.alltoall_time(eb.forward, 4, link, c)
        raw_b = n_moe_layers * comm.alltoall_time(eb.total - eb.forward, 3, link, c)
        k = cfg.parallel.ep_overlap_chunks
        hide_f = flop_t["shared"] / 3 + (flop_t["routed"] / 3 * (k - 1) / k if k > 1 else 0)
        ep_f = max(raw_f - hide_f, raw_f / k)
        ep_b = max(raw_b - 2 * hide_f, raw_b / k)
        ep_bytes = n_moe_layers * (eb.total + (eb.forward if lay.recompute == "full" else 0))
        if lay.recompute == "full":
            ep_b += raw_f
    # PP p2p: one activation per op boundary
    n_sp = n / t if lay.sequence_parallel else n
    act = n_sp * H * r
    return {"fwd": fwd + tp_f + ep_f, "bwd": bwd + tp_f + ep_b, "compute": fwd + bwd,
            "tp_s": 2 * tp_f, "ep_s": ep_f + ep_b, "tp_bytes": tp_bytes, "ep_bytes": ep_bytes,
            "act_bytes": act}


def step_time(cfg: TrainConfig, lay: PlanLayout, stages: list[StageParams], c: Constants, d: DtypePolicy,
              gpus_per_node: int) -> StepTime:
    m, hw, eff = cfg.model, c.hardware, c.efficiency
    fc = flop_classes(m)
    M = lay.num_micro(cfg.global_batch_size)
    parts = partition_layers(m.num_layers, lay.pp, lay.vpp, cfg.parallel.pp_layout)
    last_stage = lay.pp * lay.vpp - 1
    pp_link = comm.group_link(lay.tp * lay.dp, 2, gpus_per_node)
    ranks = []
    for r in range(lay.pp):
        chunks = [_chunk_times(cfg, lay, parts[v * lay.pp + r], v * lay.pp + r == 0,
                               v * lay.pp + r == last_stage, fc, c, d, gpus_per_node) for v in range(lay.vpp)]
        p2p = 0.0
        if lay.pp > 1:
            link_bw = hw.intra_node_bytes_per_s if pp_link.intra else hw.inter_node_bytes_per_s
            p2p = chunks[0]["act_bytes"] / link_bw + eff.p2p_latency_s
        busy = M * sum(ch["fwd"] + ch["bwd"] + 2 * p2p for ch in chunks)
        ranks.append({"busy": busy, "chunks": chunks, "p2p": p2p})
    worst = max(ranks, key=lambda x: x["busy"])
    bwd_slots = 3 if lay.recompute == "full" else 2
    bubble = float(bubble_fraction(lay.pp, lay.vpp, M, bwd_slots)) if lay.pp > 1 else 0.0
    pipe = worst["busy"] / (1 - bubble)
    # DP
    stage = max(stages, key=lambda s: s.numel)
    dense, expert = stage.numel_of("dp"), stage.numel_of("edp")
    dp_link = comm.group_link(lay.tp, lay.dp, gpus_per_node)
    edp_link = comm.group_link(lay.etp * lay.ep, lay.edp, gpus_per_node)
    pb = d.param
    window = sum(ch["bwd"] for ch in worst["chunks"])          # the last micro-batch's backward
    # One gradient pass (all-reduce, or ZeRO-1's reduce-scatter) overlapped with that backward;
    # ZeRO-1's parameter all-gather after the optimizer step is not overlapped.
    kind = "all_gather" if lay.zero1 else "all_reduce"
    grad_dense = comm.ring_bytes(kind, dense * pb, lay.dp)
    grad_expert = comm.ring_bytes(kind, expert * pb, lay.edp)
    grad_s = comm.ring_time(grad_dense, 2, dp_link, c) + comm.ring_time(grad_expert, 2, edp_link, c)
    dp_s = max(0.0, grad_s - window)
    dp_bytes = grad_dense + grad_expert
    if lay.zero1:
        dp_s += comm.ring_time(grad_dense, 2, dp_link, c) + comm.ring_time(grad_expert, 2, edp_link, c)
        dp_bytes *= 2
        opt_elems = dense / lay.dp + expert / max(1, lay.edp)
    else:
        opt_elems = dense + expert
    opt_s = opt_elems * 7 * d.accum / (hw.hbm_bytes_per_s * eff.optimizer_hbm)
    step = pipe + dp_s + opt_s
    tp_bytes = M * sum(ch["tp_bytes"] for ch in worst["chunks"])
    ep_bytes = M * sum(ch["ep_bytes"] for ch in worst["chunks"])
    pp_bytes = M * 2 * sum(ch["act_bytes"] for ch in worst["chunks"]) if lay.pp > 1 else 0
    return StepTime(step, worst["busy"] - M * 2 * worst["p2p"] * lay.vpp, bubble,
                    M * sum(ch["tp_s"] for ch in worst["chunks"]), M * sum(ch["ep_s"] for ch in worst["chunks"]),
                    M * 2 * worst["p2p"] * lay.vpp, dp_s, opt_s,
                    {"tp": int(tp_bytes), "ep": int(ep_bytes), "pp": int(pp_bytes), "dp": int(dp_bytes)})


__all__ = ["FlopClasses", "flop_classes", "grouped_efficiency", "StepTime", "step_time"]
