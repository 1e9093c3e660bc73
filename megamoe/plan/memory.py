"""Memory per GPU of a layout: exact state, modelled activations and buffers.

Exact (tests/plan/test_exact_state.py checks them against real gloo ranks):
  params, grads, optimizer      megamoe/plan/params.py (ZeRO-1 buckets and their padding too)
  in-flight micro-batches       the most forwards alive at once on each pipeline rank, from the
                                executed schedule (pipesim.py)
A model (to be checked on a GPU against torch.cuda.max_memory_allocated, tests/plan/test_gpu.py):
  activations per micro-batch and layer, per token on this rank, for bf16 autocast with the fp32
  residual stream (megamoe/precision.py); r = residual bytes (4), e = compute bytes (2 under bf16),
  t = tp, n tokens of the micro-batch (b*s), n_sp = n/t under sequence parallelism else n,
  n_moe = n/t (the MoE block always sees 1/tp of the tokens), flash attention (no S x S scores):
    attention      r*H*n_sp (norm input) + e*H*n (gathered linear input) + n*(q + 2kv)/t*e
                   (q, k, v after RoPE, saved by SDPA) + n*q/t*e (SDPA output)
                   [+ n*(q + kv)/t*4 with QK-norm: its fp32 inputs]
    dense MLP      r*H*n_sp + e*H*n + n*3F/t*e (gate, up, silu(gate)*up)
    MoE            r*H*n_sp + n_moe*(r*H router input + 8E logits/probs + 12K top-k
                   + e*H bf16 tokens + hit*etp*H*e received pairs
                   + K*etp*(e*H rows + 3*(I/etp)*e GEMM intermediates + 4*H fp32 outputs kept
                   for the weighted combine)) + shared experts n_moe*e*(H + 3*S)
    selective      attention keeps only its input (r*H*n_sp); MoE blocks drop the expert GEMM
                   intermediates and the shared experts' (recomputed); dense blocks keep only
                   their input (recomputed whole, see Transformer.set_activation_checkpointing)
    full           every block keeps only its input r*H*n_sp
  recompute adds one layer's full activations while that layer's backward runs
  logits + CE      on the last stage, one micro-batch: n*V/t*(e + 4 + 4 + 4) (logits, fp32 copy,
                   softmax saved, fp32 gradient; e = 4 has no separate copy)
  all-to-all       one MoE layer's transient exchange buffers: pairs sent (e) + partials and
                   their return (fp32)
  bf16 copies      the experts' cached compute-dtype weights and autocast's casts of the dense
                   weights (kept for backward): e bytes per local parameter when e < 4
  DP buffers       plain DP: flat copies of the gradient buckets in flight (all of them, at
                   worst); ZeRO-1: the chunked parameter all-gather (GATHER_IN_FLIGHT chunks)
Framework (CUDA context, workspaces) and fragmentation are constants (constants.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megamoe.config import TrainConfig
from megamoe.model.transformer import is_moe_layer
from megamoe.parallel.data import DEFAULT_BUCKET_NUMEL
from megamoe.parallel.zero import GATHER_IN_FLIGHT
from megamoe.parallel.pipeline import partition_layers
from megamoe.plan.comm import hit_ranks_per_token
from megamoe.plan.constants import GIB, Constants
from megamoe.plan.layouts import PlanLayout
from megamoe.plan.params import StageParams, stage_params, state_bytes
from megamoe.plan.pipesim import unit_run


@dataclass(frozen=True)
class DtypePolicy:
    """Bytes per element of each role (megamoe/precision.py): bf16 on GPUs by default."""
    param: int = 4          # fp32 masters / params / grads
    compute: int = 2        # bf16 autocast (activations of GEMMs, expert rows)
    accum: int = 4          # fp32 accumulation (ZeRO masters, moments, combine partials)
    residual: int = 4       # the residual stream stays in the parameter dtype

    @classmethod
    def of(cls, dtype: str) -> "DtypePolicy":
        """`auto` plans for a GPU: bf16."""
        return {"auto": cls(), "bf16": cls(), "fp32": cls(4, 4, 4, 4), "fp64": cls(8, 8, 8, 8)}[dtype]


def _attention_dims(m) -> tuple[int, int, int]:
    """(query width, key width, value width) of all heads."""
    nh = m.num_heads
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        return nh * qk, nh * qk, nh * m.v_head_dim
    hd = m.head_dim or m.d_model // nh
    kv = (m.num_kv_heads or nh) * hd
    return nh * hd, kv, kv


def layer_activation_bytes(cfg: TrainConfig, lay: PlanLayout, layer: int, mode: str, d: DtypePolicy) -> float:
    """Bytes one layer keeps for backward per micro-batch on one rank; mode none|selective|full."""
    m = cfg.model
    H, t, e, r = m.d_model, lay.tp, d.compute, d.residual
    n = lay.micro_batch_size * m.seq_length
    n_sp = n / t if lay.sequence_parallel else n
    block_input = r * H * n_sp
    if mode == "full":
        return block_input
    moe = is_moe_layer(m, layer)
    if mode == "selective" and not moe:
        return block_input
    q, k, v = _attention_dims(m)
    attn = block_input + e * H * n + n * (q + k + v) / t * e + n * q / t * e
    if m.qk_norm:
        attn += n * (q + k) / t * 4
    if mode == "selective":
        attn = block_input
    if not moe:
        return attn + block_input + e * H * n + n * 3 * m.ffn_hidden / t * e
    x = m.moe
    n_moe = n / t
    hit = float(hit_ranks_per_token(x.num_experts, x.top_k, lay.ep))
    inter = x.expert_hidden / lay.etp
    gemm = 0 if mode == "selective" else 3 * inter * e
    ffn = block_input + n_moe * (r * H + 8 * x.num_experts + 12 * x.top_k + e * H + hit * lay.etp * H * e
                                 + x.top_k * lay.etp * (e * H + gemm + 4 * H))
    if x.num_shared_experts:
        shared = x.shared_expert_hidden or x.num_shared_experts * x.expert_hidden
        ffn += n_moe * e * (H + (0 if mode == "selective" else 3 * shared))
    return attn + ffn


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU of the fullest pipeline rank (pp_rank)."""
    pp_rank: int
    params: int
    grads: int
    optimizer: int
    bf16_weight_copies: int
    activations: float
    recompute_transient: float
    logits_ce: float
    alltoall_buffers: float
    dp_buffers: float
    framework: float
    fragmentation: float
    in_flight: int                   # micro-batch chunks whose activations are alive at peak

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.bf16_weight_copies + self.activations
                + self.recompute_transient + self.logits_ce + self.alltoall_buffers + self.dp_buffers
                + self.framework + self.fragmentation)

    def gib(self) -> dict:
        out = {k: round(v / GIB, 3) for k, v in asdict(self).items() if k not in ("pp_rank", "in_flight")}
        out["total"] = round(self.total / GIB, 3)
        return out


def _dp_buffers(stage: StageParams, lay: PlanLayout, d: DtypePolicy, bucket_numel: int) -> float:
    if lay.zero1:
        biggest = max((stage.numel_of(g) for g in ("dp", "edp")), default=0)
        return min(biggest, GATHER_IN_FLIGHT * bucket_numel) * d.param
    n = (stage.numel_of("dp") if lay.dp * lay.tp > 1 else 0) + (stage.numel_of("edp") if lay.edp > 1 else 0)
    return n * d.param


def rank_memory(cfg: TrainConfig, lay: PlanLayout, pp_rank: int, stage: StageParams,
                c: Constants, d: DtypePolicy) -> MemoryBreakdown:
    m = cfg.model
    bucket = getattr(cfg.parallel, "dp_bucket_numel", 0) or DEFAULT_BUCKET_NUMEL
    state = state_bytes(stage, lay, d.param, d.accum, bucket)
    stages = partition_layers(m.num_layers, lay.pp, lay.vpp, cfg.parallel.pp_layout)
    chunks = [stages[v * lay.pp + pp_rank] for v in range(lay.vpp)]
    by_kind: dict[tuple, float] = {}       # a layer's activations depend only on dense vs MoE

    def act(i: int, mode: str) -> float:
        key = (is_moe_layer(m, i), mode)
        if key not in by_kind:
            by_kind[key] = layer_activation_bytes(cfg, lay, i, mode, d)
        return by_kind[key]

    per_chunk = [sum(act(i, lay.recompute) for i in ids) for ids in chunks]
    if lay.pp == 1:
        in_flight = 1        # MicroBatchLoop: forward + backward of one micro-batch at a time
    else:
        bwd_slots = 3 if lay.recompute == "full" else 2
        in_flight = unit_run(lay.pp, lay.vpp, lay.num_micro(cfg.global_batch_size), bwd_slots).peak_in_flight[pp_rank]
    acts = in_flight * max(per_chunk, default=0.0)
    layer_ids = [i for ids in chunks for i in ids]
    transient = 0.0
    if lay.recompute != "none" and layer_ids:
        transient = max(act(i, "none") for i in layer_ids)
    n = lay.micro_batch_size * m.seq_length
    logits = 0.0
    if pp_rank == lay.pp - 1:
        logits = n * m.vocab_size / lay.tp * (d.compute + 8 + (4 if d.compute < 4 else 0))
    a2a = 0.0
    if m.moe is not None and (lay.ep > 1 or lay.etp > 1) and any(is_moe_layer(m, i) for i in layer_ids):
        hit = float(hit_ranks_per_token(m.moe.num_experts, m.moe.top_k, lay.ep))
        a2a = n / lay.tp * hit * m.d_model * (d.compute + d.accum * (lay.etp + 1))
    copies = stage.numel * d.compute if d.compute < d.param else 0
    tensors = state.total + copies + acts + transient + logits + a2a
    dp_buf = _dp_buffers(stage, lay, d, bucket)
    tensors += dp_buf
    return MemoryBreakdown(pp_rank, state.params, state.grads, state.optimizer, copies, acts, transient,
                           logits, a2a, dp_buf, c.memory.framework_gib * GIB,
                           c.memory.fragmentation * tensors, in_flight)


def layout_memory(cfg: TrainConfig, lay: PlanLayout, c: Constants,
                  d: DtypePolicy) -> tuple[MemoryBreakdown, list[StageParams]]:
    """The fullest pipeline rank's breakdown, and every stage's parameters."""
    stages = stage_params(cfg.model, lay, cfg.parallel.pp_layout)
    per_rank = [rank_memory(cfg, lay, r, stages[r], c, d) for r in range(lay.pp)]
    return max(per_rank, key=lambda b: b.total), stages


__all__ = ["DtypePolicy", "MemoryBreakdown", "layer_activation_bytes", "rank_memory", "layout_memory"]
