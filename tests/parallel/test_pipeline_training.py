"""Acceptance: pipeline parallelism composed with TP (+SP), DP (ZeRO-1) and EP trains exactly like
one process (fp64 on CPU with gloo, tolerance 1e-9; bf16 autocast for PP2xEP2), through the same `megamoe train` code path (build_training
+ Trainer).

20 steps of the tiny MoE of parallel_harness with 4 layers (8 for the interleaved PP4 run): the
per-step losses and validation losses within 1e-5 of the single-process run, and the parameters
after training equal. One spawn per world size trains all of that size's configurations.
"""

import copy
import os

import pytest
import torch

import parallel_harness as H

# label -> (world size, layers, tied embeddings, parallel settings)
CONFIGS = {
    "pp2":                  (2, 4, False, dict(pp=2)),
    "pp2_tied_uneven":      (2, 4, True, dict(pp=2, pp_layout="1,3")),
    "pp4_vpp2":             (4, 8, False, dict(pp=4, virtual_pp=2)),
    "pp2xtp2_sp":           (4, 4, False, dict(pp=2, tp=2, sequence_parallel=True)),
    "pp2xep2xdp2_zero1":    (4, 4, True, dict(pp=2, ep=2, zero1=True)),
    "tp2xpp2xep2_sp_zero1": (8, 4, False, dict(tp=2, pp=2, ep=2, sequence_parallel=True, zero1=True)),
    "bf16_pp2xep2":         (4, 4, False, dict(pp=2, ep=2, dtype="bf16")),
}
EVAL_INTERVAL = 10
RESHARD_LABEL, RESHARD_AT = "tp2xpp2xep2_sp_zero1", 15   # saved there, resumed under other layouts
LOSS_TOL, PARAM_TOL = 1e-9, 1e-9   # fp64: see test_parallel_equivalence's docstring


def make_cfg(out_dir, layers, tied, dtype="fp64", **parallel):
    cfg = H.tiny_cfg(out_dir, dtype, **parallel)
    cfg.model.num_layers, cfg.model.tie_embeddings = layers, tied
    cfg.eval_interval, cfg.eval_iters = EVAL_INTERVAL, 2
    return cfg


def valid_ds():
    return H.synthetic_ds(16)


def reference_run(layers, tied, dtype="fp64"):
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    cfg = make_cfg("/tmp/megamoe-pp-reference", layers, tied, dtype)
    run = build_training(cfg, device=torch.device("cpu"), verbose=False)
    model = run.model
    trainer = Trainer(run, H.synthetic_ds(), valid_ds())
    trainer.save = lambda: None
    hist = trainer.train()
    return hist, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_pipeline_configs(rank, world_size, runs, out_root):
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training

    results = {}
    for label, (layers, tied, par) in runs:
        cfg = make_cfg(os.path.join(out_root, label), layers, tied, **par)   # par may name a dtype
        run = build_training(cfg, verbose=False)
        model = run.model
        trainer = Trainer(run, H.synthetic_ds(), valid_ds())
        if label == RESHARD_LABEL:
            cfg.save_interval = RESHARD_AT
        else:
            trainer.save = lambda: None
        hist = trainer.train()
        full = H.gather_full_params(model)
        if rank == 0:
            results[label] = (hist, full)
    return results


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(layers, tied, dtype="fp64"):
        if (layers, tied, dtype) not in cache:
            cache[(layers, tied, dtype)] = reference_run(layers, tied, dtype)
        return cache[(layers, tied, dtype)]
    return get


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache: dict[int, dict] = {}
    root = str(tmp_path_factory.mktemp("pp"))

    def get(world: int) -> dict:
        if world not in cache:
            runs = [(label, (layers, tied, par)) for label, (w, layers, tied, par) in CONFIGS.items()
                    if w == world]
            cache[world] = H.spawn(world, train_pipeline_configs, runs, root)
        return cache[world]
    get.root = root
    return get


@pytest.mark.parametrize("label", [label for label in CONFIGS if not label.startswith("bf16")])
def test_pipeline_matches_single_process(label, references, results):
    world, layers, tied, _ = CONFIGS[label]
    ref_hist, ref_params = references(layers, tied)
    hist, params = results(world)[label]
    assert len(hist) == len(ref_hist) == H.STEPS
    for key in ("loss", "lb_loss", "z_loss"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(hist, ref_hist)]
        assert max(diffs) < LOSS_TOL, f"{label}: per-step {key} differences {diffs}"
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(hist, ref_hist) if "val_loss" in b]
    assert len(val) == H.STEPS // EVAL_INTERVAL
    assert max(abs(a - b) for a, b in val) < LOSS_TOL, f"{label}: validation losses {val}"
    # expert load of every MoE layer (all stages) reaches the log
    torch.testing.assert_close(torch.tensor(hist[-1]["expert_load"]), torch.tensor(ref_hist[-1]["expert_load"]),
                               atol=1e-4, rtol=0)
    assert set(params) == set(ref_params) | ({"lm_head.weight"} if tied else set())
    for name, ref in ref_params.items():
        err = (params[name] - ref).abs().max().item()
        assert err < PARAM_TOL, f"{label}: {name} differs by {err}"
    if tied:   # the head's copy on the last stage stayed equal to the embedding
        torch.testing.assert_close(params["lm_head.weight"], params["embed.weight"], atol=PARAM_TOL, rtol=0)
    assert ref_hist[-1]["loss"] < ref_hist[0]["loss"]


def test_bf16_pp2xep2_matches_single_process_bf16(references, results):
    """bf16 autocast, PP2 x EP2 (x DP2) against one bf16 process, within the bounds derived at
    test_parallel_equivalence.assert_bf16_close."""
    from test_parallel_equivalence import assert_bf16_close
    ref_hist, _ = references(4, False, "bf16")
    hist, params = results(4)["bf16_pp2xep2"]
    assert_bf16_close([h["loss"] for h in hist], [h["loss"] for h in ref_hist])
    assert all(p.dtype == torch.float32 for p in params.values())
    assert hist[-1]["loss"] < hist[0]["loss"]


def resume_losses(rank, world_size, ckpt_dir, out_dir, parallel):
    """Load the sharded checkpoint into a run with another layout; train to the end."""
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training

    cfg = make_cfg(out_dir, 4, False, **parallel)
    trainer = Trainer(build_training(cfg, verbose=False), H.synthetic_ds(), valid_ds())
    trainer.save = lambda: None
    trainer.load(ckpt_dir)
    return [h["loss"] for h in trainer.train()]


def test_tp2xpp2xep2_checkpoint_resumes_under_ep4_and_in_one_process(results, tmp_path):
    """Save under TP2 x PP2 x EP2 (8 ranks, ZeRO-1, SP); load under TP1 x EP4 x PP1 (4 ranks,
    plain AdamW) and in one process: the next steps equal the uninterrupted run's."""
    from megamoe.model.transformer import build_model
    from megamoe import checkpoint as ckpt
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training

    hist, _ = results(8)[RESHARD_LABEL]
    expected = [h["loss"] for h in hist[RESHARD_AT:]]
    ckpt_dir = os.path.join(results.root, RESHARD_LABEL, ckpt.CKPT_DIR, f"step_{RESHARD_AT:08d}")
    ep4 = H.spawn(4, resume_losses, ckpt_dir, str(tmp_path / "ep4"), dict(ep=4))
    cfg = make_cfg(str(tmp_path / "single"), 4, False)
    single = Trainer(build_training(cfg, build_model(cfg.model, seed=cfg.seed), device=torch.device("cpu"), verbose=False), H.synthetic_ds(), valid_ds())
    single.save = lambda: None
    single.load(ckpt_dir)
    one = [h["loss"] for h in single.train()]
    for what, losses in (("EP4", ep4), ("one process", one)):
        assert len(losses) == len(expected) == H.STEPS - RESHARD_AT
        diffs = [abs(a - b) for a, b in zip(losses, expected)]
        assert max(diffs) < LOSS_TOL, f"{what}: loss differences {diffs}"


def test_interleaved_needs_micro_batches_multiple_of_pp():
    from megamoe.parallel.pipeline import schedule
    with pytest.raises(ValueError, match="multiple of parallel.pp"):
        schedule(4, 2, 6, 0)


def test_bad_layout_is_a_one_line_error():
    from megamoe.model.transformer import build_model
    from megamoe.parallel.pipeline import apply_pp
    cfg = make_cfg("/tmp/x", 4, False)
    with pytest.raises(ValueError, match="must add up to model.num_layers"):
        apply_pp(build_model(copy.deepcopy(cfg.model)), 0, 2, 1, "1,1")
