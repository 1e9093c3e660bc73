"""setup_parallel_training(cfg) -> (ctx, model, optimizer, device): what `megamoe train` calls
when WORLD_SIZE > 1 (megamoe/training/run.py).

Order: start torch.distributed (launch.py) -> rank grid and groups (mesh.py) -> build the plain
model identically on every rank -> apply_pp (keep this pipeline rank's layers, pipeline.py)
-> apply_tp, apply_ep (parallelize.py) -> move to the device -> PipelineRunner (pp > 1)
-> data parallel: GradReducer + torch AdamW, or ZeroOptimizer (data.py) -> ParallelContext.
"""

from __future__ import annotations

import torch.distributed as dist

from megamoe.config import validate
from megamoe.model.transformer import build_model
from megamoe.parallel.context import ParallelContext
from megamoe.parallel.data import GradReducer, ZeroOptimizer
from megamoe.parallel.launch import device_for, init_distributed, resolve_backend
from megamoe.parallel.mesh import ParallelMesh, make_layout
from megamoe.parallel.parallelize import check_model_config, parallelize_model
from megamoe.parallel.pipeline import apply_pp
from megamoe.parallel.pipeline_runner import PipelineRunner
from megamoe.training.optim import build_optimizer


def build_data_parallel(model, mesh: ParallelMesh, optim_cfg, zero1: bool, bucket_numel: int | None = None):
    """(optimizer, grads): grads has reduce_grads() and grad_norm(). Call after the model is on
    its device (ZeRO-1 turns the parameters into views of flat buffers)."""
    if zero1:
        opt = ZeroOptimizer(model, optim_cfg, mesh)
        return opt, opt
    reducer = GradReducer(model, mesh) if bucket_numel is None else GradReducer(model, mesh, bucket_numel)
    return build_optimizer(model, optim_cfg), reducer


def setup_parallel_training(cfg, verbose: bool = True):
    pcfg = cfg.parallel
    env = init_distributed(pcfg)
    world, rank = dist.get_world_size(), dist.get_rank()
    validate(cfg, world_size=world)
    if pcfg.virtual_pp > 1 and pcfg.pp == 1:
        raise ValueError("parallel.virtual_pp > 1 needs parallel.pp > 1")
    layout = make_layout(world, pcfg.tp, pcfg.pp, pcfg.dp, pcfg.ep, pcfg.etp)
    mesh = ParallelMesh(layout, rank, timeout_s=pcfg.timeout_s)
    sp = pcfg.sequence_parallel and mesh.tp > 1
    check_model_config(cfg, mesh, sp)
    if verbose and rank == 0:
        print(f"megamoe: parallel layout (sequence_parallel={sp}, zero1={pcfg.zero1})\n"
              + mesh.describe(), flush=True)
    device = device_for(env, resolve_backend(pcfg.backend))
    model = build_model(cfg.model, seed=cfg.seed)   # identical on every rank, then sharded
    chunk_layers = apply_pp(model, mesh.rank_in("pp"), mesh.pp, pcfg.virtual_pp, pcfg.pp_layout)
    model, loss_fn = parallelize_model(model, mesh, sp)
    model.to(device)
    pipeline = None
    if mesh.pp > 1:
        seq_per_rank = cfg.model.seq_length // mesh.tp if sp else cfg.model.seq_length
        pipeline = PipelineRunner(model, mesh, chunk_layers, cfg.micro_batch_size, seq_per_rank)
        pipeline.check_num_micro(cfg.global_batch_size // (cfg.micro_batch_size * mesh.dp))
    optimizer, grads = build_data_parallel(model, mesh, cfg.optim, pcfg.zero1)
    ctx = ParallelContext(mesh, grads, loss_fn, zero1=pcfg.zero1, sequence_parallel=sp, pipeline=pipeline)
    return ctx, model, optimizer, device


__all__ = ["setup_parallel_training", "build_data_parallel"]
