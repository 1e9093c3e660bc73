"""The planner's parameter / gradient / optimizer bytes per rank equal the real tensors of real ranks.

Each layout is built with the project's build path (megamoe.training.build.build_training) in
real gloo processes (world <= 8, a 4-layer model with d 64), the optimizer is stepped once (so
that AdamW's state exists), and every rank reports the bytes of the distinct storages behind its
parameters, gradients and optimizer state (ZeRO-1: flat buffers incl. padding, masters, moments,
step scalars). The prediction (megamoe.plan.params) is made from the config alone. Integers,
compared exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.config import preset
from megamoe.parallel.data import DEFAULT_BUCKET_NUMEL
from megamoe.parallel.spawn import spawn
from megamoe.plan.layouts import layout_of
from megamoe.plan.params import stage_params, state_bytes


def small_cfg(tie: bool = False, shared: bool = False, global_batch: int = 8, **parallel):
    """4 layers (pp2 x vpp2 possible), 8 experts top-2, GQA, QK-norm; fp32 on CPU."""
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 256, 64, 4, 4, 2
    m.ffn_hidden, m.seq_length, m.qk_norm, m.tie_embeddings = 128, 16, True, tie
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = 8, 2, 32
    if shared:   # a dense first layer (TP-sharded SwiGLU), shared experts, qkv biases
        m.moe.first_k_dense, m.moe.num_shared_experts, m.qkv_bias = 1, 1, True
    cfg.dtype, cfg.micro_batch_size, cfg.global_batch_size = "fp32", 1, global_batch
    cfg.out_dir, cfg.resume, cfg.progress, cfg.tensorboard, cfg.watchdog_s = "/tmp/megamoe-plan", False, False, False, 0
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


# label -> (world, config kwargs): pp, vpp, tp (+SP), ep, etp, ZeRO-1, tied copies, shared experts
LAYOUTS = {
    "pp2_tied_zero1": (2, dict(tie=True, pp=2, zero1=True)),
    "tp2_dp2_ep2_sp_zero1_shared": (4, dict(shared=True, tp=2, ep=2, sequence_parallel=True, zero1=True)),
    "pp2x2_dp2_ep2": (4, dict(pp=2, virtual_pp=2, ep=2)),
    "dp4_ep2_etp2_zero1": (4, dict(ep=2, etp=2, zero1=True)),
    "tp2_pp2_nosp_shared": (4, dict(shared=True, tp=2, pp=2)),
    "tp2_pp2_dp2_ep2_etp2_sp_zero1": (8, dict(tp=2, pp=2, ep=2, etp=2, sequence_parallel=True, zero1=True)),
    "pp2_dp4_ep4_zero1_tied": (8, dict(tie=True, pp=2, ep=4, zero1=True)),
    # dp 3: no bucket divides evenly, so ZeRO-1 pads every flat buffer
    "dp3_zero1_padded": (3, dict(global_batch=6, zero1=True)),
    # small buckets: every (group, decay) run is cut into several padded ZeRO-1 buckets
    "dp3_zero1_small_buckets": (3, dict(global_batch=6, ep=1, zero1=True, dp_bucket_numel=5000)),
}


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _measure(rank, world, labels):
    from megamoe.parallel.zero import ZeroOptimizer
    from megamoe.training.build import build_training

    out = {}
    for label in labels:
        cfg = small_cfg(**LAYOUTS[label][1])
        run = build_training(cfg, device=torch.device("cpu"), verbose=False)
        model, opt = run.model, run.optimizer
        params = list({id(p): p for p in model.parameters()}.values())
        if isinstance(opt, ZeroOptimizer):
            opt.step()                              # grads are views of the flat buffers already
            # fp32 params are their own masters: a master on a parameter buffer is no extra memory
            own = {p.untyped_storage().data_ptr() for p in params}
            state = [b.master for b in opt.buckets if b.master.untyped_storage().data_ptr() not in own]
            state += [v for s in opt.inner.state.values() for v in s.values() if torch.is_tensor(v)]
        else:
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        mine = {"numel": sum(p.numel() for p in params), "params": _bytes(params),
                "grads": _bytes(p.grad for p in params if p.grad is not None), "optimizer": _bytes(state)}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        out[label] = everyone
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def measured():
    results = {}
    for world in sorted({w for w, _ in LAYOUTS.values()}):
        labels = [k for k, (w, _) in LAYOUTS.items() if w == world]
        results.update(spawn(world, _measure, labels))
    return results


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_predicted_state_bytes_equal_real_ranks(measured, label):
    world, kw = LAYOUTS[label]
    cfg = small_cfg(**kw)
    lay = layout_of(cfg, world)
    stages = stage_params(cfg.model, lay, cfg.parallel.pp_layout)
    for rank, real in enumerate(measured[label]):
        pp_rank = rank // (lay.tp * lay.dp)
        pred = state_bytes(stages[pp_rank], lay, param_bytes=4, master_bytes=4,
                           bucket_numel=cfg.parallel.dp_bucket_numel or DEFAULT_BUCKET_NUMEL)
        assert (stages[pp_rank].numel, pred.params, pred.grads, pred.optimizer) == \
            (real["numel"], real["params"], real["grads"], real["optimizer"]), (label, rank)


def test_layouts_cover_pp_ep_etp_zero1_tp():
    kws = [kw for _, kw in LAYOUTS.values()]
    assert len(LAYOUTS) >= 6
    for key in ("pp", "ep", "etp", "zero1", "tp", "virtual_pp", "tie"):
        assert any(kw.get(key) is True or (type(kw.get(key)) is int and kw[key] > 1) for kw in kws), key
