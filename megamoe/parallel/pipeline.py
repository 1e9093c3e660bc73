"""Pipeline parallelism: stage partitioning, 1F1B and interleaved schedules, p2p execution.

Legend: P pipeline ranks, V virtual stages (model chunks) per rank, M micro-batches,
"stage" s = v * P + r is chunk v of pipeline rank r (Megatron's interleaved layout).

How it fits together:
  partition_layers(...)        -> which global layer ids each stage holds (uneven splits allowed)
  build_stage_chunk(model, ..) -> a trimmed copy of the full model holding one stage's layers
                                  (embedding only on stage 0, final norm + head only on the last)
  schedule(P, V, M, rank)      -> this rank's ordered list of ("F"|"B", micro_batch, chunk)
  PipelineExecutor.run(...)    -> executes it: receive input, compute, send output (async,
                                  tagged point-to-point), returns per-micro-batch losses.
Sends are asynchronous and receives are matched by tag, so correctness does not depend on
the exact interleaving of sends and receives; the order only shapes activation memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ------------------------------------------------------------------------------------ partition

def partition_layers(num_layers: int, pp: int, virtual_pp: int = 1, layout: str = "") -> list[list[int]]:
    """Global layer ids of each of the pp * virtual_pp stages, in stage order.

    `layout` lists the layer count of every stage ("3,5" for 8 layers on 2 stages); by default
    layers are spread as evenly as possible (earlier stages take the remainder).
    """
    stages = pp * virtual_pp
    if layout:
        try:
            counts = [int(c) for c in layout.split(",")]
        except ValueError:
            raise ValueError(f"parallel.pp_layout must be comma-separated integers, got {layout!r}") from None
        if len(counts) != stages:
            raise ValueError(f"parallel.pp_layout has {len(counts)} entries but pp*virtual_pp is {stages}")
        if sum(counts) != num_layers or min(counts) < 0:
            raise ValueError(f"parallel.pp_layout {layout!r} must add up to model.num_layers ({num_layers})")
    else:
        if num_layers < stages:
            raise ValueError(f"model.num_layers ({num_layers}) is smaller than pp*virtual_pp ({stages})")
        base, extra = divmod(num_layers, stages)
        counts = [base + (1 if s < extra else 0) for s in range(stages)]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def build_stage_chunk(model: torch.nn.Module, layer_ids: list[int], first: bool, last: bool):
    """A copy of `model` keeping only `layer_ids` (global names preserved for checkpoints)."""
    chunk = copy.deepcopy(model)
    for name in list(chunk.layers.keys()):
        if int(name) not in layer_ids:
            del chunk.layers[name]
    if not first:
        chunk.embed = None
    if not last:
        chunk.norm = None
        chunk.lm_head = None
    elif chunk.cfg.tie_embeddings and not first:
        # The head keeps its own copy of the tied weight; grads are summed with stage 0's embedding.
        chunk.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    return chunk


# ------------------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class Op:
    kind: str        # "F" forward or "B" backward
    micro: int       # micro-batch index
    chunk: int       # model chunk (virtual stage) on this rank


def schedule(pp: int, virtual_pp: int, num_micro: int, rank: int) -> list[Op]:
    """1F1B (virtual_pp == 1) or interleaved 1F1B order of ops for pipeline rank `rank`."""
    if virtual_pp == 1:
        warmup = min(pp - rank - 1, num_micro)
        ops = [Op("F", m, 0) for m in range(warmup)]
        for i in range(num_micro - warmup):
            ops += [Op("F", warmup + i, 0), Op("B", i, 0)]
        ops += [Op("B", m, 0) for m in range(num_micro - warmup, num_micro)]
        return ops
    if num_micro % pp:
        raise ValueError(f"interleaved pipelining needs the number of micro-batches ({num_micro}) "
                         f"to be a multiple of parallel.pp ({pp})")
    total = num_micro * virtual_pp

    def fwd(k):  # k-th forward on this rank: chunks advance every pp micro-batches
        return Op("F", (k // (pp * virtual_pp)) * pp + k % pp, (k // pp) % virtual_pp)

    def bwd(k):
        return Op("B", (k // (pp * virtual_pp)) * pp + k % pp, virtual_pp - 1 - (k // pp) % virtual_pp)

    warmup = min((pp - rank - 1) * 2 + (virtual_pp - 1) * pp, total)
    ops = [fwd(k) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [fwd(warmup + i), bwd(i)]
    ops += [bwd(k) for k in range(total - warmup, total)]
    return ops


# ------------------------------------------------------------------------------------- executor

class PipelineExecutor:
    """Runs one optimizer step's micro-batches through this rank's chunks.

    `chunks[v]` is stage v * pp + pp_rank. Activations have a fixed shape `act_shape`
    ([micro_batch, seq, hidden], seq sharded under sequence parallelism).
    """

    def __init__(self, chunks: list[torch.nn.Module], pp_rank: int, pp_size: int, group,
                 rank_of_pp: list[int], act_shape, dtype=torch.float32):
        self.chunks, self.pp_rank, self.pp, self.group = chunks, pp_rank, pp_size, group
        self.rank_of_pp = rank_of_pp  # global rank of each pipeline rank in this pipeline
        self.vpp = len(chunks)
        self.act_shape, self.dtype = tuple(act_shape), dtype

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.pp_rank

    def _tag(self, kind: str, micro: int, stage: int) -> int:
        """Unique per message: receiver stage, micro-batch, direction."""
        return (micro * self.pp * self.vpp + stage) * 2 + (kind == "B")

    def run(self, micro_inputs, micro_labels, loss_fn, num_micro: int, device, after_forward=None):
        """Returns the list of per-micro-batch losses (on the last stage; [] elsewhere).

        micro_inputs[m] / micro_labels[m]: token ids [mb, S] (needed on the first / last stage).
        loss_fn(logits, labels) -> scalar; its gradient is scaled by 1 / num_micro.
        after_forward(chunk_module, micro) is called after each forward (statistics).
        """
        last_stage = self.pp * self.vpp - 1
        inputs, outputs, pending, losses = {}, {}, [], {}
        for op in schedule(self.pp, self.vpp, num_micro, self.pp_rank):
            stage = self._stage(op.chunk)
            module = self.chunks[op.chunk]
            if op.kind == "F":
                if stage == 0:
                    out = module(tokens=micro_inputs[op.micro])
                    inputs[(op.micro, op.chunk)] = None
                else:
                    x = self._recv(stage - 1, self._tag("F", op.micro, stage), device)
                    x.requires_grad_(True)
                    inputs[(op.micro, op.chunk)] = x
                    out = module(hidden=x)
                if after_forward is not None:
                    after_forward(module, op.micro)
                if stage == last_stage:
                    loss = loss_fn(out, micro_labels[op.micro])
                    losses[op.micro] = loss.detach()
                    outputs[(op.micro, op.chunk)] = loss / num_micro
                else:
                    pending.append(self._send(out.detach(), stage + 1, self._tag("F", op.micro, stage + 1)))
                    outputs[(op.micro, op.chunk)] = out
            else:
                out = outputs.pop((op.micro, op.chunk))
                if stage == last_stage:
                    out.backward()
                else:
                    grad = self._recv(stage + 1, self._tag("B", op.micro, stage), device)
                    out.backward(grad)
                x = inputs.pop((op.micro, op.chunk))
                if stage > 0:
                    pending.append(self._send(x.grad, stage - 1, self._tag("B", op.micro, stage - 1)))
        for work in pending:
            work.wait()
        return [losses[m] for m in sorted(losses)]

    def _peer(self, stage: int) -> int:
        return self.rank_of_pp[stage % self.pp]

    def _send(self, tensor, stage: int, tag: int):
        return dist.isend(tensor.contiguous(), self._peer(stage), group=self.group, tag=tag)

    def _recv(self, stage: int, tag: int, device):
        buf = torch.empty(self.act_shape, dtype=self.dtype, device=device)
        dist.irecv(buf, self._peer(stage), group=self.group, tag=tag).wait()
        return buf
