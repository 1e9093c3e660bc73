"""Apply parallelism to the plain model from outside, torchtitan style, in a fixed order:

    apply_tp(model, mesh, sequence_parallel)   dense layers -> tensor-parallel layers (+ SP);
                                               MoE blocks see only this TP rank's tokens
    apply_ep(model, mesh)                      experts -> this rank's E/ep experts (I/etp slice),
                                               all-to-all dispatcher
    build_data_parallel(model, mesh, ...)      gradient reduction + optimizer (plain AdamW with
                                               bucketed all-reduce, or the ZeRO-1 optimizer)
`parallelize_model` runs the first two; setup.py adds the third. The model must be built
identically on every rank first (same seed) so that every shard is a slice of the same
single-process model. Parameter names do not change: modules are swapped in place and the
input/output preparation is done by forward hooks.

Under TP the residual stream is either replicated (plain TP) or split along the sequence
(sequence parallelism, activations [B, S/tp, H] between the sublayers). The MoE block always
works on this rank's share of the tokens: with SP it already has it, without SP a pre-hook
keeps its 1/tp of the flattened tokens and a post-hook all-gathers the outputs. So expert
compute is never duplicated over TP, and the router / shared experts (full copies on each TP
rank) get per-rank partial gradients that data.py sums over TP.
"""

from __future__ import annotations

import torch.nn as nn

from megamoe.model.mlp import SwiGLU
from megamoe.moe.layer import MoELayer
from megamoe.parallel import collectives as C
from megamoe.parallel.expert import AllToAllDispatcher, shard_experts
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.params import full_index, set_spec
from megamoe.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, ShardedRMSNorm,
                                     VocabParallelEmbedding, VocabParallelLoss, enter_tp)


def _mark_tp_partial(module: nn.Module, partial: bool) -> None:
    for p in module.parameters():
        set_spec(p, replica_group="dp_tp", tp_partial=partial)


def _prepare_input_hook(group, mode: str):
    """Forward pre-hook: enter the TP region once for all the module's column-parallel linears."""
    def hook(module, args):
        return (enter_tp(args[0], group, mode),) + tuple(args[1:])
    return hook


def shard_swiglu(mlp: SwiGLU, group, input_mode: str, output_mode: str) -> None:
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, group)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, group)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, group, output_mode)
    mlp.register_forward_pre_hook(_prepare_input_hook(group, input_mode))


def shard_moe_tokens(moe: MoELayer, group, sequence_parallel: bool) -> None:
    """The MoE block of each TP rank handles 1/tp of the tokens (see the module docstring)."""
    tp = C.group_size(group)
    _mark_tp_partial(moe.router, True)
    for sub in (moe.shared_experts, moe.shared_expert_gate):
        if sub is not None:
            _mark_tp_partial(sub, True)
    # LB / z losses from the statistics of all TP ranks' tokens (= the single-process values).
    moe.router.stats_reduce = lambda t: C.all_reduce_(t.clone(), group)
    if sequence_parallel:
        return

    def split_tokens(module, args):
        x = args[0]
        module._tp_full_shape = x.shape
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] % tp:
            raise ValueError(f"{flat.shape[0]} tokens per micro-batch do not split over tp={tp}; "
                             "make micro_batch_size * seq_length divisible by parallel.tp")
        return (C.scatter_to(flat, group, 0),) + tuple(args[1:])

    def gather_tokens(module, args, out):
        return C.gather_from(out, group, 0).reshape(module._tp_full_shape)

    moe.register_forward_pre_hook(split_tokens)
    moe.register_forward_hook(gather_tokens)


def apply_tp(model: nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False) -> None:
    """Shard embedding, attention (heads; GQA kv heads), QK-norm, dense SwiGLU and lm_head."""
    if mesh.tp == 1:
        return
    group, sp = mesh.group("tp"), sequence_parallel
    in_mode = "sp_gather" if sp else "copy"
    out_mode = "sp_scatter" if sp else "all_reduce"
    tied = model.lm_head is not None and model.embed is not None \
        and model.lm_head.weight is model.embed.weight
    if model.embed is not None:
        model.embed = VocabParallelEmbedding(model.embed, group, out_mode)
    for block in model.layers.values():
        attn = block.attn
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), group))
        attn.o_proj = RowParallelLinear(attn.o_proj, group, out_mode)
        if attn.q_norm is not None and attn.per_head_norm:
            # Qwen3's per-head norms: full copies, each rank normalises its own heads, so the
            # gradient is a partial sum over this rank's heads.
            _mark_tp_partial(attn.q_norm, True)
            _mark_tp_partial(attn.k_norm, True)
        elif attn.q_norm is not None:
            attn.q_norm = ShardedRMSNorm(attn.q_norm, group)
            attn.k_norm = ShardedRMSNorm(attn.k_norm, group)
        attn.register_forward_pre_hook(_prepare_input_hook(group, in_mode))
        # Norm weights are full copies; with SP each rank normalises only its tokens.
        _mark_tp_partial(block.attn_norm, sp)
        _mark_tp_partial(block.ffn_norm, sp)
        if isinstance(block.ffn, SwiGLU):
            shard_swiglu(block.ffn, group, in_mode, out_mode)
        elif isinstance(block.ffn, MoELayer):
            shard_moe_tokens(block.ffn, group, sp)
    if model.norm is not None:
        _mark_tp_partial(model.norm, sp)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear(model.lm_head, group, in_mode)   # logits [B, S, V/tp]
        if tied:
            model.lm_head.weight = model.embed.weight


def apply_ep(model: nn.Module, mesh: ParallelMesh, overlap_chunks: int = 1) -> None:
    """Expert weights -> this rank's shard; dispatcher -> all-to-all (in `overlap_chunks` token
    chunks per layer). Expert params are always marked as replicated over expert-DP (their
    gradients reduce over "edp")."""
    for moe in [m for m in model.modules() if isinstance(m, MoELayer)]:
        experts = moe.experts
        if mesh.ep > 1 or mesh.etp > 1:
            shard_experts(experts, mesh.rank_in("ep"), mesh.ep, mesh.rank_in("etp"), mesh.etp)
            moe.dispatcher = AllToAllDispatcher(moe.cfg.num_experts, mesh.group("ep"), mesh.group("etp"),
                                                chunks=overlap_chunks)
        else:
            for p in (experts.w_gate_up, experts.w_down):
                set_spec(p, replica_group="edp", global_shape=tuple(p.shape), index=full_index(p.shape))


def check_model_config(cfg, mesh: ParallelMesh, sequence_parallel: bool) -> None:
    """ValueErrors for combinations the sharding cannot express (beyond config.validate)."""
    m = cfg.model
    if m.attention == "mla" and mesh.tp > 1:
        raise ValueError("MLA attention is not tensor-parallel yet; use tp 1 (EP/DP/PP work)")
    if mesh.tp > 1 and m.qk_norm and m.qk_norm_scope == "projection" and m.norm != "rmsnorm":
        raise ValueError("model.qk_norm (scope projection) with parallel.tp > 1 needs model.norm rmsnorm")
    if m.moe is not None and m.moe.expert_hidden % mesh.etp:
        raise ValueError(f"model.moe.expert_hidden ({m.moe.expert_hidden}) must be divisible by "
                         f"parallel.etp ({mesh.etp})")
    if m.moe is not None and mesh.tp > 1 and not sequence_parallel \
            and (cfg.micro_batch_size * m.seq_length) % mesh.tp:
        raise ValueError(f"micro_batch_size*seq_length ({cfg.micro_batch_size * m.seq_length}) "
                         f"must be divisible by parallel.tp ({mesh.tp}) for the MoE blocks")
    if m.moe is not None and m.moe.capacity_factor > 0 and mesh.tp > 1:
        # Capacity is counted over the tokens one router sees; under TP that is 1/tp of them.
        raise ValueError("model.moe.capacity_factor > 0 is not supported with parallel.tp > 1 yet")


def parallelize_model(model: nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False,
                      ep_overlap_chunks: int = 1):
    """apply_tp then apply_ep; returns (model, loss_fn) where loss_fn is the vocab-parallel CE
    under TP (else None: the trainer's F.cross_entropy)."""
    sp = sequence_parallel and mesh.tp > 1   # SP is a no-op without TP
    apply_tp(model, mesh, sp)
    apply_ep(model, mesh, ep_overlap_chunks)
    loss_fn = None
    if mesh.tp > 1:
        # (only the last pipeline stage holds the head; the vocabulary split is the same everywhere)
        loss_fn = VocabParallelLoss(mesh.group("tp"), model.cfg.vocab_size // mesh.tp * mesh.rank_in("tp"))
    return model, loss_fn


__all__ = ["apply_tp", "apply_ep", "parallelize_model", "shard_swiglu", "shard_moe_tokens",
           "check_model_config"]
