"""PipelineRunner: what the Trainer runs instead of its micro-batch loop when parallel.pp > 1.

The trainer hands over the step's micro-batches; the runner pushes them through this rank's
stage chunks with the 1F1B / interleaved schedule (pipeline.py), collects the MoE statistics
of the layers this stage holds, and sums loss and statistics over the pipeline group so that
every rank logs the same numbers. Tied embeddings whose head sits on the last stage get their
two gradients summed across the "embed" group before the data-parallel reduction (marked as a
late gradient, so the reducer does not start it during backward).

Overlap with the data-parallel reduction: each chunk runs its micro-batches' backwards in
micro-batch order, so when the last micro-batch's backward through a chunk starts, the chunk's
gradients become final as they accumulate. A hook on that forward's output enters
`ctx.no_sync(chunk, last=True)` at that moment (see ParallelContext.no_sync).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megamoe.parallel.data import mark_late_grad
from megamoe.parallel.guard import guarded
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.params import set_spec
from megamoe.parallel.pipeline import PipelineExecutor, stage_chunks


class PipelineRunner:
    def __init__(self, model: torch.nn.Module, mesh: ParallelMesh, chunk_layers: list[list[int]],
                 micro_batch_size: int, seq_per_rank: int, dtype: torch.dtype = torch.float32):
        # dtype: of the activations sent between stages (the residual stream: the parameters'
        # dtype, fp32 also under bf16 autocast)
        self.model, self.mesh = model, mesh
        pp_rank = mesh.rank_in("pp")
        self.chunks = [_Chunk(c) for c in stage_chunks(model, chunk_layers, pp_rank, mesh.pp)]
        chunks = self.chunks
        self.executor = PipelineExecutor(chunks, pp_rank, mesh.pp, mesh.group("pp"), mesh.ranks("pp"),
                                         (micro_batch_size, seq_per_rank, model.cfg.d_model), dtype)
        self.tied_weight = None
        if model.cfg.tie_embeddings and mesh.size("embed") > 1:
            # First stage: the embedding; last stage: the head's copy of it (see apply_pp).
            self.tied_weight = model.embed.weight if model.embed is not None else model.lm_head.weight
            if model.embed is None:
                set_spec(self.tied_weight, norm_counted=False)   # counted once, on stage 0
            mark_late_grad(self.tied_weight)                     # changed by sync_tied_grads

    def check_num_micro(self, num_micro: int) -> None:
        if self.executor.vpp > 1 and num_micro % self.mesh.pp:
            raise ValueError(f"interleaved pipelining needs the micro-batches per step ({num_micro} = "
                             f"global_batch_size / (micro_batch_size * dp)) to be a multiple of "
                             f"parallel.pp ({self.mesh.pp})")

    def forward_backward(self, trainer, batches: list[tuple[torch.Tensor, torch.Tensor]], stats) -> None:
        """Run one step's micro-batches (inputs, labels) forward and backward; fill `stats`."""
        def after_forward(chunk, micro):
            for layer in chunk.moe_layers():
                stats.add_moe_layer(layer)

        inputs, labels = [b[0] for b in batches], [b[1] for b in batches]
        with contextlib.ExitStack() as last_backward:
            def on_last_backward(chunk):
                last_backward.enter_context(trainer.ctx.no_sync(chunk, last=True))

            for chunk in self.chunks:
                chunk.arm(len(batches), on_last_backward)
            try:
                losses = self.executor.run(inputs, labels, trainer.loss_fn, len(batches), trainer.device,
                                           after_forward=after_forward, forward_context=trainer.autocast)
            finally:
                for chunk in self.chunks:
                    chunk.arm(0, None)
        for loss in losses:
            stats.add_ce(loss)
        stats.reduce(self.mesh.group("pp"))

    def evaluate(self, trainer, batches) -> torch.Tensor:
        """Mean loss over the batches, the same on every pipeline rank."""
        inputs, labels = [b[0] for b in batches], [b[1] for b in batches]
        losses = self.executor.forward_only(inputs, labels, trainer.loss_fn, len(batches), trainer.device,
                                            forward_context=trainer.autocast)
        total = (torch.stack(losses).sum().to(trainer.stats_dtype) if losses
                 else torch.zeros((), dtype=trainer.stats_dtype, device=trainer.device))
        with guarded(self.mesh.group("pp")):
            dist.all_reduce(total, group=self.mesh.group("pp"))
        return total / len(batches)

    def sync_tied_grads(self) -> None:
        """Sum the embedding's and the head copy's gradients (then both step identically)."""
        if self.tied_weight is None:
            return
        w = self.tied_weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        with guarded(self.mesh.group("embed")):
            dist.all_reduce(w.grad, group=self.mesh.group("embed"))


class _Chunk:
    """A StageChunk that calls `on_last_backward(self)` when the backward of the step's last
    micro-batch through it starts: its forwards run in micro-batch order, so that is the
    `num_micro`-th forward with gradients. The hook sits on that forward's output (its
    gradient arrives before any parameter gradient of the chunk's last backward)."""

    def __init__(self, chunk):
        self.chunk, self.first, self.last, self.layer_ids = chunk, chunk.first, chunk.last, chunk.layer_ids
        self.num_micro, self.on_last_backward, self.forwards = 0, None, 0

    def arm(self, num_micro: int, on_last_backward) -> None:
        self.num_micro, self.on_last_backward, self.forwards = num_micro, on_last_backward, 0

    def __call__(self, tokens=None, hidden=None):
        out = self.chunk(tokens=tokens, hidden=hidden)
        if self.on_last_backward is not None and out.requires_grad:
            self.forwards += 1
            if self.forwards == self.num_micro:
                out.register_hook(self._last_backward_starts)
        return out

    def _last_backward_starts(self, grad):
        self.on_last_backward(self)      # returns None: the gradient passes unchanged

    def parameters(self):
        """The parameters this chunk's backward reaches (those of the model it points into)."""
        m = self.chunk.model
        parts = ([m.embed] if self.first else []) + [m.layers[str(i)] for i in self.layer_ids] \
            + ([m.norm, m.lm_head] if self.last else [])
        return [p for part in parts if part is not None for p in part.parameters()]

    def moe_layers(self) -> list:
        return self.chunk.moe_layers()


__all__ = ["PipelineRunner"]
