"""The single-process context and the plain micro-batch schedule.

`LocalContext` has the protocol of `megamoe.parallel.ParallelContext` (see there) for one
process, so the Trainer runs the same code whatever the layout: it never asks whether it is
distributed. `MicroBatchLoop` is the schedule without pipeline parallelism; under pp > 1 the
`PipelineRunner` (megamoe.parallel.pipeline_runner) takes its place with the same two methods.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from megamoe.config import to_dict
from megamoe.precision import accum_dtype, upcast
from megamoe.checkpoint import files, single


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 (fp64 for fp64 logits); logits [B, S, V], labels [B, S]."""
    return F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1))


class MicroBatchLoop:
    """forward + backward of each micro-batch in turn, gradients accumulated in .grad."""

    def forward_backward(self, trainer, batches, stats) -> None:
        moe_layers = trainer.model.moe_layers() if hasattr(trainer.model, "moe_layers") else []
        for mb, (inputs, labels) in enumerate(batches):
            with trainer.ctx.no_sync(trainer.model, last=mb == len(batches) - 1):
                ce = trainer.forward_loss(inputs, labels)
                (ce / trainer.num_micro).backward()
            stats.add_ce(ce)
            for layer in moe_layers:
                stats.add_moe_layer(layer)

    def evaluate(self, trainer, batches) -> torch.Tensor:
        return torch.stack([trainer.forward_loss(inputs, labels) for inputs, labels in batches]).mean()


class LocalContext:
    """One process: nothing to reduce; checkpoints in the single-process format (megamoe.checkpoint.single)."""

    rank, world_size, dp_rank, dp_size, is_main = 0, 1, 0, 1, True

    def __init__(self):
        self.loss_fn = cross_entropy
        self.schedule = MicroBatchLoop()

    def no_sync(self, model, last: bool):
        return contextlib.nullcontext()

    def reduce_grads(self, model) -> None:
        pass

    def grad_norm(self, model) -> torch.Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=next(model.parameters()).device)
        sq = torch.zeros((), dtype=accum_dtype(grads[0].dtype), device=grads[0].device)
        for g in grads:
            sq += upcast(g).pow(2).sum()
        return sq.sqrt()

    def average_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    def save_checkpoint(self, trainer) -> str:
        state = {"model.pt": trainer.model.state_dict(), "optimizer.pt": trainer.optimizer.state_dict(),
                 "trainer.pt": {**trainer.trainer_state(), "rng": files.rng_state()}}
        return single.save_checkpoint(trainer.cfg.out_dir, trainer.step, state, to_dict(trainer.cfg))

    def load_checkpoint(self, trainer, ckpt_dir: str) -> None:
        # a single-process checkpoint, or a sharded one from any parallel layout
        trainer.load_trainer_state(single.load_training_state(ckpt_dir, trainer.model, trainer.optimizer))

    def shutdown(self) -> None:
        pass


__all__ = ["LocalContext", "MicroBatchLoop", "cross_entropy"]
