"""Predicted expert-parallel all-to-all bytes equal benchmarks/ep_alltoall_bytes.py's counters.

The router is made balanced in the planner's sense: the tokens of a rank cycle through all
C(E, K) expert subsets (each equally often, so every expert gets the same load and the number of
(token, remote EP rank) pairs is exactly tokens * remote_ranks_per_token). One fp32 training step
of the benchmark's tiny MoE runs on real gloo ranks, counted by the benchmark's own ByteMeter
(all_to_all_single wrapped: bytes sent off-rank, per phase); every rank's counters must equal
megamoe.plan.comm.ep_bytes_per_layer x MoE layers, byte for byte.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from math import comb

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.parallel.spawn import spawn
from megamoe.plan.comm import ep_bytes_per_layer, remote_ranks_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, MICRO = 28, 2                     # 56 tokens per rank: a multiple of C(8, 2) = 28 and C(8, 3) = 56


def _bench():
    spec = importlib.util.spec_from_file_location("ep_alltoall_bytes", os.path.join(ROOT, "benchmarks",
                                                                                    "ep_alltoall_bytes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def balance_router(router, num_experts: int, top_k: int) -> None:
    """Token i of every micro-batch picks the (i mod C(E, K))-th K-subset of the experts; the
    routing weights are the router's probabilities there (gradients still flow)."""
    subsets = torch.tensor(list(itertools.combinations(range(num_experts), top_k)))
    inner = router.forward

    def forward(x):
        out = inner(x)
        idx = subsets[torch.arange(x.shape[0]) % len(subsets)].to(out.topk_idx.dtype)
        out.topk_idx = idx
        out.topk_weight = out.probs.gather(1, idx.long()).to(out.topk_weight.dtype)
        return out

    router.forward = forward


def _worker(rank, world, ep, top_k):
    from megamoe.moe.layer import MoELayer
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    from megamoe.parallel.parallelize import parallelize_model
    from megamoe.parallel.setup import build_data_parallel
    from megamoe.model.transformer import build_model

    bench = _bench()
    cfg = bench.tiny_cfg(top_k=top_k, seq=SEQ, micro_batch=MICRO)
    mesh = ParallelMesh(make_layout(world, ep=ep), rank)
    model, _ = parallelize_model(build_model(cfg.model, seed=cfg.seed), mesh)
    for moe in [m for m in model.modules() if isinstance(m, MoELayer)]:
        balance_router(moe.router, cfg.model.moe.num_experts, top_k)
    optimizer, grads = build_data_parallel(model, mesh, cfg.optim, zero1=False)
    meter = bench.ByteMeter()
    meter.install_dispatchers(model, torch.float32)
    meter.install_collective()
    try:
        data = torch.randint(0, cfg.model.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(rank))
        meter.phase = "fwd"
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        meter.phase = "bwd"
        loss.backward()
        meter.phase = "optim"
        grads.reduce_grads()
        optimizer.step()
    finally:
        meter.uninstall_collective()
    everyone = [None] * world
    dist.all_gather_object(everyone, meter.snapshot())
    return everyone, cfg.model.num_layers, cfg.model.d_model


@pytest.mark.parametrize("world,ep,top_k", [(2, 2, 2), (4, 4, 2), (4, 2, 3)])
def test_predicted_alltoall_bytes_equal_the_benchmark_counters(world, ep, top_k):
    per_rank, layers, hidden = spawn(world, _worker, ep, top_k)
    experts, tokens = 8, SEQ * MICRO
    assert tokens % comb(experts, top_k) == 0
    pred = ep_bytes_per_layer(tokens, hidden, experts, top_k, ep, 1, compute_bytes=4, accum_bytes=4)
    pairs = tokens * remote_ranks_per_token(experts, top_k, ep)
    assert pairs.denominator == 1 and pairs > 0
    for snap in per_rank:
        assert snap["remote_pairs"] == layers * pairs        # the benchmark's own pair count
        assert snap["rows"] == {"fwd": layers * pred.rows_fwd, "bwd": layers * pred.rows_bwd}
        assert snap["meta"] == {"fwd": layers * (pred.ids_fwd + pred.weights_fwd), "bwd": layers * pred.weights_bwd}
        assert snap["counts"] == {"fwd": layers * pred.counts_fwd}
        assert snap["other"] == {}
