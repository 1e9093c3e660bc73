"""Sharded checkpoints: resharding on load, consolidation, crash safety (real gloo processes, CPU).

One 4-rank spawn trains TP2xEP2 (ZeRO-1, SP) for 15 steps saving at step 10, then, in the same
processes, resumes that checkpoint under EP4 (plain AdamW, no TP) and the single-process run's
step-10 checkpoint under TP2xEP2; then the same with tied embeddings and pipeline stages
(PP2 x DP2 ZeRO-1 saves, PP2 x TP2 loads). The pytest process resumes the sharded checkpoints
in one process, directly and through consolidation. A 2-rank spawn is SIGKILLed in the middle
of its second checkpoint. Every resume must reproduce the uninterrupted run's losses (fp64, 1e-9).
"""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import parallel_harness as H
from megamoe.cli import main as cli_main
from megamoe.model.transformer import build_model
from megamoe.checkpoint import reshard, sharded, sources
from megamoe.checkpoint.consolidate import consolidate
from megamoe.parallel.params import full_index, local_to_global_indices, sharded_index
from megamoe import checkpoint as ckpt
from megamoe.training.trainer import Trainer
from megamoe.training.build import build_training

STEPS, SAVE_AT = 15, 10
LOSS_TOL, PARAM_TOL = 1e-9, 1e-9   # fp64 (parallel_harness.tiny_cfg): reduction order only
TP2xEP2 = dict(tp=2, ep=2, zero1=True, sequence_parallel=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The single-process runs here are tiny: on a busy 2-core machine a second intra-op thread
    only spins (seconds per step instead of ~0.1 s). Spawned ranks use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg_for(out_dir: str, tied: bool = False, **parallel):
    cfg = H.tiny_cfg(out_dir, **parallel)
    cfg.steps = STEPS
    cfg.model.tie_embeddings = tied
    return cfg


def step_dir(out_dir, step: int) -> str:
    return os.path.join(str(out_dir), ckpt.CKPT_DIR, f"step_{step:08d}")


def single_trainer(cfg) -> Trainer:
    return Trainer(build_training(cfg, build_model(cfg.model, seed=cfg.seed), device=torch.device("cpu"), verbose=False), H.synthetic_ds())


def resume_single(ckpt_dir: str, out_dir: str, save_interval: int = 0, tied: bool = False) -> list[float]:
    """Load `ckpt_dir` into a fresh single-process trainer (what Trainer.load does with the
    load_training_state change) and train to STEPS."""
    cfg = cfg_for(out_dir, tied)
    cfg.save_interval = save_interval
    t = single_trainer(cfg)
    if not save_interval:
        t.save = lambda: None
    t.load_trainer_state(ckpt.load_training_state(ckpt_dir, t.model, t.optimizer))
    assert (t.model.lm_head.weight is t.model.embed.weight) == tied
    return [h["loss"] for h in t.train()]


def assert_close(losses, expected, what):
    assert len(losses) == len(expected), what
    diffs = [abs(a - b) for a, b in zip(losses, expected)]
    assert max(diffs) < LOSS_TOL, f"{what}: loss differences {diffs}"


# ------------------------------------------------------------------------------------ workers

def _build(cfg) -> Trainer:

    return Trainer(build_training(cfg, verbose=False), H.synthetic_ds())


def _four_rank_worker(rank, world_size, root: str):
    out = {}
    for label, tied, parallel in (("original", False, TP2xEP2), ("pp_original", True, dict(pp=2, zero1=True))):
        cfg = cfg_for(os.path.join(root, label), tied, **parallel)
        cfg.save_interval = SAVE_AT
        out[label] = [h["loss"] for h in _build(cfg).train()]
    for label, tied, parallel, src in (
            ("ep4", False, dict(ep=4), "original"),
            ("from_single", False, TP2xEP2, "single"),
            ("pp_from_single", True, dict(pp=2, tp=2), "single_tied")):
        t = _build(cfg_for(os.path.join(root, label), tied, **parallel))
        t.save = lambda: None
        t.load(step_dir(os.path.join(root, src), SAVE_AT))
        out[label] = [h["loss"] for h in t.train()]
    return out


def _killed_worker(rank, world_size, out_dir: str):
    """Saves every 5 steps; rank 1 SIGKILLs itself right after its first file of step 10."""
    cfg = cfg_for(out_dir, ep=2, zero1=True)
    cfg.save_interval = 5
    trainer = _build(cfg)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if rank == 1 and trainer.step == 10:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
    trainer.train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_ckpt")
    refs = {}
    for label, tied in (("single", False), ("single_tied", True)):
        cfg = cfg_for(str(root / label), tied)
        cfg.save_interval = SAVE_AT
        trainer = single_trainer(cfg)
        refs[label] = [h["loss"] for h in trainer.train()]
        if not tied:
            ref_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    par = H.spawn(4, _four_rank_worker, str(root))
    return SimpleNamespace(root=root, ref=refs["single"], ref_tied=refs["single_tied"], ref_state=ref_state,
                           sharded=root / "original", pp_sharded=root / "pp_original", **par)


# ------------------------------------------------------------------------------- resharding

def test_tp2xep2_zero1_checkpoint_resumes_under_ep4(runs):
    assert_close(runs.original, runs.ref, "TP2xEP2 vs single process")
    assert_close(runs.ep4, runs.original[SAVE_AT:], "TP2xEP2 step 10 -> EP4")


def test_single_process_checkpoint_resumes_under_tp2xep2(runs):
    assert_close(runs.from_single, runs.ref[SAVE_AT:], "single step 10 -> TP2xEP2")


def test_tp2xep2_checkpoint_resumes_in_one_process(runs, tmp_path):
    assert_close(resume_single(step_dir(runs.sharded, SAVE_AT), str(tmp_path)), runs.original[SAVE_AT:],
                 "TP2xEP2 step 10 -> one process")


def test_pipeline_tied_checkpoints_reshard_both_ways(runs, tmp_path):
    """PP2 keeps the head's copy of the tied embedding on the last stage: both names are saved;
    a single-process target ties them again, a pipeline target fills whichever it holds."""
    assert_close(runs.pp_original, runs.ref_tied, "PP2 tied vs single process")
    assert_close(resume_single(step_dir(runs.pp_sharded, SAVE_AT), str(tmp_path), tied=True),
                 runs.pp_original[SAVE_AT:], "PP2 step 10 -> one process")
    assert_close(runs.pp_from_single, runs.ref_tied[SAVE_AT:], "single step 10 -> PP2xTP2")
    meta = sources.open_source(step_dir(runs.pp_sharded, SAVE_AT)).meta["tensors"]
    assert meta["embed.weight"]["model_ranks"] == [0] and meta["lm_head.weight"]["model_ranks"] == [2]
    full = consolidate(step_dir(runs.pp_sharded, SAVE_AT))
    assert full["lm_head.weight"] is full["embed.weight"]


def test_checkpoint_files_and_metadata(runs):
    d = step_dir(runs.sharded, SAVE_AT)
    assert sorted(os.listdir(d)) == sorted(["COMPLETE", "config.yaml", "metadata.json", "trainer.pt"]
                                           + [f"{k}_rank{r}.pt" for k in ("model", "optim") for r in range(4)])
    meta = sources.open_source(d).meta
    assert meta["layout"]["tp"] == 2 and meta["world_size"] == 4
    shapes = {k: list(v.shape) for k, v in runs.ref_state.items()}
    assert {k: v["shape"] for k, v in meta["tensors"].items()} == shapes
    # one copy of each tensor on disk: the expert weights (EP2 x ETP1, edp 2) on two ranks
    assert len(meta["tensors"]["layers.0.ffn.experts.w_gate_up"]["model_ranks"]) == 2


# ---------------------------------------------------------------------------- consolidation

def test_consolidate_equals_single_process_state(runs):
    full = consolidate(step_dir(runs.sharded, STEPS))
    assert set(full) == set(runs.ref_state)
    for name, ref in runs.ref_state.items():
        err = (full[name] - ref).abs().max().item()
        assert err < PARAM_TOL, f"{name} differs by {err}"


def test_consolidated_directory_resumes_in_one_process(runs, tmp_path):
    dst = tmp_path / "single_ckpt"
    assert cli_main(["consolidate", step_dir(runs.sharded, SAVE_AT), str(dst)]) == 0
    assert sorted(os.listdir(dst)) == ["COMPLETE", "config.yaml", "model.pt", "optimizer.pt", "trainer.pt"]
    cfg = cfg_for(str(tmp_path / "run"))
    t = single_trainer(cfg)
    t.save = lambda: None
    t.load(str(dst))           # the unchanged single-process path: model.pt + optimizer.pt
    assert_close([h["loss"] for h in t.train()], runs.original[SAVE_AT:], "consolidated -> one process")
    assert cli_main(["consolidate", str(runs.sharded), str(tmp_path / "w.pt")]) == 0   # latest, weights
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == set(runs.ref_state)
    assert cli_main(["consolidate", str(runs.sharded), str(dst)]) == 2     # exists: one-line error


def test_model_config_mismatch_is_a_value_error(runs):
    cfg = cfg_for("/tmp/unused")
    cfg.model.moe.expert_hidden = 16
    t = single_trainer(cfg)
    with pytest.raises(ValueError, match="model configs differ"):
        ckpt.load_training_state(step_dir(runs.sharded, SAVE_AT), t.model, t.optimizer)


# ------------------------------------------------------------------------------ crash safety

def test_kill_during_checkpoint_write_keeps_previous(runs, tmp_path):
    out = tmp_path / "killed"
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        H.spawn(2, _killed_worker, str(out))
    root = out / ckpt.CKPT_DIR
    assert (root / "latest").read_text() == "step_00000005"
    assert ckpt.list_checkpoints(str(out)) == ["step_00000005"]
    assert (root / ".step_00000010.tmp").is_dir()              # the half-written one
    losses = resume_single(ckpt.newest_checkpoint(str(out)), str(out), save_interval=5)
    assert_close(losses, runs.ref[5:], "resume after kill -9")
    assert sorted(os.listdir(root)) == ["latest", "step_00000005", "step_00000010", "step_00000015"]


# ------------------------------------------------------------------------- slice assembly

def _take(g: torch.Tensor, index) -> torch.Tensor:
    pos = local_to_global_indices(index)
    return g[torch.meshgrid(*pos, indexing="ij")].clone()


E, H_, I = 4, 6, 8      # an expert weight [E, H, 2I] (gate | up)


def _gate_up(ep_rank, ep, etp_rank, etp):
    el, il = E // ep, I // etp
    e0, i0 = ep_rank * el, etp_rank * il
    return (((e0, e0 + el),), ((0, H_),), ((i0, i0 + il), (I + i0, I + i0 + il)))


PATTERNS = {
    "full": lambda: [full_index((E, H_, 2 * I))],
    "dim0/2": lambda: [sharded_index((E, H_, 2 * I), 0, r, 2) for r in range(2)],
    "dim1/3": lambda: [sharded_index((E, H_, 2 * I), 1, r, 3) for r in range(3)],
    "ep2xetp2": lambda: [_gate_up(e, 2, t, 2) for e in range(2) for t in range(2)],
    "ep1xetp4": lambda: [_gate_up(0, 1, t, 4) for t in range(4)],
}


@pytest.mark.parametrize("src", list(PATTERNS))
@pytest.mark.parametrize("dst", list(PATTERNS))
def test_assemble_any_slice_from_any_shards(src, dst):
    g = torch.randn(E, H_, 2 * I, generator=torch.Generator().manual_seed(0))
    pieces = [(ix, None, _take(g, ix)) for ix in PATTERNS[src]()]
    pieces += pieces[:1]                                     # a replica changes nothing
    for ix in PATTERNS[dst]():
        assert torch.equal(reshard.assemble(pieces, ix, None, "w"), _take(g, ix)), (src, dst, ix)


def test_assemble_flat_zero1_pieces_and_gaps():
    g = torch.randn(E, H_, 2 * I, generator=torch.Generator().manual_seed(1))
    shards = PATTERNS["ep2xetp2"]()
    pieces = []
    for ix in shards:   # each local shard split over 3 "DP ranks" at uneven flat offsets
        flat = _take(g, ix).reshape(-1)
        cuts = [0, 5, 29, flat.numel()]
        pieces += [(ix, [a, b], flat[a:b].clone()) for a, b in zip(cuts, cuts[1:])]
    for ix in PATTERNS["dim1/3"]() + PATTERNS["ep1xetp4"]():
        assert torch.equal(reshard.assemble(pieces, ix, torch.float64, "w"), _take(g, ix).double())
    with pytest.raises(ValueError, match="ZeRO-1 state"):
        reshard.assemble(pieces[1:], full_index(g.shape), None, "w")
    whole = [(ix, None, _take(g, ix)) for ix in shards[1:]]
    with pytest.raises(ValueError, match="does not cover all"):
        reshard.assemble(whole, full_index(g.shape), None, "w")
    assert reshard.assemble([], full_index(g.shape), None, "w") is None
    scalar = reshard.assemble([((), None, torch.tensor(3.0))], (), None, "s")
    assert scalar.shape == () and float(scalar) == 3.0


def test_tied_head_copy_loads_from_tied_checkpoint(tmp_path):
    """A target whose head holds its own copy of tied embeddings (the last pipeline stage)
    takes the weights and the moments of the checkpoint's single tied tensor."""
    cfg = cfg_for(str(tmp_path))
    cfg.model.tie_embeddings = True
    cfg.steps, cfg.dtype = 1, "fp32"     # the target below is a plain fp32 model
    src = single_trainer(cfg)
    src.train()                                    # saves step 1 (model.pt + optimizer.pt)
    model = build_model(cfg.model, seed=1)
    model.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    optimizer = torch.optim.AdamW(model.parameters())
    sharded.load(step_dir(tmp_path, 1), model, optimizer)
    embed = src.model.embed.weight
    assert torch.equal(model.lm_head.weight, embed) and torch.equal(model.embed.weight, embed)
    want = src.optimizer.state[embed]["exp_avg"]
    assert torch.equal(optimizer.state[model.lm_head.weight]["exp_avg"], want)
