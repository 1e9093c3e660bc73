"""ParallelContext: what the Trainer (megamoe/training/trainer.py) calls under torch.distributed.

Protocol used by the trainer:
  rank, world_size, dp_rank, dp_size, is_main      dp = the attention-view data-parallel group
                                                   (TP ranks of one DP group read the same data)
  loss_fn                                          (logits, labels) -> mean CE: vocab-parallel
                                                   under TP, else the plain one
  schedule                                         forward_backward(trainer, batches, stats) and
                                                   evaluate(trainer, batches): the PipelineRunner
                                                   under pp > 1, else the plain micro-batch loop
  pipeline                                         PipelineRunner under pp > 1, else None
  no_sync(model, last)                             context for one micro-batch's backward of
                                                   `model` (or of one pipeline chunk); last=True
                                                   lets the DP reduction start during it
  reduce_grads(model)                              after the last micro-batch: completes it
  grad_norm(model) -> fp32 tensor                  global norm, every element counted once
  average_over_dp(t)                               mean over DP ranks (losses; identical over TP)
  sum_over_dp(t)                                   sum of a per-rank MoE statistic (expert load)
                                                   over every rank that saw distinct tokens:
                                                   DP ranks and, since the MoE blocks split
                                                   tokens over TP, TP ranks too
  save_checkpoint(trainer) -> path, load_checkpoint(trainer, ckpt_dir), shutdown()
The single-process twin is megamoe.training.context.LocalContext; both are built by
megamoe.training.build.build_training.

Checkpoints are sharded and layout-independent (megamoe.checkpoint.sharded):
  step_XXXXXXXX/model_rank{r}.pt, optim_rank{r}.pt, metadata.json, trainer.pt, config.yaml
written atomically (temporary directory renamed by rank 0); they load into any layout (other
TP/EP/ETP/DP/ZeRO/pipeline split, or a single process), and single-process ones load here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.config import to_dict
from megamoe.parallel import collectives as C
from megamoe.checkpoint import sharded
from megamoe.parallel.guard import guarded
from megamoe.parallel.mesh import ParallelMesh


class ParallelContext:
    def __init__(self, mesh: ParallelMesh, grads, loss_fn, schedule, zero1: bool = False,
                 sequence_parallel: bool = False, pipeline=None):
        self.mesh, self.grads, self.loss_fn, self.schedule = mesh, grads, loss_fn, schedule
        self.pipeline = pipeline   # PipelineRunner when pp > 1 (then also the schedule)
        self.zero1, self.sequence_parallel = zero1, sequence_parallel
        self.rank, self.world_size = mesh.rank, mesh.world_size
        self.dp_rank, self.dp_size = mesh.rank_in("dp"), mesh.dp
        self.is_main = self.rank == 0

    # ----------------------------------------------------------------------------- gradients
    def no_sync(self, model, last: bool):
        """Context around one backward of `model`: the model, or a pipeline chunk (anything with
        parameters()). last=False (earlier micro-batches): gradients only accumulate. last=True:
        the step's last backward through those parameters, so each gradient is final once
        accumulated and GradReducer launches a bucket's all-reduce as soon as the bucket is
        complete, overlapping the rest of the backward (ZeRO-1: no effect)."""
        return self.grads.no_sync(model.parameters(), last)

    def reduce_grads(self, model) -> None:
        """Finish the data-parallel reduction: the tied-embedding sum first (its gradient is
        marked late, so GradReducer did not start it during backward), then wait on / launch
        the buckets."""
        if self.pipeline is not None:
            self.pipeline.sync_tied_grads()
        self.grads.reduce_grads()

    def grad_norm(self, model) -> torch.Tensor:
        return self.grads.grad_norm()

    # ------------------------------------------------------------------------------- metrics
    def average_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return C.all_reduce_(t.detach().clone(), self.mesh.group("dp")) / self.dp_size

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return C.all_reduce_(t.detach().clone(), self.mesh.group("dp_tp"))

    # --------------------------------------------------------------------------- checkpoints
    def layout(self) -> dict:
        lay = self.mesh.layout
        return {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep,
                "etp": lay.etp, "virtual_pp": self.pipeline.executor.vpp if self.pipeline else 1,
                "zero1": self.zero1, "sequence_parallel": self.sequence_parallel}

    def save_checkpoint(self, trainer) -> str:
        state = trainer.trainer_state()
        return sharded.save(trainer.cfg.out_dir, trainer.step, trainer.model, trainer.optimizer,
                                    self.mesh, state, to_dict(trainer.cfg), self.layout())

    def load_checkpoint(self, trainer, ckpt_dir: str) -> None:
        trainer.load_trainer_state(sharded.load(ckpt_dir, trainer.model, trainer.optimizer, self.mesh))

    def shutdown(self) -> None:
        if dist.is_initialized():
            with guarded():
                dist.barrier()
            dist.destroy_process_group()


__all__ = ["ParallelContext"]
