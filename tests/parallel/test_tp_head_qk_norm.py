"""Per-head QK-norm (Qwen3, model.qk_norm_scope head) under tensor parallelism: each TP rank
normalises its own heads with full copies of the head_dim norms, whose gradients are partial
sums over the rank's heads (reduced over TP with the other TP-partial parameters). TP2 with
sequence parallelism x EP2 trains like one process: 20 steps in fp64, losses and final
parameters within 1e-9 (see test_parallel_equivalence for the tolerance)."""


import torch

import parallel_harness as H

TOL = 1e-9


def _cfg(out_dir, **parallel):
    cfg = H.tiny_cfg(out_dir, **parallel)
    cfg.model.qk_norm_scope = "head"
    return cfg


def _worker(rank, world, out_dir):
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    cfg = _cfg(out_dir, tp=2, ep=2, sequence_parallel=True)
    trainer = Trainer(build_training(cfg, verbose=False), H.synthetic_ds())
    attn = trainer.model.layers["0"].attn
    assert attn.per_head_norm and attn.q_norm.weight.shape == (cfg.model.d_model // cfg.model.num_heads,)
    losses = [h["loss"] for h in trainer.train()]
    return losses, H.gather_full_params(trainer.model)


def test_per_head_qk_norm_under_tp2_sp_matches_one_process(tmp_path):
    ref_losses, ref_params = H.train_reference(_cfg(str(tmp_path / "ref")))
    losses, params = H.spawn(2, _worker, str(tmp_path / "tp2"))
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < TOL, (losses, ref_losses)
    assert set(params) == set(ref_params)
    for name, ref in ref_params.items():
        assert (params[name] - ref).abs().max().item() < TOL, name
    q_norm = "layers.0.attn.q_norm.weight"
    assert q_norm in params and not torch.equal(ref_params[q_norm], torch.ones_like(ref_params[q_norm]))
