"""Acceptance: every parallel composition trains exactly like one process (fp32, CPU, gloo).

20 steps of a tiny MoE (2 layers, d 64, 8 experts top-2, QK-norm, GQA, seq 32, global batch 8,
micro-batch 2): per-step losses within 1e-5 of the single-process run with the same gradient
accumulation, and the parameters after training (shards gathered) equal too.
One spawn per world size trains all of that size's configurations in sequence; the
single-process reference runs once per module.
"""

import pytest
import torch

import parallel_harness as H

# label -> (world size, parallel settings). "edp2xep2" is DP2xEP2 over 4 ranks: attention DP 4,
# experts split in 2 and replicated twice (expert-DP 2).
CONFIGS = {
    "dp2":              (2, dict()),
    "dp2_zero1":        (2, dict(zero1=True)),
    "tp2":              (2, dict(tp=2)),
    "tp2_sp":           (2, dict(tp=2, sequence_parallel=True)),
    "ep2":              (2, dict(ep=2)),
    "tp2xep2_sp":       (2, dict(tp=2, ep=2, sequence_parallel=True)),
    "tp2xetp2":         (2, dict(tp=2, etp=2)),
    "ep4":              (4, dict(ep=4)),
    "edp2xep2":         (4, dict(ep=2)),
    "edp2xep2_zero1":   (4, dict(ep=2, zero1=True)),
    "tp2xdp2xep2":      (4, dict(tp=2, ep=2)),
    "tp2xdp2xep2_sp_zero1": (4, dict(tp=2, ep=2, sequence_parallel=True, zero1=True)),
    "tp2xdp2xep2xetp2_sp_zero1": (4, dict(tp=2, ep=2, etp=2, sequence_parallel=True, zero1=True)),
    "tp2xdp4xep4_sp_zero1": (8, dict(tp=2, ep=4, sequence_parallel=True, zero1=True)),
}

LOSS_TOL = 1e-5
PARAM_TOL = 5e-5   # Adam normalises updates, so last-bit gradient differences show up ~1e-5


@pytest.fixture(scope="module")
def reference():
    return H.train_reference(H.tiny_cfg())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{world size: {label: (losses, params, extra)}}, filled one spawn per world size."""
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            runs = [(label, par) for label, (w, par) in CONFIGS.items() if w == world]
            cache[world] = H.spawn(world, H.train_configs, runs,
                                   str(tmp_path_factory.mktemp(f"world{world}")))
        return cache[world]
    return get


@pytest.mark.parametrize("label", list(CONFIGS))
def test_matches_single_process(label, reference, results):
    world, _ = CONFIGS[label]
    ref_losses, ref_params = reference
    losses, params, _ = results(world)[label]
    assert len(losses) == len(ref_losses) == H.STEPS
    diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
    assert max(diffs) < LOSS_TOL, f"{label}: per-step loss differences {diffs}"
    assert set(params) == set(ref_params)
    for name, ref in ref_params.items():
        assert params[name].shape == ref.shape, name
        err = (params[name] - ref).abs().max().item()
        assert err < PARAM_TOL, f"{label}: {name} differs by {err}"
    assert ref_losses[-1] < ref_losses[0]   # and it did learn something


def test_resume_from_parallel_checkpoint(results):
    """The world-4 spawn also resumed tp2xdp2xep2_sp_zero1 from its step-10 sharded checkpoint:
    steps 11..20 must reproduce the uninterrupted run bit for bit."""
    losses, _, extra = results(4)["tp2xdp2xep2_sp_zero1"]
    assert extra["resumed_losses"] == losses[10:]
    assert sorted(extra["ckpt_files"]) == sorted(
        ["config.yaml", "metadata.json", "trainer.pt"] + [f"model_rank{r}.pt" for r in range(4)]
        + [f"optim_rank{r}.pt" for r in range(4)])
