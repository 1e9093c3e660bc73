"""Pipeline parallelism: stage partitioning, 1F1B and interleaved schedules, p2p execution.

Legend: P pipeline ranks, V virtual stages (model chunks) per rank, M micro-batches,
"stage" s = v * P + r is chunk v of pipeline rank r (Megatron's interleaved layout).

How it fits together:
  partition_layers(...)        -> which global layer ids each stage holds (uneven splits allowed)
  apply_pp(model, ...)         -> trims the model in place to this rank's layers (embedding only
                                  on stage 0, final norm + head only on the last stage)
  stage_chunks(model, ...)     -> one StageChunk view per virtual stage of this rank
  schedule(P, V, M, rank)      -> this rank's ordered list of ("F"|"B", micro_batch, chunk)
  PipelineExecutor.run(...)    -> executes it: receive input, compute, send output (async,
                                  tagged point-to-point), returns per-micro-batch losses.
Sends are asynchronous and receives are matched by tag, so correctness does not depend on
the exact interleaving of sends and receives; the order only shapes activation memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.parallel.guard import guarded


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


def apply_pp(model: torch.nn.Module, pp_rank: int, pp: int, virtual_pp: int = 1,
             layout: str = "") -> list[list[int]]:
    """Trim the full model in place to what pipeline rank `pp_rank` holds; returns the global
    layer ids of its chunks (chunk v = stage v * pp + pp_rank).

    Parameter names stay the single-process names (layers are a ModuleDict keyed by global
    index), so checkpoints and gradient specs need no translation. The embedding stays on the
    rank of stage 0, the final norm and head on the rank of the last stage. With tied
    embeddings and pp > 1 the head gets its own copy of the embedding (`tied_copy`): the two
    gradients are summed across the embedding group, see `sync_tied_grads`.
    """
    stages = partition_layers(model.cfg.num_layers, pp, virtual_pp, layout)
    mine = [stages[v * pp + pp_rank] for v in range(virtual_pp)]
    keep = {i for ids in mine for i in ids}
    for key in list(model.layers.keys()):
        if int(key) not in keep:
            del model.layers[key]
    first, last = pp_rank == 0, pp_rank == pp - 1
    if last and not first and model.cfg.tie_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    if not first:
        model.embed = None
    if not last:
        model.norm = None
        model.lm_head = None
    return mine


class StageChunk:
    """One pipeline stage of a trimmed model: [embedding] -> its blocks -> [norm -> head].

    A view: it holds no parameters of its own (the model it points into does), so the trainer,
    the optimizer and the checkpoints only ever see the one rank model. Mirrors
    Transformer.forward for a subset of the layers.
    """

    def __init__(self, model: torch.nn.Module, layer_ids: list[int], first: bool, last: bool):
        self.model, self.layer_ids, self.first, self.last = model, list(layer_ids), first, last

    def __call__(self, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
        m = self.model
        x = m.embed(tokens) if self.first else hidden
        for i in self.layer_ids:
            x = m.layers[str(i)](x, m.rope_cos, m.rope_sin)
        return m.lm_head(m.norm(x)) if self.last else x

    def moe_layers(self) -> list:
        return [m for i in self.layer_ids for m in self.model.layers[str(i)].modules()
                if hasattr(m, "last_stats")]


def stage_chunks(model: torch.nn.Module, chunk_layers: list[list[int]], pp_rank: int, pp: int) -> list[StageChunk]:
    n_stages = pp * len(chunk_layers)
    return [StageChunk(model, ids, first=v * pp + pp_rank == 0, last=v * pp + pp_rank == n_stages - 1)
            for v, ids in enumerate(chunk_layers)]


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

    `chunks[v]` is stage v * pp + pp_rank. Activations crossing stages have a fixed shape
    `act_shape` ([micro_batch, seq, hidden], seq sharded under sequence parallelism) and dtype.
    """

    def __init__(self, chunks: list, pp_rank: int, pp_size: int, group, rank_of_pp: list[int],
                 act_shape, dtype=torch.float32):
        self.chunks, self.pp_rank, self.pp, self.group = chunks, pp_rank, pp_size, group
        self.rank_of_pp = rank_of_pp  # global rank of each pipeline rank in this pipeline
        self.vpp = len(chunks)
        self.act_shape, self.dtype = tuple(act_shape), dtype

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.pp_rank

    @property
    def last_stage(self) -> int:
        return self.pp * self.vpp - 1

    def _tag(self, kind: str, micro: int, stage: int) -> int:
        """Unique per message: receiver stage, micro-batch, direction."""
        return (micro * self.pp * self.vpp + stage) * 2 + (kind == "B")

    def _forward(self, chunk: int, micro: int, micro_inputs, device, forward_context):
        """(stage input that needs a gradient or None, stage output) of one forward op."""
        stage = self._stage(chunk)
        if stage == 0:
            x = None
            with forward_context():
                out = self.chunks[chunk](tokens=micro_inputs[micro])
        else:
            x = self._recv(stage - 1, self._tag("F", micro, stage), device)
            x.requires_grad_(torch.is_grad_enabled())
            with forward_context():
                out = self.chunks[chunk](hidden=x)
        return x, out

    def run(self, micro_inputs, micro_labels, loss_fn, num_micro: int, device, after_forward=None,
            forward_context=contextlib.nullcontext):
        """Forward + backward of every micro-batch; returns the per-micro-batch losses (on the
        last stage's rank; [] elsewhere).

        micro_inputs[m] / micro_labels[m]: token ids [mb, S] (needed on the first / last stage).
        loss_fn(logits, labels) -> scalar; its gradient is scaled by 1 / num_micro.
        after_forward(chunk, micro) is called after each forward (statistics).
        forward_context() wraps each forward (autocast); backward runs outside it.
        """
        inputs, outputs, pending, losses = {}, {}, [], {}
        for op in schedule(self.pp, self.vpp, num_micro, self.pp_rank):
            stage = self._stage(op.chunk)
            key = (op.micro, op.chunk)
            if op.kind == "F":
                inputs[key], out = self._forward(op.chunk, op.micro, micro_inputs, device, forward_context)
                if after_forward is not None:
                    after_forward(self.chunks[op.chunk], op.micro)
                if stage == self.last_stage:
                    loss = loss_fn(out, micro_labels[op.micro])
                    losses[op.micro] = loss.detach()
                    outputs[key] = loss / num_micro
                else:
                    pending.append(self._send(out.detach(), stage + 1, self._tag("F", op.micro, stage + 1)))
                    outputs[key] = out
            else:
                out = outputs.pop(key)
                if stage == self.last_stage:
                    out.backward()
                else:
                    grad = self._recv(stage + 1, self._tag("B", op.micro, stage), device)
                    out.backward(grad.to(out.dtype))
                x = inputs.pop(key)
                if stage > 0:
                    pending.append(self._send(x.grad, stage - 1, self._tag("B", op.micro, stage - 1)))
        with guarded(self.group):
            for work in pending:
                work.wait()
        return [losses[m] for m in sorted(losses)]

    @torch.no_grad()
    def forward_only(self, micro_inputs, micro_labels, loss_fn, num_micro: int, device,
                     forward_context=contextlib.nullcontext):
        """Evaluation: forwards only, micro-batch by micro-batch (every rank walks (micro, chunk)
        in the same lexicographic order, so each receive's sender is never waiting on us)."""
        pending, losses = [], []
        for m in range(num_micro):
            for v in range(self.vpp):
                stage = self._stage(v)
                _, out = self._forward(v, m, micro_inputs, device, forward_context)
                if stage == self.last_stage:
                    losses.append(loss_fn(out, micro_labels[m]))
                else:
                    pending.append(self._send(out, stage + 1, self._tag("F", m, stage + 1)))
        with guarded(self.group):
            for work in pending:
                work.wait()
        return losses

    def _peer(self, stage: int) -> int:
        return self.rank_of_pp[stage % self.pp]

    def _send(self, tensor, stage: int, tag: int):
        return dist.isend(tensor.to(self.dtype).contiguous(), self._peer(stage), group=self.group, tag=tag)

    def _recv(self, stage: int, tag: int, device):
        buf = torch.empty(self.act_shape, dtype=self.dtype, device=device)
        with guarded(self.group):   # a stage that never sends: the error names the pipeline group
            dist.irecv(buf, self._peer(stage), group=self.group, tag=tag).wait()
        return buf
