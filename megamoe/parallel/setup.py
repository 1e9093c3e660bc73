"""The parallel steps of the build pipeline (megamoe.training.build.build_training calls them in
this order when the world has more than one rank):

  build_mesh(cfg, world)                 start torch.distributed (launch.py), rank grid and named
                                         groups (mesh.py), device; validate the layout
  apply_model_parallel(model, mesh, cfg) apply_pp (keep this pipeline rank's layers) -> apply_tp
                                         (+ SP) -> apply_ep; returns the stage layout and the
                                         vocab-parallel loss (None without TP)
  build_pipeline(...)                    PipelineRunner under pp > 1
  build_data_parallel(model, mesh, ...)  GradReducer + torch AdamW, or the ZeRO-1 optimizer;
                                         after the model is on its device and in its final form
                                         (ZeRO-1 turns the parameters into views of flat buffers)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.parallel.data import GradReducer
from megamoe.parallel.zero import ZeroOptimizer
from megamoe.parallel.launch import device_for, init_distributed, resolve_backend
from megamoe.parallel.mesh import ParallelMesh, make_layout
from megamoe.parallel.parallelize import check_model_config, parallelize_model
from megamoe.parallel.pipeline import apply_pp
from megamoe.parallel.pipeline_runner import PipelineRunner
from megamoe.training.optim import build_optimizer


@dataclass
class MeshSetup:
    mesh: ParallelMesh
    device: torch.device
    sequence_parallel: bool


def build_mesh(cfg, verbose: bool = True) -> MeshSetup:
    pcfg = cfg.parallel
    env = init_distributed(pcfg)
    world, rank = dist.get_world_size(), dist.get_rank()
    if pcfg.virtual_pp > 1 and pcfg.pp == 1:
        raise ValueError("parallel.virtual_pp > 1 needs parallel.pp > 1")
    layout = make_layout(world, pcfg.tp, pcfg.pp, pcfg.dp, pcfg.ep, pcfg.etp)
    mesh = ParallelMesh(layout, rank, timeout_s=pcfg.timeout_s)
    sp = pcfg.sequence_parallel and mesh.tp > 1
    check_model_config(cfg, mesh, sp)
    if verbose and rank == 0:
        print(f"megamoe: parallel layout (sequence_parallel={sp}, zero1={pcfg.zero1})\n"
              + mesh.describe(), flush=True)
    return MeshSetup(mesh, device_for(env, resolve_backend(pcfg.backend)), sp)


def apply_model_parallel(model, setup: MeshSetup, cfg):
    """(chunk_layers, loss_fn) after trimming and sharding `model` in place."""
    mesh = setup.mesh
    chunk_layers = apply_pp(model, mesh.rank_in("pp"), mesh.pp, cfg.parallel.virtual_pp, cfg.parallel.pp_layout)
    model, loss_fn = parallelize_model(model, mesh, setup.sequence_parallel,
                                       cfg.parallel.ep_overlap_chunks)
    return chunk_layers, loss_fn


def build_pipeline(model, setup: MeshSetup, chunk_layers, cfg, dtype: torch.dtype) -> PipelineRunner | None:
    mesh = setup.mesh
    if mesh.pp == 1:
        return None
    seq_per_rank = cfg.model.seq_length // mesh.tp if setup.sequence_parallel else cfg.model.seq_length
    runner = PipelineRunner(model, mesh, chunk_layers, cfg.micro_batch_size, seq_per_rank, dtype)
    runner.check_num_micro(cfg.global_batch_size // (cfg.micro_batch_size * mesh.dp))
    return runner


def build_data_parallel(model, mesh: ParallelMesh, optim_cfg, zero1: bool, bucket_numel: int | None = None,
                        overlap: bool = True):
    """(optimizer, grads): grads has no_sync(), reduce_grads() and grad_norm(). Call after the
    model is on its device and in its final form, and after build_pipeline (ZeRO-1 turns the
    parameters into views of flat buffers; both hook every parameter and need the pipeline's
    late-gradient marks). bucket_numel: elements per gradient bucket (all-reduce, or ZeRO-1
    reduce-scatter and parameter all-gather); default (None or 0) DEFAULT_BUCKET_NUMEL.
    overlap: reduce each bucket as soon as its gradients are final in the last backward."""
    kwargs = {"overlap": overlap} if not bucket_numel else {"bucket_numel": bucket_numel, "overlap": overlap}
    if zero1:
        if optim_cfg.impl == "apex":
            raise ValueError("optim.impl apex does not combine with parallel.zero1 (ZeRO-1 steps "
                             "torch AdamW on its fp32 shards); use optim.impl torch")
        opt = ZeroOptimizer(model, optim_cfg, mesh, **kwargs)
        return opt, opt
    reducer = GradReducer(model, mesh, **kwargs)
    return build_optimizer(model, optim_cfg), reducer


__all__ = ["MeshSetup", "build_mesh", "apply_model_parallel", "build_pipeline", "build_data_parallel"]
