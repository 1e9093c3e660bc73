"""The build pipeline (megamoe/training/build.py): one path for one process and for many, the
Trainer without context branches, and FP8 wiring tested with a Transformer Engine stand-in
(tests/fakes/transformer_engine) under one process and under DP2 x EP2 with ZeRO-1."""

import os
import re
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe.ops import optional
from megamoe.training.build import build_training
from megamoe.training.context import LocalContext
from megamoe.training.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "parallel"))
import parallel_harness as H  # noqa: E402

FAKES = os.path.join(os.path.dirname(HERE), "fakes")


def test_trainer_has_no_context_branches():
    src = open(os.path.join(os.path.dirname(os.path.dirname(HERE)), "megamoe", "training", "trainer.py")).read()
    assert not re.search(r"if (self\.)?ctx\b|ctx is (not )?None|ctx else|self\.pipeline", src)


def test_single_process_gets_the_local_context_and_same_protocol():
    from megamoe.parallel.context import ParallelContext
    run = build_training(H.tiny_cfg(dtype="fp32"), device=torch.device("cpu"), verbose=False)
    assert isinstance(run.ctx, LocalContext)
    protocol = {n for n in dir(ParallelContext) if not n.startswith("_")} - {"layout"}
    assert protocol <= {n for n in dir(run.ctx) if not n.startswith("_")} | {"mesh", "grads", "pipeline"}


def _drop_te_modules():
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        del sys.modules[name]


@pytest.fixture
def fake_te(monkeypatch):
    """The stand-in importable as transformer_engine for this test only (forked workers
    inherit it); afterwards neither the path nor the imported modules are left behind."""
    if optional.available()["transformer_engine"]:
        pytest.skip("the real transformer_engine is installed (the GPU test covers it)")
    monkeypatch.syspath_prepend(FAKES)
    _drop_te_modules()
    import transformer_engine.pytorch as te
    te.STATE.update(depth=0, calls_in_fp8=0, recomputes_in_fp8=0)
    yield te
    _drop_te_modules()


def fp8_cfg(out_dir, **parallel):
    cfg = H.tiny_cfg(out_dir, dtype="bf16", **parallel)
    cfg.fp8, cfg.activation_checkpointing, cfg.steps = True, True, 3
    cfg.model.moe.num_shared_experts, cfg.model.moe.shared_expert_gate = 1, True   # a Linear(d, 1)
    return cfg


def train_and_compare(cfg):
    """(TE linears, params before, trainer after training cfg.steps steps)."""
    run = build_training(cfg, verbose=False)
    te_linears = [n for n, m in run.model.named_modules() if type(m).__module__ == "transformer_engine.pytorch"]
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainer = Trainer(run, H.synthetic_ds())
    trainer.train()
    return te_linears, before, trainer


def test_fp8_swaps_eligible_linears_and_recomputes_inside_fp8(fake_te, tmp_path):
    te_linears, before, trainer = train_and_compare(fp8_cfg(str(tmp_path)))
    model = trainer.model
    # attention and shared-expert projections swapped; the head and the width-1 gate are not
    assert any(n.endswith("attn.q_proj") for n in te_linears) and any("shared_experts" in n for n in te_linears)
    assert type(model.lm_head) is nn.Linear
    assert all(type(m.shared_expert_gate) is nn.Linear for m in model.moe_layers())
    assert fake_te.STATE["recomputes_in_fp8"] > 0          # TE's checkpoint did the recompute
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters never stepped: {unchanged}"


def _fp8_worker(rank, world_size, out_dir):
    cfg = fp8_cfg(out_dir, ep=2, zero1=True)
    te_linears, before, trainer = train_and_compare(cfg)
    model = trainer.model
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    te_params = {n: p.detach().clone() for n, p in model.named_parameters()
                 if n.rsplit(".", 1)[0] in te_linears}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, te_params)
    path = trainer.save()
    return {"te_linears": te_linears, "unchanged": unchanged, "te_params": everyone, "ckpt": path}


def test_fp8_under_dp2_ep2_zero1_trains_reduces_and_checkpoints_every_te_parameter(fake_te, tmp_path):
    """The bug this guards: TE linears swapped in after ZeRO-1 had flattened the old ones were
    never reduced, stepped or checkpointed."""
    from megamoe.checkpoint.consolidate import consolidate
    out = H.spawn(2, _fp8_worker, str(tmp_path))
    assert out["te_linears"] and not out["unchanged"], out["unchanged"]
    rank0, rank1 = out["te_params"]
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:   # data-parallel replicas saw different data: equal only if reduced
        assert torch.equal(rank0[name], rank1[name]), name
    full = consolidate(out["ckpt"])
    for name, value in rank0.items():
        assert torch.equal(full[name], value), name


@pytest.mark.gpu
def test_fp8_with_transformer_engine_trains_every_parameter(tmp_path):
    """Real Transformer Engine on a GPU: FP8 linears (with TE's recompute) train, and every
    parameter, swapped or not, is stepped."""
    pytest.importorskip("transformer_engine")
    te_linears, before, trainer = train_and_compare(fp8_cfg(str(tmp_path)))
    assert te_linears and trainer.device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters never stepped: {unchanged}"


def _zero1_bf16_cast_cache(rank, world_size):
    cfg = H.tiny_cfg("/tmp/megamoe-cast-cache", dtype="bf16", ep=2, zero1=True)
    cfg.steps = 2
    trainer = Trainer(build_training(cfg, verbose=False), H.synthetic_ds())
    trainer.train()
    stale = []
    for layer in trainer.model.moe_layers():
        ex = layer.experts
        for name in ("w_gate_up", "w_down"):
            if not torch.equal(ex.compute_weight(name, torch.bfloat16), getattr(ex, name).detach().to(torch.bfloat16)):
                stale.append(name)
    return stale


def test_cached_bf16_expert_weights_follow_zero1_updates():
    """ZeRO-1 writes the parameters through its flat buffers (their version counters do not
    move); the trainer marks them updated, so the experts' bf16 copies are refreshed."""
    assert H.spawn(2, _zero1_bf16_cast_cache) == []
