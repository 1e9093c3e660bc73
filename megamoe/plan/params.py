"""Parameters, gradients and optimizer state of every rank, from the config alone. Exact.

The parameter shapes come from the model itself: the plain `Transformer` is built on the meta
device (no memory, well under a second even for Mixtral-8x7B), so no shape formula is repeated
here. What this module models is how the parallel transforms cut those tensors; that is checked
against the real tensors of real gloo ranks in tests/plan/test_exact_state.py:

  embed / lm_head       vocabulary rows / tp (VocabParallelEmbedding, ColumnParallelLinear);
                        embedding on pipeline stage 0, final norm + head on the last stage;
                        tied embeddings: one tensor, or a copy on the last stage when pp > 1
  q/k/v (+ biases),     output features / tp (ColumnParallelLinear); q_norm / k_norm over the
  dense gate/up, qk-norm   whole projection are split the same way (ShardedRMSNorm)
  o_proj, dense down    input features / tp (RowParallelLinear); their biases are full copies
  norms, router, shared full copies on every TP rank (the MoE block sees 1/tp of the tokens)
  experts               w_gate_up [E, H, 2I] -> [E/ep, H, 2I/etp], w_down [E, I, H] -> [E/ep, I/etp, H]

Bytes per rank (what megamoe.parallel.data allocates):
  plain DP     params and .grad at the parameter dtype; torch AdamW: exp_avg + exp_avg_sq at the
               parameter dtype and one 4-byte `step` scalar per parameter tensor
  ZeRO-1       (megamoe.parallel.zero) buckets keyed by (group, weight decay, deferred) -- groups
               "dp" (dense, dp ranks) and "edp" (experts, dp*tp/(ep*etp) ranks), decay = tensors
               of >= 2 dims, deferred = TP-partial gradients under tp > 1 or the tied embedding's
               two copies under pp > 1 -- each cut into runs of at most DEFAULT_BUCKET_NUMEL
               elements in backward order (data.split_buckets); every bucket is a flat param and a
               flat grad buffer padded to a multiple of the group size; this rank's 1/n slice has
               a master copy (none when the params are already fp32) plus exp_avg and exp_avg_sq (accumulation dtype) and a 4-byte `step`
               scalar per bucket.
Legend: E experts, H d_model, I expert hidden, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megamoe.config import ModelConfig
from megamoe.parallel.data import DEFAULT_BUCKET_NUMEL, split_buckets
from megamoe.parallel.pipeline import partition_layers
from megamoe.plan.layouts import PlanLayout

# how a tensor is cut: dim sharded over tp ("tp0", "tp1"), not at all ("full"), or the expert rule
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q_norm", "k_norm")
ROW = ("o_proj", "down_proj")


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]       # global shape
    cut: str                     # vocab | tp0 | tp1 | full | expert_gate_up | expert_down
    layer: int | None            # global layer id; None: embed (first stage) or head/norm (last)
    where: str                   # first | last | layer
    expert: bool                 # routed expert weight (reduced over expert-DP)

    @property
    def decay(self) -> bool:     # megamoe.training.optim.param_groups: matrices only
        return len(self.shape) >= 2

    def tp_partial(self, sequence_parallel: bool) -> bool:
        """Each TP rank's gradient covers only its own tokens (parallelize.py): the MoE block's
        full copies always, norms and row-parallel biases under sequence parallelism."""
        parts = self.name.split(".")
        if self.expert or self.cut != "full":
            return False
        if "router" in parts or "shared_experts" in parts or "shared_expert_gate" in parts:
            return True
        return sequence_parallel


def _classify(name: str, shape: tuple[int, ...], tp_allowed: bool) -> ParamEntry:
    parts = name.split(".")
    if parts[0] == "embed":
        return ParamEntry(name, shape, "vocab", None, "first", False)
    if parts[0] == "lm_head":
        return ParamEntry(name, shape, "vocab", None, "last", False)
    if parts[0] == "norm":
        return ParamEntry(name, shape, "full", None, "last", False)
    assert parts[0] == "layers", f"planner does not know parameter {name!r}; extend megamoe/plan/params.py"
    layer = int(parts[1])
    module, leaf = parts[-2], parts[-1]
    if "experts" in parts and "shared_experts" not in parts:
        return ParamEntry(name, shape, "expert_gate_up" if leaf == "w_gate_up" else "expert_down",
                          layer, "layer", True)
    sub = parts[2]
    if sub in ("attn_norm", "ffn_norm") or "router" in parts or "shared_experts" in parts \
            or "shared_expert_gate" in parts or not tp_allowed:
        return ParamEntry(name, shape, "full", layer, "layer", False)
    if module in COLUMN:
        return ParamEntry(name, shape, "tp0", layer, "layer", False)
    if module in ROW:
        return ParamEntry(name, shape, "tp1" if leaf == "weight" else "full", layer, "layer", False)
    assert False, f"planner does not know how tensor parallelism cuts {name!r}"


_TABLES: dict[str, tuple[tuple[ParamEntry, ...], int, int]] = {}


def _table(model_cfg: ModelConfig) -> tuple[tuple[ParamEntry, ...], int, int]:
    import torch

    from megamoe.model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(model_cfg)
    tp_allowed = model_cfg.attention != "mla"    # MLA is refused under tp > 1 anyway
    entries = tuple(_classify(n, tuple(p.shape), tp_allowed) for n, p in model.named_parameters())
    return entries, model.num_params(), model.num_params(active=True)


def model_table(m: ModelConfig) -> tuple[tuple[ParamEntry, ...], int, int]:
    """(parameter entries, total, active) of the plain model (tied embeddings counted once)."""
    key = repr(m)                # ModelConfig is mutable (unhashable): cache by its repr
    if key not in _TABLES:
        _TABLES[key] = _table(m)
    return _TABLES[key]


def local_numel(e: ParamEntry, lay: PlanLayout) -> int:
    n = math.prod(e.shape)
    if e.cut in ("vocab", "tp0", "tp1"):
        return n // lay.tp
    if e.cut in ("expert_gate_up", "expert_down"):
        return n // (lay.ep * lay.etp)
    return n


@dataclass
class RankTensor:
    name: str
    numel: int
    group: str                   # ZeRO-1 shard group: "dp" or "edp"
    decay: bool
    deferred: bool = False       # reduced after backward (ZeRO-1 puts it in buckets of its own)


@dataclass
class StageParams:
    """What every rank of one pipeline stage holds (all ranks of a stage hold the same shapes)."""
    pp_rank: int
    tensors: list[RankTensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def numel_of(self, group: str) -> int:
        return sum(t.numel for t in self.tensors if t.group == group)


_STAGES: dict[tuple, list[StageParams]] = {}


def stage_params(m: ModelConfig, lay: PlanLayout, pp_layout: str = "") -> list[StageParams]:
    """Every pipeline rank's tensors (cached: ZeRO-1, micro-batch and recompute do not change them;
    treat the result as read-only)."""
    key = (repr(m), lay.tp, lay.pp, lay.vpp, lay.ep, lay.etp, lay.sequence_parallel, pp_layout)
    if key not in _STAGES:
        if len(_STAGES) > 4096:
            _STAGES.clear()
        _STAGES[key] = _stage_params(m, lay, pp_layout)
    return _STAGES[key]


def _stage_params(m: ModelConfig, lay: PlanLayout, pp_layout: str) -> list[StageParams]:
    entries, _, _ = model_table(m)
    stages = partition_layers(m.num_layers, lay.pp, lay.vpp, pp_layout)
    rank_of_layer = {i: s % lay.pp for s, ids in enumerate(stages) for i in ids}
    out = [StageParams(r) for r in range(lay.pp)]
    tied_copies = m.tie_embeddings and lay.pp > 1
    for e in entries:
        r = {"first": 0, "last": lay.pp - 1}.get(e.where, rank_of_layer.get(e.layer))
        deferred = (lay.tp > 1 and e.tp_partial(lay.sequence_parallel)) or (tied_copies and e.name == "embed.weight")
        out[r].tensors.append(RankTensor(e.name, local_numel(e, lay), "edp" if e.expert else "dp", e.decay,
                                         deferred))
    if tied_copies:      # the head's own copy of the embedding (apply_pp), summed across stages
        emb = next(e for e in entries if e.name == "embed.weight")
        out[-1].tensors.append(RankTensor("lm_head.weight", local_numel(emb, lay), "dp", True, True))
    return out


def zero1_buckets(stage: StageParams, bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> list[tuple[str, int]]:
    """(group, unpadded numel) of every ZeRO-1 bucket, in ZeroOptimizer's order."""
    order = list(reversed(stage.tensors))          # backward order
    out = []
    for group in ("dp", "edp"):
        for decay in (True, False):
            for deferred in (False, True):
                chosen = [t for t in order if (t.group, t.decay, t.deferred) == (group, decay, deferred)]
                for run in split_buckets(chosen, bucket_numel, numel=lambda t: t.numel):
                    out.append((group, sum(t.numel for t in run)))
    return out


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


STEP_SCALAR_BYTES = 4            # torch AdamW keeps `step` as a 0-dim float32 tensor


def state_bytes(stage: StageParams, lay: PlanLayout, param_bytes: int, master_bytes: int,
                bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> StateBytes:
    """Bytes of one rank's parameters, gradients and optimizer state after the first step.
    param_bytes: the parameter dtype (4 for fp32 masters under bf16 autocast); master_bytes: the
    accumulation dtype of ZeRO-1's masters and moments (4; 8 in the fp64 test mode)."""
    if not lay.zero1:
        n = stage.numel
        return StateBytes(n * param_bytes, n * param_bytes,
                          2 * n * param_bytes + STEP_SCALAR_BYTES * len(stage.tensors))
    sizes = {"dp": lay.dp, "edp": lay.edp}
    params = optim = 0
    memo = stage.__dict__.setdefault("_buckets", {})     # stages are cached and read-only
    if bucket_numel not in memo:
        memo[bucket_numel] = zero1_buckets(stage, bucket_numel)
    for group, total in memo[bucket_numel]:
        padded = math.ceil(total / sizes[group]) * sizes[group]
        params += padded
        # masters (unless the params are in the accumulation dtype: then they are their own
        # masters, megamoe.parallel.zero), exp_avg, exp_avg_sq
        copies = 2 if param_bytes == master_bytes else 3
        optim += copies * (padded // sizes[group]) * master_bytes + STEP_SCALAR_BYTES
    return StateBytes(params * param_bytes, params * param_bytes, optim)


__all__ = ["ParamEntry", "RankTensor", "StageParams", "StateBytes", "model_table", "local_numel",
           "stage_params", "state_bytes", "zero1_buckets"]
