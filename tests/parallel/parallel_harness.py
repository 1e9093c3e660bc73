"""Helpers for the distributed CPU tests: spawn gloo process groups, a tiny MoE config,
synthetic data, and a worker that trains several parallel configurations in one spawn.

Each spawned process runs `fn(rank, world_size, *args)` with the default gloo group already
initialised; whatever rank 0 returns is handed back to the test (through a file).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import preset
from megamoe.parallel.spawn import spawn  # noqa: F401 (the tests call H.spawn)

STEPS = 20
VOCAB, SEQ = 256, 32


# ------------------------------------------------------------------------------ model + data

def tiny_cfg(out_dir: str = "/tmp/megamoe-test", dtype: str = "fp64", **parallel):
    """A small MoE (2 layers, d 64, 8 experts top-2, QK-norm) trained for STEPS steps, in fp64 by
    default: a parallel layout then matches one process to ~1e-12 (reduction order is the only
    difference), so the tests can use tolerances of ~1e-9 that no rounding noise can reach."""
    cfg = preset("tiny")
    cfg.dtype = dtype
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = VOCAB, 64, 2, 4, 2
    m.ffn_hidden, m.seq_length, m.qk_norm = 128, SEQ, True
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = 8, 2, 32
    m.moe.first_k_dense = 0
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = STEPS, 2, 8
    cfg.optim.warmup_steps, cfg.optim.lr = 5, 3e-3
    cfg.eval_interval, cfg.save_interval, cfg.log_interval = 0, 0, 0
    cfg.out_dir, cfg.resume, cfg.progress = out_dir, False, False
    cfg.tensorboard, cfg.watchdog_s = False, 0
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def synthetic_ds(n: int = 256):
    """Learnable sequences: arithmetic progressions mod VOCAB with a random start and stride."""
    rng = np.random.default_rng(0)
    t = np.arange(SEQ + 1)
    return [(rng.integers(0, VOCAB) + rng.integers(1, 4) * t) % VOCAB for _ in range(n)]


def train_reference(cfg):
    """Single-process run: (per-step losses, {name: final param})."""
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    run = build_training(cfg, device=torch.device("cpu"), verbose=False)
    model = run.model
    trainer = Trainer(run, synthetic_ds())
    trainer.save = lambda: None
    hist = trainer.train()
    return [h["loss"] for h in hist], {n: p.detach().clone() for n, p in model.named_parameters()}


def parallel_model_step_inputs(cfg, rank: int, world: int, parallel: dict):
    """(model, loss_fn, moe layers, one micro-batch [mbs, SEQ+1]) of cfg.model in fp64, sharded
    by `parallel` (make_layout's arguments + sequence_parallel), in train mode; the batch is
    seeded by the DP rank (TP / EP peers of one DP rank see the same tokens)."""
    import torch.nn.functional as F

    from megamoe.model.transformer import build_model
    from megamoe.moe.layer import MoELayer
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    from megamoe.parallel.parallelize import parallelize_model

    parallel = dict(parallel)
    sp = parallel.pop("sequence_parallel", False)
    mesh = ParallelMesh(make_layout(world, **parallel), rank)
    model = build_model(cfg.model, seed=cfg.seed).double()
    model, loss_fn = parallelize_model(model, mesh, sequence_parallel=sp)
    loss_fn = loss_fn or (lambda logits, labels: F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    model.train()
    moes = [m for m in model.modules() if isinstance(m, MoELayer)]
    gen = torch.Generator().manual_seed(3 + mesh.rank_in("dp"))
    data = torch.randint(0, VOCAB, (cfg.micro_batch_size, SEQ + 1), generator=gen)
    return model, loss_fn, moes, data


def gather_full_params(model) -> dict[str, torch.Tensor] | None:
    """Reassemble every parameter from all ranks' shards (on rank 0; None elsewhere)."""
    from megamoe.parallel.params import get_spec, place_shard

    local = {n: (p.detach().clone(), get_spec(p)) for n, p in model.named_parameters()}
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    if dist.get_rank() != 0:
        return None
    full = {}
    for shards in everything:
        for name, (t, spec) in shards.items():
            if name not in full:
                full[name] = torch.zeros(spec.global_shape, dtype=t.dtype)
            place_shard(full[name], t, spec.index)
    return full


# ----------------------------------------------------------------------------- the workers

def train_configs(rank, world_size, runs: list[tuple[str, dict]], out_root: str):
    """For each (label, parallel settings [+ "dtype"]): train STEPS steps, gather the params.
    Returns {label: (losses, full params, extra)} on rank 0. Labels listed in RESUME_CHECK also
    save at step STEPS//2 and are then resumed from that checkpoint in fresh objects; extra
    holds the resumed run's losses and the checkpoint's file names."""
    from megamoe import checkpoint as ckpt
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    def build(cfg):
        return Trainer(build_training(cfg, verbose=False), synthetic_ds())

    results = {}
    for label, par in runs:
        par = dict(par)
        recompute = par.pop("recompute", None)          # "selective" | "full": with recompute
        cfg = tiny_cfg(os.path.join(out_root, label), par.pop("dtype", "fp64"), **par)
        if recompute:
            cfg.activation_checkpointing, cfg.recompute = True, recompute
        resume_check = label in RESUME_CHECK
        if resume_check:
            cfg.save_interval = STEPS // 2
        trainer = build(cfg)
        hist = trainer.train()
        full = gather_full_params(trainer.model)
        extra = {"grad_norm": [h["grad_norm"] for h in hist]}
        if resume_check:
            half = os.path.join(cfg.out_dir, ckpt.CKPT_DIR, f"step_{STEPS // 2:08d}")
            extra["ckpt_files"] = os.listdir(half)
            again = build(cfg)
            again.load(half)
            extra["resumed_losses"] = [h["loss"] for h in again.train()]
        if rank == 0:
            results[label] = ([h["loss"] for h in hist], full, extra)
    return results


RESUME_CHECK = {"tp2xdp2xep2_sp_zero1"}
