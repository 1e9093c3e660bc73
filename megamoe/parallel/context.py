"""ParallelContext: what the Trainer (megamoe/training/trainer.py) calls under torch.distributed.

Protocol used by the trainer:
  rank, world_size, dp_rank, dp_size, is_main      dp = the attention-view data-parallel group
                                                   (TP ranks of one DP group read the same data)
  loss_fn                                          vocab-parallel CE under TP, else None
  no_sync(model, last)                             context for one micro-batch's backward
  reduce_grads(model)                              after the last micro-batch
  grad_norm(model) -> fp32 tensor                  global norm, every element counted once
  average_over_dp(t)                               mean over DP ranks (losses; identical over TP)
  sum_over_dp(t)                                   sum of a per-rank MoE statistic (expert load)
                                                   over every rank that saw distinct tokens:
                                                   DP ranks and, since the MoE blocks split
                                                   tokens over TP, TP ranks too
  save_checkpoint(trainer) -> path, load_checkpoint(trainer, ckpt_dir), shutdown()

Checkpoint layout (one atomic directory, like megamoe.training.checkpoint):
  step_XXXXXXXX/model_rank{r}.pt   {"model": local state_dict, "specs": {name: ParamSpec dict}}
               /optim_rank{r}.pt   {"optimizer": state_dict, "rng": this rank's RNG state}
               /trainer.pt, config.yaml, layout.yaml   (rank 0)
Rank 0 creates the temporary directory, every rank writes its files, rank 0 renames it.
Loading needs the same layout (resharding comes later; the specs hold global shape + slices).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
import torch.distributed as dist
import yaml

from megamoe.config import to_dict
from megamoe.parallel import collectives as C
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.params import spec_table
from megamoe.training import checkpoint as ckpt


class ParallelContext:
    def __init__(self, mesh: ParallelMesh, grads, loss_fn=None, zero1: bool = False,
                 sequence_parallel: bool = False):
        self.mesh, self.grads, self.loss_fn = mesh, grads, loss_fn
        self.zero1, self.sequence_parallel = zero1, sequence_parallel
        self.rank, self.world_size = mesh.rank, mesh.world_size
        self.dp_rank, self.dp_size = mesh.rank_in("dp"), mesh.dp
        self.is_main = self.rank == 0

    # ----------------------------------------------------------------------------- gradients
    def no_sync(self, model, last: bool):
        # Gradients are reduced once in reduce_grads(); nothing to suppress per micro-batch.
        return contextlib.nullcontext()

    def reduce_grads(self, model) -> None:
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
                "etp": lay.etp, "zero1": self.zero1, "sequence_parallel": self.sequence_parallel}

    def save_checkpoint(self, trainer) -> str:
        root = os.path.join(trainer.cfg.out_dir, ckpt.CKPT_DIR)
        name = f"step_{trainer.step:08d}"
        final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
        if self.is_main:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        r = self.rank
        # clone: under ZeRO-1 params are views of one flat buffer; save just the tensors
        model_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        _save(os.path.join(tmp, f"model_rank{r}.pt"), {"model": model_state, "specs": spec_table(trainer.model)})
        _save(os.path.join(tmp, f"optim_rank{r}.pt"),
              {"optimizer": trainer.optimizer.state_dict(), "rng": ckpt.rng_state()})
        if self.is_main:
            _save(os.path.join(tmp, "trainer.pt"),
                  {"step": trainer.step, "consumed_samples": trainer.step * trainer.cfg.global_batch_size,
                   "bad_steps": trainer.bad_steps})
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                yaml.safe_dump(to_dict(trainer.cfg), f, sort_keys=False)
            with open(os.path.join(tmp, "layout.yaml"), "w") as f:
                yaml.safe_dump(self.layout(), f, sort_keys=False)
        dist.barrier()
        if self.is_main:
            if os.path.exists(final):   # re-saving the same step (e.g. after a resume)
                shutil.rmtree(final)
            os.rename(tmp, final)
            ckpt._atomic_write_text(os.path.join(root, "latest"), name)
        dist.barrier()
        return final

    def load_checkpoint(self, trainer, ckpt_dir: str) -> None:
        layout_path = os.path.join(ckpt_dir, "layout.yaml")
        if not os.path.exists(layout_path):
            raise ValueError(f"checkpoint {ckpt_dir!r} was not written by a parallel run (no layout.yaml); "
                             "loading single-process checkpoints into a parallel run is not supported yet")
        with open(layout_path) as f:
            saved = yaml.safe_load(f)
        if saved != self.layout():
            raise ValueError(f"checkpoint {ckpt_dir!r} has parallel layout {saved} but this run has "
                             f"{self.layout()}; resharding is not supported yet")
        r = self.rank
        model_file = ckpt.load_file(ckpt_dir, f"model_rank{r}.pt")
        trainer.model.load_state_dict(model_file["model"])
        optim_file = ckpt.load_file(ckpt_dir, f"optim_rank{r}.pt")
        trainer.optimizer.load_state_dict(optim_file["optimizer"])
        state = ckpt.load_file(ckpt_dir, "trainer.pt")
        trainer.load_trainer_state({**state, "rng": optim_file["rng"]})

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _save(path: str, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["ParallelContext"]
